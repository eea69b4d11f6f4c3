"""The fused Conv2d -> BatchNorm2d -> epilogue block as torch.library ops (registered by dlkern/ops/library.py).

Four ops, one per BatchNorm mode, each taking the epilogue (activation, residual, max pool:
:class:`~dlkern.ops.conv_epilogue.Epilogue`) as the same five arguments:

- ``dlkern::conv_bn_train2d``           training forward with batch statistics -> (out, z, stats, pos), updating
  the running statistics it is given; autograd (an Autograd kernel: the op writes its arguments).
- ``dlkern::conv_bn_infer2d``           inference: BatchNorm from the running buffers in the conv's epilogue.
- ``dlkern::conv_bias_act2d``           eval with autograd: BatchNorm folded into weight and bias by the caller.
- ``dlkern::conv_bn_block2d_backward``  the backward of conv_bn_train2d (stats given) and conv_bias_act2d (None).

z is the conv output (bias included) that BatchNorm normalizes (the folded op's: the activation's input; with a
pool before BatchNorm, the pooled conv output); stats
is (3, C_out): batch mean, 1/sqrt(var + eps) and the biased var, in float32 (float64 for float64 inputs); pos the
window tap of each pooled maximum in one byte (empty without a pool). ``padding`` is (top, bottom, left, right).
CUDA tensors (and CPU tensors under TRITON_INTERPRET=1) run conv_launch.py's Triton launches; other CPU tensors
conv_composite.py's PyTorch composites (warned once). The entry point is dlkern/ops/conv_block.py.
"""

import torch

from dlkern.ops import conv_composite as composite
from dlkern.ops import conv_launch
from dlkern.ops.autograd_support import call_op, function_apply, needs_autograd
from dlkern.ops.conv_epilogue import SCHEMA as EPILOGUE, Epilogue, pool_output_size
from dlkern.ops.conv_shapes import (
    check, check_bn_sizes, check_residual, empty_like_format, geometry, memory_format, train_geometry,
)
from dlkern.ops.library import LIB, define
from dlkern.ops.triton_support import compute_dtype

OP = "conv_bn_act2d"  # the name the CPU fallback's warning gives

_CONV = "Tensor input, Tensor weight, Tensor? bias"
_GEOMETRY = "int[] stride, int[] padding, int[] dilation"


def _out_shape(geo, epi):
    N, C_in, H, W, C_out, KH, KW, OH, OW = geo
    if epi.window is None:
        return N, C_out, OH, OW
    return (N, C_out, *pool_output_size(OH, OW, epi.window))


# ---------------------------------------------------------------------------------------------- training forward


def _train(impl):
    def kernel(input, weight, bias, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, residual,
               momentum, eps, stride, padding, dilation, activation, p0, p1, residual_at, pool, allow_tf32):
        return impl(input, weight, bias, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked,
                    residual, momentum, eps, stride, padding, dilation,
                    Epilogue.of(activation, p0, p1, residual_at, pool), allow_tf32)

    return kernel


def _train_fake(input, weight, bias, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, residual,
                momentum, eps, stride, padding, dilation, epi, allow_tf32):
    geo = train_geometry(input, weight, bn_weight, bn_bias, running_mean, running_var, residual, stride, padding,
                         dilation)
    N, C_in, H, W, C_out, KH, KW, OH, OW = geo
    out = empty_like_format(input, _out_shape(geo, epi), input.dtype)
    z = torch.empty_like(out) if epi.pool_before_bn else empty_like_format(input, (N, C_out, OH, OW), input.dtype)
    pos = torch.empty_like(out, dtype=torch.uint8) if epi.pool else input.new_empty(0, dtype=torch.uint8)
    return out, z, input.new_empty(3, C_out, dtype=compute_dtype(input.dtype)), pos


conv_bn_train2d = define(
    f"conv_bn_train2d({_CONV}, Tensor? bn_weight, Tensor? bn_bias, Tensor(a!)? running_mean, "
    f"Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, Tensor? residual, float? momentum, float eps, "
    f"{_GEOMETRY}, {EPILOGUE}, bool allow_tf32) -> (Tensor, Tensor, Tensor, Tensor)",
    _train(conv_launch.train_forward), _train(composite.train_forward), _train(_train_fake), OP,
)
"""The epilogue on BatchNorm(conv(input) + bias) with batch statistics -> (out, z, stats, pos); updates the
running statistics when given (running_mean and running_var; num_batches_tracked += 1 when given; momentum None:
the cumulative average)."""


# ---------------------------------------------------------------------------------------------- inference


