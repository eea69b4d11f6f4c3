"""The activation family in PyTorch ops: what CPU tensors compute without a GPU or Triton's interpreter, and every
derivative that autograd must differentiate again (double backward, forward mode, torch.func), which the kernels
cannot give.

They follow the kernels' formulas (kernels/activation.py: fp16/bf16 computed in fp32, the limits at +-inf, the
same branch at breakpoints and NaN) so that every device gives the same values, special ones included. Plain
PyTorch, no kernels: the op layer (dlkern.ops.activation_ops) and the fused conv block both read it.
"""

import torch

# GELU constants, as in dlkern.kernels.activation.
_SQRT1_2, _INV_SQRT_2PI, _K_BETA, _K_KAPPA = 0.7071067811865476, 0.3989422804014327, 0.7978845608028654, 0.044715


def _channel_view(weight, x):
    """weight (1 or C elements) shaped to broadcast over x's channel dim (dim 1)."""
    if weight.numel() == 1 or x.dim() < 2:
        return weight.reshape(())
    return weight.reshape((-1,) + (1,) * (x.dim() - 2))


def _to_compute(t):
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _where(cond, a, b, like):
    # torch.where(cond, a, b) in like's dtype: two bare Python floats would give float32 (and round a float64
    # parameter), so other dtypes get them as 0-d tensors of like's dtype.
    if like.dtype != torch.float32:
        a = a if isinstance(a, torch.Tensor) else like.new_full((), a)
        b = b if isinstance(b, torch.Tensor) else like.new_full((), b)
    return torch.where(cond, a, b)


def _times_decaying(x, q):
    # x * q, q a factor decaying exponentially in |x|: 0 once q underflows, also at x = +-inf (as the kernels).
    return torch.where(q == 0, 0.0, x * q)


def _decaying_factor(x, act, beta):
    """q with f(x) = x * q for silu/swish/gelu/gelu_tanh."""
    if act == "gelu":
        return 0.5 * (1.0 + torch.erf(x * _SQRT1_2))
    if act == "gelu_tanh":  # 0.5(1 + tanh(u)) = sigma(2u)
        return torch.sigmoid(2.0 * _K_BETA * (x + _K_KAPPA * x * x * x))
    return torch.sigmoid(x * beta)


def composite_forward(x, act, p0, p1, weight=None):
    """f(x) with PyTorch ops (weight: prelu's / swish's tensor parameter, else p0)."""
    F = torch.nn.functional
    if act in ("silu", "swish", "gelu", "gelu_tanh"):
        xc = _to_compute(x)
        beta = 1.0 if act == "silu" else p0 if weight is None else _channel_view(weight, x).to(xc.dtype)
        return _times_decaying(xc, _decaying_factor(xc, act, beta)).to(x.dtype)
    if act == "prelu":
        return F.prelu(x, weight if weight is not None else x.new_full((1,), p0))
    if act == "hard_logistic":
        return (x * 0.25 + 0.5).clamp(0.0, 1.0)
    if act == "leaky_relu":
        return F.leaky_relu(x, p0)
    if act == "elu":
        return F.elu(x, p0)
    if act == "softplus":
        return F.softplus(x, p0, p1)
    if act == "hardtanh":
        return F.hardtanh(x, p0, p1)
    if act == "hardswish":  # as the kernels: -0.0 for x <= -3, -inf too (the limit; ATen: -inf * 0 = NaN), and x for
        # x >= 3 (ATen's x * 6 / 6 overflows beyond max/6)
        return torch.where(x <= -3.0, x.new_full((), -0.0), torch.where(x >= 3.0, x, F.hardswish(x)))
    return {"relu": F.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh, "hardsigmoid": F.hardsigmoid}[act](x)


