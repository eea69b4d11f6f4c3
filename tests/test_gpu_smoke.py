"""A smoke test of every op family on the real device: forward and backward, one shape each, against stock
PyTorch on the same device, in float32 and float64 -- plus dlkern's launch plans against the real Triton driver.

This is step 1 of bench/gpu_run.sh (``pytest -n 8 -m cuda tests/test_gpu_smoke.py``): a short check, run before
any benchmark, that the build works and every family computes the right thing on the GPU. The families:
elementwise activations, channelwise activations (prelu, swish with a per-channel beta), the max pool (CUDA
extension), the conv block (train and eval), the conv block with its pool fused (train and eval), and one MnistCNN
training step (forward, cross-entropy, backward, Adam). The thorough tests are the other test files.

The ``cpu`` variants run the same checks in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET without
a GPU; CI runs them), with smaller shapes; the ``cuda`` variants use shapes that span several programs and tiles.
float32 runs with TF32 off (dlkern follows ``torch.backends.cudnn.allow_tf32``, as cuDNN does), so both sides
compute in float32; each result is held to its relative error against stock PyTorch in float64:
‖ours − ref‖ / ‖ref‖ ≤ 1e-4 (float32) or 1e-10 (float64).
"""

import pytest
import torch
import torch.nn.functional as TF
from torch import nn

import dlkern
import dlkern.functional as F
from dlkern.models import MnistCNN
from dlkern.ops import triton_support
from helpers import DEVICES

DTYPES = [torch.float32, torch.float64]
# A smoke test's bounds: far above rounding (float32 sums over a batch's 10^4 elements in another order than
# ATen's), far below what a wrong kernel gives (errors of order 1).
REL = {torch.float32: 1e-4, torch.float64: 1e-10}


@pytest.fixture(autouse=True)
def _no_tf32():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def check(name, actual, expected, dtype=None):
    """actual (dlkern, in `dtype`) against expected (stock, float64): same shape, finite, relative error."""
    dtype = dtype or actual.dtype
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    assert actual.dtype == dtype, f"{name}: dtype {actual.dtype}, expected {dtype}"
    a, e = actual.detach().double(), expected.detach().double()
    assert torch.isfinite(a).all(), f"{name}: non-finite values"
    err = ((a - e).norm() / e.norm().clamp_min(1e-30)).item()
    assert err <= REL[dtype], f"{name}: relative error {err:.3g} > {REL[dtype]:g} ({dtype})"


def _shape(device, cpu, cuda):
    return cpu if device == "cpu" else cuda


# ----------------------------------------------------------------------------------------------- activations

def _exact_hardsigmoid(x):
    return TF.relu6(x + 3.0) / 6.0  # ATen's CPU backward rounds 1/6 to float32 even for float64


ACTIVATIONS = {  # name: (dlkern, stock)
    "relu": (F.relu, TF.relu),
    "leaky_relu": (lambda x: F.leaky_relu(x, 0.1), lambda x: TF.leaky_relu(x, 0.1)),
    "elu": (F.elu, TF.elu),
    "softplus": (F.softplus, TF.softplus),
    "silu": (F.silu, TF.silu),
    "gelu": (F.gelu, TF.gelu),
    "gelu_tanh": (lambda x: F.gelu(x, approximate="tanh"), lambda x: TF.gelu(x, approximate="tanh")),
    "sigmoid": (F.sigmoid, torch.sigmoid),
    "tanh": (F.tanh, torch.tanh),
    "hardsigmoid": (F.hardsigmoid, _exact_hardsigmoid),
    "hardswish": (F.hardswish, lambda x: x * TF.relu6(x + 3.0) / 6.0),
    "hardtanh": (lambda x: F.hardtanh(x, -0.5, 2.0), lambda x: TF.hardtanh(x, -0.5, 2.0)),
    "swish": (lambda x: F.swish(x, 1.5), lambda x: x * torch.sigmoid(1.5 * x)),
    "hard_logistic": (F.hard_logistic, lambda x: (0.25 * x + 0.5).clamp(0, 1)),
}


def test_every_activation_is_covered():
    assert set(ACTIVATIONS) | {"prelu"} == set(dlkern.catalog.ACTIVATIONS)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_activation(name, dtype, device):
    ours, stock = ACTIVATIONS[name]
    torch.manual_seed(0)
    x = 3 * torch.randn(_shape(device, (3, 8, 37), (64, 32, 28, 28)), dtype=torch.float64, device=device)
    g = torch.randn_like(x)
    xo = x.to(dtype).requires_grad_()
    xr = x.clone().requires_grad_()
    triton_support.launch_counts.clear()
    y = ours(xo)
    (dx,) = torch.autograd.grad(y, xo, g.to(dtype))
    y_ref = stock(xr)
    (dx_ref,) = torch.autograd.grad(y_ref, xr, g)
    check(f"{name} forward", y, y_ref, dtype)
    check(f"{name} backward", dx, dx_ref, dtype)
    assert sum(triton_support.launch_counts.values()) >= 2, "the Triton kernels did not run"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("name", ["prelu", "swish"])
