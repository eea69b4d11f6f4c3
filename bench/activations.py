"""Activations: dlkern's Triton kernels against eager PyTorch and torch.compile, on a CUDA GPU.

Every op (a few with ``--quick``), forward and forward+backward, each dtype asked for (fp32 and bf16 by
default), 2^16 .. 2^28 elements (2^20 and 2^26 with ``--quick``; sizes that do not fit in free GPU memory are
skipped): median time, effective bandwidth and its share of the copy bandwidth measured at the start of the run.
GB/s counts the bytes an ideal kernel must move (forward: read x, write y; forward+backward: that plus read
grad_output and the saved tensor, write grad_input), the same for every implementation, so GB/s compares like
with like. The backward runs through ``torch.autograd.grad`` (no accumulation kernels in the timing).
torch.compile compiles each PyTorch function once per op and dtype with ``dynamic=True`` (one compilation for
every size).

Without CUDA the suite measures nothing: on a CPU the Triton kernels run either in Triton's interpreter (far
too slow to be worth timing) or not at all (dlkern's PyTorch-composite fallback).
"""

import torch

from timing import dtype_name, free_memory, median_ms, print_table

SIZES = [2**k for k in range(16, 29, 2)]
QUICK_SIZES = [2**20, 2**26]
QUICK_OPS = ["relu", "gelu", "silu", "prelu"]
CHANNELS = 64  # prelu / learnable swish: inputs viewed as (N, 64, 256), one parameter per channel
IMPLS = ["eager", "compile", "dlkern"]


def ops():
    """{name: (dlkern fn(x, w), PyTorch fn(x, w), has a per-channel parameter)}."""
    import torch.nn.functional as TF

    import dlkern.functional as F

    def chan(w):
        return w.view(1, -1, 1)

    return {
        "relu": (lambda x, w: F.relu(x), lambda x, w: TF.relu(x), False),
        "leaky_relu": (lambda x, w: F.leaky_relu(x, 0.1), lambda x, w: TF.leaky_relu(x, 0.1), False),
        "prelu": (lambda x, w: F.prelu(x, w), lambda x, w: TF.prelu(x, w), True),
        "elu": (lambda x, w: F.elu(x), lambda x, w: TF.elu(x), False),
        "softplus": (lambda x, w: F.softplus(x), lambda x, w: TF.softplus(x), False),
        "silu": (lambda x, w: F.silu(x), lambda x, w: TF.silu(x), False),
        "gelu": (lambda x, w: F.gelu(x), lambda x, w: TF.gelu(x), False),
        "gelu_tanh": (lambda x, w: F.gelu(x, approximate="tanh"), lambda x, w: TF.gelu(x, approximate="tanh"), False),
        "sigmoid": (lambda x, w: F.sigmoid(x), lambda x, w: torch.sigmoid(x), False),
        "tanh": (lambda x, w: F.tanh(x), lambda x, w: torch.tanh(x), False),
        "hardsigmoid": (lambda x, w: F.hardsigmoid(x), lambda x, w: TF.hardsigmoid(x), False),
        "hardtanh": (lambda x, w: F.hardtanh(x), lambda x, w: TF.hardtanh(x), False),
        "swish": (lambda x, w: F.swish(x, 1.5), lambda x, w: x * torch.sigmoid(1.5 * x), False),
        "swish_channel": (lambda x, w: F.swish(x, w), lambda x, w: x * torch.sigmoid(chan(w) * x), True),
        "hard_logistic": (lambda x, w: F.hard_logistic(x), lambda x, w: (0.25 * x + 0.5).clamp(0, 1), False),
    }


def _fits(numel, dtype):
    need = 8 * numel * max(torch.tensor([], dtype=dtype).element_size(), 4)  # x, y, g, dx, saved, fp32 dw
    return need < 0.8 * torch.cuda.mem_get_info()[0]


def _step(fn, x, w, g, backward):
    if not backward:
        return lambda: fn(x, w)
    inputs = [x] if w is None else [x, w]
    return lambda: torch.autograd.grad(fn(x, w), inputs, g)


def run_suite(run):
    if not run.cuda:
        run.skip("activations", "the whole suite", "its kernels are Triton: without a CUDA GPU they run in Triton's "
                 "interpreter (far too slow to time) or not at all (dlkern's PyTorch-composite fallback)")
        return []
    table = ops()
    names = run.ops or (QUICK_OPS if run.quick else list(table))
    unknown = sorted(set(names) - set(table))
    if unknown:
        raise ValueError(f"unknown activation(s) {unknown}; choose from {sorted(table)}")
    sizes = run.sizes or (QUICK_SIZES if run.quick else SIZES)
    rows = []
    for dtype in run.dtypes or [torch.float32, torch.bfloat16]:
        fitting = [n for n in sizes if _fits(n, dtype)]
        if len(fitting) < len(sizes):
            run.skip("activations", f"{dtype_name(dtype)} sizes {sorted(set(sizes) - set(fitting))}",
                     "not enough free GPU memory")
        for name in names:
            ours, theirs, per_channel = table[name]
            free_memory(run)  # torch._dynamo.reset(): each op compiles afresh
            impls = {"eager": theirs, "compile": torch.compile(theirs, dynamic=True), "dlkern": ours}
            for numel in fitting:
                x = torch.randn(numel, device="cuda", dtype=dtype).view(-1, CHANNELS, 256)
                w = torch.full((CHANNELS,), 0.25, device="cuda", dtype=dtype) if per_channel else None
                g = torch.randn_like(x)
                for backward in (False, True):
                    xi = x.detach().requires_grad_(backward)
                    wi = None if w is None else w.detach().requires_grad_(backward)
                    moved = (5 if backward else 2) * numel * x.element_size()
                    times = {impl: median_ms(_step(impls[impl], xi, wi, g, backward), run) for impl in IMPLS}
                    for impl, ms in times.items():
                        gbps = moved / ms / 1e6
                        rows.append(dict(
                            suite="activations", case=name, impl=impl, dtype=dtype_name(dtype), numel=numel,
                            size=f"2^{numel.bit_length() - 1}", ms=ms, speedup=times["eager"] / ms,
                            baseline="eager", gbps=gbps, pct_roof=100 * gbps / run.roof_gbps,
                            **{"pass": "fwd+bwd" if backward else "fwd"},
                        ))
                del x, g, w, xi, wi
    free_memory(run)
    print(f"\nactivations: eager PyTorch, torch.compile and dlkern; % roof = share of the {run.roof_gbps:.0f} GB/s "
          "copy bandwidth")
    print_table(rows, [
        ("case", "op", "{}"), ("pass", "pass", "{}"), ("dtype", "dtype", "{}"), ("size", "numel", "{}"),
        ("impl", "impl", "{}"), ("ms", "ms", "{:.4f}"), ("speedup", "x eager", "{:.2f}"), ("gbps", "GB/s", "{:.0f}"),
        ("pct_roof", "% roof", "{:.0f}"),
    ])
    return rows
