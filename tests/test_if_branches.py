"""Issue 27, pattern 1: layers inside If branches.

Voice-activity models exported from PyTorch keep their network inside the branches of an If
chosen by the sample rate (an input: one value per batch), or nest an If inside another. The
branch the data takes holds targets, measured where the branch computes them, with weights in
the branch (initializers, Constant nodes) or in the outer scope, written back where they live;
the other branch's layers are not reached: reported, and the run exits 1 unless excluded.

Every variance here is the test's own: its ONNX Runtime session, with the branch tensors
exposed as extra If outputs (``independent.branch_values``), statistics in numpy float64.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from onnx_lsuv import check_variances, lsuv_init
from onnx_lsuv.errors import EXIT_FAILURE
from onnx_lsuv_cli.main import lsuv_command

from conftest import IR_VERSION, OPSET, output_values, rand
from independent import branch_values, matrices, orthonormal_up_to_scale

TOL = 0.1


def invoke(*args):
    return CliRunner().invoke(lsuv_command, [str(a) for a in args])


def vi(name, shape=None, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def const(name, value):
    return helper.make_node("Constant", [], [name], name=name.replace("_output_0", ""),
                            value=numpy_helper.from_array(value))


def model_of(nodes, inputs, outputs, inits):
    graph = helper.make_graph(nodes, "main_graph", inputs, outputs,
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              ir_version=IR_VERSION)
    onnx.checker.check_model(model)
    return model


def rate_condition():
    """``if sr == 16000`` on a scalar input, as torch's TorchScript exporter writes it."""
    return [const("/Constant_output_0", np.array(16000, np.int64)),
            helper.make_node("Equal", ["sr", "/Constant_output_0"], ["/Equal_output_0"],
                             name="/Equal"),
            helper.make_node("Cast", ["/Equal_output_0"], ["/Cast_output_0"], name="/Cast",
                             to=TensorProto.BOOL)]


def vad_like():
    """A scripted voice-activity module: ``if sr == 16000`` picks a Conv1d -> ReLU -> Linear
    front end per rate; a Linear head after the If. In the 16 kHz branch the Conv's weight and
    bias are the main graph's initializers read from the outer scope (as the TorchScript
    exporter writes a module's parameters) and the Linear's weight a Constant node of the
    branch, its bias a branch initializer; in the 8 kHz branch every weight is a branch
    initializer. Linear as MatMul -> Add(bias, .) as torch writes it."""
    then = helper.make_graph([
        helper.make_node("Conv", ["x", "conv16.weight", "conv16.bias"], ["/conv16/Conv_output_0"],
                         name="/conv16/Conv", pads=[1, 1], kernel_shape=[3]),
        helper.make_node("Relu", ["/conv16/Conv_output_0"], ["/Relu_output_0"], name="/Relu"),
        helper.make_node("Transpose", ["/Relu_output_0"], ["/Transpose_output_0"],
                         name="/Transpose", perm=[0, 2, 1]),
        const("/proj16/Constant_output_0", rand(4, 6, seed=2) * 0.3),
        helper.make_node("MatMul", ["/Transpose_output_0", "/proj16/Constant_output_0"],
                         ["/proj16/MatMul_output_0"], name="/proj16/MatMul"),
        helper.make_node("Add", ["proj16.bias", "/proj16/MatMul_output_0"], ["h16"],
                         name="/proj16/Add"),
    ], "then_branch", [], [vi("h16")],
        [numpy_helper.from_array(np.linspace(-0.4, 0.5, 6).astype(np.float32), "proj16.bias")])
    other = helper.make_graph([
        helper.make_node("Conv", ["x", "conv8.weight", "conv8.bias"], ["/conv8/Conv_output_0"],
                         name="/conv8/Conv", pads=[2, 2], kernel_shape=[5]),
        helper.make_node("Relu", ["/conv8/Conv_output_0"], ["/Relu_1_output_0"],
                         name="/Relu_1"),
        helper.make_node("Transpose", ["/Relu_1_output_0"], ["/Transpose_1_output_0"],
                         name="/Transpose_1", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["/Transpose_1_output_0", "proj8.weight"],
                         ["/proj8/MatMul_output_0"], name="/proj8/MatMul"),
        helper.make_node("Add", ["proj8.bias", "/proj8/MatMul_output_0"], ["h8"],
                         name="/proj8/Add"),
    ], "else_branch", [], [vi("h8")], [
        numpy_helper.from_array(rand(4, 2, 5, seed=3), "conv8.weight"),
        numpy_helper.from_array(np.full(4, 0.2, np.float32), "conv8.bias"),
        numpy_helper.from_array(rand(4, 6, seed=4) * 2, "proj8.weight"),
        numpy_helper.from_array(np.linspace(0.3, -0.3, 6).astype(np.float32), "proj8.bias")])
    nodes = rate_condition() + [
        helper.make_node("If", ["/Cast_output_0"], ["/If_output_0"], name="/If",
                         then_branch=then, else_branch=other),
        helper.make_node("MatMul", ["/If_output_0", "head.weight"], ["/head/MatMul_output_0"],
                         name="/head/MatMul"),
        helper.make_node("Add", ["head.bias", "/head/MatMul_output_0"], ["y"],
                         name="/head/Add"),
    ]
    inits = {"conv16.weight": rand(4, 2, 3, seed=1) * 3,
             "conv16.bias": np.array([0.5, -0.5, 0.1, 0.3], np.float32),
             "head.weight": rand(6, 3, seed=5) * 0.2,
             "head.bias": np.array([0.1, 0.2, -0.3], np.float32)}
    return model_of(nodes, [vi("x", [8, 2, 16]), vi("sr", [], TensorProto.INT64)],
                    [vi("y", [8, 16, 3])], inits)


