"""Max pool: dlkern's C++/CUDA kernels against ATen's F.max_pool2d, side by side in one run.

Shapes are the MNIST CNN's three pooling layers (after each conv block), at batch 64 and a large batch,
NCHW and channels_last, forward and forward+backward.
"""

import torch
import torch.nn.functional as TF

import dlkern.functional as F
from timing import median_ms, print_table

# (C, H, W) entering each of the MNIST CNN's 2x2 pools
MNIST_POOL_INPUTS = [(32, 28, 28), (32, 12, 12), (32, 4, 4)]


def run_suite(device, quick, rows):
    batches = [64] if quick else [64, 8192 if device == "cuda" else 1024]
    dtypes = [torch.float32] + ([torch.bfloat16] if device == "cuda" else [])
    suite_rows = []
    for dtype in dtypes:
        for batch in batches:
            for c, h, w in MNIST_POOL_INPUTS:
                for layout in ["nchw", "channels_last"]:
                    x = torch.randn(batch, c, h, w, device=device, dtype=dtype)
                    if layout == "channels_last":
                        x = x.to(memory_format=torch.channels_last)
                    xg = x.clone().requires_grad_()
                    grad = torch.randn_like(TF.max_pool2d(x, 2))
                    for pass_name in ["fwd", "fwd+bwd"]:
                        times = {}
                        for impl, pool in [("dlkern", F.max_pool2d), ("torch", TF.max_pool2d)]:
                            if pass_name == "fwd":
                                fn = lambda pool=pool: pool(x, 2)  # noqa: E731
                            else:
                                fn = lambda pool=pool: pool(xg, 2).backward(grad)  # noqa: E731
                            times[impl] = median_ms(fn, device, reps=5 if quick else 20)
                        # bytes moved: read input, write values and int64 indices (backward: the reverse)
                        out_elems = grad.numel()
                        nbytes = x.numel() * x.element_size() + out_elems * (x.element_size() + 8)
                        if pass_name == "fwd+bwd":
                            nbytes *= 2
                        suite_rows.append(dict(
                            suite="maxpool", op="max_pool2d", shape=f"{batch}x{c}x{h}x{w}", layout=layout,
                            dtype=str(dtype).replace("torch.", ""), pass_=pass_name,
                            dlkern_ms=times["dlkern"], torch_ms=times["torch"],
                            speedup=times["torch"] / times["dlkern"],
                            dlkern_gbps=nbytes / times["dlkern"] / 1e6,
                        ))
    print(f"\nmax_pool2d 2x2 on {device}: dlkern against torch.nn.functional.max_pool2d (medians)")
    print_table(suite_rows, [
        ("shape", "input", "{}"), ("layout", "layout", "{}"), ("dtype", "dtype", "{}"), ("pass_", "pass", "{}"),
        ("dlkern_ms", "dlkern ms", "{:.4f}"), ("torch_ms", "torch ms", "{:.4f}"),
        ("speedup", "speedup", "{:.2f}x"), ("dlkern_gbps", "dlkern GB/s", "{:.1f}"),
    ])
    rows.extend(suite_rows)
