"""dlkern's performance targets on an H200, in one place, evaluated over a run's rows.

Each target is checked against every matching case the run measured and reports its worst case. A target is
✓ (met everywhere), ✗ (missed somewhere) or – (not measured: the suite, size, batch or variant was not in the
run). The targets are set for an H200; on other GPUs they are evaluated all the same, and a CPU run evaluates
none of them (CPU timings say nothing about dlkern's GPU kernels).
"""

import csv
import os

from dlkern.catalog import ACTIVATIONS  # the host suite names its activation rows by the catalog

MARKS = {True: "✓", False: "✗", None: "–"}
CASE_KEYS = ("case", "pass", "dtype", "layout", "size", "batch")


def _case(r):
    return " ".join(str(r[k]) for k in CASE_KEYS if r.get(k) not in (None, ""))


def _faster(rows, suite, ours, theirs, factor, strict=False, **where):
    """`ours` at least `factor` times as fast as each of `theirs` (baseline ms / our ms), in every case of `suite`
    matching `where` where both were measured. Returns (met, worst case)."""
    def matches(r):
        return r["suite"] == suite and all(r.get(k) in (v if isinstance(v, tuple) else (v,)) for k, v in where.items())

    cases = {}
    for r in rows:
        if matches(r) and r.get("ms"):
            cases.setdefault(_case(r), {})[r["impl"]] = r["ms"]
    worst = None
    for case, ms in cases.items():
        for other in theirs:
            if ours in ms and other in ms:
                ratio = ms[other] / ms[ours]
                if worst is None or ratio < worst[0]:
                    worst = (ratio, f"{case}: {ratio:.2f}x {other}")
    if worst is None:
        return None, f"not measured ({ours} and {'/'.join(theirs)} in the same case)"
    met = worst[0] > factor if strict else worst[0] >= factor
    return met, f"worst {worst[1]}"


def _roof(rows, pct, min_numel):
    cases = [r for r in rows if r["suite"] == "activations" and r["impl"] == "dlkern"
             and r.get("numel", 0) >= min_numel and r.get("pct_roof") is not None
             and r.get("dtype") in ("float32", "bfloat16")]
    if not cases:
        return None, f"not measured (no activation at >= 2^{min_numel.bit_length() - 1} elements)"
    worst = min(cases, key=lambda r: r["pct_roof"])
    covered = sorted({(r["pass"], r["dtype"]) for r in cases})
    return worst["pct_roof"] >= pct, (f"worst {_case(worst)}: {worst['pct_roof']:.0f}% of copy bandwidth "
                                      f"({len(cases)} cases: {', '.join('/'.join(c) for c in covered)})")


COMPILE_VARIANTS = ("compile", "compile-reduce-overhead", "compile-max-autotune")

