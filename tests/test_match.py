"""``match_parameters``: each exporter pattern built by hand with onnx.helper, exactly as the
exporter writes it (tests/exporters/PATTERNS.md), beside the parameters as the framework holds
them. The new ONNX values are drawn here; each test writes the exporter's own forward
transform (parameter -> ONNX tensor) and checks that it takes the returned parameters onto the
new ONNX values, so the test's expectation never comes from the module under test. The real
exporters are in tests/test_frameworks*.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from onnx_lsuv import InputError, lsuv_init
from onnx_lsuv.match import match_parameters

from conftest import make_model, output_values

RNG = np.random.default_rng(0)


def r(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def conv_model(w, b=None, group=1, op="Conv", x_shape=(2, 3, 6, 6)):
    inputs = ["x", "W"] + (["B"] if b is not None else [])
    inits = {"W": w, **({"B": b} if b is not None else {})}
    node = helper.make_node(op, inputs, ["y"], group=group, pads=[1, 1, 1, 1])
    return make_model([node], [("x", list(x_shape))], [("y", None)], inits)


def test_keras_conv_hwio_and_bias():
    kernel, bias = r(3, 3, 3, 8), r(8)  # Keras HWIO; tf2onnx stores OIHW
    model = conv_model(kernel.transpose(3, 2, 0, 1), bias)
    new_w, new_b = r(8, 3, 3, 3), np.zeros(8, np.float32)
    got = match_parameters(model, {"W": new_w, "B": new_b},
                           {"conv/kernel": kernel, "conv/bias": bias, "bn/gamma": r(8)})
    assert got.complete and got.changed == 2 and set(got.params) == {"conv/kernel", "conv/bias"}
    np.testing.assert_array_equal(got.params["conv/kernel"].transpose(3, 2, 0, 1), new_w)
    np.testing.assert_array_equal(got.params["conv/bias"], new_b)
    assert got.params["conv/kernel"].shape == kernel.shape


def test_keras_depthwise_hwc1():
    kernel = r(3, 3, 4, 1)  # Keras depthwise: H W C multiplier; ONNX [C, 1, H, W], group C
    model = conv_model(kernel.transpose(2, 3, 0, 1), group=4, x_shape=(2, 4, 6, 6))
    new = r(4, 1, 3, 3)
    got = match_parameters(model, {"W": new}, {"dw/depthwise_kernel": kernel})
    np.testing.assert_array_equal(got.params["dw/depthwise_kernel"].transpose(2, 3, 0, 1), new)


def test_flax_conv_transpose_flipped_and_transposed():
    kernel = r(3, 3, 4, 6)  # Flax ConvTranspose HWIO; stored folded: [I, O, H, W], flipped
    stored = np.flip(kernel.transpose(2, 3, 0, 1), (2, 3)).copy()
    model = conv_model(stored, op="ConvTranspose", x_shape=(2, 4, 5, 5))
    new = r(*stored.shape)
    got = match_parameters(model, {"W": new}, {"up.kernel": kernel})
    back = np.flip(got.params["up.kernel"].transpose(2, 3, 0, 1), (2, 3))
    np.testing.assert_array_equal(back, new)


def test_dense_pre_transposed_and_float16_store():
    w = r(5, 7)  # torch Linear [out, in]; the exporter writes MatMul's [in, out] in float16
    stored = w.T.astype(np.float16)
    node = helper.make_node("MatMul", ["x", "W"], ["y"])
    model = make_model([node], [("x", [2, 7], 10)], [("y", None, 10)], {"W": stored})
    new = r(7, 5).astype(np.float16)
    got = match_parameters(model, {"W": new}, {"fc.weight": w.astype(np.float16)})
    assert got.params["fc.weight"].dtype == np.float16
    np.testing.assert_array_equal(got.params["fc.weight"].T, new)


def _recurrent(op, w, rr, b, hidden):
    node = helper.make_node(op, ["x", "W", "R", "B"], ["y"], hidden_size=hidden)
    return make_model([node], [("x", [4, 2, w.shape[2]])], [("y", None)],
                      {"W": w, "R": rr, "B": b})


def test_keras_lstm_gate_order_and_missing_recurrent_bias():
    h, n_in = 5, 3
    kernel, rec, bias = r(n_in, 4 * h), r(h, 4 * h), r(4 * h)  # Keras: gates i f c o

    def to_onnx(k):  # [.., 4h] i f c o -> [1, 4h, ..] i o f c
        i, f, c, o = np.split(k, 4, axis=-1)
        return np.concatenate([i, o, f, c], axis=-1).T[None]

    b_onnx = np.concatenate([to_onnx(bias[None])[0, :, 0], np.zeros(4 * h, np.float32)])[None]
    model = _recurrent("LSTM", to_onnx(kernel), to_onnx(rec), b_onnx, h)
    new = {"W": r(1, 4 * h, n_in), "R": r(1, 4 * h, h), "B": np.zeros((1, 8 * h), np.float32)}
    new["B"][0, h:2 * h] = 1.0  # the output gate's input bias, say
    params = {"lstm/kernel": kernel, "lstm/recurrent_kernel": rec, "lstm/bias": bias}
    got = match_parameters(model, new, params)
    assert got.complete, got.summary()
    np.testing.assert_array_equal(to_onnx(got.params["lstm/kernel"]), new["W"])
    np.testing.assert_array_equal(to_onnx(got.params["lstm/recurrent_kernel"]), new["R"])
    np.testing.assert_array_equal(to_onnx(got.params["lstm/bias"][None])[0, :, 0],
                                  new["B"][0, :4 * h])


def test_torch_gru_gate_order_and_two_biases():
    h, n_in = 4, 3
    w_ih, w_hh, b_ih, b_hh = r(3 * h, n_in), r(3 * h, h), r(3 * h), r(3 * h)  # r z n

    def to_onnx(k):  # r z n -> z r h
        rr, z, n = np.split(k, 3, axis=0)
        return np.concatenate([z, rr, n], axis=0)

    model = _recurrent("GRU", to_onnx(w_ih)[None], to_onnx(w_hh)[None],
                       np.concatenate([to_onnx(b_ih), to_onnx(b_hh)])[None], h)
    new = {"W": r(1, 3 * h, n_in), "B": np.zeros((1, 6 * h), np.float32)}
    params = {"gru.weight_ih_l0": w_ih, "gru.weight_hh_l0": w_hh, "gru.bias_ih_l0": b_ih,
              "gru.bias_hh_l0": b_hh}
    got = match_parameters(model, new, params)
    assert got.complete, got.summary()
    np.testing.assert_array_equal(to_onnx(got.params["gru.weight_ih_l0"])[None], new["W"])
    assert not np.any(got.params["gru.bias_ih_l0"]) and not np.any(got.params["gru.bias_hh_l0"])


def test_fused_qkv_split_into_three_matmuls():
    e = 6
    in_proj = r(3 * e, e)  # torch MultiheadAttention's in_proj_weight, q k v stacked
    q, k, v = np.split(in_proj, 3)
    nodes = [helper.make_node("MatMul", ["x", n], [n + "_y"]) for n in ("Wq", "Wk", "Wv")]
    model = make_model(nodes, [("x", [2, e])], [(n + "_y", None) for n in ("Wq", "Wk", "Wv")],
                       {"Wq": q.T.copy(), "Wk": k.T.copy(), "Wv": v.T.copy()})
    new = {"Wq": r(e, e), "Wk": r(e, e), "Wv": r(e, e)}
    got = match_parameters(model, new, {"attn.in_proj_weight": in_proj, "attn.out": r(e, e)})
    assert got.complete and list(got.params) == ["attn.in_proj_weight"]
    np.testing.assert_array_equal(got.params["attn.in_proj_weight"],
                                  np.concatenate([new["Wq"].T, new["Wk"].T, new["Wv"].T]))


@pytest.mark.parametrize("conv_bias", [False, True])
def test_folded_batchnorm_is_unscaled_and_its_bias_carried(conv_bias):
    """k' = k s, b' = (b - mean) s + beta with s = gamma / sqrt(var + eps), as torch's and
    tf2onnx's folds write them; the framework's conv + BN must then compute the new k', b'."""
    c, eps = 6, 1e-5
    kernel, b = r(c, 3, 3, 3), r(c) if conv_bias else np.zeros(c, np.float32)
    gamma, beta = RNG.uniform(0.5, 1.5, c).astype(np.float32), r(c)
    mean, var = r(c), RNG.uniform(0.5, 2.0, c).astype(np.float32)
    s = (gamma / np.sqrt(var + eps)).astype(np.float32)
    model = conv_model(kernel * s[:, None, None, None], ((b - mean) * s + beta).astype(np.float32))
    params = {"conv.weight": kernel, "bn.weight": gamma, "bn.bias": beta, "bn.running_mean": mean,
              "bn.running_var": var, "other.bias": r(c), "other.weight": r(c)}
    if conv_bias:
        params["conv.bias"] = b
    new_w, new_b = r(c, 3, 3, 3), np.zeros(c, np.float32)
    got = match_parameters(model, {"W": new_w, "B": new_b}, params)
    assert got.complete, got.summary()
    assert set(got.params) == {"conv.weight", "conv.bias" if conv_bias else "bn.bias"}
    np.testing.assert_allclose(got.params["conv.weight"] * s[:, None, None, None], new_w,
                               rtol=1e-5, atol=1e-6)
    b2 = got.params.get("conv.bias", b)
    beta2 = got.params.get("bn.bias", beta)
    np.testing.assert_allclose((b2 - mean) * s + beta2, new_b, atol=1e-5)
    if not conv_bias:  # into the shift: the BatchNorm was found by value
        assert got.carried[0]["batchnorm"] == {
            "gamma": "bn.weight", "var": "bn.running_var", "mean": "bn.running_mean",
            "beta": "bn.bias"}


def test_tied_parameter_gets_the_value_under_both_names():
    w = r(8, 4)
    node = helper.make_node("Gemm", ["x", "W"], ["y"], transB=1)
    model = make_model([node], [("x", [2, 4])], [("y", None)], {"W": w})
    new = r(8, 4)
    got = match_parameters(model, {"W": new}, {"embed.weight": w, "lm_head.weight": w.copy()})
    assert got.complete and set(got.params) == {"embed.weight", "lm_head.weight"}
    assert all(np.array_equal(v, new) for v in got.params.values())


def test_unmatched_and_ambiguous_are_reported_never_guessed():
    w, b = r(8, 4), np.full(8, 0.25, np.float32)
    node = helper.make_node("Gemm", ["x", "W", "B"], ["y"], transB=1)
    model = make_model([node], [("x", [2, 4])], [("y", None)], {"W": w, "B": b})
    new = {"W": r(8, 4), "B": r(8)}
    params = {"a.bias": b.copy(), "c.bias": b.copy(), "d.weight": r(8, 4)}
    got = match_parameters(model, new, params)
    assert not got.complete and got.fraction == 0 and not got.params
    reasons = {u["onnx"]: u["reason"] for u in got.unmapped}
    assert "not among the parameters" in reasons["W"]
    assert "ambiguous" in reasons["B"] and "a.bias" in reasons["B"] and "c.bias" in reasons["B"]
    assert "NOT mapped" in got.summary()


def test_equal_candidates_resolved_by_name():
    b = np.full(8, 0.25, np.float32)
    node = helper.make_node("Gemm", ["x", "W", "fc2.bias"], ["y"], transB=1)
    model = make_model([node], [("x", [2, 4])], [("y", None)], {"W": r(8, 4), "fc2.bias": b})
    got = match_parameters(model, {"fc2.bias": np.zeros(8, np.float32)},
                           {"fc1.bias": b.copy(), "fc2.bias": b.copy()})
    assert got.complete and list(got.params) == ["fc2.bias"]


def test_two_tensors_writing_one_parameter_differently_is_a_clash():
    w = r(4, 4)
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["y1"]),
             helper.make_node("MatMul", ["x", "W2"], ["y2"])]
    model = make_model(nodes, [("x", [2, 4])], [("y1", None), ("y2", None)],
                       {"W1": w, "W2": w.copy()})
    got = match_parameters(model, {"W1": r(4, 4), "W2": r(4, 4)}, {"shared": w})
    assert [u["onnx"] for u in got.unmapped] == ["W2"]
    assert "different new values" in got.unmapped[0]["reason"]


def test_end_to_end_with_lsuv_and_a_bias_given_its_own_copy():
    """Three equal framework biases the exporter stored once, read by two Gemms and an Add:
    lsuv_init gives each Gemm its own zeroed copy under a new name. Each copy goes to the
    bias of the layer whose weight it sits beside (resolved by the graph); the third, which
    the Add still reads unchanged, is left alone."""
    w1, w2, b = r(4, 4), r(4, 4), r(4)
    nodes = [helper.make_node("Gemm", ["x", "W1", "B"], ["h"], transB=1),
             helper.make_node("Gemm", ["h", "W2", "B"], ["y"], transB=1),
             helper.make_node("Add", ["y", "B"], ["z"])]
    model = make_model(nodes, [("x", [64, 4])], [("z", None)], {"W1": w1, "W2": w2, "B": b})
    result = lsuv_init(model, r(64, 4), seed=1)
    assert "B" not in result.weights and len(result.weights) == 4
    params = {"l1.weight": w1, "l2.weight": w2, "l1.bias": b.copy(), "l2.bias": b + 0,
              "shift.bias": b + 0}
    got = match_parameters(model, result.weights, params)
    assert got.complete and set(got.params) == {"l1.weight", "l2.weight", "l1.bias", "l2.bias"}
    assert not np.any(got.params["l1.bias"]) and not np.any(got.params["l2.bias"])


def test_equal_tensors_with_one_left_unchanged_are_not_tied():
    """Two framework weights with equal values, exported as two tensors of which only one
    changed: writing both would silently change the other layer, so it is reported."""
    w = r(4, 4)
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["y1"]),
             helper.make_node("MatMul", ["x", "W2"], ["y2"])]
    model = make_model(nodes, [("x", [2, 4])], [("y1", None), ("y2", None)],
                       {"W1": w, "W2": w.copy()})
    got = match_parameters(model, {"W1": r(4, 4)}, {"p.weight": w, "q.weight": w.copy()})
    assert not got.params and "ambiguous" in got.unmapped[0]["reason"]


def test_bad_params():
    model = conv_model(r(8, 3, 3, 3))
    with pytest.raises(InputError, match="mapping"):
        match_parameters(model, {}, [1, 2])
    with pytest.raises(InputError, match="not found"):
        match_parameters(model, {}, "/nonexistent/params.npz")
    with pytest.raises(InputError, match="shape"):
        match_parameters(model, {"W": r(2, 2)}, {"w": r(8, 3, 3, 3)})


def test_constant_piece_goes_only_where_the_graph_puts_it():
    """A zero LSTM B whose forget piece changed: zero parameters of that size elsewhere (a
    Dense bias) must not take it; four equal zero gate chunks cannot be told apart either,
    so it is reported, and nothing is written for it."""
    h, n_in = 4, 3
    w = r(1, 4 * h, n_in)
    model = _recurrent("LSTM", w, r(1, 4 * h, h), np.zeros((1, 8 * h), np.float32), h)
    new_b = np.zeros((1, 8 * h), np.float32)
    new_b[0, 2 * h:3 * h] = 1.0
    params = {"lstm/kernel": w[0].T.copy(), "lstm/bias": np.zeros(4 * h, np.float32),
              "dense/bias": np.zeros(h, np.float32)}
    got = match_parameters(model, {"W": r(1, 4 * h, n_in), "B": new_b}, params)
    assert "dense/bias" not in got.params and "lstm/bias" not in got.params
    assert [u["onnx"] for u in got.unmapped] == ["B"] and "ambiguous" in got.unmapped[0]["reason"]


def test_changed_given_as_the_initialised_model_keeps_the_bias_copies():
    """Two equal framework biases stored once (one read by the layer, one by an Add): as
    result.weights or as the initialised model, the layer's copy reaches its own bias."""
    w, b = r(4, 4), r(4)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]),
             helper.make_node("Add", ["h", "B"], ["y"]), helper.make_node("Add", ["y", "B"], ["z"])]
    model = make_model(nodes, [("x", [64, 4])], [("z", None)], {"W": w, "B": b})
    result = lsuv_init(model, r(64, 4), seed=1)
    params = {"fc.weight": w.T.copy(), "fc.bias": b.copy(), "shift.bias": b.copy()}
    by_dict = match_parameters(model, result.weights, params)
    by_model = match_parameters(model, result.model, params)
    assert by_model.complete and by_model.changed == by_dict.changed == 2
    assert set(by_model.params) == {"fc.weight", "fc.bias"}
    assert not np.any(by_model.params["fc.bias"])


