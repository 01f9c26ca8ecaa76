"""``transposed=True``: a 2-D weight stored ``(in, out)`` (Hugging Face's ``Conv1D``) is updated
exactly as its transpose stored ``(out, in)``, bit for bit, step after step, through a
``state_dict`` round trip; without the flag the result depends on the storage."""

from __future__ import annotations

import io

import pytest
import torch

from asgo import optim

CASES = {
    "asgo": (optim.ASGO, {}),
    "asgo_heads": (optim.ASGO, dict(num_heads=2)),
    "asgo_eigh_tau2": (optim.ASGO, dict(root_method="eigh", precondition_frequency=2)),
    "dasgo": (optim.DASGO, {}),
    "muon": (optim.Muon, {}),
    "muon_match_rms_polar_express": (optim.Muon, dict(adjust_lr_fn="match_rms_adamw",
                                                      orthogonalize_method="polar_express")),
    "shampoo": (optim.Shampoo, {}),
    "shampoo_blocked_tau2": (optim.Shampoo, dict(max_preconditioner_dim=4, precondition_frequency=2)),
    "galore": (optim.GaLore, dict(rank=2, update_proj_gap=2)),
    "galore_left_sgd": (optim.GaLore, dict(rank=2, update_proj_gap=2, proj_type="left", inner="sgd",
                                           momentum=0.9)),
    "galore_full": (optim.GaLore, dict(rank=2, update_proj_gap=2, proj_type="full")),
    "golore": (optim.GoLore, dict(rank=2, update_proj_gap=2)),
    "golore_reverse_std": (optim.GoLore, dict(rank=2, update_proj_gap=2, proj_type="reverse_std")),
    "adafactor": (optim.Adafactor, dict(momentum=0.9)),
}
# Logical (out, in) shapes: tall, wide, square, and one whose stored rows (9) two heads cannot split.
SHAPES = [(8, 4), (4, 6), (6, 6), (6, 9)]
STEPS, RESUME_AT = 6, 3


def over(cases):
    return pytest.mark.parametrize("case", list(cases.values()), ids=list(cases))


def gradients(kind: str, seed: int = 0) -> list[list[torch.Tensor]]:
    """``STEPS`` lists of gradients of the logical ``SHAPES``: full rank at scale 1e-3, or rank 2
    at scale 1e-4."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(STEPS):
        if kind == "full":
            out.append([1e-3 * torch.randn(s, generator=g) for s in SHAPES])
        else:
            out.append([1e-4 * torch.randn(s[0], 2, generator=g) @ torch.randn(2, s[1], generator=g)
                        for s in SHAPES])
    return out


def weights(seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in SHAPES]


def step(opt, params, grads, transpose: bool) -> None:
    for p, grad in zip(params, grads):
        p.grad = grad.T.contiguous() if transpose else grad.clone()
    opt.step()


def assert_transposed_state(cls, stored, logical) -> None:
    """The state of the stored (in, out) parameter: the logical run's, elementwise entries
    transposed, every other entry (statistics of the logical matrix) equal."""
    assert stored.keys() == logical.keys()
    for key, value in logical.items():
        expected = value.T if key in cls.ELEMENTWISE else value
        assert torch.equal(stored[key], expected), key


@pytest.mark.parametrize("kind", ["full", "rank2"])
@over(CASES)
def test_transposed_run_is_the_transpose_bitwise(case, kind):
    cls, settings = case
    grads = gradients(kind)
    logical = [torch.nn.Parameter(w.clone()) for w in weights()]
    stored = [torch.nn.Parameter(w.T.contiguous()) for w in weights()]
    opt_logical = cls(logical, **settings)
    opt_stored = cls([{"params": stored, "transposed": True}], **settings)
    for t in range(STEPS):
        step(opt_logical, logical, grads[t], transpose=False)
        step(opt_stored, stored, grads[t], transpose=True)
        for w, p in zip(logical, stored):
            assert torch.equal(p.T, w), t
            assert_transposed_state(cls, opt_stored.state[p], opt_logical.state[w])
        if t + 1 == RESUME_AT:
            buf = io.BytesIO()
            torch.save({"params": [p.detach() for p in stored], "opt": opt_stored.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed = [torch.nn.Parameter(p.clone()) for p in saved["params"]]
    opt_resumed = cls([{"params": resumed, "transposed": True}], **settings)
    opt_resumed.load_state_dict(saved["opt"])
    for t in range(RESUME_AT, STEPS):
        step(opt_resumed, resumed, grads[t], transpose=True)
    for w, p in zip(logical, resumed):
        assert torch.equal(p.T, w)
        assert_transposed_state(cls, opt_resumed.state[p], opt_logical.state[w])


# Where the storage decides the update without the flag (the issue this flag fixes): ASGO's and
# GaLore's side of a square matrix, ASGO's heads, DASGO's side, Muon's shape adjustment.
STORAGE_DEPENDENT = {name: CASES[name] for name in ("asgo", "asgo_heads", "dasgo", "muon", "galore")}


@over(STORAGE_DEPENDENT)
def test_without_the_flag_the_stored_transpose_moves_elsewhere(case):
    cls, settings = case
    shapes = [(6, 6), (8, 4)]
    index = 0 if cls in (optim.ASGO, optim.GaLore) else 1  # the square one, or the tall one
    if settings.get("num_heads"):
        shapes, index = [(8, 4)], 0  # 8 logical rows, 4 stored ones: other heads
    g = torch.Generator().manual_seed(0)
    logical = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    stored = [torch.nn.Parameter(w.detach().T.contiguous()) for w in logical]
    start = [w.detach().clone() for w in logical]
    opt_logical, opt_stored = cls(logical, **settings), cls(stored, **settings)
    for _ in range(3):
        grads = [1e-3 * torch.randn(s, generator=g) for s in shapes]
        step(opt_logical, logical, grads, transpose=False)
        step(opt_stored, stored, grads, transpose=True)
    w, p, w0 = logical[index], stored[index], start[index]
    assert (p.T - w).norm() > 0.1 * (w - w0).norm()  # measured: 0.21 (DASGO) to 0.78 (GaLore)


def test_state_follows_the_logical_matrix():
    """DASGO's column statistic has one entry per input, Adafactor's row statistic one per
    output, ASGO's preconditioner is on the smaller logical side: for a stored (in, out) = (3, 7)."""
    p = torch.nn.Parameter(torch.randn(3, 7))
    p.grad = torch.randn(3, 7)
    dasgo = optim.DASGO([p], transposed=True)
    adafactor = optim.Adafactor([p], transposed=True)
    asgo_heads = optim.ASGO([p], transposed=True, num_heads=7)  # 7 heads of one output row
    for opt in (dasgo, adafactor, asgo_heads):
        opt.step()
    assert dasgo.state[p]["column_second_moment"].shape == (3,)
    assert adafactor.state[p]["row_second_moment"].shape == (7,)
    assert adafactor.state[p]["column_second_moment"].shape == (3,)
    assert asgo_heads.state[p]["preconditioner"].shape == (7, 1, 1)