# (name, what it asks, check(rows) -> (met or None, detail))
TARGETS = [
    ("activations roof", "activations reach >= 90% of the measured copy bandwidth at >= 2^26 elements "
     "(fwd and fwd+bwd, fp32 and bf16)", lambda rows: _roof(rows, 90, 2**26)),
    ("activations vs PyTorch", "activations never slower than eager or torch.compile",
     lambda rows: _faster(rows, "activations", "dlkern", ("eager", "compile"), 1.0)),
    ("max pool fwd", "max pool forward >= ATen's speed, both layouts",
     lambda rows: _faster(rows, "maxpool", "dlkern", ("eager",), 1.0, **{"pass": "fwd"})),
    ("max pool bwd", "max pool backward >= 1.2x ATen's, both layouts",
     lambda rows: _faster(rows, "maxpool", "dlkern", ("eager",), 1.2, **{"pass": "bwd"})),
    ("conv blocks train", "conv blocks: training forward+backward faster than eager and torch.compile, every batch",
     lambda rows: _faster(rows, "convbn", "dlkern", ("eager",) + COMPILE_VARIANTS, 1.0, strict=True,
                          **{"pass": "train"})),
    ("conv blocks eval", "conv blocks: eval forward at batch 64 >= 1.5x eager",
     lambda rows: _faster(rows, "convbn", "dlkern", ("eager",), 1.5, batch=64, **{"pass": "eval"})),
    ("model step vs eager", "model training step at batch 64 >= 2x eager",
     lambda rows: _faster(rows, "model", "dlkern", ("eager",), 2.0, batch=64, **{"pass": "train-step"})),
    ("model step vs compile", "model training step at batch 64 >= torch.compile (default)",
     lambda rows: _faster(rows, "model", "dlkern", ("compile",), 1.0, batch=64, **{"pass": "train-step"})),
    ("graph step vs eager", "model training step at batch 64 in a CUDA graph >= 5x eager",
     lambda rows: _faster(rows, "model", "dlkern+graph", ("eager",), 5.0, batch=64, **{"pass": "train-step"})),
    ("graph step vs reduce-overhead", "model training step at batch 64 in a CUDA graph >= 1.2x "
     "torch.compile(mode='reduce-overhead')",
     lambda rows: _faster(rows, "model", "dlkern+graph", ("compile-reduce-overhead",), 1.2, batch=64,
                          **{"pass": "train-step"})),
    ("model inference", "model inference at batch 64 >= 2x eager",
     lambda rows: _faster(rows, "model", "dlkern", ("eager",), 2.0, batch=64, **{"pass": "inference"})),
    ("cnn: ResNet-18 vs eager", "ResNet-18 training step, dlkern.convert-ed (batch 256, 32x32, channels_last, every "
     "dtype run) >= 1.3x eager", lambda rows: _faster(rows, "cnn", "dlkern", ("eager",), 1.3, case="resnet18",
                                                       **{"pass": "train-step"})),
    ("cnn: ResNet-18 vs compile", "ResNet-18 training step, dlkern.convert-ed >= torch.compile (default)",
     lambda rows: _faster(rows, "cnn", "dlkern", ("compile",), 1.0, case="resnet18", **{"pass": "train-step"})),
]


def _step_launches(rows, case):
    """{impl: the host suite's train-step row of `case`} for the rows that counted launches."""
    return {r["impl"]: r for r in rows if r["suite"] == "host" and r.get("case") == case
            and r.get("pass") == "train-step" and r.get("launches") is not None}


def _launches(rows, most):
    step = _step_launches(rows, "MnistCNN")
    if "dlkern" not in step:
        return None, "not measured (host suite, MnistCNN train-step)"
    r, eager = step["dlkern"], step.get("eager", {}).get("launches", "?")
    return r["launches"] <= most and not r["fills"], (f"{r['launches']} launches, {r['fills']} fills per step "
                                                      f"(eager: {eager})")


def _launches_vs_eager(rows, case):
    """dlkern's launches per training step of `case` at most eager's."""
    step = _step_launches(rows, case)
    if not {"dlkern", "eager"} <= set(step):
        return None, f"not measured (host suite, {case} train-step)"
    ours, theirs = step["dlkern"]["launches"], step["eager"]["launches"]
    return ours <= theirs, f"{ours} launches per step, eager {theirs}"


RESNET_HOST = "ResNet-18 stand-in"  # bench/host.py's RESNET_CASE


# Host-time targets (the host suite): evaluated on every machine, CPU runs included -- the host path is the same
# Python whichever device runs the kernels. A ratio here is eager's host time over dlkern's.
HOST_TARGETS = [
    ("host: train step", "MnistCNN training step (batch 64 on a GPU): host time <= 1.0x eager's",
     lambda rows: _faster(rows, "host", "dlkern", ("eager",), 1.0, case="MnistCNN", **{"pass": "train-step"})),
    ("host: inference", "MnistCNN eval forward: host time <= 1.0x eager's",
     lambda rows: _faster(rows, "host", "dlkern", ("eager",), 1.0, case="MnistCNN", **{"pass": "inference"})),
    ("host: activations", "every activation fwd+bwd with grad: host time <= 3x ATen's",
     lambda rows: _faster(rows, "host", "dlkern", ("eager",), 1 / 3, case=ACTIVATIONS, **{"pass": "fwd+bwd"})),
    ("host: max pool", "max pool fwd+bwd: host time <= 1.2x ATen's",
     lambda rows: _faster(rows, "host", "dlkern", ("eager",), 1 / 1.2, case="max_pool2d 2x2",
                          **{"pass": "fwd+bwd"})),
    ("host: conv block", "conv block train fwd+bwd: host time <= eager's conv + BN + ReLU",
     lambda rows: _faster(rows, "host", "dlkern", ("eager",), 1.0, **{"pass": "train-fwd+bwd"})),
    ("host: launches", "MnistCNN training step (fp32): <= 40 kernel launches, none a fill",
     lambda rows: _launches(rows, 40)),
    ("host: ResNet-18 step", "ResNet-18 training step, dlkern.convert-ed (stand-in: 8 channels a stage, 2x3x32x32): "
     "host time <= 1.0x eager's", lambda rows: _faster(rows, "host", "dlkern", ("eager",), 1.0, case=RESNET_HOST,
                                                       **{"pass": "train-step"})),
    ("host: ResNet-18 launches", "ResNet-18 training step (stand-in), dlkern.convert-ed: kernel launches <= eager's",
     lambda rows: _launches_vs_eager(rows, RESNET_HOST)),
]


