"""Quantizable-layer discovery shared by the search, fine-tuning and the simulator.

HAQ's policies are lists in ``model.modules()`` order (docs/design.md, policies); this
module is the one place that order is defined. Users see layers by their
``named_modules()`` name.
"""
import copy

import torch
import torch.nn as nn


def quantizable_layers(model, linear=False):
    """Return ``[(name, module), ...]`` of the layers a policy assigns bits to.

    K-Means mode (``linear=False``): every ``nn.Conv2d`` and ``nn.Linear``.
    Linear mode (``linear=True``): those of them that fake-quantize (a true
    ``fake_quantized`` attribute: lib/quantize's ``QConv2d`` / ``QLinear``, which
    subclass the float layers, so they also count in K-Means mode).
    """
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear))
            and (not linear or getattr(m, "fake_quantized", False))]


def fold_batchnorm(model, scales=None):
    """A copy of ``model`` (eval-mode maths) with each BatchNorm2d folded into its conv.

    A ``BatchNorm2d`` registered right after a ``Conv2d`` of as many output channels in
    the same parent is taken to follow it in ``forward`` (the layout of every model in
    the registry and torchvision): the conv's weight and bias absorb the normalisation,
    ``w' = w * g / sqrt(v + eps)``, ``b' = (b - m) * g / sqrt(v + eps) + beta``, and the
    BatchNorm becomes ``nn.Identity``. The copy matches the model in eval mode up to
    float rounding only if that layout holds, so callers check it on data. Quantized
    layers must be float (unquantized) when folded; the model is left untouched.

    ``scales``: a dict that, when given, receives ``{folded conv: g / sqrt(v + eps)}`` (the
    per-output-channel factor of its weight), so a caller can fold a changed weight later.
    """
    folded = copy.deepcopy(model).eval()
    with torch.no_grad():
        for parent, _, conv, bn_name, bn in adjacent_children(folded):
            if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
                    and bn.num_features == conv.out_channels and bn.track_running_stats):
                continue
            scale = torch.rsqrt(bn.running_var + bn.eps)
            if bn.affine:
                shift = bn.bias - bn.running_mean * bn.weight * scale
                scale = scale * bn.weight
            else:
                shift = -bn.running_mean * scale
            bias = conv.bias if conv.bias is not None else torch.zeros_like(shift)
            conv.weight.mul_(scale.reshape(-1, 1, 1, 1).to(conv.weight.dtype))
            conv.bias = nn.Parameter(bias * scale + shift, requires_grad=False)
            if scales is not None:
                scales[conv] = scale.detach().clone()
            parent._modules[bn_name] = nn.Identity()
    return folded


def adjacent_children(model):
    """``(parent, name, child, next_name, next_child)`` for every two children of a module
    registered one after the other (the pattern BN folding looks for).

    Children are read as the walk goes, so a caller may replace either child of a pair.
    """
    for parent in model.modules():
        names = list(parent._modules)
        for first, second in zip(names, names[1:]):
            yield parent, first, parent._modules[first], second, parent._modules[second]
