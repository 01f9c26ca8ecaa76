"""Small deterministic problems and helpers shared by the optimizer tests (the float64
references of the update rules are in :mod:`asgo.optim.reference`)."""

from __future__ import annotations

import torch


def least_squares(shape, seed=0, samples=64):
    """``f(W) = 0.5 ||X W - Y||_F^2 / samples`` for W of ``shape`` (float64 data)."""
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    X = torch.randn(samples, m, generator=g, dtype=torch.float64)
    Y = torch.randn(samples, n, generator=g, dtype=torch.float64)
    W0 = torch.randn(m, n, generator=g, dtype=torch.float64) / m**0.5

    def grad(W):
        return X.T @ (X @ W - Y) / samples

    def loss(W):
        Xc, Yc = X.to(W.dtype), Y.to(W.dtype)
        return 0.5 * (Xc @ W - Yc).square().sum() / samples

    return W0, grad, loss


def scaled_least_squares(shape, scale, rank=None, seed=0):
    """``least_squares(shape, seed)`` with gradients times ``scale`` (1e-3, 1e-4: realistic
    gradient sizes); with ``rank``, data of rank ``rank``, so every gradient has rank ``rank``."""
    W0, grad, loss = least_squares(shape, seed)
    if rank is None:
        return W0, lambda W: scale * grad(W), loss
    g = torch.Generator().manual_seed(seed + 7)
    X = torch.randn(64, rank, generator=g, dtype=torch.float64) @ torch.randn(
        rank, shape[0], generator=g, dtype=torch.float64)
    Y = torch.randn(64, shape[1], generator=g, dtype=torch.float64)
    return W0, lambda W: scale * X.T @ (X @ W - Y) / 64, loss


def run_optimizer(make_opt, W0, grad, steps, dtype=torch.float32):
    """Run ``steps`` steps of ``make_opt([W])`` with gradients ``grad(W)`` computed in float64
    and cast to ``dtype`` (so references see the same gradients); return float64 iterates."""
    W = torch.nn.Parameter(W0.to(dtype).clone())
    opt = make_opt([W])
    iterates = []
    for _ in range(steps):
        W.grad = grad(W.detach().double()).to(dtype)
        opt.step()
        iterates.append(W.detach().double().clone())
    return iterates, opt


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def two_layer_regression(bias=False, seed=0):
    """A small ``Linear(8, 16) -> Tanh -> Linear(16, 4)`` model with random regression data."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16, bias=bias), torch.nn.Tanh(),
                                torch.nn.Linear(16, 4, bias=bias))
    return model, torch.randn(64, 8), torch.randn(64, 4)


def fit_with_closure(opt, model, x, y, steps=30, decay=0.98):
    """``steps`` of ``opt.step(closure)`` under ``LambdaLR(decay^t)``; return (first, last) loss."""
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: decay**t)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    first = closure().item()
    for _ in range(steps):
        loss = opt.step(closure)
        sched.step()
    return first, loss.item()