def test_a_tied_weight_read_unchanged_elsewhere_is_refused():
    """An output head tied to an embedding: the exporter writes the Gather's table and a
    transposed copy for the MatMul, and only the copy changes. The framework has one
    parameter for both, so writing it would change the embedding too: reported."""
    emb = r(10, 4)
    nodes = [helper.make_node("Gather", ["E", "ids"], ["h"]),
             helper.make_node("MatMul", ["h", "ET"], ["y"])]
    model = make_model(nodes, [("ids", [8], 7)], [("y", None)], {"E": emb, "ET": emb.T.copy()})
    got = match_parameters(model, {"ET": r(4, 10)}, {"emb.weight": emb})
    assert not got.params and "tied" in got.unmapped[0]["reason"]


def test_equal_tensors_both_changed_are_not_tied():
    """Two equal layers exported as two tensors (no deduplication): each is its own tensor,
    so neither may go to both parameters; names or the graph must tell, else ambiguous."""
    w = r(4, 4)
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["y1"]),
             helper.make_node("MatMul", ["x", "W2"], ["y2"])]
    model = make_model(nodes, [("x", [2, 4])], [("y1", None), ("y2", None)],
                       {"W1": w, "W2": w.copy()})
    new = {"W1": r(4, 4), "W2": r(4, 4)}
    got = match_parameters(model, new, {"blocks.0.weight": w, "blocks.1.weight": w.copy()})
    assert not got.params and {u["onnx"] for u in got.unmapped} == {"W1", "W2"}


