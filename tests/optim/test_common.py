"""The contract every optimizer of ``asgo.optim`` must pass.

One table of settings (``ROWS``) and one table of refused arguments (``BAD_ARGUMENTS``) at the top;
below them one test per promise, parametrized over the table. A new optimizer gets its rows here
(``test_every_optimizer_has_rows_and_bad_arguments`` fails until it has them); its own maths
(float64 references, defaults, blocking, bases, ...) goes in its own test file.
"""

from __future__ import annotations

import copy
import inspect
import io
import re
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from problems import fit_with_closure, two_layer_regression

from asgo import optim


@dataclass
class Row:
    """One setting of one optimizer. ``row(params, **kw)`` builds it (``kw`` override ``settings``)."""

    cls: type
    settings: dict = field(default_factory=dict)
    vectors: bool = False  # takes 0-D and 1-D parameters and embeddings; the others refuse them
    batches: bool = True  # same-shape matrices stepped together move exactly as each alone
    overflow_skipped: bool = True  # its statistic squares the gradient: an overflowing square is skipped
    step_free: bool = False  # the update does not depend on the step count (tau = 1, no schedules)
    root: str | None = None  # state key of a preconditioner root, recomputed from the statistic

    def __call__(self, params, **kw):
        return self.cls(params, **{**self.settings, **kw})


ROWS = {
    "asgo": Row(optim.ASGO, root="inv_root"),  # tau = 5: the step count decides the root steps
    "asgo_eigh_tau3": Row(optim.ASGO, dict(root_method="eigh", precondition_frequency=3),
                          root="inv_root"),
    "asgo_newton_schulz_tau1": Row(optim.ASGO, dict(root_method="newton_schulz", precondition_frequency=1),
                                   step_free=True, root="inv_root"),
    "dasgo": Row(optim.DASGO, step_free=True),
    "shampoo": Row(optim.Shampoo, step_free=True, root="left_root"),
    "shampoo_eigh_tau2_blocked": Row(optim.Shampoo, dict(root_method="eigh", precondition_frequency=2,
                                                         max_preconditioner_dim=4), root="left_root"),
    "shampoo_newton_schulz_no_grafting": Row(optim.Shampoo, dict(root_method="newton_schulz",
                                                                 grafting="none", lr=1e-3),
                                             step_free=True, root="left_root"),
    "shampoo_relative_eps_pre_start_grafting": Row(optim.Shampoo, dict(
        relative_eps=True, eps=1e-5, precondition_frequency=2, start_preconditioning_step=3,
        pre_start_update="grafting"), root="left_root"),
    "adafactor": Row(optim.Adafactor, vectors=True),
    "adafactor_clip_momentum": Row(optim.Adafactor, dict(clip_alpha=2.0, momentum=0.9), vectors=True),
    "adafactor_schedules": Row(optim.Adafactor, dict(c=0.8, lr_decay=0.5, clip_alpha=2.0, momentum=0.9,
                                                     weight_decay=0.1), vectors=True),
    "muon": Row(optim.Muon, overflow_skipped=False),
    "muon_polar_express": Row(optim.Muon, dict(orthogonalize_method="polar_express", nesterov=False),
                              overflow_skipped=False),
    "galore": Row(optim.GaLore, dict(rank=2, update_proj_gap=3)),
    "galore_full": Row(optim.GaLore, dict(rank=2, update_proj_gap=3, proj_type="full")),
    "galore_sgd": Row(optim.GaLore, dict(rank=3, update_proj_gap=2, inner="sgd", momentum=0.9),
                      overflow_skipped=False),
    # GoLore's random bases are seeded by the parameter's index: alone, a matrix draws another one.
    "golore": Row(optim.GoLore, dict(rank=2, update_proj_gap=3), batches=False),
}

# Each (argument, value) raises ValueError("invalid <argument>: <value>, expected ...").
COMMON_BAD = [("lr", -1.0), ("lr", float("nan")), ("lr", "0.1"), ("weight_decay", -0.1),
              ("momentum", 1.0), ("momentum", -0.1), ("momentum", "abc"), ("transposed", 1),
              ("transposed", None)]
