#!/usr/bin/env bash
# The GPU check of issue 30 in ONE device call of at most 8 minutes: the CUDA-marked tests, then
# ResNet-50 224x224 at batch 32, onnx-lsuv on ONNX Runtime's CUDA provider (end to end, and in
# forward-equivalents of a plain CUDA ORT forward) against lsuv 0.3.0 on torch CUDA. Writes
# gpu_check.json, gpu_check.md, cuda-tests.log and cuda-tests.xml into $OUT (or OUT_DIR, the
# first argument). Goals: lsuv 0.3.0 / ours >= 10x, ours <= 3 forward-equivalents.
#
# The lent machine (Python 3.12, torch 2.11 CUDA, onnx, CPU onnxruntime) has no registry. Once,
# here, in the repo root (needs pip and network; fills the git-ignored .gpu-wheel/ and .whl/):
#
#   bash benchmarks/gpu_prepare.sh
#
# (in the main checkout: ../shared/tools/ort-gpu-parts writes .git/info, which a git worktree's
# .git file does not have). The device copy may have no .git: to name the commit in the table,
# set ONNX_LSUV_COMMIT=<sha> before bash in the check's command.
#
# Then five `run` calls, back to back (the machine stays warm 30 s after a call, and $HOME/site
# lasts only as long as the machine):
#
#   run(command="bash benchmarks/gpu_setup.sh 0", carry=[".gpu-wheel/p0"], timeout_s=120)
#   run(command="bash benchmarks/gpu_setup.sh 1", carry=[".gpu-wheel/p1"], timeout_s=120)
#   run(command="bash benchmarks/gpu_setup.sh 2", carry=[".gpu-wheel/p2"], timeout_s=120)
#   run(command="bash benchmarks/gpu_setup.sh 3", carry=[".gpu-wheel/p3"], timeout_s=180)
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=480)
#
# The files come back under the reply's files_at; commit the table to benchmarks/RESULTS.md.
# Where CUDA is absent (this script run anywhere else) it says so and exits 2 within seconds.
# Exit status: 0 every step ran and the CUDA tests passed (goals met or not: the table says);
# 1 a step failed or was cut off; 2 CUDA not available (nothing run).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu-check-out}}
py=${PYTHON:-python3}
# onnxruntime-gpu from the setup calls first (it shadows the image's CPU onnxruntime), then this
# checkout; onnx_lsuv_cli (cli/) through a link, as an install would name it
shim=$(mktemp -d)
ln -s "$PWD/cli" "$shim/onnx_lsuv_cli"
export PYTHONPATH="$HOME/site:$PWD:$shim${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 GPU_CHECK_SH=1
# lsuv 0.3.0: installed, else gpu_check.py imports it from the carried .whl/ (pure Python)
# the Python check keeps its own 450 s deadline; this is the last guard against a hang
timeout -k 10 470 "$py" benchmarks/gpu_check.py --out "$out" --budget 450
rc=$?
rm -rf "$shim"
[ "$rc" = 124 ] && echo "gpu_check: cut off after 470 s" >&2
exit "$rc"
