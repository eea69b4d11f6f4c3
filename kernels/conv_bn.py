"""Fused Conv2d -> BatchNorm2d -> activation: Triton kernels (device code only).

Shapes: input x (N, C_in, H, W), weight (C_out, C_in, KH, KW) contiguous, conv output z (N, C_out, OH, OW).
The convolution is an implicit GEMM: rows m = (n, oh, ow) (M = N*OH*OW), columns = output channels, and the
reduction index k flattens (c_in, kh, kw) (K = C_in*KH*KW) so a 1-channel first layer still fills a K >= 16 dot.
Every tensor is addressed through its four strides (NCHW and channels_last alike), with 32-bit offsets, or
64-bit ones (INDEX_64) when some tensor has >= 2^30 elements.

Training forward:  conv_fwd_kernel (STATS: z + per-tile (mean, M2))  -> bn_stats_finalize_kernel (Chan merge,
                   running statistics updated; a parallel first level when the tiles are many) ->
                   bn_act_fwd_kernel (normalize + activation): 3 launches (4 at large batches).
Eval forward:      conv_fwd_kernel with BatchNorm (BN_EVAL) or a folded bias, activation in the epilogue.
Backward:          bn_act_bwd_reduce_kernel (per-split sums of g_u and g_u*x_hat) -> grad_z_kernel (the
                   BatchNorm coefficients, then dL/dz written once) -> conv_bwd_input_kernel and
                   conv_bwd_weight_kernel (split over M, deterministic sum_splits_kernel), both reading dL/dz.
The GEMM kernels take m_bucket, M rounded up to a power of two, unused but for the autotuner's key (an epoch's
ragged last batch reuses the tuned tiles).
"""

import triton
import triton.language as tl

from dlkern.kernels.activation import act_fwd, act_grad, times_grad

# ---------------------------------------------------------------------------------------------- math helpers


@triton.jit
def _act(u, ACT: tl.constexpr, p0, p1):
    if ACT == "none":
        return u
    else:
        return act_fwd(u, ACT, p0, p1)


@triton.jit
def _act_vjp(g, u, ACT: tl.constexpr, p0, p1):
    """g * act'(u), 0 on an activation's flat branch whatever g (as ATen's backward)."""
    if ACT == "none":
        return g
    else:
        return times_grad(g, act_grad(u, ACT, p0, p1).to(u.dtype), ACT)


@triton.jit
def _grad_u(g, z, r, mean, invstd, gamma, beta, ACT: tl.constexpr, p0, p1, RESIDUAL: tl.constexpr):
    """(x_hat, g_u): x_hat = (z - mean)*invstd and g_u = dL/du, the gradient at BatchNorm's output
    u = gamma*x_hat + beta: g*act'(u), or g*act'(u + r) with the residual r added before the activation
    (RESIDUAL == 1; g_u is then the residual's gradient too)."""
    x_hat = (z - mean) * invstd
    u = x_hat * gamma + beta
    if RESIDUAL == 1:
        u = u + r
    return x_hat, _act_vjp(g, u, ACT, p0, p1)


@triton.jit
def _scalar(hi, lo, DTYPE: tl.constexpr):
    """A float argument passed as float32 hi + lo parts (Triton passes Python floats as float32): ~48 bits, so
    eps, momentum and activation parameters keep float64 accuracy in float64 kernels."""
    return tl.cast(hi, DTYPE) + tl.cast(lo, DTYPE)


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_FP32: tl.constexpr):
    """acc + a @ b. DOT_FP32 (set in Triton's interpreter for 16-bit operands, which it multiplies as raw bits)
    upcasts the operands first; the GPU keeps 16-bit tensor-core dots."""
    if DOT_FP32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)


@triton.jit
def _rows(offs_m, OH, OW):
    """(n, oh, ow) of flattened indices m = (n*OH + oh)*OW + ow (output rows; pooled elements too)."""
    ow = offs_m % OW
    t = offs_m // OW
    return t // OH, t % OH, ow


@triton.jit
def _index(x, INDEX_64: tl.constexpr):
    """x (a program id, an index) widened to 64 bits with INDEX_64 (a tensor of >= 2^30 elements), else kept
    32-bit: a 32-bit gathered offset takes half the registers of a 64-bit one, in every pipeline stage."""
    if INDEX_64:
        return x.to(tl.int64)
    else:
        return x


@triton.jit
def _bn_params(stats_ptr, gamma_ptr, beta_ptr, c, mask_c, C, HAS_AFFINE: tl.constexpr, DTYPE: tl.constexpr):
    """(mean, invstd, gamma, beta) of channels c as rows to broadcast over a tile's rows; without affine
    gamma = 1 and beta = 0."""
    mean = tl.load(stats_ptr + c, mask=mask_c, other=0.0)[None, :]
    invstd = tl.load(stats_ptr + C + c, mask=mask_c, other=0.0)[None, :]
    if HAS_AFFINE:
        return (mean, invstd, tl.load(gamma_ptr + c, mask=mask_c, other=0.0).to(DTYPE)[None, :],
                tl.load(beta_ptr + c, mask=mask_c, other=0.0).to(DTYPE)[None, :])
    else:
        return mean, invstd, 1.0, 0.0


@triton.jit
def _pooled_element(oh, ow, PH, PW, pool_sh, pool_sw, pool_ph, pool_pw, PKH: tl.constexpr, PKW: tl.constexpr):
    """(ph, pw, tap, inside): the pooled element whose window holds full-resolution (oh, ow) -- windows do not
    overlap (stride >= kernel), so at most one: (oh + pad) // stride --, the tap kh*PKW + kw there, and whether
    (oh, ow) is inside that window at all."""
    ph = (oh + pool_ph) // pool_sh
    pw = (ow + pool_pw) // pool_sw
    kh = oh + pool_ph - ph * pool_sh
    kw = ow + pool_pw - pw * pool_sw
    return ph, pw, kh * PKW + kw, (kh < PKH) & (kw < PKW) & (ph < PH) & (pw < PW)


