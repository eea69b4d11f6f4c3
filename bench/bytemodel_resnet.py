"""The byte model of a ResNet-18 training step (torchvision's resnet18, 10 classes, 32x32 inputs, batch 256,
fp32, SGD with momentum): what it must move through an H200's DRAM, kernel by kernel, for dlkern (every conv ->
BatchNorm site fused, as ``dlkern.convert`` is to fuse them) and for eager PyTorch. A model, not a measurement.

It counts as bench/bytemodel.py does (its ``Kernel`` rows, size namespaces and roofline): each kernel's
compulsory traffic, every tensor it reads or writes once; not the GEMMs' re-reads of their gathered operand
through the cache, cuDNN's layout transforms and workspaces, or L2 hits between kernels.

A site is conv -> BatchNorm (training) [-> + residual] [-> ReLU]; ResNet-18 has 20: the stem's 7x7 stride-2
conv (-> BN -> ReLU), in each of the 8 BasicBlocks conv1 (-> BN -> ReLU) and conv2 (-> BN -> + residual ->
ReLU), and the 3 stride-2 1x1 downsample convs (-> BN, no activation), whose output is the next conv2's residual.

dlkern, per site (the design of the residual epilogue; sizes as dlkern/ops/conv_bn.py gives them on an H200):
forward, the conv GEMM writes z and per-tile statistics partials, the statistics merge (tiny), one normalize
pass reads z (and the residual) and writes the output; backward, the reduction reads g and z (and the residual),
the grad_z pass reads them again and writes dL/dz (and, where the residual is added before the activation,
dL/dresidual), the input-gradient GEMM reads dL/dz and the weight and writes dx, the weight-gradient GEMM reads
dL/dz and the input and writes per-split partials that a last kernel sums. The stem's 3x3 stride-2 max pool has
overlapping windows: it stays a separate kernel, dlkern's C++ max pool (int64 indices; a gathering backward that
writes each input gradient once, no zero fill).

Eager: ATen's kernels one by one -- cuDNN's conv, dgrad and wgrad; BatchNorm's statistics, running update,
normalize and its fused backward (which reads grad and input twice); the residual add_; ReLU in place and its
threshold_backward; max_pool2d_with_indices and its backward (after zeroing the input gradient).

Both: the head (global average pool of 1x1 maps, Linear, cross-entropy), the gradient sums where a block's input
feeds two branches (autograd's add), and SGD's three foreach kernels (momentum buffer mul_, add_ of the
gradient, the update).

    python bench/bytemodel_resnet.py [--batch 256] [--no-tf32]
"""

import argparse
import functools

import torch
from torch import nn

import bytemodel as bm
from bytemodel import Kernel

BATCH = 256
SIZE = 32
TARGET = 0.6  # dlkern's bytes / eager's, issue 20
CASE = "byte model ResNet-18"

# --------------------------------------------------------------------------------------------- a site
# The namespace of bytemodel.block_sizes (x: the conv's input, z: its output and everything of z's size, w, vec,
# the partials), plus res / dres: the residual and its gradient (0 where the site has none), RES and ACT: 1 where
# the site adds a residual / applies ReLU. `first`: the stem, whose input needs no gradient.

DLKERN_FWD = (
    Kernel("conv_fwd_kernel", "x + w", "z + fwd_part", "2*M*C*K", "gemm",
           note="writes z and per-tile (mean, M2) partials; not counted: x re-read per tap (KH*KW) via the cache"),
    Kernel("bn_stats_finalize_kernel (first level)", "fwd_part", "merged_part", "10*TILES*C",
           when="TILES > MERGE_TILES", note="merges groups of 1024 partials, in parallel"),
    Kernel("bn_stats_finalize_kernel", "final_part + 2*vec + 8", "3*vec + 2*vec", "10*FINAL_TILES*C",
           note="writes stats (mean, invstd, var), updates running mean and var"),
    Kernel("bn_act_fwd_kernel", "z + 4*vec + 8", "out + 8", "(4 + ACT)*Z", when="not RES",
           note="normalize (+ ReLU), num_batches_tracked += 1"),
    Kernel("bn_act_fwd_kernel, residual", "z + res + 4*vec + 8", "out + 8", "6*Z", when="RES",
           note="normalize + residual + ReLU: z and the residual read once, one output"),
)
DLKERN_BWD = (
    Kernel("bn_act_bwd_reduce_kernel", "g + z + 4*vec", "bwd_part", "8*Z", when="not RES",
           note="per split: sum g_u, sum g_u*x_hat (fp64)"),
    Kernel("bn_act_bwd_reduce_kernel, residual", "g + z + res + 4*vec", "bwd_part", "9*Z", when="RES",
           note="reads the residual to recompute ReLU's mask"),
    Kernel("grad_z_kernel", "bwd_part + g + z + 4*vec", "gz + 2*vec", "10*Z", when="not RES",
           note="not counted: every program re-reads all splits' partials (L2)"),
    Kernel("grad_z_kernel, residual", "bwd_part + g + z + res + 4*vec", "gz + dres + 2*vec", "11*Z", when="RES",
           note="writes dL/dresidual in the pass that writes dL/dz"),
    Kernel("conv_bwd_input_kernel", "gz + w", "dx", "2*M*C*K", "gemm", when="not first",
           note="not counted: gz re-read per tap through the cache"),
    *bm.DLKERN_WGRAD,
)

