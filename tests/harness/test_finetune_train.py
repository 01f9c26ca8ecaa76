"""asgo-finetune end to end on tiny random-init models built offline: a 2-layer BERT classifier
and a 2-layer GPT-2, each with a word-level tokenizer trained on the shipped samples
(tests/data/glue, winogrande, boolq). One short run per optimizer family, the evaluation against
unpadded per-example forwards, the multiple-choice scores against a float64 reference, exact
resume, the divergence guard and the refusals."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

import asgo.harness.cli  # noqa: F401  (the configs' resolver)
from asgo.harness.config import CONFIG_DIR, ConfigError
from asgo.harness.finetune import scores
from asgo.harness.finetune.runners import ChoiceRun, GlueRun, make_run
from asgo.harness.finetune.train import finetune
from asgo.harness.train import Diverged

DATA = Path(__file__).resolve().parents[1] / "data"
ASGO_FINETUNE = Path(sys.executable).parent / "asgo-finetune"
QUIET = ["train.progress=false", "train.tensorboard=false", "train.plot=false", "train.log_interval=1"]


def _tokenizer(encoder: bool):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] if encoder else ["<pad>", "<unk>", "<s>"]
    tok = Tokenizer(models.WordLevel(unk_token=special[1]))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    files = sorted(DATA.glob("glue/*/*")) + sorted(DATA.glob("winogrande/*")) + sorted(DATA.glob("boolq/*"))
    tok.train_from_iterator((p.read_text() for p in files), trainers.WordLevelTrainer(special_tokens=special))
    if encoder:
        ids = [(t, tok.token_to_id(t)) for t in ("[CLS]", "[SEP]")]
        tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                           special_tokens=ids)
        return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                       sep_token="[SEP]", mask_token="[MASK]",
                                       model_input_names=["input_ids", "token_type_ids", "attention_mask"])
    bos = [("<s>", tok.token_to_id("<s>"))]
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=bos)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="<s>")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """``{"bert": dir, "gpt": dir}``: config, random weights (dropout 0.1) and tokenizer of each."""
    from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    tok = _tokenizer(True)
    BertForSequenceClassification(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, intermediate_size=64,
                                             max_position_embeddings=128)).save_pretrained(root / "bert")
    tok.save_pretrained(root / "bert")
    tok = _tokenizer(False)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=128,
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id)).save_pretrained(root / "gpt")
    tok.save_pretrained(root / "gpt")
    return {"bert": str(root / "bert"), "gpt": str(root / "gpt")}


def config(*overrides):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose("finetune", overrides=[*QUIET, *overrides])


def glue(models, name, *overrides):
    return config(f"task={name}", f"task.data_dir={DATA / 'glue' / name}", f"model.path={models['bert']}",
                  "train.batch_size=8", *overrides)


def choice(models, name, *overrides):
    return config(f"task={name}", f"task.data_dir={DATA / name}", f"model.path={models['gpt']}", "task.num_train=16",
                  "task.num_dev=8", "task.num_eval=null", "train.batch_size=4", *overrides)


def rows(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


FAMILIES = {"adamw": ["optimizer.learning_rate=1e-3"],
            "asgo": ["optimizer.learning_rate=1e-2"],
            "muon": ["optimizer.learning_rate=1e-2"],
            "galore": ["optimizer.rank=4", "optimizer.update_proj_gap=3"],
            "golore": ["optimizer.rank=4", "optimizer.update_proj_gap=3", "optimizer.golore_fraction=0.5"]}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_one_short_glue_run_per_optimizer_family(models, tmp_path, name):
    cfg = glue(models, "sst2", f"optimizer={name}", "train.epochs=2", *FAMILIES[name])
    initial = make_run(dict(cfg.task), dict(cfg.model), 42)
    summary = finetune(cfg, tmp_path)
    assert (summary["steps"], summary["steps_per_epoch"], summary["train_examples"]) == (8, 4, 32)
    evals = [r for r in rows(tmp_path) if r["split"] == "validation"]
    assert [(r["step"], r["epoch"]) for r in evals] == [(4, 1), (8, 2)]
    assert all(0 <= r["accuracy"] <= 1 and math.isfinite(r["loss"]) for r in evals)
    assert len([r for r in rows(tmp_path) if r["split"] == "train"]) == 8
    routing = (tmp_path / "routing.txt").read_text().splitlines()
    algorithm = {line.split()[0]: line for line in routing}
    for head_or_embedding in ("classifier.weight", "classifier.bias", "bert.embeddings.word_embeddings.weight"):
        assert " adamw " in algorithm[head_or_embedding]
    assert f" {name} " in algorithm["bert.encoder.layer.0.attention.self.query.weight"]
    trained = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model"]
    torch.manual_seed(42)
    before = initial.build_model().state_dict()  # the same seeded head
    for key in ("classifier.weight", "bert.encoder.layer.1.output.dense.weight"):
        assert not torch.equal(trained[key], before[key]), key
    assert summary["headline"] == {"split": "validation", "metric": "accuracy", "final": evals[-1]["accuracy"],
                                   "best": max(r["accuracy"] for r in evals),
                                   "best_epoch": max(evals, key=lambda r: r["accuracy"])["epoch"]}


@pytest.mark.parametrize("name", ["mrpc", "stsb", "mnli"])
def test_glue_evaluation_equals_unpadded_forwards(models, tmp_path, name):
    """The logged metrics and loss, recomputed one example at a time without padding (float64 loss)."""
    cfg = glue(models, name, "train.epochs=1", "train.eval_batch_size=5", "optimizer.learning_rate=1e-3")
    summary = finetune(cfg, tmp_path)
    run = GlueRun(dict(cfg.task), dict(cfg.model), 42)
    model = run.build_model()
    model.load_state_dict(torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model"])
    model.eval()
    assert set(summary["final"]) == set(run.spec.eval_splits)
    for split, items in run.eval_sets.items():
        outputs = []
        with torch.no_grad():
            for it in items:
                batch = {k: torch.tensor([it[k]]) for k in ("input_ids", "token_type_ids")}
                assert run.spec.text_keys[1] is None or 1 in it["token_type_ids"]  # the second segment's type
                outputs.append(model(**batch).logits[0].double())
        labels = [it["label"] for it in items]
        logits = torch.stack(outputs)
        if name == "stsb":
            assert model.config.num_labels == 1
            predictions = logits[:, 0]
            loss = F.mse_loss(predictions, torch.tensor(labels, dtype=torch.float64)).item()
        else:
            predictions = logits.argmax(-1)
            loss = F.cross_entropy(logits, torch.tensor(labels)).item()
        expected = scores.compute(run.spec.metrics, labels, predictions.tolist())
        logged = summary["final"][split]
        assert logged["loss"] == pytest.approx(loss, rel=1e-5)
        for metric, value in expected.items():  # correlations of near-constant outputs: float32 round-off
            tolerance = 1e-3 if name == "stsb" else 1e-12
            assert logged[metric] == pytest.approx(value, abs=tolerance), (split, metric)


@pytest.mark.parametrize("name", ["winogrande", "boolq"])
def test_option_scores_equal_unpadded_float64_log_likelihoods(models, name):
    cfg = choice(models, name)
    run = ChoiceRun(dict(cfg.task), dict(cfg.model), 42)
    assert (len(run.train_items), len(run.eval_sets["dev"]), len(run.eval_sets["eval"])) == (16, 8, 16)
    model = run.build_model().eval()
    items = run.eval_sets["eval"][:6]
    batched = run.option_scores(model, items, batch_size=5, device=torch.device("cpu"), autocast=torch.no_grad)
    with torch.no_grad():
        for item, per_option in zip(items, batched):
            for (ids, answer), (ll, n) in zip(item["options"], per_option):
                log_probs = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
                reference = sum(log_probs[t - 1, ids[t]].item() for t in range(len(ids) - answer, len(ids)))
                assert n == answer and ll == pytest.approx(reference, rel=1e-5)
        # the training loss: the correct option's answer tokens only
        train_items = run.train_items[:3]
        loss = run.batch_loss(model, train_items, torch.device("cpu")).item()
        per_item = run.option_scores(model, train_items, 8, torch.device("cpu"), torch.no_grad)
        assert loss == pytest.approx(-sum(s[0][0] for s in per_item), rel=1e-5)
        assert run.count(train_items) == sum(answer for it in train_items for _, answer in it["options"])


MC_RUNS = {"winogrande-golore-adamw": ("winogrande", ["optimizer=golore", "optimizer.learning_rate=1e-3",
                                                      "optimizer.rank=4", "optimizer.update_proj_gap=2",
                                                      "optimizer.golore_fraction=0.5"]),
           "winogrande-paper-sgd": ("winogrande", ["preset=winogrande_golore_sgd", "optimizer.rank=4",
                                                   "optimizer.update_proj_gap=2", "model.dtype=float32"]),
           "boolq-asgo": ("boolq", ["optimizer=asgo", "optimizer.learning_rate=1e-3"])}


@pytest.mark.parametrize("kind", sorted(MC_RUNS))
def test_multiple_choice_runs_evaluate_dev_every_epoch_and_eval_at_the_end(models, tmp_path, kind):
    name, overrides = MC_RUNS[kind]
    summary = finetune(choice(models, name, *overrides, "train.epochs=2"), tmp_path)
    assert summary["steps"] == 8 and summary["eval_examples"] == {"dev": 8, "eval": 16}
    logged = [(r["step"], r["split"]) for r in rows(tmp_path) if r["split"] != "train"]
    assert logged == [(4, "dev"), (8, "dev"), (8, "eval")]
    assert summary["headline"]["split"] == "dev" and set(summary["final"]) == {"dev", "eval"}
    assert all(0 <= v["accuracy"] <= 1 and v["loss"] > 0 for v in summary["final"].values())
    train = [r for r in rows(tmp_path) if r["split"] == "train"]
    assert all(math.isfinite(r["loss"]) for r in train) and train[0]["lr"] > 0
    if kind == "winogrande-paper-sgd":  # the paper's constant schedule
        assert {r["lr"] for r in train} == {1e-3}


@pytest.mark.parametrize("kind", ["glue-golore", "winogrande-asgo"])
def test_resume_equals_the_uninterrupted_run(models, tmp_path, kind):
    """Dropout on, a resume mid-epoch (step 3 of 4) and GoLore's bases refreshed across it."""
    every = ["train.epochs=2", "train.checkpoint_interval=3", "train.keep_checkpoints=true"]
    if kind == "glue-golore":
        make = partial(glue, models, "rte", "optimizer=golore", "optimizer.rank=4", "optimizer.update_proj_gap=2",
                       "optimizer.golore_fraction=0.5", "train.warmup_fraction=0.25", *every)
    else:
        make = partial(choice, models, "winogrande", "optimizer=asgo", "optimizer.learning_rate=1e-2",
                       "train.schedule=cosine", *every)
    summaries = [finetune(make(), tmp_path / "full")]
    for at, where in ((3, "resumed"), (6, "resumed_after_an_epoch")):
        summaries.append(finetune(make(f"train.resume={tmp_path / 'full' / f'checkpoint_{at:06d}.pt'}"),
                                  tmp_path / where))
    untimed = [{k: v for k, v in s.items() if k not in ("train_seconds", "checkpoint", "metrics")} for s in summaries]
    assert untimed[0] == untimed[1] == untimed[2]  # best epoch and counters of the whole run
    full = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    again = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    assert full["step"] == again["step"] == 8
    for key, value in full["model"].items():
        assert torch.equal(value, again["model"][key]), key
    after = lambda d: [{k: v for k, v in r.items() if k not in ("time_s", "examples_per_s")}
                       for r in rows(d) if r["step"] > 3]
    assert after(tmp_path / "resumed") == after(tmp_path / "full")


