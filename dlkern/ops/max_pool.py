"""dlkern::max_pool2d and dlkern::max_pool2d_backward: fake (meta) functions and autograd.

The ops and their CPU/CUDA kernels are defined in C++ (csrc/max_pool2d.cpp, csrc/cuda/max_pool2d.cu). The fake
functions here give torch.compile the output shapes and strides, and reject the same arguments with the same
messages as the C++ checks (which reproduce ATen's), so tracing fails where eager would.
"""

import torch
from torch._prims_common import suggest_memory_format

import dlkern._extension  # noqa: F401  (registers torch.ops.dlkern.*)


def _pooling_output_size(size, k, pad, stride, dilation, ceil_mode):
    """ATen's pooling_output_shape (aten/src/ATen/native/Pool.h), checks included."""
    torch._check(stride != 0, lambda: "stride should not be zero")
    torch._check(pad >= 0, lambda: f"pad must be non-negative, but got pad: {pad}")
    torch._check(
        pad <= ((k - 1) * dilation + 1) // 2,
        lambda: f"pad should be at most half of effective kernel size, but got pad={pad}, kernel_size={k} "
        f"and dilation={dilation}",
    )
    out = (size + 2 * pad - dilation * (k - 1) - 1 + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + pad:
        out = out - 1  # the last window must start inside the input or its left padding
    return out


def max_pool2d_output(input, kernel_size, stride, padding, dilation, ceil_mode):
    """Checks the arguments as ATen does; returns the output shape and memory format."""
    torch._check(
        len(kernel_size) in (1, 2), lambda: "max_pool2d: kernel_size must either be a single int, or a tuple of two ints"
    )
    torch._check(
        len(stride) in (0, 1, 2),
        lambda: "max_pool2d: stride must either be omitted, a single int, or a tuple of two ints",
    )
    torch._check(
        len(padding) in (1, 2), lambda: "max_pool2d: padding must either be a single int, or a tuple of two ints"
    )
    torch._check(
        len(dilation) in (1, 2), lambda: "max_pool2d: dilation must be either a single int, or a tuple of two ints"
    )
    kH, kW = kernel_size[0], kernel_size[-1]
    sH, sW = (stride[0], stride[-1]) if stride else (kH, kW)
    pH, pW = padding[0], padding[-1]
    dH, dW = dilation[0], dilation[-1]

    torch._check(input.dim() in (3, 4), lambda: "non-empty 3D or 4D (batch mode) tensor expected for input")
    channels_last = input.dim() == 4 and suggest_memory_format(input) == torch.channels_last
    C, H, W = input.shape[-3:]
    OH = _pooling_output_size(H, kH, pH, sH, dH, ceil_mode)
    OW = _pooling_output_size(W, kW, pW, sW, dW, ceil_mode)

    torch._check(kW > 0 and kH > 0, lambda: f"kernel size should be greater than zero, but got kH: {kH} kW: {kW}")
    torch._check(sW > 0 and sH > 0, lambda: f"stride should be greater than zero, but got dH: {sH} dW: {sW}")
    torch._check(
        dH > 0 and dW > 0, lambda: f"dilation should be greater than zero, but got dilationH: {dH} dilationW: {dW}"
    )
    valid_dims = input.shape[1] != 0 and input.shape[2] != 0
    if channels_last:
        torch._check(
            valid_dims and input.shape[3] != 0,
            lambda: "Expected 4D (batch mode) tensor expected for input with channels_last layout with optional "
            f"0 dim batch size for input, but got: {list(input.shape)}",
        )
    else:
        torch._check(
            (input.dim() == 3 and input.shape[0] != 0 and valid_dims)
            or (input.dim() == 4 and valid_dims and input.shape[3] != 0),
            lambda: "Expected 3D or 4D (batch mode) tensor with optional 0 dim batch size for input, but got:"
            f"{list(input.shape)}",
        )
    torch._check(
        kW // 2 >= pW and kH // 2 >= pH,
        lambda: f"pad should be smaller than or equal to half of kernel size, but got padW = {pW}, padH = {pH}, "
        f"kW = {kW}, kH = {kH}",
    )
    torch._check(
        OW >= 1 and OH >= 1,
        lambda: f"Given input size: ({C}x{H}x{W}). Calculated output size: ({C}x{OH}x{OW}). Output size is too small",
    )
    shape = (*input.shape[:-2], OH, OW)
    return shape, (torch.channels_last if channels_last else torch.contiguous_format)


@torch.library.register_fake("dlkern::max_pool2d")
def _max_pool2d_fake(input, kernel_size, stride, padding, dilation, ceil_mode):
    shape, memory_format = max_pool2d_output(input, kernel_size, stride, padding, dilation, ceil_mode)
    out = torch.empty(shape, dtype=input.dtype, device=input.device, memory_format=memory_format)
    indices = torch.empty(shape, dtype=torch.int64, device=input.device, memory_format=memory_format)
    return out, indices


@torch.library.register_fake("dlkern::max_pool2d_backward")
def _max_pool2d_backward_fake(grad_output, input, indices, kernel_size, stride, padding, dilation, ceil_mode):
    shape, memory_format = max_pool2d_output(input, kernel_size, stride, padding, dilation, ceil_mode)
    torch._check(
        tuple(grad_output.shape) == tuple(shape) and tuple(indices.shape) == tuple(shape),
        lambda: f"max_pool2d_backward: grad_output {list(grad_output.shape)} and indices {list(indices.shape)} "
        f"must have the pooled output's shape {list(shape)}",
    )
    return torch.empty(input.shape, dtype=input.dtype, device=input.device, memory_format=memory_format)


def _pool_args(ctx):
    return ctx.kernel_size, ctx.stride, ctx.padding, ctx.dilation, ctx.ceil_mode


def _setup_context(ctx, inputs, output):
    input, ctx.kernel_size, ctx.stride, ctx.padding, ctx.dilation, ctx.ceil_mode = inputs
    _, indices = output
    ctx.mark_non_differentiable(indices)
    ctx.save_for_backward(input, indices)


def _max_pool2d_grad(ctx, grad_output, _grad_indices):
    input, indices = ctx.saved_tensors
    grad_input = torch.ops.dlkern.max_pool2d_backward(grad_output, input, indices, *_pool_args(ctx))
    return grad_input, None, None, None, None, None


torch.library.register_autograd("dlkern::max_pool2d", _max_pool2d_grad, setup_context=_setup_context)


def _backward_setup_context(ctx, inputs, output):
    _, input, indices, *_ = inputs
    ctx.save_for_backward(indices)


def _max_pool2d_backward_grad(ctx, grad_grad_input):
    # The backward is linear in grad_output: its own gradient reads grad_grad_input at the argmax of each window.
    (indices,) = ctx.saved_tensors
    grad_grad_output = grad_grad_input.flatten(-2).gather(-1, indices.flatten(-2)).view(indices.shape)
    return grad_grad_output, None, None, None, None, None, None, None


torch.library.register_autograd(
    "dlkern::max_pool2d_backward", _max_pool2d_backward_grad, setup_context=_backward_setup_context
)

