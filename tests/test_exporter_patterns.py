"""Every exporter's graph, built here with onnx.helper exactly as the exporter writes it.

Each test checks, independently of onnx_lsuv (its own ORT session, float64 statistics, its own
numpy view of each weight):
* the structure is unchanged: the same nodes with the same attributes and inputs, the same
  initializer names, shapes and dtypes, nothing added;
* only the targets' weights and biases changed;
* every target's output after its bias has variance 1 within tol;
* each weight, as the layer reads it, is orthonormal up to one scale per group.

The real exporters run on small models in tests/test_real_exporters.py.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_lsuv import lsuv_init

import models
from conftest import make_model, output_values, rand
from independent import body_values

TOL = 0.1


def assert_structure_unchanged(before: onnx.ModelProto, after: onnx.ModelProto) -> None:
    assert [n.SerializeToString() for n in after.graph.node] == \
        [n.SerializeToString() for n in before.graph.node]
    assert [(t.name, list(t.dims), t.data_type) for t in after.graph.initializer] == \
        [(t.name, list(t.dims), t.data_type) for t in before.graph.initializer]
    assert after.graph.input == before.graph.input and after.graph.output == before.graph.output


def changed(before: onnx.ModelProto, after: onnx.ModelProto) -> set[str]:
    old = {t.name: t.SerializeToString() for t in before.graph.initializer}
    return {t.name for t in after.graph.initializer if t.SerializeToString() != old[t.name]}


def stored(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


def pooled_var(model, feeds, names) -> float:
    values = output_values(model, feeds, names)
    return float(np.var(np.concatenate([v.astype(np.float64).ravel() for v in values])))


def assert_orthonormal_up_to_scale(matrices: np.ndarray, atol: float = 1e-5) -> None:
    for m in np.asarray(matrices, np.float64):
        gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
        np.testing.assert_allclose(gram / gram[0, 0], np.eye(len(gram)), atol=atol)


def run_and_check(model, feeds, targets, biases, **options):
    """LSUV on ``model``; every group of ``targets`` (tensor names pooled) at unit variance;
    exactly the initializers ``changed_expected`` changed. Returns the result."""
    result = lsuv_init(model, feeds, provider="cpu", **options)
    assert_structure_unchanged(model, result.model)
    for names in targets:
        v = pooled_var(result.model, feeds, names)
        assert abs(v - 1) < TOL, (names, v, result.report.table())
    assert result.report.converged, result.report.table()
    if biases is not None:
        for b in biases:
            assert not np.any(stored(result.model, b)), b
    return result


# --- 1. weights through a chain of layout ops on a constant -----------------------------------

def keras_jax_conv():
    """jax2onnx's Keras/Flax Conv: the HWIO kernel read through Transpose(perm 3, 2, 0, 1)."""
    nodes = [
        helper.make_node("Transpose", ["k1"], ["w1"], perm=[3, 2, 0, 1]),
        helper.make_node("Conv", ["x", "w1", "b1"], ["y1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["y1"], ["r1"]),
        helper.make_node("Transpose", ["k2"], ["w2"], perm=[3, 2, 0, 1]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["y2"], name="conv2", pads=[1, 1, 1, 1],
                         group=2),
    ]
    inits = {"k1": rand(3, 3, 3, 8, seed=1), "b1": rand(8, seed=2),
             "k2": rand(3, 3, 4, 6, seed=3), "b2": rand(6, seed=4)}
    model = make_model(nodes, [("x", ["N", 3, 8, 8])], [("y2", None)], inits)
    return model, {"x": rand(16, 3, 8, 8, seed=9)}


def test_conv_weights_read_through_a_transpose_are_targets_written_back_in_their_layout():
    model, feeds = keras_jax_conv()
    result = run_and_check(model, feeds, [["y1"], ["y2"]], ["b1", "b2"])
    assert [r.name for r in result.report.layers] == ["conv1", "conv2"]
    assert changed(model, result.model) == {"k1", "k2", "b1", "b2"}
    w1 = stored(result.model, "k1").transpose(3, 2, 0, 1)  # the test's own view: OIHW
    assert_orthonormal_up_to_scale(w1.reshape(1, 8, -1))
    w2 = stored(result.model, "k2").transpose(3, 2, 0, 1)  # (6, 2, 3, 3), 2 groups of 3
    assert_orthonormal_up_to_scale(w2.reshape(2, 3, -1))


def flax_conv_transpose(opset=17):
    """Flax nnx ConvTranspose through jax2onnx: the (kh, kw, in, out) kernel flipped by a Slice
    with steps -1, then transposed to ONNX's (in, out, kh, kw)."""
    nodes = [
        helper.make_node("Slice", ["k", "starts", "ends", "axes", "steps"], ["k_flip"]),
        helper.make_node("Transpose", ["k_flip"], ["w"], perm=[2, 3, 0, 1]),
        helper.make_node("ConvTranspose", ["x", "w", "b"], ["y"], name="deconv",
                         strides=[2, 2], kernel_shape=[3, 3]),
        helper.make_node("Tanh", ["y"], ["t"]),
    ]
    inits = {"k": rand(3, 3, 4, 6, seed=1), "b": rand(6, seed=2),
             "starts": np.array([-1, -1], np.int64),
             "ends": np.array([-(2 ** 62), -(2 ** 62)], np.int64),
             "axes": np.array([0, 1], np.int64), "steps": np.array([-1, -1], np.int64)}
    model = make_model(nodes, [("x", ["N", 4, 5, 5])], [("t", None)], inits, opset=opset)
    return model, {"x": rand(16, 4, 5, 5, seed=9)}


def test_a_flipped_and_transposed_conv_transpose_kernel_is_a_target():
    model, feeds = flax_conv_transpose()
    result = run_and_check(model, feeds, [["y"]], ["b"])
    assert changed(model, result.model) == {"k", "b"}
    w = stored(result.model, "k")[::-1, ::-1].transpose(2, 3, 0, 1)  # (in, out, kh, kw)
    # ConvTranspose: output units on axis 1, fan-in = in x kh x kw.
    assert_orthonormal_up_to_scale(w.transpose(1, 0, 2, 3).reshape(1, 6, -1))


def test_a_float16_weight_cast_and_reshaped_keeps_its_dtype_and_slice_keeps_dropped_values():
    # Reshape(Cast(float16 store)) into a Gemm, and a Slice that uses only the first 8 of 10
    # stored rows: the 2 rows no layer reads keep their bytes.
    nodes = [
        helper.make_node("Cast", ["w_h"], ["w_f"], to=TensorProto.FLOAT),
        helper.make_node("Reshape", ["w_f", "shape"], ["w1"]),
        helper.make_node("Gemm", ["x", "w1", "b1"], ["y1"], name="fc1"),
        helper.make_node("Relu", ["y1"], ["r1"]),
        helper.make_node("Slice", ["w2_all", "s0", "s1"], ["w2"]),
        helper.make_node("MatMul", ["r1", "w2_t"], ["y2"], name="fc2"),
    ]
    inits = {"w_h": rand(192, seed=1).astype(np.float16), "b1": rand(16, seed=2),
             "w2_all": rand(10, 16, seed=3), "s0": np.array([0], np.int64),
             "s1": np.array([8], np.int64), "shape": np.array([12, 16], np.int64)}
    nodes.insert(5, helper.make_node("Transpose", ["w2"], ["w2_t"], perm=[1, 0]))
    model = make_model(nodes, [("x", ["N", 12])], [("y2", None)], inits)
    feeds = {"x": rand(64, 12, seed=9)}
    result = run_and_check(model, feeds, [["y1"], ["y2"]], ["b1"])
    assert stored(result.model, "w_h").dtype == np.float16
    np.testing.assert_array_equal(stored(result.model, "w2_all")[8:], stored(model, "w2_all")[8:])
    assert_orthonormal_up_to_scale(stored(result.model, "w_h").astype(np.float64)
                                   .reshape(12, 16).T[None], atol=3e-3)  # float16 rounding
    # MatMul(r1, W2^T): rows of w2 (8 x 16) are the output units, orthonormal.
    assert_orthonormal_up_to_scale(stored(result.model, "w2_all")[:8][None])


# --- 2. a bias Add after shape-only ops --------------------------------------------------------

def tf2onnx_conv1d():
    """tf2onnx's Keras Conv1D: NWC input expanded to NHWC, a 2-D Conv in NCHW between
    Transposes, squeezed back to NWC, then the bias Add of a [C] constant."""
    nodes = [
        helper.make_node("Unsqueeze", ["x", "axes1"], ["x4"]),
        helper.make_node("Transpose", ["x4"], ["x_nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["x_nchw", "w"], ["c"], name="conv1d", kernel_shape=[1, 3],
                         pads=[0, 1, 0, 1]),
        helper.make_node("Transpose", ["c"], ["c_nhwc"], perm=[0, 2, 3, 1]),
        helper.make_node("Squeeze", ["c_nhwc", "axes1"], ["c3"]),
        helper.make_node("Add", ["c3", "b"], ["y"]),
        helper.make_node("Relu", ["y"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["m2"], name="dense"),
        helper.make_node("Reshape", ["m2", "shape"], ["m2r"]),
        helper.make_node("Add", ["m2r", "b2"], ["y2"]),
    ]
    inits = {"w": rand(8, 4, 1, 3, seed=1), "b": rand(8, seed=2) + 2.0,
             "w2": rand(8, 6, seed=3), "shape": np.array([-1, 10, 6], np.int64),
             "b2": rand(6, seed=4) * 2, "axes1": np.array([1], np.int64)}
    model = make_model(nodes, [("x", ["N", 10, 4])], [("y2", None)], inits)
    return model, {"x": rand(16, 10, 4, seed=9)}


@pytest.mark.parametrize("keep_bias", [False, True])
def test_a_bias_added_after_squeeze_or_reshape_is_the_layers_bias(keep_bias):
    model, feeds = tf2onnx_conv1d()
    if keep_bias:  # kept biases must leave the target reachable: their own variance < 1
        for t in model.graph.initializer:
            if t.name in ("b", "b2"):
                t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * 0.25, t.name))
    result = run_and_check(model, feeds, [["y"], ["y2"]], None if keep_bias else ["b", "b2"],
                           keep_bias=keep_bias)
    assert [r.bias for r in result.report.layers] == ["b", "b2"]
    if keep_bias:
        assert changed(model, result.model) == {"w", "w2"}
        np.testing.assert_array_equal(stored(result.model, "b"), stored(model, "b"))


def paddle_conv():
    """paddle2onnx: every conv bias a separate Add of a [1, C, 1, 1] constant."""
    nodes = [
        helper.make_node("Conv", ["x", "conv2d_0.w_0"], ["c1"], name="conv2d_0",
                         pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c1", "conv2d_0.b_0"], ["y1"]),
        helper.make_node("Relu", ["y1"], ["r1"]),
        helper.make_node("Conv", ["r1", "conv2d_1.w_0"], ["c2"], name="conv2d_1",
                         pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["conv2d_1.b_0", "c2"], ["y2"]),
    ]
    inits = {"conv2d_0.w_0": rand(8, 3, 3, 3, seed=1),
             "conv2d_0.b_0": rand(1, 8, 1, 1, seed=2),
             "conv2d_1.w_0": rand(4, 8, 3, 3, seed=3),
             "conv2d_1.b_0": rand(1, 4, 1, 1, seed=4)}
    model = make_model(nodes, [("x", ["N", 3, 8, 8])], [("y2", None)], inits)
    return model, {"x": rand(16, 3, 8, 8, seed=9)}


def test_paddle_conv_biases_added_separately_are_zeroed_and_measured_after():
    model, feeds = paddle_conv()
    result = run_and_check(model, feeds, [["y1"], ["y2"]], ["conv2d_0.b_0", "conv2d_1.b_0"])
    assert changed(model, result.model) == {"conv2d_0.w_0", "conv2d_0.b_0", "conv2d_1.w_0",
                                            "conv2d_1.b_0"}


def test_a_constant_add_that_does_not_line_up_with_the_units_is_not_taken_for_a_bias():
    # [C, 1] added to a MatMul output [N, C]: a per-row offset, not a bias.
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"),
             helper.make_node("Add", ["m", "c"], ["y"])]
    model = make_model(nodes, [("x", [8, 8])], [("y", None)],
                       {"w": rand(8, 8, seed=1), "c": rand(8, 1, seed=2)})
    result = lsuv_init(model, rand(8, 8, seed=3), provider="cpu")
    assert result.report.layers[0].bias is None
    assert "c" not in changed(model, result.model)


# --- 3. a weight shared by the steps of an unrolled recurrence --------------------------------

def unrolled_rnn(steps=8, hidden=16, features=6):
    """An RNN written as a Python loop (jax2onnx): W_x, W_h and b shared by every step, the
    hidden state starting at zeros (ConstantOfShape of the batch size)."""
    nodes = [
        helper.make_node("Shape", ["x"], ["xs"]),
        helper.make_node("Gather", ["xs", "zero_i"], ["batch"], axis=0),
        helper.make_node("Concat", ["batch", "hidden_dim"], ["h_shape"], axis=0),
        helper.make_node("ConstantOfShape", ["h_shape"], ["h0"],
                         value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.0])),
    ]
    h = "h0"
    xproj, hproj = [], []
    for t in range(steps):
        nodes += [
            helper.make_node("Gather", ["x", f"t{t}"], [f"x{t}"], axis=1),
            helper.make_node("MatMul", [f"x{t}", "W_x"], [f"px{t}"], name=f"step{t}_x"),
            helper.make_node("MatMul", [h, "W_h"], [f"ph{t}"], name=f"step{t}_h"),
            helper.make_node("Add", [f"ph{t}", "b"], [f"phb{t}"]),
            helper.make_node("Add", [f"px{t}", f"phb{t}"], [f"pre{t}"]),
            helper.make_node("Tanh", [f"pre{t}"], [f"h{t + 1}"]),
        ]
        xproj.append(f"px{t}")
        hproj.append(f"phb{t}")
        h = f"h{t + 1}"
    inits = {"W_x": rand(features, hidden, seed=1), "W_h": rand(hidden, hidden, seed=2),
             "b": rand(hidden, seed=3), "zero_i": np.array([0], np.int64),
             "hidden_dim": np.array([hidden], np.int64),
             **{f"t{t}": np.array(t, np.int64) for t in range(steps)}}
    model = make_model(nodes, [("x", ["N", steps, features])], [(h, None)], inits)
    return model, {"x": rand(32, steps, features, seed=9)}, xproj, hproj


