#!/usr/bin/env bash
# ASGO's root frequency tau, chosen by evidence (issue 13): the tiny GPT on Shakespeare-char,
# tau in {1, 2, 5, 10, 20}, 3 seeds, at ASGO's tuned lr (0.01, the best of the Shakespeare sweep).
#   bash experiments/asgo_tau.sh [OUT] [extra asgo-train overrides...]
# Two processes of one thread each run disjoint taus; a final asgo-compare call per tau reuses
# every finished run and writes OUT/tau<k>/ (results.csv, summary). Then
#   python experiments/asgo_tau_table.py OUT  ->  docs/results/asgo_tau.{csv,md}
# The default precondition_frequency is the largest tau whose final validation loss is within
# one seed standard deviation of tau=1's. The root is Polar Express's, the default when this ran
# (root_method='auto', eigh on the CPU, came later: experiments/asgo_root.sh).
set -euo pipefail
OUT=${1:-runs/experiments/asgo_tau}
shift $(( $# < 1 ? $# : 1 ))
one() {
  local tau=$1; shift
  OMP_NUM_THREADS=1 asgo-compare model=tiny dataset=shakespeare_char compare.out_dir="$OUT/tau$tau" \
    train.train_steps=300 train.batch_size=24 train.eval_interval=50 train.eval_batches=8 \
    train.log_interval=50 compare.seeds=[0,1,2] compare.target_loss=2.2 \
    compare.optimizers=[asgo] compare.lrs.asgo=[0.01] \
    +compare.settings.asgo.precondition_frequency="$tau" +compare.settings.asgo.root_method=polar_express "$@"
}
mkdir -p "$OUT"
( for tau in 1 5 20; do one "$tau" "$@"; done ) > "$OUT/first.log" 2>&1 &
( for tau in 2 10; do one "$tau" "$@"; done ) > "$OUT/second.log" 2>&1 &
wait
