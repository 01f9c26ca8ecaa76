"""Shakespeare-char: tiny-shakespeare as characters, 90/10 train/val (nanoGPT's shakespeare_char).

``<data_dir>/shakespeare_char/input.txt`` is encoded character by character (vocabulary: its
sorted distinct characters, 65 for tiny-shakespeare) into ``train.bin`` (first 90% of the
characters: 1,003,854 tokens) and ``val.bin`` (last 10%: 111,540), plus ``meta.json``
(``vocab_size``, ``itos``). Preparing again does nothing while the outputs are newer than
``input.txt``. If the directory is read-only the outputs go to a cache directory
(:func:`asgo.harness.data.paths.output_dir`).

No network: tiny-shakespeare ships with the package (:data:`EMBEDDED`, gzip-compressed package
data, 1,115,394 bytes once decompressed, checked against :data:`SHA256`). When ``input.txt`` is
absent it is written there from the embedded copy (next to the outputs if the data directory is
read-only); an ``input.txt`` that is present is used as it is (any text works).
"""

from __future__ import annotations

import gzip
import hashlib
import os
from importlib import resources
from pathlib import Path

import numpy as np

from asgo.harness.data.paths import DatasetError, dataset_error, output_dir, read_text_source, resolve_data_dir
from asgo.harness.data.tokens import META_FILE, LMData, TokenDataset, read_meta, write_meta, write_tokens

NAME = "shakespeare_char"
# where the embedded copy comes from (Karpathy's char-rnn tiny-shakespeare; nothing downloads it)
URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
EMBEDDED = "tinyshakespeare.txt.gz"  # package data of asgo.harness.data
SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"  # of the decompressed text
TRAIN_FRACTION = 0.9
_OUTPUTS = ("train.bin", "val.bin", META_FILE)


def embedded_shakespeare() -> bytes:
    """The bytes of tiny-shakespeare's ``input.txt``, from the package; a :class:`DatasetError` if
    the embedded file is missing or its SHA-256 is not :data:`SHA256` (a broken install)."""
    try:
        data = gzip.decompress(resources.files("asgo.harness.data").joinpath(EMBEDDED).read_bytes())
    except (OSError, EOFError) as e:
        raise DatasetError(f"dataset {NAME!r}: the embedded copy asgo/harness/data/{EMBEDDED} cannot be read "
                           f"({e}); reinstall the package") from e
    digest = hashlib.sha256(data).hexdigest()
    if digest != SHA256:
        raise DatasetError(f"dataset {NAME!r}: the embedded copy asgo/harness/data/{EMBEDDED} has SHA-256 "
                           f"{digest}, expected {SHA256}; reinstall the package")
    return data


def write_embedded_shakespeare(path: str | os.PathLike) -> Path:
    """Write the embedded tiny-shakespeare (:func:`embedded_shakespeare`) to ``path`` atomically."""
    path = Path(path)
    data = embedded_shakespeare()
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

    Reads ``<data_dir>/shakespeare_char/input.txt`` (written from the embedded copy if absent),
    writes ``train.bin``/``val.bin`` (uint16) and ``meta.json``, and returns the directory that
    holds them: ``<data_dir>/shakespeare_char``, or a cache directory if that one is read-only.
    Does nothing when the outputs exist and are newer than ``input.txt``.
    """
    data_dir = resolve_data_dir(data_dir)
    source_dir = data_dir / NAME
    source = source_dir / "input.txt"
    if not source.is_file():  # the embedded copy (next to the outputs if the data directory is read-only)
        cached = output_dir(source_dir) / "input.txt"
        source = cached if cached.is_file() else write_embedded_shakespeare(cached)
    if _fresh(source_dir, source):
        return source_dir
    # beside a local input.txt (a cache directory if that is read-only), else beside the embedded copy's
    out = output_dir(source_dir, source) if source.parent == source_dir else source.parent
    if out != source_dir and _fresh(out, source):
        return out

    text = read_text_source(source, NAME, data_dir, "plain UTF-8 text (tiny-shakespeare's input.txt, or any "
                            "text to model character by character); delete it to use the embedded tiny-shakespeare")
    if not text:
        raise dataset_error(NAME, data_dir, f"{source} is empty")
    chars = sorted(set(text))
    if len(chars) > np.iinfo(np.uint16).max + 1:
        raise dataset_error(NAME, data_dir, f"{source} has {len(chars)} distinct characters, too many for uint16")
    ids = encode_text(text, chars)
    n_train = int(len(ids) * TRAIN_FRACTION)
    n = {"train": write_tokens(out / "train.bin", [ids[:n_train]], total=n_train),
         "val": write_tokens(out / "val.bin", [ids[n_train:]], total=len(ids) - n_train)}
    write_meta(out, {"dataset": NAME, "vocab_size": len(chars), "itos": chars, "splits": n,
                     "tokenizer": "char", "source": str(source.resolve()), "source_bytes": source.stat().st_size,
                     "source_sha256": hashlib.sha256(source.read_bytes()).hexdigest()})
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