ALL = sorted({cls for cls, _ in CASES.values()}, key=lambda c: c.__name__)


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_only_2d_parameters_can_be_transposed(cls):
    matrix, conv = torch.nn.Parameter(torch.zeros(4, 4)), torch.nn.Parameter(torch.zeros(4, 2, 3))
    message = r"transposed=True .*parameter 1 of shape \(4, 2, 3\) is 3-D"
    with pytest.raises(ValueError, match=message):
        cls([matrix, conv], transposed=True)
    opt = cls([matrix])
    with pytest.raises(ValueError, match=message):
        opt.add_param_group({"params": [conv], "transposed": True})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [conv]})  # the default group setting is False


@pytest.mark.parametrize("shape", [(7,), ()], ids=["1-D", "0-D"])
def test_adafactor_refuses_transposed_vectors(shape):
    with pytest.raises(ValueError, match=rf"transposed=True .*parameter 0 of shape {tuple(shape)}".replace(
            "(", r"\(").replace(")", r"\)")):
        optim.Adafactor([torch.nn.Parameter(torch.zeros(shape))], transposed=True)


def test_heads_split_the_logical_rows():
    optim.ASGO([torch.nn.Parameter(torch.zeros(9, 6))], num_heads=2, transposed=True)
    with pytest.raises(ValueError, match=r"num_heads=2 does not divide the 9 rows of a parameter of "
                                         r"shape \(6, 9\) stored transposed"):
        optim.ASGO([torch.nn.Parameter(torch.zeros(6, 9))], num_heads=2, transposed=True)



@over({name: CASES[name] for name in ("asgo_heads", "dasgo", "muon", "shampoo_blocked_tau2", "galore",
                                      "adafactor")})
def test_transposed_steps_on_the_meta_device(case):
    """Meta tensors have no values: a host read inside step() on a transposed parameter raises."""
    cls, settings = case
    params = [torch.nn.Parameter(torch.empty(s[::-1], device="meta")) for s in SHAPES]
    opt = cls(params, transposed=True, **settings)
    for _ in range(3):
        for p in params:
            p.grad = torch.empty_like(p)
        opt.step()
    assert all(p.is_meta for p in params)
