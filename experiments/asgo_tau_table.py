"""Table of the ASGO tau sweep (``experiments/asgo_tau.sh``): per tau, final validation loss (mean
and std over seeds), steps to the target, training seconds; and the tau the rule chooses: the
largest tau whose mean final loss is within one seed standard deviation (of tau=1) of tau=1's.

    python experiments/asgo_tau_table.py runs/experiments/asgo_tau [--out docs/results]
"""

from __future__ import annotations

import csv
import statistics
import sys
from pathlib import Path

from _common import parser, write_table


def load(root: Path) -> dict[int, list[dict]]:
    runs: dict[int, list[dict]] = {}
    for path in sorted(root.glob("tau*/runs.csv")):
        tau = int(path.parent.name[3:])
        with open(path) as f:
            runs[tau] = [r for r in csv.DictReader(f) if r["diverged"] != "True"]
    return dict(sorted(runs.items()))


def main(argv: list[str] | None = None) -> str:
    p = parser(__doc__)
    p.add_argument("runs", type=Path, help="the sweep's OUT folder")
    args = p.parse_args(argv)
    runs = load(args.runs)
    rows = []
    for tau, rs in runs.items():
        losses = [float(r["final_val_loss"]) for r in rs]
        steps = [float(r["steps_to_target"]) for r in rs if r["steps_to_target"]]
        seconds = [float(r["train_seconds"]) for r in rs]
        rows.append({"tau": tau, "seeds": len(rs), "final_val_loss": statistics.mean(losses),
                     "std": statistics.stdev(losses) if len(losses) > 1 else 0.0,
                     "steps_to_target": statistics.mean(steps) if steps else "",
                     "reached": f"{len(steps)}/{len(rs)}",
                     "train_seconds": statistics.mean(seconds)})
    base = rows[0]
    chosen = max(r["tau"] for r in rows if r["final_val_loss"] <= base["final_val_loss"] + base["std"])
    shown = [{**r, "final_val_loss": f"{r['final_val_loss']:.4f}", "std": f"{r['std']:.4f}"} for r in rows]
    table = write_table(shown, args.out / "asgo_tau")
    verdict = f"chosen tau: {chosen} (largest tau within one std ({base['std']:.4f}) of tau={base['tau']})\n"
    sys.stdout.write(table + "\n" + verdict)
    return verdict


if __name__ == "__main__":
    main()
