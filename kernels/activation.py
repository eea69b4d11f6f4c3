"""Activation functions: pure Triton math helpers, then one elementwise forward kernel, one backward kernel and
the per-channel reduction that turns PReLU/Swish parameter-gradient contributions into a gradient.

Every activation is a pair of helpers, ``act_fwd`` (f) and ``act_grad`` (f' from the input), selected by the
string constexpr ``ACT`` (a name of ``dlkern.catalog.ACTIVATIONS``); the fused Conv+BN block imports the same
two helpers. Parameters: ``p0``/``p1`` (see the table in :func:`act_fwd`), scalars or, for ``prelu``/``swish``,
blocks broadcastable to ``x``.

Arithmetic runs in the dtype of ``x`` as the caller gives it: the kernels here upcast fp16/bf16 to fp32 and keep
fp64 in fp64. There is no libdevice anywhere (it cannot run in Triton's interpreter), so tanh, expm1 and log1p
are built from ``tl.exp``/``tl.log`` with series where the plain formulas lose relative precision (near 0).
On NVIDIA GPUs fp32 ``tl.exp`` is ``ex2.approx(x * log2(e))``: the rounded product costs about |x| * 6e-8
relative, which only shows in values that are already tiny (sigmoid or softplus below ~1e-7, absolute error
< 1e-14); the interpreter's exp is exact.

Comparisons are written the way ATen writes them, so NaN inputs and values at a breakpoint take the same branch
as in PyTorch (e.g. relu's gradient is 0 at 0 but passes the gradient for NaN, leaky_relu's is the slope at NaN).
Products of an infinite input with an underflowed factor (silu, swish, gelu at +-inf) return their limit where
PyTorch's formulas give NaN.
"""

import triton
import triton.language as tl

from dlkern._interpret import INTERPRETING

# GELU constants (constexpr: the only globals a compiled kernel may read): 1/sqrt(2), 1/sqrt(2*pi), and the tanh
# approximation's sqrt(2/pi) and cubic coefficient.
SQRT1_2 = tl.constexpr(0.7071067811865476)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
K_BETA = tl.constexpr(0.7978845608028654)
K_KAPPA = tl.constexpr(0.044715)


# ----------------------------------------------------------------------------------------------------------------
# Math helpers
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _full_like(x, value):
    # A constant in x's dtype: a bare Python float in tl.where would be fp32 and round fp64 constants like 1/6.
    return tl.full(x.shape, value, x.dtype)


@triton.jit
def _expm1_series(x, N: tl.constexpr):
    # Taylor series of e^x - 1 to x^N, in Horner form: x(1 + x/2(1 + x/3(1 + ... (1 + x/N)))).
    p = 1.0 + x * (1.0 / N)
    for k in tl.static_range(N - 1, 1, -1):
        p = 1.0 + x * p * (1.0 / k)
    return x * p


@triton.jit
def _expm1(x):
    # e^x - 1 with relative precision: for |x| < 0.5, exp(x) - 1 cancels, so a series is used there (its
    # truncation error, 0.5^N/(N+1)!, is below the dtype's rounding); beyond, the cancellation in exp(x) - 1
    # magnifies exp's error at most e^0.5/(e^0.5 - 1) ~ 2.5 times.
    if x.dtype == tl.float64:
        small = _expm1_series(x, 15)
    else:
        small = _expm1_series(x, 8)
    return tl.where(tl.abs(x) < 0.5, small, tl.exp(x) - 1.0)


@triton.jit
def _atanh_series_over_s(s2, N: tl.constexpr):
    # atanh(s)/s = 1 + s^2/3 + s^4/5 + ... + s^(2N)/(2N+1), in Horner form in s^2.
    p = 1.0 / (2 * N + 1)
    for k in tl.static_range(N - 1, -1, -1):
        p = 1.0 / (2 * k + 1) + s2 * p
    return p


@triton.jit
def _log1p_unit(t):
    # log(1 + t) for t in [0, 1] with relative precision. Below 0.25, 1 + t would round t away, so use
    # log1p(t) = 2 atanh(s), s = t/(2 + t) <= 1/9, whose series in s^2 <= 1/81 converges fast.
    s = t / (2.0 + t)
    if t.dtype == tl.float64:
        p = _atanh_series_over_s(s * s, 9)
    else:
        p = _atanh_series_over_s(s * s, 4)
    return tl.where(t < 0.25, 2.0 * s * p, tl.log(1.0 + t))