def test_a_changed_setting_or_an_occupied_out_dir_is_refused(models, tmp_path):
    cfg = glue(models, "rte", "train.epochs=1", "train.checkpoint_interval=2", "train.keep_checkpoints=true")
    finetune(cfg, tmp_path / "a")
    with pytest.raises(ConfigError, match=r"already holds another run"):
        finetune(cfg, tmp_path / "a")
    changed = glue(models, "rte", "train.epochs=1", "train.checkpoint_interval=2", "train.keep_checkpoints=true",
                   "optimizer.learning_rate=0.5", f"train.resume={tmp_path / 'a' / 'checkpoint_000002.pt'}")
    with pytest.raises(ConfigError, match=r"optimizer.learning_rate: 0.001 -> 0.5"):
        finetune(changed, tmp_path / "b")


@pytest.mark.filterwarnings("ignore:Detected call of .lr_scheduler.step")
def test_a_nonfinite_loss_stops_or_skips_the_step(models, tmp_path, monkeypatch):
    real = GlueRun.batch_loss
    monkeypatch.setattr(GlueRun, "batch_loss", lambda self, *a: real(self, *a) * float("nan"))
    with pytest.raises(Diverged, match="loss became nan at step 1; no checkpoint was written before it"):
        finetune(glue(models, "rte", "train.epochs=1"), tmp_path / "stop")
    summary = finetune(glue(models, "rte", "train.epochs=1", "train.on_nonfinite=skip"), tmp_path / "skip")
    assert summary["nonfinite_skipped_steps"] == summary["steps"] == 4
    trained = torch.load(tmp_path / "skip" / "checkpoint.pt", weights_only=True)["model"]
    run = make_run({"name": "rte", "data_dir": str(DATA / "glue" / "rte")}, {"path": models["bert"], "max_length": 128,
                                                                             "dtype": "float32"}, 42)
    torch.manual_seed(42)
    initial = run.build_model().state_dict()
    assert all(torch.equal(v, initial[k]) for k, v in trained.items())  # no step was taken


