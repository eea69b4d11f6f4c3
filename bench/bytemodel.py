"""The byte model: what one MnistCNN training step (fp32) must move through an H200's DRAM, kernel by kernel, for
dlkern and for eager PyTorch. A model, counted from each kernel's loads and stores, not a measurement.

Each kernel is one row of a table (``Kernel``): the bytes it reads and writes, as expressions over the sizes of
one conv block (or of the head, or of the parameters), and the FLOPs it does. The sizes come from the stock
model's shapes (run on the meta device at each batch), so the tables say only which tensors a kernel touches.
Counted: the compulsory traffic, each tensor a kernel reads or writes once. Not counted: what a kernel re-reads
through the caches (the GEMMs gather their operand once per tap; noted per kernel), layout transforms or
workspaces cuDNN may add, L2 hits between kernels. The roofline time of a kernel is
max(bytes / 4.3 TB/s, FLOPs / peak); a step's is their sum, and "+ launches" adds 3 us a launch (outside a
CUDA graph).

Update the tables when a kernel changes: DLKERN_FWD / DLKERN_BWD follow kernels/conv_bn.py and
dlkern/ops/conv_bn.py as they launch them; EAGER_FWD / EAGER_BWD are ATen's CUDA kernels for the same ops.

bench/bytemodel_resnet.py counts ResNet-18's training step the same way, with these rows and namespaces.

    python bench/bytemodel.py [--batches 64,1024,8192] [--no-tf32]
"""

import argparse
import functools
from dataclasses import dataclass

import torch
from torch import nn

BANDWIDTH = 4.3e12  # bytes/s: an H200's measured device-to-device copy
PEAKS = {"bf16": 990e12, "tf32": 495e12, "fp32": 67e12}  # FLOP/s, dense (datasheet)
LAUNCH_S = 3e-6  # per kernel launch outside a CUDA graph
BATCHES = (64, 1024, 8192)
TARGET_BATCH = 8192
E = 4  # bytes per element: fp32
INDEX = 8  # bytes per max-pool index: int64, as ATen's
SMS = 132  # an H200's streaming multiprocessors (sets dlkern's split counts)
STATS_TILE_M = 64  # conv_fwd_kernel's BLOCK_M (autotuned, 64 or 128: the smaller, more partials)
MERGE_TILES = 1024  # dlkern/ops/conv_bn.py's _MERGE_TILES on a GPU: more partials get a first merge level


@dataclass(frozen=True)
class Kernel:
    """One kernel of a step. ``reads``, ``writes`` (bytes) and ``flops`` are Python expressions over a size
    namespace (see ``block_sizes``, ``head_sizes``, ``optimizer_sizes``): lower-case names are tensors in bytes,
    upper-case ones counts. ``peak``: the ceiling its FLOPs run at: ``gemm`` (a conv GEMM: TF32's when TF32 is
    allowed, else plain fp32's) or ``fp32`` (the CUDA cores). ``when``: an expression; the kernel runs only
    where it is true."""

    name: str
    reads: str
    writes: str
    flops: str = "0"
    peak: str = "fp32"
    launches: int = 1
    when: str = "True"
    note: str = ""


# --------------------------------------------------------------------------------------------- conv blocks
# A block: conv 3x3 -> BatchNorm -> ReLU -> max pool 2x2. x: its input, z: the conv output (and everything of
# z's size: out, g, gz), pooled/gp: the pooled output and its gradient, idx: the pool's int64 indices, w: the
# conv weight, vec: one per-channel vector (bias, gamma, mean, ...).