def test_a_tensor_that_clashes_writes_nothing():
    """B = concat(Q, P) where P already took A's new value: B is reported and Q untouched."""
    q, p = r(8), r(8)
    nodes = [helper.make_node("Add", ["x", "A"], ["y"]),
             helper.make_node("Add", ["x2", "B"], ["z"])]
    model = make_model(nodes, [("x", [8]), ("x2", [16])], [("y", None), ("z", None)],
                       {"A": p, "B": np.concatenate([q, p])})
    got = match_parameters(model, {"A": r(8), "B": r(16)}, {"Q": q, "P": p})
    assert [u["onnx"] for u in got.unmapped] == ["B"] and list(got.params) == ["P"]


def test_folded_float16_kernel():
    c = 4
    kernel = r(c, 3, 3, 3).astype(np.float16)
    gamma = RNG.uniform(0.5, 1.5, c).astype(np.float16)
    var = RNG.uniform(0.5, 2.0, c).astype(np.float16)
    beta, mean = r(c).astype(np.float16), r(c).astype(np.float16)
    s = gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + 1e-5)
    model = conv_model((kernel * s[:, None, None, None]).astype(np.float16),
                       (beta - mean * s).astype(np.float16), x_shape=(2, 3, 6, 6))
    model.graph.input[0].type.tensor_type.elem_type = 10
    params = {"conv.weight": kernel, "bn.weight": gamma, "bn.bias": beta,
              "bn.running_mean": mean, "bn.running_var": var}
    new_w = r(c, 3, 3, 3).astype(np.float16)
    got = match_parameters(model, {"W": new_w, "B": np.zeros(c, np.float16)}, params)
    assert got.complete, got.summary()
    assert got.params["conv.weight"].dtype == np.float16
    np.testing.assert_allclose(got.params["conv.weight"] * s[:, None, None, None], new_w,
                               rtol=5e-3, atol=5e-3)


