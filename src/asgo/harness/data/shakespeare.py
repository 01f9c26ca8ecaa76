"""Shakespeare-char: tiny-shakespeare as characters, 90/10 train/val (nanoGPT's shakespeare_char).

``<data_dir>/shakespeare_char/input.txt`` (downloaded from :data:`URL` when absent) is encoded
character by character (vocabulary: its sorted distinct characters, 65 for tiny-shakespeare) into
``train.bin`` (first 90% of the characters: 1,003,854 tokens) and ``val.bin`` (last 10%: 111,540),
plus ``meta.json`` (``vocab_size``, ``itos``). Preparing again does nothing while the outputs are
newer than ``input.txt``. If the directory is read-only the outputs go to a cache directory
(:func:`asgo.harness.data.paths.output_dir`).
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from asgo.harness.data.paths import DatasetError, dataset_error, output_dir, resolve_data_dir
from asgo.harness.data.tokens import META_FILE, LMData, TokenDataset, read_meta, write_meta, write_tokens

NAME = "shakespeare_char"
URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TRAIN_FRACTION = 0.9
_OUTPUTS = ("train.bin", "val.bin", META_FILE)


def download_shakespeare(path: str | os.PathLike, url: str = URL, timeout: float = 60.0,
                         by_hand: str | os.PathLike | None = None) -> Path:
    """Download tiny-shakespeare to ``path`` (atomically); a :class:`DatasetError` on failure that
    says to place the file at ``by_hand`` (default ``path``) instead."""
    path = Path(path)
    by_hand = Path(by_hand or path)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            data = response.read()
        if not data:
            raise OSError("empty response")
        data.decode("utf-8")
    except (OSError, urllib.error.URLError, UnicodeDecodeError, ValueError) as e:
        raise dataset_error(NAME, by_hand.parent.parent, f"{by_hand} is missing and downloading it from {url} "
                            f"failed ({e}); without network, place the file at {by_hand} by hand") from e
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def _fresh(directory: Path, source: Path) -> bool:
    """Whether ``directory`` holds all outputs, newer than ``source`` and made from a file of its size."""
    paths = [directory / name for name in _OUTPUTS]
    if not all(p.is_file() for p in paths):
        return False
    if min(p.stat().st_mtime for p in paths) < source.stat().st_mtime:
        return False
    try:
        return read_meta(directory, NAME).get("source_bytes") == source.stat().st_size
    except DatasetError:
        return False


def prepare_shakespeare_char(data_dir: str | os.PathLike | None = None) -> Path:
    """Prepare Shakespeare-char under ``data_dir`` (default: :func:`default_data_dir`).

    Reads ``<data_dir>/shakespeare_char/input.txt`` (downloading it from :data:`URL` if absent),
    writes ``train.bin``/``val.bin`` (uint16) and ``meta.json``, and returns the directory that
    holds them: ``<data_dir>/shakespeare_char``, or a cache directory if that one is read-only.
    Does nothing when the outputs exist and are newer than ``input.txt``.
    """
    data_dir = resolve_data_dir(data_dir)
    source_dir = data_dir / NAME
    source = source_dir / "input.txt"
    if not source.is_file():  # download it (next to the outputs if the data directory is read-only)
        cached = output_dir(source_dir) / "input.txt"
        source = cached if cached.is_file() else download_shakespeare(cached, by_hand=source)
    if _fresh(source_dir, source):
        return source_dir
    out = output_dir(source_dir, source)
    if out != source_dir and _fresh(out, source):
        return out

    text = source.read_text(encoding="utf-8")
    if not text:
        raise dataset_error(NAME, data_dir, f"{source} is empty")
    chars = sorted(set(text))
    if len(chars) > np.iinfo(np.uint16).max + 1:
        raise dataset_error(NAME, data_dir, f"{source} has {len(chars)} distinct characters, too many for uint16")
    ids = encode_text(text, chars)
    n_train = int(len(ids) * TRAIN_FRACTION)
    n = {"train": write_tokens(out / "train.bin", [ids[:n_train]]),
         "val": write_tokens(out / "val.bin", [ids[n_train:]])}
    write_meta(out, {"dataset": NAME, "vocab_size": len(chars), "itos": chars, "splits": n,
                     "tokenizer": "char", "source": str(source.resolve()), "source_bytes": source.stat().st_size})
    return out


def encode_text(text: str, chars: list[str]) -> np.ndarray:
    """Character ids of ``text`` under the sorted vocabulary ``chars`` (vectorised lookup)."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    table = np.array([ord(c) for c in chars], dtype=np.uint32)
    ids = np.searchsorted(table, codes)
    if ids.size and (ids.max() >= len(table) or not np.array_equal(table[ids], codes)):
        raise ValueError("text has characters outside the vocabulary")
    return ids.astype(np.uint16)


class CharTokenizer:
    """Encode/decode with the character vocabulary ``itos`` (from ``meta.json``)."""

    def __init__(self, itos: list[str]):
        self.itos = list(itos)
        self.stoi = {c: i for i, c in enumerate(self.itos)}
        self.n_vocab = len(self.itos)

    @classmethod
    def from_dir(cls, directory: str | os.PathLike) -> "CharTokenizer":
        return cls(read_meta(directory, NAME)["itos"])

    def encode(self, text: str) -> list[int]:
        return [self.stoi[c] for c in text]

    def decode(self, ids) -> str:
        return "".join(self.itos[int(i)] for i in ids)


def load_shakespeare_char(data_dir: str | os.PathLike | None = None) -> LMData:
    """Prepare (if needed) and open Shakespeare-char: ``LMData`` with ``train``/``val`` and vocab 65."""
    data_dir = resolve_data_dir(data_dir)
    directory = prepare_shakespeare_char(data_dir)
    train = TokenDataset(directory, "train", dataset=NAME, data_dir=data_dir)
    val = TokenDataset(directory, "val", dataset=NAME, data_dir=data_dir)
    return LMData(NAME, train, val, train.vocab_size, train.meta)
