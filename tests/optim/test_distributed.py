"""Owner-compute under torchrun with 2 and 4 gloo CPU processes equals one process bit for bit
(the checks are in ``distributed_worker.py``), and the single-process pieces of it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import asgo
from asgo.optim._distributed import lpt_owners, matrix_cost

HERE = Path(__file__).parent


def torchrun(nproc: int, script: str, *args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(HERE / script), *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out.stdout


@pytest.mark.parametrize("nproc", [2, 4])
def test_owner_compute_equals_one_process_under_torchrun(nproc):
    assert f"owner-compute equals one process at world size {nproc}" in torchrun(
        nproc, "distributed_worker.py")


@pytest.mark.parametrize("nproc", [2, 4])
def test_fsdp2_parameters_equal_one_process(nproc):
    assert f"fsdp2 step ok at world size {nproc}" in torchrun(nproc, "fsdp2_worker.py", "step")


def test_dcp_checkpoint_saved_at_2_resumes_at_1_2_and_4(tmp_path):
    torchrun(2, "fsdp2_worker.py", "save", str(tmp_path))
    for nproc in (1, 2, 4):
        assert f"fsdp2 load ok at world size {nproc}" in torchrun(nproc, "fsdp2_worker.py", "load",
                                                                 str(tmp_path))


def test_lpt_puts_the_largest_first_on_the_least_loaded_rank():
    # 9 -> r0, 7 -> r1, 5 -> r2, 3 -> r2 (5 < 7 < 9), 3 -> r1 (7 < 8 < 9), 1 -> r2 (8 < 9 < 10)
    owners, loads = lpt_owners([5, 9, 1, 7, 3, 3], 3)
    assert owners == [2, 0, 2, 1, 2, 1] and loads == [9, 10, 9]
    # a later call extends the loads instead of starting over (a tie goes to the lower rank)
    more, loads = lpt_owners([4], 3, loads)
    assert more == [0] and loads == [13, 10, 9]


def test_matrix_cost_is_root_plus_products_on_the_smaller_side():
    p = torch.zeros(8, 32)
    opt = asgo.ASGO([p])
    (layout,) = opt.layouts(p, opt.param_groups[0])
    assert matrix_cost([layout]) == 8**3 + 8 * 32 * 8


def test_process_group_needs_torch_distributed():
    with pytest.raises(ValueError, match="not initialised"):
        asgo.ASGO([torch.nn.Parameter(torch.zeros(4, 4))], process_group=object())