@triton.jit
def _sigmoid_pair(x):
    # (sigma(x), sigma(-x)) without overflow or cancellation: both from e = exp(-|x|) <= 1.
    # sigma(-inf) = 0, sigma(inf) = 1, NaN stays NaN.
    e = tl.exp(-tl.abs(x))
    big = 1.0 / (1.0 + e)
    small = e * big
    pos = x >= 0
    return tl.where(pos, big, small), tl.where(pos, small, big)


@triton.jit
def _tanh(x):
    # tanh|x| = -expm1(-2|x|) / (2 + expm1(-2|x|)): relative precision near 0, saturates to 1 without overflow.
    em = _expm1(-2.0 * tl.abs(x))
    t = -em / (2.0 + em)
    # Odd symmetry; zeros and NaN pass through (keeps tanh(-0.0) = -0.0, as PyTorch).
    return tl.where(x < 0, -t, tl.where(x > 0, t, x))


@triton.jit
def _softplus_core(z):
    # log(1 + e^z) = max(z, 0) + log1p(e^-|z|): no overflow for large z, no underflow to 0 for very negative z.
    return tl.maximum(z, 0.0) + _log1p_unit(tl.exp(-tl.abs(z)))


@triton.jit
def _times_decaying(x, q):
    # x * q where q decays exponentially in |x| (a sigmoid or Gaussian factor): once q underflows to 0 the
    # product's limit is 0, also for x = +-inf, where the plain product would be inf * 0 = NaN.
    return tl.where(q == 0, 0.0, x * q)


@triton.jit
def act_fwd(x, ACT: tl.constexpr, p0, p1):
    """f(x) for the activation named by ACT, in x's dtype (pass an fp32 block for fp32 math).

    ACT and its parameters (unused ones are ignored):
      relu | leaky_relu p0=negative_slope | prelu p0=weight | elu p0=alpha | softplus p0=beta, p1=threshold |
      silu | swish p0=beta | gelu | gelu_tanh | sigmoid | tanh | hardsigmoid | hardswish |
      hardtanh p0=min_val, p1=max_val | hard_logistic.
    Pass p0/p1 in x's dtype (they are cast to it, but a bare Python float is rounded to fp32 first); prelu's
    weight and swish's beta may be blocks broadcastable to x.
    """
    p0 = tl.cast(p0, x.dtype)
    p1 = tl.cast(p1, x.dtype)
    if ACT == "relu":
        y = tl.where(x < 0, 0.0, x)  # NaN and -0.0 pass through, as in PyTorch
    elif ACT == "leaky_relu":
        y = tl.where(x > 0, x, x * p0)
    elif ACT == "prelu":
        y = tl.where(x > 0, x, x * p0)
    elif ACT == "elu":
        y = tl.where(x <= 0, p0 * _expm1(x), x)
    elif ACT == "softplus":
        z = x * p0
        y = tl.where(z > p1, x, _softplus_core(z) / p0)  # linear strictly above the threshold, as PyTorch
    elif ACT == "silu":
        s, _ = _sigmoid_pair(x)
        y = _times_decaying(x, s)
    elif ACT == "swish":
        s, _ = _sigmoid_pair(x * p0)
        y = _times_decaying(x, s)
    elif ACT == "gelu":
        cdf = 0.5 * (1.0 + tl.math.erf(x * SQRT1_2))
        y = _times_decaying(x, cdf)
    elif ACT == "gelu_tanh":
        # 0.5x(1 + tanh(u)) = x*sigma(2u): the same function without the cancellation in 1 + tanh(u) for u < 0.
        u = K_BETA * (x + K_KAPPA * x * x * x)
        s, _ = _sigmoid_pair(2.0 * u)
        y = _times_decaying(x, s)
    elif ACT == "sigmoid":
        y, _ = _sigmoid_pair(x)
    elif ACT == "tanh":
        y = _tanh(x)
    elif ACT == "hardsigmoid":
        y = tl.where(x <= -3.0, 0.0, tl.where(x >= 3.0, 1.0, x / 6.0 + 0.5))
    elif ACT == "hardswish":
        # ATen's x * relu6(x + 3) / 6, by branch: -0.0 for x <= -3 (ATen's x * 0, with x clamped to -3 so that -inf
        # gives it too, the limit, where ATen's is NaN; a -0.0 constant comes out +0.0, in the interpreter at least),
        # x for x >= 3 (ATen's x * 6 / 6 overflows beyond max/6), x * (x + 3) / 6 between.
        y = tl.where(x <= -3.0, tl.maximum(x, -3.0) * 0.0, tl.where(x >= 3.0, x, x * (x + 3.0) / 6.0))
    elif ACT == "hardtanh":
        y = tl.where(x < p0, p0, tl.where(x > p1, p1, x))
        y = tl.where((p0 != p0) | (p1 != p1), p0 + p1, y)  # a NaN bound gives NaN everywhere, as ATen's clamp
    elif ACT == "hard_logistic":
        y = tl.where(x <= -2.0, 0.0, tl.where(x >= 2.0, 1.0, 0.25 * x + 0.5))
    else:
        tl.static_assert(False, "act_fwd: unknown activation")
    return y


