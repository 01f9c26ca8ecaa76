"""Tokenizers for the BPE datasets, all with tiktoken's interface.

A tokenizer here is any object with ``encode_ordinary(text) -> list[int]`` (no special tokens),
``eot_token`` (the id appended after each document) and ``n_vocab`` (ids are ``< n_vocab``):

- ``"gpt2"``: GPT-2 BPE through tiktoken (50257 ids, ``<|endoftext|>`` = 50256). tiktoken
  downloads the BPE files once (cached under ``$TIKTOKEN_CACHE_DIR``); offline use needs that cache.
- ``"byte"``: UTF-8 bytes, 256 ids plus an end-of-text id 256 (no download; tests, offline runs).
- a local Hugging Face tokenizer directory (e.g. the ``GPT2LMHeadModel`` directory a fine-tuning
  run starts from): loaded with ``transformers.AutoTokenizer``, eot = its ``eos_token_id``.
"""

from __future__ import annotations

import os
from pathlib import Path

from asgo.harness.data.paths import DatasetError


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0..255, end-of-text 256, ``n_vocab`` 257. Needs no download."""

    name = "byte"
    eot_token = 256
    n_vocab = 257

    def encode_ordinary(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A local Hugging Face tokenizer directory behind tiktoken's interface."""

    def __init__(self, directory: str | os.PathLike):
        from transformers import AutoTokenizer

        self.directory = Path(directory)
        self.name = f"hf-{self.directory.resolve().name}"
        self._tok = AutoTokenizer.from_pretrained(str(self.directory), local_files_only=True)
        if self._tok.eos_token_id is None:
            raise ValueError(f"tokenizer in {directory} has no eos token to separate documents")
        self.eot_token = int(self._tok.eos_token_id)
        self.n_vocab = len(self._tok)

    def encode_ordinary(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])


def get_tokenizer(spec="gpt2"):
    """A tokenizer from a spec: ``"gpt2"`` (tiktoken), ``"byte"``, a Hugging Face tokenizer directory,
    or an object that already has ``encode_ordinary``/``eot_token``/``n_vocab`` (returned as is)."""
    if spec is None:
        spec = "gpt2"
    if not isinstance(spec, (str, os.PathLike)):
        for attr in ("encode_ordinary", "eot_token", "n_vocab"):
            if not hasattr(spec, attr):
                raise TypeError(f"tokenizer {spec!r} has no {attr!r}")
        return spec
    if spec == "byte":
        return ByteTokenizer()
    if spec == "gpt2":
        import tiktoken

        try:
            enc = tiktoken.get_encoding("gpt2")
        except Exception as e:  # network errors surface as requests/urllib errors
            raise DatasetError(f"could not load the GPT-2 BPE from tiktoken ({type(e).__name__}: {e}); it is "
                               f"downloaded once and cached under $TIKTOKEN_CACHE_DIR, so offline point "
                               f"TIKTOKEN_CACHE_DIR at a directory holding it, or use tokenizer 'byte' or a "
                               f"local Hugging Face tokenizer directory") from e
        return enc
    if Path(spec).expanduser().is_dir():
        return HFTokenizer(Path(spec).expanduser())
    raise ValueError(f"unknown tokenizer {spec!r}: use 'gpt2', 'byte' or a Hugging Face tokenizer directory")


def tokenizer_name(tokenizer) -> str:
    """A short name for a tokenizer (its ``name`` attribute: tiktoken's is ``"gpt2"``)."""
    return str(getattr(tokenizer, "name", type(tokenizer).__name__))
