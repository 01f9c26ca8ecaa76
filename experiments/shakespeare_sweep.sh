#!/usr/bin/env bash
# Experiment 1: the tiny GPT on Shakespeare-char, 8 optimizers x 3 learning rates x 3 seeds
# (the ASGO paper's NanoGPT/Shakespeare figure and its Figure 5 lr sensitivity, CPU-sized).
#   bash experiments/shakespeare_sweep.sh [DATA] [OUT] [extra asgo-compare overrides...]
# DATA is the directory holding shakespeare_char/input.txt. Two processes of one thread each run
# disjoint halves of the optimizers (72 runs of about 30-45 s each: well under an hour on 2 cores),
# then a third call, which reuses every finished run, writes the table and plots to OUT.
# Shampoo recomputes its roots every 10 steps here (every step costs 16x an AdamW step on CPU).
# GoLore is pure GoLore here (random bases from the first refresh): with 150 steps and a refresh
# every 50, GoLore@20% would switch after the last refresh and equal GaLore.
# On a GPU, the ASGO paper's scale is model=nanogpt train.batch_size=64 train.train_steps=5000.
set -euo pipefail
DATA=${1:-${ASGO_DATA_DIR:-$HOME/.cache/asgo/data}}
OUT=${2:-runs/experiments/shakespeare}
shift $(( $# < 2 ? $# : 2 ))
compare() {
  OMP_NUM_THREADS=1 asgo-compare model=tiny dataset=shakespeare_char \
    train.dataset_path="$DATA" compare.out_dir="$OUT" \
    train.train_steps=150 train.batch_size=24 train.eval_interval=25 train.eval_batches=6 \
    train.log_interval=25 compare.seeds=[0,1,2] compare.target_loss=2.5 \
    +compare.settings.shampoo.precondition_frequency=10 +compare.settings.golore.golore_fraction=1.0 "$@"
}
mkdir -p "$OUT"
compare compare.optimizers=[adamw,muon,shampoo,asgo] "$@" > "$OUT/first_half.log" 2>&1 &
compare compare.optimizers=[dasgo,adafactor,galore,golore] "$@" > "$OUT/second_half.log" 2>&1 &
wait
compare "$@"
