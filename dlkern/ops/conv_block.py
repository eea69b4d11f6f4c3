"""The fused Conv2d -> BatchNorm2d -> epilogue block's one entry point, :func:`conv_bn_block`: what
``dlkern.functional.conv_bn_act2d``, ``dlkern.nn.ConvBNReLU2d``, the pooled block (pool_block.py) and converted
models call. It reads and checks the arguments as F.conv2d and F.batch_norm do (raising as they do), applies
autocast, and picks the op for BatchNorm's mode: training (batch statistics, running update), inference (eval
without autograd: BatchNorm in the conv's epilogue) or folded (eval with autograd).
"""

import torch
from torch import Tensor

from dlkern import _compat
from dlkern.catalog import check_activation
from dlkern.ops import conv_bn as ops
from dlkern.ops.activation import composite_forward
from dlkern.ops.arguments import SCALAR_NAMES, check_conv2d, conv2d_args, is_plain
from dlkern.ops.autograd_support import call_op, needs_autograd
from dlkern.ops.conv_composite import torch_conv
from dlkern.ops.conv_epilogue import Epilogue
from dlkern.ops.conv_shapes import check, check_bn_sizes, geometry, vector
from dlkern.ops.triton_support import remembered

OP = ops.OP
_block_args_cache = {}
_CONV_POSITIONS = (11, 12, 13)  # stride, padding, dilation in conv_bn_act2d(input, weight, bias, ...)


def _block_args(stride, padding, dilation, activation, activation_params):
    """conv2d_args and check_activation, remembered per argument values and types (a float stride must not reuse
    an int one's acceptance: 1.0 == 1); arguments of other types (NumPy ints, tensors) are read afresh."""

    def compute():
        return (*conv2d_args(OP, _CONV_POSITIONS, stride, padding, dilation),
                *check_activation(activation, activation_params))

    if not (is_plain(stride) and is_plain(padding) and is_plain(dilation) and type(activation) in (str, type(None))
            and type(activation_params) is tuple):
        return compute()
    key = (_hashable(stride), _hashable(padding), _hashable(dilation), activation,
           tuple((type(p), p) for p in activation_params))
    return remembered(_block_args_cache, key, compute)


def _hashable(value):
    return tuple(value) if type(value) is list else value


def conv_geometry(input, weight, stride, padding, dilation):
    """geometry() of the block's conv, its arguments read and checked as F.conv2d does (raising as it does)."""
    stride, padding, dilation = conv2d_args(OP, _CONV_POSITIONS, stride, padding, dilation)
    return geometry(input, weight, stride, check_conv2d(input, weight, None, stride, padding, dilation), dilation)


def _check_input(input, weight, bias, stride, padding, dilation):
    """F.conv2d's checks on the operands as the conv sees them (after autocast's cast), then what the BatchNorm
    after it refuses. Returns (rows, z's shape, padding as (top, bottom, left, right))."""
    padding = check_conv2d(input, weight, bias, stride, padding, dilation)
    if input.dim() != 4:  # a 3-D input convolves as one image; BatchNorm2d then refuses it
        raise ValueError(f"expected 4D input (got {input.dim()}D input)")
    if not input.is_floating_point():
        raise NotImplementedError(f'"batch_norm" not implemented for \'{SCALAR_NAMES.get(input.dtype, input.dtype)}\'')
    N, C_in, H, W, C_out, KH, KW, OH, OW = geometry(input, weight, stride, padding, dilation)
    return N * OH * OW, (N, C_out, OH, OW), padding


def _autocast(input, weight, bias):
    """What torch.autocast does to a conv: input, weight and bias in the autocast dtype (BatchNorm's parameters
    and statistics stay float32)."""
    if not isinstance(input, Tensor) or not isinstance(weight, Tensor):
        raise TypeError("conv_bn_act2d(): input and weight must be Tensors")
    device = input.device.type
    if device in ("cuda", "cpu") and torch.is_autocast_enabled(device) and input.is_floating_point():
        dtype = torch.get_autocast_dtype(device)
        return input.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)
    return input, weight, bias


