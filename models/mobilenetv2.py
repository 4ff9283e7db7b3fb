"""MobileNet-V2 (Sandler et al., CVPR 2018) with the module tree of HAQ's released checkpoints.

``features`` is a Sequential of 19 entries: [0] stem (conv3x3, BN, ReLU6), [1..17]
inverted-residual blocks whose layers sit in a Sequential named ``conv``, [18]
conv1x1 to 1280 (BN, ReLU6); then global average pooling and ``classifier`` =
Linear(1280, classes). 52 convolutions + 1 linear = 53 quantizable layers.

In the quantized twin every layer that reads a ReLU6 output is half-wave; the
expand 1x1 convs and the final 1x1 conv read the (signed) linear bottleneck, so
they are full-wave; the stem reads the image (kept unquantized by the policy).
"""
import torch.nn as nn

from .layers import PoolHead, conv, init_weights, linear, make_divisible
from .registry import register_model

# (expansion t, output channels c, repeats n, first stride s), Table 2 of the paper.
SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
            (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def conv_bn(q, inp, oup, k, stride, groups=1, relu=True, half_wave=True):
    layers = [conv(q, inp, oup, k, stride, k // 2, groups=groups, half_wave=half_wave),
              nn.BatchNorm2d(oup)]
    if relu:
        layers.append(nn.ReLU6(inplace=True))
    return layers


class InvertedResidual(nn.Module):
    def __init__(self, inp, oup, stride, expand_ratio, quantized=False):
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers = []
        if expand_ratio != 1:
            # The block input is the previous block's linear (signed) output.
            layers += conv_bn(quantized, inp, hidden, 1, 1, half_wave=False)
        # The depthwise conv reads a ReLU6 output (the expand conv's, or the stem's in block 1).
        layers += conv_bn(quantized, hidden, hidden, 3, stride, groups=hidden)
        layers += conv_bn(quantized, hidden, oup, 1, 1, relu=False)
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes=1000, input_size=224, width_mult=1.0, quantized=False,
                 small_input=None):
        super().__init__()
        if small_input is None:
            small_input = input_size <= 64
        in_ch = make_divisible(32 * width_mult)
        self.last_channel = make_divisible(1280 * max(1.0, width_mult))
        # The stem reads the image, which is signed after normalisation.
        feats = [nn.Sequential(*conv_bn(quantized, 3, in_ch, 3, 1 if small_input else 2,
                                        half_wave=False))]
        for t, c, n, s in SETTINGS:
            out_ch = make_divisible(c * width_mult)
            for i in range(n):
                feats.append(InvertedResidual(in_ch, out_ch, s if i == 0 else 1, t, quantized))
                in_ch = out_ch
        feats.append(nn.Sequential(*conv_bn(quantized, in_ch, self.last_channel, 1, 1,
                                            half_wave=False)))
        self.features = nn.Sequential(*feats)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = linear(quantized, self.last_channel, num_classes)
        init_weights(self)

    def forward(self, x):
        x = self.pool(self.features(x)).flatten(1)
        return self.classifier(x)

    def stages(self):
        """The forward as a chain of modules: applied in turn they give ``forward(x)``."""
        return [*self.features, PoolHead(self.pool, self.classifier)]


@register_model
def mobilenetv2(num_classes=1000, input_size=224, width_mult=1.0, **kw):
    return MobileNetV2(num_classes, input_size, width_mult, quantized=False, **kw)


@register_model
def qmobilenetv2(num_classes=1000, input_size=224, width_mult=1.0, **kw):
    return MobileNetV2(num_classes, input_size, width_mult, quantized=True, **kw)