def test_a_scale_no_batchnorm_explains_is_not_a_fold():
    """Weight norm (k = g v / |v| per unit) looks like a per-unit scale of v, but no
    gamma / sqrt(var + eps) among the parameters gives it: reported, never unscaled."""
    v = r(6, 3, 3, 3)
    g = RNG.uniform(0.5, 2.0, 6).astype(np.float32)
    norm = np.sqrt((v.astype(np.float64) ** 2).sum(axis=(1, 2, 3)))
    model = conv_model((v * (g / norm)[:, None, None, None]).astype(np.float32))
    got = match_parameters(model, {"W": r(6, 3, 3, 3)},
                           {"conv.weight_v": v, "conv.weight_g": g.reshape(6, 1, 1, 1)})
    assert not got.params and [u["onnx"] for u in got.unmapped] == ["W"]


def test_duplicate_framework_names_are_refused():
    from onnx_lsuv.frameworks import unique_names

    unique_names(["a/w", "b/w"], "m")
    with pytest.raises(InputError, match="several parameters are named l/w"):
        unique_names(["l/w", "l/b", "l/w"], "the Keras model")


@pytest.mark.parametrize("content", ["text", "npy", "empty", "corrupt"])
def test_cli_match_file_that_is_not_an_npz_is_bad_input(tmp_path, content):
    import os
    import subprocess
    import sys

    import onnx

    path = tmp_path / "p.npz"
    if content == "text":
        path.write_text("not arrays")
    elif content == "npy":
        with open(path, "wb") as f:
            np.save(f, r(3))
    elif content == "empty":
        np.savez(path)
    else:
        path.write_bytes(b"PK\x03\x04" + b"\0" * 40)
    onnx.save(conv_model(r(8, 3, 3, 3)), str(tmp_path / "m.onnx"))
    np.save(tmp_path / "x.npy", r(4, 3, 6, 6))
    run = subprocess.run([sys.executable, "-m", "onnx_lsuv", str(tmp_path / "m.onnx"), "-d",
                          str(tmp_path / "x.npy"), "-o", str(tmp_path / "o.onnx"), "--match",
                          str(path), "--save-weights", str(tmp_path / "w.npz")],
                         capture_output=True, text=True)
    assert run.returncode == 2, run.stderr
    assert "parameters file" in run.stderr
    assert not os.path.exists(tmp_path / "o.onnx") and not os.path.exists(tmp_path / "w.npz")


