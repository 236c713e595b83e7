"""Files and signals: no input clobbered, no torn or half-written output, no file read from the
wrong place. Every test works inside its own temporary directory."""

import errno
import hashlib
import os
import signal
import subprocess
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import onnx_lsuv.outputs as outputs
from onnx_lsuv.errors import EXIT_BAD_INPUT, EXIT_FAILURE
from onnx_lsuv_cli.main import lsuv_command

import models
from conftest import ROOT, make_model, output_variances, rand

SAMPLE = os.path.join(ROOT, "sample_models", "fitnet_mnist_relu.onnx")
BATCH = os.path.join(ROOT, "sample_models", "digits_batch.npy")


def invoke(*args):
    return CliRunner().invoke(lsuv_command, [str(a) for a in args] + ["--provider", "cpu"])


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def snapshot(directory):
    """Every file below ``directory`` with its digest (symlinks as their target path)."""
    out = {}
    for root, _, files in os.walk(directory):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, directory)] = (os.readlink(p) if os.path.islink(p)
                                                  else sha(p))
    return out


def external_pair(tmp_path, name="m.onnx"):
    """A small conv model saved with its tensors in ``<name>.data``."""
    model, feeds, outputs_ = models.conv_chain()
    path = tmp_path / name
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=name + ".data", size_threshold=0)
    np.save(tmp_path / "x.npy", feeds["x"])
    return path, tmp_path / "x.npy", feeds, outputs_


def locations(path):
    raw = onnx.load(path, load_external_data=False)
    return {e.value for t in outputs.all_tensors(raw) for e in t.external_data
            if e.key == "location"}


# -- data safety ---------------------------------------------------------------------------


def test_no_output_may_overwrite_a_file_of_a_data_directory(tmp_path):
    (tmp_path / "batches").mkdir()
    x = np.load(BATCH)
    np.save(tmp_path / "batches" / "0.npy", x[:64])
    np.save(tmp_path / "batches" / "1.npy", x[64:])
    before = snapshot(tmp_path)
    for flag, target in (("-o", "0.npy"), ("--report", "1.npy"), ("--save-weights", "0.npy"),
                         ("--plot", "1.npy")):
        extra = [] if flag == "-o" else ["-o", tmp_path / "m.onnx"]
        res = invoke(SAMPLE, "-d", tmp_path / "batches", flag, tmp_path / "batches" / target,
                     *extra)
        assert res.exit_code == EXIT_BAD_INPUT, (flag, res.output)
        assert "is an input of this run" in res.output
        assert snapshot(tmp_path) == before


@pytest.mark.parametrize("where", ["here", "sub"])
def test_rerunning_on_an_external_data_model_works_from_any_directory(tmp_path, monkeypatch,
                                                                       where):
    src, x, feeds, outs = external_pair(tmp_path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    out = tmp_path / ("init.onnx" if where == "here" else "sub/init.onnx")
    (tmp_path / "init.onnx.data").write_bytes(b"unrelated file in the current directory")
    for _ in range(3):
        res = invoke(src, "-d", x, "-o", out)
        assert res.exit_code == 0, res.output
        (data_name,) = locations(out)
        present = sorted(p.name for p in out.parent.iterdir() if p.name.startswith("init"))
        assert present == sorted(["init.onnx", data_name] +
                                 (["init.onnx.data"] if where == "here" and
                                  data_name != "init.onnx.data" else []))
        back = onnx.load(out)
        assert all(abs(v - 1) < 0.1 for v in output_variances(back, feeds, outs))
    if where == "sub":
        assert (tmp_path / "init.onnx.data").read_bytes().startswith(b"unrelated")


def test_a_failing_side_output_is_found_before_the_work_and_nothing_is_written(tmp_path,
                                                                                monkeypatch):
    res = invoke(SAMPLE, "-d", BATCH, "-o", tmp_path / "m.onnx", "--report",
                 tmp_path / "missing" / "r.json")
    assert res.exit_code == EXIT_BAD_INPUT and "directory does not exist" in res.output
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    res = invoke(SAMPLE, "-d", BATCH, "-o", tmp_path / "m.onnx", "--plot", tmp_path / "p.png")
    assert res.exit_code == EXIT_BAD_INPUT and "needs matplotlib" in res.output
    assert list(tmp_path.iterdir()) == []


def test_side_outputs_are_written_with_the_model_or_not_at_all(tmp_path, monkeypatch):
    (tmp_path / "r.json").write_text("old report")
    before = snapshot(tmp_path)
    real_replace = os.replace
    calls = []

    def replace(src, dst):
        calls.append(os.path.basename(dst))
        if os.path.basename(dst) == "m.onnx":
            raise OSError(errno.EIO, "I/O error")
        real_replace(src, dst)

    monkeypatch.setattr(outputs.os, "replace", replace)
    res = invoke(SAMPLE, "-d", BATCH, "-o", tmp_path / "m.onnx", "--report", tmp_path / "r.json",
                 "--save-weights", tmp_path / "w.npz")
    assert res.exit_code == EXIT_FAILURE
    assert sorted(calls[:2]) == ["r.json", "w.npz"] and calls[2] == "m.onnx"  # model last
    assert snapshot(tmp_path) == before  # the report put back, the weights removed
    monkeypatch.setattr(outputs.os, "replace", real_replace)
    res = invoke(SAMPLE, "-d", BATCH, "-o", tmp_path / "m.onnx", "--report", tmp_path / "r.json",
                 "--save-weights", tmp_path / "w.npz")
    assert res.exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "r.json", "w.npz"]
    assert (tmp_path / "r.json").read_text().startswith("{")


