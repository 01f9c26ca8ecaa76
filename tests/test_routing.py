import io

import pytest
import torch
from torch import nn

import asgo
from asgo.routing import route_parameters


class Attention(nn.Module):
    def __init__(self, width, n_head):
        super().__init__()
        self.n_head = n_head
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(width, width) for _ in range(3))
        self.c_proj = nn.Linear(width, width)


class Block(nn.Module):
    def __init__(self, width, n_head):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = Attention(width, n_head)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x):
        h = self.ln_1(x)
        q, k, v = self.attn.q_proj(h), self.attn.k_proj(h), self.attn.v_proj(h)
        att = torch.softmax(q @ k.mT / q.shape[-1] ** 0.5, dim=-1)
        x = x + self.attn.c_proj(att @ v)
        return x + self.mlp(self.ln_2(x))


class TinyGPT(nn.Module):
    """Just enough of a GPT to exercise routing: tied embedding/head, q/k/v, norms, biases."""

    def __init__(self, vocab=50, width=32, n_head=4, layers=2, block=16):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, width), nn.Embedding(block, width)
        self.blocks = nn.ModuleList(Block(width, n_head) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for b in self.blocks:
            x = b(x)
        return self.lm_head(self.ln_f(x))


def loss_of(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 50, (4, 16), generator=g)
    return nn.functional.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())


MATRIX_METHODS = ["asgo", "dasgo", "muon", "shampoo", "adafactor", "galore", "golore"]
SMALL_SETTINGS = {"galore": {"rank": 8, "update_proj_gap": 3}, "golore": {"rank": 8, "update_proj_gap": 3}}


def test_every_name_builds():
    assert set(asgo.routing.OPTIMIZERS) == set(MATRIX_METHODS) | {"adamw"}


@pytest.mark.parametrize("name", MATRIX_METHODS)
def test_matrices_to_method_rest_to_adamw(name):
    model = TinyGPT()
    opt = asgo.build_optimizer(model, name)
    by_name = {r.name: r for r in opt.routes}
    assert "lm_head.weight" not in by_name  # tied to wte: counted once
    assert by_name["wte.weight"].algorithm == "adamw" and by_name["wpe.weight"].algorithm == "adamw"
    assert by_name["blocks.0.ln_1.weight"].algorithm == "adamw"
    assert by_name["blocks.0.attn.q_proj.bias"].algorithm == "adamw"
    for key in ["blocks.0.attn.q_proj.weight", "blocks.1.attn.c_proj.weight", "blocks.0.mlp.0.weight"]:
        assert by_name[key].algorithm == name
    n_params = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == n_params
    assert {g["algorithm"] for g in opt.param_groups} == {name, "adamw"}
    assert all(g["algorithm"] == "adamw" or all(p.ndim == 2 for p in g["params"]) for g in opt.param_groups)


def test_asgo_gets_headwise_query_key():
    opt = asgo.build_optimizer(TinyGPT(n_head=4), "asgo")
    heads = {r.name: r.num_heads for r in opt.routes}
    assert heads["blocks.0.attn.q_proj.weight"] == 4 and heads["blocks.1.attn.k_proj.weight"] == 4
    assert heads["blocks.0.attn.v_proj.weight"] == 1
    headwise = [g for g in opt.param_groups if g.get("num_heads", 1) > 1]
    assert len(headwise) == 1 and len(headwise[0]["params"]) == 4
    assert asgo.build_optimizer(TinyGPT(), "asgo", headwise=False).routes[2].num_heads == 1


def test_user_routes_override():
    opt = asgo.build_optimizer(TinyGPT(), "asgo", routes={"blocks.*.mlp.*.weight": "adamw"})
    by_name = {r.name: r.algorithm for r in opt.routes}
    assert by_name["blocks.0.mlp.0.weight"] == "adamw" and by_name["blocks.0.attn.q_proj.weight"] == "asgo"
    with pytest.raises(ValueError, match="unknown algorithm 'sgdx'.*valid"):
        asgo.build_optimizer(TinyGPT(), "asgo", routes={"wte.weight": "sgdx"})


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown optimizer 'adam'.*'asgo'.*'dasgo'"):
        asgo.build_optimizer(TinyGPT(), "adam")


def test_hyperparameters_reach_each_optimizer():
    opt = asgo.build_optimizer(TinyGPT(), "asgo", lr=0.02, beta2=0.9, precondition_frequency=5,
                               adamw={"lr": 3e-4, "weight_decay": 0.01})
    for g in opt.param_groups:
        if g["algorithm"] == "asgo":
            assert (g["lr"], g["beta2"], g["precondition_frequency"]) == (0.02, 0.9, 5)
        else:
            assert (g["lr"], g["weight_decay"], g["betas"]) == (3e-4, 0.01, (0.9, 0.95))
    default = asgo.build_optimizer(TinyGPT(), "asgo", lr=0.05)
    assert {g["lr"] for g in default.param_groups} == {0.05}
    with pytest.raises(ValueError, match="beta2"):
        asgo.build_optimizer(TinyGPT(), "asgo", beta2=1.5)
    with pytest.raises(ValueError, match=r"ASGO takes no hyper-parameter \['bta2'\]"):
        asgo.build_optimizer(TinyGPT(), "asgo", bta2=0.9)
    with pytest.raises(ValueError, match=r"AdamW takes no hyper-parameter \['beta1'\]"):
        asgo.build_optimizer(TinyGPT(), "asgo", adamw={"beta1": 0.9})