# BatchNorm's statistics merge (dlkern) and its forward kernels after the conv (eager), shared with
# bench/bytemodel_resnet.py, as are the weight gradient's kernels and the loss's.
STATS_MERGE = (
    Kernel("bn_stats_finalize_kernel (first level)", "fwd_part", "merged_part", "10*TILES*C",
           when="TILES > MERGE_TILES", note="merges groups of 1024 partials, in parallel"),
    Kernel("bn_stats_finalize_kernel", "final_part + 2*vec + 8", "3*vec + 2*vec", "10*FINAL_TILES*C",
           note="writes stats (mean, invstd, var), updates running mean and var"),
)
DLKERN_WGRAD = (
    Kernel("conv_bwd_weight_kernel", "gz + x", "wgrad_part if W_SPLITS > 1 else dw + vec", "2*M*C*K", "gemm",
           note="one split writes dW and d(bias) directly; not counted: x re-read per tap through the cache"),
    Kernel("sum_splits_kernel", "wgrad_part", "dw + vec", "wgrad_part // 4", when="W_SPLITS > 1"),
)
EAGER_BN_FWD = (
    Kernel("num_batches_tracked add_", "8", "8"),
    Kernel("BN statistics", "z", "2*vec", "3*Z"),
    Kernel("BN running update + invstd", "4*vec", "3*vec", "10*C"),
    Kernel("BN normalize", "z + 4*vec", "out", "2*Z"),
)
DLKERN_FWD = (
    Kernel("conv_fwd_kernel", "x + w + vec", "z + fwd_part", "2*M*C*K", "gemm",
           note="not counted: x re-read per tap (KH*KW) through the cache"),
    *STATS_MERGE,
    Kernel("bn_act_pool_fwd_kernel", "z + 4*vec + 8", "pooled + pos + 8", "4*Z + P",
           note="normalize + activation + max pool (ConvBNActPool2d): the full-resolution activation is never "
                "written; the argmax is one byte per pooled element"),
)
DLKERN_BWD = (
    Kernel("bn_act_bwd_reduce_kernel", "gp + pos + z + 4*vec", "bwd_part", "8*Z",
           note="reads the pooled gradient through the argmax bytes; not counted: their re-reads per tap (cache)"),
    Kernel("grad_z_kernel", "bwd_part + gp + pos + z + 4*vec", "gz + 2*vec", "10*Z",
           note="not counted: every program re-reads all splits' partials (L2)"),
    Kernel("conv_bwd_input_kernel", "gz + w", "dx", "2*M_IN*C_IN*C*KH*KW", "gemm", when="not first",
           note="not counted: gz re-read per tap through the cache"),
    *DLKERN_WGRAD,
)

EAGER_FWD = (
    Kernel("cuDNN conv fwd", "x + w", "z", "2*M*C*K", "gemm"),
    Kernel("conv bias add_", "z + vec", "z", "Z"),
    *EAGER_BN_FWD,
    Kernel("ReLU", "out", "out", "Z"),
    Kernel("max_pool2d_with_indices", "out", "pooled + idx", "3*P"),
)
EAGER_BWD = (
    Kernel("max pool bwd: zero_ grad_input", "0", "g"),
    Kernel("max_pool2d_with_indices_backward", "gp + idx", "g"),
    Kernel("ReLU bwd (threshold_backward)", "g + out", "g", "Z"),
    Kernel("BN backward (reduce + elementwise)", "2*(g + z) + 4*vec", "gz + 2*vec", "12*Z",
           note="one fused NCHW kernel; its 2nd pass over grad and input counted (a channel outgrows L2)"),
    Kernel("conv bias grad (sum)", "gz", "vec", "Z"),
    Kernel("cuDNN conv dgrad", "gz + w", "dx", "2*M_IN*C_IN*C*KH*KW", "gemm", when="not first"),
    Kernel("cuDNN conv wgrad", "gz + x", "dw", "2*M*C*K", "gemm"),
)

# --------------------------------------------------------------------------------------------- head, loss, Adam
# The same ATen kernels on both sides but the head's ReLU (dlkern's activation kernels in the dlkern model).
# flat: the flattened pool output (B x IN), h: the hidden layer (B x HID), logits (B x OUT), tgt: int64 targets.
# cuBLAS matmuls run in plain fp32: torch.backends.cuda.matmul.allow_tf32 is False by default.


