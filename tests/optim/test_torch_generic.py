"""PyTorch's generic optimizer tests (``TestOptimRenewed`` in pytorch's ``test/test_optim.py``),
ported to pytest and run over every optimizer of ``asgo.optim`` and over
``asgo.build_optimizer(model, name)``: torch's conventions are our contract.

The entries are torch's own :class:`OptimizerInfo`/:class:`OptimizerInput` (from
``torch.testing._internal.common_optimizers``), and their inputs go through torch's
``_get_optim_inputs_including_global_cliquey_kwargs``. Adaptations, each as torch makes them for
its own ``Muon``:

- The matrix optimizers refuse 1-D parameters: where torch uses a bias of shape ``(n,)`` they get
  a ``(n, 1)`` column (flattened in the loss), and ``Linear(10, 4, bias=False)`` replaces
  torch's ``Conv2d + BatchNorm2d`` model. Adafactor and ``build_optimizer`` (which routes 1-D
  parameters to AdamW) get torch's shapes unchanged.
- No ``foreach``/``fused``/``differentiable``/``capturable``/``maximize`` flags
  (``supported_impls=()``), no complex or sparse support (their refusal is in
  ``test_common.py``); CUDA-only and multi-GPU tests are left out.
- ``build_optimizer`` takes a model: its entries put the parameters in a module and take no
  param-group dicts (``supports_param_groups=False``), as torch marks such optimizers.
- torch skips the zero-gradient no-op test for inputs with weight decay; here weight decay is set
  to 0 instead, since most of these optimizers decay by default.

Left out because ``test_common.py`` already checks them for every standalone optimizer: invalid
hyper-parameters, tensor lr (ported here for ``build_optimizer``), local step hooks alone,
resume through ``torch.save``/``weights_only``, complex and sparse refusal.

Importing torch's ``common_optimizers`` needs the ``expecttest`` package (a test dependency).
"""

from __future__ import annotations

import copy
import pickle
from dataclasses import fields

import pytest
import torch
from torch import nn
from torch.nn import Parameter
from torch.optim.lr_scheduler import (
    CosineAnnealingLR,
    CyclicLR,
    LinearLR,
    OneCycleLR,
    ReduceLROnPlateau,
    StepLR,
)
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.testing._internal.common_optimizers import (
    OptimizerErrorEnum,
    OptimizerInfo,
    OptimizerInput,
    _get_optim_inputs_including_global_cliquey_kwargs,
    get_error_inputs_for_all_optims,
)

import asgo
from asgo import optim
from asgo.routing import ADAMW_DEFAULTS, OPTIMIZERS, ROUTED_DEFAULTS

DEVICE, DTYPE = "cpu", torch.float32

# torch's default scheduler inputs, then OneCycleLR and CyclicLR with their default momentum
# cycling, and a warmup + cosine chain
SCHEDULERS = (
    [lambda o: StepLR(o, gamma=0.9, step_size=10), lambda o: ReduceLROnPlateau(o)],
    [lambda o: OneCycleLR(o, max_lr=0.01, total_steps=20)],
    [lambda o: CyclicLR(o, base_lr=1e-3, max_lr=1e-2, step_size_up=5)],
    [lambda o: LinearLR(o, start_factor=0.5, total_iters=5), lambda o: CosineAnnealingLR(o, T_max=20)],
)


class Info(OptimizerInfo):
    """torch's OptimizerInfo, plus whether the optimizer takes 1-D parameters."""

    def __init__(self, optim_cls, inputs, *, vectors=False, routed=False, **kwargs):
        super().__init__(
            optim_cls,
            optim_inputs_func=lambda device, dtype=None: [
                OptimizerInput(params=None, kwargs=copy.deepcopy(kw), desc=desc)
                for desc, kw in inputs.items()],
            scheduler_inputs=SCHEDULERS, supported_impls=(), not_og_supported_flags=(),
            supports_complex=False, supports_param_groups=not routed,
            optim_error_inputs_func=None if routed else get_error_inputs_for_all_optims,
            **kwargs)
        self.vectors = vectors or routed
        self.routed = routed


def routed(name):
    """``build_optimizer`` as an optimizer class: the parameters (or ``(name, parameter)``
    pairs), in a module, routed by name and shape."""

    def build(params, **hyperparams):
        module = nn.Module()
        for i, p in enumerate(params):
            if isinstance(p, dict):
                raise TypeError("build_optimizer takes a model, not param groups")
            key, p = p if isinstance(p, tuple) else (f"p{i}", p)
            module._parameters[key.replace(".", "_")] = p  # the caller's tensor itself
        return asgo.build_optimizer(module, name, **hyperparams)

    build.__name__ = f"build_optimizer[{name}]"
    return build


def tensor_lr(value):
    return {"lr": torch.tensor(value)}


