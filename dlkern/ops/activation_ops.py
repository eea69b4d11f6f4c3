"""The activation family's torch.library ops (registered through dlkern/ops/library.py): their argument checks,
their implementations per device (the Triton launchers of dlkern.ops.activation_launch; the PyTorch composites of
dlkern.ops.activation_composite for CPU tensors without the interpreter), their fakes and their vmap rules.
Autograd is registered on top of them, in dlkern.ops.activation.

Ops (namespace ``dlkern``; ``act`` is a name from ``dlkern.catalog.ACTIVATIONS``, p0/p1 its scalar
parameters as in :func:`dlkern.catalog.activation_spec`):

- ``activation(Tensor x, str act, float p0, float p1) -> Tensor``
- ``activation_(Tensor(a!) x, str act, float p0, float p1) -> ()``: in place.
- ``activation_backward(Tensor grad_output, Tensor saved, str act, float p0, float p1, bool saved_is_output)``
- ``activation_channelwise(Tensor x, Tensor weight, str act) -> Tensor``: prelu and swish with a tensor
  parameter of 1 or C elements, C = x.size(1).
- ``activation_channelwise_backward(Tensor grad_output, Tensor x, Tensor weight, str act, bool weight_grad)
  -> (Tensor, Tensor)``: the weight gradient is empty when weight_grad is False.

None of them reads tensor values on the host. Outputs have the input's strides when it is dense (``empty_like``),
as PyTorch's elementwise ops.
"""

import math

import torch

from dlkern._compat import check  # torch._check, also traceable by torch 2.11's Dynamo
from dlkern.catalog import ACTIVATIONS, CHANNELWISE, SCALAR_PARAM_COUNT
from dlkern.ops.activation_composite import composite_backward, composite_channelwise_backward, composite_forward
from dlkern.ops.activation_launch import channelwise_backward, launch_backward, launch_forward
from dlkern.ops.autograd_support import batch_first
from dlkern.ops.library import define
from dlkern.ops.triton_support import compute_dtype


# ----------------------------------------------------------------------------------------------------------------
# Checks shared by the real and the fake implementations
# ----------------------------------------------------------------------------------------------------------------

# The dtypes the kernels (and the composites) compute; functional defers every other dtype to ATen.
KERNEL_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
# Scalar parameters per activation. ATen converts them to the math type (float for fp16/bf16/fp32 inputs, double
# for fp64), hardtanh's bounds to the input's dtype itself, and refuses a finite value beyond that type's range.
_PARAM_COUNT = SCALAR_PARAM_COUNT
_TYPE_LIMITS = {dt: (name, torch.finfo(dt).max) for dt, name in (
    (torch.float16, "c10::Half"), (torch.bfloat16, "c10::BFloat16"), (torch.float32, "float"),
    (torch.float64, "double"))}
# ATen's ScalarType names, for its dtype messages.
_ATEN_NAMES = {torch.float16: "Half", torch.bfloat16: "BFloat16", torch.float32: "Float", torch.float64: "Double",
               torch.bool: "Bool", torch.uint8: "Byte", torch.int8: "Char", torch.int16: "Short", torch.int32: "Int",
               torch.int64: "Long"}


def _check_input(x, act, p0=0.0, p1=0.0):
    # Plain ifs on host values (torch._check costs ~1.5 µs a call even when the condition holds).
    if act not in ACTIVATIONS:
        raise RuntimeError(f"dlkern activation: unknown activation {act!r}")
    if x.dtype not in KERNEL_DTYPES:
        raise RuntimeError(
            f"dlkern {act}: expected a floating-point input (float16, bfloat16, float32 or float64), got {x.dtype}"
        )
    count = _PARAM_COUNT.get(act)
    if count:
        type_name, limit = _TYPE_LIMITS[x.dtype if act == "hardtanh" else compute_dtype(x.dtype)]
        for p in (p0, p1)[:count]:
            if abs(p) > limit and not math.isinf(p):
                raise RuntimeError(f"value cannot be converted to type {type_name} without overflow")


