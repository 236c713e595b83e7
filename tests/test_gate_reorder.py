"""Weights gathered from their stored tensors through a Concat (issue 27, pattern 2).

PyTorch's TorchScript exporter without constant folding (``do_constant_folding=False``, and
scripted voice-activity models inside If branches) leaves its reorder of an LSTM's gates, torch's
(i, f, g, o) into ONNX's (i, o, f, c), in the graph: W = Unsqueeze(Concat(Slice(w_ih, i),
Slice(w_ih, o), Slice(w_ih, f and g))), R alike from w_hh, B = Unsqueeze(Concat(the same
reorder of b_ih, of b_hh)), and a bidirectional LSTM Concats the two directions' Unsqueezes.

Checked here without onnx_lsuv: each gate's input projection W_g x (W as ONNX Runtime computes
it through the chain) has unit variance, each gate block of R (as ORT computes it) is
orthonormal, the nodes and the stored tensors' names, shapes and dtypes are unchanged, and torch's
own LSTM with the written tensors computes what ORT computes on the written model.
"""

from __future__ import annotations

import io

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_lsuv import lsuv_init

from conftest import make_model, output_values, rand
from independent import orthonormal_up_to_scale, weight_values

TOL = 0.1
H, F, T = 6, 5, 7  # hidden units, input features, time steps


class TorchScriptGraph:
    """Nodes as torch's TorchScript exporter writes them: every Slice/Unsqueeze argument a
    Constant node, named /lstm/... ."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.n = 0

    def const(self, value) -> str:
        name = f"/lstm/Constant_{self.n}_output_0"
        self.n += 1
        self.nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(
            np.asarray(value, np.int64))))
        return name

    def node(self, op, inputs, **attrs) -> str:
        name = f"/lstm/{op}_{self.n}"
        self.n += 1
        self.nodes.append(helper.make_node(op, inputs, [name + "_output_0"], name=name, **attrs))
        return name + "_output_0"

    def reorder(self, stored: str) -> str:
        """torch (i, f, g, o) rows -> ONNX (i, o, f, c): Slices [0:H], [3H:4H], [H:3H]."""
        parts = [self.node("Slice", [stored, self.const([lo]), self.const([hi]), self.const([0])])
                 for lo, hi in ((0, H), (3 * H, 4 * H), (H, 3 * H))]
        return self.node("Concat", parts, axis=0)


def torch_params(bidirectional: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """torch's nn.LSTM state_dict names and shapes, non-zero biases."""
    rng = np.random.default_rng(seed)
    params = {}
    for suffix in ("", "_reverse")[:2 if bidirectional else 1]:
        params[f"lstm.weight_ih_l0{suffix}"] = rng.standard_normal((4 * H, F)).astype(np.float32)
        params[f"lstm.weight_hh_l0{suffix}"] = rng.standard_normal((4 * H, H)).astype(np.float32)
        params[f"lstm.bias_ih_l0{suffix}"] = rng.normal(0.5, 1, 4 * H).astype(np.float32)
        params[f"lstm.bias_hh_l0{suffix}"] = rng.normal(-0.5, 1, 4 * H).astype(np.float32)
    return params


def torchscript_lstm(bidirectional: bool = False) -> tuple[onnx.ModelProto, dict]:
    """nn.LSTM(F, H, batch_first=True) exported with do_constant_folding=False, opset 17."""
    params = torch_params(bidirectional)
    g = TorchScriptGraph()
    xt = g.node("Transpose", ["x"], perm=[1, 0, 2])
    suffixes = ("", "_reverse")[:2 if bidirectional else 1]
    inputs = []
    for kind in ("weight_ih", "weight_hh"):
        per_dir = [g.node("Unsqueeze", [g.reorder(f"lstm.{kind}_l0{s}"), g.const([0])])
                   for s in suffixes]
        inputs.append(per_dir[0] if len(per_dir) == 1 else g.node("Concat", per_dir, axis=0))
    per_dir = [g.node("Unsqueeze", [g.node("Concat", [g.reorder(f"lstm.bias_ih_l0{s}"),
                                                       g.reorder(f"lstm.bias_hh_l0{s}")],
                                           axis=0), g.const([0])]) for s in suffixes]
    inputs.append(per_dir[0] if len(per_dir) == 1 else g.node("Concat", per_dir, axis=0))
    g.nodes.append(helper.make_node(
        "LSTM", [xt, *inputs], ["/lstm/LSTM_output_0"], name="/lstm/LSTM", hidden_size=H,
        direction="bidirectional" if bidirectional else "forward"))
    y = g.node("Transpose", ["/lstm/LSTM_output_0"], perm=[2, 0, 1, 3])  # (N, T, D, H)
    g.nodes.append(helper.make_node("Reshape", [y, g.const([0, 0, -1])], ["y"]))
    model = make_model(g.nodes, [("x", ["N", T, F])], [("y", None)], params)
    return model, params


