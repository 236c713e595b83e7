"""benchmarks/sweep.py --quick: every axis measured on the models it names, the three files
written, and the figures in them consistent with each other."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("torch")  # the ResNets and the encoder are exported from PyTorch
pytest.importorskip("matplotlib")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [ROOT, env.get("PYTHONPATH", "")] if p)
    return env


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    proc = subprocess.run([sys.executable, "benchmarks/sweep.py", "--quick", "--out", str(out)],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "sweep.json") as f:
        data = json.load(f)
    return out, data


def test_every_axis_runs_its_points_on_the_models_it_names(quick):
    _, data = quick
    rows = data["rows"]
    got = {a: [(r["value"], r["input_shape"]) for r in rows if r["axis"] == a]
           for a in ("depth", "width", "batch", "seq")}
    assert got == {
        "depth": [(18, [2, 3, 32, 32]), (34, [2, 3, 32, 32])],
        "width": [(64, [16, 256]), (128, [16, 256])],
        "batch": [(2, [2, 3, 8, 8]), (4, [4, 3, 8, 8])],
        "seq": [(8, [2, 8, 8]), (16, [2, 16, 8])],
    }
    layers = {(r["axis"], r["value"]): r["layers"] for r in rows}
    # ResNet-18: stem + 8 blocks x 2 convs + 3 downsample 1x1 + fc; ResNet-34: 16 blocks x 2
    assert layers["depth", 18] == 1 + 16 + 3 + 1 == 21
    assert layers["depth", 34] == 1 + 32 + 3 + 1 == 37
    # FitNet-4: 17 convs and 2 fc
    assert layers["batch", 2] == layers["batch", 4] == 17 + 2
    # the encoder (2 layers): embed + 2 x (q, k, v, o, fc1, fc2) + head
    assert layers["seq", 8] == layers["seq", 16] == 1 + 2 * 6 + 1
    for r in rows:
        if r["axis"] == "width":  # 256 -> w, w -> w and w -> 10 Gemms, with biases
            w = r["value"]
            assert r["layers"] == 3
            assert r["params"] == (256 * w + w) + (w * w + w) + (10 * w + 10)


def test_the_ratios_are_the_measured_seconds_divided(quick):
    _, data = quick
    for r in data["rows"]:
        assert r["forward_s"] > 0 and r["ours_s"] > 0 and 0 < r["init_s"] < r["ours_s"]
        assert r["runs"] == 1  # --quick: one run each
        assert r["fwd_eq"] == pytest.approx(r["ours_s"] / r["forward_s"])
        assert r["init_fwd_eq"] == pytest.approx(r["init_s"] / r["forward_s"])
        assert r["rest_fwd_eq"] == pytest.approx((r["ours_s"] - r["init_s"]) / r["forward_s"])
    with_memory = [r for r in data["rows"] if "peak_ours_mb" in r]
    assert [(r["axis"], r["value"]) for r in with_memory] == [("seq", 16)]  # --quick: the last
    assert with_memory[0]["peak_forward_mb"] > 0 and with_memory[0]["peak_ours_mb"] > 0


def test_the_table_and_the_plot_show_the_json(quick):
    out, data = quick
    text = (out / "SWEEP.md").read_text()
    assert "python benchmarks/sweep.py --quick --out" in text
    commit = subprocess.run(["git", "-C", data["meta"]["onnx_lsuv_path"], "rev-parse", "--short",
                             "HEAD"], capture_output=True, text=True).stdout.strip()
    if commit:  # a git checkout: the table names the commit the sweep ran on
        assert data["meta"]["onnx_lsuv_commit"] == commit
        assert f"at commit {commit}" in text
    for title in ("### depth", "### width", "### batch", "### sequence length"):
        assert title in text
    table_rows = [line for line in text.splitlines()
                  if re.match(r"\| (ResNet|MLP|encoder|FitNet)", line)]
    assert len(table_rows) == len(data["rows"])
    for line, r in zip(table_rows, data["rows"]):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1] == " x ".join(map(str, r["input_shape"]))
        assert cells[6] == f"{r['fwd_eq']:.2f}"
    import matplotlib.image

    png = matplotlib.image.imread(out / "sweep.png")
    assert png.shape[:2] == (880, 1210)  # 11 x 8 inches at 110 dpi: the four panels


def test_an_unknown_axis_is_refused_by_name():
    proc = subprocess.run([sys.executable, "benchmarks/sweep.py", "--out", "unused", "--axes",
                           "depth,colour"], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert "--axes: unknown axis colour" in proc.stderr
    assert not os.path.exists(os.path.join(ROOT, "unused"))
