"""Fine-tuning tasks: the eight GLUE tasks (sequence classification/regression) and multiple-choice
tasks for causal LMs (WinoGrande, BoolQ).

Rows come from local files (``task.data_dir``: ``<split>.jsonl`` or ``<split>.tsv`` with a header
row, in the columns of the Hugging Face datasets ``nyu-mll/glue``, ``allenai/winogrande`` and
``google/boolq``) or, without ``data_dir``, from the Hugging Face hub through
``datasets.load_dataset`` (online, or its local cache). Malformed rows raise
:class:`~asgo.harness.data.DatasetError` naming the file, the line and the column.

Multiple choice: every example is a list of options, each a ``(context, continuation)`` pair of
strings; the continuation's tokens are the answer tokens. Training is next-token cross-entropy on
the correct option's answer tokens only; evaluation scores each option by the log-likelihood of its
answer tokens given its context (mean per token, or sum) and predicts the highest.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from asgo.harness.data import DatasetError

IGNORE_INDEX = -100


@dataclass(frozen=True)
class GlueTask:
    """One GLUE task: its text columns, number of labels (1: regression), official metrics
    (the first is the headline) and evaluation splits."""

    name: str
    text_keys: tuple[str, str | None]
    num_labels: int
    metrics: tuple[str, ...]
    eval_splits: tuple[str, ...] = ("validation",)


GLUE_TASKS = {t.name: t for t in (
    GlueTask("cola", ("sentence", None), 2, ("matthews_correlation",)),
    GlueTask("sst2", ("sentence", None), 2, ("accuracy",)),
    GlueTask("mrpc", ("sentence1", "sentence2"), 2, ("f1", "accuracy")),
    GlueTask("qqp", ("question1", "question2"), 2, ("f1", "accuracy")),
    GlueTask("stsb", ("sentence1", "sentence2"), 1, ("pearson", "spearmanr")),
    GlueTask("mnli", ("premise", "hypothesis"), 3, ("accuracy",), ("validation_matched", "validation_mismatched")),
    GlueTask("qnli", ("question", "sentence"), 2, ("accuracy",)),
    GlueTask("rte", ("sentence1", "sentence2"), 2, ("accuracy",)),
)}
MC_TASKS = ("winogrande", "boolq")
BOOLQ_OPTIONS = (" No", " Yes")


# ----------------------------------------------------------------------------------------- raw rows
def _read_local(data_dir: Path, split: str) -> tuple[list[dict], str]:
    """Rows of ``data_dir/<split>.jsonl`` (or ``.tsv``) and the file's name."""
    for suffix in (".jsonl", ".tsv"):
        path = data_dir / f"{split}{suffix}"
        if path.is_file():
            break
    else:
        raise DatasetError(f"task.data_dir={data_dir}: no {split}.jsonl or {split}.tsv (expected one file per "
                           f"split, in the columns of the Hugging Face dataset)")
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        if path.suffix == ".jsonl":
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as e:
                    raise DatasetError(f"{path}:{number}: not a JSON object ({e})") from None
                if not isinstance(row, dict):
                    raise DatasetError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
                rows.append(row)
        else:
            rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return rows, str(path)


def _read_hub(hf_path: str, hf_config: str | None, split: str) -> tuple[list[dict], str]:
    import datasets

    where = f"load_dataset({hf_path!r}, {hf_config!r}, split={split!r})"
    try:
        return datasets.load_dataset(hf_path, hf_config, split=split).to_list(), where
    except Exception as e:  # offline, unknown name, ...
        raise DatasetError(f"{where} failed ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); "
                           f"offline, set task.data_dir to a directory of <split>.jsonl files") from None


def read_split(task: dict, split: str) -> tuple[list[dict], str]:
    """``(rows, where)`` of ``split`` for a task config (``data_dir``, else ``hf_path``/``hf_config``)."""
    if task.get("data_dir"):
        return _read_local(Path(task["data_dir"]), split)
    return _read_hub(task["hf_path"], task.get("hf_config"), split)


def _field(row: dict, key: str, where: str, number: int):
    if key not in row or row[key] is None:
        raise DatasetError(f"{where}: row {number} has no column {key!r} (columns: {sorted(row)})")
    return row[key]


def subsample(n: int, count: int | None, generator: torch.Generator) -> list[int]:
    """``count`` distinct indices of ``range(n)`` drawn with ``generator`` (all of them, in order,
    when ``count`` is None or at least ``n``)."""
    if count is None or count >= n:
        return list(range(n))
    return sorted(torch.randperm(n, generator=generator)[:count].tolist())


# ---------------------------------------------------------------------------------------------- GLUE
@dataclass
class GlueExample:
    text_a: str
    text_b: str | None
    label: float | int


def glue_examples(task: GlueTask, rows: list[dict], where: str) -> list[GlueExample]:
    """Rows as examples, checked: texts present, labels in ``range(num_labels)`` (a number for STS-B)."""
    examples = []
    for number, row in enumerate(rows, 1):
        a = str(_field(row, task.text_keys[0], where, number))
        b = str(_field(row, task.text_keys[1], where, number)) if task.text_keys[1] else None
        raw = _field(row, "label", where, number)
        try:
            label = float(raw) if task.num_labels == 1 else int(raw)
        except (TypeError, ValueError):
            label = None
        if label is None or (task.num_labels == 1 and not math.isfinite(label)) or \
                (task.num_labels > 1 and not 0 <= label < task.num_labels):
            expected = "a number" if task.num_labels == 1 else f"an integer in [0, {task.num_labels})"
            raise DatasetError(f"{where}: row {number} column 'label': expected {expected}, got {raw!r} "
                               f"(test splits without labels cannot be used)")
        examples.append(GlueExample(a, b, label))
    return examples