def feeds_at(rate, seed=7):
    return {"x": rand(8, 2, 16, seed=seed) * 2 + 0.5, "sr": np.array(rate, np.int64)}


# Per rate: the branch taken, its targets (node, output after the bias) and the tensors they
# may change (weights and biases, by (branch or "", name)).
VAD = {
    16000: ("then_branch", [("/conv16/Conv", "/conv16/Conv_output_0"),
                            ("/proj16/MatMul", "h16")],
            {("", "conv16.weight"), ("", "conv16.bias"),
             ("then_branch", "/proj16/Constant_output_0"), ("then_branch", "proj16.bias")}),
    8000: ("else_branch", [("/conv8/Conv", "/conv8/Conv_output_0"), ("/proj8/MatMul", "h8")],
           {("else_branch", "conv8.weight"), ("else_branch", "conv8.bias"),
            ("else_branch", "proj8.weight"), ("else_branch", "proj8.bias")}),
}
HEAD = {("", "head.weight"), ("", "head.bias")}


def tensors(graph: onnx.GraphProto, where: str = "") -> dict[tuple[str, str], bytes]:
    """Every stored tensor (initializers and Constant values, in every branch), by (the
    branches' path, name): its bytes."""
    out = {(where, t.name): t.SerializeToString() for t in graph.initializer}
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                out[(where, node.output[0])] = a.t.SerializeToString()
            elif a.type == onnx.AttributeProto.GRAPH:
                inner = f"{where}/{a.name}" if where else a.name
                out.update(tensors(a.g, inner))
    return out


def structure(model: onnx.ModelProto) -> bytes:
    """The model with every stored tensor's values cleared: nodes, names, branches, dims."""
    m = onnx.ModelProto()
    m.CopyFrom(model)

    def clear(graph):
        for t in graph.initializer:
            t.ClearField("raw_data")
            t.ClearField("float_data")
        for node in graph.node:
            for a in node.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    a.t.ClearField("raw_data")
                    a.t.ClearField("float_data")
                elif a.type == onnx.AttributeProto.GRAPH:
                    clear(a.g)

    clear(m.graph)
    return m.SerializeToString()


def assert_only_changed(before: onnx.ModelProto, after: onnx.ModelProto, allowed: set):
    """Structure unchanged; every stored tensor outside ``allowed`` the same bit for bit."""
    assert structure(after) == structure(before)
    old, new = tensors(before.graph), tensors(after.graph)
    assert old.keys() == new.keys()
    same = {k for k in old if old[k] == new[k]}
    assert set(old) - same <= allowed, set(old) - same - allowed
    assert set(old) - allowed <= same


