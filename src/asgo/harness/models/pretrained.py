"""Load a local Hugging Face GPT-2 directory (``GPT2LMHeadModel`` layout) into :class:`GPT`.

The directory holds ``config.json`` and the weights in ``model.safetensors`` or
``pytorch_model.bin`` (or their sharded ``*.index.json`` forms). Hugging Face's GPT-2 stores its
linear layers as ``Conv1D`` with weights shaped (in, out), so they are transposed, and the fused
``attn.c_attn`` is split into our ``q_proj``, ``k_proj`` and ``v_proj``. GPT-2 uses the tanh
approximation of GELU ("gelu_new"), which the loaded model's config records. No network access.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch
from torch import Tensor

from asgo.harness.models.gpt import GPT, GPTConfig

GELU_APPROXIMATIONS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh", "gelu": "none"}
SKIPPED = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")  # causal-mask buffers of old checkpoints
CONV1D = ("attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # (in, out) weights besides attn.c_attn
# Settings that only the checkpoint decides; overriding them would not match the weights.
ARCHITECTURE = ("vocab_size", "n_layer", "n_head", "n_embd", "bias", "gelu_approximate", "layer_norm_eps")


def load_gpt2_pretrained(directory: str | Path, **overrides) -> GPT:
    """A :class:`GPT` with the weights of the Hugging Face GPT-2 checkpoint in ``directory``.

    ``overrides`` may set ``dropout`` (default 0.0, whatever the checkpoint's ``*_pdrop``) and
    ``block_size`` (at most the checkpoint's ``n_positions``; the position table is cropped).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"pretrained GPT-2 directory {str(directory)!r} does not exist")
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{str(directory)!r} has no config.json (expected a Hugging Face GPT-2 directory)")
    config = _config_from_hf(json.loads(config_path.read_text()), config_path, overrides)

    state = {}
    for key, tensor in _read_weights(directory).items():
        key = key.removeprefix("transformer.")  # checkpoints saved from GPT2Model have no prefix
        if not SKIPPED.fullmatch(key):
            state[key] = tensor
    ours = _convert(state, config, directory)

    with torch.device("meta"):
        model = GPT(config)
    model.load_state_dict(ours, strict=True, assign=True)
    model.lm_head.weight = model.wte.weight  # assign=True made two Parameters; tie them again
    return model


def _config_from_hf(hf: dict, path: Path, overrides: dict) -> GPTConfig:
    if hf.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"{path}: model_type {hf['model_type']!r} is not 'gpt2'")
    activation = hf.get("activation_function", "gelu_new")
    if activation not in GELU_APPROXIMATIONS:
        raise ValueError(f"{path}: activation_function {activation!r} not supported; "
                         f"valid: {sorted(GELU_APPROXIMATIONS)}")
    if not hf.get("scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx", False):
        raise ValueError(f"{path}: only the standard 1/sqrt(head_dim) attention scaling is supported")
    if hf.get("n_inner") not in (None, 4 * hf["n_embd"]):
        raise ValueError(f"{path}: n_inner={hf['n_inner']} is not 4 * n_embd")
    if not hf.get("tie_word_embeddings", True):
        raise ValueError(f"{path}: untied word embeddings are not supported (GPT ties wte and lm_head)")
    config = GPTConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                       n_head=hf["n_head"], n_embd=hf["n_embd"], dropout=0.0, bias=True,
                       gelu_approximate=GELU_APPROXIMATIONS[activation],
                       layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5))
    fields = {f.name for f in dataclasses.fields(GPTConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"GPTConfig has no setting {unknown}; valid: {sorted(fields)}")
    fixed = sorted(k for k in overrides if k in ARCHITECTURE and overrides[k] != getattr(config, k))
    if fixed:
        raise ValueError(f"{fixed} come from {path} and cannot be overridden")
    if overrides.get("block_size", config.block_size) > config.block_size:
        raise ValueError(f"block_size={overrides['block_size']} exceeds the checkpoint's "
                         f"n_positions={config.block_size}")
    return dataclasses.replace(config, **overrides)


def _read_weights(directory: Path) -> dict[str, Tensor]:
    """All tensors of the checkpoint: safetensors preferred, then the PyTorch pickle (weights only)."""
    def load(file: Path) -> dict[str, Tensor]:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(file), device="cpu")
        return torch.load(file, map_location="cpu", weights_only=True)

    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).is_file():
            return load(directory / name)
        index = directory / f"{name}.index.json"
        if index.is_file():  # sharded: {"weight_map": {key: shard file}}
            state = {}
            for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
                state.update(load(directory / shard))
            return state
    raise FileNotFoundError(f"{str(directory)!r} has no model.safetensors or pytorch_model.bin "
                            f"(nor a sharded *.index.json of either)")