EAGER_FWD = (
    Kernel("cuDNN conv fwd", "x + w", "z", "2*M*C*K", "gemm"),
    Kernel("num_batches_tracked add_", "8", "8"),
    Kernel("BN statistics", "z", "2*vec", "3*Z"),
    Kernel("BN running update + invstd", "4*vec", "3*vec", "10*C"),
    Kernel("BN normalize", "z + 4*vec", "out", "2*Z"),
    Kernel("residual add_ (out += identity)", "out + res", "out", "Z", when="RES"),
    Kernel("ReLU (in place)", "out", "out", "Z", when="ACT"),
)
EAGER_BWD = (
    Kernel("ReLU bwd (threshold_backward)", "g + out", "g", "Z", when="ACT",
           note="its output is also the residual's gradient"),
    Kernel("BN backward (reduce + elementwise)", "2*(g + z) + 4*vec", "gz + 2*vec", "12*Z",
           note="its 2nd pass over grad and input counted (a channel outgrows L2)"),
    Kernel("cuDNN conv dgrad", "gz + w", "dx", "2*M*C*K", "gemm", when="not first"),
    Kernel("cuDNN conv wgrad", "gz + x", "dw", "2*M*C*K", "gemm"),
)

# --------------------------------------------------------------------------------------------- the rest
# The stem's max pool (out: its input, the stem's output; pooled, idx: int64 indices; g, gp: their gradients),
# the gradient sum at a block's input (x), the head, SGD.

POOL = {
    "dlkern": ((Kernel("dlkern max_pool2d (C++)", "out", "pooled + idx", "9*P",
                       note="3x3 stride 2: overlapping windows, not fused; int64 indices"),),
               (Kernel("dlkern max_pool2d_backward (C++)", "gp + idx", "g",
                       note="gathers per input element: no zero fill"),)),
    "eager": ((Kernel("max_pool2d_with_indices", "out", "pooled + idx", "9*P"),),
              (Kernel("max pool bwd: zero_ grad_input", "0", "g"),
               Kernel("max_pool2d_with_indices_backward", "gp + idx", "g"))),
}
GRAD_SUM = (Kernel("gradient sum at a block's input (add)", "2*x", "x", "X",
                   note="identity (or downsample) branch + conv1's dx, autograd's accumulation"),)
HEAD_FWD = (
    Kernel("adaptive_avg_pool2d", "feat", "flat", "FEAT"),
    Kernel("addmm (fc)", "flat + w + b", "logits", "2*B*IN*OUT"),
    Kernel("log_softmax", "logits", "logits", "4*B*OUT"),
    Kernel("nll_loss fwd", "B*E + tgt", "2*E", "B"),
)
HEAD_BWD = (
    Kernel("ones_like (the loss's seed)", "0", "E"),
    Kernel("nll_loss bwd", "E + tgt", "logits"),
    Kernel("log_softmax bwd", "2*logits", "logits", "3*B*OUT"),
    Kernel("mm (fc grad input)", "logits + w", "flat", "2*B*IN*OUT"),
    Kernel("mm (fc grad weight)", "logits + flat", "w", "2*B*IN*OUT"),
    Kernel("sum (fc grad bias)", "logits", "b", "B*OUT"),
    Kernel("adaptive_avg_pool2d bwd", "flat", "feat", "FEAT"),
)
# torch.optim.SGD(momentum=0.9, foreach=True), no weight decay, after the first step (buffers exist).
SGD = (
    Kernel("SGD _foreach_mul_ (momentum)", "params", "params", "PARAMS"),
    Kernel("SGD _foreach_add_ (gradient)", "2*params", "params", "PARAMS"),
    Kernel("SGD _foreach_add_ (update)", "2*params", "params", "2*PARAMS"),
)
GROUPS = {"head": "head and loss: avgpool, Linear, cross-entropy", "SGD": "SGD with momentum (foreach)"}
TABLES = {"dlkern": (DLKERN_FWD, DLKERN_BWD), "eager": (EAGER_FWD, EAGER_BWD)}


