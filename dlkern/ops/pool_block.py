"""The Conv2d -> BatchNorm2d -> activation -> MaxPool2d block: the one entry point of
``dlkern.functional.conv_bn_act_pool2d`` and ``dlkern.nn.ConvBNActPool2d``.

Today it is the fused conv block (dlkern/ops/conv_bn.py) followed by dlkern's max pool (dlkern/ops/max_pool.py),
exactly what ``max_pool2d(conv_bn_act2d(...))`` computes. A fused op (the pool in the block's epilogue, its
argmax kept as one byte per pooled element) replaces the composition where it covers the arguments; everything
else keeps this path.
"""

from dlkern.ops import conv_bn as _conv_bn
from dlkern.ops import max_pool as _max_pool


def forward(input, weight, bias, running_mean, running_var, bn_weight, bn_bias, num_batches_tracked, training,
            momentum, eps, stride, padding, dilation, activation, activation_params, pool_kernel_size, pool_stride,
            pool_padding, pool_dilation, pool_ceil_mode, return_indices=False):
    """``max_pool2d(conv_bn_act2d(...))``: the pooled output, or (output, int64 indices) with ``return_indices``.

    The conv block's arguments are ``dlkern.ops.conv_bn.forward``'s; the pool's are already read as
    ``F.max_pool2d`` reads them (lists of ints, ``pool_stride`` [] for the kernel size; see
    ``dlkern.functional._max_pool2d_args``). The pool's value checks (kernel, stride and dilation > 0, padding
    at most half the kernel, output size >= 1) run on the block's output, with ATen's messages: as in the stock
    Sequential, they raise after a training block has updated the running statistics.
    """
    out = _conv_bn.forward(input, weight, bias, running_mean, running_var, bn_weight, bn_bias, num_batches_tracked,
                           training, momentum, eps, stride, padding, dilation, activation, activation_params)
    pooled, indices = _max_pool.max_pool2d(out, pool_kernel_size, pool_stride, pool_padding, pool_dilation,
                                           pool_ceil_mode, return_indices)
    return (pooled, indices) if return_indices else pooled
