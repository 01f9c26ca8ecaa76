"""Muon (Jordan et al., 2024): momentum orthogonalised by Newton–Schulz, as ``torch.optim.Muon``."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from asgo.linalg import NEWTON_SCHULZ_ORTHOGONALIZE_COEFFS, ORTHOGONALIZE_METHODS, orthogonalize
from asgo.optim._base import Bucket, MatrixOptimizer, Update
from asgo.optim._config import (
    LR,
    NON_NEGATIVE,
    POSITIVE,
    STEPS,
    UNIT,
    Check,
    Choice,
    Flag,
    HyperParameters,
    Reals,
    hyper,
)
from asgo.optim._layout import Single, matrix_shape

ADJUST_LR_FNS = ("original", "match_rms_adamw")


class FloatDtype(Check):
    expected = "None or a floating torch.dtype"

    def ok(self, value) -> bool:
        return value is None or (isinstance(value, torch.dtype) and value.is_floating_point)


@dataclass
class MuonConfig(HyperParameters):
    lr: float = hyper(1e-3, LR)
    weight_decay: float = hyper(0.1, NON_NEGATIVE)
    momentum: float = hyper(0.95, UNIT)
    nesterov: bool = hyper(True, Flag())
    ns_coefficients: tuple[float, float, float] = hyper(NEWTON_SCHULZ_ORTHOGONALIZE_COEFFS, Reals(3))
    eps: float = hyper(1e-7, POSITIVE)
    ns_steps: int = hyper(5, STEPS)
    adjust_lr_fn: str | None = hyper(None, Choice((None, *ADJUST_LR_FNS)))
    orthogonalize_method: str = hyper("newton_schulz", Choice(ORTHOGONALIZE_METHODS))
    ns_dtype: torch.dtype | None = hyper(None, FloatDtype())
    transposed: bool = hyper(False, Flag())


def adjusted_lr_ratio(adjust_lr_fn: str | None, rows: int, cols: int) -> float:
    """Factor on ``lr`` for the orthogonalised update of a ``rows x cols`` matrix:
    ``'original'`` (or ``None``) ``sqrt(max(1, rows / cols))``; ``'match_rms_adamw'``
    ``0.2 sqrt(max(rows, cols))``, which gives the update an RMS of about 0.2 like AdamW's."""
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return math.sqrt(max(1, rows / cols))