GALORE_BAD = [
    ("rank", 0), ("rank", 2.5), ("update_proj_gap", 0), ("update_proj_gap", 1.5), ("scale", 0.0),
    ("proj_type", "reverse"), ("proj_type", "up"), ("inner", "adafactor"), ("inner", "lion"),
    ("betas", (0.9,)), ("betas", (1.0, 0.999)), ("betas", (0.9, -0.1)), ("eps", 0.0),
    ("dampening", 1.5), ("nesterov", "yes"), ("nesterov", 1), ("golore_fraction", 1.5),
    ("golore_fraction", -0.1), ("total_steps", 0), ("seed", -1), ("seed", 1.5),
    ("reproject_moments", 1),
]
BAD_ARGUMENTS = {
    optim.ASGO: COMMON_BAD + [
        ("beta2", 1.0), ("eps", 0.0), ("eps", -1e-8), ("precondition_frequency", 0),
        ("precondition_frequency", 2.5), ("start_preconditioning_step", 0), ("root_method", "svd"),
        ("root_steps", 0), ("update_rms", 0.0), ("num_heads", 0)],
    optim.DASGO: COMMON_BAD + [
        ("beta2", 1.5), ("beta2", -0.5), ("eps", 0.0), ("update_rms", -0.2)],
    optim.Shampoo: COMMON_BAD + [
        ("beta2", 1.0), ("beta2", -0.5), ("eps", 0.0), ("eps", -1e-8), ("precondition_frequency", 0),
        ("precondition_frequency", 2.5), ("start_preconditioning_step", 0), ("root_method", "svd"),
        ("root_method", "qr"), ("root_steps", 0), ("grafting", "sgd"), ("grafting_eps", 0.0),
        ("max_preconditioner_dim", 0), ("max_preconditioner_dim", 512.0), ("relative_eps", 1),
        ("relative_eps", "yes"), ("pre_start_update", "adam"), ("pre_start_update", None)],
    optim.Muon: COMMON_BAD + [
        ("nesterov", 1), ("ns_coefficients", (1.0, 2.0)), ("ns_coefficients", (1.0, float("nan"), 0.0)),
        ("eps", 0.0), ("eps", -1e-7), ("ns_steps", 0), ("ns_steps", 2.5), ("adjust_lr_fn", "sqrt"),
        ("orthogonalize_method", "svd"), ("ns_dtype", torch.int32), ("ns_dtype", "bfloat16")],
    optim.Adafactor: COMMON_BAD + [
        ("c", 0.4), ("c", 1.1), ("lr_decay", -0.5), ("eps1", 0.0), ("eps1", -1e-30),
        ("clip_threshold", 0.0), ("clip_alpha", 1.0), ("clip_alpha", 0.5), ("beta2_first", 1.0),
        ("beta2_first", -0.5)],
    optim.GaLore: COMMON_BAD + GALORE_BAD,
    optim.GoLore: COMMON_BAD + GALORE_BAD,
}

SHAPES = [(6, 10), (10, 6), (10, 6), (8, 8), (4, 2, 3)]
VECTOR_SHAPES = [(7,), ()]  # added for rows that take vectors
POISONED = 1  # the parameter given bad gradients: a (10, 6) matrix batched with the healthy params[2]
OVERFLOW = 1e20  # finite in float32, its square is not
HOST_SYNCS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__")


# --- helpers ------------------------------------------------------------------------------------

def over(rows):
    return pytest.mark.parametrize("row", list(rows.values()), ids=list(rows))


def rows_where(keep):
    return {name: row for name, row in ROWS.items() if keep(row)}


def params_and_grads(row, dtype=torch.float32, device="cpu", seed=0, steps=8):
    g = torch.Generator().manual_seed(seed)
    shapes = SHAPES + (VECTOR_SHAPES if row.vectors else [])
    params = [torch.nn.Parameter(torch.randn(s, generator=g).to(device, dtype)) for s in shapes]
    grads = [[torch.randn(s, generator=g).to(device, dtype) for s in shapes] for _ in range(steps)]
    return params, grads


def step(opt, params, grads):
    """Set the gradients (None: no gradient) and take one step."""
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()
    opt.step()


