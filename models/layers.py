"""Layer factories shared by the model definitions.

A model built with ``quantized=True`` gets ``QConv2d``/``QLinear`` (lib/quantize) in
place of ``nn.Conv2d``/``nn.Linear``; the module tree, and so every state_dict key,
stays identical to the float model's, so a float checkpoint loads into its Q twin.
"""
import torch.nn as nn

from lib.quantize.linear import QConv2d, QLinear


def conv(quantized, in_ch, out_ch, kernel_size, stride=1, padding=0, groups=1, bias=False,
         half_wave=True):
    """A Conv2d, or a QConv2d whose input is non-negative when ``half_wave``."""
    if quantized:
        return QConv2d(in_ch, out_ch, kernel_size, stride=stride, padding=padding,
                       groups=groups, bias=bias, half_wave=half_wave)
    return nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=padding,
                     groups=groups, bias=bias)


def linear(quantized, in_features, out_features, bias=True, half_wave=True):
    """A Linear, or a QLinear whose input is non-negative when ``half_wave``."""
    if quantized:
        return QLinear(in_features, out_features, bias=bias, half_wave=half_wave)
    return nn.Linear(in_features, out_features, bias=bias)


class PoolHead(nn.Module):
    """Global pooling, flatten, classifier: the last stage of a model's :meth:`stages`."""

    def __init__(self, pool, classifier):
        super().__init__()
        self.pool, self.classifier = pool, classifier

    def forward(self, x):
        return self.classifier(self.pool(x).flatten(1))


def make_divisible(value, divisor=8):
    """Round a channel count to a multiple of ``divisor`` (never below 90% of it)."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new < 0.9 * value:
        new += divisor
    return new


def init_weights(model):
    """Kaiming-normal convs, unit BN, small-normal linear layers."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
