"""The fused conv block's Triton host code: each op's launches (the kernels are kernels/conv_bn.py's, their
tiles conv_tiles.py's, the epilogue an :class:`~dlkern.ops.conv_epilogue.Epilogue`). No launcher reads device
memory on the host.

- :func:`train_forward`   conv (z + statistics partials) -> statistics merge (+ running update) -> normalize,
                          residual, activation (max pool): 3 launches (4 at large batches).
- :func:`infer_forward`   one launch: BatchNorm from the running buffers, residual and activation (and the max
                          pool) in the conv's epilogue.
- :func:`folded_forward`  one launch: conv + (folded) bias + residual + activation, z kept for the backward.
- :func:`block_backward`  the backward of all three (stats None for the folded one): 4 launches, 5 when the
                          weight gradient is split over the rows (its partials then summed in a fixed order).
"""

import torch

from dlkern.kernels import conv_bn as kernels
from dlkern.ops import conv_tiles as tiles
from dlkern.ops.conv_epilogue import pool_output_size
from dlkern.ops.conv_shapes import (
    backward_setup, dense, empty_like_format, like_z, memory_format, train_geometry, written,
)
from dlkern.ops.triton_support import cdiv, compute_dtype, launch, next_power_of_2

_NO_POOL = dict(POOL=False, PKH=1, PKW=1)


def conv_forward(input, weight, bias, out, z, part, geo, stride, padding, dilation, epi, allow_tf32, stats,
                 bn_eval=None, residual=None, pos=None):
    """Launches conv_fwd_kernel; returns its BLOCK_M (the row tile of the statistics partials). ``stats``
    (training): z and the partials only (with a pool before BatchNorm: z pooled, its window taps in pos, the
    pooled values' partials). Else the epilogue ``epi`` on out: ``bn_eval`` (running_mean, running_var, weight,
    bias, eps) of a BatchNorm in eval mode, the residual (in out's layout) and activation, and the max pool
    (``out`` being pooled); z keeps the activation's input when given."""
    N, C_in, H, W, C_out, KH, KW, OH, OW = geo
    M = N * OH * OW
    dst = z if stats else out
    mean, var, gamma, beta, eps = bn_eval if bn_eval is not None else (dst, dst, None, None, 0.0)
    pool_args, pool_flags = (1, 1, 1, 1, 0, 0), dict(_NO_POOL, TAPS=1)
    window = epi.window if epi.pool_before_bn or not stats else None
    if window is not None:
        (pkh, pkw), (psh, psw), (pph, ppw), _ = window
        PH, PW = dst.shape[2], dst.shape[3]
        taps = next_power_of_2(pkh * pkw)
        M = N * PH * PW * taps  # rows: each window's taps
        pool_args, pool_flags = (PH, PW, psh, psw, pph, ppw), dict(POOL=True, PKH=pkh, PKW=pkw, TAPS=taps)
    kernel, blocks = tiles.forward_gemm(M, C_out, C_in * KH * KW, input.dtype, stats, window is not None)
    return launch(
        kernel,
        lambda meta: (cdiv(M, meta["BLOCK_M"]), cdiv(C_out, meta["BLOCK_N"])),
        input, weight, bias if bias is not None else weight, out if out is not None else dst,
        z if z is not None else dst, part if part is not None else dst, mean, var,
        gamma if gamma is not None else mean, beta if beta is not None else mean,
        residual if residual is not None else dst, pos if pos is not None else dst,
        N, C_in, H, W, C_out, OH, OW, *input.stride(), *dst.stride(),
        M, stride[0], stride[1], padding[0], padding[2], dilation[0], dilation[1], *tiles.hi_lo(epi.p0),
        *tiles.hi_lo(epi.p1), *tiles.hi_lo(eps), next_power_of_2(M), *pool_args, KH=KH, KW=KW,
        HAS_BIAS=bias is not None, STATS=stats, SAVE_Z=z is not None and not stats, BN_EVAL=bn_eval is not None,
        HAS_GAMMA=gamma is not None, HAS_BETA=beta is not None, ACT="none" if stats else epi.activation,
        RESIDUAL=0 if stats else epi.residual, POOL_BEFORE_BN=epi.pool_before_bn,
        **tiles.gemm_constants(input.dtype, allow_tf32, input, dst),
        **pool_flags, **blocks,
    ).meta["BLOCK_M"]


