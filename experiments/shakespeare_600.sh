#!/usr/bin/env bash
# Quality per step and per second (issue 13): the tiny GPT on Shakespeare-char, 600 steps, AdamW,
# Muon, ASGO, DASGO and Shampoo, 5-point learning-rate grids (factor 2 apart, centred on each
# optimizer's best of the 150-step sweep, DASGO's widened to 0.016), seeds 0 and 1 on the whole
# grid (SEEDS=[0] for one seed).
#   bash experiments/shakespeare_600.sh [OUT] [extra asgo-compare overrides...]
# Two processes of one thread each run disjoint halves; a final call (reusing every finished run)
# writes OUT/results.{csv,md} and the plots. A best lr on a grid edge: add points with
# compare.lrs.<name>=[...] and rerun (finished runs are reused).
# Muon's Newton-Schulz runs in float32 here: this CPU has no bfloat16 matrix units, where torch's
# bfloat16 default is about 5x slower (on a GPU bfloat16 is the fast path). Shampoo recomputes its
# roots every 10 steps (every step costs far more than the others on CPU).
set -euo pipefail
OUT=${1:-runs/experiments/shakespeare_600}
shift $(( $# < 1 ? $# : 1 ))
compare() {
  OMP_NUM_THREADS=1 asgo-compare model=tiny dataset=shakespeare_char compare.out_dir="$OUT" \
    train.train_steps=600 train.batch_size=24 train.eval_interval=50 train.eval_batches=8 \
    train.log_interval=50 compare.seeds=${SEEDS:-[0,1]} compare.target_loss=1.9 \
    compare.lrs.adamw=[0.001,0.002,0.004,0.008,0.016] \
    compare.lrs.muon=[0.005,0.01,0.02,0.04,0.08] \
    compare.lrs.asgo=[0.0025,0.005,0.01,0.02,0.04] \
    compare.lrs.dasgo=[0.0005,0.001,0.002,0.004,0.008,0.016] \
    compare.lrs.shampoo=[0.00025,0.0005,0.001,0.002,0.004] \
    +compare.settings.muon.ns_dtype=float32 +compare.settings.shampoo.precondition_frequency=10 "$@"
}
mkdir -p "$OUT"
( compare compare.optimizers=[asgo,adamw] "$@"; compare compare.optimizers=[shampoo] compare.lrs.shampoo=[0.00025,0.0005,0.001] "$@" ) > "$OUT/first_half.log" 2>&1 &
( compare compare.optimizers=[muon,dasgo] "$@"; compare compare.optimizers=[shampoo] compare.lrs.shampoo=[0.002,0.004] "$@" ) > "$OUT/second_half.log" 2>&1 &
wait
compare compare.optimizers=[adamw,muon,asgo,dasgo,shampoo] "$@"
