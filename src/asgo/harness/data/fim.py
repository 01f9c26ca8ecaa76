"""Fill-in-the-middle (FIM; Bavarian et al. 2022, "Efficient Training of Language Models to Fill in the Middle").

With probability ``fim_rate`` a training sample is cut at two uniformly random positions into
prefix / middle / suffix and rearranged so that a left-to-right model learns to infill:

    PSM:  <PRE> prefix <SUF> suffix <MID> middle
    SPM:  <PRE> <SUF> suffix <MID> prefix middle        (the paper's SPM variant; ``spm_rate``)

Sentinels. Three ids appended after the tokenizer's vocabulary (:meth:`FIMSentinels.after`):
``<PRE>`` = n_vocab, ``<SUF>`` = n_vocab + 1, ``<MID>`` = n_vocab + 2, so the model's vocabulary
is n_vocab + 3 (GPT-2: 50257, 50258, 50259 and 50260 ids, which still fit the 50304-row padded
embedding of the GPT-2 configs; a pretrained 50257-row embedding must be grown).

Choices (documented because the paper applies FIM to whole documents at the character level,
before tokenization, and we work on pre-tokenized memmaps on the fly):

- Granularity: *context-level, token-level* FIM. A FIM sample is a random window of
  ``block_size - 2`` tokens (the same offset a CLM batch would draw), cut at two positions drawn
  uniformly from ``0..len`` (sorted; empty parts allowed) and rearranged; with its three sentinels
  it is exactly ``block_size + 1`` tokens, so ``x``/``y`` keep the CLM shapes. The window may
  cross a document boundary (an eot inside a part is left as is). A non-FIM sample is the plain
  CLM window, so ``fim_rate = 0`` gives exactly the CLM batch for the same generator state.
- Loss: on every token of the rearranged sequence (``loss="all"``, the default), as Bavarian et
  al. train FIM and left-to-right data with the same autoregressive loss. ``loss="middle"`` sets
  the targets before ``<MID>`` to -100 (``ignore_index`` of the models' cross-entropy) in FIM
  samples, i.e. scores only the infilled span (plus prefix in SPM); use it to evaluate infilling.
- Randomness: per batch, the offsets, then one uniform per sample (FIM or not), two cut points
  per sample and one uniform per sample (SPM or PSM), all from the caller's generator: batches
  are deterministic given its seed/state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from asgo.harness.data.tokens import TokenDataset, to_device

IGNORE_INDEX = -100  # the models' F.cross_entropy(..., ignore_index=-100)


@dataclass(frozen=True)
class FIMSentinels:
    """Ids of ``<PRE>``, ``<SUF>``, ``<MID>``."""

    prefix: int
    suffix: int
    middle: int

    @classmethod
    def after(cls, n_vocab: int) -> "FIMSentinels":
        """Sentinels appended to a vocabulary of ``n_vocab`` ids: n_vocab, n_vocab + 1, n_vocab + 2."""
        return cls(n_vocab, n_vocab + 1, n_vocab + 2)

    @property
    def ids(self) -> tuple[int, int, int]:
        return self.prefix, self.suffix, self.middle

    @property
    def vocab_size(self) -> int:
        """The smallest vocabulary holding the sentinels."""
        return max(self.ids) + 1


def fim_permute(tokens: torch.Tensor, lo: int, hi: int, sentinels: FIMSentinels, spm: bool = False) -> torch.Tensor:
    """Rearrange 1-D ``tokens`` cut at ``lo <= hi`` into PSM (or SPM) order with the three sentinels."""
    if not 0 <= lo <= hi <= len(tokens):
        raise ValueError(f"need 0 <= lo <= hi <= {len(tokens)}, got {lo}, {hi}")
    prefix, middle, suffix = tokens[:lo], tokens[lo:hi], tokens[hi:]
    pre, suf, mid = (torch.tensor([s], dtype=tokens.dtype) for s in sentinels.ids)
    if spm:
        return torch.cat([pre, suf, suffix, mid, prefix, middle])
    return torch.cat([pre, prefix, suf, suffix, mid, middle])


def _check_options(fim_rate: float, spm_rate: float, loss: str) -> None:
    if not 0.0 <= fim_rate <= 1.0 or not 0.0 <= spm_rate <= 1.0:
        raise ValueError(f"fim_rate and spm_rate must lie in [0, 1], got {fim_rate}, {spm_rate}")
    if loss not in ("all", "middle"):
        raise ValueError(f"FIM loss must be 'all' or 'middle', got {loss!r}")


def apply_fim(windows: torch.Tensor, sentinels: FIMSentinels, fim_rate: float, generator: torch.Generator | None = None,
              spm_rate: float = 0.0, loss: str = "all") -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` from CLM windows of shape (B, T+1): each row, with probability ``fim_rate``,
    is replaced by the FIM rearrangement of its first T-2 tokens (so it is again T+1 long)."""
    _check_options(fim_rate, spm_rate, loss)
    batch, length = windows.shape
    if length < 4:
        raise ValueError(f"FIM needs block_size >= 3 (3 sentinels), got {length - 1}")
    span = length - 3  # tokens of a FIM sample besides the sentinels
    is_fim = torch.rand(batch, generator=generator) < fim_rate
    cuts = torch.randint(span + 1, (batch, 2), generator=generator).sort(dim=1).values
    is_spm = torch.rand(batch, generator=generator) < spm_rate
    seqs = windows.clone()
    y = seqs[:, 1:].clone()
    for b in torch.nonzero(is_fim).flatten().tolist():
        lo, hi = cuts[b].tolist()
        seqs[b] = fim_permute(windows[b, :span], lo, hi, sentinels, spm=bool(is_spm[b]))
        y[b] = seqs[b, 1:]
        if loss == "middle":
            mid = int((seqs[b] == sentinels.middle).nonzero()[0])
            y[b, :mid] = IGNORE_INDEX  # y[j] predicts seqs[j + 1]: keep only tokens after <MID>
    return seqs[:, :-1].contiguous(), y.contiguous()


