#!/usr/bin/env bash
# Run every exporter into OUTDIR/<framework>/, check each model in ONNX Runtime (CPU) against
# the framework's own output, and write the condensed survey to OUTDIR/survey.txt.
# Usage: bash tests/exporters/run_all.sh OUTDIR
# Venvs: /work/fw/{tf,jax,paddle} and the project's .venv (override with TF_PY, JAX_PY,
# PADDLE_PY, MAIN_PY). A framework whose python is missing is skipped.
set -u
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:?usage: run_all.sh OUTDIR}"
mkdir -p "$out"
MAIN_PY="${MAIN_PY:-$here/../../.venv/bin/python}"
declare -A PY=(
  [keras]="${TF_PY:-/work/fw/tf/bin/python}"
  [flax]="${JAX_PY:-/work/fw/jax/bin/python}"
  [paddle]="${PADDLE_PY:-/work/fw/paddle/bin/python}"
  [sklearn]="$MAIN_PY"
)
export POLYGRAPHY_AUTOINSTALL_DEPS=0
rc=0
dirs=()
for fw in keras flax paddle sklearn; do
  py="${PY[$fw]}"
  if [ ! -x "$py" ]; then echo "SKIP $fw: no $py"; continue; fi
  start=$(date +%s.%N)
  "$py" "$here/export_$fw.py" "$out/$fw" > "$out/$fw.log" 2>&1 || rc=1
  end=$(date +%s.%N)
  grep -E "^(OK|FAIL|XFAIL)" "$out/$fw.log"
  printf 'TIME %s: %.1f s (whole script, with imports)\n' "$fw" "$(echo "$end - $start" | bc)"
  dirs+=("$out/$fw")
done
"$MAIN_PY" "$here/check_ort.py" "${dirs[@]}" || rc=1
for d in "${dirs[@]}"; do "$MAIN_PY" "$here/survey.py" --condensed "$d"/*.onnx; done \
  > "$out/survey.txt" 2>&1 || rc=1
echo "survey: $out/survey.txt"
exit $rc
