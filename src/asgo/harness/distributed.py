"""torchrun integration: one process per device, gloo on CPU, nccl on GPU; rank 0 logs and saves.

``train.parallel=ddp`` wraps the model in DistributedDataParallel; ``train.parallel=fsdp2``
shards it with :func:`shard_model` (FSDP2's ``fully_shard``).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: str) -> tuple[Distributed, torch.device]:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1); pick the device."""
    world_size = launched_world_size()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if world_size == 1:
        return Distributed(), torch.device(device)
    info = Distributed(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if device.startswith("cuda"):
        torch.cuda.set_device(info.local_rank)
        dev = torch.device("cuda", info.local_rank)
        dist.init_process_group("nccl", device_id=dev)
    else:
        dev = torch.device(device)
        dist.init_process_group("gloo")
    return info, dev


def launched_world_size() -> int:
    """The number of processes torchrun started (``WORLD_SIZE``; 1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a harness model: ``GPT.h`` or ``Llama.layers``."""
    for name in ("h", "layers"):
        blocks = getattr(model, name, None)
        if isinstance(blocks, nn.ModuleList):
            return list(blocks)
    raise ValueError(f"{type(model).__name__} has no block list (a ModuleList named h or layers) to shard")


def shard_model(model: nn.Module, device: torch.device) -> nn.Module:
    """FSDP2: ``fully_shard`` each transformer block, then the root (embeddings, final norm and
    head, the tied GPT head with its embedding), over a 1-D mesh of every rank. The parameters
    become row-sharded DTensors (``Shard(0)``); a block's weights are all-gathered for its forward
    and backward and freed after, its gradients reduce-scattered to the shards. ``model`` is
    changed in place (its class becomes an ``FSDPModule``) and returned."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


@contextmanager
def gradient_sync(model: nn.Module, sync: bool):
    """Gradient accumulation: the backward of the micro-step whose forward runs in the body
    reduces gradients across ranks only when ``sync`` (the last micro-step); before it, each rank
    accumulates its own (DDP's ``no_sync``; FSDP2's ``set_requires_gradient_sync``, which keeps
    unsharded gradients until then)."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync)
        yield
    elif isinstance(model, nn.parallel.DistributedDataParallel) and not sync:
        with model.no_sync():
            yield
    else:
        yield


def teardown(info: Distributed) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def mean_across_ranks(value: torch.Tensor, info: Distributed) -> torch.Tensor:
    if info.enabled:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= info.world_size
    return value


def any_rank(flag: bool, info: Distributed, device: torch.device) -> bool:
    """Whether ``flag`` is true on any rank (a collective: every rank must call it)."""
    if not info.enabled:
        return flag
    value = torch.tensor(float(flag), device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


@contextmanager
def main_process_first(info: Distributed):
    """Run the body on rank 0 first (e.g. dataset preparation), then on the other ranks."""
    if info.enabled and not info.is_main:
        dist.barrier()
    yield
    if info.enabled and info.is_main:
        dist.barrier()
