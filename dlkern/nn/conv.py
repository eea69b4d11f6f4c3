import torch
from torch import nn

from dlkern.ops import conv_bn as _ops
from dlkern.ops.activation import activation_spec as family_spec

# Activation names accepted by ConvBNReLU2d(activation=...), as the stock modules they stand for.
_NAMED = {
    "relu": nn.ReLU, "leaky_relu": nn.LeakyReLU, "elu": nn.ELU, "softplus": nn.Softplus, "silu": nn.SiLU,
    "gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU(approximate="tanh"), "sigmoid": nn.Sigmoid, "tanh": nn.Tanh,
    "hardsigmoid": nn.Hardsigmoid, "hardtanh": nn.Hardtanh, "none": nn.Identity,
}


def activation_spec(module):
    """(name, p0, p1) for fusing `module` (None or nn.Identity: no activation); raises for what cannot be fused."""
    if module is None or type(module) is nn.Identity:
        return "none", 0.0, 0.0
    spec = family_spec(module)
    if spec is None or any(isinstance(p, torch.Tensor) for p in spec[1:]) or any(True for _ in module.parameters()):
        raise NotImplementedError(
            f"ConvBNReLU2d: cannot fuse activation {module!r}: fusable are ReLU, LeakyReLU, ELU, Softplus, SiLU, "
            "GELU, Sigmoid, Tanh, Hardsigmoid, Hardtanh and dlkern's parameter-free activations; activations "
            "with learnable parameters (PReLU, Swish with a tensor beta) are not fused"
        )
    return spec


class ConvBNReLU2d(nn.Sequential):
    """``nn.Sequential(nn.Conv2d, nn.BatchNorm2d, activation)`` computed by dlkern's fused Triton kernels.

    Takes Conv2d's and BatchNorm2d's constructor arguments and holds those modules at "0" and "1" (the
    activation, ReLU by default, at "2"), so parameters, buffers and state_dict keys are the stock Sequential's
    and state_dicts load both ways with strict=True. ``activation``: a module (``nn.ReLU()``,
    ``nn.LeakyReLU(0.2)``, a dlkern activation, ...), a name (``"relu"``, ``"gelu"``, ...), or None for none.
    Training normalizes with batch statistics and updates the running buffers as BatchNorm2d does; eval uses
    BatchNorm folded into the conv's weight and bias (cached until a parameter or buffer changes).
    groups=1 and padding_mode='zeros' only.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, padding_mode="zeros", eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 activation="relu", device=None, dtype=None):
        _check_conv(groups, padding_mode)
        if isinstance(activation, str):
            if activation not in _NAMED:
                raise ValueError(f"ConvBNReLU2d: unknown activation {activation!r}; names: {sorted(_NAMED)}")
            activation = _NAMED[activation]()
        factory = dict(device=device, dtype=dtype)
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, **factory)
        bn = nn.BatchNorm2d(out_channels, eps, momentum, affine, track_running_stats, **factory)
        self._init_from(conv, bn, activation)

    @classmethod
    def fuse(cls, conv, bn, activation=None):
        """The fused block over existing modules (their parameters and buffers are shared, not copied)."""
        if not isinstance(conv, nn.Conv2d) or not isinstance(bn, nn.BatchNorm2d):
            raise TypeError(f"ConvBNReLU2d.fuse: expected an nn.Conv2d and an nn.BatchNorm2d, got {conv!r}, {bn!r}")
        if bn.num_features != conv.out_channels:
            raise ValueError(f"ConvBNReLU2d.fuse: {bn!r} does not match the {conv.out_channels} channels of {conv!r}")
        _check_conv(conv.groups, conv.padding_mode)
        block = cls.__new__(cls)
        block._init_from(conv, bn, nn.Identity() if activation is None else activation)
        return block

    def _init_from(self, conv, bn, activation):
        activation_spec(activation)  # fail now, not at the first forward
        nn.Sequential.__init__(self, conv, bn, nn.Identity() if activation is None else activation)
        self._fold_key, self._fold = None, None

    def _folded(self, conv, bn):
        """BatchNorm folded into the conv, cached while no tensor it reads changes (keyed on their storage and
        version counters). Not cached when autograd must see the folding, nor while torch.compile traces."""
        tensors = (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
        if torch.compiler.is_compiling() or (
            torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
        ):
            return None
        key = (bn.eps,) + tuple(None if t is None else (t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)
        if key != self._fold_key:
            with torch.no_grad():
                self._fold = _ops.fold_bn(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight,
                                          bn.bias, bn.eps)
            self._fold_key = key
        return self._fold

    def forward(self, input):
        conv, bn, activation = self[0], self[1], self[2]
        _check_conv(conv.groups, conv.padding_mode)
        name, p0, p1 = activation_spec(activation)
        # As BatchNorm2d: batch statistics in training, or in eval without running buffers; the buffers are
        # updated only in training with track_running_stats.
        training = bn.training or (bn.running_mean is None and bn.running_var is None)
        use_buffers = not bn.training or bn.track_running_stats
        return _ops.forward(
            input, conv.weight, conv.bias,
            bn.running_mean if use_buffers else None, bn.running_var if use_buffers else None,
            bn.weight, bn.bias, bn.num_batches_tracked if bn.training and bn.track_running_stats else None,
            training, bn.momentum, bn.eps, conv.stride, conv.padding, conv.dilation, name, (p0, p1),
            folded=None if training else self._folded(conv, bn),
        )


def _check_conv(groups, padding_mode):
    if groups != 1:
        raise ValueError(f"ConvBNReLU2d: only groups=1 is supported, got groups={groups}")
    if padding_mode != "zeros":
        raise ValueError(f"ConvBNReLU2d: only padding_mode='zeros' is supported, got padding_mode={padding_mode!r}")
