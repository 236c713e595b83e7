"""Recurrent weights: one rule, however the recurrence is written (issue 26, class 10).

The weight that multiplies the previous state (an LSTM/GRU/RNN op's R) is orthonormal per gate
and not scaled, after Saxe et al. The same weight in a Loop body (tf2onnx's Keras GRU, jax2onnx's
``lax.scan``), a Scan body, or unrolled into steps in the main graph gets that rule too; the
input weights still reach unit variance, and the layers downstream are measured with the
recurrent weight in place. Every graph is built here as the exporter writes it; every check is
the test's own (its ORT session, float64 statistics, numpy views of the weights).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_lsuv import lsuv_init

from conftest import make_model, output_values, rand
from independent import body_values

TOL = 0.1
RULE = "recurrent: orthonormal per gate, not scaled"
INT32_MAX = 2 ** 31 - 1
F, I32, I64, B_ = TensorProto.FLOAT, TensorProto.INT32, TensorProto.INT64, TensorProto.BOOL


def stored(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


def assert_orthonormal_per_gate(w: np.ndarray, gates: int) -> None:
    """Each gate's block of a [state, gates * state] weight (x @ W) has Q^T Q = I: orthonormal
    and not scaled."""
    w = np.asarray(w, np.float64)
    hidden = w.shape[0]
    assert w.shape[1] == gates * hidden
    for g in range(gates):
        block = w[:, g * hidden:(g + 1) * hidden]
        np.testing.assert_allclose(block.T @ block, np.eye(hidden), atol=1e-5)


def gate_variances(values: np.ndarray, gates: int) -> list[float]:
    return [float(np.var(p)) for p in np.split(values, gates, axis=-1)]


def pooled_var(model, feeds, names) -> float:
    values = output_values(model, feeds, names)
    return float(np.var(np.concatenate([v.astype(np.float64).ravel() for v in values])))


def _zeros_state(hidden: int, out: str = "h0") -> list[onnx.NodeProto]:
    """A zero state of the batch's size (x is [N, T, F])."""
    return [helper.make_node("Shape", ["x"], ["xs"]),
            helper.make_node("Gather", ["xs", "zero_i"], ["batch"], axis=0),
            helper.make_node("Concat", ["batch", "hidden_dim"], ["h_shape"], axis=0),
            helper.make_node("ConstantOfShape", ["h_shape"], [out],
                             value=helper.make_tensor("v", F, [1], [0.0]))]


def _head(ys: str, hidden: int, out: str = "y") -> list[onnx.NodeProto]:
    """A Dense head on the sequence of states [T, N, H]: MatMul -> Add (downstream layer)."""
    return [helper.make_node("MatMul", [ys, "head_w"], ["head_m"], name="head"),
            helper.make_node("Add", ["head_m", "head_b"], [out])]


def _common_inits(hidden: int, seed: int = 20) -> dict[str, np.ndarray]:
    return {"zero_i": np.array([0], np.int64), "hidden_dim": np.array([hidden], np.int64),
            "head_w": rand(hidden, 4, seed=seed), "head_b": rand(4, seed=seed + 1)}


def _radius_4(hidden: int, gates: int, seed: int) -> np.ndarray:
    """A recurrent kernel whose gate blocks have spectral radius about 4."""
    return (rand(hidden, gates * hidden, seed=seed) * 4 / np.sqrt(hidden)).astype(np.float32)


