"""Turn a model into one optimizer: hidden matrices to a structured method, the rest to AdamW.

    opt = asgo.build_optimizer(model, "asgo", lr=1e-2, precondition_frequency=10)
    table = opt.report()   # every parameter: name, shape, role, algorithm, state bytes, note

Rules, in order (the first that applies wins); each parameter gets a role, shown in the report:

1. ``user``: ``routes``, ``{fnmatch pattern on the parameter name: algorithm name}``.
2. ``embedding`` -> AdamW: ``nn.Embedding`` weights, parameters marked with
   ``asgo.mark_as_embedding``, and parameters registered directly on a module (not a ``weight``
   or ``bias``) whose attribute name matches ``*token*``, ``*embed*``, ``*position*`` or
   ``pos_*`` (a ViT's ``cls_token``, ``mask_token``, ``position_embeddings``, ``pos_embed``).
3. ``head`` -> AdamW: parameters of a module whose path has a component named ``lm_head``,
   ``head``, ``output``, ``classifier`` or ``score`` before any numeric component (so a
   PEFT-wrapped ``score.modules_to_save.default`` is a head, BERT's ``layer.0.output.dense`` is
   not). A head tied to the embedding is the same tensor and counted once.
4. ``vector`` -> AdamW: parameters with fewer than two dimensions (norm weights, biases).
5. ``matrix`` -> the chosen method: every other parameter (hidden weight matrices, conv kernels).

Two layout facts travel to the matrix optimizers as group keys:

- ``transposed=True`` (methods that take it) for the weight of a Hugging Face ``Conv1D``
  (GPT-2), stored ``(in, out)``, so the preconditioned side and Muon's shape scaling follow the
  layer's output/input sides, not its storage.
- ``num_heads`` (ASGO only, ``headwise=True``): a query weight (a module named ``q_proj``,
  ``query``, ``to_q``, ``wq``, ``c_q`` or ``q``) is split by the attention module's query-head
  count (``num_attention_heads``/``num_heads``/``n_head``/``n_heads``), a key weight (``k_proj``,
  ``key``, ``to_k``, ``wk``, ``c_k``, ``k``) by its key-value head count
  (``num_key_value_heads``/``num_kv_heads``/``n_kv_heads``/``n_kv_head``; else the query-head
  count), each read from the attention module (the parent) or else its ``config`` (Hugging Face
  Llama, Mistral, Qwen2). Fused projections (GPT-2's ``c_attn``, GPT-NeoX's
  ``query_key_value``) stay whole. A count that does not divide the output rows, or disagrees
  with ``head_dim``/``head_size``, gives no split and a note in the report.
"""

from __future__ import annotations

import fnmatch
import inspect
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TextIO

import torch
from torch import Tensor, nn
from torch.distributed import ProcessGroup

from asgo.optim import ASGO, DASGO, Adafactor, GaLore, GoLore, Muon, Shampoo
from asgo.optim._base import (
    DEFAULT_MAX_BUCKET_BYTES,
    MatrixOptimizer,
    load_hooks,
    evaluate_closure,
    is_embedding,
    restore_state_dtypes,
    with_later_hyperparameters,
)

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
EMBEDDING_NAMES = ("*token*", "*embed*", "*position*", "pos_*")
QUERY_NAMES = ("q_proj", "query", "to_q", "wq", "c_q", "q")
KEY_NAMES = ("k_proj", "key", "to_k", "wk", "c_k", "k")
QUERY_HEADS = ("num_attention_heads", "num_heads", "n_head", "n_heads")
KEY_VALUE_HEADS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "n_kv_head")
HEAD_DIM = ("head_dim", "head_size")
CONSTRUCTOR_OPTIONS = ("process_group", "max_bucket_bytes")  # keyword arguments, not group keys
ROUTED_DEFAULTS: dict[str, dict] = {  # build_optimizer's defaults where the class's do not train
    "adamw": dict(lr=3e-3),
    "adafactor": dict(lr=5e-3),
    "muon": dict(lr=1e-2, adjust_lr_fn="match_rms_adamw"),
    "galore": dict(lr=1e-2, scale=0.25),
    "golore": dict(lr=1e-2, scale=0.25),
}
ADAMW_DEFAULTS = dict(betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)


