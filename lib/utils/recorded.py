"""The model settings a pretrained checkpoint records, and flags checked against them.

pretrain.py records its arch, dataset and model kwargs (width, input size, number of
classes) in the checkpoint; the search and the fine-tune take each one from there when
its flag is not given, and refuse a flag that disagrees (docs/design.md, "source of
truth"), so a setting is typed once, when the model is trained.
"""
import math
import os

from .checkpoint import load_checkpoint
from .errors import UserError

MODEL_FIELDS = ("width_mult", "input_size", "num_classes")


def pretrained_record(path):
    """{field: value} of arch, dataset, width_mult, input_size, num_classes recorded in the
    checkpoint at ``path``; {} for weights that record none (a missing file, torchvision's
    or the released weights)."""
    if not path or not os.path.isfile(path):
        return {}
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model_kwargs"), dict):
        return {}
    record = {"arch": ckpt.get("arch"), "dataset": ckpt.get("dataset")}
    record.update({k: ckpt["model_kwargs"].get(k) for k in MODEL_FIELDS})
    return {k: v for k, v in record.items() if v is not None}


def same_value(a, b):
    """Whether two recorded settings agree: numbers to rounding, dataset folders by location."""
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9)
    if a == b:
        return True
    return (isinstance(a, str) and isinstance(b, str) and os.path.exists(a)
            and os.path.exists(b) and os.path.samefile(a, b))


def settle(flag, given, recorded, source, same=same_value):
    """``given`` (a flag's value, None when not given), else ``recorded``; UserError when both
    exist and disagree. ``source`` names where ``recorded`` comes from."""
    if given is None:
        return recorded
    if recorded is not None and not same(given, recorded):
        hint = f", or no {flag} to take it from there" if flag.startswith("--") else ""
        raise UserError(f"{flag} {given} disagrees with {recorded} recorded in {source}; "
                        f"expected {recorded}{hint}")
    return given
