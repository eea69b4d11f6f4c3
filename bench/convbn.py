"""Benchmark: dlkern.nn.ConvBNReLU2d against eager PyTorch (cuDNN conv + BN + ReLU) and torch.compile.

The MNIST CNN's three Conv->BN->ReLU blocks, training (forward + backward) and eval (forward), at batch 64,
512 and 4096: median time (triton.testing.do_bench), ratio to eager, and CUDA kernels launched per step
(torch.profiler). ``run_suite(quick, out_rows)`` appends one dict per measurement and prints a table.
"""

import torch
from torch import nn

# (name, C_in, C_out, H=W, padding) of the MNIST CNN's blocks.
BLOCKS = [("block1", 1, 32, 28, 1), ("block2", 32, 32, 14, 0), ("block3", 32, 32, 6, 0)]
BATCHES = [64, 512, 4096]
IMPLS = ["eager", "compile", "compile-max-autotune", "dlkern"]


def _build(impl, c_in, c_out, padding):
    import dlkern

    if impl == "dlkern":
        return dlkern.nn.ConvBNReLU2d(c_in, c_out, 3, padding=padding).cuda()
    model = nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=padding), nn.BatchNorm2d(c_out), nn.ReLU()).cuda()
    if impl == "compile":
        return torch.compile(model)
    if impl == "compile-max-autotune":
        return torch.compile(model, mode="max-autotune")
    return model


def _step_fn(model, mode, x):
    if mode == "eval":
        model.eval()

        def step():
            with torch.no_grad():
                model(x)
    else:
        model.train()
        grad = None

        def step():
            nonlocal grad
            out = model(x)
            if grad is None:
                grad = torch.randn_like(out)
            out.backward(grad)
    return step


def _launches(step):
    """CUDA kernels (and memsets/copies) one step launches, as the profiler sees them."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def run_suite(quick: bool, out_rows: list) -> None:
    if not torch.cuda.is_available():
        print("bench/convbn.py: skipped, no CUDA GPU visible (Triton kernels need one to be timed)")
        return
    import triton.testing

    batches = BATCHES[:2] if quick else BATCHES
    rows = []
    for name, c_in, c_out, size, padding in BLOCKS:
        for batch in batches:
            x = torch.randn(batch, c_in, size, size, device="cuda", requires_grad=c_in > 1)
            for mode in ("train", "eval"):
                eager_ms = None
                for impl in IMPLS:
                    torch.manual_seed(0)
                    step = _step_fn(_build(impl, c_in, c_out, padding), mode, x)
                    for _ in range(3):  # compile, autotune, warm caches
                        step()
                    ms = triton.testing.do_bench(step, warmup=25, rep=100 if quick else 300, return_mode="median")
                    eager_ms = ms if impl == "eager" else eager_ms
                    rows.append(dict(
                        bench="convbn", block=name, shape=f"{c_in}->{c_out} {size}x{size}", batch=batch, mode=mode,
                        impl=impl, ms=ms, speedup_vs_eager=eager_ms / ms, launches=_launches(step),
                        gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                    ))
                    x.grad = None
    out_rows.extend(rows)
    header = f"{'block':8} {'batch':>6} {'mode':5} {'impl':22} {'ms':>9} {'x eager':>8} {'launches':>8}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['block']:8} {r['batch']:>6} {r['mode']:5} {r['impl']:22} {r['ms']:>9.4f} "
              f"{r['speedup_vs_eager']:>8.2f} {r['launches']:>8}")


if __name__ == "__main__":
    import sys

    run_suite("--quick" in sys.argv, [])