def poisoned(grads, make_bad):
    return [make_bad(g.clone()) if i == POISONED else g for i, g in enumerate(grads)]


def with_entry(value):
    def put(g):
        g[2, 3] = value
        return g
    return put


def state_of(opt, p):
    return {k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)}


def assert_same_state(before, after, ignore=("step", "skipped_steps")):
    assert {k for k in before if k not in ignore} == {k for k in after if k not in ignore}
    for key, value in before.items():
        if key not in ignore:
            assert torch.equal(after[key], value), key


def float_state(opt):
    return [v for state in opt.state.values() for v in state.values()
            if torch.is_tensor(v) and v.is_floating_point()]


def all_finite(tensors):
    return all(torch.isfinite(t).all() for t in tensors)


def expected_counters(opt, skipped):
    """``opt.diagnostics()`` when ``skipped`` steps were skipped and nothing else went wrong."""
    return {**dict.fromkeys(opt.diagnostics(), 0), "skipped_steps": skipped}


def failure_counters(opt):
    """Every fault counter but ``skipped_steps`` (root, basis failures)."""
    return {k: v for k, v in opt.diagnostics().items() if k != "skipped_steps"}


def is_identity_like(t):
    """Only zeros and ones: an identity root, however its blocks are laid out."""
    return bool(((t == 0) | (t == 1)).all())


# --- the table ----------------------------------------------------------------------------------

def test_every_optimizer_has_rows_and_bad_arguments():
    classes = {obj for name in optim.__all__ if inspect.isclass(obj := getattr(optim, name))}
    assert len(classes) >= 7
    assert {c.__name__ for c in classes - {row.cls for row in ROWS.values()}} == set()
    assert {c.__name__ for c in classes - set(BAD_ARGUMENTS)} == set()


# --- arguments ----------------------------------------------------------------------------------

BAD_CASES = [(cls, arg, value) for cls, bad in BAD_ARGUMENTS.items() for arg, value in bad]


@pytest.mark.parametrize("cls,arg,value", BAD_CASES,
                         ids=[f"{cls.__name__}-{arg}={value!r}" for cls, arg, value in BAD_CASES])
def test_invalid_argument_is_refused_naming_it(cls, arg, value):
    names_it = rf"invalid {re.escape(arg)}\b"
    with pytest.raises(ValueError, match=names_it):
        cls([torch.nn.Parameter(torch.zeros(4, 4))], **{arg: value})
    opt = cls([torch.nn.Parameter(torch.zeros(4, 4))])
    with pytest.raises(ValueError, match=names_it):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(4, 4))], arg: value})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("cls", list(BAD_ARGUMENTS), ids=lambda c: c.__name__)
def test_unknown_keyword_is_a_type_error(cls):
    with pytest.raises(TypeError, match="not_an_option"):
        cls([torch.nn.Parameter(torch.zeros(4, 4))], not_an_option=1)


@pytest.mark.parametrize("shape", [(), (1,), (1, 1)], ids=["0-dim", "[1]", "[1,1]"])
@over(ROWS)
def test_tensor_lr_equals_float_lr(row, shape):
    params, grads = params_and_grads(row)
    ref_params, _ = params_and_grads(row)
    opt, ref = row(params, lr=torch.full(shape, 0.01)), row(ref_params, lr=0.01)
    for gs in grads[:3]:
        step(opt, params, gs)
        step(ref, ref_params, gs)
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=0)


@over(ROWS)
def test_tensor_lr_must_have_one_element(row):
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        row([torch.nn.Parameter(torch.zeros(4, 4))], lr=torch.tensor([0.01, 0.02]))


@over(ROWS)
def test_scheduler_drives_a_tensor_lr(row):
    params, grads = params_and_grads(row)
    ref_params, _ = params_and_grads(row)
    opt, ref = row(params, lr=torch.tensor(0.01)), row(ref_params, lr=0.01)
    schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5) for o in (opt, ref)]
    for gs in grads[:4]:
        step(opt, params, gs)
        step(ref, ref_params, gs)
        for s in schedulers:
            s.step()
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(0.01 * 0.5**4)
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=0)