INFOS = [
    Info(optim.ASGO, {"default": {}, "lr, no weight decay": {"lr": 0.02, "weight_decay": 0.0},
                      "Tensor lr": tensor_lr(0.01),
                      "momentum, eigh root every 3 steps": {"momentum": 0.8, "root_method": "eigh",
                                                            "precondition_frequency": 3}}),
    Info(optim.DASGO, {"default": {}, "beta2, lr": {"beta2": 0.9, "lr": 0.02}, "Tensor lr": tensor_lr(0.01),
                       "no RMS scaling": {"update_rms": None, "lr": 1e-3}}),
    Info(optim.Muon, {"default": {}, "lr": {"lr": 0.01}, "Tensor lr": tensor_lr(1e-3),
                      "momentum, no Nesterov, Polar Express": {
                          "momentum": 0.8, "nesterov": False, "orthogonalize_method": "polar_express"},
                      "match_rms_adamw": {"adjust_lr_fn": "match_rms_adamw"}}),
    Info(optim.Shampoo, {"default": {}, "Tensor lr": tensor_lr(5e-3),
                         "no grafting, blocks, root every 2 steps": {
                             "grafting": "none", "lr": 1e-3, "max_preconditioner_dim": 4,
                             "precondition_frequency": 2}}),
    Info(optim.Adafactor, {"default": {}, "Tensor lr": tensor_lr(0.01),
                           "momentum, clipping, weight decay": {"momentum": 0.9, "clip_alpha": 2.0,
                                                                "weight_decay": 0.1},
                           "c, lr decay": {"c": 0.8, "lr_decay": 0.5}}, vectors=True),
    Info(optim.GaLore, {"default": {}, "rank 2, gap 3": {"rank": 2, "update_proj_gap": 3},
                        "Tensor lr": {**tensor_lr(0.01), "rank": 2},
                        "inner SGD momentum": {"rank": 3, "inner": "sgd", "momentum": 0.9, "lr": 0.01}}),
    Info(optim.GoLore, {"default": {}, "rank 2, gap 3": {"rank": 2, "update_proj_gap": 3},
                        "Tensor lr, GoLore@50%": {**tensor_lr(0.01), "rank": 2, "golore_fraction": 0.5,
                                                  "total_steps": 10}}),
    Info(routed("asgo"), {"default": {}, "lr": {"lr": 0.02}, "Tensor lr": tensor_lr(0.01)}, routed=True),
    Info(routed("muon"), {"default": {}, "lr": {"lr": 0.02}}, routed=True),
    Info(routed("galore"), {"rank 2": {"rank": 2, "update_proj_gap": 3}}, routed=True),
]
STANDALONE = [info for info in INFOS if not info.routed]
GROUPED = [info for info in INFOS if info.supports_param_groups]
ROUTED = [info for info in INFOS if info.routed]


def over(infos):
    return pytest.mark.parametrize("info", infos, ids=lambda info: info.name)


def all_inputs(info):
    return _get_optim_inputs_including_global_cliquey_kwargs(DEVICE, DTYPE, info)


def some_inputs(info):
    """The first input and any with a tensor lr: for the slower tests (all of them run in the
    others)."""
    inputs = all_inputs(info)
    return [x for i, x in enumerate(inputs) if i == 0 or torch.is_tensor(x.kwargs.get("lr"))]


def bias_shape(info, n):
    """torch's bias shape ``(n,)``, or a ``(n, 1)`` column for the matrix optimizers."""
    return (n,) if info.vectors else (n, 1)


def weight_and_bias(info, contiguous=True, rows=10, cols=5):
    if contiguous:
        return (Parameter(torch.randn(rows, cols)), Parameter(torch.randn(bias_shape(info, rows))))
    return (Parameter(torch.randn(rows, cols, 2)[..., 0]),
            Parameter(torch.randn(*bias_shape(info, rows), 2)[..., 0]))


def linear_loss(weight, bias, inpt):
    return (weight.mv(inpt) + bias.reshape(-1)).pow(2).sum()


def closure_for(optimizer, weight, bias, inpt):
    def closure():
        optimizer.zero_grad()
        loss = linear_loss(weight, bias, inpt)
        loss.backward()
        return loss
    return closure


def step_schedulers(schedulers, loss):
    for scheduler in schedulers:
        scheduler.step(loss.detach()) if isinstance(scheduler, ReduceLROnPlateau) else scheduler.step()


def small_model(info):
    """torch's model for the state_dict loading tests (a Linear for the matrix optimizers, as
    torch uses for its Muon) and its input."""
    torch.manual_seed(1)
    if info.vectors:
        return (nn.Sequential(nn.Conv2d(4, 2, 1, stride=2), nn.BatchNorm2d(2, eps=1e-05, momentum=0.1)),
                torch.rand(1, 4, 16, 16))
    return nn.Linear(10, 4, bias=False), torch.rand(10)