def test_channelwise_activation(name, layout, dtype, device):
    """prelu and swish with one parameter per channel: the input and the parameter's gradient."""
    torch.manual_seed(1)
    x = 3 * torch.randn(_shape(device, (2, 8, 5, 7), (64, 32, 28, 28)), dtype=torch.float64, device=device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.rand(x.shape[1], dtype=torch.float64, device=device) + 0.1
    g = torch.randn_like(x)
    if name == "prelu":
        ours, stock = F.prelu, TF.prelu
    else:
        ours, stock = F.swish, lambda x, w: x * torch.sigmoid(w.view(1, -1, 1, 1) * x)
    xo, wo = x.to(dtype).requires_grad_(), w.to(dtype).requires_grad_()
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = ours(xo, wo)
    dx, dw = torch.autograd.grad(y, (xo, wo), g.to(dtype))
    y_ref = stock(xr, wr)
    dx_ref, dw_ref = torch.autograd.grad(y_ref, (xr, wr), g)
    check(f"{name} forward", y, y_ref, dtype)
    assert y.stride() == y_ref.stride(), "the output keeps the input's layout"
    check(f"{name} input gradient", dx, dx_ref, dtype)
    check(f"{name} weight gradient", dw, dw_ref, dtype)


# -------------------------------------------------------------------------------------------------- max pool

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("pool", [(2, 2, 0, False), (3, 2, 1, True)], ids=["2x2", "3x3-s2-p1-ceil"])
def test_max_pool(pool, layout, dtype, device):
    """Values and indices exactly ATen's (same device, same dtype); the gradient to its tolerance."""
    k, s, p, ceil = pool
    torch.manual_seed(2)
    x = torch.randn(_shape(device, (2, 4, 9, 8), (64, 32, 28, 28)), dtype=dtype, device=device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    xo, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, idx = F.max_pool2d(xo, k, s, p, ceil_mode=ceil, return_indices=True)
    y_ref, idx_ref = TF.max_pool2d(xr, k, s, p, ceil_mode=ceil, return_indices=True)
    assert torch.equal(y, y_ref) and torch.equal(idx, idx_ref)
    assert y.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
    g = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, xo, g)
    (dx_ref,) = torch.autograd.grad(y_ref, xr, g)
    check("max pool input gradient", dx, dx_ref, dtype)


# ------------------------------------------------------------------------------------------------ conv blocks

def _blocks(pool, device, dtype, c_in, c_out):
    """(dlkern block in `dtype`, stock Sequential in float64) with the same weights and running statistics."""
    torch.manual_seed(3)
    if pool:
        block = dlkern.nn.ConvBNActPool2d(c_in, c_out, 3, padding=1, pool_kernel_size=2)
        stock = nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(),
                              nn.MaxPool2d(2))
    else:
        block = dlkern.nn.ConvBNReLU2d(c_in, c_out, 3, padding=1)
        stock = nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU())
    with torch.no_grad():
        block[1].weight.uniform_(0.5, 1.5)
        block[1].bias.uniform_(-0.5, 0.5)
        block[1].running_mean.uniform_(-0.2, 0.2)
        block[1].running_var.uniform_(0.5, 2.0)
    stock.load_state_dict(block.state_dict(), strict=True)
    return block.to(device, dtype), stock.to(device, torch.float64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pool", [False, True], ids=["ConvBNReLU2d", "ConvBNActPool2d"])
def test_conv_block(pool, dtype, device):
    """Training forward + backward (every gradient, the running statistics), then eval forward."""
    n, c_in, c_out, hw = _shape(device, (2, 3, 8, 8), (64, 32, 32, 14))
    block, stock = _blocks(pool, device, dtype, c_in, c_out)
    torch.manual_seed(4)
    x = torch.randn(n, c_in, hw, hw, dtype=torch.float64, device=device)
    xo, xr = x.to(dtype).requires_grad_(), x.clone().requires_grad_()
    triton_support.launch_counts.clear()
    y, y_ref = block(xo), stock(xr)
    check("train forward", y, y_ref, dtype)
    g = torch.randn_like(y_ref)
    names = ["input", "conv weight", "conv bias", "bn weight", "bn bias"]
    ours = torch.autograd.grad(y, [xo, block[0].weight, block[0].bias, block[1].weight, block[1].bias], g.to(dtype))
    theirs = torch.autograd.grad(y_ref, [xr, stock[0].weight, stock[0].bias, stock[1].weight, stock[1].bias], g)
    for name, a, b in zip(names, ours, theirs):
        if name == "conv bias":  # ahead of BatchNorm: dlkern's exact 0 against stock's rounding noise
            assert torch.all(a == 0) and b.abs().max() < 1e-10
            continue
        check(name + " gradient", a, b, dtype)
    for name in ("running_mean", "running_var"):
        check(name, getattr(block[1], name), getattr(stock[1], name), dtype)
    assert block[1].num_batches_tracked.item() == stock[1].num_batches_tracked.item() == 1
    assert triton_support.launch_counts["conv_fwd_kernel"] >= 1, "the fused kernels did not run"
    block.eval(), stock.eval()
    with torch.no_grad():
        check("eval forward", block(x.to(dtype)), stock(x), dtype)


# ------------------------------------------------------------------------------------------------------ model

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mnist_cnn_training_step(dtype, device):
    """One MnistCNN training step (forward, cross-entropy, backward, Adam) against the torch backend from the
    same weights: the loss and every gradient; in float64 also the weights after Adam and the eval output (in
    float32 Adam's first step, lr * sign(g), may flip on a gradient element that is rounding noise). On a CPU
    (Triton's interpreter, ~10 s a step) float64 only."""
    if device == "cpu" and dtype == torch.float32:
        pytest.skip("float32 on the GPU only: in Triton's interpreter the float64 step covers the same kernels")
    torch.manual_seed(5)
    ours, ref = MnistCNN(backend="dlkern"), MnistCNN(backend="torch")
    ref.load_state_dict(ours.state_dict(), strict=True)
    ours, ref = ours.to(device, dtype), ref.to(device, torch.float64)
    batch = _shape(device, 2, 64)
    x = torch.randn(batch, 1, 28, 28, dtype=torch.float64, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    losses, grads = [], []
    for model, inp in ((ours, x.to(dtype)), (ref, x)):
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        optimizer.zero_grad()
        loss = TF.cross_entropy(model(inp), y)
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in model.parameters()])
        optimizer.step()
    check("loss", losses[0].reshape(1), losses[1].reshape(1), dtype)
    # Parameters come in the stock model's order (dlkern.convert keeps it); the stock names label them.
    names = [n for n, _ in ref.named_parameters()]
    conv_biases = {"mymodel.0.bias", "mymodel.4.bias", "mymodel.8.bias"}  # ahead of BatchNorm (see test_conv_block)
    for name, g, g_ref in zip(names, *grads, strict=True):
        if name in conv_biases:
            assert torch.all(g == 0), name
        else:
            check(f"{name} gradient", g, g_ref, dtype)
    if dtype == torch.float64:
        for name, p, p_ref in zip(names, ours.parameters(), ref.parameters(), strict=True):
            if name not in conv_biases:
                check(f"{name} after Adam", p, p_ref, dtype)
        for (name, b), b_ref in zip(ours.state_dict().items(), ref.state_dict().values(), strict=True):
            if b.is_floating_point() and "running" in name:
                check(name, b, b_ref, dtype)
        with torch.no_grad():  # the conv biases differ by Adam's lr-sized step: BatchNorm's mean absorbs it
            for model in (ours, ref):
                model.eval()
            check("eval output after the step", ours(x), ref(x), dtype)


