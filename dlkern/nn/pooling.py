import torch

from dlkern import functional as F
from dlkern.nn._jit import NotScriptable


class MaxPool2d(NotScriptable, torch.nn.MaxPool2d):
    """``torch.nn.MaxPool2d`` computed by dlkern's max-pool kernels."""

    def forward(self, input):
        return F.max_pool2d(
            input,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            ceil_mode=self.ceil_mode,
            return_indices=self.return_indices,
        )
