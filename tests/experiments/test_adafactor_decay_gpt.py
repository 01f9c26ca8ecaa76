"""experiments/adafactor_decay_gpt.py in smoke mode: every (schedule, clipping, c) run is trained."""

import importlib.util
import math
from pathlib import Path

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
TEXT = "".join(f"{i} to be, or not to be: that is the question {i % 7}.\n" for i in range(400))


def test_smoke_trains_every_setting(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    spec = importlib.util.spec_from_file_location("experiment_adafactor_decay_gpt",
                                                  EXPERIMENTS / "adafactor_decay_gpt.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    (tmp_path / "data" / "shakespeare_char").mkdir(parents=True)
    (tmp_path / "data" / "shakespeare_char" / "input.txt").write_text(TEXT)
    module.main(["--smoke", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out"),
                 "--runs", str(tmp_path / "runs")])
    lines = (tmp_path / "out" / "adafactor_decay_gpt_smoke.md").read_text().splitlines()
    assert len(lines) == 2 + 4  # header, rule, 2 schedules x 2 clipping settings
    losses = [float(v) for line in lines[2:] for v in line.strip("| ").split(" | ")[2:]]
    assert len(losses) == 4 and all(0 < v < math.log(len(set(TEXT))) + 0.5 for v in losses)
    assert len(list((tmp_path / "runs").iterdir())) == 4
