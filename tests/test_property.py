"""Property test against a reference of the test's own: random small DAGs (residual sums,
concatenations, grouped convs, tied weights, kept biases, BatchNormalization with pretrained
statistics, If nodes whose branches read an earlier output) go through ``fast``, ``naive`` and
a plain sequential Algorithm 1 written here (a whole forward pass per try, numpy float64
variances). Every layer's variance is measured here, in the written models; the targets, their
weight views and what may change come from the generator, never from onnx_lsuv."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnx_lsuv import LSUVError, lsuv_init

from conftest import initializers, make_model

ACTS = ("Relu", "Tanh", "Sigmoid", "LeakyRelu", None)
TOL = 0.1
MAX_ITER = 10


class Graph:
    """A model under construction, and the test's own record of its targets."""

    def __init__(self, rng):
        self.rng, self.nodes, self.inits, self.n = rng, [], {}, 0
        # Per target: (weight name, bias name or None, tensors whose pooled variance LSUV sets
        # (a weight applied again in the same way, with the same bias, is the same layer),
        # function weight -> (groups, rows, cols) matrix view).
        self.targets = []
        self.square = {}  # c -> an earlier (c, c, k, k) conv weight, for ties

    def name(self, hint):
        self.n += 1
        return f"{hint}{self.n}"

    def const(self, value, hint):
        name = self.name(hint)
        self.inits[name] = np.asarray(value, np.float32)
        return name

    def normal(self, shape, hint, scale=1.0):
        return self.const(scale * self.rng.standard_normal(shape), hint)

    def node(self, op, inputs, **attrs):
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def act(self, x, act):
        if act is None:
            return x
        return self.node(act, [x], **({"alpha": 0.333} if act == "LeakyRelu" else {}))

    def conv(self, x, c_in, c_out, k, groups=1, bias=False, weight=None):
        w = weight or self.normal((c_out, c_in // groups, k, k), "w")
        b = [self.normal((c_out,), "b")] if bias else []
        y = self.node("Conv", [x, w] + b, kernel_shape=[k, k], pads=[k // 2] * 4, group=groups)
        if weight is None:
            def view(a, g=groups):
                return a.reshape(g, a.shape[0] // g, -1)

            self.targets.append((w, b[0] if b else None, [y], view))
            if c_in == c_out and groups == 1:
                self.square[c_out] = (w, k)
        else:
            owner = next(t for t in self.targets if t[0] == weight)
            if owner[1] is None:  # the same weight, the same (no) bias: one layer, pooled
                owner[2].append(y)
        return y


@st.composite
def graphs(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    g = Graph(rng)
    c = c_in = draw(st.integers(1, 4))
    hw = draw(st.integers(3, 5))
    batch = draw(st.integers(8, 24))
    x = "x"
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["conv", "residual", "concat", "bn", "tie", "if"]))
        k = draw(st.sampled_from([1, 3]))
        act = draw(st.sampled_from(ACTS))
        if kind == "conv":
            groups = draw(st.sampled_from([n for n in (1, 2, 4) if c % n == 0]))
            out = groups * draw(st.integers(1, 3))
            x = g.act(g.conv(x, c, out, k, groups, bias=draw(st.booleans())), act)
            c = out
        elif kind == "residual":
            x = g.act(g.node("Add", [x, g.conv(x, c, c, k)]), act)
        elif kind == "concat":
            a, b = g.conv(x, c, 2, 1, bias=True), g.conv(x, c, 3, 1)
            x, c = g.act(g.node("Concat", [a, b], axis=1), act), 5
        elif kind == "bn":
            y = g.conv(x, c, c, k, bias=draw(st.booleans()))
            stats = [g.const(rng.uniform(0.5, 2, c), "s"), g.normal((c,), "beta"),
                     g.normal((c,), "mean", 3.0), g.const(rng.uniform(0.5, 4, c), "var")]
            x = g.act(g.node("BatchNormalization", [y] + stats, epsilon=1e-5), act)
        elif kind == "tie" and c in g.square:
            w, kw = g.square[c]
            x = g.act(g.conv(x, c, c, kw, weight=w), act)
        elif kind == "if":
            outs = [g.name("branch") for _ in range(2)]
            bodies = [helper.make_graph(
                [helper.make_node(op, [x], [o])], g.name("body"), [],
                [helper.make_tensor_value_info(o, TensorProto.FLOAT, None)])
                for op, o in zip(("Relu", "Tanh"), outs)]
            cond = g.name("cond")
            g.inits[cond] = np.array(draw(st.booleans()))
            x = g.node("If", [cond], then_branch=bodies[0], else_branch=bodies[1])
    x = g.node("Flatten", [x], axis=1)
    features = c * hw * hw
    for _ in range(draw(st.integers(1, 2))):
        out = draw(st.integers(2, 12))
        if draw(st.booleans()):
            trans = draw(st.booleans())
            w = g.normal((out, features) if trans else (features, out), "w")
            b = g.normal((out,), "b")
            y = g.node("Gemm", [x, w, b], transB=int(trans))
            g.targets.append((w, b, [y], (lambda a: a[None]) if trans else (lambda a: a.T[None])))
        else:
            w, b = g.normal((features, out), "w"), g.normal((out,), "b")
            y = g.node("Add", [g.node("MatMul", [x, w]), b])
            g.targets.append((w, b, [y], lambda a: a.T[None]))
        x = g.act(y, draw(st.sampled_from(ACTS)))
        features = out
    model = make_model(g.nodes, [("x", ["N", c_in, hw, hw])], [(x, None)], g.inits)
    data = (rng.standard_normal((batch, c_in, hw, hw)) * rng.uniform(0.2, 5)).astype(np.float32)
    return model, {"x": data}, g.targets


def _with_outputs(model, names):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.output[:]
    m.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names)
    return m


def variances(model, feeds, groups):
    """Population variance of each group of tensors (all their elements pooled), measured
    here in float64."""
    names = list(dict.fromkeys(n for group in groups for n in group))
    sess = ort.InferenceSession(_with_outputs(model, names).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    values = dict(zip(names, sess.run(names, feeds)))
    return [float(np.var(np.concatenate([values[n].astype(np.float64).ravel() for n in group])))
            for group in groups]


def reference_lsuv(model, feeds, targets):
    """Algorithm 1 as the paper writes it, on the model's own weights and biases: for each
    target in order, a whole forward pass per try, W /= sqrt(var), until |var - 1| < tol or
    T_max tries; a zero or non-finite variance ends the layer's loop."""
    work = onnx.ModelProto()
    work.CopyFrom(model)
    inits = {t.name: t for t in work.graph.initializer}
    for weight, _, outputs, _ in targets:
        for _ in range(MAX_ITER):
            (var,) = variances(work, feeds, [outputs])
            if not np.isfinite(var) or var <= 0 or abs(var - 1) < TOL:
                break
            w = numpy_helper.to_array(inits[weight]).astype(np.float64) / np.sqrt(var)
            inits[weight].CopyFrom(numpy_helper.from_array(w.astype(np.float32), weight))
    return work


def on_target(v):
    return np.isfinite(v) and v > 0 and abs(v - 1) < TOL


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(graphs())
def test_fast_naive_and_a_reference_algorithm_1_agree_on_every_layer(case):
    model, feeds, targets = case
    outputs = [t[2] for t in targets]
    reference = variances(reference_lsuv(model, feeds, targets), feeds, outputs)
    for strategy in ("fast", "naive"):
        result = lsuv_init(model, feeds, provider="cpu", strategy=strategy, init="rescale")
        rep = result.report
        assert len(rep.layers) == len(targets)
        measured = variances(result.model, feeds, outputs)
        # Layer after layer, as long as Algorithm 1 brings each on target, so does each
        # strategy. (After a layer that a bias keeps off target, the layers downstream see
        # other inputs in each run, and what each can reach differs.)
        for rec, ref, got in zip(rep.layers, reference, measured):
            if not on_target(ref):
                break
            assert on_target(got), (strategy, rec, ref, got, rep.table())
        # The report never claims what the written model does not do.
        for rec, got in zip(rep.layers, measured):
            assert (rec.status == "converged") == on_target(got), (strategy, rec, got)
        assert rep.converged == all(on_target(v) for v in measured)


def _orthonormal_up_to_scale(matrices):
    for m in matrices.astype(np.float64):
        gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
        np.testing.assert_allclose(gram / gram[0, 0], np.eye(len(gram)), atol=1e-5)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(graphs(), st.booleans())
def test_lsuv_init_reaches_unit_variance_honestly_and_touches_only_targets(case, keep_bias):
    model, feeds, targets = case
    before = initializers(model)
    try:
        result = lsuv_init(model, feeds, provider="cpu", keep_bias=keep_bias)
    except LSUVError as err:  # only a documented refusal of bad input may end a run here
        raise AssertionError(f"valid model refused: {err}") from err
    rep = result.report
    onnx.checker.check_model(result.model)
    measured = variances(result.model, feeds, [t[2] for t in targets])
    for rec, got in zip(rep.layers, measured):
        assert (rec.status == "converged") == on_target(got), (rec, got, rep.table())
    after = initializers(result.model)
    touched = {t[0] for t in targets} | (set() if keep_bias else {t[1] for t in targets})
    assert {k: v for k, v in before.items() if k not in touched} == \
           {k: v for k, v in after.items() if k not in touched}
    assert [n.op_type for n in result.model.graph.node] == [n.op_type for n in model.graph.node]
    written = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    for weight, bias, _, view in targets:
        _orthonormal_up_to_scale(view(written[weight]))
        if bias is not None and not keep_bias:
            assert not np.any(written[bias])
