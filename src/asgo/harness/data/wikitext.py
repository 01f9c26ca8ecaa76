"""WikiText-2 for fine-tuning, with a causal-LM (``clm``) or fill-in-the-middle (``fim``) objective.

Source text: ``<data_dir>/wikitext2/{train,valid,test}.txt``, one WikiText line per line (as the
Hugging Face rows). Missing files are downloaded with
``datasets.load_dataset('Salesforce/wikitext', 'wikitext-2-raw-v1')`` (the canonical repository
of ``'wikitext'``; ``hf_config='wikitext-2-v1'`` gives the tokenized release with ``<unk>``, the
variant of some offline copies) and written there.

Training on the test split: an offline copy may hold only ``valid.txt`` and ``test.txt``. Then,
and only when the caller asks with ``train_split='test'`` (CLI ``--train-split test``, config
``dataset.train_split=test``), ``test.txt`` is the training text; results must say so, and the
``test`` split is then no held-out set. With the default ``train_split='train'`` a missing
``train.txt`` is downloaded, never silently replaced.

Documents are the articles: a new one starts at each top-level heading line `` = Title = ``.
Each is encoded with ``encode_ordinary`` and followed by the eot token, as for OpenWebText. The
result, ``wikitext2/tokens-<tokenizer>/{train,val,test}.bin`` + ``meta.json`` (``val`` from
``valid.txt``), is rebuilt only when a source file changes. ``meta.json``'s ``vocab_size`` is the
tokenizer's; FIM adds its three sentinels after it (``fim_sentinels``, ``fim_vocab_size``; see
:mod:`asgo.harness.data.fim`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

from asgo.harness.data.fim import FIMDataset, FIMSentinels
from asgo.harness.data.paths import DatasetError, dataset_error, output_dir, read_text_source, resolve_data_dir
from asgo.harness.data.tokenizer import get_tokenizer, tokenizer_name
from asgo.harness.data.tokens import META_FILE, LMData, TokenDataset, read_meta, write_meta, write_tokens

NAME = "wikitext2"
HF_PATH = "Salesforce/wikitext"
HF_CONFIG = "wikitext-2-raw-v1"
FILES = {"train": "train.txt", "val": "valid.txt", "test": "test.txt"}
HF_SPLITS = {"train.txt": "train", "valid.txt": "validation", "test.txt": "test"}
_HEADING = re.compile(r"^ = [^=].* = $")


def split_documents(text: str) -> list[str]:
    """WikiText articles: a document starts at each top-level heading `` = Title = ``."""
    docs, current = [], []
    for line in text.splitlines(keepends=True):
        if _HEADING.match(line.rstrip("\r\n")) and "".join(current).strip():
            docs.append("".join(current))
            current = []
        current.append(line)
    if "".join(current).strip():
        docs.append("".join(current))
    return docs


def _rows_to_text(rows) -> str:
    lines = []
    for row in rows:
        line = row["text"] if isinstance(row, Mapping) else str(row)
        lines.append(line if line.endswith("\n") else line + "\n")
    return "".join(lines)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _source_stamp(path: Path) -> list:
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


def prepare_wikitext2(data_dir: str | os.PathLike | None = None, tokenizer=None, source=None, *,
                      train_split: str = "train", hf_config: str = HF_CONFIG) -> Path:
    """Tokenize WikiText-2; return the directory with ``{train,val,test}.bin`` and ``meta.json``.

    ``tokenizer``: spec for :func:`get_tokenizer` or a tokenizer object (default GPT-2 BPE).
    ``source``: None (``<data_dir>/wikitext2``, downloading missing files), a directory holding the
    ``.txt`` files (never downloads), or a mapping from split (``train``/``validation``/``test``,
    or ``valid``/``val``) to rows (strings or ``{'text': ...}``, e.g. a ``datasets`` DatasetDict).
    ``train_split``: ``'train'`` or ``'test'`` (train on ``test.txt``; see the module docstring).
    Output goes under ``<data_dir>/wikitext2`` (a cache directory if that is read-only).
    """
    if train_split not in ("train", "test"):
        raise ValueError(f"train_split must be 'train' or 'test', got {train_split!r}")
    data_dir = resolve_data_dir(data_dir)
    tok = get_tokenizer(tokenizer)
    is_dir_source = isinstance(source, (str, os.PathLike))
    src_dir = Path(source).expanduser() if is_dir_source else data_dir / NAME
    work = output_dir(data_dir / NAME, src_dir)
    files = {"train": FILES[train_split], "val": FILES["val"], "test": FILES["test"]}

    if isinstance(source, Mapping):
        aliases = {"train": "train.txt", "validation": "valid.txt", "valid": "valid.txt", "val": "valid.txt",
                   "test": "test.txt"}
        for split, rows in source.items():
            if split not in aliases:
                raise ValueError(f"unknown WikiText split {split!r} in source: use {sorted(aliases)}")
            _write_text(work / aliases[split], _rows_to_text(rows))
    search = [src_dir] if is_dir_source else ([work, src_dir] if source is not None else [src_dir, work])

    def find(name: str) -> Path | None:
        return next((d / name for d in search if (d / name).is_file()), None)

    missing = sorted({f for f in files.values() if find(f) is None})
    if missing:
        hint = (" (offline copies often lack train.txt: pass train_split='test' to train on test.txt)"
                if "train.txt" in missing else "")
        if source is not None:
            raise dataset_error(NAME, data_dir, f"{', '.join(missing)} not found in {src_dir}{hint}")
        try:
            from datasets import load_dataset

            hf = load_dataset(HF_PATH, hf_config)
        except Exception as e:  # offline: connection errors of several kinds
            raise dataset_error(NAME, data_dir, f"{', '.join(missing)} missing in {src_dir} and downloading "
                                f"{HF_PATH} ({hf_config}) failed ({type(e).__name__}: {e}){hint}") from e
        for name in missing:
            _write_text(work / name, _rows_to_text(hf[HF_SPLITS[name]]))
    paths = {split: find(name) for split, name in files.items()}

    tag = re.sub(r"[^A-Za-z0-9_.-]", "_", tokenizer_name(tok))
    out = work / f"tokens-{tag}"
    stamps = {split: _source_stamp(p) for split, p in paths.items()}
    if (out / META_FILE).is_file() and all((out / f"{s}.bin").is_file() for s in files):
        try:
            meta = read_meta(out, NAME, data_dir)
            if meta.get("sources") == stamps and meta.get("tokenizer") == tokenizer_name(tok):
                return out
        except DatasetError:
            pass

    out.mkdir(parents=True, exist_ok=True)
    counts, docs = {}, {}
    for split, path in paths.items():
        text = read_text_source(path, NAME, data_dir, "WikiText-2 as plain UTF-8 text, one line per line "
                                "(as the Hugging Face rows); replace it, or delete it to download it again")
        documents = split_documents(text)
        if not documents:
            raise dataset_error(NAME, data_dir, f"{path} holds no text")
        docs[split] = len(documents)
        encoded = [tok.encode_ordinary(d) + [tok.eot_token] for d in documents]
        counts[split] = write_tokens(out / f"{split}.bin", encoded, total=sum(map(len, encoded)))
    sentinels = FIMSentinels.after(int(tok.n_vocab))
    write_meta(out, {
        "dataset": NAME, "vocab_size": int(tok.n_vocab), "tokenizer": tokenizer_name(tok),
        "eot_token": int(tok.eot_token), "splits": counts, "documents": docs, "train_split": train_split,
        "fim_sentinels": {"prefix": sentinels.prefix, "suffix": sentinels.suffix, "middle": sentinels.middle},
        "fim_vocab_size": sentinels.vocab_size, "sources": stamps,
    })
    return out


def load_wikitext2(data_dir: str | os.PathLike | None = None, objective: str = "clm", fim_rate: float = 0.5, *,
                   tokenizer=None, train_split: str = "train", spm_rate: float = 0.0, fim_loss: str = "all",
                   source=None, hf_config: str = HF_CONFIG) -> LMData:
    """Prepare (if needed) and open WikiText-2 for ``objective`` ``'clm'`` or ``'fim'``.

    With ``'fim'`` every split (train, val, test) yields FIM batches at ``fim_rate`` and the
    vocabulary grows by the three sentinels (``vocab_size`` = n_vocab + 3).
    """
    if objective not in ("clm", "fim"):
        raise ValueError(f"objective must be 'clm' or 'fim', got {objective!r}")
    data_dir = resolve_data_dir(data_dir)
    directory = prepare_wikitext2(data_dir, tokenizer, source, train_split=train_split, hf_config=hf_config)
    splits = {s: TokenDataset(directory, s, dataset=NAME, data_dir=data_dir) for s in ("train", "val", "test")}
    vocab_size = splits["train"].vocab_size
    if objective == "fim":
        sentinels = FIMSentinels.after(vocab_size)
        splits = {s: FIMDataset(d, sentinels, fim_rate, spm_rate, fim_loss) for s, d in splits.items()}
        vocab_size = sentinels.vocab_size
    meta = {**splits["train"].meta, "objective": objective} if objective == "clm" else \
        {**splits["train"].base.meta, "objective": objective, "fim_rate": fim_rate, "spm_rate": spm_rate,
         "fim_loss": fim_loss}
    return LMData(NAME, splits["train"], splits["val"], vocab_size, meta, test=splits["test"])
