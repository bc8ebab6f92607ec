#!/usr/bin/env bash
# One GPU check in under 8 minutes, with only jax (CUDA), flax, optax, orbax, torch and
# torchvision installed (no TensorFlow, TFDS, ml_collections, clu; no network):
#   1. parity of the converted reference C-Tran-R101 with the golden arrays at the highest
#      matmul precision,
#   2. train-step rows of C-Tran-R101 at 576^2 batch 16: float32 / bfloat16 x remat none /
#      encoder (benchmarks/model_step.py),
#   3. the PyTorch stand-in (../shared/bench/torch_ctran_step.py) on the same GPU, float32
#      and bfloat16 autocast.
# Writes OUT/gpu_check.json and OUT/gpu_check.md (the table, also printed) plus one JSON and
# log per section. Each section is its own process under its own time limit.
#
#   bash benchmarks/gpu_check.sh                        # OUT defaults to a new temp dir
#   OUT=/tmp/gc PYTHON=python3 TORCH_PYTHON=python3 bash benchmarks/gpu_check.sh
#   GPU_CHECK_TINY=1 bash benchmarks/gpu_check.sh       # CPU smoke test: tiny model, 64^2
# TORCH_SCRIPT: the stand-in (default ../shared/bench/torch_ctran_step.py); the torch section
# is skipped, and says so, when it is missing or TORCH_PYTHON cannot import torch.
# GPU_CHECK_SECTIONS: a subset of "env parity train torch" (default: all four).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d -t gpu_check.XXXXXX)}
PYTHON=${PYTHON:-python}
TORCH_PYTHON=${TORCH_PYTHON:-$PYTHON}
TORCH_SCRIPT=${TORCH_SCRIPT:-$(cd .. && pwd)/shared/bench/torch_ctran_step.py}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
for n in env parity train torch; do rm -f "$OUT/$n.json" "$OUT/$n.rc"; done
TINY=()
if [ "${GPU_CHECK_TINY:-0}" = 1 ]; then TINY=(--tiny); fi
# Seconds per section; the sum (with imports) stays under 8 minutes.
LIMIT_ENV=${LIMIT_ENV:-20} LIMIT_PARITY=${LIMIT_PARITY:-80}
LIMIT_TRAIN=${LIMIT_TRAIN:-290} LIMIT_TORCH=${LIMIT_TORCH:-70}

SECTIONS=" ${GPU_CHECK_SECTIONS:-env parity train torch} "

section() {  # section NAME LIMIT PYTHON [ARGS...]
  local name=$1 limit=$2 py=$3
  shift 3
  if [[ "$SECTIONS" != *" $name "* ]]; then
    echo "{\"status\": \"skipped\", \"error\": \"not in GPU_CHECK_SECTIONS\"}" > "$OUT/$name.json"
    return
  fi
  local t0=$SECONDS
  timeout -k 5 "$limit" "$py" benchmarks/gpu_check.py --section "$name" \
    --out "$OUT/$name.json" "${TINY[@]}" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$rc" > "$OUT/$name.rc"
  echo "gpu_check: $name exit $rc in $((SECONDS - t0)) s (log: $OUT/$name.log)"
}

section env "$LIMIT_ENV" "$PYTHON"
section parity "$LIMIT_PARITY" "$PYTHON"
section train "$LIMIT_TRAIN" "$PYTHON"
if [[ "$SECTIONS" != *" torch "* ]]; then
  echo '{"status": "skipped", "error": "not in GPU_CHECK_SECTIONS"}' > "$OUT/torch.json"
elif [ ! -f "$TORCH_SCRIPT" ]; then
  echo "{\"status\": \"skipped\", \"error\": \"no stand-in at $TORCH_SCRIPT\"}" > "$OUT/torch.json"
elif ! "$TORCH_PYTHON" -c "import torch, torchvision" > /dev/null 2>&1; then
  echo "{\"status\": \"skipped\", \"error\": \"$TORCH_PYTHON cannot import torch and torchvision\"}" \
    > "$OUT/torch.json"
else
  section torch "$LIMIT_TORCH" "$TORCH_PYTHON" --torch-script "$TORCH_SCRIPT"
fi
echo
"$PYTHON" benchmarks/gpu_check.py --collect "$OUT"
echo "gpu_check: results in $OUT/gpu_check.json and $OUT/gpu_check.md"