def lstm_node(model: onnx.ModelProto) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.op_type == "LSTM")


def gate_variances(model: onnx.ModelProto, feeds: dict) -> list[float]:
    """Var of W_g x per direction and gate: x and W as ORT computes them for the LSTM node."""
    node = lstm_node(model)
    x, w = (np.asarray(v, np.float64) for v in weight_values(model, feeds, list(node.input[:2])))
    x = x.reshape(-1, w.shape[2])
    return [float(np.var(part)) for d in range(w.shape[0])
            for part in np.split(x @ w[d].T, 4, axis=1)]


def assert_r_orthonormal_per_gate(model: onnx.ModelProto, feeds: dict) -> None:
    (r,) = weight_values(model, feeds, [lstm_node(model).input[2]])
    for d in range(r.shape[0]):
        for block in np.split(np.asarray(r[d], np.float64), 4, axis=0):
            np.testing.assert_allclose(block @ block.T, np.eye(H), atol=1e-5)


def assert_structure_unchanged(before: onnx.ModelProto, after: onnx.ModelProto) -> None:
    assert [n.SerializeToString() for n in after.graph.node] == \
        [n.SerializeToString() for n in before.graph.node]
    assert [(t.name, list(t.dims), t.data_type) for t in after.graph.initializer] == \
        [(t.name, list(t.dims), t.data_type) for t in before.graph.initializer]


