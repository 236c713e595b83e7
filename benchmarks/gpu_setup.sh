#!/usr/bin/env bash
# On the lent GPU machine: one of the four setup calls before benchmarks/gpu_check.sh. Call N
# (0..3) carries .gpu-wheel/pN (made here by benchmarks/gpu_prepare.sh) and copies its part to
# $HOME/ort-gpu-parts; call 3 joins the four, checks the wheel's sha256 and installs
# onnxruntime-gpu into $HOME/site (no registry, no dependencies: the image has numpy,
# protobuf, flatbuffers, sympy, packaging and the NVIDIA CUDA 13 / cuDNN 9 libraries that
# onnxruntime.preload_dlls() loads). $HOME lasts while the machine stays warm (30 s after a
# call): make the five calls back to back. The exact calls are at the top of gpu_check.sh.
#
#   bash benchmarks/gpu_setup.sh N
set -euo pipefail
n=${1:?usage: bash benchmarks/gpu_setup.sh N (0, 1, 2 or 3)}
case "$n" in 0|1|2|3) ;; *) echo "gpu_setup: N must be 0, 1, 2 or 3, not $n" >&2; exit 2;; esac
cd "$(dirname "$0")/.."
store="$HOME/ort-gpu-parts"
src=".gpu-wheel/p$n/part"
if [ ! -f "$src" ]; then
  echo "gpu_setup: $src is missing: this call must carry .gpu-wheel/p$n" \
       "(made by 'bash benchmarks/gpu_prepare.sh')" >&2
  exit 2
fi
[ "$n" = 0 ] && rm -rf "$store"
mkdir -p "$store"
for ((i = 0; i < n; i++)); do
  if [ ! -f "$store/part$i" ]; then
    echo "gpu_setup: part $i is not in $store: the machine was given back between the calls" \
         "(it stays warm 30 s). Start again from part 0, calls back to back." >&2
    exit 2
  fi
done
cp "$src" "$store/part$n"
echo "gpu_setup: part $n stored ($(du -h "$store/part$n" | cut -f1))"
[ "$n" = 3 ] || exit 0

name=$(cat .gpu-wheel/p3/name)
want=$(cat .gpu-wheel/p3/sha256)
cat "$store"/part0 "$store"/part1 "$store"/part2 "$store"/part3 > "$store/$name"
got=$(sha256sum "$store/$name" | cut -d' ' -f1)
if [ "$got" != "$want" ]; then
  echo "gpu_setup: $name: sha256 $got, expected $want: start again from part 0" >&2
  exit 2
fi
rm -rf "$HOME/site"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$HOME/site" \
  "$store/$name"
rm -f "$store"/part?
PYTHONPATH="$HOME/site" python3 -c "
import os, sys, onnxruntime as o
if not o.__file__.startswith(os.path.join(os.environ['HOME'], 'site')):
    sys.exit('gpu_setup: onnxruntime comes from ' + o.__file__ + ', not \$HOME/site')
o.preload_dlls()
print('gpu_setup: installed onnxruntime', o.__version__, 'in', os.path.dirname(o.__file__),
      o.get_available_providers())"
