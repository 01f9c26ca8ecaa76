"""Experiment 5: the ASGO paper's WikiText-2 fine-tuning (its Table 4: GPT2-Large, CLM and FIM
perplexity), scaled down to what runs offline on 2 CPU cores.

    python experiments/finetune_wikitext.py [--data DIR] [--out runs/experiments/finetune]
                                            [--steps 100] [--seeds 0,1] [--pretrain-steps 400] [--smoke]

1. Pretraining data: Shakespeare (``<data>/shakespeare_char/input.txt``, else the package's embedded
   tiny-shakespeare), first 90% / last 10%, written as a WikiText-shaped directory
   ``<out>/pretrain_data/wikitext2/{test,valid}.txt``.
2. Pretraining: ``asgo-train`` with AdamW, the 'tiny' GPT, the offline UTF-8 byte tokenizer
   (``dataset.tokenizer=byte``: 256 bytes + end-of-text; GPT-2 BPE needs tiktoken's download,
   which this machine cannot make), objective ``fim`` at ``fim_rate=0``, i.e. plain next-token
   prediction on a vocabulary that already holds the three FIM sentinels (260 ids), so the one
   checkpoint initialises both fine-tunings.
3. Fine-tuning on ``<data>/wikitext2``: that copy has no train split, so ``test.txt`` is the
   training text (``dataset.train_split=test``) and ``valid.txt`` the evaluation text. Per
   optimizer, ``asgo-compare`` with ``train.init_from=<pretrained checkpoint>``:
   CLM = ``objective=fim fim_rate=0`` (exactly the CLM batches; see asgo.harness.data.fim) and
   FIM = ``fim_rate=0.5`` (PSM, loss on every token, validation batches FIM'd at the same rate).
   Each optimizer at its harness-config learning rate (the ASGO authors' code values; the paper's
   fine-tuning learning rates are not known here), same seeds.
4. ``<out>/finetune.md`` and ``finetune.csv``: validation perplexity exp(final val loss), mean and
   std over seeds, per optimizer and objective, with the pretrained model's perplexity before
   fine-tuning as the reference.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

OPTIMIZERS = ["adamw", "muon", "shampoo", "asgo", "dasgo", "adafactor", "galore", "golore"]
LRS = {"adamw": 0.001, "muon": 0.01, "shampoo": 0.005, "asgo": 0.01, "dasgo": 0.01, "adafactor": 0.01,
       "galore": 0.001, "golore": 0.001}
# Shampoo refreshes its roots every 10 steps (every step costs ~8x AdamW's step on this CPU);
# GaLore/GoLore at rank 32 (a quarter of the tiny model's width 128; rank 128 would be full rank),
# bases refreshed every 50 steps. GoLore is pure GoLore (random bases at every refresh): the
# config's GoLore@20% would switch to random bases after step 80 of 100 and, with refreshes at
# steps 0 and 50 only, never draw one, i.e. it would be GaLore exactly.
SETTINGS = ["++compare.settings.shampoo.precondition_frequency=10",
            *(f"++compare.settings.{n}.{k}={v}" for n in ("galore", "golore") for k, v in
              (("rank", 32), ("update_proj_gap", 50))),
            "++compare.settings.golore.golore_fraction=1.0"]
OBJECTIVES = {"clm": 0.0, "fim": 0.5}


def bin_path(name: str) -> str:
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else name


def run(cmd: list[str]) -> None:
    print("+ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def write_pretrain_data(data: Path, out: Path) -> Path:
    source = data / "shakespeare_char" / "input.txt"
    if source.is_file():
        text = source.read_text(encoding="utf-8")
    else:
        from asgo.harness.data.shakespeare import embedded_shakespeare

        text = embedded_shakespeare().decode("utf-8")
    cut = int(0.9 * len(text))
    target = out / "pretrain_data" / "wikitext2"
    target.mkdir(parents=True, exist_ok=True)
    for name, part in (("test.txt", text[:cut]), ("valid.txt", text[cut:])):
        if not (target / name).exists() or (target / name).read_text(encoding="utf-8") != part:
            (target / name).write_text(part, encoding="utf-8")
    return target.parent


def common(args) -> list[str]:
    return ["model=tiny", "dataset=wikitext2", "+dataset.tokenizer=byte", "dataset.objective=fim",
            "+dataset.spm_rate=0.0", "train.progress=false", "train.tensorboard=false",
            f"train.batch_size={args.batch_size}", f"train.eval_batches={args.eval_batches}"]


def evaluate_pretrained(ckpt: Path, data: Path, fim_rate: float, args) -> float:
    """Validation loss of the pretrained checkpoint on the fine-tuning data (0 training steps is
    not a valid asgo-train run, so this evaluates in-process with the harness's evaluate())."""
    import torch
    from omegaconf import OmegaConf

    from asgo.harness.checkpoint import load_checkpoint
    from asgo.harness.config import CONFIG_DIR
    from asgo.harness.data import load_data
    from asgo.harness.models import build_model
    from asgo.harness.train import evaluate

    ds = {"name": "wikitext2", "tokenizer": "byte", "objective": "fim", "fim_rate": fim_rate,
          "train_split": "test", "spm_rate": 0.0}
    lm = load_data(ds, str(data))
    model = build_model("tiny", vocab_size=lm.vocab_size)
    model.load_state_dict(load_checkpoint(str(ckpt))["model"])
    # the fine-tuning runs' validation windows: fixed, whatever the seed and batch size
    eval_batch_size = OmegaConf.load(CONFIG_DIR / "config.yaml").train.eval_batch_size
    cfg = OmegaConf.create({"train": {"eval_batches": args.eval_batches, "eval_batch_size": eval_batch_size,
                                      "eval_full": False}, "model": {"block_size": 128}})
    return evaluate(model, lm.val, cfg, torch.device("cpu"), lambda: torch.autocast("cpu", enabled=False))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("ASGO_DATA_DIR", "~/.cache/asgo/data")).expanduser(),
                        help="directory holding wikitext2/{test,valid}.txt (and optionally shakespeare_char/input.txt)")
    parser.add_argument("--out", type=Path, default=Path("runs/experiments/finetune"))
    parser.add_argument("--pretrain-steps", type=int, default=400)
    parser.add_argument("--steps", type=int, default=100, help="fine-tuning steps per run")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--eval-batches", type=int, default=10)
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    parser.add_argument("--smoke", action="store_true", help="2 optimizers, a few steps (tests)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.pretrain_steps, args.steps, args.seeds, args.eval_batches, args.batch_size = 4, 2, "0", 1, 4
        args.optimizers = "adamw,asgo"
    args.seed_list = [int(s) for s in args.seeds.split(",")]
    optimizers = args.optimizers.split(",")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    pretrain_data = write_pretrain_data(args.data, out)
    pretrain_dir = out / "pretrain"
    ckpt = pretrain_dir / "checkpoint.pt"
    if not (pretrain_dir / "summary.json").exists():
        run([bin_path("asgo-train"), *common(args), "dataset.fim_rate=0.0", "dataset.train_split=test",
             "optimizer=adamw", "optimizer.learning_rate=0.001", f"train.train_steps={args.pretrain_steps}",
             f"train.eval_interval={max(1, args.pretrain_steps // 4)}", "train.seed=0",
             f"train.dataset_path={pretrain_data}", f"train.out_dir={pretrain_dir}"])
    pretrain = json.loads((pretrain_dir / "summary.json").read_text())

    lrs = "{" + ",".join(f"{name}:[{LRS[name]}]" for name in optimizers) + "}"
    results = {}
    for objective, fim_rate in OBJECTIVES.items():
        target = out / objective
        run([bin_path("asgo-compare"), *common(args), f"dataset.fim_rate={fim_rate}", "dataset.train_split=test",
             f"train.dataset_path={args.data}", f"train.init_from={ckpt}", f"train.train_steps={args.steps}",
             f"train.eval_interval={max(1, args.steps // 4)}", f"train.log_interval={max(1, args.steps // 10)}",
             f"compare.optimizers=[{','.join(optimizers)}]", f"compare.lrs={lrs}",
             *SETTINGS, f"compare.seeds=[{args.seeds}]", f"compare.out_dir={target}"])
        with open(target / "runs.csv", newline="") as f:
            results[objective] = list(csv.DictReader(f))
        results[objective + "_before"] = evaluate_pretrained(ckpt, args.data, fim_rate, args)

    rows = []
    for name in optimizers:
        row = {"optimizer": name, "lr": LRS[name]}
        for objective in OBJECTIVES:
            ppl = [math.exp(float(r["final_val_loss"])) for r in results[objective] if r["optimizer"] == name]
            row[f"{objective}_ppl"] = statistics.fmean(ppl)
            row[f"{objective}_ppl_std"] = statistics.stdev(ppl) if len(ppl) > 1 else 0.0
            row[f"{objective}_seeds"] = len(ppl)
        rows.append(row)
    with open(out / "finetune.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"Pretrained (AdamW, {args.pretrain_steps} steps on Shakespeare bytes): final pretraining val loss "
             f"{pretrain['final_val_loss']:.3f}; WikiText-2 valid perplexity before fine-tuning: "
             f"CLM {math.exp(results['clm_before']):.2f}, FIM {math.exp(results['fim_before']):.2f}.", "",
             f"| optimizer | lr | CLM perplexity | FIM perplexity |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['optimizer']} | {r['lr']:g} | {r['clm_ppl']:.3f} ± {r['clm_ppl_std']:.3f} | "
                     f"{r['fim_ppl']:.3f} ± {r['fim_ppl_std']:.3f} |")
    lines.append(f"\n{args.steps} fine-tuning steps, batch {args.batch_size} x 128 bytes, seeds {args.seeds}; "
                 f"perplexity = exp(mean val loss over {args.eval_batches} fixed batches), per byte.")
    (out / "finetune.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
