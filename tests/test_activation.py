"""The activation family (dlkern.functional / dlkern.nn / dlkern::activation* ops) against PyTorch.

References run in float64 on exact copies of the inputs; results are held to their dtype's tolerance. Every test
that runs a Triton op checks the launch counter, so a silent fallback to PyTorch cannot pass. Shapes stay tiny:
on CPU the kernels run in Triton's interpreter.

Where dlkern deliberately differs from PyTorch the reference says so: hardsigmoid's gradient is exactly 1/6
(ATen's CPU kernel uses 1/6 rounded to float32, also for float64), silu/swish/gelu return their limits at
+-inf (and gelu_tanh's gradient at huge |x|) where ATen's formulas give inf*0 = NaN, and hardswish returns -0.0
at -inf (ATen: NaN), x beyond max/6 (ATen's x * 6 / 6: inf) and a NaN gradient at NaN on every device (see
_hardswish).
"""

import contextlib
import math
import re
import warnings
from typing import Callable, NamedTuple

import pytest
import torch
import torch.nn.functional as TF

import dlkern.functional as F
import dlkern.nn as dnn
from dlkern import catalog
from dlkern.ops import activation as ops
from dlkern.ops import triton_support
from helpers import DEVICES, FLOAT_DTYPES, TOLERANCES, assert_close

# The interpreter evaluates both sides of every tl.where in numpy, which warns about the discarded exp overflows.
pytestmark = [
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
]

FWD, BWD, CHANNEL_SUM = "activation_fwd_kernel", "activation_bwd_kernel", "channel_sum_kernel"
CHANNELWISE_BWD = "channelwise_bwd_kernel"
C = 3  # channels of the test tensors (dim 1)


def _exact_hardsigmoid(x):
    # ATen's value (and NaN / outside behaviour), with the exact 1/6 slope inside (-3, 3); twice differentiable
    # (ATen's hardsigmoid_backward has no derivative).
    return torch.where((x > -3) & (x < 3), x / 6 + 0.5, TF.hardsigmoid(x.detach()))


def _hardswish(x):
    # ATen's hardswish and hardswish_backward, the same on every device and at every position: -0.0 for x <= -3 (ATen's
    # x * 0; at -inf too, the limit, where ATen's is NaN), x for x >= 3, x(x + 3)/6 = ((x + 1.5)^2 - 2.25)/6 between,
    # with an exact 1/6 (ATen's CUDA kernel takes 1/6 rounded to float32, in float64 too) and with x once, so that
    # the gradient is g times one factor, (x + 1.5)/3, as ATen's g * (x/3 + 1/2): a NaN or inf g gives what ATen's
    # gives. NaN takes the inner branch: NaN value and gradient (ATen's vectorized CPU loop; its scalar tail and its
    # CUDA kernel pass g). Absolute error ~1e-16. test_hardswish_is_atens holds it (and dlkern's) to ATen.
    inner = ~((x <= -3) | (x >= 3))
    xi = torch.where(inner, x, 0.0)  # else the branch not taken would add 0 * (its slope at +-inf) = NaN
    parabola = ((xi + 1.5) ** 2 - 2.25) / 6
    return torch.where(inner, parabola, torch.where(x >= 3, x, x.new_full((), -0.0)))


def _hard_logistic(x):
    # Slope 1/4 strictly inside (-2, 2) by x itself: 0.25x + 0.5 rounds to 1 just below x = 2.
    return torch.where((x > -2) & (x < 2), 0.25 * x + 0.5, TF.hardtanh(0.25 * x + 0.5, 0.0, 1.0))


def _channel(w, x):
    return w.reshape((-1,) + (1,) * (x.dim() - 2)) if w.numel() > 1 else w.reshape(())


class Case(NamedTuple):
    id: str
    ours: Callable  # (x, w) -> y; w is the tensor parameter (or None)
    ref: Callable  # (x, w) -> y with PyTorch, run in float64
    breakpoints: tuple = ()
    param: float | None = None  # initial value of a per-channel tensor parameter
    limits: bool = False  # x * (decaying factor): dlkern returns the limit where ATen gives NaN at +-inf
    from_output: bool = False  # the backward reads the rounded output, as ATen's


CASES = [
    Case("sigmoid", lambda x, w: F.sigmoid(x), lambda x, w: torch.sigmoid(x), (0.0,), from_output=True),
    Case("tanh", lambda x, w: F.tanh(x), lambda x, w: torch.tanh(x), (0.0,), from_output=True),
    Case("relu", lambda x, w: F.relu(x), lambda x, w: TF.relu(x), (0.0,)),
    Case("leaky_relu", lambda x, w: F.leaky_relu(x, 0.2), lambda x, w: TF.leaky_relu(x, 0.2), (0.0,)),
    Case("prelu", lambda x, w: F.prelu(x, w), lambda x, w: TF.prelu(x, w), (0.0,), param=0.25),
    Case("prelu_shared", lambda x, w: F.prelu(x, w[:1]), lambda x, w: TF.prelu(x, w[:1]), (0.0,), param=0.25),
    Case("elu", lambda x, w: F.elu(x, 1.3), lambda x, w: TF.elu(x, 1.3), (0.0,)),
    Case("softplus", lambda x, w: F.softplus(x), lambda x, w: TF.softplus(x), (20.0,)),
    Case("softplus_b2_t5", lambda x, w: F.softplus(x, 2.0, 5.0), lambda x, w: TF.softplus(x, 2.0, 5.0), (2.5,)),
    Case("silu", lambda x, w: F.silu(x), lambda x, w: TF.silu(x), limits=True),
    Case("gelu", lambda x, w: F.gelu(x), lambda x, w: TF.gelu(x), limits=True),
    Case("gelu_tanh", lambda x, w: F.gelu(x, approximate="tanh"), lambda x, w: TF.gelu(x, approximate="tanh"),
         limits=True),
    Case("hardsigmoid", lambda x, w: F.hardsigmoid(x), lambda x, w: _exact_hardsigmoid(x), (-3.0, 3.0)),
    Case("hardswish", lambda x, w: F.hardswish(x), lambda x, w: _hardswish(x), (-3.0, 3.0)),
    Case("hardtanh", lambda x, w: F.hardtanh(x, -0.5, 2.0), lambda x, w: TF.hardtanh(x, -0.5, 2.0), (-0.5, 2.0)),
    Case("swish", lambda x, w: F.swish(x, 1.7), lambda x, w: x * torch.sigmoid(1.7 * x), limits=True),
    Case("swish_channel", lambda x, w: F.swish(x, w), lambda x, w: x * torch.sigmoid(_channel(w, x) * x),
         param=1.5, limits=True),
    Case("hard_logistic", lambda x, w: F.hard_logistic(x), lambda x, w: _hard_logistic(x), (-2.0, 2.0)),
]
CASE_IDS = [c.id for c in CASES]


@contextlib.contextmanager
def launches(*kernels):
    """Asserts that each named Triton kernel was launched inside the block."""
    before = {k: triton_support.launch_counts[k] for k in kernels}
    yield
    for k in kernels:
        assert triton_support.launch_counts[k] > before[k], f"{k} did not run"


