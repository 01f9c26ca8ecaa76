"""Token files and random-window batches (nanoGPT's format and sampling).

A split is a flat file ``<split>.bin`` of little-endian uint16 token ids, read through a numpy
memmap, next to a ``meta.json`` holding at least ``vocab_size`` (and, when written by this
package, ``splits``: the number of tokens of each split, used to catch truncated files or files
written with another dtype). A batch is ``batch_size`` windows at uniformly random offsets ``i``:
``x = tokens[i:i+T]``, ``y = tokens[i+1:i+T+1]`` (int64). The offsets come from a
``torch.Generator`` the caller owns and seeds, so the data stream is reproducible and its
position can be checkpointed (``generator.get_state()``); :func:`sampler_seed` gives each DDP rank
and dataloader worker its own stream.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from asgo.harness.data.paths import DatasetError, dataset_error

TOKEN_DTYPE = np.dtype("<u2")  # uint16, little-endian: ids up to 65535 (GPT-2 has 50257)
META_FILE = "meta.json"
_CHECK_TOKENS = 1 << 20  # ids checked against vocab_size when a split is opened (2 MiB read)


def sampler_seed(seed: int, rank: int = 0, worker: int = 0) -> int:
    """Seed of the batch sampler of DDP rank ``rank`` and dataloader worker ``worker``.

    A hash of ``(seed, rank, worker)`` reduced to 63 bits (valid for ``Generator.manual_seed``):
    deterministic, and distinct streams for distinct ranks/workers (unlike ``seed + rank``, which
    makes rank 1 of seed s replay rank 0 of seed s + 1).
    """
    digest = hashlib.sha256(f"asgo.sampler:{int(seed)}:{int(rank)}:{int(worker)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _write(f, data: bytes) -> None:
    """One write of prepared data (a function of its own so tests can simulate a full disk)."""
    f.write(data)


def _format_bytes(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} bytes"  # unreachable


def no_space_error(path: str | os.PathLike, needed: int | None, error: OSError, *,
                   at_least: int | None = None) -> DatasetError:
    """A :class:`DatasetError` for a full disk while writing ``path``: the directory, the bytes the
    file needs (``needed``, or ``at_least`` when the total is unknown) and the space free there."""
    directory = Path(path).parent
    try:
        free = f"{_format_bytes(shutil.disk_usage(directory).free)} free"
    except OSError:
        free = "free space unknown"
    if needed is not None:
        need = f"{path} needs {_format_bytes(needed)} ({needed} bytes)"
    else:
        need = f"{path} needs at least {_format_bytes(at_least or 0)} ({at_least or 0} bytes)"
    return DatasetError(f"no space left on the device holding {directory} while writing prepared data "
                        f"({error.strerror or error}): {need}, {free}. Free space there (or point "
                        f"train.dataset_path / --data-dir at a disk with room) and prepare again")


def write_tokens(path: str | os.PathLike, chunks: Iterable[Any], total: int | None = None) -> int:
    """Write token-id chunks (arrays or lists) to ``path`` as uint16, chunk by chunk; return the count.

    The file is written under a temporary name and renamed at the end, so an interrupted run
    never leaves a truncated ``.bin`` that looks prepared. A full disk is a :class:`DatasetError`
    naming the directory and the space needed (``total`` tokens, when the caller knows it).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    count = attempted = 0
    try:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                arr = np.asarray(chunk)
                if arr.size == 0:
                    continue
                if arr.min() < 0 or arr.max() > np.iinfo(TOKEN_DTYPE).max:
                    raise ValueError(f"token ids must lie in [0, 65535] to be stored as uint16; got "
                                     f"[{arr.min()}, {arr.max()}]")
                attempted = count + arr.size
                _write(f, arr.astype(TOKEN_DTYPE, copy=False).tobytes())
                count += arr.size
        os.replace(tmp, path)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            raise
        needed = None if total is None else int(total) * TOKEN_DTYPE.itemsize
        raise no_space_error(path, needed, e, at_least=max(attempted, count) * TOKEN_DTYPE.itemsize) from e
    finally:
        tmp.unlink(missing_ok=True)
    return count


def write_meta(directory: str | os.PathLike, meta: dict) -> Path:
    """Write ``meta.json`` atomically (temporary file, then rename); return its path."""
    path = Path(directory) / META_FILE
    tmp = path.with_name(f".{META_FILE}.tmp-{os.getpid()}")
    text = json.dumps(meta, indent=2) + "\n"
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno not in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            raise
        raise no_space_error(path, len(text.encode()), e) from e
    return path