@over(ROWS)
def test_tensor_lr_is_the_users_tensor(row):
    """As torch's optimizers: the group holds the very tensor, so changing it in place moves lr."""
    lr = torch.tensor(0.01)
    opt = row([torch.nn.Parameter(torch.zeros(4, 4))], lr=lr)
    assert opt.param_groups[0]["lr"] is lr


@pytest.mark.parametrize("cls", sorted(BAD_ARGUMENTS, key=lambda c: c.__name__), ids=lambda c: c.__name__)
def test_numpy_and_tensor_scalars_are_accepted(cls):
    opt = cls([torch.nn.Parameter(torch.zeros(4, 4))], lr=np.float32(0.01), weight_decay=np.float64(0.0))
    assert opt.param_groups[0]["lr"] == np.float32(0.01)


def test_a_state_dict_without_a_hyperparameter_is_refused():
    opt = optim.Adafactor([torch.nn.Parameter(torch.zeros(4, 4))])
    old = opt.state_dict()
    old["param_groups"][0]["beta1"] = old["param_groups"][0].pop("momentum")  # asgo 0.1's name
    with pytest.raises(ValueError, match=r"no hyper-parameter \['momentum'\].*another version"):
        opt.load_state_dict(old)


@pytest.mark.parametrize("cls", sorted(BAD_ARGUMENTS, key=lambda c: c.__name__), ids=lambda c: c.__name__)
def test_a_state_dict_from_before_the_later_hyperparameters_loads(cls):
    """A checkpoint written before ``transposed``/``compat``/... existed keeps the values the
    optimizer was built with, and resumes exactly as the full state_dict does."""
    from asgo.optim._base import LATER_HYPERPARAMETERS

    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(6, 4))
    opt = cls([w], transposed=True)
    w.grad = torch.randn(6, 4) * 1e-3
    opt.step()
    full = copy.deepcopy(opt.state_dict())
    old = copy.deepcopy(full)
    later = [k for k in LATER_HYPERPARAMETERS if k in old["param_groups"][0]]
    assert "transposed" in later
    for key in later:
        del old["param_groups"][0][key]
    copies = []
    for state_dict in (full, old):
        v = torch.nn.Parameter(w.detach().clone())
        fresh = cls([v], transposed=True)
        fresh.load_state_dict(state_dict)
        assert fresh.param_groups[0]["transposed"] is True
        v.grad = torch.ones(6, 4) * 1e-3
        fresh.step()
        copies.append(v)
    assert torch.equal(copies[0], copies[1])


# --- parameters and gradients -------------------------------------------------------------------

@over(ROWS)
def test_empty_parameters_are_refused(row):
    with pytest.raises(ValueError, match=r"parameter 1 of shape \(0, 5\) is empty"):
        row([torch.nn.Parameter(torch.zeros(4, 4)), torch.nn.Parameter(torch.zeros(0, 5))])

@over(ROWS)
def test_complex_parameters_are_refused(row):
    real = torch.nn.Parameter(torch.zeros(4, 4))
    cplx = torch.nn.Parameter(torch.zeros(4, 4, dtype=torch.complex64))
    with pytest.raises(ValueError, match=r"parameter 1 of shape \(4, 4\).*complex"):
        row([real, cplx])
    opt = row([real])
    with pytest.raises(ValueError, match=r"parameter 1 of shape \(4, 4\).*complex"):
        opt.add_param_group({"params": [cplx]})
    assert len(opt.param_groups) == 1


@over(ROWS)
def test_sparse_gradient_is_refused_at_step(row):
    params = [torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(4, 4))]
    opt = row(params)
    params[0].grad = torch.randn(4, 4)
    params[1].grad = torch.randn(4, 4).to_sparse()
    with pytest.raises(RuntimeError, match=r"(?s)parameter 1\b.*sparse|sparse.*parameter 1\b"):
        opt.step()


