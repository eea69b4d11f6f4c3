"""The activation family's autograd and its entry points for dlkern.functional: ``apply_activation``,
``apply_channelwise``, ``activation_inplace``.

The family is four modules, from the bottom: the PyTorch composites (dlkern.ops.activation_composite), the kernel
launchers (dlkern.ops.activation_launch), the ``dlkern::activation*`` torch.library ops with their checks, fakes
and vmap rules (dlkern.ops.activation_ops), and this one. CUDA tensors run the Triton kernels (and so do CPU
tensors under TRITON_INTERPRET=1); other CPU tensors run the composites after a one-time warning (the dispatcher
picks by device).

Autograd (reverse mode, forward mode, double backward, torch.func) lives in the ``torch.autograd.Function``s
here, which dlkern.functional calls; ``activation`` and ``activation_channelwise`` also register their Function's
backward, for direct calls of the op (reverse mode). The names other modules and the tests read stay importable
from here: the ops, the composites, the checks' KERNEL_DTYPES and the catalog's views.
"""

import torch

from dlkern.ops.autograd_support import call_op, function_apply, needs_autograd
from dlkern.ops.library import LIB

# The family's names and rules (what the backward saves, in place too; tensor parameters) live in dlkern/catalog.py;
# activation_spec (module -> (act, p0, p1)) stays importable here.
from dlkern.catalog import (  # noqa: F401
    ACTIVATIONS, CHANNELWISE, INPLACE_FROM_OUTPUT, SAVE_OUTPUT, SCALAR_PARAM_COUNT, activation_spec,
)
from dlkern.ops.activation_composite import (  # noqa: F401 (composite_forward/backward: the conv block)
    composite_backward, composite_channelwise_backward, composite_channelwise_jvp, composite_forward,
)
from dlkern.ops.activation_launch import plan_layout as _layout  # noqa: F401 (tests/test_activation.py)
from dlkern.ops.activation_ops import (  # noqa: F401 (KERNEL_DTYPES: dlkern.functional)
    KERNEL_DTYPES, activation, activation_, activation_backward, activation_channelwise,
    activation_channelwise_backward,
)


# ----------------------------------------------------------------------------------------------------------------
# Autograd: torch.autograd.Functions around the ops (one node per call). Each comes in two classes: the base,
# traced by torch.compile (dynamo graph-breaks on a custom jvp), and a subclass with forward-mode AD (jvp), used in
# eager mode. Their backward runs the kernel op, or, when it builds a graph (create_graph=True, and always under
# torch.func's transforms), the differentiable composite: that is what double backward differentiates.
# ----------------------------------------------------------------------------------------------------------------


def _vjp(g, saved, act, p0, p1, from_output):
    if torch.is_grad_enabled():
        return composite_backward(g, saved, act, p0, p1, from_output)
    return call_op(activation_backward, g, saved, act, p0, p1, from_output)


class Activation(torch.autograd.Function):
    """y = f(x) (``dlkern::activation``); the backward reads the output where ATen's does (SAVE_OUTPUT)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, act, p0, p1):
        return call_op(activation, x, act, p0, p1)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, ctx.act, ctx.p0, ctx.p1 = inputs
        ctx.from_output = ctx.act in SAVE_OUTPUT
        ctx.save_for_backward(output if ctx.from_output else x)

    @staticmethod
    def backward(ctx, grad_output):
        (saved,) = ctx.saved_tensors
        return _vjp(grad_output, saved, ctx.act, ctx.p0, ctx.p1, ctx.from_output), None, None, None


class ActivationWithJvp(Activation):
    @staticmethod
    def setup_context(ctx, inputs, output):
        Activation.setup_context(ctx, inputs, output)
        ctx.save_for_forward(output if ctx.from_output else inputs[0])

    @staticmethod
    def jvp(ctx, x_t, *_):
        (saved,) = ctx.saved_tensors
        return composite_backward(x_t, saved, ctx.act, ctx.p0, ctx.p1, ctx.from_output)


# Direct calls of the op (torch.ops.dlkern.activation) get the same reverse-mode autograd.
torch.library.register_autograd("dlkern::activation", Activation.backward, setup_context=Activation.setup_context,
                                lib=LIB)


class ActivationChannelwise(torch.autograd.Function):
    """y = f(x, weight) for prelu / tensor-beta swish (``dlkern::activation_channelwise``)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, act):
        return call_op(activation_channelwise, x, weight, act)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, ctx.act = inputs
        ctx.save_for_backward(x, weight)

    @staticmethod
    def backward(ctx, grad_output):
        x, weight = ctx.saved_tensors
        weight_grad = ctx.needs_input_grad[1]
        if torch.is_grad_enabled():
            dx, dw = composite_channelwise_backward(grad_output, x, weight, ctx.act, weight_grad)
        else:
            dx, dw = call_op(activation_channelwise_backward, grad_output, x, weight, ctx.act,
                             weight_grad)
        return dx, (dw if weight_grad else None), None


