"""Tables and plots of the 600-step Shakespeare comparison (``experiments/shakespeare_600.sh``):
every finished run under OUT/runs/<optimizer>/lr<lr>_seed<seed>, whatever the seeds (0 and 1 on the
whole grid), aggregated as ``asgo-compare`` does, plus steps and training
seconds to the target loss at each optimizer's best lr as ratios to AdamW and to Muon.

    python experiments/shakespeare_600_table.py runs/experiments/shakespeare_600 [--out docs/results]
"""

from __future__ import annotations

import json
import re
import statistics

from _common import parser

from asgo.harness.compare import aggregate, first_reach, markdown_table, plot
from asgo.harness.metrics import read_metrics

TARGET = 1.9


def load_runs(root) -> list[dict]:
    runs = []
    for run_dir in sorted(root.glob("runs/*/lr*_seed*")):
        if not (run_dir / "summary.json").exists():
            continue
        lr, seed = re.fullmatch(r"lr(.+)_seed(\d+)", run_dir.name).groups()
        summary = json.loads((run_dir / "summary.json").read_text())
        rows = read_metrics(run_dir / "metrics.csv")
        curve = [(r["step"], r["loss"], r.get("time_s", float("nan"))) for r in rows if r["split"] == "val"]
        steps, seconds = first_reach(curve, TARGET)
        speeds = [r["tokens_per_s"] for r in rows if r["split"] == "train" and "tokens_per_s" in r]
        runs.append({"optimizer": run_dir.parent.name, "lr": float(lr), "seed": int(seed), "curve": curve,
                     "diverged": bool(summary.get("diverged")), "final_val_loss": summary.get("final_val_loss"),
                     "best_val_loss": min(loss for _, loss, _ in curve), "steps_to_target": steps,
                     "seconds_to_target": seconds, "train_seconds": summary.get("train_seconds"),
                     "tokens_per_s": statistics.median(speeds) if speeds else None,
                     "peak_memory_bytes": None, "optimizer_state_bytes": summary.get("optimizer_state_bytes")})
    return runs


def ratios(rows: list[dict]) -> str:
    best = {r["optimizer"]: r for r in rows if r["best_lr"]}
    lines = [f"| optimizer (best lr) | seeds | final val loss | steps to {TARGET} | x AdamW | x Muon "
             f"| train s to {TARGET} | x AdamW | x Muon |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in best.items():
        cells = [f"{name} ({r['lr']:g})", str(r["seeds"]),
                 f"{r['final_val_loss']:.4f}" + (f" ± {r['final_val_loss_std']:.4f}" if r["seeds"] > 1 else "")]
        for key in ("steps_to_target", "seconds_to_target"):
            value = r[key]
            cells.append("not reached" if value is None else f"{value:.0f}" if key == "steps_to_target" else f"{value:.1f}")
            for base in ("adamw", "muon"):
                other = best.get(base, {}).get(key)
                cells.append(f"{value / other:.2f}" if value and other else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("runs", type=__import__("pathlib").Path, help="the comparison's OUT folder")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    runs = load_runs(args.runs)
    rows = sorted(aggregate(runs), key=lambda r: (r["optimizer"], r["lr"]))
    text = markdown_table(rows, TARGET) + "\n" + ratios(rows)
    (args.out / "shakespeare_600_tables.md").write_text(text)
    for path in plot(runs, rows, args.out, "tiny GPT, Shakespeare-char, 600 steps"):
        path.rename(args.out / f"shakespeare_600_{path.name}")
    print(text)


if __name__ == "__main__":
    main()
