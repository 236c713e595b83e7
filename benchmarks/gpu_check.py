"""The GPU check (issue 30): the CUDA-marked tests, then ResNet-50 224x224 at batch 32 with
onnx-lsuv on ONNX Runtime's CUDA provider against lsuv 0.3.0 on torch CUDA, side by side in
one run; one JSON and one markdown table against the goals (lsuv 0.3.0 / ours >= 10x, ours
<= 3 forward-equivalents of a plain CUDA ORT forward).

    bash benchmarks/gpu_check.sh [OUT_DIR]          # on the lent GPU machine: see its header
    python benchmarks/gpu_check.py --out OUT_DIR    # the same, where the environment is ready

Everything runs under one deadline (--budget, 450 s: the check fits one 8-minute device call);
each step gets what is left, so a slow step is cut off and said, never left hanging. Where
CUDA is absent (no GPU, no driver, onnxruntime without its CUDA provider, torch without CUDA)
nothing runs: it says so and how to run the check, and exits 2.

Exit status: 0 every step ran and the CUDA tests passed (the goals may be met or not: the
table says); 1 a step failed or was cut off; 2 CUDA is not available here (nothing run).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

EXIT_NO_CUDA = 2
GOAL_RATIO = 10.0  # lsuv 0.3.0 / ours, at least
GOAL_FWD_EQ = 3.0  # ours in plain CUDA forwards, at most
# made here by benchmarks/gpu_prepare.sh, carried to the GPU machine (git-ignored)
LSUV_WHEEL = os.path.join(ROOT, ".whl", "lsuv-0.3.0-py3-none-any.whl")
HOW_TO_RUN = ("The check runs on the lent GPU machine: prepare here with "
              "'bash benchmarks/gpu_prepare.sh', then make the five device calls listed at the "
              "top of benchmarks/gpu_check.sh (four setup calls, then the check).")


class Deadline:
    """Seconds left of the check's budget; each step's timeout is what is left of it."""

    def __init__(self, budget_s: float) -> None:
        self.end = time.monotonic() + budget_s

    def left(self, reserve: float = 0.0) -> float:
        return max(self.end - time.monotonic() - reserve, 1.0)


def lsuv_path() -> list[str]:
    """Where lsuv 0.3.0 is not installed (the GPU machine has no registry): its carried wheel,
    importable as it is (pure Python, metadata included), for the PYTHONPATH."""
    from importlib.util import find_spec

    return [LSUV_WHEEL] if find_spec("lsuv") is None and os.path.exists(LSUV_WHEEL) else []


def _python(code: str, timeout: float, path: list[str] = ()) -> subprocess.CompletedProcess:
    """``code`` in a fresh Python with benchmarks/ (and ``path``) importable (torch stays out
    of this process: its CUDA context and threads never meet ONNX Runtime's)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in [HERE, ROOT, *path, os.environ.get("PYTHONPATH", "")] if p))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=timeout)


def preflight(deadline: Deadline) -> tuple[dict, list[str]]:
    """Whether ONNX Runtime's CUDA provider and torch's CUDA work here: the facts, and what is
    missing (empty when both work)."""
    import onnxruntime as ort

    from onnx_lsuv import ProviderError
    from onnx_lsuv.engine import Engine

    facts: dict = dict(onnxruntime=ort.__version__, onnxruntime_file=ort.__file__,
                       providers=ort.get_available_providers())
    missing: list[str] = []
    try:  # preloads the pip CUDA libraries and checks that a session really runs on CUDA
        Engine("cuda")
    except ProviderError as err:
        hint = ("" if "CUDAExecutionProvider" in facts["providers"] else
                " (is onnxruntime-gpu installed and first on PYTHONPATH? the four setup calls "
                "put it in $HOME/site)")
        missing.append(f"onnxruntime {ort.__version__} ({ort.__file__}): {err}{hint}")
    try:
        out = _python("import json, torch\n"
                      "ok = torch.cuda.is_available()\n"
                      "print(json.dumps(dict(torch=torch.__version__, cuda=ok, "
                      "device=torch.cuda.get_device_name(0) if ok else None)))",
                      min(120.0, deadline.left()))
        if out.returncode != 0:
            missing.append(f"torch: {out.stderr.strip().splitlines()[-1:]}")
        else:
            facts.update(json.loads(out.stdout.strip().splitlines()[-1]))
            if not facts["cuda"]:
                missing.append(f"torch {facts['torch']}: torch.cuda.is_available() is False")
    except subprocess.TimeoutExpired:
        missing.append("torch: 'import torch; torch.cuda.is_available()' did not answer in time")
    return facts, missing


def cuda_test_files() -> list[str]:
    """The test files that hold CUDA-marked tests."""
    files = []
    for path in sorted(glob.glob(os.path.join(ROOT, "tests", "test_*.py"))):
        with open(path, encoding="utf-8") as f:
            if "pytest.mark.cuda" in f.read():
                files.append(path)
    return files


def run_cuda_tests(out_dir: str, deadline: Deadline) -> dict:
    """``pytest -m cuda`` over the files that have such tests; counts from its JUnit XML."""
    files = cuda_test_files()
    xml_path = os.path.join(out_dir, "cuda-tests.xml")
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
           "-rs", f"--junitxml={xml_path}", *files]
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                              timeout=min(240.0, deadline.left(reserve=150.0)))
        rc, log = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        rc, log = None, f"{err.stdout or ''}{err.stderr or ''}\ncut off after {err.timeout:.0f} s"
        log = log if isinstance(log, str) else log.decode(errors="replace")
    with open(os.path.join(out_dir, "cuda-tests.log"), "w") as f:
        f.write(log)
    counts = dict(tests=0, failures=0, errors=0, skipped=0)
    if os.path.exists(xml_path):
        for suite in ET.parse(xml_path).getroot().iter("testsuite"):
            for k in counts:
                counts[k] += int(suite.get(k, 0))
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return dict(files=[os.path.relpath(p, ROOT) for p in files], returncode=rc,
                seconds=time.perf_counter() - t, passed=passed, **counts,
                ok=rc == 0 and passed > 0 and counts["skipped"] == 0,
                tail=log.strip().splitlines()[-1] if log.strip() else "")


