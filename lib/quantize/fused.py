"""Skip a ReLU / ReLU6 whose only reader is a half-wave quantized layer (CPU QAT speed).

A half-wave input quantizer computes ``round(clamp(x, 0, r) / s) * s``. When x is the
output of a ReLU6 of the pre-activation z and r <= 6, ``clamp(relu6(z), 0, r)`` equals
``clamp(z, 0, r)`` value for value, so the quantizer can read z and the ReLU6 pass can go:
on the CPU that pass (forward and backward) costs about as much as the quantization itself
(bench/quant_bench.py --only d). The gradients agree too:

* dL/dz: the ReLU6 passes it where 0 < z < 6, the straight-through estimator where
  0 < relu6(z) < r; together, and for the fused quantizer alone, where 0 < z < r;
* PACT's dL/dr sums dL/dy where the input exceeds r: relu6(z) > r holds exactly when z > r
  for r < 6, and never for r >= 6, where the quantizer is told (``cap``) to give 0.

A ReLU (no cap) fuses for every r. With r > 6 (PACT can grow it), while calibrating
(ranges are measured on the activation's output), with the input unquantized, or on an
accelerator (the r <= cap check would synchronise with the device), the activation runs as
usual. Only a model can say that the activation's output has no other reader, so only the
built-in MobileNets call :func:`fuse_input_activations`; the module tree, names and
state_dict are those of the unfused model.
"""
import math

import torch.nn as nn

from lib.quantize.linear import QConv2d, QLinear
from lib.utils.layers import adjacent_children


class _SkippableMixin:
    """An activation that returns its input when its reader's quantizer computes it."""

    def _bind(self, reader):
        self._reader = (reader,)   # a tuple: the reader is not registered as a submodule

    def forward(self, x):
        if self._reader[0].absorbs_input_activation(x):
            return x
        return super().forward(x)


class SkippableReLU(_SkippableMixin, nn.ReLU):
    """``nn.ReLU`` before a half-wave quantized layer (see the module docstring)."""

    cap = math.inf


class SkippableReLU6(_SkippableMixin, nn.ReLU6):
    """``nn.ReLU6`` before a half-wave quantized layer (see the module docstring)."""

    cap = 6.0


_SKIPPABLE = {nn.ReLU: SkippableReLU, nn.ReLU6: SkippableReLU6}


def fuse_input_activations(model):
    """Make each ReLU/ReLU6 directly followed (same parent) by a half-wave QConv2d/QLinear skippable.

    The caller guarantees that the activation's output is read by that layer alone (true of
    every ReLU inside a MobileNet block). Returns the number of activations made skippable.
    """
    count = 0
    for parent, act_name, act, _, reader in adjacent_children(model):
        kind = _SKIPPABLE.get(type(act))
        if kind is None or not isinstance(reader, (QConv2d, QLinear)) or not reader.half_wave:
            continue
        skippable = kind(inplace=act.inplace)
        skippable._bind(reader)
        reader.input_cap = kind.cap
        parent._modules[act_name] = skippable
        count += 1
    return count


def unfuse_input_activations(model):
    """Undo :func:`fuse_input_activations` in place: plain ReLU/ReLU6 that always run.

    The straightforward implementation the fused one is tested against. Returns the count.
    """
    count = 0
    for parent in model.modules():
        for name, child in list(parent._modules.items()):
            if isinstance(child, _SkippableMixin):
                child._reader[0].input_cap = None
                plain = nn.ReLU6 if isinstance(child, nn.ReLU6) else nn.ReLU
                parent._modules[name] = plain(inplace=child.inplace)
                count += 1
    return count
