"""Small test graphs for each layer kind the core issue names."""

from __future__ import annotations

import numpy as np
from onnx import helper

from conftest import make_model, rand

w = rand  # weights: N(0, 1) draws; LSUV replaces them


def conv_chain(dims=2, group=1, depthwise=False):
    """Conv -> Relu -> Conv (optionally grouped or depthwise, 1-D, 2-D or 3-D)."""
    k = [3] * dims
    c = 8
    g2 = c if depthwise else group
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["y1"], name="conv1", kernel_shape=k,
                         pads=[1] * (2 * dims), group=group),
        helper.make_node("Relu", ["y1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["y2"], name="conv2", kernel_shape=k,
                         pads=[1] * (2 * dims), group=g2),
    ]
    spatial = [6] * dims
    inits = {"w1": w(c, 4 // group, *k, seed=1), "b1": rand(c, seed=2),
             "w2": w(c, c // g2, *k, seed=3), "b2": rand(c, seed=4)}
    return make_model(nodes, [("x", ["N", 4, *spatial])], [("y2", None)], inits), \
        {"x": rand(16, 4, *spatial, seed=9)}, ["y1", "y2"]


def conv_transpose(group=1):
    nodes = [
        helper.make_node("ConvTranspose", ["x", "w1", "b1"], ["y1"], name="deconv1",
                         kernel_shape=[3, 3], strides=[2, 2], group=group),
        helper.make_node("Tanh", ["y1"], ["t1"]),
        helper.make_node("ConvTranspose", ["t1", "w2"], ["y2"], name="deconv2",
                         kernel_shape=[2, 2], group=1),
    ]
    inits = {"w1": w(4, 6 // group, 3, 3, seed=1), "b1": rand(6, seed=2),
             "w2": w(6, 3, 2, 2, seed=3)}
    return make_model(nodes, [("x", ["N", 4, 5, 5])], [("y2", None)], inits), \
        {"x": rand(16, 4, 5, 5, seed=9)}, ["y1", "y2"]


def gemm_mlp(trans_b=1):
    def wt(k, n, seed):
        return w(n, k, seed=seed) if trans_b else w(k, n, seed=seed)

    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["y1"], name="fc1", transB=trans_b),
        helper.make_node("LeakyRelu", ["y1"], ["r1"], alpha=0.333),
        helper.make_node("Gemm", ["r1", "w2", "b2"], ["y2"], name="fc2", transB=trans_b,
                         beta=0.5),
        helper.make_node("Sigmoid", ["y2"], ["s2"]),
        helper.make_node("Gemm", ["s2", "w3"], ["y3"], name="fc3", transB=trans_b),
    ]
    inits = {"w1": wt(20, 32, 1), "b1": rand(32, seed=2), "w2": wt(32, 64, 3),
             "b2": rand(64, seed=4), "w3": wt(64, 16, 5)}
    return make_model(nodes, [("x", ["N", 20])], [("y3", None)], inits), \
        {"x": rand(32, 20, seed=9)}, ["y1", "y2", "y3"]


def matmul_linear():
    """MatMul with a 2-D weight on 3-D input, plus Add bias (PyTorch's Linear), and a bare one."""
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["m1"], name="lin1"),
        helper.make_node("Add", ["m1", "b1"], ["y1"], name="lin1_bias"),
        helper.make_node("Relu", ["y1"], ["r1"]),
        helper.make_node("MatMul", ["r1", "w2"], ["y2"], name="lin2"),
    ]
    inits = {"w1": w(12, 24, seed=1), "b1": rand(24, seed=2), "w2": w(24, 8, seed=3)}
    return make_model(nodes, [("x", ["N", 5, 12])], [("y2", None)], inits), \
        {"x": rand(16, 5, 12, seed=9)}, ["y1", "y2"]


