import os
import subprocess
import sys

import pytest
import torch

from helpers import image_tree
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
    assert split_indices(4000, 1000, 2000, seed=2) != a


def test_search_subsets_are_the_released_ones():
    """The release: np.random.seed(1); np.random.shuffle(list(range(n))); val first, then train."""
    import numpy as np
    n, val_size, train_size = 12811, 1000, 2000
    np.random.seed(1)
    indices = list(range(n))
    np.random.shuffle(indices)
    assert split_indices(n, val_size, train_size) == \
        (indices[:val_size], indices[val_size:val_size + train_size])


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


def _class_of(ds, index):
    path, target = ds.samples[index]
    return os.path.basename(os.path.dirname(path)), target


def test_val_indices_follow_train_class_names(tmp_path):
    # A stray hidden folder in val/ sorts first; taken as a class it would shift every val label.
    root = image_tree(tmp_path, {"train": ["cat", "dog", "eel"],
                                  "val": [".ipynb_checkpoints", "cat", "dog", "eel"]})
    train, val = build_datasets(root)
    assert val.classes == train.classes == ["cat", "dog", "eel"]
    names = {name: t for name, t in (_class_of(train, i) for i in range(len(train)))}
    for i in range(len(val)):
        name, target = _class_of(val, i)
        assert target == names[name]
    assert len(val) == 6


@pytest.mark.parametrize("val_classes, named", [
    (["cat", "eel"], "missing in val/: dog"),
    (["cat", "dog", "eel", "fox"], "only in val/: fox"),
])
def test_class_mismatch_between_splits_is_refused(tmp_path, val_classes, named):
    root = image_tree(tmp_path, {"train": ["cat", "dog", "eel"], "val": val_classes})
    with pytest.raises(UserError, match=named):
        build_datasets(root)