def fold_bn(weight, bias, running_mean, running_var, bn_weight, bn_bias, eps):
    """BatchNorm (eval) folded into the conv: W' = W*s, b' = (b - mean)*s + beta with s = gamma/sqrt(var + eps),
    both computed (and returned) in the statistics' dtype (float32 at least), so that their gradients are too.
    Differentiable."""
    dtype = torch.promote_types(running_var.dtype, torch.float32)

    def as_vector(t):  # BatchNorm takes any shape of C elements
        return t.to(dtype).reshape(-1)

    scale = torch.rsqrt(as_vector(running_var) + eps)
    if bn_weight is not None:
        scale = scale * as_vector(bn_weight)
    shift = -as_vector(running_mean) if bias is None else bias.to(dtype) - as_vector(running_mean)
    shift = shift * scale
    if bn_bias is not None:
        shift = shift + as_vector(bn_bias)
    return weight.to(dtype) * scale[:, None, None, None], shift


def _check_batch_norm(dtype, z_shape, training, eps, running_mean, running_var, bn_weight, bn_bias):
    """F.batch_norm's checks on the conv output z (its dtype and shape), in PyTorch's order and with its messages
    (its CPU ones for dtypes: mixed is allowed only for a 16-bit z with float32 parameters)."""
    channels = z_shape[1]
    if training and z_shape[0] * z_shape[2] * z_shape[3] == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {torch.Size(z_shape)}")
    if eps <= 0.0 and (message := _compat.batch_norm_eps_error(training, eps)):  # worded per torch release
        raise ValueError(message)
    if not training:
        for name, t in (("running_mean", running_mean), ("running_var", running_var)):
            if t is None:
                raise ValueError(f"{name} must be defined in evaluation mode")
    check_bn_sizes(channels, running_mean, running_var, bn_weight, bn_bias)
    dtypes = [t.dtype for t in (bn_weight, bn_bias, running_mean, running_var) if t is not None]
    if dtypes and dtypes[0] != dtype:
        check(all(d == torch.float32 for d in dtypes),
              "mixed dtype (CPU): expect parameter to have scalar type of Float")
        check(dtype in (torch.float16, torch.bfloat16), "mixed dtype (CPU): all inputs must share same datatype.")
    for d in dtypes:
        expected, found = SCALAR_NAMES.get(dtypes[0]), SCALAR_NAMES.get(d)
        check(d == dtypes[0], f"expected scalar type {expected} but found {found}")


def _empty_batch(input, weight, bias, bn_weight, bn_bias, stride, padding, dilation):
    """Training on an empty batch: an empty output whose parameters get zero gradients, as PyTorch's (its
    BatchNorm returns early and leaves the running statistics alone)."""
    z = torch_conv(input, weight, bias, stride, padding, dilation)
    if bn_weight is not None:
        z = z * vector(bn_weight, z.dtype).view(-1, 1, 1) + vector(bn_bias, z.dtype).view(-1, 1, 1)
    return z


def _unfused_residual(out, residual, residual_at, activation, p0, p1):
    """The residual add and activation after a block computed without them, as torch computes them (broadcasting
    and type promotion included): for a residual the fused epilogue does not take."""
    if residual_at == "before_act":
        out = out + residual
    if activation != "none":
        out = composite_forward(out, activation, p0, p1)
    return out + residual if residual_at == "after_act" else out


