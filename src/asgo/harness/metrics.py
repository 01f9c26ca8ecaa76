"""Metrics to CSV and JSONL in the run directory, TensorBoard by default, W&B when enabled."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path


def finite_or_none(value):
    """``value`` with every non-finite float (nan, inf) replaced by ``None``, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def strict_json(value, **kwargs) -> str:
    """Standard JSON (RFC 8259): non-finite numbers written as ``null``, never ``NaN``/``Infinity``."""
    return json.dumps(finite_or_none(value), allow_nan=False, **kwargs)


class MetricsLogger:
    """Append-only metric rows ``{step, split, loss, ...}`` to ``metrics.csv`` and ``metrics.jsonl``."""

    FIELDS = ("step", "split", "loss", "perplexity", "lr", "tokens_per_s", "tokens", "time_s")

    def __init__(self, out_dir: Path, tensorboard: bool = True, wandb_config: dict | None = None,
                 resume: bool = False, resume_step: int | None = None, revalidate: bool = False):
        """``resume``: append to the existing files; with ``resume_step`` (the checkpoint's step) the
        rows after it are removed first (and its ``val`` rows too when ``revalidate``: the resumed run
        evaluates at that step again), so no step is logged twice. TensorBoard event files are kept
        as they are (TensorBoard shows the latest value written for a step)."""
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.csv_path = self.out_dir / "metrics.csv"
        self.jsonl_path = self.out_dir / "metrics.jsonl"
        new = not (resume and self.csv_path.exists())
        if not new and resume_step is not None:
            truncate_metrics(self.out_dir, resume_step, revalidate)
        mode = "w" if new else "a"
        self._csv_file = open(self.csv_path, mode, newline="")
        self._csv = csv.DictWriter(self._csv_file, fieldnames=self.FIELDS, extrasaction="ignore")
        if new:
            self._csv.writeheader()
        self._jsonl = open(self.jsonl_path, mode)
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.out_dir / "tensorboard"))
        self._wandb = None
        if wandb_config is not None:
            try:
                import wandb
            except ImportError as e:
                raise ImportError("train.wandb=true needs the wandb package (pip install wandb)") from e
            self._wandb = wandb.init(**wandb_config)

    def log(self, row: dict) -> None:
        if "loss" in row and "perplexity" not in row and row.get("split") == "val":
            row = {**row, "perplexity": math.exp(min(row["loss"], 50.0))}  # exp(nan) is nan
        self._csv.writerow(row)
        self._csv_file.flush()
        self._jsonl.write(strict_json(row) + "\n")  # nan/inf as null
        self._jsonl.flush()
        step, split = row["step"], row.get("split", "train")
        numeric = {k: v for k, v in row.items() if k not in ("step", "split") and isinstance(v, (int, float))}
        if self._tb is not None:
            for key, value in numeric.items():
                self._tb.add_scalar(f"{split}/{key}", value, step)
        if self._wandb is not None:
            self._wandb.log({f"{split}/{k}": v for k, v in numeric.items()}, step=step)

    def close(self) -> None:
        self._csv_file.close()
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _kept(step, split, resume_step: int, revalidate: bool) -> bool:
    try:
        step = float(step)
    except (TypeError, ValueError):
        return True  # not a metric row of ours: left alone
    return step < resume_step or (step == resume_step and not (revalidate and split == "val"))


def _replace_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, newline="")
    os.replace(tmp, path)


def truncate_metrics(out_dir: Path, resume_step: int, revalidate: bool = False) -> None:
    """Remove the rows of ``metrics.csv`` and ``metrics.jsonl`` logged after ``resume_step`` (and its
    ``val`` rows when ``revalidate``), before a resumed run appends from there."""
    out_dir = Path(out_dir)
    csv_path, jsonl_path = out_dir / "metrics.csv", out_dir / "metrics.jsonl"
    if csv_path.exists():
        with open(csv_path, newline="") as f:
            rows = list(csv.reader(f))
        if rows:
            header = rows[0]
            at = {name: i for i, name in enumerate(header)}

            def field(row, name):
                i = at.get(name)
                return row[i] if i is not None and i < len(row) else None

            kept = [header] + [r for r in rows[1:]
                               if _kept(field(r, "step"), field(r, "split") or "train", resume_step, revalidate)]
            if len(kept) != len(rows):
                buffer = io.StringIO()
                csv.writer(buffer).writerows(kept)  # the DictWriter's dialect: excel, \r\n
                _replace_text(csv_path, buffer.getvalue())
    if jsonl_path.exists():
        lines = jsonl_path.read_text().splitlines(keepends=True)
        kept = []
        for line in lines:
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line cut short by a crash
            if not isinstance(row, dict) or _kept(row.get("step"), row.get("split", "train"), resume_step, revalidate):
                kept.append(line if line.endswith("\n") else line + "\n")
        if kept != lines:
            _replace_text(jsonl_path, "".join(kept))


def read_metrics(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: (v if k == "split" else float(v)) for k, v in row.items() if v != ""}
                for row in csv.DictReader(f)]


def plot_losses(metrics_csv: Path, out_png: Path, title: str = "") -> Path:
    """Train and validation loss against step, as a PNG (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_csv)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for split, style in (("train", "-"), ("val", "o-")):
        points = [(r["step"], r["loss"]) for r in rows if r.get("split") == split and "loss" in r]
        if points:
            ax.plot(*zip(*points), style, label=split, alpha=0.8 if split == "train" else 1.0)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss (nats)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png
