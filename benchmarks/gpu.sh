#!/usr/bin/env bash
# Every benchmark on CUDA, in one run, as ratios to AdamW measured in the same process.
#
#   bash benchmarks/gpu.sh [OUT_DIR]        # default: benchmarks/results-gpu-<date>
#
# Writes <name>.json and <name>.md (the printed tables) per benchmark, and summary.md, which is
# what goes into docs/results/benchmarks.md ("GPU" section). Needs one CUDA device; about 10 min
# on an H100-class GPU. Shampoo tau=1 is left out of the GPT-2 small rows (3072 x 3072 roots).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${1:-benchmarks/results-gpu-$(date +%Y%m%d-%H%M)}
mkdir -p "$OUT"
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device")'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" || true

run() {  # run NAME ARGS...: the benchmark's stdout to NAME.md and its numbers to NAME.json
    local name=$1; shift
    echo "== $name: $*"
    "$PY" "$@" --json "$OUT/$name.json" | tee "$OUT/$name.md"
}

run train_tiny     benchmarks/train_step.py --model tiny    --device cuda --batch-size 16 --warmup 5 --repeats 50
run train_nanogpt  benchmarks/train_step.py --model nanogpt --device cuda --batch-size 16 --warmup 5 --repeats 30
run train_gpt2     benchmarks/train_step.py --model gpt2    --device cuda --batch-size 8  --warmup 3 --repeats 20 \
                   --exclude "shampoo tau=1"
run step_nanogpt   benchmarks/step_time.py  --model nanogpt --device cuda --warmup 5 --repeats 30
run step_gpt2      benchmarks/step_time.py  --model gpt2    --device cuda --warmup 3 --repeats 20 --exclude "shampoo tau=1"
run memory         benchmarks/memory.py     --device cuda

{
    echo "GPU: $(cat "$OUT/gpu.txt" 2>/dev/null || echo unknown); torch $("$PY" -c 'import torch; print(torch.__version__)')"
    for name in train_tiny train_nanogpt train_gpt2 step_nanogpt step_gpt2 memory; do
        echo; echo "### $name"; echo; cat "$OUT/$name.md"
    done
} > "$OUT/summary.md"
echo "wrote $OUT/summary.md"