def assert_equal_nested(a, b, path="state_dict"):
    """Bitwise equality of two nested state_dict-like structures."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            assert_equal_nested(a[key], b[key], f"{path}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal_nested(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def params_of(optimizer):
    return [p for group in optimizer.param_groups for p in group["params"]]


# --- errors -------------------------------------------------------------------------------------

@over([info for info in INFOS if info.optim_error_inputs_func is not None])
def test_errors(info):
    for error_input in info.optim_error_inputs_func(device=DEVICE, dtype=DTYPE):
        optim_input = error_input.optimizer_error_input
        params, kwargs = optim_input.params, optim_input.kwargs
        if params is None:  # torch's tensor-lr entry
            params = [Parameter(torch.randn(2, 2))]
        assert error_input.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR
        if issubclass(error_input.error_type, Warning):
            with pytest.warns(error_input.error_type, match=error_input.error_regex):
                info.optim_cls(params, **kwargs)
        else:
            with pytest.raises(error_input.error_type, match=error_input.error_regex):
                info.optim_cls(params, **kwargs)


# --- the loss goes the right way ----------------------------------------------------------------

@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "non-contiguous"])
@over(INFOS)
def test_forloop_goes_right_direction(info, contiguous):
    for optim_input in all_inputs(info):
        weight, bias = weight_and_bias(info, contiguous)
        inpt = torch.randn(5)
        optimizer = info.optim_cls([weight, bias], **optim_input.kwargs)
        closure = closure_for(optimizer, weight, bias, inpt)
        initial = closure().item()
        for _ in range(20):
            optimizer.step(closure)
        assert closure().item() < initial, optim_input.desc


@over(INFOS)
def test_forloop_goes_right_direction_with_lrsched(info):
    for schedulers_constructor in info.scheduler_inputs:
        for optim_input in some_inputs(info):  # fresh inputs: a scheduler mutates a tensor lr
            weight, bias = weight_and_bias(info)
            inpt = torch.randn(5)
            optimizer = info.optim_cls([weight, bias], **optim_input.kwargs)
            schedulers = [make(optimizer) for make in schedulers_constructor]
            closure = closure_for(optimizer, weight, bias, inpt)
            initial = closure().item()
            for _ in range(20):
                loss = optimizer.step(closure)
                step_schedulers(schedulers, loss)
            assert closure().item() < initial, (optim_input.desc, schedulers)


@over(GROUPED)
def test_param_group_with_lrscheduler_goes_right_direction(info):
    for schedulers_constructor in info.scheduler_inputs:
        weight, bias = weight_and_bias(info)
        inpt = torch.randn(5)
        optimizer = info.optim_cls([{"params": [weight]}, {"params": [bias], "lr": 0.01}])
        schedulers = [make(optimizer) for make in schedulers_constructor]
        closure = closure_for(optimizer, weight, bias, inpt)
        initial = closure().item()
        for _ in range(20):
            step_schedulers(schedulers, optimizer.step(closure))
        assert closure().item() < initial, schedulers


@over(GROUPED)
def test_param_groups_weight_decay(info):
    for optim_input in all_inputs(info):
        weight, bias = weight_and_bias(info)
        inpt = torch.randn(5)
        optimizer = info.optim_cls([dict(params=[weight], **optim_input.kwargs),
                                    dict(params=[bias], **{**optim_input.kwargs, "weight_decay": 0.0})])
        initial = linear_loss(weight, bias, inpt).item()
        for _ in range(20):
            optimizer.zero_grad()
            loss = linear_loss(weight, bias, inpt)
            loss.backward()
            optimizer.step()
        assert loss.item() < initial, optim_input.desc


@over(GROUPED)
def test_param_groups_lr(info):
    """A group with its own lr trains; the other, at the outer lr 1e-28, does not move."""
    for optim_input in all_inputs(info):
        if "lr" not in optim_input.kwargs:
            optim_input.kwargs["lr"] = 1e-3
        weight, bias = weight_and_bias(info)
        irrelevant = Parameter(torch.randn(bias_shape(info, 2)))
        irrelevant_clone = irrelevant.detach().clone()
        inpt = torch.randn(5)
        optimizer = info.optim_cls([dict(params=[weight, bias], **optim_input.kwargs),
                                    dict(params=[irrelevant])], lr=1e-28)
        initial = linear_loss(weight, bias, inpt).item()
        for _ in range(20):
            optimizer.zero_grad()
            loss = linear_loss(weight, bias, inpt)
            loss.backward()
            irrelevant.grad = torch.rand_like(irrelevant)
            optimizer.step()
        assert loss.item() < initial, optim_input.desc
        assert torch.equal(irrelevant, irrelevant_clone), optim_input.desc


# --- steps that do nothing ----------------------------------------------------------------------

@over(STANDALONE)  # build_optimizer leaves out parameters that do not require grad
def test_step_is_noop_when_params_have_no_grad(info):
    params = [torch.randn(2, 3, requires_grad=False) for _ in range(2)]
    old_params = [p.detach().clone() for p in params]
    for optim_input in all_inputs(info):
        optimizer = info.optim_cls(params, **optim_input.kwargs)
        assert optimizer.step(lambda: torch.tensor([1.0])) == torch.tensor([1.0])
        assert all(torch.equal(p, q) for p, q in zip(params, old_params)), optim_input.desc


@over(INFOS)
def test_step_is_noop_for_zero_grads(info):
    param = torch.randn((5, 1), requires_grad=True)
    old_param = param.detach().clone()
    for optim_input in all_inputs(info):
        optimizer = info.optim_cls([param], **{**optim_input.kwargs, "weight_decay": 0.0})
        for _ in range(3):
            param.grad = torch.zeros_like(param)
            optimizer.step(lambda: torch.tensor([1.0]))
        assert torch.equal(param, old_param), optim_input.desc


# --- printing and defaults ----------------------------------------------------------------------

@over(INFOS)
def test_optimizer_can_be_printed(info):
    params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
    for optim_input in all_inputs(info):
        text = repr(info.optim_cls(params, **optim_input.kwargs))
        assert "Parameter Group 0" in text and "lr:" in text
        if not info.routed:
            assert text.startswith(info.optim_cls.__name__ + " (")
            assert all(f"    {f.name}: " in text for f in fields(info.optim_cls.Config))


@over(STANDALONE)
def test_defaults_hold_every_hyperparameter(info):
    """``defaults`` is the constructor's keyword arguments (what schedulers read, e.g. OneCycleLR
    looks for ``momentum`` or ``betas`` there), and every group holds every key."""
    for optim_input in all_inputs(info):
        optimizer = info.optim_cls([Parameter(torch.randn(2, 3))], **optim_input.kwargs)
        expected = {f.name: f.default for f in fields(info.optim_cls.Config)}
        expected.update(optim_input.kwargs)
        assert optimizer.defaults.keys() == expected.keys()
        for key, value in expected.items():
            assert optimizer.defaults[key] is value or optimizer.defaults[key] == value, key
        assert optimizer.param_groups[0].keys() == {"params", *expected}


# --- state_dict ---------------------------------------------------------------------------------

NAMED = {"plain": (False, False), "named-to-plain": (True, False), "plain-to-named": (False, True),
         "named": (True, True)}


@pytest.mark.parametrize(  # build_optimizer names the parameters after the model
    "info,named0,named1",
    [(info, *named) for info in INFOS for label, named in NAMED.items() if not info.routed or not any(named)],
    ids=[f"{info.name}-{label}" for info in INFOS for label, named in NAMED.items()
         if not info.routed or not any(named)])
def test_state_dict_deterministic(info, named0, named1):
    def named(params, is_named):
        return [(f"name{i}", p) for i, p in enumerate(params)] if is_named else params

    def without_param_names(state_dict):
        state_dict = copy.deepcopy(state_dict)
        for group in state_dict["param_groups"]:
            group.pop("param_names", None)
        return state_dict

    for optim_input in all_inputs(info) if not (named0 or named1) else some_inputs(info)[:1]:
        weight, bias = weight_and_bias(info, rows=2, cols=3)
        inpt = torch.randn(3)
        optimizer = info.optim_cls(named([weight, bias], named0), **optim_input.kwargs)
        closure = closure_for(optimizer, weight, bias, inpt)
        for _ in range(10):
            optimizer.step(closure)
        with torch.no_grad():
            weight_c, bias_c = Parameter(weight.clone()), Parameter(bias.clone())
        optimizer_c = info.optim_cls(named([weight_c, bias_c], named1), **optim_input.kwargs)
        closure_c = closure_for(optimizer_c, weight_c, bias_c, inpt)
        saved = optimizer.state_dict()
        optimizer_c.load_state_dict(copy.deepcopy(saved))
        for _ in range(10):
            optimizer.step(closure)
            optimizer_c.step(closure_c)
            assert torch.equal(weight, weight_c) and torch.equal(bias, bias_c), optim_input.desc
        assert_equal_nested(without_param_names(optimizer.state_dict()),
                            without_param_names(optimizer_c.state_dict()))
        # repeated parameters have identical representations (pytorch#36831)
        optimizer_c.param_groups.extend(optimizer_c.param_groups)
        assert_equal_nested(without_param_names(optimizer.state_dict())["param_groups"][-1],
                            without_param_names(optimizer_c.state_dict())["param_groups"][-1])


@pytest.mark.parametrize("named0,named1", list(NAMED.values()), ids=list(NAMED))
@over(STANDALONE)  # build_optimizer names the parameters after the model
def test_can_load_from_to_named_state_dict(info, named0, named1):
    for optim_input in all_inputs(info):
        model, inpt = small_model(info)

        def fwd_bwd(opt):
            opt.zero_grad()
            loss = model(inpt).sum()
            loss.backward()
            return loss

        optimizer = info.optim_cls(model.named_parameters() if named0 else model.parameters(),
                                   **optim_input.kwargs)
        for _ in range(3):
            fwd_bwd(optimizer)
            optimizer.step()
        optimizer2 = info.optim_cls(model.named_parameters() if named1 else model.parameters(),
                                    **optim_input.kwargs)
        optimizer2.load_state_dict(copy.deepcopy(optimizer.state_dict()))
        fwd_bwd(optimizer2)
        optimizer2.step()
        if named0 or named1:
            names = [name for name, _ in model.named_parameters()]
            assert optimizer2.state_dict()["param_groups"][0]["param_names"] == names


@over(INFOS)
def test_load_nontensor_step(info):
    """A state_dict whose ``step`` is a Python number (older checkpoints) loads, continues exactly
    as the tensor one, and the step is a tensor again, as torch's optimizers make it."""
    for optim_input in all_inputs(info):
        torch.manual_seed(0)
        params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
        grads = [[torch.rand(2, 3) for _ in params] for _ in range(6)]
        optimizer = info.optim_cls(params, **optim_input.kwargs)
        for gs in grads[:3]:
            for p, g in zip(params, gs):
                p.grad = g.clone()
            optimizer.step()
        runs = []
        for as_number in (False, True):
            state_dict = copy.deepcopy(optimizer.state_dict())
            if as_number:
                for p_state in state_dict["state"].values():
                    if torch.is_tensor(p_state.get("step")):
                        p_state["step"] = p_state["step"].item()
            clones = [Parameter(p.detach().clone()) for p in params]
            resumed = info.optim_cls(clones, **optim_input.kwargs)
            resumed.load_state_dict(state_dict)
            for gs in grads[3:]:
                for p, g in zip(clones, gs):
                    p.grad = g.clone()
                resumed.step()
            for state in resumed.state.values():
                if "step" in state:
                    assert torch.is_tensor(state["step"]), optim_input.desc
            runs.append(clones)
        assert all(torch.equal(a, b) for a, b in zip(*runs)), optim_input.desc


