"""A nanoGPT-style GPT, readable top to bottom.

Learned position embeddings, pre-LayerNorm blocks, causal self-attention with separate query,
key, value and output projections (so ``asgo.build_optimizer`` can precondition Q and K head by
head: they are ``nn.Linear`` modules named ``q_proj``/``k_proj`` inside a module with ``n_head``),
a GELU MLP, and an output head tied to the token embedding. Weights start normal(0, 0.02), the
residual output projections (``c_proj``) normal(0, 0.02/sqrt(2 * n_layer)), biases zero, as in
nanoGPT and the ASGO authors' code.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class GPTConfig:
    block_size: int = 1024          # longest sequence (number of learned positions)
    vocab_size: int = 50304         # GPT-2's 50257 padded up to a multiple of 64
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True               # biases in the Linear layers and LayerNorms
    gelu_approximate: str = "none"  # "tanh" is GPT-2's "gelu_new" (set by load_gpt2_pretrained)
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head  # read by asgo's routing: head-wise Q/K preconditioning
        self.dropout = config.dropout
        self.q_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.k_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.v_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        # (B, T, C) -> (B, n_head, T, head_dim)
        q, k, v = (proj(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate=config.gelu_approximate)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied: one tensor

        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # residual projections, scaled by depth (GPT-2)
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Logits (B, T, vocab) for token ids ``idx`` (B, T), and the mean cross-entropy against
        ``targets`` (B, T) when given; targets equal to -100 are ignored (masked fine-tuning)."""
        T = idx.shape[1]
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1),
                                   ignore_index=-100)
        return logits, loss

    def grow_vocab(self, vocab_size: int) -> None:
        """Extend the (tied) token embedding to ``vocab_size`` rows, e.g. for FIM's sentinel tokens
        when fine-tuning a pretrained model: existing rows are kept, new ones initialised afresh."""
        old = self.wte.weight
        if vocab_size <= old.shape[0]:
            return
        self.wte = nn.Embedding(vocab_size, self.config.n_embd, device=old.device, dtype=old.dtype)
        self._init_weights(self.wte)
        with torch.no_grad():
            self.wte.weight[:old.shape[0]] = old
        self.lm_head = nn.Linear(self.config.n_embd, vocab_size, bias=False, device="meta")
        self.lm_head.weight = self.wte.weight
        self.config = dataclasses.replace(self.config, vocab_size=vocab_size)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Number of parameters (the tied head counted once); ``exclude_embeddings`` leaves out the
        token and position embeddings."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.wte.weight.numel() + self.wpe.weight.numel()
        return n


GPT_CONFIGS = {
    "tiny": GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=128, dropout=0.0),
    "nanogpt": GPTConfig(n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2),
    "gpt2": GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304, dropout=0.0),
    "gpt2-large": GPTConfig(n_layer=36, n_head=20, n_embd=1280, block_size=1024, vocab_size=50304, dropout=0.0),
}
