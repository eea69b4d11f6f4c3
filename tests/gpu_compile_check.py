"""Compiles the Triton kernels dlkern launches for a real GPU (sm_90; sm_80 on request), without one, and reads
each compiled variant's resources: registers, spills, shared memory, warps, the MMA instruction, and the
theoretical occupancy they allow.

Run it as a script (tests/test_gpu_compile.py does; bench/kernels.py imports it), never with TRITON_INTERPRET:
the kernels must be real JITFunctions.

Which variants. Workloads run on CPU tensors through dlkern's real GPU launch path, under bench/host_stub.py's
stand-in driver (current target sm_90), with Triton's compile replaced by a recorder. So every variant is what a
launch on an H200 compiles: Triton's own launch-time specialization (an integer argument equal to 1 becomes a
constexpr; integers and pointers divisible by 16 carry ``tt.divisibility = 16``; None arguments are
constexprs), the launcher's constexprs, and for an autotuned kernel every config its ``early_config_prune``
keeps (the autotuner's benchmark is replaced by one launch per config: what compiles them on a GPU). Tensors
are empty CPU tensors: the launchers' shapes, strides and 64-byte aligned pointers are real, nothing computes.

Workloads (WORKLOADS): ``mnist``: MnistCNN's training step (forward, cross-entropy, backward, Adam) and eval
forward (no_grad), at batch 64 and 8192, fp32, under bf16 and fp16 autocast, and wholly in bf16 or fp16
(model.bfloat16(), model.half()); ``coldstart``: what ``python -m dlkern.train`` compiles in fp32 (training at
batch 64 and the epoch's ragged last batch of 32, eval at batch 1000); ``breadth``: one forward and backward of
every op family, fp64 included (whether everything compiles; its resources are reported too); ``cnn``: ResNet's
blocks (the residual epilogue, stride 2, 1x1 convs) and the fast CIFAR-10 net's Conv -> MaxPool -> BatchNorm ->
GELU, converted, training step and inference at batch 256, 32x32, channels_last, fp32 and bf16 autocast (checked
as the MnistCNN's: the issue-20 variants).

Checks (exit status 1 when one fails): every variant compiles, and no variant of a MnistCNN run needs more
shared memory than the target's per-block limit (unlaunchable) except those in KNOWN_UNLAUNCHABLE -- and those
must still be unlaunchable and offered, so fixing one fails the check until it is taken off the list -- and, on
sm_90, none of them spills or falls below its occupancy floor (GEMM_OCCUPANCY, OTHER_OCCUPANCY): every config the
autotuner may offer, and every fixed default tile (DLKERN_AUTOTUNE=0), fits an H200 SM. The breadth workload's
other variants (fp64, every activation) are reported, not failed.

Time: compiling is CPU-bound (Triton's frontend, LLVM, ptxas: up to ~16 CPU s per GEMM variant); variants
compile in parallel processes, and Triton's cache (TRITON_CACHE_DIR, default ~/.triton/cache) makes a rerun
over unchanged kernels cheap. ``--sample N`` compiles every untuned variant, the KNOWN_UNLAUNCHABLE ones and N
of the autotuned ones drawn with ``--seed``.
"""

import argparse
import concurrent.futures
import contextlib
import dataclasses
import gc
import importlib
import json
import math
import multiprocessing
import os
import random
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.compiler  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime import autotuner  # noqa: E402

# --------------------------------------------------------------------------------------------- the targets