@triton.jit
def act_grad(x, ACT: tl.constexpr, p0, p1):
    """df/dx evaluated from the input x, in x's dtype; ACT, p0, p1 as in :func:`act_fwd`."""
    p0 = tl.cast(p0, x.dtype)
    p1 = tl.cast(p1, x.dtype)
    zero = _full_like(x, 0.0)
    one = _full_like(x, 1.0)
    if ACT == "relu":
        d = tl.where(x <= 0, zero, one)  # 0 at 0; NaN passes the gradient (ATen tests the result <= 0)
    elif ACT == "leaky_relu":
        d = tl.where(x > 0, one, p0 + zero)
    elif ACT == "prelu":
        d = tl.where(x > 0, one, p0 + zero)
    elif ACT == "elu":
        d = tl.where(x <= 0, p0 * tl.exp(x), one)
    elif ACT == "softplus":
        z = x * p0
        s, _ = _sigmoid_pair(z)
        d = tl.where(z > p1, one, s)
    elif ACT == "silu":
        s, s_neg = _sigmoid_pair(x)
        d = s + _times_decaying(x, s * s_neg)
    elif ACT == "swish":
        z = x * p0
        s, s_neg = _sigmoid_pair(z)
        d = s + _times_decaying(z, s * s_neg)
    elif ACT == "gelu":
        cdf = 0.5 * (1.0 + tl.math.erf(x * SQRT1_2))
        pdf = tl.exp(-0.5 * x * x) * INV_SQRT_2PI
        d = cdf + _times_decaying(x, pdf)
    elif ACT == "gelu_tanh":
        u = K_BETA * (x + K_KAPPA * x * x * x)
        du = (2.0 * K_BETA) * (1.0 + (3.0 * K_KAPPA) * x * x)
        s, s_neg = _sigmoid_pair(2.0 * u)
        d = s + _times_decaying(x * du, s * s_neg)
    elif ACT == "sigmoid":
        s, s_neg = _sigmoid_pair(x)
        d = s * s_neg
    elif ACT == "tanh":
        # 1 - tanh^2 = 4e/(1 + e)^2, e = exp(-2|x|): no cancellation where tanh saturates.
        e = tl.exp(-2.0 * tl.abs(x))
        d = 4.0 * e / ((1.0 + e) * (1.0 + e))
    elif ACT == "hardsigmoid":
        d = tl.where((x > -3.0) & (x < 3.0), _full_like(x, 1.0 / 6.0), zero)
    elif ACT == "hardswish":
        # ATen's hardswish_backward: 0 for x <= -3, 1 for x >= 3, x/3 + 1/2 (= (2x + 3)/6) strictly inside, so -0.5
        # and 1.5 are never taken. NaN gives NaN (ATen's vectorized CPU kernel; its scalar and CUDA ones pass g).
        d = tl.where(x <= -3.0, zero, tl.where(x >= 3.0, one, x / 3.0 + 0.5))
    elif ACT == "hardtanh":
        # 1 strictly inside (min, max), so 0 for NaN: ATen's vectorized CPU kernel; its scalar and CUDA ones
        # (x <= min || x >= max ? 0 : g) pass NaN's gradient, so PyTorch itself differs by position and device.
        d = tl.where((x > p0) & (x < p1), one, zero)
    elif ACT == "hard_logistic":
        d = tl.where((x > -2.0) & (x < 2.0), _full_like(x, 0.25), zero)
    else:
        tl.static_assert(False, "act_grad: unknown activation")
    return d


