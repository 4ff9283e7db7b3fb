import os
import subprocess
import sys

import pytest
import torch

from lib.utils.checkpoint import load_checkpoint


def _run(args, cwd, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def test_pretrain_tiny_then_resume(repo_root, tmp_path):
    out = str(tmp_path / "m.pth.tar")
    base = [sys.executable, "pretrain.py", "--dataset", "mnist5k", "--width_mult", "0.25",
            "--train_subset", "128", "--output", out, "--no-progress"]
    r = _run(base + ["--epochs", "1"], repo_root)
    assert r.returncode == 0, r.stderr
    ck = load_checkpoint(out)
    assert ck["epoch"] == 1 and ck["arch"] == "mobilenetv2"
    assert ck["model_kwargs"] == {"num_classes": 10, "input_size": 32, "width_mult": 0.25}
    assert ck["num_threads"] == 1 and ck["seed"] == 2019   # OMP_NUM_THREADS=1 is respected
    r = _run(base + ["--epochs", "2", "--resume"], repo_root)
    assert r.returncode == 0, r.stderr
    assert load_checkpoint(out)["epoch"] == 2
    log = open(str(tmp_path / "m_log" / "log.txt")).read().splitlines()
    assert [line.split("\t")[0] for line in log] == ["epoch", "1", "2"]


def test_same_command_same_weights_with_threads_pinned(repo_root, tmp_path):
    """OMP_NUM_THREADS unset: pretrain pins its thread count, and a rerun is bit-identical."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["OMP_WAIT_POLICY"] = "PASSIVE"   # the two threads sleep rather than spin on a busy machine
    cks = []
    for name in ("a", "b"):
        out = str(tmp_path / f"{name}.pth.tar")
        r = subprocess.run([sys.executable, "pretrain.py", "--width_mult", "0.25", "--train_subset",
                            "96", "--epochs", "1", "--output", out, "--no-progress"],
                           cwd=repo_root, capture_output=True, text=True, timeout=300, env=env)
        assert r.returncode == 0, r.stderr
        cks.append(load_checkpoint(out))
    from pretrain import DEFAULT_CPU_THREADS
    assert cks[0]["num_threads"] == DEFAULT_CPU_THREADS == 2
    for key in ("state_dict", "train_state_dict"):
        a, b = cks[0][key], cks[1][key]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_torchrun_two_process_gloo(repo_root, tmp_path):
    out = str(tmp_path / "ddp.pth.tar")
    r = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
              "--master_port", "29517", "pretrain.py", "--dataset", "mnist5k", "--width_mult", "0.25",
              "--train_subset", "128", "--epochs", "1", "--device", "cpu", "--output", out,
              "--no-progress"], repo_root, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "weights identical on 2 ranks" in r.stderr
    files = [f for f in os.listdir(tmp_path) if f.endswith(".pth.tar")]
    assert files == ["ddp.pth.tar"]
    ck = load_checkpoint(out)
    assert ck["epoch"] == 1 and not any(k.startswith("module.") for k in ck["state_dict"])
    assert torch.isfinite(ck["state_dict"]["classifier.weight"]).all()


def test_ema_update_warms_up_then_uses_the_decay():
    from pretrain import ema_update

    avg, cur, steps = torch.zeros(3), torch.ones(3), torch.tensor(5)
    ema_update(0.99)([avg, steps], [cur, torch.tensor(9)], torch.tensor(0))
    assert torch.allclose(avg, torch.full((3,), 0.9))  # d = min(0.99, 1/10) = 0.1
    assert int(steps) == 9                              # integer buffers follow the model
    avg = torch.zeros(3)
    ema_update(0.99)([avg], [cur], torch.tensor(10_000))
    assert torch.allclose(avg, torch.full((3,), 0.01))  # d = decay once warmed up


def test_pretrain_with_ema_saves_the_weights_it_scored(repo_root, tmp_path):
    from lib.utils.data_utils import get_dataset
    from lib.utils.train import evaluate
    from models import get_model

    out = str(tmp_path / "ema.pth.tar")
    r = _run([sys.executable, "pretrain.py", "--width_mult", "0.25", "--train_subset", "128",
              "--epochs", "1", "--ema_decay", "0.9", "--output", out, "--no-progress"], repo_root)
    assert r.returncode == 0, r.stderr
    ck = load_checkpoint(out)
    differs = [k for k, v in ck["state_dict"].items()
               if v.is_floating_point() and not torch.equal(v, ck["train_state_dict"][k])]
    assert differs, "the averaged weights should differ from the last training weights"
    model = get_model(ck["arch"], **ck["model_kwargs"])
    model.load_state_dict(ck["state_dict"])
    _, val_loader, _ = get_dataset("mnist5k", 64, 0, train_subset=128)
    acc = evaluate(model, val_loader, torch.nn.CrossEntropyLoss(), torch.device("cpu"),
                   progress=False)["top1"]
    assert abs(acc - ck["acc"]) < 1e-6