# ------------------------------------------------------------------------------- launch plans, real driver

class _Recorder:
    """Records every launch of a compiled Triton kernel -- Triton's own path and dlkern's plans alike -- by
    wrapping ``CompiledKernel.run`` (the C launcher both call), so the two can be compared argument by argument
    on the real driver, as tests/launch_plan_check.py compares them under the stand-in one."""

    def __init__(self, monkeypatch):
        from triton.compiler import compiler

        self.calls = []
        self.active = False
        prop = compiler.CompiledKernel.__dict__.get("run")
        self.available = isinstance(prop, property)
        if not self.available:  # another Triton: outputs and plan counts are still compared
            return
        recorder = self

        def run(kernel):
            launcher = prop.fget(kernel)

            def recording(*args):
                if recorder.active:
                    recorder.calls.append((kernel.name, args))
                return launcher(*args)

            return recording

        monkeypatch.setattr(compiler.CompiledKernel, "run", property(run))
        # An autotuner's benchmarking launches (DLKERN_AUTOTUNE=1) are no part of the launch being compared.
        from triton.runtime import autotuner

        bench = autotuner.Autotuner._bench

        def unrecorded_bench(tuner, *args, **kwargs):
            active, recorder.active = recorder.active, False
            try:
                return bench(tuner, *args, **kwargs)
            finally:
                recorder.active = active

        monkeypatch.setattr(autotuner.Autotuner, "_bench", unrecorded_bench)

    def record(self, fn):
        """(fn's result, its launches as (kernel, grid + stream + function + metadata, kernel arguments))."""
        self.calls = []
        self.active = True
        try:
            result = fn()
            torch.cuda.synchronize()
        finally:
            self.active = False
        # args: grid (3), stream, function, packed metadata | launch metadata, enter hook, exit hook | arguments.
        # Triton's own path passes the middle three (hooks), a plan passes None for them.
        return result, [(name, args[:6], args[9:]) for name, args in self.calls]