def _tied_head_model(emb):
    nodes = [helper.make_node("Gather", ["E", "ids"], ["h"]),
             helper.make_node("MatMul", ["h", "ET"], ["y"])]
    return make_model(nodes, [("ids", [8], 7)], [("y", None)], {"E": emb, "ET": emb.T.copy()})


def test_tied_head_listed_under_both_names_or_with_repeated_values_is_not_written():
    """torch's state_dict lists a tied weight under each name, and a big table repeats a few
    values: neither may turn the copy's new value into a write of the embedding."""
    emb = r(30, 8)
    emb[3, 4] = emb[7, 1]  # a repeated value
    model = _tied_head_model(emb)
    for params in ({"emb.weight": emb}, {"emb.weight": emb, "lm_head.weight": emb.copy()}):
        got = match_parameters(model, {"ET": r(8, 30)}, params)
        assert not got.params and got.unmapped, params.keys()


def test_equal_parameters_with_a_folded_twin_are_not_aliases():
    """a.weight == b.weight; a's conv changes, b's (a BatchNorm folded in) does not: writing
    both would change b's layer, so the change is reported."""
    w = r(4, 3, 3, 3)
    s = RNG.uniform(0.5, 1.5, 4).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "W1"], ["y1"], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["x", "W2"], ["y2"], pads=[1, 1, 1, 1])]
    model = make_model(nodes, [("x", [2, 3, 6, 6])], [("y1", None), ("y2", None)],
                       {"W1": w, "W2": w * s[:, None, None, None]})
    got = match_parameters(model, {"W1": r(4, 3, 3, 3)}, {"a.weight": w, "b.weight": w.copy()})
    assert not got.params and [u["onnx"] for u in got.unmapped] == ["W1"]