def bench(tmp: str, deadline: Deadline, batch: int, hw: int, reps: int,
          provider: str = "cuda", reference: bool = True) -> dict:
    """ResNet-50 at ``batch`` x 3 x ``hw`` x ``hw``: a plain ORT forward, ours end to end, both
    on ``provider``, and lsuv 0.3.0 on torch (fresh process) on the same device, on the same
    weights and batch."""
    import numpy as np
    import onnxruntime as ort

    from onnx_lsuv import lsuv_init

    from run import plain_session

    row: dict = dict(model="resnet50", batch=batch, hw=hw, provider=provider)
    path = os.path.join(tmp, "resnet50.onnx")
    shape = (batch, 3, hw, hw)
    t = time.perf_counter()
    exp = _python("import torch, torch_models; torch.manual_seed(0); torch_models.export_onnx("
                  f"torch_models.MODELS['resnet50_like'](), {shape!r}, {path!r})",
                  min(180.0, deadline.left(reserve=90.0)))
    if exp.returncode != 0:
        raise RuntimeError(f"the ResNet-50 export failed: {exp.stderr.strip()[-2000:]}")
    row["export_s"] = time.perf_counter() - t
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)

    sess = plain_session(path, provider)
    row["forward_providers"] = sess.get_providers()
    if provider == "cuda" and sess.get_providers()[0] != "CUDAExecutionProvider":
        raise RuntimeError(f"the plain session runs on {sess.get_providers()}, not CUDA")
    name = sess.get_inputs()[0].name
    for _ in range(3):  # warm-up: cuDNN's algorithm choice, the arena
        sess.run(None, {name: x})
    fwd = []
    for _ in range(20):
        t = time.perf_counter()
        sess.run(None, {name: x})
        fwd.append(time.perf_counter() - t)
    row["forward_s"] = statistics.median(fwd)
    del sess

    ours, results = [], []
    for _ in range(reps):  # the first includes this process's first onnx-lsuv CUDA sessions
        t = time.perf_counter()
        results.append(lsuv_init(path, x, provider=provider))
        ours.append(time.perf_counter() - t)
    rep = results[-1].report
    row.update(ours_runs_s=ours, ours_s=statistics.median(ours), ours_provider=rep.provider,
               converged=rep.converged, measured_in=rep.measured_in,
               worst=max(abs(r.var_after - 1.0) for r in rep.layers if r.var_after is not None),
               layers=len(rep.layers), onnxruntime=ort.__version__,
               **{k: statistics.median(r.report.timings.get(k, 0.0) for r in results)
                  for k in ("init_s", "one_pass_s", "verify_s", "retry_s")})
    row["fwd_eq"] = row["ours_s"] / row["forward_s"]
    if rep.provider != provider:
        raise RuntimeError(f"onnx-lsuv ran on {rep.provider}, not {provider}")
    del results

    if not reference:
        row["lsuv030_skipped"] = True
        return row
    try:
        ref = _python("import json; from bench_lsuv_torch import time_lsuv_torch; "
                      f"print(json.dumps(time_lsuv_torch('resnet50_like', {batch}, {hw}, "
                      f"device={provider!r}, forward_reps=20)))", deadline.left(reserve=10.0),
                      lsuv_path())
    except subprocess.TimeoutExpired:
        row["lsuv030_error"] = "lsuv 0.3.0 was cut off at the check's deadline"
        return row
    if ref.returncode != 0:
        last = ref.stderr.strip().splitlines()[-1:] or ["(no message)"]
        row["lsuv030_error"] = last[0] + (
            " (carry .whl with lsuv 0.3.0's wheel: bash benchmarks/gpu_prepare.sh lsuv)"
            if "No module named 'lsuv'" in last[0] else "")
        return row
    r = json.loads(ref.stdout.strip().splitlines()[-1])
    row.update(lsuv030_s=r["seconds"], torch_forward_s=r["forward_seconds"],
               lsuv030_forwards=r["n_forwards"], lsuv030_worst=r["max_std_err"],
               torch=r["torch_version"], lsuv=r["lsuv_version"], device=r["device"])
    row["ratio"] = row["lsuv030_s"] / row["ours_s"]
    return row


