"""Issue 27, pattern 6: fixed signal-processing kernels (STFT, mel, constant-Q convs) are left
alone when the caller says they are not trained: ``LSUVOptions.fixed`` (ONNX tensor names),
which the one-call front ends fill from the framework's non-trainable tensors
(tests/test_frameworks_torch.py, tests/test_frameworks.py) and the CLI from ``--match PARAMS
--only-matched`` (a weight whose value is not among PARAMS).

The model is built by hand as torch's TorchScript exporter writes an STFT front end: a strided
Conv with a windowed DFT kernel [2 bins, 1, n], |.|^2, log(1 + .), then a trainable Conv with
a bias and a Gemm head (transB=1). Measured here: the fixed kernel bit for bit, the other
layers' output variances from this test's own ONNX Runtime session in float64.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper

from onnx_lsuv import lsuv_init
from onnx_lsuv.errors import InputError
from onnx_lsuv_cli.main import lsuv_command

from conftest import make_model, output_variances, rand

TOL = 0.1


def stft_kernel(n: int = 16, bins: int = 4) -> np.ndarray:
    t, f = np.arange(n), np.arange(1, bins + 1)
    phase = 2 * np.pi * np.outer(f, t) / n
    bank = np.concatenate([np.cos(phase), np.sin(phase)]) * np.hanning(n)
    return bank[:, None, :].astype(np.float32)


def spectral_model() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The export and its torch parameters (conv.weight, conv.bias, fc.weight, fc.bias; the
    STFT kernel is a buffer, so not among them)."""
    params = {"conv.weight": rand(12, 8, 3, seed=1) * 0.3,
              "conv.bias": rand(12, seed=2) * 0.5 + 0.2,
              "fc.weight": rand(5, 12, seed=3) * 0.3,
              "fc.bias": rand(5, seed=4) * 0.5 + 0.1}
    inits = {"stft": stft_kernel(), "one": np.ones((), np.float32), **params}
    nodes = [
        helper.make_node("Conv", ["x", "stft"], ["spec"], name="/Conv", strides=[4]),
        helper.make_node("Mul", ["spec", "spec"], ["power"], name="/Mul"),
        helper.make_node("Add", ["power", "one"], ["shifted"], name="/Add"),
        helper.make_node("Log", ["shifted"], ["logp"], name="/Log"),
        helper.make_node("Conv", ["logp", "conv.weight", "conv.bias"], ["h"],
                         name="/conv/Conv", pads=[1, 1], kernel_shape=[3]),
        helper.make_node("Relu", ["h"], ["r"], name="/Relu"),
        helper.make_node("ReduceMean", ["r"], ["pooled"], name="/ReduceMean", axes=[-1],
                         keepdims=0),
        helper.make_node("Gemm", ["pooled", "fc.weight", "fc.bias"], ["y"], name="/fc/Gemm",
                         transB=1),
    ]
    model = make_model(nodes, [("x", ["N", 1, 128])], [("y", ["N", 5])], inits)
    return model, params


def arrays(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}


