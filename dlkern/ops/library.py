"""How dlkern's Triton-backed ops are registered: a schema, a kernel per device, a fake, through one Library.

``torch.library.define`` plus per-device ``impl`` costs the least per call of the registrations that keep
torch.compile and opcheck working (an op with an empty body, measured on one 2-core CPU, torch 2.13: 2.7 µs a
call, against 4.7 µs for ``torch.library.custom_op`` below the Autograd key and 8.3 µs through it; ATen's
relu 0.9 µs), and it lets the dispatcher choose the device:

- CUDA: the Triton launcher, nothing else on the call path.
- CPU: the same launcher in Triton's interpreter (TRITON_INTERPRET=1 before triton is imported) or under
  ``triton_support.triton_on_cpu()`` (the host benchmark's stand-in driver); otherwise the PyTorch composite,
  after one warning per process (``triton_support.warn_fallback``).

Autograd is not registered here: each op's ``torch.autograd.Function`` lives beside it, and the ops that take
autograd directly register it with ``torch.library.register_autograd`` (or an Autograd kernel, for an op that
mutates its arguments, which register_autograd refuses).
"""

import torch

from dlkern.ops import triton_support

LIB = torch.library.Library("dlkern", "FRAGMENT")  # the C++ extension owns the namespace (TORCH_LIBRARY)


def define(schema, triton_kernel, composite, fake, warn_as=None):
    """Defines ``dlkern::<name>`` from ``schema`` and returns its OpOverload. ``warn_as`` names the op in the
    CPU fallback's warning: a name, or a function of the op's arguments (default: the op's name)."""
    name = schema.split("(", 1)[0]
    LIB.define(schema)
    LIB.impl(name, triton_kernel, "CUDA")
    LIB.impl(name, _cpu_kernel(triton_kernel, composite, warn_as or name), "CPU")
    torch.library.register_fake(f"dlkern::{name}", fake, lib=LIB)
    return getattr(torch.ops.dlkern, name).default


def _cpu_kernel(triton_kernel, composite, op_name):
    def cpu(*args):
        if triton_support.cpu_runs_triton():
            return triton_kernel(*args)
        triton_support.warn_fallback("cpu", op_name(*args) if callable(op_name) else op_name)
        return composite(*args)

    return cpu
