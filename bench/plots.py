"""PNG plots of a run's rows (matplotlib's Agg canvas through Figure: no GUI backend, no pyplot state).

- ``activations_bandwidth.png``: GB/s against size per implementation (median over the ops, band from the
  slowest to the fastest op), one panel per pass and dtype, with the copy bandwidth as the roof;
- ``maxpool_speedup.png``, ``convbn_speedup.png``, ``model_speedup.png``: speedup over PyTorch eager (ATen for
  max pool) as grouped bars, 1.0 marked.
"""

import itertools
import os
import statistics

from matplotlib.figure import Figure
from matplotlib.ticker import ScalarFormatter

IMPL_ORDER = ["eager", "compile", "compile-reduce-overhead", "compile-max-autotune", "dlkern", "dlkern+graph"]


def make_plots(rows, out_dir):
    """Writes every plot the rows allow; returns one line per plot (its path, or why it was not drawn). A plot
    this run does not draw is removed, so no earlier run's plot stands beside this run's results."""
    made = []
    for name, draw in [("activations_bandwidth", _activations), ("maxpool_speedup", _maxpool),
                       ("convbn_speedup", _convbn), ("model_speedup", _model)]:
        suite = name.split("_")[0]
        suite_rows = [r for r in rows if r["suite"] == suite and r.get("ms")]
        if not suite_rows:
            stale = os.path.join(out_dir, f"{name}.png")
            if os.path.exists(stale):
                os.remove(stale)
            made.append(f"{name}.png: not drawn, no {suite} rows in this run")
            continue
        path = os.path.join(out_dir, f"{name}.png")
        fig = draw(suite_rows, next((r["device"] for r in rows if r.get("device")), ""))
        fig.savefig(path, dpi=110)
        made.append(path)
    return made


def _rank(impl):
    return IMPL_ORDER.index(impl) if impl in IMPL_ORDER else len(IMPL_ORDER)


def _order(impls):
    return sorted(impls, key=_rank)


def _activations(rows, device):
    passes = list(dict.fromkeys(r["pass"] for r in rows))
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    fig = Figure(figsize=(6 * len(dtypes), 4 * len(passes)), layout="constrained")
    axes = fig.subplots(len(passes), len(dtypes), squeeze=False)
    roof = next((r["gbps"] * 100 / r["pct_roof"] for r in rows if r.get("pct_roof")), None)
    for (i, pass_), (j, dtype) in itertools.product(enumerate(passes), enumerate(dtypes)):
        ax = axes[i][j]
        panel = [r for r in rows if (r["pass"], r["dtype"]) == (pass_, dtype)]
        for impl in _order({r["impl"] for r in panel}):
            sizes = sorted({r["numel"] for r in panel if r["impl"] == impl})
            per_size = [[r["gbps"] for r in panel if r["impl"] == impl and r["numel"] == n] for n in sizes]
            ax.plot(sizes, [statistics.median(v) for v in per_size], marker="o", label=impl)
            ax.fill_between(sizes, [min(v) for v in per_size], [max(v) for v in per_size], alpha=0.15)
        if roof:
            ax.axhline(roof, color="black", linestyle="--", linewidth=1, label=f"copy {roof:.0f} GB/s")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("elements")
        ax.set_ylabel("GB/s (ideal bytes moved)")
        ax.set_title(f"{pass_}, {dtype}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"activations: bandwidth against size (median over ops, band: slowest to fastest op) -- {device}")
    return fig


def _bars(rows, device, title, panel_key, group_key, series_key, ylabel="speedup over PyTorch eager"):
    """Grouped bars of rows' speedup: one panel per panel_key, groups along x, one bar per series."""
    panels = list(dict.fromkeys(panel_key(r) for r in rows))
    fig = Figure(figsize=(max(6, 1.2 * len({group_key(r) for r in rows})) * len(panels), 4.5), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, panel in zip(axes, panels):
        panel_rows = [r for r in rows if panel_key(r) == panel and r.get("speedup")]
        groups = list(dict.fromkeys(group_key(r) for r in panel_rows))
        series = list(dict.fromkeys(series_key(r) for r in panel_rows))
        width = 0.8 / max(len(series), 1)
        for i, s in enumerate(series):
            values = {group_key(r): r["speedup"] for r in panel_rows if series_key(r) == s}
            xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
            bars = ax.bar(xs, [values.get(g, float("nan")) for g in groups], width, label=s)
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.axhline(1.0, color="black", linewidth=1)
        ax.set_yscale("log", base=2)
        speedups = [r["speedup"] for r in panel_rows] + [1.0]
        ax.set_ylim(min(speedups) / 1.3, max(speedups) * 2.0)  # room for the labels and the legend  # 2x faster and 2x slower the same height from the 1.0 line
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.set_xticks(range(len(groups)), groups, fontsize=8)
        ax.set_ylabel(ylabel)
        ax.set_title(str(panel))
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{title} -- {device}")
    return fig


def _series(r):
    """A bar's legend: the variant and what it times (Triton kernels, a C++ kernel, a PyTorch composite)."""
    return f"{r['impl']} ({r['kernel']})" if r.get("kernel") else r["impl"]


def _maxpool(rows, device):
    rows = [r for r in rows if r["impl"] == "dlkern"]
    kernel = next((r["kernel"] for r in rows if r.get("kernel")), "")
    return _bars(rows, device, f"max_pool2d 2x2: dlkern ({kernel}) over ATen", lambda r: r["dtype"],
                 lambda r: r["size"].replace("x", "\n", 1), lambda r: f"{r['layout']} {r['pass']}",
                 ylabel="speedup over ATen")


def _convbn(rows, device):
    rows = [r for r in rows if r["impl"] != "eager"]
    rows.sort(key=lambda r: _rank(r["impl"]))  # stable: groups keep the run's order
    return _bars(rows, device, "Conv3x3 -> BatchNorm -> ReLU blocks", lambda r: r["pass"],
                 lambda r: f"{r['case']}\nbatch {r['batch']}", _series)


def _model(rows, device):
    rows = [r for r in rows if r["impl"] != "eager"]
    rows.sort(key=lambda r: _rank(r["impl"]))
    return _bars(rows, device, "MnistCNN: training step and inference", lambda r: r["pass"],
                 lambda r: f"batch {r['batch']}", _series)
