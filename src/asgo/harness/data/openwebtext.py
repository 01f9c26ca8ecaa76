"""OpenWebText and C4 as GPT-2 BPE tokens in uint16 memmaps (nanoGPT's ``data/openwebtext/prepare.py``).

Recipe: each document is encoded with ``encode_ordinary`` (special tokens are plain text) and
followed by the end-of-text token (``<|endoftext|>`` = 50256 for GPT-2), so documents are
separated by exactly one eot; the documents of a split are concatenated into ``<split>.bin``,
written chunk by chunk. OpenWebText has only a train split: a ``val_fraction`` = 0.0005 of its
documents, chosen by ``train_test_split(seed=2357, shuffle=True)``, becomes ``val`` (about 4,007
of 8,013,769 documents; nanoGPT reports ~9.0B train and ~4.4M val tokens). C4 (English) keeps its
own validation split: ``c4_train_shards`` of the 1024 training files and the first of the 8
validation files (the full C4 is ~156B tokens; one train shard is ~0.17B).

``meta.json`` records ``vocab_size`` = the tokenizer's ``n_vocab`` (50257 for GPT-2) and
``padded_vocab_size`` (rounded up to a multiple of 64: 50304, the size nanoGPT's GPT-2 configs use
for speed; ids >= 50257 never occur in the data).

Preparing OpenWebText downloads ~54 GB and takes about an hour on many cores; run it once with
``python -m asgo.harness.data.prepare openwebtext``. Training never prepares it implicitly.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from asgo.harness.data.paths import DatasetError, dataset_error, resolve_data_dir
from asgo.harness.data.tokenizer import get_tokenizer, tokenizer_name
from asgo.harness.data.tokens import META_FILE, LMData, TokenDataset, read_meta, write_meta, write_tokens

HF_SOURCES = {
    # the canonical repository of the 'openwebtext' dataset (the bare name redirects to it)
    "openwebtext": "Skylion007/openwebtext",
    "c4": "allenai/c4",
}
VAL_FRACTION = 0.0005
SEED = 2357


def load_hf_source(name: str, num_proc: int | None = None, c4_train_shards: int = 1):
    """The raw Hugging Face dataset for ``name`` (downloads on first use; cached by ``datasets``)."""
    from datasets import load_dataset

    if name == "openwebtext":
        return load_dataset(HF_SOURCES[name], num_proc=num_proc)
    if name == "c4":
        files = {"train": [f"en/c4-train.{i:05d}-of-01024.json.gz" for i in range(c4_train_shards)],
                 "validation": "en/c4-validation.00000-of-00008.json.gz"}
        return load_dataset(HF_SOURCES[name], data_files=files, num_proc=num_proc)
    raise ValueError(f"unknown dataset {name!r}: known {sorted(HF_SOURCES)} (or pass dataset=...)")


def train_val_split(dataset, val_fraction: float = VAL_FRACTION, seed: int = SEED) -> dict:
    """``{'train': ..., 'val': ...}`` from a ``datasets`` Dataset or DatasetDict.

    A DatasetDict with a ``val``/``validation`` split keeps it; otherwise its ``train`` split (or
    a plain Dataset) is split with ``train_test_split(test_size=val_fraction, seed=seed, shuffle=True)``.
    """
    if hasattr(dataset, "keys"):
        keys = list(dataset.keys())
        val_key = next((k for k in ("val", "validation") if k in keys), None)
        train_key = "train" if "train" in keys else (keys[0] if len(keys) == 1 else None)
        if train_key is None:
            raise ValueError(f"dataset has splits {keys}: expected 'train' (and optionally 'validation')")
        if val_key is not None:
            return {"train": dataset[train_key], "val": dataset[val_key]}
        dataset = dataset[train_key]
    split = dataset.train_test_split(test_size=val_fraction, seed=seed, shuffle=True)
    return {"train": split["train"], "val": split["test"]}


class _Encode:
    """``datasets.map`` function: text -> ids + eot (a class, so it pickles for ``num_proc`` > 1)."""

    def __init__(self, tokenizer, text_column: str):
        self.tokenizer = tokenizer
        self.text_column = text_column

    def __call__(self, example: dict) -> dict:
        ids = self.tokenizer.encode_ordinary(example[self.text_column])
        ids.append(self.tokenizer.eot_token)
        return {"ids": ids, "len": len(ids)}


def _chunks(tokenized, batch_size: int = 4096):
    for batch in tokenized.with_format("numpy").iter(batch_size=batch_size):
        if len(batch["ids"]):
            yield np.concatenate(batch["ids"])


def _prepared(directory: Path, tokenizer: str | None) -> bool:
    if not all((directory / f).is_file() for f in ("train.bin", "val.bin", META_FILE)):
        return False
    try:
        meta = read_meta(directory)
    except DatasetError:
        return False
    splits = meta.get("splits") or {}
    sizes_ok = all(splits.get(s) == (directory / f"{s}.bin").stat().st_size // 2 for s in ("train", "val"))
    return sizes_ok and (tokenizer is None or meta.get("tokenizer") == tokenizer)


def prepare_hf_text(name: str, data_dir: str | os.PathLike | None = None, tokenizer=None,
                    val_fraction: float = VAL_FRACTION, seed: int = SEED, num_proc: int | None = None,
                    dataset=None, *, text_column: str = "text", c4_train_shards: int = 1,
                    overwrite: bool = False) -> Path:
    """Tokenize a Hugging Face text dataset into ``<data_dir>/<name>/{train,val}.bin`` + ``meta.json``.

    ``name``: ``'openwebtext'`` or ``'c4'`` (downloaded with ``datasets.load_dataset``), or any name
    when ``dataset`` is given: a ``datasets`` Dataset/DatasetDict with a ``text_column`` (e.g.
    ``load_dataset('text', data_files=...)`` for local files). ``tokenizer``: a spec for
    :func:`get_tokenizer` or an object with ``encode_ordinary``/``eot_token``/``n_vocab``
    (default GPT-2 BPE via tiktoken). ``num_proc``: tokenizing processes (default half the CPUs).
    Does nothing if the directory is already prepared (with the same tokenizer, when one is given)
    unless ``overwrite``. Returns the directory.
    """
    data_dir = resolve_data_dir(data_dir)
    out = data_dir / name
    tok = None if tokenizer is None else get_tokenizer(tokenizer)
    if not overwrite and _prepared(out, None if tok is None else tokenizer_name(tok)):
        return out
    if tok is None:
        tok = get_tokenizer("gpt2")
    if tok.n_vocab > np.iinfo(np.uint16).max + 1:
        raise ValueError(f"tokenizer has {tok.n_vocab} ids, too many for uint16 token files")
    if num_proc is None:
        num_proc = max(1, (os.cpu_count() or 2) // 2)
    if dataset is None:
        dataset = load_hf_source(name, num_proc=num_proc, c4_train_shards=c4_train_shards)
    splits = train_val_split(dataset, val_fraction, seed)

    import datasets

    list_type = getattr(datasets, "List", None) or datasets.Sequence
    features = datasets.Features({"ids": list_type(datasets.Value("uint16")), "len": datasets.Value("int64")})
    out.mkdir(parents=True, exist_ok=True)
    counts, docs = {}, {}
    for split, dset in splits.items():
        tokenized = dset.map(_Encode(tok, text_column), remove_columns=dset.column_names, features=features,
                             num_proc=num_proc if num_proc > 1 else None, desc=f"tokenizing {name}/{split}")
        total = int(np.sum(tokenized.with_format("numpy")["len"], dtype=np.int64)) if len(tokenized) else 0
        counts[split] = write_tokens(out / f"{split}.bin", _chunks(tokenized), total=total)
        docs[split] = len(tokenized)
        if counts[split] == 0:
            raise dataset_error(name, data_dir, f"the {split} split has no documents")
    write_meta(out, {
        "dataset": name, "vocab_size": int(tok.n_vocab),
        "padded_vocab_size": int(math.ceil(tok.n_vocab / 64) * 64),
        "tokenizer": tokenizer_name(tok), "eot_token": int(tok.eot_token), "splits": counts, "documents": docs,
        "val_fraction": val_fraction, "seed": seed, "source": HF_SOURCES.get(name, "user-supplied dataset"),
    })
    return out


def load_hf_text(name: str, data_dir: str | os.PathLike | None = None) -> LMData:
    """Open a prepared OpenWebText/C4 directory (never prepares it: that is a long download)."""
    data_dir = resolve_data_dir(data_dir)
    directory = data_dir / name
    if not (directory / "train.bin").is_file():
        raise dataset_error(name, data_dir, f"{directory / 'train.bin'} does not exist (not prepared yet)")
    train = TokenDataset(directory, "train", dataset=name, data_dir=data_dir)
    val = TokenDataset(directory, "val", dataset=name, data_dir=data_dir)
    return LMData(name, train, val, train.vocab_size, train.meta)
