"""Run under torchrun (gloo, CPU): optimizers on FSDP2 (``fully_shard``) parameters equal one
process, and their state round-trips through ``torch.distributed.checkpoint`` across world sizes.

``python fsdp2_worker.py step`` checks every optimizer's trajectory on sharded parameters (uneven
and empty shards included) against a single-process optimizer on a plain copy of the model, with
routed AdamW groups and parameters without a gradient; ``save DIR`` trains 3 steps and saves the
model and optimizer with DCP, then trains 3 more and saves the final parameters;
``load DIR`` (at any world size) loads the DCP checkpoint, trains the same 3 more steps and
checks it reached the saved final parameters (bitwise at the saving world size, within 1e-6 at
another).
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import asgo

TOLERANCE = 1e-6
NAMES = ["asgo", "dasgo", "muon", "shampoo", "galore", "golore"]
SETTINGS = {"galore": dict(rank=2, update_proj_gap=2), "golore": dict(rank=2, update_proj_gap=2),
            "shampoo": dict(max_preconditioner_dim=5)}


class Net(torch.nn.Module):
    """Rows 3 (fewer than 4 ranks: empty shards), 7 (uneven), 8 and 16; an unused layer."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(11, 8)
        self.a = torch.nn.Linear(8, 16)
        self.b = torch.nn.Linear(16, 7)
        self.c = torch.nn.Linear(7, 3, bias=False)
        self.d = torch.nn.Linear(3, 8, bias=False)
        self.unused = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 11)

    def forward(self, x):
        h = self.embed(x)
        h = self.d(self.c(torch.tanh(self.b(torch.tanh(self.a(h))))))
        return self.head(h)


def make(seed=0):
    torch.manual_seed(seed)
    return Net()


def batch(step):
    g = torch.Generator().manual_seed(step)
    return torch.randint(0, 11, (4, 6), generator=g)


def train(model, opt, steps, start=0):
    for step in range(start, start + steps):
        opt.zero_grad()
        x = batch(step)
        torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
        opt.step()


def full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def max_rel_err(model, reference):
    worst = 0.0
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        p = full(p.detach())
        worst = max(worst, ((p - q).norm() / q.norm().clamp_min(1e-30)).item())
    return worst


def shard(model):
    for layer in (model.a, model.b, model.c, model.d, model.unused):
        fully_shard(layer)
    fully_shard(model)
    return model


def check(condition, what):
    if not condition:
        raise AssertionError(f"rank {dist.get_rank()}: {what}")


def step_equality():
    for name in NAMES:
        reference, model = make(), shard(make())
        kw = SETTINGS.get(name, {})
        ref_opt = asgo.build_optimizer(reference, name, **kw)
        opt = asgo.build_optimizer(model, name, **kw)
        matrices = [p for g in opt.param_groups if g["algorithm"] == name for p in g["params"]]
        check(all(isinstance(p, DTensor) for p in matrices), f"{name}: parameters are not DTensors")
        train(reference, ref_opt, 4)
        train(model, opt, 4)
        err = max_rel_err(model, reference)
        check(err <= TOLERANCE, f"{name}: relative error {err:.2e} against one process")
        check(opt.diagnostics() == ref_opt.diagnostics(), f"{name}: diagnostics differ")
        # state: only the owned matrices', about 1/N of the total (at most one matrix over)
        sizes = {p: sum(v.numel() for k, v in opt.state[p].items() if torch.is_tensor(v) and k != "step")
                 for p in matrices if opt.state.get(p)}
        everyone = torch.tensor([sum(sizes.values())])
        dist.all_reduce(everyone)
        ref_sizes = [sum(v.numel() for k, v in ref_opt.state[p].items() if torch.is_tensor(v) and k != "step")
                     for g in ref_opt.param_groups if g["algorithm"] == name for p in g["params"]]
        check(int(everyone) == sum(ref_sizes), f"{name}: the ranks' states do not add up to one")
        check(sum(sizes.values()) <= sum(ref_sizes) / dist.get_world_size() + max(ref_sizes),
              f"{name}: {sum(sizes.values())} state entries on this rank of {sum(ref_sizes)}")
        # the gathered state_dict is the single process's
        mine, theirs = opt.state_dict()["state"], ref_opt.state_dict()["state"]
        check(mine.keys() == theirs.keys(), f"{name}: state_dict keys differ")
        for i, s in theirs.items():
            for k, v in s.items():
                a = torch.as_tensor(mine[i][k])
                a = full(a)
                check(torch.allclose(a.double(), torch.as_tensor(v).double(), rtol=1e-5, atol=1e-7),
                      f"{name}: state {i}/{k} differs")


def save(directory: Path):
    model = shard(make())
    opt = asgo.build_optimizer(model, "asgo", precondition_frequency=2)
    fresh = get_optimizer_state_dict(model, opt)
    steps = {fqn: int(s["step"]) for fqn, s in fresh["state"].items()}
    check(steps and not any(steps.values()), f"a fresh optimizer's state_dict has steps {steps}")
    train(model, opt, 3)
    dcp.save({"model": model.state_dict(), "optim": get_optimizer_state_dict(model, opt)},
             checkpoint_id=str(directory / "dcp"))
    train(model, opt, 3, start=3)
    final = {n: full(p.detach()).clone() for n, p in model.named_parameters()}
    if dist.get_rank() == 0:
        torch.save({"params": final, "world_size": dist.get_world_size()}, directory / "final.pt")


def load(directory: Path):
    model = shard(make(seed=1))  # other weights: the checkpoint must overwrite them
    opt = asgo.build_optimizer(model, "asgo", precondition_frequency=2)
    state = {"model": model.state_dict(), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=str(directory / "dcp"))
    model.load_state_dict(state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])
    train(model, opt, 3, start=3)
    saved = torch.load(directory / "final.pt")
    same_world = saved["world_size"] == dist.get_world_size()
    for n, p in model.named_parameters():
        q, p = saved["params"][n], full(p.detach())
        if same_world:  # the same sharding: the uninterrupted run exactly
            check(torch.equal(p, q), f"resumed {n} differs at the saving world size")
        err = ((p - q).norm() / q.norm()).item()
        check(err <= TOLERANCE, f"resumed {n}: relative error {err:.2e}")


def main():
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    command = sys.argv[1]
    if command == "step":
        step_equality()
    elif command == "save":
        save(Path(sys.argv[2]))
    else:
        load(Path(sys.argv[2]))
    dist.barrier()
    if dist.get_rank() == 0:
        print(f"fsdp2 {command} ok at world size {dist.get_world_size()}")
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # gloo's threads can abort a normal interpreter exit on a loaded machine


if __name__ == "__main__":
    main()
