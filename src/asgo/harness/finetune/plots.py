"""curves.png of a fine-tuning run: losses against step, evaluation metrics against epoch."""

from __future__ import annotations

from pathlib import Path

from asgo.harness.metrics import read_metrics

METRIC_NAMES = ("accuracy", "f1", "matthews_correlation", "pearson", "spearmanr")


def plot_finetune(metrics_csv: Path, out_png: Path, title: str = "") -> Path:
    """Left: train loss and each evaluation split's loss against step; right: each split's metrics
    against epoch (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_csv)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    splits = sorted({r["split"] for r in rows})
    for split in splits:
        points = [(r["step"], r["loss"]) for r in rows if r["split"] == split and "loss" in r]
        if points:
            left.plot(*zip(*points), "-" if split == "train" else "o-", label=split)
        if split == "train":
            continue
        for name in METRIC_NAMES:
            points = [(r["epoch"], r[name]) for r in rows if r["split"] == split and name in r]
            if points:
                right.plot(*zip(*points), "o-", label=f"{split} {name}")
    left.set_xlabel("step")
    left.set_ylabel("loss")
    right.set_xlabel("epoch")
    right.set_ylabel("metric")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
