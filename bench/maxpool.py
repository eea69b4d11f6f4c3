"""Max pool: dlkern's C++/CUDA kernels against ATen's (torch.nn.functional.max_pool2d), side by side.

The inputs of the MNIST CNN's three 2x2 pools (32x28x28, 32x12x12, 32x4x4 per image) at each batch, NCHW and
channels_last, every dtype asked for:

- ``fwd``: the forward under ``torch.no_grad()`` (inference). On CUDA both write int64 indices; ATen's CPU
  kernel skips them when no gradient is needed, dlkern's always writes them.
- ``bwd``: the backward alone, ``torch.autograd.grad`` through a retained graph (no accumulation into .grad).

GB/s counts the bytes an ideal kernel moves, the same for both implementations: forward reads the input and
writes values and int64 indices; backward reads the output gradient and the indices and writes the input
gradient. ``pct_roof`` is that against the copy bandwidth measured at the start of the run -- on a GPU only,
where the L2 cache is flushed before every call: on a CPU these working sets (0.1-6 MB at batch 64) stay in
its caches, and a DRAM copy is no roof for them (an earlier run showed 140-227% of it).
"""

import torch
import torch.nn.functional as TF

import dlkern.functional as F
from timing import dtype_name, free_memory, noisy, print_table, timed

# (C, H, W) entering each of the MNIST CNN's 2x2 pools
MNIST_POOL_INPUTS = [(32, 28, 28), (32, 12, 12), (32, 4, 4)]
IMPLS = {"dlkern": F.max_pool2d, "eager": TF.max_pool2d}


def _nbytes(x):
    """Input (or its gradient) once, pooled values (or their gradient) and int64 indices once."""
    pooled = x.numel() // 4
    return x.numel() * x.element_size() + pooled * (x.element_size() + 8)


def _kernel(impl, run):
    """What a row times."""
    if impl == "eager":
        return "ATen"
    return "CUDA kernel" if run.cuda else "C++ kernel"


def run_suite(run):
    dtypes = run.dtypes or ([torch.float32, torch.bfloat16] if run.cuda else [torch.float32])
    rows = []
    for dtype in dtypes:
        for batch in run.batch_sizes():
            for c, h, w in MNIST_POOL_INPUTS:
                for layout in ("nchw", "channels_last"):
                    x = torch.randn(batch, c, h, w, device=run.device, dtype=dtype)
                    if layout == "channels_last":
                        x = x.contiguous(memory_format=torch.channels_last)
                    xg = x.detach().requires_grad_()
                    for pass_ in ("fwd", "bwd"):
                        times, spreads = {}, {}
                        for impl, pool in IMPLS.items():
                            if pass_ == "fwd":
                                def step(pool=pool):
                                    with torch.no_grad():
                                        pool(x, 2)
                            else:
                                y = pool(xg, 2)
                                g = torch.randn_like(y)

                                def step(y=y, g=g):
                                    torch.autograd.grad(y, xg, g, retain_graph=True)
                            times[impl], spreads[impl] = timed(step, run)
                        nbytes = _nbytes(x)
                        for impl, ms in times.items():
                            gbps = nbytes / ms / 1e6
                            rows.append(dict(
                                suite="maxpool", case="max_pool2d 2x2", impl=impl, dtype=dtype_name(dtype),
                                layout=layout, size=f"{batch}x{c}x{h}x{w}", batch=batch, ms=ms,
                                speedup=times["eager"] / ms, baseline="eager",
                                gbps=gbps, pct_roof=100 * gbps / run.roof_gbps if run.cuda else None,
                                spread=spreads[impl], note=noisy(spreads[impl]), kernel=_kernel(impl, run),
                                **{"pass": pass_},
                            ))
                    del x, xg, y, g
            free_memory(run)
    print(f"\nmax_pool2d 2x2 on {run.device}: dlkern against ATen (eager); speedup = ATen ms / dlkern ms")
    table = [dict(r, eager_ms=r["ms"] * r["speedup"]) for r in rows if r["impl"] == "dlkern"]
    print_table(table, [
        ("size", "input", "{}"), ("layout", "layout", "{}"), ("dtype", "dtype", "{}"), ("pass", "pass", "{}"),
        ("ms", "dlkern ms", "{:.4f}"), ("eager_ms", "ATen ms", "{:.4f}"), ("speedup", "speedup", "{:.2f}x"),
        ("gbps", "dlkern GB/s", "{:.1f}"), ("pct_roof", "% roof", "{:.0f}"), ("spread", "spread", "{:.0%}"),
        ("note", "note", "{}"),
    ])
    return rows
