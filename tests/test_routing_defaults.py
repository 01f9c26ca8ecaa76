"""Defaults that train: ``build_optimizer(model, name)`` with no hyper-parameters, for every name,
trains a small Hugging Face GPT-2 (Conv1D layers, tied head) on a learnable sequence task."""

from __future__ import annotations

import pytest
import torch

import asgo
from asgo.routing import OPTIMIZERS

transformers = pytest.importorskip("transformers")

VOCAB, LENGTH, BATCH, STEPS = 64, 32, 16, 60
MIN_DROP = 50.0


def counting_batch(generator: torch.Generator) -> torch.Tensor:
    """Sequences ``start, start + 1, ...`` mod ``VOCAB``: each next token follows from the last."""
    start = torch.randint(0, VOCAB, (BATCH, 1), generator=generator)
    return (start + torch.arange(LENGTH)) % VOCAB


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_name_trains_at_its_defaults(name):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=LENGTH, n_embd=64, n_layer=2,
                                     n_head=4, bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config)
    optimizer = asgo.build_optimizer(model, name)
    generator = torch.Generator().manual_seed(0)
    held_out = counting_batch(torch.Generator().manual_seed(1))

    def loss_on(batch):
        return model(input_ids=batch, labels=batch).loss

    with torch.no_grad():
        before = loss_on(held_out).item()
    for _ in range(STEPS):
        loss = loss_on(counting_batch(generator))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = loss_on(held_out).item()
    assert before / after > MIN_DROP, f"{name}: loss {before:.3f} -> {after:.4f} ({before / after:.1f}x)"
    assert optimizer.diagnostics().get("skipped_steps", 0) == 0