@pytest.mark.parametrize("rate", [16000, 8000])
def test_the_taken_branch_layers_are_targets_measured_inside_it(rate):
    model = vad_like()
    feeds = feeds_at(rate)
    taken, targets, changed = VAD[rate]
    other = VAD[24000 - rate]
    result = lsuv_init(model, feeds)
    rows = {rec.name: rec for rec in result.report.layers}
    assert list(rows) == [name for name, _ in targets] + ["/head/MatMul"]
    # The other branch's layers: not reached, named, not initialised.
    assert [s["name"] for s in result.report.not_initialised] == [n for n, _ in other[1]]
    assert all(f"in the {other[0]} of If /If, which the data does not take" in s["reason"]
               for s in result.report.not_initialised)
    assert not result.report.converged
    assert any(f"the data takes its {taken}" in n for n in result.report.notes)
    # Each target measured here, inside the branch (and the head after the If).
    inside = branch_values(result.model, feeds, [("/If", taken)], [out for _, out in targets])
    (head,) = output_values(result.model, feeds, ["y"])
    for (name, _), value in zip(targets + [("/head/MatMul", None)], inside + [head]):
        var = float(np.var(np.asarray(value, np.float64)))
        assert abs(var - 1.0) < TOL, (name, var)
        assert rows[name].var_after == pytest.approx(var, rel=1e-4), name
    # Written where they live; nothing else touched, the other branch included.
    assert_only_changed(model, result.model, changed | HEAD)
    conv_w, proj_w = branch_values(result.model, feeds, [("/If", taken)], [
        node.input[1] for node in _branch(result.model, taken).node
        if node.op_type in ("Conv", "MatMul")])
    nodes = [n for n in _branch(model, taken).node if n.op_type in ("Conv", "MatMul")]
    assert orthonormal_up_to_scale(matrices(nodes[0], conv_w))
    assert orthonormal_up_to_scale(matrices(nodes[1], proj_w))


def _branch(model, attr):
    node = next(n for n in model.graph.node if n.op_type == "If")
    return next(a.g for a in node.attribute if a.name == attr)


def test_the_cli_exits_1_naming_the_untaken_branch_unless_excluded(tmp_path):
    model = vad_like()
    onnx.save(model, tmp_path / "vad.onnx")
    np.savez(tmp_path / "batch.npz", **feeds_at(16000))
    res = invoke(tmp_path / "vad.onnx", "-d", tmp_path / "batch.npz", "-o", tmp_path / "o.onnx")
    assert res.exit_code == EXIT_FAILURE, res.output
    assert "2 candidate layer(s) not initialised: /conv8/Conv (Conv): in the else_branch of " \
        "If /If" in res.output, res.output
    assert "/proj8/MatMul (MatMul)" in res.output
    res = invoke(tmp_path / "vad.onnx", "-d", tmp_path / "batch.npz", "-o", tmp_path / "o.onnx",
                 "--exclude", "/If/else_branch")
    assert res.exit_code == 0, res.output
    written = onnx.load(tmp_path / "o.onnx")
    assert_only_changed(model, written, VAD[16000][2] | HEAD)
    # The check re-measures the same layers (inside the branch) and accepts them.
    assert check_variances(written, feeds_at(16000), exclude=["/If/else_branch"]).converged


def nested():
    """``if sr == 16000`` around an encoder Linear and a second ``if`` on the sequence length
    (``if x.shape[1] > 8``, a condition computed from shapes inside the branch), as a
    scripted module nests them; weights: a branch initializer, a Constant node of the inner
    branch, an outer-scope initializer read two levels down."""
    long = helper.make_graph([
        helper.make_node("MatMul", ["/enc/Add_output_0", "long.weight"],
                         ["/long/MatMul_output_0"], name="/long/MatMul"),
        helper.make_node("Add", ["/long/MatMul_output_0", "long.bias"], ["o_long"],
                         name="/long/Add"),
    ], "then_branch", [], [vi("o_long")],
        [numpy_helper.from_array(np.linspace(-1, 1, 5).astype(np.float32), "long.bias")])
    short = helper.make_graph([
        const("/short/Constant_output_0", rand(8, 5, seed=12) * 0.1),
        helper.make_node("MatMul", ["/enc/Add_output_0", "/short/Constant_output_0"],
                         ["/short/MatMul_output_0"], name="/short/MatMul"),
        helper.make_node("Add", ["/short/MatMul_output_0", "short.bias"], ["o_short"],
                         name="/short/Add"),
    ], "else_branch", [], [vi("o_short")])
    then = helper.make_graph([
        helper.make_node("MatMul", ["x", "enc.weight"], ["/enc/MatMul_output_0"],
                         name="/enc/MatMul"),
        helper.make_node("Add", ["enc.bias", "/enc/MatMul_output_0"], ["/enc/Add_output_0"],
                         name="/enc/Add"),
        helper.make_node("Shape", ["x"], ["/Shape_output_0"], name="/Shape"),
        const("/Constant_1_output_0", np.array(1, np.int64)),
        helper.make_node("Gather", ["/Shape_output_0", "/Constant_1_output_0"],
                         ["/Gather_output_0"], name="/Gather", axis=0),
        const("/Constant_2_output_0", np.array(8, np.int64)),
        helper.make_node("Greater", ["/Gather_output_0", "/Constant_2_output_0"],
                         ["/Greater_output_0"], name="/Greater"),
        helper.make_node("If", ["/Greater_output_0"], ["o16"], name="/inner/If",
                         then_branch=long, else_branch=short),
    ], "then_branch", [], [vi("o16")], [
        numpy_helper.from_array(rand(6, 8, seed=10) * 4, "enc.weight"),
        numpy_helper.from_array(np.full(8, 0.25, np.float32), "enc.bias")])
    other = helper.make_graph([
        helper.make_node("MatMul", ["x", "enc8.weight"], ["o8"], name="/enc8/MatMul"),
    ], "else_branch", [], [vi("o8")], [numpy_helper.from_array(rand(6, 5, seed=13),
                                                               "enc8.weight")])
    nodes = rate_condition() + [helper.make_node("If", ["/Cast_output_0"], ["y"], name="/If",
                                                 then_branch=then, else_branch=other)]
    return model_of(nodes, [vi("x", [4, "T", 6]), vi("sr", [], TensorProto.INT64)],
                    [vi("y", [4, "T", 5])],
                    {"long.weight": rand(8, 5, seed=11),
                     "short.bias": np.array([0.1, 0.2, 0.3, 0.4, 0.5], np.float32)})