def _infer(impl):
    def kernel(input, weight, bias, running_mean, running_var, bn_weight, bn_bias, residual, eps, stride, padding,
               dilation, activation, p0, p1, residual_at, pool, allow_tf32):
        epi = Epilogue.of(activation, p0, p1, residual_at, pool)
        geo = geometry(input, weight, stride, padding, dilation)
        check_bn_sizes(geo[4], running_mean, running_var, bn_weight, bn_bias)
        check_residual(residual, geo[:1] + geo[4:5] + geo[7:], input.dtype)
        if impl is None:  # the fake
            return empty_like_format(input, _out_shape(geo, epi), input.dtype)
        args = (input, weight, bias, running_mean, running_var, bn_weight, bn_bias, residual, eps, stride, padding,
                dilation, epi, allow_tf32)
        if impl is composite.infer_forward:
            return impl(*args)
        return impl(*args, geo, _out_shape(geo, epi))

    return kernel


conv_bn_infer2d = define(
    f"conv_bn_infer2d({_CONV}, Tensor running_mean, Tensor running_var, Tensor? bn_weight, Tensor? bn_bias, "
    f"Tensor? residual, float eps, {_GEOMETRY}, {EPILOGUE}, bool allow_tf32) -> Tensor",
    _infer(conv_launch.infer_forward), _infer(composite.infer_forward), _infer(None), OP,
)
"""Inference: the epilogue on batch_norm(conv(input) + bias, running statistics, eval) in one kernel, BatchNorm
applied from the buffers as they are (no autograd)."""


# ---------------------------------------------------------------------------------------------- folded (eval, autograd)


def _folded(impl):
    def kernel(input, weight, bias, residual, stride, padding, dilation, activation, p0, p1, residual_at, pool,
               allow_tf32, save_preact):
        epi = Epilogue.of(activation, p0, p1, residual_at, pool)
        check(not epi.pool, "dlkern::conv_bias_act2d: no max pool in the folded block's epilogue")
        geo = geometry(input, weight, stride, padding, dilation)
        check_residual(residual, _out_shape(geo, epi), input.dtype)
        if impl is None:  # the fake
            out = empty_like_format(input, _out_shape(geo, epi), input.dtype)
            return out, torch.empty_like(out) if save_preact else out.new_empty(0)
        args = (input, weight, bias, residual, stride, padding, dilation, epi, allow_tf32, save_preact)
        return impl(*args) if impl is composite.folded_forward else impl(*args, geo)

    return kernel


conv_bias_act2d = define(
    f"conv_bias_act2d({_CONV}, Tensor? residual, {_GEOMETRY}, {EPILOGUE}, bool allow_tf32, bool save_preact) "
    "-> (Tensor, Tensor)",
    _folded(conv_launch.folded_forward), _folded(composite.folded_forward), _folded(None), OP,
)
"""The epilogue on conv(input, weight) + bias in one kernel (BatchNorm folded into weight and bias by the caller).
Returns (out, z); z, the activation's input, is kept only with save_preact (for the backward), else empty."""


# ---------------------------------------------------------------------------------------------- backward


def _backward(impl):
    def kernel(grad_out, input, weight, z, stats, bn_weight, bn_bias, residual, pos, stride, padding, dilation,
               activation, p0, p1, residual_at, pool, allow_tf32, input_grad, weight_grad):
        return impl(grad_out, input, weight, z, stats, bn_weight, bn_bias, residual, pos, stride, padding, dilation,
                    Epilogue.of(activation, p0, p1, residual_at, pool), allow_tf32, input_grad, weight_grad)

    return kernel


def _backward_fake(grad_out, input, weight, z, stats, bn_weight, bn_bias, residual, pos, stride, padding, dilation,
                   epi, allow_tf32, input_grad, weight_grad):
    affine = bn_weight is not None and stats is not None
    check_bn_sizes(weight.shape[0], bn_weight=bn_weight, bn_bias=bn_bias)

    def empty():
        return input.new_empty(0)

    dx = torch.empty_like(input, memory_format=memory_format(input)) if input_grad else empty()
    dw = weight.new_empty(weight.shape, dtype=compute_dtype(weight.dtype)) if weight_grad else empty()
    db = weight.new_empty(weight.shape[0], dtype=compute_dtype(weight.dtype)) if weight_grad else empty()
    grads = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (bn_weight, bn_bias)] if affine else \
        [empty(), empty()]
    dres = torch.empty_like(z) if epi.residual == 1 else empty()
    return dx, dw, db, *grads, dres


