"""kernels: what dlkern's Triton kernels cost on an H200's SMs, read from their compiled form (no GPU needed).

Every variant a MnistCNN training step and eval forward compile (fp32, bf16 and fp16 autocast; batch 64 and
8192; every autotuner config left after pruning; Triton's launch-time specialization) is compiled for sm_90
by tests/gpu_compile_check.py, which also documents how the variants are found and the occupancy formula. One
table row per kernel, autotuner config and dtype (the worst over its specializations): registers per thread,
spills (spill store / load instructions in the SASS), shared memory, warps, theoretical occupancy, the MMA
instruction in the PTX (wgmma on Hopper, else mma.sync, none for a kernel without tl.dot), and what it misses of
the targets; then a summary per kernel and dtype.

Cold start (not with --quick): the CPU seconds Triton takes to compile, from an empty cache (a temporary
TRITON_CACHE_DIR), every variant that `python -m dlkern.train` in fp32 compiles (training at batch 64 and the
ragged last batch, eval at batch 1000): what a first run waits for before its first step, besides the
autotuner's benchmarking on the GPU (not counted here). Variants compile in parallel processes; the figure is
the sum of their CPU seconds, what one process compiling them in turn would take.

The byte models (printed first, on every machine): each kernel's compulsory DRAM bytes and FLOPs in a MnistCNN
fp32 training step at batch 64, 1024 and 8192 (bench/bytemodel.py), and in a ResNet-18 fp32 training step at
batch 256, 32x32 (bench/bytemodel_resnet.py), dlkern's beside eager PyTorch's, with the H200 roofline time -- a
model, not a measurement.

--quick compiles a fixed sample of the batch-64 variants (every untuned one and 4 autotuned); the full run
compiles them all,
through Triton's cache (~/.triton/cache), so a rerun over unchanged kernels takes seconds.
"""

import os
import sys
import tempfile
import time

import bytemodel
import bytemodel_resnet
from timing import print_table

HERE = os.path.dirname(os.path.abspath(__file__))
QUICK_SAMPLE = 4


def _check_module():
    sys.path.append(os.path.join(os.path.dirname(HERE), "tests"))  # after bench/: its names stay first
    import gpu_compile_check

    return gpu_compile_check


def _rows(compiled, check):
    """One row per kernel, config and dtype: the worst figures over its specializations."""
    by_ident = {}
    for v, r in compiled:
        by_ident.setdefault(v.ident(), []).append((v, r))
    rows = []
    for ident, group in sorted(by_ident.items()):
        v = group[0][0]
        results = [r for _, r in group if "error" not in r]
        row = dict(suite="kernels", case=v.kernel, impl="dlkern", config=v.config or "untuned", dtype=v.dtype(),
                   variants=len(group), errors=len(group) - len(results), kernel="Triton, sm_90")
        if results:
            worst = min(results, key=lambda r: r["occupancy"])
            row.update(
                regs=max(r["regs"] for r in results), warps=worst["warps"],
                spill_stores=max(r["spill_stores"] for r in results),
                spill_loads=max(r["spill_loads"] for r in results),
                shared_kb=max(r["shared"] for r in results) / 1024, occupancy=100 * worst["occupancy"],
                mma=" / ".join(sorted({r["mma"] for r in results})), gemm=any(r["gemm"] for r in results),
                unlaunchable=sum(map(check.unlaunchable, results)), spilling=sum(map(check.spills, results)),
                low_occupancy=sum(map(check.low_occupancy, results)), compile_s=sum(r["cpu_s"] for r in results),
            )
            worst = max(results, key=lambda r: (check.unlaunchable(r), r["spill_stores"] + r["spill_loads"],
                                                -r["occupancy"]))
            row["note"] = "; ".join(check.violations(worst))  # the worst specialization's misses
        else:
            row["note"] = "does not compile: " + group[0][1]["error"][:200]
        rows.append(row)
    return rows


