"""The two kinds of fine-tuning task behind one interface for the loop: the data (tokenised
training items and evaluation sets), the model, a micro-batch's summed loss and the evaluation.

- :class:`GlueRun`: ``AutoModelForSequenceClassification`` (a new head of ``num_labels`` outputs;
  STS-B: 1, regression; a saved head of another size is replaced by a fresh one). Loss:
  cross-entropy per example (STS-B: squared error), summed; the loop divides by the examples of
  the optimizer step. Evaluation: the task's official metrics on
  each evaluation split (MNLI: matched and mismatched) and the mean loss.
- :class:`ChoiceRun`: ``AutoModelForCausalLM``. Loss: next-token cross-entropy of the correct
  option's answer tokens, summed; the loop divides by the answer tokens of the step. Evaluation:
  accuracy of the option with the highest answer log-likelihood (mean per token or sum,
  ``task.scoring``) and the mean loss per answer token of the correct options, on ``dev`` (held
  out of the training split) every epoch and on ``eval`` (from the validation split) at the end.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from asgo.harness.finetune import scores
from asgo.harness.finetune.tasks import (GLUE_TASKS, answer_log_likelihoods, choice_examples, collate_glue,
                                         collate_sequences, glue_examples, read_split, subsample, tokenize_choices,
                                         tokenize_glue)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _pad_id(tokenizer) -> int:
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return value
    return 0


class GlueRun:
    """A GLUE task (``task.name`` in :data:`~asgo.harness.finetune.tasks.GLUE_TASKS`)."""

    def __init__(self, task: dict, model: dict, seed: int):
        self.spec = GLUE_TASKS[task["name"]]
        self.model_cfg = model
        self.tokenizer = load_tokenizer(model["path"])
        self.pad_id = _pad_id(self.tokenizer)
        self.regression = self.spec.num_labels == 1
        draw = torch.Generator().manual_seed(seed)
        self.train_items = self._load(task, "train", task.get("num_train"), draw)
        self.eval_sets = {split: self._load(task, split, task.get("num_eval"), draw) for split in self.spec.eval_splits}
        self.headline = (self.spec.eval_splits[0], self.spec.metrics[0])

    def _load(self, task: dict, split: str, count: int | None, draw: torch.Generator) -> list[dict]:
        rows, where = read_split(task, split)
        examples = glue_examples(self.spec, rows, where)
        examples = [examples[i] for i in subsample(len(examples), count, draw)]
        return tokenize_glue(self.tokenizer, examples, self.model_cfg["max_length"])

    def build_model(self) -> torch.nn.Module:
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification.from_pretrained(
            self.model_cfg["path"], num_labels=self.spec.num_labels, dtype=DTYPES[self.model_cfg["dtype"]],
            problem_type="regression" if self.regression else "single_label_classification",
            ignore_mismatched_sizes=True)  # a head with another number of labels: a fresh one

    def count(self, items: list[dict]) -> int:
        return len(items)

    def _logits(self, model, items, device) -> tuple[torch.Tensor, torch.Tensor]:
        batch = collate_glue(items, self.pad_id, self.regression, device)
        labels = batch.pop("labels")
        return model(**batch).logits.float(), labels

    def batch_loss(self, model, items: list[dict], device) -> torch.Tensor:
        logits, labels = self._logits(model, items, device)
        if self.regression:
            return F.mse_loss(logits.squeeze(-1), labels, reduction="sum")
        return F.cross_entropy(logits, labels, reduction="sum")

    @torch.no_grad()
    def evaluate(self, model, batch_size: int, device, autocast, final: bool) -> dict[str, dict]:
        results = {}
        model.eval()
        for split, items in self.eval_sets.items():
            predictions, loss = [], 0.0
            for start in range(0, len(items), batch_size):
                chunk = items[start:start + batch_size]
                with autocast():
                    logits, labels = self._logits(model, chunk, device)
                if self.regression:
                    predictions += logits.squeeze(-1).tolist()
                    loss += F.mse_loss(logits.squeeze(-1), labels, reduction="sum").item()
                else:
                    predictions += logits.argmax(-1).tolist()
                    loss += F.cross_entropy(logits, labels, reduction="sum").item()
            labels = [it["label"] for it in items]
            results[split] = {"loss": loss / len(items), **scores.compute(self.spec.metrics, labels, predictions)}
        model.train()
        return results


class ChoiceRun:
    """A multiple-choice task for a causal LM (``winogrande`` or ``boolq``). ``num_train`` and
    ``num_dev`` examples are drawn, disjoint, from the training split; ``num_eval`` from the validation split."""

    def __init__(self, task: dict, model: dict, seed: int):
        self.name = task["name"]
        self.model_cfg = model
        self.scoring = task.get("scoring", "mean")
        self.tokenizer = load_tokenizer(model["path"])
        self.pad_id = _pad_id(self.tokenizer)
        draw = torch.Generator().manual_seed(seed)
        rows, where = read_split(task, "train")
        examples = choice_examples(self.name, rows, where)
        order = torch.randperm(len(examples), generator=draw).tolist()
        n_train = len(examples) - task.get("num_dev", 0) if task.get("num_train") is None else task["num_train"]
        n_train = max(0, min(n_train, len(examples) - task.get("num_dev", 0)))
        train = [examples[i] for i in sorted(order[:n_train])]
        dev = [examples[i] for i in sorted(order[n_train:n_train + task.get("num_dev", 0)])]
        rows, where = read_split(task, "validation")
        evaluation = choice_examples(self.name, rows, where)
        evaluation = [evaluation[i] for i in subsample(len(evaluation), task.get("num_eval"), draw)]
        length = model["max_length"]
        self.train_items = [{"options": [item["options"][item["label"]]], "label": 0}
                            for item in tokenize_choices(self.tokenizer, train, length)]
        self.eval_sets = {"dev": tokenize_choices(self.tokenizer, dev, length),
                          "eval": tokenize_choices(self.tokenizer, evaluation, length)}
        self.headline = ("dev" if dev else "eval", "accuracy")

    def build_model(self) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(self.model_cfg["path"], dtype=DTYPES[self.model_cfg["dtype"]])

    def count(self, items: list[dict]) -> int:
        return sum(answer for item in items for _, answer in item["options"])

    def _log_likelihoods(self, model, sequences, device) -> tuple[torch.Tensor, torch.Tensor]:
        batch = collate_sequences(sequences, self.pad_id, device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return answer_log_likelihoods(logits, batch["labels"])

    def batch_loss(self, model, items: list[dict], device) -> torch.Tensor:
        log_likelihood, _ = self._log_likelihoods(model, [item["options"][0] for item in items], device)
        return -log_likelihood.sum()

    @torch.no_grad()
    def option_scores(self, model, items: list[dict], batch_size: int, device,
                      autocast) -> list[list[tuple[float, int]]]:
        """Per example and option: (summed answer log-likelihood, answer tokens)."""
        flat = [option for item in items for option in item["options"]]
        values = []
        for start in range(0, len(flat), batch_size):
            with autocast():
                ll, n = self._log_likelihoods(model, flat[start:start + batch_size], device)
            values += list(zip(ll.double().tolist(), n.tolist()))
        out, at = [], 0
        for item in items:
            out.append(values[at:at + len(item["options"])])
            at += len(item["options"])
        return out

    def evaluate(self, model, batch_size: int, device, autocast, final: bool) -> dict[str, dict]:
        results = {}
        model.eval()
        for split, items in self.eval_sets.items():
            if not items or (split == "eval" and not final):
                continue
            per_example = self.option_scores(model, items, batch_size, device, autocast)
            predictions = [max(range(len(s)), key=lambda k: s[k][0] / (s[k][1] if self.scoring == "mean" else 1))
                           for s in per_example]
            labels = [item["label"] for item in items]
            nll = -sum(s[y][0] for s, y in zip(per_example, labels))
            tokens = sum(s[y][1] for s, y in zip(per_example, labels))
            results[split] = {"loss": nll / tokens, "accuracy": scores.accuracy(labels, predictions)}
        model.train()
        return results


def make_run(task: dict, model: dict, seed: int):
    return GlueRun(task, model, seed) if task["name"] in GLUE_TASKS else ChoiceRun(task, model, seed)
