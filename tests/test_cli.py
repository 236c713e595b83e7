"""The command end to end: as the installed console script and through click's runner."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from onnx_lsuv.errors import EXIT_BAD_INPUT
from onnx_lsuv_cli.main import lsuv_command

import models
from conftest import ROOT, output_variances, target_outputs

SAMPLE = os.path.join(ROOT, "sample_models", "fitnet_mnist_relu.onnx")
BATCH = os.path.join(ROOT, "sample_models", "digits_batch.npy")


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_installed_command_initialises_the_sample(tmp_path):
    exe = shutil.which("onnx-lsuv")
    assert exe, "onnx-lsuv is not installed (pip install -e .)"
    out, rep = tmp_path / "init.onnx", tmp_path / "report.json"
    before = sha(SAMPLE), sha(BATCH)
    proc = subprocess.run([exe, SAMPLE, "--data", BATCH, "-o", str(out), "--report", str(rep),
                           "--provider", "cpu"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "var after" in proc.stderr and "conv1" in proc.stderr
    assert (sha(SAMPLE), sha(BATCH)) == before
    model = onnx.load(out)
    onnx.checker.check_model(model)
    names = target_outputs(model)
    for v in output_variances(model, {"input": np.load(BATCH)}, names):
        assert abs(v - 1) < 0.1
    report = json.loads(rep.read_text())
    assert len(report["layers"]) == len(names) and report["converged"]


def test_python_dash_m_runs_the_same_command():
    proc = subprocess.run([sys.executable, "-m", "onnx_lsuv", "--version"], capture_output=True,
                          text=True)
    assert proc.returncode == 0 and "onnx-lsuv" in proc.stdout


def test_npz_data_for_a_two_input_model(tmp_path):
    model, feeds, outputs = models.two_inputs()
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", **feeds)
    res = CliRunner().invoke(lsuv_command, [str(tmp_path / "m.onnx"), "--data",
                                            str(tmp_path / "d.npz"), "-o",
                                            str(tmp_path / "o.onnx"), "--provider", "cpu"])
    assert res.exit_code == 0, res.output
    for v in output_variances(onnx.load(tmp_path / "o.onnx"), feeds, outputs):
        assert abs(v - 1) < 0.1


def test_same_seed_gives_a_byte_identical_file(tmp_path):
    runner = CliRunner()
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        res = runner.invoke(lsuv_command, [SAMPLE, "--data", BATCH, "-o", str(tmp_path / name),
                                           "--seed", str(seed), "--provider", "cpu", "-q"])
        assert res.exit_code == 0, res.output
    assert sha(tmp_path / "a") == sha(tmp_path / "b") != sha(tmp_path / "c")


def bad(tmp_path, args):
    res = CliRunner().invoke(lsuv_command, args)
    assert res.exit_code == EXIT_BAD_INPUT, res.output
    assert "error:" in res.output and "Traceback" not in res.output
    assert not any(p.name.endswith((".onnx", ".tmp")) and p.name != "m.onnx"
                   for p in tmp_path.iterdir())
    return res.output


@pytest.mark.parametrize("case,expect", [
    ("missing_model", "model file not found"),
    ("not_onnx", "cannot read"),
    ("missing_data", "data file not found"),
    ("bad_data", "cannot read data file"),
    ("wrong_shape", "expected shape"),
    ("scalar", "scalar"),
    ("wrong_dtype", "do not all convert exactly to float32"),
    ("nan", "NaN"),
    ("npy_for_two_inputs", ".npz"),
    ("npz_missing_key", "missing input"),
    ("no_out_dir", "output directory does not exist"),
    ("out_is_input", "--overwrite"),
    ("tol", "--tol must be"),
    ("max_iter", "--max-iter must be"),
    ("target_var", "--target-var must be"),
])
def test_bad_input_exits_2_with_one_clear_message(tmp_path, case, expect):
    model, feeds, _ = models.two_inputs() if "two" in case or "npz" in case \
        else models.gemm_mlp(1)
    m = tmp_path / "m.onnx"
    onnx.save(model, m)
    data = tmp_path / "d.npy"
    x = next(iter(feeds.values()))
    np.save(data, x)
    out = str(tmp_path / "o.onnx")
    args = [str(m), "--data", str(data), "-o", out, "--provider", "cpu"]
    if case == "missing_model":
        args[0] = str(tmp_path / "nope.onnx")
    elif case == "not_onnx":
        (tmp_path / "junk.onnx.txt").write_text("not a model")
        args[0] = str(tmp_path / "junk.onnx.txt")
    elif case == "missing_data":
        args[2] = str(tmp_path / "nope.npy")
    elif case == "bad_data":
        (tmp_path / "bad.npy").write_text("garbage")
        args[2] = str(tmp_path / "bad.npy")
    elif case == "wrong_shape":
        np.save(data, x[:, :5])
    elif case == "wrong_dtype":
        np.save(data, np.full(x.shape, 2**24 + 1, np.int64))  # not exact in float32
    elif case == "scalar":
        np.save(data, np.float32(1))
    elif case == "nan":
        y = x.copy()
        y[0, 0] = np.nan
        np.save(data, y)
    elif case == "npz_missing_key":
        np.savez(tmp_path / "d.npz", a=feeds["a"])
        args[2] = str(tmp_path / "d.npz")
    elif case == "no_out_dir":
        args[4] = str(tmp_path / "missing" / "o.onnx")
    elif case == "out_is_input":
        args[4] = str(m)
    elif case in ("tol", "max_iter", "target_var"):
        args += [f"--{case.replace('_', '-')}", "0"]
    before = sha(m)
    output = bad(tmp_path, args)
    assert expect in output
    assert sha(m) == before
    for p in tmp_path.iterdir():
        assert not p.name.endswith(".tmp")


def test_orthonormal_init_needs_no_data_and_the_old_flag_still_works(tmp_path):
    res = CliRunner().invoke(lsuv_command, [SAMPLE, "-o", str(tmp_path / "o.onnx"),
                                            "--init", "orthonormal"])
    assert res.exit_code == 0, res.output
    assert "not_scaled" in res.output
    res = CliRunner().invoke(lsuv_command, [SAMPLE, "-o", str(tmp_path / "p.onnx"),
                                            "--orthonormal-only"])
    assert res.exit_code == 0 and "deprecated: use --init orthonormal" in res.output
    assert sha(tmp_path / "o.onnx") == sha(tmp_path / "p.onnx")


def test_side_outputs_may_not_clobber_the_model_or_each_other(tmp_path):
    out = tmp_path / "o.onnx"
    for extra in (["--report", str(out)], ["--plot", str(tmp_path / "r"), "--report",
                                            str(tmp_path / "r")]):
        res = CliRunner().invoke(lsuv_command, [SAMPLE, "--data", BATCH, "-o", str(out)] + extra)
        assert res.exit_code == EXIT_BAD_INPUT and "different files" in res.output
        assert not out.exists()


def test_output_never_overwrites_the_inputs_external_data(tmp_path):
    # The input keeps its tensors in out.onnx.data, the name -o out.onnx would use: the new
    # model's data goes to a file of its own, and the input stays intact.
    model = onnx.load(SAMPLE)
    onnx.save_model(model, tmp_path / "in.onnx", save_as_external_data=True,
                    location="out.onnx.data", size_threshold=0)
    before = sha(tmp_path / "out.onnx.data")
    res = CliRunner().invoke(lsuv_command, [str(tmp_path / "in.onnx"), "--data", BATCH, "-o",
                                            str(tmp_path / "out.onnx"), "--provider", "cpu"])
    assert res.exit_code == 0, res.output
    assert sha(tmp_path / "out.onnx.data") == before
    raw = onnx.load(tmp_path / "out.onnx", load_external_data=False)
    locations = {e.value for t in raw.graph.initializer for e in t.external_data
                 if e.key == "location"}
    assert len(locations) == 1 and "out.onnx.data" not in locations
    back = onnx.load(tmp_path / "out.onnx")
    assert output_variances(back, {"input": np.load(BATCH)}, target_outputs(back))
    onnx.load(tmp_path / "in.onnx")  # still loads, with its own data


def test_bad_npz_member_is_a_clean_input_error(tmp_path):
    np.savez(tmp_path / "d.npz", input=np.array([object()], dtype=object))
    res = CliRunner().invoke(lsuv_command, [SAMPLE, "--data", str(tmp_path / "d.npz"), "-o",
                                            str(tmp_path / "o.onnx")])
    assert res.exit_code == EXIT_BAD_INPUT and "cannot read data file" in res.output