def conv_bn_block(input, weight, bias, running_mean, running_var, bn_weight, bn_bias, num_batches_tracked, training,
                  momentum, eps, stride, padding, dilation, activation, activation_params=(), pool=None,
                  residual=None, residual_at="before_act", pool_before_bn=False):
    """The fused block: autocast, checks, then the training op (+ running update), or in eval the inference op
    (BatchNorm in the conv's epilogue) or, when autograd is needed, the folded op.

    ``residual`` (a tensor of the output's shape): added to BatchNorm's output before the activation
    (``residual_at="before_act"``, ResNet's blocks) or to the activation's output (``"after_act"``). One of
    another shape or dtype is added unfused, as torch's add would (broadcast, promoted).

    ``pool`` (kernel, stride, padding, ceil_mode as pairs and a bool; conv_epilogue.pool_fusable): the max pool
    that follows, fused: in training returns (pooled out, window taps); in inference (eval without autograd)
    (pooled out, None), one kernel; None where it is not fused (eval with autograd, an empty batch, > 64 taps in
    inference): the caller pools the block's output then. With ``pool_before_bn`` the pool sits between the conv
    and BatchNorm (Conv -> MaxPool -> BatchNorm -> act: BatchNorm's statistics over the pooled values); where that
    is not fused (None) the caller computes the whole block unfused."""
    given = (input, weight, bias, running_mean, running_var, bn_weight, bn_bias, num_batches_tracked, training,
             momentum, eps, stride, padding, dilation)
    stride, padding, dilation, activation, p0, p1 = _block_args(stride, padding, dilation, activation,
                                                                activation_params)
    conv_weight, conv_bias = weight, bias  # eval folds these, not autocast's 16-bit copies
    input, weight, bias = _autocast(input, weight, bias)
    count, z_shape, padding = _check_input(input, weight, bias, stride, padding, dilation)
    _check_batch_norm(input.dtype, z_shape, training, eps, running_mean, running_var, bn_weight, bn_bias)
    epi = Epilogue(activation, p0, p1)
    if residual is not None:
        if residual_at not in ("before_act", "after_act"):
            raise ValueError(f"conv_bn_act2d(): residual_at must be 'before_act' or 'after_act', got {residual_at!r}")
        if pool is not None:
            raise ValueError("conv_bn_act2d(): a residual and a fused max pool in one block are not supported")
        if (not isinstance(residual, Tensor) or tuple(residual.shape) != z_shape or residual.dtype != input.dtype
                or residual.device != input.device or count == 0):
            out = conv_bn_block(*given, "none")
            return _unfused_residual(out, residual, residual_at, activation, p0, p1)
        epi = epi._replace(residual_at=residual_at)
    if pool is not None:
        epi = epi.with_pool(pool, pool_before_bn)
    allow_tf32 = torch.backends.cudnn.allow_tf32
    if training:
        return _train(input, weight, bias, running_mean, running_var, bn_weight, bn_bias, num_batches_tracked,
                      momentum, eps, stride, padding, dilation, epi, allow_tf32, residual, count)
    if not needs_autograd(input, conv_weight, conv_bias, running_mean, running_var, bn_weight, bn_bias, residual):
        if pool is not None and pool[0][0] * pool[0][1] > 64:  # more taps than the smallest row tile
            return None
        out = call_op(ops.conv_bn_infer2d, input, weight, bias, running_mean, running_var, bn_weight, bn_bias,
                      residual, eps, stride, padding, dilation, *epi.op_args(), allow_tf32)
        return out if pool is None else (out, None)
    if pool is not None:  # eval with autograd: not fused
        return None
    # Autograd needed: BatchNorm folded into the conv with differentiable ops (frozen-BatchNorm fine-tuning).
    w, b = fold_bn(conv_weight, conv_bias, running_mean, running_var, bn_weight, bn_bias, eps)
    w, b = w.to(input.dtype), b.to(input.dtype)
    # keeps z for the backward
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (input, w, b, residual))
    out, _ = ops.folded_apply(input, w, b, residual, stride, padding, dilation, *epi.op_args(), allow_tf32,
                              needs_grad)
    return out


def _train(input, weight, bias, running_mean, running_var, bn_weight, bn_bias, num_batches_tracked, momentum, eps,
           stride, padding, dilation, epi, allow_tf32, residual, count):
    if (bn_weight is None) != (bn_bias is None):  # BatchNorm2d(bias=False), or F.batch_norm with one of them
        given = bn_weight if bn_weight is not None else bn_bias
        filler = torch.ones if bn_bias is not None else torch.zeros
        missing = filler(weight.shape[0], dtype=given.dtype, device=given.device)
        bn_weight, bn_bias = (missing, bn_bias) if bn_weight is None else (bn_weight, missing)
    track = running_mean is not None and running_var is not None
    if track and momentum is None and num_batches_tracked is None:
        raise ValueError("conv_bn_act2d(): momentum=None (cumulative average) needs num_batches_tracked")
    if epi.pool and count == 0:
        return None
    if count == 0:
        if track and num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        return _empty_batch(input, weight, bias, bn_weight, bn_bias, stride, padding, dilation)
    running = (running_mean, running_var, num_batches_tracked) if track else (None, None, None)
    args = (input, weight, bias, bn_weight, bn_bias, *running, residual, momentum, eps, stride, padding, dilation,
            *epi.op_args(), allow_tf32)
    if needs_autograd(input, weight, bias, bn_weight, bn_bias, residual):
        out, _, _, pos = ops.train_apply(*args)
    else:
        out, _, _, pos = call_op(ops.conv_bn_train2d, *args)
    return (out, pos) if epi.pool else out