def tokenize_glue(tokenizer, examples: list[GlueExample], max_length: int) -> list[dict]:
    """Each example's ``input_ids`` (and ``token_type_ids`` when the tokenizer makes them), truncated
    to ``max_length`` tokens, and its label."""
    a = [e.text_a for e in examples]
    b = [e.text_b for e in examples] if examples and examples[0].text_b is not None else None
    encoded = tokenizer(a, b, truncation=True, max_length=max_length) if b else \
        tokenizer(a, truncation=True, max_length=max_length)
    keys = [k for k in ("input_ids", "token_type_ids") if k in encoded]
    return [{**{k: encoded[k][i] for k in keys}, "label": e.label} for i, e in enumerate(examples)]


def collate_glue(items: list[dict], pad_id: int, regression: bool, device: torch.device) -> dict:
    """Right-padded tensors ``input_ids``, ``attention_mask`` (``token_type_ids``) and ``labels``."""
    length = max(len(it["input_ids"]) for it in items)
    batch = {"input_ids": torch.full((len(items), length), pad_id, dtype=torch.long),
             "attention_mask": torch.zeros((len(items), length), dtype=torch.long)}
    if "token_type_ids" in items[0]:
        batch["token_type_ids"] = torch.zeros((len(items), length), dtype=torch.long)
    for i, it in enumerate(items):
        n = len(it["input_ids"])
        batch["input_ids"][i, :n] = torch.tensor(it["input_ids"])
        batch["attention_mask"][i, :n] = 1
        if "token_type_ids" in batch:
            batch["token_type_ids"][i, :n] = torch.tensor(it["token_type_ids"])
    labels = torch.tensor([it["label"] for it in items], dtype=torch.float32 if regression else torch.long)
    return {k: v.to(device) for k, v in {**batch, "labels": labels}.items()}


# ---------------------------------------------------------------------------------- multiple choice
@dataclass
class ChoiceExample:
    options: list[tuple[str, str]]  # (context, continuation): the continuation's tokens are scored
    label: int


def winogrande_example(row: dict, where: str, number: int) -> ChoiceExample:
    """The blank ``_`` filled with each option; the rest of the sentence is the scored continuation
    (shared by both options), as in MeZO's WinoGrande template."""
    sentence = str(_field(row, "sentence", where, number))
    if sentence.count("_") != 1:
        raise DatasetError(f"{where}: row {number} column 'sentence': expected exactly one '_' blank, got {sentence!r}")
    head, tail = sentence.split("_")
    continuation = " " + tail.strip()
    options = [(head + str(_field(row, key, where, number)), continuation) for key in ("option1", "option2")]
    answer = str(_field(row, "answer", where, number)).strip()
    if answer not in ("1", "2"):
        raise DatasetError(f"{where}: row {number} column 'answer': expected '1' or '2', got {answer!r}")
    return ChoiceExample(options, int(answer) - 1)


def boolq_example(row: dict, where: str, number: int) -> ChoiceExample:
    """``<passage>\\nQuestion: <question>?\\nAnswer:`` followed by `` No`` or `` Yes``; the label from
    ``answer`` (a bool, google/boolq) or ``label`` (0/1, super_glue)."""
    passage, question = (str(_field(row, k, where, number)).strip() for k in ("passage", "question"))
    raw = row.get("answer", row.get("label"))
    truth = {True: 1, False: 0, 1: 1, 0: 0, "true": 1, "false": 0, "1": 1, "0": 0}.get(
        raw.lower() if isinstance(raw, str) else raw)
    if truth is None:
        raise DatasetError(f"{where}: row {number} column 'answer' (or 'label'): expected true/false or 1/0, "
                           f"got {raw!r}")
    context = f"{passage}\nQuestion: {question.rstrip('?')}?\nAnswer:"
    return ChoiceExample([(context, option) for option in BOOLQ_OPTIONS], truth)


def choice_examples(name: str, rows: list[dict], where: str) -> list[ChoiceExample]:
    make = {"winogrande": winogrande_example, "boolq": boolq_example}[name]
    return [make(row, where, number) for number, row in enumerate(rows, 1)]


def encode_option(tokenizer, context: str, continuation: str, max_length: int) -> tuple[list[int], int]:
    """``(ids, answer_length)``: the context's tokens (with the tokenizer's special tokens, e.g. a BOS)
    then the continuation's, cut from the left to ``max_length``; the answer is the last tokens."""
    ctx = tokenizer(context)["input_ids"]
    answer = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    if not answer:
        raise DatasetError(f"continuation {continuation!r} has no tokens")
    ids = (ctx + answer)[-max_length:]
    return ids, min(len(answer), len(ids) - 1)


def tokenize_choices(tokenizer, examples: list[ChoiceExample], max_length: int) -> list[dict]:
    """Each example's options as ``(ids, answer_length)`` and its label."""
    return [{"options": [encode_option(tokenizer, c, a, max_length) for c, a in e.options], "label": e.label}
            for e in examples]


def collate_sequences(sequences: list[tuple[list[int], int]], pad_id: int, device: torch.device) -> dict:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels``: each sequence's answer tokens,
    -100 elsewhere (next-token targets are taken from ``labels[:, 1:]``)."""
    length = max(len(ids) for ids, _ in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for i, (ids, answer) in enumerate(sequences):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        mask[i, :len(ids)] = 1
        labels[i, len(ids) - answer:len(ids)] = torch.tensor(ids[len(ids) - answer:])
    return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def answer_log_likelihoods(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: the summed log-probability of its answer tokens (float32 log-softmax) and their
    number. ``logits[:, t]`` predicts ``labels[:, t + 1]``."""
    targets = labels[:, 1:]
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    valid = targets != IGNORE_INDEX
    picked = log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, picked, 0.0).sum(-1), valid.sum(-1)