def residual_block():
    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["y0"], name="stem", kernel_shape=[3, 3],
                         pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["y0"], ["r0"]),
        helper.make_node("Conv", ["r0", "w1", "b1"], ["y1"], name="res_a", kernel_shape=[3, 3],
                         pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["y1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["y2"], name="res_b", kernel_shape=[3, 3],
                         pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["y2", "r0"], ["s"], name="sum"),
        helper.make_node("Relu", ["s"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["out"], name="fc", transB=1),
    ]
    inits = {"w0": w(8, 3, 3, 3, seed=1), "b0": rand(8, seed=2), "w1": w(8, 8, 3, 3, seed=3),
             "b1": rand(8, seed=4), "w2": w(8, 8, 3, 3, seed=5), "b2": rand(8, seed=6),
             "wf": w(5, 8, seed=7), "bf": rand(5, seed=8)}
    return make_model(nodes, [("x", ["N", 3, 8, 8])], [("out", None)], inits), \
        {"x": rand(16, 3, 8, 8, seed=9)}, ["y0", "y1", "y2", "out"]


def shared_bias(non_target_reader=True):
    """PyTorch-style dedup: one zero bias tensor routed through Identity nodes to two Gemms and,
    optionally, to an Add that is not a target (so zeroing must not change it)."""
    nodes = [
        helper.make_node("Identity", ["shared_b"], ["b_a"]),
        helper.make_node("Identity", ["shared_b"], ["b_b"]),
        helper.make_node("Gemm", ["x", "w1", "b_a"], ["y1"], name="fc1", transB=1),
        helper.make_node("Relu", ["y1"], ["r1"]),
        helper.make_node("Gemm", ["r1", "w2", "b_b"], ["y2"], name="fc2", transB=1),
    ]
    outputs = [("y2", None)]
    if non_target_reader:
        nodes.append(helper.make_node("Add", ["y2", "shared_b"], ["z"], name="plain_add"))
        outputs = [("z", None)]
    inits = {"shared_b": rand(16, seed=2), "w1": w(16, 10, seed=1), "w2": w(16, 16, seed=3)}
    return make_model(nodes, [("x", ["N", 10])], outputs, inits), \
        {"x": rand(32, 10, seed=9)}, ["y1", "y2"]


def two_inputs():
    nodes = [
        helper.make_node("Gemm", ["a", "wa"], ["ya"], name="fc_a", transB=1),
        helper.make_node("Gemm", ["b", "wb"], ["yb"], name="fc_b", transB=1),
        helper.make_node("Concat", ["ya", "yb"], ["c"], axis=1),
        helper.make_node("Tanh", ["c"], ["t"]),
        helper.make_node("Gemm", ["t", "wc", "bc"], ["out"], name="fc_out", transB=1),
    ]
    inits = {"wa": w(8, 6, seed=1), "wb": w(8, 3, seed=2), "wc": w(4, 16, seed=3),
             "bc": rand(4, seed=4)}
    model = make_model(nodes, [("a", ["N", 6]), ("b", ["N", 3])], [("out", None)], inits)
    return model, {"a": rand(32, 6, seed=8), "b": rand(32, 3, seed=9)}, ["ya", "yb", "out"]


ALL = {
    "conv1d": lambda: conv_chain(dims=1),
    "conv2d": lambda: conv_chain(dims=2),
    "conv3d": lambda: conv_chain(dims=3),
    "grouped_conv": lambda: conv_chain(group=2),
    "depthwise_conv": lambda: conv_chain(depthwise=True),
    "conv_transpose": conv_transpose,
    "grouped_conv_transpose": lambda: conv_transpose(group=2),
    "gemm_transB0": lambda: gemm_mlp(0),
    "gemm_transB1": lambda: gemm_mlp(1),
    "matmul": matmul_linear,
    "residual": residual_block,
    "shared_bias": shared_bias,
    "two_inputs": two_inputs,
}

__all__ = ["ALL", "np"]


def tied_weights():
    """One square weight read by two Gemms (fc1 and, later, fc2): tied, set at first use."""
    nodes = [
        helper.make_node("Gemm", ["x", "w"], ["y1"], name="fc1", transB=1),
        helper.make_node("Tanh", ["y1"], ["t1"]),
        helper.make_node("Gemm", ["t1", "w"], ["y2"], name="fc2", transB=1),
        helper.make_node("Relu", ["y2"], ["r2"]),
        helper.make_node("Gemm", ["r2", "w3"], ["y3"], name="fc3", transB=1),
    ]
    inits = {"w": w(16, 16, seed=1), "w3": w(8, 16, seed=2)}
    return make_model(nodes, [("x", ["N", 16])], [("y3", None)], inits), \
        {"x": rand(32, 16, seed=9)}, ["y1", "y3"]


def full_matrix_bias():
    """Gemm whose bias C is a full (M, N) matrix: not per output unit."""
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "c1"], ["y1"], name="fc1", transB=1),
        helper.make_node("Relu", ["y1"], ["r1"]),
        helper.make_node("Gemm", ["r1", "w2"], ["y2"], name="fc2", transB=1),
    ]
    inits = {"w1": w(16, 10, seed=1), "c1": rand(32, 16, seed=2) * 0.3, "w2": w(8, 16, seed=3)}
    return make_model(nodes, [("x", [32, 10])], [("y2", None)], inits), \
        {"x": rand(32, 10, seed=9)}, ["y1", "y2"]


