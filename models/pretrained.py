"""Pretrained weights: a local checkpoint, or torchvision's weights API for ImageNet.

A local file wins (``--pretrained_path``, else ``checkpoints/pretrained/<arch>.pth.tar``).
Without one, ImageNet models whose float twin has torchvision weights are fetched through
torchvision (needs network access); anything else is a one-line error naming the path.
"""
import logging
import os

from lib.utils.checkpoint import load_pretrained, load_state_dict
from lib.utils.errors import UserError

from .registry import default_pretrained_path, float_twin

log = logging.getLogger(__name__)
_QUANT_KEYS = ("activation_range", "weight_range")


def rename_by_order(source, model):
    """Map ``source`` (a state_dict of the same network with other names) onto ``model``'s keys.

    Our MobileNet-V2 and ResNets hold the same tensors in the same order as torchvision's
    (only the module names differ, e.g. ``features.1.conv.0.0`` vs ``features.1.conv.0``); the
    quantized twins add only ``activation_range``/``weight_range``, which stay as initialised.
    """
    own = [(k, v) for k, v in model.state_dict().items() if not k.endswith(_QUANT_KEYS)]
    src = list(source.items())
    if len(own) != len(src) or any(a.shape != b.shape for (_, a), (_, b) in zip(own, src)):
        raise UserError("torchvision's weights do not fit this model tensor for tensor; "
                        "expected the same architecture (pass --pretrained_path instead)")
    return {k: v for (k, _), (_, v) in zip(own, src)}


def _torchvision_state_dict(arch):
    import torchvision
    weights = torchvision.models.get_model_weights(float_twin(arch)).DEFAULT
    return weights.get_state_dict(progress=False)


def load_pretrained_weights(model, arch, dataset, path=None):
    """Load pretrained weights into ``model``; returns where they came from."""
    path = path or default_pretrained_path(arch, dataset)
    if os.path.isfile(path) or dataset != "imagenet":
        load_pretrained(model, path, hint=f"train one with 'python pretrain.py --arch "
                        f"{float_twin(arch)} --dataset {dataset}' or pass --pretrained_path")
        return path
    try:
        source = _torchvision_state_dict(arch)
    except Exception as exc:  # unknown to torchvision, or no network
        raise UserError(f"pretrained weights '{path}' not found and torchvision's weights for "
                        f"'{float_twin(arch)}' could not be fetched ({type(exc).__name__}); put a "
                        "checkpoint there or pass --pretrained_path") from exc
    load_state_dict(model, rename_by_order(source, model), source="torchvision weights")
    log.info("loaded torchvision's ImageNet weights for %s", float_twin(arch))
    return "torchvision"
