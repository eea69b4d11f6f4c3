"""What the benchmark suites share: the run's settings, timing, the copy-bandwidth roof, kernel counts, peak
memory, the environment every result row records, and tables."""

import dataclasses
import datetime
import gc
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclasses.dataclass
class Run:
    """One benchmark run's settings, handed to every suite's ``run_suite(run) -> rows``.

    ``None`` for ``sizes``, ``batches`` or ``ops`` means the suite's own defaults (fewer with ``quick``).
    ``roof_gbps`` is the device-to-device copy bandwidth measured at the start of the run. ``skipped`` collects
    (suite, what, reason) for everything a suite did not measure; ``failed`` collects (suite, what, error).
    """

    device: str
    quick: bool = False
    dtypes: list = None
    sizes: list = None
    batches: list = None
    ops: list = None
    compile_modes: list = None
    data_dir: str = "data"
    roof_gbps: float = None
    skipped: list = dataclasses.field(default_factory=list)
    failed: list = dataclasses.field(default_factory=list)

    @property
    def cuda(self):
        return self.device == "cuda"

    def batch_sizes(self):
        """--batches, else the MNIST batch (64) and large ones: fewer with --quick, smaller on a CPU."""
        if self.batches:
            return self.batches
        if self.cuda:
            return [64, 8192] if self.quick else [64, 1024, 8192]
        return [64] if self.quick else [64, 1024]

    def skip(self, suite, what, reason):
        self.skipped.append((suite, what, reason))
        print(f"{suite}: skipped {what}: {reason}")

    def fail(self, suite, what, error):
        """Records and prints `error`, with its traceback (called from an ``except`` block)."""
        traceback.print_exc()
        self.failed.append((suite, what, f"{type(error).__name__}: {error}"))
        print(f"{suite}: FAILED {what}: {type(error).__name__}: {error}")


# A row whose timings spread (p90 - p10) by more than this share of the median is flagged as noisy.
NOISY_SPREAD = 0.25


def timed(fn, run):
    """(median ms of one fn() call, spread) after warm-up; spread = (p90 - p10) / median over the repetitions.

    CUDA: triton.testing.do_bench -- CUDA events around each call, the L2 cache flushed (a 256 MB buffer
    zeroed) before each, over the repetitions that fit in `rep` ms. CPU: perf_counter around each call, at least
    15 calls and as many as fit in the time budget (0.5 s, 2 s without --quick).
    """
    if run.cuda:
        import triton.testing

        warmup, rep = (10, 50) if run.quick else (25, 200)
        times = triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="all")
    else:
        budget_s = 0.5 if run.quick else 2.0
        for _ in range(3):
            fn()
        times, spent = [], 0.0
        while len(times) < 15 or (spent < budget_s and len(times) < 2000):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
            spent += times[-1]
        times = [1e3 * t for t in times]
    median = statistics.median(times)
    deciles = statistics.quantiles(times, n=10)
    return median, (deciles[-1] - deciles[0]) / median


def median_ms(fn, run):
    """Median ms of one fn() call (see :func:`timed`)."""
    return timed(fn, run)[0]


def noisy(spread):
    """The note for a row whose timings spread widely, else None."""
    return f"noisy: p90-p10 = {100 * spread:.0f}% of the median" if spread > NOISY_SPREAD else None


def first_call_s(fn, run):
    """Wall seconds of fn()'s first call: Dynamo/Inductor compilation, Triton JIT and autotuning happen here."""
    sync(run)
    start = time.perf_counter()
    fn()
    sync(run)
    return time.perf_counter() - start


def sync(run):
    if run.cuda:
        torch.cuda.synchronize()


def copy_gbps(run):
    """Device-to-device copy bandwidth (bytes read + written per second / 1e9): the roof of an elementwise or
    otherwise memory-bound op. CUDA: a 1 GiB copy (less when memory is short); CPU: 64 MiB."""
    nbytes = 1 << 30 if run.cuda else 1 << 26
    if run.cuda:
        nbytes = min(nbytes, int(torch.cuda.mem_get_info()[0] * 0.1) // 4 * 4)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=run.device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), run)
    del src, dst
    free_memory(run)
    return 2 * nbytes / ms / 1e6


def launches(step):
    """GPU kernels, copies and memsets one step() runs, as torch.profiler (CUPTI) records them. Under a CUDA graph
    these come from one graph launch. None when the profiler cannot say."""
    from torch.profiler import ProfilerActivity, profile

    try:
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    except Exception as e:  # a profiler problem must not cost the timing rows
        print(f"  (launch count unavailable: {type(e).__name__}: {e})")
        return None


def peak_mb(step):
    """torch.cuda.max_memory_allocated while one step() runs, in MB (model, optimizer state, inputs included)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 1e6


def free_memory(run):
    """Drops compiled code (and CUDA-graph trees) and returns cached GPU memory, between variants and batches."""
    if "torch._dynamo" in sys.modules:  # importing Dynamo only to reset it costs seconds
        torch._dynamo.reset()
    gc.collect()
    if run.cuda:
        torch.cuda.empty_cache()


def environment(device):
    """What every row records: the device, versions, the commit (``+dirty`` with uncommitted changes; the
    DLKERN_COMMIT variable when there is no git checkout) and the time the run started."""
    commit = os.environ.get("DLKERN_COMMIT", "")
    if not commit:
        git = ["git", "-C", HERE]
        try:
            commit = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    check=False).stdout.strip()
            dirty = subprocess.run(git + ["status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                   text=True, check=False).stdout.strip()
            if commit and dirty:
                commit += "+dirty"
        except OSError:
            pass
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    if device == "cuda":
        hw = torch.cuda.get_device_name()
    else:
        hw = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    return {
        "device": hw,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda or "",
        "commit": commit or "unknown",
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def print_table(rows, columns):
    """rows: list of dicts; columns: list of (key, header, format). Missing values print empty."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        cells.append([("" if r.get(k) is None else fmt.format(r[k])) for k, _, fmt in columns])
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    for i, line in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(line, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