def test_trains_and_state_dict_round_trip_is_exact():
    def make():
        torch.manual_seed(0)
        model = TinyGPT()
        return model, asgo.build_optimizer(model, "asgo", lr=0.02, precondition_frequency=2)

    def train(model, opt, seeds, sched=None):
        for s in seeds:
            opt.zero_grad()
            loss = loss_of(model, s)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
        return loss.item()

    model_a, opt_a = make()
    first = loss_of(model_a, 0).item()
    sched_a = torch.optim.lr_scheduler.LambdaLR(opt_a, lambda t: 0.95**t)
    last = train(model_a, opt_a, range(20), sched_a)
    assert last < first - 0.5

    model_b, opt_b = make()
    sched_b = torch.optim.lr_scheduler.LambdaLR(opt_b, lambda t: 0.95**t)
    train(model_b, opt_b, range(10), sched_b)
    buf = io.BytesIO()
    torch.save({"model": model_b.state_dict(), "opt": opt_b.state_dict(), "sched": sched_b.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model_c, opt_c = make()
    sched_c = torch.optim.lr_scheduler.LambdaLR(opt_c, lambda t: 0.95**t)
    model_c.load_state_dict(saved["model"])
    opt_c.load_state_dict(saved["opt"])
    sched_c.load_state_dict(saved["sched"])
    assert opt_c.optimizers["asgo"].param_groups[0] is next(
        g for g in opt_c.param_groups if g["algorithm"] == "asgo")
    train(model_c, opt_c, range(10, 20), sched_c)
    for a, c in zip(model_a.parameters(), model_c.parameters()):
        assert torch.equal(a, c)
    assert opt_c.diagnostics() == {"skipped_steps": 0, "root_failures": 0}


def test_report_lists_every_parameter_with_state_bytes():
    model = TinyGPT(width=32, n_head=4, layers=2)
    out = io.StringIO()
    opt = asgo.build_optimizer(model, "asgo", report_to=out)
    text = out.getvalue()
    assert text == opt.report() + "\n"
    assert "blocks.0.attn.q_proj.weight" in text and "asgo (heads=4)" in text
    # q_proj (32x32, 4 heads of 8): momentum 32*32*4 B + V and root 2*4*8*8*4 B + counters
    line = next(l for l in text.splitlines() if l.startswith("blocks.0.attn.q_proj.weight"))
    assert line.split()[-1] == f"{32 * 32 * 4 + 2 * 4 * 8 * 8 * 4 + 8 * 3:,}"
    loss_of(model).backward()
    opt.step()
    assert opt.report() == text.rstrip("\n")  # dry-run estimate equals the real state
    assert "total asgo" in text and "total adamw" in text


@pytest.mark.parametrize("name", MATRIX_METHODS)
def test_every_method_trains_resumes_exactly_and_reports_true_state_bytes(name):
    """Each routed method: loss falls, a mid-run state_dict (weights_only) resumes bit-exactly,
    and report()'s dry-run bytes before the first step equal the real state after it."""
    def make():
        torch.manual_seed(0)
        model = TinyGPT()
        return model, asgo.build_optimizer(model, name, lr=1e-2, **SMALL_SETTINGS.get(name, {}))

    def train(model, opt, seeds):
        for s in seeds:
            opt.zero_grad()
            loss = loss_of(model, s % 4)
            loss.backward()
            opt.step()
        return loss.item()

    model_a, opt_a = make()
    estimate = opt_a.report()
    first = loss_of(model_a, 0).item()
    assert train(model_a, opt_a, range(12)) < first - 0.3
    assert opt_a.report() == estimate

    model_b, opt_b = make()
    train(model_b, opt_b, range(6))
    buf = io.BytesIO()
    torch.save({"model": model_b.state_dict(), "opt": opt_b.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model_c, opt_c = make()
    model_c.load_state_dict(saved["model"])
    opt_c.load_state_dict(saved["opt"])
    train(model_c, opt_c, range(6, 12))
    for a, c in zip(model_a.parameters(), model_c.parameters()):
        assert torch.equal(a, c)


def test_route_parameters_is_usable_alone():
    routes = route_parameters(TinyGPT(), "dasgo")
    assert {r.role for r in routes} == {"embedding", "vector", "matrix"}


def test_adamw_everywhere_decays_only_matrices():
    opt = asgo.build_optimizer(TinyGPT(), "adamw", lr=1e-3, weight_decay=0.1)
    assert set(opt.optimizers) == {"adamw"}
    for g in opt.param_groups:
        is_matrix = all(p.ndim == 2 for p in g["params"]) and g["params"][0].shape[0] != 50
        assert g["weight_decay"] == (0.1 if is_matrix else 0.0)
