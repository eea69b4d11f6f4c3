"""dlkern's benchmark: every suite side by side with PyTorch, in one run, on this machine's device.

    python bench/run.py [--suite host,maxpool,model,activations,convbn,cnn,coverage,accuracy,kernels] [--quick]
                        [--device cuda|cpu] [--out DIR] [--dtype fp32,bf16] [--sizes 20,26] [--batches 64,8192]
                        [--ops relu,gelu] [--compile-modes default,reduce-overhead,max-autotune] [--threads N]
                        [--data-dir DIR]

Suites (one file each under bench/; --suites is --suite): host (the host time of dlkern's calls, of a MnistCNN
step and of a ResNet-18 stand-in's against eager PyTorch's, with launches per step; on a CPU through dlkern's real
GPU launch path with a stand-in driver), maxpool (dlkern's max pool against ATen's), model (the MNIST CNN's
training step and inference, eager, in a CUDA graph and under torch.compile), activations and convbn (dlkern's
Triton kernels against eager PyTorch and torch.compile; GPU only), cnn (ResNet-18, ResNet-50 and a fast CIFAR-10
net converted with dlkern.convert, against eager and torch.compile, in images/s; GPU only), coverage (fusion.py:
the conv -> BatchNorm sites dlkern.convert fuses in torchvision's models and the CIFAR-10 net; any machine),
accuracy (seconds of training to a test accuracy: 99% on MNIST, 90% on the synthetic digits), kernels (the byte
models of a MnistCNN and a ResNet-18 training step; registers, spills, shared memory, occupancy and MMA
instruction of every Triton kernel variant a MnistCNN step compiles for sm_90, and the cold-start compile time;
compiled on the CPU, no GPU needed).

Writes to DIR (default bench/out): results.csv (one row per measurement, each with the device, torch/triton/CUDA
versions, git commit and the run's start time), PNG plots, and targets.md / targets.csv (the H200 targets of
bench/targets.py, ✓/✗, also printed last; the host targets are evaluated on every machine). results.csv is rewritten after every suite, so a run cut short keeps
what it measured. Without a GPU it runs what is meaningful on the CPU and says what it skipped and why.
Exit status 1 when a suite or variant failed (missed targets are results, not failures).
"""

import argparse
import csv
import importlib
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

# torch, dlkern and the suites are imported once the options have been checked: a mistyped option fails in a
# fraction of a second, in argparse's one line and exit status 2, before anything is imported or measured.
SUITES = ["host", "maxpool", "model", "activations", "convbn", "cnn", "coverage", "accuracy", "kernels"]
MODULES = {"coverage": "fusion"}  # a suite's module under bench/, where it is not the suite's name (not coverage.py:
# the coverage package's name)
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp64": "float64"}  # -> torch.<name>
COMPILE_MODES = ["default", "reduce-overhead", "max-autotune"]
OPS_SUITES = ["host", "activations"]  # the suites that time activations, each from its own table (_known_ops)
MIN_SIZE = 14  # --sizes: 2^14 elements, one row of the activations suite's 64 channels x 256
# The columns every row may have, in the CSV's order (env columns first; anything else a suite adds goes last).
COLUMNS = ["suite", "case", "pass", "impl", "dtype", "layout", "size", "numel", "batch", "ms", "speedup", "baseline",
           "gbps", "pct_roof", "tflops", "images_per_s", "launches", "peak_mb", "compile_s", "capture_s", "tta_s",
           "train_s", "steps", "epochs", "best_acc", "reached", "kernel", "spread", "wall_ms", "spread_us", "fills", "note"]


