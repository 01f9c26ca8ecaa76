"""``asgo-compare``: optimizers x learning rates x seeds on one training configuration.

    asgo-compare compare.optimizers=[adamw,asgo] compare.lrs.asgo=[0.003,0.01] \\
                 compare.seeds=[0,1,2] train.train_steps=200 train.dataset_path=DIR

Each run is :func:`asgo.harness.train.train` in this process, in ``<out>/runs/<optimizer>/lr<lr>_seed<seed>``.
Its resolved asgo-train configuration is stored there as ``compare_config.json`` once it finishes; a
finished run (``summary.json``) is reused, so an interrupted comparison continues, only when that stored
configuration equals the requested one exactly (but ``train.out_dir``, the directory itself). Otherwise
the run is trained again, in the same directory (its old files are overwritten), and the keys that
differ are logged; a run directory without ``compare_config.json`` (older) is trained again too.

Every optimizer's configuration is ``conf/optimizer/<name>.yaml``, then the ``optimizer.*`` keys given to
asgo-compare (``optimizer.weight_decay=0.05``: for every optimizer of the comparison), then its
``compare.settings.<name>``, then each learning rate of ``compare.lrs.<name>``. An ``optimizer.*`` key
that some optimizer of the comparison does not take is an error before any run, naming the key and
those optimizers (set it per optimizer with ``+compare.settings.<name>.<key>=...`` instead);
``optimizer.learning_rate`` is refused (the learning rates are ``compare.lrs``), so is ``optimizer.lr``.

A run diverged when its final validation loss or any logged (train or validation) loss is NaN or
infinite. Diverged runs are listed in ``runs.csv`` (``diverged``: True) and counted in the tables'
``diverged`` column, but left out of every mean, of the choice of the best learning rate (among the
learning rates with no diverged seed; failing that, the fewest) and of the plots. Then, in ``<out>``:

* ``runs.csv``: one row per run; ``results.csv`` and ``results.md``: per optimizer and learning
  rate, final and best validation loss (mean +- std over seeds), steps and training seconds to
  ``target_loss``, tokens/s, peak GPU memory and optimizer-state bytes, diverged seeds; each
  optimizer's best learning rate (lowest mean final loss, fewest diverged seeds first) is marked.
* ``loss_curves.png``: validation loss against step, one line per optimizer at its best learning
  rate (mean over seeds, shaded min to max); ``lr_sensitivity.png``: final validation loss against
  learning rate per optimizer (the ASGO paper's Figure 5 analogue).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import statistics
from collections import defaultdict
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from asgo.harness.config import CONFIG_DIR, ConfigError, optimizer_settings
from asgo.harness.metrics import read_metrics
import asgo.harness.train as train_module
from asgo.harness.train import train

log = logging.getLogger(__name__)

RUN_FIELDS = ("optimizer", "lr", "seed", "final_val_loss", "best_val_loss", "steps_to_target",
              "seconds_to_target", "train_seconds", "tokens_per_s", "peak_memory_bytes",
              "optimizer_state_bytes", "skipped_steps", "diverged")
CONFIG_FILE = "compare_config.json"  # in each run directory: its resolved asgo-train configuration
NOT_COMPARED = ("train.out_dir", "train.overwrite")  # keys of the stored configuration a reused run may differ in


def _flatten(tree, prefix: str = "") -> dict:
    """``{"a.b": value}`` for every leaf of a nested mapping."""
    if isinstance(tree, dict) and tree:
        return {k: v for key, sub in tree.items() for k, v in _flatten(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


def _default_optimizer(name: str) -> DictConfig:
    return OmegaConf.load(CONFIG_DIR / "optimizer" / f"{name}.yaml")


def optimizer_overrides(cfg: DictConfig) -> dict:
    """The ``optimizer.*`` keys given to asgo-compare, as ``{"dotted.key": value}``: those that differ
    from ``conf/optimizer/<optimizer.name>.yaml``, and under Hydra every ``optimizer.*`` override."""
    given = _flatten(OmegaConf.to_container(cfg.optimizer, resolve=True))
    default = _flatten(OmegaConf.to_container(_default_optimizer(cfg.optimizer.name), resolve=True))
    keys = {k for k, v in given.items() if k not in default or default[k] != v}
    removed = sorted(set(default) - set(given))
    if removed:
        raise ConfigError(f"{', '.join('optimizer.' + k for k in removed)}: asgo-compare cannot remove keys "
                          "of the optimizer configs")
    if HydraConfig.initialized():
        for override in HydraConfig.get().overrides.task:
            key = override.lstrip("+~").split("=", 1)[0]
            if key.startswith("optimizer.") and key[len("optimizer."):] in given:
                keys.add(key[len("optimizer."):])
    keys.discard("name")
    return {k: given[k] for k in sorted(keys)}


def check_optimizer_overrides(cfg: DictConfig) -> dict:
    """:func:`optimizer_overrides`, each checked to be a key every optimizer of ``compare.optimizers``
    takes: a ConfigError before any run otherwise, naming the key and the optimizers that do not."""
    overrides = optimizer_overrides(cfg)
    for key, value in overrides.items():
        if key == "lr" or key.startswith("lr."):
            raise ConfigError("optimizer.lr: use optimizer.learning_rate instead (the one name of the learning "
                              "rate in configs); in asgo-compare the learning rates are compare.lrs.<name>=[...]")
        if key == "learning_rate":
            raise ConfigError("optimizer.learning_rate: asgo-compare sweeps the learning rates of "
                              "compare.lrs.<name>=[...]; set those instead")
        refused = {}
        for name in cfg.compare.optimizers:
            one = _default_optimizer(name)
            OmegaConf.update(one, key, value, force_add=True)
            try:
                optimizer_settings(one, int(cfg.train.train_steps))
            except ConfigError as e:
                refused[name] = str(e)
        if refused:
            raise ConfigError(f"optimizer.{key}={value!r} applies to every optimizer of compare.optimizers, but "
                              f"{', '.join(refused)} do not take it ({next(iter(refused.values()))}); drop it, or "
                              f"set it per optimizer with +compare.settings.<name>.{key}=...")
    return overrides


def run_config(cfg: DictConfig, optimizer: str, lr: float, seed: int, out_dir: Path,
               overrides: dict | None = None) -> DictConfig:
    """The asgo-train configuration of one run: ``cfg`` with this optimizer (its YAML, then the
    ``overrides`` of :func:`optimizer_overrides`, then ``compare.settings.<optimizer>``), lr and seed."""
    run = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "compare"])
    settings = cfg.compare.settings.get(optimizer) or {}
    base = _default_optimizer(optimizer)
    for key, value in (overrides or {}).items():
        OmegaConf.update(base, key, value, force_add=True)
    run.optimizer = OmegaConf.merge(base, settings, {"learning_rate": lr})
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


def config_differences(stored: dict, wanted: dict) -> list[str]:
    """The dotted keys whose values differ between two resolved configurations (but NOT_COMPARED)."""
    a, b = _flatten(stored), _flatten(wanted)
    return sorted(k for k in set(a) | set(b) if k not in NOT_COMPARED and (k not in a or k not in b or a[k] != b[k]))


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def run_one(cfg: DictConfig, optimizer: str, lr: float, seed: int, out_dir: Path,
            overrides: dict | None = None) -> dict:
    summary_path, config_path = out_dir / "summary.json", out_dir / CONFIG_FILE
    run = run_config(cfg, optimizer, lr, seed, out_dir, overrides)
    wanted = OmegaConf.to_container(run, resolve=True)
    reuse = False
    if summary_path.exists():
        if not config_path.exists():
            log.info("%s: no %s (an older run directory); training it again", out_dir, CONFIG_FILE)
        else:
            differ = config_differences(json.loads(config_path.read_text()), wanted)
            if differ:
                log.warning("%s: stored configuration differs in %s; training it again", out_dir, ", ".join(differ))
            reuse = not differ
    if reuse:
        log.info("reusing %s", out_dir)
        summary = json.loads(summary_path.read_text())
    else:
        for stale in (summary_path, config_path):
            stale.unlink(missing_ok=True)
        run.train.overwrite = True  # the comparison's own run directory, to be trained again
        log.info("%s lr=%g seed=%d -> %s", optimizer, lr, seed, out_dir)
        diverged_error = getattr(train_module, "Diverged", None)  # train stopping at a non-finite loss
        try:
            summary = train(run, out_dir)
        except Exception as e:
            if diverged_error is None or not isinstance(e, diverged_error):
                raise
            log.warning("%s diverged: %s", out_dir, e)
            summary = {"final_val_loss": None, "diverged": True, "error": str(e)}
            summary_path.write_text(json.dumps(summary, indent=2))
        config_path.write_text(json.dumps(wanted, indent=2))
    metrics_path = out_dir / "metrics.csv"
    rows = read_metrics(metrics_path) if metrics_path.exists() else []
    curve = [(r["step"], r["loss"], r.get("time_s", float("nan"))) for r in rows if r["split"] == "val"]
    speeds = [r["tokens_per_s"] for r in rows if r["split"] == "train" and "tokens_per_s" in r]
    final = summary.get("final_val_loss")
    diverged = bool(summary.get("diverged")) or not _finite(final) or any(
        not _finite(r.get("loss")) for r in rows if "loss" in r)
    finite_losses = [loss for _, loss, _ in curve if _finite(loss)]
    steps, seconds = first_reach(curve, cfg.compare.target_loss)
    return {
        "optimizer": optimizer, "lr": lr, "seed": seed, "curve": curve, "diverged": diverged,
        "final_val_loss": final, "best_val_loss": min(finite_losses) if finite_losses else None,
        "steps_to_target": steps, "seconds_to_target": seconds,
        "train_seconds": summary.get("train_seconds"),
        "tokens_per_s": statistics.median(speeds) if speeds else None,
        "peak_memory_bytes": summary.get("peak_memory_bytes"),
        "optimizer_state_bytes": summary.get("optimizer_state_bytes"),
        "skipped_steps": (summary.get("diagnostics") or {}).get("skipped_steps", 0),
    }


def _mean_std(values: list) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(runs: list[dict]) -> list[dict]:
    """One row per (optimizer, lr): means and standard deviations over the seeds that did not
    diverge, the number that did, best lr marked (among the lrs with the fewest diverged seeds, the
    lowest mean final loss; none for an optimizer whose every run diverged)."""
    by_setting = defaultdict(list)
    for r in runs:
        by_setting[(r["optimizer"], r["lr"])].append(r)
    rows = []
    for (optimizer, lr), group in by_setting.items():
        ok = [r for r in group if not r.get("diverged")]
        row = {"optimizer": optimizer, "lr": lr, "seeds": len(group), "diverged": len(group) - len(ok),
               "reached_target": sum(r["steps_to_target"] is not None for r in ok)}
        for key in ("final_val_loss", "best_val_loss", "steps_to_target", "seconds_to_target",
                    "tokens_per_s", "train_seconds", "peak_memory_bytes", "optimizer_state_bytes"):
            row[key], row[key + "_std"] = _mean_std([r.get(key) for r in ok])
        rows.append(row)
    best = {}
    for row in rows:
        if row["final_val_loss"] is None:
            continue
        rank = (row["diverged"], row["final_val_loss"])
        if row["optimizer"] not in best or rank < best[row["optimizer"]][0]:
            best[row["optimizer"]] = (rank, row)
    for row in rows:
        row["best_lr"] = row["optimizer"] in best and best[row["optimizer"]][1] is row
    return rows


def _fmt(value, std=None, digits=3) -> str:
    if value is None:
        return "-"
    text = f"{value:.{digits}f}" if isinstance(value, float) else f"{value:,}"
    return text + (f" ± {std:.{digits}f}" if std else "")


def markdown_table(rows: list[dict], target: float | None) -> str:
    header = ["optimizer", "lr", "final val loss", "best val loss", f"steps to {target} (runs)",
              f"train s to {target}", "train s", "tokens/s", "peak GPU MiB", "state MiB", "diverged"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in sorted(rows, key=lambda r: (r["optimizer"], r["lr"])):
        mib = lambda v: None if v is None else v / 2**20  # noqa: E731
        reached = f"{_fmt(r['steps_to_target'], digits=0)} ({r['reached_target']}/{r['seeds']})"
        cells = [r["optimizer"] + (" **(best lr)**" if r["best_lr"] else ""), f"{r['lr']:g}",
                 _fmt(r["final_val_loss"], r["final_val_loss_std"]), _fmt(r["best_val_loss"], r["best_val_loss_std"]),
                 reached, _fmt(r["seconds_to_target"], digits=1), _fmt(r["train_seconds"], digits=1),
                 _fmt(r["tokens_per_s"], digits=0), _fmt(mib(r["peak_memory_bytes"]), digits=1),
                 _fmt(mib(r["optimizer_state_bytes"]), digits=2), f"{r['diverged']}/{r['seeds']}"]
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
    runs = [r for r in runs if not r.get("diverged")]  # diverged runs are never plotted

    fig, ax = plt.subplots(figsize=(8, 5))
    for name in optimizers:
        curves = [r["curve"] for r in runs if r["optimizer"] == name and r["lr"] == best_lr.get(name)]
        if not curves:
            continue
        steps = [s for s, _, _ in curves[0]]
        losses = [[loss for _, loss, _ in c] for c in curves if len(c) == len(steps)]
        mean = [statistics.fmean(col) for col in zip(*losses)]
        ax.plot(steps, mean, "o-", ms=3, color=colors[name], label=f"{name} (lr {best_lr[name]:g})")
        ax.fill_between(steps, [min(col) for col in zip(*losses)], [max(col) for col in zip(*losses)],
                        color=colors[name], alpha=0.2)
    ax.set(xlabel="step", ylabel="validation loss (nats)", title=f"{title}: best lr each, min-max over seeds")
    lows = [r["best_val_loss"] for r in runs if r["best_val_loss"] is not None]
    if lows:
        ax.set_ylim(min(lows) - 0.05, min(lows) + 1.5)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    fig.tight_layout()
    curves_png = out_dir / "loss_curves.png"
    fig.savefig(curves_png, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 5))
    for name in optimizers:
        points = sorted((r["lr"], r["final_val_loss"], r["final_val_loss_std"] or 0.0)
                        for r in rows if r["optimizer"] == name and r["final_val_loss"] is not None)
        if not points:
            continue
        lrs, means, stds = zip(*points)
        ax.errorbar(lrs, means, yerr=stds, fmt="o-", ms=4, capsize=3, color=colors[name], label=name)
    ax.set_xscale("log")
    ax.set(xlabel="peak learning rate", ylabel="final validation loss (nats)",
           title=f"{title}: learning-rate sensitivity (mean ± std over seeds)")
    ax.grid(alpha=0.3, which="both")
    if ax.lines:
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
    overrides = check_optimizer_overrides(cfg)
    for name in c.optimizers:  # every optimizer's keys and values, before any run
        optimizer_settings(run_config(cfg, name, 1e-3, 0, out_dir, overrides).optimizer,
                           int(cfg.train.train_steps))
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = [run_one(cfg, name, float(lr), int(seed), out_dir / "runs" / name / f"lr{lr:g}_seed{seed}", overrides)
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
