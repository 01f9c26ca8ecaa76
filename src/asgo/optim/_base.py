"""The step every matrix optimizer shares, in three phases, and the pieces it is built from.

``MatrixOptimizer.step`` does:

1. **collect** — per param group, skip parameters without a gradient (or, under a process group,
   owned by another rank), refuse sparse ones, flag non-finite gradients, and put every
   parameter's matrix blocks (its :class:`Layout`) into buckets keyed by (device, dtype, block
   shape, step), in chunks of at most ``max_bucket_bytes`` of stacked gradients (same-layout
   parameters together; a parameter is never split, so a larger one is a chunk alone); each
   chunk is computed, committed and (single process) applied before the next, so its
   intermediates are freed before the next chunk allocates its own;
2. **compute** — per bucket, the optimizer's :meth:`~MatrixOptimizer.compute`: a function of the
   stacked gradients, the stacked state and the group's hyper-parameters that returns the
   direction and the new state (an :class:`Update`). Inverse roots it asks for (``yield``
   :class:`Root`) are batched across all buckets of the chunk by matrix size. Then, where a
   parameter's gradient, new state and direction are all finite, its new state is written;
   elsewhere its state is left untouched, its direction zeroed and the step counted in
   ``skipped_steps``;
3. **apply** — under a process group the owners' directions first reach every rank
   (:mod:`asgo.optim._distributed`); then every parameter ``p <- p (1 - lr wd a) - lr a d``, with
   ``a`` 0 for a skipped step.

Compute never writes the state (``G`` is a fresh stack it may use as scratch), so it runs on any
subset of buckets and its results are applied elsewhere: that is how each rank computes only the
matrices it owns.
"""
from __future__ import annotations

import inspect
import math
from collections import defaultdict
from collections.abc import Callable, Generator
from contextlib import contextmanager
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Shard

from asgo.linalg import compute_dtype
from asgo.optim._config import HyperParameters, Integer, Optional
from asgo.optim._distributed import (
    Expected,
    Sharded,
    all_gather_states,
    all_gather_updates,
    gather_sharded_gradients,
    lpt_owners,
    matrix_cost,
    scatter_sharded_updates,
)
from asgo.optim._layout import Layout

# On CPU, chunks of 1 to 64 MiB step as fast as one bucket per shape (Muon) or faster (ASGO,
# DASGO, Adafactor: up to 2x, fewer cache misses); 64 MiB still batches 7 GPT-2 MLP matrices
# (3072 x 768) or 28 of 768 x 768 for the GPU.
DEFAULT_MAX_BUCKET_BYTES = 64 * 2**20

# Hyper-parameters added after 0.2's state layout: a state_dict without them keeps the values
# the optimizer was built with (their defaults are the earlier behaviour).
LATER_HYPERPARAMETERS = ("transposed", "compat", "relative_eps", "pre_start_update")
ROUTING_HINT = "route it to AdamW with asgo.build_optimizer(model, ...) or a separate optimizer"


def mark_as_embedding(*params: Tensor) -> None:
    """Mark parameters as embeddings so matrix optimizers refuse them with a clear error."""
    for p in params:
        p._asgo_embedding = True  # type: ignore[attr-defined]


def is_embedding(p: Tensor) -> bool:
    return bool(getattr(p, "_asgo_embedding", False))


# ---------------------------------------------------------------------------------------------
# The step skeleton.


@dataclass
class Update:
    """What :meth:`MatrixOptimizer.compute` returns for a bucket of ``B`` stacked blocks.

    ``direction``: ``(B, *block shape)``; the parameter moves by ``-lr lr_scale direction`` (times
    :meth:`MatrixOptimizer.step_factor`, if any).
    ``state``: new values of state entries, stacked as they were read; an entry returned as the
    very tensor ``compute`` was given (e.g. a root that was not due) counts as unchanged and is
    neither checked nor written.
    ``faults``: per-block counts (``(B,)``) added to the fault counter of that name, except for
    parameters whose step is skipped.
    ``lr_scale``: a schedule factor on ``lr``, for the step and the weight decay alike (the same
    for every block of a parameter).
    ``scratch``: ``direction`` is a new tensor of ``compute``'s own (no view of ``S`` or of a
    state value returned), so a skipped step's blocks are zeroed in place.
    """

    direction: Tensor
    state: dict[str, Tensor]
    faults: dict[str, Tensor] = field(default_factory=dict)
    lr_scale: float = 1.0
    scratch: bool = False


@dataclass
class Root:
    """A request from ``compute`` (``Q = yield Root(...)``, or ``P, Q = yield [Root(...), ...]``)
    for ``function(matrices, **options)``,
    which returns ``(roots, ok)``. The skeleton batches all requests of a group with the same
    function, options, matrix size, dtype and device into one call, keeps ``previous`` where a
    root is not finite, and counts those blocks in ``root_failures``."""

    function: Callable[..., tuple[Tensor, Tensor]]
    matrices: Tensor
    previous: Tensor
    options: dict[str, Any]


@dataclass
class Slot:
    """One parameter's share of a bucket."""

    param: Tensor       # the parameter (a stand-in of its full shape for a DTensor)
    grad: Tensor        # its full gradient
    index: int          # the parameter's index in ``state_dict`` numbering
    state: dict
    layout: Layout
    finite: Tensor      # 0-dim bool: the gradient is finite


