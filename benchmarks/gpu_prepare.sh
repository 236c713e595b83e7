#!/usr/bin/env bash
# Prepares, on a machine with a package registry, what benchmarks/gpu_check.sh needs on the lent
# GPU machine (which has none): the onnxruntime-gpu wheel in four parts under .gpu-wheel/p0..p3
# (by ../shared/tools/ort-gpu-parts, where the checkout has it) and lsuv 0.3.0's wheel (pure
# Python, 6 KB; torch is there already) under .whl/. Both folders are git-ignored; the run calls
# carry them (see the top of benchmarks/gpu_check.sh).
#
#   bash benchmarks/gpu_prepare.sh            # both
#   bash benchmarks/gpu_prepare.sh lsuv       # only lsuv's wheel
set -euo pipefail
top=$(git rev-parse --show-toplevel)
cd "$top"
exclude=$(git rev-parse --git-path info/exclude)
for d in .gpu-wheel .whl; do  # .gitignore names both; a checkout without it: info/exclude
  git check-ignore -q "$d/x" || { mkdir -p "$(dirname "$exclude")"; echo "/$d/" >> "$exclude"; }
done
if [ "${1:-all}" != lsuv ]; then
  parts=../shared/tools/ort-gpu-parts
  if [ -f .gpu-wheel/p3/sha256 ]; then
    echo "onnxruntime-gpu: already in .gpu-wheel/ ($(cat .gpu-wheel/p3/name))"
  elif [ -x "$parts" ]; then
    "$parts"
  else
    echo "onnxruntime-gpu: $parts not found; put the wheel's four parts in .gpu-wheel/p0..p3" >&2
    exit 1
  fi
fi
mkdir -p .whl
rm -f .whl/lsuv-*.whl
python3 -m pip download -q --no-deps --only-binary=:all: -d .whl lsuv==0.3.0
ls .whl/lsuv-0.3.0-py3-none-any.whl
echo "ready: .whl/lsuv-0.3.0-py3-none-any.whl"
