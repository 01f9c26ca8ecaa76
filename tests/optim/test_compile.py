"""torch.compile of ``step()``: no graph breaks, the eager result, and no recompilation per step.

The whole step is traced by Dynamo (``torch._dynamo.explain``) for every optimizer at its defaults
on matrices of different shapes; the compiled step runs through AOTAutograd
(``aot_eager``: functionalised graphs, eager kernels) and through Inductor (generated kernels) and
is compared with the eager step over steps with and without roots (basis refreshes), with
parameters that miss gradients, counting the compiled frames.
"""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import asgo

SHAPES = [(8, 12), (12, 8), (6, 6), (8, 12)]
OPTIMIZERS = ["ASGO", "DASGO", "Muon", "Shampoo", "Adafactor", "GaLore", "GoLore"]
# a root (basis refresh) every 2nd step, so 6 steps take 3 of them; GaLore/GoLore need rank < sides
SCHEDULED = {"ASGO": dict(precondition_frequency=2), "Shampoo": dict(precondition_frequency=2),
             "GaLore": dict(rank=4, update_proj_gap=2), "GoLore": dict(rank=4, update_proj_gap=2)}


def make(name: str, settings: dict, seed: int = 0) -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer]:
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(*s, generator=gen)) for s in SHAPES]
    return params, getattr(asgo, name)(params, **settings)


def gradients(step: int, scale: float) -> list[torch.Tensor]:
    """Full-rank gradients, and rank-1 ones every 3rd step, at ``scale``."""
    gen = torch.Generator().manual_seed(1000 + step)
    if step % 3 == 2:
        return [scale * torch.outer(torch.randn(s[0], generator=gen), torch.randn(s[1], generator=gen))
                for s in SHAPES]
    return [scale * torch.randn(*s, generator=gen) for s in SHAPES]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_step_has_no_graph_breaks(name):
    params, opt = make(name, {"rank": 4} if name in ("GaLore", "GoLore") else {})
    for p, g in zip(params, gradients(0, 1e-3)):
        p.grad = g
    explained = torch._dynamo.explain(opt.step)()
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


SLOW = pytest.mark.slow  # 10-30 s each on 2 CPU cores (Dynamo and AOT tracing of a whole step)


def run_both(name: str, settings: dict, backend, steps: int, missing: dict[int, set[int]] = {},
             scale: float = 1e-3):
    """Eager and compiled runs of ``name`` on the same gradients; ``missing[k]``: the parameters
    without a gradient at step ``k``."""
    params, opt = make(name, settings)
    compiled_params, compiled_opt = make(name, settings)
    step = torch.compile(compiled_opt.step, backend=backend)
    for k in range(steps):
        for i, (p, q, g) in enumerate(zip(params, compiled_params, gradients(k, scale))):
            p.grad, q.grad = (None, None) if i in missing.get(k, ()) else (g.clone(), g.clone())
        opt.step()
        step()
    return (params, opt), (compiled_params, compiled_opt)


def assert_same_run(eager, compiled, rtol: float) -> None:
    (params, opt), (compiled_params, compiled_opt) = eager, compiled
    for p, q in zip(params, compiled_params):
        torch.testing.assert_close(q, p, rtol=rtol, atol=rtol * p.abs().max().item())
    state, compiled_state = opt.state_dict()["state"], compiled_opt.state_dict()["state"]
    assert {i: int(s["step"]) for i, s in compiled_state.items()} == {i: int(s["step"]) for i, s in state.items()}
    assert compiled_opt.diagnostics() == opt.diagnostics()


@pytest.mark.parametrize("scale", [1e-3, pytest.param(1e-4, marks=SLOW)])
@pytest.mark.parametrize("name", [pytest.param(n, marks=SLOW) if n == "Shampoo" else n
                                  for n in OPTIMIZERS])
def test_compiled_step_matches_eager_without_recompiling_each_step(name, scale):
    counter = CompileCounterWithBackend("aot_eager")
    eager, compiled = run_both(name, SCHEDULED.get(name, {}), counter, 8, scale=scale)
    # Muon's default bfloat16 Newton-Schulz differs from eager by its round-off (~1e-2 relative)
    assert_same_run(eager, compiled, rtol=2e-2 if name == "Muon" else 1e-5)
    assert all(int(s["step"]) == 8 for s in compiled[1].state_dict()["state"].values())
    # step 1 (static), then one graph per schedule decision (root due or not): never one per step
    assert counter.frame_count <= 3, counter.frame_count


# parameter 1 misses steps 2 and 3, parameter 2 step 4: their schedules fall behind the others'
MISSING = {2: {1}, 3: {1}, 4: {2}}


@pytest.mark.parametrize("name", ["ASGO", "Adafactor", "GaLore"])
def test_parameters_that_miss_gradients_keep_their_own_schedule_when_compiled(name):
    settings = SCHEDULED.get(name, {})
    eager, compiled = run_both(name, settings, "aot_eager", 8, MISSING)
    assert [int(eager[1].state[p]["step"]) for p in eager[0]] == [8, 6, 7, 8]
    assert_same_run(eager, compiled, rtol=1e-5)


@SLOW
@pytest.mark.parametrize("name, missing", [("ASGO", MISSING), ("Adafactor", {})])  # roots; the step in kernels
def test_inductor_compiled_step_matches_eager(name, missing):
    """The default backend: generated kernels, so equal within float32 round-off, not bitwise."""
    eager, compiled = run_both(name, SCHEDULED.get(name, {}), "inductor", 8, missing)
    assert_same_run(eager, compiled, rtol=1e-5)


# a root every 3rd step, resumed after 4 steps (step 7 is a root step); and parameters that fell
# behind (MISSING), a root every 2nd step, resumed after 5 steps (parameter 1, at step 3 after
# call 5, takes its root at call 7)
@pytest.mark.parametrize("tau, before, missing", [(3, 4, {}), (2, 5, MISSING)])
def test_resumed_optimizer_keeps_its_step_schedule(tau, before, missing):
    """The Python clock and cohorts that the schedules read follow a loaded state_dict."""
    params, opt = make("ASGO", dict(precondition_frequency=tau))
    resumed_params, resumed = make("ASGO", dict(precondition_frequency=tau))
    for k in range(before):
        for i, (p, g) in enumerate(zip(params, gradients(k, 1e-3))):
            p.grad = None if i in missing.get(k, ()) else g
        opt.step()
    with torch.no_grad():
        for p, q in zip(params, resumed_params):
            q.copy_(p)
    resumed.load_state_dict(opt.state_dict())
    for k in range(before, before + 4):
        for p, q, g in zip(params, resumed_params, gradients(k, 1e-3)):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        resumed.step()
    for p, q in zip(params, resumed_params):
        assert torch.equal(p, q)
