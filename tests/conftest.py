import logging
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


@pytest.fixture(autouse=True)
def root_log_handlers():
    """Put the root logger's handlers back after each test: a CLI run in-process points them
    at the test's captured stderr (setup_logging), which pytest closes when the test ends."""
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    yield
    root.handlers[:] = saved
    root.setLevel(level)


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    from threadpoolctl import threadpool_limits
    with threadpool_limits(limits=1):
        yield


@pytest.fixture
def repo_root():
    return ROOT


@pytest.fixture(scope="session")
def tiny_pretrained(tmp_path_factory):
    """A random-init width-0.25 MobileNet-V2 saved as 'pretrained' weights (mnist5k shapes)."""
    from lib.utils.checkpoint import save_checkpoint
    from models import get_model
    torch.manual_seed(0)
    model = get_model("mobilenetv2", num_classes=10, input_size=32, width_mult=0.25)
    path = str(tmp_path_factory.mktemp("pretrained") / "tiny.pth.tar")
    save_checkpoint({"state_dict": model.state_dict()}, path)
    return path, model


@pytest.fixture
def kill_before_state_save(monkeypatch):
    """``kill(n)``: the search dies (KeyboardInterrupt) when it is about to save the state that
    starts episode ``n``, i.e. after episode n-1's log line: the worst moment for a resume.
    ``kill(None)`` puts the real save back."""
    import rl_quantize
    real_save = rl_quantize.Search._save_state

    def kill(next_episode):
        def dying_save(self, episode):
            if episode == next_episode:
                raise KeyboardInterrupt
            real_save(self, episode)
        monkeypatch.setattr(rl_quantize.Search, "_save_state",
                            real_save if next_episode is None else dying_save)
    return kill


@pytest.fixture(scope="session")
def kmeans_finetune_checkpoint(tmp_path_factory, tiny_pretrained):
    """``make(bits_of_layer)``: the checkpoint.pth.tar of a real 1-epoch finetune.py K-Means run
    of the tiny model, layer i at ``bits_of_layer(i)`` bits (codebooks and optimizer inside)."""
    import json

    import finetune
    weights, model = tiny_pretrained
    n = sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in model.modules())

    def make(bits_of_layer):
        root = tmp_path_factory.mktemp("kmeans_ft")
        strategy = root / "km.json"
        strategy.write_text(json.dumps({"mode": "kmeans",
                                        "strategy": [bits_of_layer(i) for i in range(n)]}))
        finetune.main(["--strategy", str(strategy), "--pretrained_path", weights, "-c",
                       str(root / "ft"), "--epochs", "1", "--no-eval_fp32", "--width_mult",
                       "0.25", "--train_subset", "32", "--train_batch", "16", "--test_batch",
                       "32", "--device", "cpu", "--no-progress"])
        return str(root / "ft" / "checkpoint.pth.tar")
    return make