@pytest.mark.parametrize("steps", [12, 6])
def test_a_nested_if_follows_the_same_rule(steps):
    model = nested()
    feeds = {"x": rand(4, steps, 6, seed=14) + 1.0, "sr": np.array(16000, np.int64)}
    inner = "then_branch" if steps > 8 else "else_branch"
    second, skipped_inner = ("/long/MatMul", "/short/MatMul") if steps > 8 else \
        ("/short/MatMul", "/long/MatMul")
    result = lsuv_init(model, feeds)
    rows = {rec.name: rec for rec in result.report.layers}
    assert list(rows) == ["/enc/MatMul", second]
    assert sorted(s["name"] for s in result.report.not_initialised) == \
        sorted(["/enc8/MatMul", skipped_inner])
    (enc,) = branch_values(result.model, feeds, [("/If", "then_branch")], ["/enc/Add_output_0"])
    (out,) = output_values(result.model, feeds, ["y"])
    for name, value in (("/enc/MatMul", enc), (second, out)):
        var = float(np.var(value))
        assert abs(var - 1.0) < TOL, (name, var)
        assert rows[name].var_after == pytest.approx(var, rel=1e-4)
    (w,) = branch_values(result.model, feeds, [("/If", "then_branch"), ("/inner/If", inner)],
                         ["long.weight" if steps > 8 else "/short/Constant_output_0"])
    assert orthonormal_up_to_scale(w.T[None])
    changed = {("then_branch", "enc.weight"), ("then_branch", "enc.bias")} | (
        {("", "long.weight"), ("then_branch/then_branch", "long.bias")} if steps > 8 else
        {("then_branch/else_branch", "/short/Constant_output_0"), ("", "short.bias")})
    assert_only_changed(model, result.model, changed)
    # Excluding the branches the data does not take accepts the run.
    not_taken = "else_branch" if steps > 8 else "then_branch"
    accepted = lsuv_init(model, feeds, exclude=["/If/else_branch", f"/inner/If/{not_taken}"])
    assert not accepted.report.not_initialised
    assert accepted.report.converged


def lstm_branch():
    """``if sr == 16000`` around an LSTM (W, R, B stored in the branch, as the exporter folds
    them when it can) and a Linear head reading the outer scope; the other branch a Linear."""
    hidden, inputs = 5, 3
    then = helper.make_graph([
        helper.make_node("LSTM", ["x", "lstm.W", "lstm.R", "lstm.B"], ["/lstm/LSTM_output_0"],
                         name="/lstm/LSTM", hidden_size=hidden),
        const("/Constant_1_output_0", np.array([1], np.int64)),
        helper.make_node("Squeeze", ["/lstm/LSTM_output_0", "/Constant_1_output_0"],
                         ["/Squeeze_output_0"], name="/Squeeze"),
        helper.make_node("MatMul", ["/Squeeze_output_0", "head.weight"],
                         ["/head/MatMul_output_0"], name="/head/MatMul"),
        helper.make_node("Add", ["head.bias", "/head/MatMul_output_0"], ["o16"],
                         name="/head/Add"),
    ], "then_branch", [], [vi("o16")], [
        numpy_helper.from_array(rand(1, 4 * hidden, inputs, seed=20), "lstm.W"),
        numpy_helper.from_array(rand(1, 4 * hidden, hidden, seed=21) * 0.3, "lstm.R"),
        numpy_helper.from_array(np.linspace(-0.5, 0.5, 8 * hidden).astype(np.float32)[None],
                                "lstm.B")])
    other = helper.make_graph([
        helper.make_node("MatMul", ["x", "alt.weight"], ["o8"], name="/alt/MatMul"),
    ], "else_branch", [], [vi("o8")], [numpy_helper.from_array(rand(inputs, 2, seed=22),
                                                               "alt.weight")])
    nodes = rate_condition() + [helper.make_node("If", ["/Cast_output_0"], ["y"], name="/If",
                                                 then_branch=then, else_branch=other)]
    return model_of(nodes, [vi("x", [10, 4, inputs]), vi("sr", [], TensorProto.INT64)],
                    [vi("y", [10, 4, 2])], {"head.weight": rand(hidden, 2, seed=23),
                                "head.bias": np.array([0.3, -0.2], np.float32)})