@dataclass
class Route:
    name: str
    param: Tensor
    role: str  # 'matrix', 'embedding', 'head', 'vector' or 'user'
    algorithm: str
    num_heads: int = 1
    transposed: bool = False  # stored (in, out): a Hugging Face Conv1D weight
    note: str = ""


def _accepts(algorithm: str) -> set[str]:
    return set(inspect.signature(OPTIMIZERS[algorithm]).parameters) - {"params", *CONSTRUCTOR_OPTIONS}


def _construct(algorithm: str, groups: list[dict], process_group: ProcessGroup | None,
               max_bucket_bytes: int | None) -> torch.optim.Optimizer:
    """``OPTIMIZERS[algorithm](groups)`` with the constructor options that are not per group
    (every optimizer but AdamW takes them; Adafactor refuses a process group)."""
    if algorithm == "adamw":
        return OPTIMIZERS[algorithm](groups)
    options = {"max_bucket_bytes": max_bucket_bytes}
    if process_group is not None:
        options["process_group"] = process_group
    return OPTIMIZERS[algorithm](groups, **options)


def _beta1_alias(group: dict) -> bool:
    """Whether the group's first moment is ``betas[0]`` (AdamW, GaLore/GoLore's inner AdamW), its
    ``'momentum'`` key then standing for it."""
    return group["algorithm"] == "adamw" or (group["algorithm"] in ("galore", "golore")
                                             and group.get("inner", "adamw") == "adamw")


def _unhooked_step(opt: torch.optim.Optimizer) -> None:
    """``opt.step()`` without torch's hook wrapper: step hooks fire once, for the router."""
    step = type(opt).step
    (step.__wrapped__ if getattr(step, "hooked", False) else step)(opt)