def newton_schulz(N: Tensor, coefficients: tuple[float, float, float], steps: int, eps: float,
                  dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """``torch.optim.Muon``'s quintic Newton–Schulz of each matrix of ``N`` (B, m, n), in
    ``dtype`` and in torch's operation order (tall matrices transposed)::

        X = N / max(||N||_F, eps)
        X <- addmm(X, addmm(A, A, A, beta=b, alpha=c), X, beta=a),   A = X X^T

    so each of ``b A + c A^2`` and ``a X + (.) X`` is rounded once. On CPU in a 16-bit ``dtype``
    each matrix is iterated alone with 2-D products, as torch does: there batched bfloat16
    products round differently from 2-D ones (measured: up to 3.9e-3 relative after 10 Muon
    steps), so the result equals torch's ``_zeropower_via_newtonschulz`` bit for bit (tested)
    whatever the batch. Elsewhere (float32 anywhere, any dtype on GPU) the stack is iterated
    batched, one kernel per product for all matrices."""
    if N.device.type == "cpu" and torch.finfo(dtype).bits == 16:
        return torch.stack([_newton_schulz(n, coefficients, steps, eps, dtype) for n in N])
    return _newton_schulz(N, coefficients, steps, eps, dtype)


def _newton_schulz(N: Tensor, coefficients: tuple[float, float, float], steps: int, eps: float,
                   dtype: torch.dtype) -> Tensor:
    a, b, c = coefficients
    addmm = torch.addmm if N.ndim == 2 else torch.baddbmm
    X = N.to(dtype)
    transpose = X.shape[-2] > X.shape[-1]
    if transpose:
        X = X.mT
    X = X / torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        A = X @ X.mT
        X = addmm(X, addmm(A, A, A, beta=b, alpha=c), X, beta=a)
    return X.mT if transpose else X


class Muon(MatrixOptimizer):
    r"""Muon: momentum orthogonalised by a matrix iteration, with ``torch.optim.Muon``'s
    arguments and update.

    For a matrix parameter :math:`W \in \mathbb{R}^{m \times n}` with gradient :math:`G_t`::

        B_t = mu B_{t-1} + (1 - mu) G_t               # momentum buffer (torch's lerp_), B_0 = 0
        N_t = (1 - mu) G_t + mu B_t   if nesterov, else B_t
        O_t = orth(N_t)                               # ~ U V^T of N_t = U S V^T
        W_t = W_{t-1} (1 - lr wd) - lr_adj O_t        # decoupled weight decay with the raw lr
        lr_adj = lr sqrt(max(1, m / n))               # adjust_lr_fn = 'original' (or None)
               = lr 0.2 sqrt(max(m, n))               # adjust_lr_fn = 'match_rms_adamw'

    ``orth`` works on the short side. ``'newton_schulz'`` is torch's iteration,
    :func:`newton_schulz`: ``X_0 = N / max(||N||_F, eps)``, then ``ns_steps`` quintic steps
    ``X <- a X + (b A + c A^2) X``, ``A = X X^T``, in bfloat16 by default, in torch's operation
    order. ``'polar_express'`` is :func:`asgo.linalg.orthogonalize` (``X_0 = N / (1.01 ||N||_F +
    eps)``, its own coefficient schedule), in float32 by default.

    Args:
        params: matrices (2-D or more, viewed as ``(shape[0], prod(shape[1:]))``).
        lr (float | Tensor): step size before the shape adjustment. Default 1e-3.
        weight_decay (float): decoupled, multiplied by the raw ``lr``. Default 0.1.
        momentum (float): ``mu``, in [0, 1). Default 0.95.
        nesterov (bool): use ``(1 - mu) G_t + mu B_t`` instead of ``B_t``. Default True.
        ns_coefficients (tuple): ``(a, b, c)`` of the quintic. Default (3.4445, -4.7750, 2.0315).
        eps (float): added to ``||N||_F``, > 0. Default 1e-7.
        ns_steps (int): iterations of the orthogonalisation. Default 5.
        adjust_lr_fn (str | None): ``None``/``'original'`` or ``'match_rms_adamw'``. Default None.
        orthogonalize_method (str): ``'newton_schulz'`` (the coefficients above) or
            ``'polar_express'`` (its own schedule; converges to ``U V^T``). Default
            ``'newton_schulz'``.
        ns_dtype (torch.dtype | None): dtype of the iteration; None: bfloat16 for
            ``'newton_schulz'`` (torch's), float32 for ``'polar_express'`` (float64 for float64
            parameters). Default None.
        transposed (bool): the parameters are 2-D weights stored ``(in, out)``, as Hugging Face's
            ``Conv1D``: each is updated exactly as its transpose stored ``(out, in)`` (bit for bit,
            tested on CPU), so the shape adjustment uses ``m = out``, ``n = in``. Default False.

    Notes:
        Defaults are ``torch.optim.Muon``'s, and with them (``'newton_schulz'`` in bfloat16)
        the iterates equal ``torch.optim.Muon``'s bit for bit on CPU (tested over 10 steps at
        gradient scales 1 to 1e-4): the same operations per matrix (:func:`newton_schulz`) and
        the same step, ``W.mul_(1 - lr wd).add_(O, alpha=-lr_adj)``. Its docstring writes
        heavy-ball momentum, its code (torch 2.13) the EMA above, which this class follows; the
        two differ by the factor ``1 - mu``, which ``orth`` removes. On CPUs without bfloat16
        matrix units ``ns_dtype=torch.float32`` is several times faster (batched).
        ``docs/optimizers.md`` has the measurements and the ASGO authors' Muon baseline
        (``Muon(params, lr=1e-2, momentum=0.9, nesterov=False, adjust_lr_fn="match_rms_adamw")``).
        Same-shape matrices are orthogonalised in one call (batched except in 16-bit dtypes). State (float32; float64 for
        float64 parameters): ``momentum_buffer`` (torch's name), ``step`` (CPU) and the counter
        ``skipped_steps``. Muon: Jordan et al. (2024), "Muon: An optimizer for hidden layers in
        neural networks"; ``'match_rms_adamw'``: Liu et al. (2025), "Muon is Scalable for LLM
        Training". Reference: :func:`asgo.optim.reference.muon_step`.
    """

    Config = MuonConfig
    ELEMENTWISE = ("momentum_buffer",)

    def layouts(self, p: Tensor, group: dict) -> list[Single]:
        return [Single.matrix(p, transposed=group["transposed"])]

    def init_state(self, state: dict, p: Tensor, group: dict) -> None:
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(
                p, dtype=self.state_dtype(p), memory_format=torch.contiguous_format)

    def compute(self, group: dict, G: Tensor, S: dict[str, Tensor], bucket: Bucket) -> Update:
        mu = group["momentum"]
        B = S["momentum_buffer"].lerp(G, 1 - mu)
        N = G.lerp(B, mu) if group["nesterov"] else B
        if group["orthogonalize_method"] == "newton_schulz":
            O = newton_schulz(N, tuple(group["ns_coefficients"]), group["ns_steps"], group["eps"],
                              group["ns_dtype"] or torch.bfloat16)
        else:
            O = orthogonalize(N, method="polar_express", steps=group["ns_steps"], eps=group["eps"],
                              dtype=group["ns_dtype"])
        return Update(O.to(G.dtype), dict(momentum_buffer=B))

    def step_factor(self, group: dict, p: Tensor) -> float:
        """The shape adjustment: the step is ``lr_adj O``, rounded as torch's ``add_``."""
        return adjusted_lr_ratio(group["adjust_lr_fn"], *matrix_shape(p.shape, group["transposed"]))
