"""experiments/finetune_wikitext.py in smoke mode: pretraining, CLM and FIM fine-tuning, the table."""

import importlib.util
import math
from pathlib import Path

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
TEXT = "".join(f" = Heading {i} = \n The {i % 9} quick brown foxes jump over the lazy dog . \n" for i in range(300))


def test_smoke_pretrains_and_fine_tunes_both_objectives(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    spec = importlib.util.spec_from_file_location("experiment_finetune_wikitext", EXPERIMENTS / "finetune_wikitext.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    data = tmp_path / "data"
    (data / "shakespeare_char").mkdir(parents=True)
    (data / "shakespeare_char" / "input.txt").write_text(TEXT)
    (data / "wikitext2").mkdir()
    for split in ("test", "valid"):
        (data / "wikitext2" / f"{split}.txt").write_text(TEXT)
    module.main(["--smoke", "--data", str(data), "--out", str(tmp_path / "out")])
    table = (tmp_path / "out" / "finetune.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| adamw") or line.startswith("| asgo")]
    assert len(rows) == 2, table
    perplexities = [float(cell.split("±")[0]) for row in rows for cell in row.strip("| ").split(" | ")[2:4]]
    assert len(perplexities) == 4 and all(1 < p < 300 for p in perplexities), table
    assert not any(math.isnan(p) for p in perplexities)