def read_meta(directory: str | os.PathLike, dataset: str | None = None,
              data_dir: str | os.PathLike | None = None) -> dict:
    """``meta.json`` of ``directory``, with a :class:`DatasetError` if it is missing or malformed."""
    directory = Path(directory)
    dataset = dataset or directory.name
    path = directory / META_FILE
    if not path.is_file():
        raise dataset_error(dataset, data_dir or directory.parent, f"{path} is missing")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise dataset_error(dataset, data_dir or directory.parent, f"{path} is not valid JSON ({e})") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("vocab_size"), int) or meta["vocab_size"] <= 0:
        raise dataset_error(dataset, data_dir or directory.parent, f"{path} has no positive integer 'vocab_size'")
    return meta


class TokenDataset:
    """One split ``<directory>/<split>.bin`` (uint16 memmap) with ``meta.json`` next to it.

    ``dataset``/``data_dir`` only name the dataset in error messages (default: the directory's
    name and its parent). Opening validates the file (present, non-empty, whole uint16 values,
    the token count ``meta.json`` records, ids below ``vocab_size`` in its first 1M tokens);
    :meth:`get_batch` checks the split holds at least one window.
    """

    def __init__(self, directory: str | os.PathLike, split: str = "train", *, dataset: str | None = None,
                 data_dir: str | os.PathLike | None = None):
        self.directory = Path(directory)
        self.split = split
        self.dataset = dataset or self.directory.name
        self.data_dir = Path(data_dir) if data_dir is not None else self.directory.parent
        self.path = self.directory / f"{split}.bin"
        self.meta = read_meta(self.directory, self.dataset, self.data_dir)
        self.vocab_size: int = self.meta["vocab_size"]
        self._validate()
        self._tokens: np.memmap | None = None

    def _error(self, problem: str) -> DatasetError:
        return dataset_error(self.dataset, self.data_dir, problem)

    def _corrupt(self, problem: str) -> DatasetError:
        return self._error(f"{problem}: the file is corrupt or truncated; delete {self.path} "
                           f"(and the other .bin files and meta.json next to it) to re-prepare the dataset")

    def _validate(self) -> None:
        if not self.path.is_file():
            raise self._error(f"{self.path} is missing")
        size = self.path.stat().st_size
        if size == 0:
            raise self._corrupt(f"{self.path} is empty")
        if size % TOKEN_DTYPE.itemsize:
            raise self._corrupt(f"{self.path} has {size} bytes, not a whole number of {TOKEN_DTYPE.itemsize}-byte "
                                f"uint16 tokens")
        n = size // TOKEN_DTYPE.itemsize
        expected = (self.meta.get("splits") or {}).get(self.split)
        if expected is not None and expected != n:
            raise self._corrupt(f"{self.path} holds {n} uint16 tokens but {self.directory / META_FILE} records "
                                f"{expected} (truncated, or written with another dtype?)")
        head = np.memmap(self.path, dtype=TOKEN_DTYPE, mode="r", shape=(min(n, _CHECK_TOKENS),))
        top = int(head.max())
        del head
        if top >= self.vocab_size:
            raise self._corrupt(f"{self.path} has token id {top} >= vocab_size {self.vocab_size} "
                                f"(another tokenizer, or not a uint16 file?)")

    @property
    def tokens(self) -> np.memmap:
        """The split's token ids (a read-only uint16 memmap, opened lazily)."""
        if self._tokens is None:
            self._tokens = np.memmap(self.path, dtype=TOKEN_DTYPE, mode="r")
        return self._tokens

    def __len__(self) -> int:
        return self.path.stat().st_size // TOKEN_DTYPE.itemsize if self._tokens is None else len(self._tokens)

    def __getstate__(self) -> dict:  # picklable for dataloader workers: reopen the memmap there
        return {**self.__dict__, "_tokens": None}

    def __repr__(self) -> str:
        return f"TokenDataset({str(self.path)!r}, tokens={len(self)}, vocab_size={self.vocab_size})"

    def _offsets(self, batch_size: int, block_size: int, generator: torch.Generator | None) -> torch.Tensor:
        n = len(self)
        if n < block_size + 1:
            raise self._error(f"{self.path} has {n} tokens, fewer than block_size + 1 = {block_size + 1} "
                              f"needed for one window: if the file is truncated, delete {self.path} (and the "
                              f"other .bin files and meta.json next to it) to re-prepare the dataset; "
                              f"otherwise use a smaller model.block_size")
        return torch.randint(n - block_size, (batch_size,), generator=generator)

    def windows(self, offsets: torch.Tensor, length: int) -> torch.Tensor:
        """``tokens[i:i+length]`` for each offset ``i``, as an int64 tensor (len(offsets), length)."""
        index = offsets.numpy()[:, None] + np.arange(length)
        return torch.from_numpy(self.tokens[index].astype(np.int64))

    def get_batch(self, batch_size: int, block_size: int, generator: torch.Generator | None = None,
                  device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """``batch_size`` random windows: ``x = tokens[i:i+T]``, ``y = tokens[i+1:i+T+1]`` (int64,
        shape (batch_size, block_size)), offsets drawn from ``generator`` (the global RNG if None).
        On CUDA the batch is pinned and copied with ``non_blocking=True``."""
        offsets = self._offsets(batch_size, block_size, generator)
        buf = self.windows(offsets, block_size + 1)
        return to_device(buf[:, :-1].contiguous(), buf[:, 1:].contiguous(), device)

    def eval_batch(self, windows: "EvalWindows", index: torch.Tensor,
                   device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """The evaluation batch of windows ``windows[index]``: ``x``, ``y`` (int64, (len(index), block_size))."""
        offsets, starts = windows.offsets[index], windows.starts[index]
        buf = self.windows(offsets, windows.block_size + 1)
        y = mask_scored(buf[:, 1:], offsets, starts)
        return to_device(buf[:, :-1].contiguous(), y.contiguous(), device)


def to_device(x: torch.Tensor, y: torch.Tensor, device: str | torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Move a batch to ``device``; to CUDA through pinned memory with ``non_blocking=True``."""
    device = torch.device(device)
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


@dataclass
class LMData:
    """What the training loop needs: ``train``/``val`` splits with ``get_batch``, the vocabulary
    size the model must have, and the per-rank sampler seed."""

    name: str
    train: Any
    val: Any
    vocab_size: int
    meta: dict = field(default_factory=dict)
    test: Any = None

    @staticmethod
    def sampler_seed(seed: int, rank: int = 0, worker: int = 0) -> int:
        """See :func:`sampler_seed`."""
        return sampler_seed(seed, rank, worker)


EVAL_SEED = 20_240_611  # the evaluation windows' seed: a constant, so every run (any train.seed) scores the same windows
IGNORE_INDEX = -100  # the models' F.cross_entropy(..., ignore_index=-100)


@dataclass(frozen=True)
class EvalWindows:
    """A fixed set of evaluation windows of ``block_size + 1`` tokens: ``offsets[k]`` is window k's
    first token and ``starts[k]`` the first token position it scores (targets before it are set to
    ``IGNORE_INDEX``: the tail window of a full pass, which overlaps its predecessor)."""

    offsets: torch.Tensor  # int64 (W,)
    starts: torch.Tensor  # int64 (W,)
    block_size: int
    seed: int = EVAL_SEED

    def __len__(self) -> int:
        return len(self.offsets)

    def shard(self, rank: int, world_size: int) -> range:
        """The window indices rank ``rank`` of ``world_size`` evaluates: a contiguous, near-equal share."""
        n = len(self)
        return range(n * rank // world_size, n * (rank + 1) // world_size)


def eval_windows(n_tokens: int, block_size: int, count: int | None = None, seed: int = EVAL_SEED) -> EvalWindows:
    """``count`` windows at uniformly random offsets drawn from a generator seeded with ``seed``
    (deterministic: the same set at every call), or with ``count=None`` the whole split in
    consecutive non-overlapping windows, every token from the second on a target exactly once (the
    last window ends at the split's end and ignores the targets its predecessor already scored)."""
    if n_tokens < block_size + 1:
        raise ValueError(f"{n_tokens} tokens are fewer than block_size + 1 = {block_size + 1} needed for one window")
    if count is not None:
        offsets = torch.randint(n_tokens - block_size, (count,), generator=torch.Generator().manual_seed(seed))
        return EvalWindows(offsets, offsets + 1, block_size, seed)
    full = (n_tokens - 1) // block_size
    offsets = torch.arange(full, dtype=torch.int64) * block_size
    starts = offsets + 1
    if full * block_size < n_tokens - 1:  # the tail: the last block_size targets, scoring only the new ones
        offsets = torch.cat([offsets, torch.tensor([n_tokens - 1 - block_size])])
        starts = torch.cat([starts, torch.tensor([full * block_size + 1])])
    return EvalWindows(offsets, starts, block_size, seed)


def mask_scored(y: torch.Tensor, offsets: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """``y`` (targets of windows at ``offsets``) with the targets before ``starts`` set to IGNORE_INDEX."""
    positions = offsets[:, None] + 1 + torch.arange(y.shape[1])
    return y.masked_fill(positions < starts[:, None], IGNORE_INDEX)
