"""Experiment: GaLore vs GoLore@20% vs AdamW on a GLUE task, scaled down to what runs offline on 2 CPU cores.

    python experiments/finetune_glue.py [--out runs/experiments/finetune_glue] [--epochs 30] [--seeds 0,1,2]
                                        [--train 500] [--smoke]

The GoLore paper fine-tunes pretrained RoBERTa-base (125M) on GLUE (rank 4, scale 4, tau 500, lr 3e-5,
batch 16, 30 epochs, max length 512, GoLore@20%); that needs a GPU, the pretrained weights and the GLUE
data, none of which this offline CPU machine has. Here, stated plainly:

1. Data: a synthetic SST-2-format task (``<out>/data/sst2/{train,validation}.jsonl``, columns
   ``sentence``/``label``) written by this script: short movie-review sentences from templates, with
   negation ("was not good"), contrast ("X but Y": the second clause decides) and lists ("was A , B
   and C": the majority decides), 10% of the training labels flipped; ``--train`` training sentences
   and 872 validation sentences (SST-2's validation size).
2. Model: a 2-layer BERT (hidden 64, 4 heads, FFN 256, about 0.1M parameters), **randomly initialised**
   (no pretrained weights exist offline; a 4-layer, 128-wide one stayed at chance for 6 epochs at lr 1e-3
   without warmup, the paper's schedule), with a word-level tokenizer trained on the training split,
   saved to ``<out>/model`` and loaded by ``asgo-finetune`` as any Hugging Face directory.
3. Training: ``asgo-finetune task=sst2`` with the paper's GLUE presets (``preset=glue_golore``,
   ``glue_galore``, ``glue_adamw``: batch 16, linear decay to 0, no warmup, no clipping, rank 4,
   scale 4, GoLore@20%, 30 epochs) except: max length 64, lr 1e-3 for all three (the paper's 3e-5 is
   for pretrained weights; at 1e-4 this random model was still at chance after 150 steps) and a basis
   refresh every 100 steps: the paper's 500 refreshes at steps 0 and 500 of these 960 only, before
   GoLore@20%'s switch to random bases at step 768, so GoLore would be GaLore exactly. Hidden
   matrices go to the optimizer; embeddings, the classifier, norms and biases to AdamW in every run.
4. ``<out>/finetune_glue.md`` and ``.csv``: validation accuracy at the last epoch and the best epoch,
   mean and std over seeds; ``<out>/finetune_glue.png``: validation accuracy per epoch.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import statistics
from pathlib import Path

OPTIMIZERS = {"adamw": "glue_adamw", "galore": "glue_galore", "golore": "glue_golore"}
LABEL = {"adamw": "AdamW", "galore": "GaLore (r4)", "golore": "GoLore@20% (r4)"}

SUBJECTS = ["the film", "this movie", "the story", "the cast", "the script", "the ending", "the music",
            "the director", "the plot", "the acting", "the dialogue", "the camera work"]
VERBS = ["was", "felt", "seemed", "looked", "is", "remains"]
POSITIVE = ["good", "great", "wonderful", "moving", "brilliant", "charming", "funny", "clever", "fresh",
            "gripping", "beautiful", "warm"]
NEGATIVE = ["bad", "boring", "dull", "tedious", "awful", "clumsy", "painful", "silly", "flat", "messy",
            "predictable", "cold"]
INTENSIFIERS = ["", "", "very", "really", "quite", "truly", "rather"]
OPENERS = ["", "", "", "honestly ,", "overall ,", "in the end ,", "to be fair ,", "sadly ,", "luckily ,"]


def clause(rng: random.Random) -> tuple[str, int]:
    positive = rng.random() < 0.5
    negated = rng.random() < 0.3
    words = [rng.choice(SUBJECTS), rng.choice(VERBS), "not" if negated else "", rng.choice(INTENSIFIERS),
             rng.choice(POSITIVE if positive else NEGATIVE)]
    return " ".join(w for w in words if w), int(positive != negated)


def listing(rng: random.Random) -> tuple[str, int]:
    """'<subject> <verb> A , B and C': the majority of the three adjectives' polarities decides."""
    polarities = [rng.random() < 0.5 for _ in range(3)]
    words = [rng.choice(POSITIVE if p else NEGATIVE) for p in polarities]
    text = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {words[0]} , {words[1]} and {words[2]}"
    return text, int(sum(polarities) >= 2)


def sentence(rng: random.Random) -> tuple[str, int]:
    """A review and its sentiment: one clause; two joined by 'but' (the second decides); or a list of
    three adjectives (the majority decides)."""
    kind = rng.random()
    if kind < 0.3:
        first, _ = clause(rng)
        second, label = clause(rng)
        text = f"{first} but {second}"
    elif kind < 0.5:
        text, label = listing(rng)
    else:
        text, label = clause(rng)
    return " ".join(w for w in (rng.choice(OPENERS), text, ".") if w), label


def write_data(root: Path, n_train: int, n_validation: int = 872, noise: float = 0.1) -> Path:
    rng = random.Random(1234)
    target = root / "sst2"
    target.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("validation", n_validation)):
        with open(target / f"{split}.jsonl", "w") as f:
            for i in range(n):
                text, label = sentence(rng)
                if split == "train" and rng.random() < noise:
                    label = 1 - label
                f.write(json.dumps({"sentence": text, "label": label, "idx": i}) + "\n")
    return target


