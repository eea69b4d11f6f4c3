"""dlkern's modules: drop-in twins of their ``torch.nn`` namesakes (same constructor arguments, repr, parameters
and state_dict keys -- they subclass them), running dlkern's kernels."""

from dlkern.nn.activation import (
    ELU, GELU, PReLU, ReLU, SiLU, Sigmoid, Softplus, Swish, Tanh, Hardsigmoid, Hardswish, Hardtanh, HardLogistic,
    LeakyReLU,
)
from dlkern.nn.conv import ConvBNActPool2d, ConvBNReLU2d
from dlkern.nn.pooling import MaxPool2d

__all__ = [
    "MaxPool2d",
    "Sigmoid", "Tanh", "ReLU", "LeakyReLU", "PReLU", "ELU", "Softplus", "SiLU", "GELU", "Hardsigmoid", "Hardswish",
    "Hardtanh", "Swish", "HardLogistic",
    "ConvBNReLU2d", "ConvBNActPool2d",
]