@pytest.mark.parametrize("strategy", ["fast", "naive"])
def test_a_weight_shared_by_unrolled_steps_is_one_layer_pooled_over_them(strategy):
    model, feeds, xproj, hproj = unrolled_rnn()
    result = run_and_check(model, feeds, [xproj], ["b"], strategy=strategy)
    rep = result.report
    assert [r.name for r in rep.layers] == ["step0_x", "step0_h"]
    assert changed(model, result.model) == {"W_x", "W_h", "b"}  # no private bias copies
    assert len(result.model.graph.initializer) == len(model.graph.initializer)
    assert any("applied by 8 nodes" in n for n in rep.notes)
    # W_h multiplies the previous state: orthonormal and not scaled (an RNN op's R rule).
    assert rep.layers[1].status == "not_scaled" and rep.layers[1].scale == 1.0
    w_h = stored(result.model, "W_h").astype(np.float64)
    np.testing.assert_allclose(w_h.T @ w_h, np.eye(16), atol=1e-5)


def test_a_weight_shared_by_independent_branches_is_solved_in_one_pass():
    # A siamese conv: the same weight on two inputs, neither use feeding the other.
    nodes = [helper.make_node("Conv", ["a", "w", "bias"], ["ya"], name="left"),
             helper.make_node("Conv", ["b", "w", "bias"], ["yb"], name="right"),
             helper.make_node("Add", ["ya", "yb"], ["s"]),
             helper.make_node("Relu", ["s"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["y2"], name="head")]
    model = make_model(nodes, [("a", ["N", 3, 6, 6]), ("b", ["N", 3, 6, 6])], [("y2", None)],
                       {"w": rand(4, 3, 3, 3, seed=1), "bias": rand(4, seed=2),
                        "w2": rand(2, 4, 1, 1, seed=3)})
    feeds = {"a": rand(16, 3, 6, 6, seed=4), "b": 3 * rand(16, 3, 6, 6, seed=5)}
    result = run_and_check(model, feeds, [["ya", "yb"], ["y2"]], ["bias"])
    assert "retry_s" not in result.report.timings


# --- pattern 5 and the layers that must not be touched ----------------------------------------

def test_a_weight_computed_in_the_graph_says_why_and_what_to_do():
    model = models.weight_norm_conv()  # weight_norm kept as arithmetic (torch's dynamo)
    result = lsuv_init(model, rand(8, 4, 8, seed=3), provider="cpu")
    reason = result.report.skipped[0]["reason"]
    assert "computed in the graph" in reason and "Div, Mul, ReduceL2" in reason
    assert "dynamo=False" in reason and "remove_parametrizations" in reason


def yolo_head():
    """YOLOv8's detection head: a trained conv, then the fixed DFL conv (1 x 16 weights
    0..15) that decodes box distributions."""
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="cv2"),
             helper.make_node("Softmax", ["y"], ["p"], axis=1),
             helper.make_node("Conv", ["p", "dfl.conv.weight"], ["box"], name="dfl.conv")]
    inits = {"w": rand(16, 8, 1, 1, seed=1), "b": rand(16, seed=2),
             "dfl.conv.weight": np.arange(16, dtype=np.float32).reshape(1, 16, 1, 1)}
    model = make_model(nodes, [("x", ["N", 8, 4, 4])], [("box", None)], inits)
    return model, {"x": rand(16, 8, 4, 4, seed=9)}