@triton.jit
def _tile_g_z(
    g_ptr, g_n_stride, g_c_stride, g_h_stride, g_w_stride, z_ptr, z_n_stride, z_c_stride, z_h_stride, z_w_stride,
    m0, m_end, c, mask_c, OH, OW,
    pos_ptr, pos_n_stride, pos_c_stride, pos_h_stride, pos_w_stride, PH, PW, pool_sh, pool_sw, pool_ph, pool_pw,
    POOL: tl.constexpr, PKH: tl.constexpr, PKW: tl.constexpr, BLOCK_M: tl.constexpr, DTYPE: tl.constexpr,
    res_ptr, RESIDUAL: tl.constexpr,
):
    """The backward passes' tile: rows [m0, m0 + BLOCK_M) (below m_end) x channels c of dL/d(out), z and (with
    RESIDUAL == 1) the residual, which has z's layout, in DTYPE (0 where masked), with z's offsets and the mask.
    With POOL, out is the max-pooled activation and g the pooled gradient: the full-resolution gradient is g at its
    window where that window's maximum sat (pos, the tap
    kh*PKW + kw, one byte per pooled element), else 0 -- never materialized."""
    offs_m = m0 + tl.arange(0, BLOCK_M)
    n, oh, ow = _rows(offs_m, OH, OW)
    mask = (offs_m < m_end)[:, None] & mask_c[None, :]
    z_offs = (n * z_n_stride + oh * z_h_stride + ow * z_w_stride)[:, None] + c[None, :] * z_c_stride
    if POOL:
        ph, pw, tap, inside = _pooled_element(oh, ow, PH, PW, pool_sh, pool_sw, pool_ph, pool_pw, PKH, PKW)
        m = mask & inside[:, None]
        g = tl.load(g_ptr + (n * g_n_stride + ph * g_h_stride + pw * g_w_stride)[:, None] + c[None, :] * g_c_stride,
                    mask=m, other=0.0)
        pos = tl.load(pos_ptr + (n * pos_n_stride + ph * pos_h_stride + pw * pos_w_stride)[:, None]
                      + c[None, :] * pos_c_stride, mask=m, other=0)
        g = tl.where(m & (pos.to(tl.int32) == tap[:, None]), g, 0.0)
    else:
        g = tl.load(g_ptr + (n * g_n_stride + oh * g_h_stride + ow * g_w_stride)[:, None] + c[None, :] * g_c_stride,
                    mask=mask, other=0.0)
    z = tl.load(z_ptr + z_offs, mask=mask, other=0.0)
    r = 0.0
    if RESIDUAL == 1:
        r = tl.load(res_ptr + z_offs, mask=mask, other=0.0).to(DTYPE)
    return g.to(DTYPE), z.to(DTYPE), r, z_offs, mask


@triton.jit
def _tile_pooled(
    g_ptr, g_n_stride, g_c_stride, g_h_stride, g_w_stride, z_ptr, z_n_stride, z_c_stride, z_h_stride, z_w_stride,
    gz_n_stride, gz_c_stride, gz_h_stride, gz_w_stride, m0, m_end, c, mask_c, OH, OW,
    pos_ptr, pos_n_stride, pos_c_stride, pos_h_stride, pos_w_stride, PH, PW, pool_sh, pool_sw, pool_ph, pool_pw,
    PKH: tl.constexpr, PKW: tl.constexpr, BLOCK_M: tl.constexpr, DTYPE: tl.constexpr,
):
    """The dL/dz tile of a pool before BatchNorm: full-resolution rows [m0, m0 + BLOCK_M) (below m_end) x channels
    c, with g and z (the pooled conv output) of each row's pooled element, whether the row was its window's
    maximum (sel), dL/dz's offsets and the mask."""
    offs_m = m0 + tl.arange(0, BLOCK_M)
    n, oh, ow = _rows(offs_m, OH, OW)
    mask = (offs_m < m_end)[:, None] & mask_c[None, :]
    ph, pw, tap, inside = _pooled_element(oh, ow, PH, PW, pool_sh, pool_sw, pool_ph, pool_pw, PKH, PKW)
    m = mask & inside[:, None]
    g = tl.load(g_ptr + (n * g_n_stride + ph * g_h_stride + pw * g_w_stride)[:, None] + c[None, :] * g_c_stride,
                mask=m, other=0.0)
    z = tl.load(z_ptr + (n * z_n_stride + ph * z_h_stride + pw * z_w_stride)[:, None] + c[None, :] * z_c_stride,
                mask=m, other=0.0)
    pos = tl.load(pos_ptr + (n * pos_n_stride + ph * pos_h_stride + pw * pos_w_stride)[:, None]
                  + c[None, :] * pos_c_stride, mask=m, other=0)
    sel = m & (pos.to(tl.int32) == tap[:, None])
    gz_offs = (n * gz_n_stride + oh * gz_h_stride + ow * gz_w_stride)[:, None] + c[None, :] * gz_c_stride
    return g.to(DTYPE), z.to(DTYPE), sel, gz_offs, mask


# ---------------------------------------------------------------------------------------------- forward


