"""The activation family as torch.library custom ops: registration, launchers, fakes and autograd.

Ops (namespace ``dlkern``; ``act`` is a name from ``dlkern.kernels.activation.ACTIVATIONS``, p0/p1 its scalar
parameters as in :func:`activation_spec`):

- ``activation(Tensor x, str act, float p0, float p1) -> Tensor``
- ``activation_(Tensor(a!) x, str act, float p0, float p1) -> ()``: in place.
- ``activation_backward(Tensor grad_output, Tensor saved, str act, float p0, float p1, bool saved_is_output)``
- ``activation_channelwise(Tensor x, Tensor weight, str act) -> Tensor``: prelu and swish with a tensor
  parameter of 1 or C elements, C = x.size(1).
- ``activation_channelwise_backward(Tensor grad_output, Tensor x, Tensor weight, str act, bool weight_grad)
  -> (Tensor, Tensor)``: the weight gradient is empty when weight_grad is False.

CUDA tensors run the Triton kernels (and so do CPU tensors under TRITON_INTERPRET=1); other CPU tensors run
an equivalent PyTorch composite after a one-time warning. None of them reads tensor values on the host.
Outputs have the input's strides when it is dense (``empty_like``), as PyTorch's elementwise ops.
"""

import math

import torch
import triton

from dlkern.kernels.activation import (
    ACTIVATIONS,
    activation_bwd_kernel,
    activation_fwd_kernel,
    channel_sum_kernel,
)
from dlkern.ops.triton_support import INTERPRETING, launch, runs_triton, sm_count

# Out of place, the backward reads the output where ATen's does and it is exact; every other op saves its input.
SAVE_OUTPUT = frozenset({"sigmoid", "tanh", "relu"})
# In place, the input is gone: these backwards are exact from the output (ATen's relu_/leaky_relu_/elu_ do the
# same; its hardtanh_ clones the input, but clamp's output tells inside from outside just as well). The others
# (silu, hardsigmoid, ...) keep a copy of the input, as ATen does.
INPLACE_FROM_OUTPUT = frozenset({"sigmoid", "tanh", "relu", "leaky_relu", "elu", "hardtanh"})
CHANNELWISE = frozenset({"prelu", "swish"})


def activation_spec(module):
    """``(act, p0, p1)`` for a torch.nn (or dlkern.nn) activation module, or None for one dlkern does not cover.

    ``act`` names the activation for ``act_fwd``/``act_grad`` (dlkern.kernels.activation); p0/p1 are floats,
    except for PReLU's weight and a learnable Swish's beta, which are the module's Parameter (1 or C elements).
    ReLU6 maps to ``("hardtanh", 0.0, 6.0)``.
    """
    from dlkern.nn.activation import HardLogistic, Swish  # dlkern.nn imports this module

    nn = torch.nn
    if isinstance(module, nn.ReLU):
        return "relu", 0.0, 0.0
    if isinstance(module, nn.LeakyReLU):
        return "leaky_relu", float(module.negative_slope), 0.0
    if isinstance(module, nn.PReLU):
        return "prelu", module.weight, 0.0
    if isinstance(module, nn.ELU):
        return "elu", float(module.alpha), 0.0
    if isinstance(module, nn.Softplus):
        return "softplus", float(module.beta), float(module.threshold)
    if isinstance(module, nn.SiLU):
        return "silu", 0.0, 0.0
    if isinstance(module, nn.GELU):
        return ("gelu" if module.approximate == "none" else "gelu_tanh"), 0.0, 0.0
    if isinstance(module, nn.Sigmoid):
        return "sigmoid", 0.0, 0.0
    if isinstance(module, nn.Tanh):
        return "tanh", 0.0, 0.0
    if isinstance(module, nn.Hardsigmoid):
        return "hardsigmoid", 0.0, 0.0
    if isinstance(module, nn.Hardtanh):  # also ReLU6
        return "hardtanh", float(module.min_val), float(module.max_val)
    if isinstance(module, Swish):
        return "swish", module.beta if module.learnable else float(module.beta), 0.0
    if isinstance(module, HardLogistic):
        return "hard_logistic", 0.0, 0.0
    return None


# ----------------------------------------------------------------------------------------------------------------
# Checks shared by the real and the fake implementations
# ----------------------------------------------------------------------------------------------------------------