def test_a_hand_set_kernel_is_left_alone_unless_included():
    model, feeds = yolo_head()
    result = lsuv_init(model, feeds, provider="cpu")
    assert [r.name for r in result.report.layers] == ["cv2"]
    reason = next(s["reason"] for s in result.report.skipped if s["name"] == "dfl.conv")
    assert "hand-set" in reason and "0 to 15" in reason and "--include dfl.conv" in reason
    np.testing.assert_array_equal(stored(result.model, "dfl.conv.weight"),
                                  stored(model, "dfl.conv.weight"))
    taken = lsuv_init(model, feeds, provider="cpu", include=["dfl.*"])
    assert [r.name for r in taken.report.layers] == ["cv2", "dfl.conv"]


@pytest.mark.parametrize("dtype, scale", [(np.float32, 1e9), (np.float32, 2.0 ** 23),
                                          (np.float16, 5000.0)])
def test_a_kernel_of_large_random_values_is_a_target_not_hand_set(dtype, scale):
    """Every float32 from 2^23 on (float16: 2^10) is an integer: there it is no evidence of
    a hand-set kernel. The YOLO head's 0..15 kernel in the same model is still left alone."""
    model, feeds = yolo_head()
    r = rand(16, 8, 1, 1, seed=1)
    big = (np.sign(r) * (1 + np.abs(r)) * scale).astype(dtype)  # random, |x| >= scale
    assert np.all(big == np.round(big)) and len(np.unique(big)) > 3
    nodes = list(model.graph.node)
    if dtype != np.float32:  # a float16 store read through Cast(to float)
        nodes.insert(0, helper.make_node("Cast", ["w16"], ["w"], to=TensorProto.FLOAT))
    inits = {("w16" if dtype != np.float32 else "w"): big, "b": rand(16, seed=2),
             "dfl.conv.weight": np.arange(16, dtype=np.float32).reshape(1, 16, 1, 1)}
    model = make_model(nodes, [("x", ["N", 8, 4, 4])], [("box", None)], inits)
    result = lsuv_init(model, feeds, provider="cpu")
    assert [r.name for r in result.report.layers] == ["cv2"]
    assert [s["name"] for s in result.report.skipped] == ["dfl.conv"]
    assert abs(pooled_var(result.model, feeds, ["y"]) - 1) < TOL
    np.testing.assert_array_equal(stored(result.model, "dfl.conv.weight"),
                                  stored(model, "dfl.conv.weight"))