def _met(ok: bool | None) -> str:
    return "not measured" if ok is None else ("met" if ok else "not met")


def markdown(result: dict) -> str:
    """The check's table and its goals."""
    b, tests, facts = result.get("bench", {}), result.get("tests", {}), result["facts"]
    title = ("DRY RUN on the CPU, not the GPU check" if "dry_run" in facts
             else f"GPU check, {facts.get('device')}")
    lines = [f"### {result['date']}: {title}", "",
             f"Command: `{result['command']}` ({result['wall_s']:.0f} s). onnx_lsuv at "
             f"{result['onnx_lsuv_commit'] or 'an unknown commit'}, onnxruntime "
             f"{facts.get('onnxruntime')}, torch {facts.get('torch')}, lsuv "
             f"{b.get('lsuv', '-')}.", ""]
    if "forward_s" in b:
        ratio = f"{b['ratio']:.1f}x" if "ratio" in b else "-"
        lsuv = (f"{b['lsuv030_s']:.2f}" if "lsuv030_s" in b else
                "skipped" if b.get("lsuv030_skipped") else b.get("lsuv030_error", "-"))
        tfwd = f"{b['torch_forward_s'] * 1e3:.1f}" if "torch_forward_s" in b else "-"
        dev = b["provider"].upper()
        lines += [
            f"| model | batch x hw | ORT {dev} forward ms | ours end to end s (fwd-eq) "
            f"| ortho init s | one-pass s | re-measure s | lsuv 0.3.0 on torch {dev} s "
            f"| lsuv 0.3.0 / ours | torch {dev} forward ms | worst abs(var-1) | converged |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
            f"| ResNet-50 | {b['batch']} x {b['hw']} | {b['forward_s'] * 1e3:.1f} | "
            f"{b['ours_s']:.2f} ({b['fwd_eq']:.1f}) | {b['init_s']:.2f} | "
            f"{b['one_pass_s']:.2f} | {b['verify_s']:.2f} | {lsuv} | {ratio} | {tfwd} | "
            f"{b['worst']:.3g} | {'yes' if b['converged'] else 'no'} |", ""]
    elif "error" in b:
        lines += [f"Benchmark failed: {b['error']}", ""]
    ratio, fwd_eq = b.get("ratio"), b.get("fwd_eq")
    failed = tests.get("failures", 0) + tests.get("errors", 0)
    lines += ["| goal | measured | met? |", "|---|---|---|",
              f"| CUDA-marked tests pass, none skipped | {tests.get('passed', 0)} passed, "
              f"{failed} failed, {tests.get('skipped', 0)} skipped ({tests.get('tail', '-')}) "
              f"| {_met(tests.get('ok') if tests else None)} |",
              f"| lsuv 0.3.0 / ours >= {GOAL_RATIO:.0f}x | "
              f"{'-' if ratio is None else f'{ratio:.1f}x'} "
              f"| {_met(None if ratio is None else ratio >= GOAL_RATIO)} |",
              f"| ours <= {GOAL_FWD_EQ:.0f} forward-equivalents | "
              f"{'-' if fwd_eq is None else f'{fwd_eq:.2f}'} "
              f"| {_met(None if fwd_eq is None else fwd_eq <= GOAL_FWD_EQ)} |"]
    return "\n".join(lines) + "\n"