# --------------------------------------------------------------------------------------------- shapes, sizes


@functools.lru_cache(maxsize=None)
def model_shapes(batch, size=SIZE):
    """torchvision's resnet18 (10 classes) at ``batch`` x 3 x ``size`` x ``size``, from a forward on the meta
    device: (sites, stem pool, blocks, head, parameters). A site: dict(name, kernel, x, z (shapes), res, act,
    first); sites in launch order (a block: conv1, downsample, conv2, which adds the downsample's output);
    the pool: (its input's shape, its output's); blocks: each BasicBlock's input shape; head: (its input's
    shape, in_features, out_features)."""
    import torchvision

    with torch.device("meta"):  # no storage, no random draws
        model = torchvision.models.resnet18(weights=None, num_classes=10).train()
    seen = {}
    hooks = [m.register_forward_hook(lambda m, i, o: seen.__setitem__(m, (tuple(i[0].shape), tuple(o.shape))))
             for m in model.modules() if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d))]
    model(torch.empty(batch, 3, size, size, device="meta"))
    for h in hooks:
        h.remove()

    def site(name, conv, res, act, first=False):
        x, z = seen[conv]
        return dict(name=name, kernel=conv.kernel_size, x=x, z=z, res=res, act=act, first=first)

    sites, blocks = [site("stem", model.conv1, False, True, first=True)], []
    for layer in ("layer1", "layer2", "layer3", "layer4"):
        for i, block in enumerate(getattr(model, layer)):
            name = f"{layer}.{i}"
            blocks.append((name, seen[block.conv1][0]))
            sites.append(site(f"{name}.conv1", block.conv1, False, True))
            if block.downsample is not None:
                sites.append(site(f"{name}.downsample", block.downsample[0], False, False))
            sites.append(site(f"{name}.conv2", block.conv2, True, True))
    head = (seen[model.avgpool][0], model.fc.in_features, model.fc.out_features)
    return sites, seen[model.maxpool], blocks, head, sum(p.numel() for p in model.parameters())


def site_sizes(site):
    """bytemodel.block_sizes' namespace for one site, with the residual's."""
    s = bm.block_sizes(dict(kernel=site["kernel"], x=site["x"], z=site["z"], pooled=site["z"]), site["first"])
    s.update(RES=int(site["res"]), ACT=int(site["act"]), res=s["z"] if site["res"] else 0,
             dres=s["z"] if site["res"] else 0)
    return s


def pool_sizes(shapes):
    (N, C, H, W), (_, _, PH, PW) = shapes
    P = N * C * PH * PW
    return dict(P=P, out=N * C * H * W * bm.E, g=N * C * H * W * bm.E, pooled=P * bm.E, gp=P * bm.E,
                idx=P * bm.INDEX)


def head_sizes(head, batch):
    feat, IN, OUT = head
    FEAT = 1
    for d in feat:
        FEAT *= d
    return dict(B=batch, IN=IN, OUT=OUT, E=bm.E, FEAT=FEAT, feat=FEAT * bm.E, flat=batch * IN * bm.E,
                logits=batch * OUT * bm.E, tgt=batch * bm.INDEX, w=IN * OUT * bm.E, b=OUT * bm.E)