@over(INFOS)
def test_load_state_dict_refuses_other_param_groups(info):
    """torch's errors for a state_dict of another shape of optimizer."""
    one = info.optim_cls([Parameter(torch.randn(2, 3)), Parameter(torch.randn(4, 3))])
    two = info.optim_cls([Parameter(torch.randn(2, 3))])
    with pytest.raises(ValueError, match="doesn't match the size of optimizer's group"):
        two.load_state_dict(one.state_dict())
    if info.supports_param_groups:
        groups = info.optim_cls([{"params": [Parameter(torch.randn(2, 3))]},
                                 {"params": [Parameter(torch.randn(4, 3))], "lr": 0.5}])
        with pytest.raises(ValueError, match="different number of parameter groups"):
            groups.load_state_dict(one.state_dict())


# --- hooks --------------------------------------------------------------------------------------

def _state_dict_pre_hook(optimizer):
    optimizer.state["test"] = 1


def _state_dict_post_hook(optimizer, state_dict):
    state_dict["ran_state_dict_pre_hook"] = "test" in state_dict["state"]
    state_dict["state"].pop("test", None)
    return state_dict


def _load_state_dict_pre_hook1(optimizer, state_dict):
    state_dict["param_groups"][0]["lr"] = 0.002


def _load_state_dict_pre_hook2(optimizer, state_dict):
    my_state_dict = copy.deepcopy(state_dict)
    my_state_dict["param_groups"][0]["lr"] = 0.003
    return my_state_dict


