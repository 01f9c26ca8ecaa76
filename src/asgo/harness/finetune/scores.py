"""The official GLUE metrics, written out in float64 (no scipy or scikit-learn needed).

Each function takes plain sequences (or tensors) of labels and predictions and returns a float,
with the conventions of scikit-learn / scipy that the GLUE evaluation (``evaluate``'s ``glue``)
uses: Matthews and F1 are 0 when undefined, Pearson and Spearman are nan for a constant input.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def _f64(values) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.float64).flatten()


def accuracy(labels: Sequence, predictions: Sequence) -> float:
    """Fraction of predictions equal to the labels."""
    y, p = _f64(labels), _f64(predictions)
    return float((y == p).double().mean()) if len(y) else float("nan")


def f1(labels: Sequence, predictions: Sequence, positive: int = 1) -> float:
    """Binary F1 of class ``positive``: ``2 tp / (2 tp + fp + fn)``; 0 when there is no positive at all."""
    y, p = _f64(labels) == positive, _f64(predictions) == positive
    tp, fp, fn = (y & p).sum().item(), (~y & p).sum().item(), (y & ~p).sum().item()
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def matthews_correlation(labels: Sequence, predictions: Sequence) -> float:
    """Matthews correlation coefficient (Gorodkin's multi-class form, binary MCC for two classes):
    ``(c s - sum_k p_k t_k) / sqrt((s^2 - sum_k p_k^2)(s^2 - sum_k t_k^2))`` with ``s`` examples, ``c``
    correct, ``t_k``/``p_k`` the true/predicted counts of class ``k``; 0 when a factor is 0."""
    y, p = _f64(labels), _f64(predictions)
    classes = torch.unique(torch.cat([y, p]))
    t = torch.stack([(y == k).sum() for k in classes]).double()
    q = torch.stack([(p == k).sum() for k in classes]).double()
    s, c = float(len(y)), float((y == p).sum())
    denominator = (s * s - float(q @ q)) * (s * s - float(t @ t))
    return (c * s - float(q @ t)) / math.sqrt(denominator) if denominator > 0 else 0.0


def pearson(x: Sequence, y: Sequence) -> float:
    """Pearson correlation ``cov(x, y) / (std(x) std(y))``; nan when either input is constant."""
    a, b = _f64(x), _f64(y)
    a, b = a - a.mean(), b - b.mean()
    denominator = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b) / denominator if denominator > 0 else float("nan")


def average_ranks(x: Sequence) -> torch.Tensor:
    """1-based ranks of ``x``, ties given the mean of the ranks they span (scipy's ``rankdata``)."""
    a = _f64(x)
    order = torch.argsort(a, stable=True)
    ranks = torch.empty_like(a)
    sorted_a = a[order]
    i = 0
    while i < len(a):
        j = i
        while j + 1 < len(a) and sorted_a[j + 1] == sorted_a[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence, y: Sequence) -> float:
    """Spearman rank correlation: Pearson of the average ranks (ties averaged)."""
    return pearson(average_ranks(x), average_ranks(y))


METRICS = {"accuracy": accuracy, "f1": f1, "matthews_correlation": matthews_correlation,
           "pearson": pearson, "spearmanr": spearman}


def compute(names: Sequence[str], labels: Sequence, predictions: Sequence) -> dict[str, float]:
    """``{name: value}`` of the metrics ``names`` (keys of :data:`METRICS`)."""
    return {name: METRICS[name](labels, predictions) for name in names}
