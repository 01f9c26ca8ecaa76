"""Helpers shared by the synthetic experiments: command line, one CPU thread, tables."""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import torch  # noqa: E402


def parser(doc: str) -> argparse.ArgumentParser:
    """``--smoke`` (a handful of steps, for the test suite) and ``--out`` (default docs/results)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="a few steps on a reduced grid (seconds)")
    p.add_argument("--out", type=Path, default=Path("docs/results"), help="output folder")
    return p


def setup(args) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # tiny matrices: threads only add overhead on a shared machine


def fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def write_table(rows: list[dict], path: Path) -> str:
    """Write ``rows`` to ``path`` (.csv) and ``path`` with .md; return the markdown."""
    keys = list(rows[0])
    with open(path.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        w.writerows(rows)
    md = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    md += ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]
    text = "\n".join(md) + "\n"
    path.with_suffix(".md").write_text(text)
    return text
