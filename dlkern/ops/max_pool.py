"""dlkern::max_pool2d and dlkern::max_pool2d_backward: fake (meta) functions, vmap rules and autograd.

The ops and their CPU/CUDA kernels are defined in C++ (csrc/max_pool2d.cpp, csrc/cuda/max_pool2d.cu). The fake
functions here give torch.compile the output shapes and strides, and reject the same arguments with the same
messages as the C++ checks (which reproduce ATen's), so tracing fails where eager would. ``max_pool2d`` and
``max_pool2d_backward`` below are the differentiable entry points. Plain reverse mode takes the ops' C++ autograd
(csrc/max_pool2d_autograd.cpp: an eager call and its backward never enter Python); forward-mode AD, the torch.func
transforms and torch.compile take the autograd.Functions below (C++ Functions have no forward mode).
"""

import torch
from torch.autograd import forward_ad
from torch._prims_common import suggest_memory_format

import dlkern._extension  # noqa: F401  (registers torch.ops.dlkern.*)
from dlkern._compat import check  # torch._check, also traceable by torch 2.11's Dynamo
from dlkern.ops.autograd_support import batch_first, call_op, function_apply, needs_autograd

# The overloads themselves: calling the packet (torch.ops.dlkern.max_pool2d) resolves the overload on every call.
_MAX_POOL2D = torch.ops.dlkern.max_pool2d.default
_MAX_POOL2D_BACKWARD = torch.ops.dlkern.max_pool2d_backward.default
_MAX_POOL2D_VALUES = torch.ops.dlkern.max_pool2d_values.default


