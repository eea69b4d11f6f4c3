"""Conv blocks: dlkern.nn.ConvBNReLU2d against eager PyTorch (cuDNN conv, BatchNorm, ReLU) and torch.compile.

The MNIST CNN's three Conv3x3 -> BatchNorm -> ReLU blocks at each batch (64, 1024 and 8192; 64 and 8192 with
``--quick``), and each with its MaxPool2d(2) (case ``blockN+pool``): dlkern.nn.ConvBNActPool2d (the pool fused),
``dlkern-unfused`` (ConvBNReLU2d then dlkern's max pool), eager and torch.compile; in two passes:

- ``train``: training-mode forward and backward, ``torch.autograd.grad`` for the parameters (and the input,
  except in the first block, whose input is the image) -- no accumulation into .grad;
- ``eval``: eval-mode forward under ``torch.no_grad()`` (dlkern folds BatchNorm into the conv).

Each row: median time, speedup over eager, TFLOP/s of the convolutions (forward 2*N*C_out*OH*OW*C_in*9; the
backward adds as much for the weight gradient and again for the input gradient), GPU kernels per step
(torch.profiler), peak memory, and the first call's time (compilation, autotuning). torch.compile runs in each
mode asked for (default and reduce-overhead with ``--quick``, max-autotune too otherwise), freshly compiled for
every block, batch and pass. CUDA only: without a GPU dlkern's Triton kernels do not run.
"""

import torch
from torch import nn

from timing import first_call_s, free_memory, launches, median_ms, peak_mb, print_table

# (name, C_in, C_out, H=W, padding) of the MNIST CNN's blocks.
BLOCKS = [("block1", 1, 32, 28, 1), ("block2", 32, 32, 14, 0), ("block3", 32, 32, 6, 0)]


def _build(impl, c_in, c_out, padding, mode, pool=False):
    import dlkern

    if impl == "dlkern" and pool:
        model = dlkern.nn.ConvBNActPool2d(c_in, c_out, 3, padding=padding, pool_kernel_size=2)
    elif impl.startswith("dlkern"):
        model = dlkern.nn.ConvBNReLU2d(c_in, c_out, 3, padding=padding)
        if pool:
            model = nn.Sequential(model, dlkern.nn.MaxPool2d(2))
    else:
        model = nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=padding), nn.BatchNorm2d(c_out), nn.ReLU())
        if pool:
            model.append(nn.MaxPool2d(2))
    model = model.cuda().train(mode == "train")
    if impl.startswith("compile"):
        compile_mode = impl.removeprefix("compile").removeprefix("-") or None
        return model, torch.compile(model, mode=compile_mode)
    return model, model


def _step(params, callable_, x, mode, cudagraphs):
    if mode == "eval":
        def step():
            if cudagraphs:
                torch.compiler.cudagraph_mark_step_begin()
            with torch.no_grad():
                callable_(x)
        return step
    inputs = params + ([x] if x.requires_grad else [])
    grad = None

    def step():
        nonlocal grad
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        out = callable_(x)
        if grad is None:
            grad = torch.randn_like(out)
        torch.autograd.grad(out, inputs, grad)
    return step


def _flops(batch, c_in, c_out, size, padding, mode):
    out = size + 2 * padding - 2
    fwd = 2 * batch * c_out * out * out * c_in * 9
    if mode == "eval":
        return fwd
    return fwd * (3 if c_in > 1 else 2)  # + weight gradient (+ input gradient)


def run_suite(run):
    if not run.cuda:
        run.skip("convbn", "the whole suite", "the fused blocks are Triton kernels: without a CUDA GPU they run in "
                 "Triton's interpreter (far too slow to time) or as dlkern's PyTorch-composite fallback")
        return []
    batches = run.batches or ([64, 8192] if run.quick else [64, 1024, 8192])
    modes = run.compile_modes if run.compile_modes is not None else (
        ["default"] if run.quick else ["default", "reduce-overhead", "max-autotune"])
    impls = ["eager"] + [f"compile-{m}" if m != "default" else "compile" for m in modes] + ["dlkern"]
    rows = []
    for (name, c_in, c_out, size, padding), pool in [(b, p) for p in (False, True) for b in BLOCKS]:
        name = name + "+pool" if pool else name
        for batch in batches:
            x = torch.randn(batch, c_in, size, size, device="cuda", requires_grad=c_in > 1)
            for mode in ("train", "eval"):
                times = {}
                for impl in impls + (["dlkern-unfused"] if pool else []):
                    try:
                        torch.manual_seed(0)
                        module, callable_ = _build(impl, c_in, c_out, padding, mode, pool)
                        cudagraphs = impl in ("compile-reduce-overhead", "compile-max-autotune")
                        step = _step(list(module.parameters()), callable_, x, mode, cudagraphs)
                        compile_s = first_call_s(step, run)
                        for _ in range(3):  # cudagraph trees record on a later call; warm caches
                            step()
                        ms = median_ms(step, run)
                        times[impl] = ms
                        rows.append(dict(
                            suite="convbn", case=name, impl=impl, dtype="float32", layout="nchw",
                            size=f"{c_in}->{c_out} {size}x{size}", batch=batch, ms=ms, baseline="eager",
                            speedup=times["eager"] / ms if "eager" in times else None,
                            tflops=_flops(batch, c_in, c_out, size, padding, mode) / ms / 1e9,
                            launches=launches(step), peak_mb=peak_mb(step), compile_s=compile_s,
                            **{"pass": mode},
                        ))
                    except Exception as e:  # one failing variant must not cost the others
                        run.fail("convbn", f"{impl} {name} batch {batch} {mode}", e)
                    finally:
                        module = callable_ = step = None
                        free_memory(run)
            del x
    print("\nconv blocks: Conv3x3 -> BatchNorm -> ReLU (train: forward + backward; eval: forward); "
          "x eager = eager ms / ms")
    print_table(rows, [
        ("case", "block", "{}"), ("batch", "batch", "{}"), ("pass", "pass", "{}"), ("impl", "impl", "{}"),
        ("ms", "ms", "{:.4f}"), ("speedup", "x eager", "{:.2f}"), ("tflops", "TFLOP/s", "{:.1f}"),
        ("launches", "kernels", "{}"), ("peak_mb", "peak MB", "{:.0f}"), ("compile_s", "1st call s", "{:.1f}"),
    ])
    return rows