# Per-SM limits for theoretical occupancy (CUDA's occupancy calculator, cuda_occupancy.h), per compute capability:
# - registers: a warp gets ceil(regs_per_thread * 32 / 256) * 256 registers; warps are placed on the SM's 4
#   sub-partitions of 65536 / 4 registers each, so warps_by_regs = 4 * floor(16384 / regs_per_warp);
# - shared memory: a block takes its shared bytes rounded up to 128 B plus 1 KB the system reserves per block, out
#   of 228 KB per SM on sm_90 (164 KB on sm_80); a block needing more than 227 KB (163 KB) cannot launch at all;
# - at most 64 warps and 32 blocks per SM.
# blocks = min(warps_by_regs // warps, shared_per_sm // block_shared, 32, 64 // warps);
# occupancy = blocks * warps / 64 (resident warps over the SM's maximum).
LIMITS = {
    90: dict(regs=65536, reg_unit=256, partitions=4, warps=64, blocks=32, shared_sm=228 * 1024,
             shared_block=227 * 1024, shared_reserved=1024, shared_unit=128),
    80: dict(regs=65536, reg_unit=256, partitions=4, warps=64, blocks=32, shared_sm=164 * 1024,
             shared_block=163 * 1024, shared_reserved=1024, shared_unit=128),
}
GEMM_OCCUPANCY, OTHER_OCCUPANCY = 0.25, 0.50  # the targets: GEMMs, elementwise and reduction kernels