def _check_input(x, act):
    torch._check(act in ACTIVATIONS, lambda: f"dlkern activation: unknown activation {act!r}")
    torch._check(
        x.is_floating_point(), lambda: f"dlkern {act}: expected a floating-point input, got {x.dtype}"
    )


def _check_channelwise(x, weight, act):
    _check_input(x, act)
    torch._check(act in CHANNELWISE, lambda: f"dlkern: {act} has no tensor parameter")
    torch._check(
        weight.dim() <= 1, lambda: f"{act}: Expected `weight` to be a scalar or 1D tensor, but got: ndim = {weight.dim()}"
    )
    torch._check(weight.is_floating_point(), lambda: f"{act}: expected a floating-point weight, got {weight.dtype}")
    if weight.numel() != 1:
        torch._check(x.dim() > 0, lambda: "Not allow zero-dim input tensor.")
        channels = x.shape[1] if x.dim() > 1 else 1
        torch._check(
            channels == weight.numel(),
            lambda: f"Mismatch of parameter numbers and input channel size. Found parameter numbers = "
            f"{weight.numel()} and channel size = {channels}.",
        )


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------


def _is_dense(t):
    """Non-overlapping and dense: the elements fill numel consecutive slots from data_ptr(), in some order."""
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _layout(tensors):
    """Kernel layout arguments for same-shaped tensors (the output first): (STRIDED, sizes[1:4], strides per tensor),
    or None when a strided walk would need more than 4 dims."""

    def strides_of(t):
        return tuple(st for sz, st in zip(t.shape, t.stride()) if sz != 1)

    out = tensors[0]
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
    """(C, ch_div) so that a kernel reads the parameter of element i at (i // ch_div) % C."""
    if weight is None or weight.numel() == 1:
        return 1, 1
    if strided:  # i is the logical row-major index
        return x.shape[1], math.prod(x.shape[2:])
    return x.shape[1], x.stride(1)  # i is the memory offset (dense)


def _size_bucket(numel):
    # Tuning key: one bucket per factor of 16 in size, so a new size reuses the tuned config of its bucket.
    return numel.bit_length() // 4


def _grid(numel):
    return lambda meta: (triton.cdiv(numel, meta["BLOCK"]),)


def _launch_forward(y, x, act, p0, p1, weight=None):
    numel = x.numel()
    if numel == 0:
        return
    plan = _layout([y, x])
    if plan is None:  # > 4 strided dims that do not merge: run on a dense copy
        x_dense = x.contiguous()
        y_dense = x_dense if y.data_ptr() == x.data_ptr() else torch.empty_like(x_dense)
        _launch_forward(y_dense, x_dense, act, p0, p1, weight)
        y.copy_(y_dense)
        return
    strided, sizes, (y_strides, x_strides) = plan
    C, ch_div = _channel_args(x, weight, strided)
    launch(
        activation_fwd_kernel, _grid(numel),
        x, y, x if weight is None else weight,
        numel, _size_bucket(numel), float(p0), float(p1), C, ch_div,
        *sizes, *x_strides, *y_strides,
        ACT=act, PER_CHANNEL=weight is not None, STRIDED=strided,
    )


def _launch_backward(dx, grad_output, saved, act, p0, p1, from_output, weight=None, dw_elems=None):
    numel = saved.numel()
    if numel == 0:
        return
    plan = _layout([dx, grad_output, saved])
    if plan is None:
        grad_output, saved = grad_output.contiguous(), saved.contiguous()
        dx_dense = torch.empty_like(saved)
        dw_dense = None if dw_elems is None else torch.empty_like(saved, dtype=dw_elems.dtype)
        _launch_backward(dx_dense, grad_output, saved, act, p0, p1, from_output, weight, dw_dense)
        dx.copy_(dx_dense)
        if dw_elems is not None:
            dw_elems.copy_(dw_dense)
        return
    strided, sizes, (dx_strides, g_strides, s_strides) = plan
    C, ch_div = _channel_args(saved, weight, strided)
    launch(
        activation_bwd_kernel, _grid(numel),
        grad_output, saved, saved if weight is None else weight, dx, dx if dw_elems is None else dw_elems,
        numel, _size_bucket(numel), float(p0), float(p1), C, ch_div,
        *sizes, *g_strides, *s_strides, *dx_strides,
        ACT=act, FROM_OUTPUT=from_output, PER_CHANNEL=weight is not None, NEED_DW=dw_elems is not None,
        STRIDED=strided,
    )


