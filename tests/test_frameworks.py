"""Back into Keras, Flax and PaddlePaddle: the one call of each front end
(``onnx_lsuv.frameworks.keras`` / ``.flax`` / ``.paddle``) on a small model built in the
framework, with non-zero biases and BatchNorm statistics away from the defaults, and the
CLI's ``--match`` on the Keras model.

Each framework runs in its own interpreter (tests/frameworks/check_*.py, with onnx_lsuv from
this checkout on PYTHONPATH), found as tests/test_real_exporters.py finds them; without one,
its tests are skipped. The facts asserted are measured there, in the framework's own forward:
every initialised layer's output within tol of unit variance (float64), the framework's
output equal to ONNX Runtime's on the initialised ONNX model, and every tensor that changed
between the export and the initialised model (counted by the check itself) mapped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from conftest import ROOT, framework_python

HERE = os.path.join(ROOT, "tests", "frameworks")
TOL = 0.1
CLI = [sys.executable, "-m", "onnx_lsuv"]
NEEDS = {"keras": ("keras", "tensorflow", "tf2onnx"), "flax": ("flax", "jax", "jax2onnx"),
         "paddle": ("paddle", "paddle2onnx")}

pytestmark = pytest.mark.exporters


def run_check(framework: str, *args: str) -> None:
    python = framework_python(framework, NEEDS[framework])
    if python is None:
        pytest.skip(f"{framework} is not installed here (set ONNX_LSUV_{framework.upper()}"
                    "_PYTHON, see .ci/exporter-venvs)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, HERE]),
               POLYGRAPHY_AUTOINSTALL_DEPS="0", TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
    script = os.path.join(HERE, f"check_{framework}.py")
    proc = subprocess.run([python, script, *args], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def assert_back_in_framework(facts: dict, layers: set[str]) -> None:
    assert facts["converged"]
    assert set(facts["variances"]) == layers
    off = {k: v for k, v in facts["variances"].items() if abs(v - 1.0) >= TOL}
    assert not off, f"off unit variance in the framework's own forward: {off}"
    match = facts["match"]
    assert facts["changed"] and match["changed"] == len(facts["changed"])
    assert match["complete"] and not match["unmapped"]
    assert sorted(m["onnx"] for m in match["mapped"]) == facts["changed"]
    assert facts["out_diff"] <= 1e-4 * max(1.0, facts["out_scale"])
    assert facts["moved"] == facts["written"]


KERAS_LAYERS = {"conv", "depthwise", "conv_nobias", "dense3d", "head",
                "lstm[i]", "lstm[f]", "lstm[c]", "lstm[o]"}


@pytest.mark.parametrize("exporter", ["tf2onnx", "keras"])
def test_keras(tmp_path, exporter):
    out = str(tmp_path / "facts.json")
    run_check("keras", "one", out, exporter)
    with open(out) as f:
        facts = json.load(f)
    assert_back_in_framework(facts, KERAS_LAYERS)
    # tf2onnx folds bn2 into the bias-less conv: its shift carried the folded bias
    assert [c["into"] for c in facts["match"]["carried"]] == ["bn2/beta"]


@pytest.mark.parametrize("exporter", ["tf2onnx", "keras"])
def test_keras_equal_biases_stored_once_reach_both_layers(tmp_path, exporter):
    """Two Dense layers with bias_initializer=Constant(0.1): one initializer read by both.
    Before: one bias was zeroed, the other kept 0.1 (d2's variance 1.16, Keras off ONNX
    Runtime by 7e-2) with complete == True."""
    out = str(tmp_path / "facts.json")
    run_check("keras", "shared", out, exporter)
    with open(out) as f:
        facts = json.load(f)
    assert_back_in_framework(facts, {"d1", "d2", "d3"})
    assert {"d1/bias", "d2/bias"} <= set(facts["written"])


def test_keras_cli_match(tmp_path):
    """Keras' parameters as an npz, the CLI with --match, the npz loaded back into Keras."""
    d = str(tmp_path)
    run_check("keras", "export", d)
    cmd = [*CLI, os.path.join(d, "model.onnx"), "--data", os.path.join(d, "x.npy"),
           "-o", os.path.join(d, "init.onnx"), "--match", os.path.join(d, "params.npz"),
           "--save-weights", os.path.join(d, "new.npz")]
    run = subprocess.run(cmd, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    with np.load(os.path.join(d, "params.npz")) as old, np.load(os.path.join(d, "new.npz")) as new:
        assert new.files and set(new.files) <= set(old.files)
        assert all(new[k].shape == old[k].shape and new[k].dtype == old[k].dtype
                   for k in new.files)
    run_check("keras", "measure", d)
    with open(os.path.join(d, "measure.json")) as f:
        measured = json.load(f)
    assert set(measured["variances"]) == KERAS_LAYERS
    off = {k: v for k, v in measured["variances"].items() if abs(v - 1.0) >= TOL}
    assert not off
    session = ort.InferenceSession(onnx.load(os.path.join(d, "init.onnx")).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    ours = session.run(None, {session.get_inputs()[0].name: np.load(os.path.join(d, "x.npy"))})
    np.testing.assert_allclose(np.asarray(measured["out"]), ours[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("api", ["nnx", "linen"])
def test_flax(tmp_path, api):
    out = str(tmp_path / "facts.json")
    run_check("flax", api, out)
    with open(out) as f:
        facts = json.load(f)
    # nnx's net ends in an nnx.Einsum ('bd,dh->bh'): a layer, its kernel mapped back as is
    assert_back_in_framework(facts, {"conv", "up", "fc"} | ({"ein"} if api == "nnx" else set()))


def test_paddle(tmp_path):
    out = str(tmp_path / "facts.json")
    run_check("paddle", out)
    with open(out) as f:
        facts = json.load(f)
    assert_back_in_framework(facts, {"conv", "conv2", "fc"})
    # paddle2onnx's names are not state_dict keys: every parameter was found by value
    assert all(m["onnx"] not in m["params"] for m in facts["match"]["mapped"])


@pytest.mark.parametrize("kind", ["GRU", "LSTM"])
def test_paddle_stacked_rnn_whose_weights_state_dict_lists_twice(tmp_path, kind):
    """Paddle's state_dict lists each recurrent weight as rnn.weight_ih_l0 and
    rnn.0.cell.weight_ih; with input size == hidden size, lsuv_layer raised MatchError
    "ambiguous" and wrote nothing. Now every tensor reaches the layer, under both names."""
    out = str(tmp_path / "facts.json")
    run_check("paddle", "rnn", kind, out)
    with open(out) as f:
        facts = json.load(f)
    match = facts["match"]
    assert match["complete"] and match["changed"] == len(facts["changed"]), match["unmapped"]
    assert facts["out_diff"] <= 1e-4 * max(1.0, facts["out_scale"])
    assert facts["moved"] and set(facts["moved"]) == set(facts["written"])
    for layer in (0, 1):  # each name of a written recurrent weight is reported written
        if f"rnn.weight_ih_l{layer}" in facts["written"]:
            assert f"rnn.{layer}.cell.weight_ih" in facts["written"]
    assert {k: v for k, v in facts["variances"].items() if abs(v - 1.0) >= TOL} == {}


# --- issue 27, pattern 6: a fixed signal kernel held in a non-trainable tensor ---


def assert_fixed_left_alone(facts: dict, layers: set[str], framework: str, fixed: str) -> None:
    """The trainable layers initialised and measured in the framework (as above); the fixed
    kernel bit for bit in the framework and in every ONNX constant that holds its values,
    written nowhere, and reported as left alone by rule naming the framework's tensor."""
    assert_back_in_framework(facts, layers)
    assert len(facts["layers"]) == len(layers) and facts["not_initialised"] == 0
    kernel = facts["fixed"][fixed]
    assert kernel["framework_same"] and kernel["onnx"] and kernel["onnx_same"], kernel
    assert fixed not in facts["written"] and not set(kernel["onnx"]) & set(facts["changed"])
    assert len(facts["left_alone"]) == 1
    assert f"is a non-trainable {framework} tensor {fixed!r}: left alone" in \
        facts["left_alone"][0]


@pytest.mark.parametrize("exporter", ["tf2onnx", "keras"])
def test_keras_fixed_kernel_is_left_alone(tmp_path, exporter):
    """A Conv1D STFT with layer.trainable = False. Before: pre-initialised and scaled, then
    written back into the frozen layer."""
    out = str(tmp_path / "facts.json")
    run_check("keras", "fixed", out, exporter)
    with open(out) as f:
        facts = json.load(f)
    assert_fixed_left_alone(facts, {"conv", "head"}, "Keras", "stft/kernel")


@pytest.mark.parametrize("api", ["nnx", "linen"])
def test_flax_fixed_kernel_is_left_alone(tmp_path, api):
    """An STFT kernel in an nnx.Variable (linen: a "consts" collection) applied with
    lax.conv. Before: initialised like a layer (nnx: written into the Variable)."""
    out = str(tmp_path / "facts.json")
    run_check("flax", f"fixed-{api}", out)
    with open(out) as f:
        facts = json.load(f)
    assert_fixed_left_alone(facts, {"conv", "fc"}, "Flax",
                            "stft" if api == "nnx" else "consts/stft")


def test_paddle_fixed_kernel_is_left_alone(tmp_path):
    """A Conv1D STFT whose weight has stop_gradient = True. Before: initialised."""
    out = str(tmp_path / "facts.json")
    run_check("paddle", "fixed", out)
    with open(out) as f:
        facts = json.load(f)
    assert_fixed_left_alone(facts, {"conv", "fc"}, "Paddle", "stft.weight")


# --- issue 29: a wrong-shaped batch, caught by the framework's own forward first ---


def assert_wrong_batch_said(facts: dict, shape: tuple, *words: str) -> None:
    """onnx_lsuv's InputError naming the batch's shape and what the model takes (the
    framework's own error quoted), and every parameter bit for bit as before."""
    assert facts["input_error"], facts
    message = facts["message"]
    if any("runs through it" in w for w in words):  # a shape seen to run: the batch's fault
        assert f"the batch of shape {shape} does not fit the" in message, message
        assert "its own forward fails on it" in message
    else:
        assert f"model's own forward fails on the batch of shape {shape}" in message, message
    assert "Nothing was exported" in message
    for w in words:
        assert w in message, message
    assert facts["same"]


def test_keras_wrong_batch_shape(tmp_path):
    """Before: tf2onnx's or the exporter's own failure, far from the cause."""
    out = str(tmp_path / "facts.json")
    run_check("keras", "wrong", out)
    with open(out) as f:
        facts = json.load(f)
    assert_wrong_batch_said(facts, (64, 21), "Keras model", "inputs of shape (None, 20)",
                            "a batch of shape (64, 20) runs through it")


def test_flax_wrong_batch_shape(tmp_path):
    """Before: linen's TracerBoolConversionError under jax2onnx, nnx's error from the trace."""
    out = str(tmp_path / "facts.json")
    run_check("flax", "wrong", out)
    with open(out) as f:
        facts = json.load(f)
    for api, kernel in (("nnx", "conv.kernel"), ("linen", "params/conv/kernel")):
        assert_wrong_batch_said(facts[api], (8, 12, 12, 4), "Flax model",
                                f"{kernel}, has shape (3, 3, 3, 8)",
                                "a batch of shape (8, 12, 12, 3) runs through it")
    # the right shape to a module that cannot run as called: not blamed on the batch
    train = facts["linen_train"]
    assert train["input_error"] and "does not fit the Flax model:" not in train["message"]
    assert "own forward fails on the batch of shape (32, 3)" in train["message"]
    assert "or the model does not run as it is called here" in train["message"]


def test_paddle_two_wrong_batch_shapes_in_one_process(tmp_path):
    """Before: "paddle2onnx exited -1", and the second call killed the process (SIGSEGV or
    SIGFPE) in 6 of 33 runs; run_check asserts that the process exits normally."""
    out = str(tmp_path / "facts.json")
    run_check("paddle", "wrong", out)
    with open(out) as f:
        facts = json.load(f)
    channels, rank5 = facts["calls"]
    assert_wrong_batch_said({**channels, "same": facts["same"]}, (16, 4, 12, 12),
                            "Paddle model", "conv.weight, has shape [8, 3, 3, 3]",
                            "a batch of shape (16, 3, 12, 12) runs through it")
    assert_wrong_batch_said({**rank5, "same": facts["same"]}, (16, 3, 12, 12, 1),
                            "Paddle model", "conv.weight, has shape [8, 3, 3, 3]",
                            "either the batch does not fit the model, or the model")
    assert all(facts["training"])  # each sublayer back in its own (train) mode
