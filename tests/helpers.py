"""Helpers several test files share: small image folders and the field mutations of the
generated-input tests."""
import os

import torch
from PIL import Image


def image_tree(root, classes_by_split, per_class=2, size=24):
    """root/<split>/<class>/<i>.png with a colour per (class, i); returns root as str."""
    for split, classes in classes_by_split.items():
        for k, c in enumerate(classes):
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.new("RGB", (size, size), (40 * k, 10 * i, 0)).save(d / f"{i}.png")
    return str(root)


def get_path(node, path):
    """node[path[0]][path[1]]...: the field a mutation edits."""
    for key in path:
        node = node[key]
    return node


def wrong_type(value):
    """A value of another JSON kind than ``value``: text for containers and tensors, a number for
    text, a list for numbers and booleans, an object for null."""
    if isinstance(value, str):
        return 7
    if isinstance(value, (dict, list, tuple)) or torch.is_tensor(value):
        return "text"
    return [value] if value is not None else {"a": 1}


def folder_snapshot(folder):
    """Names and bytes of every file under ``folder`` (to prove a refusal wrote nothing)."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                files[os.path.relpath(os.path.join(root, name), folder)] = f.read()
    return files


def tiny_search_argv(weights, out, episodes):
    """rl_quantize.py flags of a tiny seeded K-Means search on mnist5k (one warmup episode)."""
    return ["--dataset", "mnist5k", "--width_mult", "0.25", "--pretrained_path", weights,
            "--train_size", "32", "--val_size", "32", "--data_bsize", "32", "--n_worker", "0",
            "--warmup", "1", "--train_episode", str(episodes), "--output", str(out), "--seed", "1",
            "--max_bit", "4", "--preserve_ratio", "0.2"]


def fake_imagenet(root, wnids, per_class=3, size=40):
    """A tiny ImageNet tree: root/{train,val}/<wnid>/<wnid>_<i>.JPEG, small real JPEGs whose
    colour depends on the class; returns root as str."""
    for split in ("train", "val"):
        for k, wnid in enumerate(wnids):
            d = root / split / wnid
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.new("RGB", (size, size), (60 * k % 256, 25 * i, 90)).save(
                    d / f"{wnid}_{i}.JPEG", format="JPEG")
    return str(root)