def _pooling_output_size(size, k, pad, stride, dilation, ceil_mode):
    """ATen's pooling_output_shape (aten/src/ATen/native/Pool.h), checks included."""
    check(stride != 0, lambda: "stride should not be zero")
    check(pad >= 0, lambda: f"pad must be non-negative, but got pad: {pad}")
    check(
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
    check(
        len(kernel_size) in (1, 2), lambda: "max_pool2d: kernel_size must either be a single int, or a tuple of two ints"
    )
    check(
        len(stride) in (0, 1, 2),
        lambda: "max_pool2d: stride must either be omitted, a single int, or a tuple of two ints",
    )
    check(
        len(padding) in (1, 2), lambda: "max_pool2d: padding must either be a single int, or a tuple of two ints"
    )
    check(
        len(dilation) in (1, 2), lambda: "max_pool2d: dilation must be either a single int, or a tuple of two ints"
    )
    kH, kW = kernel_size[0], kernel_size[-1]
    sH, sW = (stride[0], stride[-1]) if stride else (kH, kW)
    pH, pW = padding[0], padding[-1]
    dH, dW = dilation[0], dilation[-1]

    check(input.dim() in (3, 4), lambda: "non-empty 3D or 4D (batch mode) tensor expected for input")
    channels_last = input.dim() == 4 and suggest_memory_format(input) == torch.channels_last
    C, H, W = input.shape[-3:]
    OH = _pooling_output_size(H, kH, pH, sH, dH, ceil_mode)
    OW = _pooling_output_size(W, kW, pW, sW, dW, ceil_mode)

    check(kW > 0 and kH > 0, lambda: f"kernel size should be greater than zero, but got kH: {kH} kW: {kW}")
    check(sW > 0 and sH > 0, lambda: f"stride should be greater than zero, but got dH: {sH} dW: {sW}")
    check(
        dH > 0 and dW > 0, lambda: f"dilation should be greater than zero, but got dilationH: {dH} dilationW: {dW}"
    )
    valid_dims = input.shape[1] != 0 and input.shape[2] != 0
    if channels_last:
        check(
            valid_dims and input.shape[3] != 0,
            lambda: "Expected 4D (batch mode) tensor expected for input with channels_last layout with optional "
            f"0 dim batch size for input, but got: {list(input.shape)}",
        )
    else:
        check(
            (input.dim() == 3 and input.shape[0] != 0 and valid_dims)
            or (input.dim() == 4 and valid_dims and input.shape[3] != 0),
            lambda: "Expected 3D or 4D (batch mode) tensor with optional 0 dim batch size for input, but got:"
            f"{list(input.shape)}",
        )
    check(
        kW // 2 >= pW and kH // 2 >= pH,
        lambda: f"pad should be smaller than or equal to half of kernel size, but got padW = {pW}, padH = {pH}, "
        f"kW = {kW}, kH = {kH}",
    )
    check(
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


@torch.library.register_fake("dlkern::max_pool2d_values")
def _max_pool2d_values_fake(input, kernel_size, stride, padding, dilation, ceil_mode):
    shape, memory_format = max_pool2d_output(input, kernel_size, stride, padding, dilation, ceil_mode)
    return torch.empty(shape, dtype=input.dtype, device=input.device, memory_format=memory_format)


@torch.library.register_fake("dlkern::max_pool2d_backward")
def _max_pool2d_backward_fake(grad_output, input, indices, kernel_size, stride, padding, dilation, ceil_mode):
    shape, memory_format = max_pool2d_output(input, kernel_size, stride, padding, dilation, ceil_mode)
    check(
        tuple(grad_output.shape) == tuple(shape) and tuple(indices.shape) == tuple(shape),
        lambda: f"max_pool2d_backward: grad_output {list(grad_output.shape)} and indices {list(indices.shape)} "
        f"must have the pooled output's shape {list(shape)}",
    )
    return torch.empty(input.shape, dtype=input.dtype, device=input.device, memory_format=memory_format)


def _pool_args(ctx):
    return ctx.kernel_size, ctx.stride, ctx.padding, ctx.dilation, ctx.ceil_mode


def gather_at_argmax(t, indices):
    """t (shaped like the input) read at each window's argmax: the forward-mode derivative of max pooling, and the
    gradient of its backward (which is linear in grad_output). An index outside the (H, W) plane -- ATen's index for
    a window that lies wholly in the padding, or any index a caller passes -- reads nothing and gives 0, as the
    backward skips it (its output is -inf whatever the input; torch.gather would raise, or assert on a GPU)."""
    flat = indices.flatten(-2)
    safe = flat.clamp(0, t.shape[-2] * t.shape[-1] - 1)
    return t.flatten(-2).gather(-1, safe).masked_fill(safe != flat, 0).view(indices.shape)


def _setup_context(ctx, inputs, output):
    input, ctx.kernel_size, ctx.stride, ctx.padding, ctx.dilation, ctx.ceil_mode = inputs
    _, indices = output
    ctx.mark_non_differentiable(indices)
    # The indices never get a gradient: without this autograd would fill a zero tensor for them every backward.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(input, indices)
    # The same tensors as for the backward: generate_vmap_rule=True records one set of saved tensors' batch dims
    # per ctx, whichever of the two calls came last, and the backward of the vmapped Function reads its saved
    # tensors against them (grad of a vmap would pair (input, indices) with indices' dim alone and fail).
    ctx.save_for_forward(input, indices)


def _max_pool2d_grad(ctx, grad_output, _grad_indices):
    if grad_output is None:  # the values had no gradient either (grads are not materialized)
        return None, None, None, None, None, None
    input, indices = ctx.saved_tensors
    grad_input = max_pool2d_backward(grad_output, input, indices, *_pool_args(ctx))
    return grad_input, None, None, None, None, None


def _backward_setup_context(ctx, inputs, output):
    _, input, indices, *pool_args = inputs
    ctx.kernel_size, ctx.stride, ctx.padding, ctx.dilation, ctx.ceil_mode = pool_args
    ctx.save_for_backward(input, indices)
    ctx.save_for_forward(input, indices)


def _max_pool2d_backward_grad(ctx, grad_grad_input):
    _, indices = ctx.saved_tensors
    return gather_at_argmax(grad_grad_input, indices), None, None, None, None, None, None, None



def _batched_max_pool2d(pool, info, in_dims, input, pool_args):
    """A vmap rule: ``pool`` (the op, or the differentiable :func:`max_pool2d`) once over the batch. Pooling works
    plane by plane: the batch dims and an example's own N (and C) flatten into one leading dim."""
    check(input.dim() - 1 in (3, 4), lambda: "non-empty 3D or 4D (batch mode) tensor expected for input")
    x = batch_first(input, in_dims[0], info.batch_size)
    output, indices = pool(x.flatten(0, -4), *pool_args)
    return (output.unflatten(0, x.shape[:-3]), indices.unflatten(0, x.shape[:-3])), (0, 0)


def _batched_max_pool2d_backward(pool_backward, info, in_dims, grad_output, input, indices, pool_args):
    """A vmap rule: ``pool_backward`` (the op, or the differentiable :func:`max_pool2d_backward`) once over the
    batch; an unbatched argument (the input and indices under jacrev) is broadcast over it."""
    go, x, idx = (batch_first(t, d, info.batch_size) for t, d in zip((grad_output, input, indices), in_dims))
    grad_input = pool_backward(go.flatten(0, -4), x.flatten(0, -4), idx.flatten(0, -4), *pool_args)
    return grad_input.unflatten(0, x.shape[:-3]), 0


def _max_pool2d_vmap(info, in_dims, input, *pool_args):
    return _batched_max_pool2d(_MAX_POOL2D, info, in_dims, input, pool_args)


def _max_pool2d_backward_vmap(info, in_dims, grad_output, input, indices, *pool_args):
    return _batched_max_pool2d_backward(_MAX_POOL2D_BACKWARD, info, in_dims, grad_output, input, indices, pool_args)


torch.library.register_vmap("dlkern::max_pool2d", _max_pool2d_vmap)
torch.library.register_vmap("dlkern::max_pool2d_backward", _max_pool2d_backward_vmap)


class _MaxPool2d(torch.autograd.Function):
    """dlkern::max_pool2d for reverse-mode autograd and the torch.func transforms (vmap through the ops' vmap rules).
    No jvp: Dynamo refuses an autograd.Function with a custom jvp, so this is what torch.compile traces."""

    generate_vmap_rule = True

    @staticmethod
    def forward(input, kernel_size, stride, padding, dilation, ceil_mode):
        return call_op(_MAX_POOL2D, input, kernel_size, stride, padding, dilation, ceil_mode)

    setup_context = staticmethod(_setup_context)
    backward = staticmethod(_max_pool2d_grad)


# The Functions with a jvp take a vmap staticmethod, not generate_vmap_rule=True. The generated rule's jvp (used when
# a vmap runs inside a jvp: hessian = jacfwd(jacrev), jvp(jacrev), jvp(vmap)) pairs each input's batch dims with
# its tangent leaf by leaf, after flattening both as pytrees (torch/_functorch/autograd_function.py,
# get_tangents_in_dims): a list argument flattens into one batch dim per element (kernel_size [2, 2]: two, stride
# []: none) but its tangent into a single None, so the pairs shift and the tangents' in_dims no longer match their
# structure ("flat_bdims must not be None", or a treespec length error). The vmap staticmethods below instead run
# the pooling once over the flattened batch through the differentiable entry points, one transform level lower:
# a grad or jvp level under the vmap records the Function there, as for any op (and the ops' C++ autograd or no
# autograd at all serves a call that needs no more).


class _MaxPool2dWithJvp(_MaxPool2d):
    """_MaxPool2d with forward-mode AD, for eager: the output tangent is the input tangent at the argmax."""

    generate_vmap_rule = False

    @staticmethod
    def jvp(ctx, input_tangent, *_):
        _, indices = ctx.saved_tensors
        return gather_at_argmax(input_tangent, indices), None

    @staticmethod
    def vmap(info, in_dims, input, *pool_args):
        return _batched_max_pool2d(max_pool2d, info, in_dims, input, pool_args)


class _MaxPool2dBackward(torch.autograd.Function):
    """dlkern::max_pool2d_backward, differentiable again (double backward, Hessians) under every transform."""

    generate_vmap_rule = True

    @staticmethod
    def forward(grad_output, input, indices, kernel_size, stride, padding, dilation, ceil_mode):
        return call_op(_MAX_POOL2D_BACKWARD, grad_output, input, indices, kernel_size, stride,
                       padding, dilation, ceil_mode)

    setup_context = staticmethod(_backward_setup_context)
    backward = staticmethod(_max_pool2d_backward_grad)


class _MaxPool2dBackwardWithJvp(_MaxPool2dBackward):
    generate_vmap_rule = False

    @staticmethod
    def jvp(ctx, grad_output_tangent, *_):
        # linear in grad_output; the input only selects the argmax (a piecewise-constant choice: no derivative)
        input, indices = ctx.saved_tensors
        if grad_output_tangent is None:
            return torch.zeros_like(input)
        return max_pool2d_backward(grad_output_tangent, input, indices, *_pool_args(ctx))

    @staticmethod
    def vmap(info, in_dims, grad_output, input, indices, *pool_args):
        return _batched_max_pool2d_backward(max_pool2d_backward, info, in_dims, grad_output, input, indices,
                                            pool_args)


_max_pool2d_apply = function_apply(_MaxPool2dWithJvp, _MaxPool2d)
_max_pool2d_backward_apply = function_apply(_MaxPool2dBackwardWithJvp, _MaxPool2dBackward)


def _reverse_mode_only():
    """Autograd needed in reverse mode only (no dual level, no torch.func transform, not compiling): the ops' C++
    autograd serves it."""
    return not (forward_ad._current_level >= 0 or torch._C._are_functorch_transforms_active()
                or torch.compiler.is_compiling())


def max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode, need_indices=True):
    """(values, indices) of dlkern::max_pool2d, differentiable in every autograd mode (list arguments already
    normalized). Without autograd and ``need_indices``, a CPU input gets (values, None) from
    dlkern::max_pool2d_values, which writes no indices (as ATen's CPU forward when no gradient is needed)."""
    args = (input, kernel_size, stride, padding, dilation, ceil_mode)
    if not needs_autograd(input):
        if not need_indices and input.device.type == "cpu":  # no autograd kernel to skip: called as it is
            return _MAX_POOL2D_VALUES(*args), None
        return call_op(_MAX_POOL2D, *args)
    if _reverse_mode_only():
        return _MAX_POOL2D(*args)  # its C++ autograd
    return _max_pool2d_apply(*args)


def max_pool2d_backward(grad_output, input, indices, kernel_size, stride, padding, dilation, ceil_mode):
    """dlkern::max_pool2d_backward, itself differentiable in every autograd mode."""
    args = (grad_output, input, indices, kernel_size, stride, padding, dilation, ceil_mode)
    if not needs_autograd(grad_output, input):
        return call_op(_MAX_POOL2D_BACKWARD, *args)
    if _reverse_mode_only():
        return _MAX_POOL2D_BACKWARD(*args)  # its C++ autograd
    return _max_pool2d_backward_apply(*args)