def test_placements_of_one_tensor_that_disagree_write_nothing():
    p = r(8)
    node = helper.make_node("Add", ["x", "B"], ["y"])
    model = make_model([node], [("x", [16])], [("y", None)], {"B": np.concatenate([p, p])})
    got = match_parameters(model, {"B": r(16)}, {"P": p})
    assert not got.params and [u["onnx"] for u in got.unmapped] == ["B"]


# --- issue 26: one stored tensor for several parameters, ambiguity on every path, aliases ---


def _dense_stack(w1, w2, w3, b_shared, b3=None, matmul=True):
    """Input -> Dense(16, relu) -> Dense(16, relu) -> head, as tf2onnx writes it when both
    biases are equal: MatMul + Add, the one bias initializer read by both Adds."""
    inits = {"k1": w1, "k2": w2, "k3": w3, "b": b_shared, **({"b3": b3} if b3 is not None else {})}
    nodes = [helper.make_node("MatMul", ["x", "k1"], ["m1"]),
             helper.make_node("Add", ["m1", "b"], ["a1"]), helper.make_node("Relu", ["a1"], ["h1"]),
             helper.make_node("MatMul", ["h1", "k2"], ["m2"]),
             helper.make_node("Add", ["m2", "b"], ["a2"]), helper.make_node("Relu", ["a2"], ["h2"]),
             helper.make_node("MatMul", ["h2", "k3"], ["m3" if b3 is not None else "y"])]
    if b3 is not None:
        nodes.append(helper.make_node("Add", ["m3", "b3"], ["y"]))
    return make_model(nodes, [("x", [64, w1.shape[0]])], [("y", None)], inits)