conv_bn_block2d_backward = define(
    f"conv_bn_block2d_backward(Tensor grad_out, Tensor input, Tensor weight, Tensor z, Tensor? stats, "
    f"Tensor? bn_weight, Tensor? bn_bias, Tensor? residual, Tensor? pos, {_GEOMETRY}, {EPILOGUE}, "
    "bool allow_tf32, bool input_grad, bool weight_grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    _backward(conv_launch.block_backward), _backward(composite.block_backward), _backward(_backward_fake), OP,
)
"""Gradients (input, conv weight, conv bias, BN weight, BN bias, residual) of conv_bn_train2d (stats given) or
conv_bias_act2d (stats None). Skipped ones (input_grad/weight_grad False, no affine BN, no residual before the
activation) come back empty."""


# ---------------------------------------------------------------------------------------------- autograd and torch.func

_NO_DOUBLE_BACKWARD = (
    "dlkern.conv_bn_act2d: double backward (differentiating its gradients: create_graph=True, gradient "
    "penalties, Hessians, torch.func.hessian) is not supported; compute that part with torch.nn.functional"
)
_NO_FORWARD_AD = (
    "dlkern.conv_bn_act2d: forward-mode AD (torch.func.jvp, torch.func.jacfwd, torch.autograd.forward_ad) is not "
    "supported; use reverse mode (backward, torch.func.grad/vjp/jacrev)"
)


class _NoDoubleBackward(torch.autograd.Function):
    """Passes a block's gradients through (as copies) when autograd records the backward (create_graph=True,
    torch.func.grad): differentiating them again then raises a clear error, not a missing-formula one."""

    generate_vmap_rule = True

    @staticmethod
    def forward(num_grads, *tensors):  # the gradients, then the tensors they depend on
        return tuple(t.clone() for t in tensors[:num_grads])

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(_NO_DOUBLE_BACKWARD)

    @staticmethod
    def jvp(ctx, *tangents):
        raise RuntimeError(_NO_DOUBLE_BACKWARD)


def _block_backward(ctx, grad_out, stats, pos):
    """conv_bn_block2d_backward for a Function's backward (the op has no autograd formula of its own): when
    autograd records the backward (create_graph=True), its results go through _NoDoubleBackward, so that
    differentiating them raises instead of silently giving no gradient. Returns (dx, dw, db, dgamma, dbeta,
    dresidual) as the inputs need them."""
    input, weight, z, bn_weight, bn_bias, residual = ctx.saved_tensors[:6]
    need_x, need_w, need_b, need_gamma, need_beta, need_res = ctx.grads_needed
    epi = ctx.epilogue
    with torch.no_grad():
        grads = call_op(conv_bn_block2d_backward, grad_out, input, weight, z, stats, bn_weight, bn_bias, residual,
                        pos, ctx.stride, ctx.padding, ctx.dilation, *epi.op_args(), ctx.allow_tf32, need_x,
                        need_w or need_b)
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        sources = [t for t in (grad_out, input, weight, bn_weight, bn_bias, residual) if t is not None and
                   t.requires_grad]
        if sources:
            grads = _NoDoubleBackward.apply(len(grads), *grads, *sources)
    dx, dw, db, dgamma, dbeta, dres = grads
    if epi.residual == 2:
        dres = grad_out
    return (dx if need_x else None, dw if need_w else None, db if need_b and ctx.has_bias else None,
            dgamma if need_gamma else None, dbeta if need_beta else None, dres if need_res else None)


def _block_functions(op, setup_context, backward):
    """(traced, eager) autograd.Functions around a fused op: one autograd node per block, in the setup_context
    form that torch.func.grad/vjp/jacrev accept. The eager one adds vmap (through the ops' own vmap rules) and
    a clear forward-mode AD error; torch.compile gets the other, as Dynamo graph-breaks on a Function with jvp."""

    class Traced(torch.autograd.Function):
        @staticmethod
        def forward(*args):
            return call_op(op, *args)

    Traced.setup_context = staticmethod(setup_context)
    Traced.backward = staticmethod(backward)

    class Eager(Traced):
        generate_vmap_rule = True

        @staticmethod
        def jvp(ctx, *tangents):
            raise NotImplementedError(_NO_FORWARD_AD)

    return Traced, Eager


def _save(ctx, input, weight, bias, z, bn_weight, bn_bias, residual, stride, padding, dilation, epi, allow_tf32,
          *extra):
    ctx.stride, ctx.padding, ctx.dilation, ctx.epilogue, ctx.allow_tf32 = stride, padding, dilation, epi, allow_tf32
    ctx.has_bias = bias is not None
    ctx.set_materialize_grads(False)  # no zero-filled gradients for z, stats, pos, which nothing differentiates
    # the backward reads the residual only where BatchNorm's output and the residual meet before the activation
    ctx.save_for_backward(input, weight, z, bn_weight, bn_bias, residual if epi.residual == 1 else None, *extra)