def merge_stats(part, stats, running, M, C_out, tile_m, eps, momentum, index_64):
    """bn_stats_finalize_kernel over conv_fwd_kernel's per-tile partials: stats, and the running statistics
    (running = (mean, var, num_batches_tracked or None), or None) updated."""
    num_tiles = cdiv(M, tile_m)
    block_c = 32
    if num_tiles > tiles.MERGE_TILES:  # first level, in parallel: one partial per group of tiles
        groups = cdiv(num_tiles, tiles.MERGE_TILES)
        merged = torch.empty(2 * groups * C_out, dtype=part.dtype, device=part.device)
        launch(
            kernels.bn_stats_finalize_kernel, (groups, cdiv(C_out, block_c)),
            part, merged, part, part, part, C_out, M, num_tiles, tile_m, tiles.MERGE_TILES, 0.0, 0.0, 0.0, 0.0,
            BLOCK_T=tiles.MERGE_BLOCK_T, BLOCK_C=block_c, FINAL=False, TRACK=False, CUMULATIVE=False,
            INDEX_64=index_64,
        )
        part, num_tiles, tile_m = merged, groups, tile_m * tiles.MERGE_TILES
    mean_buf, var_buf, nbt = running if running is not None else (stats, stats, None)
    launch(
        kernels.bn_stats_finalize_kernel, (1, cdiv(C_out, block_c)),
        part, stats, mean_buf, var_buf, nbt if nbt is not None else stats, C_out, M, num_tiles, tile_m, num_tiles,
        *tiles.hi_lo(eps), *tiles.hi_lo(momentum if momentum is not None else 0.0),
        BLOCK_T=tiles.MERGE_BLOCK_T, BLOCK_C=block_c, FINAL=True, TRACK=running is not None,
        CUMULATIVE=momentum is None, INDEX_64=index_64, num_warps=8,  # 4 warps: 64 registers (Triton 3.6, 3.7)
    )