def occupancy(regs, warps, shared, arch=90):
    """Theoretical occupancy (0..1) of a kernel using `regs` registers per thread, `warps` warps per block and
    `shared` bytes of shared memory per block; 0 when it cannot launch (shared memory over the block limit)."""
    lim = LIMITS[arch]
    if shared > lim["shared_block"]:
        return 0.0
    regs_per_warp = math.ceil(max(regs, 1) * 32 / lim["reg_unit"]) * lim["reg_unit"]
    warps_by_regs = lim["partitions"] * (lim["regs"] // lim["partitions"] // regs_per_warp)
    block_shared = math.ceil(shared / lim["shared_unit"]) * lim["shared_unit"] + lim["shared_reserved"]
    blocks = min(warps_by_regs // warps, lim["shared_sm"] // block_shared, lim["blocks"], lim["warps"] // warps)
    return blocks * warps / lim["warps"]


# Variants known to need more shared memory than a block may have, keyed as Variant.ident(): each must still be
# unlaunchable (a fix fails the check until its entry is removed).
KNOWN_UNLAUNCHABLE = set()  # was: conv_bwd_input 128/32/64 w4 s4 fp32 (261 KB), fixed by reading dL/dz once

# --------------------------------------------------------------------------------------------- recording

TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


@dataclasses.dataclass
class Variant:
    """One compiled form of a kernel: what triton.compile receives, and the workloads that launch it."""

    kernel: str  # the @triton.jit function's name
    module: str  # its module, to find it again in a worker process
    signature: dict
    constexprs: dict  # keyed by argument path (tuples), as Triton's launcher passes them
    attrs: dict
    options: dict
    config: str  # the autotuner config ("" for an untuned kernel)
    tags: set = dataclasses.field(default_factory=set)  # workload cases that launch it: "train fp32 b64", ...
    dtypes: set = dataclasses.field(default_factory=set)  # the dtypes of the MnistCNN runs that launch it

    def dtype(self):
        """The MnistCNN runs' dtypes that launch it ("fp32", "bf16/fp16", ...); for a variant no such run
        launches, its first floating-point pointer argument's."""
        if self.dtypes:
            return "/".join(sorted(self.dtypes))
        for t in self.signature.values():
            if isinstance(t, str) and t.startswith("*") and t[1:] in ("fp32", "bf16", "fp16", "fp64"):
                return t[1:]
        return "-"

    def ident(self):
        """Kernel, autotuner config and dtype: the key of KNOWN_UNLAUNCHABLE (it covers every specialization)."""
        return f"{self.kernel} [{self.config or 'untuned'}] {self.dtype()}"

    def describe(self):
        """ident() and the constexpr flags that pick the code path (ACT, BN, STATS, ...)."""
        flags = ",".join(f"{k}={v}" for k, v in sorted(self.named_constexprs().items())
                         if k.isupper() and not k.startswith("BLOCK") and v not in (None, False))
        return f"{self.ident()} {flags}".rstrip()

    def named_constexprs(self):
        names = list(self.signature)
        return {names[k[0]] if isinstance(k, tuple) and len(k) == 1 else str(k): v for k, v in self.constexprs.items()}


class Recorder:
    """Stands in for triton.compile (returns host_stub's do-nothing kernel) and for the autotuner's benchmark
    (launches each pruned config once, so each one reaches compile), noting every variant and who launched it."""

    def __init__(self):
        self.variants = {}
        self.tag, self.dtype, self.config = "", None, ""

    def compile(self, src, target=None, options=None, **kwargs):
        from host_stub import _Kernel

        options = dict(options or {})
        key = (src.hash(), repr(sorted(options.items())))
        if key not in self.variants:
            fn = src.fn
            self.variants[key] = Variant(fn.__name__, fn.fn.__module__, dict(src.signature), dict(src.constants),
                                         dict(src.attrs), options, self.config)
        self.variants[key].tags.add(self.tag)
        if self.dtype:
            self.variants[key].dtypes.add(self.dtype)
        return _Kernel(src)

    def bench(self, tuner, *args, config, **meta):
        saved, self.config = self.config, _config_name(config)
        try:
            tuner.fn.run(*args, **dict(meta, **config.all_kwargs()))
        finally:
            self.config = saved
        return [1.0, 1.0, 1.0]

    @contextlib.contextmanager
    def recording(self, tag, dtype=None):
        """Within the block, launches are recorded under `tag` (and the run's `dtype`), each afresh: Triton's
        kernel caches and the autotuners' picks from an earlier block would otherwise hide the variants this one
        needs."""
        assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "record without TRITON_INTERPRET"
        from host_stub import stand_in_gpu

        for obj in gc.get_objects():
            if isinstance(obj, autotuner.Autotuner):
                obj.cache.clear()
        # stand_in_gpu resets the JIT caches and drops launch plans (which would skip Triton's path) on entry and
        # exit, keeps the on-disk autotune cache out (it would skip the per-config launches), and restores compile,
        # _bench and the driver on exit.
        with stand_in_gpu():
            saved = triton.compiler.compile
            triton.compiler.compile = self.compile
            autotuner.Autotuner._bench = lambda tuner, *a, config, **m: self.bench(tuner, *a, config=config, **m)
            self.tag, self.dtype = tag, dtype
            try:
                yield
            finally:
                triton.compiler.compile = saved


def _config_name(config):
    blocks = " ".join(f"{k}={v}" for k, v in config.kwargs.items())
    return f"{blocks} w{config.num_warps} s{config.num_stages}"


# --------------------------------------------------------------------------------------------- workloads


def _mnist_case(recorder, dtype, batch, passes=("train", "eval"), pure=False):
    """One MnistCNN training step and/or eval forward at `batch`, fp32 or under autocast to `dtype`, or with
    ``pure`` the whole model in `dtype` (model.bfloat16(), .half(): BatchNorm's parameters and buffers too)."""
    import torch.nn.functional as TF

    from dlkern.models import MnistCNN

    torch.manual_seed(0)
    model = MnistCNN()
    x = torch.empty(batch, 1, 28, 28)  # never read by a kernel: the stand-in launches nothing
    y = torch.zeros(batch, dtype=torch.long)
    amp = torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 and not pure else contextlib.nullcontext()
    if pure:
        model, x = model.to(dtype), x.to(dtype)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=True)
    name = TYPES[dtype]
    case = f"{name}-pure" if pure else name
    if "train" in passes:
        with recorder.recording(f"train {case} b{batch}", name):
            with amp:
                loss = TF.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
    if "eval" in passes:
        model.eval()
        with recorder.recording(f"eval {case} b{batch}", name), torch.no_grad(), amp:
            model(x)


@contextlib.contextmanager
def _autotuning(enabled):
    """dlkern's GEMMs through the autotuner (every config it may pick) or with their fixed heuristic tiles
    (DLKERN_AUTOTUNE=0, the default)."""
    from dlkern.ops import conv_tiles

    saved, conv_tiles.AUTOTUNE = conv_tiles.AUTOTUNE, enabled
    try:
        yield
    finally:
        conv_tiles.AUTOTUNE = saved


def mnist(recorder, batches=(64, 8192), dtypes=(torch.float32, torch.bfloat16, torch.float16)):
    """Every config either mode may launch: the autotuner's offered (pruned) ones and the default fixed tiles."""
    for autotune in (True, False):
        with _autotuning(autotune):
            for dtype in dtypes:
                for batch in batches:
                    _mnist_case(recorder, dtype, batch)
                    if dtype != torch.float32:
                        _mnist_case(recorder, dtype, batch, pure=True)


def coldstart(recorder):
    """fp32 `python -m dlkern.train` with its defaults: batch 64, the last batch of 60000 images (32), and eval
    over the test set at batch 1000."""
    with _autotuning(False):  # the default
        _mnist_case(recorder, torch.float32, 64)
        _mnist_case(recorder, torch.float32, 32, passes=("train",))
        _mnist_case(recorder, torch.float32, 1000, passes=("eval",))


def breadth(recorder):
    """One forward and backward of every op family, in the dtypes the GPU path supports."""
    import dlkern

    F = dlkern.functional
    every_activation = (F.sigmoid, F.tanh, F.relu, F.leaky_relu, F.elu, F.softplus, F.silu, F.gelu, F.hardsigmoid,
                        F.hardtanh, F.hard_logistic, lambda t: F.gelu(t, approximate="tanh"), lambda t: F.swish(t, 1.5))
    with recorder.recording("breadth"):
        for dtype, activations in ((torch.float32, every_activation), (torch.bfloat16, (F.sigmoid, F.gelu)),
                                   (torch.float64, (F.tanh, F.softplus))):
            x = torch.randn(4, 8, 5, 6, dtype=dtype, requires_grad=True)
            for fn in activations:
                fn(x).sum().backward()
            w = torch.rand(8, dtype=dtype, requires_grad=True)
            F.prelu(x, w).sum().backward()  # grad_output expanded: the two-pass weight gradient
            F.swish(x, w).sum().backward()
            for t in (x, x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()):
                F.prelu(t, w).backward(torch.ones_like(t))  # one layout: the one-pass channelwise backward
                F.swish(t, w).backward(torch.ones_like(t))
            F.relu(x.detach().clone(), inplace=True)
            F.relu(x.detach().transpose(2, 3)[:, :, ::2])  # strided
        for dtype in (torch.float32, torch.float64):
            for c_in, padding, act in ((1, 1, "relu"), (32, 0, "gelu")):
                block = dlkern.nn.ConvBNReLU2d(c_in, 32, 3, padding=padding, activation=act).to(dtype)
                x = torch.randn(2, c_in, 10, 10, dtype=dtype, requires_grad=c_in > 1)
                block(x).sum().backward()
                block.eval()
                block(x).sum().backward()
                with torch.no_grad():  # inference: BatchNorm applied in the conv kernel's epilogue (BN_EVAL)
                    block(x)


def _cnn_blocks():
    """The real-CNN sites the fused block takes beyond the MnistCNN's (issue 20), as small nets dlkern.convert
    fuses: ResNet's BasicBlock (3x3 stride 2 and 1, the residual before the ReLU, the 1x1 stride-2 downsample with
    no activation), a Bottleneck's 1x1 convs, and the fast CIFAR-10 net's Conv -> MaxPool -> BatchNorm -> GELU."""
    from torch import nn

    class Basic(nn.Module):
        def __init__(self, c_in, c_out, stride):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out)
            self.conv2, self.bn2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out)
            self.down = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)) \
                if stride != 1 or c_in != c_out else None

        def forward(self, x):
            out = self.bn2(self.conv2(self.bn1(self.conv1(x)).relu()))
            return (out + (x if self.down is None else self.down(x))).relu()

    class Bottleneck(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(c, c // 4, 1, bias=False), nn.BatchNorm2d(c // 4)
            self.conv2, self.bn2 = nn.Conv2d(c // 4, c, 1, bias=False), nn.BatchNorm2d(c)

        def forward(self, x):
            return (self.bn2(self.conv2(self.bn1(self.conv1(x)).relu())) + x).relu()

    class CifarGroup(nn.Module):
        def __init__(self, c_in, c_out):
            super().__init__()
            self.conv1, self.pool, self.norm1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.MaxPool2d(2), \
                nn.BatchNorm2d(c_out)
            self.conv2, self.norm2, self.act = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), \
                nn.BatchNorm2d(c_out), nn.GELU()

        def forward(self, x):
            return self.act(self.norm2(self.conv2(self.act(self.norm1(self.pool(self.conv1(x)))))))

    return nn.Sequential(CifarGroup(3, 64), Basic(64, 64, 1), Basic(64, 128, 2), Bottleneck(128))


def cnn(recorder, dtypes=(torch.float32, torch.bfloat16), batch=256):
    """_cnn_blocks converted: a training step and inference at batch 256, 32x32, channels_last, fp32 and under bf16
    autocast, with the default tiles (DLKERN_AUTOTUNE=0). Its variants are checked as the MnistCNN's are."""
    import torch.nn.functional as TF

    import dlkern

    torch.manual_seed(0)
    model = dlkern.convert(_cnn_blocks()).to(memory_format=torch.channels_last)
    x = torch.empty(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, foreach=True)
    with _autotuning(False):
        for dtype in dtypes:
            name = TYPES[dtype]
            amp = torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
            model.train()
            with recorder.recording(f"cnn train {name} b{batch}", name):
                with amp:
                    loss = TF.mse_loss(model(x), torch.zeros(()))
                loss.backward()
                opt.step()
            model.eval()
            with recorder.recording(f"cnn eval {name} b{batch}", name), torch.no_grad(), amp:
                model(x)


WORKLOADS = {"mnist": mnist, "mnist64": lambda recorder: mnist(recorder, batches=(64,)), "coldstart": coldstart,
             "breadth": breadth, "cnn": cnn}


def record(workloads):
    """{key: Variant} of every launch the named workloads make."""
    import warnings

    recorder = Recorder()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in workloads:
            WORKLOADS[name](recorder)
    return recorder.variants


# --------------------------------------------------------------------------------------------- compiling


def _tool(name):
    """A CUDA binary tool Triton ships (cuobjdump), else the one on the PATH."""
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else name


def _cpu_seconds():
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system  # ptxas runs as a child process


MMA = re.compile(r"\b(wgmma\.mma_async|mma\.sync)\.\S*?\.(m\d+n\d+k\d+)\S*?\.(tf32|bf16|f16|f64|e4m3|e5m2|s8)\b")


def compile_variant(variant, arch=90):
    """Compiles one variant with triton.compile (Triton's cache applies) and returns its resources:
    dict(regs, spill_stores, spill_loads, stack, shared, warps, mma, gemm, occupancy, cpu_s) or dict(error).
    cpu_s: CPU seconds of the compile (Triton's frontend and LLVM here, ptxas as a child process)."""
    start = _cpu_seconds()
    try:
        fn = getattr(importlib.import_module(variant.module), variant.kernel)
        while not isinstance(fn, triton.runtime.JITFunction):  # through @triton.autotune/heuristics wrappers
            fn = fn.fn
        options = {k: v for k, v in variant.options.items()  # the target's own values for these
                   if k not in ("arch", "supported_fp8_dtypes", "deprecated_fp8_dot_operand_dtypes",
                                "max_num_imprecise_acc_default")}
        ck = triton.compile(ASTSource(fn, variant.signature, variant.constexprs, variant.attrs),
                            target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as e:  # noqa: BLE001  (every failing variant is reported)
        return dict(error=f"{type(e).__name__}: {str(e)[:2000]}", cpu_s=_cpu_seconds() - start)
    cpu_s = _cpu_seconds() - start
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(ck.asm["cubin"])
        f.flush()
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "--dump-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    field = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    mmas = sorted({f"{'wgmma' if kind.startswith('wgmma') else 'mma.sync'} {shape} {ty}"
                   for kind, shape, ty in MMA.findall(ck.asm["ptx"])})
    regs, warps, shared = int(field.get("REG", 0)), ck.metadata.num_warps, ck.metadata.shared
    return dict(
        regs=regs, warps=warps, shared=shared, stack=int(field.get("STACK", 0)),
        spill_stores=len(re.findall(r"\bSTL(\.\w+)*\s", sass)), spill_loads=len(re.findall(r"\bLDL(\.\w+)*\s", sass)),
        mma=", ".join(mmas) or "none", gemm="tt.dot" in ck.asm["ttir"], occupancy=occupancy(regs, warps, shared, arch),
        cpu_s=cpu_s,
    )


def _import_all(modules):
    for name in modules:
        importlib.import_module(name)


def compile_all(variants, jobs=None, arch=90, cache_dir=None, progress=None):
    """[(variant, result)] of compile_variant over `variants`, in `jobs` parallel processes (default: one per CPU).
    `cache_dir` sets TRITON_CACHE_DIR for the compiles (an empty folder measures a cold start)."""
    env = {"TRITON_CACHE_DIR": cache_dir} if cache_dir else {}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the workers inherit it
    try:
        context = multiprocessing.get_context("spawn")  # no fork of a process holding torch's threads
        modules = sorted({v.module for v in variants})  # imported up front: not counted in a compile's cpu_s
        with concurrent.futures.ProcessPoolExecutor(jobs or os.cpu_count(), mp_context=context,
                                                    initializer=_import_all, initargs=(modules,)) as pool:
            futures = {pool.submit(compile_variant, v, arch): v for v in variants}
            results = {}
            for future in concurrent.futures.as_completed(futures):
                results[id(futures[future])] = future.result()
                if progress:
                    progress(futures[future], results[id(futures[future])])
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return [(v, results[id(v)]) for v in variants]


def sample(variants, n, seed=0):
    """Every untuned variant, every KNOWN_UNLAUNCHABLE one, and n of the other autotuned ones drawn with `seed`."""
    ordered = sorted(variants, key=lambda v: (v.describe(), sorted(v.tags)))
    always = [v for v in ordered if not v.config or v.ident() in KNOWN_UNLAUNCHABLE]
    rest = [v for v in ordered if v.config and v.ident() not in KNOWN_UNLAUNCHABLE]
    return always + random.Random(seed).sample(rest, min(n, len(rest)))


# --------------------------------------------------------------------------------------------- the verdict


def unlaunchable(result, arch=90):
    return result["shared"] > LIMITS[arch]["shared_block"]


def spills(result):
    return bool(result["spill_stores"] or result["spill_loads"] or result["stack"])


def occupancy_floor(result):
    return GEMM_OCCUPANCY if result["gemm"] else OTHER_OCCUPANCY


def low_occupancy(result):
    """Below its target but launchable (an unlaunchable variant is counted as that)."""
    return 0 < result["occupancy"] < occupancy_floor(result)


def violations(result, arch=90):
    """What a compiled variant misses of the issue's targets (spills, launchable, occupancy); [] if nothing."""
    if "error" in result:
        return ["does not compile"]
    found = []
    if unlaunchable(result, arch):
        found.append(f"unlaunchable: {result['shared'] / 1024:.0f} KB shared > {LIMITS[arch]['shared_block'] // 1024} "
                     "KB per block")
    if spills(result):
        found.append(f"spills ({result['spill_stores']} stores, {result['spill_loads']} loads, {result['stack']} B "
                     "stack)")
    if low_occupancy(result):
        found.append(f"occupancy {result['occupancy']:.1%} < {occupancy_floor(result):.0%}")
    return found


def failures(compiled, arch=90):
    """What fails the check: variants that do not compile; unlaunchable ones a MnistCNN run launches that are
    not in KNOWN_UNLAUNCHABLE; on sm_90, MnistCNN variants that spill or fall below their occupancy floor (25% for
    GEMMs, 50% for the rest); and KNOWN_UNLAUNCHABLE entries compiled here whose every variant now launches
    (fixed: take them off the list). The breadth workload's other variants (fp64, every activation) are only
    compiled: their misses are reported, not failed (Triton's autotuner skips a config that cannot launch)."""
    found, launchable = [], {}
    for v, r in compiled:
        if "error" in r:
            found.append(f"{v.describe()}: does not compile: {r['error']}")
            continue
        if not v.dtypes:
            continue
        fits = not unlaunchable(r, arch)
        launchable[v.ident()] = launchable.get(v.ident(), True) and fits
        if not fits and v.ident() not in KNOWN_UNLAUNCHABLE:
            found.append(f"{v.describe()}: unlaunchable, {r['shared']} B of shared memory")
        elif arch == 90 and (spills(r) or low_occupancy(r)):  # every offered config fits an H200 SM (issue 11)
            found.append(f"{v.describe()}: {'; '.join(violations(r, arch))}")
    for ident in sorted(KNOWN_UNLAUNCHABLE):
        if launchable.get(ident):
            found.append(f"{ident}: launchable now: take it off KNOWN_UNLAUNCHABLE")
    return found


def as_row(v, r, arch=90):
    """One JSON-able record of a compiled variant."""
    return dict(ident=v.ident(), variant=v.describe(), kernel=v.kernel, config=v.config, dtype=v.dtype(),
                mnist=bool(v.dtypes), tags=sorted(v.tags), arch=arch, violations=violations(r, arch), **r)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", default="mnist,breadth", help=f"comma-separated, from {','.join(WORKLOADS)}")
    p.add_argument("--sample", type=int, default=None, help="compile only N autotuned variants (plus the rest)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=None, help="parallel compile processes (default: one per CPU)")
    p.add_argument("--arch", type=int, choices=sorted(LIMITS), default=90)
    p.add_argument("--json", help="write every compiled variant's record here")
    args = p.parse_args(argv)
    start = time.time()
    variants = list(record(args.workloads.split(",")).values())
    chosen = variants if args.sample is None else sample(variants, args.sample, args.seed)
    print(f"{len(variants)} variants recorded in {time.time() - start:.0f} s; compiling {len(chosen)} for "
          f"sm_{args.arch}", flush=True)

    def progress(v, r):
        if "error" in r:
            print(f"FAIL {v.describe()}: {r['error']}", flush=True)
        else:
            problems = "; ".join(violations(r, args.arch))
            print(f"ok   {v.describe()}: {r['regs']} regs, {r['shared']} B shared, {r['warps']} warps, "
                  f"{r['occupancy']:.1%}, {r['mma']}, {r['cpu_s']:.1f} s{' -- ' + problems if problems else ''}",
                  flush=True)

    compiled = compile_all(chosen, args.jobs, args.arch, progress=progress)
    rows = [as_row(v, r, args.arch) for v, r in compiled]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1, default=str)
    bad = failures(compiled, args.arch)
    if "mnist" in args.workloads.split(","):  # a listed variant the autotuner no longer offers is fixed too
        offered = {v.ident() for v in variants}
        bad += [f"{ident}: no longer offered: take it off KNOWN_UNLAUNCHABLE"
                for ident in sorted(KNOWN_UNLAUNCHABLE - offered)]
    for line in bad:
        print(f"CHECK {line}")
    errors = sum("error" in r for _, r in compiled)
    print(f"{len(compiled)} kernel variants compiled, {errors} failed, {sum(bool(r['violations']) for r in rows)} "
          f"miss a resource target, {len(bad)} check failures; {time.time() - start:.0f} s, "
          f"{sum(r['cpu_s'] for _, r in compiled):.0f} CPU s of compiling")
    return 1 if bad or not compiled else 0


if __name__ == "__main__":
    os.environ.pop("DLKERN_AUTOTUNE", None)  # every config the autotuner offers, not a fixed pick
    sys.exit(main())
