#!/usr/bin/env bash
# The GPU check: clover's CUDA path tested and measured in one run, sized for about 5-6 minutes on an H200 (its
# time limits keep it under 8; it has not run on a GPU yet).
#
#   bash scripts/gpu_check.sh [--out DIR] [--dry-run] [--checks-only | --bench-only]
#
# Results go to DIR (default: $GPU_CHECK_OUT, else $OUT, else runs/gpu_check): gpu_check.json (everything),
# gpu_check.md (a short table), checks.json, bench.json and the two parts' logs. It prints the GPU, driver, torch
# version and date first. Needs torch with CUDA, transformers, accelerate and safetensors; no internet, no model
# download (every model is built from random weights), no pytest (the test helpers are imported with a stand-in
# when pytest is missing). --dry-run runs the same on the CPU with tiny shapes (CI: tests/test_gpu_check.py).
# Exit status 0 only when every check passed and the benchmark ran.
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUTDIR="${GPU_CHECK_OUT:-${OUT:-$ROOT/runs/gpu_check}}"
DRY=()
PARTS=(checks bench)
PY="${PYTHON:-python}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUTDIR="$2"; shift 2 ;;
    --out=*) OUTDIR="${1#--out=}"; shift ;;
    --dry-run) DRY=(--dry-run); shift ;;
    --checks-only) PARTS=(checks); shift ;;
    --bench-only) PARTS=(bench); shift ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
SCRATCH="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
trap 'rm -rf "$SCRATCH"' EXIT
export PYTHONPATH="$ROOT:$ROOT/scripts${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export CLOVER_CACHE="$SCRATCH/clover_cache"   # cost curves of the auto tree: never the user's cache
export TMPDIR="$SCRATCH"

if [ ${#DRY[@]} -eq 0 ]; then
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  # seconds: the sampling checks (last) run until the checks part has spent BUDGET; the part is killed at
  # LIMIT_CHECKS (the report then fails the checks it did not finish); with the bench's limit and the report, the
  # whole run stays under 8 minutes
  BUDGET=230; LIMIT_CHECKS=280; LIMIT_BENCH=150
else
  BUDGET=60; LIMIT_CHECKS=240; LIMIT_BENCH=120
fi
"$PY" -c "import torch, transformers, accelerate, safetensors; print('python', __import__('sys').version.split()[0], \
'torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, \
'accelerate', accelerate.__version__); import datetime as d; print('date', d.datetime.now(d.timezone.utc).strftime('%Y-%m-%d %H:%M:%S UTC'))" \
  || { echo "gpu_check.sh: the python environment lacks torch/transformers/accelerate/safetensors" >&2; exit 2; }
if [ ${#DRY[@]} -eq 0 ] && ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  echo "gpu_check.sh: no CUDA device visible to torch; run with --dry-run for the CPU version" >&2; exit 2
fi
"$PY" -c "import pytest" 2>/dev/null || echo "gpu_check.sh: pytest is not installed; the test helpers are imported with a stand-in"

rm -f "$OUTDIR"/checks.json "$OUTDIR"/bench.json "$OUTDIR"/gpu_check.json "$OUTDIR"/gpu_check.md
for part in "${PARTS[@]}"; do
  limit=$LIMIT_CHECKS; [ "$part" = bench ] && limit=$LIMIT_BENCH
  echo "== $part (at most $limit s) =="
  set -o pipefail
  timeout -k 10 "$limit" "$PY" -m gpu_check "$part" --out "$OUTDIR" --budget "$BUDGET" ${DRY[@]+"${DRY[@]}"} 2>&1 \
    | tee "$OUTDIR/$part.log"
  rc=$?
  set +o pipefail
  [ $rc -eq 124 ] && echo "gpu_check.sh: the $part part ran past $limit s and was stopped"
done
echo "== report =="
"$PY" -m gpu_check report --out "$OUTDIR" --parts "${PARTS[@]}" ${DRY[@]+"${DRY[@]}"}
