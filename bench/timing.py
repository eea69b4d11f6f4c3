"""Timing and environment helpers shared by the benchmark suites."""

import datetime
import os
import platform
import statistics
import subprocess
import time

import torch


def median_ms(fn, device, reps=None, warmup=3):
    """Median wall time of fn() in milliseconds.

    CUDA: triton.testing.do_bench (CUDA events, L2 flushed between runs, median). CPU: perf_counter over
    `reps` runs after `warmup` runs.
    """
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps or 15):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def environment(device):
    """What every result row records: the machine, versions, commit and time."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
            cwd=os.path.dirname(os.path.abspath(__file__)), check=False,
        ).stdout.strip()
    except OSError:
        commit = ""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    if device == "cuda":
        hw = torch.cuda.get_device_name()
    else:
        hw = f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"
    return {
        "device": hw,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda or "",
        "commit": commit or "unknown",
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def print_table(rows, columns):
    """rows: list of dicts; columns: list of (key, header, format)."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        cells.append([("" if r.get(k) is None else fmt.format(r[k])) for k, _, fmt in columns])
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    for i, line in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(line, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
