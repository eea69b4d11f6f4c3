"""The CNNs the cnn, coverage and host suites (and the ResNet-18 byte model) build: torchvision's classifiers for
32x32 inputs, a fast CIFAR-10 net in the style of airbench (Keller Jordan's CIFAR-10 speedruns), and a stand-in
ResNet-18 with tiny channel counts for host-time rows.

The CIFAR net is a small, faithful rewrite of airbench94's: a 2x2 "whitening" conv (frozen weight, trained bias)
and GELU, then three groups of Conv -> MaxPool -> BatchNorm -> GELU -> Conv -> BatchNorm -> GELU (widths 64,
256, 256), a 3x3 max pool, a bias-free Linear and a 1/9 scale. Its Conv2d and BatchNorm2d are subclasses that
change only defaults and initialisation (3x3 'same' convs without bias, partly identity-initialised; BatchNorm
with eps 1e-12, momentum 0.4 in PyTorch's sense, the weight frozen at 1): their forward is the stock one. The
whitening conv's weights are not computed from data here (a benchmark does not need them).
"""

import torch
from torch import nn

TORCHVISION = ("resnet18", "resnet50")
CIFAR_NET = "cifar-net"
NUM_CLASSES = 10
# torchvision's keyword arguments for a model, as tests/test_torchvision_convert.py builds it (inception_v3's
# auxiliary head needs 299x299 inputs)
BUILD_ARGS = {"inception_v3": {"aux_logits": False}}


class CifarConv(nn.Conv2d):
    """A Conv2d whose defaults are airbench's (3x3, padding 'same', no bias) and whose initialisation makes the
    first in_channels filters identities (Dirac): the forward is Conv2d's own."""

    def __init__(self, in_channels, out_channels, kernel_size=3, padding="same", bias=False):
        super().__init__(in_channels, out_channels, kernel_size=kernel_size, padding=padding, bias=bias)

    def reset_parameters(self):
        super().reset_parameters()
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        with torch.no_grad():
            nn.init.dirac_(self.weight[: min(self.in_channels, self.out_channels)])


class CifarBatchNorm(nn.BatchNorm2d):
    """A BatchNorm2d with airbench's defaults: eps 1e-12, a slow running average (``momentum`` as airbench writes
    it, 1 - PyTorch's), the weight frozen at 1 and the bias trained. The forward is BatchNorm2d's own."""

    def __init__(self, num_features, momentum=0.6, eps=1e-12, weight=False, bias=True):
        super().__init__(num_features, eps=eps, momentum=1 - momentum)
        self.weight.requires_grad_(weight)
        self.bias.requires_grad_(bias)


class ConvGroup(nn.Module):
    """Conv -> MaxPool -> BatchNorm -> GELU -> Conv -> BatchNorm -> GELU, called from forward()."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.conv1 = CifarConv(in_channels, out_channels)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = CifarBatchNorm(out_channels)
        self.conv2 = CifarConv(out_channels, out_channels)
        self.norm2 = CifarBatchNorm(out_channels)
        self.activ = nn.GELU()

    def forward(self, x):
        x = self.activ(self.norm1(self.pool(self.conv1(x))))
        return self.activ(self.norm2(self.conv2(x)))


class Scale(nn.Module):
    def __init__(self, factor):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


class CifarNet(nn.Sequential):
    """airbench94's network for 32x32 CIFAR-10 images (see the module's docstring)."""

    def __init__(self, widths=(64, 256, 256), num_classes=NUM_CLASSES, whiten_kernel=2, scale=1 / 9):
        whiten = CifarConv(3, 2 * 3 * whiten_kernel**2, kernel_size=whiten_kernel, padding=0, bias=True)
        whiten.weight.requires_grad_(False)  # airbench sets it from the data's covariance and freezes it
        super().__init__(whiten, nn.GELU(), ConvGroup(whiten.out_channels, widths[0]),
                         ConvGroup(widths[0], widths[1]), ConvGroup(widths[1], widths[2]), nn.MaxPool2d(3),
                         nn.Flatten(), nn.Linear(widths[2], num_classes, bias=False), Scale(scale))


def build(name, num_classes=NUM_CLASSES):
    """A model by name: ``cifar-net`` or any torchvision classifier (weights=None), in training mode."""
    if name == CIFAR_NET:
        return CifarNet(num_classes=num_classes)
    import torchvision

    return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **BUILD_ARGS.get(name, {}))


def tiny_resnet18(width=8, num_classes=NUM_CLASSES):
    """ResNet-18 as torchvision builds it -- its ResNet and BasicBlock classes, their forward, the same 20
    conv -> BatchNorm sites, stride-2 1x1 downsamples and stem max pool -- with `width` channels in every
    stage instead of 64 to 512: a stand-in whose arithmetic is negligible beside its host time."""
    from torchvision.models.resnet import BasicBlock, ResNet

    class TinyResNet18(ResNet):
        def __init__(self):
            nn.Module.__init__(self)  # ResNet.__init__ hard-codes 64..512 channels: its steps, with `width`
            self._norm_layer, self.inplanes, self.dilation = nn.BatchNorm2d, width, 1
            self.groups, self.base_width = 1, 64
            self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
            self.layer1 = self._make_layer(BasicBlock, width, 2)
            self.layer2 = self._make_layer(BasicBlock, width, 2, stride=2)
            self.layer3 = self._make_layer(BasicBlock, width, 2, stride=2)
            self.layer4 = self._make_layer(BasicBlock, width, 2, stride=2)
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            self.fc = nn.Linear(width, num_classes)

    return TinyResNet18()
