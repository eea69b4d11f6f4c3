"""dlkern's functional API: the same signatures and semantics as ``torch.nn.functional`` (and ``torch`` for
``sigmoid``/``tanh``), running dlkern's kernels. ``import dlkern.functional as F`` can replace PyTorch's."""

import torch
import torch.nn.functional as _F

from dlkern import catalog as _catalog
from dlkern.ops import activation as _act
from dlkern.ops.arguments import int_list, type_name
from dlkern.ops import conv_block as _conv_block
from dlkern.ops import max_pool as _max_pool
from dlkern.ops import pool_block as _pool_block

__all__ = [
    "max_pool2d",
    "sigmoid", "tanh", "relu", "leaky_relu", "prelu", "elu", "softplus", "silu", "gelu", "hardsigmoid", "hardswish",
    "hardtanh", "swish", "hard_logistic",
    "conv_bn_act2d", "conv_bn_act_pool2d",
]


def _int_list(name, value):
    """A max_pool2d argument (an int or a sequence of ints) as a list, read and refused as PyTorch's parser does."""
    return int_list("max_pool2d", name, _MAX_POOL2D_POSITIONS[name], value)


_MAX_POOL2D_POSITIONS = {"kernel_size": 2, "stride": 3, "padding": 4, "dilation": 5}


def max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    """2-D max pooling, as ``torch.nn.functional.max_pool2d``; runs dlkern's C++ (CPU) or CUDA kernel.

    Returns the pooled values, or ``(values, indices)`` with ``return_indices=True``; indices are int64, flat
    ``h * W + w`` within each plane. A channels_last input gives channels_last outputs. Differentiable in reverse and
    forward mode and under the torch.func transforms (vmap included).
    """
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"max_pool2d(): argument 'input' (position 1) must be Tensor, not {type_name(input)}")
    args = _max_pool2d_args(kernel_size, stride, padding, dilation, ceil_mode)
    output, indices = _max_pool.max_pool2d(input, *args, return_indices)
    return (output, indices) if return_indices else output


def _max_pool2d_args(kernel_size, stride, padding, dilation, ceil_mode):
    """(kernel_size, stride, padding, dilation, ceil_mode) read as F.max_pool2d's argument parser reads them (lists
    of ints; stride [] when None), refused with its messages; also used by the pooled conv block."""
    kernel_size = _int_list("kernel_size", kernel_size)
    stride = [] if stride is None else _int_list("stride", stride)
    padding = _int_list("padding", padding)
    dilation = _int_list("dilation", dilation)
    if not isinstance(ceil_mode, bool):
        raise TypeError(f"max_pool2d(): argument 'ceil_mode' (position 6) must be bool, not {type_name(ceil_mode)}")
    return kernel_size, stride, padding, dilation, ceil_mode


# ---------------------------------------------------------------------------------------------------------------
# Activations (dlkern/ops/activation.py; Triton kernels in kernels/activation.py)
# ---------------------------------------------------------------------------------------------------------------