def _numpy_forward(p, x, names):
    h = x.astype(np.float64)
    for i, (k, b) in enumerate(names):
        h = h @ p[k].astype(np.float64) + (p[b].astype(np.float64) if b else 0)
        if i < len(names) - 1:
            h = np.maximum(h, 0)
    return h


def test_a_constant_bias_stored_once_goes_to_every_layer_that_reads_it():
    """Keras: two Dense layers with bias_initializer=Constant(0.1): tf2onnx stores the bias
    once; LSUV zeroes it for both readers. Both biases get the new value (one was left at
    0.1 before), and the framework's forward equals ONNX Runtime's on the initialised model."""
    w1, w2, w3 = r(20, 16), r(16, 16), r(16, 4)
    b = np.full(16, 0.1, np.float32)
    model = _dense_stack(w1, w2, w3, b)
    x = r(64, 20)
    result = lsuv_init(model, x, seed=1)
    params = {"d1/kernel": w1, "d1/bias": b.copy(), "d2/kernel": w2, "d2/bias": b.copy(),
              "d3/kernel": w3, "d3/bias": np.zeros(4, np.float32)}
    got = match_parameters(model, result.weights, params)
    assert got.complete, got.summary()
    assert {"d1/bias", "d2/bias"} <= set(got.params) and "d3/bias" not in got.params
    ours = _numpy_forward({**params, **got.params}, x, [("d1/kernel", "d1/bias"),
                                                        ("d2/kernel", "d2/bias"),
                                                        ("d3/kernel", "d3/bias")])
    theirs = output_values(result.model, {"x": x}, ["y"])[0]
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max())


def test_a_weight_stored_once_for_copied_layers_goes_to_all():
    """A block and its copy.deepcopy: torch's exporters store the equal Linear weights and
    biases once, read by both Gemms; a head of the same shape has other values. Both copies
    get the new values (before, the name picked one and the twin kept its old weights)."""
    w, b, wh, bh = r(16, 16), r(16), r(16, 16), r(16)
    nodes = [helper.make_node("Gemm", ["x", "a.0.weight", "a.0.bias"], ["h1"], transB=1),
             helper.make_node("Relu", ["h1"], ["r1"]),
             helper.make_node("Gemm", ["r1", "a.0.weight", "a.0.bias"], ["h2"], transB=1),
             helper.make_node("Relu", ["h2"], ["r2"]),
             helper.make_node("Gemm", ["r2", "head.weight", "head.bias"], ["y"], transB=1)]
    model = make_model(nodes, [("x", [64, 16])], [("y", None)],
                       {"a.0.weight": w, "a.0.bias": b, "head.weight": wh, "head.bias": bh})
    new = {"a.0.weight": r(16, 16), "a.0.bias": np.zeros(16, np.float32)}
    params = {"a.0.weight": w, "a.0.bias": b, "b.0.weight": w.copy(), "b.0.bias": b.copy(),
              "head.weight": wh, "head.bias": bh}
    got = match_parameters(model, new, params)
    assert got.complete, got.summary()
    assert set(got.params) == {"a.0.weight", "a.0.bias", "b.0.weight", "b.0.bias"}
    for p in ("a.0", "b.0"):
        np.testing.assert_array_equal(got.params[p + ".weight"], new["a.0.weight"])
        np.testing.assert_array_equal(got.params[p + ".bias"], new["a.0.bias"])


