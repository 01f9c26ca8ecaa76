import pytest
import torch
from problems import least_squares, rel_err, run_optimizer

import asgo
from asgo.optim.reference import dasgo_step
from asgo.optim.reference import run as run_reference


@pytest.mark.parametrize("shape", [(8, 32), (32, 8), (16, 16)])
@pytest.mark.parametrize("update_rms", [0.2, None])
@pytest.mark.parametrize("dtype,tol_step", [(torch.float64, 1e-12), (torch.float32, 3e-4)])
def test_matches_float64_reference(shape, update_rms, dtype, tol_step):
    W0, grad, _ = least_squares(shape, seed=1)
    hp = dict(lr=0.02 if update_rms else 2e-3, momentum=0.9, beta2=0.95, eps=1e-8,
              weight_decay=0.1, update_rms=update_rms)
    ref = run_reference(dasgo_step, W0, grad, 10, **hp)
    got, _ = run_optimizer(lambda p: asgo.DASGO(p, **hp), W0, grad, 10, dtype)
    W0 = W0.to(dtype).double()
    for t in range(10):
        assert rel_err(got[t], ref[t]) < 1e-6
        assert rel_err(got[t] - W0, ref[t] - W0) < tol_step


def test_defaults_are_the_authors_values():
    d = asgo.DASGO([torch.nn.Parameter(torch.zeros(2, 3))]).defaults
    assert d == dict(lr=1e-2, momentum=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, update_rms=0.2,
                     transposed=False)


def test_state_is_momentum_plus_one_vector():
    W = torch.nn.Parameter(torch.randn(5, 7))
    opt = asgo.DASGO([W])
    W.grad = torch.randn(5, 7)
    opt.step()
    state = opt.state[W]
    assert state["momentum"].shape == (5, 7) and state["column_second_moment"].shape == (7,)
