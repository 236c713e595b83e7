"""Messages a newcomer can act on (issue 29, item 4): each mistake of a first hour gets exit 2
(or a warning, exit code unchanged) and a message that names the cause and what to do."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import helper

from onnx_lsuv import InputError, lsuv_init
from onnx_lsuv.errors import EXIT_BAD_INPUT

import models
from conftest import cli, make_model, output_variances, rand, saved

# --- a file that is not an ONNX model -------------------------------------------------------

def _not_onnx(tmp_path, kind):
    x = rand(16, 20, seed=1)
    path = tmp_path / f"given.{kind}"
    if kind == "txt":
        path.write_text("version https://git-lfs.github.com/spec/v1\nsize 1234\n")
    elif kind == "pt":
        torch.save(torch.nn.Linear(3, 2).state_dict(), path)
    elif kind == "npy":
        np.save(path, x)
    else:
        np.savez(path, x=x)
    return path


@pytest.mark.parametrize("kind,cause", [
    ("txt", "text file"),
    ("pt", "PyTorch checkpoint"),
    ("npy", "swap MODEL and --data"),  # MODEL and --data swapped
    ("npz", "swap MODEL and --data"),
])
def test_a_file_that_is_not_onnx_says_so_with_its_likely_cause(tmp_path, kind, cause):
    model, feeds, _ = models.gemm_mlp(1)
    m, d = saved(tmp_path, model, feeds)
    given = _not_onnx(tmp_path, kind)
    args = [given, "--data", m] if kind == "npy" else [given, "--data", d]
    res = cli(*args, "-o", tmp_path / "o.onnx")
    assert res.exit_code == EXIT_BAD_INPUT, res.output
    assert "not an ONNX model" in res.output and cause in res.output
    assert "wire type" not in res.output and "DecodeError" not in res.output
    assert not (tmp_path / "o.onnx").exists()


# --- .npz keys ------------------------------------------------------------------------------

def test_an_npz_with_numpys_default_keys_names_the_keys_the_inputs_and_how_to_save(tmp_path):
    model, feeds, _ = models.two_inputs()
    m = tmp_path / "m.onnx"
    onnx.save(model, m)
    np.savez(tmp_path / "d.npz", feeds["a"], feeds["b"])  # no names: arr_0, arr_1
    res = cli(m, "--data", tmp_path / "d.npz", "-o", tmp_path / "o.onnx")
    assert res.exit_code == EXIT_BAD_INPUT, res.output
    line = next(x for x in res.output.splitlines() if x.startswith("error:"))
    for words in ("'arr_0'", "'arr_1'", "'a'", "'b'", "np.savez(path, a=x0, b=x1)"):
        assert words in line, line


def test_a_one_input_model_takes_a_one_array_npz_whatever_its_key(tmp_path):
    model, feeds, outputs = models.gemm_mlp(1)
    m, d = saved(tmp_path, model, feeds)
    np.savez(tmp_path / "d.npz", feeds["x"])  # arr_0
    res = cli(m, "--data", tmp_path / "d.npz", "-o", tmp_path / "o.onnx", "-q")
    assert res.exit_code == 0, res.output
    res = cli(m, "--data", d, "-o", tmp_path / "ref.onnx", "-q")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "o.onnx").read_bytes() == (tmp_path / "ref.onnx").read_bytes()
    new = onnx.load(tmp_path / "o.onnx")
    assert all(abs(v - 1) < 0.1 for v in output_variances(new, feeds, outputs))


# --- flags, not Python names; one error style ------------------------------------------------

@pytest.mark.parametrize("args,flag_words", [
    (["--tol", "-1"], "--tol must be a positive number"),
    (["--target-var", "0"], "--target-var must be a positive number"),
    (["--max-iter", "0"], "--max-iter must be an integer"),
    (["--seed", "-1"], "--seed must be an integer"),
    (["--threads", "0"], "--threads must be an integer"),
    (["--lstm-forget-bias", "nan"], "--lstm-forget-bias must be a finite number"),
    (["--target-mean", "0", "--strategy", "naive"], "--strategy naive is the paper's plain "
                                                    "loop: it takes no --target-mean"),
    (["--target-mean", "0", "--init", "xavier"], "--init xavier does none"),
])
def test_cli_messages_speak_in_flags(tmp_path, args, flag_words):
    model, feeds, _ = models.gemm_mlp(1)
    m, d = saved(tmp_path, model, feeds)
    res = cli(m, "--data", d, "-o", tmp_path / "o.onnx", *args)
    assert res.exit_code == EXIT_BAD_INPUT, res.output
    assert flag_words in res.output, res.output
    errors = [x for x in res.output.splitlines() if x.startswith("error:")]
    assert len(errors) == 1
    for python_name in ("tol", "target_var", "max_iter", "lstm_forget_bias", "target_mean",
                        "after_activation", "per_channel", "strategy 'naive'", "init 'xavier'"):
        assert f" {python_name}" not in errors[0].replace("--", " --X"), errors[0]


def test_the_python_api_keeps_python_names():
    model, feeds, _ = models.gemm_mlp(1)
    with pytest.raises(InputError, match=r"^tol must be a positive number"):
        lsuv_init(model, feeds, tol=-1)


@pytest.mark.parametrize("args,words", [
    (["--init", "foo"], "invalid value for '--init'"),
    (["--bogus"], "no such option '--bogus'"),
    (["--tol", "abc"], "invalid value for '--tol'"),
])
def test_usage_errors_have_the_one_error_style(tmp_path, args, words):
    model, feeds, _ = models.gemm_mlp(1)
    m, d = saved(tmp_path, model, feeds)
    res = cli(m, "--data", d, "-o", tmp_path / "o.onnx", *args)
    assert res.exit_code == EXIT_BAD_INPUT, res.output
    assert res.output.startswith("error: ") and words in res.output, res.output
    assert "Usage:" not in res.output and "Error:" not in res.output


# --- options that do nothing -----------------------------------------------------------------

@pytest.mark.parametrize("args,words", [
    (["--exclude", "nomatch*"], "--exclude 'nomatch*' matches no layer"),
    (["--include", "Conv"], "--include 'Conv' matches no layer"),
    (["--init", "msra"], "--data does nothing with --init msra"),
    (["--lstm-forget-bias", "1.0"], "--lstm-forget-bias does nothing: the model has no LSTM"),
    (["-v", "-q"], "-v does nothing with -q"),
])
def test_an_option_that_does_nothing_is_said_so_and_the_exit_code_is_unchanged(
        tmp_path, args, words):
    model, feeds, _ = models.gemm_mlp(1)
    m, d = saved(tmp_path, model, feeds)
    res = cli(m, "--data", d, "-o", tmp_path / "o.onnx", *args)
    assert res.exit_code == 0, res.output
    assert f"warning: {words}" in res.output, res.output
    plain = cli(m, "--data", d, "-o", tmp_path / "p.onnx", "-q")
    assert plain.exit_code == 0
    if args[0] in ("--exclude", "--include", "--lstm-forget-bias", "-v"):  # it did nothing
        assert (tmp_path / "o.onnx").read_bytes() == (tmp_path / "p.onnx").read_bytes()


def test_exclude_everything_says_each_note_once_and_does_not_claim_the_model_has_no_layer(
        tmp_path):
    model, feeds, _ = models.gemm_mlp(1)
    m, d = saved(tmp_path, model, feeds)
    res = cli(m, "--data", d, "-o", tmp_path / "o.onnx", "--exclude", "*")
    assert res.exit_code == 0, res.output
    assert "has no Conv" not in res.output and "no layer" not in res.output
    assert "all 3 candidate layers are left alone (3 by --exclude)" in res.output
    for name in ("fc1", "fc2", "fc3"):
        assert res.output.count(name) == 1, res.output
    written = onnx.load(tmp_path / "o.onnx")
    assert written.graph.SerializeToString() == model.graph.SerializeToString()


# --- a constant batch -------------------------------------------------------------------------

def test_a_constant_batch_is_one_message_not_one_per_layer(tmp_path):
    model, feeds, outputs = models.gemm_mlp(1)
    m = tmp_path / "m.onnx"
    onnx.save(model, m)
    np.save(tmp_path / "z.npy", np.zeros_like(feeds["x"]))
    res = cli(m, "--data", tmp_path / "z.npy", "-o", tmp_path / "o.onnx")
    warnings = [x for x in res.output.splitlines() if x.startswith("warning:")]
    assert len(warnings) == 1, res.output
    assert "the data is constant (x = 0)" in warnings[0] and "real samples" in warnings[0]
    assert res.exit_code == 1  # not on target: as before, said once
    assert not any(x.startswith("warning: layer") for x in res.output.splitlines())


# --- the one-call front ends: the framework's own forward first -----------------------------

class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.fc = torch.nn.Linear(8 * 6 * 6, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def test_torch_front_end_reports_a_wrong_batch_shape_in_its_own_words(monkeypatch):
    from onnx_lsuv.frameworks.torch import lsuv_module

    torch.manual_seed(0)
    net = _Net()
    before = {k: v.clone() for k, v in net.state_dict().items()}

    def no_export(*a, **k):
        raise AssertionError("exported a batch that does not fit")

    monkeypatch.setattr(torch.onnx, "export", no_export)
    with pytest.raises(InputError) as err:
        lsuv_module(net, torch.randn(16, 4, 8, 8))
    text = str(err.value)
    assert "batch of shape (16, 4, 8, 8) does not fit the PyTorch model" in text
    assert "Conv2d(3, 8" in text and "4 channels" in text
    assert "a batch of shape (16, 3, 8, 8) runs through it" in text
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


# --- advice in the user's framework ----------------------------------------------------------

@pytest.mark.parametrize("producer,says,not_says", [
    ("jax2onnx", "flax.linen.WeightNorm", "torch"),
    ("tf2onnx", "Keras weight normalisation", "torch"),
    ("paddle2onnx", "paddle.nn.utils.remove_weight_norm", "torch"),
    ("pytorch", "torch.onnx.export(..., dynamo=False)", "Flax"),
])
def test_the_weight_norm_advice_speaks_the_exporting_framework(producer, says, not_says):
    result = lsuv_init(models.weight_norm_conv(producer), rand(8, 4, 8, seed=3), provider="cpu")
    reason = result.report.skipped[0]["reason"]
    assert "computed in the graph" in reason and says in reason
    assert not_says not in reason


# --- a wrong batch shape the declared shape lets through (named axes), CLI and --match ------

def _named_axes(model: onnx.ModelProto, names) -> onnx.ModelProto:
    """The model with its input's axes named (an export with dynamic axes): the declared
    shape accepts any size on them."""
    for dim, name in zip(model.graph.input[0].type.tensor_type.shape.dim, names):
        dim.ClearField("dim_value")
        dim.dim_param = name
    return model


def _ort_runs(model: onnx.ModelProto, x: np.ndarray) -> bool:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    try:
        session.run(None, {"x": x})
    except Exception:
        return False
    return True


@pytest.mark.parametrize("kind,bad,fits,declared", [
    ("conv", (16, 3, 6, 6), (16, 4, 6, 6), "(N, C, H, W)"),
    ("gemm", (32, 21), (32, 20), "(N, F)"),
])
@pytest.mark.parametrize("match", [False, True])
def test_a_wrong_batch_shape_on_named_axes_names_the_input_and_a_shape_that_runs(
        tmp_path, kind, bad, fits, declared, match):
    """Before: "ONNX Runtime cannot run the model ... as it is", blaming the model, after
    the pre-init and the orthonormal init, with neither the batch's shape nor the model's."""
    model, _, _ = models.conv_chain() if kind == "conv" else models.gemm_mlp(1)
    model = _named_axes(model, ["N", "C", "H", "W"] if kind == "conv" else ["N", "F"])
    m = tmp_path / "m.onnx"
    onnx.save(model, m)
    np.save(tmp_path / "x.npy", rand(*bad, seed=3))
    extra = []
    if match:  # the framework's parameters, as --match reads them
        np.savez(tmp_path / "p.npz", **{f"layer{i}.weight": onnx.numpy_helper.to_array(t)
                                       for i, t in enumerate(model.graph.initializer)})
        extra = ["--match", tmp_path / "p.npz", "--save-weights", tmp_path / "new.npz"]
    res = cli(m, "--data", tmp_path / "x.npy", "-o", tmp_path / "o.onnx", *extra)
    assert res.exit_code == EXIT_BAD_INPUT, res.output
    error = next(x for x in res.output.splitlines() if x.startswith("error:"))
    assert f"input 'x': the batch of shape {bad} does not fit the model" in error, error
    assert f"(declared {declared})" in error and f"a batch of shape {fits} runs" in error
    assert "as it is" not in error
    assert not _ort_runs(model, rand(*bad, seed=3)) and _ort_runs(model, rand(*fits, seed=3))
    assert not (tmp_path / "o.onnx").exists() and not (tmp_path / "new.npz").exists()


def test_a_batch_that_fails_where_no_layer_says_the_shape_names_both_shapes(tmp_path):
    """A Flatten before the Gemm: the shape the model takes is not read from a layer; the
    message names the batch's shape and the declared one, and does not claim which is wrong."""
    nodes = [helper.make_node("Flatten", ["x"], ["f"]),
             helper.make_node("Gemm", ["f", "w", "b"], ["y"], name="fc", transB=1)]
    model = make_model(nodes, [("x", ["N", 4, "H", "W"])], [("y", None)],
                       {"w": rand(8, 4 * 6 * 6, seed=1), "b": rand(8, seed=2)})
    m = tmp_path / "m.onnx"
    onnx.save(model, m)
    np.save(tmp_path / "x.npy", rand(16, 4, 5, 5, seed=3))
    res = cli(m, "--data", tmp_path / "x.npy", "-o", tmp_path / "o.onnx")
    assert res.exit_code == EXIT_BAD_INPUT, res.output
    error = next(x for x in res.output.splitlines() if x.startswith("error:"))
    assert "cannot run the model" in error and "on the data ('x': batch (16, 4, 5, 5), " \
        "declared (N, 4, H, W))" in error, error
    assert "does not fit the model on an axis it declares by name, or the model" in error
    assert "runs through it" not in error