def _slow_cli(out, extra=()):
    """A child running the CLI whose data and model writes block for a minute."""
    code = ("import sys, time\n"
            "import onnx_lsuv.outputs as o\n"
            "o._write_all = lambda *a, **k: time.sleep(60)\n"
            f"sys.argv = ['onnx-lsuv', {SAMPLE!r}, '-d', {BATCH!r}, '-o', {str(out)!r}, "
            f"'--provider', 'cpu', '-q'] + {list(extra)!r}\n"
            "from onnx_lsuv_cli.main import main\n"
            "main()\n")
    return subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("extra", [[], ["--external-data"]])
def test_sigterm_leaves_no_temporary_file_and_the_old_output_intact(tmp_path, extra):
    out = tmp_path / "m.onnx"
    out.write_bytes(b"previous output")
    before = snapshot(tmp_path)
    child = _slow_cli(out, extra)
    deadline = time.time() + 60
    def writing():  # the child has staged an output (or made its data file) and blocks
        return any(p.name.endswith((".tmp", ".data")) for p in tmp_path.iterdir())

    while time.time() < deadline and not writing():
        time.sleep(0.05)
    assert writing()
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 143, err
    assert "terminated: nothing was written" in err
    assert snapshot(tmp_path) == before


def test_an_interrupt_at_the_model_rename_leaves_the_old_model_and_its_data_paired(
        tmp_path, monkeypatch):
    src, x, feeds, outs = external_pair(tmp_path)
    out = tmp_path / "init.onnx"
    assert invoke(src, "-d", x, "-o", out, "--seed", "1").exit_code == 0
    before = snapshot(tmp_path)
    real_replace = os.replace

    def replace(a, b):
        if os.path.basename(b) == "init.onnx":
            raise KeyboardInterrupt
        real_replace(a, b)

    monkeypatch.setattr(outputs.os, "replace", replace)
    res = invoke(src, "-d", x, "-o", out, "--seed", "2")
    assert res.exit_code == 130 and "interrupted: nothing was written" in res.output
    assert snapshot(tmp_path) == before  # the old model and the data it reads, untouched
    monkeypatch.setattr(outputs.os, "replace", real_replace)
    old = onnx.load(out)
    assert all(abs(v - 1) < 0.1 for v in output_variances(old, feeds, outs))


def test_an_interrupt_after_the_model_rename_says_the_model_was_written(tmp_path, monkeypatch):
    src, x, _, _ = external_pair(tmp_path)
    out = tmp_path / "init.onnx"
    assert invoke(src, "-d", x, "-o", out).exit_code == 0

    real_unlink = os.unlink

    def unlink(path):  # removing the replaced model's data file comes after the rename
        if str(path).endswith(".data"):
            raise KeyboardInterrupt
        real_unlink(path)

    monkeypatch.setattr(outputs.os, "unlink", unlink)
    res = invoke(src, "-d", x, "-o", out)
    assert res.exit_code == 130 and f"interrupted after writing {out}" in res.output
    monkeypatch.undo()
    onnx.load(out)  # the new model and its own data file


