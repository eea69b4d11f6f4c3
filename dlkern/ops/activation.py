"""The activation family as torch.library ops (registered by dlkern/ops/library.py): launchers, fakes, autograd.

Ops (namespace ``dlkern``; ``act`` is a name from ``dlkern.catalog.ACTIVATIONS``, p0/p1 its scalar
parameters as in :func:`activation_spec`):

- ``activation(Tensor x, str act, float p0, float p1) -> Tensor``
- ``activation_(Tensor(a!) x, str act, float p0, float p1) -> ()``: in place.
- ``activation_backward(Tensor grad_output, Tensor saved, str act, float p0, float p1, bool saved_is_output)``
- ``activation_channelwise(Tensor x, Tensor weight, str act) -> Tensor``: prelu and swish with a tensor
  parameter of 1 or C elements, C = x.size(1).
- ``activation_channelwise_backward(Tensor grad_output, Tensor x, Tensor weight, str act, bool weight_grad)
  -> (Tensor, Tensor)``: the weight gradient is empty when weight_grad is False.

CUDA tensors run the Triton kernels (and so do CPU tensors under TRITON_INTERPRET=1); other CPU tensors run
an equivalent PyTorch composite after a one-time warning (the dispatcher picks by device). None of them reads
tensor values on the host.
Outputs have the input's strides when it is dense (``empty_like``), as PyTorch's elementwise ops. Every op has a
vmap rule. Autograd (reverse mode, forward mode, double backward, torch.func) lives in the
``torch.autograd.Function``s at the end, which dlkern.functional calls; ``activation`` and ``activation_channelwise``
also register their Function's backward, for direct calls of the op (reverse mode).
"""

import math

import torch

from dlkern.kernels.activation import (
    activation_bwd_kernel,
    activation_fwd_kernel,
    channel_sum_kernel,
    channelwise_bwd_kernel,
)
from dlkern._compat import check  # torch._check, also traceable by torch 2.11's Dynamo
from dlkern.ops.autograd_support import batch_first, call_op, function_apply, needs_autograd
from dlkern.ops.library import define, LIB
from dlkern.ops.triton_support import cdiv, compute_dtype, INTERPRETING, launch, next_power_of_2, sm_count

# The family's names and rules (what the backward saves, in place too; tensor parameters) live in dlkern/catalog.py;
# activation_spec (module -> (act, p0, p1)) stays importable here.
from dlkern.catalog import (  # noqa: F401
    ACTIVATIONS, CHANNELWISE, INPLACE_FROM_OUTPUT, SAVE_OUTPUT, SCALAR_PARAM_COUNT, activation_spec,
)


# ----------------------------------------------------------------------------------------------------------------
# Checks shared by the real and the fake implementations
# ----------------------------------------------------------------------------------------------------------------

# The dtypes the kernels (and the composites) compute; functional defers every other dtype to ATen.
KERNEL_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
# Scalar parameters per activation. ATen converts them to the math type (float for fp16/bf16/fp32 inputs, double
# for fp64), hardtanh's bounds to the input's dtype itself, and refuses a finite value beyond that type's range.
_PARAM_COUNT = SCALAR_PARAM_COUNT
_TYPE_LIMITS = {dt: (name, torch.finfo(dt).max) for dt, name in (
    (torch.float16, "c10::Half"), (torch.bfloat16, "c10::BFloat16"), (torch.float32, "float"),
    (torch.float64, "double"))}
# ATen's ScalarType names, for its dtype messages.
_ATEN_NAMES = {torch.float16: "Half", torch.bfloat16: "BFloat16", torch.float32: "Float", torch.float64: "Double",
               torch.bool: "Bool", torch.uint8: "Byte", torch.int8: "Char", torch.int16: "Short", torch.int32: "Int",
               torch.int64: "Long"}


def _check_input(x, act, p0=0.0, p1=0.0):
    # Plain ifs on host values (torch._check costs ~1.5 µs a call even when the condition holds).
    if act not in ACTIVATIONS:
        raise RuntimeError(f"dlkern activation: unknown activation {act!r}")
    if x.dtype not in KERNEL_DTYPES:
        raise RuntimeError(
            f"dlkern {act}: expected a floating-point input (float16, bfloat16, float32 or float64), got {x.dtype}"
        )
    count = _PARAM_COUNT.get(act)
    if count:
        type_name, limit = _TYPE_LIMITS[x.dtype if act == "hardtanh" else compute_dtype(x.dtype)]
        for p in (p0, p1)[:count]:
            if abs(p) > limit and not math.isinf(p):
                raise RuntimeError(f"value cannot be converted to type {type_name} without overflow")