@pytest.mark.slow
def test_console_script(models, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [str(ASGO_FINETUNE), "task=cola", f"task.data_dir={DATA / 'glue' / 'cola'}", f"model.path={models['bert']}",
           "train.epochs=1", "train.batch_size=8"]
    out = subprocess.run(cmd + [f"train.out_dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "final validation matthews_correlation:" in out.stdout and "curves.png" in out.stdout
    assert (tmp_path / "run" / "summary.json").is_file() and (tmp_path / "run" / "tensorboard").is_dir()
    bad = subprocess.run(cmd + ["train.schedule=step", f"train.out_dir={tmp_path / 'bad'}"], capture_output=True,
                         text=True, timeout=300, cwd=tmp_path, env=env)
    assert bad.returncode == 1 and bad.stderr.startswith("error: train.schedule: expected one of")


def test_a_signal_checkpoints_at_the_step_and_the_resumed_run_matches(models, tmp_path, monkeypatch):
    import signal

    from asgo.harness.train import Interrupted

    make = partial(glue, models, "rte", "optimizer=muon", "optimizer.learning_rate=1e-2", "train.epochs=2")
    finetune(make(), tmp_path / "full")
    real, calls = GlueRun.batch_loss, []

    def batch_loss(self, *args):
        calls.append(1)
        if len(calls) == 3:  # during step 3
            os.kill(os.getpid(), signal.SIGUSR1)
        return real(self, *args)

    monkeypatch.setattr(GlueRun, "batch_loss", batch_loss)
    with pytest.raises(Interrupted, match="interrupted \\(SIGUSR1\\) at step 3") as stopped:
        finetune(make(), tmp_path / "cut")
    assert stopped.value.exit_code == 138
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["step"] == 3
    monkeypatch.setattr(GlueRun, "batch_loss", real)
    finetune(make(f"train.resume={tmp_path / 'cut' / 'checkpoint.pt'}"), tmp_path / "cut")
    full = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)["model"]
    resumed = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(v, resumed[k]) for k, v in full.items())
    assert [r["step"] for r in rows(tmp_path / "cut")] == [r["step"] for r in rows(tmp_path / "full")]


@pytest.mark.filterwarnings("ignore:Detected call of .lr_scheduler.step")
def test_cli_exit_status(models, tmp_path, monkeypatch, capsys):
    """asgo-finetune's main in this process: 1 for a config error, 3 for a non-finite loss, one line each."""
    from asgo.harness.finetune.cli import main

    base = ["asgo-finetune", "task=rte", f"task.data_dir={DATA / 'glue' / 'rte'}", f"model.path={models['bert']}",
            "train.epochs=1", *QUIET]
    monkeypatch.setattr(sys, "argv", [*base, "train.schedule=step", f"train.out_dir={tmp_path / 'bad'}"])
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 1
    assert capsys.readouterr().err.strip().startswith("error: train.schedule: expected one of")
    real = GlueRun.batch_loss
    monkeypatch.setattr(GlueRun, "batch_loss", lambda self, *a: real(self, *a) * float("inf"))
    monkeypatch.setattr(sys, "argv", [*base, f"train.out_dir={tmp_path / 'nan'}"])
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 3
    assert "error: loss became inf at step 1" in capsys.readouterr().err


def test_no_checkpoint_holds_nonfinite_weights(models, tmp_path, monkeypatch):
    """A nan in weights the loss never reads (token type 1 of a one-sentence task): the loss stays finite,
    the epoch-end checkpoint is refused and the interval checkpoint before it is kept."""
    real = GlueRun.batch_loss

    def batch_loss(self, model, items, device):
        types = model.bert.embeddings.token_type_embeddings.weight
        if types.isfinite().all() and (tmp_path / "run" / "checkpoint.pt").exists():  # after step 2's checkpoint
            with torch.no_grad():
                types[1] = float("nan")
        return real(self, model, items, device)

    monkeypatch.setattr(GlueRun, "batch_loss", batch_loss)
    cfg = glue(models, "sst2", "train.epochs=1", "train.checkpoint_interval=2")
    with pytest.raises(Diverged, match=r"weights or optimizer state became non-finite \(found at step 4.*the last "
                                       r"good checkpoint is .*checkpoint.pt"):
        finetune(cfg, tmp_path / "run")
    kept = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert kept["step"] == 2 and all(v.isfinite().all() for v in kept["model"].values())