def _describe(a):
    if isinstance(a, torch.Tensor):
        return ("tensor", a.dtype, tuple(a.shape), a.stride(), a.data_ptr() % 16)
    return (type(a).__name__, a)


def _flat(result):
    if isinstance(result, torch.Tensor):
        return [result]
    return [t for r in result for t in _flat(r)] if isinstance(result, (tuple, list)) else []


@pytest.fixture
def fresh_plans():
    triton_support._plans.clear()
    yield
    triton_support._plans.clear()  # none of the recording launchers may outlive the test


@pytest.mark.cuda
def test_launch_plans_on_the_real_driver(monkeypatch, fresh_plans):
    """Each family's first call (plans dropped) goes through Triton's own launch path and makes plans; the second
    runs them: the same kernels with the same grids and arguments, no new plan, bit-identical results (the
    kernels are deterministic: fixed-order reductions, no atomics)."""
    device = "cuda"
    recorder = _Recorder(monkeypatch)
    torch.manual_seed(6)
    x = torch.randn(16, 32, 28, 28, device=device, requires_grad=True)
    g = torch.randn_like(x)
    w = torch.rand(32, device=device, requires_grad=True)
    block = dlkern.nn.ConvBNReLU2d(32, 32, 3, padding=1).to(device)
    pool_block = dlkern.nn.ConvBNActPool2d(32, 32, 3, padding=1).to(device)
    gp = torch.randn(16, 32, 14, 14, device=device)

    def eval_call(module):
        def call():
            module.eval()
            with torch.no_grad():
                out = module(x)
            module.train()
            return out
        return call

    cases = {
        "relu": lambda: F.relu(x.detach()),
        "gelu fwd+bwd": lambda: torch.autograd.grad(F.gelu(x), x, g),
        "prelu fwd+bwd": lambda: torch.autograd.grad(F.prelu(x, w), (x, w), g),
        "channels_last swish fwd+bwd": lambda: torch.autograd.grad(
            F.swish(x.contiguous(memory_format=torch.channels_last), w), (x, w), g),
        "conv block train fwd+bwd": lambda: torch.autograd.grad(block(x), (x, block[0].weight, block[1].weight), g),
        "conv block eval": eval_call(block),
        "pool block train fwd+bwd": lambda: torch.autograd.grad(pool_block(x), (x, pool_block[0].weight), gp),
        "pool block eval": eval_call(pool_block),
    }
    for label, fn in cases.items():
        triton_support._plans.clear()
        first, launched = recorder.record(fn)
        planned = len(triton_support._plans)
        again, relaunched = recorder.record(fn)
        assert planned > 0, f"{label}: no launch plan was made (a Triton launch hook set?)"
        assert len(triton_support._plans) == planned, f"{label}: the second call made new plans"
        for a, b in zip(_flat(first), _flat(again), strict=True):
            assert torch.equal(a, b), f"{label}: the planned launches computed something else"
        if recorder.available:
            assert launched, f"{label}: no launch recorded"
            assert len(launched) == len(relaunched), f"{label}: {len(launched)} launches, then {len(relaunched)}"
            for (name, head, args), (name2, head2, args2) in zip(launched, relaunched):
                assert name == name2 and head == head2, f"{label}: {name} launched as {head}, then {name2} as {head2}"
                theirs, ours = [_describe(a) for a in args], [_describe(a) for a in args2]
                assert theirs == ours, f"{label}: {name}: Triton passed {theirs}, the plan {ours}"
        print(f"ok   {label}: {planned} plans, {len(launched) if recorder.available else '?'} launches")
    assert recorder.available, ("triton.compiler.CompiledKernel.run is no property in this Triton: the results "
                                "and plan counts matched, the launch arguments were not compared")
