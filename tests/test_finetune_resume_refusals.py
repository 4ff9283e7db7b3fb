"""finetune.py --resume of an edited or foreign-shaped checkpoint is a one-line error (issue 16 item 9).

Each field the resume reads (mode, arch, model_kwargs, epoch, optimizer, codebooks) is
broken in turn; training (and, where the field matters, -e) must stop with ``error: ...``
naming it, before anything in the checkpoint's folder changes.
"""
import os

import pytest

import finetune
from lib.utils.checkpoint import load_checkpoint, save_checkpoint
from lib.utils.errors import run_cli

TINY = ["--width_mult", "0.25", "--train_subset", "32", "--train_batch", "16",
        "--test_batch", "32", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def trained(kmeans_finetune_checkpoint):
    """A real one-epoch K-Means checkpoint (with codebooks and optimizer state)."""
    return load_checkpoint(kmeans_finetune_checkpoint(lambda i: 3))


def _break(ckpt, field):
    ckpt = dict(ckpt)
    if field == "optimizer_missing":
        del ckpt["optimizer"]
    elif field == "optimizer":
        ckpt["optimizer"] = {"state": {}, "param_groups": [{"params": [0]}]}
    elif field == "mode_missing":
        del ckpt["mode"]
    elif field == "codebooks":
        ckpt["codebooks"] = {name: 5 for name in ckpt["codebooks"]}
    elif field == "codebook_layer":
        ckpt["codebooks"] = {"no.such.layer": next(iter(ckpt["codebooks"].values()))}
    else:
        ckpt[field] = {"mode": "x", "epoch": "one", "arch": 7,
                       "model_kwargs": {"num_classes": "ten"}}[field]
    return ckpt


CASES = [("optimizer_missing", "holds no optimizer state", False),
         ("optimizer", "optimizer state does not fit", False),
         ("mode_missing", "'mode' is None", True), ("mode", "'mode' is 'x'", True),
         ("epoch", "'epoch' is 'one'", True), ("arch", "'arch' is 7", True),
         ("model_kwargs", "'model_kwargs' is", True),
         ("codebooks", "'codebooks' is", True),
         ("codebook_layer", "codebooks of layers this model lacks ('no.such.layer')", True)]


@pytest.mark.parametrize("field,expected,also_evaluate", CASES)
def test_resume_of_a_broken_checkpoint_is_a_one_line_error(trained, tmp_path, capsys, field,
                                                           expected, also_evaluate):
    folder = tmp_path / "run"
    folder.mkdir()
    path = str(folder / "checkpoint.pth.tar")
    save_checkpoint(_break(trained, field), path)
    before = sorted(os.listdir(folder)), open(path, "rb").read()
    modes = [["--epochs", "3"]] + ([["-e"]] if also_evaluate else [])
    for extra in modes:
        with pytest.raises(SystemExit) as exc:
            run_cli(finetune.main, ["--resume", path] + TINY + extra)
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2 and "Traceback" not in "\n".join(err), extra
        assert err[-1].startswith("error: --resume") and expected in err[-1], (extra, err[-1])
        assert (sorted(os.listdir(folder)), open(path, "rb").read()) == before


def test_evaluation_needs_no_optimizer_state(trained, tmp_path):
    """-e of a checkpoint stripped of its optimizer still scores the recorded model."""
    path = str(tmp_path / "checkpoint.pth.tar")
    save_checkpoint(_break(trained, "optimizer_missing"), path)
    result = finetune.main(["--resume", path, "-e"] + TINY)
    assert 0.0 <= result["top1"] <= 100.0 and result["top1"] == pytest.approx(trained["acc"])
