"""The fused conv block's tile provider: every tile the launchers use, in one place.

- The GEMMs' tiles (forward, input gradient, weight gradient): the offered tables, the heuristic's fixed tile
  (DLKERN_AUTOTUNE=0, the default) or Triton's autotuner over the tables (DLKERN_AUTOTUNE=1), and the small
  fixed tiles of Triton's interpreter.
- The elementwise and reduction passes' block sizes, and how many splits the split reductions use.
- The launch-time constants derived from the dtype: accumulator, dot precision, 64-bit offsets, float arguments
  as hi + lo parts.

Every choice that differs between Triton's interpreter (programs run one by one: few, large ones) and a GPU is
made here. Only tiles that fit an H200 SM are offered: tests/gpu_compile_check.py compiles each for sm_90 at the
MnistCNN's shapes under every supported Triton (3.6, 3.7, 3.8) and requires no register spills and >= 25%
theoretical occupancy (<= 128 registers a thread) in every dtype it is offered for.
"""

import functools
import struct

import torch
import triton
import triton.language as tl

from dlkern import _env
from dlkern.kernels import conv_bn as kernels
from dlkern.ops.triton_support import INTERPRETING, cdiv, next_power_of_2, sm_count

# (BLOCK_M, BLOCK_N or BLOCK_CO, BLOCK_K, num_warps, num_stages, 16-bit dtypes only). Wider BLOCK_K needs more
# registers for its gathered addresses than the floor allows, except in 16 bits at 8 warps -- and BLOCK_K = 64
# not even there in the forward and input gradient (64x32x64, 8 warps: 128 registers under Triton 3.7.1; 135
# (fp16) and 144 (bf16) under 3.8). With the pooling epilogue, fewer still (pool_tile). The weight gradient's MMA
# is (BLOCK_K x BLOCK_M) @ (BLOCK_M x BLOCK_CO): its BLOCK_K is the MMA's M, >= 64 for wgmma.
FWD_TILES = [(64, 32, 16, 4, 3, False), (64, 32, 16, 4, 4, False), (64, 32, 16, 8, 3, False),
             (128, 32, 16, 8, 3, False), (64, 32, 32, 8, 3, True)]
DGRAD_TILES = [(64, 32, 16, 4, 3, False), (64, 32, 16, 4, 4, True), (64, 32, 16, 8, 3, False),
               (128, 32, 16, 8, 3, False), (64, 32, 32, 8, 3, False)]
WGRAD_TILES = [(32, 32, 64, 8, 3, False), (32, 32, 128, 8, 3, True), (64, 32, 64, 8, 3, True)]
# DLKERN_AUTOTUNE=1: Triton's autotuner over those tiles, keyed on M rounded up to a power of two (an epoch's
# ragged last batch reuses the tuned tiles) and cached on disk across processes. Default (0): one fixed tile per
# shape from the heuristic, no benchmarking -- a first run compiles one variant per kernel and shape instead of
# all of them (tests/gpu_compile_check.py's cold start), and what runs does not depend on timing noise.
AUTOTUNE = _env.flag("DLKERN_AUTOTUNE")  # 0/1, true/false, yes/no, on/off (any case); anything else raises
_HALF_ONLY = set()  # ids of the autotuner configs offered for 16-bit dtypes only

# Tensors from this many elements get 64-bit offsets: a margin below int32's 2^31 for the offsets that masked
# lanes compute past a tensor's end. (A test lowers it to run the 64-bit code on small tensors.)
INDEX_64_ELEMENTS = 1 << 30

# The statistics merge: up to this many tiles merge in one pass (one program per channel block); more are first
# merged in parallel groups of this many (a fourth launch at large batches: 8192 MNIST images at 64-row tiles).
MERGE_TILES = 4 if INTERPRETING else 1024
MERGE_BLOCK_T = 4 if INTERPRETING else 32
# Elements a program of the normalize + activation pass: 1024 on a GPU; with the pooling epilogue 256 pooled
# elements (2 a thread: 48-56 registers under Triton 3.6-3.8; 512 took up to 72, < 50% occupancy).
NORMALIZE_BLOCK = 4096 if INTERPRETING else 1024
NORMALIZE_POOL_BLOCK = 256
SUM_SPLITS_BLOCK = 1024 if INTERPRETING else 512  # (16 x 1024 tiles took 78 registers a thread, or spilled)