def test_cli_only_matched_leaves_a_kernel_missing_from_params_alone(tmp_path):
    """--match PARAMS --only-matched: the STFT kernel, not among PARAMS, is left alone (exit 0,
    bit for bit, reported); the conv, whose kernel PARAMS holds in Keras' layout [k, in, out],
    is found by value and initialised. Without --only-matched the kernel is initialised as
    before (and, not being among PARAMS, reported unmapped: exit 1)."""
    model, params = spectral_model()
    path = tmp_path / "spectral.onnx"
    onnx.save(model, path)
    x = np.random.default_rng(5).standard_normal((32, 1, 128)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    npz = {**params, "conv.weight": params["conv.weight"].transpose(2, 1, 0)}
    np.savez(tmp_path / "params.npz", **npz)
    common = [str(path), "-d", str(tmp_path / "x.npy"), "--match", str(tmp_path / "params.npz"),
              "--provider", "cpu"]

    res = CliRunner().invoke(lsuv_command, common + [
        "-o", str(tmp_path / "a.onnx"), "--save-weights", str(tmp_path / "a.npz"),
        "--report", str(tmp_path / "a.json"), "--only-matched"])
    assert res.exit_code == 0, res.output
    out = onnx.load(tmp_path / "a.onnx")
    before, after = arrays(model), arrays(out)
    assert np.array_equal(after["stft"], before["stft"])
    assert not np.array_equal(after["conv.weight"], before["conv.weight"])
    assert not np.array_equal(after["fc.weight"], before["fc.weight"])
    assert [n.op_type for n in out.graph.node] == [n.op_type for n in model.graph.node]
    conv_var, fc_var = output_variances(out, {"x": x}, ["h", "y"])
    assert abs(conv_var - 1.0) < TOL and abs(fc_var - 1.0) < TOL
    with open(tmp_path / "a.json") as f:
        report = json.load(f)
    alone = [s for s in report["skipped"] if s["name"] == "/Conv"]
    assert len(alone) == 1 and alone[0]["by_rule"]
    assert alone[0]["reason"] == ("its weight 'stft' is not among the --match parameters "
                                  "(--only-matched): left alone")
    assert [r["name"] for r in report["layers"]] == ["/conv/Conv", "/fc/Gemm"]
    with np.load(tmp_path / "a.npz") as new:  # back in PARAMS' own names and layout
        assert sorted(new.files) == sorted(params)
        np.testing.assert_array_equal(new["conv.weight"].transpose(2, 1, 0),
                                      after["conv.weight"])

    res = CliRunner().invoke(lsuv_command, common + [
        "-o", str(tmp_path / "b.onnx"), "--save-weights", str(tmp_path / "b.npz")])
    assert res.exit_code == 1 and "NOT mapped: stft" in res.output, res.output
    assert not np.array_equal(arrays(onnx.load(tmp_path / "b.onnx"))["stft"], before["stft"])

    res = CliRunner().invoke(lsuv_command, [str(path), "-d", str(tmp_path / "x.npy"),
                                            "-o", str(tmp_path / "c.onnx"), "--only-matched"])
    assert res.exit_code == 2 and "--only-matched needs --match" in res.output


def test_fixed_option_leaves_the_layer_alone_and_include_takes_it():
    """lsuv_init(fixed=[...]): the layer reading a named weight is neither pre-initialised nor
    scaled, and is reported as left alone by rule; include= overrides it like the other
    rules; a reason given per name is the report's."""
    from onnx_lsuv.options import LISTED

    model, _ = spectral_model()
    x = np.random.default_rng(5).standard_normal((32, 1, 128)).astype(np.float32)
    result = lsuv_init(model, x, fixed=["stft"])
    assert result.report.converged and "stft" not in result.weights
    assert np.array_equal(arrays(result.model)["stft"], stft_kernel())
    (alone,) = [s for s in result.report.left_alone if s["name"] == "/Conv"]
    assert alone["reason"] == f"its weight 'stft' is {LISTED}: left alone"
    assert result.report.options["fixed"] == {"stft": LISTED}
    conv_var, fc_var = output_variances(result.model, {"x": x}, ["h", "y"])
    assert abs(conv_var - 1.0) < TOL and abs(fc_var - 1.0) < TOL

    why = {"stft": "a non-trainable torch tensor 'window'"}
    result = lsuv_init(model, x, fixed=why, max_iter=1, init="orthonormal")
    (alone,) = [s for s in result.report.left_alone if s["name"] == "/Conv"]
    assert alone["reason"] == "its weight 'stft' is a non-trainable torch tensor 'window': " \
        "left alone"
    result = lsuv_init(model, x, fixed=why, include=["/Conv"], init="orthonormal")
    assert "stft" in result.weights


@pytest.mark.parametrize("bad", [3, [""], {"w": ""}, [("a", "b", "c")], [None]])
def test_fixed_option_is_validated(bad):
    from onnx_lsuv.options import LSUVOptions

    with pytest.raises(InputError, match="fixed must be"):
        LSUVOptions(fixed=bad)


def test_fixed_weights_finds_folded_and_transposed_kernels_and_says_when_ambiguous():
    """The lookup before LSUV: a kernel found in another layout or with a BatchNorm folded in
    is the trainable tensor it came from (not fixed); one held both by a trainable and a
    non-trainable tensor is fixed, ambiguous, and said so."""
    from onnx_lsuv.match import fixed_weights

    model, params = spectral_model()
    gamma, var = np.linspace(0.5, 1.5, 12).astype(np.float32), \
        np.linspace(0.5, 2.0, 12).astype(np.float32)
    scale = gamma / np.sqrt(var + 1e-5)
    folded = {**params, "conv.weight": params["conv.weight"] / scale[:, None, None],
              "bn.weight": gamma, "bn.running_var": var,
              "window": stft_kernel().transpose(2, 1, 0)}
    assert fixed_weights(model, folded, {"window", "bn.running_var"}, "torch") == {
        "stft": "a non-trainable torch tensor 'window'"}
    both = {**folded, "learned": stft_kernel()}
    (why,) = fixed_weights(model, both, {"window", "bn.running_var"}, "torch").values()
    assert why.startswith("held both by the trainable torch tensor(s) 'learned' and the "
                          "non-trainable 'window'")
    assert fixed_weights(model, params, (), missing="not here") == {"stft": "not here"}
    assert fixed_weights(model, {**params, "window": stft_kernel()}, (), missing="x") == {}
    with pytest.raises(InputError, match="frozen names"):
        fixed_weights(model, params, {"nope"})


def test_fixed_weights_finds_recurrent_weights_gate_by_gate():
    """An LSTM whose W and R the exporter reordered from torch's gates (i f g o) into ONNX's
    (i o f c): found piece by piece in the trainable parameters (not fixed, even with
    --only-matched's rule); held by a non-trainable one, fixed."""
    from onnx_lsuv.match import fixed_weights

    h, d = 4, 3
    w_ih, w_hh = rand(4 * h, d, seed=6), rand(4 * h, h, seed=7)
    order = [0, 3, 1, 2]  # ONNX gate j is torch gate order[j]

    def onnx_gates(w):
        return np.concatenate([w[g * h:(g + 1) * h] for g in order])[None]

    inits = {"W": onnx_gates(w_ih), "R": onnx_gates(w_hh),
             "B": rand(1, 8 * h, seed=8)}
    node = helper.make_node("LSTM", ["x", "W", "R", "B"], ["y"], name="/rnn/LSTM",
                            hidden_size=h)
    model = make_model([node], [("x", [5, "N", d])], [("y", [5, 1, "N", h])], inits)
    params = {"rnn.weight_ih_l0": w_ih, "rnn.weight_hh_l0": w_hh}
    assert fixed_weights(model, params, (), missing="missing") == {}
    found = fixed_weights(model, params, {"rnn.weight_hh_l0"}, "torch")
    assert found == {"R": "a non-trainable torch tensor 'rnn.weight_hh_l0'"}
    x = np.random.default_rng(9).standard_normal((5, 16, d)).astype(np.float32)
    result = lsuv_init(model, x, fixed=found)
    assert not result.report.layers and "W" not in result.weights
    assert "'R' is a non-trainable torch tensor" in result.report.left_alone[0]["reason"]