@dataclass
class Bucket:
    """Same-shape blocks of one group, device, dtype and step, stacked for one compute call."""

    step: int
    slots: list[Slot] = field(default_factory=list)
    in_place: set[str] = field(default_factory=set)  # state keys whose stack is the state itself

    @property
    def indices(self) -> list[int]:
        return [s.index for s in self.slots]

    @property
    def counts(self) -> list[int]:
        return [s.layout.count for s in self.slots]


def _select_into(flags: Tensor, a: Tensor, b: Tensor, out: Tensor) -> None:
    """``out <- where(flags, a, b)`` in place (under torch.compile, which refuses ``out=`` aliasing
    an input, through a copy)."""
    if torch.compiler.is_compiling():
        out.copy_(torch.where(flags, a, b))
    else:
        torch.where(flags, a, b, out=out)


def _zero_unless(flags: Tensor, t: Tensor, out: Tensor | None = None) -> Tensor:
    """``where(flags, t, 0)`` for ``t`` finite where ``flags`` is set (into ``out``, which may be
    ``t``; default a new tensor): ``t * flags``, then the NaNs that ``inf * 0`` and ``nan * 0``
    leave where it is not, zeroed. Two vectorised passes: on CPU ``torch.where`` runs a scalar
    loop, about 4x a copy. Bitwise ``t`` where set; zeros (of either sign) elsewhere."""
    return torch.mul(t, flags, out=out).nan_to_num_(0.0, 0.0, 0.0)


def _cat(tensors: list[Tensor]) -> Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def all_finite(t: Tensor, dim: int | None = None) -> Tensor:
    """Whether every entry of ``t`` (along ``dim``) is finite, as a bool tensor, without a host
    sync: NaN propagates through max and min, and an infinity is one of them (13x faster than
    ``isfinite(t).all()`` on CPU)."""
    if t.numel() == 0:
        return torch.ones(() if dim is None else t.shape[0], dtype=torch.bool, device=t.device)
    big, small = (t.amax(), t.amin()) if dim is None else (t.amax(dim), t.amin(dim))
    return big.isfinite() & small.isfinite()


def _per_block(flags: Tensor, t: Tensor) -> Tensor:
    """``(B,)`` flags shaped to broadcast over the ``B`` stacked blocks of ``t``."""
    return flags.reshape(-1, *[1] * (t.ndim - 1))


# On CPU, root calls take at most this many bytes of matrices: a batched root's temporaries then
# stay in cache (384 x 384 float32 roots: 14% less time in calls of 3 than in one call of 24).
ROOT_CALL_BYTES_CPU = 2 * 2**20