def step_kernels(impl, batch=BATCH, allow_tf32=True):
    """Every kernel of one ResNet-18 training step of ``impl`` ("dlkern" or "eager"), in launch order, as
    bytemodel.count_kernels returns them (``where``: the site, "stem pool", a block, "head" or "SGD")."""
    fwd, bwd = TABLES[impl]
    pool_fwd, pool_bwd = POOL[impl]
    sites, pool, blocks, head, parameters = model_shapes(batch)
    gemm = "tf32" if allow_tf32 else "fp32"
    sizes = [(s["name"], site_sizes(s)) for s in sites]
    kernels = []
    for i, (name, s) in enumerate(sizes):
        kernels += bm.count_kernels(fwd, s, name, gemm)
        if i == 0:
            kernels += bm.count_kernels(pool_fwd, pool_sizes(pool), "stem pool", gemm)
    h = head_sizes(head, batch)
    kernels += bm.count_kernels(HEAD_FWD + HEAD_BWD, h, "head", gemm)
    inputs = dict(blocks)
    for i, (name, s) in reversed(list(enumerate(sizes))):
        kernels += bm.count_kernels(bwd, s, name, gemm)
        if name.endswith(".conv1"):  # the block's input: its two branches' gradients summed
            block = name.removesuffix(".conv1")
            n, c, hh, ww = inputs[block]
            kernels += bm.count_kernels(GRAD_SUM, dict(X=n * c * hh * ww, x=n * c * hh * ww * bm.E), block, gemm)
        if i == 1:  # the pool sits between the stem and the first block
            kernels += bm.count_kernels(pool_bwd, pool_sizes(pool), "stem pool", gemm)
    return kernels + bm.count_kernels(SGD, bm.optimizer_sizes(parameters), "SGD", gemm)


NOTE = "a model (compulsory DRAM bytes, H200 roofline), not a measurement"
# dlkern's passes around the GEMMs: statistics merge, normalize (+ residual, ReLU), the backward's two passes
EPILOGUE = ("bn_stats_finalize_kernel", "bn_act_fwd_kernel", "bn_act_bwd_reduce_kernel", "grad_z_kernel")


def _bytes(kernels, select=lambda k: True):
    return sum(k["reads"] + k["writes"] for k in kernels if select(k))


def bounds(batch=BATCH):
    """(floor, without_sgd) bytes ratios to eager's: ``floor``, dlkern's step were its BatchNorm / ReLU / residual
    passes free and its weight gradient written once, without split partials (what the GEMMs' operands, the
    weights, the pool, the head and SGD alone move); ``without_sgd``, dlkern's bytes over eager's leaving out
    SGD's on both sides."""
    ours, theirs = step_kernels("dlkern", batch), step_kernels("eager", batch)
    name = lambda k: k["kernel"].name  # noqa: E731
    split = {k["where"] for k in ours if name(k) == "sum_splits_kernel"}  # sites whose dW goes through partials
    free = (_bytes(ours, lambda k: name(k).startswith(EPILOGUE))
            + sum(k["reads"] for k in ours if name(k) == "sum_splits_kernel")
            + sum(k["writes"] for k in ours if name(k) == "conv_bwd_weight_kernel" and k["where"] in split))
    sgd = lambda k: k["where"] == "SGD"  # noqa: E731
    return ((_bytes(ours) - free) / _bytes(theirs),
            _bytes(ours, lambda k: not sgd(k)) / _bytes(theirs, lambda k: not sgd(k)))


def rows(batch=BATCH, allow_tf32=True):
    """The kernels suite's rows for ResNet-18: one per implementation, with the step's modeled bytes, FLOPs,
    launches and roofline milliseconds (without and with 3 us per launch)."""
    out = []
    for impl in TABLES:
        t = bm.totals(step_kernels(impl, batch, allow_tf32))
        out.append(dict(suite="kernels", case=CASE, impl=impl, dtype="float32", batch=batch,
                        model_bytes=t["bytes"], model_flops=t["flops"], launches=t["launches"],
                        roofline_ms=1e3 * t["seconds"],
                        launch_roofline_ms=1e3 * (t["seconds"] + t["launches"] * bm.LAUNCH_S),
                        tf32=allow_tf32, note=NOTE))
    by = {r["impl"]: r for r in out}
    for r in out:
        r["ratio"] = r["model_bytes"] / by["eager"]["model_bytes"]
    return out