class ActivationChannelwiseWithJvp(ActivationChannelwise):
    @staticmethod
    def setup_context(ctx, inputs, output):
        ActivationChannelwise.setup_context(ctx, inputs, output)
        ctx.save_for_forward(inputs[0], inputs[1])

    @staticmethod
    def jvp(ctx, x_t, w_t, _):
        x, weight = ctx.saved_tensors
        return composite_channelwise_jvp(x, weight, ctx.act, x_t, w_t)


torch.library.register_autograd(
    "dlkern::activation_channelwise", ActivationChannelwise.backward, setup_context=ActivationChannelwise.setup_context,
    lib=LIB,
)


def _refuse_negative_slope(act, p0):
    # From the output of an in-place op with a negative slope/alpha the branch is lost: ATen refuses these too.
    if act in ("leaky_relu", "elu") and p0 < 0:
        name = "leakyReLu" if act == "leaky_relu" else "elu"
        raise RuntimeError(
            f"In-place {name} backward calculation is triggered with a negative slope which is not supported. "
            "This is caused by calling in-place forward function with a negative slope, please call "
            "out-of-place version instead."
        )


class ActivationInplace(torch.autograd.Function):
    """x = f(x) in place (``dlkern::activation_``), marking x dirty as ATen's in-place ops do. The backward reads
    the output where that is exact (INPLACE_FROM_OUTPUT), else ``original``, a copy of the input the caller
    takes before it is overwritten (None otherwise)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, original, act, p0, p1):
        call_op(activation_, x, act, p0, p1)
        return x

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, original, ctx.act, ctx.p0, ctx.p1 = inputs
        ctx.mark_dirty(x)
        ctx.from_output = original is None
        ctx.save_for_backward(output if ctx.from_output else original)

    @staticmethod
    def backward(ctx, grad_output):
        (saved,) = ctx.saved_tensors
        _refuse_negative_slope(ctx.act, ctx.p0)
        return _vjp(grad_output, saved, ctx.act, ctx.p0, ctx.p1, ctx.from_output), None, None, None, None


class ActivationInplaceWithJvp(ActivationInplace):
    @staticmethod
    def setup_context(ctx, inputs, output):
        ActivationInplace.setup_context(ctx, inputs, output)
        ctx.save_for_forward(output if ctx.from_output else inputs[1])

    @staticmethod
    def jvp(ctx, x_t, *_):
        (saved,) = ctx.saved_tensors
        _refuse_negative_slope(ctx.act, ctx.p0)
        return x_t.copy_(composite_backward(x_t, saved, ctx.act, ctx.p0, ctx.p1, ctx.from_output))  # in place


# ----------------------------------------------------------------------------------------------------------------
# Entry points for dlkern.functional
# ----------------------------------------------------------------------------------------------------------------


_activation_apply = function_apply(ActivationWithJvp, Activation)
_channelwise_apply = function_apply(ActivationChannelwiseWithJvp, ActivationChannelwise)
_inplace_apply = function_apply(ActivationInplaceWithJvp, ActivationInplace)


def apply_activation(x, act, p0, p1):
    """y = f(x), autograd-aware (reverse, forward mode, torch.func)."""
    if not needs_autograd(x):
        return call_op(activation, x, act, p0, p1)
    return _activation_apply(x, act, p0, p1)


def apply_channelwise(x, weight, act):
    """y = f(x, weight) for prelu / tensor-beta swish, autograd-aware."""
    if not needs_autograd(x, weight):
        return call_op(activation_channelwise, x, weight, act)
    return _channelwise_apply(x, weight, act)


def activation_inplace(x, act, p0, p1):
    """``x = f(x)`` in place, autograd-aware; returns x."""
    if torch.jit.is_tracing() or torch._C._functorch.peek_interpreter_stack() is not None:
        # torch.func's transforms do not take an autograd.Function that returns its input marked dirty, and a
        # trace records ops: compute out of place (on a copy, which the backward may save) and copy into x.
        return x.copy_(apply_activation(x.clone(), act, p0, p1))
    if not needs_autograd(x):
        call_op(activation_, x, act, p0, p1)
        return x
    # A copy of the input for the backward, as ATen's in-place ops without an exact formula from the output (not
    # detached: a double backward differentiates through it).
    original = None if act in INPLACE_FROM_OUTPUT else x.clone()
    return _inplace_apply(x, original, act, p0, p1)