def _check_channelwise(x, weight, act):
    _check_input(x, act)
    # Plain ifs on host values, as in _check_input; torch._check where a size may be symbolic (torch.compile).
    if act not in CHANNELWISE:
        raise RuntimeError(f"dlkern: {act} has no tensor parameter")
    if weight.dim() > 1:
        raise RuntimeError(f"{act}: Expected `weight` to be a scalar or 1D tensor, but got: ndim = {weight.dim()}")
    if weight.dtype != x.dtype:
        raise RuntimeError(f"{act}: Type promoting not supported. Got {_ATEN_NAMES.get(x.dtype, x.dtype)} and "
                           f"{_ATEN_NAMES.get(weight.dtype, weight.dtype)}")
    if weight.numel() != 1:
        if x.dim() == 0:
            raise RuntimeError("Not allow zero-dim input tensor.")
        channels = x.shape[1] if x.dim() > 1 else 1
        check(
            channels == weight.numel(),
            lambda: f"Mismatch of parameter numbers and input channel size. Found parameter numbers = "
            f"{weight.numel()} and channel size = {channels}.",
        )


def _check_inplace(x):
    torch._check(
        torch._debug_has_internal_overlap(x) != 1,
        lambda: "unsupported operation: more than one element of the written-to tensor refers to a single memory "
        "location. Please clone() the tensor before performing the operation.",
    )
    # ATen's in-place ops refuse this in their autograd layer, which a custom op's mutation does not go through.
    torch._check(
        not x.is_inference() or torch.is_inference_mode_enabled(),
        lambda: "Inplace update to inference tensor outside InferenceMode is not allowed.You can make a clone to get "
        "a normal tensor before doing inplace update.See https://github.com/pytorch/rfcs/pull/17 for more details.",
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
    C, ch_div, w_stride = _channel_args(x, weight, strided)
    launch(
        activation_fwd_kernel, _grid(numel),
        x, y, x if weight is None else weight,
        numel, _size_bucket(numel), float(p0), float(p1), C, ch_div, w_stride,
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


# ----------------------------------------------------------------------------------------------------------------
# PyTorch composites: CPU tensors without the interpreter, and every derivative that autograd must differentiate
# again (double backward, forward mode, torch.func). They follow the kernels' formulas (fp16/bf16 computed in
# fp32, the limits at +-inf) so that every device gives the same values, special ones included.
# ----------------------------------------------------------------------------------------------------------------

# GELU constants, as in dlkern.kernels.activation.
_SQRT1_2, _INV_SQRT_2PI, _K_BETA, _K_KAPPA = 0.7071067811865476, 0.3989422804014327, 0.7978845608028654, 0.044715


def _channel_view(weight, x):
    """weight (1 or C elements) shaped to broadcast over x's channel dim (dim 1)."""
    if weight.numel() == 1 or x.dim() < 2:
        return weight.reshape(())
    return weight.reshape((-1,) + (1,) * (x.dim() - 2))


def _to_compute(t):
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _where(cond, a, b, like):
    # torch.where(cond, a, b) in like's dtype: two bare Python floats would give float32 (and round a float64
    # parameter), so other dtypes get them as 0-d tensors of like's dtype.
    if like.dtype != torch.float32:
        a = a if isinstance(a, torch.Tensor) else like.new_full((), a)
        b = b if isinstance(b, torch.Tensor) else like.new_full((), b)
    return torch.where(cond, a, b)


def _times_decaying(x, q):
    # x * q, q a factor decaying exponentially in |x|: 0 once q underflows, also at x = +-inf (as the kernels).
    return torch.where(q == 0, 0.0, x * q)


def _decaying_factor(x, act, beta):
    """q with f(x) = x * q for silu/swish/gelu/gelu_tanh."""
    if act == "gelu":
        return 0.5 * (1.0 + torch.erf(x * _SQRT1_2))
    if act == "gelu_tanh":  # 0.5(1 + tanh(u)) = sigma(2u)
        return torch.sigmoid(2.0 * _K_BETA * (x + _K_KAPPA * x * x * x))
    return torch.sigmoid(x * beta)


def composite_forward(x, act, p0, p1, weight=None):
    """f(x) with PyTorch ops (weight: prelu's / swish's tensor parameter, else p0)."""
    F = torch.nn.functional
    if act in ("silu", "swish", "gelu", "gelu_tanh"):
        xc = _to_compute(x)
        beta = 1.0 if act == "silu" else p0 if weight is None else _channel_view(weight, x).to(xc.dtype)
        return _times_decaying(xc, _decaying_factor(xc, act, beta)).to(x.dtype)
    if act == "prelu":
        return F.prelu(x, weight if weight is not None else x.new_full((1,), p0))
    if act == "hard_logistic":
        return (x * 0.25 + 0.5).clamp(0.0, 1.0)
    if act == "leaky_relu":
        return F.leaky_relu(x, p0)
    if act == "elu":
        return F.elu(x, p0)
    if act == "softplus":
        return F.softplus(x, p0, p1)
    if act == "hardtanh":
        return F.hardtanh(x, p0, p1)
    return {"relu": F.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh, "hardsigmoid": F.hardsigmoid}[act](x)


def _derivative(s, act, p0, p1, from_output):
    """f'(x) from s, the input (or the output with from_output), in s's dtype: the kernels' act_grad and
    act_grad_from_output. p0 may be a tensor (prelu's weight, swish's beta, broadcast over s)."""
    if from_output:
        if act == "sigmoid":
            return s * (1.0 - s)
        if act == "tanh":
            return 1.0 - s * s
        if act == "elu":
            return _where(s <= 0, s + p0, 1.0, s)
    if act == "relu":
        return _where(s <= 0, 0.0, 1.0, s)
    if act in ("leaky_relu", "prelu"):
        return _where(s > 0, 1.0, p0, s)
    if act == "elu":
        return _where(s <= 0, p0 * torch.exp(s), 1.0, s)
    if act == "softplus":
        z = s * p0
        return _where(z > p1, 1.0, torch.sigmoid(z), s)
    if act in ("silu", "swish"):
        z = s if act == "silu" else s * p0
        sig = torch.sigmoid(z)
        return sig + _times_decaying(z, sig * torch.sigmoid(-z))  # sigma'(z) without the cancellation in 1 - sigma
    if act == "gelu":
        return 0.5 * (1.0 + torch.erf(s * _SQRT1_2)) + _times_decaying(s, torch.exp(-0.5 * s * s) * _INV_SQRT_2PI)
    if act == "gelu_tanh":
        u2 = 2.0 * _K_BETA * (s + _K_KAPPA * s * s * s)
        du2 = 2.0 * _K_BETA * (1.0 + 3.0 * _K_KAPPA * s * s)
        sig = torch.sigmoid(u2)
        return sig + _times_decaying(s * du2, sig * torch.sigmoid(-u2))
    if act == "sigmoid":
        return torch.sigmoid(s) * torch.sigmoid(-s)
    if act == "tanh":
        e = torch.exp(-2.0 * s.abs())  # 1 - tanh^2 = 4e/(1 + e)^2: no cancellation where tanh saturates
        return 4.0 * e / ((1.0 + e) * (1.0 + e))
    if act == "hardsigmoid":
        return _where((s > -3.0) & (s < 3.0), 1.0 / 6.0, 0.0, s)
    if act == "hardtanh":
        return _where((s > p0) & (s < p1), 1.0, 0.0, s)
    if act == "hard_logistic":
        return _where((s > -2.0) & (s < 2.0), 0.25, 0.0, s)
    raise AssertionError(act)


def _param_derivative(x, act, w):
    """df/dw per element: prelu's weight (x where x <= 0), swish's beta (x^2 sigma'(wx))."""
    if act == "prelu":
        return torch.where(x > 0, 0.0, x)
    z = x * w
    return _times_decaying(x * x, torch.sigmoid(z) * torch.sigmoid(-z))


def composite_backward(g, s, act, p0, p1, from_output):
    """g * f'(x) with PyTorch ops (differentiable), in s's dtype; s and from_output as in activation_backward."""
    if act == "relu":  # ATen's op has the same values (NaN passes the gradient) and is the cheapest on the host
        return torch.ops.aten.threshold_backward(g, s, 0)
    sc = _to_compute(s)
    return (g.to(sc.dtype) * _derivative(sc, act, p0, p1, from_output)).to(s.dtype)


def composite_channelwise_backward(g, x, weight, act, weight_grad):
    """(dx, dw or None) for prelu / tensor-beta swish with PyTorch ops (differentiable)."""
    xc = _to_compute(x)
    w = _channel_view(weight, x).to(xc.dtype)
    gc = g.to(xc.dtype)
    dx = (gc * _derivative(xc, act, w, 0.0, False)).to(x.dtype)
    if not weight_grad:
        return dx, None
    dw_elems = gc * _param_derivative(xc, act, w)
    dims = [d for d in range(x.dim()) if not (d == 1 and weight.numel() > 1)]
    dw = dw_elems.sum(dims) if dims else dw_elems
    return dx, dw.to(weight.dtype).reshape(weight.shape)


def _composite_channelwise_jvp(x, weight, act, x_t, w_t):
    """The tangent of f(x, w) for tangents x_t, w_t (either may be None)."""
    xc = _to_compute(x)
    w = _channel_view(weight, x).to(xc.dtype)
    t = torch.zeros_like(xc) if x_t is None else x_t.to(xc.dtype) * _derivative(xc, act, w, 0.0, False)
    if w_t is not None:
        t = t + _channel_view(w_t, x).to(xc.dtype) * _param_derivative(xc, act, w)
    return t.to(x.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Ops
# ----------------------------------------------------------------------------------------------------------------


def _activation_triton(x, act, p0, p1):
    _check_input(x, act, p0, p1)
    y = torch.empty_like(x)
    _launch_forward(y, x, act, p0, p1)
    return y


def _activation_composite(x, act, p0, p1):
    _check_input(x, act, p0, p1)
    return torch.empty_like(x).copy_(composite_forward(x, act, p0, p1))


def _activation_fake(x, act, p0, p1):
    _check_input(x, act, p0, p1)
    return torch.empty_like(x)


def _act_name(index):
    """For the CPU fallback's warning: the activation's name, the op's argument at `index`."""
    return lambda *args: args[index]


activation = define("activation(Tensor x, str act, float p0, float p1) -> Tensor",
                    _activation_triton, _activation_composite, _activation_fake, _act_name(1))


def _activation_inplace_triton(x, act, p0, p1):
    _check_input(x, act, p0, p1)
    _check_inplace(x)
    _launch_forward(x, x, act, p0, p1)


def _activation_inplace_composite(x, act, p0, p1):
    _check_input(x, act, p0, p1)
    _check_inplace(x)
    x.copy_(composite_forward(x, act, p0, p1))


def _activation_inplace_fake(x, act, p0, p1):
    _check_input(x, act, p0, p1)


activation_ = define("activation_(Tensor(a!) x, str act, float p0, float p1) -> ()",
                     _activation_inplace_triton, _activation_inplace_composite, _activation_inplace_fake,
                     _act_name(1))


def _activation_backward_triton(grad_output, saved, act, p0, p1, saved_is_output):
    dx = torch.empty_like(saved)
    _launch_backward(dx, grad_output, saved, act, p0, p1, saved_is_output)
    return dx


def _activation_backward_composite(grad_output, saved, act, p0, p1, saved_is_output):
    return torch.empty_like(saved).copy_(composite_backward(grad_output, saved, act, p0, p1, saved_is_output))


def _activation_backward_fake(grad_output, saved, act, p0, p1, saved_is_output):
    return torch.empty_like(saved)


activation_backward = define(
    "activation_backward(Tensor grad_output, Tensor saved, str act, float p0, float p1, bool saved_is_output) "
    "-> Tensor",
    _activation_backward_triton, _activation_backward_composite, _activation_backward_fake, _act_name(2),
)


def _channelwise_triton(x, weight, act):
    _check_channelwise(x, weight, act)
    y = torch.empty_like(x)
    _launch_forward(y, x, act, 0.0, 0.0, weight)
    return y


def _channelwise_composite(x, weight, act):
    _check_channelwise(x, weight, act)
    return torch.empty_like(x).copy_(composite_forward(x, act, 0.0, 0.0, weight))


def _channelwise_fake(x, weight, act):
    _check_channelwise(x, weight, act)
    return torch.empty_like(x)


activation_channelwise = define("activation_channelwise(Tensor x, Tensor weight, str act) -> Tensor",
                                _channelwise_triton, _channelwise_composite, _channelwise_fake, _act_name(2))


def _one_dense_layout(*tensors):
    """Whether the tensors share one layout whose memory is an (O, C, I) array, C = dim 1: contiguous, or
    channels_last."""
    first = tensors[0]
    if any(t.stride() != first.stride() for t in tensors[1:]):
        return False
    return first.is_contiguous() or (first.dim() == 4 and first.is_contiguous(memory_format=torch.channels_last))


def _channelwise_backward_triton(grad_output, x, weight, act, weight_grad):
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
    _launch_backward(dx, grad_output, x, act, 0.0, 0.0, False, weight, dw_elems)
    if not weight_grad:
        return dx, weight.new_empty(0)
    if x.numel() == 0:
        return dx, torch.zeros_like(weight, memory_format=torch.contiguous_format)
    return dx, _channel_sum(dw_elems, channels).to(weight.dtype).view(weight.shape)


def _channelwise_backward_composite(grad_output, x, weight, act, weight_grad):
    dx, dw = composite_channelwise_backward(grad_output, x, weight, act, weight_grad)
    return torch.empty_like(x).copy_(dx), weight.new_empty(0) if dw is None else dw


def _channelwise_backward_fake(grad_output, x, weight, act, weight_grad):
    dw = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device) if weight_grad else weight.new_empty(0)
    return torch.empty_like(x), dw


activation_channelwise_backward = define(
    "activation_channelwise_backward(Tensor grad_output, Tensor x, Tensor weight, str act, bool weight_grad) "
    "-> (Tensor, Tensor)",
    _channelwise_backward_triton, _channelwise_backward_composite, _channelwise_backward_fake, _act_name(3),
)


# ----------------------------------------------------------------------------------------------------------------
# vmap rules (torch.func.vmap, and the Functions' generated vmap rules): one unbatched call per batch
# ----------------------------------------------------------------------------------------------------------------


@torch.library.register_vmap(activation)
def _(info, in_dims, x, act, p0, p1):
    return torch.ops.dlkern.activation(x, act, p0, p1), in_dims[0]  # elementwise: any batch dim


@torch.library.register_vmap(activation_)
def _(info, in_dims, x, act, p0, p1):
    torch.ops.dlkern.activation_(x, act, p0, p1)
    return None, None


@torch.library.register_vmap(activation_backward)
def _(info, in_dims, grad_output, saved, act, p0, p1, saved_is_output):
    g, s = (batch_first(t, d, info.batch_size) for t, d in zip((grad_output, saved), in_dims[:2]))
    return torch.ops.dlkern.activation_backward(g, s, act, p0, p1, saved_is_output), 0


def _fold_batch(x, weight):
    """(x, weight) batched in dim 0 (weight (B, 1 or C)) as one unbatched channelwise problem: the batch is folded
    into the channel dim. Returns (x2, w2, unfold), unfold mapping an x2-shaped result back to x's shape."""
    B = x.shape[0]
    if weight[0].numel() == 1:  # one parameter per sample: the samples are the channels
        return x.reshape(1, B, -1), weight.reshape(B), lambda y: y.reshape(x.shape)
    # (B, N, C, *rest) -> (N, B*C, *rest): channel b*C + c holds sample b's channel c
    folded = x.movedim(0, 1)
    shape = folded.shape
    return (folded.reshape(shape[0], B * shape[2], *shape[3:]), weight.reshape(-1),
            lambda y: y.reshape(shape).movedim(1, 0))


@torch.library.register_vmap(activation_channelwise)
def _(info, in_dims, x, weight, act):
    x_dim, w_dim = in_dims[:2]
    if w_dim is None and weight.numel() == 1:
        return torch.ops.dlkern.activation_channelwise(x, weight, act), x_dim
    if w_dim is None:  # one weight for every sample: the batch joins dim 0
        x = x.movedim(x_dim, 0)
        return torch.ops.dlkern.activation_channelwise(x.flatten(0, 1), weight, act).unflatten(0, x.shape[:2]), 0
    x2, w2, unfold = _fold_batch(batch_first(x, x_dim, info.batch_size), weight.movedim(w_dim, 0))
    return unfold(torch.ops.dlkern.activation_channelwise(x2, w2, act)), 0


@torch.library.register_vmap(activation_channelwise_backward)
def _(info, in_dims, grad_output, x, weight, act, weight_grad):
    g, x, weight = (batch_first(t, d, info.batch_size) for t, d in zip((grad_output, x, weight), in_dims[:3]))
    x2, w2, unfold = _fold_batch(x, weight)
    g2 = _fold_batch(g, weight)[0]
    dx, dw = torch.ops.dlkern.activation_channelwise_backward(g2, x2, w2, act, weight_grad)
    if not weight_grad:
        return (unfold(dx), dw), (0, None)
    return (unfold(dx), dw.reshape(weight.shape)), (0, 0)


# ----------------------------------------------------------------------------------------------------------------
# Autograd: torch.autograd.Functions around the ops (one node per call). Each comes in two classes: the base,
# traced by torch.compile (dynamo graph-breaks on a custom jvp), and a subclass with forward-mode AD (jvp), used in
# eager mode. Their backward runs the kernel op, or, when it builds a graph (create_graph=True, and always under
# torch.func's transforms), the differentiable composite: that is what double backward differentiates.
# ----------------------------------------------------------------------------------------------------------------


def _vjp(g, saved, act, p0, p1, from_output):
    if torch.is_grad_enabled():
        return composite_backward(g, saved, act, p0, p1, from_output)
    return call_op(activation_backward, g, saved, act, p0, p1, from_output)


class Activation(torch.autograd.Function):
    """y = f(x) (``dlkern::activation``); the backward reads the output where ATen's does (SAVE_OUTPUT)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, act, p0, p1):
        return call_op(activation, x, act, p0, p1)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, ctx.act, ctx.p0, ctx.p1 = inputs
        ctx.from_output = ctx.act in SAVE_OUTPUT
        ctx.save_for_backward(output if ctx.from_output else x)

    @staticmethod
    def backward(ctx, grad_output):
        (saved,) = ctx.saved_tensors
        return _vjp(grad_output, saved, ctx.act, ctx.p0, ctx.p1, ctx.from_output), None, None, None


class ActivationWithJvp(Activation):
    @staticmethod
    def setup_context(ctx, inputs, output):
        Activation.setup_context(ctx, inputs, output)
        ctx.save_for_forward(output if ctx.from_output else inputs[0])

    @staticmethod
    def jvp(ctx, x_t, *_):
        (saved,) = ctx.saved_tensors
        return composite_backward(x_t, saved, ctx.act, ctx.p0, ctx.p1, ctx.from_output)


# Direct calls of the op (torch.ops.dlkern.activation) get the same reverse-mode autograd.
torch.library.register_autograd("dlkern::activation", Activation.backward, setup_context=Activation.setup_context,
                                lib=LIB)


class ActivationChannelwise(torch.autograd.Function):
    """y = f(x, weight) for prelu / tensor-beta swish (``dlkern::activation_channelwise``)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, act):
        return call_op(activation_channelwise, x, weight, act)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, ctx.act = inputs
        ctx.save_for_backward(x, weight)

    @staticmethod
    def backward(ctx, grad_output):
        x, weight = ctx.saved_tensors
        weight_grad = ctx.needs_input_grad[1]
        if torch.is_grad_enabled():
            dx, dw = composite_channelwise_backward(grad_output, x, weight, ctx.act, weight_grad)
        else:
            dx, dw = call_op(activation_channelwise_backward, grad_output, x, weight, ctx.act,
                             weight_grad)
        return dx, (dw if weight_grad else None), None


class ActivationChannelwiseWithJvp(ActivationChannelwise):
    @staticmethod
    def setup_context(ctx, inputs, output):
        ActivationChannelwise.setup_context(ctx, inputs, output)
        ctx.save_for_forward(inputs[0], inputs[1])

    @staticmethod
    def jvp(ctx, x_t, w_t, _):
        x, weight = ctx.saved_tensors
        return _composite_channelwise_jvp(x, weight, ctx.act, x_t, w_t)


torch.library.register_autograd(
    "dlkern::activation_channelwise", ActivationChannelwise.backward, setup_context=ActivationChannelwise.setup_context,
    lib=LIB,
)


def _refuse_negative_slope(act, p0):
    # From the output of an in-place op with a negative slope/alpha the branch is lost: ATen refuses these too.
    if act in ("leaky_relu", "elu") and p0 < 0:
        name = "leakyReLu" if act == "leaky_relu" else "elu"
        raise RuntimeError(
            f"In-place {name} backward calculation is triggered with a negative slope which is not supported. "
            "This is caused by calling in-place forward function with a negative slope, please call "
            "out-of-place version instead."
        )


class ActivationInplace(torch.autograd.Function):
    """x = f(x) in place (``dlkern::activation_``), marking x dirty as ATen's in-place ops do. The backward reads
    the output where that is exact (INPLACE_FROM_OUTPUT), else ``original``, a copy of the input the caller
    takes before it is overwritten (None otherwise)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, original, act, p0, p1):
        call_op(activation_, x, act, p0, p1)
        return x

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, original, ctx.act, ctx.p0, ctx.p1 = inputs
        ctx.mark_dirty(x)
        ctx.from_output = original is None
        ctx.save_for_backward(output if ctx.from_output else original)

    @staticmethod
    def backward(ctx, grad_output):
        (saved,) = ctx.saved_tensors
        _refuse_negative_slope(ctx.act, ctx.p0)
        return _vjp(grad_output, saved, ctx.act, ctx.p0, ctx.p1, ctx.from_output), None, None, None, None


class ActivationInplaceWithJvp(ActivationInplace):
    @staticmethod
    def setup_context(ctx, inputs, output):
        ActivationInplace.setup_context(ctx, inputs, output)
        ctx.save_for_forward(output if ctx.from_output else inputs[1])

    @staticmethod
    def jvp(ctx, x_t, *_):
        (saved,) = ctx.saved_tensors
        _refuse_negative_slope(ctx.act, ctx.p0)
        return x_t.copy_(composite_backward(x_t, saved, ctx.act, ctx.p0, ctx.p1, ctx.from_output))  # in place


# ----------------------------------------------------------------------------------------------------------------
# Entry points for dlkern.functional
# ----------------------------------------------------------------------------------------------------------------


_activation_apply = function_apply(ActivationWithJvp, Activation)
_channelwise_apply = function_apply(ActivationChannelwiseWithJvp, ActivationChannelwise)
_inplace_apply = function_apply(ActivationInplaceWithJvp, ActivationInplace)


def apply_activation(x, act, p0, p1):
    """y = f(x), autograd-aware (reverse, forward mode, torch.func)."""
    if not needs_autograd(x):
        return call_op(activation, x, act, p0, p1)
    return _activation_apply(x, act, p0, p1)


def apply_channelwise(x, weight, act):
    """y = f(x, weight) for prelu / tensor-beta swish, autograd-aware."""
    if not needs_autograd(x, weight):
        return call_op(activation_channelwise, x, weight, act)
    return _channelwise_apply(x, weight, act)


def activation_inplace(x, act, p0, p1):
    """``x = f(x)`` in place, autograd-aware; returns x."""
    if torch.jit.is_tracing() or torch._C._functorch.peek_interpreter_stack() is not None:
        # torch.func's transforms do not take an autograd.Function that returns its input marked dirty, and a
        # trace records ops: compute out of place (on a copy, which the backward may save) and copy into x.
        return x.copy_(apply_activation(x.clone(), act, p0, p1))
    if not needs_autograd(x):
        call_op(activation_, x, act, p0, p1)
        return x
    # A copy of the input for the backward, as ATen's in-place ops without an exact formula from the output (not
    # detached: a double backward differentiates through it).
    original = None if act in INPLACE_FROM_OUTPUT else x.clone()
    return _inplace_apply(x, original, act, p0, p1)