def _channel_sum(elems, channels):
    """Per-channel sums of a dense tensor whose channel dim is 1 (all of it when channels == 1), in a fixed
    order: per-(channel block, split) partial sums, then one program per channel block adds the splits."""
    numel = elems.numel()
    if channels == 1:
        O, I = 1, numel
    else:  # dense: memory is an (O, C, I) array with I = stride of the channel dim
        I = elems.stride(1)
        O = numel // (channels * I)
    block_c = min(triton.next_power_of_2(channels), 64) if I == 1 else 1
    # Under the interpreter, small tiles and two splits let the tests' tiny tensors cross both boundaries.
    block_k = 16 if INTERPRETING else max(16, min(1024, 4096 // block_c))
    # Enough (channel block, split) programs to fill a GPU; the split depends on the shape only.
    c_blocks = triton.cdiv(channels, block_c)
    target = 2 if INTERPRETING else 4 * sm_count(elems.device)
    splits = max(1, min(triton.cdiv(target, c_blocks), triton.cdiv(O * I, block_k)))
    chunk = triton.cdiv(triton.cdiv(O * I, splits), block_k) * block_k
    splits = triton.cdiv(O * I, chunk)
    partial = torch.empty((splits, channels), dtype=elems.dtype, device=elems.device)
    launch(channel_sum_kernel, (c_blocks, splits), elems, partial, O, channels, I, O * I, chunk,
           BLOCK_C=block_c, BLOCK_K=block_k)
    total = torch.empty((1, channels), dtype=elems.dtype, device=elems.device)
    block_c = min(triton.next_power_of_2(channels), 64)
    launch(channel_sum_kernel, (triton.cdiv(channels, block_c), 1), partial, total, splits, channels, 1, splits, splits,
           BLOCK_C=block_c, BLOCK_K=min(triton.next_power_of_2(splits), 64))
    return total.view(channels)


def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------------------------
# PyTorch composites for CPU tensors without the interpreter
# ----------------------------------------------------------------------------------------------------------------


def _channel_view(weight, x):
    """weight (1 or C elements) shaped to broadcast over x's channel dim (dim 1)."""
    if weight.numel() == 1 or x.dim() < 2:
        return weight.reshape(())
    return weight.reshape((-1,) + (1,) * (x.dim() - 2))


def composite_forward(x, act, p0, p1, weight=None):
    F = torch.nn.functional
    if act == "prelu":
        return F.prelu(x, weight.to(x.dtype) if weight is not None else x.new_full((1,), p0))
    if act == "swish":
        beta = _channel_view(weight, x).to(x.dtype) if weight is not None else p0
        return x * torch.sigmoid(x * beta)
    if act == "hard_logistic":
        return (x * 0.25 + 0.5).clamp(0.0, 1.0)
    if act == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if act == "leaky_relu":
        return F.leaky_relu(x, p0)
    if act == "elu":
        return F.elu(x, p0)
    if act == "softplus":
        return F.softplus(x, p0, p1)
    if act == "hardtanh":
        return F.hardtanh(x, p0, p1)
    return {"relu": F.relu, "silu": F.silu, "gelu": F.gelu, "sigmoid": torch.sigmoid, "tanh": torch.tanh,
            "hardsigmoid": F.hardsigmoid}[act](x)


def composite_backward(g, s, act, p0, p1, from_output):
    aten = torch.ops.aten
    if act == "sigmoid":
        return aten.sigmoid_backward(g, s if from_output else torch.sigmoid(s))
    if act == "tanh":
        return aten.tanh_backward(g, s if from_output else torch.tanh(s))
    if act == "relu":
        return aten.threshold_backward(g, s, 0)
    if act in ("leaky_relu", "prelu"):
        return aten.leaky_relu_backward(g, s, p0, from_output)
    if act == "elu":
        return aten.elu_backward(g, p0, 1, 1, from_output, s)
    if act == "softplus":
        return aten.softplus_backward(g, s, p0, p1)
    if act == "silu":
        return aten.silu_backward(g, s)
    if act in ("gelu", "gelu_tanh"):
        return aten.gelu_backward(g, s, approximate="none" if act == "gelu" else "tanh")
    if act == "hardsigmoid":
        return aten.hardsigmoid_backward(g, s)
    if act == "hardtanh":
        return aten.hardtanh_backward(g, s, p0, p1)
    if act == "hard_logistic":
        return g * ((s > -2) & (s < 2)).to(g.dtype) * 0.25
    if act == "swish":
        return _composite_swish_grads(g, s, p0)[0]
    raise AssertionError(act)


def _composite_swish_grads(g, x, beta):
    sig = torch.sigmoid(x * beta)
    q = sig * torch.sigmoid(-x * beta)  # sigma'(z), without the cancellation in 1 - sigma(z)
    return g * (sig + x * beta * q), g * x * x * q


# ----------------------------------------------------------------------------------------------------------------
# Ops
# ----------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("dlkern::activation", mutates_args=())
def activation(x: torch.Tensor, act: str, p0: float, p1: float) -> torch.Tensor:
    _check_input(x, act)
    y = torch.empty_like(x)
    if runs_triton(x, act):
        _launch_forward(y, x, act, p0, p1)
    else:
        y.copy_(composite_forward(x, act, p0, p1))
    return y


@activation.register_fake
def _(x, act, p0, p1):
    _check_input(x, act)
    return torch.empty_like(x)


@torch.library.custom_op("dlkern::activation_", mutates_args=("x",))
def activation_(x: torch.Tensor, act: str, p0: float, p1: float) -> None:
    _check_input(x, act)
    torch._check(
        torch._debug_has_internal_overlap(x) != 1,
        lambda: "unsupported operation: more than one element of the written-to tensor refers to a single memory "
        "location. Please clone() the tensor before performing the operation.",
    )
    if runs_triton(x, act):
        _launch_forward(x, x, act, p0, p1)
    else:
        x.copy_(composite_forward(x, act, p0, p1))


@activation_.register_fake
def _(x, act, p0, p1):
    _check_input(x, act)


@torch.library.custom_op("dlkern::activation_backward", mutates_args=())
def activation_backward(
    grad_output: torch.Tensor, saved: torch.Tensor, act: str, p0: float, p1: float, saved_is_output: bool
) -> torch.Tensor:
    dx = torch.empty_like(saved)
    if runs_triton(saved, act):
        _launch_backward(dx, grad_output, saved, act, p0, p1, saved_is_output)
    else:
        dx.copy_(composite_backward(grad_output, saved, act, p0, p1, saved_is_output))
    return dx


@activation_backward.register_fake
def _(grad_output, saved, act, p0, p1, saved_is_output):
    return torch.empty_like(saved)


@torch.library.custom_op("dlkern::activation_channelwise", mutates_args=())
def activation_channelwise(x: torch.Tensor, weight: torch.Tensor, act: str) -> torch.Tensor:
    _check_channelwise(x, weight, act)
    y = torch.empty_like(x)
    if runs_triton(x, act):
        _launch_forward(y, x, act, 0.0, 0.0, weight)
    else:
        y.copy_(composite_forward(x, act, 0.0, 0.0, weight))
    return y


@activation_channelwise.register_fake
def _(x, weight, act):
    _check_channelwise(x, weight, act)
    return torch.empty_like(x)


@torch.library.custom_op("dlkern::activation_channelwise_backward", mutates_args=())
def activation_channelwise_backward(
    grad_output: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, act: str, weight_grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    if not runs_triton(x, act):
        return _composite_channelwise_backward(grad_output, x, weight, act, weight_grad)
    dx = torch.empty_like(x)
    channels = 1 if weight.numel() == 1 else weight.numel()
    dw_elems = torch.empty_like(dx, dtype=_compute_dtype(x.dtype)) if weight_grad else None
    _launch_backward(dx, grad_output, x, act, 0.0, 0.0, False, weight, dw_elems)
    if not weight_grad:
        return dx, weight.new_empty(0)
    if x.numel() == 0:
        return dx, torch.zeros_like(weight)
    return dx, _channel_sum(dw_elems, channels).to(weight.dtype).view(weight.shape)


@activation_channelwise_backward.register_fake
def _(grad_output, x, weight, act, weight_grad):
    return torch.empty_like(x), (torch.empty_like(weight) if weight_grad else weight.new_empty(0))


def _composite_channelwise_backward(g, x, weight, act, weight_grad):
    w = _channel_view(weight, x).to(x.dtype)
    if act == "prelu":
        dx = torch.where(x > 0, g, w * g)
        dw_elems = torch.where(x > 0, torch.zeros_like(x), x * g)
    else:
        dx, dw_elems = _composite_swish_grads(g, x, w)
    dx = torch.empty_like(x).copy_(dx)
    if not weight_grad:
        return dx, weight.new_empty(0)
    dims = [d for d in range(x.dim()) if not (d == 1 and weight.numel() > 1)]
    dw = dw_elems.to(_compute_dtype(x.dtype)).sum(dims) if dims else dw_elems
    return dx, dw.to(weight.dtype).reshape(weight.shape)


# ----------------------------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------------------------


def _setup_context(ctx, inputs, output):
    x, ctx.act, ctx.p0, ctx.p1 = inputs
    ctx.saved_is_output = ctx.act in SAVE_OUTPUT
    ctx.save_for_backward(output if ctx.saved_is_output else x)


def _backward(ctx, grad_output):
    (saved,) = ctx.saved_tensors
    dx = torch.ops.dlkern.activation_backward(grad_output, saved, ctx.act, ctx.p0, ctx.p1, ctx.saved_is_output)
    return dx, None, None, None


torch.library.register_autograd("dlkern::activation", _backward, setup_context=_setup_context)


def _channelwise_setup_context(ctx, inputs, output):
    x, weight, ctx.act = inputs
    ctx.save_for_backward(x, weight)


def _channelwise_backward(ctx, grad_output):
    x, weight = ctx.saved_tensors
    weight_grad = ctx.needs_input_grad[1]
    dx, dw = torch.ops.dlkern.activation_channelwise_backward(grad_output, x, weight, ctx.act, weight_grad)
    return dx, (dw if weight_grad else None), None


torch.library.register_autograd(
    "dlkern::activation_channelwise", _channelwise_backward, setup_context=_channelwise_setup_context
)


class ActivationInplace(torch.autograd.Function):
    """Autograd for ``activation_`` (custom ops cannot return an alias of their input, so the in-place op has no
    autograd registration; this Function marks the input dirty, as ATen's in-place kernels do). It saves the
    output where the backward is exact from it, otherwise a copy of the input taken before it is overwritten."""

    @staticmethod
    def forward(ctx, x, act, p0, p1):
        ctx.act, ctx.p0, ctx.p1 = act, p0, p1
        ctx.saved_is_output = act in INPLACE_FROM_OUTPUT
        original = None if ctx.saved_is_output else x.clone()
        torch.ops.dlkern.activation_(x, act, p0, p1)
        ctx.mark_dirty(x)
        ctx.save_for_backward(x if ctx.saved_is_output else original)
        return x

    @staticmethod
    def backward(ctx, grad_output):
        (saved,) = ctx.saved_tensors
        # The output no longer tells the branch apart with a negative slope/alpha: ATen refuses these too.
        if ctx.act == "leaky_relu" and ctx.p0 < 0:
            raise RuntimeError(
                "In-place leakyReLu backward calculation is triggered with a negative slope which is not supported. "
                "This is caused by calling in-place forward function with a negative slope, please call "
                "out-of-place version instead."
            )
        if ctx.act == "elu" and ctx.p0 < 0:
            raise RuntimeError(
                "In-place elu backward calculation is triggered with a negative slope which is not supported. "
                "This is caused by calling in-place forward function with a negative slope, please call "
                "out-of-place version instead."
            )
        dx = torch.ops.dlkern.activation_backward(grad_output, saved, ctx.act, ctx.p0, ctx.p1, ctx.saved_is_output)
        return dx, None, None, None


def activation_inplace(x, act, p0, p1):
    """``x = f(x)`` in place, autograd-aware; returns x."""
    if torch.is_grad_enabled() and x.requires_grad:
        return ActivationInplace.apply(x, act, p0, p1)
    torch.ops.dlkern.activation_(x, act, p0, p1)
    return x
