import os
import subprocess
import sys

import pytest
import torch

import pretrain
from lib.utils.checkpoint import load_checkpoint, save_checkpoint
from lib.utils.errors import run_cli


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


def test_same_command_same_weights_at_the_threads_asked_for(repo_root, tmp_path):
    """OMP_NUM_THREADS unset, --threads 2: that count is used and recorded, and a rerun is
    bit-identical."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["OMP_WAIT_POLICY"] = "PASSIVE"   # the two threads sleep rather than spin on a busy machine
    cks = []
    for name in ("a", "b"):
        out = str(tmp_path / f"{name}.pth.tar")
        r = subprocess.run([sys.executable, "pretrain.py", "--width_mult", "0.25", "--train_subset",
                            "96", "--epochs", "1", "--output", out, "--no-progress",
                            "--threads", "2"],
                           cwd=repo_root, capture_output=True, text=True, timeout=300, env=env)
        assert r.returncode == 0, r.stderr
        assert "2 CPU thread(s) (--threads)" in r.stderr
        cks.append(load_checkpoint(out))
    assert cks[0]["num_threads"] == cks[1]["num_threads"] == 2
    for key in ("state_dict", "train_state_dict"):
        a, b = cks[0][key], cks[1][key]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_threads_are_set_only_when_asked_for():
    """No flag: the process keeps its thread count (nothing pinned behind the user's back)."""
    from lib.utils.cli import apply_threads
    parser = pretrain.get_args_parser()
    before = torch.get_num_threads()
    try:
        assert apply_threads(parser.parse_args([])) == before == torch.get_num_threads()
        asked = before + 1
        assert apply_threads(parser.parse_args(["--threads", str(asked)])) == asked
        assert torch.get_num_threads() == asked
    finally:
        torch.set_num_threads(before)


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


def _edited(ckpt, case):
    """A copy of a pretrain.py checkpoint broken as ``case`` says."""
    ckpt = dict(ckpt)
    if case == "weights_only":
        return {"state_dict": ckpt["state_dict"]}
    if case == "not_a_dict":
        return [ckpt["epoch"]]
    if case == "epoch_text":
        ckpt["epoch"] = "one"
    elif case == "epoch_negative":
        ckpt["epoch"] = -3
    elif case == "optimizer_of_another_model":
        ckpt["optimizer"] = {"state": {}, "param_groups": [{"params": [0, 1]}]}
    elif case == "average_of_another_model":
        ckpt["ema"] = {"x": torch.zeros(1)}
    return ckpt


@pytest.mark.parametrize("case,expected", [
    ("weights_only", "holds no optimizer state"), ("not_a_dict", "holds no optimizer state"),
    ("epoch_text", "records epoch 'one'"), ("epoch_negative", "records epoch -3"),
    ("optimizer_of_another_model", "parameter group"),
    ("average_of_another_model", "averaged-weights state")])
def test_resume_of_a_file_that_does_not_fit_is_a_one_line_error(tmp_path, capsys, case,
                                                                 expected):
    """Refused before any training: the file and the log are left as they were."""
    out = str(tmp_path / "m.pth.tar")
    base = ["--dataset", "mnist5k", "--width_mult", "0.25", "--train_subset", "32",
            "--output", out, "--no-progress", "--device", "cpu"]
    pretrain.main(base + ["--epochs", "1"])
    save_checkpoint(_edited(load_checkpoint(out), case), out)
    before = open(out, "rb").read(), os.listdir(tmp_path / "m_log")
    log_before = open(str(tmp_path / "m_log" / "log.txt")).read()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run_cli(pretrain.main, base + ["--epochs", "3", "--resume"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and "Traceback" not in "\n".join(err)
    assert err[-1].startswith("error: --resume") and expected in err[-1], err[-1]
    assert (open(out, "rb").read(), os.listdir(tmp_path / "m_log")) == before
    assert open(str(tmp_path / "m_log" / "log.txt")).read() == log_before


# pretrain.py that dies (as if killed) right after saving its first epoch's checkpoint
DIE_AFTER_EPOCH_1 = """import os, sys
import pretrain
def save_then_die(state, path, save=pretrain.save_checkpoint):
    save(state, path)
    if state["epoch"] == 1:
        os._exit(9)
pretrain.save_checkpoint = save_then_die
pretrain.main(sys.argv[1:])
"""


def test_resume_equals_an_uninterrupted_run_bit_for_bit(repo_root, tmp_path):
    """--epochs 2 straight vs the same command killed after epoch 1 and resumed: the resumed
    epoch draws the same data order and augmentation (the generators' states are in the
    checkpoint), so the weights, the averaged weights and the optimizer state are identical."""
    def run(name, entry, resume=False):
        out = str(tmp_path / f"{name}.pth.tar")
        r = _run([sys.executable] + entry + [
            "--width_mult", "0.25", "--train_subset", "64", "--batch_size", "16", "--epochs",
            "2", "--output", out, "--no-progress"] + (["--resume"] if resume else []), repo_root)
        return r, out
    r, straight = run("straight", ["pretrain.py"])
    assert r.returncode == 0, r.stderr
    r, out = run("resumed", ["-c", DIE_AFTER_EPOCH_1])
    assert r.returncode == 9 and load_checkpoint(out)["epoch"] == 1, r.stderr
    r, _ = run("resumed", ["pretrain.py"], resume=True)
    assert r.returncode == 0 and "another data order" not in r.stderr, r.stderr
    straight, resumed = load_checkpoint(straight), load_checkpoint(out)
    assert straight["epoch"] == resumed["epoch"] == 2
    for key in ("state_dict", "train_state_dict", "ema"):
        a, b = straight[key], resumed[key]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), key
    a, b = straight["optimizer"]["state"], resumed["optimizer"]["state"]
    assert all(torch.equal(a[k]["momentum_buffer"], b[k]["momentum_buffer"]) for k in a)