def _integer(minimum, why):
    """An option value: an integer of at least `minimum`; `why` says what the option means by it."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: {why}")
        return value
    return parse


def _choice(names):
    """An option value: one of `names`."""
    def parse(text):
        if text not in names:
            raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from {', '.join(names)})")
        return text
    return parse


def _list(item):
    """A comma-separated option: at least one value, each checked by `item` (blanks around commas ignored)."""
    def parse(text):
        values = [v.strip() for v in text.split(",") if v.strip()]
        if not values:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
        return [item(v) for v in values]
    return parse


POSITIVE = _integer(1, "expected a positive integer")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", type=_list(_choice(SUITES)), default=SUITES,
                   help=f"comma-separated, from {','.join(SUITES)}")
    p.add_argument("--suites", type=_list(_choice(SUITES)), dest="suite", help=argparse.SUPPRESS)  # the same
    p.add_argument("--quick", action="store_true",
                   help="few sizes, batches, ops and repetitions; torch.compile in default mode only for the conv "
                        "blocks, default and reduce-overhead at the first batch only for the model")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when a GPU is visible")
    p.add_argument("--out", default=os.path.join(HERE, "out"), help="folder for results.csv, plots and targets")
    p.add_argument("--dtype", type=_list(_choice(list(DTYPES))), default=None,
                   help=f"activations and max pool, from {','.join(DTYPES)} (default fp32,bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--sizes", type=_list(_integer(MIN_SIZE, f"sizes are powers of two of at least {MIN_SIZE} "
                                                  f"(2^{MIN_SIZE} elements: one row of 64 channels x 256)")),
                   default=None, help=f"activation sizes as powers of two >= {MIN_SIZE} (default 16,18,..,28; "
                                      "--quick 20,26)")
    p.add_argument("--batches", type=_list(POSITIVE), default=None,
                   help="batches for max pool, conv blocks and the model (default 64,1024,8192; fewer on CPU "
                        "and with --quick)")
    p.add_argument("--ops", type=_list(str), default=None,
                   help="activations to time (default all; --quick 4): names of dlkern's activation catalog, which "
                        "the host and activations suites time; the activations suite alone also takes its variants "
                        "(swish_channel)")
    p.add_argument("--compile-modes", type=_list(_choice(COMPILE_MODES + ["none"])), default=None,
                   help=f"torch.compile modes for the conv blocks and the model, from {','.join(COMPILE_MODES)}; "
                        "none: no torch.compile rows (its compile time dominates a short GPU run)")
    p.add_argument("--threads", type=POSITIVE, default=None,
                   help="CPU threads for torch (torch.set_num_threads). Default on a CPU run: 1 -- timings with "
                        "several threads on a small shared machine stall at every parallel region and do not "
                        "repeat run to run; on a GPU run: torch's default")
    p.add_argument("--data-dir", default=os.path.join(os.path.dirname(HERE), "data"),
                   help="where MNIST's IDX files are (as for python -m dlkern.train); synthetic digits otherwise")
    return p


def _check_ops(parser, ops, suites):
    """--ops against the table of every selected suite that times activations (of all of OPS_SUITES when none is
    selected): the host suite's is dlkern's activation catalog, the activations suite's adds variants
    (swish_channel)."""
    table = {"host": lambda: importlib.import_module("host").ACTIVATIONS,
             "activations": lambda: importlib.import_module("activations").ops()}
    for suite in [s for s in OPS_SUITES if s in suites] or OPS_SUITES:
        known = list(table[suite]())
        for name in ops:
            if name not in known:
                parser.error(f"argument --ops: invalid choice: {name!r} for the {suite} suite "
                             f"(choose from {', '.join(known)})")


def check_options(parser, args):
    """What argparse cannot check alone, still before anything is measured: the DLKERN_* variables dlkern reads
    when imported (dlkern/_env.py), --ops against the selected suites' tables, --device, the --out folder.
    Exits 2 in argparse's one line, as a mistyped option does."""
    try:
        import dlkern  # noqa: F401
    except ValueError as e:
        if not str(e).startswith("DLKERN_"):
            raise
        parser.error(str(e))
    if args.ops:
        _check_ops(parser, args.ops, args.suite)
    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("argument --device: cuda: no CUDA GPU is visible")
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        parser.error(f"argument --out: {e}")


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.compile_modes and "none" in args.compile_modes:
        if args.compile_modes != ["none"]:
            parser.error("argument --compile-modes: none cannot be combined with a mode")
        args.compile_modes = []
    check_options(parser, args)

    import torch

    from timing import Run, copy_gbps, environment

    threads = args.threads or (1 if args.device == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    run = Run(
        device=args.device, quick=args.quick, data_dir=args.data_dir,
        dtypes=[getattr(torch, DTYPES[d]) for d in args.dtype] if args.dtype else None,
        sizes=[2**k for k in args.sizes] if args.sizes else None, batches=args.batches, ops=args.ops,
        compile_modes=args.compile_modes,
    )
    started = time.perf_counter()
    env = environment(args.device)
    print("dlkern benchmark: " + ", ".join(f"{k} {v}" for k, v in env.items()))
    if run.cuda:
        torch.backends.cudnn.benchmark = True  # PyTorch's convolutions at their best: cuDNN picks by timing
        # The profiler (kernel counts) must start once before any CUDA graph is captured, or replaying that graph
        # under the profiler can fail (pytorch/pytorch#100441).
        from torch.profiler._utils import _init_for_cuda_graphs

        _init_for_cuda_graphs()
        print("cuDNN autotuning on (torch.backends.cudnn.benchmark); L2 flushed before every timed call")
    else:
        print(f"no GPU: CPU timings of what is meaningful on a CPU, on {torch.get_num_threads()} torch thread(s); the "
              "GPU-only suites and variants are skipped")
    run.roof_gbps = copy_gbps(run)
    print(f"copy bandwidth (the roof for memory-bound ops): {run.roof_gbps:.1f} GB/s")

    rows = [dict(suite="roof", case="copy", impl="copy", dtype="float32", gbps=run.roof_gbps, pct_roof=100.0)]
    for suite in args.suite:
        start = time.perf_counter()
        try:
            rows += importlib.import_module(MODULES.get(suite, suite)).run_suite(run)
        except Exception as e:  # a broken suite must not cost the others their results
            run.fail(suite, "the suite", e)
        print(f"[{suite}: {time.perf_counter() - start:.0f} s]")
        _write_csv(rows, env, os.path.join(args.out, "results.csv"))

    import plots
    import targets

    print()
    try:
        for line in plots.make_plots([dict(env, **r) for r in rows], args.out):
            print(f"plot: {line}")
    except Exception as e:  # the CSV is written; the targets still get their summary
        run.fail("plots", "drawing", e)
    results = targets.evaluate(rows, run.cuda)
    targets.report(results, env["device"], run.cuda, run.skipped, run.failed, args.out)
    print(f"\n{len(rows)} rows written to {os.path.join(args.out, 'results.csv')} "
          f"({time.perf_counter() - started:.0f} s in all)")
    return 1 if run.failed else 0


def _write_csv(rows, env, path):
    extra = sorted({k for r in rows for k in r} - set(COLUMNS))
    fields = list(env) + COLUMNS + extra
    with open(path + ".tmp", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            writer.writerow({**env, **{k: _cell(v) for k, v in r.items()}})
    os.replace(path + ".tmp", path)


def _cell(value):
    import torch

    from timing import dtype_name

    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, torch.dtype):
        return dtype_name(value)
    return value


if __name__ == "__main__":
    sys.exit(main())