def _summary(compiled, check):
    """Per kernel and dtype: variants, spilling, below the occupancy target, unlaunchable, MMA kinds."""
    table = {}
    for v, r in compiled:
        s = table.setdefault((v.kernel, v.dtype()), dict(kernel=v.kernel, dtype=v.dtype(), variants=0, spilling=0,
                                                         low=0, unlaunchable=0, failed=0, mma=set()))
        s["variants"] += 1
        if "error" in r:
            s["failed"] += 1
            continue
        s["spilling"] += check.spills(r)
        s["low"] += check.low_occupancy(r)
        s["unlaunchable"] += check.unlaunchable(r)
        s["mma"].add(r["mma"])
    return [dict(s, mma=" / ".join(sorted(s["mma"]))) for _, s in sorted(table.items())]


def run_suite(run):
    model_rows = bytemodel.rows()  # arithmetic only: printed whatever the machine
    bytemodel.report(model_rows)
    resnet_rows = bytemodel_resnet.rows()
    bytemodel_resnet.report(resnet_rows)
    model_rows += resnet_rows
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        run.skip("kernels", "the compiled variants", "TRITON_INTERPRET is set: the kernels are not compiled for a GPU")
        return model_rows
    check = _check_module()
    start = time.time()
    variants = list(check.record(["mnist64" if run.quick else "mnist"]).values())
    chosen = check.sample(variants, QUICK_SAMPLE) if run.quick else variants
    print(f"kernels: {len(variants)} variants in a MnistCNN training step and eval (fp32, bf16, fp16 autocast; "
          f"batch 64{'' if run.quick else ' and 8192'}); compiling {len(chosen)} for sm_90"
          + (f" (--quick: every untuned one and {QUICK_SAMPLE} autotuned)" if run.quick else ""), flush=True)
    compiled = check.compile_all(chosen)
    rows = _rows(compiled, check)
    print(f"\nkernels: compiled for sm_90 in {time.time() - start:.0f} s (worst over each row's specializations; "
          "occupancy: theoretical, from registers, warps and shared memory)")
    print_table(rows, [
        ("case", "kernel", "{}"), ("config", "config", "{}"), ("dtype", "dtype", "{}"), ("variants", "n", "{}"),
        ("regs", "regs", "{}"), ("spill_stores", "spill st", "{}"), ("spill_loads", "spill ld", "{}"),
        ("shared_kb", "shared KB", "{:.1f}"), ("warps", "warps", "{}"), ("occupancy", "occupancy %", "{:.1f}"),
        ("mma", "MMA", "{}"), ("note", "misses", "{}"),
    ])
    print("\nkernels: per kernel and dtype (occupancy targets: >= 25% with tl.dot, >= 50% without)")
    print_table(_summary(compiled, check), [
        ("kernel", "kernel", "{}"), ("dtype", "dtype", "{}"), ("variants", "variants", "{}"),
        ("spilling", "spilling", "{}"), ("low", "low occupancy", "{}"), ("unlaunchable", "unlaunchable", "{}"),
        ("failed", "failed", "{}"), ("mma", "MMA", "{}"),
    ])
    if run.quick:
        run.skip("kernels", "cold start", "--quick (it compiles every variant of a training run from scratch)")
    else:
        rows.append(_cold_start(check))
    return model_rows + rows


def _cold_start(check):
    variants = list(check.record(["coldstart"]).values())
    with tempfile.TemporaryDirectory(prefix="dlkern-triton-cache-") as cache:
        start = time.time()
        compiled = check.compile_all(variants, cache_dir=cache)
        wall = time.time() - start
    cpu = sum(r["cpu_s"] for _, r in compiled)
    slowest = max(compiled, key=lambda c: c[1]["cpu_s"])
    print(f"\nkernels: cold start: {len(compiled)} variants of an fp32 `python -m dlkern.train` (batch 64, the last "
          f"batch of 32, eval at 1000) compiled from an empty Triton cache for sm_90 in {cpu:.0f} CPU s "
          f"({wall:.0f} s wall on {os.cpu_count()} processes); slowest {slowest[0].describe()}: "
          f"{slowest[1]['cpu_s']:.1f} s")
    return dict(suite="kernels", case="cold start", impl="dlkern", dtype="float32", variants=len(compiled),
                errors=sum("error" in r for _, r in compiled), compile_s=cpu, wall_ms=1e3 * wall,
                note=f"CPU s of Triton compiles for sm_90, empty cache; slowest {slowest[0].describe()} "
                     f"{slowest[1]['cpu_s']:.1f} s")