def test_an_output_path_ending_in_a_separator_is_refused(tmp_path):
    res = invoke(SAMPLE, "-d", BATCH, "-o", str(tmp_path / "newdir") + os.sep)
    assert res.exit_code == EXIT_BAD_INPUT and "ends in a path separator" in res.output
    assert list(tmp_path.iterdir()) == []


def test_an_unwritable_output_directory_is_found_before_the_work(tmp_path, monkeypatch):
    real = outputs.tempfile.mkstemp

    def mkstemp(*args, **kwargs):
        if kwargs.get("suffix") == ".probe":
            raise PermissionError(errno.EROFS, "Read-only file system")
        return real(*args, **kwargs)

    def no_work(*args, **kwargs):
        raise AssertionError("the work started")

    monkeypatch.setattr(outputs.tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr("onnx_lsuv.lsuv_init", no_work)
    res = invoke(SAMPLE, "-d", BATCH, "-o", tmp_path / "m.onnx")
    assert res.exit_code == EXIT_BAD_INPUT, res.output
    assert "cannot write output" in res.output and "Read-only file system" in res.output


@pytest.mark.parametrize("code,why", [(errno.ENOSPC, "no space left"),
                                      (errno.EFBIG, "file too large")])
def test_disk_full_names_the_output_and_leaves_nothing(tmp_path, monkeypatch, code, why):
    def fsync(fd):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(outputs.os, "fsync", fsync)
    res = invoke(SAMPLE, "-d", BATCH, "-o", tmp_path / "m.onnx", "--external-data")
    assert res.exit_code == EXIT_FAILURE
    assert f"cannot write {tmp_path}" in res.output and why in res.output
    assert list(tmp_path.iterdir()) == []


# -- reading from the right place ------------------------------------------------------------


def then_body(model):
    return next(a.g for a in model.graph.node[0].attribute if a.name == "then_branch")


def if_with_external_body_tensor(tmp_path):
    """x -> If (its then-branch adds a 2048-float constant stored in k.bin) -> Gemm."""
    k = numpy_helper.from_array(np.full((1, 2048), 0.5, np.float32), "k")
    then_g = helper.make_graph([helper.make_node("Add", ["x", "k"], ["t"])], "then", [],
                               [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)],
                               initializer=[k])
    else_g = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [],
                               [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("If", ["cond"], ["z"], then_branch=then_g, else_branch=else_g),
             helper.make_node("Gemm", ["z", "w"], ["y"], name="fc", transB=1)]
    model = make_model(nodes, [("x", ["N", 2048])], [("y", None)],
                       {"cond": np.array(True), "w": rand(8, 2048, seed=1)})
    body_k = then_body(model).initializer[0]
    (tmp_path / "k.bin").write_bytes(body_k.raw_data)
    body_k.ClearField("raw_data")
    body_k.data_location = TensorProto.EXTERNAL
    entry = body_k.external_data.add()
    entry.key, entry.value = "location", "k.bin"
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    x = rand(32, 2048, seed=2)
    np.save(tmp_path / "x.npy", x)
    return path, x


def test_external_data_inside_a_subgraph_is_read_beside_the_model(tmp_path, monkeypatch):
    (tmp_path / "model").mkdir()
    path, x = if_with_external_body_tensor(tmp_path / "model")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "k.bin").write_bytes(np.full(2048, np.nan, np.float32).tobytes())  # a decoy
    monkeypatch.chdir(elsewhere)
    out = tmp_path / "out" / "o.onnx"
    out.parent.mkdir()
    res = invoke(path, "-d", path.parent / "x.npy", "-o", out)
    assert res.exit_code == 0, res.output
    assert "k.bin" not in locations(out)  # its own data file, not a dangling reference
    monkeypatch.chdir(tmp_path)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {"x": x})
    assert np.isfinite(y).all() and abs(float(np.var(y.astype(np.float64))) - 1) < 0.1


@pytest.mark.parametrize("location", ["../outside.bin", "/etc/hostname", "sub/../../out.bin"])
def test_an_external_location_outside_the_model_directory_is_refused(tmp_path, location):
    (tmp_path / "model").mkdir()
    path, _ = if_with_external_body_tensor(tmp_path / "model")
    model = onnx.load(path, load_external_data=False)
    then_body(model).initializer[0].external_data[0].value = location
    path.write_bytes(model.SerializeToString())
    res = invoke(path, "-d", path.parent / "x.npy", "-o", tmp_path / "o.onnx")
    assert res.exit_code == EXIT_BAD_INPUT, res.output
    assert "tensor 'k'" in res.output and repr(location) in res.output


