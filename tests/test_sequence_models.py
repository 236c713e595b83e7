"""Transformers and recurrent networks: attention and MLP weights, fused QKV projections scaled
per projection, fused attention nodes skipped by name, LSTM/GRU/RNN gates."""

import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_lsuv import lsuv_init
from onnx_lsuv.layouts import GATES

from conftest import make_model, output_variances

D, HEADS, T = 16, 2, 6


class Builder:
    def __init__(self, seed=0):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits, self.n = [], {}, 0

    def name(self, hint):
        self.n += 1
        return f"{hint}{self.n}"

    def const(self, value, hint="c"):
        name = hint if "." in hint else self.name(hint)  # parameters keep their own names
        self.inits[name] = np.asarray(value)
        return name

    def node(self, op, inputs, n_out=1, name=None, domain="", **attrs):
        base = name or self.name(op.lower())
        outs = [base] if n_out == 1 else [f"{base}_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=base, domain=domain, **attrs))
        return outs[0] if n_out == 1 else outs

    def linear(self, x, k, n, name):
        w = self.const(self.rng.standard_normal((k, n)).astype(np.float32), f"{name}.weight")
        b = self.const(self.rng.standard_normal(n).astype(np.float32) * 0.1, f"{name}.bias")
        return self.node("Add", [self.node("MatMul", [x, w], name=name), b], name=name + "_add")

    def layer_norm(self, x):
        return self.node("LayerNormalization", [x, self.const(np.ones(D, np.float32)),
                                                 self.const(np.zeros(D, np.float32))], axis=-1)

    def heads(self, t):  # (N, T, D) -> (N, H, T, dh)
        r = self.node("Reshape", [t, self.const(np.array([0, 0, HEADS, D // HEADS]))])
        return self.node("Transpose", [r], perm=[0, 2, 1, 3])

    def attention(self, q, k, v):
        kt = self.node("Transpose", [k], perm=[0, 1, 3, 2])
        scores = self.node("Div", [self.node("MatMul", [q, kt]),
                                   self.const(np.float32(np.sqrt(D // HEADS)))])
        ctx = self.node("MatMul", [self.node("Softmax", [scores], axis=-1), v])
        back = self.node("Transpose", [ctx], perm=[0, 2, 1, 3])
        return self.node("Reshape", [back, self.const(np.array([0, 0, D]))])

    def block(self, x, i, fused):
        h = self.layer_norm(x)
        if fused:  # ViT / GPT-2 style: one (D, 3D) weight, output split into Q, K, V
            q, k, v = self.node("Split", [self.linear(h, D, 3 * D, f"l{i}.qkv")], n_out=3,
                                axis=-1)
        else:  # BERT style: three projections
            q, k, v = (self.linear(h, D, D, f"l{i}.{p}") for p in "qkv")
        ctx = self.attention(self.heads(q), self.heads(k), self.heads(v))
        x = self.node("Add", [x, self.linear(ctx, D, D, f"l{i}.out")])
        h = self.node("Tanh", [self.linear(self.layer_norm(x), D, 4 * D, f"l{i}.fc1")])
        return self.node("Add", [x, self.linear(h, 4 * D, D, f"l{i}.fc2")])

    def model(self, inputs, out, opset=17):
        return make_model(self.nodes, inputs, [(out, None)], self.inits, opset=opset)


def encoder(fused, layers=2):
    b = Builder()
    x = "x"
    for i in range(layers):
        x = b.block(x, i, fused)
    return b.model([("x", ["N", T, D])], x)


def vit(layers=2):
    """Patch embedding (Conv, stride = patch) into tokens, then fused-QKV blocks."""
    b = Builder(1)
    w = b.const(b.rng.standard_normal((D, 3, 4, 4)).astype(np.float32), "patch.weight")
    p = b.node("Conv", ["img", w], name="patch", kernel_shape=[4, 4], strides=[4, 4])
    tokens = b.node("Transpose", [b.node("Reshape", [p, b.const(np.array([0, D, -1]))])],
                    perm=[0, 2, 1])
    x = tokens
    for i in range(layers):
        x = b.block(x, i, fused=True)
    return b.model([("img", ["N", 3, 8, 12])], x)


def batch(seed=0, n=32):
    return {"x": np.random.default_rng(seed).standard_normal((n, T, D)).astype(np.float32)}


def split_variances(model, feeds, add_name):
    """Variance of each third of a fused projection's output, measured here."""
    (y,) = [np.asarray(v) for v in _fetch(model, feeds, [add_name])]
    parts = np.split(y.astype(np.float64), 3, axis=-1)
    return [float(p.var()) for p in parts]


def _fetch(model, feeds, names):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.output[:]
    for n in names:
        m.graph.output.append(helper.make_empty_tensor_value_info(n))
    return ort.InferenceSession(m.SerializeToString(),
                                providers=["CPUExecutionProvider"]).run(names, feeds)


@pytest.mark.parametrize("strategy", ["fast", "naive"])
def test_bert_style_encoder_every_attention_and_mlp_weight_reaches_unit_variance(strategy):
    model, feeds = encoder(fused=False), batch()
    result = lsuv_init(model, feeds, provider="cpu", strategy=strategy)
    names = [r.name for r in result.report.layers]
    assert names == [f"l{i}.{p}" for i in range(2) for p in ("q", "k", "v", "out", "fc1",
                                                              "fc2")]
    outs = [f"{n}_add" for n in names]
    for v in output_variances(result.model, feeds, outs):
        assert abs(v - 1) < 0.1
    held_out = batch(seed=7)
    for v in output_variances(result.model, held_out, outs):
        assert 0.5 < v < 2.0


@pytest.mark.parametrize("strategy", ["fast", "naive"])
def test_fused_qkv_is_orthonormal_and_scaled_per_projection(strategy):
    model, feeds = encoder(fused=True), batch()
    result = lsuv_init(model, feeds, provider="cpu", strategy=strategy)
    rows = [r.name for r in result.report.layers if r.name.startswith("l0.qkv")]
    assert rows == ["l0.qkv[q]", "l0.qkv[k]", "l0.qkv[v]"]
    if strategy == "fast":
        assert "retry_s" not in result.report.timings
    for i in range(2):
        for v in split_variances(result.model, feeds, f"l{i}.qkv_add"):
            assert abs(v - 1) < 0.1
        w = numpy_helper.to_array(next(t for t in result.model.graph.initializer
                                       if t.name == f"l{i}.qkv.weight")).astype(np.float64)
        for part in np.split(w, 3, axis=1):  # (D, D) per projection: orthogonal up to a scale
            gram = part.T @ part
            np.testing.assert_allclose(gram / gram[0, 0], np.eye(D), atol=1e-5)
    # Projections of very different magnitudes each get their own factor.
    for t in model.graph.initializer:
        if t.name == "l0.qkv.weight":
            w = numpy_helper.to_array(t) * np.repeat([1.0, 10.0, 0.1], D).astype(np.float32)
            t.CopyFrom(numpy_helper.from_array(w, t.name))
    result = lsuv_init(model, feeds, provider="cpu", strategy=strategy, init="rescale")
    for v in split_variances(result.model, feeds, "l0.qkv_add"):
        assert abs(v - 1) < 0.1
    scales = [r.scale for r in result.report.layers if r.name.startswith("l0.qkv")]
    assert scales[1] < scales[0] < scales[2]


def test_vit_style_model_with_patch_embedding():
    model = vit()
    feeds = {"img": np.random.default_rng(2).standard_normal((16, 3, 8, 12)).astype(np.float32)}
    result = lsuv_init(model, feeds, provider="cpu")
    assert result.report.converged
    assert result.report.layers[0].name == "patch"
    assert abs(output_variances(result.model, feeds, ["patch"])[0] - 1) < 0.1
    for i in range(2):
        for v in split_variances(result.model, feeds, f"l{i}.qkv_add"):
            assert abs(v - 1) < 0.1


def test_fused_attention_node_is_skipped_with_a_warning_naming_its_weights(caplog):
    b = Builder(3)
    h = b.linear("x", D, D, "pre")
    w = b.const(b.rng.standard_normal((D, 3 * D)).astype(np.float32), "attn.qkv_weight")
    bias = b.const(np.zeros(3 * D, np.float32), "attn.qkv_bias")
    a = b.node("Attention", [h, w, bias], name="fused_attn", domain="com.microsoft",
               num_heads=HEADS)
    out = b.linear(a, D, D, "post")
    graph = helper.make_graph(
        b.nodes, "fused", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", T, D])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(v, k) for k, v in b.inits.items()])
    model = helper.make_model(graph, ir_version=8, opset_imports=[
        helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    with caplog.at_level(logging.WARNING, logger="onnx_lsuv"):
        result = lsuv_init(model, batch(), provider="cpu")
    assert [r.name for r in result.report.layers] == ["pre", "post"]
    reason = next(s["reason"] for s in result.report.skipped if s["name"] == "fused_attn")
    assert "attn.qkv_weight" in reason and "fused_attn" in caplog.text
    before = next(t for t in model.graph.initializer if t.name == "attn.qkv_weight")
    after = next(t for t in result.model.graph.initializer if t.name == "attn.qkv_weight")
    assert before.SerializeToString() == after.SerializeToString()
    for v in output_variances(result.model, batch(), ["pre_add", "post_add"]):
        assert abs(v - 1) < 0.1


def rnn_model(op, bidirectional=False, stacked=False, hidden=8, inputs=5):
    b = Builder(4)
    gates = len(GATES[op])
    dirs = 2 if bidirectional else 1
    nodes_in = "x"
    outs = []
    for layer in range(2 if stacked else 1):
        w = b.const(b.rng.standard_normal((dirs, gates * hidden, inputs)).astype(np.float32),
                    f"{op.lower()}{layer}.W")
        r = b.const(b.rng.standard_normal((dirs, gates * hidden, hidden)).astype(np.float32),
                    f"{op.lower()}{layer}.R")
        bias = b.const(b.rng.standard_normal((dirs, 2 * gates * hidden)).astype(np.float32),
                       f"{op.lower()}{layer}.B")
        y = b.node(op, [nodes_in, w, r, bias], name=f"{op.lower()}{layer}", hidden_size=hidden,
                   direction="bidirectional" if bidirectional else "forward")
        outs.append(nodes_in)
        # Y (T, D, B, H) -> (T, B, D*H), the next layer's input
        t = b.node("Transpose", [y], perm=[0, 2, 1, 3])
        nodes_in = b.node("Reshape", [t, b.const(np.array([0, 0, -1]))])
        inputs = dirs * hidden
    model = make_model(b.nodes, [("x", [T, "B", 5])], [(nodes_in, None)], b.inits)
    return model, outs


def gate_variances(model, feeds, x_name, w_name, gates):
    """Var of W_g x per direction and gate, computed here from the op's input and its W."""
    (x,) = _fetch(model, feeds, [x_name])
    w = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == w_name))
    x2 = x.reshape(-1, w.shape[2]).astype(np.float64)
    out = []
    for d in range(w.shape[0]):
        proj = x2 @ w[d].astype(np.float64).T  # (T*B, G*H)
        out += [float(p.var()) for p in np.split(proj, gates, axis=1)]
    return out


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("strategy", ["fast", "naive"])
def test_recurrent_gates_get_unit_variance_input_projections(op, bidirectional, strategy):
    model, inputs = rnn_model(op, bidirectional, stacked=True)
    feeds = {"x": np.random.default_rng(5).standard_normal((T, 16, 5)).astype(np.float32)}
    result = lsuv_init(model, feeds, provider="cpu", strategy=strategy)
    rep = result.report
    gates = GATES[op]
    expected = [f"{op.lower()}0[{p}{g}]" for p in (("fw.", "bw.") if bidirectional else ("",))
                for g in gates]
    assert [r.name for r in rep.layers][:len(expected)] == expected
    assert rep.converged
    if strategy == "fast":
        assert "retry_s" not in rep.timings  # the in-graph solve was exact
    for layer, x_name in enumerate(inputs):
        w_name = f"{op.lower()}{layer}.W"
        for v in gate_variances(result.model, feeds, x_name, w_name, len(gates)):
            assert abs(v - 1) < 0.1, (w_name, v)
        inits = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
        r = inits[f"{op.lower()}{layer}.R"].astype(np.float64)
        hidden = r.shape[2]
        for d in range(r.shape[0]):
            for g in range(len(gates)):  # R orthogonal per gate, not scaled
                block = r[d, g * hidden:(g + 1) * hidden]
                np.testing.assert_allclose(block @ block.T, np.eye(hidden), atol=1e-5)
        assert not inits[f"{op.lower()}{layer}.B"].any()


def test_lstm_forget_gate_bias_option():
    model, _ = rnn_model("LSTM", bidirectional=True)
    feeds = {"x": np.random.default_rng(5).standard_normal((T, 16, 5)).astype(np.float32)}
    result = lsuv_init(model, feeds, provider="cpu", lstm_forget_bias=1.0)
    b = numpy_helper.to_array(next(t for t in result.model.graph.initializer
                                   if t.name == "lstm0.B")).copy()
    hidden = b.shape[1] // 8
    for d in range(2):
        assert np.all(b[d, 2 * hidden:3 * hidden] == 1.0)  # Wb of gate f (order i, o, f, c)
        b[d, 2 * hidden:3 * hidden] = 0
    assert not b.any()


def test_report_names_the_gate_or_projection_of_each_row():
    model, _ = rnn_model("GRU")
    feeds = {"x": np.random.default_rng(5).standard_normal((T, 16, 5)).astype(np.float32)}
    rep = lsuv_init(model, feeds, provider="cpu").report
    assert [r.block for r in rep.layers] == ["z", "r", "h"]
    assert "gru0[z]" in rep.table()


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
def test_sequence_model_inputs_names_and_dtypes_are_kept(op):
    model, _ = rnn_model(op, stacked=True)
    feeds = {"x": np.random.default_rng(5).standard_normal((T, 16, 5)).astype(np.float32)}
    out = lsuv_init(model, feeds, provider="cpu").model
    assert [i.SerializeToString() for i in out.graph.input] == \
           [i.SerializeToString() for i in model.graph.input]
    assert [o.SerializeToString() for o in out.graph.output] == \
           [o.SerializeToString() for o in model.graph.output]
    assert [(t.name, t.data_type, list(t.dims)) for t in out.graph.initializer] == \
           [(t.name, t.data_type, list(t.dims)) for t in model.graph.initializer]
    assert [n.SerializeToString() for n in out.graph.node] == \
           [n.SerializeToString() for n in model.graph.node]


def test_padded_time_steps_do_not_count_in_the_gate_statistics():
    b = Builder(6)
    hidden, inputs = 8, 5
    w = b.const(b.rng.standard_normal((1, 4 * hidden, inputs)).astype(np.float32), "lstm.W")
    r = b.const(b.rng.standard_normal((1, 4 * hidden, hidden)).astype(np.float32), "lstm.R")
    y = b.node("LSTM", ["x", w, r, "", "lens"], name="lstm", hidden_size=hidden)
    model = make_model(b.nodes, [("x", [T, "B", inputs]), ("lens", ["B"], TensorProto.INT32)],
                       [(y, None)], b.inits)
    rng = np.random.default_rng(1)
    lens = rng.integers(1, T + 1, 16).astype(np.int32)
    x = rng.standard_normal((T, 16, inputs)).astype(np.float32)
    x[np.arange(T)[:, None] >= lens[None, :]] = 0.0  # zero padding after each sequence
    for strategy in ("fast", "naive"):
        result = lsuv_init(model, {"x": x, "lens": lens}, provider="cpu", strategy=strategy)
        assert result.report.converged
        wt = numpy_helper.to_array(next(t for t in result.model.graph.initializer
                                        if t.name == "lstm.W")).astype(np.float64)
        valid = x[np.arange(T)[:, None] < lens[None, :]].astype(np.float64)  # (steps, I)
        for g in range(4):
            assert abs((valid @ wt[0, g * hidden:(g + 1) * hidden].T).var() - 1) < 0.1


def test_one_lstm_applied_twice_is_set_once():
    b = Builder(7)
    hidden = 5
    w = b.const(b.rng.standard_normal((1, 4 * hidden, hidden)).astype(np.float32), "lstm.W")
    r = b.const(b.rng.standard_normal((1, 4 * hidden, hidden)).astype(np.float32), "lstm.R")
    y1 = b.node("LSTM", ["x", w, r], name="first", hidden_size=hidden)
    x2 = b.node("Squeeze", [y1, b.const(np.array([1]))])  # (T, 1, B, H) -> (T, B, H)
    y2 = b.node("LSTM", [x2, w, r], name="second", hidden_size=hidden)
    model = make_model(b.nodes, [("x", [T, "B", hidden])], [(y2, None)], b.inits)
    feeds = {"x": np.random.default_rng(2).standard_normal((T, 16, hidden)).astype(np.float32)}
    result = lsuv_init(model, feeds, provider="cpu")
    assert {r.name.split("[")[0] for r in result.report.layers} == {"first"}
    assert any(s["name"] == "second" and "tied" in s["reason"] for s in result.report.skipped)
    # Both uses read the one W, R in the written model; the first use's gates are at unit
    # variance, measured here from its input and the written W.
    assert [n.input[1:3] for n in result.model.graph.node if n.op_type == "LSTM"] == \
           [["lstm.W", "lstm.R"]] * 2
    for v in gate_variances(result.model, feeds, "x", "lstm.W", 4):
        assert abs(v - 1) < 0.1, v
    assert result.report.converged


def test_forget_bias_applies_without_orthonormal_and_notes_a_missing_bias():
    model, _ = rnn_model("LSTM")
    feeds = {"x": np.random.default_rng(5).standard_normal((T, 16, 5)).astype(np.float32)}
    result = lsuv_init(model, feeds, provider="cpu", init="rescale", lstm_forget_bias=1.0)
    bias = numpy_helper.to_array(next(t for t in result.model.graph.initializer
                                      if t.name == "lstm0.B"))
    assert np.all(bias[0, 16:24] == 1.0)
    no_bias = onnx.ModelProto()
    no_bias.CopyFrom(model)
    del no_bias.graph.node[0].input[3:]
    result = lsuv_init(no_bias, feeds, provider="cpu", lstm_forget_bias=1.0)
    assert any("forget gate bias was not set" in n for n in result.report.notes)
