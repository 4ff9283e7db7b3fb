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
    r = _run(base + ["--epochs", "2", "--resume"], repo_root)
    assert r.returncode == 0, r.stderr
    assert load_checkpoint(out)["epoch"] == 2
    log = open(str(tmp_path / "m_log" / "log.txt")).read().splitlines()
    assert [line.split("\t")[0] for line in log] == ["epoch", "1", "2"]


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
