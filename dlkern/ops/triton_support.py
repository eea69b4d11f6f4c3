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
import sys
import warnings

import torch

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

launch_counts = collections.Counter()
_warned = set()
# Set by triton_on_cpu(): CPU tensors take the Triton path without the interpreter (bench/host_stub.py times the
# GPU launch path on a CPU this way, with a driver that launches nothing).
_on_cpu = False


def _runs_on(device_type):
    return device_type == "cuda" or ((INTERPRETING or _on_cpu) and device_type == "cpu")


def _fallback_message(device_type, op_name):
    return (
        f"Triton kernels need a CUDA tensor (or TRITON_INTERPRET=1 set before triton is imported, to run them on the "
        f"CPU in Triton's interpreter); dlkern's Triton ops (the activations, the fused conv block; first here: "
        f"dlkern.{op_name}) compute {device_type} tensors with equivalent PyTorch composites instead. The max pool's "
        "C++ kernel runs on CPU tensors as it is."
    )


def runs_triton(tensor, op_name):
    """True when `op_name` should launch its Triton kernel for `tensor`; otherwise False, after one warning per
    process that points at the user's call (every op that falls back is recorded in ``_warned``)."""
    if _runs_on(tensor.device.type):
        return True
    if not _warned:
        warnings.warn("dlkern: " + _fallback_message(tensor.device.type, op_name), stacklevel=_user_stacklevel())
    _warned.add(op_name)
    return False


def fallback_notice(device, op_name):
    """For a program that prints its own notes (and whose progress bars a warning would break): the fallback
    message for `device` if dlkern's Triton ops fall back there, and no warning later; None if they run Triton."""
    device = torch.device(device)
    if _runs_on(device.type):
        return None
    _warned.add(op_name)
    return _fallback_message(device.type, op_name)


_INTERNAL = (  # torch's and dlkern's folders
    os.path.dirname(torch.__file__) + os.sep, os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep,
)


def _user_stacklevel():
    """warnings.warn's stacklevel (counted from runs_triton's caller's warn call) of the first frame outside dlkern
    and torch: the user's call, where the warning should point."""
    frame, level = sys._getframe(2), 2  # 1: runs_triton, 2: its caller
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        frame, level = frame.f_back, level + 1
    return level


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


def compute_dtype(dtype):
    """The dtype dlkern computes (and reduces) a tensor of `dtype` in: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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
