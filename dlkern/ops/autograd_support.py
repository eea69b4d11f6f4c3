"""What the autograd of every dlkern op shares: when a call needs its autograd.Function at all, and a cheap apply.

Each op has a pair of ``torch.autograd.Function``s with ``setup_context`` (which torch.func's transforms need):
one with ``jvp`` for eager calls and one without for torch.compile, since Dynamo refuses to trace a Function that
defines a custom ``jvp``. :func:`function_apply` picks between them on every call.
"""

import torch
from torch._functorch.utils import unwrap_dead_wrappers
from torch.autograd import forward_ad


def batch_first(t, dim, batch_size):
    """For a vmap rule: t with its vmap batch dim first (an unbatched t is broadcast over the batch)."""
    return t.expand(batch_size, *t.shape) if dim is None else t.movedim(dim, 0)


def needs_autograd(*tensors):
    """Whether a call needs its autograd.Function: reverse mode recording, a forward-mode dual level open (duals
    need not require grad: torch.autograd.forward_ad, torch.func.jvp) or a torch.func transform. Not while
    torch.jit.trace records: it records the op itself (whose registered autograd serves the traced graph), never
    a Python Function, which it could not save."""
    if torch.jit.is_tracing():
        return False
    return (
        (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))
        or forward_ad._current_level >= 0
        or torch._C._are_functorch_transforms_active()
    )


def function_apply(eager, traced):
    """``apply(*args)`` for a pair of Functions: ``traced`` under torch.compile, ``eager`` otherwise.

    Outside torch.func's transforms the eager call goes straight to the C-level apply that ``Function.apply`` ends
    in, without its per-call ``inspect.signature`` binding of default arguments: dlkern passes every argument
    positionally, so that binding changes nothing, and it is most of a small op's host time.
    """
    c_apply = super(torch.autograd.Function, eager).apply  # torch._C._FunctionBase.apply, bound to `eager`

    def apply(*args):
        if torch.compiler.is_compiling():
            return traced.apply(*args)
        if torch._C._are_functorch_transforms_active():
            return eager.apply(*args)
        return c_apply(*unwrap_dead_wrappers(args))

    return apply


def call_op(op, *args):
    """op(*args) below the Autograd dispatch key, for a call that needs no autograd of its own: one that
    :func:`needs_autograd` clears, or an op called inside an autograd.Function's forward or non-differentiable
    backward (the Function is the autograd node). The op's registered Python autograd kernel costs 4-5 µs a call
    even under no_grad (a 2x2 max pool: 8.1 µs through it, 3.6 µs below it; ATen's 3.2 µs). torch.jit.trace,
    torch.compile and torch.func's transforms get the op as it is."""
    if torch.jit.is_tracing() or torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)