def backward_kernels(x, g, w):
    """The backward's Triton kernels: prelu and tensor-parameter swish with a weight gradient, over x and g of one
    contiguous or channels_last layout, take one pass (channelwise_bwd_kernel; the split sum too when there are
    splits, see test_channelwise_backward_in_one_pass); everything else activation_bwd_kernel (and, for a weight
    gradient, the two-pass channel sum)."""
    if w is None:
        return (BWD,)
    one_layout = g.stride() == x.stride() and (
        x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)))
    return (CHANNELWISE_BWD,) if one_layout and x.numel() > 0 else (BWD, CHANNEL_SUM)


def _param(case, dtype, device):
    if case.param is None:
        return None
    return torch.linspace(case.param, case.param + 0.5, C, dtype=dtype, device=device).requires_grad_()


def _layout(name, dtype, device, scale=3.0):
    """A (2, C, 4, 5) tensor in the named memory layout, leaf of its own graph."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)

    if name == "contiguous":
        x = rand(2, C, 4, 5)
    elif name == "transposed":
        x = rand(5, C, 4, 2).transpose(0, 3)
    elif name == "channels_last":
        x = rand(2, C, 4, 5).to(memory_format=torch.channels_last)
    elif name == "sliced":
        x = rand(2, C, 8, 6)[:, :, ::2, 1:]
    elif name == "expanded":
        x = rand(2, C, 1, 5).expand(2, C, 4, 5)
    return x


def _reference(case, x, w, g):
    """(y, dx, dw) in float64 from exact copies of the inputs."""
    x64 = x.detach().double().requires_grad_()
    w64 = None if w is None else w.detach().double().requires_grad_()
    y = case.ref(x64, w64)
    y.backward(g.double())
    return y.detach(), x64.grad, None if w is None else w64.grad


def _run(case, x, w, g):
    """(y, dx, dw) from dlkern."""
    x = x.detach().requires_grad_()
    y = case.ours(x, w)
    y.backward(g)
    return y, x.grad, None if w is None else w.grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "channels_last", "sliced", "expanded"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_forward_backward(case, dtype, layout, device):
    x = _layout(layout, dtype, device)
    w = _param(case, dtype, device)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device, dtype)
    with launches(FWD, *backward_kernels(x, g, w)):
        y, dx, dw = _run(case, x, w, g)
    y_ref, dx_ref, dw_ref = _reference(case, x, w, g)

    assert y.dtype == dtype and y.shape == x.shape
    # Like PyTorch's elementwise ops: a dense input's strides carry over to the output.
    assert y.stride() == case.ref(x.detach(), None if w is None else w.detach()).stride()
    assert_close(y, y_ref)
    if case.from_output and dtype in (torch.float16, torch.bfloat16):
        # The backward sees the output rounded to the dtype (as ATen's): the reference starts from it too.
        y_rounded = y.detach().double()
        dx_ref = g.double() * (y_rounded * (1 - y_rounded) if case.id == "sigmoid" else 1 - y_rounded**2)
    assert_close(dx, dx_ref)
    if w is not None:
        assert dw.dtype == w.dtype and dw.shape == w.shape
        assert_close(dw, dw_ref)


def _special_values(dtype, breakpoints):
    info = torch.finfo(dtype)
    mags = [0.0, info.tiny, 1e-7, 1e-3, 0.24, 0.25, 0.26, 0.49, 0.5, 0.51, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0,
            88.0, 100.0, info.max / 4, math.inf]
    values = [v for m in mags for v in (m, -m)] + [math.nan]
    for b in breakpoints:  # at each breakpoint and its neighbours in this dtype
        t = torch.tensor(b, dtype=dtype)
        values += [b, torch.nextafter(t, t - 1).item(), torch.nextafter(t, t + 1).item()]
    if dtype == torch.bfloat16 and triton_support.INTERPRETING:
        # Triton's interpreter converts bfloat16 subnormals to float32 wrongly (to 0; its _convert_float
        # renormalizes them, then clamps the exponent); GPUs convert them exactly. Keep normal numbers only.
        values = [v for v in values if not 0 < abs(v) < info.tiny]
    return torch.tensor(values, dtype=dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_special_values(case, dtype, device):
    """Breakpoints (and their neighbours), +-0, tiny, huge, +-inf and NaN: same value and gradient as PyTorch,
    NaN where PyTorch gives NaN."""
    x = _special_values(dtype, case.breakpoints).to(device)
    w = None if case.param is None else torch.full((1,), case.param, dtype=dtype, device=device).requires_grad_()
    g = torch.ones_like(x)
    with launches(FWD, *backward_kernels(x, g, w)):
        y, dx, _ = _run(case, x, w, g)
    y_ref, dx_ref, _ = _reference(case, x, w, g)
    if case.limits:
        # ATen: inf * 0 = NaN at +-inf (and for gelu_tanh's gradient at huge |x|); dlkern gives the limits.
        artifact = y_ref.isnan() & ~x.isnan()
        y_ref = torch.where(artifact, torch.where(x.double() > 0, x.double(), 0.0), y_ref)
        artifact = dx_ref.isnan() & ~x.isnan()
        dx_ref = torch.where(artifact, (x.double() > 0).double(), dx_ref)
        assert (x.double().abs()[artifact] >= torch.finfo(dtype).max / 4).all(), "only at +-inf and huge |x|"
    if case.from_output:  # rounded output, as in test_forward_backward
        y_rounded = y.detach().double()
        dx_ref = y_rounded * (1 - y_rounded) if case.id == "sigmoid" else 1 - y_rounded**2
    assert_close(y, y_ref, equal_nan=True)
    assert_close(dx, dx_ref, equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_relative_precision(dtype, device):
    """Where results are tiny, they keep relative precision (atol=0): tanh and expm1 near 0 (no cancellation),
    softplus and sigmoid far in the negative tail (no underflow to 0)."""
    rtol = TOLERANCES[dtype]["rtol"]
    small = torch.tensor([1e-30, 1e-12, 1e-7, 1e-4, 1e-2, 0.1, 0.24, 0.26, 0.49, 0.51, 0.9], dtype=torch.float64)
    small = torch.cat([small, -small])
    tail = -torch.tensor([1.0, 5.0, 12.0, 40.0, 80.0], dtype=torch.float64)
    if device == "cuda" and dtype == torch.float32:
        # fp32 tl.exp on a GPU is ex2.approx(x * log2 e), ~|x| * 6e-8 relative: values below e^-12 (~6e-6) are
        # held to an absolute error < 1e-14 (the other tests), not to float32's relative tolerance.
        tail = tail[tail >= -12]
    checks = [
        (F.tanh, torch.tanh, small),
        (F.elu, TF.elu, -small.abs()),
        (F.silu, TF.silu, small),
        (F.gelu, TF.gelu, small[small.abs() < 0.1]),
        (F.softplus, TF.softplus, tail),
        (F.sigmoid, torch.sigmoid, tail),
        (lambda x: F.softplus(x, 0.5, 20.0), lambda x: TF.softplus(x, 0.5, 20.0), 2 * tail),
    ]
    for ours, ref, x in checks:
        x = x.to(device, dtype)
        with launches(FWD):
            y = ours(x)
        torch.testing.assert_close(y, ref(x.double()).to(dtype), rtol=rtol, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_empty(case, device):
    for shape in [(0, C), (2, C, 0, 4)]:
        x = torch.empty(shape, device=device).requires_grad_()
        w = _param(case, torch.float32, device)
        y = case.ours(x, w)
        assert y.shape == x.shape and y.dtype == x.dtype
        y.sum().backward()
        assert x.grad.shape == x.shape
        if w is not None:
            assert torch.equal(w.grad, torch.zeros_like(w))


def _away_from_breakpoints(case, shape, device):
    x = torch.empty(shape, dtype=torch.float64).uniform_(-4, 4, generator=torch.Generator().manual_seed(2))
    for b in case.breakpoints + (0.0,):
        near = (x - b).abs() < 0.05
        x = torch.where(near, x + 0.1, x)  # gradcheck's finite differences must not straddle a kink
    return x.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_gradcheck(case, device):
    x = _away_from_breakpoints(case, (2, C, 2), device).requires_grad_()
    w = _param(case, torch.float64, device)
    inputs = (x,) if w is None else (x, w)
    with launches(FWD, *backward_kernels(x, x, w)):
        assert torch.autograd.gradcheck(lambda *a: case.ours(a[0], a[1] if len(a) > 1 else None), inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_hardswish_is_atens(dtype):
    """dlkern's hardswish and the tests' reference _hardswish against ATen's (CPU), at the breakpoints -3 and 3 and
    their neighbours, at -1.5 (slope 0) and between: ATen's gradient is 0 for x <= -3 and 1 for x >= 3 (so the inner
    slope's -1/2 and 3/2 there are never taken). Where ATen depends on the device or the position, or gives NaN,
    dlkern is fixed: -0.0 at -inf (ATen: NaN), a NaN gradient at NaN (ATen: NaN or the incoming gradient)."""
    t = torch.tensor([-3.0, 3.0], dtype=dtype)
    x = torch.cat([torch.tensor([-1e30, -5.0, -1.5, -0.5, -0.0, 0.0, 1e-20, 0.5, 2.0, 5.0, 1e30, math.inf],
                                dtype=dtype), t, torch.nextafter(t, t - 1), torch.nextafter(t, t + 1)])
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(12), dtype=dtype)
    xa = x.clone().requires_grad_()
    ya = TF.hardswish(xa)
    (dxa,) = torch.autograd.grad(ya, xa, g)
    assert torch.equal(dxa[-6:-4], torch.stack([torch.zeros_like(g[-6]), g[-5]]))  # at -3: 0, at 3: g
    for fn in (F.hardswish, _hardswish):
        xo = x.clone().requires_grad_()
        with launches(FWD, BWD) if fn is F.hardswish else contextlib.nullcontext():
            y = fn(xo)
            (dx,) = torch.autograd.grad(y, xo, g)
        assert_close(y, ya.detach())
        assert_close(dx, dxa)
        if fn is F.hardswish:
            assert torch.equal(y.signbit(), ya.signbit())  # -0.0 for x <= -3 and for -0.0, as ATen's
    special = torch.tensor([-math.inf, math.nan], dtype=dtype)
    assert TF.hardswish(special)[0].isnan()  # ATen: -inf * relu6(-inf) = -inf * 0
    for fn in (F.hardswish, _hardswish):
        xs = special.clone().requires_grad_()
        y = fn(xs)
        assert y[0] == 0 and y[0].signbit() and y[1].isnan()
        (dx,) = torch.autograd.grad(y, xs, torch.ones_like(y))
        assert dx[0] == 0 and dx[1].isnan()


def test_swish_beta_one_is_silu():
    x = _layout("contiguous", torch.float32, "cpu")
    torch.testing.assert_close(F.swish(x), F.silu(x), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------- in place

INPLACE = [
    ("relu", lambda x, inplace: F.relu(x, inplace), lambda x: TF.relu(x)),
    ("leaky_relu", lambda x, inplace: F.leaky_relu(x, 0.2, inplace), lambda x: TF.leaky_relu(x, 0.2)),
    ("leaky_relu_0", lambda x, inplace: F.leaky_relu(x, 0.0, inplace), lambda x: TF.leaky_relu(x, 0.0)),
    ("elu", lambda x, inplace: F.elu(x, 1.3, inplace), lambda x: TF.elu(x, 1.3)),
    ("silu", lambda x, inplace: F.silu(x, inplace), lambda x: TF.silu(x)),
    ("hardsigmoid", lambda x, inplace: F.hardsigmoid(x, inplace), _exact_hardsigmoid),
    ("hardswish", lambda x, inplace: F.hardswish(x, inplace), _hardswish),
    ("hardtanh", lambda x, inplace: F.hardtanh(x, -0.5, 2.0, inplace), lambda x: TF.hardtanh(x, -0.5, 2.0)),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("name,ours,ref", INPLACE, ids=[i[0] for i in INPLACE])
def test_inplace(name, ours, ref, layout, dtype, device):
    """inplace=True writes into the input (a non-leaf here) and backpropagates like PyTorch's in-place ops."""
    base = _layout(layout, dtype, device)
    base = torch.cat([base, torch.full_like(base, 7.0)], dim=0)  # a sibling region that must stay untouched
    x = base[:2].detach().requires_grad_()
    h = x * 1  # non-leaf, same strides as x
    ptr, version = h.data_ptr(), h._version
    g = torch.randn(h.shape, generator=torch.Generator().manual_seed(3), dtype=dtype).to(device)
    with launches(FWD, BWD):
        y = ours(h, True)
        assert y is h and h.data_ptr() == ptr and h._version > version
        y.backward(g)
    y_ref, dx_ref, _ = _reference(Case(name, None, lambda x, w: ref(x)), x, None, g)
    assert_close(y, y_ref)
    assert_close(x.grad, dx_ref)

    with torch.no_grad():  # no autograd: straight into the tensor, a strided view of its base included
        view = base[:2]
        expected = ref(view.double())
        with launches(FWD):
            ours(view, True)
        assert_close(view, expected)
        assert torch.equal(base[2:], torch.full_like(base[2:], 7.0))


