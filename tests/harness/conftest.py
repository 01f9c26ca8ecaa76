"""The harness tests train tiny models: one intra-op thread is as fast on an idle machine and
avoids the many-fold slowdown of spinning OpenMP threads when other processes share the cores."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
