"""Experiment 4 (tiny-GPT half): Adafactor's decay rate c on the tiny GPT / Shakespeare-char.

Hong & Lin's Adafactor (beta2_k = 1 - k^(-c), step rho_0 k^(-p)) for c in {0.5, ..., 1.0}, with a
constant (p = 0) and a decaying (p = 0.5) step size, on top of the harness's warmup-cosine
schedule, with update clipping at d = 1 (constant) and without. One run per setting (seed 0) through
``asgo.harness.train.train``, so the numbers are the harness's validation losses.

    python experiments/adafactor_decay_gpt.py --data DIR [--lr 0.01] [--steps 150] [--out docs/results]
    python experiments/adafactor_decay_gpt.py --data DIR --smoke
"""

from __future__ import annotations

from pathlib import Path

import torch
from _common import parser, write_table
from hydra import compose, initialize_config_dir

from asgo.harness.config import CONFIG_DIR
from asgo.harness.train import train

CS = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
SCHEDULES = {"constant": 0.0, "k^-1/2": 0.5}
CLIPPING = {"d=1": 1.0, "none": None}


def run(data: Path, out: Path, c: float, lr_decay: float, clip, lr: float, steps: int, smoke: bool) -> float:
    overrides = ["model=tiny", "dataset=shakespeare_char", "optimizer=adafactor", f"train.dataset_path={data}",
                 f"train.train_steps={steps}", "train.batch_size=24", "train.eval_interval=0",
                 "train.eval_batches=6", "train.progress=false", "train.tensorboard=false", "train.plot=false",
                 f"train.out_dir={out}", f"optimizer.learning_rate={lr}", f"optimizer.c={c}",
                 f"optimizer.lr_decay={lr_decay}", f"optimizer.clip_threshold={'null' if clip is None else clip}"]
    if smoke:
        overrides += ["model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.block_size=32",
                      "train.batch_size=4", "train.eval_batches=2"]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose(config_name="config", overrides=overrides)
    return train(cfg, out)["final_val_loss"]


def main(argv=None) -> None:
    p = parser(__doc__)
    p.add_argument("--data", type=Path, required=True, help="directory holding shakespeare_char/input.txt")
    p.add_argument("--lr", type=float, default=0.01, help="rho_0, the peak learning rate")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--runs", type=Path, default=Path("runs/experiments/adafactor_decay_gpt"))
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    cs, steps = ((1.0,), 3) if args.smoke else (CS, args.steps)
    rows = []
    for schedule, lr_decay in SCHEDULES.items():
        for clipping, clip in CLIPPING.items():
            row = {"step size": schedule, "clipping": clipping}
            for c in cs:
                out = args.runs / "".join(ch for ch in f"{schedule}_{clipping}_c{c}" if ch.isalnum() or ch in "._")
                row[f"c={c}"] = run(args.data, out, c, lr_decay, clip, args.lr, steps, args.smoke)
            rows.append(row)
    name = "adafactor_decay_gpt_smoke" if args.smoke else "adafactor_decay_gpt"
    print(write_table(rows, args.out / name))
    if not args.smoke:
        plot(rows, cs, args.out / f"{name}.png", args.lr, steps)


def plot(rows: list[dict], cs, path: Path, lr: float, steps: int) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        ax.plot(cs, [row[f"c={c}"] for c in cs], "o-", label=f"step {row['step size']}, clipping {row['clipping']}")
    ax.set(xlabel="c  (beta2_k = 1 - k^-c)", ylabel="final validation loss (nats)",
           title=f"Adafactor on the tiny GPT, {steps} steps, rho_0 = {lr:g}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