def backward_rows(pooled, block_c, residual=False):
    """Row tile of the backward's reduction and dL/dz passes (BLOCK_C channels wide): 256 elements a tile, 8 rows
    at least (under Triton 3.7.1, sm_90: 32 x 64 took 94-157 registers a thread in bn_act_bwd_reduce_kernel, more
    with GELU and in bf16, and 16 x 32 68 in grad_z_kernel (bf16): < 50% occupancy). Reading through the pool's
    argmax takes registers too: 8 rows (16: up to 72 registers a thread under Triton 3.6; 8: 40-48 under
    3.6-3.8). A residual read too: half the rows (8 x 64 with RESIDUAL took 43.8% occupancy in fp32 and 37.5% in
    bf16 under Triton 3.6)."""
    if INTERPRETING:
        return 128
    rows = 8 if pooled else max(8, 256 // block_c)
    return max(4, rows // 2) if residual else rows


# grad_z's split sums take 16 splits a step (64 took 64-72 registers a thread under Triton 3.8; 16: 40-44)
GRAD_Z_BLOCK_S = 4 if INTERPRETING else 16


def rows_per_split(M, device, programs_per_split):
    """Rows per program of the split reductions: enough splits to fill the GPU several times over; in the
    interpreter few (it runs programs one by one), though more than one, so the merge is exercised."""
    if INTERPRETING or device.type != "cuda":
        return 512
    splits = max(1, 4 * sm_count(device) // programs_per_split)
    return max(128, cdiv(cdiv(M, splits), 128) * 128)


# ---------------------------------------------------------------------------------------------- the GEMMs' tiles


def pool_tile(block_m, block_k, warps, wide):
    """Whether a forward tile is offered with the pooling epilogue, whose window reduction needs registers:
    BLOCK_K <= 32, 8 warps, 64 rows in 32 bits. (4 warps: 107-113 registers in 16 bits under Triton 3.7.1 and
    3.8, 132-140 in fp32 under 3.8, < 25%; 64x32x16 at 8 warps: 47-70 under 3.6-3.8.)"""
    return block_k <= 32 and warps == 8 and not (wide and block_m > 64)


def np2(n, lo=16, hi=64):
    return max(lo, min(hi, next_power_of_2(int(n))))


def _pruner(n_name, n_dim, k_dims, tensor):
    """Drops configs whose tiles are wider than the problem (e.g. BLOCK_K=64 for the K = 9 first layer) and the
    16-bit-only ones for other dtypes."""

    def prune(configs, named_args, **kwargs):
        k = named_args[k_dims] * kwargs["KH"] * kwargs["KW"]
        n = named_args[n_dim]
        wide = named_args[tensor].element_size() > 2
        allowed = [c for c in configs if not (wide and id(c) in _HALF_ONLY)]
        if kwargs.get("POOL"):
            allowed = [c for c in allowed if pool_tile(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"], c.num_warps, wide)]
        kept = [c for c in allowed if c.kwargs["BLOCK_K"] <= np2(k, hi=128) and c.kwargs[n_name] <= np2(n, hi=128)]
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
                   ["m_bucket", "C_in", "C_out", "OH", "OW", "KH", "KW"], FWD_TILES)
_conv_bwd_input = _tuned(kernels.conv_bwd_input_kernel, "BLOCK_N", "C_in", "C_out", "gz_ptr",
                         ["m_bucket", "C_in", "C_out", "OH", "OW", "KH", "KW"], DGRAD_TILES)
_conv_bwd_weight = _tuned(kernels.conv_bwd_weight_kernel, "BLOCK_CO", "C_out", "C_in", "gz_ptr",
                          ["m_bucket", "C_in", "C_out", "KH", "KW"], WGRAD_TILES)
_heuristic_tiles = {}


def _heuristic(tiles, n_name, M, N, dtype, pool=False):
    """The fixed tile for a shape (DLKERN_AUTOTUNE=0): from the offered ones, 128-row tiles once M fills an H200
    several times over (>= 2^17 rows), else 64; BLOCK_N/BLOCK_CO the narrowest that covers N (32 for the MnistCNN),
    the smallest BLOCK_K, 4 warps when offered (with the pooling epilogue, the tiles pool_tile allows: 64 rows,
    8 warps). Computed once per (tiles, large M, N, dtype, pool): a few µs a call."""
    key = (id(tiles), n_name, M >= 1 << 17, N, dtype, pool)
    blocks = _heuristic_tiles.get(key)
    if blocks is None:
        blocks = _heuristic_tiles[key] = _pick_tile(tiles, n_name, M >= 1 << 17, dtype, pool)
    return blocks


def _pick_tile(tiles, n_name, large, dtype, pool):
    wide = dtype.itemsize > 2
    offered = [t for t in tiles if not (wide and t[5]) and (not pool or pool_tile(t[0], t[2], t[3], wide))]
    bm = 128 if large and any(t[0] == 128 for t in offered) else min(t[0] for t in offered)
    fits = [t for t in offered if t[0] == bm] or offered
    bm, bn, bk, w, s, _ = min(fits, key=lambda t: (t[2], -t[3] if bm == 128 else t[3], t[4]))
    return {"BLOCK_M": bm, n_name: bn, "BLOCK_K": bk, "num_warps": w, "num_stages": s}


def _gemm(tuned, plain, tiles, n_name, M, N, dtype, pool=False, **interpreter_blocks):
    """(kernel, launch keywords): the interpreter's small fixed tiles, the autotuner, or the heuristic's fixed
    tile (64 rows with a pooling epilogue)."""
    if INTERPRETING:
        return plain, interpreter_blocks
    if AUTOTUNE:
        return tuned, {}
    return plain, _heuristic(tiles, n_name, 0 if pool else M, N, dtype, pool)


def forward_gemm(M, C_out, K, dtype, stats, pool):
    """conv_fwd_kernel and its launch keywords. The interpreter takes 32-row tiles in training (several
    statistics partials to merge), else 128."""
    return _gemm(_conv_fwd, kernels.conv_fwd_kernel, FWD_TILES, "BLOCK_N", M, C_out, dtype, pool=pool,
                 BLOCK_M=32 if stats else 128, BLOCK_N=np2(C_out), BLOCK_K=np2(K))


def input_grad_gemm(M_in, C_in, K, dtype):
    """conv_bwd_input_kernel and its launch keywords."""
    return _gemm(_conv_bwd_input, kernels.conv_bwd_input_kernel, DGRAD_TILES, "BLOCK_N", M_in, C_in, dtype,
                 BLOCK_M=128, BLOCK_N=np2(C_in), BLOCK_K=np2(K))


def weight_grad_gemm(M, C_out, K, dtype):
    """conv_bwd_weight_kernel and its launch keywords."""
    return _gemm(_conv_bwd_weight, kernels.conv_bwd_weight_kernel, WGRAD_TILES, "BLOCK_CO", M, C_out, dtype,
                 BLOCK_M=128, BLOCK_CO=np2(C_out), BLOCK_K=np2(K))


# ---------------------------------------------------------------------------------------------- launch constants


@functools.lru_cache(maxsize=1024)  # a block's parameters repeat call after call: pack each once
def hi_lo(x):
    """x as float32 hi + lo (kernels rebuild it with ``_scalar``): Triton passes Python floats as float32."""
    hi = struct.unpack("f", struct.pack("f", x))[0]
    return hi, struct.unpack("f", struct.pack("f", x - hi))[0]


def acc_dtype(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def precision(dtype, allow_tf32):
    # tl.dot's TF32 exactly when PyTorch's cuDNN conv would use it; float64 dots are always IEEE.
    return "tf32" if allow_tf32 and dtype == torch.float32 else "ieee"


def dot_fp32(dtype):
    # Triton's interpreter multiplies 16-bit tl.dot operands as raw bits: upcast them there (not on the GPU).
    return INTERPRETING and dtype in (torch.float16, torch.bfloat16)


def index_64(*tensors):
    """Whether a kernel needs 64-bit offsets (its INDEX_64): some tensor of >= INDEX_64_ELEMENTS elements."""
    return any(t is not None and t.numel() >= INDEX_64_ELEMENTS for t in tensors)


def gemm_constants(dtype, allow_tf32, *tensors):
    """The GEMM kernels' dtype-derived constexprs."""
    return dict(PRECISION=precision(dtype, allow_tf32), ACC_DTYPE=acc_dtype(dtype), DOT_FP32=dot_fp32(dtype),
                INDEX_64=index_64(*tensors))
