"""Datasets for the harness: preparation into uint16 token files and random-window batches.

    data = load_data({"name": "shakespeare_char"}, "path/to/data")   # prepares on first use
    g = torch.Generator().manual_seed(data.sampler_seed(seed, rank))
    x, y = data.train.get_batch(batch_size, block_size, g, device)

Datasets (``name``): ``shakespeare_char`` (characters, vocab 65), ``openwebtext`` and ``c4``
(GPT-2 BPE; prepare once with ``python -m asgo.harness.data.prepare NAME``), ``wikitext2``
(fine-tuning; ``objective`` ``clm`` or ``fim``). A missing or malformed dataset raises
:class:`DatasetError` saying how to prepare it. ``datasets``/``tiktoken`` are imported only when
a dataset needs them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from asgo.harness.data.fim import FIMDataset, FIMSentinels, apply_fim, fim_permute
from asgo.harness.data.openwebtext import load_hf_text, prepare_hf_text
from asgo.harness.data.paths import DatasetError, dataset_error, default_data_dir
from asgo.harness.data.prepare import prepare_dataset
from asgo.harness.data.shakespeare import CharTokenizer, load_shakespeare_char, prepare_shakespeare_char
from asgo.harness.data.tokenizer import ByteTokenizer, HFTokenizer, get_tokenizer
from asgo.harness.data.tokens import EVAL_SEED, IGNORE_INDEX, EvalWindows, LMData, TokenDataset, eval_windows, sampler_seed
from asgo.harness.data.wikitext import load_wikitext2, prepare_wikitext2

__all__ = [
    "EVAL_SEED", "IGNORE_INDEX", "EvalWindows", "eval_windows", "ByteTokenizer", "CharTokenizer", "DatasetError", "FIMDataset", "FIMSentinels", "HFTokenizer", "LMData",
    "TokenDataset", "apply_fim", "dataset_error", "default_data_dir", "fim_permute", "get_tokenizer",
    "load_data", "load_hf_text", "load_shakespeare_char", "load_wikitext2", "prepare_dataset", "prepare_hf_text",
    "prepare_shakespeare_char", "prepare_wikitext2", "sampler_seed",
]

# the keys each dataset config may have besides 'name'; any other key is an error
DATASET_KEYS = {
    "shakespeare_char": set(),
    "openwebtext": set(),
    "c4": set(),
    "wikitext2": {"objective", "fim_rate", "train_split", "tokenizer", "spm_rate", "fim_loss", "hf_config"},
}


def load_data(dataset_cfg, dataset_path: str | os.PathLike | None = None, seed: int | None = None) -> LMData:
    """Open dataset ``dataset_cfg['name']`` under ``dataset_path`` (None: :func:`default_data_dir`).

    ``dataset_cfg``: a mapping or an OmegaConf ``dataset`` config node; keys other than ``name``
    are the dataset's options (:data:`DATASET_KEYS`), an unknown key is a ``ValueError``.
    Shakespeare-char and WikiText-2 are prepared on first use; OpenWebText/C4 must be prepared
    beforehand. ``seed`` is accepted for the training loop's call and does not affect the data:
    batch randomness comes from the generator passed to ``get_batch`` (see :func:`sampler_seed`).
    """
    if type(dataset_cfg).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        dataset_cfg = OmegaConf.to_container(dataset_cfg, resolve=True)
    if not isinstance(dataset_cfg, Mapping):
        raise TypeError(f"dataset config must be a mapping, got {type(dataset_cfg).__name__}")
    options = dict(dataset_cfg)
    name = options.pop("name", None)
    if name not in DATASET_KEYS:
        raise ValueError(f"unknown dataset {name!r}: choose from {', '.join(DATASET_KEYS)}")
    unknown = sorted(set(options) - DATASET_KEYS[name])
    if unknown:
        raise ValueError(f"dataset {name!r} has no option(s) {unknown}; allowed: {sorted(DATASET_KEYS[name]) or 'none'}")
    if name == "shakespeare_char":
        return load_shakespeare_char(dataset_path)
    if name in ("openwebtext", "c4"):
        return load_hf_text(name, dataset_path)
    options = {k: v for k, v in options.items() if v is not None}
    return load_wikitext2(dataset_path, **options)