def test_a_symlink_out_of_the_model_directory_is_refused_one_inside_is_followed(tmp_path):
    (tmp_path / "model").mkdir()
    path, _ = if_with_external_body_tensor(tmp_path / "model")
    data = path.parent / "x.npy"
    secret = tmp_path / "secret.bin"
    os.replace(path.parent / "k.bin", secret)
    os.symlink(secret, path.parent / "k.bin")
    res = invoke(path, "-d", data, "-o", tmp_path / "o.onnx")
    assert res.exit_code == EXIT_BAD_INPUT and "outside the model's directory" in res.output
    os.unlink(path.parent / "k.bin")
    (path.parent / "blobs").mkdir()
    os.replace(secret, path.parent / "blobs" / "k")
    os.symlink("blobs/k", path.parent / "k.bin")
    assert invoke(path, "-d", data, "-o", tmp_path / "o.onnx").exit_code == 0


def test_a_hugging_face_hub_snapshot_is_usable_in_place(tmp_path):
    repo = tmp_path / "hub" / "models--org--net"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    path, _ = if_with_external_body_tensor(tmp_path)
    os.replace(tmp_path / "k.bin", repo / "blobs" / "0f0f")
    os.replace(path, repo / "blobs" / "1e1e")
    os.symlink("../../blobs/0f0f", snap / "k.bin")
    os.symlink("../../blobs/1e1e", snap / "m.onnx")
    res = invoke(snap / "m.onnx", "-d", tmp_path / "x.npy", "-o", tmp_path / "o.onnx")
    assert res.exit_code == 0, res.output


# -- friendlier ------------------------------------------------------------------------------


def test_an_npz_with_extra_keys_runs_with_a_note(tmp_path):
    np.savez(tmp_path / "d.npz", input=np.load(BATCH), labels=np.arange(128))
    res = invoke(SAMPLE, "-d", tmp_path / "d.npz", "-o", tmp_path / "m.onnx")
    assert res.exit_code == 0, res.output
    assert "'labels' is not an input of the model" in res.output


def test_overwrite_through_a_symlink_replaces_the_model_it_points_to(tmp_path):
    real = tmp_path / "real.onnx"
    real.write_bytes(open(SAMPLE, "rb").read())
    link = tmp_path / "link.onnx"
    os.symlink(real.name, link)
    res = invoke(real, "-d", BATCH, "-o", link)
    assert res.exit_code == EXIT_BAD_INPUT and "--overwrite" in res.output
    res = invoke(real, "-d", BATCH, "-o", link, "--overwrite")
    assert res.exit_code == 0, res.output
    assert os.path.islink(link) and os.readlink(link) == real.name
    assert sha(real) != sha(SAMPLE)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.onnx", "real.onnx"]


def test_quiet_hides_onnxruntimes_own_error_lines(tmp_path):
    model, feeds, _ = models.conv_chain()
    model.graph.node[2].name = model.graph.node[0].name  # ONNX Runtime refuses the model
    onnx.save(model, tmp_path / "dup.onnx")
    np.save(tmp_path / "x.npy", feeds["x"])
    proc = subprocess.run(["onnx-lsuv", str(tmp_path / "dup.onnx"), "-d",
                           str(tmp_path / "x.npy"), "-o", str(tmp_path / "o.onnx"), "-q",
                           "--provider", "cpu"], capture_output=True, text=True)
    assert proc.returncode == EXIT_BAD_INPUT
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ONNX Runtime cannot run"), lines