def _check_channelwise(x, weight, act):
    _check_input(x, act)
    # Plain ifs on host values, as in _check_input; torch._check where a size may be symbolic (torch.compile).
    if act not in CHANNELWISE:
        raise RuntimeError(f"dlkern: {act} has no tensor parameter")
    if weight.dim() > 1:
        raise RuntimeError(f"{act}: Expected `weight` to be a scalar or 1D tensor, but got: ndim = {weight.dim()}")
    if weight.dtype != x.dtype:
        raise RuntimeError(f"{act}: Type promoting not supported. Got {_ATEN_NAMES.get(x.dtype, x.dtype)} and "
                           f"{_ATEN_NAMES.get(weight.dtype, weight.dtype)}")
    if weight.numel() != 1:
        if x.dim() == 0:
            raise RuntimeError("Not allow zero-dim input tensor.")
        channels = x.shape[1] if x.dim() > 1 else 1
        check(
            channels == weight.numel(),
            lambda: f"Mismatch of parameter numbers and input channel size. Found parameter numbers = "
            f"{weight.numel()} and channel size = {channels}.",
        )


def _check_inplace(x):
    torch._check(
        torch._debug_has_internal_overlap(x) != 1,
        lambda: "unsupported operation: more than one element of the written-to tensor refers to a single memory "
        "location. Please clone() the tensor before performing the operation.",
    )
    # ATen's in-place ops refuse this in their autograd layer, which a custom op's mutation does not go through.
    torch._check(
        not x.is_inference() or torch.is_inference_mode_enabled(),
        lambda: "Inplace update to inference tensor outside InferenceMode is not allowed.You can make a clone to get "
        "a normal tensor before doing inplace update.See https://github.com/pytorch/rfcs/pull/17 for more details.",
    )


# ----------------------------------------------------------------------------------------------------------------
# Ops
# ----------------------------------------------------------------------------------------------------------------


def _activation_triton(x, act, p0, p1):
    _check_input(x, act, p0, p1)
    y = torch.empty_like(x)
    launch_forward(y, x, act, p0, p1)
    return y


def _activation_composite(x, act, p0, p1):
    _check_input(x, act, p0, p1)
    return torch.empty_like(x).copy_(composite_forward(x, act, p0, p1))


def _activation_fake(x, act, p0, p1):
    _check_input(x, act, p0, p1)
    return torch.empty_like(x)


def _act_name(index):
    """For the CPU fallback's warning: the activation's name, the op's argument at `index`."""
    return lambda *args: args[index]


activation = define("activation(Tensor x, str act, float p0, float p1) -> Tensor",
                    _activation_triton, _activation_composite, _activation_fake, _act_name(1))


def _activation_inplace_triton(x, act, p0, p1):
    _check_input(x, act, p0, p1)
    _check_inplace(x)
    launch_forward(x, x, act, p0, p1)


def _activation_inplace_composite(x, act, p0, p1):
    _check_input(x, act, p0, p1)
    _check_inplace(x)
    x.copy_(composite_forward(x, act, p0, p1))


def _activation_inplace_fake(x, act, p0, p1):
    _check_input(x, act, p0, p1)


activation_ = define("activation_(Tensor(a!) x, str act, float p0, float p1) -> ()",
                     _activation_inplace_triton, _activation_inplace_composite, _activation_inplace_fake,
                     _act_name(1))


def _activation_backward_triton(grad_output, saved, act, p0, p1, saved_is_output):
    dx = torch.empty_like(saved)
    launch_backward(dx, grad_output, saved, act, p0, p1, saved_is_output)
    return dx


def _activation_backward_composite(grad_output, saved, act, p0, p1, saved_is_output):
    return torch.empty_like(saved).copy_(composite_backward(grad_output, saved, act, p0, p1, saved_is_output))


def _activation_backward_fake(grad_output, saved, act, p0, p1, saved_is_output):
    return torch.empty_like(saved)


activation_backward = define(
    "activation_backward(Tensor grad_output, Tensor saved, str act, float p0, float p1, bool saved_is_output) "
    "-> Tensor",
    _activation_backward_triton, _activation_backward_composite, _activation_backward_fake, _act_name(2),
)


def _channelwise_triton(x, weight, act):
    _check_channelwise(x, weight, act)
    y = torch.empty_like(x)
    launch_forward(y, x, act, 0.0, 0.0, weight)
    return y


def _channelwise_composite(x, weight, act):
    _check_channelwise(x, weight, act)
    return torch.empty_like(x).copy_(composite_forward(x, act, 0.0, 0.0, weight))


