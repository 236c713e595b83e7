"""Property test: random small valid graphs either initialise with every post-condition of the
core issue holding, or end in one of the documented clean errors."""

import numpy as np
import onnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper

from onnx_lsuv import LSUVError, lsuv_init
from onnx_lsuv.layers import find_layers

from conftest import initializers, make_model, output_variances

ACTS = ("Relu", "Tanh", "Sigmoid", "LeakyRelu", None)


class Graph:
    def __init__(self, rng):
        self.rng, self.nodes, self.inits, self.targets, self.n = rng, [], {}, [], 0

    def name(self, hint):
        self.n += 1
        return f"{hint}{self.n}"

    def const(self, shape, hint):
        name = self.name(hint)
        self.inits[name] = self.rng.standard_normal(shape).astype(np.float32)
        return name

    def node(self, op, inputs, target=False, **attrs):
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        if target:
            self.targets.append(out)
        return out

    def act(self, x, act):
        if act is None:
            return x
        return self.node(act, [x], **({"alpha": 0.333} if act == "LeakyRelu" else {}))


@st.composite
def graphs(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    g = Graph(rng)
    c = c_in = draw(st.integers(1, 4))
    hw = draw(st.integers(3, 6))
    batch = draw(st.integers(2, 16))
    x = "x"
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["conv", "residual", "concat"]))
        k = draw(st.sampled_from([1, 3]))
        pads = [k // 2] * 4
        if kind == "conv":
            groups = draw(st.sampled_from([g_ for g_ in (1, 2, 4) if c % g_ == 0]))
            out = groups * draw(st.integers(1, 3))
            w = g.const((out, c // groups, k, k), "w")
            bias = [g.const((out,), "b")] if draw(st.booleans()) else []
            x = g.act(g.node("Conv", [x, w] + bias, True, kernel_shape=[k, k], pads=pads,
                             group=groups), draw(st.sampled_from(ACTS)))
            c = out
        elif kind == "residual":
            y = g.node("Conv", [x, g.const((c, c, k, k), "w")], True, kernel_shape=[k, k],
                       pads=pads)
            x = g.act(g.node("Add", [x, y]), draw(st.sampled_from(ACTS)))
        else:
            a = g.node("Conv", [x, g.const((2, c, 1, 1), "w")], True, kernel_shape=[1, 1])
            b = g.node("Conv", [x, g.const((3, c, 1, 1), "w")], True, kernel_shape=[1, 1])
            x = g.node("Concat", [a, b], axis=1)
            c = 5
    x = g.node("Flatten", [x], axis=1)
    features = c * hw * hw
    for _ in range(draw(st.integers(1, 2))):
        out = draw(st.integers(1, 12))
        if draw(st.booleans()):
            trans = draw(st.booleans())
            w = g.const((out, features) if trans else (features, out), "w")
            x = g.node("Gemm", [x, w, g.const((out,), "b")], True, transB=int(trans))
        else:
            x = g.node("MatMul", [x, g.const((features, out), "w")], True)
        x = g.act(x, draw(st.sampled_from(ACTS)))
        features = out
    model = make_model(g.nodes, [("x", ["N", c_in, hw, hw])], [(x, None)], g.inits)
    data = rng.standard_normal((batch, c_in, hw, hw)).astype(np.float32)
    return model, data, g.targets


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(graphs())
def test_random_graphs_initialise_or_fail_cleanly(case):
    model, data, targets = case
    before = initializers(model)
    try:
        result = lsuv_init(model, data, provider="cpu")
    except LSUVError:
        return  # a documented, clean error
    rep = result.report
    assert len(rep.layers) == len(targets)
    onnx.checker.check_model(result.model)
    variances = output_variances(result.model, {"x": data}, targets)
    for rec, var in zip(rep.layers, variances):
        assert rec.status in ("converged", "skipped"), rec
        if rec.status == "converged":
            assert abs(var - 1.0) < 0.1, (rec, var)
    layers = find_layers(result.model).layers
    after = initializers(result.model)
    touched = {lay.weight.name for lay in layers} | {lay.bias.name for lay in layers if lay.bias}
    assert {k: v for k, v in before.items() if k not in touched} == \
           {k: v for k, v in after.items() if k not in touched}
    for lay in layers:
        w = onnx.numpy_helper.to_array(
            next(t for t in result.model.graph.initializer if t.name == lay.weight.name))
        for m in lay.layout.to_matrices(w.astype(np.float64)):
            gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
            np.testing.assert_allclose(gram / gram[0, 0], np.eye(len(gram)), atol=1e-5)
