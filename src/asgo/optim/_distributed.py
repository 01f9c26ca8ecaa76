"""Owner-compute for replicated parameters (the DDP case, after the gradient all-reduce).

Every matrix has one owner rank, chosen by longest-processing-time packing on its cost. Only the
owner keeps the matrix's optimizer state and runs its compute phase; the directions (zeroed where
a step is skipped) and the 0/1 step flags then reach every rank in one ``all_gather`` per
(device, dtype), and every rank applies the same elementwise update to its replica, so the
result equals the single-process optimizer bit for bit.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


# torch 2.13 renamed all_gather_into_tensor (deprecated there) to all_gather_single
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def lpt_owners(costs: Sequence[float], world_size: int,
               loads: list[float] | None = None) -> tuple[list[int], list[float]]:
    """Longest-processing-time packing: the most expensive item first, each to the least loaded
    rank (ties to the lower rank). Returns each item's rank and the ranks' loads, which a later
    call can extend."""
    loads = list(loads) if loads is not None else [0.0] * world_size
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        owners[i] = min(range(world_size), key=lambda r: (loads[r], r))
        loads[owners[i]] += costs[i]
    return owners, loads


def matrix_cost(layouts: Sequence) -> float:
    """About ``s^3`` for a root plus ``r c s`` for the products, per block, ``s = min(r, c)``."""
    cost = 0.0
    for layout in layouts:
        shape = tuple(layout.shape)
        r, c = (shape[-2], shape[-1]) if len(shape) >= 2 else (1, max(1, int(torch.Size(shape).numel())))
        s = min(r, c)
        cost += layout.count * (s**3 + r * c * s)
    return cost


@dataclass(frozen=True)
class Expected:
    """A parameter that steps this call, as every rank sees it."""

    index: int
    owner: int
    numel: int
    dtype: torch.dtype
    device: torch.device


def all_gather_updates(mine: dict[int, tuple[Tensor, Tensor]], expected: list[Expected],
                       group: dist.ProcessGroup | None) -> dict[int, tuple[Tensor, Tensor]]:
    """Every rank's ``{index: (direction, flag)}`` on every rank: per (device, dtype) one flat
    buffer per rank (its parameters in index order, each direction followed by its flag), padded
    to the longest, in one ``all_gather_single``."""
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    out: dict[int, tuple[Tensor, Tensor]] = {}
    kinds = defaultdict(list)
    for e in expected:
        kinds[e.device, e.dtype].append(e)
    for (device, dtype), items in kinds.items():
        sizes = [0] * world_size
        for e in items:
            sizes[e.owner] += e.numel + 1
        width = max(sizes)
        send = torch.zeros(width, dtype=dtype, device=device)
        pieces = [torch.cat([mine[e.index][0].reshape(-1), mine[e.index][1].reshape(1)])
                  for e in items if e.owner == rank]
        if pieces:
            torch.cat(pieces, out=send[:sizes[rank]])
        received = torch.empty(world_size * width, dtype=dtype, device=device)
        _all_gather_single(received, send, group=group)
        offsets = [r * width for r in range(world_size)]
        for e in items:
            start = offsets[e.owner]
            offsets[e.owner] += e.numel + 1
            out[e.index] = (received[start:start + e.numel], received[start + e.numel])
    return out


def all_gather_states(owned: dict[int, dict], group: dist.ProcessGroup | None) -> dict[int, dict]:
    """Every rank's ``{parameter index: state}`` merged, on every rank (tensors via the CPU)."""
    on_cpu = {i: {k: v.cpu() if torch.is_tensor(v) else v for k, v in s.items()}
              for i, s in owned.items()}
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, on_cpu, group=group)
    merged: dict[int, dict] = {}
    for part in gathered:
        merged.update(part)
    return merged


# --- DTensor parameters sharded on their rows (FSDP2's Shard(0)) -------------------------------


def shard_rows(rows: int, world_size: int) -> list[int]:
    """Rows of each rank's ``Shard(0)`` piece: ``torch.chunk``'s split, empty pieces last."""
    chunk = -(-rows // world_size)
    return [max(0, min(chunk, rows - r * chunk)) for r in range(world_size)]


@dataclass(frozen=True)
class Sharded:
    """A row-sharded parameter that steps this call, as every rank sees it."""

    index: int
    owner: int
    shape: torch.Size
    dtype: torch.dtype  # of the exchanged values: the optimizer's state dtype

    def pieces(self, world_size: int) -> list[int]:
        """Number of entries of each rank's shard."""
        row = self.shape[1:].numel()
        return [n * row for n in shard_rows(self.shape[0], world_size)]


def _all_to_all(send: list[list[Tensor]], recv_sizes: list[int], dtype: torch.dtype,
                device: torch.device, group) -> list[Tensor]:
    """``send[r]``: the pieces for rank ``r``; returns what each rank sent here, flat."""
    send_flat = [torch.cat([t.reshape(-1).to(dtype) for t in pieces]) if pieces else
                 torch.empty(0, dtype=dtype, device=device) for pieces in send]
    send_sizes = [t.numel() for t in send_flat]
    received = torch.empty(sum(recv_sizes), dtype=dtype, device=device)
    dist.all_to_all_single(received, torch.cat(send_flat), recv_sizes, send_sizes, group=group)
    return list(received.split(recv_sizes))


def gather_sharded_gradients(local_grads: dict[int, Tensor], items: list[Sharded],
                             device: torch.device, group) -> dict[int, Tensor]:
    """Every owner's full gradients from every rank's row shards: one ``all_to_all`` per dtype.
    ``local_grads``: this rank's shard of each item's gradient."""
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    full = {}
    for dtype in {e.dtype for e in items}:
        kind = [e for e in items if e.dtype == dtype]
        mine = [e for e in kind if e.owner == rank]
        send = [[local_grads[e.index] for e in kind if e.owner == r] for r in range(world_size)]
        recv_sizes = [sum(e.pieces(world_size)[r] for e in mine) for r in range(world_size)]
        received = _all_to_all(send, recv_sizes, dtype, device, group)
        offsets = [0] * world_size
        for e in mine:
            parts = []
            for r, n in enumerate(e.pieces(world_size)):
                parts.append(received[r][offsets[r]:offsets[r] + n])
                offsets[r] += n
            full[e.index] = torch.cat(parts).view(e.shape)
    return full


def scatter_sharded_updates(mine: dict[int, tuple[Tensor, Tensor]], items: list[Sharded],
                            device: torch.device, group) -> dict[int, tuple[Tensor, Tensor]]:
    """Every rank's row shard of each owner's direction, with the 0/1 flag: one ``all_to_all``
    per dtype. ``mine``: this rank's owned ``{index: (full direction, flag)}``."""
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    out = {}
    for dtype in {e.dtype for e in items}:
        kind = [e for e in items if e.dtype == dtype]
        send = [[] for _ in range(world_size)]
        for e in kind:
            if e.owner == rank:
                d, flag = mine[e.index]
                rows = d.reshape(e.shape[0], -1).split(shard_rows(e.shape[0], world_size))
                for r in range(world_size):
                    send[r] += [rows[r], flag.reshape(1)]
        recv_sizes = [0] * world_size
        for e in kind:
            recv_sizes[e.owner] += e.pieces(world_size)[rank] + 1
        received = _all_to_all(send, recv_sizes, dtype, device, group)
        offsets = [0] * world_size
        for e in kind:
            n, o = e.pieces(world_size)[rank], e.owner
            out[e.index] = (received[o][offsets[o]:offsets[o] + n], received[o][offsets[o] + n])
            offsets[o] += n + 1
    return out