def _load_state_dict_post_hook(optimizer):
    optimizer.state["ran_load_state_dict_pre_hook2"] = optimizer.param_groups[0]["lr"] == 0.003
    optimizer.state["ran_load_state_dict_post_hook"] = True


@over(INFOS)
def test_state_dict_hooks(info):
    """torch's test_state_dict_pre_hook, _post_hook and _pre_post_hook."""
    for optim_input in all_inputs(info):
        def make():
            return info.optim_cls([torch.rand(2, 3, requires_grad=True)], **optim_input.kwargs)

        pre = make()
        pre.register_state_dict_pre_hook(_state_dict_pre_hook)
        assert pre.state_dict()["state"]["test"] == 1
        post = make()
        post.register_state_dict_post_hook(_state_dict_post_hook)
        assert post.state_dict()["ran_state_dict_pre_hook"] is False
        both = make()
        both.register_state_dict_pre_hook(_state_dict_pre_hook)
        both.register_state_dict_post_hook(_state_dict_post_hook)
        state_dict = both.state_dict()
        assert "test" not in state_dict["state"] and state_dict["ran_state_dict_pre_hook"] is True
        # a state entry that belongs to no parameter loads as it is, as torch's do
        fresh = make()
        fresh.load_state_dict(pre.state_dict())
        assert fresh.state["test"] == 1