class RoutedOptimizer(torch.optim.Optimizer):
    """One optimizer over several algorithms. Its ``param_groups`` are the inner optimizers'
    groups themselves (each with an ``'algorithm'`` key) and its ``state`` is theirs, so
    ``state_dict``, ``load_state_dict``, schedulers and ``zero_grad`` work on it as on any
    ``torch.optim.Optimizer``; so do ``add_param_group``, ``copy.deepcopy``/pickle (refused, as
    by the matrix optimizers, under a process group) and step hooks (global and the router's
    fire once per ``step()``; hooks registered on an inner optimizer do not run).

    Every group has a ``'momentum'`` key, its first-moment coefficient, which momentum-cycling
    schedulers (``OneCycleLR``, ``CyclicLR``) find in ``defaults`` and write: in AdamW-type groups
    (AdamW, GaLore/GoLore with ``inner='adamw'``) it stands for ``betas[0]``, and before every
    step (and ``state_dict()``) whichever of the two changed is copied to the other. For
    Adafactor without momentum (``None``) a scheduler's value switches its first moment on, as
    for ``torch.optim.SGD``."""

    def __init__(self, optimizers: Mapping[str, torch.optim.Optimizer], routes: list[Route], *,
                 method: str | None = None, settings: Mapping[str, Mapping] | None = None,
                 process_group: ProcessGroup | None = None,
                 max_bucket_bytes: int | None = DEFAULT_MAX_BUCKET_BYTES):
        self.optimizers = dict(optimizers)
        self.routes = routes
        self.method = method or next((a for a in self.optimizers if a != "adamw"), "adamw")
        self.settings = {role: dict(values) for role, values in (settings or {}).items()}
        self.process_group = process_group
        self.max_bucket_bytes = max_bucket_bytes
        self._constructed, self._synced = False, []
        super().__init__([g for opt in self.optimizers.values() for g in opt.param_groups],
                         {"momentum": None})
        self._constructed = True
        for opt in self.optimizers.values():
            self.state.update(opt.state)
        self._link()
        for opt in self.optimizers.values():
            _create_state(opt, opt.param_groups)
        self._sync_first_moments()

    def _link(self) -> None:
        for algorithm, opt in self.optimizers.items():
            opt.param_groups = [g for g in self.param_groups if g["algorithm"] == algorithm]
            opt.state = self.state

    def _sync_first_moments(self) -> None:
        """In AdamW-type groups, copy ``'momentum'`` to ``betas[0]`` or back, whichever changed
        since the last sync (``betas[0]`` for a group not synced before)."""
        synced = []
        for i, group in enumerate(self.param_groups):
            if _beta1_alias(group):
                last = self._synced[i] if i < len(self._synced) else None
                beta1, momentum = group["betas"][0], group.get("momentum")
                if last is None or momentum is None or (momentum == last and beta1 != last):
                    group["momentum"] = beta1
                elif momentum != beta1:
                    group["betas"] = (momentum, *group["betas"][1:])
            synced.append(group.get("momentum"))
        self._synced[:] = synced  # in place: torch.compile (2.13) may not write back an attribute

    @torch.no_grad()
    def step(self, closure=None):
        loss = evaluate_closure(closure)
        self._sync_first_moments()
        for opt in self.optimizers.values():
            _unhooked_step(opt)
        return loss

    def add_param_group(self, param_group: dict) -> None:
        """Add parameters (e.g. layers unfrozen during fine-tuning), as ``torch.optim`` does.

        With an ``'algorithm'`` key every parameter goes to that algorithm; without one each
        parameter is routed by itself: fewer than two dimensions or marked as an embedding to
        AdamW, the rest to this router's matrix method (the group is split in two if it holds
        both). Keys the group leaves out take the settings ``build_optimizer`` gave that
        algorithm (the matrix method's hyper-parameters, or the AdamW settings), else the
        optimizer's defaults; a key another algorithm takes but the target does not is refused.
        The inner optimizer is created if that algorithm had none. Parameter names come from
        ``(name, tensor)`` pairs or ``'param_names'``, else ``param_groups[i][j]``."""
        if not self._constructed:  # torch's __init__ registering the inner groups
            super().add_param_group(param_group)
            return
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        params = param_group["params"]
        items = [params] if torch.is_tensor(params) else list(params)
        tensors = [x[1] if isinstance(x, tuple) else x for x in items]
        names = [x[0] for x in items if isinstance(x, tuple)] or list(param_group.get("param_names", []))
        known = {p for g in self.param_groups for p in g["params"]}
        if any(p in known for p in tensors) or len(set(tensors)) != len(tensors):
            raise ValueError("some parameters appear in more than one parameter group")
        options = {k: v for k, v in param_group.items() if k not in ("params", "param_names", "algorithm")}
        chosen = param_group.get("algorithm")
        if chosen is not None and chosen not in OPTIMIZERS:
            raise ValueError(f"invalid algorithm {chosen!r} in param_group; valid: {sorted(OPTIMIZERS)}")
        split: dict[tuple[str, str], list[int]] = {}
        for j, p in enumerate(tensors):
            if chosen is not None:
                role = "user"
            else:
                role = "embedding" if is_embedding(p) else "vector" if p.ndim < 2 else "matrix"
            algorithm = chosen or (self.method if role == "matrix" else "adamw")
            split.setdefault((algorithm, role), []).append(j)
        for (algorithm, role), indices in sorted(split.items(), key=lambda kv: kv[0][0] == "adamw"):
            self._add(algorithm, role, options, [tensors[j] for j in indices],
                      [names[j] if names else None for j in indices])
        self._link()
        self._sync_first_moments()

    def _add(self, algorithm: str, role: str, options: dict, params: list[Tensor],
             names: list[str | None]) -> None:
        accepted = _accepts(algorithm) | ({"momentum"} if algorithm == "adamw" else set())
        foreign = sorted(k for k in options if k not in accepted
                         and any(k in _accepts(a) for a in OPTIMIZERS))
        if foreign:
            raise ValueError(f"{OPTIMIZERS[algorithm].__name__} takes no hyper-parameter {foreign} "
                             f"(give the group an 'algorithm', or one group per algorithm)")
        use_matrix = algorithm == self.method and role in ("matrix", "user")
        group = {**(self.settings.get("matrix" if use_matrix else algorithm, {})), **options,
                 "params": params, "algorithm": algorithm}
        if "momentum" in options and _beta1_alias(group):  # the group's momentum is its betas[0]
            betas = group.get("betas", inspect.signature(OPTIMIZERS[algorithm]).parameters["betas"].default)
            group["betas"] = (options["momentum"], *betas[1:])
        opt = self.optimizers.get(algorithm)
        if opt is None:
            opt = _construct(algorithm, [group], self.process_group, self.max_bucket_bytes)
            self.state.update(opt.state)
            self.optimizers[algorithm] = opt
        else:
            opt.add_param_group(group)
        group = opt.param_groups[-1]
        opt.state = self.state
        _create_state(opt, [group])
        index = len(self.param_groups)
        self.param_groups.append(group)
        self.routes.extend(Route(name or f"param_groups[{index}][{j}]", p, role, algorithm)
                           for j, (name, p) in enumerate(zip(names, params)))

    def __getstate__(self) -> dict:
        if self.process_group is not None:
            raise TypeError("a RoutedOptimizer with a process_group cannot be copied or pickled; "
                            "save its state_dict() instead")
        return {**super().__getstate__(), "optimizers": self.optimizers, "routes": self.routes,
                "method": self.method, "settings": self.settings, "process_group": None,
                "max_bucket_bytes": self.max_bucket_bytes,
                "_constructed": True, "_synced": self._synced}

    def state_dict(self) -> dict:
        """torch's ``state_dict``, with the state of matrices other ranks own gathered first when
        an inner optimizer has a process group (a collective: call it on every rank)."""
        self._sync_first_moments()
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
        """torch's ``load_state_dict`` of the state_dict its load pre-hooks return (hyper-parameters
        added since it was written kept from this optimizer's groups, as the matrix optimizers do;
        any other missing one refused); before the
        post-hooks run, the inner optimizers are relinked, the saved dtypes restored, a
        Python-number ``step`` (older checkpoints) becomes the tensor each inner optimizer keeps,
        under a process group the state of matrices other ranks own is dropped, and missing
        matrix state is created, as the matrix optimizers' own ``load_state_dict`` does."""
        loaded = {}

        def check(optimizer, final):  # runs after every other pre-hook
            final = with_later_hyperparameters(self.param_groups, final)
            for saved in final["param_groups"]:
                cls = OPTIMIZERS.get(saved.get("algorithm"))
                if isinstance(cls, type) and issubclass(cls, MatrixOptimizer):
                    cls.check_saved_groups([saved])
            loaded["state_dict"] = final
            return final

        def restore(optimizer):
            self._link()
            self._synced = []
            self._sync_first_moments()
            restore_state_dtypes(self, loaded["state_dict"])
            for opt in self.optimizers.values():
                if isinstance(opt, MatrixOptimizer):
                    opt.after_load()
                else:  # torch's own conversions (AdamW's step)
                    type(opt).__setstate__(opt, {"state": self.state, "param_groups": opt.param_groups})

        with load_hooks(self, check, restore):
            super().load_state_dict(state_dict)

    def diagnostics(self) -> dict[str, int]:
        """Fault counters summed over the inner optimizers that keep them (syncs), each over
        its own parameters."""
        totals: dict[str, int] = {}
        for opt in self.optimizers.values():
            if hasattr(opt, "diagnostics"):
                for key, value in opt.diagnostics().items():
                    totals[key] = totals.get(key, 0) + value
        return totals

    def report(self) -> str:
        """A table of every parameter: name, shape, role, algorithm (with its head count or
        ``(in, out)`` storage), optimizer-state bytes, a note where a head-wise split was not
        made, and totals.

        Before the first step the bytes come from a dry step on meta-device copies (no memory)."""
        nbytes = _state_bytes(self)
        rows = [("parameter", "shape", "role", "algorithm", "params", "state bytes", "note")]
        totals: dict[str, list[int]] = {}
        for r in self.routes:
            algorithm = (r.algorithm + (f" (heads={r.num_heads})" if r.num_heads > 1 else "")
                         + (" (in, out)" if r.transposed else ""))
            rows.append((r.name, "x".join(map(str, r.param.shape)), r.role, algorithm,
                         f"{r.param.numel():,}", f"{nbytes[r.param]:,}", r.note))
            total = totals.setdefault(r.algorithm, [0, 0])
            total[0] += r.param.numel()
            total[1] += nbytes[r.param]
        for algorithm, (count, size) in totals.items():
            rows.append((f"total {algorithm}", "", "", algorithm, f"{count:,}", f"{size:,}", ""))
        count = sum(t[0] for t in totals.values())
        size = sum(t[1] for t in totals.values())
        rows.append(("total", "", "", "", f"{count:,}", f"{size:,} ({size / 2**20:.1f} MiB)", ""))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)


