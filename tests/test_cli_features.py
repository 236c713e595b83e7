"""What ONNX users expect from the command: progress, --json, --check, --plot, --save-weights,
pooled data, baseline inits, shell completion."""

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from onnx_lsuv.errors import EXIT_CHECK_FAILED
from onnx_lsuv_cli.main import lsuv_command

import models
from conftest import ROOT, output_variances, target_outputs

SAMPLE = os.path.join(ROOT, "sample_models", "fitnet_mnist_relu.onnx")
BATCH = os.path.join(ROOT, "sample_models", "digits_batch.npy")


def invoke(*args):
    return CliRunner().invoke(lsuv_command, [str(a) for a in args])


def test_progress_lines_on_a_log_and_silence_with_q(tmp_path):
    res = invoke(SAMPLE, "-d", BATCH, "-o", tmp_path / "a.onnx", "--provider", "cpu")
    assert res.exit_code == 0
    for line in ("pre-init: 7/7 weights", "scaling: 7/7"):
        assert line in res.output
    res = invoke(SAMPLE, "-d", BATCH, "-o", tmp_path / "b.onnx", "--provider", "cpu", "-q")
    assert res.exit_code == 0 and res.output == ""


def test_verbose_adds_per_layer_detail(tmp_path):
    res = invoke(SAMPLE, "-d", BATCH, "-o", tmp_path / "a.onnx", "--provider", "cpu", "-v")
    assert "layer conv1: var" in res.output


def test_json_summary_on_stdout(tmp_path):
    runner = CliRunner()
    res = runner.invoke(lsuv_command, [SAMPLE, "-d", BATCH, "-o", str(tmp_path / "a.onnx"),
                                       "--provider", "cpu", "--json", "-q"])
    summary = json.loads(res.stdout)
    assert summary["ok"] is True and summary["n_layers"] == len(summary["layers"]) == 7
    assert summary["n_by_status"]["converged"] == 7
    assert summary["worst_abs_var_minus_target"] < 0.1
    assert {"total_s", "one_pass_s"} <= summary["timings"].keys()
    assert summary["versions"]["onnxruntime"]


def test_check_gates_ci_on_the_target_variance(tmp_path):
    out = tmp_path / "init.onnx"
    assert invoke(SAMPLE, "-d", BATCH, "-o", out, "--provider", "cpu", "-q").exit_code == 0
    ok = invoke(out, "-d", BATCH, "--check", "--provider", "cpu")
    assert ok.exit_code == 0, ok.output
    bad = invoke(SAMPLE, "-d", BATCH, "--check", "--provider", "cpu", "--json", "-q")
    assert bad.exit_code == EXIT_CHECK_FAILED
    assert json.loads(bad.stdout)["n_by_status"]["off_target"] > 0
    assert sorted(os.listdir(tmp_path)) == ["init.onnx"]  # --check wrote nothing


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    res = invoke(SAMPLE, "-d", BATCH, "-o", tmp_path / "a.onnx", "--plot", tmp_path / "p.png",
                 "--provider", "cpu", "-q")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    res = invoke(SAMPLE, "-d", BATCH, "-o", tmp_path / "a.onnx", "--plot", tmp_path / "p.png",
                 "--provider", "cpu", "-q")
    assert res.exit_code == 2 and "pip install matplotlib" in res.output


def test_save_weights_holds_exactly_the_changed_tensors(tmp_path):
    res = invoke(SAMPLE, "-d", BATCH, "-o", tmp_path / "a.onnx", "--save-weights",
                 tmp_path / "w.npz", "--provider", "cpu", "-q")
    assert res.exit_code == 0, res.output
    with np.load(tmp_path / "w.npz") as npz:
        saved = dict(npz)
    before = {t.name: numpy_helper.to_array(t) for t in onnx.load(SAMPLE).graph.initializer}
    after = {t.name: numpy_helper.to_array(t)
             for t in onnx.load(tmp_path / "a.onnx").graph.initializer}
    assert set(after) == set(before)
    changed = {k for k in after if not np.array_equal(after[k], before[k])}
    weights = {n.input[1] for n in onnx.load(SAMPLE).graph.node if n.op_type in ("Conv", "Gemm")}
    assert weights <= changed  # every weight was redrawn...
    assert set(saved) == changed  # ...and the npz holds exactly what changed, as written
    for name, array in saved.items():
        assert array.dtype == after[name].dtype and np.array_equal(array, after[name])


def _weights(path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer}


def test_several_batches_are_pooled_and_a_directory_is_streamed(tmp_path):
    x = np.load(BATCH)
    np.save(tmp_path / "a.npy", x[:64])
    np.save(tmp_path / "b.npy", x[64:])
    (tmp_path / "dir").mkdir()
    np.save(tmp_path / "dir" / "0.npy", x[:64])
    np.save(tmp_path / "dir" / "1.npy", x[64:])
    runs = {"whole": ["-d", BATCH], "two": ["-d", tmp_path / "a.npy", "-d", tmp_path / "b.npy"],
            "dir": ["-d", tmp_path / "dir"],
            "whole_sequential": ["-d", BATCH, "--strategy", "sequential"]}
    for name, data in runs.items():
        res = invoke(SAMPLE, *data, "-o", tmp_path / f"{name}.onnx", "--provider", "cpu", "-q")
        assert res.exit_code == 0, res.output
    # Pooled: the very same batch, the very same bytes.
    assert (tmp_path / "whole.onnx").read_bytes() == (tmp_path / "two.onnx").read_bytes()
    # Streamed: the same per-channel sums, added batch by batch, so the same factors as the
    # whole batch solved layer by layer, to float rounding; and as the one-pass solve to its
    # float32 statistics.
    streamed = _weights(tmp_path / "dir.onnx")
    for other, rtol in (("whole_sequential", 1e-6), ("whole", 1e-4)):
        ref = _weights(tmp_path / f"{other}.onnx")
        assert ref.keys() == streamed.keys()
        for k in ref:
            np.testing.assert_allclose(streamed[k], ref[k], rtol=rtol, atol=rtol * np.abs(
                ref[k]).max(), err_msg=f"{k} against {other}")


