from collections import OrderedDict

import torch
from torch import nn

from dlkern import catalog
from dlkern.nn import activation as _activation_modules  # noqa: F401 (resolves the catalog's Swish, HardLogistic)
from dlkern.functional import _max_pool2d_args
from dlkern.nn._jit import NotScriptable
from dlkern.ops import conv_block as _block
from dlkern.ops.activation import composite_forward
from dlkern.ops import pool_block as _pool_block


def _named(name):
    """The module ConvBNReLU2d(activation=name) holds: the catalog's module for the name at the catalog's
    (PyTorch's) defaults, which conv_bn_act2d(activation=name) takes too: both APIs compute the same function."""
    if name == "none":
        return nn.Identity()
    entry = catalog.CATALOG[name]
    return entry.module_types()[0](**entry.kwargs())


# For the message: the module types whose activations the block fuses (dlkern.nn's subclasses too).
_FUSABLE_MODULES = ", ".join(dict.fromkeys(
    cls.__name__ for a in catalog.CATALOG.values() if a.fusable for cls in a.module_types()))


def activation_spec(module, owner="ConvBNReLU2d"):
    """(name, p0, p1) for fusing `module` (None or nn.Identity: no activation); raises for what cannot be fused
    (the message names `owner`, the block that would fuse it)."""
    if module is None or type(module) is nn.Identity:
        return "none", 0.0, 0.0
    spec = catalog.activation_spec(module)
    if (spec is None or spec[0] not in catalog.FUSABLE or any(isinstance(p, torch.Tensor) for p in spec[1:])
            or any(True for _ in module.parameters())):
        raise NotImplementedError(
            f"{owner}: cannot fuse activation {module!r}: fusable are {_FUSABLE_MODULES} (torch.nn's or "
            "dlkern.nn's); activations with learnable parameters (PReLU, Swish with a tensor beta) are not fused"
        )
    return spec


def _has_hooks(module):
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


class _ConvBNActBlock(NotScriptable, nn.Sequential):
    """What ConvBNReLU2d and ConvBNActPool2d share: the stock Conv2d, BatchNorm2d and activation at "0"-"2" (any
    further stock modules after them), building them from the constructor arguments or sharing given ones, slicing
    to plain Sequentials, and reading the fused op's arguments from the children on every call."""

    def _init_from(self, conv, bn, activation, *rest):
        activation_spec(activation, type(self).__name__)  # fail now, not at the first forward
        nn.Sequential.__init__(self, conv, bn, nn.Identity() if activation is None else activation, *rest)

    @classmethod
    def _build(cls, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode, eps,
               momentum, affine, track_running_stats, activation, device, dtype):
        """(conv, bn, activation) from the constructor arguments."""
        _check_conv(groups, padding_mode, cls.__name__)
        if isinstance(activation, str):
            if activation not in catalog.FUSABLE:
                raise ValueError(
                    f"{cls.__name__}: unknown activation {activation!r}; names: {sorted(catalog.FUSABLE)}")
            activation = _named(activation)
        factory = dict(device=device, dtype=dtype)
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, **factory)
        bn = nn.BatchNorm2d(out_channels, eps, momentum, affine, track_running_stats, **factory)
        return conv, bn, activation

    @classmethod
    def _check_fuse(cls, conv, bn):
        if not isinstance(conv, nn.Conv2d) or not isinstance(bn, nn.BatchNorm2d):
            raise TypeError(f"{cls.__name__}.fuse: expected an nn.Conv2d and an nn.BatchNorm2d, got {conv!r}, {bn!r}")
        if bn.num_features != conv.out_channels:
            raise ValueError(f"{cls.__name__}.fuse: {bn!r} does not match the {conv.out_channels} channels of {conv!r}")
        _check_conv(conv.groups, conv.padding_mode, cls.__name__)

    def __getitem__(self, idx):
        # A slice is a part of the stock Sequential (block[:2] is conv + BatchNorm), so it is a plain Sequential.
        if isinstance(idx, slice):
            return nn.Sequential(OrderedDict(list(self._modules.items())[idx]))
        return super().__getitem__(idx)

    def _block_args(self, conv, bn, activation):
        """The conv block's arguments of conv_bn_block (and conv_bn_pool_block), read from the
        children as they are now."""
        owner = type(self).__name__
        return block_args(conv, bn, activation_spec(activation, owner), owner)