def _convert(hf: dict[str, Tensor], config: GPTConfig, directory: Path) -> dict[str, Tensor]:
    """Hugging Face GPT-2 keys and shapes to ours; missing, unexpected or misshapen keys are errors."""
    C = config.n_embd
    expected = {"wte.weight": (config.vocab_size, C), "wpe.weight": (None, C),
                "ln_f.weight": (C,), "ln_f.bias": (C,)}
    for i in range(config.n_layer):
        for name, shape in (("ln_1.weight", (C,)), ("ln_1.bias", (C,)), ("ln_2.weight", (C,)), ("ln_2.bias", (C,)),
                            ("attn.c_attn.weight", (C, 3 * C)), ("attn.c_attn.bias", (3 * C,)),
                            ("attn.c_proj.weight", (C, C)), ("attn.c_proj.bias", (C,)),
                            ("mlp.c_fc.weight", (C, 4 * C)), ("mlp.c_fc.bias", (4 * C,)),
                            ("mlp.c_proj.weight", (4 * C, C)), ("mlp.c_proj.bias", (C,))):
            expected[f"h.{i}.{name}"] = shape
    missing = sorted(set(expected) - set(hf))
    unexpected = sorted(set(hf) - set(expected) - {"lm_head.weight"})
    if missing or unexpected:
        raise KeyError(f"checkpoint in {str(directory)!r} does not match GPT-2 with n_layer={config.n_layer}: "
                       f"missing keys {missing}, unexpected keys {unexpected}")
    for key, shape in expected.items():
        got = tuple(hf[key].shape)
        if len(got) != len(shape) or any(s is not None and s != g for s, g in zip(shape, got)):
            raise ValueError(f"checkpoint key {key!r} has shape {got}, expected {shape}")
    if hf["wpe.weight"].shape[0] < config.block_size:
        raise ValueError(f"checkpoint has {hf['wpe.weight'].shape[0]} positions, "
                         f"fewer than block_size={config.block_size}")
    if "lm_head.weight" in hf and not torch.equal(hf["lm_head.weight"], hf["wte.weight"]):
        raise ValueError("checkpoint's lm_head.weight differs from transformer.wte.weight (untied head)")

    def f32(t: Tensor) -> Tensor:
        return t.to(torch.float32).contiguous()

    ours = {"wte.weight": f32(hf["wte.weight"]), "wpe.weight": f32(hf["wpe.weight"][:config.block_size]),
            "ln_f.weight": f32(hf["ln_f.weight"]), "ln_f.bias": f32(hf["ln_f.bias"])}
    ours["lm_head.weight"] = ours["wte.weight"]
    for i in range(config.n_layer):
        p = f"h.{i}."
        for name in ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias", "attn.c_proj.bias",
                     "mlp.c_fc.bias", "mlp.c_proj.bias"):
            ours[p + name] = f32(hf[p + name])
        for name in CONV1D:
            ours[p + name + ".weight"] = f32(hf[p + name + ".weight"].t())
        q, k, v = hf[p + "attn.c_attn.weight"].t().split(C, dim=0)
        qb, kb, vb = hf[p + "attn.c_attn.bias"].split(C, dim=0)
        for proj, w, b in (("q_proj", q, qb), ("k_proj", k, kb), ("v_proj", v, vb)):
            ours[p + f"attn.{proj}.weight"], ours[p + f"attn.{proj}.bias"] = f32(w), f32(b)
    return ours
