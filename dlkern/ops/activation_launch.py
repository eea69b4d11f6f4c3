"""How the activation kernels (kernels/activation.py) are launched: a layout plan per call (dense tensors walked as
flat memory in any dense layout, others through their strides in up to four coalesced dims, a dense copy beyond),
the grids and tuning keys, and the deterministic per-channel reductions behind prelu's and swish's parameter
gradients. Torch in, torch out; the checks, the op registrations and autograd live in dlkern.ops.activation_ops
and dlkern.ops.activation.
"""

import math

import torch

from dlkern.kernels.activation import (
    activation_bwd_kernel,
    activation_fwd_kernel,
    channel_sum_kernel,
    channelwise_bwd_kernel,
)
from dlkern.ops.triton_support import cdiv, compute_dtype, INTERPRETING, launch, next_power_of_2, sm_count


def _is_dense(t):
    """Non-overlapping and dense: the elements fill numel consecutive slots from data_ptr(), in some order."""
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def plan_layout(tensors):
    """Kernel layout arguments for same-shaped tensors (the output first): (STRIDED, sizes[1:4], strides per tensor),
    or None when a strided walk would need more than 4 dims."""

    def strides_of(t):
        return tuple(st for sz, st in zip(t.shape, t.stride()) if sz != 1)

    out = tensors[0]
    if all(t.is_contiguous() for t in tensors):  # the common case, without the stride analysis below
        return False, (1, 1, 1), [(0, 0, 0, 0)] * len(tensors)
    if _is_dense(out) and all(strides_of(t) == strides_of(out) for t in tensors[1:]):
        return False, (1, 1, 1), [(0, 0, 0, 0)] * len(tensors)
    # Drop size-1 dims and merge neighbours that are contiguous with each other in every tensor.
    dims = []
    for d, size in enumerate(out.shape):
        if size == 1:
            continue
        strides = [t.stride(d) for t in tensors]
        if dims and all(outer == st * size for outer, st in zip(dims[-1][1], strides)):
            dims[-1] = (dims[-1][0] * size, strides)
        else:
            dims.append((size, strides))
    if len(dims) > 4:
        return None
    dims = [(1, [0] * len(tensors))] * (4 - len(dims)) + dims
    sizes = tuple(size for size, _ in dims[1:])
    return True, sizes, [tuple(strides[i] for _, strides in dims) for i in range(len(tensors))]


def _channel_args(x, weight, strided):
    """(C, ch_div, w_stride): a kernel reads the parameter of element i at ((i // ch_div) % C) * w_stride, so
    a weight of any stride (a slice, an expanded scalar) is read where it lives."""
    if weight is None or weight.numel() == 1:
        return 1, 1, 0
    w_stride = weight.stride(-1)
    if strided:  # i is the logical row-major index
        return x.shape[1], math.prod(x.shape[2:]), w_stride
    return x.shape[1], x.stride(1), w_stride  # i is the memory offset (dense)


def _size_bucket(numel):
    # Tuning key: one bucket per factor of 16 in size, so a new size reuses the tuned config of its bucket.
    return numel.bit_length() // 4


def _grid(numel):
    return lambda meta: (cdiv(numel, meta["BLOCK"]),)


def launch_forward(y, x, act, p0, p1, weight=None):
    numel = x.numel()
    if numel == 0:
        return
    plan = plan_layout([y, x])
    if plan is None:  # > 4 strided dims that do not merge: run on a dense copy
        x_dense = x.contiguous()
        y_dense = x_dense if y.data_ptr() == x.data_ptr() else torch.empty_like(x_dense)
        launch_forward(y_dense, x_dense, act, p0, p1, weight)
        y.copy_(y_dense)
        return
    strided, sizes, (y_strides, x_strides) = plan
    C, ch_div, w_stride = _channel_args(x, weight, strided)
    launch(
        activation_fwd_kernel, _grid(numel),
        x, y, x if weight is None else weight,
        numel, _size_bucket(numel), float(p0), float(p1), C, ch_div, w_stride,
        *sizes, *x_strides, *y_strides,
        ACT=act, PER_CHANNEL=weight is not None, STRIDED=strided,
    )


def launch_backward(dx, grad_output, saved, act, p0, p1, from_output, weight=None, dw_elems=None):
    numel = saved.numel()
    if numel == 0:
        return
    plan = plan_layout([dx, grad_output, saved])
    if plan is None:
        grad_output, saved = grad_output.contiguous(), saved.contiguous()
        dx_dense = torch.empty_like(saved)
        dw_dense = None if dw_elems is None else torch.empty_like(saved, dtype=dw_elems.dtype)
        launch_backward(dx_dense, grad_output, saved, act, p0, p1, from_output, weight, dw_dense)
        dx.copy_(dx_dense)
        if dw_elems is not None:
            dw_elems.copy_(dw_dense)
        return
    strided, sizes, (dx_strides, g_strides, s_strides) = plan
    C, ch_div, w_stride = _channel_args(saved, weight, strided)
    launch(
        activation_bwd_kernel, _grid(numel),
        grad_output, saved, saved if weight is None else weight, dx, dx if dw_elems is None else dw_elems,
        numel, _size_bucket(numel), float(p0), float(p1), C, ch_div, w_stride,
        *sizes, *g_strides, *s_strides, *dx_strides,
        ACT=act, FROM_OUTPUT=from_output, PER_CHANNEL=weight is not None, NEED_DW=dw_elems is not None,
        STRIDED=strided,
    )


