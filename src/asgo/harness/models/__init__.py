"""Language models for the harness: a nanoGPT-style GPT and a LLaMA, by name.

    model = build_model("nanogpt", vocab_size=65)          # Shakespeare-char
    model = build_model("llama-60m")                         # GoLore's C4 model
    model = load_gpt2_pretrained("/path/to/gpt2")            # a local Hugging Face GPT-2 directory

Both models return ``(logits, loss)`` from ``model(idx, targets=None)`` and are laid out so that
``asgo.build_optimizer`` routes them: embeddings and ``lm_head`` to AdamW, norms and biases
(1-D) to AdamW, query/key projections ``q_proj``/``k_proj`` head-wise under a module with
``n_head``.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from asgo.harness.models.gpt import GPT, GPT_CONFIGS, GPTConfig
from asgo.harness.models.llama import LLAMA_CONFIGS, Llama, LlamaConfig
from asgo.harness.models.pretrained import load_gpt2_pretrained

MODEL_CONFIGS: dict[str, GPTConfig | LlamaConfig] = {**GPT_CONFIGS, **LLAMA_CONFIGS}

__all__ = ["GPT", "GPTConfig", "Llama", "LlamaConfig", "MODEL_CONFIGS", "build_model", "load_gpt2_pretrained"]


def build_model(name: str, **overrides) -> nn.Module:
    """A freshly initialised model of the named configuration, fields replaced by ``overrides``
    (e.g. ``vocab_size=65, dropout=0.0``). Build under ``torch.device("meta")`` to count
    parameters without memory."""
    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model {name!r}; valid names: {sorted(MODEL_CONFIGS)}")
    base = MODEL_CONFIGS[name]
    fields = {f.name for f in dataclasses.fields(base)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"model {name!r} ({type(base).__name__}) has no setting {unknown}; "
                         f"valid: {sorted(fields)}")
    config = dataclasses.replace(base, **overrides)
    return GPT(config) if isinstance(config, GPTConfig) else Llama(config)