@pytest.mark.parametrize("exclude, include, expected", [
    (["dfl*"], [], ["cv2"]),
    (["Conv"], [], []),
    (["*"], ["cv2"], ["cv2"]),
    (["w"], [], []),  # by weight name
    (["c?2"], ["dfl.conv"], ["dfl.conv"]),
])
def test_exclude_and_include_patterns_match_node_weight_or_op(exclude, include, expected):
    model, feeds = yolo_head()
    result = lsuv_init(model, feeds, provider="cpu", exclude=exclude, include=include)
    assert [r.name for r in result.report.layers] == expected
    excluded = [s["name"] for s in result.report.skipped if s["excluded"]]
    assert "cv2" in excluded or "cv2" in expected
    untouched = ({"w", "b"} if "cv2" not in expected else set()) | \
        ({"dfl.conv.weight"} if "dfl.conv" not in expected else set())
    for name in untouched:
        np.testing.assert_array_equal(stored(result.model, name), stored(model, name))


def gpt2_tied_head(vocab=32, dim=16):
    """GPT-2 under the dynamo exporter: the token embedding table is also the LM head's weight,
    read by a Gather and, through a Transpose, by the head's MatMul."""
    nodes = [helper.make_node("Gather", ["wte", "ids"], ["e"], name="embed"),
             helper.make_node("MatMul", ["e", "w_fc"], ["h"], name="fc"),
             helper.make_node("Tanh", ["h"], ["t"]),
             helper.make_node("Transpose", ["wte"], ["wte_t"], perm=[1, 0]),
             helper.make_node("MatMul", ["t", "wte_t"], ["logits"], name="lm_head")]
    inits = {"wte": rand(vocab, dim, seed=1) * 0.02, "w_fc": rand(dim, dim, seed=2)}
    model = make_model(nodes, [("ids", ["N", 5], TensorProto.INT64)], [("logits", None)],
                       inits)
    feeds = {"ids": np.random.default_rng(0).integers(0, vocab, (32, 5)).astype(np.int64)}
    return model, feeds


def test_a_weight_tied_to_a_non_target_is_left_alone_by_default_and_taken_when_included():
    model, feeds = gpt2_tied_head()
    result = lsuv_init(model, feeds, provider="cpu")
    assert [r.name for r in result.report.layers] == ["fc"]
    reason = next(s["reason"] for s in result.report.skipped if s["name"] == "lm_head")
    assert "also read by embed (Gather)" in reason
    np.testing.assert_array_equal(stored(result.model, "wte"), stored(model, "wte"))
    taken = lsuv_init(model, feeds, provider="cpu", include=["lm_head"])
    assert [r.name for r in taken.report.layers] == ["fc", "lm_head"]
    assert "wte" in changed(model, taken.model)


# --- 4. recurrences exported as Loop or Scan ----------------------------------------------------