def test_inplace_errors():
    leaf = torch.randn(4, requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf Variable"):
        F.relu(leaf, inplace=True)
    with torch.no_grad():  # allowed without autograd, as in PyTorch
        F.relu(leaf, inplace=True)
    assert (leaf >= 0).all()
    # From the output of an in-place op with a negative slope/alpha the branch is lost: PyTorch refuses too.
    for fn in (lambda t: F.leaky_relu(t, -0.1, inplace=True), lambda t: F.elu(t, -1.0, inplace=True)):
        y = fn(torch.randn(4, requires_grad=True) * 1)
        with pytest.raises(RuntimeError, match="negative slope"):
            y.sum().backward()
    with pytest.raises(RuntimeError, match="more than one element"):
        F.relu(torch.randn(3, 1).expand(3, 4), inplace=True)


# ---------------------------------------------------------------------------------------------------- layouts


def test_strided_layouts_beyond_four_dims():
    """Non-dense tensors are walked with their strides in up to four (coalesced) dims; beyond, on a dense copy."""
    g = torch.Generator().manual_seed(4)
    base = torch.randn(2, 3, 4, 6, 8, 2, generator=g)
    views = (base[:, :, :, ::2], base[:, ::2, :, ::2, ::2, :1], base[::1, :, ::3, ::2, ::3])
    assert [ops._layout([torch.empty_like(v), v]) is None for v in views] == [False, False, True]
    for x in views:
        x = x.requires_grad_()
        y = F.gelu(x)
        y.sum().backward()  # grad_output is an expanded (stride-0) tensor
        xr = x.detach().double().requires_grad_()
        TF.gelu(xr).sum().backward()
        assert_close(y, TF.gelu(xr.detach()))
        assert_close(x.grad, xr.grad)


def test_layout_plan():
    x = torch.randn(2, 3, 4, 5)
    assert ops._layout([x, x])[0] is False
    cl = x.to(memory_format=torch.channels_last)
    assert ops._layout([torch.empty_like(cl), cl])[0] is False  # dense but permuted: flat, no copy
    t = x.transpose(0, 3)
    assert ops._layout([torch.empty_like(t), t])[0] is False
    sliced = x[:, :, ::2]
    strided, sizes, strides = ops._layout([torch.empty_like(sliced), sliced])
    # (2, 3, 2, 5) with strides (60, 20, 10, 1) coalesces to (12, 5) with strides (10, 1)
    assert strided and sizes == (1, 12, 5) and strides[1] == (0, 0, 10, 1)


# ---------------------------------------------------------------------------------------------------- PReLU / Swish


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_param_grad_deterministic(layout, device):
    """The per-channel reduction adds partial sums in a fixed order: bitwise identical gradients run to run."""
    x = _layout(layout, torch.float32, device)
    grads = []
    for _ in range(2):
        for fn in (lambda x, w: F.prelu(x, w), lambda x, w: F.swish(x, w)):
            w = torch.full((C,), 0.3, device=device, requires_grad=True)
            with launches(CHANNEL_SUM):
                fn(x, w).backward(torch.ones_like(x))
            grads.append(w.grad)
    assert torch.equal(grads[0], grads[2]) and torch.equal(grads[1], grads[3])


def test_param_checks():
    x = torch.randn(2, C, 4)
    with pytest.raises(RuntimeError, match="Mismatch of parameter numbers"):
        F.prelu(x, torch.ones(2))
    with pytest.raises(RuntimeError, match="scalar or 1D"):
        F.prelu(x, torch.ones(1, C))
    assert F.prelu(torch.randn(5), torch.ones(1)).shape == (5,)
    with pytest.raises(ValueError, match="min_val cannot be greater"):
        F.hardtanh(x, 1.0, -1.0)
    with pytest.raises(RuntimeError, match="approximate"):
        F.gelu(x, approximate="fast")


# ---------------------------------------------------------------------------------------------------- modules

MODULES = [
    ("Sigmoid", (), {}), ("Tanh", (), {}), ("ReLU", (), {"inplace": True}), ("LeakyReLU", (0.2,), {}),
    ("PReLU", (C,), {"init": 0.1}), ("ELU", (), {"alpha": 0.7}), ("Softplus", (2.0, 5.0), {}), ("SiLU", (), {}),
    ("GELU", (), {"approximate": "tanh"}), ("Hardsigmoid", (), {}), ("Hardswish", (), {"inplace": True}),
    ("Hardtanh", (-0.5, 2.0), {}),
]


@pytest.mark.parametrize("name,args,kwargs", MODULES, ids=[m[0] for m in MODULES])
def test_modules_match_torch(name, args, kwargs):
    ours, theirs = getattr(dnn, name)(*args, **kwargs), getattr(torch.nn, name)(*args, **kwargs)
    assert isinstance(ours, type(theirs))
    assert repr(ours) == repr(theirs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = _layout("contiguous", torch.float32, "cpu")
    with launches(FWD):
        y = ours(x.clone())
    assert_close(y, theirs.double()(x.double()))
    (act, p0, p1), (act_t, p0_t, p1_t) = catalog.activation_spec(ours), catalog.activation_spec(theirs)
    assert act == act_t and p1 == p1_t
    assert torch.equal(p0, p0_t) if isinstance(p0, torch.Tensor) else p0 == p0_t


def test_swish_and_hard_logistic_modules():
    x = _layout("contiguous", torch.float32, "cpu")
    fixed = dnn.Swish(1.5)
    assert repr(fixed) == "Swish(beta=1.5)" and list(fixed.state_dict()) == []
    assert_close(fixed(x), x.double() * torch.sigmoid(1.5 * x.double()))
    learn = dnn.Swish(1.5, learnable=True, num_parameters=C)
    assert repr(learn) == f"Swish(num_parameters={C}, beta=1.5, learnable=True)"
    assert list(learn.state_dict()) == ["beta"] and torch.equal(learn.beta, torch.full((C,), 1.5))
    with launches(CHANNEL_SUM):
        learn(x).sum().backward()
    assert learn.beta.grad.shape == (C,)
    with pytest.raises(ValueError):
        dnn.Swish(num_parameters=C)
    hl = dnn.HardLogistic()
    assert repr(hl) == "HardLogistic()" and list(hl.parameters()) == []
    assert_close(hl(x), _hard_logistic(x.double()))


def test_activation_spec():
    nn = torch.nn
    prelu, swish = nn.PReLU(C), dnn.Swish(2.0, learnable=True)
    specs = {
        nn.ReLU(): ("relu", 0.0, 0.0), nn.LeakyReLU(0.2): ("leaky_relu", 0.2, 0.0), prelu: ("prelu", prelu.weight, 0.0),
        nn.ELU(0.5): ("elu", 0.5, 0.0), nn.Softplus(2, 10): ("softplus", 2.0, 10.0), nn.SiLU(): ("silu", 0.0, 0.0),
        nn.GELU(): ("gelu", 0.0, 0.0), dnn.GELU("tanh"): ("gelu_tanh", 0.0, 0.0), nn.Sigmoid(): ("sigmoid", 0.0, 0.0),
        nn.Tanh(): ("tanh", 0.0, 0.0), nn.Hardsigmoid(): ("hardsigmoid", 0.0, 0.0),
        nn.Hardswish(): ("hardswish", 0.0, 0.0), nn.Hardswish(inplace=True): ("hardswish", 0.0, 0.0),
        nn.Hardtanh(-2, 3): ("hardtanh", -2.0, 3.0), nn.ReLU6(): ("hardtanh", 0.0, 6.0),
        dnn.Swish(0.5): ("swish", 0.5, 0.0), swish: ("swish", swish.beta, 0.0),
        dnn.HardLogistic(): ("hard_logistic", 0.0, 0.0),
    }
    for module, spec in specs.items():
        assert catalog.activation_spec(module) == spec, module
    for module in (nn.Identity(), nn.Mish(), nn.SELU(), nn.Softmax(1)):
        assert catalog.activation_spec(module) is None


# ---------------------------------------------------------------------------------------------------- integration


def _opcheck_cases():
    x = torch.randn(2, C, 4, dtype=torch.float64)
    g = torch.randn_like(x)
    w = torch.rand(C, dtype=torch.float64)
    params = {"leaky_relu": (0.1, 0.0), "prelu": (0.25, 0.0), "elu": (1.3, 0.0), "softplus": (2.0, 5.0),
              "swish": (1.7, 0.0), "hardtanh": (-0.5, 2.0)}
    dl = torch.ops.dlkern
    for act in catalog.ACTIVATIONS:
        p0, p1 = params.get(act, (0.0, 0.0))
        yield act, dl.activation.default, (x.clone().requires_grad_(), act, p0, p1)
        yield act + "_", dl.activation_.default, (x.clone(), act, p0, p1)
        from_output = act in catalog.SAVE_OUTPUT
        yield act + "_backward", dl.activation_backward.default, (g, x.sigmoid() if from_output else x, act, p0, p1,
                                                                   from_output)
    for act in catalog.CHANNELWISE:
        yield act + "_channelwise", dl.activation_channelwise.default, (x.clone().requires_grad_(),
                                                                        w.clone().requires_grad_(), act)
        yield act + "_channelwise_backward", dl.activation_channelwise_backward.default, (g, x, w, act, True)


@pytest.mark.parametrize("name,op,args", list(_opcheck_cases()), ids=[c[0] for c in _opcheck_cases()])
def test_opcheck(name, op, args):
    torch.library.opcheck(op, args)


def _all_activations(x, w):
    y = F.relu(x) + F.leaky_relu(x, 0.2) + F.elu(x, 1.3) + F.softplus(x, 2.0, 5.0) + F.silu(x) + F.gelu(x)
    y = y + F.gelu(x, approximate="tanh") + F.sigmoid(x) + F.tanh(x) + F.hardsigmoid(x) + F.hardtanh(x, -0.5, 2.0)
    return y + F.hardswish(x) + F.swish(x, 1.7) + F.hard_logistic(x) + F.prelu(x, w) + F.swish(x, w)


def _all_inplace(x):
    # Each on its own intermediate: an in-place op must not overwrite what an earlier one saved (PyTorch's rule).
    y = F.relu(x * 1, inplace=True) + F.leaky_relu(x * 1, 0.2, inplace=True) + F.elu(x * 1, 1.3, inplace=True)
    y = y + F.silu(x * 1, inplace=True) + F.hardsigmoid(x * 1, inplace=True) + F.hardtanh(x * 1, -0.5, 2.0, True)
    return y + F.hardswish(x * 1, inplace=True)


def test_compile_fullgraph():
    """Every op (forward and backward, in-place ones with and without autograd) under torch.compile(fullgraph)."""
    torch._dynamo.reset()
    x = _layout("contiguous", torch.float32, "cpu")
    w = torch.full((C,), 0.3, requires_grad=True)
    grads = []
    for fn in (_all_activations, torch.compile(_all_activations, fullgraph=True)):
        xx = x.clone().requires_grad_()
        w.grad = None
        with launches(FWD, BWD, CHANNEL_SUM):
            fn(xx, w).sum().backward()
        grads.append((xx.grad, w.grad))
    torch.testing.assert_close(grads[0], grads[1])

    compiled = torch.compile(_all_inplace, fullgraph=True)
    with launches(FWD):
        torch.testing.assert_close(compiled(x), _all_inplace(x))
    xx = x.clone().requires_grad_()
    with launches(FWD, BWD):
        compiled(xx).sum().backward()
    xe = x.clone().requires_grad_()
    _all_inplace(xe).sum().backward()
    torch.testing.assert_close(xx.grad, xe.grad)
    torch._dynamo.reset()


def test_autocast_runs_in_input_dtype():
    """Not on autocast's cast lists, like PyTorch's activations: the input's dtype in and out."""
    x = _layout("contiguous", torch.float32, "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert F.gelu(x).dtype == TF.gelu(x).dtype == torch.float32
        xb = x.bfloat16()
        assert F.silu(xb).dtype == TF.silu(xb).dtype == torch.bfloat16


def test_fallback_warns_and_matches(monkeypatch):
    """CPU tensors without the interpreter: a PyTorch composite after a one-time warning, no kernel launched."""
    monkeypatch.setattr(triton_support, "INTERPRETING", False)
    monkeypatch.setattr(triton_support, "_warned", set())
    x = _layout("sliced", torch.float32, "cpu")
    counts = dict(triton_support.launch_counts)
    for case in CASES:
        w = _param(case, torch.float32, "cpu")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y, dx, dw = _run(case, x, w, torch.ones_like(x))
        y_ref, dx_ref, dw_ref = _reference(case, x, w, torch.ones_like(x))
        assert_close(y, y_ref)
        assert_close(dx, dx_ref)
        if w is not None:
            assert_close(dw, dw_ref)
        if caught:
            assert "PyTorch composite" in str(caught[0].message)
    for name in ("relu", "silu"):  # in place, through the same fallback
        h = x.detach().clone().requires_grad_() * 1
        getattr(F, name)(h, inplace=True).sum().backward()
    assert dict(triton_support.launch_counts) == counts
    assert "relu" in triton_support._warned and "prelu" in triton_support._warned
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        F.relu(x)
    assert not caught  # once per op


# ---------------------------------------------------------------------------------------------------- issue 9


# Weights of C elements that are not contiguous, as (base shape, view of the base): a strided slice, a column,
# an expanded (0-stride) one-element tensor and an expanded 0-d tensor.
STRIDED_WEIGHTS = {
    "step2": ((2 * C,), lambda b: b[::2]),
    "column": ((C, 2), lambda b: b[:, 1]),
    "expanded": ((1,), lambda b: b.expand(C)),
    "expanded_0d": ((), lambda b: b.expand(C)),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("weight", list(STRIDED_WEIGHTS))
@pytest.mark.parametrize("case", [c for c in CASES if c.id in ("prelu", "swish_channel")], ids=lambda c: c.id)
def test_strided_weight(case, weight, dtype, device):
    """prelu / tensor-beta swish read the weight through its strides: forward and both gradients as PyTorch's
    ops on the same view (the weight gradient reaches the view's base)."""
    shape, view = STRIDED_WEIGHTS[weight]
    base = (torch.rand(shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64) + 0.2)
    x = _layout("contiguous", dtype, device)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64).to(device, dtype)
    ours_base = base.to(device, dtype).requires_grad_()
    w = view(ours_base)
    assert not w.is_contiguous()
    xr = x.detach().requires_grad_()
    with launches(FWD, *backward_kernels(x, g, w)):
        y = case.ours(xr, w)
        y.backward(g)
    ref_base = base.to(device).requires_grad_()
    x64 = x.detach().double().requires_grad_()
    y_ref = case.ref(x64, view(ref_base))
    y_ref.backward(g.double())
    assert_close(y, y_ref.detach())
    assert_close(xr.grad, x64.grad)
    assert_close(ours_base.grad, ref_base.grad)


def _forward_ad_cases():
    """(id, ours, ref, has_weight) for every activation, out of place and in place."""
    for c in CASES:
        yield c.id, c.ours, c.ref, c.param is not None
    for name, ours, ref in INPLACE:
        yield name + "_", (lambda o: lambda x, w: o(x * 1, True))(ours), (lambda r: lambda x, w: r(x))(ref), False


FORWARD_AD = list(_forward_ad_cases())


def _inputs64(case_id, device):
    case = next((c for c in CASES if case_id.startswith(c.id)), CASES[2])
    x = _away_from_breakpoints(case, (2, C, 2), device)
    w = torch.linspace(0.25, 0.75, C, dtype=torch.float64, device=device)
    return x, w


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,ours,ref,has_w", FORWARD_AD, ids=[c[0] for c in FORWARD_AD])
def test_forward_mode_ad(name, ours, ref, has_w, device):
    """torch.func.jvp, jacfwd and torch.autograd.forward_ad give f'(x)·t (+ df/dw·t_w), as PyTorch's ops."""
    x, w = _inputs64(name, device)
    tx = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(device)
    tw = torch.randn(C, generator=torch.Generator().manual_seed(8), dtype=torch.float64).to(device)
    if name == "prelu_shared":
        w, tw = w[:1], tw[:1]
    primals, tangents = ((x, w), (tx, tw)) if has_w else ((x,), (tx,))
    y, t = torch.func.jvp(lambda *a: ours(a[0], a[1] if has_w else None), primals, tangents)
    y_ref, t_ref = torch.func.jvp(lambda *a: ref(a[0], a[1] if has_w else None), primals, tangents)
    assert_close(y, y_ref)
    assert_close(t, t_ref)
    assert t.abs().sum() > 0
    if has_w:  # the weight's tangent alone
        _, t_w = torch.func.jvp(lambda w_: ours(x, w_), (w,), (tw,))
        _, t_w_ref = torch.func.jvp(lambda w_: ref(x, w_), (w,), (tw,))
        assert_close(t_w, t_w_ref)
    xs = x[:1, :, :1]  # jacfwd: vmap over the tangents
    jac = torch.func.jacfwd(lambda a: ours(a, w if has_w else None))(xs)
    jac_ref = torch.func.jacfwd(lambda a: ref(a, w if has_w else None))(xs)
    assert_close(jac, jac_ref)
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        duals = [fwAD.make_dual(p, tt) for p, tt in zip(primals, tangents)]
        out = fwAD.unpack_dual(ours(duals[0], duals[1] if has_w else None))
    assert out.tangent is not None
    assert_close(out.tangent, t_ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,ours,ref,has_w", FORWARD_AD, ids=[c[0] for c in FORWARD_AD])
def test_double_backward(name, ours, ref, has_w, device):
    """gradgradcheck (float64) for every activation, channelwise and in place included; and an exact
    Hessian-vector product against PyTorch's."""
    x, w = _inputs64(name, device)
    if name == "prelu_shared":
        w = w[:1]
    inputs = (x.requires_grad_(), w.requires_grad_()) if has_w else (x.requires_grad_(),)
    fn = lambda *a: ours(a[0], a[1] if has_w else None)  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, inputs)
    ref_fn = lambda *a: ref(a[0], a[1] if has_w else None)  # noqa: E731
    v = tuple(torch.randn_like(i) for i in inputs)
    hvp = torch.autograd.functional.hvp(lambda *a: fn(*a).pow(2).sum(), inputs, v)[1]
    hvp_ref = torch.autograd.functional.hvp(lambda *a: ref_fn(*a).pow(2).sum(), inputs, v)[1]
    for a, b in zip(hvp, hvp_ref):
        assert_close(a, b)


@pytest.mark.parametrize("name,ours,ref,has_w", FORWARD_AD, ids=[c[0] for c in FORWARD_AD])
def test_torch_func_transforms(name, ours, ref, has_w):
    """torch.func.grad, vjp, jacrev, vmap(grad) and vmap (also over in-place activations) as PyTorch's ops."""
    x, w = _inputs64(name, "cpu")
    if name == "prelu_shared":
        w = w[:1]
    wf = w if has_w else None
    f = lambda a: ours(a, wf).sin().sum()  # noqa: E731
    f_ref = lambda a: ref(a, wf).sin().sum()  # noqa: E731
    assert_close(torch.func.grad(f)(x), torch.func.grad(f_ref)(x))
    y, vjp_fn = torch.func.vjp(lambda a: ours(a, wf), x)
    y_ref, vjp_ref = torch.func.vjp(lambda a: ref(a, wf), x)
    assert_close(y, y_ref)
    assert_close(vjp_fn(torch.ones_like(y))[0], vjp_ref(torch.ones_like(y))[0])
    xs = x[:1, :, :1]
    assert_close(torch.func.jacrev(lambda a: ours(a, wf))(xs), torch.func.jacrev(lambda a: ref(a, wf))(xs))
    xv = torch.stack([x, 2 * x, -x])  # vmap over a new leading dim: each sample is an (N, C, L) input
    assert_close(torch.func.vmap(torch.func.grad(f))(xv), torch.func.vmap(torch.func.grad(f_ref))(xv))
    assert_close(torch.func.vmap(lambda a: ours(a, wf))(xv), torch.func.vmap(lambda a: ref(a, wf))(xv))
    if has_w:  # a weight per sample, and the weight's gradient per sample
        ws = torch.stack([w, w * 0.5, w + 0.1])
        assert_close(torch.func.vmap(ours)(xv, ws), torch.func.vmap(ref)(xv, ws))
        g_w = torch.func.vmap(torch.func.grad(lambda a, b: ours(a, b).sin().sum(), argnums=1))(xv, ws)
        g_w_ref = torch.func.vmap(torch.func.grad(lambda a, b: ref(a, b).sin().sum(), argnums=1))(xv, ws)
        assert_close(g_w, g_w_ref)
        assert_close(torch.func.vmap(ours, in_dims=(None, 0))(x, ws), torch.func.vmap(ref, in_dims=(None, 0))(x, ws))


@pytest.mark.parametrize("name,ours,ref", INPLACE, ids=[i[0] for i in INPLACE])
def test_vmap_inplace_no_grad(name, ours, ref):
    x, _ = _inputs64(name, "cpu")
    out = torch.func.vmap(lambda a: ours(a.clone(), True))(x)
    assert_close(out, ref(x))


@pytest.mark.parametrize("name,ours,ref", INPLACE, ids=[i[0] for i in INPLACE])
def test_inplace_then_inplace(name, ours, ref):
    """An in-place activation followed by another in-place op on its output: dlkern backpropagates where PyTorch
    does (hardtanh_, silu_, hardsigmoid_, hardswish_ keep a copy of their input) and raises where PyTorch raises (relu_,
    leaky_relu_, elu_ save their output)."""
    torch_inplace = {"relu": lambda t: TF.relu(t, True), "leaky_relu": lambda t: TF.leaky_relu(t, 0.2, True),
                     "leaky_relu_0": lambda t: TF.leaky_relu(t, 0.0, True), "elu": lambda t: TF.elu(t, 1.3, True),
                     "silu": lambda t: TF.silu(t, True), "hardsigmoid": lambda t: TF.hardsigmoid(t, True),
                     "hardswish": lambda t: TF.hardswish(t, True),
                     "hardtanh": lambda t: TF.hardtanh(t, -0.5, 2.0, True)}[name]
    results = []
    for fn in (lambda t: ours(t, True), torch_inplace):
        x = _layout("contiguous", torch.float64, "cpu").requires_grad_()
        y = fn(x * 1)
        y.mul_(2)
        try:
            y.sum().backward()
            results.append(x.grad)
        except RuntimeError as e:
            results.append(str(e).split(":")[0])  # the node's name and version counts differ
    if isinstance(results[1], str):
        assert results[0] == results[1]
    else:  # PyTorch backpropagates: so does dlkern, with the out-of-place reference's gradient
        x = _layout("contiguous", torch.float64, "cpu").requires_grad_()
        (2 * ref(x)).sum().backward()
        assert_close(results[0], x.grad)


def test_inplace_inference_tensor():
    with torch.inference_mode():
        t = torch.randn(4)
    message = "Inplace update to inference tensor outside InferenceMode is not allowed"
    with pytest.raises(RuntimeError, match=message):
        TF.relu(t, True)
    for fn in (lambda a: F.relu(a, True), lambda a: F.hardtanh(a, -0.5, 0.5, True), lambda a: F.silu(a, True)):
        with pytest.raises(RuntimeError, match=message):
            fn(t)
        with torch.inference_mode():
            fn(t)  # allowed inside inference mode, as PyTorch
    assert (t >= -0.5).all()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_composite_matches_triton_special_values(case, dtype, monkeypatch):
    """The PyTorch composite (CPU without the interpreter) and the Triton kernels give the same special values,
    forward and backward (and the parameter gradient): the mathematical limits at +-inf, no NaN for large |x|."""
    x = _special_values(dtype, case.breakpoints)
    if case.id.startswith("swish"):
        info = torch.finfo(dtype)
        x = torch.cat([x, torch.tensor([info.max / 2, -info.max / 2, 40000.0, -40000.0], dtype=torch.float64)
                       .clamp(-info.max, info.max).to(dtype)])
    g = torch.ones_like(x)
    results = []
    for triton_path in (True, False):
        if not triton_path:
            monkeypatch.setattr(triton_support, "_composite_forced", True)
        w = None if case.param is None else torch.full((1,), case.param, dtype=dtype).requires_grad_()
        results.append(_run(case, x, w, g))
    for a, b in zip(*results):
        if a is not None:
            assert_close(b, a.detach().double(), dtype=dtype, equal_nan=True)
            assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isinf(), b.isinf())


def test_parameter_errors_as_pytorch():
    """NaN hardtanh bounds give NaN (as PyTorch); a weight of another dtype and scalar parameters that overflow
    the dtype PyTorch converts them to raise PyTorch's errors."""
    x = torch.tensor([-3.0, -0.2, 0.3, 5.0])
    for lo, hi in ((math.nan, 1.0), (-1.0, math.nan)):
        assert torch.equal(TF.hardtanh(x, lo, hi).isnan(), F.hardtanh(x, lo, hi).isnan())
        assert F.hardtanh(x, lo, hi).isnan().all()
        assert F.hardtanh(x.clone(), lo, hi, inplace=True).isnan().all()
    for wdtype in (torch.float64, torch.float16):
        w = torch.ones(1, dtype=wdtype)
        name = {torch.float64: "Double", torch.float16: "Half"}[wdtype]
        with pytest.raises(RuntimeError, match=f"prelu: Type promoting not supported. Got Float and {name}"):
            TF.prelu(x, w)
        with pytest.raises(RuntimeError, match=f"prelu: Type promoting not supported. Got Float and {name}"):
            F.prelu(x, w)
        with pytest.raises(RuntimeError, match="swish: Type promoting not supported"):
            F.swish(x, w)
    overflows = [
        (lambda f, t: f.hardtanh(t.half(), -1e5, 1e5), "c10::Half"),
        (lambda f, t: f.hardtanh(t.half().clone(), -1.0, 65504.5, True), "c10::Half"),
        (lambda f, t: f.hardtanh(t.bfloat16(), -1e39, 1.0), "c10::BFloat16"),
        (lambda f, t: f.leaky_relu(t, 1e39), "float"),
        (lambda f, t: f.leaky_relu(t.clone(), 1e39, True), "float"),
        (lambda f, t: f.elu(t, -1e39), "float"),
        (lambda f, t: f.softplus(t, 1.0, 1e39), "float"),
        (lambda f, t: f.softplus(t.half(), 1e39, 20.0), "float"),
    ]
    for fn, type_name in overflows:
        for lib in (TF, F):
            with pytest.raises(RuntimeError, match=f"value cannot be converted to type {type_name} without overflow"):
                fn(lib, x)
    # Accepted by PyTorch: infinite bounds, fp16 slopes beyond fp16's range (the math runs in float).
    for fn in (lambda f, t: f.hardtanh(t.half(), -math.inf, math.inf), lambda f, t: f.leaky_relu(t.half(), 1e5),
               lambda f, t: f.elu(t.half(), 1e5), lambda f, t: f.hardtanh(t.bfloat16(), -1e5, 1e5)):
        assert_close(fn(F, x), fn(TF, x.double()))


def _aten_table():
    return {
        "sigmoid": (F.sigmoid, torch.sigmoid), "tanh": (F.tanh, torch.tanh),
        "relu": (F.relu, TF.relu), "relu_": (lambda t: F.relu(t, True), lambda t: TF.relu(t, True)),
        "leaky_relu": (lambda t: F.leaky_relu(t, 0.2), lambda t: TF.leaky_relu(t, 0.2)),
        "prelu": (lambda t: F.prelu(t, torch.ones(1, dtype=t.dtype)), lambda t: TF.prelu(t, torch.ones(1, dtype=t.dtype))),
        "elu": (F.elu, TF.elu), "elu_": (lambda t: F.elu(t, inplace=True), lambda t: TF.elu(t, inplace=True)),
        "softplus": (F.softplus, TF.softplus), "silu": (F.silu, TF.silu),
        "gelu": (F.gelu, TF.gelu), "gelu_tanh": (lambda t: F.gelu(t, "tanh"), lambda t: TF.gelu(t, approximate="tanh")),
        "hardsigmoid": (F.hardsigmoid, TF.hardsigmoid),
        "hardswish": (F.hardswish, TF.hardswish), "hardswish_": (lambda t: F.hardswish(t, True),
                                                                 lambda t: TF.hardswish(t, True)),
        "hardtanh": (F.hardtanh, TF.hardtanh), "hardtanh_": (lambda t: F.hardtanh(t, inplace=True),
                                                             lambda t: TF.hardtanh(t, inplace=True)),
        "relu6": (lambda t: F.hardtanh(t, 0.0, 6.0), TF.relu6),
    }


@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.int8, torch.int32, torch.int64, torch.complex64],
                         ids=str)