def test_an_lstm_inside_the_taken_branch_is_a_target():
    model = lstm_branch()
    feeds = {"x": rand(10, 4, 3, seed=24) * 2, "sr": np.array(16000, np.int64)}
    result = lsuv_init(model, feeds, exclude=["/If/else_branch"])
    assert result.report.converged, result.report.layers
    rows = {rec.name: rec for rec in result.report.layers}
    assert list(rows) == [f"/lstm/LSTM[{g}]" for g in "iofc"] + ["/head/MatMul"]
    # Per gate, W_g x over every step, from the written W read in the branch.
    w, r = branch_values(result.model, feeds, [("/If", "then_branch")], ["lstm.W", "lstm.R"])
    x = feeds["x"].astype(np.float64).reshape(-1, 3)
    for g, part in zip("iofc", np.split(x @ w[0].T, 4, axis=1)):
        var = float(np.var(part))
        assert abs(var - 1.0) < TOL, (g, var)
        assert rows[f"/lstm/LSTM[{g}]"].var_after == pytest.approx(var, rel=1e-4)
    for block in np.split(r[0], 4, axis=0):  # R: orthonormal per gate, not scaled
        assert np.allclose(block @ block.T, np.eye(5), atol=1e-5)
    (out,) = output_values(result.model, feeds, ["y"])
    assert abs(float(np.var(out.astype(np.float64))) - 1.0) < TOL
    assert_only_changed(model, result.model, {
        ("then_branch", "lstm.W"), ("then_branch", "lstm.R"), ("then_branch", "lstm.B"),
        ("", "head.weight"), ("", "head.bias")})


def test_batches_that_take_different_branches_reach_neither():
    """A stream whose batches disagree on the rate: neither branch is measured (reported);
    the head after the If, which every batch reaches, is a target."""
    model = vad_like()
    result = lsuv_init(model, iter([feeds_at(16000), feeds_at(8000, seed=8)]))
    assert [rec.name for rec in result.report.layers] == ["/head/MatMul"]
    assert sorted(s["name"] for s in result.report.not_initialised) == sorted(
        ["/conv16/Conv", "/proj16/MatMul", "/conv8/Conv", "/proj8/MatMul"])
    assert all("condition differs between the batches" in s["reason"]
               for s in result.report.not_initialised)


def test_without_data_every_branch_gets_its_draw():
    """An init that measures nothing (orthonormal, no data): every branch's layers are
    drawn, written where they live."""
    model = vad_like()
    result = lsuv_init(model, init="orthonormal")
    assert [rec.name for rec in result.report.layers] == [
        "/conv16/Conv", "/proj16/MatMul", "/conv8/Conv", "/proj8/MatMul", "/head/MatMul"]
    assert not result.report.not_initialised
    assert_only_changed(model, result.model, VAD[16000][2] | VAD[8000][2] | HEAD)


# --- the real exporter: a scripted module's `if` on an input ---------------------------------

def scripted_vad(tmp_path):
    """A voice-activity module with ``if sr == 16000`` on an input, scripted and exported by
    torch's TorchScript exporter (dynamo=False): a Conv1d, an LSTM and a Linear in one
    branch, a Conv1d and a Linear in the other. None when torch cannot script it here."""
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class Vad(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv16 = nn.Conv1d(1, 8, 5, stride=2)
            self.lstm = nn.LSTM(8, 12, batch_first=True)
            self.head16 = nn.Linear(12, 1)
            self.conv8 = nn.Conv1d(1, 8, 3)
            self.head8 = nn.Linear(8, 1)

        def forward(self, x, sr):
            if bool(sr == 16000):
                h = torch.relu(self.conv16(x))
                y, _ = self.lstm(h.transpose(1, 2))
                out = self.head16(y)
            else:
                h = torch.relu(self.conv8(x))
                out = self.head8(h.transpose(1, 2))
            return out

    torch.manual_seed(0)
    module = Vad().eval()
    with torch.no_grad():  # trained-looking biases, not torch's small uniform ones
        for name, p in module.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.linspace(-0.5, 0.5, p.numel()))
    x = torch.randn(16, 1, 64)
    path = tmp_path / "vad.onnx"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(torch.jit.script(module), (x, torch.tensor(16000)), str(path),
                          dynamo=False, opset_version=17, input_names=["x", "sr"],
                          output_names=["y"])
    return module, onnx.load(path), x