@over(rows_where(lambda row: not row.vectors))
def test_matrix_optimizers_refuse_vectors_and_embeddings(row):
    matrix, bias = torch.nn.Parameter(torch.zeros(4, 4)), torch.nn.Parameter(torch.zeros(7))
    with pytest.raises(ValueError, match=r"parameter 1 of shape \(7,\).*build_optimizer"):
        row([matrix, bias])
    emb = torch.nn.Embedding(11, 4).weight
    optim.mark_as_embedding(emb)
    with pytest.raises(ValueError, match=r"parameter 0 of shape \(11, 4\) is an embedding"):
        row([emb])
    opt = row([matrix])
    with pytest.raises(ValueError, match=r"parameter 1 of shape \(7,\)"):
        opt.add_param_group({"params": [bias]})
    assert len(opt.param_groups) == 1


@over(ROWS)
def test_parameters_without_gradient_are_skipped(row):
    """A parameter without a gradient neither moves nor changes its state (created, at zero,
    with the optimizer: a fresh optimizer has its state, as torch.distributed.checkpoint needs)."""
    params, grads = params_and_grads(row)
    opt = row(params)
    idle = params[2]  # same shape as params[1], which steps
    before = [p.detach().clone() for p in params]
    fresh = copy.deepcopy(opt.state_dict()["state"])
    assert fresh.keys() == set(range(len(params)))
    assert all(int(s["step"]) == 0 for s in fresh.values())
    for gs in grads[:3]:
        step(opt, params, [None if p is idle else g for p, g in zip(params, gs)])
    for key, value in opt.state_dict()["state"][2].items():
        assert torch.equal(torch.as_tensor(value), torch.as_tensor(fresh[2][key])), key
    assert torch.equal(idle, before[2])
    assert all(not torch.equal(p, b) for p, b in zip(params, before) if p is not idle)


@over(ROWS)
def test_mixed_dtypes_in_one_group(row):
    """A float32 and a float64 matrix of one shape in one group move as each alone (the other slot
    holds a parameter without gradient, so every parameter keeps its index)."""
    g = torch.Generator().manual_seed(0)
    w32, w64 = torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g, dtype=torch.float64)
    grads = [(torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g, dtype=torch.float64))
             for _ in range(3)]
    mixed = [torch.nn.Parameter(w32.clone()), torch.nn.Parameter(w64.clone())]
    alone32 = [torch.nn.Parameter(w32.clone()), torch.nn.Parameter(torch.zeros_like(w64))]
    alone64 = [torch.nn.Parameter(torch.zeros_like(w32)), torch.nn.Parameter(w64.clone())]
    opt, opt32, opt64 = row(mixed), row(alone32), row(alone64)
    for g32, g64 in grads:
        step(opt, mixed, [g32, g64])
        step(opt32, alone32, [g32, None])
        step(opt64, alone64, [None, g64])
    assert mixed[0].dtype == torch.float32 and mixed[1].dtype == torch.float64
    torch.testing.assert_close(mixed[0].detach(), alone32[0].detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(mixed[1].detach(), alone64[1].detach(), rtol=1e-12, atol=0)


@over(ROWS)
def test_two_devices_in_one_group(row):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 10, generator=g)
    grads = [torch.randn(6, 10, generator=g) for _ in range(3)]
    cpu, meta = torch.nn.Parameter(w.clone()), torch.nn.Parameter(torch.empty(6, 10, device="meta"))
    alone = torch.nn.Parameter(w.clone())
    opt, ref = row([cpu, meta]), row([alone])
    for grad in grads:
        step(opt, [cpu, meta], [grad, torch.empty(6, 10, device="meta")])
        step(ref, [alone], [grad])
    assert meta.is_meta and not torch.equal(cpu, w)
    assert torch.equal(cpu, alone)


# --- no host sync -------------------------------------------------------------------------------

@over(ROWS)
def test_steps_on_the_meta_device(row):
    """Meta tensors have no values: any read by the host inside step() raises."""
    params, grads = params_and_grads(row, device="meta")
    opt = row(params)
    for gs in grads[:3]:
        step(opt, params, gs)
    assert all(p.is_meta for p in params) and len(opt.state) == len(params)


@over(ROWS)
def test_step_does_not_sync_with_the_host(row, monkeypatch):
    """Reading a tensor's value on the host raises inside step() (int() of the CPU step is allowed)."""
    params, grads = params_and_grads(row)
    opt = row(params)

    def host_sync(*args, **kwargs):
        raise AssertionError("host sync")

    for gs in grads[:3]:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        with monkeypatch.context() as patch:
            for name in HOST_SYNCS:
                patch.setattr(torch.Tensor, name, host_sync)
            opt.step()
    assert all_finite(params)