@pytest.mark.parametrize("init,check", [
    ("xavier", lambda w, fi, fo: abs(w.std() - np.sqrt(2.0 / (fi + fo))) < 0.15 * w.std()),
    ("msra", lambda w, fi, fo: abs(w.std() - np.sqrt(2.0 / fi)) < 0.15 * w.std()),
])
def test_baseline_inits_follow_their_distributions(tmp_path, init, check):
    res = invoke(SAMPLE, "-o", tmp_path / "b.onnx", "--init", init, "-q")
    assert res.exit_code == 0, res.output
    model = onnx.load(tmp_path / "b.onnx")
    inits = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    seen = 0
    for node in model.graph.node:  # the fans as Glorot and He define them, computed here
        if node.op_type == "Conv":
            w = inits[node.input[1]]
            assert not any(a.name == "group" and a.i != 1 for a in node.attribute)
            receptive = int(np.prod(w.shape[2:]))
            fi, fo = w.shape[1] * receptive, w.shape[0] * receptive
        elif node.op_type == "Gemm":
            w = inits[node.input[1]]
            trans = any(a.name == "transB" and a.i == 1 for a in node.attribute)
            fo, fi = w.shape if trans else w.shape[::-1]
        else:
            continue
        seen += 1
        assert check(w, fi, fo), (node.name, w.std())
    assert seen == 7
    # LSUV reaches the target where the baselines leave the variance where it falls.
    x = np.load(BATCH)
    names = target_outputs(model)
    assert any(abs(v - 1) > 0.1 for v in output_variances(model, {"input": x}, names))


def test_shell_completion_script():
    env = dict(os.environ, _ONNX_LSUV_COMPLETE="bash_source")
    proc = subprocess.run(["onnx-lsuv"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and "complete" in proc.stdout


def test_check_and_output_together_are_refused(tmp_path):
    res = invoke(SAMPLE, "-d", BATCH, "--check", "-o", tmp_path / "x.onnx")
    assert res.exit_code == 2 and "--check writes no model" in res.output


def test_library_check_on_a_fresh_model_lists_off_target_layers():
    from onnx_lsuv import check_variances, lsuv_init

    model, feeds, _ = models.residual_block()
    assert not check_variances(model, feeds, provider="cpu").converged
    done = lsuv_init(model, feeds, provider="cpu").model
    rep = check_variances(done, feeds, provider="cpu")
    assert rep.converged and all(r.status == "converged" for r in rep.layers)


def test_exclude_and_include_on_the_command_line_and_in_the_report(tmp_path):
    from test_exporter_patterns import yolo_head

    model, feeds = yolo_head()
    onnx.save(model, tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", feeds["x"])
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    res = invoke(tmp_path / "m.onnx", "-d", tmp_path / "x.npy", "-o", out, "--report", rep,
                 "--provider", "cpu")
    assert res.exit_code == 0, res.output
    assert "not a target: dfl.conv (Conv): its weight 'dfl.conv.weight' looks hand-set" in \
        res.output
    res = invoke(tmp_path / "m.onnx", "-d", tmp_path / "x.npy", "-o", out, "--report", rep,
                 "--provider", "cpu", "--exclude", "*", "--include", "dfl.*", "--overwrite")
    assert res.exit_code == 0, res.output
    report = json.loads(rep.read_text())
    assert [r["name"] for r in report["layers"]] == ["dfl.conv"]
    assert report["skipped"] == [{"name": "cv2", "op": "Conv", "excluded": True,
                                  "by_rule": True, "reason": "excluded by --exclude '*'"}]
    assert report["options"]["include"] == ["dfl.*"] and report["options"]["exclude"] == ["*"]
    written = {t.name: numpy_helper.to_array(t) for t in onnx.load(out).graph.initializer}
    assert np.array_equal(written["w"], feeds_weight(model, "w"))


def feeds_weight(model, name):
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


def test_graph_notes_are_one_line_by_default_and_each_with_v(tmp_path):
    from test_exporter_patterns import unrolled_rnn

    model, feeds, _, _ = unrolled_rnn()
    onnx.save(model, tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", feeds["x"])
    res = invoke(tmp_path / "m.onnx", "-d", tmp_path / "x.npy", "-o", tmp_path / "o.onnx",
                 "--provider", "cpu")
    assert res.exit_code == 0, res.output
    assert "notes: 2 weight(s) applied by several nodes, 1 recurrent weight(s) (-v shows each" \
        in res.output
    assert "applied by 8 nodes" not in res.output
    res = invoke(tmp_path / "m.onnx", "-d", tmp_path / "x.npy", "-o", tmp_path / "o2.onnx",
                 "--provider", "cpu", "-v")
    assert res.output.count("note: layer step0_") == 3  # 2 pooled, 1 recurrent weight
    assert "its weight is applied by 8 nodes (step0_x, step1_x" in res.output


def test_no_cuda_line_without_a_driver_unless_verbose(tmp_path):
    res = invoke(SAMPLE, "-d", BATCH, "-o", tmp_path / "a.onnx")
    assert res.exit_code == 0
    if "provider cuda" not in res.output:  # no GPU here: the CPU was the expected choice
        assert "CUDA not available" not in res.output