@triton.jit
def times_grad(g, d, ACT: tl.constexpr):
    """g * d for d = f'(x) from act_grad/act_grad_from_output. On a flat branch (relu, hardtanh, hardsigmoid,
    hardswish, hard_logistic where d is 0) ATen's backward selects 0 (threshold_backward, hardtanh_backward,
    hardswish_backward), so a NaN or inf g gives 0 there, not NaN. (hardswish's d is also 0 at x = -1.5 exactly,
    where ATen's g * 0 keeps a NaN or inf g's NaN; d alone cannot tell the two apart.)"""
    gd = g * d
    if ((ACT == "relu") | (ACT == "hardtanh") | (ACT == "hardsigmoid") | (ACT == "hardswish")
            | (ACT == "hard_logistic")):
        gd = tl.where(d == 0, 0.0, gd)
    return gd


@triton.jit
def act_grad_from_output(y, ACT: tl.constexpr, p0, p1):
    """df/dx evaluated from the output y = f(x), for the activations where that is exact (as ATen's backward
    for sigmoid, tanh, relu and the in-place leaky_relu_/elu_/hardtanh_)."""
    p0 = tl.cast(p0, y.dtype)
    p1 = tl.cast(p1, y.dtype)
    zero = _full_like(y, 0.0)
    one = _full_like(y, 1.0)
    if ACT == "sigmoid":
        d = y * (1.0 - y)
    elif ACT == "tanh":
        d = 1.0 - y * y
    elif ACT == "relu":
        d = tl.where(y <= 0, zero, one)
    elif ACT == "leaky_relu":
        d = tl.where(y > 0, one, p0 + zero)  # needs slope >= 0 (checked by the caller)
    elif ACT == "elu":
        d = tl.where(y <= 0, y + p0, one)  # alpha*e^x = y + alpha; needs alpha >= 0
    elif ACT == "hardtanh":
        d = tl.where((y > p0) & (y < p1), one, zero)
    else:
        tl.static_assert(False, "act_grad_from_output: not exact for this activation")
    return d


@triton.jit
def act_grad_param(x, ACT: tl.constexpr, p0):
    """df/dp0 from the input: prelu's weight (x where x <= 0) or swish's beta (x^2 sigma(bx) sigma(-bx))."""
    p0 = tl.cast(p0, x.dtype)
    if ACT == "prelu":
        d = tl.where(x > 0, 0.0, x)
    elif ACT == "swish":
        s, s_neg = _sigmoid_pair(x * p0)
        d = _times_decaying(x * x, s * s_neg)  # 0 at +-inf (x * (x * q) would be inf * 0 there)
    else:
        tl.static_assert(False, "act_grad_param: only prelu and swish have a tensor parameter")
    return d


@triton.jit
def _compute_dtype(v):
    # Arithmetic in fp32 for fp16/bf16/fp32 inputs, in fp64 for fp64 inputs.
    if v.dtype != tl.float64:
        v = v.to(tl.float32)
    return v


@triton.jit
def _scalar_arg(p, like):
    # A float kernel argument as a scalar of like's dtype. On a GPU it arrives as fp64 (annotated so), in the
    # interpreter as a Python float, which tl.cast would round through fp32; adding an fp64 zero is exact in both.
    return (p + tl.zeros([], tl.float64)).to(like.dtype)


@triton.jit
def _offsets(idx, size1, size2, size3, stride0, stride1, stride2, stride3):
    # Memory offsets of the elements with row-major logical index idx in a (., size1, size2, size3) view.
    i3 = idx % size3
    rest = idx // size3
    i2 = rest % size2
    rest = rest // size2
    i1 = rest % size1
    i0 = rest // size1
    return i0 * stride0 + i1 * stride1 + i2 * stride2 + i3 * stride3


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------
#
# Layouts: with STRIDED=False every tensor has the same dense (non-overlapping) strides, so the kernels walk
# memory as a flat array -- any dense layout (contiguous, channels_last, transposed) without a copy, and the
# output keeps the input's strides. With STRIDED=True each tensor gets its own strides in a view of at most four
# dims (coalesced on the host) and the kernels walk the logical row-major index.
# A per-channel parameter (prelu weight, swish beta) is read at channel (i // ch_div) % C, where i is the memory
# offset (flat: ch_div = stride of dim 1) or the logical index (strided: ch_div = product of sizes after dim 1),
# times the parameter's own stride (any 1-D view: a slice, an expanded scalar).


