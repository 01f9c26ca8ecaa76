"""experiments/finetune_glue.py in smoke mode: synthetic SST-2 data, the tiny BERT, three presets, the table."""

import importlib.util
import json
from pathlib import Path

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"


def test_smoke_runs_adamw_galore_and_golore(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    spec = importlib.util.spec_from_file_location("experiment_finetune_glue", EXPERIMENTS / "finetune_glue.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--smoke", "--out", str(tmp_path)])
    table = (tmp_path / "finetune_glue.md").read_text()
    names = [line.split(" | ")[0] for line in table.splitlines()[2:5]]
    assert names == ["| AdamW", "| GaLore (r4)", "| GoLore@20% (r4)"]
    for name in ("golore", "galore"):
        routing = (tmp_path / f"{name}_seed0" / "routing.txt").read_text()
        assert f" {name} " in routing and "classifier.weight" in routing
        config = (tmp_path / f"{name}_seed0" / "summary.json").read_text()
        assert json.loads(config)["steps"] == 8
    assert (tmp_path / "finetune_glue.png").is_file()
    rows = (tmp_path / "data" / "sst2" / "train.jsonl").read_text().splitlines()
    assert len(rows) == 64 and {json.loads(r)["label"] for r in rows} == {0, 1}


def test_synthetic_labels_follow_negation_contrast_and_majority():
    spec = importlib.util.spec_from_file_location("experiment_finetune_glue", EXPERIMENTS / "finetune_glue.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    import random

    rng = random.Random(0)
    for _ in range(200):
        text, label = module.clause(rng)
        positive = any(f" {w}" in f" {text}" and text.endswith(w) for w in module.POSITIVE)
        assert label == int(positive != (" not " in f" {text} "))
        text, label = module.sentence(rng)
        body = text.rstrip(" .")
        if " , " in body and " and " in body:  # a list: the majority of three adjectives
            words = body.replace(" and ", " , ").split(" , ")[-3:]
            assert label == int(sum(w.split()[-1] in module.POSITIVE for w in words) >= 2)
        else:
            last = body.split(" but ")[-1]
            assert label == int(any(last.endswith(w) for w in module.POSITIVE) != (" not " in f" {last} "))