# cross-entropy over the logits (B x OUT), forward and backward
LOSS_FWD = (
    Kernel("log_softmax", "logits", "logits", "4*B*OUT"),
    Kernel("nll_loss fwd", "B*E + tgt", "2*E", "B"),
)
LOSS_BWD = (
    Kernel("ones_like (the loss's seed)", "0", "E"),
    Kernel("nll_loss bwd", "E + tgt", "logits"),
    Kernel("log_softmax bwd", "2*logits", "logits", "3*B*OUT"),
)


def _head(relu):
    fwd = (
        Kernel("addmm (Linear 1)", "flat + w1 + b1", "h", "2*B*IN*HID"),
        Kernel(f"{relu} fwd", "h", "h", "B*HID"),
        Kernel("addmm (Linear 2)", "h + w2 + b2", "logits", "2*B*HID*OUT"),
        *LOSS_FWD,
    )
    bwd = (
        *LOSS_BWD,
        Kernel("mm (Linear 2 grad input)", "logits + w2", "h", "2*B*HID*OUT"),
        Kernel("mm (Linear 2 grad weight)", "logits + h", "w2", "2*B*HID*OUT"),
        Kernel("sum (Linear 2 grad bias)", "logits", "b2", "B*OUT"),
        Kernel(f"{relu} bwd", "2*h", "h", "B*HID"),
        Kernel("mm (Linear 1 grad input)", "h + w1", "flat", "2*B*IN*HID"),
        Kernel("mm (Linear 1 grad weight)", "h + flat", "w1", "2*B*IN*HID"),
        Kernel("sum (Linear 1 grad bias)", "h", "b1", "B*HID"),
    )
    return fwd, bwd


# torch.optim.Adam(foreach=True): one launch per foreach op over all parameters (params: all of them, in bytes);
# the step counters stay on the host.
ADAM = (
    Kernel("Adam _foreach_lerp_ (exp_avg)", "2*params", "params", "3*PARAMS"),
    Kernel("Adam _foreach_mul_ (exp_avg_sq)", "params", "params", "PARAMS"),
    Kernel("Adam _foreach_addcmul_ (exp_avg_sq)", "2*params", "params", "2*PARAMS"),
    Kernel("Adam _foreach_sqrt", "params", "params", "PARAMS"),
    Kernel("Adam _foreach_div_", "params", "params", "PARAMS"),
    Kernel("Adam _foreach_add_ (eps)", "params", "params", "PARAMS"),
    Kernel("Adam _foreach_addcdiv_ (update)", "3*params", "params", "2*PARAMS"),
)


# --------------------------------------------------------------------------------------------- sizes


def _cdiv(a, b):
    return -(-a // b)


def rows_per_split(M, programs_per_split, sms=SMS):
    """dlkern/ops/conv_bn.py's _rows_per_split on a GPU with ``sms`` SMs (tests check the two agree)."""
    splits = max(1, 4 * sms // programs_per_split)
    return max(128, _cdiv(_cdiv(M, splits), 128) * 128)


def stats_rows(M):
    """Rows per statistics partial (mean, M2) of conv_fwd_kernel in training: one partial per BLOCK_M row tile."""
    return STATS_TILE_M


@functools.lru_cache(maxsize=None)
def model_shapes(batch):
    """The stock MnistCNN's shapes at ``batch``, from a forward on the meta device: per block (conv, its input
    shape, conv output shape, pooled shape), the Linear layers, and the parameter count."""
    from dlkern.models import MnistCNN

    with torch.device("meta"):  # no storage, no random draws: the caller's RNG state is left alone
        model = MnistCNN(backend="torch").train()
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append((m, tuple(i[0].shape), tuple(o.shape))))
             for m in model.modules() if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.Linear))]
    model(torch.empty(batch, 1, 28, 28, device="meta"))
    for h in hooks:
        h.remove()
    convs = [s for s in seen if isinstance(s[0], nn.Conv2d)]
    pools = [s for s in seen if isinstance(s[0], nn.MaxPool2d)]
    blocks = [dict(kernel=conv.kernel_size, x=x, z=z, pooled=p) for (conv, x, z), (_, _, p) in zip(convs, pools)]
    linears = [(m.in_features, m.out_features) for m, _, _ in seen if isinstance(m, nn.Linear)]
    return blocks, linears, sum(p.numel() for p in model.parameters())


