#!/usr/bin/env bash
# ASGO's root on the CPU (issue 13): LAPACK eigh against the 10-step Polar Express iteration, at
# tau = 1 and the default tau = 5, on the tiny GPT (Shakespeare-char, 300 steps, lr 0.01, 3 seeds;
# the settings of experiments/asgo_tau.sh, whose Polar Express runs these repeat).
#   bash experiments/asgo_root.sh [OUT] [extra asgo-compare overrides...]
# Writes OUT/<method>_tau<k>/results.{csv,md}; docs/results/asgo_root.md has the table.
set -euo pipefail
OUT=${1:-runs/experiments/asgo_root}
shift $(( $# < 1 ? $# : 1 ))
one() {
  local method=$1 tau=$2; shift 2
  OMP_NUM_THREADS=1 asgo-compare model=tiny dataset=shakespeare_char compare.out_dir="$OUT/${method}_tau$tau" \
    train.train_steps=300 train.batch_size=24 train.eval_interval=50 train.eval_batches=8 \
    train.log_interval=50 compare.seeds=[0,1,2] compare.target_loss=2.2 \
    compare.optimizers=[asgo] compare.lrs.asgo=[0.01] \
    +compare.settings.asgo.precondition_frequency="$tau" +compare.settings.asgo.root_method="$method" "$@"
}
mkdir -p "$OUT"
( one eigh 1 "$@"; one eigh 5 "$@" ) > "$OUT/eigh.log" 2>&1 &
( one polar_express 1 "$@"; one polar_express 5 "$@" ) > "$OUT/polar_express.log" 2>&1 &
wait