def _activation(input, act, p0=0.0, p1=0.0, inplace=False, aten=None):
    """The activation ``act`` of input; ``aten()`` (PyTorch's own op) computes, or refuses, the dtypes the kernels
    do not cover (integers, bool, complex), so that they behave exactly as in PyTorch."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{act}(): argument 'input' must be a Tensor, not {type(input).__name__}")
    if aten is not None and input.dtype not in _act.KERNEL_DTYPES:
        return aten()
    if inplace:
        return _act.activation_inplace(input, act, float(p0), float(p1))
    return _act.apply_activation(input, act, float(p0), float(p1))


def sigmoid(input):
    """``torch.sigmoid``: 1 / (1 + exp(-x)), stable at both ends; the backward reads the output."""
    return _activation(input, "sigmoid", aten=lambda: torch.sigmoid(input))


def tanh(input):
    """``torch.tanh``, with relative precision near 0; the backward reads the output."""
    return _activation(input, "tanh", aten=lambda: torch.tanh(input))


def relu(input, inplace=False):
    """``torch.nn.functional.relu``: max(x, 0); gradient 0 at 0."""
    return _activation(input, "relu", inplace=inplace, aten=lambda: _F.relu(input, inplace))


def leaky_relu(input, negative_slope=0.01, inplace=False):
    """``torch.nn.functional.leaky_relu``: x if x > 0 else negative_slope * x."""
    return _activation(input, "leaky_relu", negative_slope, inplace=inplace,
                       aten=lambda: _F.leaky_relu(input, negative_slope, inplace))


def prelu(input, weight):
    """``torch.nn.functional.prelu``: x if x > 0 else weight[c] * x, with weight of 1 or C = input.size(1)
    elements (of input's dtype, any strides); the weight gradient is a deterministic per-channel reduction."""
    if not isinstance(input, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError("prelu(): arguments 'input' and 'weight' must be Tensors")
    if input.dtype not in _act.KERNEL_DTYPES:
        return _F.prelu(input, weight)
    return _act.apply_channelwise(input, weight, "prelu")


def elu(input, alpha=1.0, inplace=False):
    """``torch.nn.functional.elu``: x if x > 0 else alpha * expm1(x)."""
    return _activation(input, "elu", alpha, inplace=inplace, aten=lambda: _F.elu(input, alpha, inplace))


def softplus(input, beta=1.0, threshold=20.0):
    """``torch.nn.functional.softplus``: log(1 + exp(beta * x)) / beta, linear where beta * x > threshold."""
    return _activation(input, "softplus", beta, threshold, aten=lambda: _F.softplus(input, beta, threshold))


def silu(input, inplace=False):
    """``torch.nn.functional.silu``: x * sigmoid(x)."""
    return _activation(input, "silu", inplace=inplace, aten=lambda: _F.silu(input, inplace))


# approximate -> the catalog's activation: {"none": "gelu", "tanh": "gelu_tanh"}
_GELU = {dict(a.fixed)["approximate"]: a.name for a in _catalog.CATALOG.values() if a.function == "gelu"}


def gelu(input, approximate="none"):
    """``torch.nn.functional.gelu``: x * Phi(x) (``approximate='none'``) or its tanh approximation (``'tanh'``)."""
    act = _GELU.get(approximate) if isinstance(approximate, str) else None
    if act is None:
        raise RuntimeError("approximate argument must be either none or tanh.")
    return _activation(input, act, aten=lambda: _F.gelu(input, approximate=approximate))


def hardsigmoid(input, inplace=False):
    """``torch.nn.functional.hardsigmoid``: clamp(x / 6 + 1/2, 0, 1); gradient 1/6 strictly inside (-3, 3)."""
    return _activation(input, "hardsigmoid", inplace=inplace, aten=lambda: _F.hardsigmoid(input, inplace))


def hardswish(input, inplace=False):
    """``torch.nn.functional.hardswish``: x * relu6(x + 3) / 6; gradient 0 for x <= -3, 1 for x >= 3, (2x + 3) / 6
    strictly inside (ATen's hardswish_backward). -0.0 at -inf (the limit) where PyTorch gives NaN, and x itself
    for x >= 3, where PyTorch's x * 6 / 6 overflows past the dtype's max / 6."""
    return _activation(input, "hardswish", inplace=inplace, aten=lambda: _F.hardswish(input, inplace))


def hardtanh(input, min_val=-1.0, max_val=1.0, inplace=False):
    """``torch.nn.functional.hardtanh``: clamp(x, min_val, max_val); gradient 1 strictly inside (0 everywhere
    with a NaN bound, whose output is NaN everywhere, as PyTorch's)."""
    if min_val > max_val:
        raise ValueError("min_val cannot be greater than max_val")
    return _activation(input, "hardtanh", min_val, max_val, inplace=inplace,
                       aten=lambda: _F.hardtanh(input, min_val, max_val, inplace))


def swish(input, beta=1.0):
    """x * sigmoid(beta * x) (dlkern; beta = 1 is SiLU). ``beta`` is a float or a tensor of 1 or C = input.size(1)
    elements (per channel, of input's dtype, any strides), which gets a gradient when it requires one.
    Floating-point inputs only (float16, bfloat16, float32, float64), as PyTorch's silu."""
    if isinstance(beta, torch.Tensor):
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"swish(): argument 'input' must be a Tensor, not {type(input).__name__}")
        return _act.apply_channelwise(input, beta, "swish")
    return _activation(input, "swish", beta)


def hard_logistic(input):
    """clamp(0.25 * x + 0.5, 0, 1) (dlkern): the logistic's tangent line at 0, clipped; gradient 1/4 strictly
    inside (-2, 2). Floating-point inputs only, as PyTorch's hardsigmoid."""
    return _activation(input, "hard_logistic")


# ---------------------------------------------------------------------------------------------------------------
# The fused Conv2d -> BatchNorm2d -> activation block (dlkern/ops/conv_block.py; kernels/conv_bn.py)
# ---------------------------------------------------------------------------------------------------------------


def conv_bn_act2d(input, weight, bias, running_mean, running_var, bn_weight=None, bn_bias=None, training=False,
                  momentum=0.1, eps=1e-5, stride=1, padding=0, dilation=1, activation="relu", activation_params=(),
                  num_batches_tracked=None, residual=None):
    """``activation(batch_norm(conv2d(input, weight, bias, stride, padding, dilation), running_mean, running_var,
    bn_weight, bn_bias, training, momentum, eps) + residual)`` in dlkern's fused Triton kernels (groups=1, zero
    padding); without ``residual`` (None, the default) no add.

    Arguments follow ``F.conv2d`` and ``F.batch_norm`` (``padding`` may be ``'same'``/``'valid'``). ``activation``:
    ``'relu'`` (default), ``'leaky_relu'``, ``'elu'``, ``'softplus'``, ``'silu'``, ``'swish'``, ``'gelu'``,
    ``'gelu_tanh'``, ``'sigmoid'``, ``'tanh'``, ``'hardsigmoid'``, ``'hardswish'``, ``'hardtanh'``,
    ``'hard_logistic'`` or ``None``; ``activation_params`` its (p0, p1) (negative_slope; alpha; beta, threshold;
    beta; min_val, max_val), PyTorch's defaults where omitted. Training updates ``running_mean``/``running_var`` in
    place (when given) as BatchNorm2d does; pass ``num_batches_tracked`` to have it incremented, which
    ``momentum=None`` (cumulative average) needs. Eval folds BatchNorm into the conv's weight and bias.
    ``residual`` (ResNet's shortcut) is added between BatchNorm and the activation, in the same pass, and gets its
    gradient from the pass that computes the conv's; a residual of another shape or dtype than the block's output
    is added as ``+`` would (broadcast, type-promoted), unfused.
    """
    return _conv_block.conv_bn_block(
        input, weight, bias, running_mean, running_var, bn_weight, bn_bias, num_batches_tracked, training,
        momentum, eps, stride, padding, dilation, activation, tuple(activation_params), residual=residual,
    )


def conv_bn_act_pool2d(input, weight, bias, running_mean, running_var, bn_weight=None, bn_bias=None, training=False,
                       momentum=0.1, eps=1e-5, stride=1, padding=0, dilation=1, activation="relu", activation_params=(),
                       num_batches_tracked=None, pool_kernel_size=2, pool_stride=None, pool_padding=0,
                       pool_dilation=1, pool_ceil_mode=False, return_indices=False):
    """``max_pool2d(conv_bn_act2d(input, ...), pool_kernel_size, pool_stride, pool_padding, pool_dilation,
    pool_ceil_mode, return_indices)``: the Conv2d -> BatchNorm2d -> activation -> MaxPool2d block.

    The arguments up to ``num_batches_tracked`` are :func:`conv_bn_act2d`'s; the ``pool_*`` ones are
    :func:`max_pool2d`'s (``pool_stride=None``: the kernel size), read and refused with its messages. Returns the
    pooled output, or ``(output, indices)`` with ``return_indices=True`` (int64, flat ``h * W + w`` within each
    plane of the block's output, as ``F.max_pool2d``'s).
    """
    pool = _max_pool2d_args(pool_kernel_size, pool_stride, pool_padding, pool_dilation, pool_ceil_mode)
    return _pool_block.conv_bn_pool_block(
        input, weight, bias, running_mean, running_var, bn_weight, bn_bias, num_batches_tracked, training,
        momentum, eps, stride, padding, dilation, activation, tuple(activation_params), *pool, return_indices,
    )