def _oci(t, channels):
    """(O, I) of a dense tensor whose memory is an (O, C, I) array, C = `channels` the size of dim 1 (all of the
    tensor, C = 1, when `channels` is 1)."""
    if channels == 1:
        return 1, t.numel()
    return t.numel() // (channels * t.stride(1)), t.stride(1)


def _splits(O, I, channels, device, tile):
    """(block_c, block_k, channel blocks, splits, chunk): how a per-channel reduction over an (O, C, I) array is
    cut into (channel block, split) programs, each adding `chunk` of the O * I positions per channel, in tiles of
    about `tile` elements (BLOCK_C x BLOCK_K)."""
    block_c = min(next_power_of_2(channels), 64) if I == 1 else 1
    # Under the interpreter, small tiles and two splits let the tests' tiny tensors cross both boundaries.
    block_k = 16 if INTERPRETING else max(16, min(1024, tile // block_c))
    # Enough (channel block, split) programs to fill a GPU; the split depends on the shape only.
    c_blocks = cdiv(channels, block_c)
    target = 2 * c_blocks if INTERPRETING else 4 * sm_count(device)
    splits = max(1, min(cdiv(target, c_blocks), cdiv(O * I, block_k)))
    chunk = cdiv(cdiv(O * I, splits), block_k) * block_k
    return block_c, block_k, c_blocks, cdiv(O * I, chunk), chunk


def _sum_splits(partial, channels):
    """The (splits, channels) partial sums added per channel, one program per channel block (no launch for one
    split: up to one tile of positions per channel, or channel blocks enough to fill the GPU alone)."""
    splits = partial.shape[0]
    if splits == 1:
        return partial.view(channels)
    total = torch.empty((1, channels), dtype=partial.dtype, device=partial.device)
    block_c = min(next_power_of_2(channels), 64)
    launch(channel_sum_kernel, (cdiv(channels, block_c), 1), partial, total, splits, channels, 1, splits, splits,
           BLOCK_C=block_c, BLOCK_K=min(next_power_of_2(splits), 64))
    return total.view(channels)


def _channel_sum(elems, channels):
    """Per-channel sums of a dense tensor whose channel dim is 1 (all of it when channels == 1), in a fixed
    order: per-(channel block, split) partial sums, then one program per channel block adds the splits."""
    O, I = _oci(elems, channels)
    block_c, block_k, c_blocks, splits, chunk = _splits(O, I, channels, elems.device, tile=4096)
    partial = torch.empty((splits, channels), dtype=elems.dtype, device=elems.device)
    launch(channel_sum_kernel, (c_blocks, splits), elems, partial, O, channels, I, O * I, chunk,
           BLOCK_C=block_c, BLOCK_K=block_k)
    return _sum_splits(partial, channels)



def _one_dense_layout(*tensors):
    """Whether the tensors share one layout whose memory is an (O, C, I) array, C = dim 1: contiguous, or
    channels_last."""
    first = tensors[0]
    if any(t.stride() != first.stride() for t in tensors[1:]):
        return False
    return first.is_contiguous() or (first.dim() == 4 and first.is_contiguous(memory_format=torch.channels_last))


def channelwise_backward(grad_output, x, weight, act, weight_grad):
    """(dx, dw) for prelu / tensor-beta swish (dw empty when weight_grad is False): one pass where x, grad_output
    and dx share one (O, C, I) layout, else the elementwise backward and a two-pass channel sum."""
    dx = torch.empty_like(x)
    channels = 1 if weight.numel() == 1 else weight.numel()
    if weight_grad and x.numel() > 0 and _one_dense_layout(x, grad_output, dx):
        # one pass: dx and per-split weight-gradient sums, then the splits added (2 launches, no per-element dw)
        O, I = _oci(x, channels)
        # 1024-element tiles: the activation's backward per element takes registers (4096 spilled, sm_90)
        block_c, block_k, c_blocks, splits, chunk = _splits(O, I, channels, x.device, tile=1024)
        partial = torch.empty((splits, channels), dtype=compute_dtype(x.dtype), device=x.device)
        launch(channelwise_bwd_kernel, (c_blocks, splits), grad_output, x, weight, dx, partial, O, channels, I,
               O * I, chunk, 0 if weight.numel() == 1 else weight.stride(-1), 0.0, ACT=act, BLOCK_C=block_c,
               BLOCK_K=block_k)
        return dx, _sum_splits(partial, channels).to(weight.dtype).view(weight.shape)
    dw_elems = torch.empty_like(dx, dtype=compute_dtype(x.dtype)) if weight_grad else None
    launch_backward(dx, grad_output, x, act, 0.0, 0.0, False, weight, dw_elems)
    if not weight_grad:
        return dx, weight.new_empty(0)
    if x.numel() == 0:
        return dx, torch.zeros_like(weight, memory_format=torch.contiguous_format)
    return dx, _channel_sum(dw_elems, channels).to(weight.dtype).view(weight.shape)