def test_a_matmul_with_its_constant_first_is_named_with_the_reason(tmp_path):
    nodes = [helper.make_node("MatMul", ["w", "x"], ["y"], name="w_first"),
             helper.make_node("Gemm", ["y", "w2"], ["z"], name="fc", transB=1)]
    model = make_model(nodes, [("x", [12, "N"])], [("z", None)],
                       {"w": rand(6, 12, seed=1), "w2": rand(4, 32, seed=2)})
    onnx.save(model, tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", rand(12, 32, seed=3))
    res = invoke(tmp_path / "m.onnx", "-d", tmp_path / "x.npy", "-o", tmp_path / "o.onnx")
    assert "NOT initialised: w_first (MatMul): its constant is the first operand" in res.output
    # a layer a user expects initialised that was not: not on target (the model is written)
    assert res.exit_code == EXIT_FAILURE, res.output
    assert "1 candidate layer(s) not initialised: w_first (MatMul)" in res.output
    res = invoke(tmp_path / "m.onnx", "-d", tmp_path / "x.npy", "-o", tmp_path / "o.onnx",
                 "--exclude", "w_first", "--overwrite")
    assert res.exit_code == 0, res.output


# -- from the review of this change ----------------------------------------------------------


@pytest.mark.parametrize("target", ["x.npy", "m.onnx.data"])
def test_overwrite_replaces_the_model_only_never_its_data_or_the_batch(tmp_path, target):
    src, x, _, _ = external_pair(tmp_path)
    before = snapshot(tmp_path)
    res = invoke(src, "-d", x, "-o", tmp_path / target, "--overwrite")
    assert res.exit_code == EXIT_BAD_INPUT and "is an input of this run" in res.output
    assert snapshot(tmp_path) == before


def test_overwriting_an_external_data_model_in_place_leaves_one_data_file(tmp_path):
    src, x, feeds, outs = external_pair(tmp_path)
    for seed in (1, 2, 3):
        assert invoke(src, "-d", x, "-o", src, "--overwrite", "--seed", seed).exit_code == 0
        data = sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".data"))
        assert data == sorted(locations(src)) and len(data) == 1
    assert all(abs(v - 1) < 0.1 for v in output_variances(onnx.load(src), feeds, outs))


def test_an_interrupt_inside_the_commit_after_the_model_rename_keeps_the_pair(tmp_path,
                                                                              monkeypatch):
    src, x, feeds, outs = external_pair(tmp_path)
    out = tmp_path / "init.onnx"

    def sync(directory):  # runs after the renames, still inside the commit
        raise KeyboardInterrupt

    monkeypatch.setattr(outputs, "_sync_directory", sync)
    res = invoke(src, "-d", x, "-o", out)
    assert res.exit_code == 130 and f"interrupted after writing {out}" in res.output
    assert all(abs(v - 1) < 0.1 for v in output_variances(onnx.load(out), feeds, outs))


def test_a_data_file_that_another_model_shares_is_never_removed(tmp_path):
    src, x, _, _ = external_pair(tmp_path)
    out = tmp_path / "init.onnx"
    model = onnx.load(src, load_external_data=False)  # init.onnx reads the input's data file
    onnx.save(model, out)
    res = invoke(src, "-d", x, "-o", out)
    assert res.exit_code == 0, res.output
    assert (tmp_path / "m.onnx.data").exists()
    onnx.load(src)  # the input still loads with its data


def test_a_negative_external_offset_is_bad_input_naming_the_tensor(tmp_path):
    src, x, _, _ = external_pair(tmp_path)
    model = onnx.load(src, load_external_data=False)
    t = model.graph.initializer[0]
    entry = t.external_data.add()
    entry.key, entry.value = "offset", "-8"
    src.write_bytes(model.SerializeToString())
    res = invoke(src, "-d", x, "-o", tmp_path / "o.onnx")
    assert res.exit_code == EXIT_BAD_INPUT and f"tensor {t.name!r}" in res.output


def test_a_model_proto_with_unloaded_external_data_is_refused_clearly(tmp_path):
    from onnx_lsuv import InputError, lsuv_init

    src, x, _, _ = external_pair(tmp_path)
    with pytest.raises(InputError, match="was not loaded: pass the model's path"):
        lsuv_init(onnx.load(src, load_external_data=False), np.load(x), provider="cpu")