def _train_setup_context(ctx, inputs, output):
    input, weight, bias, bn_weight, bn_bias, *_, residual, _, _, stride, padding, dilation, activation, p0, p1, \
        residual_at, pool, allow_tf32 = inputs
    _, z, stats, pos = output
    ctx.mark_non_differentiable(z, stats, pos)
    epi = Epilogue.of(activation, p0, p1, residual_at, pool)
    _save(ctx, input, weight, bias, z, bn_weight, bn_bias, residual, stride, padding, dilation, epi, allow_tf32,
          stats, pos if epi.pool else None)
    ctx.grads_needed = ctx.needs_input_grad[:5] + ctx.needs_input_grad[8:9]


def _train_backward(ctx, grad_out, _grad_z, _grad_stats, _grad_pos):
    if grad_out is None:
        return (None,) * 20
    dx, dw, db, dgamma, dbeta, dres = _block_backward(ctx, grad_out, *ctx.saved_tensors[6:])
    return dx, dw, db, dgamma, dbeta, None, None, None, dres, *([None] * 11)


def _folded_setup_context(ctx, inputs, output):
    input, weight, bias, residual, stride, padding, dilation, activation, p0, p1, residual_at, pool, allow_tf32, \
        _ = inputs
    _, z = output
    ctx.mark_non_differentiable(z)
    # the folded block's backward needs no residual: z is the activation's input, residual included
    epi = Epilogue.of(activation, p0, p1, residual_at, pool)
    _save(ctx, input, weight, bias, z, None, None, None, stride, padding, dilation, epi, allow_tf32)
    need = ctx.needs_input_grad
    ctx.grads_needed = (*need[:3], False, False, need[3])


def _folded_backward(ctx, grad_out, _grad_z):
    if grad_out is None:
        return (None,) * 14
    check(ctx.saved_tensors[2].numel() > 0, "dlkern::conv_bias_act2d: backward needs save_preact=True")
    dx, dw, db, _, _, dres = _block_backward(ctx, grad_out, None, None)
    return dx, dw, db, dres, *([None] * 10)


torch.library.register_autograd("dlkern::conv_bias_act2d", _folded_backward, setup_context=_folded_setup_context,
                                lib=LIB)
_TRAIN = _block_functions(conv_bn_train2d, _train_setup_context, _train_backward)
_FOLDED = _block_functions(conv_bias_act2d, _folded_setup_context, _folded_backward)
train_apply = function_apply(_TRAIN[1], _TRAIN[0])
folded_apply = function_apply(_FOLDED[1], _FOLDED[0])


def _train_autograd(*args):
    """The Autograd kernel of dlkern::conv_bn_train2d, for direct calls of the op: its Function when autograd is
    needed, else the op below autograd. (An op that writes its arguments cannot take register_autograd.)"""
    if needs_autograd(*args[:5], args[8]):
        return train_apply(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return conv_bn_train2d(*args)


LIB.impl("conv_bn_train2d", _train_autograd, "Autograd")


def _vmap_by_loop(op):
    """A vmap rule: one call per vmapped slice (each is an independent call, so BatchNorm's batch statistics are
    per slice, as vmap means), the results stacked. A training call that updates running statistics is refused:
    one update per slice would not be BatchNorm's."""

    def rule(info, in_dims, *args):
        if op is conv_bn_train2d and args[5] is not None:
            raise RuntimeError(
                "dlkern.conv_bn_act2d: torch.func.vmap over a training block cannot update BatchNorm's running "
                "statistics (one update per vmapped call); pass running_mean=running_var=None, or for modules call "
                "torch.func.replace_all_batch_norm_modules_ first"
            )

        def sliced(i):
            return [a.select(d, i) if isinstance(d, int) else a for a, d in zip(args, in_dims)]

        results = [op(*sliced(i)) for i in range(info.batch_size)]
        if isinstance(results[0], torch.Tensor):
            return torch.stack(results), 0
        stacked = tuple(torch.stack(r) for r in zip(*results))
        return stacked, (0,) * len(stacked)

    return rule


for _op in (conv_bn_train2d, conv_bn_infer2d, conv_bias_act2d, conv_bn_block2d_backward):
    torch.library.register_vmap(_op, _vmap_by_loop(_op))