def block_sizes(block, first):
    """The namespace of one conv block's tables (bytes lower-case, counts upper-case)."""
    (N, C_IN, H, W), (_, C, OH, OW), (_, _, PH, PW) = block["x"], block["z"], block["pooled"]
    KH, KW = block["kernel"]
    M, K, Z, P = N * OH * OW, C_IN * KH * KW, N * C * OH * OW, N * C * PH * PW
    s = dict(N=N, C_IN=C_IN, H=H, W=W, C=C, OH=OH, OW=OW, KH=KH, KW=KW, M=M, M_IN=N * H * W, K=K, Z=Z, P=P,
             first=first, E=E)
    s.update(x=N * C_IN * H * W * E, w=C * K * E, vec=C * E, z=Z * E, pooled=P * E, idx=P * INDEX, pos=P)
    s.update(out=s["z"], g=s["z"], gz=s["z"], gp=s["pooled"], dx=s["x"], dw=s["w"])
    # dlkern's partial buffers, as dlkern/ops/conv_bn.py sizes them on an H200
    s["TILES"] = _cdiv(M, stats_rows(M))
    s["fwd_part"] = 2 * s["TILES"] * C * E  # (mean, M2) per partial and channel, fp32
    s["MERGE_TILES"] = MERGE_TILES
    s["merged_part"] = 2 * _cdiv(s["TILES"], MERGE_TILES) * C * E  # the first merge level's output
    grouped = s["TILES"] > MERGE_TILES
    s["final_part"] = s["merged_part"] if grouped else s["fwd_part"]
    s["FINAL_TILES"] = _cdiv(s["TILES"], MERGE_TILES) if grouped else s["TILES"]
    block_c = max(16, min(64, 1 << (C - 1).bit_length()))  # _np2(C_out): channels per reduction program
    bn_splits = _cdiv(M, rows_per_split(M, _cdiv(C, block_c)))
    s["bwd_part"] = 2 * bn_splits * C * 8  # (sum g_u, sum g_u*x_hat) per split and channel, fp64
    w_splits = _cdiv(M, rows_per_split(M, _cdiv(C, 32) * _cdiv(K, 64)))
    s["W_SPLITS"] = w_splits
    s["wgrad_part"] = w_splits * (C * K + C) * E  # dW and d(bias) per split, fp32 (none with one split)
    return s


def head_sizes(linears, batch):
    (IN, HID), (_, OUT) = linears
    B = batch
    return dict(B=B, IN=IN, HID=HID, OUT=OUT, E=E, flat=B * IN * E, h=B * HID * E, logits=B * OUT * E,
                tgt=B * INDEX, w1=IN * HID * E, b1=HID * E, w2=HID * OUT * E, b2=OUT * E)


def optimizer_sizes(parameters):
    return dict(PARAMS=parameters, params=parameters * E)


# --------------------------------------------------------------------------------------------- counting

IMPLS = {"dlkern": (DLKERN_FWD, DLKERN_BWD, "dlkern ReLU"), "eager": (EAGER_FWD, EAGER_BWD, "ReLU")}


def _eval(expr, sizes):
    return eval(expr, {"__builtins__": {}}, sizes)