def _body(nodes, inputs, outputs):
    return helper.make_graph(nodes, "body",
                             [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
                             [helper.make_tensor_value_info(n, t, s) for n, t, s in outputs])


def _h0(batch_of, hidden):
    """A zero hidden state of the batch's size (ConstantOfShape, as exporters write it)."""
    return [helper.make_node("Shape", [batch_of], ["xs"]),
            helper.make_node("Gather", ["xs", "one_i"], ["batch"], axis=0),
            helper.make_node("Concat", ["batch", "hidden_dim"], ["h_shape"], axis=0),
            helper.make_node("ConstantOfShape", ["h_shape"], ["h0"],
                             value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.0]))]


def loop_rnn(steps=6, features=5, hidden=12):
    """A Loop over time steps (tf2onnx / jax2onnx style): W read from the enclosing scope,
    U and b passed in as loop-carried values that the body returns unchanged (through
    Identity)."""
    f, i64, b_ = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL
    body = _body([
        helper.make_node("Gather", ["x", "it"], ["x_t"], axis=0),
        helper.make_node("MatMul", ["x_t", "W"], ["px"], name="proj_x"),
        helper.make_node("MatMul", ["h", "U_in"], ["ph"], name="proj_h"),
        helper.make_node("Add", ["ph", "b_in"], ["phb"]),
        helper.make_node("Add", ["px", "phb"], ["pre"]),
        helper.make_node("Tanh", ["pre"], ["h_new"]),
        helper.make_node("Identity", ["cond"], ["cond_out"]),
        helper.make_node("Identity", ["U_in"], ["U_out"]),
        helper.make_node("Identity", ["b_in"], ["b_out"]),
    ], [("it", i64, []), ("cond", b_, []), ("h", f, ["N", hidden]),
        ("U_in", f, [hidden, hidden]), ("b_in", f, [hidden])],
        [("cond_out", b_, []), ("h_new", f, ["N", hidden]), ("U_out", f, [hidden, hidden]),
         ("b_out", f, [hidden])])
    nodes = _h0("x", hidden) + [
        helper.make_node("Loop", ["trip", "true", "h0", "U", "b"], ["h_T", "U_T", "b_T"],
                         name="rnn_loop", body=body)]
    inits = {"W": rand(features, hidden, seed=1), "U": rand(hidden, hidden, seed=2),
             "b": rand(hidden, seed=3), "trip": np.array(steps, np.int64),
             "true": np.array(True), "one_i": np.array([1], np.int64),
             "hidden_dim": np.array([hidden], np.int64)}
    model = make_model(nodes, [("x", [steps, "N", features])], [("h_T", ["N", hidden])], inits)
    return model, {"x": rand(steps, 32, features, seed=9)}


def scan_rnn(steps=6, features=5, hidden=12):
    """The same recurrence as a Scan (W, U and b from the enclosing scope)."""
    f = TensorProto.FLOAT
    body = _body([
        helper.make_node("MatMul", ["x_t", "W"], ["px"], name="proj_x"),
        helper.make_node("MatMul", ["h", "U"], ["ph"], name="proj_h"),
        helper.make_node("Add", ["ph", "b"], ["phb"]),
        helper.make_node("Add", ["px", "phb"], ["pre"]),
        helper.make_node("Tanh", ["pre"], ["h_new"]),
        helper.make_node("Identity", ["h_new"], ["y_t"]),
    ], [("h", f, None), ("x_t", f, None)], [("h_new", f, None), ("y_t", f, None)])
    nodes = [
        helper.make_node("Shape", ["x"], ["xs"]),
        helper.make_node("Gather", ["xs", "zero_i"], ["batch"], axis=0),
        helper.make_node("Concat", ["batch", "hidden_dim"], ["h_shape"], axis=0),
        helper.make_node("ConstantOfShape", ["h_shape"], ["h0"],
                         value=helper.make_tensor("v", f, [1], [0.0])),
        helper.make_node("Scan", ["h0", "x"], ["h_T", "ys"], name="rnn_scan", body=body,
                         num_scan_inputs=1, scan_input_axes=[1])]
    inits = {"W": rand(features, hidden, seed=1), "U": rand(hidden, hidden, seed=2),
             "b": rand(hidden, seed=3), "zero_i": np.array([0], np.int64),
             "hidden_dim": np.array([hidden], np.int64)}
    model = make_model(nodes, [("x", ["N", steps, features])], [("ys", None)], inits)
    return model, {"x": rand(32, steps, features, seed=9)}


def step_variances(model, feeds, node_name, inner):
    """Variance of body tensors ``inner`` over every iteration of Loop/Scan ``node_name``,
    measured here: the test's own copy returns them as extra scan outputs."""
    return [float(np.var(v)) for v in body_values(model, feeds, node_name, inner)]


@pytest.mark.parametrize("build, node", [(loop_rnn, "rnn_loop"), (scan_rnn, "rnn_scan")])
@pytest.mark.parametrize("strategy", ["fast", "naive"])
def test_matmuls_inside_a_loop_or_scan_are_measured_over_every_iteration(build, node, strategy):
    model, feeds = build()
    before = step_variances(model, feeds, node, ["px"])
    assert all(abs(v - 1) > TOL for v in before)  # the test would prove nothing otherwise
    result = lsuv_init(model, feeds, provider="cpu", strategy=strategy)
    assert_structure_unchanged(model, result.model)
    assert [r.name for r in result.report.layers] == ["proj_x", "proj_h"], result.report.table()
    assert changed(model, result.model) == {"W", "U", "b"}
    assert not np.any(stored(result.model, "b"))
    for v in step_variances(result.model, feeds, node, ["px"]):
        assert abs(v - 1) < TOL, (v, result.report.table())
    assert result.report.converged
    # U multiplies the carried state: orthonormal and not scaled (an RNN op's R rule).
    assert result.report.layers[1].status == "not_scaled"
    u = stored(result.model, "U").astype(np.float64)
    np.testing.assert_allclose(u.T @ u, np.eye(len(u)), atol=1e-5)