def conv_bn(zero_gamma=False):
    """Conv -> BatchNormalization -> Relu twice, then Gemm -> BatchNormalization (1-D)."""
    def bn(c, seed, zero=False):
        r = np.random.default_rng(seed)
        gamma = np.zeros(c, np.float32) if zero else r.uniform(0.5, 2, c).astype(np.float32)
        return [gamma, r.normal(0, 0.5, c).astype(np.float32),
                r.normal(0, 0.5, c).astype(np.float32), r.uniform(0.5, 2, c).astype(np.float32)]

    inits = {"w1": w(8, 3, 3, 3, seed=1), "b1": rand(8, seed=2) * 0.2,
             "w2": w(8, 8, 3, 3, seed=3), "wf": w(6, 8 * 36, seed=4)}
    for name, c, seed, zero in (("bn1", 8, 5, False), ("bn2", 8, 6, zero_gamma),
                                ("bnf", 6, 7, False)):
        for suffix, v in zip(("scale", "bias", "mean", "var"), bn(c, seed, zero)):
            inits[f"{name}.{suffix}"] = v

    def bn_node(x, y, name):
        return helper.make_node("BatchNormalization", [x] + [f"{name}.{s}" for s in
                                ("scale", "bias", "mean", "var")], [y], name=name, epsilon=1e-3)

    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["y1"], name="conv1", kernel_shape=[3, 3],
                         pads=[1, 1, 1, 1]),
        bn_node("y1", "n1", "bn1"),
        helper.make_node("Relu", ["n1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["y2"], name="conv2", kernel_shape=[3, 3],
                         pads=[1, 1, 1, 1]),
        bn_node("y2", "n2", "bn2"),
        helper.make_node("Add", ["n2", "r1"], ["s"]),
        helper.make_node("Relu", ["s"], ["r2"]),
        helper.make_node("Flatten", ["r2"], ["f"]),
        helper.make_node("Gemm", ["f", "wf"], ["yf"], name="fc", transB=1),
        bn_node("yf", "nf", "bnf"),
    ]
    return make_model(nodes, [("x", ["N", 3, 6, 6])], [("nf", None)], inits), \
        {"x": rand(16, 3, 6, 6, seed=9)}, ["y1", "y2", "yf"]


ALL["conv_bn"] = conv_bn
ALL["conv_bn_zero_gamma"] = lambda: conv_bn(zero_gamma=True)


def weight_norm_conv(producer: str | None = None):
    """A Conv whose weight is computed in the graph as weight_norm writes it (torch's dynamo
    exporter keeps it as arithmetic: w = g * v / ||v||), exported by ``producer``."""
    nodes = [helper.make_node("ReduceL2", ["v"], ["norm"], axes=[1, 2], keepdims=1),
             helper.make_node("Div", ["v", "norm"], ["dir"]),
             helper.make_node("Mul", ["g", "dir"], ["w"]),
             helper.make_node("Conv", ["x", "w"], ["y"], name="pos_conv")]
    model = make_model(nodes, [("x", ["N", 4, 8])], [("y", None)],
                       {"v": rand(4, 4, 3, seed=1), "g": rand(4, 1, 1, seed=2)})
    if producer is not None:
        model.producer_name = producer
    return model
