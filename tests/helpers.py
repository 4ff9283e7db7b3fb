"""Helpers several test files share: small image folders and the field mutations of the
generated-input tests."""
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
