"""What every Triton-backed op shares: where its kernels can run, and a launch counter.

CUDA tensors run dlkern's Triton kernels. CPU tensors run them in Triton's interpreter when TRITON_INTERPRET=1
was set before triton was imported (how the tests check the kernels without a GPU); otherwise the op computes
the same result with a PyTorch composite and warns once (the dispatcher picks the kernel: dlkern/ops/library.py).

Every launch goes through :func:`launch`, which counts it by kernel name in :data:`launch_counts`, so a test can
prove that a Triton kernel really ran (a silent fallback to PyTorch would leave the count unchanged).
"""

import collections
import contextlib
import functools
import inspect
import os
import sys
import warnings

import torch
import triton
from triton import knobs
from triton.runtime import driver

from dlkern._interpret import INTERPRETING  # a leaf, which kernels/ reads too
from dlkern._compat import planned_launches_supported

launch_counts = collections.Counter()
_warned = set()
# Set by triton_on_cpu(): CPU tensors take the Triton path without the interpreter (bench/host_stub.py times the
# GPU launch path on a CPU this way, with a driver that launches nothing).
_on_cpu = False
# Set by composite_on_cpu(): CPU tensors take the PyTorch composite even in the interpreter (tests compare the two).
_composite_forced = False


def _runs_on(device_type):
    return device_type == "cuda" or ((INTERPRETING or _on_cpu) and device_type == "cpu")


def _fallback_message(device_type, op_name):
    return (
        f"Triton kernels need a CUDA tensor (or TRITON_INTERPRET=1 set before triton is imported, to run them on the "
        f"CPU in Triton's interpreter); dlkern's Triton ops (the activations, the fused conv block; first here: "
        f"dlkern.{op_name}) compute {device_type} tensors with equivalent PyTorch composites instead. The max pool's "
        "C++ kernel runs on CPU tensors as it is."
    )


def cpu_runs_triton():
    """Whether CPU tensors run the Triton kernels: in the interpreter, or under triton_on_cpu()."""
    return (INTERPRETING or _on_cpu) and not _composite_forced


def warn_fallback(device_type, op_name):
    """One warning per process, pointing at the user's call, that `op_name` computes `device_type` tensors with
    a PyTorch composite (every op that fell back is recorded in ``_warned``)."""
    if _composite_forced:
        return
    if not _warned:
        warnings.warn("dlkern: " + _fallback_message(device_type, op_name), stacklevel=_user_stacklevel())
    _warned.add(op_name)


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
    """warnings.warn's stacklevel (for a warn call in warn_fallback) of the first frame outside dlkern and torch:
    the user's call, where the warning should point."""
    frame, level = sys._getframe(2), 2  # 1: warn_fallback, 2: its caller
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        frame, level = frame.f_back, level + 1
    return level


@contextlib.contextmanager
def composite_on_cpu():
    """Within the block, CPU tensors take the PyTorch composites, also in the interpreter, without a warning (for
    tests that compare them with the kernels)."""
    global _composite_forced
    saved, _composite_forced = _composite_forced, True
    try:
        yield
    finally:
        _composite_forced = saved


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


def remembered(cache, key, compute):
    """compute() once per key in `cache` (a dict), for host-side argument checks that depend on hashable values
    only (a module passes the same ones call after call). Computed afresh while torch.compile traces (Dynamo
    sees the checks) and for an unhashable key; a failing check is never remembered; past 4096 keys the cache
    starts over rather than grow."""
    if torch.compiler.is_compiling():
        return compute()
    try:
        return cache[key]
    except KeyError:
        pass
    except TypeError:
        return compute()
    value = compute()
    if len(cache) >= 4096:
        cache.clear()
    cache[key] = value
    return value


def compute_dtype(dtype):
    """The dtype dlkern computes (and reduces) a tensor of `dtype` in: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def kernel_name(kernel):
    """The Python name of a @triton.jit function, also through @triton.autotune/@triton.heuristics wrappers."""
    while hasattr(kernel, "fn"):
        kernel = kernel.fn
    return kernel.__name__


def cdiv(a, b):
    """ceil(a / b) for ints, on the host (triton.cdiv, a constexpr function, costs ~1.5 µs a call)."""
    return -(-a // b)


def next_power_of_2(n):
    """The smallest power of two >= n, on the host (as triton.next_power_of_2, which costs ~1.5 µs a call)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


class Plan:
    """One kernel launch, decided once per key (see :func:`launch`): the compiled kernel, its grid, and the
    values of every parameter after the caller's positional arguments (constexprs, the autotuner's tile sizes,
    defaults), in the kernel's parameter order. ``meta`` maps those parameters' names to their values."""

    __slots__ = ("run", "function", "metadata", "grid", "tail", "meta")

    def __init__(self, compiled, grid, tail, meta):
        self.run, self.function, self.metadata = compiled.run, compiled.function, compiled.packed_metadata
        self.grid, self.tail, self.meta = grid, tail, meta