def _kernel_variants(rows, count, gemm=None):
    """The `kernels` suite's rows: how many compiled variants have `count` (spilling, unlaunchable,
    low_occupancy), among GEMMs (gemm=True), other kernels (False) or all (None)."""
    table = [r for r in rows if r["suite"] == "kernels" and r.get("regs") is not None
             and (gemm is None or bool(r.get("gemm")) == gemm)]
    if not table:
        return None, "not measured (kernels suite)"
    total = sum(r["variants"] for r in table)
    bad = [r for r in table if r[count]]
    worst = max(bad, key=lambda r: r[count], default=None)
    detail = f"{sum(r[count] for r in bad)} of {total} variants"
    if worst is not None:
        detail += f" (e.g. {worst['case']} [{worst['config']}] {worst['dtype']}: {worst['note']})"
    return not bad, detail


def _cold_start(rows, most_s):
    cold = [r for r in rows if r["suite"] == "kernels" and r.get("case") == "cold start"]
    if not cold:
        return None, "not measured (kernels suite without --quick)"
    r = cold[0]
    return r["compile_s"] <= most_s and not r["errors"], f"{r['compile_s']:.0f} CPU s, {r['variants']} variants"


def _byte_model(rows, batch, most, case="byte model"):
    """The kernels suite's byte model (a model, not a measurement): dlkern's modeled DRAM bytes per fp32
    training step over eager PyTorch's, at `batch` (`case`: the MnistCNN's, or "byte model ResNet-18")."""
    step = {r["impl"]: r for r in rows if r["suite"] == "kernels" and r.get("case") == case
            and r.get("batch") == batch and r.get("dtype") == "float32"}
    if not {"dlkern", "eager"} <= set(step):
        return None, f"not measured (kernels suite: {case} at batch {batch})"
    ratio = step["dlkern"]["model_bytes"] / step["eager"]["model_bytes"]
    return ratio <= most, (f"modeled: dlkern {step['dlkern']['model_bytes'] / 1e9:.2f} GB, eager "
                           f"{step['eager']['model_bytes'] / 1e9:.2f} GB per step: {ratio:.2f}x")


# Compiled-kernel targets (the kernels suite, sm_90 code compiled on the CPU) and the byte model: evaluated on
# every machine.
KERNEL_TARGETS = [
    ("kernels: spills", "no compiled variant of a MnistCNN step or eval spills registers (sm_90)",
     lambda rows: _kernel_variants(rows, "spilling")),
    ("kernels: launchable", "every variant fits sm_90's 227 KB of shared memory per block",
     lambda rows: _kernel_variants(rows, "unlaunchable")),
    ("kernels: GEMM occupancy", "every GEMM variant (tl.dot) >= 25% theoretical occupancy on sm_90",
     lambda rows: _kernel_variants(rows, "low_occupancy", gemm=True)),
    ("kernels: other occupancy", "every elementwise and reduction variant >= 50% theoretical occupancy on sm_90",
     lambda rows: _kernel_variants(rows, "low_occupancy", gemm=False)),
    ("kernels: cold start", "fp32 MnistCNN training + eval: <= 60 CPU s of Triton compiles for sm_90 from an "
     "empty cache", lambda rows: _cold_start(rows, 60)),
    ("kernels: byte model", "MnistCNN training step at batch 8192, fp32: dlkern's modeled DRAM bytes <= 0.5x eager's",
     lambda rows: _byte_model(rows, 8192, 0.5)),
    ("kernels: ResNet-18 byte model", "ResNet-18 training step at batch 256, 32x32, fp32: dlkern's modeled DRAM "
     "bytes <= 0.6x eager's", lambda rows: _byte_model(rows, 256, 0.6, "byte model ResNet-18")),
]