def test_a_body_target_whose_weight_is_computed_in_the_body_keeps_the_named_warning():
    model, feeds = scan_rnn()
    body = next(a.g for a in model.graph.node[-1].attribute if a.name == "body")
    body.node[1].input[1] = "U2"  # U doubled inside the body: not a main-graph constant
    body.node.insert(0, helper.make_node("Add", ["U", "U"], ["U2"]))
    result = lsuv_init(model, feeds, provider="cpu")
    assert [r.name for r in result.report.layers] == ["proj_x"]
    (loop,) = [s for s in result.report.skipped if s["name"] == "rnn_scan"]
    assert "1 target op(s) inside a subgraph" in loop["reason"]


def test_a_weight_that_a_loop_body_reads_for_something_else_is_left_alone():
    # The body reads W from the enclosing scope, but not as a layer: scaling W for the MatMul
    # outside would silently change what the Loop computes.
    f, i64, b_ = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL
    body = _body([helper.make_node("ReduceSum", ["W"], ["w_sum"], keepdims=0),
                  helper.make_node("Add", ["s", "w_sum"], ["s_new"]),
                  helper.make_node("Identity", ["cond"], ["cond_out"])],
                 [("it", i64, []), ("cond", b_, []), ("s", f, [])],
                 [("cond_out", b_, []), ("s_new", f, [])])
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="fc"),
             helper.make_node("Loop", ["trip", "true", "s0"], ["s_T"], name="sum_loop",
                              body=body)]
    model = make_model(nodes, [("x", ["N", 4])], [("y", ["N", 4]), ("s_T", [])],
                       {"W": rand(4, 4, seed=1), "trip": np.array(2, np.int64),
                        "true": np.array(True), "s0": np.array(0.0, np.float32)})
    result = lsuv_init(model, rand(16, 4, seed=2), provider="cpu")
    assert result.report.layers == []
    (fc,) = [s for s in result.report.skipped if s["name"] == "fc"]
    assert "also read by sum_loop (Loop)" in fc["reason"]


# --- found in review: readers of a chain's output, bodies and their biases, computed shapes ----

def test_a_non_target_reading_the_weight_after_its_chain_is_a_reader_too():
    nodes = [helper.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0]),
             helper.make_node("MatMul", ["x", "Wt"], ["y"], name="mm"),
             helper.make_node("ReduceSum", ["Wt"], ["s"], name="other", keepdims=0)]
    model = make_model(nodes, [("x", ["N", 6])], [("y", None), ("s", None)],
                       {"W": rand(6, 6, seed=1)})
    result = lsuv_init(model, rand(16, 6, seed=2), provider="cpu")
    assert result.report.layers == []
    assert "also read by other (ReduceSum)" in result.report.skipped[0]["reason"]
    assert changed(model, result.model) == set()


def test_a_bias_whose_chain_output_another_node_reads_gets_a_copy():
    nodes = [helper.make_node("Reshape", ["b", "shape"], ["rb"]),
             helper.make_node("MatMul", ["x", "W"], ["m"], name="mm"),
             helper.make_node("Add", ["m", "rb"], ["y"]),
             helper.make_node("Mul", ["x", "rb"], ["z"], name="other")]
    model = make_model(nodes, [("x", ["N", 8])], [("y", None), ("z", None)],
                       {"W": rand(8, 8, seed=1), "b": rand(8, seed=2),
                        "shape": np.array([1, 8], np.int64)})
    x = rand(16, 8, seed=3)
    (z_before,) = output_values(model, {"x": x}, ["z"])
    result = lsuv_init(model, x, provider="cpu")
    (z_after,) = output_values(result.model, {"x": x}, ["z"])
    np.testing.assert_array_equal(z_before, z_after)
    assert any("also read by other" in n for n in result.report.notes)
    assert abs(pooled_var(result.model, {"x": x}, ["y"]) - 1) < TOL


def test_a_body_layers_bias_also_read_in_the_main_graph_gets_a_copy():
    model, feeds = scan_rnn()
    model.graph.node.append(helper.make_node("Mul", ["ys", "b"], ["z"], name="other"))
    model.graph.output.append(helper.make_empty_tensor_value_info("z"))
    b_before = stored(model, "b")
    result = lsuv_init(model, feeds, provider="cpu")
    np.testing.assert_array_equal(stored(result.model, "b"), b_before)
    assert any("its bias 'b' is also read by other" in n for n in result.report.notes)
    copy = next(t for t in result.model.graph.initializer if t.name.endswith(".bias"))
    assert not np.any(numpy_helper.to_array(copy))


def test_one_weight_in_two_scan_bodies_is_not_pooled_and_the_second_is_named():
    f = TensorProto.FLOAT
    bodies = [_body([helper.make_node("MatMul", ["x_t", "W"], ["y"], name=f"m{k}"),
                     helper.make_node("Identity", ["h"], ["h_new"])],
                    [("h", f, None), ("x_t", f, None)], [("h_new", f, None), ("y", f, None)])
              for k in (1, 2)]
    nodes = [helper.make_node("Mul", ["x", "five"], ["x5"]),
             helper.make_node("Scan", ["h0", "x"], ["h1", "ya"], name="scan1", body=bodies[0],
                              num_scan_inputs=1),
             helper.make_node("Scan", ["h0", "x5"], ["h2", "yb"], name="scan2",
                              body=bodies[1], num_scan_inputs=1)]
    model = make_model(nodes, [("x", [4, 16, 6])], [("ya", None), ("yb", None)],
                       {"W": rand(6, 6, seed=1), "five": np.array(5, np.float32),
                        "h0": np.zeros((1,), np.float32)})
    result = lsuv_init(model, rand(4, 16, 6, seed=2), provider="cpu")
    assert [r.name for r in result.report.layers] == ["m1"]
    assert any(s["name"] == "m2" and "tied to layer m1" in s["reason"]
               for s in result.report.skipped)


