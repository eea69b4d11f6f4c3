"""The Conv2d -> BatchNorm2d -> activation -> MaxPool2d block: :func:`conv_bn_pool_block`, the one entry point of
``dlkern.functional.conv_bn_act_pool2d`` and ``dlkern.nn.ConvBNActPool2d``.

Where the fused kernels cover the pool (windows that do not overlap, dilation 1; training, and inference without
autograd) and run (CUDA, or a CPU in Triton's interpreter) the max pool runs inside the conv block's kernels
(dlkern/ops/conv_block.py: ``conv_bn_block(pool=...)``, the pool in the block's epilogue),
its argmax kept as one byte per pooled element; everything else is the fused conv block followed by dlkern's
max pool (dlkern/ops/max_pool.py), exactly what ``max_pool2d(conv_bn_act2d(...))`` computes.
"""

import torch

from dlkern.ops import max_pool as _max_pool
from dlkern.ops.arguments import is_plain
from dlkern.ops import conv_block as _block
from dlkern.ops.conv_block import conv_geometry
from dlkern.ops.conv_epilogue import pool_fusable, pool_output_size, window_indices
from dlkern.ops.conv_shapes import memory_format
from dlkern.ops.triton_support import cpu_runs_triton, remembered


def conv_bn_pool_block(input, weight, bias, running_mean, running_var, bn_weight, bn_bias, num_batches_tracked, training,
            momentum, eps, stride, padding, dilation, activation, activation_params, pool_kernel_size, pool_stride,
            pool_padding, pool_dilation, pool_ceil_mode, return_indices=False):
    """``max_pool2d(conv_bn_act2d(...))``: the pooled output, or (output, int64 indices) with ``return_indices``.

    The conv block's arguments are ``conv_bn_block``'s; the pool's are already read as
    ``F.max_pool2d`` reads them (lists of ints, ``pool_stride`` [] for the kernel size; see
    ``dlkern.functional._max_pool2d_args``). The pool's value checks (kernel, stride and dilation > 0, padding
    at most half the kernel, output size >= 1) run on the block's output, with ATen's messages: as in the stock
    Sequential, they raise after a training block has updated the running statistics.
    """
    pool = None
    # Fused where the Triton kernels run. A CPU without them runs ATen's conv block and dlkern's C++ max pool: the
    # fused op's composite would pool the same way and add the window taps' encoding and a scatter back.
    if isinstance(input, torch.Tensor) and (input.is_cuda or cpu_runs_triton()):
        pool = fusable_window(input, weight, stride, padding, dilation, pool_kernel_size, pool_stride, pool_padding,
                           pool_dilation, pool_ceil_mode)
    if pool is not None and (training or not return_indices):  # (inference keeps no window taps)
        fused = _block.conv_bn_block(input, weight, bias, running_mean, running_var, bn_weight, bn_bias,
                                 num_batches_tracked, training, momentum, eps, stride, padding, dilation, activation,
                                 activation_params, pool=pool)
        if fused is not None:
            out, taps = fused
            if not return_indices:
                return out
            width = conv_geometry(input, weight, stride, padding, dilation)[-1]
            indices = window_indices(taps, width, *pool[:3])  # pool: (kernel, stride, padding, ceil)
            return out, indices.contiguous(memory_format=memory_format(taps))
    out = _block.conv_bn_block(input, weight, bias, running_mean, running_var, bn_weight, bn_bias, num_batches_tracked,
                           training, momentum, eps, stride, padding, dilation, activation, activation_params)
    pooled, indices = _max_pool.max_pool2d(out, pool_kernel_size, pool_stride, pool_padding, pool_dilation,
                                           pool_ceil_mode, return_indices)
    return (pooled, indices) if return_indices else pooled


_fused_pool_cache = {}


def fusable_window(input, weight, stride, padding, dilation, kernel_size, pool_stride, pool_padding, pool_dilation,
                ceil_mode):
    """The pool as conv_bn_block(pool=...) takes it, when the fused kernels cover it and its arguments are
    surely valid (so that every refusal keeps coming from max_pool2d, with ATen's message): windows that do not
    overlap, dilation 1, padding at most half the kernel, a non-empty output. Else None. Remembered per shapes
    and arguments (its checks cost ~10 us)."""
    def check():
        return _check_pool(input, weight, stride, padding, dilation, kernel_size, pool_stride, pool_padding,
                           pool_dilation, ceil_mode)

    if not (is_plain(stride) and is_plain(padding) and is_plain(dilation)):  # keys must not confuse 1.0 with 1
        return check()
    key = (input.shape, weight.shape, tuple(stride) if type(stride) is list else stride,
           tuple(padding) if type(padding) is list else padding, tuple(dilation) if type(dilation) is list else dilation,
           tuple(kernel_size), tuple(pool_stride), tuple(pool_padding), tuple(pool_dilation), ceil_mode)
    return remembered(_fused_pool_cache, key, check)


def _check_pool(input, weight, stride, padding, dilation, kernel_size, pool_stride, pool_padding, pool_dilation,
                ceil_mode):
    try:
        if not all(len(a) in (1, 2) for a in (kernel_size, pool_padding, pool_dilation)) or len(pool_stride) > 2:
            return None
        kernel = (kernel_size[0], kernel_size[-1])
        pstride = (pool_stride[0], pool_stride[-1]) if pool_stride else kernel
        ppad = (pool_padding[0], pool_padding[-1])
        pdil = (pool_dilation[0], pool_dilation[-1])
        if min(kernel) <= 0 or min(ppad) < 0 or any(p > k // 2 for p, k in zip(ppad, kernel)):
            return None
        if not pool_fusable(kernel, pstride, pdil) or input.dim() != 4 or weight.dim() != 4:
            return None
        OH, OW = conv_geometry(input, weight, stride, padding, dilation)[-2:]
        if min(OH, OW) < 1:
            return None
        pool = (kernel, pstride, ppad, bool(ceil_mode))
        if min(pool_output_size(OH, OW, pool)) < 1:
            return None
        return pool
    except (TypeError, ValueError, IndexError, RuntimeError):  # whatever is wrong, the composition reports it
        return None
