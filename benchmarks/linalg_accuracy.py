"""Accuracy of ``asgo.linalg.inverse_sqrt`` and ``orthogonalize`` vs float64 references, as markdown.

    python benchmarks/linalg_accuracy.py                          # float32, sizes 64 256
    python benchmarks/linalg_accuracy.py --dtype float64 --sizes 64 256

For each size ``s`` and each method/steps, the condition-number columns give the relative
Frobenius error ``||X - A^(-1/2)||_F / ||A^(-1/2)||_F`` on SPD matrices ``A = Q diag(lambda) Q^T``
(``Q`` random orthogonal, ``lambda`` log-spaced from 1 to 1/cond), where ``A^(-1/2)`` is the
float64 ``torch.linalg.eigh`` inverse square root of ``A`` as rounded to ``--dtype``; the largest
error over ``--seeds`` matrices is shown. The rank-deficient columns use ``V = G G^T`` with
``G`` of shape (s, s/8), normalised to ``||V||_F = 1`` and rounded to ``--dtype`` (``--eps`` is
applied there too; the range error is then that of the damped root, not 0):
``||X||_2`` is the largest gain (the null-space gain, since the range gains are O(1)) and
"range err" is ``||X V X U - U||_F / ||U||_F`` with ``U`` an orthonormal basis of range(V)
(0 for an exact pseudo-inverse root). ``nan`` marks non-finite output (``ok`` False).

The orthogonalize tables give ``||X - U V^T||_F / ||U V^T||_F`` on ``G = U diag(sigma) V^T`` of
shape (s, 2s) (``sigma`` log-spaced from 1 to 1/cond), where ``U V^T`` is the polar factor of
``G`` as rounded to ``--dtype`` (float64 SVD). The rows marked ``(G G^T)^(-1/2) G`` compute it
as ASGO's momentum-free limit does, ``inverse_sqrt(G G^T) @ G``, which squares the condition
number. They are printed only when ``--eps`` is 0.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from asgo.linalg import inverse_sqrt, orthogonalize

CONDS = (1.0, 1e2, 1e4, 1e6)
CONFIGS = [("polar_express", s) for s in (5, 10, 20)] + [
    ("newton_schulz", s) for s in (5, 10, 20)] + [("eigh", None)]
ORTH_CONFIGS = [("newton_schulz", 5), ("polar_express", 5), ("polar_express", 10)]
GRAM_CONFIGS = [("polar_express", 10), ("eigh", None)]


def spd_batch(s: int, cond: float, seeds: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(s * 1000 + math.log10(cond)))
    Q = torch.linalg.qr(torch.randn(seeds, s, s, generator=g, dtype=torch.float64))[0]
    evals = torch.logspace(0, -math.log10(cond), s, dtype=torch.float64)
    return (Q * evals.unsqueeze(-2)) @ Q.mT


def rank_deficient_batch(s: int, seeds: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(s)
    G = torch.randn(seeds, s, max(1, s // 8), generator=g, dtype=torch.float64)
    V = G @ G.mT
    V = V / torch.linalg.matrix_norm(V, keepdim=True)
    return V, torch.linalg.svd(G, full_matrices=False)[0]


def reference(A: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    A = A.to(torch.float64)
    evals, evecs = torch.linalg.eigh(A + eps * torch.eye(A.shape[-1], dtype=A.dtype))
    return (evecs * evals.rsqrt().unsqueeze(-2)) @ evecs.mT


def max_rel_err(X: torch.Tensor, R: torch.Tensor) -> float:
    err = torch.linalg.matrix_norm(X.to(torch.float64) - R) / torch.linalg.matrix_norm(R)
    return err.max().item()


def fmt(x: float) -> str:
    return "nan" if not math.isfinite(x) else f"{x:.1e}"


def table(s: int, dtype: torch.dtype, seeds: int, eps: float = 0.0) -> str:
    inputs = [spd_batch(s, cond, seeds).to(dtype) for cond in CONDS]
    refs = [reference(A, eps) for A in inputs]
    V, U = rank_deficient_batch(s, seeds)
    V = V.to(dtype)
    V64 = V.to(torch.float64)
    head = ["method", "steps"] + [f"cond {c:.0e}" for c in CONDS] + [
        f"rank {U.shape[-1]}/{s}: ‖X‖₂", f"rank {U.shape[-1]}/{s}: range err"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, steps in CONFIGS:
        kw = {"method": method, "eps": eps} if steps is None else {
            "method": method, "steps": steps, "eps": eps}
        row = [method, "–" if steps is None else str(steps)]
        for A, R in zip(inputs, refs):
            X, ok = inverse_sqrt(A, **kw)
            row.append(fmt(max_rel_err(X, R)) if bool(ok.all()) else "nan")
        X, ok = inverse_sqrt(V, **kw)
        if bool(ok.all()):
            X = X.to(torch.float64)
            gain = torch.linalg.matrix_norm(X, 2).max().item()
            rng = (torch.linalg.matrix_norm(X @ V64 @ X @ U - U) / math.sqrt(U.shape[-1])).max().item()
            row += [fmt(gain), fmt(rng)]
        else:
            row += ["nan", "nan"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def polar_reference(G: torch.Tensor) -> torch.Tensor:
    U, _, Vh = torch.linalg.svd(G.to(torch.float64), full_matrices=False)
    return U @ Vh


def via_gram(G: torch.Tensor, method: str, steps: int | None) -> torch.Tensor:
    kw = {"method": method} if steps is None else {"method": method, "steps": steps}
    X, ok = inverse_sqrt(G @ G.mT, **kw)
    return X @ G.to(X.dtype) if bool(ok.all()) else torch.full_like(X, math.nan)


def orth_table(s: int, dtype: torch.dtype, seeds: int) -> str:
    inputs = []
    for cond in CONDS:
        g = torch.Generator().manual_seed(int(s * 1000 + math.log10(cond)) + 1)
        U = torch.linalg.qr(torch.randn(seeds, s, s, generator=g, dtype=torch.float64))[0]
        V = torch.linalg.qr(torch.randn(seeds, 2 * s, s, generator=g, dtype=torch.float64))[0]
        sigma = torch.logspace(0, -math.log10(cond), s, dtype=torch.float64)
        inputs.append(((U * sigma.unsqueeze(-2)) @ V.mT).to(dtype))
    refs = [polar_reference(G) for G in inputs]
    head = ["method", "steps"] + [f"cond {c:.0e}" for c in CONDS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, steps in ORTH_CONFIGS:
        row = [method, str(steps)] + [fmt(max_rel_err(orthogonalize(G, method=method, steps=steps), R))
                                      for G, R in zip(inputs, refs)]
        lines.append("| " + " | ".join(row) + " |")
    for method, steps in GRAM_CONFIGS:
        row = [f"{method}, (G G^T)^(-1/2) G", "–" if steps is None else str(steps)] + [
            fmt(max_rel_err(via_gram(G, method, steps), R)) for G, R in zip(inputs, refs)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--seeds", type=int, default=3, help="matrices per cell (largest error shown)")
    parser.add_argument("--eps", type=float, default=0.0,
                        help="absolute damping passed to inverse_sqrt (the reference is (A + eps I)^(-1/2))")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    start = time.perf_counter()
    print(f"inverse_sqrt relative error vs float64 eigh, input {args.dtype}, eps = {args.eps:g}, "
          f"max over {args.seeds} matrices (torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads)\n")
    for s in args.sizes:
        print(f"### s = {s}\n")
        print(table(s, dtype, args.seeds, args.eps))
        print()
    if not args.eps:
        print(f"orthogonalize relative error vs the float64 polar factor, input {args.dtype}\n")
        for s in args.sizes:
            print(f"### G of shape ({s}, {2 * s})\n")
            print(orth_table(s, dtype, args.seeds))
            print()
    print(f"({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