def _commit() -> str | None:
    out = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True)
    return out.stdout.strip() or os.environ.get("ONNX_LSUV_COMMIT") or None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu-check-out",
                    help="directory for gpu_check.json, gpu_check.md and the test log "
                         "(default: $OUT, else ./gpu-check-out)")
    ap.add_argument("--budget", type=float, default=450.0,
                    help="seconds for the whole check (default: %(default)s)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--hw", type=int, default=224)
    ap.add_argument("--reps", type=int, default=3, help="onnx-lsuv runs (median)")
    ap.add_argument("--skip-tests", action="store_true", help="benchmark only")
    ap.add_argument("--skip-lsuv", action="store_true", help="no lsuv 0.3.0 column")
    ap.add_argument("--provider", choices=["cuda", "cpu"], default="cuda",
                    help="cpu: a dry run of the same steps on the CPU (ONNX Runtime and torch), "
                         "to check this script where there is no GPU; its figures are not the "
                         "check's (default: %(default)s)")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    deadline = Deadline(args.budget)

    facts, missing = preflight(deadline)
    if args.provider == "cpu":
        facts["dry_run"] = "provider cpu: not the GPU check"
    elif missing:
        print("gpu_check: CUDA is not available here, so nothing was run:\n  - "
              + "\n  - ".join(missing) + "\n" + HOW_TO_RUN, file=sys.stderr)
        return EXIT_NO_CUDA
    else:
        print(f"gpu_check: CUDA works: {facts.get('device')}, onnxruntime "
              f"{facts['onnxruntime']}, torch {facts.get('torch')}", file=sys.stderr)
    os.makedirs(args.out, exist_ok=True)
    result: dict = dict(facts=facts, onnx_lsuv_commit=_commit(),
                        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                        command="bash benchmarks/gpu_check.sh" if os.environ.get(
                            "GPU_CHECK_SH") else "python benchmarks/gpu_check.py "
                        + " ".join(argv if argv is not None else sys.argv[1:]))
    if not args.skip_tests:
        result["tests"] = run_cuda_tests(args.out, deadline)
        print(f"gpu_check: CUDA tests: {result['tests']['tail']}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="onnx-lsuv-gpu-") as tmp:
        try:
            result["bench"] = bench(tmp, deadline, args.batch, args.hw, args.reps,
                                    args.provider, not args.skip_lsuv)
        except Exception as err:  # said in the table and the exit status, never swallowed
            result["bench"] = dict(error=f"{type(err).__name__}: {err}")
    result["wall_s"] = time.perf_counter() - start
    text = markdown(result)
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(args.out, "gpu_check.md"), "w") as f:
        f.write(text)
    print(text)
    ok = ("error" not in result["bench"] and "lsuv030_error" not in result["bench"]
          and (args.skip_tests or result["tests"]["ok"]))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
