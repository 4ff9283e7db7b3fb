"""Quantizable-layer discovery shared by the search, fine-tuning and the simulator.

HAQ's policies are lists in ``model.modules()`` order (DESIGN.md section 3); this
module is the one place that order is defined. Users see layers by their
``named_modules()`` name.
"""
import torch.nn as nn


def quantizable_layers(model, linear=False):
    """Return ``[(name, module), ...]`` of the layers a policy assigns bits to.

    K-Means mode (``linear=False``): every ``nn.Conv2d`` and ``nn.Linear``.
    Linear mode (``linear=True``): every ``QConv2d`` / ``QLinear`` (they subclass
    the float layers, so they also count in K-Means mode).
    """
    if linear:
        from lib.quantize.linear import QConv2d, QLinear
        types = (QConv2d, QLinear)
    else:
        types = (nn.Conv2d, nn.Linear)
    return [(name, m) for name, m in model.named_modules() if isinstance(m, types)]