def _channelwise_fake(x, weight, act):
    _check_channelwise(x, weight, act)
    return torch.empty_like(x)


activation_channelwise = define("activation_channelwise(Tensor x, Tensor weight, str act) -> Tensor",
                                _channelwise_triton, _channelwise_composite, _channelwise_fake, _act_name(2))


def _channelwise_backward_composite(grad_output, x, weight, act, weight_grad):
    dx, dw = composite_channelwise_backward(grad_output, x, weight, act, weight_grad)
    return torch.empty_like(x).copy_(dx), weight.new_empty(0) if dw is None else dw


def _channelwise_backward_fake(grad_output, x, weight, act, weight_grad):
    dw = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device) if weight_grad else weight.new_empty(0)
    return torch.empty_like(x), dw


activation_channelwise_backward = define(
    "activation_channelwise_backward(Tensor grad_output, Tensor x, Tensor weight, str act, bool weight_grad) "
    "-> (Tensor, Tensor)",
    channelwise_backward, _channelwise_backward_composite, _channelwise_backward_fake, _act_name(3),
)


# ----------------------------------------------------------------------------------------------------------------
# vmap rules (torch.func.vmap, and the Functions' generated vmap rules): one unbatched call per batch
# ----------------------------------------------------------------------------------------------------------------


@torch.library.register_vmap(activation)
def _(info, in_dims, x, act, p0, p1):
    return torch.ops.dlkern.activation(x, act, p0, p1), in_dims[0]  # elementwise: any batch dim


@torch.library.register_vmap(activation_)
def _(info, in_dims, x, act, p0, p1):
    torch.ops.dlkern.activation_(x, act, p0, p1)
    return None, None


@torch.library.register_vmap(activation_backward)
def _(info, in_dims, grad_output, saved, act, p0, p1, saved_is_output):
    g, s = (batch_first(t, d, info.batch_size) for t, d in zip((grad_output, saved), in_dims[:2]))
    return torch.ops.dlkern.activation_backward(g, s, act, p0, p1, saved_is_output), 0


def _fold_batch(x, weight):
    """(x, weight) batched in dim 0 (weight (B, 1 or C)) as one unbatched channelwise problem: the batch is folded
    into the channel dim. Returns (x2, w2, unfold), unfold mapping an x2-shaped result back to x's shape."""
    B = x.shape[0]
    if weight[0].numel() == 1:  # one parameter per sample: the samples are the channels
        return x.reshape(1, B, -1), weight.reshape(B), lambda y: y.reshape(x.shape)
    # (B, N, C, *rest) -> (N, B*C, *rest): channel b*C + c holds sample b's channel c
    folded = x.movedim(0, 1)
    shape = folded.shape
    return (folded.reshape(shape[0], B * shape[2], *shape[3:]), weight.reshape(-1),
            lambda y: y.reshape(shape).movedim(1, 0))


@torch.library.register_vmap(activation_channelwise)
def _(info, in_dims, x, weight, act):
    x_dim, w_dim = in_dims[:2]
    if w_dim is None and weight.numel() == 1:
        return torch.ops.dlkern.activation_channelwise(x, weight, act), x_dim
    if w_dim is None:  # one weight for every sample: the batch joins dim 0
        x = x.movedim(x_dim, 0)
        return torch.ops.dlkern.activation_channelwise(x.flatten(0, 1), weight, act).unflatten(0, x.shape[:2]), 0
    x2, w2, unfold = _fold_batch(batch_first(x, x_dim, info.batch_size), weight.movedim(w_dim, 0))
    return unfold(torch.ops.dlkern.activation_channelwise(x2, w2, act)), 0


@torch.library.register_vmap(activation_channelwise_backward)
def _(info, in_dims, grad_output, x, weight, act, weight_grad):
    g, x, weight = (batch_first(t, d, info.batch_size) for t, d in zip((grad_output, x, weight), in_dims[:3]))
    x2, w2, unfold = _fold_batch(x, weight)
    g2 = _fold_batch(g, weight)[0]
    dx, dw = torch.ops.dlkern.activation_channelwise_backward(g2, x2, w2, act, weight_grad)
    if not weight_grad:
        return (unfold(dx), dw), (0, None)
    return (unfold(dx), dw.reshape(weight.shape)), (0, 0)

