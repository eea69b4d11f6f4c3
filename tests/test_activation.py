"""The activation family (dlkern.functional / dlkern.nn / dlkern::activation* ops) against PyTorch.

References run in float64 on exact copies of the inputs; results are held to their dtype's tolerance. Every test
that runs a Triton op checks the launch counter, so a silent fallback to PyTorch cannot pass. Shapes stay tiny:
on CPU the kernels run in Triton's interpreter.

Where dlkern deliberately differs from PyTorch the reference says so: hardsigmoid's gradient is exactly 1/6
(ATen's CPU kernel uses 1/6 rounded to float32, also for float64), and silu/swish/gelu return their limits at
+-inf (and gelu_tanh's gradient at huge |x|) where ATen's formulas give inf*0 = NaN.
"""

import contextlib
import math
import warnings
from typing import Callable, NamedTuple

import pytest
import torch
import torch.nn.functional as TF

import dlkern.functional as F
import dlkern.nn as dnn
from dlkern.ops import activation as ops
from dlkern.ops import triton_support
from helpers import DEVICES, FLOAT_DTYPES, TOLERANCES, assert_close

# The interpreter evaluates both sides of every tl.where in numpy, which warns about the discarded exp overflows.
pytestmark = [
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
]

FWD, BWD, CHANNEL_SUM = "activation_fwd_kernel", "activation_bwd_kernel", "channel_sum_kernel"
C = 3  # channels of the test tensors (dim 1)


def _exact_hardsigmoid(x):
    # ATen's value (and NaN / outside behaviour), with the exact 1/6 slope inside (-3, 3).
    return torch.where((x > -3) & (x < 3), x / 6 + 0.5, TF.hardsigmoid(x))


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
    kernels = (FWD, BWD, CHANNEL_SUM) if w is not None else (FWD, BWD)
    with launches(*kernels):
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
    with launches(FWD, BWD):
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
    with launches(FWD, BWD):
        assert torch.autograd.gradcheck(lambda *a: case.ours(a[0], a[1] if len(a) > 1 else None), inputs)


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
    ("GELU", (), {"approximate": "tanh"}), ("Hardsigmoid", (), {}), ("Hardtanh", (-0.5, 2.0), {}),
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
    (act, p0, p1), (act_t, p0_t, p1_t) = ops.activation_spec(ours), ops.activation_spec(theirs)
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
        nn.Hardtanh(-2, 3): ("hardtanh", -2.0, 3.0), nn.ReLU6(): ("hardtanh", 0.0, 6.0),
        dnn.Swish(0.5): ("swish", 0.5, 0.0), swish: ("swish", swish.beta, 0.0),
        dnn.HardLogistic(): ("hard_logistic", 0.0, 0.0),
    }
    for module, spec in specs.items():
        assert ops.activation_spec(module) == spec, module
    for module in (nn.Identity(), nn.Mish(), nn.SELU(), nn.Softmax(1)):
        assert ops.activation_spec(module) is None


# ---------------------------------------------------------------------------------------------------- integration


def _opcheck_cases():
    x = torch.randn(2, C, 4, dtype=torch.float64)
    g = torch.randn_like(x)
    w = torch.rand(C, dtype=torch.float64)
    params = {"leaky_relu": (0.1, 0.0), "prelu": (0.25, 0.0), "elu": (1.3, 0.0), "softplus": (2.0, 5.0),
              "swish": (1.7, 0.0), "hardtanh": (-0.5, 2.0)}
    dl = torch.ops.dlkern
    for act in ops.ACTIVATIONS:
        p0, p1 = params.get(act, (0.0, 0.0))
        yield act, dl.activation.default, (x.clone().requires_grad_(), act, p0, p1)
        yield act + "_", dl.activation_.default, (x.clone(), act, p0, p1)
        from_output = act in ops.SAVE_OUTPUT
        yield act + "_backward", dl.activation_backward.default, (g, x.sigmoid() if from_output else x, act, p0, p1,
                                                                   from_output)
    for act in ops.CHANNELWISE:
        yield act + "_channelwise", dl.activation_channelwise.default, (x.clone().requires_grad_(),
                                                                        w.clone().requires_grad_(), act)
        yield act + "_channelwise_backward", dl.activation_channelwise_backward.default, (g, x, w, act, True)


@pytest.mark.parametrize("name,op,args", list(_opcheck_cases()), ids=[c[0] for c in _opcheck_cases()])
def test_opcheck(name, op, args):
    torch.library.opcheck(op, args)


def _all_activations(x, w):
    y = F.relu(x) + F.leaky_relu(x, 0.2) + F.elu(x, 1.3) + F.softplus(x, 2.0, 5.0) + F.silu(x) + F.gelu(x)
    y = y + F.gelu(x, approximate="tanh") + F.sigmoid(x) + F.tanh(x) + F.hardsigmoid(x) + F.hardtanh(x, -0.5, 2.0)
    return y + F.swish(x, 1.7) + F.hard_logistic(x) + F.prelu(x, w) + F.swish(x, w)


def _all_inplace(x):
    # Each on its own intermediate: an in-place op must not overwrite what an earlier one saved (PyTorch's rule).
    y = F.relu(x * 1, inplace=True) + F.leaky_relu(x * 1, 0.2, inplace=True) + F.elu(x * 1, 1.3, inplace=True)
    return y + F.silu(x * 1, inplace=True) + F.hardsigmoid(x * 1, inplace=True) + F.hardtanh(x * 1, -0.5, 2.0, True)


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
