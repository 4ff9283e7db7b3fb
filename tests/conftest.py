import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Two cores: keep intra-op threads small so parallel test processes do not thrash.
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def repo_root():
    return ROOT