def count_kernels(table, sizes, where, gemm_peak):
    """One dict (kernel, where, reads, writes, flops, seconds) per kernel of ``table`` that runs with ``sizes``."""
    out = []
    for k in table:
        if not _eval(k.when, sizes):
            continue
        reads, writes, flops = (int(_eval(e, sizes)) for e in (k.reads, k.writes, k.flops))
        peak = PEAKS[gemm_peak if k.peak == "gemm" else k.peak]
        out.append(dict(kernel=k, where=where, reads=reads, writes=writes, flops=flops,
                        seconds=max((reads + writes) / BANDWIDTH, flops / peak)))
    return out


def step_kernels(impl, batch, allow_tf32=True):
    """Every kernel of one training step of ``impl`` ("dlkern" or "eager") at ``batch``, in launch order. The
    conv GEMMs run at TF32's peak when TF32 is allowed (PyTorch's default for cuDNN convs; dlkern follows
    torch.backends.cudnn.allow_tf32), else at plain fp32's."""
    fwd, bwd, relu = IMPLS[impl]
    head_fwd, head_bwd = _head(relu)
    blocks, linears, parameters = model_shapes(batch)
    gemm = "tf32" if allow_tf32 else "fp32"
    sizes = [block_sizes(b, first=i == 0) for i, b in enumerate(blocks)]
    head = head_sizes(linears, batch)
    kernels = []
    for i, s in enumerate(sizes):
        kernels += count_kernels(fwd, s, f"block {i + 1}", gemm)
    kernels += count_kernels(head_fwd + head_bwd, head, "head", gemm)
    for i, s in reversed(list(enumerate(sizes))):
        kernels += count_kernels(bwd, s, f"block {i + 1}", gemm)
    return kernels + count_kernels(ADAM, optimizer_sizes(parameters), "Adam", gemm)


def totals(kernels):
    return dict(bytes=sum(k["reads"] + k["writes"] for k in kernels), flops=sum(k["flops"] for k in kernels),
                launches=sum(k["kernel"].launches for k in kernels), seconds=sum(k["seconds"] for k in kernels))


NOTE = "a model (compulsory DRAM bytes, H200 roofline), not a measurement"


def rows(batches=BATCHES, allow_tf32=True):
    """The kernels suite's rows: one per implementation and batch, with the step's modeled bytes, FLOPs,
    launches and roofline milliseconds (without and with 3 us per launch)."""
    out = []
    for batch in batches:
        for impl in IMPLS:
            t = totals(step_kernels(impl, batch, allow_tf32))
            out.append(dict(suite="kernels", case="byte model", impl=impl, dtype="float32", batch=batch,
                            model_bytes=t["bytes"], model_flops=t["flops"], launches=t["launches"],
                            roofline_ms=1e3 * t["seconds"],
                            launch_roofline_ms=1e3 * (t["seconds"] + t["launches"] * LAUNCH_S),
                            tf32=allow_tf32, note=NOTE))
    return out


GROUPS = {"head": "head and loss: Linear, ReLU, cross-entropy", "Adam": "Adam (foreach)"}


def breakdown(impl, batch, allow_tf32=True):
    """Per kernel name, summed over the blocks it runs in (the head and loss, and Adam, one row each), then the
    step's total: launches, MB read and written, GFLOP, roofline us and its share of the step."""
    return summed(step_kernels(impl, batch, allow_tf32), GROUPS)


def summed(kernels, groups):
    """:func:`breakdown` of any step's `kernels`: one row per kernel name, the kernels of a place named in
    `groups` ({where: row name}) summed into one row, then the step's total."""
    table = {}
    for k in kernels:
        name, note = (groups[k["where"]], "") if k["where"] in groups else (k["kernel"].name, k["kernel"].note)
        r = table.setdefault(name, dict(kernel=name, launches=0, read_mb=0.0, written_mb=0.0, gflop=0.0, us=0.0,
                                        note=note))
        r["launches"] += k["kernel"].launches
        r["read_mb"] += k["reads"] / 1e6
        r["written_mb"] += k["writes"] / 1e6
        r["gflop"] += k["flops"] / 1e9
        r["us"] += 1e6 * k["seconds"]
    out = list(table.values())
    total = dict(kernel="step", note="", **{key: sum(r[key] for r in out)
                                             for key in ("launches", "read_mb", "written_mb", "gflop", "us")})
    for r in out + [total]:
        r["share"] = 100 * r["us"] / total["us"]
    return out + [total]


