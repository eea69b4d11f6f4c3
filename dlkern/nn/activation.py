"""dlkern's activation modules. The torch.nn namesakes are subclassed (same constructor arguments, repr,
parameters and state_dict keys) with forward computed by dlkern's Triton kernels; Swish and HardLogistic are new.
torch.jit.script refuses them with a clear error (NotScriptable); torch.jit.trace, torch.export and torch.compile work."""

import torch

from dlkern import functional as F
from dlkern.nn._jit import NotScriptable

__all__ = [
    "Sigmoid", "Tanh", "ReLU", "LeakyReLU", "PReLU", "ELU", "Softplus", "SiLU", "GELU", "Hardsigmoid", "Hardswish",
    "Hardtanh", "Swish", "HardLogistic",
]


class Sigmoid(NotScriptable, torch.nn.Sigmoid):
    """``torch.nn.Sigmoid`` computed by dlkern's kernels."""

    def forward(self, input):
        return F.sigmoid(input)


class Tanh(NotScriptable, torch.nn.Tanh):
    """``torch.nn.Tanh`` computed by dlkern's kernels."""

    def forward(self, input):
        return F.tanh(input)


class ReLU(NotScriptable, torch.nn.ReLU):
    """``torch.nn.ReLU`` computed by dlkern's kernels."""

    def forward(self, input):
        return F.relu(input, inplace=self.inplace)


class LeakyReLU(NotScriptable, torch.nn.LeakyReLU):
    """``torch.nn.LeakyReLU`` computed by dlkern's kernels."""

    def forward(self, input):
        return F.leaky_relu(input, self.negative_slope, self.inplace)


class PReLU(NotScriptable, torch.nn.PReLU):
    """``torch.nn.PReLU`` computed by dlkern's kernels (the weight gradient is a deterministic reduction)."""

    def forward(self, input):
        return F.prelu(input, self.weight)


class ELU(NotScriptable, torch.nn.ELU):
    """``torch.nn.ELU`` computed by dlkern's kernels."""

    def forward(self, input):
        return F.elu(input, self.alpha, self.inplace)


class Softplus(NotScriptable, torch.nn.Softplus):
    """``torch.nn.Softplus`` computed by dlkern's kernels."""

    def forward(self, input):
        return F.softplus(input, self.beta, self.threshold)


class SiLU(NotScriptable, torch.nn.SiLU):
    """``torch.nn.SiLU`` computed by dlkern's kernels."""

    def forward(self, input):
        return F.silu(input, inplace=self.inplace)


class GELU(NotScriptable, torch.nn.GELU):
    """``torch.nn.GELU`` computed by dlkern's kernels (exact for ``approximate='none'``)."""

    def forward(self, input):
        return F.gelu(input, approximate=self.approximate)


class Hardsigmoid(NotScriptable, torch.nn.Hardsigmoid):
    """``torch.nn.Hardsigmoid`` computed by dlkern's kernels."""

    def forward(self, input):
        return F.hardsigmoid(input, self.inplace)


class Hardswish(NotScriptable, torch.nn.Hardswish):
    """``torch.nn.Hardswish`` computed by dlkern's kernels."""

    def forward(self, input):
        return F.hardswish(input, self.inplace)


class Hardtanh(NotScriptable, torch.nn.Hardtanh):
    """``torch.nn.Hardtanh`` computed by dlkern's kernels."""

    def forward(self, input):
        return F.hardtanh(input, self.min_val, self.max_val, self.inplace)


class Swish(NotScriptable, torch.nn.Module):
    r"""Swish: :math:`x \cdot \sigma(\beta x)` (Ramachandran et al., 2017); ``beta=1`` is SiLU.

    Args:
        beta: the value of beta (the initial value when learnable). Default: 1.0.
        learnable: if True, beta is a Parameter named ``beta``, trained like PReLU's weight; if False (default),
            beta is a fixed float and the module has no parameters or state.
        num_parameters: with ``learnable=True``, 1 (one beta shared by all channels) or the number of channels
            C = input.size(1) (one beta per channel). Default: 1.

    Examples: ``Swish()`` is SiLU, ``Swish(1.702)`` approximates GELU, ``Swish(learnable=True, num_parameters=64)``
    learns a beta per channel.
    """

    def __init__(self, beta=1.0, learnable=False, num_parameters=1, device=None, dtype=None):
        super().__init__()
        if not learnable and num_parameters != 1:
            raise ValueError("Swish: num_parameters > 1 needs learnable=True")
        self.learnable = learnable
        self.num_parameters = num_parameters
        self.init = float(beta)
        if learnable:
            self.beta = torch.nn.Parameter(torch.empty(num_parameters, device=device, dtype=dtype))
            self.reset_parameters()
        else:
            self.beta = float(beta)

    def reset_parameters(self):
        if self.learnable:
            torch.nn.init.constant_(self.beta, self.init)

    def forward(self, input):
        return F.swish(input, self.beta)

    def extra_repr(self):
        if self.learnable:
            return f"num_parameters={self.num_parameters}, beta={self.init}, learnable=True"
        return f"beta={self.beta}"


class HardLogistic(NotScriptable, torch.nn.Module):
    r"""Hard logistic: :math:`\max(0, \min(1, 0.25x + 0.5))`, the logistic's tangent line at 0, clipped
    (``torch.nn.Hardsigmoid`` uses slope 1/6 instead of 1/4). No parameters."""

    def forward(self, input):
        return F.hard_logistic(input)