def _elementwise_configs():
    # Memory-bound: the block size only trades occupancy against per-program overhead. One fixed config in the
    # interpreter (a single config is never benchmarked), small so that the tests' tiny tensors span programs.
    if INTERPRETING:
        return [triton.Config({"BLOCK": 64}, num_warps=4)]
    # (BLOCK 4096 at 8 warps took 74-80 registers a thread on sm_90, 37.5% occupancy, and spilled in the
    # backward: not offered.)
    return [
        triton.Config({"BLOCK": 1024}, num_warps=4),
        triton.Config({"BLOCK": 2048}, num_warps=8),
    ]


# size_bucket (log2 of numel, coarsened by the launcher) keys the tuning so new sizes reuse a tuned config.
# restore_value: in-place launches pass x_ptr == y_ptr, and tuning runs the kernel several times.
@triton.autotune(
    configs=_elementwise_configs(), key=["size_bucket", "ACT", "PER_CHANNEL", "STRIDED"], restore_value=["x_ptr"]
)
@triton.jit(do_not_specialize=["numel", "size_bucket", "C", "ch_div", "size1", "size2", "size3"])
def activation_fwd_kernel(
    x_ptr, y_ptr, w_ptr,
    numel, size_bucket, p0: tl.float64, p1: tl.float64, C, ch_div, w_stride,
    size1, size2, size3,
    x_stride0, x_stride1, x_stride2, x_stride3,
    y_stride0, y_stride1, y_stride2, y_stride3,
    ACT: tl.constexpr, PER_CHANNEL: tl.constexpr, STRIDED: tl.constexpr, BLOCK: tl.constexpr,
):
    """y = f(x, p0, p1); with PER_CHANNEL, p0 is w[channel] instead."""
    pid = tl.program_id(0).to(tl.int64)
    idx = pid * BLOCK + tl.arange(0, BLOCK)
    mask = idx < numel
    if STRIDED:
        x_offs = _offsets(idx, size1, size2, size3, x_stride0, x_stride1, x_stride2, x_stride3)
        y_offs = _offsets(idx, size1, size2, size3, y_stride0, y_stride1, y_stride2, y_stride3)
    else:
        x_offs = idx
        y_offs = idx
    x = _compute_dtype(tl.load(x_ptr + x_offs, mask=mask))
    a = _scalar_arg(p0, x)
    if PER_CHANNEL:
        a = tl.load(w_ptr + ((idx // ch_div) % C) * w_stride, mask=mask).to(x.dtype)
    y = act_fwd(x, ACT, a, _scalar_arg(p1, x))
    tl.store(y_ptr + y_offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=_elementwise_configs(), key=["size_bucket", "ACT", "PER_CHANNEL", "STRIDED", "NEED_DW"])
@triton.jit(do_not_specialize=["numel", "size_bucket", "C", "ch_div", "size1", "size2", "size3"])
def activation_bwd_kernel(
    g_ptr, s_ptr, w_ptr, dx_ptr, dw_ptr,
    numel, size_bucket, p0: tl.float64, p1: tl.float64, C, ch_div, w_stride,
    size1, size2, size3,
    g_stride0, g_stride1, g_stride2, g_stride3,
    s_stride0, s_stride1, s_stride2, s_stride3,
    dx_stride0, dx_stride1, dx_stride2, dx_stride3,
    ACT: tl.constexpr, FROM_OUTPUT: tl.constexpr, PER_CHANNEL: tl.constexpr, NEED_DW: tl.constexpr,
    STRIDED: tl.constexpr, BLOCK: tl.constexpr,
):
    """dx = g * f'(s), s the saved input (or the output with FROM_OUTPUT). With NEED_DW also writes each
    element's parameter-gradient contribution g * df/dp0 to dw_ptr (laid out like dx, in the compute dtype)."""
    pid = tl.program_id(0).to(tl.int64)
    idx = pid * BLOCK + tl.arange(0, BLOCK)
    mask = idx < numel
    if STRIDED:
        g_offs = _offsets(idx, size1, size2, size3, g_stride0, g_stride1, g_stride2, g_stride3)
        s_offs = _offsets(idx, size1, size2, size3, s_stride0, s_stride1, s_stride2, s_stride3)
        dx_offs = _offsets(idx, size1, size2, size3, dx_stride0, dx_stride1, dx_stride2, dx_stride3)
    else:
        g_offs = idx
        s_offs = idx
        dx_offs = idx
    s = _compute_dtype(tl.load(s_ptr + s_offs, mask=mask))
    g = tl.load(g_ptr + g_offs, mask=mask).to(s.dtype)
    a = _scalar_arg(p0, s)
    b = _scalar_arg(p1, s)
    if PER_CHANNEL:
        a = tl.load(w_ptr + ((idx // ch_div) % C) * w_stride, mask=mask).to(s.dtype)
    if FROM_OUTPUT:
        d = act_grad_from_output(s, ACT, a, b)
    else:
        d = act_grad(s, ACT, a, b)
    tl.store(dx_ptr + dx_offs, times_grad(g, d, ACT).to(dx_ptr.dtype.element_ty), mask=mask)
    if NEED_DW:
        tl.store(dw_ptr + dx_offs, g * act_grad_param(s, ACT, a), mask=mask)


@triton.jit
def _channel_split(C, I, OI, chunk, BLOCK_C: tl.constexpr):
    """This program's channel block and split of a dense (O, C, I) array: (c, c_mask, c_offs, k_start, k_end), the
    split adding positions k = o*I + i in [k_start, k_end) of each channel c."""
    pid_c = tl.program_id(0)
    split = tl.program_id(1).to(tl.int64)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    k_start = split * chunk
    return c, c < C, c.to(tl.int64) * I, k_start, tl.minimum(k_start + chunk, OI)


@triton.jit
def _channel_tile(c_offs, c_mask, k0, k_end, C, I, BLOCK_K: tl.constexpr):
    """(offsets, mask) of the [BLOCK_C, BLOCK_K] tile at positions k0.. of the split's channels."""
    k = k0 + tl.arange(0, BLOCK_K)
    o = k // I
    return c_offs[:, None] + (o * C * I + (k - o * I))[None, :], c_mask[:, None] & (k < k_end)[None, :]


@triton.jit
def channel_sum_kernel(src_ptr, dst_ptr, O, C, I, OI, chunk, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """dst[split, c] = sum of src[o, c, i] over the split's range of k = o*I + i < OI (= O*I, passed from the
    host, which types it int64 when it needs 64 bits), src a dense (O, C, I) array.

    Each program owns BLOCK_C channels of one split and adds its tiles in a fixed order: no atomics, so the
    result is bitwise reproducible. A second launch over the (splits, C, 1) partial sums finishes the reduction.
    """
    c, c_mask, c_offs, k_start, k_end = _channel_split(C, I, OI, chunk, BLOCK_C)
    acc = tl.zeros([BLOCK_C, BLOCK_K], dtype=dst_ptr.dtype.element_ty)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs, mask = _channel_tile(c_offs, c_mask, k0, k_end, C, I, BLOCK_K)
        acc += tl.load(src_ptr + offs, mask=mask, other=0.0)
    tl.store(dst_ptr + tl.program_id(1).to(tl.int64) * C + c, tl.sum(acc, axis=1), mask=c_mask)


@triton.jit
def channelwise_bwd_kernel(g_ptr, x_ptr, w_ptr, dx_ptr, part_ptr, O, C, I, OI, chunk, w_stride, p1: tl.float64,
                           ACT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """The backward of prelu / tensor-beta swish over dense (O, C, I) arrays x, g and dx of one layout, walked as
    channel_sum_kernel walks them: dx = g * f'(x) per element, and part[split, c] = this split's sum of
    g * df/dw over channel c -- the weight gradient with no per-element buffer and no extra pass over it.
    channel_sum_kernel then adds the splits in a fixed order (no atomics: bitwise reproducible)."""
    c, c_mask, c_offs, k_start, k_end = _channel_split(C, I, OI, chunk, BLOCK_C)
    a = _compute_dtype(tl.load(w_ptr + c * w_stride, mask=c_mask, other=0.0))[:, None]
    acc = tl.zeros([BLOCK_C, BLOCK_K], dtype=part_ptr.dtype.element_ty)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs, mask = _channel_tile(c_offs, c_mask, k0, k_end, C, I, BLOCK_K)
        x = _compute_dtype(tl.load(x_ptr + offs, mask=mask, other=0.0))
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(x.dtype)
        d = act_grad(x, ACT, a, _scalar_arg(p1, x))
        tl.store(dx_ptr + offs, times_grad(g, d, ACT).to(dx_ptr.dtype.element_ty), mask=mask)
        acc += tl.where(mask, g * act_grad_param(x, ACT, a), 0.0)
    tl.store(part_ptr + tl.program_id(1).to(tl.int64) * C + c, tl.sum(acc, axis=1), mask=c_mask)