def stored(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def torch_forward(params: dict[str, np.ndarray], x: np.ndarray,
                  bidirectional: bool) -> np.ndarray:
    torch = pytest.importorskip("torch")
    lstm = torch.nn.LSTM(F, H, batch_first=True, bidirectional=bidirectional)
    lstm.load_state_dict({k.removeprefix("lstm."): torch.from_numpy(np.array(v))
                          for k, v in params.items()})
    with torch.no_grad():
        return lstm(torch.from_numpy(x))[0].numpy()


@pytest.mark.parametrize("bidirectional", [False, True])
def test_lstm_weights_through_torchs_gate_reorder_are_initialised_per_gate(bidirectional):
    model, params = torchscript_lstm(bidirectional)
    x = 3 * rand(16, T, F, seed=1)  # variance 9: the gates need scaling
    feeds = {"x": x}
    result = lsuv_init(model, feeds, provider="cpu")
    rep = result.report
    assert not rep.skipped, rep.table()
    assert [r.name for r in rep.layers] == [
        f"/lstm/LSTM[{p}{g}]" for p in (("fw.", "bw.") if bidirectional else ("",))
        for g in "iofc"], rep.table()
    assert rep.converged, rep.table()
    before = gate_variances(model, feeds)
    after = gate_variances(result.model, feeds)
    assert all(abs(v - 1) < TOL for v in after), (before, after)
    assert not all(abs(v - 1) < TOL for v in before)
    assert_r_orthonormal_per_gate(result.model, feeds)
    r_names = "'lstm.weight_hh_l0', 'lstm.weight_hh_l0_reverse'" if bidirectional else \
        "'lstm.weight_hh_l0'"
    assert f"{r_names} (R): recurrent: orthonormal per gate, not scaled" in rep.notes[0]
    assert_structure_unchanged(model, result.model)
    new = stored(result.model)
    assert {k for k in params if k.startswith("lstm.weight")} <= set(result.weights)
    # the way back: torch's own LSTM with the written tensors computes what ORT computes
    (y,) = output_values(result.model, feeds, ["y"])
    np.testing.assert_allclose(torch_forward(new, x, bidirectional), y, atol=1e-5)


def test_the_forget_bias_goes_into_torchs_forget_rows_of_b_ih_through_the_reorder():
    """ONNX's gate f is torch's rows H:2H of b_ih (B = [Wb, Rb], Wb from b_ih): set there,
    every other element of b_ih and all of b_hh bit for bit as they were."""
    model, params = torchscript_lstm(bidirectional=True)
    result = lsuv_init(model, {"x": rand(16, T, F, seed=1)}, provider="cpu",
                       lstm_forget_bias=1.0, keep_bias=True)
    new = stored(result.model)
    for s in ("", "_reverse"):
        b_ih, old = new[f"lstm.bias_ih_l0{s}"], params[f"lstm.bias_ih_l0{s}"]
        assert np.all(b_ih[H:2 * H] == 1.0)
        assert np.array_equal(np.delete(b_ih, np.s_[H:2 * H]), np.delete(old, np.s_[H:2 * H]))
        assert new[f"lstm.bias_hh_l0{s}"].tobytes() == params[f"lstm.bias_hh_l0{s}"].tobytes()


def test_zeroing_a_bias_joined_from_two_tensors_zeroes_both():
    """The pre-init zeroes the biases (the default): both of B's stored tensors."""
    model, params = torchscript_lstm()
    result = lsuv_init(model, {"x": rand(16, T, F, seed=1)}, provider="cpu")
    new = stored(result.model)
    assert not new["lstm.bias_ih_l0"].any() and not new["lstm.bias_hh_l0"].any()
    assert_structure_unchanged(model, result.model)


@pytest.mark.parametrize("scripted", [False, True], ids=["traced", "scripted"])
def test_the_real_torchscript_exporter_without_constant_folding(scripted):
    """torch.onnx.export(..., dynamo=False, do_constant_folding=False) of an LSTM (both
    directions) and a Linear, traced or scripted (whose weights are Constant nodes): the gate
    reorder is left in the graph, and every layer reaches unit variance; torch's model with
    the parameters mapped back computes what ORT does."""
    torch = pytest.importorskip("torch")
    from onnx_lsuv.match import match_parameters

    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = torch.nn.LSTM(F, H, batch_first=True, bidirectional=True)
            self.fc = torch.nn.Linear(2 * H, 3)

        def forward(self, x):
            return self.fc(self.lstm(x)[0])

    net = Net()
    with torch.no_grad():
        for p in net.parameters():  # non-zero, non-default biases
            p.normal_(0.3, 1.0)
    buf = io.BytesIO()
    torch.onnx.export(torch.jit.script(net) if scripted else net, (torch.zeros(2, T, F),), buf,
                      dynamo=False,
                      do_constant_folding=False, opset_version=17, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
    model = onnx.load_from_string(buf.getvalue())
    node = lstm_node(model)
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    assert producers.get(node.input[1]) == "Concat", "the exporter folded the reorder"
    x = 2 * rand(16, T, F, seed=2)
    feeds = {"x": x}
    result = lsuv_init(model, feeds, provider="cpu")
    rep = result.report
    assert not rep.skipped and rep.converged, rep.table()
    assert {r.op for r in rep.layers} == {"LSTM", "MatMul"}, rep.table()
    assert all(abs(v - 1) < TOL for v in gate_variances(result.model, feeds))
    assert_r_orthonormal_per_gate(result.model, feeds)
    fc = next(n for n in model.graph.node if n.op_type == "MatMul")
    add = next(n for n in model.graph.node if fc.output[0] in n.input)
    (out,) = output_values(result.model, feeds, [add.output[0]])
    assert abs(np.var(out.astype(np.float64)) - 1) < TOL
    (w_fc,) = weight_values(result.model, feeds, [fc.input[1]])
    assert orthonormal_up_to_scale(np.asarray(w_fc).T[None])
    assert [n.SerializeToString() for n in result.model.graph.node if n.op_type != "Constant"] \
        == [n.SerializeToString() for n in model.graph.node if n.op_type != "Constant"]
    assert [(t.name, list(t.dims)) for t in result.model.graph.initializer] == \
        [(t.name, list(t.dims)) for t in model.graph.initializer]
    state = {k: v.numpy() for k, v in net.state_dict().items()}
    matched = match_parameters(model, result.weights, state)
    assert matched.complete, matched.summary()
    net.load_state_dict({k: torch.from_numpy(np.array(matched.params.get(k, v)))
                         for k, v in state.items()})
    with torch.no_grad():
        theirs = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(theirs, output_values(result.model, feeds, ["y"])[0], atol=1e-5)


# --- Concat in the weight chain of a dense or conv layer ------------------------------------

def concat_weight(parts: str):
    """A MatMul whose weight is a Concat of Slices: "swap" the two halves of one kernel's
    columns (a pure rearrangement), "two" one half of each of two kernels, "overlap" one
    column range twice."""
    k, n = 12, 8
    ranges = {"swap": [("w", 4, 8), ("w", 0, 4)], "two": [("w", 0, 4), ("v", 0, 4)],
              "overlap": [("w", 0, 4), ("w", 2, 6)]}[parts]
    nodes, cat = [], []
    for j, (src, _, _) in enumerate(ranges):
        nodes.append(helper.make_node("Slice", [src, f"lo{j}", f"hi{j}", "ax"], [f"s{j}"]))
        cat.append(f"s{j}")
    nodes += [helper.make_node("Concat", cat, ["wc"], axis=1),
              helper.make_node("MatMul", ["x", "wc"], ["mm"], name="fc"),
              helper.make_node("Add", ["mm", "b"], ["y"])]
    inits = {"w": rand(k, n, seed=1), "v": rand(k, n, seed=2), "b": np.full(n, 0.4, np.float32),
             "ax": np.array([1], np.int64)}
    for j, (_, lo, hi) in enumerate(ranges):
        inits[f"lo{j}"], inits[f"hi{j}"] = np.array([lo], np.int64), np.array([hi], np.int64)
    return make_model(nodes, [("x", ["N", k])], [("y", None)], inits)


def test_a_dense_weight_concatenated_from_slices_of_one_kernel_is_a_target():
    model = concat_weight("swap")
    feeds = {"x": rand(32, 12, seed=3)}
    result = lsuv_init(model, feeds, provider="cpu")
    assert [r.name for r in result.report.layers] == ["fc"] and result.report.converged
    (y,) = output_values(result.model, feeds, ["y"])
    assert abs(np.var(y.astype(np.float64)) - 1) < TOL
    (wc,) = weight_values(result.model, feeds, ["wc"])
    assert orthonormal_up_to_scale(np.asarray(wc).T[None])
    assert_structure_unchanged(model, result.model)
    new, old = stored(result.model), stored(model)
    assert new["v"].tobytes() == old["v"].tobytes()
    assert np.array_equal(new["w"], np.concatenate([wc[:, 4:], wc[:, :4]], axis=1))


@pytest.mark.parametrize("parts, why", [("two", "joins 2 constants (w, v)"),
                                        ("overlap", "not a rearrangement")])
def test_a_concat_of_two_kernels_or_of_overlapping_slices_is_reported(parts, why):
    model = concat_weight(parts)
    rep = lsuv_init(model, {"x": rand(32, 12, seed=3)}, provider="cpu").report
    assert not rep.layers
    assert [s["name"] for s in rep.not_initialised] == ["fc"]
    assert why in rep.not_initialised[0]["reason"], rep.not_initialised


def test_a_chain_through_a_concat_with_a_cast_keeps_the_graph_valid():
    """A Cast inside one branch of the Concat (float16 halves of a kernel) still gathers."""
    k, n = 12, 8
    nodes = [helper.make_node("Slice", ["w", "lo0", "hi0", "ax"], ["s0"]),
             helper.make_node("Slice", ["w", "lo1", "hi1", "ax"], ["s1"]),
             helper.make_node("Concat", ["s1", "s0"], ["c16"], axis=1),
             helper.make_node("Cast", ["c16"], ["wc"], to=TensorProto.FLOAT),
             helper.make_node("MatMul", ["x", "wc"], ["y"], name="fc")]
    inits = {"w": rand(k, n, seed=1).astype(np.float16), "ax": np.array([1], np.int64),
             "lo0": np.array([0], np.int64), "hi0": np.array([4], np.int64),
             "lo1": np.array([4], np.int64), "hi1": np.array([8], np.int64)}
    model = make_model(nodes, [("x", ["N", k])], [("y", None)], inits)
    feeds = {"x": rand(32, 12, seed=3)}
    result = lsuv_init(model, feeds, provider="cpu")
    assert [r.name for r in result.report.layers] == ["fc"], result.report.table()
    (y,) = output_values(result.model, feeds, ["y"])
    assert abs(np.var(y.astype(np.float64)) - 1) < TOL
    assert stored(result.model)["w"].dtype == np.float16


@pytest.mark.parametrize("in_branch", [False, True])
def test_a_joined_bias_whose_b_hh_another_node_reads_gets_a_copy(in_branch):
    """B joins b_ih and b_hh (torch's reorder); a main-graph Add also reads b_hh. Zeroing the
    LSTM's bias must leave that reader as it was, in the main graph and with the LSTM inside
    the taken branch of an If (where only the first joined tensor was copied, and b_hh was
    zeroed in place); the note names the shared tensor."""
    from test_if_branches import rate_condition, vi

    from independent import branch_values

    g = TorchScriptGraph()
    ins = [g.node("Unsqueeze", [g.reorder(f"lstm.{kind}_l0"), g.const([0])])
           for kind in ("weight_ih", "weight_hh")]
    ins.append(g.node("Unsqueeze", [g.node("Concat", [g.reorder("lstm.bias_ih_l0"),
                                                      g.reorder("lstm.bias_hh_l0")], axis=0),
                                    g.const([0])]))
    g.nodes.append(helper.make_node("LSTM", ["xt", *ins], ["h"], name="/lstm/LSTM",
                                    hidden_size=H))
    main = [helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2]),
            helper.make_node("Add", ["z", "lstm.bias_hh_l0"], ["z2"], name="/other_add")]
    if in_branch:
        g.nodes.append(helper.make_node("Identity", ["h"], ["h16"]))
        then = helper.make_graph(g.nodes, "then_branch", [], [vi("h16")])
        other = helper.make_graph([helper.make_node("Identity", ["xt"], ["h8"])],
                                  "else_branch", [], [vi("h8")])
        main += rate_condition() + [helper.make_node(
            "If", ["/Cast_output_0"], ["y"], name="/If", then_branch=then, else_branch=other)]
    else:
        g.nodes.append(helper.make_node("Identity", ["h"], ["y"]))
        main += g.nodes
    graph = helper.make_graph(main, "m", [vi("x", [4, T, F]), vi("sr", [], TensorProto.INT64),
                                          vi("z", [4 * H])], [vi("y", None), vi("z2", [4 * H])],
                              [numpy_helper.from_array(v, k)
                               for k, v in torch_params(False).items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              ir_version=8)
    feeds = {"x": rand(4, T, F, seed=3) * 2, "sr": np.array(16000, np.int64),
             "z": rand(4 * H, seed=9)}
    result = lsuv_init(model, feeds, exclude=["/If/else_branch"])
    (z2,) = output_values(result.model, feeds, ["z2"])
    (z2_before,) = output_values(model, feeds, ["z2"])
    assert np.array_equal(z2, z2_before)
    assert any("its bias 'lstm.bias_hh_l0' is also read by /other_add" in n
               for n in result.report.notes), result.report.notes
    lstm = next(n for n in (next(a.g for a in next(
        n for n in result.model.graph.node if n.op_type == "If").attribute
        if a.name == "then_branch").node if in_branch else result.model.graph.node)
        if n.op_type == "LSTM")
    if in_branch:
        (b,) = branch_values(result.model, feeds, [("/If", "then_branch")], [lstm.input[3]])
    else:
        (b,) = output_values(result.model, feeds, [lstm.input[3]])
    assert not np.any(b)  # the bias the LSTM reads is zeroed
