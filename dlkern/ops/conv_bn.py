"""The fused Conv2d -> BatchNorm2d -> activation block as torch.library ops (registered by dlkern/ops/library.py).

- ``dlkern::conv_bn_act2d``            training forward with batch statistics -> (out, z, stats), updating the
  running statistics it is given (3 launches); autograd (an Autograd kernel: the op writes its arguments).
- ``dlkern::conv_bias_act2d``          conv + bias + activation (eval, BatchNorm folded by the caller); autograd.
- ``dlkern::conv_bn_eval_act2d``       conv + BatchNorm (eval, from the running buffers) + activation: inference.
- ``dlkern::conv_bn_act2d_backward``   the backward of conv_bn_act2d (stats given) and conv_bias_act2d (None).

z is the conv output (bias included) that BatchNorm normalizes; stats is (3, C_out): batch mean, 1/sqrt(var + eps)
and the biased var, in float32 (float64 for float64 inputs). ``padding`` is always (top, bottom, left, right).
CUDA tensors (and CPU tensors under TRITON_INTERPRET=1) run the Triton kernels of ``kernels/conv_bn.py``; other
CPU tensors an equivalent PyTorch composite (warned once). No launcher reads device memory on the host.
"""

import functools
import struct

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor
from torch._prims_common import suggest_memory_format

from dlkern import _compat, _env
from dlkern.catalog import FUSABLE, check_activation  # noqa: F401  (FUSABLE: the fusable names, "none" too)
from dlkern.kernels import conv_bn as kernels
from dlkern.ops.activation import composite_backward, composite_forward
from dlkern.ops.arguments import SCALAR_NAMES, check_conv2d, conv2d_args, is_plain
from dlkern.ops.autograd_support import call_op, function_apply, needs_autograd
from dlkern.ops.library import define, LIB
from dlkern.ops.max_pool import _MAX_POOL2D, _MAX_POOL2D_VALUES, _pooling_output_size
from dlkern.ops.triton_support import (
    cdiv, compute_dtype, INTERPRETING, launch, next_power_of_2, remembered, sm_count,
)

OP = "conv_bn_act2d"


# ---------------------------------------------------------------------------------------------- launch helpers


@functools.lru_cache(maxsize=1024)  # a block's parameters repeat call after call: pack each once
def _hi_lo(x):
    """x as float32 hi + lo (kernels rebuild it with ``_scalar``): Triton passes Python floats as float32."""
    hi = struct.unpack("f", struct.pack("f", x))[0]
    return hi, struct.unpack("f", struct.pack("f", x - hi))[0]


