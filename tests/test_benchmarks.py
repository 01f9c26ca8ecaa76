"""Smoke tests of the benchmark scripts: tiny shapes, one repeat, every optimizer row present."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

import asgo

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_step_time_smoke(tmp_path, capsys, one_thread):
    bench = load("step_time")
    out = tmp_path / "step.json"
    results = bench.main(["--smoke", "--device", "cpu", "--json", str(out)])
    names = [r["optimizer"] for r in results]
    assert names == [v[0] for v in bench.VARIANTS] + bench.AUTHORS_ROWS  # every optimizer, AdamW first
    for stem in ("adamw", "asgo tau=1", "asgo tau=5", "asgo tau=10", "dasgo", "muon", "muon fp32 NS",
                 "shampoo tau=1", "shampoo tau=10", "adafactor", "galore", "golore", "authors' loop tau=1",
                 "asgo tau=1 official unsplit"):
        assert any(n.startswith(stem) for n in names), stem
    base = results[0]
    assert base["median_x_adamw"] == 1.0 and base["state_x_adamw"] == 1.0
    for r in results:
        assert r["median_s"] > 0 and math.isfinite(r["median_x_adamw"])
        assert r["state_bytes"] > 0
    by = {r["optimizer"]: r for r in results}
    # state sizes follow the algorithms: Adafactor factored << DASGO (M + vector) < AdamW (M + V) < Shampoo
    assert by["adafactor"]["state_bytes"] < by["dasgo"]["state_bytes"] < base["state_bytes"]
    assert by["shampoo tau=1"]["state_bytes"] > base["state_bytes"]
    table = capsys.readouterr().out
    assert "| adamw | " in table and "x AdamW" in table
    saved = json.loads(out.read_text())
    assert saved["results"][0]["optimizer"] == "adamw"
    # every ratio of ASGO's rows to AdamW, both Muons and the authors' loop, from this run's medians
    assert [(r["row"], r["over"]) for r in saved["ratios"]] == bench.RATIOS
    for r in saved["ratios"]:
        assert r["median_s"] == by[r["row"]]["median_s"] / by[r["over"]]["median_s"]
    assert "| asgo tau=1 / muon fp32 NS |" in table


@pytest.mark.parametrize("shape", [(8, 32), (32, 8), (16, 16)])
def test_authors_loop_is_the_official_maths(shape):
    """The benchmark's per-parameter loop follows asgo.ASGO(compat='official') (tested against a
    transcription of the authors' step) over 6 steps of full-rank gradients at scale 1e-3."""
    bench = load("step_time")
    settings = bench.config_settings("asgo", {"precondition_frequency": 1})
    torch.manual_seed(0)
    W0 = torch.randn(shape) * 0.5
    grads = [torch.randn(shape) * 1e-3 for _ in range(6)]
    loop_p, lib_p = torch.nn.Parameter(W0.clone()), torch.nn.Parameter(W0.clone())
    loop = bench.make_optimizer("authors' loop tau=1", [loop_p], [1])
    lib = asgo.ASGO([lib_p], **{**settings, "compat": "official"})
    for g in grads:
        loop_p.grad, lib_p.grad = g.clone(), g.clone()
        loop.step()
        lib.step()
        moved = (lib_p - W0).norm()
        assert (loop_p - lib_p).norm() / moved < 1e-5


def test_step_time_shapes_follow_the_model():
    bench = load("step_time")
    shapes = bench.hidden_matrices("nanogpt")
    assert len(shapes) == 6 * 6  # q, k, v, o, fc, proj per layer
    assert {s for s, _ in shapes} == {(384, 384), (1536, 384), (384, 1536)}
    assert {h for _, h in shapes} == {1, 6}  # q/k head-wise for ASGO, as build_optimizer routes them


def test_step_time_state_only_matches_a_real_step():
    bench = load("step_time")
    matrices = [((32, 48), 1), ((48, 32), 1)]
    for row in ("shampoo tau=1", "asgo tau=10", "galore r128 gap200"):
        timed = bench.time_steps(row, matrices, torch.device("cpu"), warmup=1, repeats=1)
        assert bench.meta_state_bytes(row, matrices)["state_bytes"] == timed["state_bytes"], row


def test_row_selection_exact_name_before_substring():
    bench = load("step_time")
    rows = [v[0] for v in bench.VARIANTS]
    assert [r for r in rows if bench.matches(r, "shampoo tau=1", rows)] == ["shampoo tau=1"]
    assert [r for r in rows if bench.matches(r, "shampoo", rows)] == ["shampoo tau=1", "shampoo tau=10"]


def test_train_step_smoke(tmp_path, capsys, one_thread):
    bench = load("train_step")
    results = bench.main(["--smoke", "--device", "cpu", "--only", "adamw,asgo tau=10,dasgo",
                          "--json", str(tmp_path / "t.json")])
    assert [r["optimizer"] for r in results] == ["adamw", "asgo tau=10", "dasgo"]
    assert results[0]["median_x_adamw"] == 1.0
    for r in results:
        assert 0 < r["opt_median_s"] <= r["median_s"] and r["tokens_per_s"] > 0
    assert "tokens/s" in capsys.readouterr().out


def test_distributed_smoke(tmp_path, capsys):
    bench = load("distributed")  # launches itself under torchrun: N = 1 and 2 gloo CPU processes
    out = tmp_path / "d.json"
    rows = bench.main(["--smoke", "--only", "asgo tau=1", "--json", str(out)])
    assert [(r["optimizer"], r["world_size"]) for r in rows] == [("asgo tau=1", 1), ("asgo tau=1", 2)]
    one, two = rows
    assert one["compute_cpu_x_n1"] == 1.0 and one["load_max_over_mean"] == 1.0 and one["targets"] == {}
    assert sorted(two["targets"]) == ["comm", "load"]  # the compute target is for N = 4
    assert two["owned_per_rank"] in ([2, 3], [3, 2]) and sum(two["loads"]) == sum(one["loads"])
    assert two["lpt_predicted_ratio"] == max(two["loads"]) / sum(two["loads"])
    # the collective's buffers: every direction and a flag per parameter, float32
    numel = sum(math.prod(s) for s, _ in bench.SMOKE_MATRICES)
    assert one["param_bytes"] == 4 * numel
    assert one["sent_bytes"] == one["received_bytes"] == 4 * (numel + len(bench.SMOKE_MATRICES))
    assert two["received_bytes"] == 2 * two["sent_bytes"] >= one["sent_bytes"]
    for r in rows:
        assert r["compute_cpu_s"] > 0 and r["step_s"] >= r["gather_s"] > 0
        assert math.isclose(r["comm_over_params"], (r["sent_bytes"] + r["received_bytes"]) / r["param_bytes"])
    assert "| asgo tau=1 | 2 |" in capsys.readouterr().out
    assert [r["world_size"] for r in json.loads(out.read_text())["results"]] == [1, 2]
