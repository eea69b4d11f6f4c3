"""Shapes, layouts and per-channel checks that every part of the fused conv block shares (ops, launchers,
composites, fakes)."""

import torch
from torch._prims_common import suggest_memory_format

from dlkern import _compat


def geometry(input, weight, stride, padding, dilation):
    """(N, C_in, H, W, C_out, KH, KW, OH, OW); ``padding`` is (top, bottom, left, right)."""
    N, C_in, H, W = input.shape
    C_out, _, KH, KW = weight.shape
    OH = (H + padding[0] + padding[1] - dilation[0] * (KH - 1) - 1) // stride[0] + 1
    OW = (W + padding[2] + padding[3] - dilation[1] * (KW - 1) - 1) // stride[1] + 1
    return N, C_in, H, W, C_out, KH, KW, OH, OW


def memory_format(input):
    """suggest_memory_format(input), without its stride walk for a contiguous input (never channels_last-like)."""
    return torch.contiguous_format if input.is_contiguous() else suggest_memory_format(input)


def empty_like_format(input, shape, dtype):
    return torch.empty(shape, dtype=dtype, device=input.device, memory_format=memory_format(input))


def dense(*tensors):
    """The kernels index these per channel (bias, BatchNorm's weight and bias) or per element (the conv weight)
    as dense arrays: strided or expanded ones are copied (a no-op for contiguous ones)."""
    return [None if t is None else t.contiguous() for t in tensors]


def like_z(residual, z):
    """The residual in z's layout (the elementwise passes index both with z's offsets): a copy only where the
    layouts differ."""
    if residual is None or residual.stride() == z.stride():
        return residual
    return residual.contiguous(memory_format=memory_format(z))


def vector(t, dtype):
    """A per-channel tensor (any shape of C elements, as BatchNorm accepts) as a C-vector of dtype, or None."""
    return None if t is None else t.to(dtype).reshape(-1)


def check(condition, message):
    """torch._check with a ready message: Dynamo (fullgraph) traces a message closure only over constants.
    Under torch.jit.trace a size (numel()) is a traced 0-d tensor: the condition is then read as a bool."""
    if condition is True:  # the common case, without torch._check's cost (~1.5 µs)
        return
    if isinstance(condition, torch.Tensor):
        condition = bool(condition)
    _compat.check(condition, message)


def check_bn_sizes(channels, running_mean=None, running_var=None, bn_weight=None, bn_bias=None):
    """PyTorch's checks (and messages, in its order) of BatchNorm's per-channel tensors, in the ops and fakes too."""
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", bn_weight),
                    ("bias", bn_bias)):
        if t is not None and (size := t.numel()) != channels:  # the message is built only for a bad size
            check(size == channels, f"{name} should contain {channels} elements not {size}")


def check_residual(residual, shape, dtype):
    """The ops' check of a residual: the block output's shape and dtype (the entry point adds it unfused
    otherwise, as torch's broadcasting, type-promoting add would)."""
    if residual is not None:
        check(tuple(residual.shape) == tuple(shape) and residual.dtype == dtype,
              f"dlkern.conv_bn_act2d: the residual must have the block output's shape {tuple(shape)} and dtype "
              f"{dtype}, got {tuple(residual.shape)} and {residual.dtype}")


def written(*tensors):
    """Version counters up for buffers a kernel wrote (as an in-place ATen op's would go), so that a backward
    that saved one of them raises instead of reading the new values. Here rather than in an ADInplaceOrView
    kernel, which would put a second Python call on every training step."""
    for t in tensors:
        if t is not None and not t.is_inference():
            torch.autograd.graph.increment_version(t)


def empty_grads(input):
    """``empty()``: a fresh empty tensor for each gradient a backward skips (an op's outputs may not alias)."""
    return lambda: input.new_empty(0)


def bn_grads(bn_weight, bn_bias, affine, empty):
    """Dense (contiguous) buffers for the BatchNorm weight and bias gradients, or empty ones without affine."""
    if not affine:
        return empty(), empty()
    return [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (bn_weight, bn_bias)]


def train_geometry(input, weight, bn_weight, bn_bias, running_mean, running_var, residual, stride, padding,
                   dilation):
    """The training op's own checks (the entry point makes PyTorch's first), shared by its kernels and its fake;
    returns geometry()."""
    geo = geometry(input, weight, stride, padding, dilation)
    N, C_in, H, W, C_out, KH, KW, OH, OW = geo
    check_bn_sizes(C_out, running_mean, running_var, bn_weight, bn_bias)
    check_residual(residual, (N, C_out, OH, OW), input.dtype)
    for buf in (running_mean, running_var):
        # As PyTorch's in-place ops: an expanded buffer has no one place to hold each channel's statistic.
        check(
            buf is None or torch._debug_has_internal_overlap(buf) != 1,
            "unsupported operation: more than one element of the written-to tensor refers to a single memory "
            "location. Please clone() the tensor before performing the operation.",
        )
    return geo


def backward_setup(input, weight, stats, bn_weight, bn_bias, stride, padding, dilation):
    """(geometry, BatchNorm?, affine?, empty, grad_gamma, grad_beta) of a backward call. Skipped gradients come
    back as empty tensors, each its own (``empty()``): an op's outputs may not alias each other."""
    geo = geometry(input, weight, stride, padding, dilation)
    bn, affine = stats is not None, bn_weight is not None and stats is not None
    check_bn_sizes(geo[4], bn_weight=bn_weight, bn_bias=bn_bias)
    empty = empty_grads(input)
    return (geo, bn, affine, empty, *bn_grads(bn_weight, bn_bias, affine, empty))