# CPU targets: what dlkern promises a user without a GPU, evaluated on CPU runs only.
CPU_TARGETS = [
    ("cpu: max pool", "dlkern's C++ max pool >= ATen's speed, every layout and direction",
     lambda rows: _faster(rows, "maxpool", "dlkern", ("eager",), 1.0)),
    ("cpu: model", "MnistCNN on the CPU path (training step and inference) >= 0.95x eager",
     lambda rows: _faster(rows, "model", "dlkern", ("eager",), 0.95)),
]

NOT_ON_CPU = "not evaluated: a CPU run (the targets are for an H200)"


def evaluate(rows, on_cuda):
    """[{target, asks, met (True/False/None), detail}] for every target: the H200 targets on a GPU run (listed as
    not evaluated on a CPU run), the CPU targets on a CPU run, the host and kernel targets on every run."""
    results = []
    for name, asks, check in TARGETS:
        met, detail = check(rows) if on_cuda else (None, NOT_ON_CPU)
        results.append(dict(target=name, asks=asks, met=met, detail=detail))
    for name, asks, check in HOST_TARGETS + KERNEL_TARGETS + ([] if on_cuda else CPU_TARGETS):
        met, detail = check(rows)
        results.append(dict(target=name, asks=asks, met=met, detail=detail))
    return results


def report(results, device_name, on_cuda, skipped, failed, out_dir):
    """Prints the summary and writes it to out_dir/targets.md and out_dir/targets.csv."""
    head = [f"Targets (set for an H200, host targets for any machine; this run: {device_name})"]
    if on_cuda and "H200" not in device_name:
        head.append("note: this GPU is not an H200; the targets are evaluated all the same")
    width = max(len(r["target"]) for r in results)
    body = []
    not_on_cpu = [r["target"] for r in results if r["detail"] == NOT_ON_CPU]
    for r in results:
        if r["detail"] == NOT_ON_CPU:
            continue
        body.append(f"{MARKS[r['met']]} {r['target']:<{width}}  {r['asks']}")
        body.append(f"  {'':<{width}}  {r['detail']}")
    if not_on_cpu:  # one short block instead of a line each
        body.append(f"– H200 targets, {len(not_on_cpu)}, not evaluated without a GPU: {', '.join(not_on_cpu)}")
    met = sum(r["met"] is True for r in results)
    missed = sum(r["met"] is False for r in results)
    unmeasured = len(results) - met - missed - len(not_on_cpu)
    tail = [f"{met} met, {missed} missed, {unmeasured} not measured"
            + (f", {len(not_on_cpu)} H200 targets not evaluated (no GPU)" if not_on_cpu else "")]
    if skipped:
        tail += ["", "Skipped:"] + [f"- {suite}: {what}: {reason}" for suite, what, reason in skipped]
    if failed:
        tail += ["", "FAILED:"] + [f"- {suite}: {what}: {error}" for suite, what, error in failed]
    print("\n" + "\n".join(head + [""] + body + [""] + tail))
    with open(os.path.join(out_dir, "targets.md"), "w") as f:
        f.write("# Targets\n\n" + "\n\n".join(head) + "\n\n| | target | asks | result |\n| --- | --- | --- | --- |\n")
        for r in results:
            f.write(f"| {MARKS[r['met']]} | {r['target']} | {r['asks']} | {r['detail']} |\n")
        f.write("\n" + "\n".join(tail) + "\n")
    with open(os.path.join(out_dir, "targets.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["target", "met", "asks", "detail"])
        writer.writeheader()
        for r in results:
            writer.writerow({**r, "met": {True: "yes", False: "no", None: "not measured"}[r["met"]]})
