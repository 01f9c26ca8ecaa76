"""``asgo-compare``: optimizers x learning rates x seeds on one training configuration.

    asgo-compare compare.optimizers=[adamw,asgo] compare.lrs.asgo=[0.003,0.01] \\
                 compare.seeds=[0,1,2] train.train_steps=200 train.dataset_path=DIR

Each run is :func:`asgo.harness.train.train` in this process, in ``<out>/runs/<optimizer>/lr<lr>_seed<seed>``
(a finished run is reused, so an interrupted comparison continues). Then, in ``<out>``:

* ``runs.csv``: one row per run; ``results.csv`` and ``results.md``: per optimizer and learning
  rate, final and best validation loss (mean +- std over seeds), steps and training seconds to
  ``target_loss``, tokens/s, peak GPU memory and optimizer-state bytes; each optimizer's best
  learning rate (lowest mean final loss) is marked.
* ``loss_curves.png``: validation loss against step, one line per optimizer at its best learning
  rate (mean over seeds, shaded min to max); ``lr_sensitivity.png``: final validation loss against
  learning rate per optimizer (the ASGO paper's Figure 5 analogue).
"""

from __future__ import annotations

import csv
import json
import logging
import statistics
from collections import defaultdict
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from asgo.harness.config import CONFIG_DIR
from asgo.harness.metrics import read_metrics
from asgo.harness.train import train

log = logging.getLogger(__name__)

RUN_FIELDS = ("optimizer", "lr", "seed", "final_val_loss", "best_val_loss", "steps_to_target",
              "seconds_to_target", "train_seconds", "tokens_per_s", "peak_memory_bytes",
              "optimizer_state_bytes", "skipped_steps")


def run_config(cfg: DictConfig, optimizer: str, lr: float, seed: int, out_dir: Path) -> DictConfig:
    """The asgo-train configuration of one run: ``cfg`` with this optimizer, lr and seed."""
    run = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "compare"])
    settings = cfg.compare.settings.get(optimizer) or {}
    run.optimizer = OmegaConf.merge(OmegaConf.load(CONFIG_DIR / "optimizer" / f"{optimizer}.yaml"),
                                    settings, {"learning_rate": lr})
    run.train.seed = seed
    run.train.out_dir = str(out_dir)
    return run


def first_reach(curve: list[tuple[float, float, float]], target: float | None):
    """(step, seconds) of the first validation point at or below ``target``, else (None, None)."""
    if target is not None:
        for step, loss, seconds in curve:
            if loss <= target:
                return step, seconds
    return None, None


def run_one(cfg: DictConfig, optimizer: str, lr: float, seed: int, out_dir: Path) -> dict:
    summary_path = out_dir / "summary.json"
    if summary_path.exists():
        log.info("reusing %s", out_dir)
        summary = json.loads(summary_path.read_text())
    else:
        log.info("%s lr=%g seed=%d -> %s", optimizer, lr, seed, out_dir)
        summary = train(run_config(cfg, optimizer, lr, seed, out_dir), out_dir)
    rows = read_metrics(out_dir / "metrics.csv")
    curve = [(r["step"], r["loss"], r.get("time_s", float("nan"))) for r in rows if r["split"] == "val"]
    speeds = [r["tokens_per_s"] for r in rows if r["split"] == "train" and "tokens_per_s" in r]
    steps, seconds = first_reach(curve, cfg.compare.target_loss)
    return {
        "optimizer": optimizer, "lr": lr, "seed": seed, "curve": curve,
        "final_val_loss": summary["final_val_loss"], "best_val_loss": min(loss for _, loss, _ in curve),
        "steps_to_target": steps, "seconds_to_target": seconds,
        "train_seconds": summary.get("train_seconds"),
        "tokens_per_s": statistics.median(speeds) if speeds else None,
        "peak_memory_bytes": summary.get("peak_memory_bytes"),
        "optimizer_state_bytes": summary.get("optimizer_state_bytes"),
        "skipped_steps": summary["diagnostics"].get("skipped_steps", 0),
    }


def _mean_std(values: list) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(runs: list[dict]) -> list[dict]:
    """One row per (optimizer, lr): means and standard deviations over seeds, best lr marked."""
    by_setting = defaultdict(list)
    for r in runs:
        by_setting[(r["optimizer"], r["lr"])].append(r)
    rows = []
    for (optimizer, lr), group in by_setting.items():
        row = {"optimizer": optimizer, "lr": lr, "seeds": len(group),
               "reached_target": sum(r["steps_to_target"] is not None for r in group)}
        for key in ("final_val_loss", "best_val_loss", "steps_to_target", "seconds_to_target",
                    "tokens_per_s", "train_seconds", "peak_memory_bytes", "optimizer_state_bytes"):
            row[key], row[key + "_std"] = _mean_std([r[key] for r in group])
        rows.append(row)
    best = {}
    for row in rows:
        if row["optimizer"] not in best or row["final_val_loss"] < best[row["optimizer"]]["final_val_loss"]:
            best[row["optimizer"]] = row
    for row in rows:
        row["best_lr"] = best[row["optimizer"]] is row
    return rows


def _fmt(value, std=None, digits=3) -> str:
    if value is None:
        return "-"
    text = f"{value:.{digits}f}" if isinstance(value, float) else f"{value:,}"
    return text + (f" ± {std:.{digits}f}" if std else "")