def train_forward(input, weight, bias, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked,
                  residual, momentum, eps, stride, padding, dilation, epi, allow_tf32):
    """3 launches: the conv with per-tile statistics, their merge (which also updates the running buffers), and
    normalize + residual + activation (which also counts the batch in num_batches_tracked), max-pooling too
    with a pool in ``epi``. Returns (out, z, stats, pos), pos the window tap of each maximum in one byte (empty
    without a pool)."""
    geo = train_geometry(input, weight, bn_weight, bn_bias, running_mean, running_var, residual, stride, padding,
                         dilation)
    N, C_in, H, W, C_out, KH, KW, OH, OW = geo
    sdtype = compute_dtype(input.dtype)
    weight, bias, bn_weight, bn_bias = dense(weight, bias, bn_weight, bn_bias)
    track = running_mean is not None and running_var is not None
    mean_buf, var_buf = dense(running_mean, running_var) if track else (None, None)
    M = rows = N * OH * OW
    pos = torch.empty(0, dtype=torch.uint8, device=input.device)
    if epi.pool_before_bn:  # z: the pooled conv output, BatchNorm's input
        PH, PW = pool_output_size(OH, OW, epi.window)
        z = empty_like_format(input, (N, C_out, PH, PW), input.dtype)
        pos = torch.empty_like(z, dtype=torch.uint8)
        rows = N * PH * PW * next_power_of_2(epi.pool[0] * epi.pool[1])  # the GEMM's rows: each window's taps
    else:
        z = empty_like_format(input, (N, C_out, OH, OW), input.dtype)
    stats = torch.empty(3, C_out, dtype=sdtype, device=input.device)
    # Room for the smallest row tile any config may pick: 2 x tiles x C_out (mean, M2).
    part = torch.empty(2 * cdiv(rows, 32) * C_out, dtype=sdtype, device=input.device)
    tile_m = conv_forward(input, weight, bias, None, z, part, geo, stride, padding, dilation, epi, allow_tf32,
                          stats=True, pos=pos)
    if epi.pool_before_bn:  # BLOCK_M rows are BLOCK_M // taps windows
        M, tile_m = z.numel() // C_out, tile_m // next_power_of_2(epi.pool[0] * epi.pool[1])
    count = track and num_batches_tracked is not None
    merge_stats(part, stats, (mean_buf, var_buf, num_batches_tracked if count else None) if track else None, M,
                C_out, tile_m, eps, momentum, tiles.index_64(z))
    gamma = bn_weight if bn_weight is not None else stats
    beta = bn_bias if bn_bias is not None else stats
    p = (*tiles.hi_lo(epi.p0), *tiles.hi_lo(epi.p1))
    nbt = num_batches_tracked if count else stats
    if epi.window is None or epi.pool_before_bn:
        out = torch.empty_like(z)
        residual = like_z(residual, z)
        launch(
            kernels.bn_act_fwd_kernel, (cdiv(z.numel(), tiles.NORMALIZE_BLOCK),),
            z, out, stats, gamma, beta, nbt, residual if residual is not None else z, z.numel(), C_out, z.stride(1),
            *p, HAS_AFFINE=bn_weight is not None, ACT=epi.activation, BLOCK=tiles.NORMALIZE_BLOCK,
            COUNT_BATCH=count, INDEX_64=tiles.index_64(z), RESIDUAL=epi.residual,
        )
    else:
        (pkh, pkw), (psh, psw), (pph, ppw), _ = epi.window
        PH, PW = pool_output_size(OH, OW, epi.window)
        out = empty_like_format(input, (N, C_out, PH, PW), input.dtype)
        pos = torch.empty_like(out, dtype=torch.uint8)
        launch(
            kernels.bn_act_pool_fwd_kernel, (cdiv(out.numel(), tiles.NORMALIZE_POOL_BLOCK),),
            z, out, pos, stats, gamma, beta, nbt, out.numel(), C_out, PH, PW, OH, OW, *z.stride(), *out.stride(),
            psh, psw, pph, ppw, *p, HAS_AFFINE=bn_weight is not None, ACT=epi.activation, COUNT_BATCH=count,
            INDEX_64=tiles.index_64(z), PKH=pkh, PKW=pkw, BLOCK=tiles.NORMALIZE_POOL_BLOCK,
        )
    if track:  # strided buffers were updated through dense copies
        for buf, dense_buf in ((running_mean, mean_buf), (running_var, var_buf)):
            if dense_buf is not buf:
                buf.copy_(dense_buf)
        written(running_mean, running_var, num_batches_tracked if count else None)
    return out, z, stats, pos


def infer_forward(input, weight, bias, running_mean, running_var, bn_weight, bn_bias, residual, eps, stride,
                  padding, dilation, epi, allow_tf32, geo, out_shape):
    """One launch: conv + BatchNorm (eval, from the buffers as they are) + residual + activation (+ max pool)."""
    out = empty_like_format(input, out_shape, input.dtype)
    weight, bias, running_mean, running_var, bn_weight, bn_bias = dense(
        weight, bias, running_mean, running_var, bn_weight, bn_bias)
    conv_forward(input, weight, bias, out, None, None, geo, stride, padding, dilation, epi, allow_tf32, stats=False,
                 bn_eval=(running_mean, running_var, bn_weight, bn_bias, eps), residual=like_z(residual, out))
    return out


def folded_forward(input, weight, bias, residual, stride, padding, dilation, epi, allow_tf32, save_preact, geo):
    """One launch: act(conv + bias (+ residual)) (+ residual); z, the activation's input, kept with save_preact."""
    N, C_in, H, W, C_out, KH, KW, OH, OW = geo
    out = empty_like_format(input, (N, C_out, OH, OW), input.dtype)
    z = torch.empty_like(out) if save_preact else None
    weight, bias = dense(weight, bias)
    conv_forward(input, weight, bias, out, z, None, geo, stride, padding, dilation, epi, allow_tf32, stats=False,
                 residual=like_z(residual, out))
    return out, z if save_preact else out.new_empty(0)


