"""ResNet-18/34/50 (He et al., CVPR 2016) with torchvision's module tree.

Written here (rather than wrapping torchvision) so the quantized twin can build
QConv2d/QLinear in place, and small inputs can use a CIFAR-style stem, while every
state_dict key stays torchvision's (``conv1``, ``layer1.0.conv1``, ``layer1.0.downsample.0``,
``fc``...). ResNet-50: 53 convolutions (downsample included) + fc = 54 quantizable
layers. Every layer but the stem reads a ReLU output: half-wave in the Q twin.
"""
import torch.nn as nn

from .layers import PoolHead, conv, init_weights, linear
from .registry import register_model


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inp, planes, stride=1, downsample=None, quantized=False):
        super().__init__()
        self.conv1 = conv(quantized, inp, planes, 3, stride, 1)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv(quantized, planes, planes, 3, 1, 1)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inp, planes, stride=1, downsample=None, quantized=False):
        super().__init__()
        self.conv1 = conv(quantized, inp, planes, 1)
        self.bn1 = nn.BatchNorm2d(planes)
        # Stride on the 3x3 conv, as torchvision's ResNet "v1.5".
        self.conv2 = conv(quantized, planes, planes, 3, stride, 1)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv(quantized, planes, planes * 4, 1)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNet(nn.Module):
    def __init__(self, block, layers, num_classes=1000, input_size=224, quantized=False,
                 small_input=None):
        super().__init__()
        if small_input is None:
            small_input = input_size <= 64
        self.quantized = quantized
        self.inplanes = 64
        if small_input:
            self.conv1 = conv(quantized, 3, 64, 3, 1, 1, half_wave=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = conv(quantized, 3, 64, 7, 2, 3, half_wave=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, 64, layers[0], 1)
        self.layer2 = self._make_layer(block, 128, layers[1], 2)
        self.layer3 = self._make_layer(block, 256, layers[2], 2)
        self.layer4 = self._make_layer(block, 512, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = linear(quantized, 512 * block.expansion, num_classes)
        init_weights(self)

    def _make_layer(self, block, planes, blocks, stride):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv(self.quantized, self.inplanes, planes * block.expansion, 1, stride),
                nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample, self.quantized)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, quantized=self.quantized) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))

    def stages(self):
        """The forward as a chain of modules: applied in turn they give ``forward(x)``."""
        stem = nn.Sequential(self.conv1, self.bn1, self.relu, self.maxpool)
        blocks = [*self.layer1, *self.layer2, *self.layer3, *self.layer4]
        return [stem, *blocks, PoolHead(self.avgpool, self.fc)]


@register_model
def resnet18(num_classes=1000, input_size=224, **kw):
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, input_size, **kw)


@register_model
def resnet34(num_classes=1000, input_size=224, **kw):
    return ResNet(BasicBlock, [3, 4, 6, 3], num_classes, input_size, **kw)


@register_model
def resnet50(num_classes=1000, input_size=224, **kw):
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes, input_size, **kw)


@register_model
def qresnet50(num_classes=1000, input_size=224, **kw):
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes, input_size, quantized=True, **kw)