@over(INFOS)
def test_load_state_dict_hooks(info):
    """torch's test_load_state_dict_pre_hook_and_prepend, _post_hook and _pre_post_hook."""
    for optim_input in all_inputs(info):
        def make():
            return info.optim_cls([torch.rand(2, 3, requires_grad=True)], **optim_input.kwargs)

        optimizer = make()
        state_dict = optimizer.state_dict()
        optimizer.register_load_state_dict_pre_hook(_load_state_dict_pre_hook1)
        optimizer.load_state_dict(state_dict)
        assert optimizer.param_groups[0]["lr"] == 0.002
        optimizer.register_load_state_dict_pre_hook(_load_state_dict_pre_hook2, prepend=True)
        optimizer.load_state_dict(state_dict)
        assert optimizer.param_groups[0]["lr"] == 0.002  # prepended: hook1 overrides it

        post = make()
        post.register_load_state_dict_post_hook(_load_state_dict_post_hook)
        post.load_state_dict(post.state_dict())
        assert not post.state["ran_load_state_dict_pre_hook2"]
        assert post.state["ran_load_state_dict_post_hook"] is True

        both = make()
        both.register_load_state_dict_pre_hook(_load_state_dict_pre_hook2)
        both.register_load_state_dict_post_hook(_load_state_dict_post_hook)
        both.load_state_dict(both.state_dict())
        assert both.state["ran_load_state_dict_pre_hook2"]
        assert both.state["ran_load_state_dict_post_hook"] is True


@over(STANDALONE)
def test_load_state_dict_pre_hook_result_is_what_loads(info):
    """A load pre-hook that returns a new state_dict (e.g. converting a checkpoint) decides the
    loaded state, tensors included."""
    params = [Parameter(torch.randn(4, 3))]
    optimizer = info.optim_cls(params)
    params[0].grad = torch.randn(4, 3)
    optimizer.step()
    state_dict = optimizer.state_dict()
    key = next(k for k, v in state_dict["state"][0].items()
               if torch.is_tensor(v) and v.is_floating_point() and v.abs().sum() > 0)

    def doubled(opt, sd):
        sd = copy.deepcopy(sd)
        sd["state"][0][key] = sd["state"][0][key] * 2
        return sd

    fresh = info.optim_cls([Parameter(params[0].detach().clone())])
    fresh.register_load_state_dict_pre_hook(doubled)
    fresh.load_state_dict(state_dict)
    loaded = fresh.state[params_of(fresh)[0]][key]
    assert torch.equal(loaded, state_dict["state"][0][key] * 2), key


@over(INFOS)
def test_step_all_hooks(info):
    """Global and per-instance step hooks fire once per step, in torch's order, until removed."""
    data = []
    params = [Parameter(torch.ones(2, 2))]
    for optim_input in all_inputs(info):
        optimizer = info.optim_cls(params, **optim_input.kwargs)
        sgd = torch.optim.SGD(params)
        data.clear()
        handles = [register_optimizer_step_pre_hook(lambda *args: data.append(0)),
                   register_optimizer_step_post_hook(lambda *args: data.append(5))]
        try:
            for opt in (optimizer, sgd):
                handles.append(opt.register_step_pre_hook(lambda *args: data.append(1)))
                handles.append(opt.register_step_post_hook(lambda *args: data.append(2)))
            optimizer.step()
            assert data == [0, 1, 2, 5], optim_input.desc
            sgd.step()
            optimizer.step()
            assert data == [0, 1, 2, 5] * 3, optim_input.desc
        finally:
            for handle in handles:
                handle.remove()
        optimizer.step()
        sgd.step()
        assert data == [0, 1, 2, 5] * 3, optim_input.desc


# --- copies, state ------------------------------------------------------------------------------

def _step_all(opt, grads):
    for p, g in zip(params_of(opt), grads):
        p.grad = g.clone()
    opt.step()


@over(INFOS)
def test_deepcopy_and_pickle_copy_all_public_attrs_and_step_alike(info):
    """torch's test_deepcopy_copies_all_public_attrs; and a deepcopy or a pickled copy steps
    exactly as the original."""
    torch.manual_seed(0)
    for optim_input in all_inputs(info):
        weight, bias = weight_and_bias(info, rows=2, cols=3)
        optimizer = info.optim_cls([weight, bias], **optim_input.kwargs)
        grads = [[torch.randn_like(weight), torch.randn_like(bias)] for _ in range(6)]
        for gs in grads[:3]:
            _step_all(optimizer, gs)
        twins = [copy.deepcopy(optimizer), pickle.loads(pickle.dumps(optimizer))]
        public = {k for k in optimizer.__dict__ if not k.startswith("_")}
        for twin in twins:
            assert {k for k in twin.__dict__ if not k.startswith("_")} == public
        for gs in grads[3:]:
            for opt in (optimizer, *twins):
                _step_all(opt, gs)
        for twin in twins:
            for p, q in zip(params_of(optimizer), params_of(twin)):
                assert q is not p and torch.equal(p, q), optim_input.desc


@over(INFOS)
def test_non_empty_state(info):
    for optim_input in info.optim_inputs_func(device=DEVICE):
        model = nn.Linear(5, 5, bias=info.vectors)
        optimizer = info.optim_cls(model.parameters(), **optim_input.kwargs)
        optimizer.zero_grad()
        model(torch.rand(2, 5)).sum().backward()
        optimizer.step()
        assert len(optimizer.state) == len(list(model.parameters()))
        assert all(len(state) > 0 for state in optimizer.state.values())