def test_a_scripted_torch_if_initialises_the_taken_branch(tmp_path):
    """torch.jit.script + the TorchScript exporter: an If on the sample rate, a Conv, an LSTM
    (its gate reorder left in the graph as Concat(Slice(w)...), issue 27 pattern 2) and a
    Linear in the taken branch, a Conv and a Linear in the other; torch stored the two convs'
    equal biases once (conv8.bias an Identity of conv16.bias), so zeroing the taken conv's bias
    must leave the other branch's as it was."""
    torch = pytest.importorskip("torch")
    module, model, x = scripted_vad(tmp_path)
    feeds = {"x": x.numpy(), "sr": np.array(16000, np.int64)}
    if_node = next(n for n in model.graph.node if n.op_type == "If")
    then, other = (next(a.g for a in if_node.attribute if a.name == k)
                   for k in ("then_branch", "else_branch"))
    lstm = next(n for n in then.node if n.op_type == "LSTM")
    taken = [n for n in then.node if n.op_type in ("Conv", "MatMul")]
    assert [n.op_type for n in taken] == ["Conv", "MatMul"]
    result = lsuv_init(model, feeds)
    assert [r.name for r in result.report.layers if not r.name.startswith(lstm.name)] == \
        [n.name for n in taken]
    assert [r.status for r in result.report.layers if r.name.startswith(lstm.name)] == \
        ["converged"] * 4, result.report.table()
    assert sorted(s["name"] for s in result.report.not_initialised) == sorted(
        n.name for n in other.node if n.op_type in ("Conv", "MatMul"))
    # Back in torch: the mapped parameters give the module the model's own forward.
    from onnx_lsuv.match import match_parameters

    params = {k: v.detach().numpy() for k, v in module.state_dict().items()}
    matched = match_parameters(model, result.weights, params)
    assert not matched.unmapped, matched.unmapped
    module.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in
                            {**params, **matched.params}.items()})
    with torch.no_grad():
        expected = module(x, torch.tensor(16000)).numpy()
    (got,) = output_values(result.model, feeds, ["y"])
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    # The untaken branch's layers are as they were, its bias too (stored once with conv16's).
    for name in ("conv8.weight", "conv8.bias", "head8.weight", "head8.bias"):
        assert np.array_equal(module.state_dict()[name].numpy(), params[name]), name
    # Measured here in torch's own float64 forward of the initialised module.
    with torch.no_grad():
        m = module.double()
        h = torch.relu(m.conv16(x.double()))
        assert abs(float(m.conv16(x.double()).var(unbiased=False)) - 1) < TOL
        seq = h.transpose(1, 2)
        w_ih, w_hh = m.lstm.weight_ih_l0, m.lstm.weight_hh_l0
        for g in range(4):  # torch's gates i, f, g, o: W_g x per gate, R_g orthonormal
            rows_g = slice(g * 12, (g + 1) * 12)
            assert abs(float((seq @ w_ih[rows_g].T).var(unbiased=False)) - 1) < TOL, g
            r = w_hh[rows_g].numpy()
            np.testing.assert_allclose(r @ r.T, np.eye(12), atol=1e-5)
        y, _ = m.lstm(seq)
        assert abs(float(m.head16(y).var(unbiased=False)) - 1) < TOL