def test_the_layer_alone_gets_the_computed_shape_of_a_reshape_before_its_bias():
    # tf2onnx's heads: MatMul -> Reshape(Concat(Shape slice, [2, 8])) -> Add([2, 8]); a tight
    # tolerance with a kept bias sends the layer to the try loop, measured alone.
    nodes = [helper.make_node("Shape", ["x"], ["shx"]),
             helper.make_node("Slice", ["shx", "zero", "two"], ["head"]),
             helper.make_node("Concat", ["head", "tail"], ["shp"], axis=0),
             helper.make_node("MatMul", ["x", "W"], ["y"], name="dense"),
             helper.make_node("Reshape", ["y", "shp"], ["r"]),
             helper.make_node("Add", ["r", "b"], ["out"])]
    model = make_model(nodes, [("x", [4, 10, 8])], [("out", None)],
                       {"W": rand(8, 16, seed=1), "b": rand(2, 8, seed=2) * 0.6,
                        "zero": np.array([0], np.int64), "two": np.array([2], np.int64),
                        "tail": np.array([2, 8], np.int64)})
    x = rand(4, 10, 8, seed=3)
    for options in ({"init": "rescale"}, {"keep_bias": True, "tol": 0.001}):
        result = lsuv_init(model, x, provider="cpu", **options)
        assert result.report.layers[0].bias == "b"
        tol = options.get("tol", TOL)
        assert abs(pooled_var(result.model, {"x": x}, ["out"]) - 1) < tol, options


def test_a_reshape_whose_minus_one_absorbs_the_channels_is_not_followed_to_a_bias():
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
             helper.make_node("Reshape", ["c", "shape"], ["r"]),
             helper.make_node("Add", ["r", "b"], ["y"])]
    model = make_model(nodes, [("x", [1, 3, 2, 5])], [("y", None)],
                       {"W": rand(4, 3, 1, 1, seed=1), "b": rand(1, 4, 1, seed=2),
                        "shape": np.array([-1, 4, 5], np.int64)})
    result = lsuv_init(model, rand(1, 3, 2, 5, seed=3), provider="cpu")
    assert result.report.layers[0].bias is None
    assert "b" not in changed(model, result.model)


# --- found in the second review: Cast biases, Slices of one kernel, packed tensors -------------

def test_a_float16_bias_cast_to_float_keeps_its_dtype_in_a_copy_and_in_the_try_loop():
    nodes = [helper.make_node("Gemm", ["x", "W0", "C0"], ["g0"], name="g0"),
             helper.make_node("Tanh", ["g0"], ["t0"]),
             helper.make_node("Cast", ["b16"], ["bf"], to=TensorProto.FLOAT),
             helper.make_node("MatMul", ["t0", "W"], ["m"], name="mm"),
             helper.make_node("Add", ["m", "bf"], ["y"]),
             helper.make_node("Mul", ["t0", "bf"], ["z"], name="other")]
    model = make_model(nodes, [("x", [64, 8])], [("y", None), ("z", None)],
                       {"W0": rand(8, 8, seed=5), "C0": rand(64, 8, seed=6) * 0.3,
                        "W": rand(8, 8, seed=1), "b16": (rand(8, seed=2) * 0.5).astype(
                            np.float16)})
    x = rand(64, 8, seed=3)
    for options in ({}, {"init": "rescale", "tol": 1e-3}, {"keep_bias": True, "tol": 1e-3}):
        result = lsuv_init(model, x, provider="cpu", **options)
        onnx.checker.check_model(result.model, full_check=True)
        assert not any("float16/bfloat16" in n for n in result.report.notes), options
        assert abs(pooled_var(result.model, {"x": x}, ["y"]) - 1) < options.get("tol", TOL)


def gru_like_slices():
    """One kernel K and one bias B, each sliced (split) into two disjoint parts for two
    MatMuls, as tf2onnx writes a GRU's gates."""
    nodes = [helper.make_node("Slice", ["K", "s0", "s1", "ax"], ["Ka"]),
             helper.make_node("Slice", ["K", "s1", "s2", "ax"], ["Kb"]),
             helper.make_node("Split", ["B", "halves"], ["Ba", "Bb"], axis=0),
             helper.make_node("MatMul", ["x", "Ka"], ["ma"], name="za"),
             helper.make_node("Add", ["ma", "Ba"], ["ya"]),
             helper.make_node("MatMul", ["x", "Kb"], ["mb"], name="zb"),
             helper.make_node("Add", ["mb", "Bb"], ["yb"]),
             helper.make_node("Mul", ["ya", "yb"], ["out"])]
    inits = {"K": rand(8, 32, seed=1), "B": rand(32, seed=2),
             "s0": np.array([0], np.int64), "s1": np.array([16], np.int64),
             "s2": np.array([32], np.int64), "ax": np.array([1], np.int64),
             "halves": np.array([16, 16], np.int64)}
    model = make_model(nodes, [("x", ["N", 8])], [("out", None)], inits)
    return model, {"x": rand(64, 8, seed=9)}


def test_disjoint_slices_of_one_kernel_are_separate_layers_solved_in_one_pass():
    model, feeds = gru_like_slices()
    result = run_and_check(model, feeds, [["ya"], ["yb"]], None)
    assert [r.name for r in result.report.layers] == ["za", "zb"]
    assert "retry_s" not in result.report.timings
    assert not any("tied" in n for n in result.report.notes)
    assert not np.any(stored(result.model, "B"))
    assert_orthonormal_up_to_scale(stored(result.model, "K")[:, :16].T[None])