# --- faults -------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@over(ROWS)
def test_non_finite_gradient_is_a_skipped_step(row, bad):
    params, grads = params_and_grads(row)
    opt = row(params)
    for gs in grads[:3]:
        step(opt, params, gs)
    p = params[POISONED]
    p_before, state_before = p.detach().clone(), state_of(opt, p)
    for gs in grads[3:6]:  # three poisoned steps, refresh and root steps among them
        other_before = params[0].detach().clone()
        step(opt, params, poisoned(gs, with_entry(bad)))
        assert torch.equal(p, p_before)
        assert_same_state(state_before, state_of(opt, p))
        assert not torch.equal(params[0], other_before)
        assert all_finite(float_state(opt))
    assert opt.diagnostics() == expected_counters(opt, skipped=3)
    step(opt, params, grads[6])
    assert not torch.equal(p, p_before)
    assert all_finite(params) and all_finite(float_state(opt))


@over(ROWS)
def test_overflowing_statistic_is_survived(row):
    """A finite gradient whose square overflows float32, twice on one parameter: skipped where the
    statistic squares the gradient (maybe applied elsewhere), and preconditioning resumes after."""
    params, grads = params_and_grads(row)
    opt = row(params)
    for gs in grads[:3]:
        step(opt, params, gs)
    p = params[POISONED]
    p_before, state_before = p.detach().clone(), state_of(opt, p)
    for gs in grads[3:5]:
        step(opt, params, poisoned(gs, lambda g: g * OVERFLOW))
        if row.overflow_skipped:
            assert torch.equal(p, p_before)
            assert_same_state(state_before, state_of(opt, p))
    for gs in grads[5:8]:
        step(opt, params, gs)
    assert all_finite(params) and all_finite(float_state(opt))
    assert not any(failure_counters(opt).values()), failure_counters(opt)
    if row.overflow_skipped:
        assert opt.diagnostics()["skipped_steps"] == 2
    if row.root is not None:
        root = opt.state[p][row.root]
        assert not is_identity_like(root)
        assert not torch.equal(root, state_before[row.root])


@pytest.mark.parametrize("bad", ["nan", "overflow"])
@over(rows_where(lambda row: row.step_free and row.overflow_skipped))
def test_skipped_steps_are_as_if_they_never_happened(row, bad):
    """Where the step count does not enter the maths, a run with two skipped steps (the others
    without gradient) is bitwise the run that never saw them."""
    make_bad = with_entry(float("nan")) if bad == "nan" else (lambda g: g * OVERFLOW)
    params, grads = params_and_grads(row)
    fresh_params, _ = params_and_grads(row)
    opt, fresh = row(params), row(fresh_params)
    for gs in grads[:3]:
        step(opt, params, gs)
        step(fresh, fresh_params, gs)
    for gs in grads[3:5]:
        step(opt, params, [g if i == POISONED else None for i, g in enumerate(poisoned(gs, make_bad))])
    for gs in grads[5:8]:
        step(opt, params, gs)
        step(fresh, fresh_params, gs)
    assert opt.diagnostics() == expected_counters(opt, skipped=2)
    for p, q in zip(params, fresh_params):
        assert torch.equal(p, q)
        assert_same_state(state_of(fresh, q), state_of(opt, p))


@over(rows_where(lambda row: row.batches))
def test_batched_equals_unbatched(row):
    """Same-shape matrices stepped together (stacked where the optimizer batches) move exactly
    as each would alone."""
    torch.manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(12, 20)) for _ in range(3)]
    params.append(torch.nn.Parameter(torch.randn(20, 12)))
    singles = [torch.nn.Parameter(p.detach().clone()) for p in params]
    batched = row(params)
    alone = [row([p]) for p in singles]
    for _ in range(4):
        for p, q in zip(params, singles):
            g = torch.randn_like(p)
            p.grad, q.grad = g, g.clone()
        batched.step()
        for o in alone:
            o.step()
    for p, q in zip(params, singles):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)