@over(INFOS)
def test_zero_grad_set_to_none_false_zeroes_in_place(info):
    weight, bias = weight_and_bias(info)
    optimizer = info.optim_cls([weight, bias])
    linear_loss(weight, bias, torch.randn(5)).backward()
    grads = [weight.grad, bias.grad]
    optimizer.zero_grad(set_to_none=False)
    assert weight.grad is grads[0] and bias.grad is grads[1]
    assert not weight.grad.any() and not bias.grad.any()
    optimizer.zero_grad()
    assert weight.grad is None and bias.grad is None


# --- add_param_group ----------------------------------------------------------------------------

@over(STANDALONE)
def test_add_param_group_steps_and_survives_state_dict(info):
    """A group added after construction (torch's way to unfreeze layers) gets the defaults,
    moves exactly as if it had been given at construction, and round-trips through state_dict."""
    torch.manual_seed(0)
    first, later = Parameter(torch.randn(6, 4)), Parameter(torch.randn(4, 6))
    grads = [(torch.randn(6, 4), torch.randn(4, 6)) for _ in range(6)]
    added = info.optim_cls([first])
    added.add_param_group({"params": [later], "lr": 3e-3})
    assert added.param_groups[1].keys() == added.param_groups[0].keys()
    assert all(added.param_groups[1][k] == v for k, v in added.defaults.items() if k != "lr")
    given = info.optim_cls([{"params": [Parameter(first.detach().clone())]},
                            {"params": [Parameter(later.detach().clone())], "lr": 3e-3}])
    for gs in grads[:3]:
        _step_all(added, gs)
        _step_all(given, gs)
    resumed = info.optim_cls([Parameter(first.detach().clone())])
    resumed.add_param_group({"params": [Parameter(later.detach().clone())]})
    resumed.load_state_dict(copy.deepcopy(added.state_dict()))
    assert resumed.param_groups[1]["lr"] == 3e-3
    for gs in grads[3:]:
        for opt in (added, given, resumed):
            _step_all(opt, gs)
    for opt in (given, resumed):
        assert all(torch.equal(p, q) for p, q in zip(params_of(added), params_of(opt)))


# --- momentum cycling ---------------------------------------------------------------------------

MOMENTUM_SCHEDULERS = {
    "OneCycleLR": lambda o, **kw: OneCycleLR(o, max_lr=0.01, total_steps=10, **kw),
    "CyclicLR": lambda o, **kw: CyclicLR(o, base_lr=1e-3, max_lr=1e-2, step_size_up=3, **kw),
}


@pytest.mark.parametrize("scheduler", list(MOMENTUM_SCHEDULERS))
@over(STANDALONE)
def test_momentum_cycling_reaches_the_step(info, scheduler):
    """OneCycleLR and CyclicLR with their default ``cycle_momentum=True``: the optimizer steps
    with the cycled momentum (``betas[0]`` where the defaults have ``betas``), i.e. exactly as a
    run that sets those values by hand, and not as one that keeps its momentum."""
    key = "betas" if "betas" in info.optim_cls([Parameter(torch.randn(2, 2))]).defaults else "momentum"
    kwargs = {"rank": 2, "update_proj_gap": 3} if info.optim_cls in (optim.GaLore, optim.GoLore) else {}
    torch.manual_seed(0)
    w0, grads = torch.randn(6, 4), [torch.randn(6, 4) for _ in range(8)]
    runs, values = {}, []
    for run in ("cycled", "by hand", "lr only"):
        w = Parameter(w0.clone())
        opt = info.optim_cls([w], **kwargs)
        sched = MOMENTUM_SCHEDULERS[scheduler](opt, cycle_momentum=run == "cycled")
        for i, g in enumerate(grads):
            if run == "cycled":
                values.append(copy.deepcopy(opt.param_groups[0][key]))
            elif run == "by hand":
                opt.param_groups[0][key] = values[i]
            w.grad = g.clone()
            opt.step()
            sched.step()
        runs[run] = w.detach()
    assert len({str(v) for v in values}) > 2  # the momentum did cycle
    assert torch.equal(runs["cycled"], runs["by hand"])
    assert not torch.equal(runs["cycled"], runs["lr only"])


# --- build_optimizer ----------------------------------------------------------------------------

def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


def _mlp_grads(model, steps=6):
    g = torch.Generator().manual_seed(1)
    return [[torch.randn(p.shape, generator=g) for p in model.parameters()] for _ in range(steps)]


def _set_grads(model, grads):
    for p, grad in zip(model.parameters(), grads):
        p.grad = grad.clone()


