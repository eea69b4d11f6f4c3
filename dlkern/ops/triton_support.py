"""What every Triton-backed op shares: where its kernels can run, and a launch counter.

CUDA tensors run dlkern's Triton kernels. CPU tensors run them in Triton's interpreter when TRITON_INTERPRET=1
was set before triton was imported (how the tests check the kernels without a GPU); otherwise the op computes
the same result with a PyTorch composite and warns once.

Every launch goes through :func:`launch`, which counts it by kernel name in :data:`launch_counts`, so a test can
prove that a Triton kernel really ran (a silent fallback to PyTorch would leave the count unchanged).
"""

import collections
import contextlib
import functools
import os
import warnings

import torch

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

launch_counts = collections.Counter()
_warned = set()
# Set by triton_on_cpu(): CPU tensors take the Triton path without the interpreter (bench/host_stub.py times the
# GPU launch path on a CPU this way, with a driver that launches nothing).
_on_cpu = False


def runs_triton(tensor, op_name):
    """True when `op_name` should launch its Triton kernel for `tensor`; warns once per op when it cannot."""
    if tensor.device.type == "cuda" or ((INTERPRETING or _on_cpu) and tensor.device.type == "cpu"):
        return True
    if op_name not in _warned:
        _warned.add(op_name)
        warnings.warn(
            f"dlkern.{op_name}: Triton kernels need a CUDA tensor (or TRITON_INTERPRET=1 set before triton is "
            f"imported, to run them on the CPU in Triton's interpreter); computing {tensor.device.type} tensors "
            "with an equivalent PyTorch composite instead",
            stacklevel=3,
        )
    return False


@contextlib.contextmanager
def triton_on_cpu():
    """Within the block, CPU tensors take the Triton launch path (for bench/host_stub.py, which stands in a driver
    that launches nothing; with the real driver the launches would fail)."""
    global _on_cpu
    saved, _on_cpu = _on_cpu, True
    try:
        yield
    finally:
        _on_cpu = saved


def kernel_name(kernel):
    """The Python name of a @triton.jit function, also through @triton.autotune/@triton.heuristics wrappers."""
    while hasattr(kernel, "fn"):
        kernel = kernel.fn
    return kernel.__name__


def launch(kernel, grid, *args, **kwargs):
    """``kernel[grid](*args, **kwargs)``, counted in :data:`launch_counts`."""
    launch_counts[kernel_name(kernel)] += 1
    return kernel[grid](*args, **kwargs)


def sm_count(device):
    """Streaming multiprocessors of a CUDA device (1 elsewhere): how many programs fill the GPU."""
    if device.type != "cuda":
        return 1
    return _sm_count(torch.cuda.current_device() if device.index is None else device.index)


@functools.lru_cache(maxsize=None)
def _sm_count(index):
    return torch.cuda.get_device_properties(index).multi_processor_count