def test_non_float_inputs_as_pytorch(dtype):
    """Dtypes the kernels do not cover are computed (or refused) by ATen: same values, dtype and error."""
    for name, (ours, theirs) in _aten_table().items():
        x = torch.tensor([-2, 0, 3, 1]).to(dtype)
        try:
            expected = theirs(x.clone())
        except Exception as e:  # noqa: BLE001 -- the exact type and text PyTorch raises
            with pytest.raises(type(e), match=re.escape(str(e))):
                ours(x.clone())
            continue
        got = ours(x.clone())
        assert got.dtype == expected.dtype and torch.equal(got, expected), name
    for fn in (F.swish, F.hard_logistic):  # dlkern's own activations are defined for floating point, as silu
        with pytest.raises(RuntimeError, match="expected a floating-point input"):
            fn(torch.tensor([1, 2]))


MODULE_CLASSES = [name for name in dnn.activation.__all__]


@pytest.mark.parametrize("name", MODULE_CLASSES)
def test_modules_not_scriptable_but_traceable(name):
    args = {"PReLU": (C,), "Swish": (1.5, True, C)}.get(name, ())
    module = getattr(dnn, name)(*args)
    with pytest.raises(RuntimeError, match=f"dlkern.nn.{name}: torch.jit.script is not supported"):
        torch.jit.script(module)
    x = _layout("contiguous", torch.float32, "cpu")
    traced = torch.jit.trace(module, (x.clone(),), check_trace=True)
    torch.testing.assert_close(traced(x.clone()), module(x.clone()), rtol=0, atol=0)