def test_excluding_one_slice_of_a_kernel_leaves_its_elements_and_takes_the_other():
    model, feeds = gru_like_slices()
    result = lsuv_init(model, feeds, provider="cpu", exclude=["zb"])
    assert [r.name for r in result.report.layers] == ["za"]
    np.testing.assert_array_equal(stored(result.model, "K")[:, 16:], stored(model, "K")[:, 16:])
    np.testing.assert_array_equal(stored(result.model, "B")[16:], stored(model, "B")[16:])
    assert abs(pooled_var(result.model, feeds, ["ya"]) - 1) < TOL


def halves_of_one_kernel(cut: str, op: str):
    """Two layers in sequence reading the two halves of one stored kernel K [16, 32]: through
    one Split both chains share (tf2onnx and jax2onnx write this), or through a Slice each.
    Each with its own non-zero bias (Gemm's input, or an Add after a MatMul)."""
    if cut == "split":
        nodes = [helper.make_node("Split", ["K", "halves"], ["Ka", "Kb"], axis=1, name="cut")]
    else:
        nodes = [helper.make_node("Slice", ["K", "s0", "s1", "ax"], ["Ka"], name="cut_a"),
                 helper.make_node("Slice", ["K", "s1", "s2", "ax"], ["Kb"], name="cut_b")]
    if op == "Gemm":
        nodes += [helper.make_node("Gemm", ["x", "Ka", "Ba"], ["ya"], name="fa"),
                  helper.make_node("Relu", ["ya"], ["ra"]),
                  helper.make_node("Gemm", ["ra", "Kb", "Bb"], ["yb"], name="fb")]
    else:
        nodes += [helper.make_node("MatMul", ["x", "Ka"], ["ma"], name="fa"),
                  helper.make_node("Add", ["ma", "Ba"], ["ya"]),
                  helper.make_node("Relu", ["ya"], ["ra"]),
                  helper.make_node("MatMul", ["ra", "Kb"], ["mb"], name="fb"),
                  helper.make_node("Add", ["mb", "Bb"], ["yb"])]
    nodes.append(helper.make_node("Tanh", ["yb"], ["out"]))
    inits = {"K": rand(16, 32, seed=1) * 3, "Ba": rand(16, seed=2), "Bb": rand(16, seed=3),
             "halves": np.array([16, 16], np.int64), "s0": np.array([0], np.int64),
             "s1": np.array([16], np.int64), "s2": np.array([32], np.int64),
             "ax": np.array([1], np.int64)}
    model = make_model(nodes, [("x", ["N", 16])], [("out", None)], inits)
    return model, {"x": rand(64, 16, seed=9)}


@pytest.mark.parametrize("op", ["MatMul", "Gemm"])
@pytest.mark.parametrize("cut", ["split", "slice"])
def test_halves_of_one_kernel_are_no_tied_readers_and_converge_in_one_try(cut, op):
    """Ties are decided by the elements read: the two halves of a Split are disjoint, so
    neither layer is a tied reader of the other, though both chains go through one node."""
    model, feeds = halves_of_one_kernel(cut, op)
    result = lsuv_init(model, feeds, provider="cpu", max_iter=1, tol=0.01)
    assert_structure_unchanged(model, result.model)
    rows = result.report.layers
    assert [r.name for r in rows] == ["fa", "fb"]
    assert [r.tries for r in rows] == [1, 1]
    assert [r.status for r in rows] == ["converged", "converged"]
    assert not any("tied" in n for n in result.report.notes)
    measured = [pooled_var(result.model, feeds, [y]) for y in ("ya", "yb")]
    np.testing.assert_allclose([r.var_after for r in rows], measured, rtol=1e-5)
    assert all(abs(v - 1) < 0.01 for v in measured)
    k = stored(result.model, "K")
    for half in (k[:, :16], k[:, 16:]):
        assert_orthonormal_up_to_scale(half.T[None])


def test_a_weight_and_bias_packed_in_one_tensor_get_no_copy():
    nodes = [helper.make_node("Slice", ["T", "r0", "r8", "ax0"], ["W"]),
             helper.make_node("Slice", ["T", "r8", "r9", "ax0"], ["b"]),
             helper.make_node("MatMul", ["x", "W"], ["m"], name="fc"),
             helper.make_node("Add", ["m", "b"], ["y"]),
             helper.make_node("Tanh", ["y"], ["out"])]
    model = make_model(nodes, [("x", ["N", 8])], [("out", None)],
                       {"T": rand(9, 16, seed=1), "r0": np.array([0], np.int64),
                        "r8": np.array([8], np.int64), "r9": np.array([9], np.int64),
                        "ax0": np.array([0], np.int64)})
    x = rand(64, 8, seed=2)
    result = run_and_check(model, {"x": x}, [["y"]], None)
    assert not np.any(stored(result.model, "T")[8])
    assert not result.report.notes


def test_a_projection_split_into_gates_inside_a_body_is_scaled_per_gate_and_named_so():
    model, feeds = scan_rnn(hidden=12)
    body = next(a.g for a in model.graph.node[-1].attribute if a.name == "body")
    # The input projection's output cut into 3 equal parts (a GRU cell's z, r, h), summed back.
    body.node.insert(1, helper.make_node("Split", ["px"], ["pz", "pr", "ph3"], axis=-1,
                                         num_outputs=3))
    body.node.insert(2, helper.make_node("Concat", ["pz", "pr", "ph3"], ["px_all"], axis=-1))
    for node in body.node:
        if node.op_type == "Add" and "px" in node.input:
            node.input[list(node.input).index("px")] = "px_all"
    model.opset_import[0].version = 18
    result = lsuv_init(model, feeds, provider="cpu")
    assert [r.name for r in result.report.layers][:3] == ["proj_x[p0]", "proj_x[p1]",
                                                          "proj_x[p2]"]
    assert result.report.converged, result.report.table()
