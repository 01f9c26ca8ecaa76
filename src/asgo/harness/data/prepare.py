"""Prepare a dataset once: ``python -m asgo.harness.data.prepare NAME [--data-dir DIR] [options]``.

    python -m asgo.harness.data.prepare shakespeare_char            # input.txt from the package if absent
    python -m asgo.harness.data.prepare openwebtext --num-proc 8    # ~54 GB download, ~9B tokens
    python -m asgo.harness.data.prepare c4 --c4-train-shards 4
    python -m asgo.harness.data.prepare wikitext2 --train-split test --tokenizer byte   # offline copy

The data directory defaults to ``$ASGO_DATA_DIR`` or ``~/.cache/asgo/data``; training reads the
same directory through ``train.dataset_path``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from asgo.harness.data.paths import DatasetError, resolve_data_dir

DATASETS = ("shakespeare_char", "openwebtext", "c4", "wikitext2")


def prepare_dataset(name: str, data_dir: str | os.PathLike | None = None, **options) -> Path:
    """Prepare dataset ``name`` under ``data_dir``; ``options`` go to its prepare function."""
    if name == "shakespeare_char":
        from asgo.harness.data.shakespeare import prepare_shakespeare_char

        if options:
            raise TypeError(f"shakespeare_char takes no options, got {sorted(options)}")
        return prepare_shakespeare_char(data_dir)
    if name in ("openwebtext", "c4"):
        from asgo.harness.data.openwebtext import prepare_hf_text

        return prepare_hf_text(name, data_dir, **options)
    if name == "wikitext2":
        from asgo.harness.data.wikitext import prepare_wikitext2

        return prepare_wikitext2(data_dir, **options)
    raise ValueError(f"unknown dataset {name!r}: choose from {', '.join(DATASETS)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m asgo.harness.data.prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=DATASETS)
    parser.add_argument("--data-dir", default=None, help="data directory (default: $ASGO_DATA_DIR or ~/.cache/asgo/data)")
    parser.add_argument("--tokenizer", default=None, help="BPE datasets: 'gpt2' (default), 'byte' or a HF tokenizer dir")
    parser.add_argument("--num-proc", type=int, default=None, help="openwebtext/c4: tokenizing processes")
    parser.add_argument("--c4-train-shards", type=int, default=None, help="c4: training files (of 1024) to use")
    parser.add_argument("--train-split", choices=("train", "test"), default=None,
                        help="wikitext2: 'test' trains on test.txt when train.txt is unavailable")
    args = parser.parse_args(argv)
    options = {"tokenizer": args.tokenizer, "num_proc": args.num_proc, "c4_train_shards": args.c4_train_shards,
               "train_split": args.train_split}
    options = {k: v for k, v in options.items() if v is not None}
    try:
        out = prepare_dataset(args.name, resolve_data_dir(args.data_dir), **options)
    except (DatasetError, TypeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{args.name}: prepared in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
