import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# One intra-op thread (torch and the BLAS/OpenMP pools scikit-learn uses): on 2 shared
# cores, tiny ops with 2 spinning threads run up to 100x slower whenever another process
# is busy.
torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    from threadpoolctl import threadpool_limits
    with threadpool_limits(limits=1):
        yield


@pytest.fixture
def repo_root():
    return ROOT