@over(ROWS)
def test_zero_gradients_stay_finite(row):
    params, grads = params_and_grads(row)
    opt = row(params)
    for gs in grads[:3]:
        step(opt, params, [torch.zeros_like(g) for g in gs])
    assert all_finite(params) and all_finite(float_state(opt))
    assert opt.diagnostics() == expected_counters(opt, skipped=0)


# --- state --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@over(ROWS)
def test_state_dict_resume_is_exact_with_weights_only_load(row, dtype):
    params_a, grads = params_and_grads(row, dtype)
    opt_a = row(params_a)
    for gs in grads:
        step(opt_a, params_a, gs)

    params_b, _ = params_and_grads(row, dtype)
    opt_b = row(params_b)
    for gs in grads[:4]:
        step(opt_b, params_b, gs)
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in params_b], "opt": opt_b.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)

    params_c, _ = params_and_grads(row, dtype)
    with torch.no_grad():
        for p, v in zip(params_c, saved["params"]):
            p.copy_(v)
    opt_c = row(params_c)
    opt_c.load_state_dict(saved["opt"])
    for state in opt_c.state.values():
        for key, value in state.items():
            if torch.is_tensor(value):
                assert value.dtype == (torch.float32 if value.is_floating_point() else torch.int64), key
        assert "step" not in state or (state["step"].device.type == "cpu" and int(state["step"]) == 4)
    for gs in grads[4:]:
        step(opt_c, params_c, gs)
    for a, c in zip(params_a, params_c):
        assert torch.equal(a, c)


@over(ROWS)
def test_state_dict_keeps_param_group_hyperparameters(row):
    params, grads = params_and_grads(row)
    opt = row([{"params": params[:2]}, {"params": params[2:], "lr": 0.03, "weight_decay": 0.05}])
    step(opt, params, grads[0])
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    other = params_and_grads(row)[0]
    loaded = row([{"params": other[:2]}, {"params": other[2:]}])
    assert loaded.param_groups[1]["lr"] != 0.03
    loaded.load_state_dict(torch.load(buf, weights_only=True))

    def hyperparameters(o):
        return [{k: v for k, v in group.items() if k != "params"} for group in o.param_groups]

    assert hyperparameters(loaded) == hyperparameters(opt)
    assert loaded.param_groups[1]["lr"] == 0.03 and loaded.param_groups[1]["weight_decay"] == 0.05


# --- the torch.optim.Optimizer contract ---------------------------------------------------------

@over(ROWS)
def test_closure_param_groups_and_scheduler(row):
    model, x, y = two_layer_regression(bias=row.vectors)
    opt = row([{"params": list(model[0].parameters())},
               {"params": list(model[2].parameters()), "lr": 3e-2}], lr=0.05)
    first, last = fit_with_closure(opt, model, x, y)
    assert last < 0.8 * first
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05 * 0.98**30)
    assert opt.param_groups[1]["lr"] == pytest.approx(3e-2 * 0.98**30)


@over(ROWS)
def test_deepcopy_steps_like_the_original(row):
    params, grads = params_and_grads(row)
    opt = row(params)
    for gs in grads[:3]:
        step(opt, params, gs)
    twin = copy.deepcopy(opt)
    twin_params = [p for group in twin.param_groups for p in group["params"]]
    assert all(q is not p and q.data_ptr() != p.data_ptr() for p, q in zip(params, twin_params))
    for gs in grads[3:6]:
        step(opt, params, gs)
        step(twin, twin_params, gs)
    for p, q in zip(params, twin_params):
        assert torch.equal(p, q)
        assert_same_state(state_of(opt, p), state_of(twin, q), ignore=())


@over(ROWS)
def test_step_hooks_fire_once_per_step(row):
    params, grads = params_and_grads(row)
    opt = row(params)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    for gs in grads[:3]:
        step(opt, params, gs)
    assert calls == ["pre", "post"] * 3


@over(ROWS)
def test_zero_grad_sets_grads_to_none(row):
    params, grads = params_and_grads(row)
    opt = row(params)
    step(opt, params, grads[0])
    opt.zero_grad()
    assert all(p.grad is None for p in params)
