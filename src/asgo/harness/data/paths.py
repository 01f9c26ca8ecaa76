"""Where datasets live, and the one error raised when one is missing or malformed.

Layout under the data directory (``train.dataset_path``; default :func:`default_data_dir`)::

    <data_dir>/
      shakespeare_char/input.txt            -> train.bin, val.bin, meta.json
      openwebtext/                          -> train.bin, val.bin, meta.json
      c4/                                   -> train.bin, val.bin, meta.json
      wikitext2/{train,valid,test}.txt      -> wikitext2/tokens-<tokenizer>/{train,val,test}.bin, meta.json

Every ``.bin`` is a flat array of little-endian uint16 token ids (nanoGPT's format); ``meta.json``
holds ``vocab_size`` and the number of tokens of each split. A source directory that cannot be
written (a read-only shared copy, say) still works: the prepared files then go to a cache
directory keyed by the source's path (see :func:`output_dir`).
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
from pathlib import Path

ENV_VAR = "ASGO_DATA_DIR"


def default_data_dir() -> Path:
    """``$ASGO_DATA_DIR`` if set, else ``~/.cache/asgo/data``."""
    env = os.environ.get(ENV_VAR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "asgo" / "data"


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    """``data_dir`` as a path (``~`` expanded), or :func:`default_data_dir` when it is None."""
    return default_data_dir() if data_dir is None else Path(data_dir).expanduser()


# How to prepare each dataset: the command, the Python call, and the files it needs/produces.
_HOWTO = {
    "shakespeare_char": (
        "python -m asgo.harness.data.prepare shakespeare_char --data-dir {d}",
        "asgo.harness.data.prepare_shakespeare_char('{d}')",
        "{d}/shakespeare_char/input.txt (written from the copy embedded in the package when absent) "
        "-> train.bin, val.bin (uint16), meta.json",
    ),
    "openwebtext": (
        "python -m asgo.harness.data.prepare openwebtext --data-dir {d}",
        "asgo.harness.data.prepare_hf_text('openwebtext', '{d}')",
        "{d}/openwebtext/{{train.bin, val.bin}} (uint16 GPT-2 BPE tokens) and meta.json",
    ),
    "c4": (
        "python -m asgo.harness.data.prepare c4 --data-dir {d}",
        "asgo.harness.data.prepare_hf_text('c4', '{d}')",
        "{d}/c4/{{train.bin, val.bin}} (uint16 GPT-2 BPE tokens) and meta.json",
    ),
    "wikitext2": (
        "python -m asgo.harness.data.prepare wikitext2 --data-dir {d}",
        "asgo.harness.data.prepare_wikitext2('{d}')",
        "{d}/wikitext2/{{train,valid,test}}.txt (downloaded from Hugging Face when absent; with only "
        "valid.txt and test.txt, pass train_split='test' / --train-split test / dataset.train_split=test "
        "to train on test.txt) -> wikitext2/tokens-<tokenizer>/{{train,val,test}}.bin, meta.json",
    ),
}


class DatasetError(FileNotFoundError):
    """A dataset is missing or malformed; the message says how to prepare it."""


def dataset_error(name: str, data_dir: str | os.PathLike | None, problem: str) -> DatasetError:
    """A :class:`DatasetError` for dataset ``name`` under ``data_dir``: the problem, the command
    (and Python call) that prepares the dataset, and the expected file layout, in one message."""
    d = str(resolve_data_dir(data_dir))
    if name in _HOWTO:
        command, call, layout = (s.format(d=d) for s in _HOWTO[name])
        how = f"To prepare it run `{command}` (or `{call}`). Expected layout: {layout}."
    else:
        how = f"Known datasets: {', '.join(_HOWTO)}."
    return DatasetError(f"dataset {name!r}: {problem}. {how}")


def read_text_source(path: str | os.PathLike, name: str, data_dir: str | os.PathLike | None, expected: str) -> str:
    """The text of a dataset's source file ``path``, decoded as UTF-8 (newlines translated as by
    ``Path.read_text``); a binary file (NUL bytes) or one that is not UTF-8 is a
    :class:`DatasetError` naming the file and ``expected``."""
    path = Path(path)
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise dataset_error(name, data_dir, f"{path} is not UTF-8 text (invalid byte 0x{data[e.start]:02x} at "
                            f"offset {e.start}: {e.reason}); expected {expected}") from e
    if "\0" in text:
        raise dataset_error(name, data_dir, f"{path} looks like a binary file (NUL byte at offset "
                            f"{text.index(chr(0))}); expected {expected}")
    return text.replace("\r\n", "\n").replace("\r", "\n")  # universal newlines, as read_text() gives


def _writable(directory: Path) -> bool:
    """Whether files can be created in ``directory`` (created if needed).

    A directory (or, if it does not exist yet, its nearest existing parent) whose mode grants
    write permission to nobody counts as read-only even where the OS would allow writing (root),
    so a read-only shared copy of the data is never written into.
    """
    existing = directory
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not stat.S_IMODE(existing.stat().st_mode) & 0o222:
        return False
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test-"):
            pass
        return True
    except OSError:
        return False


def output_dir(preferred: Path, source: Path | None = None) -> Path:
    """Where prepared files go: ``preferred`` when it is writable, else a cache directory.

    The fallback is ``default_data_dir()/_prepared/<hash of the source path>/<name>`` (then the
    same under the system temp directory), so a read-only copy of the raw data still works and
    different sources never share prepared files.
    """
    if _writable(preferred):
        return preferred
    key = hashlib.sha256(str((source or preferred).resolve()).encode()).hexdigest()[:16]
    for root in (default_data_dir() / "_prepared", Path(tempfile.gettempdir()) / f"asgo-data-{getattr(os, 'getuid', lambda: 0)()}"):
        candidate = root / key / preferred.name
        if _writable(candidate):
            return candidate
    raise DatasetError(f"no writable directory for the prepared files of {preferred} "
                       f"(tried it, {default_data_dir()}/_prepared and the temp directory)")