@pytest.mark.parametrize("scheduler", list(MOMENTUM_SCHEDULERS))
@pytest.mark.parametrize("name", ["asgo", "muon"])
def test_build_optimizer_momentum_cycling_equals_its_parts(name, scheduler):
    """Under OneCycleLR/CyclicLR with momentum cycling, the routed optimizer moves every
    parameter exactly as its parts would, each under its own scheduler (the matrix method
    cycling ``momentum``, AdamW ``betas[0]``)."""
    model, ref = _mlp(), _mlp()
    routed_opt = asgo.build_optimizer(model, name, lr=0.01)
    make = MOMENTUM_SCHEDULERS[scheduler]
    sched = make(routed_opt)
    matrices = [p for p in ref.parameters() if p.ndim == 2]
    vectors = [p for p in ref.parameters() if p.ndim < 2]
    parts = [OPTIMIZERS[name](matrices, **{**ROUTED_DEFAULTS.get(name, {}), "lr": 0.01}),
             torch.optim.AdamW(vectors, **{**ADAMW_DEFAULTS, "lr": 0.01})]
    part_scheds = [make(opt) for opt in parts]
    for grads in _mlp_grads(model, 8):
        _set_grads(model, grads)
        _set_grads(ref, grads)
        routed_opt.step()
        for opt in parts:
            opt.step()
        for s in (sched, *part_scheds):
            s.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)


@over(ROUTED)
def test_build_optimizer_tensor_lr(info):
    """torch's test_tensor_lr, with a StepLR on both: a tensor lr moves the parameters as the
    float lr does."""
    for optim_input in all_inputs(info):
        kwargs = {k: v for k, v in optim_input.kwargs.items() if k != "lr"}
        weight, bias = weight_and_bias(info)
        weight_c, bias_c = (Parameter(t.detach().clone()) for t in (weight, bias))
        inpt = torch.randn(5)
        optimizer_r = info.optim_cls([weight, bias], lr=1e-3, **kwargs)
        optimizer = info.optim_cls([weight_c, bias_c], lr=torch.tensor(1e-3), **kwargs)
        schedulers = [StepLR(o, step_size=2, gamma=0.5) for o in (optimizer_r, optimizer)]
        for _ in range(5):
            optimizer_r.step(closure_for(optimizer_r, weight, bias, inpt))
            optimizer.step(closure_for(optimizer, weight_c, bias_c, inpt))
            step_schedulers(schedulers, None)
            torch.testing.assert_close(weight_c, weight, rtol=1e-6, atol=0)
            torch.testing.assert_close(bias_c, bias, rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", ["asgo", "muon", "adafactor"])
def test_build_optimizer_add_param_group(name):
    """A parameter unfrozen later joins with ``add_param_group``: with its ``algorithm``, or
    inferred (a matrix: the chosen method; a vector: AdamW); it gets that algorithm's defaults,
    moves, and the optimizer round-trips through state_dict into one built the same way."""
    def build():
        model = _mlp()
        extra = [Parameter(torch.randn(4, 6)), Parameter(torch.randn(4, 6)), Parameter(torch.randn(6))]
        opt = asgo.build_optimizer(model, name, lr=0.01)
        opt.add_param_group({"params": [extra[0]], "algorithm": name, "lr": 3e-3})
        opt.add_param_group({"params": [extra[1]]})
        opt.add_param_group({"params": [extra[2]]})
        return model, extra, opt

    model, extra, opt = build()
    algorithms = [group["algorithm"] for group in opt.param_groups[-3:]]
    assert algorithms == [name, name, "adamw"]
    assert opt.param_groups[-3]["lr"] == 3e-3
    built = {g["algorithm"]: g.keys() - {"params", "param_names"} for g in opt.param_groups[:-3]}
    for group in opt.param_groups[-3:]:
        assert group.keys() >= built[group["algorithm"]]
    before = [p.detach().clone() for p in extra]
    grads = _mlp_grads(model)
    g = torch.Generator().manual_seed(2)
    extra_grads = [[torch.randn(p.shape, generator=g) for p in extra] for _ in range(6)]
    for grads_m, grads_e in zip(grads[:3], extra_grads[:3]):
        _set_grads(model, grads_m)
        for p, grad in zip(extra, grads_e):
            p.grad = grad.clone()
        opt.step()
    assert all(not torch.equal(p, b) for p, b in zip(extra, before))
    saved = copy.deepcopy(opt.state_dict())
    model2, extra2, opt2 = build()
    with torch.no_grad():
        for p, q in zip([*model.parameters(), *extra], [*model2.parameters(), *extra2]):
            q.copy_(p)
    opt2.load_state_dict(saved)
    for grads_m, grads_e in zip(grads[3:], extra_grads[3:]):
        for mdl, ex, o in ((model, extra, opt), (model2, extra2, opt2)):
            _set_grads(mdl, grads_m)
            for p, grad in zip(ex, grads_e):
                p.grad = grad.clone()
            o.step()
    for p, q in zip([*model.parameters(), *extra], [*model2.parameters(), *extra2]):
        assert torch.equal(p, q)