@torch.no_grad()
def _create_state(opt: torch.optim.Optimizer, groups: list[dict]) -> None:
    """Give the parameters of ``groups`` of a torch optimizer (AdamW) their state now, as the
    matrix optimizers have theirs from construction: a temporary optimizer of the same type steps
    them once with zero gradients at lr 0 (they do not move), then its step counts go back to 0,
    which is exactly the state a first real step would create. So a fresh optimizer has every
    state key and ``torch.distributed.checkpoint`` needs no initialising step of its own."""
    params = [p for g in groups for p in g["params"]]
    if isinstance(opt, MatrixOptimizer) or not params or any(
            p.grad is not None or opt.state.get(p) for p in params):
        return
    temporary = type(opt)([{**g, "lr": torch.zeros_like(g["lr"]) if torch.is_tensor(g["lr"]) else 0.0}
                           for g in groups])
    for p in params:
        p.grad = torch.zeros_like(p)
    try:
        _unhooked_step(temporary)
    finally:
        for p in params:
            p.grad = None
    for p in params:
        state = opt.state[p] = temporary.state[p]
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
            _unhooked_step(dry)
            states = {p: dry.state[metas[p]] for p in params}
        for p, state in states.items():
            nbytes[p] = sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
    return nbytes


def _first_int(sources: Iterable[Any], attributes: tuple[str, ...]) -> int | None:
    for source in sources:
        for attribute in attributes:
            value = getattr(source, attribute, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def _heads(attention: nn.Module | None, key: bool, rows: int) -> tuple[int, str]:
    """``(head count, note)`` of a query (or ``key``) weight with ``rows`` output rows in
    ``attention``: 1 and a note where the count found does not fit the rows."""
    sources = [attention, getattr(attention, "config", None)]
    heads = _first_int(sources, QUERY_HEADS)
    if key:
        heads = _first_int(sources, KEY_VALUE_HEADS) or heads
    if heads is None or heads == 1:
        return 1, ""
    head_dim = _first_int(sources, HEAD_DIM)
    if rows % heads or (head_dim is not None and heads * head_dim != rows):
        dims = f" of {head_dim}" if head_dim is not None else ""
        return 1, f"not head-wise: {heads} heads{dims} do not fit {rows} rows"
    return heads, ""


def _is_head(module_name: str) -> bool:
    for part in module_name.split("."):
        if part.isdigit():
            return False
        if part in HEAD_NAMES:
            return True
    return False


def _is_conv1d(module: nn.Module) -> bool:
    """A Hugging Face ``Conv1D``: a linear layer whose weight is stored ``(in, out)``."""
    weight = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and torch.is_tensor(weight) and weight.ndim == 2
            and weight.shape[1] == getattr(module, "nf", None))  # nf: its output features


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
            raw = local not in ("weight", "bias")
            user = next((alg for pattern, alg in (routes or {}).items() if fnmatch.fnmatch(full, pattern)), None)
            if user is not None:
                route = Route(full, p, "user", user)
            elif (isinstance(module, nn.Embedding) or is_embedding(p)
                  or raw and any(fnmatch.fnmatch(local, pattern) for pattern in EMBEDDING_NAMES)):
                route = Route(full, p, "embedding", "adamw")
            elif _is_head(module_name):
                route = Route(full, p, "head", "adamw")
            elif p.ndim < 2:
                route = Route(full, p, "vector", "adamw")
            else:
                route = Route(full, p, "matrix", name)
            route.transposed = local == "weight" and _is_conv1d(module)
            if (route.algorithm == "asgo" and route.role in ("matrix", "user") and headwise
                    and local == "weight" and last in QUERY_NAMES + KEY_NAMES):
                rows = p.shape[1] if route.transposed else p.shape[0]
                route.num_heads, route.note = _heads(modules.get(module_name.rpartition(".")[0]),
                                                     last in KEY_NAMES, rows)
            result.append(route)
    for r in result:
        if r.algorithm not in OPTIMIZERS:
            raise ValueError(f"unknown algorithm {r.algorithm!r} for {r.name}; valid: {sorted(OPTIMIZERS)}")
    return result


