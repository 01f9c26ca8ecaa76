"""Fine-tuning tasks without a model: the GLUE metrics against hand-computed values and float64
references, the shipped samples of every task format (tests/data/glue, winogrande, boolq), the
multiple-choice formats and answer-token log-likelihoods, the schedule and the config checks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import asgo.harness.cli  # noqa: F401  (the configs' resolver)
from asgo.harness.config import CONFIG_DIR, ConfigError
from asgo.harness.data import DatasetError
from asgo.harness.finetune import scores
from asgo.harness.finetune.schema import validate_finetune_config
from asgo.harness.finetune.tasks import (GLUE_TASKS, IGNORE_INDEX, answer_log_likelihoods, boolq_example,
                                         choice_examples, collate_sequences, glue_examples, read_split, subsample,
                                         winogrande_example)
from asgo.harness.finetune.train import epoch_order, schedule_factor

DATA = Path(__file__).resolve().parents[1] / "data"
SIZES = {"mnli": (36, {"validation_matched": 15, "validation_mismatched": 15})}


def compose_finetune(*overrides):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose("finetune", overrides=list(overrides))


# ------------------------------------------------------------------------------------------ metrics
def test_binary_metrics_match_hand_computed_values():
    # tp 3, tn 4, fp 1, fn 2
    labels = [1, 1, 1, 1, 1, 0, 0, 0, 0, 0]
    preds = [1, 1, 1, 0, 0, 0, 0, 0, 0, 1]
    assert scores.accuracy(labels, preds) == pytest.approx(0.7, abs=1e-15)
    assert scores.f1(labels, preds) == pytest.approx(6 / 9, abs=1e-15)
    # (tp tn - fp fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)) = 10 / sqrt(4 * 5 * 5 * 6)
    assert scores.matthews_correlation(labels, preds) == pytest.approx(10 / math.sqrt(600), abs=1e-15)
    assert scores.matthews_correlation([0, 1, 0], [1, 1, 1]) == 0.0  # one predicted class: undefined, 0
    assert scores.f1([0, 0], [0, 0]) == 0.0


def test_multiclass_matthews_matches_the_gorodkin_formula_by_hand():
    labels = [0, 0, 1, 1, 2, 2]
    preds = [0, 1, 1, 1, 2, 0]
    # s 6, c 4, t = (2, 2, 2), p = (2, 3, 1): (4*6 - 12) / sqrt((36 - 14) * (36 - 12))
    assert scores.matthews_correlation(labels, preds) == pytest.approx(12 / math.sqrt(22 * 24), abs=1e-15)


def test_correlations_match_hand_computed_values_and_float64_references():
    assert scores.pearson([1, 2, 3, 4], [2, 4, 5, 9]) == pytest.approx(11 / math.sqrt(130), abs=1e-15)
    # ties averaged: ranks (1, 2.5, 2.5, 4) and (1, 3, 2, 4)
    assert scores.average_ranks([1, 2, 2, 3]).tolist() == [1, 2.5, 2.5, 4]
    assert scores.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / math.sqrt(22.5), abs=1e-15)
    g = torch.Generator().manual_seed(0)
    x = 1e-3 * torch.randn(200, generator=g, dtype=torch.float64)  # STS-B-like outputs at a small scale
    y = x + 1e-4 * torch.randn(200, generator=g, dtype=torch.float64)
    reference = torch.corrcoef(torch.stack([x, y]))[0, 1].item()
    assert scores.pearson(x.float(), y.float()) == pytest.approx(reference, abs=1e-6)
    ranks = lambda v: torch.argsort(torch.argsort(v)).double()  # no ties in continuous data
    reference = torch.corrcoef(torch.stack([ranks(x), ranks(y)]))[0, 1].item()
    assert scores.spearman(x, y) == pytest.approx(reference, abs=1e-12)
    assert math.isnan(scores.pearson([1, 1, 1], [1, 2, 3]))


# --------------------------------------------------------------------------------------------- data
@pytest.mark.parametrize("name", sorted(GLUE_TASKS))
def test_every_glue_sample_loads_with_its_columns_and_labels(name):
    spec = GLUE_TASKS[name]
    task = {"name": name, "data_dir": str(DATA / "glue" / name)}
    n_train, n_eval = SIZES.get(name, (32, {"validation": 16}))
    rows, where = read_split(task, "train")
    train = glue_examples(spec, rows, where)
    assert len(train) == n_train
    assert where.endswith(".tsv" if name == "rte" else ".jsonl")
    assert spec.eval_splits == tuple(n_eval)
    for split, count in n_eval.items():
        examples = glue_examples(spec, *read_split(task, split))
        assert len(examples) == count
    assert all(e.text_a and (e.text_b is None) == (spec.text_keys[1] is None) for e in train)
    if spec.num_labels == 1:
        assert all(isinstance(e.label, float) and 0 <= e.label <= 5 for e in train)
    else:
        assert {e.label for e in train} == set(range(spec.num_labels))  # every class present


def test_glue_specs_hold_the_official_metrics():
    assert {n: t.metrics for n, t in GLUE_TASKS.items()} == {
        "cola": ("matthews_correlation",), "sst2": ("accuracy",), "mrpc": ("f1", "accuracy"),
        "qqp": ("f1", "accuracy"), "stsb": ("pearson", "spearmanr"), "mnli": ("accuracy",),
        "qnli": ("accuracy",), "rte": ("accuracy",)}
    assert GLUE_TASKS["stsb"].num_labels == 1 and GLUE_TASKS["mnli"].num_labels == 3


def test_bad_rows_name_the_file_row_and_column(tmp_path):
    spec = GLUE_TASKS["mrpc"]
    (tmp_path / "train.jsonl").write_text(json.dumps({"sentence1": "a", "sentence2": "b", "label": 1}) + "\n"
                                          + json.dumps({"sentence1": "a", "label": 0}) + "\n")
    with pytest.raises(DatasetError, match=r"train.jsonl: row 2 has no column 'sentence2'"):
        glue_examples(spec, *read_split({"data_dir": str(tmp_path)}, "train"))
    (tmp_path / "train.jsonl").write_text(json.dumps({"sentence1": "a", "sentence2": "b", "label": -1}) + "\n")
    with pytest.raises(DatasetError, match=r"row 1 column 'label': expected an integer in \[0, 2\), got -1"):
        glue_examples(spec, *read_split({"data_dir": str(tmp_path)}, "train"))
    (tmp_path / "train.jsonl").write_text("[1, 2]\n")
    with pytest.raises(DatasetError, match=r"train.jsonl:1: expected a JSON object"):
        read_split({"data_dir": str(tmp_path)}, "train")
    with pytest.raises(DatasetError, match=r"no validation.jsonl or validation.tsv"):
        read_split({"data_dir": str(tmp_path)}, "validation")


def test_subsample_draws_distinct_indices_reproducibly():
    a = subsample(100, 10, torch.Generator().manual_seed(3))
    assert a == subsample(100, 10, torch.Generator().manual_seed(3)) and len(set(a)) == 10
    assert subsample(5, None, torch.Generator()) == subsample(5, 9, torch.Generator()) == [0, 1, 2, 3, 4]


def test_epoch_order_is_a_permutation_fixed_by_seed_and_epoch():
    assert sorted(epoch_order(37, 42, 0)) == list(range(37))
    assert epoch_order(37, 42, 1) == epoch_order(37, 42, 1) != epoch_order(37, 42, 0)


# ---------------------------------------------------------------------------------- multiple choice
def test_winogrande_fills_the_blank_and_scores_the_rest():
    row = {"sentence": "Sarah could not lift Tom because _ was too weak .", "option1": "Sarah", "option2": "Tom",
           "answer": "1"}
    example = winogrande_example(row, "f", 1)
    assert example.options == [("Sarah could not lift Tom because Sarah", " was too weak ."),
                               ("Sarah could not lift Tom because Tom", " was too weak .")]
    assert example.label == 0
    with pytest.raises(DatasetError, match="column 'answer': expected '1' or '2'"):
        winogrande_example({**row, "answer": "3"}, "f", 1)
    with pytest.raises(DatasetError, match="exactly one '_' blank"):
        winogrande_example({**row, "sentence": "no blank"}, "f", 1)


def test_boolq_prompts_no_and_yes():
    row = {"question": "is the sky blue", "passage": "The sky is blue.", "answer": True}
    example = boolq_example(row, "f", 1)
    prompt = "The sky is blue.\nQuestion: is the sky blue?\nAnswer:"
    assert example.options == [(prompt, " No"), (prompt, " Yes")] and example.label == 1
    assert boolq_example({"question": "q?", "passage": "p", "label": 0}, "f", 1).label == 0
    with pytest.raises(DatasetError, match="column 'answer'"):
        boolq_example({"question": "q", "passage": "p", "answer": "maybe"}, "f", 1)


@pytest.mark.parametrize("name", ["winogrande", "boolq"])
def test_multiple_choice_samples_load(name):
    for split, count in (("train", 32), ("validation", 16)):
        examples = choice_examples(name, *read_split({"data_dir": str(DATA / name)}, split))
        assert len(examples) == count and all(len(e.options) == 2 for e in examples)
        assert {e.label for e in examples} == {0, 1}


def test_answer_log_likelihoods_match_a_float64_reference():
    g = torch.Generator().manual_seed(0)
    sequences = [([5, 6, 7, 8, 9], 2), ([5, 6, 3], 1), ([1, 2, 3, 4, 5, 6, 7], 4)]
    batch = collate_sequences(sequences, pad_id=0, device=torch.device("cpu"))
    assert batch["attention_mask"].sum(1).tolist() == [5, 3, 7]
    assert (batch["labels"] != IGNORE_INDEX).sum(1).tolist() == [2, 1, 4]
    logits = 3 * torch.randn(3, 7, 11, generator=g)
    ll, n = answer_log_likelihoods(logits, batch["labels"])
    for i, (ids, answer) in enumerate(sequences):
        reference = sum(torch.log_softmax(logits[i, t - 1].double(), -1)[ids[t]].item()
                        for t in range(len(ids) - answer, len(ids)))
        assert ll[i].item() == pytest.approx(reference, rel=1e-6) and n[i].item() == answer


# ------------------------------------------------------------------------------------ schedule, cfg
def test_linear_schedule_is_transformers_linear_schedule():
    from transformers import get_linear_schedule_with_warmup

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = get_linear_schedule_with_warmup(opt, num_warmup_steps=0, num_training_steps=20)
    for step in range(20):
        assert schedule_factor(step, "linear", 20, 0, 0.0) == pytest.approx(sched.get_last_lr()[0], abs=1e-12)
        opt.step()
        sched.step()
    assert [schedule_factor(s, "constant", 10, 4, 0.0) for s in (0, 3, 4, 9)] == [0.25, 1.0, 1.0, 1.0]
    assert schedule_factor(10, "cosine", 10, 0, 0.1) == pytest.approx(0.1)
    assert schedule_factor(10, "linear", 10, 2, 0.1) == pytest.approx(0.1)


def test_paper_presets_compose():
    cfg = compose_finetune("task=rte", "model.path=m", "preset=glue_golore")
    o = cfg.optimizer
    assert (o.name, o.learning_rate, o.rank, o.scale, o.update_proj_gap, o.golore_fraction) == \
        ("golore", 3e-5, 4, 4.0, 500, 0.2)
    assert (cfg.train.batch_size, cfg.train.epochs, cfg.model.max_length, cfg.train.seed) == (16, 30, 512, 42)
    assert compose_finetune("task=rte", "model.path=m", "preset=glue_galore").optimizer.name == "galore"
    w = compose_finetune("model.path=m", "preset=winogrande_golore_sgd")
    assert (w.task.name, w.task.num_train, w.task.num_dev, w.task.num_eval) == ("winogrande", 1000, 100, 1000)
    assert (w.optimizer.inner, w.optimizer.learning_rate, w.optimizer.momentum, w.optimizer.dampening,
            w.optimizer.scale, w.optimizer.rank, w.train.schedule) == ("sgd", 1e-3, 0.9, 0.0, 4.0, 1024, "constant")
    a = compose_finetune("model.path=m", "preset=winogrande_golore_adamw")
    assert (a.optimizer.inner, a.optimizer.learning_rate, a.optimizer.scale) == ("adamw", 3e-5, 1.0)
    for cfg in (cfg, w, a):
        validate_finetune_config(cfg)


def test_a_roberta_classification_head_goes_to_adamw():
    """RoBERTa's head is two layers (classifier.dense, classifier.out_proj): routing's head rule
    (a head name anywhere in the path outside the layer stack) sends both to AdamW."""
    transformers = pytest.importorskip("transformers")
    import asgo

    config = transformers.RobertaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                        num_attention_heads=2, intermediate_size=32, num_labels=3)
    model = transformers.RobertaForSequenceClassification(config)
    routes = {r.name: (r.role, r.algorithm) for r in asgo.routing.route_parameters(model, "asgo")}
    for name in ("classifier.dense.weight", "classifier.out_proj.weight"):
        assert routes[name] == ("head", "adamw")
    assert routes["roberta.encoder.layer.0.output.dense.weight"] == ("matrix", "asgo")


@pytest.mark.parametrize("override, message", [
    ("train.schedule=step", "train.schedule: expected one of ('linear', 'cosine', 'constant'), got 'step'"),
    ("train.epochs=0", "train.epochs: expected an integer >= 1, got 0"),
    ("+task.bogus=1", "unknown key task.bogus"),
    ("task.scoring=mean", None),
    ("model.max_length=0", "model.max_length: expected an integer >= 1, got 0"),
])
def test_bad_keys_are_config_errors_naming_them(override, message):
    task = "task=winogrande" if "scoring" in override else "task=rte"
    cfg = compose_finetune(task, "model.path=m", override)
    if message is None:
        validate_finetune_config(cfg)
        return
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate_finetune_config(cfg)


def test_a_missing_model_path_is_a_config_error():
    with pytest.raises(ConfigError, match="model.path: required"):
        validate_finetune_config(compose_finetune("task=rte"))
