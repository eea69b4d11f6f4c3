"""Run dlkern's GPU launch path on a machine without a GPU, to time it on the host.

:func:`stand_in_gpu` installs, for the duration of a ``with`` block:

- a stand-in Triton driver: current device 0, stream 0, target sm_90 (``GPUTarget("cuda", 90, 32)``);
- a stand-in ``triton.compile``: it returns a kernel whose launch does nothing, so nothing is compiled;
- autotuners that skip benchmarking (every config "takes" the same time, so the first pruned one is chosen once
  per key, as a tuned launch would after its first call), and never read or write the on-disk autotune cache;
- ``dlkern.ops.triton_support.triton_on_cpu``: CPU tensors take the Triton path, as CUDA tensors do.

What a timing under it includes: dlkern's Python (functional, ops, autograd, launchers), the torch ops it issues
(on small CPU tensors: allocations are real, values are never computed by a kernel), and Triton's Python launch
path (``JITFunction.run``: argument binding, the specialization key, the kernel-cache lookup, the grid; the
autotuner's key and cache lookup). What it leaves out: the C launcher and ``cuLaunchKernelEx`` (a few µs per
launch on a GPU host), and the GPU's own time. The tensors dlkern allocates are CPU tensors, so allocation costs
those of the CPU allocator, not CUDA's caching allocator.
"""

import contextlib
import gc

import torch
import triton
import triton.compiler
from triton.backends.compiler import GPUTarget
from triton.runtime import autotuner, driver
from triton.runtime.jit import JITFunction


class _Device:
    """The few device-interface calls the autotuner and Triton's runtime make."""

    @staticmethod
    def current_device():
        return 0

    @staticmethod
    def synchronize(*_):
        pass


class _Driver:
    """Just what ``JITFunction.run`` asks the active driver for."""

    def __init__(self):
        self.target = GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_device_interface(self):
        return _Device

    def get_active_torch_device(self):
        return torch.device("cpu")

    def is_active(self):
        return True


class _Kernel:
    """A compiled kernel whose launch does nothing (``run`` takes the C launcher's arguments)."""

    function = None
    packed_metadata = None

    def __init__(self, src):
        self.name = getattr(src, "name", "kernel")

    def launch_metadata(self, grid, stream, *args):
        return None

    def run(self, *args):
        pass


def _stand_in_compile(src, target=None, options=None, **kwargs):
    return _Kernel(src)


def jit_functions():
    """Every @triton.jit function alive (dlkern's kernels, their helpers, any other), found through the garbage
    collector: Triton has no public registry of them (3.7 and 3.8 keep a private one, 3.6 none)."""
    return [obj for obj in gc.get_objects() if issubclass(type(obj), JITFunction)]  # type(): no __class__ lookups


def _no_benchmark(self, *args, config, **meta):
    return [1.0, 1.0, 1.0]


@contextlib.contextmanager
def stand_in_gpu():
    """Within the block, dlkern's Triton ops take their GPU launch path on CPU tensors, up to the driver."""
    from dlkern.ops import triton_support

    saved_compile, saved_bench, saved_driver = triton.compiler.compile, autotuner.Autotuner._bench, driver._active
    saved_disk_cache = autotuner.Autotuner.check_disk_cache
    # JIT functions bind their compile and backend per device on first launch: start them afresh, and again after.
    functions = jit_functions()
    saved_caches = [(fn, fn.device_caches) for fn in functions]
    triton.compiler.compile = _stand_in_compile
    autotuner.Autotuner._bench = _no_benchmark
    # Stand-in timings must never reach the on-disk autotune cache (cache_results=True), where a real run on the
    # same target would read them: tune afresh, store nothing.
    autotuner.Autotuner.check_disk_cache = lambda tuner, key, configs, bench_fn: (bench_fn(), False)[1]
    driver.set_active(_Driver())
    for fn in functions:
        fn.device_caches = type(fn.device_caches)(fn.create_binder)
    # Launch plans made under the stand-in hold its do-nothing kernels: none may outlive the block (nor predate it).
    triton_support._plans.clear()
    try:
        with triton_support.triton_on_cpu():
            yield
    finally:
        triton_support._plans.clear()
        triton.compiler.compile, autotuner.Autotuner._bench = saved_compile, saved_bench
        autotuner.Autotuner.check_disk_cache = saved_disk_cache
        driver._active = saved_driver  # None on a machine without a GPU: no driver was ever made
        for fn, caches in saved_caches:
            fn.device_caches = caches