def report(model_rows, allow_tf32=True):
    """Prints the step's totals (dlkern beside eager, the ratio against the target) and the per-kernel tables."""
    from timing import print_table

    batch = model_rows[0]["batch"]
    peak = "TF32, 495 TFLOP/s" if allow_tf32 else "plain fp32, 67 TFLOP/s (TF32 off)"
    print(f"\nkernels: byte model, ResNet-18 training step -- {NOTE}. torchvision resnet18, 10 classes, batch "
          f"{batch}, 3x{SIZE}x{SIZE}, fp32, SGD(momentum) foreach. Assumes: dlkern fuses all 20 conv -> BatchNorm "
          "sites (conv GEMM + statistics partials, merge, one normalize pass that adds the residual and applies "
          "ReLU; backward: reduction and grad_z passes that read the residual, grad_z writing dL/dresidual, then "
          "the two GEMMs, the weight gradient summed over row splits where it is split); the stem's overlapping 3x3/2 max pool is dlkern's C++ "
          "pool; eager is ATen's kernels one by one (cuDNN conv/dgrad/wgrad one kernel each, no layout transforms "
          "or workspaces, so its real traffic is higher; BN backward reads grad and input twice); both share the "
          "head, autograd's gradient sums at block inputs and SGD; cache re-reads of the GEMMs' gathered operands "
          f"not counted; roofline: conv GEMMs at {peak}, the rest at 67 TFLOP/s, 4.3 TB/s; '+ launches' adds 3 us "
          "a launch.")
    by = {r["impl"]: r for r in model_rows}
    d, e = by["dlkern"], by["eager"]
    print_table([dict(batch=batch, d_gb=d["model_bytes"] / 1e9, e_gb=e["model_bytes"] / 1e9, ratio=d["ratio"],
                      target=f"<= {TARGET}x: {'met' if d['ratio'] <= TARGET else 'missed'}",
                      d_launches=d["launches"], e_launches=e["launches"], gflop=d["model_flops"] / 1e9,
                      d_ms=d["roofline_ms"], e_ms=e["roofline_ms"], d_lms=d["launch_roofline_ms"],
                      e_lms=e["launch_roofline_ms"])], [
        ("batch", "batch", "{}"), ("d_gb", "dlkern GB", "{:.3f}"), ("e_gb", "eager GB", "{:.3f}"),
        ("ratio", "dlkern/eager", "{:.2f}x"), ("target", "target", "{}"), ("d_launches", "dlkern launches", "{}"),
        ("e_launches", "eager launches", "{}"), ("gflop", "GFLOP", "{:.1f}"), ("d_ms", "dlkern roof ms", "{:.3f}"),
        ("e_ms", "eager roof ms", "{:.3f}"), ("d_lms", "dlkern + launches ms", "{:.3f}"),
        ("e_lms", "eager + launches ms", "{:.3f}"),
    ])
    floor, without_sgd = bounds(batch)
    eager = step_kernels("eager", batch)
    sgd = _bytes(eager, lambda k: k["where"] == "SGD") / e["model_bytes"]
    gemms = _bytes(eager, lambda k: k["kernel"].peak == "gemm") / e["model_bytes"]
    print(f"Of eager's bytes SGD moves {sgd:.0%} and its conv GEMMs (forward, dgrad, wgrad) {gemms:.0%}; dlkern's "
          f"GEMMs read the same operands. Without SGD on either side dlkern/eager is {without_sgd:.2f}x; "
          f"were every BatchNorm / ReLU / "
          f"residual pass of dlkern's free and its weight gradient written without split partials, {floor:.2f}x "
          "(the floor of this design at this shape: the GEMMs' operands, the weights, the pool, the head, SGD).")
    columns = [("kernel", "kernel", "{}"), ("launches", "launches", "{}"), ("read_mb", "MB read", "{:.1f}"),
               ("written_mb", "MB written", "{:.1f}"), ("gflop", "GFLOP", "{:.2f}"), ("us", "roof us", "{:.1f}"),
               ("share", "% of step", "{:.1f}"), ("note", "note", "{}")]
    for impl in TABLES:
        print(f"\nkernels: byte model, ResNet-18, {impl} per kernel at batch {batch} (summed over the sites; {NOTE})")
        print_table(bm.summed(step_kernels(impl, batch, allow_tf32), GROUPS), columns)


def main(argv=None):
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # timing's print_table
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=BATCH)
    p.add_argument("--no-tf32", action="store_true", help="conv GEMMs at plain fp32's peak (cudnn.allow_tf32 off)")
    args = p.parse_args(argv)
    report(rows(args.batch, not args.no_tf32), not args.no_tf32)


if __name__ == "__main__":
    main()
