"""Value checks shared by the loaders of saved files (strategy, search state, caches, checkpoints).

A file is checked field by field when it is read, so a wrong value ends in one line naming
the field and what it should hold, not in a crash later.  Numbers are matched by exact type:
``bool`` is an ``int`` to Python but never a count or a width, and an ``int`` past a
float's range must compare exactly rather than overflow in :func:`math.isfinite`.
"""
import math
import sys

MAX_CLASSES = 100_000          # ImageNet-21k has 21,841
INPUT_SIZES = (8, 1024)        # pixels: the range --input_size accepts
MAX_WIDTH_MULT = 8.0           # the largest --width_mult


def is_int(value, lo=0, hi=None):
    """``value`` is an int (not a bool) in [lo, hi] (no upper bound when ``hi`` is None)."""
    return type(value) is int and lo <= value and (hi is None or value <= hi)


def is_real(value, lo=-math.inf, hi=math.inf):
    """``value`` is a finite int or float (not a bool) in [lo, hi]; an int must convert to a
    finite float, so arithmetic on it later cannot overflow."""
    if type(value) is int:
        return lo <= value <= hi and abs(value) <= sys.float_info.max
    return type(value) is float and math.isfinite(value) and lo <= value <= hi


def is_str_list(value):
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def shown(value, limit=60):
    """``repr(value)`` cut to ``limit`` characters, for a one-line message."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def is_weights_record(value):
    """``value`` says where pretrained weights came from (models.load_pretrained_weights):
    ``{"name": str}`` (torchvision's) or ``{"path": str, "sha256": str}`` (a file)."""
    if not isinstance(value, dict):
        return False
    if set(value) == {"name"}:
        return isinstance(value["name"], str)
    return (set(value) == {"path", "sha256"} and isinstance(value["path"], str)
            and isinstance(value["sha256"], str))