def test_an_if_inside_a_loop_body_and_a_loop_inside_a_branch_are_reported():
    """What is not followed yet, named with its reason (the run exits 1 unless excluded): an
    If inside a Loop body, whose branch may change from one iteration to the next, and a Loop
    inside an If branch."""
    def matmul_branch(tag, x):
        return helper.make_graph(
            [helper.make_node("MatMul", [x, f"{tag}.weight"], [f"{tag}_out"], name=f"/{tag}")],
            tag, [], [vi(f"{tag}_out")],
            [numpy_helper.from_array(rand(4, 4, seed=len(tag)), f"{tag}.weight")])

    inner_if = helper.make_node("If", ["c_in"], ["h_out"], name="/step/If",
                                then_branch=matmul_branch("a", "h_in"),
                                else_branch=matmul_branch("b", "h_in"))
    body = helper.make_graph(
        [helper.make_node("Identity", ["c_in"], ["c_out"]), inner_if],
        "body", [vi("i", [], TensorProto.INT64), vi("c_in", [], TensorProto.BOOL),
                 vi("h_in", [2, 4])], [vi("c_out", [], TensorProto.BOOL), vi("h_out", [2, 4])])
    loop_in_branch = helper.make_graph(
        [helper.make_node("Loop", ["steps", "go"], ["looped"], name="/inner/Loop",
                          body=helper.make_graph(
                              [helper.make_node("Identity", ["c2"], ["c2_out"]),
                               helper.make_node("MatMul", ["x", "w_in_loop"], ["m2"],
                                                name="/inner/MatMul")],
                              "body2", [vi("j", [], TensorProto.INT64),
                                        vi("c2", [], TensorProto.BOOL)],
                              [vi("c2_out", [], TensorProto.BOOL), vi("m2")]))],
        "then_branch", [], [vi("looped")])
    nodes = [
        helper.make_node("Loop", ["steps", "go", "x"], ["h"], name="/Loop", body=body),
        helper.make_node("If", ["go"], ["z"], name="/If", then_branch=loop_in_branch,
                         else_branch=matmul_branch("c", "x")),
    ]
    model = model_of(nodes, [vi("x", [2, 4]), vi("steps", [], TensorProto.INT64),
                             vi("go", [], TensorProto.BOOL)],
                     [vi("h", [2, 4]), vi("z", [2, 4])],
                     {"w_in_loop": rand(4, 4, seed=9)})
    feeds = {"x": rand(2, 4), "steps": np.array(2, np.int64), "go": np.array(True)}
    result = lsuv_init(model, feeds, init="orthonormal")  # what is found, without data
    reasons = {s["name"]: s["reason"] for s in result.report.not_initialised}
    assert "an If inside the body, whose branch may change" in reasons["/Loop"], reasons
    assert "inside a Loop body inside an If branch: not handled" in reasons["/inner/Loop"]
    result = lsuv_init(model, feeds, exclude=["/Loop", "/inner/Loop"])
    assert [rec.name for rec in result.report.layers] == []
    assert [(s["name"], "in the else_branch of If /If" in s["reason"])
            for s in result.report.not_initialised] == [("/c", True)]


def test_a_weight_applied_twice_inside_a_branch_is_reported():
    """Pooling a weight over its uses is the main graph's rule; inside a branch it is not
    handled: both uses are named, not initialised (and nothing is written)."""
    then = helper.make_graph([
        helper.make_node("MatMul", ["x", "shared.weight"], ["m1"], name="/first/MatMul"),
        helper.make_node("Tanh", ["m1"], ["t1"], name="/Tanh"),
        helper.make_node("MatMul", ["t1", "shared.weight"], ["m2"], name="/second/MatMul"),
    ], "then_branch", [], [vi("m2")])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["same"])], "else_branch",
                              [], [vi("same")])
    nodes = rate_condition() + [helper.make_node("If", ["/Cast_output_0"], ["y"], name="/If",
                                                 then_branch=then, else_branch=other)]
    model = model_of(nodes, [vi("x", [8, 4]), vi("sr", [], TensorProto.INT64)],
                     [vi("y", [8, 4])], {"shared.weight": rand(4, 4, seed=3)})
    result = lsuv_init(model, {"x": rand(8, 4), "sr": np.array(16000, np.int64)})
    assert not result.report.layers
    assert [s["name"] for s in result.report.not_initialised] == ["/first/MatMul",
                                                                  "/second/MatMul"]
    assert all("applied by 2 nodes of the branch" in s["reason"]
               for s in result.report.not_initialised)
    assert_only_changed(model, result.model, set())


# --- from the review: the seams between If branches, biases, ties and fixed weights ---------