def test_more_equal_parameters_than_stored_tensors_is_ambiguous():
    """Three equal parameters, stored as two tensors (one transposed for a MatMul): which
    tensor stands for two of them cannot be told, so neither is written."""
    w = r(8, 8)
    nodes = [helper.make_node("Gemm", ["x", "W"], ["y1"], transB=1),
             helper.make_node("MatMul", ["x", "WT"], ["y2"])]
    model = make_model(nodes, [("x", [4, 8])], [("y1", None), ("y2", None)],
                       {"W": w, "WT": w.T.copy()})
    params = {"a.weight": w, "b.weight": w.copy(), "c.weight": w.copy()}
    got = match_parameters(model, {"W": r(8, 8), "WT": r(8, 8)}, params)
    assert not got.params and {u["onnx"] for u in got.unmapped} == {"W", "WT"}
    assert all("ambiguous" in u["reason"] for u in got.unmapped)


@pytest.mark.parametrize("folded", [False, True])
def test_a_symmetric_weight_stays_ambiguous_beside_a_fresh_batchnorm(folded):
    """nn.Linear with a symmetric weight, stored transposed for a MatMul: the layouts as is
    and transposed both fit and put the new values in different places. A BatchNorm among
    the parameters (fresh: gamma 1, var 1, so it "explains" a factor of 1; or trained and
    folded into the kernel) explains every layout alike, so it resolves nothing."""
    a = r(8, 8)
    w = (a + a.T) / 2  # torch [out, in], symmetric
    gamma = np.ones(8, np.float32) if not folded else RNG.uniform(0.5, 1.5, 8).astype(np.float32)
    var = np.ones(8, np.float32) if not folded else RNG.uniform(0.5, 2, 8).astype(np.float32)
    s = gamma / np.sqrt(var + 1e-5)
    stored = (w.T * s[None, :]).astype(np.float32) if folded else w.T.copy()  # [in, out]
    node = helper.make_node("MatMul", ["x", "W"], ["y"])
    model = make_model([node], [("x", [4, 8])], [("y", None)], {"W": stored})
    params = {"fc.weight": w, "bn.weight": gamma, "bn.bias": np.zeros(8, np.float32),
              "bn.running_mean": np.zeros(8, np.float32), "bn.running_var": var}
    got = match_parameters(model, {"W": r(8, 8)}, params)
    assert not got.params and [u["onnx"] for u in got.unmapped] == ["W"]
    assert "ambiguous" in got.unmapped[0]["reason"]


def test_one_gru_weight_under_two_names_goes_to_both():
    """Paddle's state_dict lists each recurrent weight twice (rnn.weight_ih_l0 and
    rnn.0.cell.weight_ih); with input size == hidden size W and R have one size. Each name
    gets the new value (both are one tensor), where it was "ambiguous" before."""
    h = 4
    w_ih, w_hh, b_ih, b_hh = r(3 * h, h), r(3 * h, h), r(3 * h), r(3 * h)  # r z n

    def to_onnx(k):  # r z n -> z r n
        rr, z, n = np.split(k, 3, axis=0)
        return np.concatenate([z, rr, n], axis=0)

    model = _recurrent("GRU", to_onnx(w_ih)[None], to_onnx(w_hh)[None],
                       np.concatenate([to_onnx(b_ih), to_onnx(b_hh)])[None], h)
    new = {"W": r(1, 3 * h, h), "R": r(1, 3 * h, h)}
    params = {}
    for names, v in (("weight_ih", w_ih), ("weight_hh", w_hh), ("bias_ih", b_ih),
                     ("bias_hh", b_hh)):
        params[f"rnn.{names}_l0"] = v
        params[f"rnn.0.cell.{names}"] = v.copy()
    got = match_parameters(model, new, params)
    assert got.complete, got.summary()
    for name in ("rnn.weight_ih_l0", "rnn.0.cell.weight_ih"):
        np.testing.assert_array_equal(to_onnx(got.params[name])[None], new["W"])
    for name in ("rnn.weight_hh_l0", "rnn.0.cell.weight_hh"):
        np.testing.assert_array_equal(to_onnx(got.params[name])[None], new["R"])