def write_model(train_file: Path, target: Path, seed: int = 0) -> Path:
    """A randomly initialised 2-layer BERT and a word-level tokenizer, as a Hugging Face directory."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    texts = [json.loads(line)["sentence"] for line in train_file.read_text().splitlines()]
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=special))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[(t, tok.token_to_id(t)) for t in ("[CLS]", "[SEP]")])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                        sep_token="[SEP]", mask_token="[MASK]",
                                        model_input_names=["input_ids", "token_type_ids", "attention_mask"])
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=256, max_position_embeddings=64)
    BertForSequenceClassification(config).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def finetune_run(optimizer: str, seed: int, data: Path, model: Path, out: Path, args) -> dict:
    from hydra import compose, initialize_config_dir

    import asgo.harness.cli  # noqa: F401  (the configs' resolver)
    from asgo.harness.config import CONFIG_DIR
    from asgo.harness.finetune.train import finetune

    if (out / "summary.json").is_file():  # a finished run: kept
        return json.loads((out / "summary.json").read_text())
    overrides = ["task=sst2", f"task.data_dir={data}", f"model.path={model}", f"preset={OPTIMIZERS[optimizer]}",
                 "model.max_length=64", f"train.epochs={args.epochs}", f"train.seed={seed}",
                 f"optimizer.learning_rate={args.lr}", "train.progress=false", "train.tensorboard=false",
                 "train.log_interval=25", "train.overwrite=true"]
    if optimizer != "adamw":
        overrides.append(f"optimizer.update_proj_gap={args.tau}")
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose("finetune", overrides=overrides)
    print(f"+ asgo-finetune {' '.join(overrides)}", flush=True)
    return finetune(cfg, out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/experiments/finetune_glue"))
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--train", type=int, default=500, help="training sentences")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--tau", type=int, default=100, help="GaLore/GoLore basis refresh interval (steps)")
    parser.add_argument("--smoke", action="store_true", help="2 epochs on 64 sentences, one seed (tests)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.epochs, args.seeds, args.train, args.tau = 2, "0", 64, 2
    import torch

    torch.set_num_threads(1)
    out = args.out.resolve()
    data = write_data(out / "data", args.train, 32 if args.smoke else 872)
    model = out / "model"
    if not (model / "config.json").is_file():
        write_model(data / "train.jsonl", model)
    seeds = [int(s) for s in args.seeds.split(",")]
    summaries = {(name, seed): finetune_run(name, seed, data, model, out / f"{name}_seed{seed}", args)
                 for name in OPTIMIZERS for seed in seeds}

    rows = []
    for name in OPTIMIZERS:
        final = [summaries[name, s]["headline"]["final"] for s in seeds]
        best = [summaries[name, s]["headline"]["best"] for s in seeds]
        seconds = [summaries[name, s]["train_seconds"] for s in seeds]
        state = summaries[name, seeds[0]]["optimizer_state_bytes"]
        std = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0
        rows.append({"optimizer": name, "final_accuracy": statistics.fmean(final), "final_std": std(final),
                     "best_accuracy": statistics.fmean(best), "best_std": std(best), "seeds": len(seeds),
                     "train_seconds": statistics.fmean(seconds), "optimizer_state_bytes": state})
    with open(out / "finetune_glue.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| optimizer | final val accuracy | best-epoch val accuracy | train s / run | optimizer state bytes |",
             "|---|---|---|---|---|"]
    lines += [f"| {LABEL[r['optimizer']]} | {r['final_accuracy']:.4f} ± {r['final_std']:.4f} | "
              f"{r['best_accuracy']:.4f} ± {r['best_std']:.4f} | {r['train_seconds']:.0f} | "
              f"{r['optimizer_state_bytes']:,} |" for r in rows]
    first = summaries[next(iter(summaries))]
    lines.append(f"\n{args.epochs} epochs x {first['steps_per_epoch']} steps (batch 16), {first['train_examples']} "
                 f"training / {first['eval_examples']['validation']} validation sentences, seeds {args.seeds}, "
                 f"lr {args.lr:g}, rank 4, scale 4, tau {args.tau}; mean ± std over seeds.")
    (out / "finetune_glue.md").write_text("\n".join(lines) + "\n")
    plot(out, summaries, seeds)
    print("\n".join(lines))


def plot(out: Path, summaries: dict, seeds: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name in OPTIMIZERS:
        curves = []
        for seed in seeds:
            lines = (out / f"{name}_seed{seed}" / "metrics.jsonl").read_text().splitlines()
            rows = [json.loads(line) for line in lines]
            curves.append([(r["epoch"], r["accuracy"]) for r in rows if r["split"] == "validation"])
        epochs = [e for e, _ in curves[0]]
        mean = [statistics.fmean(c[i][1] for c in curves) for i in range(len(epochs))]
        ax.plot(epochs, mean, "o-", label=LABEL[name], markersize=3)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"validation accuracy (mean of {len(seeds)} seeds)")
    ax.set_title("synthetic SST-2, 2-layer BERT from scratch")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "finetune_glue.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
