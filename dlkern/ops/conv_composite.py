"""The fused conv block's PyTorch composites: what a CPU without Triton's interpreter runs (ATen's own kernels,
and dlkern's C++ max pool), computing what the Triton kernels compute."""

import torch
import torch.nn.functional as F

from dlkern.ops.activation import composite_backward, composite_forward
from dlkern.ops.conv_epilogue import window_indices, window_taps
from dlkern.ops.conv_shapes import backward_setup, check_bn_sizes, memory_format, train_geometry, vector
from dlkern.ops.max_pool import _MAX_POOL2D, _MAX_POOL2D_VALUES
from dlkern.ops.triton_support import compute_dtype


def _act(u, act, p0, p1):
    return u if act == "none" else composite_forward(u, act, p0, p1)


def _act_vjp(u, g, act, p0, p1):
    return g if act == "none" else composite_backward(g, u, act, p0, p1, from_output=False)


def _symmetric(padding):
    """(top, bottom, left, right) as conv2d's (rows, columns) when top == bottom and left == right, else None."""
    return [padding[0], padding[2]] if padding[0] == padding[1] and padding[2] == padding[3] else None


def torch_conv(input, weight, bias, stride, padding, dilation):
    if _symmetric(padding) is not None:
        return F.conv2d(input, weight, bias, stride, _symmetric(padding), dilation)
    x = F.pad(input, (padding[2], padding[3], padding[0], padding[1]))  # 'same' with an even kernel
    return F.conv2d(x, weight, bias, stride, 0, dilation)


def _torch_conv_backward(gz, input, weight, stride, padding, dilation, input_grad, weight_grad, empty):
    """(dx, dw) of torch_conv by ATen's convolution_backward (empty where not asked for); dw in the compute dtype,
    as the Triton backward's."""
    pad = _symmetric(padding)
    x = input if pad is not None else F.pad(input, (padding[2], padding[3], padding[0], padding[1]))
    dx, dw, _ = torch.ops.aten.convolution_backward(
        gz, x, weight, None, stride, pad or [0, 0], dilation, False, [0, 0], 1, [input_grad, weight_grad, False]
    )
    if input_grad:
        if pad is None:
            dx = dx[:, :, padding[0]:padding[0] + input.shape[2], padding[2]:padding[2] + input.shape[3]]
        dx = dx.contiguous(memory_format=memory_format(input))
    return dx if input_grad else empty(), dw.to(compute_dtype(dw.dtype)).contiguous() if weight_grad else empty()


def _pool(z, epi, indices):
    """dlkern's C++ max pool of z with the epilogue's window: (pooled, window taps) or the values alone."""
    (kh, kw), (sh, sw), (ph, pw), ceil = epi.window
    if not indices:
        return _MAX_POOL2D_VALUES(z, [kh, kw], [sh, sw], [ph, pw], [1, 1], ceil)
    pooled, idx = _MAX_POOL2D(z, [kh, kw], [sh, sw], [ph, pw], [1, 1], ceil)
    return pooled, window_taps(idx, z.shape[3], (kh, kw), (sh, sw), (ph, pw))


def _unpool(grad, taps, shape, epi):
    """The pooled gradient scattered to the window maxima (max_pool2d's backward) at full resolution."""
    (kh, kw), (sh, sw), (ph, pw), _ = epi.window
    indices = window_indices(taps, shape[3], (kh, kw), (sh, sw), (ph, pw))
    full = torch.zeros(shape, dtype=grad.dtype, device=grad.device)
    full.view(*shape[:2], -1).scatter_(2, indices.flatten(2), grad.flatten(2))
    return full


def _epilogue(u, residual, epi):
    """The residual and activation on BatchNorm's output (or the folded conv's) u."""
    if epi.residual == 1:
        u = u + residual
    out = _act(u, epi.activation, epi.p0, epi.p1)
    return out + residual if epi.residual == 2 else out


def train_forward(input, weight, bias, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked,
                  residual, momentum, eps, stride, padding, dilation, epi, allow_tf32):
    """ATen's own CPU kernels: the conv, batch statistics, batch_norm with them, the running update; then the
    epilogue, and dlkern's C++ max pool, its indices turned into window taps."""
    train_geometry(input, weight, bn_weight, bn_bias, running_mean, running_var, residual, stride, padding,
                   dilation)
    sdtype = compute_dtype(input.dtype)
    z = torch_conv(input, weight, bias, stride, padding, dilation)
    if epi.pool_before_bn:
        z, pos = _pool(z, epi, indices=True)
    zs = z.to(sdtype)
    mean, var = torch.batch_norm_update_stats(zs, None, None, 0.0)  # biased variance
    invstd = torch.rsqrt(var + eps)
    u = torch.batch_norm(zs, vector(bn_weight, sdtype), vector(bn_bias, sdtype), mean, var, False, 0.0, eps, False)
    if running_mean is not None and running_var is not None:
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        f = momentum if momentum is not None else 1.0 / float(num_batches_tracked)
        count = zs.numel() // zs.shape[1]
        running_mean.mul_(1 - f).add_(mean.to(running_mean.dtype).view(running_mean.shape), alpha=f)
        unbiased = (var * (count / (count - 1))).to(running_var.dtype).view(running_var.shape)
        running_var.mul_(1 - f).add_(unbiased, alpha=f)
    out = _epilogue(u, None if residual is None else residual.to(sdtype), epi).to(input.dtype)
    stats = torch.stack([mean, invstd, var])
    if epi.pool_before_bn:
        return out, z, stats, pos
    if epi.window is None:
        return out, z, stats, torch.empty(0, dtype=torch.uint8, device=input.device)
    pooled, taps = _pool(out, epi, indices=True)
    return pooled, z, stats, taps


