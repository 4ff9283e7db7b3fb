import os
import subprocess
import sys

import pytest
import torch

from lib.utils.data_utils import (build_datasets, get_dataset, get_split_train_dataset,
                                  split_indices)
from lib.utils.errors import UserError


def test_mnist5k_split_sizes_and_shape():
    train, test = build_datasets("mnist5k")
    assert len(train) == 4000 and len(test) == 1000
    x, y = test[0]
    assert x.shape == (3, 32, 32) and 0 <= int(y) < 10
    # train/test are disjoint images: compare raw pixel bytes
    tr = {bytes(train.images[i, 0].numpy().tobytes()) for i in range(len(train))}
    assert not any(bytes(test.images[i, 0].numpy().tobytes()) in tr for i in range(len(test)))


def test_split_is_deterministic_and_disjoint():
    a = split_indices(4000, 1000, 2000)
    b = split_indices(4000, 1000, 2000)
    assert a == b
    val, train = a
    assert len(val) == 1000 and len(train) == 2000
    assert not set(val) & set(train)
    assert split_indices(4000, 1000, 2000, seed=1) != a


def test_split_loaders_use_disjoint_images():
    torch.manual_seed(0)
    tl, vl, n = get_split_train_dataset("mnist5k", 100, 0, val_size=300, train_size=500)
    assert n == 10
    assert len(tl.dataset) == 500 and len(vl.dataset) == 300
    assert not set(tl.dataset.indices) & set(vl.dataset.indices)
    assert vl.dataset.dataset.augment is False and tl.dataset.dataset.augment is True
    with pytest.raises(UserError, match="exceeds"):
        get_split_train_dataset("mnist5k", 100, 0, val_size=3000, train_size=2000)


def test_missing_root_is_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        get_dataset("imagenet", 8, 0, data_root=str(tmp_path / "nowhere"))


def test_imagefolder_root(tmp_path):
    from PIL import Image
    for split in ("train", "val"):
        for c in ("a", "b"):
            d = tmp_path / split / c
            d.mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (40, 40), (i * 50, 0, 0)).save(d / f"{i}.png")
    tl, vl, n = get_dataset(str(tmp_path), 2, 0)
    assert n == 2
    x, y = next(iter(vl))
    assert x.shape == (2, 3, 224, 224)


def test_missing_dataset_cli_one_line_error(repo_root, tmp_path):
    r = subprocess.run([sys.executable, "pretrain.py", "--dataset", "imagenet", "--dataset_root",
                        str(tmp_path / "missing"), "--epochs", "1", "--output", str(tmp_path / "x.pth.tar")],
                       cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("error:") and "missing" in lines[-1]
    assert "Traceback" not in r.stderr
    assert not os.path.exists(tmp_path / "x.pth.tar")


def test_elastic_field_is_smooth_small_and_seeded():
    from lib.utils.data_utils import _elastic_field

    torch.manual_seed(0)
    f = _elastic_field(64, 32, 20.0, 4.0)
    assert f.shape == (64, 32, 32, 2)
    px = f * 16  # grid units -> pixels on a 32-pixel image
    assert 0.3 < float(px.std()) < 2.0 and float(px.abs().max()) < 8.0
    # smooth: neighbouring pixels move almost together
    assert float((px[:, 1:] - px[:, :-1]).abs().mean()) < 0.2 * float(px.abs().mean())
    torch.manual_seed(0)
    assert torch.equal(f, _elastic_field(64, 32, 20.0, 4.0))
