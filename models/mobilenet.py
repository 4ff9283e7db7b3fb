"""MobileNet-V1 (Howard et al., 2017): a stem and 13 depthwise-separable blocks.

``features`` is a Sequential of 14 entries (each a Sequential of conv/BN/ReLU
layers), then global average pooling and ``classifier`` (Linear): 27 convolutions
+ 1 linear = 28 quantizable layers. Every layer after the stem reads a ReLU output,
so all of them are half-wave in the quantized twin.
"""
import torch.nn as nn

from .layers import PoolHead, conv, init_weights, linear, make_divisible
from .registry import register_model

# (output channels, stride) of the 13 depthwise-separable blocks.
BLOCKS = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1),
          (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1)]


def _conv_bn_relu(q, inp, oup, k, stride, groups=1, half_wave=True):
    return [conv(q, inp, oup, k, stride, k // 2, groups=groups, half_wave=half_wave),
            nn.BatchNorm2d(oup), nn.ReLU(inplace=True)]


class MobileNet(nn.Module):
    def __init__(self, num_classes=1000, input_size=224, width_mult=1.0, quantized=False,
                 small_input=None):
        super().__init__()
        if small_input is None:
            small_input = input_size <= 64
        in_ch = make_divisible(32 * width_mult)
        feats = [nn.Sequential(*_conv_bn_relu(quantized, 3, in_ch, 3, 1 if small_input else 2,
                                              half_wave=False))]
        for c, s in BLOCKS:
            out_ch = make_divisible(c * width_mult)
            feats.append(nn.Sequential(
                *_conv_bn_relu(quantized, in_ch, in_ch, 3, s, groups=in_ch),
                *_conv_bn_relu(quantized, in_ch, out_ch, 1, 1)))
            in_ch = out_ch
        self.features = nn.Sequential(*feats)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = linear(quantized, in_ch, num_classes)
        init_weights(self)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))

    def stages(self):
        """The forward as a chain of modules: applied in turn they give ``forward(x)``."""
        return [*self.features, PoolHead(self.pool, self.classifier)]


@register_model
def mobilenet(num_classes=1000, input_size=224, width_mult=1.0, **kw):
    return MobileNet(num_classes, input_size, width_mult, quantized=False, **kw)


@register_model
def qmobilenet(num_classes=1000, input_size=224, width_mult=1.0, **kw):
    return MobileNet(num_classes, input_size, width_mult, quantized=True, **kw)
