"""The GoLore paper's counter-example, its problem (1) (He et al., ICML 2025; exp/main.py).

``X in R^{n x n}``, ``n = 10``, ``r = 4``::

    A = [I_{n-r}, 0]                         ((n-r) x n)
    B = blockdiag(sigma randn(n-r, n-r), 0_{r x r})
    f(X) = 0.5 ||A X||_F^2 + <B, X>,   grad f = A^T A X + B   (only the top n-r rows)
    stochastic gradient = grad f + xi,  xi = +-sigma blockdiag(0_{n-r}, I_r)  (fair coin)
    X_0 = [[sigma/2 I_{n-r}, 0]; sigma randn(r, n)]
    f* = -0.5 ||B_top||_F^2

B and the random rows of X_0 are drawn, in that order, from a generator seeded with ``seed``
(42 in the paper's script, like its ``torch.manual_seed(42)`` on the CPU); the noise signs come
from a separate generator seeded with ``noise_seed``. Once every singular value of the true
gradient is below sigma, GaLore's top-r left singular vectors of the noisy gradient span the
noise rows, the projected step only moves the bottom rows, and ``f - f*`` freezes at
O(n sigma^2); a random (GoLore) basis keeps a fraction r/n of the true gradient in expectation.
"""

from __future__ import annotations

import torch


class CounterExample:
    def __init__(self, n: int = 10, r: int = 4, sigma: float = 1.0, seed: int = 42,
                 noise_seed: int = 0, dtype=torch.float32):
        g = torch.Generator().manual_seed(seed)
        self.n, self.r, self.sigma = n, r, sigma
        top = n - r
        self.B = torch.zeros(n, n, dtype=dtype)
        self.B[:top, :top] = torch.randn(top, top, generator=g) * sigma
        X0_top = torch.cat([sigma / 2 * torch.eye(top), torch.zeros(top, r)], dim=1)
        self.X0 = torch.cat([X0_top, torch.randn(r, n, generator=g) * sigma]).to(dtype)
        self.noise = torch.zeros(n, n, dtype=dtype)
        self.noise[top:, top:] = sigma * torch.eye(r)
        self.f_star = -0.5 * self.B.double().square().sum().item()
        self.noise_gen = torch.Generator().manual_seed(noise_seed)

    def loss(self, X: torch.Tensor) -> float:
        X = X.double()
        top = self.n - self.r
        return (0.5 * X[:top].square().sum() + (self.B.double() * X).sum()).item()

    def gap(self, X: torch.Tensor) -> float:
        """``f(X) - f*``."""
        return self.loss(X) - self.f_star

    def stochastic_grad(self, X: torch.Tensor) -> torch.Tensor:
        G = self.B.clone()
        top = self.n - self.r
        G[:top] += X[:top]
        sign = 1.0 if torch.rand((), generator=self.noise_gen).item() <= 0.5 else -1.0
        return G + sign * self.noise

    def run(self, make_opt, steps: int, log_every: int = 0) -> tuple[torch.Tensor, list[float]]:
        """Run ``steps`` steps of ``make_opt([X])``; return the final X and ``f - f*`` every
        ``log_every`` steps (none when 0)."""
        X = torch.nn.Parameter(self.X0.clone())
        opt = make_opt([X])
        gaps = []
        for t in range(1, steps + 1):
            X.grad = self.stochastic_grad(X.detach())
            opt.step()
            if log_every and t % log_every == 0:
                gaps.append(self.gap(X.detach()))
        return X.detach(), gaps
