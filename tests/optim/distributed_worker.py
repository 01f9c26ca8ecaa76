"""Run under torchrun (gloo, CPU): owner-compute equals one process bit for bit.

Every rank builds the same matrices and gradients, steps a single-process optimizer and the same
optimizer with ``process_group`` side by side, and checks after every step that the parameters are
bitwise equal; then the per-rank state size, the gathered ``state_dict`` (equal to the single
process's), resuming across world sizes (N -> 1 and 1 -> N) and ``build_optimizer``. Exits non-zero
on the first difference.
"""

from __future__ import annotations

import copy
import os
import sys

import torch
import torch.distributed as dist

import asgo

SETTINGS = {
    "asgo": (asgo.ASGO, {}),
    "asgo_tau3_heads": (asgo.ASGO, dict(precondition_frequency=3, root_method="eigh")),
    "dasgo": (asgo.DASGO, {}),
    "muon": (asgo.Muon, {}),
    "shampoo_blocked": (asgo.Shampoo, dict(max_preconditioner_dim=6, precondition_frequency=2)),
    "galore": (asgo.GaLore, dict(rank=2, update_proj_gap=3)),
    "golore_sgd": (asgo.GoLore, dict(rank=3, update_proj_gap=2, inner="sgd", momentum=0.9)),
}
SHAPES = [(8, 16), (16, 8), (8, 16), (12, 12), (4, 2, 3), (5, 9), (16, 8), (3, 7)]
STEPS = 6


def make_params(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in SHAPES]


def gradients(step: int):
    """The same on every rank (as after DDP's all-reduce); parameter 5 has none on odd steps and
    parameter 2 a NaN on step 2."""
    g = torch.Generator().manual_seed(100 + step)
    grads = [torch.randn(*s, generator=g) for s in SHAPES]
    if step % 2:
        grads[5] = None
    if step == 2:
        grads[2][0, 0] = float("nan")
    return grads


def groups(params, name):
    if name == "asgo_tau3_heads":  # a head-wise group beside a plain one
        return [{"params": params[:3], "num_heads": 2}, {"params": params[3:]}]
    return params


def step_all(pairs, step: int) -> None:
    """Give each ``(optimizer, parameters)`` pair step ``step``'s gradients and step it."""
    for opt, params in pairs:
        for p, g in zip(params, gradients(step)):
            p.grad = None if g is None else g.clone()
        opt.step()


def check(condition: bool, what: str) -> None:
    if not condition:
        raise AssertionError(f"rank {dist.get_rank()}: {what}")


def state_bytes_of(state: dict) -> int:
    """Bytes of one parameter's state on its device (the CPU step counter left out)."""
    return sum(v.numel() * v.element_size() for k, v in state.items() if torch.is_tensor(v) and k != "step")


def state_bytes(opt) -> int:
    return sum(state_bytes_of(s) for s in opt.state.values())


def equal_state_dicts(a: dict, b: dict) -> bool:
    if a["state"].keys() != b["state"].keys():
        return False
    return all(torch.equal(torch.as_tensor(a["state"][i][k]), torch.as_tensor(v))
               for i, s in b["state"].items() for k, v in s.items())


def main() -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    world = dist.get_world_size()
    pg = dist.group.WORLD
    for name, (cls, kw) in SETTINGS.items():
        local_params, dist_params = make_params(), make_params()

        def local(ps):
            return cls(groups(ps, name), **kw)

        def distributed(ps):
            return cls(groups(ps, name), process_group=pg, **kw)

        local_opt, dist_opt = local(local_params), distributed(dist_params)
        for step in range(STEPS):
            step_all([(local_opt, local_params), (dist_opt, dist_params)], step)
            for i, (a, b) in enumerate(zip(local_params, dist_params)):
                check(torch.equal(a, b), f"{name}: parameter {i} differs after step {step}")
        check(dist_opt.diagnostics() == local_opt.diagnostics(), f"{name}: diagnostics differ")

        total, mine = state_bytes(local_opt), state_bytes(dist_opt)
        largest = max(state_bytes_of(s) for s in local_opt.state.values())
        check(mine <= total / world + largest, f"{name}: {mine} state bytes on this rank of {total}")
        everyone = torch.tensor([mine])
        dist.all_reduce(everyone)
        check(int(everyone) == total, f"{name}: state split over ranks sums to {int(everyone)}, not {total}")

        # the gathered state_dict is the single process's, on every rank
        saved = dist_opt.state_dict()
        check(equal_state_dicts(saved, local_opt.state_dict()), f"{name}: gathered state_dict differs")

        # resume N -> 1 and 1 -> N: both continue exactly as the uninterrupted run
        reference = [p.detach().clone() for p in local_params]
        for make, state in ((local, saved), (distributed, copy.deepcopy(local_opt.state_dict()))):
            ps = make_params()
            with torch.no_grad():
                for p, v in zip(ps, reference):
                    p.copy_(v)
            opt = make(ps)
            opt.load_state_dict(state)
            ref_params = [p.detach().clone().requires_grad_() for p in reference]
            ref_opt = local(ref_params)
            ref_opt.load_state_dict(copy.deepcopy(local_opt.state_dict()))
            for step in range(STEPS, STEPS + 3):
                step_all([(opt, ps), (ref_opt, ref_params)], step)
            for i, (a, b) in enumerate(zip(ps, ref_params)):
                check(torch.equal(a, b), f"{name}: resumed parameter {i} differs ({make.__name__})")

    # build_optimizer: hidden matrices owner-computed, the rest AdamW on every rank
    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Embedding(11, 8), torch.nn.Linear(8, 16), torch.nn.GELU(),
                                   torch.nn.Linear(16, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 11))

    models = [model(), model()]
    opts = [asgo.build_optimizer(models[0], "asgo"), asgo.build_optimizer(models[1], "asgo", process_group=pg)]
    x = torch.randint(0, 11, (4, 5))
    for _ in range(4):
        for m, o in zip(models, opts):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        check(torch.equal(a, b), "build_optimizer: parameters differ")
    check(equal_state_dicts(opts[1].state_dict(), opts[0].state_dict()), "build_optimizer: state_dict differs")

    try:
        asgo.Adafactor(make_params(), process_group=pg)
        check(False, "Adafactor accepted a process group")
    except ValueError as e:
        check("single-process" in str(e), f"Adafactor's refusal does not say why: {e}")

    dist.barrier()
    if dist.get_rank() == 0:
        print(f"owner-compute equals one process at world size {world}")
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # gloo's threads can abort a normal interpreter exit on a loaded machine


if __name__ == "__main__":
    sys.exit(main())