def test_a_bfloat16_model_with_a_subgraph_is_measured_in_its_float32_twin():
    from onnx_lsuv import lsuv_init

    bf16 = TensorProto.BFLOAT16
    body = helper.make_graph([helper.make_node("Relu", ["y1"], ["r"])], "then", [],
                             [helper.make_tensor_value_info("r", bf16, None)])
    other = helper.make_graph([helper.make_node("Identity", ["y1"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", bf16, None)])

    def bf(a, name):
        return helper.make_tensor(name, bf16, a.shape, a.astype(np.float32).flatten().tolist())

    nodes = [helper.make_node("MatMul", ["x", "w1"], ["y1"], name="mm1"),
             helper.make_node("If", ["cond"], ["z"], then_branch=body, else_branch=other),
             helper.make_node("MatMul", ["z", "w2"], ["y2"], name="mm2")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", bf16, ["N", 16])],
        [helper.make_tensor_value_info("y2", bf16, None)],
        initializer=[bf(rand(16, 24, seed=1), "w1"), bf(rand(24, 8, seed=2), "w2"),
                     numpy_helper.from_array(np.array(True), "cond")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              ir_version=8)
    x = rand(32, 16, seed=3)
    result = lsuv_init(model, x.astype(np.float64), provider="cpu")
    assert result.report.converged, result.report.table()
    assert any("float32" in n for n in result.report.notes)
    w1 = numpy_helper.to_array(result.model.graph.initializer[0]).astype(np.float64)
    assert abs(float(np.var(x.astype(np.float64) @ w1)) - 1) < 0.1  # measured here


# -- from the second review -------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--report", "--save-weights"])
def test_a_side_output_may_not_take_the_models_data_file_name(tmp_path, flag):
    src, x, _, _ = external_pair(tmp_path)
    for name in ("o.onnx.data", "o.onnx.0123abcd.data"):
        res = invoke(src, "-d", x, "-o", tmp_path / "o.onnx", flag, tmp_path / name)
        assert res.exit_code == EXIT_BAD_INPUT and "named like the data file" in res.output
        assert not (tmp_path / "o.onnx").exists()


def test_a_missing_model_is_bad_input_even_when_the_output_exists(tmp_path):
    (tmp_path / "o.onnx").write_bytes(b"old")
    res = invoke(tmp_path / "nosuch.onnx", "-d", BATCH, "-o", tmp_path / "o.onnx")
    assert res.exit_code == EXIT_BAD_INPUT and "model file not found" in res.output


def test_a_signal_during_the_commit_still_removes_the_replaced_data(tmp_path, monkeypatch):
    src, x, feeds, outs = external_pair(tmp_path)
    out = tmp_path / "init.onnx"
    assert invoke(src, "-d", x, "-o", out).exit_code == 0
    real_replace = os.replace

    def replace(a, b):  # SIGTERM arrives just as the model is renamed
        real_replace(a, b)
        if os.path.basename(b) == "init.onnx":
            os.kill(os.getpid(), signal.SIGTERM)

    from onnx_lsuv_cli.main import _on_sigterm

    monkeypatch.setattr(signal, "SIGTERM", signal.SIGTERM)
    old_handler = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        monkeypatch.setattr(outputs.os, "replace", replace)
        res = invoke(src, "-d", x, "-o", out)
    finally:
        signal.signal(signal.SIGTERM, old_handler)
    assert res.exit_code == 143, res.output
    (data,) = locations(out)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("init")) == \
        sorted(["init.onnx", data])  # no orphan: the old data went inside the commit
    assert data in res.output
    monkeypatch.undo()
    assert all(abs(v - 1) < 0.1 for v in output_variances(onnx.load(out), feeds, outs))


def test_external_data_through_a_symlink_into_another_directory_is_refused(tmp_path):
    src, x, _, _ = external_pair(tmp_path)
    (tmp_path / "tgt").mkdir()
    os.symlink(tmp_path / "tgt" / "missing.onnx", tmp_path / "link.onnx")
    res = invoke(src, "-d", x, "-o", tmp_path / "link.onnx")
    assert res.exit_code == EXIT_BAD_INPUT and "symlink into another directory" in res.output
    assert invoke(src, "-d", x, "-o", tmp_path / "link.onnx",
                  "--no-external-data").exit_code == 0
    onnx.load(tmp_path / "link.onnx")


def test_without_hard_links_a_failed_commit_still_restores_the_old_side_file(tmp_path,
                                                                             monkeypatch):
    (tmp_path / "r.json").write_text("OLD")
    real_replace = os.replace

    def no_link(*args):
        raise OSError(errno.EPERM, "Operation not permitted")

    def replace(a, b):
        if os.path.basename(b) == "o.onnx":
            raise OSError(errno.EIO, "Input/output error")
        real_replace(a, b)

    monkeypatch.setattr(outputs.os, "link", no_link)
    monkeypatch.setattr(outputs.os, "replace", replace)
    res = invoke(SAMPLE, "-d", BATCH, "-o", tmp_path / "o.onnx", "--report", tmp_path / "r.json")
    assert res.exit_code == EXIT_FAILURE and f"cannot write {tmp_path / 'o.onnx'}" in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
    assert (tmp_path / "r.json").read_text() == "OLD"
