"""run/reproduce_paper.sh (issue 29): both settings end to end on a fake ImageNet tree (real
WordNet-id folders, small JPEGs), with random-init model files and tiny counts; and its
one-line refusals when ImageNet, the weights or the latency table are missing."""
import hashlib
import json
import os
import re
import subprocess

import numpy as np
import pytest
import torch

from helpers import fake_imagenet
from lib.utils.checkpoint import save_checkpoint
from lib.utils.run_utils import model_kwargs_for
from models import get_model
from tests.conftest import ROOT

SCRIPT = os.path.join(ROOT, "run", "reproduce_paper.sh")
# three ImageNet-100 classes and one that is not (it must stay out of the ImageNet-100 subset)
WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361"]
TINY = {"HAQ_EPISODES": "2", "HAQ_WARMUP": "1", "HAQ_TRAIN_SIZE": "8", "HAQ_VAL_SIZE": "8",
        "HAQ_DATA_BSIZE": "8", "HAQ_FT_EPOCHS": "1", "HAQ_FT_BATCH": "8", "HAQ_WORKERS": "0",
        "HAQ_DEVICE": "cpu", "OMP_NUM_THREADS": "1"}


def model_file(path, arch, dataset, **kwargs):
    """A random-init model saved as pretrain.py would (with its arch, dataset and kwargs)."""
    kwargs = model_kwargs_for(arch, dataset, **kwargs)
    torch.manual_seed(0)
    model = get_model(arch, **kwargs)
    save_checkpoint({"state_dict": model.state_dict(), "arch": arch, "dataset": dataset,
                     "model_kwargs": kwargs}, str(path))
    return str(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Data, class list, weights and latency table of a tiny stand-in for the paper's setup."""
    tmp = tmp_path_factory.mktemp("paper")
    classes = tmp / "imagenet100.txt"
    classes.write_text("\n".join(open(os.path.join(ROOT, "lib/utils/imagenet100.txt"))
                                 .read().split()[:3]) + "\n")
    small = dict(input_size=32, width_mult=0.25)
    table = np.einsum("w,a->wa", np.arange(1, 9), np.arange(1, 9)).astype(np.float64)
    np.save(tmp / "table.npy", np.repeat(table[None], 53, axis=0) * 1e-3)
    return {"tmp": tmp,
            "HAQ_IMAGENET": fake_imagenet(tmp / "imagenet", WNIDS, per_class=6, size=40),
            "HAQ_IMAGENET100": str(tmp / "imagenet100"), "HAQ_IMAGENET100_CLASSES": str(classes),
            "resnet50": model_file(tmp / "resnet50.pth.tar", "resnet50", "imagenet",
                                   input_size=32),
            "mobilenetv2": model_file(tmp / "mbv2.pth.tar", "mobilenetv2", "imagenet", **small),
            "HAQ_SEARCH_WEIGHTS": model_file(tmp / "mbv2_in100.pth.tar", "mobilenetv2",
                                             "imagenet100", **small),
            "HAQ_COST_TABLE": str(tmp / "table.npy")}


def run_script(setting, env, cwd=ROOT):
    full = dict(os.environ, **env)
    return subprocess.run(["bash", SCRIPT, setting], env=full, cwd=cwd, capture_output=True,
                          text=True, timeout=1800)


def _env(world, arch, out):
    keys = ("HAQ_IMAGENET", "HAQ_IMAGENET100", "HAQ_IMAGENET100_CLASSES", "HAQ_SEARCH_WEIGHTS",
            "HAQ_COST_TABLE")
    return dict(TINY, **{k: world[k] for k in keys}, HAQ_WEIGHTS=world[arch], OUT=str(out))


def _cell(table, row):
    """(published, measured) of a row of the printed table."""
    m = re.search(r"^\| " + re.escape(row) + r" \| ([^|]+) \| ([^|]+) \|$", table, re.M)
    assert m, (row, table)
    return m[1].strip(), m[2].strip()


@pytest.mark.slow
@pytest.mark.parametrize("setting,arch,published", [
    ("resnet50-kmeans-0.1", "resnet50", ("76.15", "75.48", "92.42")),
    ("mobilenetv2-linear-0.6", "mobilenetv2", ("72.05", "71.23", "90.00"))])
def test_both_settings_run_end_to_end(world, setting, arch, published):
    out = world["tmp"] / setting
    res = run_script(setting, _env(world, arch, out))
    assert res.returncode == 0, res.stderr[-3000:]
    table = res.stdout
    assert (out / "paper_table.md").read_text() == table
    fp32, top1, top5 = published
    assert _cell(table, "fp32 top-1 (%)")[0] == fp32
    pub1, got1 = _cell(table, "quantized top-1 after fine-tune (%)")
    pub5, got5 = _cell(table, "quantized top-5 after fine-tune (%)")
    assert (pub1, pub5) == (top1, top5)
    # the measured figures are the evaluation's of the fine-tuned model_best
    evaluated = re.findall(r"evaluate: top1 ([\d.]+) top5 ([\d.]+)",
                           (out / "evaluate.log").read_text())[-1]
    assert (got1, got5) == tuple(f"{float(v):.2f}" for v in evaluated)
    results = json.loads((out / "finetune" / "results.json").read_text())
    assert results["epochs"] == 1 and _cell(table, "fine-tune epochs")[1] == "1"
    assert _cell(table, "fp32 top-1 (%)")[1] == f"{results['fp32_top1']:.2f}"
    sha = hashlib.sha256(open(world[arch], "rb").read()).hexdigest()
    assert results["weights"] == {"path": world[arch], "sha256": sha}
    (search,) = os.listdir(out / "search")
    strategy = json.loads((out / "search" / search / "strategy.json").read_text())
    assert _cell(table, "searched cost ratio")[1] == f"{strategy['cost_ratio']:.4f}"
    assert _cell(table, "budget (preserve ratio)")[1] == f"{strategy['preserve_ratio']:g}"
    if arch == "resnet50":
        assert strategy["weights"] == results["weights"] and strategy["preserve_ratio"] == 0.1
        assert strategy["mode"] == "kmeans" and len(strategy["strategy"]) == 54
    else:   # searched on ImageNet-100 (made from the tree by symlinks), on the given table
        assert sorted(os.listdir(world["HAQ_IMAGENET100"] + "/train")) == WNIDS[:3]
        assert strategy["dataset"] == "imagenet100" and strategy["kl_max_bit"] == 4
        assert strategy["cost_table"]["path"] == os.path.abspath(world["HAQ_COST_TABLE"])
        assert strategy["weights"]["path"] == world["HAQ_SEARCH_WEIGHTS"]
        assert results["kl_max_bit"] == 4 and _cell(table, "kl_max_bit (search / fine-tune)") == (
            "4 / 4", "4 / 4")


@pytest.mark.parametrize("setting,change,expected", [
    ("resnet50-kmeans-0.1", {"HAQ_IMAGENET": "/nonexistent/imagenet"}, "ImageNet not found"),
    ("resnet50-kmeans-0.1", {"HAQ_WEIGHTS": "/nonexistent/w.pth.tar"}, "weights '/nonexistent"),
    ("mobilenetv2-linear-0.6", {"HAQ_SEARCH_WEIGHTS": "/nonexistent/w.pth.tar"},
     "ImageNet-100 weights"),
    ("mobilenetv2-linear-0.6", {"HAQ_COST_TABLE": "/nonexistent/t.npy"}, "latency table"),
    ("mobilenetv2-linear-0.6", {"HAQ_WEIGHTS": "IMAGENET1K_V1"}, "expected a file"),
    ("resnet18-kmeans", {}, "expected a setting"),
])
def test_missing_pieces_are_refused_in_one_line(world, setting, change, expected, tmp_path):
    arch = "resnet50" if setting.startswith("resnet") else "mobilenetv2"
    res = run_script(setting, dict(_env(world, arch, tmp_path / "out"), **change))
    err = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(err) == 1, res.stderr
    assert err[0].startswith("error: reproduce_paper.sh: ") and expected in err[0]
    assert not (tmp_path / "out").exists() and res.stdout == ""
