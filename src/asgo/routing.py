"""Turn a model into one optimizer: hidden matrices to a structured method, the rest to AdamW.

    opt = asgo.build_optimizer(model, "asgo", lr=1e-2, precondition_frequency=10)
    table = opt.report()   # every parameter: name, shape, algorithm, state bytes

Rules, in order (the first that applies wins; ``routes`` patterns come before all of them):

1. ``routes``: ``{fnmatch pattern on the parameter name: algorithm name}``.
2. Embeddings (``nn.Embedding`` weights, or parameters marked with ``asgo.mark_as_embedding``)
   and the output head (a module named ``lm_head``, ``head``, ``output``, ``classifier`` or
   ``score``) go to AdamW. A head tied to the embedding is the same tensor and counted once.
3. Parameters with fewer than two dimensions (norm weights, biases) go to AdamW.
4. Every other parameter (a hidden weight matrix; conv kernels included) goes to the chosen
   method. For ASGO, attention query/key weights of models it recognises (a module named
   ``q_proj``, ``k_proj``, ``query``, ``key``, ``to_q``, ``to_k``, ``wq``, ``wk``, ``c_q`` or
   ``c_k`` whose parent has ``n_head``/``num_heads``/``n_heads``/``num_attention_heads``)
   get head-wise preconditioning (``num_heads``).
"""

from __future__ import annotations

import fnmatch
import inspect
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TextIO

import torch
from torch import Tensor, nn
from torch.distributed import ProcessGroup

from asgo.optim import ASGO, DASGO, Adafactor, GaLore, GoLore, Muon, Shampoo
from asgo.optim._base import MatrixOptimizer, evaluate_closure, is_embedding, restore_state_dtypes

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "asgo": ASGO,
    "dasgo": DASGO,
    "adamw": torch.optim.AdamW,
    "adafactor": Adafactor,
    "shampoo": Shampoo,
    "muon": Muon,
    "galore": GaLore,
    "golore": GoLore,
}

HEAD_NAMES = ("lm_head", "head", "output", "classifier", "score")
QUERY_KEY_NAMES = ("q_proj", "k_proj", "query", "key", "to_q", "to_k", "wq", "wk", "c_q", "c_k")
NUM_HEADS_ATTRIBUTES = ("n_head", "num_heads", "n_heads", "num_attention_heads")
ADAMW_DEFAULTS = dict(betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)


@dataclass
class Route:
    name: str
    param: Tensor
    role: str  # 'matrix', 'embedding', 'head', 'vector' or 'user'
    algorithm: str
    num_heads: int = 1