class _Unplanned:
    """What launch() returns where no plan can be kept (the interpreter, a launch hook set): ``meta`` only."""

    __slots__ = ("meta",)

    def __init__(self, meta):
        self.meta = meta


_plans = {}
_names = {}
_FLOAT = object()  # floats are not specialized: their values stay out of the key
_MAX_PLANS = 1 << 14


def _plan_key(kernel, device, args, kwargs):
    """What Triton specializes a launch on, and more: int arguments by value (Triton: == 1, divisible by 16,
    32/64-bit), tensors by dtype and 16-byte alignment, constexprs by value; plus the current device, which
    Triton launches on (and loads the compiled kernel for)."""
    key = [id(kernel), device, tuple(kwargs.items())]
    for a in args:  # a loop with the int test first: 15% less than a comprehension, every launch
        kind = type(a)
        if kind is int:
            key.append(a)
        elif kind is float:
            key.append(_FLOAT)
        elif isinstance(a, torch.Tensor):
            key.append((a.dtype, a.data_ptr() & 15))
        else:
            key.append(a)
    return tuple(key)


def _make_plan(kernel, compiled, grid, args, kwargs):
    """A Plan for the launch that just ran through Triton's own path, or None where there is no compiled kernel
    to call again (the interpreter)."""
    fn = kernel
    while not isinstance(fn, triton.runtime.JITFunction):
        if not hasattr(fn, "fn"):
            return None
        fn = fn.fn
    if compiled is None or not hasattr(compiled, "packed_metadata"):
        return None
    config = getattr(kernel, "best_config", None)
    values = {**(config.kwargs if config is not None else {}), **kwargs}
    tail = []
    for param in fn.params[len(args):]:
        if param.name in values:
            tail.append(values[param.name])
        elif param.default is not inspect.Parameter.empty:
            tail.append(param.default)
        else:
            return None
    names = [param.name for param in fn.params[len(args):]]
    return Plan(compiled, tuple(grid) + (1,) * (3 - len(grid)), tuple(tail), dict(zip(names, tail)))


def _hooked(chain):
    """Whether a Triton launch hook is set (a HookChain with calls; None or a bare function in some versions)."""
    return chain is not None and bool(getattr(chain, "calls", True))


def launch(kernel, grid, *args, **kwargs):
    """``kernel[grid](*args, **kwargs)``, counted in :data:`launch_counts`; returns the launch's Plan (its
    ``meta``: the constexprs and the autotuner's choice).

    The first launch with a key (:func:`_plan_key`) takes Triton's own path (binding, specialization, the
    autotuner, compilation) and keeps what it decided: the compiled kernel, the grid, the trailing arguments.
    Later launches with that key call the compiled kernel's launcher directly, as ``JITFunction.run`` ends
    (where the installed Triton's ``run`` passes what the plans pass: dlkern._compat checks it once),
    with none of that per-call work (~3 µs instead of ~15 µs plain, ~40 µs autotuned). A callable grid is
    evaluated once per key: it may only depend on the arguments and the chosen config, as Triton's does.
    Positional arguments are the kernel's leading parameters; constexprs come as keywords."""
    name = _names.get(id(kernel))
    if name is None:
        name = _names[id(kernel)] = kernel_name(kernel)
    launch_counts[name] += 1
    if (INTERPRETING or _hooked(knobs.runtime.launch_enter_hook) or _hooked(knobs.runtime.launch_exit_hook)
            or not planned_launches_supported()):
        # the interpreter runs Python; launch hooks want Triton's own path; and so does a Triton whose launcher
        # takes other arguments than the plans pass (dlkern._compat)
        kernel[grid](*args, **kwargs)
        config = getattr(kernel, "best_config", None)
        return _Unplanned({**(config.kwargs if config is not None and not INTERPRETING else {}), **kwargs})
    gpu = driver.active
    device = gpu.get_current_device()
    key = _plan_key(kernel, device, args, kwargs)
    plan = _plans.get(key)
    if plan is not None:
        plan.run(*plan.grid, gpu.get_current_stream(device), plan.function, plan.metadata, None, None, None,
                 *args, *plan.tail)
        return plan
    seen = []

    def recording_grid(meta):
        seen.append(tuple(grid(meta)))
        return seen[-1]

    compiled = kernel[recording_grid if callable(grid) else grid](*args, **kwargs)
    plan = _make_plan(kernel, compiled, seen[-1] if callable(grid) else grid, args, kwargs)
    if plan is None:
        config = getattr(kernel, "best_config", None)
        return _Unplanned({**(config.kwargs if config is not None else {}), **kwargs})
    if len(_plans) >= _MAX_PLANS:  # shapes without end (a user's every size): start over rather than grow
        _plans.clear()
    _plans[key] = plan
    return plan


def sm_count(device):
    """Streaming multiprocessors of a CUDA device (1 elsewhere): how many programs fill the GPU."""
    if device.type != "cuda":
        return 1
    return _sm_count(torch.cuda.current_device() if device.index is None else device.index)


@functools.lru_cache(maxsize=None)
def _sm_count(index):
    return torch.cuda.get_device_properties(index).multi_processor_count
