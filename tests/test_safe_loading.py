"""Loading a file never runs code, and weights that do not fit the model are refused.

Every CLI entry point that reads a checkpoint (finetune --resume, finetune -e --resume,
--pretrained_path of finetune and rl_quantize, rl_quantize --resume and --resume_search,
pretrain --resume) is fed a pickle whose unpickling would create a file: each must end with
one ``error:`` line, and the file must never appear.
"""
import math
import os
import re

import pytest
import torch

import finetune
import pretrain
import rl_quantize
from lib.utils.checkpoint import load_checkpoint, save_checkpoint
from lib.utils.errors import UserError, run_cli
from lib.utils.layers import quantizable_layers
from models import get_model

TINY_FT = ["--width_mult", "0.25", "--train_subset", "32", "--train_batch", "16",
           "--test_batch", "32", "--device", "cpu", "--no-progress", "--epochs", "1"]


class _CreatesFile:
    """Unpickling this would create ``path`` (what a hostile checkpoint could do)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def write_hostile_checkpoint(path, marker):
    """A torch.save file whose loading with weights_only=False creates ``marker``."""
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _CreatesFile(str(marker))},
               str(path))


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_pretrained):
    root = tmp_path_factory.mktemp("safe")
    weights, model = tiny_pretrained
    names = [n for n, _ in quantizable_layers(model)]
    strategy = root / "kmeans.json"
    strategy.write_text('{"mode": "kmeans", "layers": %s, "strategy": %s}'
                        % (str(names).replace("'", '"'), [4] * len(names)))
    return {"root": root, "weights": weights, "strategy": str(strategy)}


def _error(capsys, main, argv, log=None):
    """Run a CLI main through run_cli; return its one ``error:`` line (stderr lines to ``log``)."""
    with pytest.raises(SystemExit) as exc:
        run_cli(main, argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [ln for ln in err if ln.startswith("error: ")]
    assert len(errors) == 1 and err[-1] == errors[0], err
    assert "Traceback" not in "\n".join(err)
    if log is not None:
        log.extend(err)
    return errors[0]


def _rl_argv(files, out):
    return ["--arch", "mobilenetv2", "--dataset", "mnist5k", "--width_mult", "0.25",
            "--pretrained_path", files["weights"], "--train_size", "32", "--val_size", "32",
            "--data_bsize", "32", "--n_worker", "0", "--warmup", "1", "--train_episode", "1",
            "--max_bit", "4", "--preserve_ratio", "0.2", "--output", str(out), "--seed", "1"]


ENTRY_POINTS = ["finetune --resume", "finetune -e --resume", "finetune --pretrained_path",
                "rl_quantize --pretrained_path", "rl_quantize --resume",
                "rl_quantize --resume_search", "pretrain --resume"]


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_hostile_pickle_is_refused_at_every_entry_point(files, tmp_path, capsys, entry):
    marker = tmp_path / "created_by_the_checkpoint"
    evil = tmp_path / "evil.pth.tar"
    write_hostile_checkpoint(evil, marker)
    out = tmp_path / "out"
    ft = ["--pretrained_path", files["weights"], "-c", str(out)] + TINY_FT
    cases = {
        "finetune --resume": (finetune.main, ft + ["--resume", str(evil)]),
        "finetune -e --resume": (finetune.main, ft + ["-e", "--resume", str(evil),
                                                      "--strategy", files["strategy"]]),
        "finetune --pretrained_path": (finetune.main, ft + ["--strategy", files["strategy"],
                                                            "--pretrained_path", str(evil)]),
        "rl_quantize --pretrained_path": (rl_quantize.main, _rl_argv(files, out)
                                          + ["--pretrained_path", str(evil)]),
        "rl_quantize --resume": (rl_quantize.main, _rl_argv(files, out) + ["--resume", str(evil)]),
        "pretrain --resume": (pretrain.main, [
            "--dataset", "mnist5k", "--width_mult", "0.25", "--train_subset", "32", "--epochs",
            "1", "--device", "cpu", "--no-progress", "--output", str(evil), "--resume"]),
    }
    if entry == "rl_quantize --resume_search":
        folder = out / "mobilenetv2_mnist5k-run1"
        write_hostile_checkpoint(folder / rl_quantize.STATE_FILE, marker)
        cases[entry] = (rl_quantize.main, _rl_argv(files, out) + ["--resume_search", str(folder)])
    main, argv = cases[entry]
    line = _error(capsys, main, argv)
    assert "refused (loading it could run code)" in line, line
    assert not marker.exists()
    written = [f for _, _, fs in os.walk(tmp_path) for f in fs]
    assert sorted(written) == sorted(["evil.pth.tar"] + (
        [rl_quantize.STATE_FILE] if entry == "rl_quantize --resume_search" else [])), written


def test_hostile_pickle_is_refused_by_load_checkpoint(tmp_path):
    path, marker = tmp_path / "evil.pth.tar", tmp_path / "pwned"
    write_hostile_checkpoint(path, marker)
    with pytest.raises(UserError, match="refused") as exc:
        load_checkpoint(str(path))
    assert "\n" not in str(exc.value)
    assert not marker.exists()


def test_plain_pickle_of_any_protocol_is_refused_in_one_line(tmp_path, recwarn):
    """A bare pickle.dump (protocol 4, not torch.save): one UserError, no torch warning first."""
    import pickle
    marker = tmp_path / "pwned"
    for protocol in (2, 4, pickle.HIGHEST_PROTOCOL):
        path = tmp_path / f"p{protocol}.pth.tar"
        with open(path, "wb") as f:
            pickle.dump({"state_dict": _CreatesFile(str(marker))}, f, protocol=protocol)
        with pytest.raises(UserError, match="refused") as exc:
            load_checkpoint(str(path))
        assert "\n" not in str(exc.value)
    assert not marker.exists()
    assert not [w for w in recwarn if "pickle protocol" in str(w.message)]


def _misfit(kind, tmp_path, weights):
    """A --pretrained_path file that does not fit the width-0.25 MobileNet-V2 of mnist5k."""
    path = str(tmp_path / f"{kind}.pth.tar")
    if kind == "other_arch":
        sd = get_model("resnet18", num_classes=10, input_size=32).state_dict()
    elif kind == "unrelated":
        sd = {"epoch": torch.tensor(3), "lr": torch.tensor(0.1), "weights": [torch.zeros(3)]}
    elif kind == "empty":
        sd = {}
    else:
        sd = {k: v.clone() for k, v in load_checkpoint(weights)["state_dict"].items()}
        sd["features.1.conv.0.weight"][0, 0, 0, 0] = math.nan
    save_checkpoint({"state_dict": sd}, path)
    return path


@pytest.mark.parametrize("kind, expected", [
    ("other_arch", r"weights are missing \('features\.0\.0\.weight'"),
    ("unrelated", r"(262) of its \1 weights are missing"),
    ("empty", r"(262) of its \1 weights are missing"),
    ("nan", r"NaN/inf values in 'features\.1\.conv\.0\.weight'")])
def test_pretrained_weights_that_do_not_fit_are_refused(files, tmp_path, capsys, kind, expected):
    """Nothing is scored (no fp32 accuracy) and nothing is written."""
    out = tmp_path / "out"
    path, log = _misfit(kind, tmp_path, files["weights"]), []
    line = _error(capsys, finetune.main, ["--strategy", files["strategy"], "--pretrained_path",
                                          path, "-c", str(out)] + TINY_FT, log)
    assert re.search(expected, line), line
    assert path in line
    assert not any("accuracy" in ln for ln in log), log
    assert not out.exists()


def test_search_refuses_weights_of_another_arch(files, tmp_path, capsys):
    out = tmp_path / "out"
    path = _misfit("other_arch", tmp_path, files["weights"])
    line = _error(capsys, rl_quantize.main, _rl_argv(files, out) + ["--pretrained_path", path])
    assert "weights are missing" in line
    assert not out.exists()