def block_args(conv, bn, spec, owner):
    """conv_bn_block's arguments after the input for stock ``conv`` -> ``bn`` -> the activation
    ``spec`` = (name, p0, p1), read from the modules as they are now (as BatchNorm2d reads its own)."""
    _check_conv(conv.groups, conv.padding_mode, owner)
    name, p0, p1 = spec
    # As BatchNorm2d: batch statistics in training, or in eval without running buffers; the buffers are
    # updated only in training with track_running_stats.
    training = bn.training or (bn.running_mean is None and bn.running_var is None)
    use_buffers = not bn.training or bn.track_running_stats
    return (
        conv.weight, conv.bias,
        bn.running_mean if use_buffers else None, bn.running_var if use_buffers else None,
        bn.weight, bn.bias, bn.num_batches_tracked if bn.training and bn.track_running_stats else None,
        training, bn.momentum, bn.eps, conv.stride, conv.padding, conv.dilation, name, (p0, p1),
    )


def fused_forward(input, conv, bn, spec, pool=None, owner="dlkern.convert", residual=None, residual_at="before_act",
                  pool_before_bn=False):
    """What ConvBNReLU2d.forward (ConvBNActPool2d.forward with ``pool``) computes unhooked, for modules held
    anywhere: ``pool(activation(bn(conv(input))))`` in one fused op, ``spec`` = (name, p0, p1) the activation;
    with ``residual``, ``activation(bn(conv(input)) + residual)`` (``residual_at="after_act"``:
    ``activation(bn(conv(input))) + residual``); with ``pool_before_bn``, ``activation(bn(pool(conv(input))))``.
    A converted forward (dlkern.convert_graph.fused_conv_bn) calls it; it checks no hooks."""
    args = block_args(conv, bn, spec, owner)
    if pool_before_bn:
        return _pool_before_bn(input, conv, bn, spec, pool, args)
    if pool is None:
        return _block.conv_bn_block(input, *args, residual=residual, residual_at=residual_at)
    _check_pool(pool)
    pool_args = _max_pool2d_args(pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode)
    return _pool_block.conv_bn_pool_block(input, *args, *pool_args)


def _pool_before_bn(input, conv, bn, spec, pool, args):
    """``activation(bn(pool(conv(input))))``: fused where the pool fits the conv's epilogue (windows that do not
    overlap; training, or inference without autograd), else the modules' own ops one by one."""
    _check_pool(pool)
    pool_args = _max_pool2d_args(pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode)
    window = _pool_block.fusable_window(input, conv.weight, conv.stride, conv.padding, conv.dilation, *pool_args)
    if window is not None:
        fused = _block.conv_bn_block(input, *args, pool=window, pool_before_bn=True)
        if fused is not None:
            return fused[0]
    out = bn(pool(conv(input)))
    return out if spec[0] == "none" else composite_forward(out, *spec)