def keras_gru_loop(steps=6, features=5, hidden=8):
    """A Keras GRU (reset_after=True) as tf2onnx writes it: a Loop whose carried values are
    the step counter, the state h and the three weights (returned unchanged, by name); the
    input kernel's projection cut into z, r, h by one Split, the recurrent kernel's by three
    Slices (axes [0, 1], ends INT32_MAX); the bias [2, 3H] split into rows, one per MatMul."""
    h3 = 3 * hidden
    body = helper.make_graph([
        helper.make_node("Split", ["bias_in"], ["b0", "b1"], axis=0),
        helper.make_node("MatMul", ["h", "rec_in"], ["mh"], name="gru/MatMul_1"),
        helper.make_node("Add", ["time", "one_i32"], ["time_next"]),
        helper.make_node("Gather", ["x_tnf", "time"], ["x_t"]),
        helper.make_node("MatMul", ["x_t", "kernel_in"], ["mx"], name="gru/MatMul"),
        helper.make_node("Squeeze", ["b0", "axes0"], ["b0s"]),
        helper.make_node("Add", ["mx", "b0s"], ["bx"]),
        helper.make_node("Split", ["bx"], ["xz", "xr", "xh"], axis=-1),
        helper.make_node("Squeeze", ["b1", "axes0"], ["b1s"]),
        helper.make_node("Add", ["mh", "b1s"], ["hb"]),
        helper.make_node("Slice", ["hb", "s_h", "e_h", "axes01"], ["hh"]),
        helper.make_node("Slice", ["hb", "s_r", "e_r", "axes01"], ["hr"]),
        helper.make_node("Slice", ["hb", "s_z", "e_z", "axes01"], ["hz"]),
        helper.make_node("Add", ["xr", "hr"], ["r_pre"]),
        helper.make_node("Sigmoid", ["r_pre"], ["r"]),
        helper.make_node("Mul", ["r", "hh"], ["rh"]),
        helper.make_node("Add", ["xh", "rh"], ["n_pre"]),
        helper.make_node("Tanh", ["n_pre"], ["n"]),
        helper.make_node("Add", ["xz", "hz"], ["z_pre"]),
        helper.make_node("Sigmoid", ["z_pre"], ["z"]),
        helper.make_node("Sub", ["one_f", "z"], ["omz"]),
        helper.make_node("Mul", ["omz", "n"], ["a"]),
        helper.make_node("Mul", ["z", "h"], ["zh"]),
        helper.make_node("Add", ["zh", "a"], ["h_new"]),
        helper.make_node("Identity", ["h_new"], ["h_out"]),
        helper.make_node("Identity", ["cond"], ["cond_out"]),
    ], "body", [
        helper.make_tensor_value_info("counter", I64, []),
        helper.make_tensor_value_info("cond", B_, []),
        helper.make_tensor_value_info("time", I32, []),
        helper.make_tensor_value_info("h", F, ["unk", hidden]),
        helper.make_tensor_value_info("bias_in", F, [2, h3]),
        helper.make_tensor_value_info("kernel_in", F, [features, h3]),
        helper.make_tensor_value_info("rec_in", F, [hidden, h3]),
    ], [
        helper.make_tensor_value_info("cond_out", B_, []),
        helper.make_tensor_value_info("time_next", I32, []),
        helper.make_tensor_value_info("h_out", F, ["unk", hidden]),
        helper.make_tensor_value_info("bias_in", F, [2, h3]),
        helper.make_tensor_value_info("kernel_in", F, [features, h3]),
        helper.make_tensor_value_info("rec_in", F, [hidden, h3]),
        helper.make_tensor_value_info("h_new", F, ["unk", hidden]),
    ], initializer=[
        numpy_helper.from_array(np.array(1, np.int32), "one_i32"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one_f"),
        numpy_helper.from_array(np.array([0], np.int64), "axes0"),
        numpy_helper.from_array(np.array([0, 1], np.int64), "axes01"),
        numpy_helper.from_array(np.array([0, 0], np.int64), "s_z"),
        numpy_helper.from_array(np.array([INT32_MAX, hidden], np.int64), "e_z"),
        numpy_helper.from_array(np.array([0, hidden], np.int64), "s_r"),
        numpy_helper.from_array(np.array([INT32_MAX, 2 * hidden], np.int64), "e_r"),
        numpy_helper.from_array(np.array([0, 2 * hidden], np.int64), "s_h"),
        numpy_helper.from_array(np.array([INT32_MAX, INT32_MAX], np.int64), "e_h"),
    ])
    nodes = [helper.make_node("Transpose", ["x"], ["x_tnf"], perm=[1, 0, 2])] + \
        _zeros_state(hidden) + [
        helper.make_node("Loop", ["trip", "true", "time0", "h0", "gru_bias", "gru_kernel",
                                  "gru_rec"],
                         ["time_T", "h_T", "bias_T", "kernel_T", "rec_T", "ys"],
                         name="gru/while_loop", body=body)] + _head("ys", hidden)
    inits = {"trip": np.array(steps, np.int64), "true": np.array(True),
             "time0": np.array(0, np.int32), "gru_bias": rand(2, h3, seed=1),
             "gru_kernel": rand(features, h3, seed=2), "gru_rec": _radius_4(hidden, 3, 3),
             **_common_inits(hidden)}
    model = make_model(nodes, [("x", ["N", steps, features])], [("y", None)], inits)
    return model, {"x": rand(32, steps, features, seed=9)}


def jax_rnn_loop(steps=6, features=5, hidden=8):
    """jax2onnx's ``lax.scan`` over an RNN cell, as it writes it: a Loop (not a Scan) that
    carries the weights (returned through Identity), the state (returned through two Casts)
    and the sequence itself; the input Gemm has its bias as C, the state's Gemm beta 0."""
    body = helper.make_graph([
        helper.make_node("Gather", ["seq", "it"], ["x_t"], axis=0),
        helper.make_node("Gemm", ["x_t", "w_in", "b_in"], ["px"], name="node_Gemm_1"),
        helper.make_node("Gemm", ["h", "u_in"], ["ph"], name="node_Gemm_3", beta=0.0),
        helper.make_node("Add", ["px", "ph"], ["pre"]),
        helper.make_node("Tanh", ["pre"], ["h_new"]),
        helper.make_node("Identity", ["cond"], ["cond_out"]),
        helper.make_node("Identity", ["w_in"], ["w_out"]),
        helper.make_node("Identity", ["b_in"], ["b_out"]),
        helper.make_node("Identity", ["u_in"], ["u_out"]),
        helper.make_node("Cast", ["h_new"], ["h_fix"], to=F),
        helper.make_node("Identity", ["seq"], ["seq_out"]),
        helper.make_node("Cast", ["h_fix"], ["y_t"], to=F),
    ], "body", [
        helper.make_tensor_value_info("it", I64, []),
        helper.make_tensor_value_info("cond", B_, []),
        helper.make_tensor_value_info("w_in", F, [features, hidden]),
        helper.make_tensor_value_info("b_in", F, [hidden]),
        helper.make_tensor_value_info("u_in", F, [hidden, hidden]),
        helper.make_tensor_value_info("h", F, ["B", hidden]),
        helper.make_tensor_value_info("seq", F, [steps, "B", features]),
    ], [
        helper.make_tensor_value_info("cond_out", B_, []),
        helper.make_tensor_value_info("w_out", F, [features, hidden]),
        helper.make_tensor_value_info("b_out", F, [hidden]),
        helper.make_tensor_value_info("u_out", F, [hidden, hidden]),
        helper.make_tensor_value_info("h_fix", F, ["B", hidden]),
        helper.make_tensor_value_info("seq_out", F, [steps, "B", features]),
        helper.make_tensor_value_info("y_t", F, ["B", hidden]),
    ])
    nodes = _zeros_state(hidden) + [
        helper.make_node("Transpose", ["x"], ["x_tnf"], perm=[1, 0, 2]),
        helper.make_node("Loop", ["trip", "true", "const_0", "const_1", "const_2", "h0",
                                  "x_tnf"],
                         ["w_T", "b_T", "u_T", "h_T", "seq_T", "ys"], name="node_Loop_5",
                         body=body)] + _head("ys", hidden)
    inits = {"trip": np.array(steps, np.int64), "true": np.array(True),
             "const_0": rand(features, hidden, seed=1), "const_1": rand(hidden, seed=2),
             "const_2": _radius_4(hidden, 1, 3), **_common_inits(hidden)}
    model = make_model(nodes, [("x", ["B", steps, features])], [("y", None)], inits)
    return model, {"x": rand(32, steps, features, seed=9)}


def scan_rnn(steps=6, features=5, hidden=8):
    """An RNN as a Scan: the state h first, the sequence scanned; W, U and b read from the
    enclosing scope."""
    body = helper.make_graph([
        helper.make_node("MatMul", ["x_t", "W"], ["mx"], name="proj_x"),
        helper.make_node("Add", ["mx", "b"], ["px"]),
        helper.make_node("MatMul", ["h", "U"], ["ph"], name="proj_h"),
        helper.make_node("Add", ["px", "ph"], ["pre"]),
        helper.make_node("Tanh", ["pre"], ["h_new"]),
        helper.make_node("Identity", ["h_new"], ["y_t"]),
    ], "body", [helper.make_tensor_value_info("h", F, None),
                helper.make_tensor_value_info("x_t", F, None)],
        [helper.make_tensor_value_info("h_new", F, None),
         helper.make_tensor_value_info("y_t", F, None)])
    nodes = _zeros_state(hidden) + [
        helper.make_node("Scan", ["h0", "x"], ["h_T", "ys"], name="rnn_scan", body=body,
                         num_scan_inputs=1, scan_input_axes=[1])] + _head("ys", hidden)
    inits = {"W": rand(features, hidden, seed=1), "U": _radius_4(hidden, 1, 3),
             "b": rand(hidden, seed=2), **_common_inits(hidden)}
    model = make_model(nodes, [("x", ["N", steps, features])], [("y", None)], inits)
    return model, {"x": rand(32, steps, features, seed=9)}


# (builder, its Loop/Scan node, the state weight, its gates, the input weight's output in
# the body, the input weight's gates)
BODIES = {
    "tf2onnx-keras-gru-loop": (keras_gru_loop, "gru/while_loop", "gru_rec", 3, "bx", 3),
    "jax2onnx-lax-scan-loop": (jax_rnn_loop, "node_Loop_5", "const_2", 1, "px", 1),
    "scan": (scan_rnn, "rnn_scan", "U", 1, "px", 1),
}


@pytest.mark.parametrize("strategy", ["fast", "naive", "sequential"])
@pytest.mark.parametrize("case", list(BODIES))
def test_the_weight_that_multiplies_a_loop_or_scan_state_is_orthonormal_per_gate_not_scaled(
        case, strategy):
    build, loop, state_w, gates, x_out, x_gates = BODIES[case]
    model, feeds = build()
    result = lsuv_init(model, feeds, provider="cpu", strategy=strategy)
    rep = result.report
    assert [n.SerializeToString() for n in result.model.graph.node] == \
        [n.SerializeToString() for n in model.graph.node]
    assert_orthonormal_per_gate(stored(result.model, state_w), gates)
    rows = [r for r in rep.layers if r.weight == state_w]
    assert len(rows) == gates and all(r.status == "not_scaled" and r.message == RULE
                                      and r.scale == 1.0 for r in rows), rep.table()
    assert any(state_w in n and n.endswith(RULE) for n in rep.notes), rep.notes
    assert rep.converged
    # The input weight still reaches unit variance per gate, over every iteration, and the
    # head downstream with the recurrent weight in place (measured here).
    (values,) = body_values(result.model, feeds, loop, [x_out])
    for v in gate_variances(values, x_gates):
        assert abs(v - 1) < TOL, (v, rep.table())
    assert abs(pooled_var(result.model, feeds, ["y"]) - 1) < TOL, rep.table()


def unrolled_rnn(steps=6, features=5, hidden=8):
    """An RNN unrolled into steps in the main graph (jax2onnx on a Python loop): W_x (with its
    bias), W_h and b_h shared by every step, the state starting at zeros."""
    nodes = _zeros_state(hidden)
    h, xs, hs = "h0", [], []
    for t in range(steps):
        nodes += [
            helper.make_node("Gather", ["x", f"t{t}"], [f"x{t}"], axis=1),
            helper.make_node("MatMul", [f"x{t}", "W_x"], [f"mx{t}"], name=f"step{t}_x"),
            helper.make_node("Add", [f"mx{t}", "b_x"], [f"px{t}"]),
            helper.make_node("MatMul", [h, "W_h"], [f"ph{t}"], name=f"step{t}_h"),
            helper.make_node("Add", [f"px{t}", f"ph{t}"], [f"pre{t}"]),
            helper.make_node("Tanh", [f"pre{t}"], [f"h{t + 1}"]),
        ]
        xs.append(f"px{t}")
        hs.append(f"h{t + 1}")
        h = f"h{t + 1}"
    nodes += [helper.make_node("Concat", hs, ["ys"], axis=0)] + _head("ys", hidden)
    inits = {"W_x": rand(features, hidden, seed=1), "b_x": rand(hidden, seed=2),
             "W_h": _radius_4(hidden, 1, 3), **_common_inits(hidden),
             **{f"t{t}": np.array(t, np.int64) for t in range(steps)}}
    model = make_model(nodes, [("x", ["N", steps, features])], [("y", None)], inits)
    return model, {"x": rand(32, steps, features, seed=9)}, xs


@pytest.mark.parametrize("strategy", ["fast", "naive", "sequential"])
def test_an_unrolled_recurrent_weight_is_orthonormal_not_scaled(strategy):
    model, feeds, xs = unrolled_rnn()
    result = lsuv_init(model, feeds, provider="cpu", strategy=strategy)
    rep = result.report
    assert_orthonormal_per_gate(stored(result.model, "W_h"), 1)
    (row,) = [r for r in rep.layers if r.weight == "W_h"]
    assert row.status == "not_scaled" and row.message == RULE and row.scale == 1.0
    assert any("'W_h' multiplies the previous state over 6 unrolled steps" in n
               for n in rep.notes), rep.notes
    assert rep.converged, rep.table()
    assert abs(pooled_var(result.model, feeds, xs) - 1) < TOL, rep.table()
    assert abs(pooled_var(result.model, feeds, ["y"]) - 1) < TOL, rep.table()


def unrolled_decoder(steps=4, width=8):
    """A decoder unrolled into steps: y_k = tanh(W2 relu(W1 y_(k-1) + b1) + b2). Each weight
    feeds the later steps only through the other layer: no recurrent weight."""
    nodes, y, firsts, seconds = [], "x", [], []
    for k in range(steps):
        nodes += [helper.make_node("MatMul", [y, "W1"], [f"m1_{k}"], name=f"dec{k}_fc1"),
                  helper.make_node("Add", [f"m1_{k}", "b1"], [f"a{k}"]),
                  helper.make_node("Relu", [f"a{k}"], [f"r{k}"]),
                  helper.make_node("MatMul", [f"r{k}", "W2"], [f"m2_{k}"], name=f"dec{k}_fc2"),
                  helper.make_node("Add", [f"m2_{k}", "b2"], [f"y{k}"]),
                  helper.make_node("Tanh", [f"y{k}"], [f"t{k}"])]
        firsts.append(f"a{k}")
        seconds.append(f"y{k}")
        y = f"t{k}"
    inits = {"W1": rand(width, width, seed=1) * 2, "b1": rand(width, seed=2),
             "W2": rand(width, width, seed=3) * 2, "b2": rand(width, seed=4)}
    model = make_model(nodes, [("x", ["N", width])], [(y, None)], inits)
    return model, {"x": rand(64, width, seed=9)}, firsts, seconds


def test_an_unrolled_decoder_is_no_recurrence_its_weights_stay_scaled():
    model, feeds, firsts, seconds = unrolled_decoder()
    result = lsuv_init(model, feeds, provider="cpu")
    rep = result.report
    assert [r.name for r in rep.layers] == ["dec0_fc1", "dec0_fc2"]
    assert all(r.status == "converged" and r.scale != 1.0 for r in rep.layers), rep.table()
    assert not any("previous state" in n for n in rep.notes)
    assert abs(pooled_var(result.model, feeds, firsts) - 1) < TOL, rep.table()
    assert abs(pooled_var(result.model, feeds, seconds) - 1) < TOL, rep.table()


def test_an_lstm_ops_recurrent_weight_is_reported_in_the_same_words():
    hidden, features = 6, 5
    nodes = [helper.make_node("LSTM", ["x", "W", "R", "B"], ["Y", "Y_h"], name="lstm",
                              hidden_size=hidden)]
    inits = {"W": rand(1, 4 * hidden, features, seed=1),
             "R": rand(1, 4 * hidden, hidden, seed=2) * 3, "B": rand(1, 8 * hidden, seed=3)}
    model = make_model(nodes, [("x", [7, "N", features])], [("Y", None)], inits)
    result = lsuv_init(model, rand(7, 16, features, seed=9), provider="cpu")
    assert "layer lstm: its recurrent weight 'R' (R): " + RULE in result.report.notes
    r = stored(result.model, "R")[0].astype(np.float64)
    for g in range(4):
        block = r[g * hidden:(g + 1) * hidden]
        np.testing.assert_allclose(block @ block.T, np.eye(hidden), atol=1e-5)


def test_check_mode_does_not_judge_a_recurrent_weight_by_its_variance():
    from onnx_lsuv import check_variances

    model, feeds = keras_gru_loop()
    result = lsuv_init(model, feeds, provider="cpu")
    rep = check_variances(result.model, feeds)
    rows = [r for r in rep.layers if r.weight == "gru_rec"]
    assert rows and all(r.status == "not_scaled" and "not judged" in r.message for r in rows)
    assert rep.converged, rep.table()


def test_a_weight_cascaded_over_its_own_output_is_no_recurrence():
    """One weight applied to its own output with nothing new coming in at each step (a filter
    bank cascaded over octaves, a depth-shared layer) is a cascade: pooled and scaled like any
    layer, not given R's rule; the same weight with the step's own input added (W x_t + R h)
    is the state weight of an unrolled recurrence."""
    n = 16
    nodes = [helper.make_node("MatMul", ["x", "R"], ["h0"], name="step0"),
             helper.make_node("Tanh", ["h0"], ["a0"]),
             helper.make_node("MatMul", ["a0", "R"], ["h1"], name="step1"),
             helper.make_node("Tanh", ["h1"], ["a1"]),
             helper.make_node("MatMul", ["a1", "R"], ["h2"], name="step2")]
    cascade = make_model(nodes, [("x", [64, n])], [("h2", [64, n])], {"R": rand(n, n, seed=1)})
    feeds = {"x": rand(64, n, seed=2) * 3}
    rep = lsuv_init(cascade, feeds, provider="cpu").report
    assert [r.status for r in rep.layers] == ["converged"], rep.table()
    assert not any("recurrent" in note for note in rep.notes)
    # the recurrence: the step's input x_t joins the state at an Add
    nodes = [helper.make_node("MatMul", ["x", "R"], ["h0"], name="step0"),
             helper.make_node("Tanh", ["h0"], ["a0"]),
             helper.make_node("MatMul", ["a0", "R"], ["r1"], name="step1"),
             helper.make_node("Add", ["r1", "x1"], ["h1"]),
             helper.make_node("Tanh", ["h1"], ["a1"]),
             helper.make_node("MatMul", ["a1", "R"], ["h2"], name="step2")]
    rnn = make_model(nodes, [("x", [64, n]), ("x1", [64, n])], [("h2", [64, n])],
                     {"R": rand(n, n, seed=1)})
    feeds["x1"] = rand(64, n, seed=3)
    result = lsuv_init(rnn, feeds, provider="cpu")
    assert [r.status for r in result.report.layers] == ["not_scaled"], result.report.table()
    w = next(numpy_helper.to_array(t) for t in result.model.graph.initializer
             if t.name == "R").astype(np.float64)
    np.testing.assert_allclose(w.T @ w, np.eye(n), atol=1e-5)