def _acc_dtype(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _precision(dtype, allow_tf32):
    # tl.dot's TF32 exactly when PyTorch's cuDNN conv would use it; float64 dots are always IEEE.
    return "tf32" if allow_tf32 and dtype == torch.float32 else "ieee"


def _dot_fp32(dtype):
    # Triton's interpreter multiplies 16-bit tl.dot operands as raw bits: upcast them there (not on the GPU).
    return INTERPRETING and dtype in (torch.float16, torch.bfloat16)


def _np2(n, lo=16, hi=64):
    return max(lo, min(hi, next_power_of_2(int(n))))


def geometry(input, weight, stride, padding, dilation):
    """(N, C_in, H, W, C_out, KH, KW, OH, OW)."""
    N, C_in, H, W = input.shape
    C_out, _, KH, KW = weight.shape
    OH = (H + padding[0] + padding[1] - dilation[0] * (KH - 1) - 1) // stride[0] + 1
    OW = (W + padding[2] + padding[3] - dilation[1] * (KW - 1) - 1) // stride[1] + 1
    return N, C_in, H, W, C_out, KH, KW, OH, OW


def _memory_format(input):
    """suggest_memory_format(input), without its stride walk for a contiguous input (never channels_last-like)."""
    return torch.contiguous_format if input.is_contiguous() else suggest_memory_format(input)


def _empty_like_format(input, shape, dtype):
    return torch.empty(shape, dtype=dtype, device=input.device, memory_format=_memory_format(input))


def _rows_per_split(M, device, programs_per_split):
    """Rows per program of the split reductions: enough splits to fill the GPU several times over; in the
    interpreter few (it runs programs one by one), though more than one, so the merge is exercised."""
    if INTERPRETING or device.type != "cuda":
        return 512
    splits = max(1, 4 * sm_count(device) // programs_per_split)
    return max(128, cdiv(cdiv(M, splits), 128) * 128)


# The GEMMs' tiles: (BLOCK_M, BLOCK_N or BLOCK_CO, BLOCK_K, num_warps, num_stages, 16-bit dtypes only). Only
# tiles that fit an H200 SM are offered: compiled for sm_90 (tests/gpu_compile_check.py) at the MnistCNN's
# shapes, each has no register spills and >= 25% theoretical occupancy (<= 128 registers a thread) in every
# dtype it is offered for, under every supported Triton (3.6, 3.7, 3.8). Wider BLOCK_K needs more registers for
# its gathered addresses than that allows, except in 16 bits at 8 warps -- and BLOCK_K = 64 not even there in
# the forward and input gradient (64x32x64, 8 warps: 128 registers under Triton 3.7.1; 135 (fp16) and 144 (bf16)
# under 3.8). With the pooling epilogue, fewer still (_pool_tile). The weight gradient's MMA is
# (BLOCK_K x BLOCK_M) @ (BLOCK_M x BLOCK_CO): its BLOCK_K is the MMA's M, >= 64 for wgmma.
_FWD_TILES = [(64, 32, 16, 4, 3, False), (64, 32, 16, 4, 4, False), (64, 32, 16, 8, 3, False),
              (128, 32, 16, 8, 3, False), (64, 32, 32, 8, 3, True)]
_DGRAD_TILES = [(64, 32, 16, 4, 3, False), (64, 32, 16, 4, 4, True), (64, 32, 16, 8, 3, False),
                (128, 32, 16, 8, 3, False), (64, 32, 32, 8, 3, False)]
_WGRAD_TILES = [(32, 32, 64, 8, 3, False), (32, 32, 128, 8, 3, True), (64, 32, 64, 8, 3, True)]
# DLKERN_AUTOTUNE=1: Triton's autotuner over those tiles, keyed on M rounded up to a power of two (an epoch's
# ragged last batch reuses the tuned tiles) and cached on disk across processes. Default (0): one fixed tile per
# shape from _heuristic, no benchmarking -- a first run compiles one variant per kernel and shape instead of
# all of them (tests/gpu_compile_check.py's cold start), and what runs does not depend on timing noise.
AUTOTUNE = _env.flag("DLKERN_AUTOTUNE")  # 0/1, true/false, yes/no, on/off (any case); anything else raises
_HALF_ONLY = set()  # ids of the autotuner configs offered for 16-bit dtypes only


def _pool_tile(block_m, block_k, warps, wide):
    """Whether a forward tile is offered with the pooling epilogue, whose window reduction needs registers:
    BLOCK_K <= 32, 8 warps, 64 rows in 32 bits. (4 warps: 107-113 registers in 16 bits under Triton 3.7.1 and
    3.8, 132-140 in fp32 under 3.8, < 25%; 64x32x16 at 8 warps: 47-70 under 3.6-3.8.)"""
    return block_k <= 32 and warps == 8 and not (wide and block_m > 64)


def _pruner(n_name, n_dim, k_dims, tensor):
    """Drops configs whose tiles are wider than the problem (e.g. BLOCK_K=64 for the K = 9 first layer) and the
    16-bit-only ones for other dtypes."""

    def prune(configs, named_args, **kwargs):
        k = named_args[k_dims] * kwargs["KH"] * kwargs["KW"]
        n = named_args[n_dim]
        wide = named_args[tensor].element_size() > 2
        allowed = [c for c in configs if not (wide and id(c) in _HALF_ONLY)]
        if kwargs.get("POOL"):
            allowed = [c for c in allowed if _pool_tile(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"], c.num_warps, wide)]
        kept = [c for c in allowed if c.kwargs["BLOCK_K"] <= _np2(k, hi=128) and c.kwargs[n_name] <= _np2(n, hi=128)]
        return kept or allowed[:1]

    return prune


def _tuned(kernel, n_name, n_dim, k_dims, tensor, key, tiles):
    """The autotuned form of a GEMM kernel (used with DLKERN_AUTOTUNE=1 on a GPU). Its outputs are fully
    rewritten by each run and it never touches the running buffers (only bn_stats_finalize_kernel does,
    untuned), so benchmarking configs cannot corrupt state."""
    if INTERPRETING:
        return kernel
    configs = []
    for bm, bn, bk, w, s, half in tiles:
        configs.append(triton.Config({"BLOCK_M": bm, n_name: bn, "BLOCK_K": bk}, num_warps=w, num_stages=s))
        if half:
            _HALF_ONLY.add(id(configs[-1]))
    prune = {"early_config_prune": _pruner(n_name, n_dim, k_dims, tensor)}
    return triton.autotune(configs, key=key, prune_configs_by=prune, cache_results=True)(kernel)


_conv_fwd = _tuned(kernels.conv_fwd_kernel, "BLOCK_N", "C_out", "C_in", "x_ptr",
                   ["m_bucket", "C_in", "C_out", "OH", "OW", "KH", "KW"], _FWD_TILES)
_conv_bwd_input = _tuned(kernels.conv_bwd_input_kernel, "BLOCK_N", "C_in", "C_out", "gz_ptr",
                         ["m_bucket", "C_in", "C_out", "OH", "OW", "KH", "KW"], _DGRAD_TILES)
_conv_bwd_weight = _tuned(kernels.conv_bwd_weight_kernel, "BLOCK_CO", "C_out", "C_in", "gz_ptr",
                          ["m_bucket", "C_in", "C_out", "KH", "KW"], _WGRAD_TILES)


def _heuristic(tiles, n_name, M, N, dtype, pool=False):
    """The fixed tile for a shape (DLKERN_AUTOTUNE=0): from the offered ones, 128-row tiles once M fills an H200
    several times over (>= 2^17 rows), else 64; BLOCK_N/BLOCK_CO the narrowest that covers N (32 for the MnistCNN),
    the smallest BLOCK_K, 4 warps when offered (with the pooling epilogue, the tiles _pool_tile allows: 64 rows,
    8 warps). Computed once per (tiles, large M, N, dtype, pool): a few µs a call."""
    key = (id(tiles), n_name, M >= 1 << 17, N, dtype, pool)
    blocks = _heuristic_tiles.get(key)
    if blocks is None:
        blocks = _heuristic_tiles[key] = _pick_tile(tiles, n_name, M >= 1 << 17, dtype, pool)
    return blocks


_heuristic_tiles = {}


def _pick_tile(tiles, n_name, large, dtype, pool):
    wide = dtype.itemsize > 2
    offered = [t for t in tiles if not (wide and t[5]) and (not pool or _pool_tile(t[0], t[2], t[3], wide))]
    bm = 128 if large and any(t[0] == 128 for t in offered) else min(t[0] for t in offered)
    fits = [t for t in offered if t[0] == bm] or offered
    bm, bn, bk, w, s, _ = min(fits, key=lambda t: (t[2], -t[3] if bm == 128 else t[3], t[4]))
    return {"BLOCK_M": bm, n_name: bn, "BLOCK_K": bk, "num_warps": w, "num_stages": s}


def _gemm(tuned, plain, tiles, n_name, M, N, dtype, pool=False, **interpreter_blocks):
    """(kernel, launch keywords) for a GEMM: the interpreter's small fixed tiles, the autotuner, or the
    heuristic's fixed tile (64 rows with a pooling epilogue) -- with m_bucket for the autotuner's key."""
    if INTERPRETING:
        return plain, interpreter_blocks
    if AUTOTUNE:
        return tuned, {}
    return plain, _heuristic(tiles, n_name, 0 if pool else M, N, dtype, pool)


# Tensors from this many elements get 64-bit offsets: a margin below int32's 2^31 for the offsets that masked
# lanes compute past a tensor's end. (A test lowers it to run the 64-bit code on small tensors.)
INDEX_64_ELEMENTS = 1 << 30


def _index_64(*tensors):
    """Whether a kernel needs 64-bit offsets (its INDEX_64): some tensor of >= INDEX_64_ELEMENTS elements."""
    return any(t is not None and t.numel() >= INDEX_64_ELEMENTS for t in tensors)


# The statistics merge: up to this many tiles merge in one pass (one program per channel block); more are first
# merged in parallel groups of this many (a fourth launch at large batches: 8192 MNIST images at 64-row tiles).
_MERGE_TILES = 4 if INTERPRETING else 1024


def _merge_stats(part, stats, running, M, C_out, tile_m, eps, momentum, index_64):
    """bn_stats_finalize_kernel over conv_fwd_kernel's per-tile partials: stats, and the running statistics
    (running = (mean, var, num_batches_tracked or None), or None) updated."""
    tiles = cdiv(M, tile_m)
    block_c = 32
    if tiles > _MERGE_TILES:  # first level, in parallel: one partial per group of tiles
        groups = cdiv(tiles, _MERGE_TILES)
        merged = torch.empty(2 * groups * C_out, dtype=part.dtype, device=part.device)
        launch(
            kernels.bn_stats_finalize_kernel, (groups, cdiv(C_out, block_c)),
            part, merged, part, part, part, C_out, M, tiles, tile_m, _MERGE_TILES, 0.0, 0.0, 0.0, 0.0,
            BLOCK_T=4 if INTERPRETING else 32, BLOCK_C=block_c, FINAL=False, TRACK=False, CUMULATIVE=False,
            INDEX_64=index_64,
        )
        part, tiles, tile_m = merged, groups, tile_m * _MERGE_TILES
    mean_buf, var_buf, nbt = running if running is not None else (stats, stats, None)
    launch(
        kernels.bn_stats_finalize_kernel, (1, cdiv(C_out, block_c)),
        part, stats, mean_buf, var_buf, nbt if nbt is not None else stats, C_out, M, tiles, tile_m, tiles,
        *_hi_lo(eps), *_hi_lo(momentum if momentum is not None else 0.0),
        BLOCK_T=4 if INTERPRETING else 32, BLOCK_C=block_c, FINAL=True, TRACK=running is not None,
        CUMULATIVE=momentum is None, INDEX_64=index_64, num_warps=8,  # 4 warps: 64 registers (Triton 3.6, 3.7)
    )


def _gemm_fwd(input, weight, bias, out, z, part, geo, stride, padding, dilation, act, p0, p1, allow_tf32, stats,
              bn_eval=None, pool=None):
    """Launches conv_fwd_kernel; returns its BLOCK_M (the row tile of the statistics partials). ``bn_eval``:
    (running_mean, running_var, weight, bias, eps) of a BatchNorm in eval mode to apply in the epilogue;
    ``pool``: the max pool (kernel, stride, padding, ceil_mode) to apply after it, ``out`` being pooled."""
    N, C_in, H, W, C_out, KH, KW, OH, OW = geo
    M = N * OH * OW
    dst = z if stats else out
    mean, var, gamma, beta, eps = bn_eval if bn_eval is not None else (dst, dst, None, None, 0.0)
    pool_args, pool_flags = (1, 1, 1, 1, 0, 0), dict(POOL=False, PKH=1, PKW=1, TAPS=1)
    if pool is not None:
        (pkh, pkw), (psh, psw), (pph, ppw), _ = pool
        PH, PW = out.shape[2], out.shape[3]
        taps = next_power_of_2(pkh * pkw)
        M = N * PH * PW * taps  # rows: each window's taps
        pool_args, pool_flags = (PH, PW, psh, psw, pph, ppw), dict(POOL=True, PKH=pkh, PKW=pkw, TAPS=taps)
    kernel, blocks = _gemm(_conv_fwd, kernels.conv_fwd_kernel, _FWD_TILES, "BLOCK_N", M, C_out, input.dtype,
                           pool=pool is not None, BLOCK_M=32 if stats else 128, BLOCK_N=_np2(C_out),
                           BLOCK_K=_np2(C_in * KH * KW))
    return launch(
        kernel,
        lambda meta: (cdiv(M, meta["BLOCK_M"]), cdiv(C_out, meta["BLOCK_N"])),
        input, weight, bias if bias is not None else weight, out if out is not None else dst,
        z if z is not None else dst, part if part is not None else dst, mean, var,
        gamma if gamma is not None else mean, beta if beta is not None else mean,
        N, C_in, H, W, C_out, OH, OW, *input.stride(), *dst.stride(),
        M, stride[0], stride[1], padding[0], padding[2], dilation[0], dilation[1], *_hi_lo(p0), *_hi_lo(p1),
        *_hi_lo(eps), next_power_of_2(M), *pool_args, KH=KH, KW=KW, HAS_BIAS=bias is not None, STATS=stats,
        SAVE_Z=z is not None and not stats, BN_EVAL=bn_eval is not None, HAS_GAMMA=gamma is not None,
        HAS_BETA=beta is not None, ACT=act, PRECISION=_precision(input.dtype, allow_tf32),
        ACC_DTYPE=_acc_dtype(input.dtype), DOT_FP32=_dot_fp32(input.dtype), INDEX_64=_index_64(input, dst),
        **pool_flags, **blocks,
    ).meta["BLOCK_M"]


def _dense(*tensors):
    """The kernels index these per channel (bias, BatchNorm's weight and bias) or per element (the conv weight)
    as dense arrays: strided or expanded ones are copied (a no-op for contiguous ones)."""
    return [None if t is None else t.contiguous() for t in tensors]


def check_bn_sizes(channels, running_mean=None, running_var=None, bn_weight=None, bn_bias=None):
    """PyTorch's checks (and messages, in its order) of BatchNorm's per-channel tensors, in the ops and fakes too."""
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", bn_weight),
                    ("bias", bn_bias)):
        if t is not None and (size := t.numel()) != channels:  # the message is built only for a bad size
            _check(size == channels, f"{name} should contain {channels} elements not {size}")


def _check(condition, message):
    """torch._check with a ready message: Dynamo (fullgraph) traces a message closure only over constants.
    Under torch.jit.trace a size (numel()) is a traced 0-d tensor: the condition is then read as a bool."""
    if condition is True:  # the common case, without torch._check's cost (~1.5 µs)
        return
    if isinstance(condition, torch.Tensor):
        condition = bool(condition)
    _compat.check(condition, message)


# ---------------------------------------------------------------------------------------------- PyTorch composite


def _torch_act(u, act, p0, p1):
    return u if act == "none" else composite_forward(u, act, p0, p1)


def _torch_act_vjp(u, g, act, p0, p1):
    return g if act == "none" else composite_backward(g, u, act, p0, p1, from_output=False)


def _symmetric(padding):
    """(top, bottom, left, right) as conv2d's (rows, columns) when top == bottom and left == right, else None."""
    return [padding[0], padding[2]] if padding[0] == padding[1] and padding[2] == padding[3] else None


def _torch_conv(input, weight, bias, stride, padding, dilation):
    if _symmetric(padding) is not None:
        return F.conv2d(input, weight, bias, stride, _symmetric(padding), dilation)
    x = F.pad(input, (padding[2], padding[3], padding[0], padding[1]))  # 'same' with an even kernel
    return F.conv2d(x, weight, bias, stride, 0, dilation)


def _torch_conv_backward(gz, input, weight, stride, padding, dilation, input_grad, weight_grad, empty):
    """(dx, dw) of _torch_conv by ATen's convolution_backward (empty where not asked for); dw in the compute dtype,
    as the Triton backward's."""
    pad = _symmetric(padding)
    x = input if pad is not None else F.pad(input, (padding[2], padding[3], padding[0], padding[1]))
    dx, dw, _ = torch.ops.aten.convolution_backward(
        gz, x, weight, None, stride, pad or [0, 0], dilation, False, [0, 0], 1, [input_grad, weight_grad, False]
    )
    if input_grad:
        if pad is None:
            dx = dx[:, :, padding[0]:padding[0] + input.shape[2], padding[2]:padding[2] + input.shape[3]]
        dx = dx.contiguous(memory_format=_memory_format(input))
    return dx if input_grad else empty(), dw.to(compute_dtype(dw.dtype)).contiguous() if weight_grad else empty()


def _vector(t, dtype):
    """A per-channel tensor (any shape of C elements, as BatchNorm accepts) as a C-vector of dtype, or None."""
    return None if t is None else t.to(dtype).reshape(-1)


# ---------------------------------------------------------------------------------------------- training forward

_TRAIN_SCHEMA = (
    "conv_bn_act2d(Tensor input, Tensor weight, Tensor? bias, Tensor? bn_weight, Tensor? bn_bias, "
    "Tensor(a!)? running_mean, Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, float? momentum, "
    "float eps, int[] stride, int[] padding, int[] dilation, str activation, float p0, float p1, bool allow_tf32) "
    "-> (Tensor, Tensor, Tensor)"
)


def _check_train(input, weight, bn_weight, bn_bias, running_mean, running_var, stride, padding, dilation):
    """The op's own checks (the entry point makes PyTorch's first), shared by its kernels and its fake."""
    geo = geometry(input, weight, stride, padding, dilation)
    check_bn_sizes(geo[4], running_mean, running_var, bn_weight, bn_bias)
    for buf in (running_mean, running_var):
        # As PyTorch's in-place ops: an expanded buffer has no one place to hold each channel's statistic.
        _check(
            buf is None or torch._debug_has_internal_overlap(buf) != 1,
            "unsupported operation: more than one element of the written-to tensor refers to a single memory "
            "location. Please clone() the tensor before performing the operation.",
        )
    return geo


def _conv_bn_act2d_triton(input, weight, bias, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked,
                          momentum, eps, stride, padding, dilation, activation, p0, p1, allow_tf32, pool=None):
    """3 launches: the conv with per-tile statistics, their merge (which also updates the running buffers), and
    normalize + activation (which also counts the batch in num_batches_tracked). With ``pool`` (kernel, stride,
    padding, ceil_mode; windows that do not overlap) the last launch max-pools too: returns (pooled out, z, stats,
    pos), pos the window tap of each maximum in one byte."""
    geo = _check_train(input, weight, bn_weight, bn_bias, running_mean, running_var, stride, padding, dilation)
    N, C_in, H, W, C_out, KH, KW, OH, OW = geo
    sdtype = compute_dtype(input.dtype)
    weight, bias, bn_weight, bn_bias = _dense(weight, bias, bn_weight, bn_bias)
    track = running_mean is not None and running_var is not None
    mean_buf, var_buf = _dense(running_mean, running_var) if track else (None, None)
    M = N * OH * OW
    z = _empty_like_format(input, (N, C_out, OH, OW), input.dtype)
    out = torch.empty_like(z) if pool is None else None
    stats = torch.empty(3, C_out, dtype=sdtype, device=input.device)
    # Room for the smallest row tile any config may pick: 2 x tiles x C_out (mean, M2).
    part = torch.empty(2 * cdiv(M, 32) * C_out, dtype=sdtype, device=input.device)
    tile_m = _gemm_fwd(input, weight, bias, None, z, part, geo, stride, padding, dilation, "none", 0.0, 0.0,
                       allow_tf32, stats=True)
    count = track and num_batches_tracked is not None
    _merge_stats(part, stats, (mean_buf, var_buf, num_batches_tracked if count else None) if track else None, M,
                 C_out, tile_m, eps, momentum, _index_64(z))
    gamma = bn_weight if bn_weight is not None else stats
    beta = bn_bias if bn_bias is not None else stats
    if pool is None:
        block = 4096 if INTERPRETING else 1024
        launch(
            kernels.bn_act_fwd_kernel, (cdiv(z.numel(), block),),
            z, out, stats, gamma, beta, num_batches_tracked if count else stats, z.numel(), C_out, z.stride(1),
            *_hi_lo(p0), *_hi_lo(p1),
            HAS_AFFINE=bn_weight is not None, ACT=activation, BLOCK=block, COUNT_BATCH=count, INDEX_64=_index_64(z),
        )
    else:
        (pkh, pkw), (psh, psw), (pph, ppw), ceil_mode = pool
        PH, PW = pool_output_size(OH, OW, pool)
        out = _empty_like_format(input, (N, C_out, PH, PW), input.dtype)
        pos = torch.empty_like(out, dtype=torch.uint8)
        block = 256  # 2 pooled elements a thread: 48-56 registers under Triton 3.6-3.8 (512: up to 72, < 50%)
        launch(
            kernels.bn_act_pool_fwd_kernel, (cdiv(out.numel(), block),),
            z, out, pos, stats, gamma, beta, num_batches_tracked if count else stats, out.numel(), C_out, PH, PW,
            OH, OW, *z.stride(), *out.stride(), psh, psw, pph, ppw, *_hi_lo(p0), *_hi_lo(p1),
            HAS_AFFINE=bn_weight is not None, ACT=activation, COUNT_BATCH=count, INDEX_64=_index_64(z),
            PKH=pkh, PKW=pkw, BLOCK=block,
        )
    if track:  # strided buffers were updated through dense copies
        for buf, dense in ((running_mean, mean_buf), (running_var, var_buf)):
            if dense is not buf:
                buf.copy_(dense)
        _written(running_mean, running_var, num_batches_tracked if count else None)
    return (out, z, stats) if pool is None else (out, z, stats, pos)


def _written(*tensors):
    """Version counters up for buffers a kernel wrote (as an in-place ATen op's would go), so that a backward
    that saved one of them raises instead of reading the new values. Here rather than in an ADInplaceOrView
    kernel, which would put a second Python call on every training step."""
    for t in tensors:
        if t is not None and not t.is_inference():
            torch.autograd.graph.increment_version(t)


def _conv_bn_act2d_composite(input, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                             num_batches_tracked, momentum, eps, stride, padding, dilation, activation, p0, p1,
                             allow_tf32):
    """ATen's own CPU kernels: the conv, batch statistics, batch_norm with them, the running update."""
    _check_train(input, weight, bn_weight, bn_bias, running_mean, running_var, stride, padding, dilation)
    sdtype = compute_dtype(input.dtype)
    z = _torch_conv(input, weight, bias, stride, padding, dilation)
    zs = z.to(sdtype)
    mean, var = torch.batch_norm_update_stats(zs, None, None, 0.0)  # biased variance
    invstd = torch.rsqrt(var + eps)
    u = torch.batch_norm(zs, _vector(bn_weight, sdtype), _vector(bn_bias, sdtype), mean, var, False, 0.0, eps, False)
    if running_mean is not None and running_var is not None:
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        f = momentum if momentum is not None else 1.0 / float(num_batches_tracked)
        count = zs.numel() // zs.shape[1]
        running_mean.mul_(1 - f).add_(mean.to(running_mean.dtype).view(running_mean.shape), alpha=f)
        unbiased = (var * (count / (count - 1))).to(running_var.dtype).view(running_var.shape)
        running_var.mul_(1 - f).add_(unbiased, alpha=f)
    return _torch_act(u, activation, p0, p1).to(input.dtype), z, torch.stack([mean, invstd, var])


def _conv_bn_act2d_fake(input, weight, bias, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked,
                        momentum, eps, stride, padding, dilation, activation, p0, p1, allow_tf32):
    N, C_in, H, W, C_out, KH, KW, OH, OW = _check_train(input, weight, bn_weight, bn_bias, running_mean, running_var,
                                                        stride, padding, dilation)
    z = _empty_like_format(input, (N, C_out, OH, OW), input.dtype)
    return torch.empty_like(z), torch.empty_like(z), input.new_empty(3, C_out, dtype=compute_dtype(input.dtype))


conv_bn_act2d = define(_TRAIN_SCHEMA, _conv_bn_act2d_triton, _conv_bn_act2d_composite, _conv_bn_act2d_fake, OP)
"""act(BatchNorm(conv(input) + bias)) with batch statistics -> (out, z, stats); updates the running statistics
when given (running_mean and running_var; num_batches_tracked += 1 when given; momentum None: the cumulative
average)."""


def _train_setup_context(ctx, inputs, output):
    """Also for conv_bn_act_pool2d, whose extra inputs (the pool's) and output (the window taps) come last."""
    input, weight, bias, bn_weight, bn_bias, *_, ctx.stride, ctx.padding, ctx.dilation, ctx.act, ctx.p0, ctx.p1, \
        ctx.allow_tf32 = inputs[:17]
    _, z, stats, *taps = output
    ctx.mark_non_differentiable(z, stats, *taps)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for z and stats, which nothing differentiates
    ctx.has_bias = bias is not None
    ctx.save_for_backward(input, weight, z, stats, bn_weight, bn_bias, *taps)


def _train_backward(ctx, grad_out, _grad_z, _grad_stats):
    if grad_out is None:
        return (None,) * 17
    input, weight, z, stats, bn_weight, bn_bias = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, dw, db, dgamma, dbeta = _block_backward(
        conv_bn_act2d_backward, grad_out, input, weight, z, stats, bn_weight, bn_bias, ctx.stride, ctx.padding, ctx.dilation, ctx.act,
        ctx.p0, ctx.p1, ctx.allow_tf32, need[0], need[1] or need[2],
    )
    return (
        dx if need[0] else None, dw if need[1] else None, db if need[2] and ctx.has_bias else None,
        dgamma if need[3] else None, dbeta if need[4] else None, *([None] * 12),
    )


# ---------------------------------------------------------------------------------------------- eval forward


def _conv_bias_act2d_triton(input, weight, bias, stride, padding, dilation, activation, p0, p1, allow_tf32,
                            save_preact):
    geo = geometry(input, weight, stride, padding, dilation)
    N, C_in, H, W, C_out, KH, KW, OH, OW = geo
    out = _empty_like_format(input, (N, C_out, OH, OW), input.dtype)
    z = torch.empty_like(out) if save_preact else None
    weight, bias = _dense(weight, bias)
    _gemm_fwd(input, weight, bias, out, z, None, geo, stride, padding, dilation, activation, p0, p1,
              allow_tf32, stats=False)
    return out, z if save_preact else out.new_empty(0)


def _conv_bias_act2d_composite(input, weight, bias, stride, padding, dilation, activation, p0, p1, allow_tf32,
                               save_preact):
    z = _torch_conv(input, weight, bias, stride, padding, dilation)
    out = _torch_act(z, activation, p0, p1)
    if not save_preact:
        return out, z.new_empty(0)
    # Without an activation out is z: an op's outputs may not alias each other.
    return out, z.clone() if out is z else z


def _conv_bias_act2d_fake(input, weight, bias, stride, padding, dilation, activation, p0, p1, allow_tf32,
                          save_preact):
    N, C_in, H, W, C_out, KH, KW, OH, OW = geometry(input, weight, stride, padding, dilation)
    out = _empty_like_format(input, (N, C_out, OH, OW), input.dtype)
    return out, torch.empty_like(out) if save_preact else out.new_empty(0)


conv_bias_act2d = define(
    "conv_bias_act2d(Tensor input, Tensor weight, Tensor? bias, int[] stride, int[] padding, int[] dilation, "
    "str activation, float p0, float p1, bool allow_tf32, bool save_preact) -> (Tensor, Tensor)",
    _conv_bias_act2d_triton, _conv_bias_act2d_composite, _conv_bias_act2d_fake, OP,
)
"""act(conv(input, weight) + bias) in one kernel (BatchNorm folded into weight and bias by the caller).
Returns (out, z); z, the activation's input, is kept only with save_preact (for the backward), else empty."""


def _conv_bn_eval_act2d_triton(input, weight, bias, running_mean, running_var, bn_weight, bn_bias, eps, stride,
                               padding, dilation, activation, p0, p1, allow_tf32):
    geo = geometry(input, weight, stride, padding, dilation)
    N, C_in, H, W, C_out, KH, KW, OH, OW = geo
    check_bn_sizes(C_out, running_mean, running_var, bn_weight, bn_bias)
    out = _empty_like_format(input, (N, C_out, OH, OW), input.dtype)
    weight, bias, running_mean, running_var, bn_weight, bn_bias = _dense(
        weight, bias, running_mean, running_var, bn_weight, bn_bias)
    _gemm_fwd(input, weight, bias, out, None, None, geo, stride, padding, dilation, activation, p0, p1, allow_tf32,
              stats=False, bn_eval=(running_mean, running_var, bn_weight, bn_bias, eps))
    return out


def _conv_bn_eval_act2d_composite(input, weight, bias, running_mean, running_var, bn_weight, bn_bias, eps, stride,
                                  padding, dilation, activation, p0, p1, allow_tf32):
    """ATen's kernels: conv2d, then batch_norm in eval."""
    check_bn_sizes(weight.shape[0], running_mean, running_var, bn_weight, bn_bias)
    z = _torch_conv(input, weight, bias, stride, padding, dilation)
    u = torch.batch_norm(z, _vector(bn_weight, running_var.dtype), _vector(bn_bias, running_var.dtype),
                         running_mean.reshape(-1), running_var.reshape(-1), False, 0.0, eps, False)
    return _torch_act(u, activation, p0, p1)


def _conv_bn_eval_act2d_fake(input, weight, bias, running_mean, running_var, bn_weight, bn_bias, eps, stride,
                             padding, dilation, activation, p0, p1, allow_tf32):
    N, C_in, H, W, C_out, KH, KW, OH, OW = geometry(input, weight, stride, padding, dilation)
    check_bn_sizes(C_out, running_mean, running_var, bn_weight, bn_bias)
    return _empty_like_format(input, (N, C_out, OH, OW), input.dtype)


conv_bn_eval_act2d = define(
    "conv_bn_eval_act2d(Tensor input, Tensor weight, Tensor? bias, Tensor running_mean, Tensor running_var, "
    "Tensor? bn_weight, Tensor? bn_bias, float eps, int[] stride, int[] padding, int[] dilation, str activation, "
    "float p0, float p1, bool allow_tf32) -> Tensor",
    _conv_bn_eval_act2d_triton, _conv_bn_eval_act2d_composite, _conv_bn_eval_act2d_fake, OP,
)
"""act(batch_norm(conv(input, weight) + bias, running stats, eval)) in one kernel, BatchNorm applied in the
epilogue from the buffers as they are: inference (no autograd)."""


_EVAL_POOL_SCHEMA = (
    "conv_bn_eval_act_pool2d(Tensor input, Tensor weight, Tensor? bias, Tensor running_mean, Tensor running_var, "
    "Tensor? bn_weight, Tensor? bn_bias, float eps, int[] stride, int[] padding, int[] dilation, str activation, "
    "float p0, float p1, bool allow_tf32, int[] pool_kernel, int[] pool_stride, int[] pool_padding, "
    "bool pool_ceil_mode) -> Tensor"
)


def _conv_bn_eval_act_pool2d_triton(*args):
    *block, pk, ps, pp, ceil = args
    input, weight, bias, running_mean, running_var, bn_weight, bn_bias, eps, stride, padding, dilation, activation, \
        p0, p1, allow_tf32 = block
    pool = (tuple(pk), tuple(ps), tuple(pp), ceil)
    geo = geometry(input, weight, stride, padding, dilation)
    N, C_in, H, W, C_out, KH, KW, OH, OW = geo
    check_bn_sizes(C_out, running_mean, running_var, bn_weight, bn_bias)
    PH, PW = pool_output_size(OH, OW, pool)
    out = _empty_like_format(input, (N, C_out, PH, PW), input.dtype)
    weight, bias, running_mean, running_var, bn_weight, bn_bias = _dense(
        weight, bias, running_mean, running_var, bn_weight, bn_bias)
    _gemm_fwd(input, weight, bias, out, None, None, geo, stride, padding, dilation, activation, p0, p1, allow_tf32,
              stats=False, bn_eval=(running_mean, running_var, bn_weight, bn_bias, eps), pool=pool)
    return out


def _conv_bn_eval_act_pool2d_composite(*args):
    *block, pk, ps, pp, ceil = args
    return _MAX_POOL2D_VALUES(_conv_bn_eval_act2d_composite(*block), pk, ps, pp, [1, 1], ceil)  # dlkern's C++


def _conv_bn_eval_act_pool2d_fake(*args):
    *block, pk, ps, pp, ceil = args
    full = _conv_bn_eval_act2d_fake(*block)
    PH, PW = pool_output_size(full.shape[2], full.shape[3], (tuple(pk), tuple(ps), tuple(pp), ceil))
    return _empty_like_format(full, (full.shape[0], full.shape[1], PH, PW), full.dtype)


conv_bn_eval_act_pool2d = define(_EVAL_POOL_SCHEMA, _conv_bn_eval_act_pool2d_triton,
                                 _conv_bn_eval_act_pool2d_composite, _conv_bn_eval_act_pool2d_fake, OP)
"""Inference: conv + BatchNorm (eval) + activation + max pool in one kernel, writing only the pooled output."""


def _eval_setup_context(ctx, inputs, output):
    input, weight, bias, ctx.stride, ctx.padding, ctx.dilation, ctx.act, ctx.p0, ctx.p1, ctx.allow_tf32, _ = inputs
    _, z = output
    ctx.mark_non_differentiable(z)
    ctx.set_materialize_grads(False)
    ctx.has_bias = bias is not None
    ctx.save_for_backward(input, weight, z)


def _eval_backward(ctx, grad_out, _grad_z):
    if grad_out is None:
        return (None,) * 11
    input, weight, z = ctx.saved_tensors
    torch._check(z.numel() > 0, lambda: "dlkern::conv_bias_act2d: backward needs save_preact=True")
    need = ctx.needs_input_grad
    dx, dw, db, _, _ = _block_backward(
        conv_bn_act2d_backward, grad_out, input, weight, z, None, None, None, ctx.stride, ctx.padding, ctx.dilation, ctx.act, ctx.p0,
        ctx.p1, ctx.allow_tf32, need[0], need[1] or need[2],
    )
    return dx if need[0] else None, dw if need[1] else None, db if need[2] and ctx.has_bias else None, *([None] * 8)


torch.library.register_autograd("dlkern::conv_bias_act2d", _eval_backward, setup_context=_eval_setup_context,
                                lib=LIB)


# ---------------------------------------------------------------------------------------------- backward


def _backward_setup(input, weight, stats, bn_weight, bn_bias, stride, padding, dilation):
    """(geometry, BatchNorm?, affine?, empty, grad_gamma, grad_beta) of a backward call. Skipped gradients come
    back as empty tensors, each its own (``empty()``): an op's outputs may not alias each other."""
    geo = geometry(input, weight, stride, padding, dilation)
    bn, affine = stats is not None, bn_weight is not None and stats is not None
    check_bn_sizes(geo[4], bn_weight=bn_weight, bn_bias=bn_bias)

    def empty():
        return input.new_empty(0)

    return (geo, bn, affine, empty, *_bn_grads(bn_weight, bn_bias, affine, empty))


def _conv_bn_act2d_backward_composite(
        grad_out, input, weight, z, stats, bn_weight, bn_bias, stride, padding, dilation, activation,
        p0, p1, allow_tf32, input_grad, weight_grad):
    geo, bn, affine, empty, grad_gamma, grad_beta = _backward_setup(input, weight, stats, bn_weight, bn_bias, stride,
                                                                    padding, dilation)
    if bn:  # ATen's CPU kernels: the activation's backward on u, then BatchNorm's training backward
        sdtype, (mean, invstd) = stats.dtype, (stats[0], stats[1])
        zs = z.to(sdtype)
        gamma = _vector(bn_weight, sdtype) if affine else None
        g_u = grad_out.to(sdtype)
        if activation != "none":
            scale = invstd * gamma if affine else invstd  # u = z * scale + shift, per channel
            shift = (_vector(bn_bias, sdtype) if affine else 0.0) - mean * scale
            u = torch.addcmul(shift.view(-1, 1, 1), zs, scale.view(-1, 1, 1))
            g_u = _torch_act_vjp(u, g_u, activation, p0, p1)
        # eps only matters to its eval form: the training form reads the saved invstd
        gz, sum_gx, sum_g = torch.ops.aten.native_batch_norm_backward(
            g_u, zs, gamma, None, None, mean, invstd, True, 0.0, [True, affine, affine]
        )
        gz = gz.to(input.dtype)
        if affine:
            grad_gamma.copy_(sum_gx.view(grad_gamma.shape))
            grad_beta.copy_(sum_g.view(grad_beta.shape))
    else:
        gz = _torch_act_vjp(z, grad_out, activation, p0, p1)
    dx, dw = _torch_conv_backward(gz, input, weight, stride, padding, dilation, input_grad, weight_grad, empty)
    db = empty()
    if weight_grad:
        db_dtype = compute_dtype(weight.dtype)
        db = gz.new_zeros(gz.shape[1], dtype=db_dtype) if bn else gz.sum((0, 2, 3), dtype=db_dtype)
    return dx, dw, db, grad_gamma, grad_beta


def _conv_bn_act2d_backward_triton(
        grad_out, input, weight, z, stats, bn_weight, bn_bias, stride, padding, dilation, activation,
        p0, p1, allow_tf32, input_grad, weight_grad, pool=None):
    """``pool``: (pos, kernel_size, stride, padding) when grad_out is the gradient of the max-pooled output (a
    fused pool block): the reduction and dL/dz passes read it through the window positions pos."""
    geo, bn, affine, empty, grad_gamma, grad_beta = _backward_setup(input, weight, stats, bn_weight, bn_bias, stride,
                                                                    padding, dilation)
    N, C_in, H, W, C_out, KH, KW, OH, OW = geo
    weight, bn_weight, bn_bias = _dense(weight, bn_weight, bn_bias)
    device = input.device
    acc = _acc_dtype(input.dtype)
    sdtype = stats.dtype if bn else compute_dtype(input.dtype)
    M = N * OH * OW
    K = C_in * KH * KW
    p = (*_hi_lo(p0), *_hi_lo(p1))
    index_64 = _index_64(z)
    # dL/dz, computed once per element (g and z read twice in all: the reduction and this pass) for both GEMMs.
    block_c = _np2(C_out)
    rows = _rows_per_split(M, device, cdiv(C_out, block_c))
    splits = cdiv(M, rows)
    part = torch.empty(2 * splits * C_out, dtype=torch.float64, device=device) if bn else z
    gamma, beta = (bn_weight, bn_bias) if affine else (z, z)
    if pool is None:
        pool_args, pool_flags = (z, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0), dict(POOL=False, PKH=1, PKW=1)
    else:
        pos, (pkh, pkw), (psh, psw), (pph, ppw) = pool
        pool_args = (pos, *pos.stride(), pos.shape[2], pos.shape[3], psh, psw, pph, ppw)
        pool_flags = dict(POOL=True, PKH=pkh, PKW=pkw)
    # Reading through the pool's argmax takes registers: smaller tiles (16 rows: up to 72 registers a thread in
    # bn_act_bwd_reduce_kernel under Triton 3.6, < 50% occupancy; 8 rows: 40-48 under 3.6-3.8).
    rows_tile = 32 if pool is None else 8
    if bn:  # per split and channel: sum g_u and sum g_u*x_hat
        launch(
            kernels.bn_act_bwd_reduce_kernel, (splits, cdiv(C_out, block_c)),
            grad_out, z, stats, gamma, beta, part,
            M, C_out, OH, OW, rows, *grad_out.stride(), *z.stride(), *p, *pool_args,
            HAS_AFFINE=affine, ACT=activation, INDEX_64=index_64, **pool_flags,
            BLOCK_M=128 if INTERPRETING else rows_tile, BLOCK_C=block_c,
        )
    gz = torch.empty_like(z)
    launch(
        kernels.grad_z_kernel, (splits, cdiv(C_out, block_c)),
        grad_out, z, gz, stats if bn else z, gamma, beta, part, grad_gamma if affine else z,
        grad_beta if affine else z, M, C_out, OH, OW, rows, splits, *p, *grad_out.stride(), *z.stride(), *pool_args,
        BN=bn, HAS_AFFINE=affine, ACT=activation, ACC_DTYPE=acc, INDEX_64=index_64, **pool_flags,
        # the split sums 16 splits a step: 64 took 64-72 registers a thread under Triton 3.8 (16: 40-44)
        BLOCK_M=128 if INTERPRETING else rows_tile, BLOCK_S=4 if INTERPRETING else 16, BLOCK_C=block_c,
    )
    common = dict(PRECISION=_precision(input.dtype, allow_tf32), ACC_DTYPE=acc, DOT_FP32=_dot_fp32(input.dtype),
                  INDEX_64=_index_64(input, z))

    dx = empty()
    if input_grad:
        dx = torch.empty_like(input, memory_format=_memory_format(input))
        M_in = N * H * W
        kernel, blocks = _gemm(_conv_bwd_input, kernels.conv_bwd_input_kernel, _DGRAD_TILES, "BLOCK_N", M_in, C_in,
                               input.dtype, BLOCK_M=128, BLOCK_N=_np2(C_in), BLOCK_K=_np2(C_out * KH * KW))
        launch(
            kernel,
            lambda meta: (cdiv(M_in, meta["BLOCK_M"]), cdiv(C_in, meta["BLOCK_N"])),
            gz, weight, dx, N, C_in, H, W, C_out, OH, OW, *gz.stride(), *dx.stride(),
            M_in, stride[0], stride[1], padding[0], padding[2], dilation[0], dilation[1], next_power_of_2(M_in),
            KH=KH, KW=KW, **common, **blocks,
        )
    dw, db = empty(), empty()
    if weight_grad:
        rows = _rows_per_split(M, device, cdiv(C_out, 32) * cdiv(K, 64))
        splits = cdiv(M, rows)
        part = torch.empty(splits * (C_out * K + C_out), dtype=sdtype, device=device)
        kernel, blocks = _gemm(_conv_bwd_weight, kernels.conv_bwd_weight_kernel, _WGRAD_TILES, "BLOCK_CO", M, C_out,
                               input.dtype, BLOCK_M=128, BLOCK_CO=_np2(C_out), BLOCK_K=_np2(K))
        launch(
            kernel,
            lambda meta: (splits, cdiv(K, meta["BLOCK_K"]), cdiv(C_out, meta["BLOCK_CO"])),
            gz, input, part, N, C_in, H, W, C_out, OH, OW, *gz.stride(), *input.stride(),
            M, rows, stride[0], stride[1], padding[0], padding[2], dilation[0], dilation[1], next_power_of_2(M),
            KH=KH, KW=KW, BIAS_GRAD=not bn, **common, **blocks,
        )
        # in the compute dtype, as the sums are: autograd rounds them to a 16-bit parameter's dtype, once; a
        # folded BatchNorm's float32 parameters get them unrounded
        dw = torch.empty(weight.shape, dtype=compute_dtype(weight.dtype), device=device)
        db = torch.empty(C_out, dtype=compute_dtype(weight.dtype), device=device)
        block_l = 1024 if INTERPRETING else 512  # (16 x 1024 tiles took 78 registers a thread, or spilled)
        launch(
            kernels.sum_splits_kernel, (cdiv(C_out * K + C_out, block_l),),
            part, dw, db, splits, C_out * K + C_out, C_out * K, INDEX_64=_index_64(part),
            BLOCK_S=4, BLOCK_L=block_l,
        )
    return dx, dw, db, grad_gamma, grad_beta


def _conv_bn_act2d_backward_fake(grad_out, input, weight, z, stats, bn_weight, bn_bias, stride, padding, dilation,
                                 activation, p0, p1, allow_tf32, input_grad, weight_grad):
    affine = bn_weight is not None and stats is not None
    check_bn_sizes(weight.shape[0], bn_weight=bn_weight, bn_bias=bn_bias)
    dx = torch.empty_like(input, memory_format=suggest_memory_format(input)) if input_grad else input.new_empty(0)
    dw = weight.new_empty(weight.shape, dtype=compute_dtype(weight.dtype)) if weight_grad else input.new_empty(0)
    db = weight.new_empty(weight.shape[0], dtype=compute_dtype(weight.dtype)) if weight_grad else input.new_empty(0)
    return (dx, dw, db, *_bn_grads(bn_weight, bn_bias, affine, lambda: input.new_empty(0)))



conv_bn_act2d_backward = define(
    "conv_bn_act2d_backward(Tensor grad_out, Tensor input, Tensor weight, Tensor z, Tensor? stats, "
    "Tensor? bn_weight, Tensor? bn_bias, int[] stride, int[] padding, int[] dilation, str activation, float p0, "
    "float p1, bool allow_tf32, bool input_grad, bool weight_grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    _conv_bn_act2d_backward_triton, _conv_bn_act2d_backward_composite, _conv_bn_act2d_backward_fake, OP,
)
"""Gradients (input, conv weight, conv bias, BN weight, BN bias) of conv_bn_act2d (stats given) or
conv_bias_act2d (stats None). Skipped ones (input_grad/weight_grad False, no affine BN) come back empty."""


def _bn_grads(bn_weight, bn_bias, affine, empty):
    """Dense (contiguous) buffers for the BatchNorm weight and bias gradients, or empty ones without affine."""
    if not affine:
        return empty(), empty()
    return [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (bn_weight, bn_bias)]


# ---------------------------------------------------------------------------------------------- autograd and torch.func

_NO_DOUBLE_BACKWARD = (
    "dlkern.conv_bn_act2d: double backward (differentiating its gradients: create_graph=True, gradient "
    "penalties, Hessians, torch.func.hessian) is not supported; compute that part with torch.nn.functional"
)
_NO_FORWARD_AD = (
    "dlkern.conv_bn_act2d: forward-mode AD (torch.func.jvp, torch.func.jacfwd, torch.autograd.forward_ad) is not "
    "supported; use reverse mode (backward, torch.func.grad/vjp/jacrev)"
)


class _NoDoubleBackward(torch.autograd.Function):
    """Passes a block's gradients through (as copies) when autograd records the backward (create_graph=True,
    torch.func.grad): differentiating them again then raises a clear error, not a missing-formula one."""

    generate_vmap_rule = True

    @staticmethod
    def forward(num_grads, *tensors):  # the gradients, then the tensors they depend on
        return tuple(t.clone() for t in tensors[:num_grads])

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(_NO_DOUBLE_BACKWARD)

    @staticmethod
    def jvp(ctx, *tangents):
        raise RuntimeError(_NO_DOUBLE_BACKWARD)


def _block_backward(op, grad_out, input, weight, z, stats, bn_weight, bn_bias, *args):
    """A block's backward op (conv_bn_act2d_backward, conv_bn_act_pool2d_backward), which has no autograd formula
    of its own: when autograd records the backward (create_graph=True), its results go through
    _NoDoubleBackward, so that differentiating them raises instead of silently giving no gradient."""
    with torch.no_grad():
        grads = call_op(op, grad_out, input, weight, z, stats, bn_weight, bn_bias, *args)
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return grads
    sources = [t for t in (grad_out, input, weight, bn_weight, bn_bias) if t is not None and t.requires_grad]
    return _NoDoubleBackward.apply(len(grads), *grads, *sources) if sources else grads


def _block_functions(op, setup_context, backward):
    """(traced, eager) autograd.Functions around a fused op: one autograd node per block, in the setup_context
    form that torch.func.grad/vjp/jacrev accept. The eager one adds vmap (through the ops' own vmap rules) and
    a clear forward-mode AD error; torch.compile gets the other, as Dynamo graph-breaks on a Function with jvp."""

    class Traced(torch.autograd.Function):
        @staticmethod
        def forward(*args):
            return call_op(op, *args)

    Traced.setup_context = staticmethod(setup_context)
    Traced.backward = staticmethod(backward)

    class Eager(Traced):
        generate_vmap_rule = True

        @staticmethod
        def jvp(ctx, *tangents):
            raise NotImplementedError(_NO_FORWARD_AD)

    return Traced, Eager


_TRAIN = _block_functions(conv_bn_act2d, _train_setup_context, _train_backward)
_EVAL = _block_functions(conv_bias_act2d, _eval_setup_context, _eval_backward)
_train_apply = function_apply(_TRAIN[1], _TRAIN[0])
_eval_apply = function_apply(_EVAL[1], _EVAL[0])


def _train_autograd(*args):
    """The Autograd kernel of dlkern::conv_bn_act2d, for direct calls of the op: its Function when autograd is
    needed, else the op below autograd. (An op that writes its arguments cannot take register_autograd.)"""
    if needs_autograd(*args[:5]):
        return _train_apply(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return conv_bn_act2d(*args)


LIB.impl("conv_bn_act2d", _train_autograd, "Autograd")


def _vmap_by_loop(op):
    """A vmap rule: one call per vmapped slice (each is an independent call, so BatchNorm's batch statistics are
    per slice, as vmap means), the results stacked. A training call that updates running statistics is refused:
    one update per slice would not be BatchNorm's."""

    def rule(info, in_dims, *args):
        if op.__name__.startswith(("conv_bn_act2d.", "conv_bn_act_pool2d.")) and args[5] is not None:
            raise RuntimeError(
                "dlkern.conv_bn_act2d: torch.func.vmap over a training block cannot update BatchNorm's running "
                "statistics (one update per vmapped call); pass running_mean=running_var=None, or for modules call "
                "torch.func.replace_all_batch_norm_modules_ first"
            )

        def sliced(i):
            return [a.select(d, i) if isinstance(d, int) else a for a, d in zip(args, in_dims)]

        results = [op(*sliced(i)) for i in range(info.batch_size)]
        stacked = tuple(torch.stack(r) for r in zip(*results))
        return stacked, (0,) * len(stacked)

    return rule


for _op in (conv_bn_act2d, conv_bias_act2d, conv_bn_act2d_backward):
    torch.library.register_vmap(_op, _vmap_by_loop(_op))


# ---------------------------------------------------------------------------------------------- fused pool block


def pool_output_size(OH, OW, pool):
    """(PH, PW) of a max pool (kernel, stride, padding, ceil_mode) over an OH x OW map (dilation 1)."""
    (kh, kw), (sh, sw), (ph, pw), ceil_mode = pool
    return (_pooling_output_size(OH, kh, ph, sh, 1, ceil_mode), _pooling_output_size(OW, kw, pw, sw, 1, ceil_mode))


def _pool_of(pool_kernel, pool_stride, pool_padding, pool_ceil_mode):
    return tuple(pool_kernel), tuple(pool_stride), tuple(pool_padding), pool_ceil_mode


_POOL_SCHEMA = _TRAIN_SCHEMA.replace("conv_bn_act2d(", "conv_bn_act_pool2d(").replace(
    "bool allow_tf32) -> (Tensor, Tensor, Tensor)",
    "bool allow_tf32, int[] pool_kernel, int[] pool_stride, int[] pool_padding, bool pool_ceil_mode) "
    "-> (Tensor, Tensor, Tensor, Tensor)",
)


def _conv_bn_act_pool2d_triton(*args):
    *train, pk, ps, pp, ceil = args
    return _conv_bn_act2d_triton(*train, pool=_pool_of(pk, ps, pp, ceil))


def _window_starts(pooled_shape, stride, padding, device):
    """(rows, cols): the first row and column of each pooled element's window (in the padding when negative)."""
    rows = torch.arange(pooled_shape[2], device=device).view(-1, 1) * stride[0] - padding[0]
    cols = torch.arange(pooled_shape[3], device=device).view(1, -1) * stride[1] - padding[1]
    return rows, cols


def window_taps(indices, width, kernel_size, stride, padding):
    """The window tap (kh * kernel_size[1] + kw, in uint8) of each of max_pool2d's flat indices (h * width + w);
    window_indices inverts it. A window of one or two rows, no wider than the plane, is decoded by a compare:
    ATen's int64 division costs 4x as much."""
    (kh, kw), (rows, cols) = kernel_size, _window_starts(indices.shape, stride, padding, indices.device)
    if kh <= 2 and kw <= width:
        rel = indices - (rows * width + cols)  # row * width + column within the window, the column < width
        taps = rel if kh == 1 else torch.where(rel >= width, rel - (width - kw), rel)
    else:  # a window column may exceed the plane's width: by the element's own row and column
        taps = (indices // width - rows) * kw + (indices % width - cols)
    return taps.to(torch.uint8)


def window_indices(taps, width, kernel_size, stride, padding):
    """max_pool2d's flat indices (h * width + w, int64) from window taps: window_taps inverted."""
    rows, cols = _window_starts(taps.shape, stride, padding, taps.device)
    tap = torch.arange(kernel_size[0] * kernel_size[1], device=taps.device)
    offsets = tap // kernel_size[1] * width + tap % kernel_size[1]  # (kernel taps,): no division per element
    return offsets.take(taps.long()).add_(rows * width + cols)


def _conv_bn_act_pool2d_composite(*args):
    """ATen's kernels for the training block, then dlkern's C++ max pool, its indices turned into window taps."""
    *train, pk, ps, pp, ceil = args
    out, z, stats = _conv_bn_act2d_composite(*train)
    pooled, indices = _MAX_POOL2D(out, pk, ps, pp, [1, 1], ceil)
    return pooled, z, stats, window_taps(indices, out.shape[3], pk, ps, pp)


def _conv_bn_act_pool2d_fake(*args):
    *train, pk, ps, pp, ceil = args
    _, z, stats = _conv_bn_act2d_fake(*train)
    PH, PW = pool_output_size(z.shape[2], z.shape[3], _pool_of(pk, ps, pp, ceil))
    out = _empty_like_format(z, (z.shape[0], z.shape[1], PH, PW), z.dtype)
    return out, z, stats, torch.empty_like(out, dtype=torch.uint8)


conv_bn_act_pool2d = define(_POOL_SCHEMA, _conv_bn_act_pool2d_triton, _conv_bn_act_pool2d_composite,
                            _conv_bn_act_pool2d_fake, OP)
"""The training block with its max pool (windows that do not overlap) fused into the last pass: (pooled out, z,
stats, pos); pos holds each pooled element's window tap (kh*kw_size + kw) in one byte."""

_POOL_BACKWARD_SCHEMA = (
    "conv_bn_act_pool2d_backward(Tensor grad_out, Tensor input, Tensor weight, Tensor z, Tensor stats, "
    "Tensor? bn_weight, Tensor? bn_bias, Tensor pos, int[] stride, int[] padding, int[] dilation, str activation, "
    "float p0, float p1, bool allow_tf32, bool input_grad, bool weight_grad, int[] pool_kernel, int[] pool_stride, "
    "int[] pool_padding) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)


def _split_pool_backward(args):
    grad_out, input, weight, z, stats, bn_weight, bn_bias, pos, *rest = args
    *train, pk, ps, pp = rest
    return (grad_out, input, weight, z, stats, bn_weight, bn_bias, *train), (pos, tuple(pk), tuple(ps), tuple(pp))


def _conv_bn_act_pool2d_backward_triton(*args):
    train, pool = _split_pool_backward(args)
    return _conv_bn_act2d_backward_triton(*train, pool=pool)


def _conv_bn_act_pool2d_backward_composite(*args):
    """The pooled gradient scattered to the maxima (what max_pool2d's backward does), then the block's."""
    (grad_out, *train), (pos, pk, ps, pp) = _split_pool_backward(args)
    z = train[2]
    indices = window_indices(pos, z.shape[3], pk, ps, pp)
    full = torch.zeros(z.shape, dtype=grad_out.dtype, device=z.device)
    full.view(*z.shape[:2], -1).scatter_(2, indices.flatten(2), grad_out.flatten(2))
    return _conv_bn_act2d_backward_composite(full.contiguous(memory_format=_memory_format(z)), *train)


def _conv_bn_act_pool2d_backward_fake(*args):
    train, _ = _split_pool_backward(args)
    z = train[3]
    return _conv_bn_act2d_backward_fake(torch.empty_like(z), *train[1:])


conv_bn_act_pool2d_backward = define(_POOL_BACKWARD_SCHEMA, _conv_bn_act_pool2d_backward_triton,
                                     _conv_bn_act_pool2d_backward_composite, _conv_bn_act_pool2d_backward_fake, OP)


def _pool_setup_context(ctx, inputs, output):
    _train_setup_context(ctx, inputs, output)
    ctx.pool = tuple(inputs[17:20])


def _pool_backward(ctx, grad_out, _grad_z, _grad_stats, _grad_pos):
    if grad_out is None:
        return (None,) * 21
    input, weight, z, stats, bn_weight, bn_bias, pos = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, dw, db, dgamma, dbeta = _block_backward(
        conv_bn_act_pool2d_backward, grad_out, input, weight, z, stats, bn_weight, bn_bias, pos, ctx.stride,
        ctx.padding, ctx.dilation, ctx.act, ctx.p0, ctx.p1, ctx.allow_tf32, need[0], need[1] or need[2], *ctx.pool,
    )
    return (
        dx if need[0] else None, dw if need[1] else None, db if need[2] and ctx.has_bias else None,
        dgamma if need[3] else None, dbeta if need[4] else None, *([None] * 16),
    )


_POOL = _block_functions(conv_bn_act_pool2d, _pool_setup_context, _pool_backward)
_pool_apply = function_apply(_POOL[1], _POOL[0])
for _op in (conv_bn_act_pool2d, conv_bn_act_pool2d_backward, conv_bn_eval_act_pool2d):
    torch.library.register_vmap(_op, _vmap_by_loop(_op))


def _pool_autograd(*args):
    """The Autograd kernel of dlkern::conv_bn_act_pool2d (as _train_autograd)."""
    if needs_autograd(*args[:5]):
        return _pool_apply(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return conv_bn_act_pool2d(*args)


LIB.impl("conv_bn_act_pool2d", _pool_autograd, "Autograd")


# ---------------------------------------------------------------------------------------------- entry point


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

    def vector(t):  # BatchNorm takes any shape of C elements
        return t.to(dtype).reshape(-1)

    scale = torch.rsqrt(vector(running_var) + eps)
    if bn_weight is not None:
        scale = scale * vector(bn_weight)
    shift = -vector(running_mean) if bias is None else bias.to(dtype) - vector(running_mean)
    shift = shift * scale
    if bn_bias is not None:
        shift = shift + vector(bn_bias)
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
        _check(all(d == torch.float32 for d in dtypes),
               "mixed dtype (CPU): expect parameter to have scalar type of Float")
        _check(dtype in (torch.float16, torch.bfloat16), "mixed dtype (CPU): all inputs must share same datatype.")
    for d in dtypes:
        expected, found = SCALAR_NAMES.get(dtypes[0]), SCALAR_NAMES.get(d)
        _check(d == dtypes[0], f"expected scalar type {expected} but found {found}")


def _empty_batch(input, weight, bias, bn_weight, bn_bias, stride, padding, dilation):
    """Training on an empty batch: an empty output whose parameters get zero gradients, as PyTorch's (its
    BatchNorm returns early and leaves the running statistics alone)."""
    z = _torch_conv(input, weight, bias, stride, padding, dilation)
    if bn_weight is not None:
        z = z * _vector(bn_weight, z.dtype).view(-1, 1, 1) + _vector(bn_bias, z.dtype).view(-1, 1, 1)
    return z


def pool_fusable(kernel_size, stride, dilation):
    """Whether a max pool (kernel_size, stride, dilation as pairs) fuses into the block's training pass: windows
    that do not overlap (stride >= kernel), dilation 1, at most 256 taps (the position is one byte)."""
    return (all(s >= k for s, k in zip(stride, kernel_size)) and all(d == 1 for d in dilation)
            and kernel_size[0] * kernel_size[1] <= 256)


def forward(input, weight, bias, running_mean, running_var, bn_weight, bn_bias, num_batches_tracked, training,
            momentum, eps, stride, padding, dilation, activation, activation_params=(), pool=None):
    """The fused block: autocast, checks, then the training op (+ running update), or in eval the inference op
    (BatchNorm in the conv's epilogue) or, when autograd is needed, the folded op.

    ``pool`` (kernel, stride, padding, ceil_mode as pairs and a bool; pool_fusable): the max pool that follows,
    fused: in training returns (pooled out, window taps); in inference (eval without autograd) (pooled out, None),
    one kernel; None where it is not fused (eval with autograd, an empty batch, > 64 taps in inference): the
    caller pools the block's output then."""
    stride, padding, dilation, activation, p0, p1 = _block_args(stride, padding, dilation, activation,
                                                                activation_params)
    conv_weight, conv_bias = weight, bias  # eval folds these, not autocast's 16-bit copies
    input, weight, bias = _autocast(input, weight, bias)
    count, z_shape, padding = _check_input(input, weight, bias, stride, padding, dilation)
    channels = weight.shape[0]
    _check_batch_norm(input.dtype, z_shape, training, eps, running_mean, running_var, bn_weight, bn_bias)
    allow_tf32 = torch.backends.cudnn.allow_tf32
    if training:
        if (bn_weight is None) != (bn_bias is None):  # BatchNorm2d(bias=False), or F.batch_norm with one of them
            given = bn_weight if bn_weight is not None else bn_bias
            filler = torch.ones if bn_bias is not None else torch.zeros
            missing = filler(channels, dtype=given.dtype, device=given.device)
            bn_weight, bn_bias = (missing, bn_bias) if bn_weight is None else (bn_weight, missing)
        track = running_mean is not None and running_var is not None
        if track and momentum is None and num_batches_tracked is None:
            raise ValueError("conv_bn_act2d(): momentum=None (cumulative average) needs num_batches_tracked")
        if pool is not None and count == 0:
            return None
        if count == 0:
            if track and num_batches_tracked is not None:
                num_batches_tracked.add_(1)
            return _empty_batch(input, weight, bias, bn_weight, bn_bias, stride, padding, dilation)
        running = (running_mean, running_var, num_batches_tracked) if track else (None, None, None)
        args = (input, weight, bias, bn_weight, bn_bias, *running, momentum, eps, stride, padding, dilation,
                activation, p0, p1, allow_tf32)
        if pool is not None:
            args += (list(pool[0]), list(pool[1]), list(pool[2]), bool(pool[3]))
            autograd = needs_autograd(input, weight, bias, bn_weight, bn_bias)
            out, _, _, pos = _pool_apply(*args) if autograd else call_op(conv_bn_act_pool2d, *args)
            return out, pos
        if needs_autograd(input, weight, bias, bn_weight, bn_bias):
            return _train_apply(*args)[0]
        return call_op(conv_bn_act2d, *args)[0]
    if not needs_autograd(input, conv_weight, conv_bias, running_mean, running_var, bn_weight, bn_bias):
        if pool is not None:
            if pool[0][0] * pool[0][1] > 64:  # more taps than the smallest row tile
                return None
            return call_op(conv_bn_eval_act_pool2d, input, weight, bias, running_mean, running_var, bn_weight, bn_bias,
                           eps, stride, padding, dilation, activation, p0, p1, allow_tf32, list(pool[0]),
                           list(pool[1]), list(pool[2]), bool(pool[3])), None
        return call_op(conv_bn_eval_act2d, input, weight, bias, running_mean, running_var,
                       bn_weight, bn_bias, eps, stride, padding, dilation, activation, p0, p1, allow_tf32)
    if pool is not None:  # eval with autograd: not fused
        return None
    # Autograd needed: BatchNorm folded into the conv with differentiable ops (frozen-BatchNorm fine-tuning).
    w, b = fold_bn(conv_weight, conv_bias, running_mean, running_var, bn_weight, bn_bias, eps)
    w, b = w.to(input.dtype), b.to(input.dtype)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (input, w, b))  # keeps z for the backward
    out, _ = _eval_apply(input, w, b, stride, padding, dilation, activation, p0, p1, allow_tf32, needs_grad)
    return out