def markdown_table(rows: list[dict], target: float | None) -> str:
    header = ["optimizer", "lr", "final val loss", "best val loss", f"steps to {target} (runs)",
              f"train s to {target}", "train s", "tokens/s", "peak GPU MiB", "state MiB"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in sorted(rows, key=lambda r: (r["optimizer"], r["lr"])):
        mib = lambda v: None if v is None else v / 2**20  # noqa: E731
        reached = f"{_fmt(r['steps_to_target'], digits=0)} ({r['reached_target']}/{r['seeds']})"
        cells = [r["optimizer"] + (" **(best lr)**" if r["best_lr"] else ""), f"{r['lr']:g}",
                 _fmt(r["final_val_loss"], r["final_val_loss_std"]), _fmt(r["best_val_loss"], r["best_val_loss_std"]),
                 reached, _fmt(r["seconds_to_target"], digits=1), _fmt(r["train_seconds"], digits=1),
                 _fmt(r["tokens_per_s"], digits=0), _fmt(mib(r["peak_memory_bytes"]), digits=1),
                 _fmt(mib(r["optimizer_state_bytes"]), digits=2)]
        lines.append("| " + " | ".join(cells) + " |")
    if target is None:  # drop the two time-to-target columns
        lines = ["|".join(c for i, c in enumerate(line.split("|")) if i not in (5, 6)) for line in lines]
    return "\n".join(lines)


def plot(runs: list[dict], rows: list[dict], out_dir: Path, title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    optimizers = list(dict.fromkeys(r["optimizer"] for r in runs))
    colors = {name: plt.cm.tab10(i % 10) for i, name in enumerate(optimizers)}
    best_lr = {r["optimizer"]: r["lr"] for r in rows if r["best_lr"]}

    fig, ax = plt.subplots(figsize=(8, 5))
    for name in optimizers:
        curves = [r["curve"] for r in runs if r["optimizer"] == name and r["lr"] == best_lr[name]]
        steps = [s for s, _, _ in curves[0]]
        losses = [[loss for _, loss, _ in c] for c in curves if len(c) == len(steps)]
        mean = [statistics.fmean(col) for col in zip(*losses)]
        ax.plot(steps, mean, "o-", ms=3, color=colors[name], label=f"{name} (lr {best_lr[name]:g})")
        ax.fill_between(steps, [min(col) for col in zip(*losses)], [max(col) for col in zip(*losses)],
                        color=colors[name], alpha=0.2)
    ax.set(xlabel="step", ylabel="validation loss (nats)", title=f"{title}: best lr each, min-max over seeds")
    low = min(r["best_val_loss"] for r in runs)
    ax.set_ylim(low - 0.05, low + 1.5)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    curves_png = out_dir / "loss_curves.png"
    fig.savefig(curves_png, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 5))
    for name in optimizers:
        points = sorted((r["lr"], r["final_val_loss"], r["final_val_loss_std"] or 0.0)
                        for r in rows if r["optimizer"] == name)
        lrs, means, stds = zip(*points)
        ax.errorbar(lrs, means, yerr=stds, fmt="o-", ms=4, capsize=3, color=colors[name], label=name)
    ax.set_xscale("log")
    ax.set(xlabel="peak learning rate", ylabel="final validation loss (nats)",
           title=f"{title}: learning-rate sensitivity (mean ± std over seeds)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    sensitivity_png = out_dir / "lr_sensitivity.png"
    fig.savefig(sensitivity_png, dpi=120)
    plt.close(fig)
    return [curves_png, sensitivity_png]


def write_csv(path: Path, rows: list[dict], fields) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def compare(cfg: DictConfig, out_dir: Path) -> dict:
    """Run the grid of ``cfg.compare`` and write tables and plots to ``out_dir``."""
    c = cfg.compare
    unknown = sorted(set(c.optimizers) - set(c.lrs))
    if unknown:
        raise ValueError(f"compare.lrs has no learning rates for {unknown}: add compare.lrs.<name>=[...]")
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = [run_one(cfg, name, float(lr), int(seed), out_dir / "runs" / name / f"lr{lr:g}_seed{seed}")
            for name in c.optimizers for lr in c.lrs[name] for seed in c.seeds]
    rows = aggregate(runs)
    write_csv(out_dir / "runs.csv", runs, RUN_FIELDS)
    write_csv(out_dir / "results.csv", rows, [k for k in rows[0] if k != "curve"])
    title = f"{cfg.model.name} / {cfg.dataset.name}, {cfg.train.train_steps} steps"
    table = markdown_table(rows, c.target_loss)
    (out_dir / "results.md").write_text(f"# {title}\n\n{table}\n")
    pngs = plot(runs, rows, out_dir, title)
    return {"table": table, "rows": rows, "runs": runs, "plots": [str(p) for p in pngs]}


@hydra.main(config_path="conf", config_name="compare", version_base=None)
def main(cfg: DictConfig) -> None:
    out_dir = Path(cfg.compare.out_dir or HydraConfig.get().runtime.output_dir)
    result = compare(cfg, out_dir)
    print(result["table"])
    print(f"written: {out_dir / 'results.md'}, {out_dir / 'results.csv'}, {', '.join(result['plots'])}")


if __name__ == "__main__":
    main()