def test_class_mismatch_cli_names_the_first_few(repo_root, tmp_path):
    train = [f"c{i:02d}" for i in range(8)]
    root = image_tree(tmp_path / "ds", {"train": train, "val": train[:2]}, per_class=1)
    r = subprocess.run([sys.executable, "pretrain.py", "--dataset", root, "--epochs", "1",
                        "--output", str(tmp_path / "x.pth.tar"), "--no-progress"],
                       cwd=repo_root, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "missing in val/: c02, c03, c04 (+3 more)" in last
    assert not os.path.exists(tmp_path / "x.pth.tar")


def test_symlink_loop_counts_each_image_once(tmp_path):
    root = image_tree(tmp_path, {"train": ["a", "b"], "val": ["a", "b"]})
    cls = tmp_path / "train" / "a"
    (cls / "loop").symlink_to(cls, target_is_directory=True)     # a/loop -> a
    (cls / "again.png").symlink_to(cls / "0.png")                # the same file twice
    train, _ = build_datasets(root)
    assert len(train) == 4     # a plain ImageFolder counts 125: a's images once per loop level
    assert sorted(t for _, t in train.samples) == [0, 0, 1, 1]
    (cls / "up").symlink_to(tmp_path / "train", target_is_directory=True)   # a/up -> train
    train, _ = build_datasets(root)
    assert sorted(t for _, t in train.samples) == [0, 0, 1, 1]   # b's images stay in b
    # a symlinked class folder (how make_data builds imagenet100) is still read
    linked = tmp_path / "linked"
    (linked / "train").mkdir(parents=True)
    (linked / "val").mkdir()
    for split in ("train", "val"):
        for c in ("a", "b"):
            (linked / split / c).symlink_to(tmp_path / "val" / c, target_is_directory=True)
    assert len(build_datasets(str(linked))[0]) == 4


def test_samples_match_torchvision_order_on_a_plain_tree(tmp_path):
    from torchvision.datasets import ImageFolder
    root = image_tree(tmp_path, {"train": ["b", "a", "c"], "val": ["a", "b", "c"]}, per_class=3)
    sub = tmp_path / "train" / "a" / "nested"
    sub.mkdir()
    (sub / "x.png").write_bytes((tmp_path / "train" / "a" / "0.png").read_bytes())
    ours = build_datasets(root)[0]
    ref = ImageFolder(str(tmp_path / "train"))
    assert ours.samples == ref.samples and ours.classes == ref.classes


def test_non_images_are_skipped_with_a_warning(tmp_path, caplog):
    root = image_tree(tmp_path, {"train": ["a", "b"], "val": ["a", "b"]})
    (tmp_path / "train" / "a" / "notes.txt").write_text("not an image")
    (tmp_path / "train" / "b" / "page.JPEG").write_text("<html>404</html>")   # a failed download
    with caplog.at_level("WARNING"):
        train, _ = build_datasets(root)
    assert len(train) == 4
    assert all(p.endswith(".png") for p, _ in train.samples)
    assert any("skipped 2 file(s)" in r.getMessage() and "page.JPEG" in r.getMessage()
               for r in caplog.records)


def test_undecodable_image_does_not_stop_an_epoch(tmp_path, caplog):
    from torchvision.datasets import ImageFolder
    from models import get_model
    from lib.utils.train import evaluate, train_one_epoch
    root = image_tree(tmp_path, {"train": ["a", "b"], "val": ["a", "b"]}, size=64)
    good = (tmp_path / "train" / "b" / "0.png").read_bytes()
    (tmp_path / "train" / "b" / "2.png").write_bytes(good[:60])   # a PNG header, then nothing
    with pytest.raises(OSError):  # what a plain ImageFolder does mid-epoch
        ImageFolder(str(tmp_path / "train"))[4]
    train_loader, val_loader, n = get_dataset(root, 5, 0)
    assert len(train_loader.dataset) == 5
    model = get_model("mobilenetv2", num_classes=n, input_size=224, width_mult=0.25)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    crit = torch.nn.CrossEntropyLoss()
    with caplog.at_level("WARNING"):
        tr = train_one_epoch(model, train_loader, crit, opt, torch.device("cpu"), progress=False)
        va = evaluate(model, train_loader, crit, torch.device("cpu"), progress=False)
    assert tr["batches"] == 1 and not tr["nonfinite"] and 0.0 <= va["top1"] <= 100.0
    assert any("cannot read image" in r.getMessage() and "2.png" in r.getMessage()
               for r in caplog.records)
    # the stand-in is an image of the same class
    assert train_loader.dataset[4][1] == train_loader.dataset.targets[4] == 1


def test_seeded_loader_ignores_global_rng(tmp_path):
    def first_batches(seed, global_seed, workers=0):
        tl, _, _ = get_dataset("mnist5k", 16, workers, train_subset=64, seed=seed)
        torch.manual_seed(global_seed)   # e.g. a model built first, drawing its init
        return [(x.clone(), y.clone()) for x, y in tl]

    a, b = first_batches(5, 0), first_batches(5, 123)
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    c = first_batches(6, 0)
    assert not torch.equal(a[0][1], c[0][1])           # another order
    w1, w2 = first_batches(5, 0, workers=2), first_batches(5, 7, workers=2)
    assert all(torch.equal(xa, xb) for (xa, _), (xb, _) in zip(w1, w2))


def test_dataset_given_as_a_path_names_files_by_its_last_component(tmp_path, monkeypatch):
    import argparse
    from finetune import default_run_name
    from lib.simulator.tables import table_path
    from models import default_pretrained_path
    from rl_quantize import base_name
    for given in ("/data/foo", "../foo", "foo/", "./x/../foo"):
        assert os.path.dirname(default_pretrained_path("mobilenetv2", given)) == \
            os.path.join("checkpoints", "pretrained")
        assert os.path.basename(default_pretrained_path("mobilenetv2", given)) == \
            "mobilenetv2_foo.pth.tar"
        assert table_path("qmobilenetv2", given, "bismo_cloud", "latency", 1, tmp_path).name == \
            "qmobilenetv2_foo_224px_w1_batch1_bismo_cloud_latency_table.npy"
        assert base_name(argparse.Namespace(arch="qmobilenetv2", dataset=given, suffix=None)) == \
            "qmobilenetv2_foo"
        setup = argparse.Namespace(arch="mobilenetv2", dataset=given, mode="linear")
        assert default_run_name(setup) == "mobilenetv2_foo_linear_finetune"
    assert default_pretrained_path("mobilenetv2", "mnist5k").endswith("mobilenetv2_mnist5k.pth.tar")