def infer_forward(input, weight, bias, running_mean, running_var, bn_weight, bn_bias, residual, eps, stride,
                  padding, dilation, epi, allow_tf32):
    """ATen's kernels: conv2d, then batch_norm in eval, the epilogue, dlkern's C++ max pool."""
    check_bn_sizes(weight.shape[0], running_mean, running_var, bn_weight, bn_bias)
    z = torch_conv(input, weight, bias, stride, padding, dilation)
    if epi.pool_before_bn:
        z = _pool(z, epi, indices=False)
    u = torch.batch_norm(z, vector(bn_weight, running_var.dtype), vector(bn_bias, running_var.dtype),
                         running_mean.reshape(-1), running_var.reshape(-1), False, 0.0, eps, False)
    out = _epilogue(u, residual, epi)
    return out if epi.window is None or epi.pool_before_bn else _pool(out, epi, indices=False)


def folded_forward(input, weight, bias, residual, stride, padding, dilation, epi, allow_tf32, save_preact):
    z = torch_conv(input, weight, bias, stride, padding, dilation)
    if epi.residual == 1:
        z = z + residual
    out = _act(z, epi.activation, epi.p0, epi.p1)
    if epi.residual == 2:
        out = out + residual
    if not save_preact:
        return out, z.new_empty(0)
    # Without an activation out is z: an op's outputs may not alias each other.
    return out, z.clone() if out is z else z


def block_backward(grad_out, input, weight, z, stats, bn_weight, bn_bias, residual, pos, stride, padding, dilation,
                   epi, allow_tf32, input_grad, weight_grad):
    """conv_launch.block_backward's gradients by ATen's CPU kernels: the pooled gradient scattered to the
    maxima (what max_pool2d's backward does), the activation's backward, BatchNorm's training backward, the
    conv's."""
    geo, bn, affine, empty, grad_gamma, grad_beta = backward_setup(input, weight, stats, bn_weight, bn_bias, stride,
                                                                   padding, dilation)
    if epi.window is not None and not epi.pool_before_bn:
        grad_out = _unpool(grad_out, pos, z.shape, epi).contiguous(memory_format=memory_format(z))
    dres = empty()
    if bn:
        sdtype, (mean, invstd) = stats.dtype, (stats[0], stats[1])
        zs = z.to(sdtype)
        gamma = vector(bn_weight, sdtype) if affine else None
        g_u = grad_out.to(sdtype)
        if epi.activation != "none":
            scale = invstd * gamma if affine else invstd  # u = z * scale + shift, per channel
            shift = (vector(bn_bias, sdtype) if affine else 0.0) - mean * scale
            u = torch.addcmul(shift.view(-1, 1, 1), zs, scale.view(-1, 1, 1))
            if epi.residual == 1:
                u = u + residual.to(sdtype)
            g_u = _act_vjp(u, g_u, epi.activation, epi.p0, epi.p1)
        if epi.residual == 1:
            dres = g_u.to(input.dtype, copy=True).contiguous(memory_format=memory_format(z))
        # eps only matters to its eval form: the training form reads the saved invstd
        gz, sum_gx, sum_g = torch.ops.aten.native_batch_norm_backward(
            g_u, zs, gamma, None, None, mean, invstd, True, 0.0, [True, affine, affine]
        )
        gz = gz.to(input.dtype)
        if epi.pool_before_bn:  # BatchNorm normalized the pooled z: its gradient goes to the window maxima
            N, C_out, OH, OW = geo[0], geo[4], geo[7], geo[8]
            gz = _unpool(gz, pos, (N, C_out, OH, OW), epi).contiguous(memory_format=memory_format(input))
        if affine:
            grad_gamma.copy_(sum_gx.view(grad_gamma.shape))
            grad_beta.copy_(sum_g.view(grad_beta.shape))
    else:
        gz = _act_vjp(z, grad_out, epi.activation, epi.p0, epi.p1)
        if epi.residual == 1:
            dres = gz.clone() if gz is grad_out else gz
    dx, dw = _torch_conv_backward(gz, input, weight, stride, padding, dilation, input_grad, weight_grad, empty)
    db = empty()
    if weight_grad:
        db_dtype = compute_dtype(weight.dtype)
        db = gz.new_zeros(gz.shape[1], dtype=db_dtype) if bn else gz.sum((0, 2, 3), dtype=db_dtype)
    return dx, dw, db, grad_gamma, grad_beta, dres