def report(model_rows, allow_tf32=True):
    """Prints the per-step table of ``model_rows`` (from ``rows``) and the per-kernel breakdown at batch 8192."""
    from timing import print_table

    peak = "TF32, 495 TFLOP/s" if allow_tf32 else "plain fp32, 67 TFLOP/s (TF32 off)"
    print(f"\nkernels: byte model -- {NOTE}. MnistCNN training step, fp32: each kernel's compulsory DRAM traffic "
          f"(each tensor it reads or writes, once) and FLOPs; roofline = sum over kernels of max(bytes / 4.3 TB/s, "
          f"FLOPs / peak), conv GEMMs at {peak} (torch.backends.cudnn.allow_tf32, PyTorch's default for convs, "
          "which dlkern follows), everything else at plain fp32's 67 TFLOP/s; '+ launches' adds 3 us a launch. "
          "Eager: one kernel per cuDNN pass, no layout transforms or workspaces (its real traffic is higher); "
          "dlkern's partials sized for an H200 (132 SMs) and conv_fwd BLOCK_M 64; cache re-reads not counted.")
    by = {(r["batch"], r["impl"]): r for r in model_rows}
    table = []
    for batch in sorted({r["batch"] for r in model_rows}):
        d, e = by[batch, "dlkern"], by[batch, "eager"]
        table.append(dict(batch=batch, d_gb=d["model_bytes"] / 1e9, e_gb=e["model_bytes"] / 1e9,
                          ratio=d["model_bytes"] / e["model_bytes"], d_launches=d["launches"],
                          e_launches=e["launches"], gflop=d["model_flops"] / 1e9, d_ms=d["roofline_ms"],
                          e_ms=e["roofline_ms"], d_lms=d["launch_roofline_ms"], e_lms=e["launch_roofline_ms"]))
    print_table(table, [
        ("batch", "batch", "{}"), ("d_gb", "dlkern GB", "{:.3f}"), ("e_gb", "eager GB", "{:.3f}"),
        ("ratio", "dlkern/eager", "{:.2f}x"), ("d_launches", "dlkern launches", "{}"),
        ("e_launches", "eager launches", "{}"), ("gflop", "GFLOP", "{:.2f}"), ("d_ms", "dlkern roof ms", "{:.3f}"),
        ("e_ms", "eager roof ms", "{:.3f}"), ("d_lms", "dlkern + launches ms", "{:.3f}"),
        ("e_lms", "eager + launches ms", "{:.3f}"),
    ])
    if TARGET_BATCH not in {r["batch"] for r in model_rows}:
        return
    columns = [("kernel", "kernel", "{}"), ("launches", "launches", "{}"), ("read_mb", "MB read", "{:.1f}"),
               ("written_mb", "MB written", "{:.1f}"), ("gflop", "GFLOP", "{:.2f}"), ("us", "roof us", "{:.1f}"),
               ("share", "% of step", "{:.1f}"), ("note", "note", "{}")]
    for impl in IMPLS:
        print(f"\nkernels: byte model, {impl} per kernel at batch {TARGET_BATCH} (summed over the blocks; {NOTE})")
        print_table(breakdown(impl, TARGET_BATCH, allow_tf32), columns)


def main(argv=None):
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # timing's print_table
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default=",".join(map(str, BATCHES)))
    p.add_argument("--no-tf32", action="store_true", help="conv GEMMs at plain fp32's peak (cudnn.allow_tf32 off)")
    args = p.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    report(rows(batches, not args.no_tf32), not args.no_tf32)


if __name__ == "__main__":
    main()