class RoutedOptimizer(torch.optim.Optimizer):
    """One optimizer over several algorithms. Its ``param_groups`` are the inner optimizers'
    groups themselves (each with an ``'algorithm'`` key) and its ``state`` is theirs, so
    ``state_dict``, ``load_state_dict``, schedulers and ``zero_grad`` work on it as on any
    ``torch.optim.Optimizer``."""

    def __init__(self, optimizers: Mapping[str, torch.optim.Optimizer], routes: list[Route]):
        self.optimizers = dict(optimizers)
        self.routes = routes
        super().__init__([g for opt in self.optimizers.values() for g in opt.param_groups], {})
        for opt in self.optimizers.values():
            _create_state(opt)
            self.state.update(opt.state)
        self._link()

    def _link(self) -> None:
        for algorithm, opt in self.optimizers.items():
            opt.param_groups = [g for g in self.param_groups if g["algorithm"] == algorithm]
            opt.state = self.state

    @torch.no_grad()
    def step(self, closure=None):
        loss = evaluate_closure(closure)
        for opt in self.optimizers.values():
            opt.step()
        return loss

    def state_dict(self) -> dict:
        """torch's ``state_dict``, with the state of matrices other ranks own gathered first when
        an inner optimizer has a process group (a collective: call it on every rank)."""
        distributed = [o for o in self.optimizers.values() if getattr(o, "process_group", None)]
        if not distributed:
            return super().state_dict()
        full = dict(self.state)
        for opt in distributed:
            full.update(opt.gathered_state())
        local, self.state = self.state, defaultdict(dict, full)
        try:
            return super().state_dict()
        finally:
            self.state = local

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._link()
        restore_state_dtypes(self, state_dict)
        for opt in self.optimizers.values():
            if getattr(opt, "process_group", None):
                opt.drop_unowned_state()

    def diagnostics(self) -> dict[str, int]:
        """Fault counters summed over the inner optimizers that keep them (syncs)."""
        totals: dict[str, int] = {}
        for opt in self.optimizers.values():
            if hasattr(opt, "diagnostics"):
                for key, value in opt.diagnostics().items():
                    totals[key] = totals.get(key, 0) + value
        return totals

    def report(self) -> str:
        """A table of every parameter: name, shape, algorithm, optimizer-state bytes, and totals.

        Before the first step the bytes come from a dry step on meta-device copies (no memory)."""
        nbytes = _state_bytes(self)
        rows = [("parameter", "shape", "algorithm", "params", "state bytes")]
        totals: dict[str, list[int]] = {}
        for r in self.routes:
            algorithm = r.algorithm + (f" (heads={r.num_heads})" if r.num_heads > 1 else "")
            rows.append((r.name, "x".join(map(str, r.param.shape)), algorithm,
                         f"{r.param.numel():,}", f"{nbytes[r.param]:,}"))
            total = totals.setdefault(r.algorithm, [0, 0])
            total[0] += r.param.numel()
            total[1] += nbytes[r.param]
        for algorithm, (count, size) in totals.items():
            rows.append((f"total {algorithm}", "", algorithm, f"{count:,}", f"{size:,}"))
        count = sum(t[0] for t in totals.values())
        size = sum(t[1] for t in totals.values())
        rows.append(("total", "", "", f"{count:,}", f"{size:,} ({size / 2**20:.1f} MiB)"))
        widths = [max(len(row[i]) for row in rows) for i in range(5)]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)


@torch.no_grad()
def _create_state(opt: torch.optim.Optimizer) -> None:
    """Give a fresh torch optimizer (AdamW) its state now, as the matrix optimizers have theirs
    from construction: one step with zero gradients at lr 0 (the parameters do not move), then its
    step counts back to 0, which is exactly the state its first real step would create. A fresh
    optimizer then has every state key, so ``torch.distributed.checkpoint`` needs no
    initialising step of its own (which would advance every counter)."""
    params = [p for g in opt.param_groups for p in g["params"]]
    if isinstance(opt, MatrixOptimizer) or opt.state or any(p.grad is not None for p in params):
        return
    lrs = [g["lr"] for g in opt.param_groups]
    for g in opt.param_groups:
        g["lr"] = torch.zeros_like(g["lr"]) if torch.is_tensor(g["lr"]) else 0.0
    for p in params:
        p.grad = torch.zeros_like(p)
    try:
        opt.step()
    finally:
        for g, lr in zip(opt.param_groups, lrs):
            g["lr"] = lr
        for p in params:
            p.grad = None
    for state in opt.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"].zero_()


def _state_bytes(routed: RoutedOptimizer) -> dict[Tensor, int]:
    """Optimizer-state bytes of every parameter, dry-stepping on meta copies where still empty."""
    nbytes = {}
    for opt in routed.optimizers.values():
        params = [p for g in opt.param_groups for p in g["params"]]
        if all(routed.state.get(p) for p in params):
            states = {p: routed.state[p] for p in params}
        else:
            metas = {p: nn.Parameter(torch.empty_like(p, device="meta")) for p in params}
            for m in metas.values():
                m.grad = torch.zeros_like(m)
            accepted = inspect.signature(type(opt)).parameters
            dry = type(opt)([{**g, "params": [metas[p] for p in g["params"]]} for g in opt.param_groups],
                            **{k: v for k, v in opt.defaults.items() if k in accepted})
            dry.step()
            states = {p: dry.state[metas[p]] for p in params}
        for p, state in states.items():
            nbytes[p] = sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
    return nbytes


def _num_heads(parent: nn.Module | None) -> int:
    for attribute in NUM_HEADS_ATTRIBUTES:
        value = getattr(parent, attribute, None)
        if isinstance(value, int) and value > 0:
            return value
    return 1