@triton.jit
def _conv_tile(
    x_ptr, w_ptr, bias_ptr, n, oh, ow, mask_m, offs_n, mask_n, C_in, H, W,
    x_n_stride, x_c_stride, x_h_stride, x_w_stride, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
    DOT_FP32: tl.constexpr, INDEX_64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """conv(x, w) + bias at output pixels (n, oh, ow) (rows where mask_m) and channels offs_n: (BLOCK_M, BLOCK_N)
    in ACC_DTYPE."""
    K = C_in * KH * KW
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w
    x_row = x_ptr + n * x_n_stride
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        c = _index(offs_k // (KH * KW), INDEX_64)
        r = offs_k % (KH * KW)
        ih = ih0[:, None] + (r // KW * dil_h)[None, :]
        iw = iw0[:, None] + (r % KW * dil_w)[None, :]
        a_mask = mask_m[:, None] & mask_k[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        a = tl.load(x_row[:, None] + c[None, :] * x_c_stride + ih * x_h_stride + iw * x_w_stride, mask=a_mask,
                    other=0.0)
        b = tl.load(w_ptr + offs_n[None, :] * K + offs_k[:, None], mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = _dot(a, b, acc, PRECISION, ACC_DTYPE, DOT_FP32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(ACC_DTYPE)[None, :]
    return acc


@triton.jit
def _max_pool_combine(a, rank_a, b, rank_b):
    """ATen's max-pool choice as an associative reduction: NaN above everything (the later of two NaNs), else
    the greater value, equal values by the earlier rank (window order)."""
    a_nan = a != a
    b_nan = b != b
    take_b = (b_nan & (~a_nan | (rank_b > rank_a))) | (~a_nan & ~b_nan & ((b > a) | ((b == a) & (rank_b < rank_a))))
    return tl.where(take_b, b, a), tl.where(take_b, rank_b, rank_a)


@triton.jit
def _window_max(v, mask_m, tap, TAPS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(maximum, tap) of each pooled window: rows ordered window by window (TAPS rows a window), rows outside the
    window (mask_m false) -inf, ranked after every in-window one, so a window of -inf keeps its first tap's."""
    v = tl.where(mask_m[:, None], v, float("-inf"))
    rank = tl.where(mask_m, tap, TAPS + tap)[:, None] + tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    return tl.reduce((tl.reshape(v, (BLOCK_M // TAPS, TAPS, BLOCK_N)),
                      tl.reshape(rank, (BLOCK_M // TAPS, TAPS, BLOCK_N))), 1, _max_pool_combine)


@triton.jit
def _bn_eval(acc, mean_ptr, var_ptr, gamma_ptr, beta_ptr, offs_n, mask_n, eps_hi, eps_lo, HAS_GAMMA: tl.constexpr,
             HAS_BETA: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """batch_norm in eval on a tile (columns = channels offs_n): (acc - mean) * invstd * gamma + beta, from the
    running buffers as they are now."""
    bn_mean = tl.load(mean_ptr + offs_n, mask=mask_n, other=0.0).to(ACC_DTYPE)
    var = tl.load(var_ptr + offs_n, mask=mask_n, other=1.0).to(ACC_DTYPE)
    scale = 1.0 / tl.sqrt(var + _scalar(eps_hi, eps_lo, ACC_DTYPE))
    if HAS_GAMMA:
        scale = scale * tl.load(gamma_ptr + offs_n, mask=mask_n, other=0.0).to(ACC_DTYPE)
    acc = (acc - bn_mean[None, :]) * scale[None, :]
    if HAS_BETA:
        acc += tl.load(beta_ptr + offs_n, mask=mask_n, other=0.0).to(ACC_DTYPE)[None, :]
    return acc


@triton.jit
def _tile_stats(z, mask, count, part_ptr, pid_m, offs_n, mask_n, C_out):
    """A row tile's (mean, M2) per channel into part[0|1, pid_m, c] (z 0 where masked, count valid rows)."""
    tile_mean = tl.sum(z, axis=0) / count
    dev = tl.where(mask, z - tile_mean[None, :], 0.0)
    num_tiles = tl.num_programs(0)
    part_offs = pid_m * C_out + offs_n
    tl.store(part_ptr + part_offs, tile_mean, mask=mask_n)
    tl.store(part_ptr + num_tiles * C_out + part_offs, tl.sum(dev * dev, axis=0), mask=mask_n)


@triton.jit(do_not_specialize=["m_bucket"])
def conv_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr, z_ptr, part_ptr, mean_ptr, var_ptr, gamma_ptr, beta_ptr, res_ptr, pos_ptr,
    N, C_in, H, W, C_out, OH, OW,
    x_n_stride, x_c_stride, x_h_stride, x_w_stride,
    out_n_stride, out_c_stride, out_h_stride, out_w_stride,
    M, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, p0_hi, p0_lo, p1_hi, p1_lo, eps_hi, eps_lo, m_bucket,
    PH, PW, pool_sh, pool_sw, pool_ph, pool_pw,
    KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr, STATS: tl.constexpr, SAVE_Z: tl.constexpr,
    BN_EVAL: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr,
    ACT: tl.constexpr, PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_FP32: tl.constexpr,
    INDEX_64: tl.constexpr, POOL: tl.constexpr, PKH: tl.constexpr, PKW: tl.constexpr, TAPS: tl.constexpr,
    RESIDUAL: tl.constexpr, POOL_BEFORE_BN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out = act(conv(x, w) + bias), one BLOCK_M row tile per program; with RESIDUAL a residual (in out's layout)
    added before the activation (1) or after it (2); with POOL (inference) max-pooled too, the
    rows ordered window by window (PKH x PKW taps in TAPS rows), only the pooled output written. With STATS
    (training) it stores z = conv(x, w) + bias instead and, per row tile and channel, the tile's mean and
    M2 = sum((z - mean)^2) at part[0|1, pid_m, c]. With BN_EVAL, BatchNorm in eval mode (running mean and var;
    gamma, beta when given) is applied to conv + bias in the epilogue, from the buffers as they are now: the
    folding costs no launch and can never be stale. INDEX_64: 64-bit offsets (a tensor of >= 2^30 elements),
    else 32-bit.

    POOL_BEFORE_BN (Conv -> MaxPool -> BatchNorm -> act): the window maximum of conv + bias is taken first; in
    training (STATS) z is that pooled tensor, pos its window taps (one byte each) and the partials are over the
    pooled values; in inference BatchNorm and the activation apply to the pooled values."""
    pid_m = _index(tl.program_id(0), INDEX_64)
    pid_n = _index(tl.program_id(1), INDEX_64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < C_out
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if POOL:  # rows are (n, ph, pw, tap): each pooled window's TAPS (a power of two >= PKH*PKW) rows together
        tap = offs_m % TAPS
        n, ph, pw = _rows(offs_m // TAPS, PH, PW)
        oh = ph * pool_sh - pool_ph + tap // PKW
        ow = pw * pool_sw - pool_pw + tap % PKW
        mask_m = (offs_m < M) & (tap < PKH * PKW) & (oh >= 0) & (oh < OH) & (ow >= 0) & (ow < OW)
    else:
        n, oh, ow = _rows(offs_m, OH, OW)
        mask_m = offs_m < M
    acc = _conv_tile(
        x_ptr, w_ptr, bias_ptr, n, oh, ow, mask_m, offs_n, mask_n, C_in, H, W,
        x_n_stride, x_c_stride, x_h_stride, x_w_stride, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
        KH, KW, HAS_BIAS, PRECISION, ACC_DTYPE, DOT_FP32, INDEX_64, BLOCK_M, BLOCK_N, BLOCK_K,
    )
    out_offs = (n * out_n_stride + oh * out_h_stride + ow * out_w_stride)[:, None] + offs_n[None, :] * out_c_stride
    mask = mask_m[:, None] & mask_n[None, :]
    p0 = _scalar(p0_hi, p0_lo, ACC_DTYPE)
    p1 = _scalar(p1_hi, p1_lo, ACC_DTYPE)
    if POOL_BEFORE_BN:  # the window maxima of z (as stored: rounded to its dtype), then the rest on them
        z_dtype = z_ptr.dtype.element_ty if STATS else out_ptr.dtype.element_ty
        best, best_tap = _window_max(acc.to(z_dtype).to(ACC_DTYPE), mask_m, tap, TAPS, BLOCK_M, BLOCK_N)
        g = pid_m * (BLOCK_M // TAPS) + tl.arange(0, BLOCK_M // TAPS)
        g_n, g_ph, g_pw = _rows(g, PH, PW)
        pooled_offs = (g_n * out_n_stride + g_ph * out_h_stride + g_pw * out_w_stride)[:, None] \
            + offs_n[None, :] * out_c_stride
        g_mask = (g < M // TAPS)[:, None] & mask_n[None, :]
        if STATS:  # training: pooled z, its taps, the pooled values' partials
            tl.store(z_ptr + pooled_offs, best.to(z_dtype), mask=g_mask)
            tl.store(pos_ptr + pooled_offs, best_tap.to(tl.uint8), mask=g_mask)
            count = tl.minimum(M // TAPS - pid_m * (BLOCK_M // TAPS), BLOCK_M // TAPS).to(ACC_DTYPE)
            _tile_stats(tl.where(g_mask, best, 0.0), g_mask, count, part_ptr, pid_m, offs_n, mask_n, C_out)
        else:  # inference: BatchNorm (eval) and the activation on the pooled values (0 past the last window)
            v = _bn_eval(tl.where(g_mask, best, 0.0), mean_ptr, var_ptr, gamma_ptr, beta_ptr, offs_n, mask_n,
                         eps_hi, eps_lo, HAS_GAMMA, HAS_BETA, ACC_DTYPE)
            tl.store(out_ptr + pooled_offs, _act(v, ACT, p0, p1).to(out_ptr.dtype.element_ty), mask=g_mask)
    elif STATS:
        z = acc.to(z_ptr.dtype.element_ty)
        tl.store(z_ptr + out_offs, z, mask=mask)
        # Statistics of z as stored (rounded to its dtype), as BatchNorm would see it after the conv.
        count = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(ACC_DTYPE)
        _tile_stats(tl.where(mask, z.to(ACC_DTYPE), 0.0), mask, count, part_ptr, pid_m, offs_n, mask_n, C_out)
    else:
        if BN_EVAL:  # as batch_norm in eval: (z - mean) * invstd * gamma + beta
            acc = _bn_eval(acc, mean_ptr, var_ptr, gamma_ptr, beta_ptr, offs_n, mask_n, eps_hi, eps_lo, HAS_GAMMA,
                           HAS_BETA, ACC_DTYPE)
        if RESIDUAL == 1:
            acc += tl.load(res_ptr + out_offs, mask=mask, other=0.0).to(ACC_DTYPE)
        if SAVE_Z:  # the activation's input (the folded block's backward reads it)
            tl.store(z_ptr + out_offs, acc.to(z_ptr.dtype.element_ty), mask=mask)
        if POOL:  # inference: max-pool each window's rows here; only the pooled output is written
            v = _act(acc, ACT, p0, p1).to(out_ptr.dtype.element_ty).to(ACC_DTYPE)  # as the stored activation
            best, _ = _window_max(v, mask_m, tap, TAPS, BLOCK_M, BLOCK_N)
            g = pid_m * (BLOCK_M // TAPS) + tl.arange(0, BLOCK_M // TAPS)
            g_n, g_ph, g_pw = _rows(g, PH, PW)
            pooled_offs = (g_n * out_n_stride + g_ph * out_h_stride + g_pw * out_w_stride)[:, None] \
                + offs_n[None, :] * out_c_stride
            tl.store(out_ptr + pooled_offs, best.to(out_ptr.dtype.element_ty),
                     mask=(g < M // TAPS)[:, None] & mask_n[None, :])
        else:
            v = _act(acc, ACT, p0, p1)
            if RESIDUAL == 2:
                v += tl.load(res_ptr + out_offs, mask=mask, other=0.0).to(ACC_DTYPE)
            tl.store(out_ptr + out_offs, v.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def bn_stats_finalize_kernel(
    part_ptr, out_ptr, running_mean_ptr, running_var_ptr, nbt_ptr, C, M, num_tiles, rows_per_tile,
    tiles_per_program, eps_hi, eps_lo, momentum_hi, momentum_lo,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, FINAL: tl.constexpr, TRACK: tl.constexpr,
    CUMULATIVE: tl.constexpr, INDEX_64: tl.constexpr,
):
    """Merges per-tile (mean, M2) partials (rows_per_tile rows each; part[0|1, tile, c]): program (g, c-block)
    merges tiles [g*tiles_per_program, (g + 1)*tiles_per_program), blocks of BLOCK_T tiles about their own mean,
    blocks in order with Chan's formula: no sum/sum-of-squares cancellation, the same order (so the same bits) on
    every run. Without FINAL it writes each program's (mean, M2) to out in part's layout: a first level, in
    parallel, when the tiles are many; the FINAL level (one program per channel block) merges everything
    into out = stats: [0] = mean, [1] = 1/sqrt(var + eps), [2] = var (biased).

    With TRACK the FINAL level also updates the running statistics as BatchNorm does: running = (1 - f)*running
    + f*batch, the variance unbiased by M/(M - 1), with f = momentum, or with CUMULATIVE
    f = 1/(num_batches_tracked + 1): the counter is read here and incremented by bn_act_fwd_kernel, which runs
    after every program of this one."""
    pid_g = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    dtype = part_ptr.dtype.element_ty
    count = tl.zeros((BLOCK_C,), dtype=dtype)
    mean = tl.zeros((BLOCK_C,), dtype=dtype)
    m2 = tl.zeros((BLOCK_C,), dtype=dtype)
    t_start = pid_g * tiles_per_program
    t_end = tl.minimum(t_start + tiles_per_program, num_tiles)
    for t0 in range(t_start, t_end, BLOCK_T):
        offs_t = _index(t0 + tl.arange(0, BLOCK_T), INDEX_64)
        mask_t = offs_t < t_end
        n_t = tl.where(mask_t, tl.minimum(M - offs_t * rows_per_tile, rows_per_tile), 0).to(dtype)[:, None]
        mask = mask_t[:, None] & mask_c[None, :]
        offs = offs_t[:, None] * C + offs_c[None, :]
        mean_t = tl.load(part_ptr + offs, mask=mask, other=0.0)
        m2_t = tl.load(part_ptr + num_tiles * C + offs, mask=mask, other=0.0)
        n_b = tl.sum(n_t, axis=0)
        mean_b = tl.sum(n_t * mean_t, axis=0) / n_b
        dev = mean_t - mean_b[None, :]
        m2_b = tl.sum(m2_t + n_t * dev * dev, axis=0)
        total = count + n_b
        delta = mean_b - mean
        mean += delta * (n_b / total)
        m2 += m2_b + delta * delta * (count * n_b / total)
        count = total
    if not FINAL:
        num_groups = tl.num_programs(0)
        tl.store(out_ptr + pid_g * C + offs_c, mean, mask=mask_c)
        tl.store(out_ptr + (num_groups + pid_g) * C + offs_c, m2, mask=mask_c)
    else:
        var = m2 / count
        tl.store(out_ptr + offs_c, mean, mask=mask_c)
        tl.store(out_ptr + C + offs_c, 1.0 / tl.sqrt(var + _scalar(eps_hi, eps_lo, dtype)), mask=mask_c)
        tl.store(out_ptr + 2 * C + offs_c, var, mask=mask_c)
        if TRACK:
            buf_dtype = running_mean_ptr.dtype.element_ty
            # PyTorch computes (1 - f)*r + f*s in the buffer's dtype, 16-bit buffers (model.half(), .bfloat16())
            # in float32, rounded once; the interpreter has no bf16 arithmetic either
            up_dtype = tl.float32 if buf_dtype.primitive_bitwidth < 32 else buf_dtype
            if CUMULATIVE:
                factor = 1.0 / (tl.load(nbt_ptr) + 1).to(tl.float64)
            else:
                factor = _scalar(momentum_hi, momentum_lo, tl.float64)
            f = factor.to(up_dtype)
            n = tl.cast(M, tl.float64)
            unbiased = var * (n / (n - 1.0)).to(dtype)
            rm = tl.load(running_mean_ptr + offs_c, mask=mask_c).to(up_dtype)
            rv = tl.load(running_var_ptr + offs_c, mask=mask_c).to(up_dtype)
            tl.store(running_mean_ptr + offs_c, ((1 - f) * rm + f * mean.to(up_dtype)).to(buf_dtype), mask=mask_c)
            tl.store(running_var_ptr + offs_c, ((1 - f) * rv + f * unbiased.to(up_dtype)).to(buf_dtype), mask=mask_c)


@triton.jit
def bn_act_fwd_kernel(
    z_ptr, out_ptr, stats_ptr, gamma_ptr, beta_ptr, nbt_ptr, res_ptr, numel, C, c_stride, p0_hi, p0_lo, p1_hi,
    p1_lo, HAS_AFFINE: tl.constexpr, ACT: tl.constexpr, BLOCK: tl.constexpr, COUNT_BATCH: tl.constexpr,
    INDEX_64: tl.constexpr, RESIDUAL: tl.constexpr,
):
    """out = act(gamma*(z - mean)*invstd + beta), elementwise over z and out, which share one dense layout; with
    RESIDUAL the residual (that layout too) added before the activation (1) or after it (2).
    With COUNT_BATCH, program 0 also does BatchNorm's num_batches_tracked += 1 (after bn_stats_finalize_kernel
    read it)."""
    pid = tl.program_id(0)
    if COUNT_BATCH:
        if pid == 0:
            tl.store(nbt_ptr, tl.load(nbt_ptr) + 1)
    offs = _index(pid, INDEX_64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    c = (offs // c_stride) % C
    dtype = stats_ptr.dtype.element_ty
    z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(dtype)
    u = (z - tl.load(stats_ptr + c, mask=mask)) * tl.load(stats_ptr + C + c, mask=mask)
    if HAS_AFFINE:
        u = u * tl.load(gamma_ptr + c, mask=mask).to(dtype) + tl.load(beta_ptr + c, mask=mask).to(dtype)
    p0 = _scalar(p0_hi, p0_lo, dtype)
    p1 = _scalar(p1_hi, p1_lo, dtype)
    if RESIDUAL == 1:
        u += tl.load(res_ptr + offs, mask=mask, other=0.0).to(dtype)
    v = _act(u, ACT, p0, p1)
    if RESIDUAL == 2:
        v += tl.load(res_ptr + offs, mask=mask, other=0.0).to(dtype)
    tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def bn_act_pool_fwd_kernel(
    z_ptr, out_ptr, pos_ptr, stats_ptr, gamma_ptr, beta_ptr, nbt_ptr, total, C, PH, PW, OH, OW,
    z_n_stride, z_c_stride, z_h_stride, z_w_stride,
    out_n_stride, out_c_stride, out_h_stride, out_w_stride,
    pool_sh, pool_sw, pool_ph, pool_pw, p0_hi, p0_lo, p1_hi, p1_lo,
    HAS_AFFINE: tl.constexpr, ACT: tl.constexpr, COUNT_BATCH: tl.constexpr, INDEX_64: tl.constexpr,
    PKH: tl.constexpr, PKW: tl.constexpr, BLOCK: tl.constexpr,
):
    """out = max_pool(act(gamma*(z - mean)*invstd + beta)) and, per pooled element, the window tap of its
    maximum in one byte (pos = kh*PKW + kw): z is read once, the full-resolution activation never written.
    ATen's max pool rules on the activation as stored (rounded to out's dtype): taps rows outer, columns inner;
    a value replaces the running maximum when greater or NaN; the maximum starts at -inf at the window's first
    in-bounds tap. One program per BLOCK pooled elements (logical NCHW order); out and pos share strides.
    With COUNT_BATCH, program 0 also does BatchNorm's num_batches_tracked += 1."""
    pid = tl.program_id(0)
    if COUNT_BATCH:
        if pid == 0:
            tl.store(nbt_ptr, tl.load(nbt_ptr) + 1)
    offs = _index(pid, INDEX_64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    nc, ph, pw = _rows(offs, PH, PW)
    c = nc % C
    n = nc // C
    dtype = stats_ptr.dtype.element_ty
    mean = tl.load(stats_ptr + c, mask=mask, other=0.0)
    invstd = tl.load(stats_ptr + C + c, mask=mask, other=0.0)
    if HAS_AFFINE:
        gamma = tl.load(gamma_ptr + c, mask=mask, other=0.0).to(dtype)
        beta = tl.load(beta_ptr + c, mask=mask, other=0.0).to(dtype)
    p0 = _scalar(p0_hi, p0_lo, dtype)
    p1 = _scalar(p1_hi, p1_lo, dtype)
    best = tl.full((BLOCK,), float("-inf"), dtype)
    pos = tl.zeros((BLOCK,), dtype=tl.int32)
    found = tl.zeros((BLOCK,), dtype=tl.int1)
    z_base = z_ptr + n * z_n_stride + c * z_c_stride
    for kh in tl.static_range(PKH):
        for kw in tl.static_range(PKW):
            ih = ph * pool_sh - pool_ph + kh
            iw = pw * pool_sw - pool_pw + kw
            valid = mask & (ih >= 0) & (ih < OH) & (iw >= 0) & (iw < OW)
            z = tl.load(z_base + ih * z_h_stride + iw * z_w_stride, mask=valid, other=0.0).to(dtype)
            u = (z - mean) * invstd
            if HAS_AFFINE:
                u = u * gamma + beta
            v = _act(u, ACT, p0, p1).to(out_ptr.dtype.element_ty).to(dtype)  # as the stored activation
            take = valid & ((v > best) | (v != v))
            pos = tl.where(take | (valid & ~found), kh * PKW + kw, pos)
            best = tl.where(take, v, best)
            found = found | valid
    out_offs = n * out_n_stride + c * out_c_stride + ph * out_h_stride + pw * out_w_stride
    tl.store(out_ptr + out_offs, best.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(pos_ptr + out_offs, pos.to(tl.uint8), mask=mask)


# ---------------------------------------------------------------------------------------------- backward


@triton.jit
def bn_act_bwd_reduce_kernel(
    g_ptr, z_ptr, stats_ptr, gamma_ptr, beta_ptr, part_ptr,
    M, C, OH, OW, rows_per_split,
    g_n_stride, g_c_stride, g_h_stride, g_w_stride,
    z_n_stride, z_c_stride, z_h_stride, z_w_stride, p0_hi, p0_lo, p1_hi, p1_lo,
    pos_ptr, pos_n_stride, pos_c_stride, pos_h_stride, pos_w_stride, PH, PW, pool_sh, pool_sw, pool_ph, pool_pw,
    res_ptr, HAS_AFFINE: tl.constexpr, ACT: tl.constexpr, INDEX_64: tl.constexpr, POOL: tl.constexpr,
    PKH: tl.constexpr, PKW: tl.constexpr, RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Per split of the rows and channel: part[0, s, c] = sum g_u, part[1, s, c] = sum g_u*x_hat, where
    g_u = dL/du = g*act'(u) is the gradient at BatchNorm's output u (with POOL, g read through the pool's
    argmax: _tile_g_z)."""
    pid_s = _index(tl.program_id(0), INDEX_64)
    offs_c = _index(tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C), INDEX_64)
    mask_c = offs_c < C
    dtype = stats_ptr.dtype.element_ty
    mean, invstd, gamma, beta = _bn_params(stats_ptr, gamma_ptr, beta_ptr, offs_c, mask_c, C, HAS_AFFINE, dtype)
    p0 = _scalar(p0_hi, p0_lo, dtype)
    p1 = _scalar(p1_hi, p1_lo, dtype)
    m_start = pid_s * rows_per_split
    m_end = tl.minimum(m_start + rows_per_split, M)
    # Sums in float64 (part is float64): these two per-channel sums of n terms set every gradient's accuracy.
    sum_g = tl.zeros((BLOCK_C,), dtype=tl.float64)
    sum_gx = tl.zeros((BLOCK_C,), dtype=tl.float64)
    for m0 in range(m_start, m_end, BLOCK_M):
        g, z, r, _, mask = _tile_g_z(
            g_ptr, g_n_stride, g_c_stride, g_h_stride, g_w_stride, z_ptr, z_n_stride, z_c_stride, z_h_stride,
            z_w_stride, m0, m_end, offs_c, mask_c, OH, OW, pos_ptr, pos_n_stride, pos_c_stride, pos_h_stride,
            pos_w_stride, PH, PW, pool_sh, pool_sw, pool_ph, pool_pw, POOL, PKH, PKW, BLOCK_M, dtype, res_ptr, RESIDUAL,
        )
        x_hat, g_u = _grad_u(g, z, r, mean, invstd, gamma, beta, ACT, p0, p1, RESIDUAL)
        g_u = tl.where(mask, g_u, 0.0)
        sum_g += tl.sum(g_u.to(tl.float64), axis=0)
        sum_gx += tl.sum((g_u * x_hat).to(tl.float64), axis=0)
    num_splits = tl.num_programs(0)
    tl.store(part_ptr + pid_s * C + offs_c, sum_g, mask=mask_c)
    tl.store(part_ptr + (num_splits + pid_s) * C + offs_c, sum_gx, mask=mask_c)


@triton.jit
def grad_z_kernel(
    g_ptr, z_ptr, gz_ptr, stats_ptr, gamma_ptr, beta_ptr, part_ptr, grad_gamma_ptr, grad_beta_ptr, res_ptr, gres_ptr,
    M, C, OH, OW, rows_per_split, num_splits, bn_count, p0_hi, p0_lo, p1_hi, p1_lo,
    g_n_stride, g_c_stride, g_h_stride, g_w_stride,
    z_n_stride, z_c_stride, z_h_stride, z_w_stride,
    gz_n_stride, gz_c_stride, gz_h_stride, gz_w_stride,
    pos_ptr, pos_n_stride, pos_c_stride, pos_h_stride, pos_w_stride, PH, PW, pool_sh, pool_sw, pool_ph, pool_pw,
    BN: tl.constexpr, HAS_AFFINE: tl.constexpr, ACT: tl.constexpr, ACC_DTYPE: tl.constexpr, INDEX_64: tl.constexpr,
    POOL: tl.constexpr, PKH: tl.constexpr, PKW: tl.constexpr, RESIDUAL: tl.constexpr, POOL_BEFORE_BN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dL/dz of one split of the rows, written once (in z's layout, the conv's dtype) for both conv GEMMs.

    BN (training): each program first adds the reduction's splits for its channels, in order (so every program
    gets the same bits), into sum(g_u) and sum(g_u*x_hat); split 0 writes them as grad_beta and grad_gamma. Then
    dL/dz = a*(g_u - b - x_hat*c), a = gamma*invstd, b = sum(g_u)/M, c = sum(g_u*x_hat)/M.
    With a residual before the activation (RESIDUAL == 1, BN) g_u is also its gradient, written to gres in z's
    layout in the same pass. Otherwise (eval, BatchNorm folded): dL/dz = g*act'(z), z the activation's input.
    bn_count: BatchNorm's values per channel (M, or the pooled rows with POOL_BEFORE_BN, where g and z are the
    pooled tensors, the rows z's full resolution, and dL/dz is the pooled one at each window's maximum, else 0)."""
    pid_s = _index(tl.program_id(0), INDEX_64)
    offs_c = _index(tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C), INDEX_64)
    mask_c = offs_c < C
    dtype = ACC_DTYPE
    p0 = _scalar(p0_hi, p0_lo, dtype)
    p1 = _scalar(p1_hi, p1_lo, dtype)
    if BN:
        sum_g = tl.zeros((BLOCK_C,), dtype=tl.float64)
        sum_gx = tl.zeros((BLOCK_C,), dtype=tl.float64)
        for s0 in range(0, num_splits, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            mask = (offs_s < num_splits)[:, None] & mask_c[None, :]
            offs = offs_s[:, None] * C + offs_c[None, :]
            sum_g += tl.sum(tl.load(part_ptr + offs, mask=mask, other=0.0), axis=0)
            sum_gx += tl.sum(tl.load(part_ptr + num_splits * C + offs, mask=mask, other=0.0), axis=0)
        mean, invstd, gamma, beta = _bn_params(stats_ptr, gamma_ptr, beta_ptr, offs_c, mask_c, C, HAS_AFFINE, dtype)
        if HAS_AFFINE:
            if pid_s == 0:
                # through the compute dtype: 16-bit parameters (model.bfloat16()) get PyTorch's float32 sums
                # rounded, and the interpreter casts float64 to bfloat16 wrongly
                tl.store(grad_gamma_ptr + offs_c, sum_gx.to(dtype).to(grad_gamma_ptr.dtype.element_ty), mask=mask_c)
                tl.store(grad_beta_ptr + offs_c, sum_g.to(dtype).to(grad_beta_ptr.dtype.element_ty), mask=mask_c)
        coef_a = invstd * gamma
        coef_b = (sum_g / bn_count).to(dtype)[None, :]
        coef_c = (sum_gx / bn_count).to(dtype)[None, :]
    m_start = pid_s * rows_per_split
    m_end = tl.minimum(m_start + rows_per_split, M)
    for m0 in range(m_start, m_end, BLOCK_M):
        if POOL_BEFORE_BN:
            g, z, sel, gz_offs, mask = _tile_pooled(
                g_ptr, g_n_stride, g_c_stride, g_h_stride, g_w_stride, z_ptr, z_n_stride, z_c_stride, z_h_stride,
                z_w_stride, gz_n_stride, gz_c_stride, gz_h_stride, gz_w_stride, m0, m_end, offs_c, mask_c, OH, OW,
                pos_ptr, pos_n_stride, pos_c_stride, pos_h_stride, pos_w_stride, PH, PW, pool_sh, pool_sw, pool_ph,
                pool_pw, PKH, PKW, BLOCK_M, dtype,
            )
            x_hat, g_u = _grad_u(g, z, 0.0, mean, invstd, gamma, beta, ACT, p0, p1, 0)
            gz = tl.where(sel, coef_a * (g_u - coef_b - x_hat * coef_c), 0.0)
            tl.store(gz_ptr + gz_offs, gz.to(gz_ptr.dtype.element_ty), mask=mask)
        else:
            g, z, r, z_offs, mask = _tile_g_z(
                g_ptr, g_n_stride, g_c_stride, g_h_stride, g_w_stride, z_ptr, z_n_stride, z_c_stride, z_h_stride,
                z_w_stride, m0, m_end, offs_c, mask_c, OH, OW, pos_ptr, pos_n_stride, pos_c_stride, pos_h_stride,
                pos_w_stride, PH, PW, pool_sh, pool_sw, pool_ph, pool_pw, POOL, PKH, PKW, BLOCK_M, dtype,
                res_ptr, RESIDUAL if BN else 0,
            )
            if BN:  # dL/dz = a*(g_u - b - x_hat*c)
                x_hat, g_u = _grad_u(g, z, r, mean, invstd, gamma, beta, ACT, p0, p1, RESIDUAL)
                gz = coef_a * (g_u - coef_b - x_hat * coef_c)
                if RESIDUAL == 1:
                    tl.store(gres_ptr + z_offs, g_u.to(gres_ptr.dtype.element_ty), mask=mask)
            else:
                gz = _act_vjp(g, z, ACT, p0, p1)
            tl.store(gz_ptr + z_offs, gz.to(gz_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["m_bucket"])
def conv_bwd_input_kernel(
    gz_ptr, w_ptr, dx_ptr,
    N, C_in, H, W, C_out, OH, OW,
    gz_n_stride, gz_c_stride, gz_h_stride, gz_w_stride,
    dx_n_stride, dx_c_stride, dx_h_stride, dx_w_stride,
    M_in, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, m_bucket,
    KH: tl.constexpr, KW: tl.constexpr, PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_FP32: tl.constexpr,
    INDEX_64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dx as an implicit GEMM over dL/dz: rows (n, ih, iw) (M_in = N*H*W), columns c_in, reduction
    k = (c_out, kh, kw). Tap (kh, kw) of input (ih, iw) reads output oh = (ih + pad - kh*dil)/stride when that
    divides exactly."""
    pid_m = _index(tl.program_id(0), INDEX_64)
    pid_n = _index(tl.program_id(1), INDEX_64)
    K = C_out * KH * KW
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M_in
    mask_n = offs_n < C_in
    n, ih, iw = _rows(offs_m, H, W)
    oh0 = ih + pad_h
    ow0 = iw + pad_w
    gz_row = gz_ptr + n * gz_n_stride
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        co = _index(offs_k // (KH * KW), INDEX_64)
        r = offs_k % (KH * KW)
        oh_s = oh0[:, None] - (r // KW * dil_h)[None, :]
        ow_s = ow0[:, None] - (r % KW * dil_w)[None, :]
        oh = oh_s // stride_h
        ow = ow_s // stride_w
        mask = (
            mask_m[:, None] & mask_k[None, :] & (oh_s >= 0) & (ow_s >= 0) & (oh_s % stride_h == 0)
            & (ow_s % stride_w == 0) & (oh < OH) & (ow < OW)
        )
        a = tl.load(
            gz_row[:, None] + co[None, :] * gz_c_stride + oh * gz_h_stride + ow * gz_w_stride,
            mask=mask, other=0.0,
        )
        b = tl.load(
            w_ptr + (co * C_in * KH * KW + r)[:, None] + offs_n[None, :] * (KH * KW),
            mask=mask_k[:, None] & mask_n[None, :], other=0.0,
        )
        acc = _dot(a, b, acc, PRECISION, ACC_DTYPE, DOT_FP32)
    dx_offs = (n * dx_n_stride + ih * dx_h_stride + iw * dx_w_stride)[:, None] + offs_n[None, :] * dx_c_stride
    tl.store(dx_ptr + dx_offs, acc.to(dx_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit(do_not_specialize=["m_bucket"])
def conv_bwd_weight_kernel(
    gz_ptr, x_ptr, part_ptr, bias_part_ptr, part_stride,
    N, C_in, H, W, C_out, OH, OW,
    gz_n_stride, gz_c_stride, gz_h_stride, gz_w_stride,
    x_n_stride, x_c_stride, x_h_stride, x_w_stride,
    M, rows_per_split, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, m_bucket,
    KH: tl.constexpr, KW: tl.constexpr, BIAS_GRAD: tl.constexpr, PRECISION: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_FP32: tl.constexpr, INDEX_64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One split's share of dW^T[k, c_out] = sum_m x_col[m, k] * dL/dz[m, c_out] (k = (c_in, kh, kw) is the MMA's
    M dimension, so BLOCK_K >= 64 engages wgmma even for C_out = 32) and, with BIAS_GRAD, of
    d(bias)[c_out] = sum_m dL/dz[m, c_out]; into part[s*part_stride + c_out*K + k] and
    bias_part[s*part_stride + c_out]. Splitting the rows (M) keeps the GPU busy when C_out*K is small;
    sum_splits_kernel adds the splits in a fixed order. With one split part and bias_part are dW and d(bias)
    themselves: no partials, no sum."""
    pid_s = _index(tl.program_id(0), INDEX_64)
    pid_k = tl.program_id(1)
    pid_co = tl.program_id(2)
    K = C_in * KH * KW
    offs_co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_co = offs_co < C_out
    mask_k = offs_k < K
    c = _index(offs_k // (KH * KW), INDEX_64)
    r = offs_k % (KH * KW)
    kh_off = (r // KW * dil_h)[None, :]
    kw_off = (r % KW * dil_w)[None, :]
    m_start = pid_s * rows_per_split
    m_end = tl.minimum(m_start + rows_per_split, M)
    acc = tl.zeros((BLOCK_K, BLOCK_CO), dtype=ACC_DTYPE)
    acc_bias = tl.zeros((BLOCK_CO,), dtype=ACC_DTYPE)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < m_end
        n, oh, ow = _rows(offs_m, OH, OW)
        gz_offs = (n * gz_n_stride + oh * gz_h_stride + ow * gz_w_stride)[:, None] + offs_co[None, :] * gz_c_stride
        gz = tl.load(gz_ptr + gz_offs, mask=mask_m[:, None] & mask_co[None, :], other=0.0)
        if BIAS_GRAD:
            acc_bias += tl.sum(gz.to(ACC_DTYPE), axis=0)
        ih = (oh * stride_h - pad_h)[:, None] + kh_off
        iw = (ow * stride_w - pad_w)[:, None] + kw_off
        x_mask = mask_m[:, None] & mask_k[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        x_offs = (n * x_n_stride)[:, None] + c[None, :] * x_c_stride + ih * x_h_stride + iw * x_w_stride
        x_col = tl.load(x_ptr + x_offs, mask=x_mask, other=0.0)
        acc = _dot(tl.trans(x_col), gz, acc, PRECISION, ACC_DTYPE, DOT_FP32)
    tl.store(part_ptr + pid_s * part_stride + offs_co[None, :] * K + offs_k[:, None], acc,
             mask=mask_k[:, None] & mask_co[None, :])
    # Without BIAS_GRAD (BatchNorm follows: batch statistics cancel any per-channel shift, so the exact bias
    # gradient is 0, and a sum would only add rounding noise) the zeros are written.
    tl.store(bias_part_ptr + pid_s * part_stride + offs_co, acc_bias, mask=mask_co & (pid_k == 0))


@triton.jit
def sum_splits_kernel(
    part_ptr, out_ptr, out2_ptr, num_splits, L, L1, INDEX_64: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """sum_s part[s, j], the splits added in a fixed order (deterministic, no atomics), into out[j] for j < L1
    and out2[j - L1] for the rest (weight and bias gradients from one buffer)."""
    offs_l = _index(tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L), INDEX_64)
    mask_l = offs_l < L
    acc = tl.zeros((BLOCK_L,), dtype=part_ptr.dtype.element_ty)
    for s0 in range(0, num_splits, BLOCK_S):
        offs_s = _index(s0 + tl.arange(0, BLOCK_S), INDEX_64)
        mask = (offs_s < num_splits)[:, None] & mask_l[None, :]
        acc += tl.sum(tl.load(part_ptr + offs_s[:, None] * L + offs_l[None, :], mask=mask, other=0.0), axis=0)
    tl.store(out_ptr + offs_l, acc.to(out_ptr.dtype.element_ty), mask=offs_l < L1)
    tl.store(out2_ptr + (offs_l - L1), acc.to(out2_ptr.dtype.element_ty), mask=mask_l & (offs_l >= L1))