class ConvBNReLU2d(_ConvBNActBlock):
    """``nn.Sequential(nn.Conv2d, nn.BatchNorm2d, activation)`` computed by dlkern's fused Triton kernels.

    Takes Conv2d's and BatchNorm2d's constructor arguments and holds those modules at "0" and "1" (the
    activation, ReLU by default, at "2"), so parameters, buffers and state_dict keys are the stock Sequential's
    and state_dicts load both ways with strict=True. ``activation``: a module (``nn.ReLU()``,
    ``nn.LeakyReLU(0.2)``, a dlkern activation, ...), one of the names ``conv_bn_act2d`` accepts (``"relu"``,
    ``"swish"``, ``"hard_logistic"``, ``"none"``, ...; parameters at PyTorch's defaults), or None for none.
    Training normalizes with batch statistics and updates the running buffers as BatchNorm2d does; eval reads
    the running buffers on every call (inference: in the conv kernel's epilogue; with autograd: folded into the
    conv's weight and bias), so it never serves a stale folding after an EMA update through ``.data`` or a new
    Parameter. groups=1 and padding_mode='zeros' only.

    Hooks: while any of the three children has a forward, forward-pre or backward hook (registered on
    ``block[0]``, ``block[1]`` or ``block[2]``; ``torch.nn.utils.prune`` is one), the block runs its children
    one by one as the stock Sequential does, so every hook runs; without such hooks it runs fused.

    A deliberate difference (training): a conv bias ahead of BatchNorm cancels out of the output, so its gradient
    is mathematically zero. dlkern computes exactly zero; stock PyTorch gets rounding noise there, which Adam
    (normalizing the gradient) turns into a random walk of about ``lr`` per step. So after training the two
    models' conv biases and running means differ slightly and their eval outputs differ slightly, though every
    training loss agrees. Use ``bias=False`` on a conv followed by BatchNorm (the bias is redundant there).

    ``torch.jit.script`` raises a clear error (use ``torch.jit.trace``, ``torch.export`` or ``torch.compile``).
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, padding_mode="zeros", eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 activation="relu", device=None, dtype=None):
        self._init_from(*self._build(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                                     bias, padding_mode, eps, momentum, affine, track_running_stats, activation,
                                     device, dtype))

    @classmethod
    def fuse(cls, conv, bn, activation=None):
        """The fused block over existing modules (their parameters and buffers are shared, not copied)."""
        cls._check_fuse(conv, bn)
        block = cls.__new__(cls)
        block._init_from(conv, bn, activation)
        return block

    def forward(self, input):
        conv, bn, activation = self._modules.values()  # Sequential's __getitem__ costs ~3 µs an item
        if any(_has_hooks(m) for m in (conv, bn, activation)):
            return nn.Sequential.forward(self, input)  # the stock computation, so that the hooks run
        return _block.conv_bn_block(input, *self._block_args(conv, bn, activation))


class ConvBNActPool2d(_ConvBNActBlock):
    """``nn.Sequential(nn.Conv2d, nn.BatchNorm2d, activation, nn.MaxPool2d)`` as one dlkern block.

    ConvBNReLU2d's constructor arguments, then MaxPool2d's as ``pool_kernel_size`` (2), ``pool_stride`` (None:
    the kernel size), ``pool_padding``, ``pool_dilation`` and ``pool_ceil_mode``. It holds the four stock modules
    at "0"-"3", so parameters, buffers and state_dict keys are the stock Sequential's (both ways, strict=True);
    ``fuse(conv, bn, activation, pool)`` wraps existing ones. Everything ConvBNReLU2d documents holds (training
    and eval, hooks on any of the four children, slicing, the conv bias's exact zero gradient, no
    ``torch.jit.script``). A pool with ``return_indices=True`` is refused: its (values, indices) could not go
    on through a Sequential (``dlkern.functional.conv_bn_act_pool2d`` returns them).
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, padding_mode="zeros", eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 activation="relu", pool_kernel_size=2, pool_stride=None, pool_padding=0, pool_dilation=1,
                 pool_ceil_mode=False, device=None, dtype=None):
        pool = nn.MaxPool2d(pool_kernel_size, pool_stride, pool_padding, pool_dilation, ceil_mode=pool_ceil_mode)
        self._init_from(*self._build(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                                     bias, padding_mode, eps, momentum, affine, track_running_stats, activation,
                                     device, dtype), pool)

    @classmethod
    def fuse(cls, conv, bn, activation, pool):
        """The block over existing modules (their parameters and buffers are shared, not copied); ``activation``
        may be None (none)."""
        cls._check_fuse(conv, bn)
        block = cls.__new__(cls)
        block._init_from(conv, bn, activation, pool)
        return block

    def _init_from(self, conv, bn, activation, pool):
        _check_pool(pool)
        super()._init_from(conv, bn, activation, pool)

    def forward(self, input):
        conv, bn, activation, pool = self._modules.values()
        if any(_has_hooks(m) for m in (conv, bn, activation, pool)):
            return nn.Sequential.forward(self, input)  # the stock computation, so that the hooks run
        _check_pool(pool)
        pool_args = _max_pool2d_args(pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode)
        return _pool_block.conv_bn_pool_block(input, *self._block_args(conv, bn, activation), *pool_args)


def _check_pool(pool):
    if not isinstance(pool, nn.MaxPool2d):
        raise TypeError(f"ConvBNActPool2d: expected an nn.MaxPool2d after the activation, got {pool!r}")
    if pool.return_indices:
        raise ValueError(
            f"ConvBNActPool2d: cannot hold {pool!r}: with return_indices=True it returns (values, indices), which "
            "a Sequential cannot pass on; use dlkern.functional.conv_bn_act_pool2d(..., return_indices=True)"
        )


def _check_conv(groups, padding_mode, owner):
    if groups != 1:
        raise ValueError(f"{owner}: only groups=1 is supported, got groups={groups}")
    if padding_mode != "zeros":
        raise ValueError(f"{owner}: only padding_mode='zeros' is supported, got padding_mode={padding_mode!r}")
