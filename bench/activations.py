"""Benchmark: dlkern's activations against eager PyTorch and torch.compile, on a CUDA GPU.

Every op, forward and forward+backward, fp32 and bf16, 2^16 .. 2^28 elements (sizes that do not fit in free
GPU memory are skipped): median time (triton.testing.do_bench), effective bandwidth and its share of the
device-to-device copy bandwidth measured in the same run. The bandwidth counts the bytes an ideal kernel must
move (forward: read x, write y; forward+backward: that plus read grad_output and the saved tensor, write
grad_input), the same for every implementation, so GB/s compares like with like.

``run_suite(quick, dtypes, out_rows)`` appends one dict per measurement (op, pass, dtype, numel, impl,
median_ms, gbps, pct_copy_bw) and prints a table; ``python bench/activations.py [--quick]`` runs it alone.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from timing import median_ms, print_table  # noqa: E402

SIZES = [2**16, 2**20, 2**24, 2**28]
QUICK_SIZES = [2**20, 2**24]
CHANNELS = 64  # prelu / learnable swish: inputs viewed as (N, 64, 256), one parameter per channel
IMPLS = ["eager", "compile", "dlkern"]


def _ops():
    """(name, dlkern fn(x, w), PyTorch fn(x, w), has a per-channel parameter)."""
    import torch.nn.functional as TF

    import dlkern.functional as F

    def chan(w, x):
        return w.view(1, -1, 1)

    return [
        ("relu", lambda x, w: F.relu(x), lambda x, w: TF.relu(x), False),
        ("leaky_relu", lambda x, w: F.leaky_relu(x, 0.1), lambda x, w: TF.leaky_relu(x, 0.1), False),
        ("prelu", lambda x, w: F.prelu(x, w), lambda x, w: TF.prelu(x, w), True),
        ("elu", lambda x, w: F.elu(x), lambda x, w: TF.elu(x), False),
        ("softplus", lambda x, w: F.softplus(x), lambda x, w: TF.softplus(x), False),
        ("silu", lambda x, w: F.silu(x), lambda x, w: TF.silu(x), False),
        ("gelu", lambda x, w: F.gelu(x), lambda x, w: TF.gelu(x), False),
        ("gelu_tanh", lambda x, w: F.gelu(x, approximate="tanh"), lambda x, w: TF.gelu(x, approximate="tanh"), False),
        ("sigmoid", lambda x, w: F.sigmoid(x), lambda x, w: torch.sigmoid(x), False),
        ("tanh", lambda x, w: F.tanh(x), lambda x, w: torch.tanh(x), False),
        ("hardsigmoid", lambda x, w: F.hardsigmoid(x), lambda x, w: TF.hardsigmoid(x), False),
        ("hardtanh", lambda x, w: F.hardtanh(x), lambda x, w: TF.hardtanh(x), False),
        ("swish", lambda x, w: F.swish(x, 1.5), lambda x, w: x * torch.sigmoid(1.5 * x), False),
        ("swish_channel", lambda x, w: F.swish(x, w), lambda x, w: x * torch.sigmoid(chan(w, x) * x), True),
        ("hard_logistic", lambda x, w: F.hard_logistic(x), lambda x, w: (0.25 * x + 0.5).clamp(0, 1), False),
    ]


def _copy_gbps(device, dtype, numel):
    """Device-to-device copy bandwidth (read + write), the ceiling for an elementwise kernel."""
    src = torch.empty(numel, dtype=dtype, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device)
    return 2 * src.numel() * src.element_size() / ms / 1e6


def _fits(numel, dtype, device):
    if device != "cuda":
        return True
    need = 8 * numel * max(torch.tensor([], dtype=dtype).element_size(), 4)  # x, y, g, dx, saved, fp32 dw
    return need < 0.8 * torch.cuda.mem_get_info()[0]


def _step(fn, x, w, g, backward):
    if not backward:
        return lambda: fn(x, w)
    inputs = [x] if w is None else [x, w]

    def step():
        # autograd.grad, not .backward(): no gradient accumulation kernels in the timing
        torch.autograd.grad(fn(x, w), inputs, g)

    return step


def _run(quick, dtypes, out_rows, device, sizes=None):
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    dtypes = dtypes or [torch.float32, torch.bfloat16]
    sizes = sizes or (QUICK_SIZES if quick else SIZES)
    rows = []
    copy_bw = {}
    for dtype in dtypes:
        fitting = [n for n in sizes if _fits(n, dtype, device)]
        skipped = sorted(set(sizes) - set(fitting))
        if skipped:
            print(f"activations {dtype}: skipping sizes {skipped}, not enough free GPU memory")
        if not fitting:
            continue
        copy_bw[dtype] = _copy_gbps(device, dtype, max(fitting))
        print(f"activations {dtype}: copy bandwidth {copy_bw[dtype]:.0f} GB/s")
        for name, ours, theirs, per_channel in _ops():
            torch._dynamo.reset()
            impls = {"eager": theirs, "compile": torch.compile(theirs, dynamic=True), "dlkern": ours}
            for numel in fitting:
                x = torch.randn(numel, device=device, dtype=dtype).view(-1, CHANNELS, 256)
                w = torch.full((CHANNELS,), 0.25, device=device, dtype=dtype) if per_channel else None
                g = torch.randn_like(x)
                for backward in (False, True):
                    xi = x.detach().requires_grad_(backward)
                    wi = None if w is None else w.detach().requires_grad_(backward)
                    moved = (5 if backward else 2) * numel * x.element_size()
                    for impl in IMPLS:
                        ms = median_ms(_step(impls[impl], xi, wi, g, backward), device)
                        gbps = moved / ms / 1e6
                        rows.append(dict(
                            op=name, dtype=str(dtype).replace("torch.", ""), numel=numel, impl=impl,
                            median_ms=ms, gbps=gbps, pct_copy_bw=100 * gbps / copy_bw[dtype],
                            **{"pass": "fwd+bwd" if backward else "fwd"},
                        ))
                del x, g, w
    torch._dynamo.reset()
    print_table(rows, [
        ("op", "op", "{}"), ("pass", "pass", "{}"), ("dtype", "dtype", "{}"), ("numel", "numel", "{}"),
        ("impl", "impl", "{}"), ("median_ms", "ms", "{:.4f}"), ("gbps", "GB/s", "{:.0f}"),
        ("pct_copy_bw", "% copy", "{:.0f}"),
    ])
    out_rows.extend(dict(suite="activations", **r) for r in rows)


def run_suite(quick, dtypes, out_rows):
    """Times every activation (see the module docstring); appends rows to out_rows and prints a table."""
    if not torch.cuda.is_available():
        print("activations: skipped, the activation suite needs a CUDA GPU (Triton kernels)")
        return
    _run(quick, dtypes, out_rows, "cuda")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"sizes {QUICK_SIZES} only")
    args = parser.parse_args(argv)
    run_suite(args.quick, None, [])


if __name__ == "__main__":
    main()