class FIMDataset:
    """A :class:`TokenDataset` whose batches get FIM applied on the fly (see the module docstring)."""

    def __init__(self, base: TokenDataset, sentinels: FIMSentinels, fim_rate: float = 0.5, spm_rate: float = 0.0,
                 loss: str = "all"):
        self.base = base
        self.sentinels = sentinels
        self.fim_rate = float(fim_rate)
        self.spm_rate = float(spm_rate)
        self.loss = loss
        self.vocab_size = max(base.vocab_size, sentinels.vocab_size)
        _check_options(self.fim_rate, self.spm_rate, loss)

    def __len__(self) -> int:
        return len(self.base)

    def __repr__(self) -> str:
        return f"FIMDataset({self.base!r}, fim_rate={self.fim_rate}, spm_rate={self.spm_rate}, loss={self.loss!r})"

    def get_batch(self, batch_size: int, block_size: int, generator: torch.Generator | None = None,
                  device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Like :meth:`TokenDataset.get_batch` (same offsets for the same generator state), with FIM."""
        offsets = self.base._offsets(batch_size, block_size, generator)
        windows = self.base.windows(offsets, block_size + 1)
        x, y = apply_fim(windows, self.sentinels, self.fim_rate, generator, self.spm_rate, self.loss)
        return to_device(x, y, device)

    def eval_batch(self, windows: "EvalWindows", index: torch.Tensor, device: str | torch.device = "cpu"):
        """Like :meth:`TokenDataset.eval_batch`, with FIM applied to each window from a generator seeded
        by (``windows.seed``, the window's index): the same rearrangement whichever batch or rank holds it."""
        from asgo.harness.data.tokens import mask_scored

        offsets, starts = windows.offsets[index], windows.starts[index]
        buf = self.base.windows(offsets, windows.block_size + 1)
        rows = [apply_fim(buf[b:b + 1], self.sentinels, self.fim_rate,
                          torch.Generator().manual_seed(_window_seed(windows.seed, int(i))), self.spm_rate, self.loss)
                for b, i in enumerate(index.tolist())]
        x = torch.cat([r[0] for r in rows]) if rows else buf[:, :-1]
        y = torch.cat([r[1] for r in rows]) if rows else buf[:, 1:]
        plain = x[:, 0] != self.sentinels.prefix  # non-FIM rows: mask the targets already scored (a full pass's tail)
        y = torch.where(plain[:, None], mask_scored(y, offsets, starts), y)
        return to_device(x.contiguous(), y.contiguous(), device)


def _window_seed(seed: int, index: int) -> int:
    import hashlib

    digest = hashlib.sha256(f"asgo.eval_fim:{int(seed)}:{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