def block_backward(grad_out, input, weight, z, stats, bn_weight, bn_bias, residual, pos, stride, padding, dilation,
                   epi, allow_tf32, input_grad, weight_grad):
    """(dx, dw, db, dgamma, dbeta, dresidual) of the training block (stats given) or the folded one (stats None;
    z the activation's input). With a pool in ``epi``, grad_out is the pooled output's gradient: the reduction
    and dL/dz passes read it through the window taps pos. dresidual: for a residual before the activation
    BatchNorm's output gradient g_u, written in the dL/dz pass (training) or dL/dz itself (folded); empty
    otherwise (after the activation it is grad_out, which the autograd Function passes on)."""
    geo, bn, affine, empty, grad_gamma, grad_beta = backward_setup(input, weight, stats, bn_weight, bn_bias, stride,
                                                                   padding, dilation)
    N, C_in, H, W, C_out, KH, KW, OH, OW = geo
    weight, bn_weight, bn_bias = dense(weight, bn_weight, bn_bias)
    device = input.device
    sdtype = stats.dtype if bn else compute_dtype(input.dtype)
    M = N * OH * OW
    K = C_in * KH * KW
    p = (*tiles.hi_lo(epi.p0), *tiles.hi_lo(epi.p1))
    index_64 = tiles.index_64(z) or (epi.pool_before_bn and M * C_out >= tiles.INDEX_64_ELEMENTS)  # full-res dL/dz
    # dL/dz, computed once per element (g and z read twice in all: the reduction and this pass) for both GEMMs.
    block_c = tiles.np2(C_out)
    # BatchNorm's rows: z's (pooled before BatchNorm: z and grad_out are the pooled tensors)
    M_bn, H_bn, W_bn = z.numel() // C_out, z.shape[2], z.shape[3]
    rows = tiles.rows_per_split(M_bn, device, cdiv(C_out, block_c))
    splits = cdiv(M_bn, rows)
    part = torch.empty(2 * splits * C_out, dtype=torch.float64, device=device) if bn else z
    gamma, beta = (bn_weight, bn_bias) if affine else (z, z)
    window = epi.window
    if window is None:
        pool_args, pool_flags = (z, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0), _NO_POOL
    else:
        (pkh, pkw), (psh, psw), (pph, ppw), _ = window
        pool_args = (pos, *pos.stride(), pos.shape[2], pos.shape[3], psh, psw, pph, ppw)
        pool_flags = dict(POOL=True, PKH=pkh, PKW=pkw)
    residual_bn = bn and epi.residual == 1  # the passes read the residual and write its gradient
    residual = like_z(residual, z) if residual_bn else z
    grad_residual = torch.empty_like(z) if residual_bn else z
    rows_tile = tiles.backward_rows(window is not None, block_c, residual_bn)
    if bn:  # per split and channel: sum g_u and sum g_u*x_hat
        launch(
            kernels.bn_act_bwd_reduce_kernel, (splits, cdiv(C_out, block_c)),
            grad_out, z, stats, gamma, beta, part,
            M_bn, C_out, H_bn, W_bn, rows, *grad_out.stride(), *z.stride(), *p, *pool_args, residual,
            HAS_AFFINE=affine, ACT=epi.activation, INDEX_64=index_64, RESIDUAL=epi.residual if bn else 0,
            **(_NO_POOL if epi.pool_before_bn else pool_flags), BLOCK_M=rows_tile, BLOCK_C=block_c,
        )
    if epi.pool_before_bn:  # dL/dz at full resolution: the pooled one at each window's maximum, else 0
        gz = empty_like_format(input, (N, C_out, OH, OW), input.dtype)
        gz_rows = tiles.rows_per_split(M, device, cdiv(C_out, block_c))
        grid = cdiv(M, gz_rows)
    else:
        gz, gz_rows, grid = torch.empty_like(z), rows, splits
    launch(
        kernels.grad_z_kernel, (grid, cdiv(C_out, block_c)),
        grad_out, z, gz, stats if bn else z, gamma, beta, part, grad_gamma if affine else z,
        grad_beta if affine else z, residual, grad_residual, M, C_out, OH, OW, gz_rows, splits, M_bn, *p,
        *grad_out.stride(), *z.stride(), *gz.stride(), *pool_args,
        BN=bn, HAS_AFFINE=affine, ACT=epi.activation, ACC_DTYPE=tiles.acc_dtype(input.dtype), INDEX_64=index_64,
        RESIDUAL=epi.residual if bn else 0, POOL_BEFORE_BN=epi.pool_before_bn, **pool_flags, BLOCK_M=rows_tile,
        BLOCK_S=tiles.GRAD_Z_BLOCK_S, BLOCK_C=block_c,
    )
    common = tiles.gemm_constants(input.dtype, allow_tf32, input, gz)
    dx = empty()
    if input_grad:
        dx = torch.empty_like(input, memory_format=memory_format(input))
        M_in = N * H * W
        kernel, blocks = tiles.input_grad_gemm(M_in, C_in, C_out * KH * KW, input.dtype)
        launch(
            kernel,
            lambda meta: (cdiv(M_in, meta["BLOCK_M"]), cdiv(C_in, meta["BLOCK_N"])),
            gz, weight, dx, N, C_in, H, W, C_out, OH, OW, *gz.stride(), *dx.stride(),
            M_in, stride[0], stride[1], padding[0], padding[2], dilation[0], dilation[1], next_power_of_2(M_in),
            KH=KH, KW=KW, **common, **blocks,
        )
    dw, db = empty(), empty()
    if weight_grad:
        rows = tiles.rows_per_split(M, device, cdiv(C_out, 32) * cdiv(K, 64))
        splits = cdiv(M, rows)
        # in the compute dtype, as the sums are: autograd rounds them to a 16-bit parameter's dtype, once; a
        # folded BatchNorm's float32 parameters get them unrounded
        dw = torch.empty(weight.shape, dtype=compute_dtype(weight.dtype), device=device)
        db = torch.empty(C_out, dtype=compute_dtype(weight.dtype), device=device)
        if splits == 1:  # the GEMM writes dW and d(bias) themselves
            part, bias_part, part_stride = dw, db, 0
        else:  # per-split partials, summed in a fixed order below
            part_stride = C_out * K + C_out
            part = torch.empty(splits * part_stride, dtype=sdtype, device=device)
            bias_part = part[C_out * K:]
        kernel, blocks = tiles.weight_grad_gemm(M, C_out, K, input.dtype)
        launch(
            kernel,
            lambda meta: (splits, cdiv(K, meta["BLOCK_K"]), cdiv(C_out, meta["BLOCK_CO"])),
            gz, input, part, bias_part, part_stride, N, C_in, H, W, C_out, OH, OW, *gz.stride(), *input.stride(),
            M, rows, stride[0], stride[1], padding[0], padding[2], dilation[0], dilation[1], next_power_of_2(M),
            KH=KH, KW=KW, BIAS_GRAD=not bn, **common, **blocks,
        )
        if splits > 1:
            launch(
                kernels.sum_splits_kernel, (cdiv(part_stride, tiles.SUM_SPLITS_BLOCK),),
                part, dw, db, splits, part_stride, C_out * K, INDEX_64=tiles.index_64(part),
                BLOCK_S=4, BLOCK_L=tiles.SUM_SPLITS_BLOCK,
            )
    if residual_bn:
        dres = grad_residual
    elif epi.residual == 1:  # folded: the residual's gradient is dL/dz
        dres = gz
    else:
        dres = empty()
    return dx, dw, db, grad_gamma, grad_beta, dres