def _root_calls(batch: list[tuple]) -> list[list[tuple]]:
    """The ``(i, j, root)`` requests of one batch as calls of ``(i, j, root, lo, hi)`` row ranges:
    one call on a GPU, on CPU calls of at most ``ROOT_CALL_BYTES_CPU`` (at least one matrix)."""
    first = batch[0][2].matrices
    if first.device.type != "cpu":
        return [[(i, j, r, 0, r.matrices.shape[0]) for i, j, r in batch]]
    per_call = max(1, ROOT_CALL_BYTES_CPU // (first[0].numel() * first.element_size()))
    calls, room = [], 0
    for i, j, r in batch:
        lo, count = 0, r.matrices.shape[0]
        while lo < count:
            if room == 0:
                calls.append([])
                room = per_call
            hi = min(count, lo + room)
            calls[-1].append((i, j, r, lo, hi))
            room -= hi - lo
            lo = hi
    return calls


def _finite_blocks(t: Tensor) -> Tensor:
    """``(B,)`` bool: whether each of the ``B`` stacked blocks of ``t`` is finite."""
    return all_finite(t.reshape(t.shape[0], -1), 1)


def restore_state_dtypes(optimizer: torch.optim.Optimizer, state_dict: dict) -> None:
    """Undo ``Optimizer.load_state_dict``'s cast of every state tensor to its parameter's dtype:
    reload each saved tensor with its saved dtype, on the parameter's device."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
    by_id = dict(zip(saved_ids, params))  # as torch maps them: ids, or FQNs from DCP
    for saved_id, saved in state_dict["state"].items():
        p = by_id.get(saved_id)
        if p is None:  # not a parameter's state (torch loads it as it is)
            continue
        for key, value in saved.items():
            if torch.is_tensor(value) and key != "step":
                optimizer.state[p][key] = value.to(device=p.device, copy=True)


def with_later_hyperparameters(groups: list[dict], state_dict: dict) -> dict:
    """``state_dict`` with the ``LATER_HYPERPARAMETERS`` its param groups lack taken from
    ``groups`` (the loading optimizer's, in order; torch refuses a different number of groups)."""
    if len(state_dict["param_groups"]) != len(groups):
        return state_dict
    return {**state_dict, "param_groups": [
        {**{k: g[k] for k in LATER_HYPERPARAMETERS if k in g}, **saved}
        for g, saved in zip(groups, state_dict["param_groups"])]}


@contextmanager
def load_hooks(optimizer: torch.optim.Optimizer, check: Callable, restore: Callable):
    """``check`` as the last load pre-hook and ``restore`` as the first load post-hook, for the
    duration of one ``load_state_dict``."""
    handles = [optimizer.register_load_state_dict_pre_hook(check),
               optimizer.register_load_state_dict_post_hook(restore, prepend=True)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def evaluate_closure(closure):
    """The loss of ``closure()`` with gradients enabled (``step`` runs under ``no_grad``), or None."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def apply_update_(p: Tensor, update: Tensor, lr: float | Tensor, weight_decay: float,
                  active: Tensor, factor: float | None = None) -> None:
    """``p <- p (1 - lr wd a) - lr f a update`` with ``a`` in {0, 1} and the step ``factor`` ``f``
    (None: 1): decoupled weight decay then the step, both skipped where ``active`` is 0 (``update``
    is then zero). Computed in ``update``'s dtype, rounded once. With a factor, a float ``lr`` and
    one dtype, rounded as torch.optim: ``p.mul_(1 - lr wd).add_(update, alpha=-lr f)``."""
    if factor is not None and not torch.is_tensor(lr) and p.dtype == update.dtype:
        decay = torch.full_like(active, 1 - lr * weight_decay, dtype=p.dtype)
        p.mul_(torch.where(active > 0, decay, 1.0)).add_(update, alpha=-lr * factor)
        return
    if factor is not None:
        update = update.mul_(factor)
    if p.dtype == update.dtype:
        p.mul_(1 - lr * weight_decay * active).sub_(update.mul_(lr * active))
    else:
        p.copy_(p.to(update.dtype).mul_(1 - lr * weight_decay * active).sub_(update.mul_(lr * active)))


def rms_normalize(U: Tensor, rms: float | None, inplace: bool = False) -> Tensor:
    """Each matrix of ``U`` (..., m, n) scaled to RMS ``rms``: ``U rms sqrt(mn) / ||U||_F``
    (written into ``U`` when ``inplace``)."""
    if rms is None:
        return U
    m, n = U.shape[-2:]
    scale = rms * (m * n) ** 0.5 / torch.linalg.matrix_norm(U, keepdim=True).clamp_min(1e-30)
    return U.mul_(scale) if inplace else U * scale


class MatrixOptimizer(torch.optim.Optimizer):
    """Base of the optimizers of this package: the three-phase step (module docstring), typed
    hyper-parameters, state kept in float32 (float64 for float64 parameters) and device-tensor
    fault counters.

    A subclass sets ``Config`` (a :class:`HyperParameters` dataclass: the constructor's keyword
    arguments, their defaults and checks), ``ELEMENTWISE`` (state entries shaped like the
    parameter), ``COUNTERS``, and writes :meth:`layouts`, :meth:`init_state` and
    :meth:`compute` — the maths.

    ``process_group`` (keyword, every class but :class:`~asgo.optim.Adafactor`): owner-compute
    for replicated parameters (DDP, after the gradient all-reduce). Each matrix gets an owner rank
    by longest-processing-time packing on its cost; only the owner keeps its state and computes its
    direction, and one ``all_gather`` per (device, dtype) and step brings every direction to every
    rank, which applies the same update: the parameters equal a single process's bit for bit
    (``tests/optim/distributed_worker.py``). Every rank must see the same gradients (``None``
    included). Row-sharded DTensor parameters (FSDP2's ``fully_shard``) are detected and use
    their mesh's group: the owner gathers the full gradient (``all_to_all``) and sends each rank
    its rows of the direction; equal to a single process within 1e-6
    (``tests/optim/fsdp2_worker.py``). State is created at construction, on the owner only;
    ``state_dict()`` gathers the whole state (a collective) and ``load_state_dict`` keeps the
    owned part, so checkpoints (also through ``torch.distributed.checkpoint``) load at any world
    size.

    ``max_bucket_bytes`` (keyword, every class; default 64 MiB; None: no cap): a step batches a
    group's same-shape blocks in chunks whose stacked gradients (in the state dtype) total at most
    this many bytes, one chunk after the other; a parameter is never split, so a larger one is a
    chunk alone. On the CPU the result is bitwise the uncapped step's
    (``tests/optim/test_bucket_cap.py``; GPU kernels may depend on the batch size);
    the extra memory of a step is a fixed multiple of its largest chunk, about 5.5x for Muon, 5x
    for DASGO, 15x for ASGO and 34x for Shampoo on square matrices (``benchmarks/memory.py``).
    Under a process group every chunk's directions are kept until the exchange at the end of the
    step (the bytes of the owned parameters, once). The cap is not state: ``state_dict`` neither
    saves nor loads it.

    ``torch.optim.Optimizer.load_state_dict`` casts every state tensor to its parameter's dtype,
    which would round float32 moments of bf16 parameters and turn integer counters into floats;
    the saved dtypes are restored so a resumed run continues exactly. Fault counters are read
    only by :meth:`diagnostics`; ``step()`` never synchronises with the host.
    """

    Config: ClassVar[type[HyperParameters]]
    ELEMENTWISE: ClassVar[tuple[str, ...]] = ()
    COUNTERS: ClassVar[tuple[str, ...]] = ("skipped_steps",)
    MATRICES_ONLY: ClassVar[bool] = True
    DISTRIBUTED: ClassVar[bool] = True  # supports owner-compute under a process_group

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "Config" in cls.__dict__:  # the signature users, IDEs and routing see
            hp = [inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                    default=f.default if f.default is not MISSING else None,
                                    annotation=f.type)
                  for f in fields(cls.Config)]
            params = inspect.Parameter("params", inspect.Parameter.POSITIONAL_OR_KEYWORD)
            group = inspect.Parameter("process_group", inspect.Parameter.KEYWORD_ONLY, default=None)
            cap = inspect.Parameter("max_bucket_bytes", inspect.Parameter.KEYWORD_ONLY,
                                    default=DEFAULT_MAX_BUCKET_BYTES, annotation=int | None)
            cls.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
                [params, *hp, group, cap])

    def __init__(self, params, *args, process_group: dist.ProcessGroup | None = None,
                 max_bucket_bytes: int | None = DEFAULT_MAX_BUCKET_BYTES, **hyperparameters):
        Optional(Integer(1))("max_bucket_bytes", max_bucket_bytes)
        self.max_bucket_bytes = max_bucket_bytes
        self.process_group = process_group
        self._owners: dict[Tensor, int] = {}
        self._loads: list[float] | None = None
        # step() calls, and the parameters with state by how many calls their step lags behind
        # (see _count_step); mutated in place: torch.compile (2.13) replays mutations of
        # containers but did not write back `self._clock += 1` on an int attribute
        self._clock: list[int] = [0]
        self._cohorts: dict[int, dict[Tensor, None]] = {}
        config = self.Config(*args, **hyperparameters)
        super().__init__(params, {f.name: getattr(config, f.name) for f in fields(config)})
        all_params = [p for g in self.param_groups for p in g["params"]]
        if process_group is None:
            process_group = next((p.device_mesh.get_group() for p in all_params
                                  if isinstance(p, DTensor)), None)
            self.process_group = process_group
        if process_group is not None:
            if not self.DISTRIBUTED:
                raise ValueError(f"{type(self).__name__} is single-process: its step schedule lives "
                                 f"in the per-parameter state; pass process_group=None and "
                                 f"parameters that are not DTensors")
            if not dist.is_initialized():
                raise ValueError("process_group is given but torch.distributed is not initialised")
            self._assign_owners(all_params)
        for group in self.param_groups:
            self._create_state(group)
        self._constructed = True

    # --- construction ------------------------------------------------------------------------

    def add_param_group(self, param_group: dict) -> None:
        if "max_bucket_bytes" in param_group:
            raise ValueError(f"max_bucket_bytes is an argument of {type(self).__name__}(...), not a "
                             f"param group setting")
        self.validate_group({**self.defaults, **param_group})
        first_index = sum(len(g["params"]) for g in self.param_groups)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            for index, p in enumerate(group["params"], start=first_index):
                self.check_param(p, index, group)
        except ValueError:
            self.param_groups.pop()
            raise
        if getattr(self, "_constructed", False):  # __init__ does this for its own groups
            if self.process_group is not None:
                self._assign_owners(group["params"])
            self._create_state(group)

    def _create_state(self, group: dict) -> None:
        """State for the group's parameters this rank owns, at construction: a fresh optimizer
        already has its state, so ``torch.distributed.checkpoint`` needs no initialising step."""
        for p in group["params"]:
            if self.owns(p):
                self._state_of(p, group)

    def _state_of(self, p: Tensor, group: dict) -> dict:
        """``p``'s state, its missing entries created (on this rank's device, full size)."""
        state = self.state[p]
        like = _full_like(p)
        if not state:
            state["step"] = torch.zeros((), dtype=torch.int64)
            self._join(p, self._clock[0])
            for name in self.COUNTERS:
                state[name] = torch.zeros((), dtype=torch.int64, device=like.device)
        self.init_state(state, like, group)
        return state

    def __getstate__(self) -> dict:
        # torch keeps only defaults, state and param_groups; a process group cannot be pickled
        if self.process_group is not None:
            raise TypeError(f"a {type(self).__name__} with a process_group cannot be copied or "
                            f"pickled; save its state_dict() instead")
        return {**super().__getstate__(), "max_bucket_bytes": self.max_bucket_bytes}

    def __setstate__(self, state: dict) -> None:
        # unpickling fills what __getstate__ left out; load_state_dict (which calls this too) keeps it
        super().__setstate__(state)
        for name, value in (("max_bucket_bytes", DEFAULT_MAX_BUCKET_BYTES), ("process_group", None),
                            ("_owners", {}), ("_loads", None), ("_constructed", True)):
            self.__dict__.setdefault(name, value)
        self._mirror_steps()

    def _mirror_steps(self) -> None:
        """The Python clock and cohorts (:meth:`_count_step`) from the saved step counters."""
        steps = {p: int(s["step"]) for p, s in self.state.items() if isinstance(s, dict) and "step" in s}
        self._clock = [max(steps.values(), default=0)]
        self._cohorts = {}
        for p, step in steps.items():
            self._join(p, self._clock[0] - step)

    def _join(self, p: Tensor, lag: int) -> None:
        """Put ``p`` in the cohort of parameters whose step is ``lag`` behind the clock."""
        for old, members in list(self._cohorts.items()):
            members.pop(p, None)
            if not members:
                del self._cohorts[old]
        self._cohorts.setdefault(lag, {})[p] = None

    def _lag(self, p: Tensor) -> int:
        return next(lag for lag, members in self._cohorts.items() if p in members)

    def _assign_owners(self, params: list[Tensor]) -> None:
        """Owners of ``params`` by longest-processing-time packing on their matrix cost."""
        groups = {p: g for g in self.param_groups for p in g["params"]}
        costs = [matrix_cost(self.layouts(p, groups[p])) for p in params]
        owners, self._loads = lpt_owners(costs, dist.get_world_size(self.process_group), self._loads)
        self._owners.update(zip(params, owners))

    def owns(self, p: Tensor) -> bool:
        """Whether this rank computes ``p``'s update and keeps its state (always, alone)."""
        return self.process_group is None or self._owners[p] == dist.get_rank(self.process_group)

    def validate_group(self, group: dict) -> None:
        """Raise ``ValueError`` naming the first invalid hyper-parameter of ``group``."""
        self.Config(**{f.name: group[f.name] for f in fields(self.Config)})

    def check_param(self, p: Tensor, index: int, group: dict) -> None:
        """Refuse what this optimizer cannot update, naming the parameter by index and shape."""
        name = type(self).__name__
        if isinstance(p, DTensor) and (p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),)):
            raise ValueError(f"{name} takes DTensor parameters sharded on their rows over one mesh "
                             f"dimension (FSDP2's fully_shard); parameter {index} of shape "
                             f"{tuple(p.shape)} has placements {tuple(p.placements)}")
        if p.numel() == 0:
            raise ValueError(f"{name}: parameter {index} of shape {tuple(p.shape)} is empty")
        if torch.is_complex(p):
            raise ValueError(f"{name} does not support complex parameters; parameter {index} of "
                             f"shape {tuple(p.shape)} is complex ({p.dtype})")
        if self.MATRICES_ONLY and (p.ndim < 2 or is_embedding(p)):
            what = "an embedding" if is_embedding(p) else f"a {p.ndim}-D tensor"
            raise ValueError(f"{name} preconditions matrices; parameter {index} of shape "
                             f"{tuple(p.shape)} is {what}: {ROUTING_HINT}")
        if group.get("transposed") and p.ndim != 2:
            raise ValueError(f"{name}: transposed=True marks a 2-D weight stored (in, out); "
                             f"parameter {index} of shape {tuple(p.shape)} is {p.ndim}-D")
        self.layouts(p, group)  # raises on a parameter the group's settings cannot view

    @staticmethod
    def state_dtype(p: Tensor) -> torch.dtype:
        return compute_dtype(p.dtype)

    # --- what a subclass writes --------------------------------------------------------------

    def layouts(self, p: Tensor, group: dict) -> list:
        """The :class:`Layout` (s) of ``p``: one per block shape."""
        raise NotImplementedError

    def init_state(self, state: dict, p: Tensor, group: dict) -> None:
        """Create the missing state entries of ``p`` (called before every step)."""
        raise NotImplementedError

    def compute(self, group: dict, G: Tensor, S: dict[str, Tensor], bucket: Bucket
                ) -> Update | Generator[Root, Tensor, Update]:
        """The update rule on a bucket: stacked gradient blocks ``G`` (state dtype, non-finite
        ones zeroed; a fresh stack, which ``compute`` may overwrite) and stacked state ``S``,
        which it never writes."""
        raise NotImplementedError

    # --- the step ----------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        loss = evaluate_closure(closure)
        sharded = self._sharded() if self.process_group is not None else []
        grads = self._gradients(sharded)
        indexed = {index: (group, p) for index, group, p in self._indexed()}
        updates, first_index = {}, 0
        for group in self.param_groups:
            for buckets in self._collect(group, first_index, grads):
                done = self._commit(group, buckets, self._compute(group, buckets))
                if self.process_group is None:  # applied and freed before the next chunk
                    self._apply(indexed, done)
                    done.clear()
                else:
                    updates.update(done)
            first_index += len(group["params"])
        if self.process_group is not None:
            self._apply(indexed, self._exchange(updates, sharded))
        self._tick(grads)
        return loss

    def _tick(self, grads: dict[int, Tensor]) -> None:
        """The clock advances; a parameter with state that did not step falls one further behind."""
        params = [p for group in self.param_groups for p in group["params"]]
        stepped = {params[index]: None for index in grads}
        behind = [(lag, p) for lag, members in self._cohorts.items() for p in members if p not in stepped]
        for lag, p in behind:
            self._join(p, lag + 1)
        self._clock[0] += 1

    def _indexed(self):
        """``(index, group, parameter)`` of every parameter, in ``state_dict`` numbering."""
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                yield index, group, p
                index += 1

    def _sharded(self) -> list[Sharded]:
        return [Sharded(i, self._owners[p], p.shape, self.state_dtype(p))
                for i, _, p in self._indexed() if isinstance(p, DTensor) and p.grad is not None]

    def _gradients(self, sharded: list[Sharded]) -> dict[int, Tensor]:
        """The full gradient of every parameter this rank computes; a row-sharded (DTensor)
        parameter's owner gathers its shards from every rank."""
        grads = {}
        for i, _, p in self._indexed():
            if p.grad is not None and p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients; "
                                   f"parameter {i} of shape {tuple(p.shape)} has one")
            if p.grad is not None and self.owns(p) and not isinstance(p, DTensor):
                grads[i] = p.grad
        if sharded:
            local = {i: p.grad.to_local() for i, _, p in self._indexed()
                     if isinstance(p, DTensor) and p.grad is not None}
            grads.update(gather_sharded_gradients(local, sharded, _local_device(self), self.process_group))
        return grads

    def step_factor(self, group: dict, p: Tensor) -> float | None:
        """A factor on ``lr`` for the step of ``p`` alone (not its weight decay), applied with
        torch.optim's rounding (:func:`apply_update_`); None: none."""
        return None

    def _apply(self, indexed: dict[int, tuple], updates: dict[int, tuple]) -> None:
        """Step every parameter of ``updates`` (a DTensor's local shard) by its direction."""
        for index, (d, ok, lr_scale) in updates.items():
            group, p = indexed[index]
            local = p.to_local() if isinstance(p, DTensor) else p
            apply_update_(local, d.view(local.shape), _lr(group["lr"]) * lr_scale,
                          group["weight_decay"], ok, self.step_factor(group, p))

    def _exchange(self, updates: dict[int, tuple], sharded: list[Sharded]) -> dict[int, tuple]:
        """Owner-compute: every owner's directions and flags to every rank (a replicated
        parameter's whole, a sharded one's local rows)."""
        replicated = [Expected(i, self._owners[p], p.numel(), self.state_dtype(p), p.device)
                      for i, _, p in self._indexed() if p.grad is not None and not isinstance(p, DTensor)]
        mine = {i: (d, ok) for i, (d, ok, _) in updates.items()}
        out = {}
        if replicated:
            out.update(all_gather_updates(mine, replicated, self.process_group))
        if sharded:
            out.update(scatter_sharded_updates(mine, sharded, _local_device(self), self.process_group))
        return {i: (d, ok, 1.0) for i, (d, ok) in out.items()}

    def _collect(self, group: dict, first_index: int, grads: dict[int, Tensor]) -> list[list[Bucket]]:
        """The group's parameters that step here (their step counted) as chunks of buckets: the
        parameters of one (device, dtype, step, layouts) side by side, cut into chunks of at most
        ``max_bucket_bytes`` of stacked gradients; a parameter is never split."""
        similar: dict[tuple, list[list[Slot]]] = {}
        steps: dict[int, int] = {}  # the step of each lag
        for index, p in enumerate(group["params"], start=first_index):
            if index not in grads:
                continue
            grad, like = grads[index], _full_like(p)
            state = self._state_of(p, group)
            lag = self._lag(p)
            steps[lag] = self._count_step(state, lag)
            finite = all_finite(grad)
            layouts = self.layouts(like, group)
            key = (like.device, like.dtype, lag, tuple(tuple(layout.shape) for layout in layouts))
            similar.setdefault(key, []).append(
                [Slot(like, grad, index, state, layout, finite) for layout in layouts])
        chunks: list[dict[tuple, Bucket]] = []
        size = 0
        for (device, dtype, lag, _), params in similar.items():
            itemsize = self.state_dtype(params[0][0].param).itemsize
            for slots in params:
                nbytes = itemsize * sum(s.layout.count * math.prod(s.layout.shape) for s in slots)
                if not chunks or (self.max_bucket_bytes is not None
                                  and size + nbytes > self.max_bucket_bytes):
                    chunks.append({})
                    size = 0
                size += nbytes
                for slot in slots:
                    key = (device, dtype, tuple(slot.layout.shape), lag)
                    chunks[-1].setdefault(key, Bucket(steps[lag])).slots.append(slot)
        return [list(chunk.values()) for chunk in chunks]

    def _count_step(self, state: dict, lag: int) -> int:
        """Count a step in ``state["step"]`` (an int64 CPU tensor, the saved counter) and return
        the new step as a Python int, which the schedules read without a host read: the clock
        (``step()`` calls) less the parameter's lag, a constant shared by its cohort. Under
        ``torch.compile`` the clock becomes one symbolic int after the first step, so one graph
        serves every step with the same schedule decisions (root due or not), and parameters of
        one cohort share one step without comparing symbols."""
        state["step"] += 1
        return self._clock[0] + 1 - lag

    def _state_view(self, slot: Slot, key: str) -> Tensor:
        """``slot``'s blocks of ``state[key]``: a view, except for non-view elementwise layouts."""
        t = slot.state[key]
        return slot.layout.blocks(t) if key in self.ELEMENTWISE else slot.layout.state(key, t)

    def _stacked_state(self, bucket: Bucket) -> dict[str, Tensor]:
        """Every state entry of the bucket's blocks stacked, contiguous (reductions over a
        permuted tensor round differently, and the result must not depend on the bucket). Keys
        whose stack is the state itself (one slot, a contiguous view) go in ``bucket.in_place``."""
        state = bucket.slots[0].state
        keys = [k for k, v in state.items()
                if torch.is_tensor(v) and k != "step" and k not in self.COUNTERS]
        stacked = {}
        for k in keys:
            views = [self._state_view(s, k) for s in bucket.slots]
            stacked[k] = _cat(views).contiguous()
            if stacked[k] is views[0] and (k not in self.ELEMENTWISE or bucket.slots[0].layout.views):
                bucket.in_place.add(k)
        return stacked

    def _run(self, group: dict, bucket: Bucket) -> tuple[dict, Update | Generator[Root, Tensor, Update]]:
        """The bucket's stacked state and ``compute``'s result on it (an :class:`Update`, or a
        generator that asks for roots)."""
        first = bucket.slots[0]
        G = torch.empty(sum(bucket.counts), *first.layout.shape, dtype=self.state_dtype(first.param),
                        device=first.grad.device)  # one copy of the gradients, in the state dtype
        for slot, part in zip(bucket.slots, G.split(bucket.counts)):
            blocks = slot.layout.blocks(slot.grad)
            if blocks.dtype == G.dtype:  # copied and masked in one pass, then its NaNs zeroed
                _zero_unless(slot.finite, blocks, out=part)
            else:
                part.copy_(blocks).masked_fill_(~slot.finite, 0)
        S = self._stacked_state(bucket)
        return S, self.compute(group, G, S, bucket)

    def _compute(self, group: dict, buckets: list[Bucket]) -> list[tuple]:
        """Run ``compute`` on every bucket, answering their :class:`Root` requests in batches."""
        runs = [self._run(group, b) for b in buckets]
        results: list[tuple] = [(S, out) for S, out in runs]
        failures: dict[int, list[Tensor]] = defaultdict(list)
        # generators are sent their replies directly (torch.compile traces send, not yield from)
        replies: dict[int, Tensor | None] = {i: None for i, (_, out) in enumerate(runs)
                                             if inspect.isgenerator(out)}
        while replies:
            requests = {}
            for i, reply in replies.items():
                try:
                    requests[i] = runs[i][1].send(reply)
                except StopIteration as done:  # .value is args[0]; dynamo traces only args
                    results[i] = (runs[i][0], done.args[0])
            replies = self._answer(requests, failures)
        for i, (S, update) in enumerate(results):
            if failures[i]:
                update.faults["root_failures"] = sum(failures[i])
        return results

    @staticmethod
    def _answer(requests: dict[int, Root | list[Root]], failures: dict[int, list[Tensor]]) -> dict:
        items = [(i, j, r) for i, req in requests.items()
                 for j, r in enumerate(req if isinstance(req, list) else [req])]
        batches = defaultdict(list)
        for item in items:
            r = item[2]
            key = (r.function, tuple(sorted(r.options.items())), r.matrices.shape[1:],
                   r.matrices.dtype, r.matrices.device)
            batches[key].append(item)
        answers, oks = {}, {}
        for (function, options, *_), batch in batches.items():
            for call in _root_calls(batch):
                roots, ok = function(_cat([r.matrices[lo:hi] for _, _, r, lo, hi in call]), **dict(options))
                sizes = [hi - lo for *_, lo, hi in call]
                for (i, j, r, lo, hi), root, ok_r in zip(call, roots.split(sizes), ok.split(sizes)):
                    if (i, j) not in answers:
                        answers[i, j] = root.new_empty(r.previous.shape)
                        oks[i, j] = ok_r.new_empty(r.previous.shape[0])
                    torch.where(ok_r.reshape(-1, 1, 1), root, r.previous[lo:hi], out=answers[i, j][lo:hi])
                    oks[i, j][lo:hi] = ok_r
        for (i, _), ok in oks.items():
            failures[i].append((~ok).to(torch.int64))
        return {i: [answers[i, j] for j in range(len(req))] if isinstance(req, list) else answers[i, 0]
                for i, req in requests.items()}

    def _commit(self, group: dict, buckets: list[Bucket], results: list[tuple]) -> dict[int, tuple]:
        """Write the new state of every parameter whose blocks all came out finite (the old
        elsewhere, counted in ``skipped_steps``); return ``{index: (direction, flag, lr scale)}``,
        the direction zeroed and the 0/1 flag 0 where skipped."""
        # which parameters came out finite: every block of theirs, in every bucket
        changed, ok_of = [], {}
        for bucket, (S, update) in zip(buckets, results):
            changed.append({k: v for k, v in update.state.items() if v is not S[k]})
            ok = _cat([s.finite.expand(s.layout.count) for s in bucket.slots])
            for value in (update.direction, *changed[-1].values()):
                ok = ok & _finite_blocks(value)
            for slot, part in zip(bucket.slots, ok.split(bucket.counts)):
                ok_of[slot.index] = part.all() & ok_of.get(slot.index, True)
        # per bucket: the new state where finite, the old elsewhere; directions zeroed elsewhere
        directions = defaultdict(list)
        for bucket, (S, update), new_state in zip(buckets, results, changed):
            ok = _cat([ok_of[s.index].expand(s.layout.count) for s in bucket.slots])
            for key, new in new_state.items():
                self._write_kept(bucket, key, new, S[key], ok_of)
            D = _zero_unless(_per_block(ok, update.direction), update.direction,
                             out=update.direction if update.scratch else None)
            for name, count in update.faults.items():
                for slot, n in zip(bucket.slots, (count * ok).split(bucket.counts)):
                    slot.state[name] += n.sum()
            for slot, d in zip(bucket.slots, D.split(bucket.counts)):
                directions[slot.index].append((slot, d, update.lr_scale))
        # per parameter: the skip counter and the direction, whole
        updates = {}
        for index, parts in directions.items():
            p, state, lr_scale = parts[0][0].param, parts[0][0].state, parts[0][2]
            if len(parts) == 1:
                d = parts[0][0].layout.merge(parts[0][1])
            else:
                d = parts[0][1].new_empty(p.shape)
                for slot, blocks, _ in parts:
                    slot.layout.write(d, blocks)
            state["skipped_steps"] += (~ok_of[index]).to(torch.int64)
            updates[index] = (d, ok_of[index].to(d.dtype), lr_scale)
        return updates

    def _write_kept(self, bucket: Bucket, key: str, new: Tensor, old: Tensor,
                    ok_of: dict[int, Tensor]) -> None:
        """``new`` written to the state of the bucket's parameters that step, ``old`` kept for the
        rest; a state the layout views is selected into in place (no stacked copy)."""
        for slot, part, was in zip(bucket.slots, new.split(bucket.counts), old.split(bucket.counts)):
            if key in self.ELEMENTWISE and not slot.layout.views:
                slot.layout.write(slot.state[key], torch.where(ok_of[slot.index], part, was))
            else:
                view = self._state_view(slot, key)
                _select_into(ok_of[slot.index], part, view, view)

    # --- reading the counters -----------------------------------------------------------------

    def state_dict(self) -> dict:
        """torch's ``state_dict``; under a process group every rank's state is gathered first
        (a collective: call it on every rank), so the result is the whole optimizer's, the same
        on every rank, and loads at any world size."""
        if self.process_group is None:
            return super().state_dict()
        local, self.state = self.state, defaultdict(dict, self.gathered_state())
        try:
            return super().state_dict()
        finally:
            self.state = local

    def gathered_state(self) -> dict[Tensor, dict]:
        """The state of every parameter, whichever rank owns it (a collective under a process
        group; tensors on the parameters' devices)."""
        params = [p for g in self.param_groups for p in g["params"]]
        if self.process_group is None:
            return {p: self.state[p] for p in params if self.state.get(p)}
        owned = {i: self.state[p] for i, p in enumerate(params) if self.owns(p) and self.state.get(p)}
        return {params[i]: {k: v.to(params[i].device) if torch.is_tensor(v) and k != "step" else v
                            for k, v in s.items()}
                for i, s in all_gather_states(owned, self.process_group).items()}

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's ``load_state_dict`` of the state_dict its load pre-hooks return, with the
        hyper-parameters added since (``LATER_HYPERPARAMETERS``) kept from this optimizer's
        groups and any other missing one refused; before the post-hooks run, the saved dtypes are
        restored and :meth:`after_load` runs."""
        loaded = {}

        def check(optimizer, final):  # runs after every other pre-hook
            final = with_later_hyperparameters(self.param_groups, final)
            self.check_saved_groups(final["param_groups"])
            loaded["state_dict"] = final
            return final

        def restore(optimizer):
            restore_state_dtypes(self, loaded["state_dict"])
            self.after_load()

        with load_hooks(self, check, restore):
            super().load_state_dict(state_dict)

    @classmethod
    def check_saved_groups(cls, groups: list[dict]) -> None:
        """Refuse saved param groups that lack one of this class's hyper-parameters."""
        missing = sorted({f.name for f in fields(cls.Config)} - {k for g in groups for k in g})
        if missing:
            raise ValueError(f"this {cls.__name__} state_dict has no hyper-parameter {missing}: "
                             f"it was written by another version of asgo")

    def after_load(self) -> None:
        """After ``load_state_dict``: a Python-number ``step`` (older checkpoints) becomes an int64
        tensor, the state of matrices another rank owns is dropped, and missing state created."""
        for p in [p for g in self.param_groups for p in g["params"]]:
            state = self.state.get(p, {})
            if "step" in state and not torch.is_tensor(state["step"]):
                state["step"] = torch.tensor(int(state["step"]), dtype=torch.int64)
        self.drop_unowned_state()
        self._mirror_steps()
        for group in self.param_groups:
            self._create_state(group)

    def drop_unowned_state(self) -> None:
        """Under a process group, forget the state of the matrices another rank owns."""
        for p in [p for g in self.param_groups for p in g["params"] if not self.owns(p)]:
            self.state.pop(p, None)

    def diagnostics(self) -> dict[str, int]:
        """Totals of the fault counters over all parameters (synchronises; call outside step;
        under a process group a collective over every rank's parameters)."""
        totals = torch.zeros(len(self.COUNTERS), dtype=torch.int64, device=_local_device(self))
        for p in [p for g in self.param_groups for p in g["params"]]:
            state = self.state.get(p, {})
            if self.COUNTERS[0] in state:
                totals += torch.stack([state[name] for name in self.COUNTERS]).to(totals.device)
        if self.process_group is not None:
            dist.all_reduce(totals, group=self.process_group)
        return dict(zip(self.COUNTERS, totals.tolist()))  # the one host sync


def _full_like(p: Tensor) -> Tensor:
    """``p``, or for a DTensor a stand-in of its full shape and dtype on this rank's device (no
    memory: an expanded scalar)."""
    if not isinstance(p, DTensor):
        return p
    return torch.empty((), dtype=p.dtype, device=p.to_local().device).expand(p.shape)


def _local_device(optimizer: torch.optim.Optimizer) -> torch.device:
    p = optimizer.param_groups[0]["params"][0]
    return p.to_local().device if isinstance(p, DTensor) else p.device


def _lr(lr: float | Tensor) -> float | Tensor:
    """A tensor lr as a 0-dim tensor (shape [1] or [1, 1] would broadcast into the parameter)."""
    return lr.reshape(()) if torch.is_tensor(lr) else lr