def route_parameters(model: nn.Module, name: str, routes: Mapping[str, str] | None = None,
                     headwise: bool = True) -> list[Route]:
    """Decide, for every parameter of ``model`` (tied ones once), which algorithm updates it."""
    modules = dict(model.named_modules())
    result, seen = [], set()
    for module_name, module in modules.items():
        for local, p in module.named_parameters(recurse=False):
            if not p.requires_grad or p in seen:
                continue
            seen.add(p)
            full = f"{module_name}.{local}" if module_name else local
            last = module_name.rsplit(".", 1)[-1]
            user = next((alg for pattern, alg in (routes or {}).items() if fnmatch.fnmatch(full, pattern)), None)
            if user is not None:
                result.append(Route(full, p, "user", user))
            elif isinstance(module, nn.Embedding) or is_embedding(p):
                result.append(Route(full, p, "embedding", "adamw"))
            elif last in HEAD_NAMES:
                result.append(Route(full, p, "head", "adamw"))
            elif p.ndim < 2:
                result.append(Route(full, p, "vector", "adamw"))
            else:
                heads = 1
                if name == "asgo" and headwise and last in QUERY_KEY_NAMES and local == "weight":
                    heads = _num_heads(modules.get(module_name.rpartition(".")[0]))
                result.append(Route(full, p, "matrix", name, heads))
    for r in result:
        if r.algorithm not in OPTIMIZERS:
            raise ValueError(f"unknown algorithm {r.algorithm!r} for {r.name}; valid: {sorted(OPTIMIZERS)}")
    return result


def build_optimizer(model: nn.Module, name: str, *, adamw: Mapping | None = None,
                    routes: Mapping[str, str] | None = None, headwise: bool = True,
                    report_to: TextIO | None = None, process_group: ProcessGroup | None = None,
                    **hyperparams) -> RoutedOptimizer:
    """One optimizer for ``model``: hidden matrices to ``name`` with ``hyperparams``, embeddings,
    the output head, norms and biases to AdamW with ``adamw`` (default: the same ``lr`` as the
    matrices, betas (0.9, 0.95), eps 1e-8, no weight decay, as the ASGO authors' setup).
    ``report_to`` (e.g. ``sys.stdout``) receives :meth:`RoutedOptimizer.report` at construction.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; valid names: {sorted(OPTIMIZERS)}")
    routed = route_parameters(model, name, routes, headwise)
    matrix_lr = hyperparams.get("lr", inspect.signature(OPTIMIZERS[name]).parameters["lr"].default)
    matrix_settings = dict(hyperparams)
    adamw_settings = {**ADAMW_DEFAULTS, "lr": matrix_lr, **(adamw or {})}
    for algorithm, values in ((name, matrix_settings), ("adamw", adamw_settings)):
        accepted = set(inspect.signature(OPTIMIZERS[algorithm]).parameters) - {"params"}
        unknown = sorted(set(values) - accepted)
        if unknown:
            raise ValueError(f"{OPTIMIZERS[algorithm].__name__} takes no hyper-parameter {unknown}; "
                             f"valid: {sorted(accepted)}")

    grouped: dict[tuple[str, int, bool], list[Tensor]] = {}
    for r in routed:
        is_matrix_method = r.algorithm == name and r.role in ("matrix", "user")
        grouped.setdefault((r.algorithm, r.num_heads, is_matrix_method), []).append(r.param)
    param_groups: dict[str, list[dict]] = {}
    for (algorithm, heads, is_matrix_method), params in grouped.items():
        group = {"params": params, "algorithm": algorithm}
        if is_matrix_method:
            group.update(matrix_settings)
        elif algorithm == "adamw":
            group.update(adamw_settings)
        if heads > 1:
            group["num_heads"] = heads
        param_groups.setdefault(algorithm, []).append(group)
    optimizers = {algorithm: OPTIMIZERS[algorithm](groups) if algorithm == "adamw" or process_group is None
                  else OPTIMIZERS[algorithm](groups, process_group=process_group)
                  for algorithm, groups in param_groups.items()}
    optimizer = RoutedOptimizer(optimizers, routed)
    if report_to is not None:
        report_to.write(optimizer.report() + "\n")
    return optimizer
