"""benchmarks/gpu_check.sh and gpu_check.py where CUDA is absent: a clear failure within seconds
(never a hang), and the dry run of the same steps on the CPU writes its JSON and table."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest

from onnx_lsuv import ProviderError
from onnx_lsuv.engine import Engine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cuda_works() -> bool:
    try:
        Engine("cuda")
    except ProviderError:
        return False
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _env(**extra: str) -> dict:
    env = dict(os.environ, PYTHON=sys.executable, **extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [ROOT, env.get("PYTHONPATH", "")] if p)
    env.pop("OUT", None)
    return env


@pytest.mark.skipif(_cuda_works(), reason="CUDA works here: the no-CUDA path cannot be seen")
def test_without_cuda_the_check_says_so_and_how_to_run_it(tmp_path):
    out = tmp_path / "out"
    t = time.monotonic()
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", str(out)], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=120)
    seconds = time.monotonic() - t
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert seconds < 90
    assert "CUDA is not available here, so nothing was run" in proc.stderr
    assert "the CUDA provider is not available" in proc.stderr  # onnxruntime's reason
    assert "torch.cuda.is_available() is False" in proc.stderr or "torch:" in proc.stderr
    assert "benchmarks/gpu_prepare.sh" in proc.stderr
    assert "top of benchmarks/gpu_check.sh" in proc.stderr
    assert not out.exists()  # nothing ran, nothing written


def test_the_run_sequence_at_the_top_of_the_script_names_scripts_and_paths_that_exist():
    with open(os.path.join(ROOT, "benchmarks", "gpu_check.sh")) as f:
        head = f.read().split("set -uo pipefail")[0]
    calls = [line.strip("# ").strip() for line in head.splitlines() if "run(command=" in line]
    assert len(calls) == 5
    for i in range(4):
        assert calls[i].startswith(f'run(command="bash benchmarks/gpu_setup.sh {i}", '
                                   f'carry=[".gpu-wheel/p{i}"]')
    assert calls[4].startswith('run(command="bash benchmarks/gpu_check.sh", carry=[".whl"]')
    timeouts = [int(c.split("timeout_s=")[1].rstrip(")")) for c in calls]
    assert timeouts[4] <= 480  # the check: one call of at most 8 minutes
    for script in ("gpu_setup.sh", "gpu_prepare.sh", "gpu_check.py"):
        assert os.path.exists(os.path.join(ROOT, "benchmarks", script))


def test_a_setup_call_without_its_part_says_which_to_carry(tmp_path):
    proc = subprocess.run(["bash", "benchmarks/gpu_setup.sh", "2"], cwd=ROOT,
                          env=_env(HOME=str(tmp_path)), capture_output=True, text=True,
                          timeout=60)
    if os.path.exists(os.path.join(ROOT, ".gpu-wheel", "p2", "part")):
        pytest.skip("this checkout holds the wheel's parts")
    assert proc.returncode == 2
    assert ".gpu-wheel/p2/part is missing: this call must carry .gpu-wheel/p2" in proc.stderr


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs torch")
def test_the_dry_run_on_the_cpu_writes_the_json_and_the_table(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--out", str(out), "--provider", "cpu",
         "--skip-tests", "--skip-lsuv", "--batch", "2", "--hw", "32", "--reps", "1"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    with open(out / "gpu_check.json") as f:
        result = json.load(f)
    b = result["bench"]
    assert "error" not in b, b
    assert b["ours_provider"] == "cpu" and b["forward_providers"] == ["CPUExecutionProvider"]
    assert b["layers"] == 54  # ResNet-50: 53 convs and the fc
    assert b["fwd_eq"] == pytest.approx(b["ours_s"] / b["forward_s"])
    text = (out / "gpu_check.md").read_text()
    assert "DRY RUN on the CPU, not the GPU check" in text
    assert "| ORT CPU forward ms |" in text
    assert f"({b['fwd_eq']:.1f})" in text
    assert f"| ours <= 3 forward-equivalents | {b['fwd_eq']:.2f} |" in text
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| lsuv 0.3.0 / ours >= 10x | - | not measured |" in text  # --skip-lsuv
