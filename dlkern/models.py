"""``dlkern.models``: the seed's MNIST CNN, on dlkern's kernels or on stock ``torch.nn``."""

import torch
from torch import nn

from dlkern.convert import convert

__all__ = ["MnistCNN", "BACKENDS"]

BACKENDS = ("dlkern", "torch")


class MnistCNN(nn.Module):
    """The seed's CNN for 28x28 digits.

    ``mymodel``: three stages of Conv2d(3x3) -> BatchNorm2d -> ReLU -> MaxPool2d(2, 2) with 32 channels
    (28 -> conv, padding 1 -> 28 -> pool 14 -> conv 12 -> pool 6 -> conv 4 -> pool 2); ``filter``: flatten 32*2*2
    -> Linear(128, 64) -> ReLU -> Linear(64, num_classes). Returns logits.

    The state_dict keys are the seed script's own for both backends (``mymodel.0/1``, ``mymodel.4/5``,
    ``mymodel.8/9`` for conv/BatchNorm, ``filter.0`` and ``filter.2`` for the head), so a checkpoint saved by the
    seed, by either backend, loads into either with ``strict=True``.

    ``backend="torch"`` builds it from stock modules; ``backend="dlkern"`` is that same model passed through
    :func:`dlkern.convert`: the module tree stays the stock one, ``mymodel``'s converted forward runs each
    conv -> BatchNorm -> ReLU -> max pool stage as one fused call, and the head's ReLU is dlkern's.
    Building it draws the same random numbers either way, so both backends start from equal weights under one
    ``torch.manual_seed``.
    """

    def __init__(self, in_channels=1, num_classes=10, backend="dlkern"):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"MnistCNN: backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        stages = []
        for c_in, padding in ((in_channels, 1), (32, 0), (32, 0)):
            stages += [nn.Conv2d(c_in, 32, 3, padding=padding), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2, 2)]
        self.mymodel = nn.Sequential(*stages)
        self.filter = nn.Sequential(nn.Linear(32 * 2 * 2, 64), nn.ReLU(), nn.Linear(64, num_classes))
        if backend == "dlkern":
            convert(self, inplace=True)

    def forward(self, input):
        # flatten, not the seed's view(-1, 128): a channels_last activation is not viewable.
        return self.filter(torch.flatten(self.mymodel(input), 1))

    def extra_repr(self):
        return f"backend={self.backend!r}"