def build_optimizer(model: nn.Module, name: str, *, adamw: Mapping | None = None,
                    routes: Mapping[str, str] | None = None, headwise: bool = True,
                    report_to: TextIO | None = None, process_group: ProcessGroup | None = None,
                    max_bucket_bytes: int | None = DEFAULT_MAX_BUCKET_BYTES,
                    **hyperparams) -> RoutedOptimizer:
    """One optimizer for ``model``: hidden matrices to ``name`` with ``hyperparams``, embeddings,
    the output head, norms and biases to AdamW with ``adamw`` (default: the same ``lr`` as the
    matrices, betas (0.9, 0.95), eps 1e-8, no weight decay, as the ASGO authors' setup); the
    routing rules are in this module's docstring.

    Hyper-parameters not given take the class defaults, except where :data:`ROUTED_DEFAULTS`
    replaces a default that does not train a model whose other parameters share its ``lr`` with
    AdamW: Muon ``lr=1e-2, adjust_lr_fn='match_rms_adamw'`` (its update RMS matches AdamW's, so
    one lr serves both, as Moonlight recommends; torch's ``lr=1e-3`` with ``'original'`` scaling
    barely moves a small model) and GaLore/GoLore ``lr=1e-2, scale=0.25`` (galore-torch's LLaMA
    recipe); AdamW ``lr=3e-3`` and Adafactor ``lr=5e-3`` (torch's 1e-3 is slow to train a small
    model; Hong & Lin's 1e-2 is unstable on one seed of three).
    ``tests/test_routing_defaults.py`` trains a small GPT-2 with every name at these defaults.
    ``report_to`` (e.g. ``sys.stdout``) receives :meth:`RoutedOptimizer.report` at construction.
    ``process_group`` and ``max_bucket_bytes`` go to every optimizer but AdamW
    (:class:`asgo.optim._base.MatrixOptimizer`).
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; valid names: {sorted(OPTIMIZERS)}")
    routed = route_parameters(model, name, routes, headwise)
    matrix_settings = {**ROUTED_DEFAULTS.get(name, {}), **hyperparams}
    matrix_lr = matrix_settings.get("lr", inspect.signature(OPTIMIZERS[name]).parameters["lr"].default)
    adamw_settings = {**ADAMW_DEFAULTS, "lr": matrix_lr, **(adamw or {})}
    for algorithm, values in ((name, matrix_settings), ("adamw", adamw_settings)):
        unknown = sorted(set(values) - _accepts(algorithm))
        if unknown:
            raise ValueError(f"{OPTIMIZERS[algorithm].__name__} takes no hyper-parameter {unknown}; "
                             f"valid: {sorted(_accepts(algorithm))}")

    grouped: dict[tuple[str, int, bool, bool], list[Tensor]] = {}
    for r in routed:
        is_matrix_method = r.algorithm == name and r.role in ("matrix", "user")
        transposed = r.transposed and "transposed" in _accepts(r.algorithm)
        grouped.setdefault((r.algorithm, r.num_heads, is_matrix_method, transposed), []).append(r.param)
    param_groups: dict[str, list[dict]] = {}
    for (algorithm, heads, is_matrix_method, transposed), params in grouped.items():
        group = {"params": params, "algorithm": algorithm}
        if is_matrix_method:
            group.update(matrix_settings)
        elif algorithm == "adamw":
            group.update(adamw_settings)
        if heads > 1:
            group["num_heads"] = heads
        if transposed:
            group["transposed"] = True
        param_groups.setdefault(algorithm, []).append(group)
    optimizers = {algorithm: _construct(algorithm, groups, process_group, max_bucket_bytes)
                  for algorithm, groups in param_groups.items()}
    optimizer = RoutedOptimizer(optimizers, routed, method=name, process_group=process_group,
                                max_bucket_bytes=max_bucket_bytes,
                                settings={"matrix": matrix_settings, "adamw": adamw_settings})
    if report_to is not None:
        report_to.write(optimizer.report() + "\n")
    return optimizer