def test_vmap_rules_of_the_ops():
    """Every op's vmap rule (batch dim anywhere, or only on some arguments) equals a loop of unbatched calls."""
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(2, C, 3, 4, generator=gen, dtype=torch.float64)  # vmapped over dim 2
    g = torch.randn(2, C, 3, 4, generator=gen, dtype=torch.float64)
    ws = torch.rand(3, C, generator=gen, dtype=torch.float64) + 0.2
    dl = torch.ops.dlkern

    def loop(fn, *args, dims):
        outs = [fn(*(a.select(d, i) if d is not None else a for a, d in zip(args, dims))) for i in range(3)]
        return torch.stack(outs) if isinstance(outs[0], torch.Tensor) else tuple(map(torch.stack, zip(*outs)))

    for act in ("gelu", "sigmoid"):
        f = lambda a: dl.activation(a, act, 0.0, 0.0)  # noqa: E731
        assert_close(torch.func.vmap(f, in_dims=2)(x), loop(f, x, dims=(2,)))
        b = lambda a, s: dl.activation_backward(a, s, act, 0.0, 0.0, False)  # noqa: E731
        assert_close(torch.func.vmap(b, in_dims=(2, None))(g, x[:, :, 0]), loop(b, g, x[:, :, 0], dims=(2, None)))
    xi = x.clone()
    torch.func.vmap(lambda a: (dl.activation_(a, "elu", 1.0, 0.0), a)[1], in_dims=2)(xi)
    assert_close(xi, TF.elu(x))
    for act in ("prelu", "swish"):
        f = lambda a, w: dl.activation_channelwise(a, w, act)  # noqa: E731
        for dims, w in (((2, 0), ws), ((2, None), ws[0]), ((2, None), ws[0, :1]), ((None, 0), ws)):
            assert_close(torch.func.vmap(f, in_dims=dims)(x, w), loop(f, x, w, dims=dims))
        for weight_grad in (True, False):
            b = lambda gg, a, w: dl.activation_channelwise_backward(gg, a, w, act, weight_grad)  # noqa: E731
            for dims, gg, w in (((2, 2, 0), g, ws), ((2, 2, None), g, ws[0]), ((None, 2, 0), g[:, :, 0], ws[:, :1])):
                got, expected = torch.func.vmap(b, in_dims=dims)(gg, x, w), loop(b, gg, x, w, dims=dims)
                assert_close(got[0], expected[0])
                if weight_grad:
                    assert_close(got[1], expected[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", [c for c in CASES if c.breakpoints], ids=lambda c: c.id)
def test_nonfinite_grad_output(case, dtype, device):
    """NaN and inf in grad_output through the piecewise activations: where the derivative is a flat branch (relu,
    hardtanh, hardsigmoid and hard_logistic outside their slopes) ATen selects 0; elsewhere g * f'(x) carries the
    NaN or inf. dlkern's Triton backward does the same. (For the smooth ones the result at inf * f'(x) hangs on
    whether a formula's f'(x) underflows to 0, which differs between correct formulas.)"""
    x = torch.tensor([-7.0, -3.0, -2.5, -2.0, -0.5, 0.0, 0.25, 1.0, 2.0, 2.5, 3.0, 7.0, 30.0], dtype=torch.float64)
    x = x.repeat(2 * C).reshape(2, C, -1)
    g = torch.tensor([float("nan"), float("inf"), float("-inf")], dtype=torch.float64).repeat(x.numel())
    g = g[:x.numel()].reshape(x.shape)
    x, g = x.to(device=device, dtype=dtype), g.to(device=device, dtype=dtype)
    w = _param(case, dtype, device)  # PyTorch in the same dtype: f'(x) may underflow to 0 there (sigmoid(30))
    xr = x.clone().requires_grad_()
    expected = torch.autograd.grad(case.ref(xr, w), xr, g)[0]
    xd = x.clone().requires_grad_()
    with launches(*backward_kernels(x, g, w)):
        actual = torch.autograd.grad(case.ours(xd, w), xd, g)[0]
    torch.testing.assert_close(actual.isnan(), expected.isnan())
    finite = expected.isfinite()
    torch.testing.assert_close(actual.isinf(), expected.isinf())
    torch.testing.assert_close(actual[~finite], expected[~finite], equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(actual[finite], expected[finite])


def test_fallback_warns_once_per_process_at_the_callers_line(monkeypatch):
    """Without a GPU or the interpreter: one warning for all of dlkern's Triton ops, pointing at the user's call (not
    into dlkern or torch); fallback_notice lets a program say it up front instead (dlkern.train, before its bars)."""
    monkeypatch.setattr(triton_support, "INTERPRETING", False)
    monkeypatch.setattr(triton_support, "_warned", set())
    x = torch.randn(2, C, 4, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        F.relu(x)
        F.gelu(x)
        F.prelu(x, torch.full((C,), 0.25))
    assert len(caught) == 1 and caught[0].filename == __file__, [(w.filename, str(w.message)) for w in caught]
    assert "PyTorch composite" in str(caught[0].message) and "dlkern.relu" in str(caught[0].message)
    monkeypatch.setattr(triton_support, "_warned", set())
    assert triton_support.fallback_notice("cuda", "x") is None
    assert "PyTorch composites" in triton_support.fallback_notice("cpu", "models.MnistCNN")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        F.relu(x)
    assert not caught


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("shape, layout", [((2, 5, 3, 4), "contiguous"), ((2, 5, 3, 4), "channels_last"),
                                           ((40, 5), "contiguous"), ((3, 5, 37), "contiguous"),
                                           ((2, 5, 2, 2), "contiguous")],
                         ids=["nchw", "channels_last", "2d", "3d", "one-split"])
@pytest.mark.parametrize("act", ["prelu", "swish"])
def test_channelwise_backward_in_one_pass(act, shape, layout, dtype, device):
    """prelu / tensor-beta swish with a weight gradient: one pass writes dx and per-split channel sums (no
    per-element weight-gradient buffer), then the splits are added. Against float64 PyTorch, per channel and with
    one scalar weight; a grad_output of another layout takes the two-pass path and gives the same gradients.
    With one split (here: at most 16 positions per channel, the interpreter's tile) the sums are the gradient and
    no second launch adds them."""
    gen = torch.Generator().manual_seed(11)
    x64 = torch.randn(shape, generator=gen, dtype=torch.float64) * 3
    g64 = torch.randn(shape, generator=gen, dtype=torch.float64)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x, g = (t.to(device, dtype).contiguous(memory_format=fmt) for t in (x64, g64))
    for channels in (shape[1], 1):
        w64 = torch.linspace(0.1, 0.9, channels, dtype=torch.float64)
        view = (1, channels) + (1,) * (len(shape) - 2)
        if act == "prelu":
            def ref(x, w):
                return TF.prelu(x, w)
        else:
            def ref(x, w):
                return x * torch.sigmoid(w.view(view) * x)
        x_ref, w_ref = x.double().requires_grad_(), w64.clone().requires_grad_()
        dx_ref, dw_ref = torch.autograd.grad(ref(x_ref, w_ref), (x_ref, w_ref), g.double())
        other_layout = g.transpose(0, 1).contiguous().transpose(0, 1)  # same values, dims 0 and 1 swapped in memory
        one_split = x.numel() // channels <= 16 or device != "cpu"  # (a GPU's tiles: one split for all shapes here)
        one_pass = (CHANNELWISE_BWD,) if one_split else (CHANNELWISE_BWD, CHANNEL_SUM)
        for grad_output, kernels in ((g, one_pass), (other_layout, (BWD, CHANNEL_SUM))):
            xr, wr = x.detach().requires_grad_(), w64.to(device, dtype).requires_grad_()
            sums = triton_support.launch_counts[CHANNEL_SUM]
            with launches(*kernels):
                dx, dw = torch.autograd.grad(getattr(F, act)(xr, wr), (xr, wr), grad_output)
            assert (triton_support.launch_counts[CHANNEL_SUM] == sums) == (kernels == (CHANNELWISE_BWD,))
            assert_close(dx, dx_ref)
            assert_close(dw, dw_ref)