def test_a_branch_layer_whose_bias_is_an_identity_alias_gets_a_copy_it_reads():
    """torch stores equal tensors once behind Identity nodes: the branch's Gemm reads
    b_alias = Identity(b), and a main-graph Add reads b. Zeroing the Gemm's bias must give
    the Gemm a copy that it reads (a copy renamed by the stored name was read by nothing)."""
    then = helper.make_graph([helper.make_node("Gemm", ["x", "W", "b_alias"], ["t"],
                                               name="/gemm", transB=1)],
                             "then_branch", [], [vi("t")])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else_branch", [],
                              [vi("e")])
    nodes = rate_condition() + [
        helper.make_node("Identity", ["b"], ["b_alias"], name="/alias"),
        helper.make_node("If", ["/Cast_output_0"], ["y"], name="/If", then_branch=then,
                         else_branch=other),
        helper.make_node("Add", ["z", "b"], ["z2"], name="/other_add")]
    model = model_of(nodes, [vi("x", [32, 6]), vi("sr", [], TensorProto.INT64), vi("z", [3, 4])],
                   [vi("y", ["a", "b"]), vi("z2", [3, 4])],
                   {"W": rand(4, 6, seed=1) * 3, "b": np.linspace(0.5, 1, 4).astype(np.float32)})
    feeds = {"x": rand(32, 6, seed=2), "sr": np.array(16000, np.int64), "z": rand(3, 4, seed=3)}
    result = lsuv_init(model, feeds, exclude=["/If/else_branch"])
    assert result.report.converged, result.report.table()
    (t,) = branch_values(result.model, feeds, [("/If", "then_branch")], ["t"])
    assert abs(float(np.var(t)) - 1) < TOL
    x = feeds["x"].astype(np.float64)  # the bias the Gemm reads is zero: t is x W^T exactly
    w = next(numpy_helper.to_array(i) for i in result.model.graph.initializer if i.name == "W")
    np.testing.assert_allclose(t, x @ w.astype(np.float64).T, rtol=1e-5, atol=1e-5)
    (z2,) = output_values(result.model, feeds, ["z2"])
    (z2_before,) = output_values(model, feeds, ["z2"])
    assert np.array_equal(z2, z2_before)  # the other reader of b as it was


@pytest.mark.parametrize("where", ["other_branch", "alias"])
def test_a_branch_weight_also_read_elsewhere_inside_the_if_is_left_alone(where):
    """W, stored in the main graph, is read by the taken branch's MatMul and by a Gather in
    the other branch (directly, or through torch's Identity alias): a tie the tool must not
    change in silence; left alone by the tie rule, W bit for bit."""
    then = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["t"], name="/mm")],
                             "then_branch", [], [vi("t")])
    table = "W_alias" if where == "alias" else "W"
    other = helper.make_graph([helper.make_node("Gather", [table, "ids"], ["e"],
                                                name="/gather")], "else_branch", [], [vi("e")])
    nodes = rate_condition() + ([helper.make_node("Identity", ["W"], ["W_alias"])]
                                if where == "alias" else []) + [
        helper.make_node("If", ["/Cast_output_0"], ["y"], name="/If", then_branch=then,
                         else_branch=other)]
    model = model_of(nodes, [vi("x", [32, 6]), vi("ids", [3], TensorProto.INT64),
                           vi("sr", [], TensorProto.INT64)], [vi("y", ["a", "b"])],
                   {"W": rand(6, 4, seed=1) * 3})
    feeds = {"x": rand(32, 6, seed=2), "ids": np.array([0, 1, 2], np.int64),
             "sr": np.array(16000, np.int64)}
    result = lsuv_init(model, feeds)
    (tied,) = [s for s in result.report.skipped if s["name"] == "/mm"]
    assert tied["by_rule"] and "also read by another node inside /If" in tied["reason"]
    assert tensors(result.model.graph) == tensors(model.graph)


def test_fixed_weights_tell_two_branches_tensors_of_one_name_apart():
    """Both branches hold an initializer named W; only the else branch's is among PARAMS: with
    --only-matched's rule the then branch's W alone is fixed, by its scoped name."""
    from onnx_lsuv.match import fixed_weights

    w_then, w_else = rand(6, 4, seed=1), rand(6, 4, seed=2)
    branches = [helper.make_graph([helper.make_node("MatMul", ["x", "W"], [out], name=name)],
                                  attr, [], [vi(out)], [numpy_helper.from_array(w, "W")])
                for attr, out, name, w in (("then_branch", "t", "/mm16", w_then),
                                           ("else_branch", "e", "/mm8", w_else))]
    nodes = rate_condition() + [helper.make_node("If", ["/Cast_output_0"], ["y"], name="/If",
                                                 then_branch=branches[0],
                                                 else_branch=branches[1])]
    model = model_of(nodes, [vi("x", [32, 6]), vi("sr", [], TensorProto.INT64)],
                   [vi("y", ["a", "b"])], {})
    found = fixed_weights(model, {"fc.weight": w_else}, missing="not among PARAMS")
    assert list(found) == [k for k in found if k.startswith("W@") and "then_branch" in k]
    assert len(found) == 1
    feeds = {"x": rand(32, 6, seed=3), "sr": np.array(16000, np.int64)}
    result = lsuv_init(model, feeds, fixed=found)
    (left,) = [s for s in result.report.skipped if s["name"] == "/mm16"]
    assert left["by_rule"] and "not among PARAMS" in left["reason"]