def _derivative(s, act, p0, p1, from_output):
    """f'(x) from s, the input (or the output with from_output), in s's dtype: the kernels' act_grad and
    act_grad_from_output. p0 may be a tensor (prelu's weight, swish's beta, broadcast over s)."""
    if from_output:
        if act == "sigmoid":
            return s * (1.0 - s)
        if act == "tanh":
            return 1.0 - s * s
        if act == "elu":
            return _where(s <= 0, s + p0, 1.0, s)
    if act == "relu":
        return _where(s <= 0, 0.0, 1.0, s)
    if act in ("leaky_relu", "prelu"):
        return _where(s > 0, 1.0, p0, s)
    if act == "elu":
        return _where(s <= 0, p0 * torch.exp(s), 1.0, s)
    if act == "softplus":
        z = s * p0
        return _where(z > p1, 1.0, torch.sigmoid(z), s)
    if act in ("silu", "swish"):
        z = s if act == "silu" else s * p0
        sig = torch.sigmoid(z)
        return sig + _times_decaying(z, sig * torch.sigmoid(-z))  # sigma'(z) without the cancellation in 1 - sigma
    if act == "gelu":
        return 0.5 * (1.0 + torch.erf(s * _SQRT1_2)) + _times_decaying(s, torch.exp(-0.5 * s * s) * _INV_SQRT_2PI)
    if act == "gelu_tanh":
        u2 = 2.0 * _K_BETA * (s + _K_KAPPA * s * s * s)
        du2 = 2.0 * _K_BETA * (1.0 + 3.0 * _K_KAPPA * s * s)
        sig = torch.sigmoid(u2)
        return sig + _times_decaying(s * du2, sig * torch.sigmoid(-u2))
    if act == "sigmoid":
        return torch.sigmoid(s) * torch.sigmoid(-s)
    if act == "tanh":
        e = torch.exp(-2.0 * s.abs())  # 1 - tanh^2 = 4e/(1 + e)^2: no cancellation where tanh saturates
        return 4.0 * e / ((1.0 + e) * (1.0 + e))
    if act == "hardsigmoid":
        return _where((s > -3.0) & (s < 3.0), 1.0 / 6.0, 0.0, s)
    if act == "hardswish":  # ATen's hardswish_backward: 0 for x <= -3, 1 for x >= 3, x/3 + 1/2 strictly inside
        return _where(s <= -3.0, 0.0, _where(s >= 3.0, 1.0, s / 3.0 + 0.5, s), s)
    if act == "hardtanh":
        return _where((s > p0) & (s < p1), 1.0, 0.0, s)
    if act == "hard_logistic":
        return _where((s > -2.0) & (s < 2.0), 0.25, 0.0, s)
    raise AssertionError(act)


def _param_derivative(x, act, w):
    """df/dw per element: prelu's weight (x where x <= 0), swish's beta (x^2 sigma'(wx))."""
    if act == "prelu":
        return torch.where(x > 0, 0.0, x)
    z = x * w
    return _times_decaying(x * x, torch.sigmoid(z) * torch.sigmoid(-z))


def composite_backward(g, s, act, p0, p1, from_output):
    """g * f'(x) with PyTorch ops (differentiable), in s's dtype; s and from_output as in activation_backward."""
    if act == "relu":  # ATen's op has the same values (NaN passes the gradient) and is the cheapest on the host
        return torch.ops.aten.threshold_backward(g, s, 0)
    sc = _to_compute(s)
    return (g.to(sc.dtype) * _derivative(sc, act, p0, p1, from_output)).to(s.dtype)


def composite_channelwise_backward(g, x, weight, act, weight_grad):
    """(dx, dw or None) for prelu / tensor-beta swish with PyTorch ops (differentiable)."""
    xc = _to_compute(x)
    w = _channel_view(weight, x).to(xc.dtype)
    gc = g.to(xc.dtype)
    dx = (gc * _derivative(xc, act, w, 0.0, False)).to(x.dtype)
    if not weight_grad:
        return dx, None
    dw_elems = gc * _param_derivative(xc, act, w)
    dims = [d for d in range(x.dim()) if not (d == 1 and weight.numel() > 1)]
    dw = dw_elems.sum(dims) if dims else dw_elems
    return dx, dw.to(weight.dtype).reshape(weight.shape)


def composite_channelwise_jvp(x, weight, act, x_t, w_t):
    """The tangent of f(x, w) for tangents x_t, w_t (either may be None)."""
    xc = _to_compute(x)
    w = _channel_view(weight, x).to(xc.dtype)
    t = torch.zeros_like(xc) if x_t is None else x_t.to(xc.dtype) * _derivative(xc, act, w, 0.0, False)
    if w_t is not None:
        t = t + _channel_view(w_t, x).to(xc.dtype) * _param_derivative(xc, act, w)
    return t.to(x.dtype)

