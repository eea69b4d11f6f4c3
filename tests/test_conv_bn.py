"""dlkern.nn.ConvBNReLU2d / dlkern.functional.conv_bn_act2d against the stock Conv2d -> BatchNorm2d -> activation.

References run in float64; float32 results are held to float32's tolerance. Shapes stay tiny: on CPU every
Triton kernel runs in Triton's interpreter, one program after another.
"""

import copy
import re
import warnings

import numpy as np
import pytest
import torch
import torch.utils._python_dispatch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

import dlkern
from dlkern.nn import ConvBNReLU2d
from dlkern.catalog import FUSABLE
from dlkern.ops import conv_bn as ops
from dlkern.ops import conv_tiles
from dlkern.ops import triton_support
from helpers import DEVICES, assert_close, assert_state_dicts_cross

TRAIN_KERNELS = ("conv_fwd_kernel", "bn_stats_finalize_kernel", "bn_act_fwd_kernel")  # running stats updated too
# (and sum_splits_kernel where the weight gradient is split over the rows: more than 512 in the interpreter)
BACKWARD_KERNELS = ("bn_act_bwd_reduce_kernel", "grad_z_kernel", "conv_bwd_input_kernel", "conv_bwd_weight_kernel")


class ExactHardsigmoid(nn.Module):
    """nn.Hardsigmoid for the reference: ATen's CPU hardsigmoid backward uses 1/6 rounded to float32
    (``1.0f / 6.0f``) even for float64, 3e-8 off; dlkern's is exact."""

    def forward(self, x):
        return F.relu6(x + 3.0) / 6.0


def make_pair(in_ch, out_ch, kernel_size, dtype, device="cpu", activation=None, bn_kw=None, **conv_kw):
    """(dlkern block in `dtype`, stock float64 Sequential) with the same random weights and running stats."""
    bn_kw = bn_kw or {}
    block = ConvBNReLU2d(in_ch, out_ch, kernel_size, **conv_kw, **bn_kw,
                         activation=activation if activation is not None else "relu")
    with torch.no_grad():
        if block[1].affine:
            block[1].weight.uniform_(0.5, 1.5)
            block[1].bias.uniform_(-0.5, 0.5)
        if block[1].track_running_stats:
            block[1].running_mean.uniform_(-0.2, 0.2)
            block[1].running_var.uniform_(0.5, 2.0)
    act = ExactHardsigmoid() if isinstance(block[2], nn.Hardsigmoid) else block[2]
    stock = nn.Sequential(nn.Conv2d(in_ch, out_ch, kernel_size, **conv_kw), nn.BatchNorm2d(out_ch, **bn_kw), act)
    stock.load_state_dict(block.state_dict())
    return block.to(device, dtype), stock.to(device, torch.float64)


def grads(module, names):
    params = dict(module.named_parameters())
    return [params[n].grad for n in names]


def assert_grad_close(name, actual, expected, torch_same_dtype, dtype=None):
    """float64 gradients: float64's tolerance. float32 gradients are sums over N*OH*OW with BatchNorm's
    cancellation (n*g - sum(g) - x_hat*sum(g*x_hat)); their float32 rounding error exceeds a single-rounding
    tolerance for PyTorch's own float32 modules too (by up to ~25x at the MNIST shapes). There the yardstick is
    PyTorch's float32 error on the same inputs: dlkern's may be at most 4x it (it is mostly below it; both are
    rounding noise of one size, so their ratio varies from draw to draw). float64 checks the formulas exactly.
    ``dtype``: the tolerance's dtype when it is not actual's (a float32 parameter fed by 16-bit activations)."""
    if actual.dtype == torch.float64:
        assert_close(actual, expected, msg=lambda m: f"{name}: {m}")
        return
    ours = (actual.double() - expected).abs().max().item()
    theirs = (torch_same_dtype.double() - expected).abs().max().item()
    try:
        assert_close(actual, expected, dtype=dtype)
    except AssertionError:
        assert ours <= 4 * theirs, f"{name}: max error {ours:.3g}, PyTorch's float32 {theirs:.3g}"


def step(block, stock, x, dtype, check_grads=True):
    """One forward/backward of both (and of a float32 copy of the stock block, the yardstick for float32
    gradients); compares the output and every gradient."""
    stock_same = copy.deepcopy(stock).to(dtype)
    x = x.detach().requires_grad_()
    x64 = x.detach().double().requires_grad_()
    x_same = x.detach().clone().requires_grad_()
    out = block(x)
    ref = stock(x64)
    assert out.dtype == dtype and out.shape == ref.shape
    assert_close(out, ref)
    if check_grads:
        g = torch.randn_like(ref)
        out.backward(g.to(dtype))
        ref.backward(g)
        stock_same(x_same).backward(g.to(dtype))
        assert_grad_close("input", x.grad, x64.grad, x_same.grad)
        names = [n for n, _ in stock.named_parameters()]
        module = getattr(block, "_orig_mod", block)  # through torch.compile's wrapper
        for name, a, b, c in zip(names, grads(module, names), grads(stock, names), grads(stock_same, names)):
            assert a is not None, name
            assert_grad_close(name, a, b, c)
        block.zero_grad(), stock.zero_grad()
    return out


def check_buffers(block, stock):
    for (name, a), (_, b) in zip(block.named_buffers(), stock.named_buffers()):
        if a.is_floating_point():
            assert_close(a, b, msg=lambda m, name=name: f"{name}: {m}")
        else:
            assert torch.equal(a, b), name


# The MNIST CNN's three blocks (batch 1-2), then odd shapes: stride, padding, dilation, rectangular kernels,
# C_out < 16, no conv bias.
SHAPES = [
    pytest.param(2, 1, 32, 28, 28, 3, dict(padding=1), id="mnist1-1x28x28"),
    pytest.param(1, 32, 32, 14, 14, 3, dict(), id="mnist2-32x14x14"),
    pytest.param(2, 32, 32, 6, 6, 3, dict(), id="mnist3-32x6x6"),
    pytest.param(2, 3, 5, 9, 7, (3, 2), dict(stride=(2, 1), padding=(2, 1), dilation=(1, 2)), id="odd-strided"),
    pytest.param(2, 4, 6, 8, 8, 3, dict(stride=2, padding=1, dilation=2, bias=False), id="odd-dilated-nobias"),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("N, C_in, C_out, H, W, k, conv_kw", SHAPES)
def test_matches_sequential(N, C_in, C_out, H, W, k, conv_kw, dtype):
    torch.manual_seed(0)
    block, stock = make_pair(C_in, C_out, k, dtype, **conv_kw)
    triton_support.launch_counts.clear()
    for _ in range(2):
        step(block, stock, torch.randn(N, C_in, H, W, dtype=dtype), dtype)
        check_buffers(block, stock)
    for name in TRAIN_KERNELS + BACKWARD_KERNELS:
        assert triton_support.launch_counts[name] >= 2, name
    conv = copy.deepcopy(stock[0]).to("meta")
    rows = conv(torch.empty(N, C_in, H, W, device="meta", dtype=conv.weight.dtype)).shape.numel() // C_out
    assert triton_support.launch_counts["sum_splits_kernel"] == (2 if rows > 512 else 0)  # one split: dW direct
    block.eval(), stock.eval()
    step(block, stock, torch.randn(N, C_in, H, W, dtype=dtype), dtype)
    assert triton_support.launch_counts["conv_fwd_kernel"] == 3  # eval: BatchNorm folded, one kernel
    check_buffers(block, stock)


@pytest.mark.parametrize(
    "bn_kw, conv_kw",
    [
        (dict(momentum=None), dict()),
        (dict(momentum=0.3, affine=False), dict(bias=False)),
        (dict(track_running_stats=False), dict()),
        (dict(eps=1e-3), dict(padding="same", kernel_size=(2, 4))),
        (dict(), dict(padding="valid")),
    ],
    ids=["cumulative", "no-affine", "no-running-stats", "same-even-kernel", "valid"],
)
def test_batchnorm_variants(bn_kw, conv_kw):
    torch.manual_seed(1)
    conv_kw = dict(conv_kw)
    k = conv_kw.pop("kernel_size", 3)
    block, stock = make_pair(3, 4, k, torch.float64, bn_kw=bn_kw, **conv_kw)
    for _ in range(3):
        step(block, stock, torch.randn(2, 3, 6, 7, dtype=torch.float64), torch.float64)
        check_buffers(block, stock)
    block.eval(), stock.eval()
    step(block, stock, torch.randn(2, 3, 6, 7, dtype=torch.float64), torch.float64)


@pytest.mark.parametrize(
    "activation",
    [nn.LeakyReLU(0.2), nn.ELU(0.7), nn.Softplus(2.0, 1.0), nn.SiLU(), nn.GELU(), nn.GELU("tanh"), nn.Sigmoid(),
     nn.Tanh(), nn.Hardsigmoid(), nn.Hardtanh(-0.5, 0.75), nn.ReLU6(), nn.Identity()],
    ids=lambda m: repr(m),
)
def test_fused_activations(activation):
    torch.manual_seed(2)
    block, stock = make_pair(3, 4, 3, torch.float64, activation=activation, padding=1)
    step(block, stock, torch.randn(2, 3, 5, 5, dtype=torch.float64), torch.float64)
    block.eval(), stock.eval()
    step(block, stock, torch.randn(2, 3, 5, 5, dtype=torch.float64), torch.float64)


def test_dlkern_family_activations():
    """swish and hard_logistic (dlkern's own) through the functional form."""
    torch.manual_seed(3)
    x, w, b = torch.randn(2, 3, 5, 5, dtype=torch.float64), torch.randn(4, 3, 3, 3, dtype=torch.float64), None
    for name, params, f in [("swish", (1.5,), lambda u: u * torch.sigmoid(1.5 * u)),
                            ("hard_logistic", (), lambda u: torch.clamp(0.25 * u + 0.5, 0, 1))]:
        out = dlkern.functional.conv_bn_act2d(x, w, b, None, None, training=True, activation=name,
                                              activation_params=params)
        assert_close(out, f(F.batch_norm(F.conv2d(x, w), None, None, training=True)))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_channels_last(dtype):
    torch.manual_seed(4)
    block, stock = make_pair(3, 5, 3, dtype, padding=1, stride=2)
    x = torch.randn(2, 3, 7, 6, dtype=dtype).to(memory_format=torch.channels_last)
    x.requires_grad_()
    out = step(block, stock, x, dtype)
    assert out.is_contiguous(memory_format=torch.channels_last)
    # A non-contiguous grad_output (expanded) is read through its strides.
    block.eval()
    out = block(x)
    out.sum().backward()
    assert x.grad.is_contiguous(memory_format=torch.channels_last)


def test_input_grad_skipped_and_deterministic():
    torch.manual_seed(5)
    block, _ = make_pair(2, 4, 3, torch.float32, padding=1)
    x = torch.randn(2, 2, 6, 6)
    triton_support.launch_counts.clear()
    block(x).square().sum().backward()
    assert triton_support.launch_counts["conv_bwd_input_kernel"] == 0  # input needs no grad
    first = [p.grad.clone() for p in block.parameters()]
    block.zero_grad()
    block(x).square().sum().backward()
    for a, b in zip(first, [p.grad for p in block.parameters()]):
        assert torch.equal(a, b)  # bitwise: fixed-order reductions, no atomics


def test_gradcheck():
    torch.manual_seed(6)
    opts = dict(dtype=torch.float64, requires_grad=True)
    x, w, b = torch.randn(2, 2, 4, 3, **opts), torch.randn(3, 2, 2, 2, **opts), torch.randn(3, **opts)
    gamma, beta = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_(), torch.randn(3, **opts)
    rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5

    def train(x, w, b, gamma, beta):
        return dlkern.functional.conv_bn_act2d(x, w, b, None, None, gamma, beta, True, stride=(1, 2), padding=1,
                                               activation="elu")

    def evaluate(x, w, b, gamma, beta):
        return dlkern.functional.conv_bn_act2d(x, w, b, rm, rv, gamma, beta, False, padding=1, activation="silu")

    assert torch.autograd.gradcheck(train, (x, w, b, gamma, beta), fast_mode=True)
    assert torch.autograd.gradcheck(evaluate, (x, w, b, gamma, beta), fast_mode=True)


def test_opcheck():
    torch.manual_seed(7)
    x, w, b = torch.randn(2, 2, 5, 4, requires_grad=True), torch.randn(3, 2, 3, 3, requires_grad=True), \
        torch.randn(3, requires_grad=True)
    gamma, beta = torch.rand(3, requires_grad=True), torch.randn(3, requires_grad=True)
    geo = ([1, 1], [1, 1, 0, 1], [1, 1])
    no_running = (None, None, None, None, 0.1)
    epilogue = ("relu", 0.0, 0.0, "none", [])
    out, z, stats, pos = torch.ops.dlkern.conv_bn_train2d(x, w, b, gamma, beta, *no_running, 1e-5, *geo, *epilogue,
                                                          False)
    torch.library.opcheck(torch.ops.dlkern.conv_bn_train2d,
                          (x, w, b, gamma, beta, *no_running, 1e-5, *geo, *epilogue, False))
    for momentum in (0.1, None):  # with the running statistics (written in place), momentum or cumulative
        running = (torch.zeros(3), torch.ones(3), torch.zeros((), dtype=torch.long), None, momentum)
        torch.library.opcheck(torch.ops.dlkern.conv_bn_train2d,
                              (x, w, b, gamma, beta, *running, 1e-5, *geo, *epilogue, False))
    r = torch.randn_like(out, requires_grad=True)  # a residual, before and after the activation
    for at in ("before_act", "after_act"):
        torch.library.opcheck(torch.ops.dlkern.conv_bn_train2d,
                              (x, w, b, gamma, beta, None, None, None, r, 0.1, 1e-5, *geo, "gelu", 0.0, 0.0, at, [],
                               False))
        torch.library.opcheck(torch.ops.dlkern.conv_bias_act2d, (x, w, b, r, *geo, "gelu", 0.0, 0.0, at, [], False,
                                                                 True))
    torch.library.opcheck(torch.ops.dlkern.conv_bias_act2d, (x, w, b, None, *geo, "gelu", 0.0, 0.0, "none", [],
                                                             False, True))
    running = (torch.randn(3), torch.rand(3) + 0.5)
    for residual, at in ((None, "none"), (r.detach(), "before_act")):
        torch.library.opcheck(torch.ops.dlkern.conv_bn_infer2d,
                              (x.detach(), w.detach(), b.detach(), *running, gamma.detach(), beta.detach(), residual,
                               1e-5, *geo, "silu", 0.0, 0.0, at, [], False))
    g = torch.randn_like(out)
    for residual, at in ((None, "none"), (r.detach(), "before_act")):
        torch.library.opcheck(
            torch.ops.dlkern.conv_bn_block2d_backward,
            (g, x.detach(), w.detach(), z, stats, gamma.detach(), beta.detach(), residual, None, *geo, "relu", 0.0,
             0.0, at, [], False, True, True),
        )


def test_torch_compile_fullgraph():
    torch.manual_seed(8)
    block, stock = make_pair(2, 4, 3, torch.float32, padding=1)
    compiled = torch.compile(block, fullgraph=True)
    triton_support.launch_counts.clear()
    for _ in range(2):
        step(compiled, stock, torch.randn(2, 2, 6, 5), torch.float32)
    check_buffers(block, stock)
    assert all(triton_support.launch_counts[name] == 2 for name in TRAIN_KERNELS + BACKWARD_KERNELS)
    block.eval(), stock.eval()
    step(compiled, stock, torch.randn(2, 2, 6, 5), torch.float32)
    assert triton_support.launch_counts["conv_fwd_kernel"] == 3


def test_state_dict_round_trips():
    block = ConvBNReLU2d(3, 8, 3, padding=1)
    stock = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    assert_state_dicts_cross(block, stock)
    assert [n for n, _ in block.named_parameters()] == [n for n, _ in stock.named_parameters()]


def test_eval_sees_inplace_changes():
    torch.manual_seed(9)
    block, stock = make_pair(2, 4, 3, torch.float64, padding=1)
    block.eval(), stock.eval()
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        assert_close(block(x), stock(x))
        for module in (block, stock):  # in-place changes (as an optimizer's) reach the next eval forward
            module[1].running_var.mul_(2.0)
            module[0].weight.add_(0.1)
        assert_close(block(x), stock(x))


@pytest.mark.parametrize(
    "activation",
    [nn.LeakyReLU(0.1), nn.GELU(approximate="tanh"), nn.SiLU(), nn.Softplus(2.0, 3.0), nn.Hardtanh(-0.5, 0.7),
     nn.Sigmoid(), nn.ELU(0.5)],
    ids=repr,
)
def test_composite_without_interpreter(monkeypatch, activation):
    """CPU tensors without TRITON_INTERPRET run a PyTorch composite (the activation family's), with a one-time
    warning."""
    monkeypatch.setattr(triton_support, "INTERPRETING", False)
    monkeypatch.setattr(triton_support, "_warned", set())
    torch.manual_seed(10)
    block, stock = make_pair(3, 4, 3, torch.float64, stride=2, padding=(1, 2), activation=activation)
    triton_support.launch_counts.clear()
    with pytest.warns(UserWarning, match="PyTorch composite"):
        step(block, stock, torch.randn(2, 3, 7, 6, dtype=torch.float64), torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        step(block, stock, torch.randn(2, 3, 7, 6, dtype=torch.float64), torch.float64)
    check_buffers(block, stock)
    block.eval(), stock.eval()
    step(block, stock, torch.randn(2, 3, 7, 6, dtype=torch.float64), torch.float64)
    assert sum(triton_support.launch_counts.values()) == 0


def test_tf32_follows_cudnn_flag():
    assert conv_tiles.precision(torch.float32, True) == "tf32"
    assert conv_tiles.precision(torch.float32, False) == "ieee"
    assert conv_tiles.precision(torch.float64, True) == "ieee"


def test_bad_arguments():
    x = torch.randn(2, 3, 6, 6)
    w = torch.randn(4, 3, 3, 3)
    f = dlkern.functional.conv_bn_act2d
    with pytest.raises(ValueError, match="only groups=1"):
        ConvBNReLU2d(4, 4, 3, groups=2)
    with pytest.raises(ValueError, match="padding_mode='zeros'"):
        ConvBNReLU2d(3, 4, 3, padding_mode="reflect")
    with pytest.raises(ValueError, match="unknown activation 'mish'"):
        ConvBNReLU2d(3, 4, 3, activation="mish")
    with pytest.raises(NotImplementedError, match="learnable parameters"):
        ConvBNReLU2d(3, 4, 3, activation=nn.PReLU())
    with pytest.raises(ValueError, match="unknown activation 'mish'"):
        f(x, w, None, None, None, training=True, activation="mish")
    with pytest.raises(ValueError, match=r"expected 4D input \(got 3D input\)"):
        ConvBNReLU2d(3, 4, 3)(torch.randn(3, 6, 6))
    with pytest.raises(RuntimeError, match="to have 3 channels, but got 2 channels"):
        ConvBNReLU2d(3, 4, 3)(torch.randn(2, 2, 6, 6))
    with pytest.raises(RuntimeError, match="Kernel size can't be greater than actual input size"):
        ConvBNReLU2d(3, 4, 5)(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"Expected more than 1 value per channel when training, got input size "
                                         r"torch.Size\(\[1, 4, 1, 1\]\)"):
        ConvBNReLU2d(3, 4, 3)(torch.randn(1, 3, 3, 3))
    with pytest.raises(ValueError, match="running_mean must be defined in evaluation mode"):
        f(x, w, None, None, None, training=False)
    with pytest.raises(ValueError, match="momentum=None .* needs num_batches_tracked"):
        f(x, w, None, torch.zeros(4), torch.ones(4), training=True, momentum=None)
    with pytest.raises(TypeError, match="activation_params must be at most two floats"):
        f(x, w, None, None, None, training=True, activation="elu", activation_params=(1.0, 2.0, 3.0))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_64_bit_offsets_give_the_same_results(layout, monkeypatch):
    """The kernels' 64-bit offset code (INDEX_64, taken for tensors of >= 2^30 elements) computes what the 32-bit
    one does: run on small tensors with the threshold lowered, training forward and backward and eval."""
    torch.manual_seed(12)
    block, _ = make_pair(3, 4, 3, torch.float64, padding=1)
    x = torch.randn(2, 3, 7, 5, dtype=torch.float64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    g = torch.randn(2, 4, 7, 5, dtype=torch.float64)
    results = []
    for threshold in (conv_tiles.INDEX_64_ELEMENTS, 0):
        monkeypatch.setattr(conv_tiles, "INDEX_64_ELEMENTS", threshold)
        b = copy.deepcopy(block).train()
        xi = x.clone().requires_grad_()
        out = b(xi)
        grads = torch.autograd.grad(out, (xi, b[0].weight, b[1].weight, b[1].bias), g)
        with torch.no_grad():
            ev = b.eval()(x)
        results.append((out, *grads, ev, b[1].running_mean, b[1].running_var))
    for ours, ref in zip(*results):
        assert torch.equal(ours, ref)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none is visible")
def test_more_than_2_31_elements_cuda():
    """A conv output of more than 2^31 elements (bf16, ~4.3 GB) takes the 64-bit offsets and matches stock
    PyTorch on its last images (where 32-bit offsets would have wrapped)."""
    torch.manual_seed(13)
    block, stock = make_pair(4, 16, 3, torch.float32, device="cuda", padding=1)
    stock.float()
    x = torch.randn(16640, 4, 112, 72, device="cuda", dtype=torch.bfloat16)  # output: 16640*16*112*72 > 2^31
    assert x.shape[0] * 16 * 112 * 72 > 2**31
    block.eval(), stock.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        out = block(x)[-4:].float()
        ref = stock(x[-4:]).float()
    assert_close(out, ref, dtype=torch.bfloat16)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("input_dtype", ["float32", "autocast"], ids=["float32-input", "16-bit-input"])
def test_autocast(device, dtype, input_dtype):
    """fp16/bf16 under autocast (CPU autocast on CPU): the conv in `dtype`, BatchNorm's statistics and buffers in
    float32; the input may already be in `dtype` (a previous layer's autocast output). Both sides round the conv
    output to `dtype` and normalize it in float32: the dtype's tolerance."""
    torch.manual_seed(11)
    block, stock = make_pair(8, 8, 3, torch.float32, device=device, padding=1)
    stock.float()
    x = torch.randn(2, 8, 6, 6, device=device)
    if input_dtype == "autocast":
        x = x.to(dtype)
    for _ in range(2):
        with torch.autocast(device, dtype=dtype):
            out, ref = block(x), stock(x)
        assert out.dtype == ref.dtype == dtype
        assert_close(out.float(), ref.float(), dtype=dtype)
        assert block[1].running_mean.dtype == torch.float32
        check = dict(dtype=dtype)
        assert_close(block[1].running_mean, stock[1].running_mean, **check)
        assert_close(block[1].running_var, stock[1].running_var, **check)
    block.eval(), stock.eval()
    with torch.autocast(device, dtype=dtype):
        assert_close(block(x).float(), stock(x).float(), dtype=dtype)


# ---------------------------------------------------------------------------------------------------------------
# Issue 9: strided and short BatchNorm tensors, dtypes, empty batches, torch.func, both paths
# ---------------------------------------------------------------------------------------------------------------

F64 = dict(dtype=torch.float64)


@pytest.fixture(params=["triton", "composite"])
def path(request, monkeypatch):
    """Both ways a CPU tensor is computed: Triton's interpreter, or the PyTorch composite (TRITON_INTERPRET unset)."""
    if request.param == "composite":
        monkeypatch.setattr(triton_support, "INTERPRETING", False)
        monkeypatch.setattr(triton_support, "_warned", {ops.OP})  # warned already: tested above
    return request.param


def stock_block(x, w, b, rm, rv, gamma, beta, training, activation=F.relu, momentum=0.1, eps=1e-5, **conv_kw):
    return activation(F.batch_norm(F.conv2d(x, w, b, **conv_kw), rm, rv, gamma, beta, training, momentum, eps))


def leaves_grads(leaves):
    return [t.grad for t in leaves]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_strided_and_expanded_parameters(path, training):
    """Every tensor may be a strided view or expanded: conv weight expanded, conv bias and BatchNorm weight [::2],
    BatchNorm bias expanded, running buffers [::2] (updated in place inside their views, the rest untouched)."""
    torch.manual_seed(12)
    C = 4
    leaves = [torch.randn(2, 2, 5, 5, **F64), torch.randn(1, 2, 3, 3, **F64), torch.randn(2 * C, **F64),
              torch.rand(2 * C, **F64) + 0.5, torch.randn(1, **F64)]
    buffers = [torch.randn(2 * C, **F64), torch.rand(2 * C, **F64) + 0.5]

    def run(leaves, buffers, fn):
        leaves = [t.clone().requires_grad_() for t in leaves]
        x, w, b, gamma, beta = leaves
        rm, rv = [t.clone() for t in buffers]
        args = (x, w.expand(C, 2, 3, 3), b[::2], rm[::2], rv[::2], gamma[::2], beta.expand(C), training)
        out = fn(*args)
        out.backward(torch.linspace(-1, 1, out.numel(), **F64).view_as(out))
        return out, leaves_grads(leaves), (rm, rv)

    def ours(*args):
        return dlkern.functional.conv_bn_act2d(*args, momentum=0.3, padding=1, activation="elu")

    def stock(*args):
        return stock_block(*args, activation=F.elu, momentum=0.3, padding=1)

    out, grads, bufs = run(leaves, buffers, ours)
    ref, ref_grads, ref_bufs = run(leaves, buffers, stock)
    assert_close(out, ref)
    for name, a, b in zip(["input", "weight", "bias", "bn_weight", "bn_bias"], grads, ref_grads):
        assert_close(a, b, msg=lambda m, name=name: f"{name}: {m}")
    for a, b in zip(bufs, ref_bufs):
        assert_close(a, b)  # the odd elements (outside the views) included


def test_expanded_running_buffer_is_refused():
    x, w = torch.randn(2, 2, 4, 4), torch.randn(3, 2, 3, 3)
    with pytest.raises(RuntimeError, match="more than one element of the written-to tensor refers to a single"):
        dlkern.functional.conv_bn_act2d(x, w, None, torch.zeros(1).expand(3), torch.ones(3), training=True)


BN_SIZE_CASES = [
    pytest.param(True, dict(bn_weight=torch.ones(1)), id="short-weight"),
    pytest.param(True, dict(bn_bias=torch.zeros(2)), id="short-bias"),
    pytest.param(True, dict(running_mean=torch.zeros(1)), id="short-running-mean"),
    pytest.param(True, dict(running_var=torch.ones(5)), id="long-running-var"),
    pytest.param(False, dict(running_mean=torch.zeros(1)), id="eval-1-element-mean"),
    pytest.param(False, dict(running_var=torch.ones(1)), id="eval-1-element-var"),
    pytest.param(False, dict(bn_weight=torch.ones(2), running_mean=torch.zeros(3)), id="eval-mean-first"),
]


def bn_arguments(sizes, channels=4):
    args = dict(running_mean=torch.zeros(channels), running_var=torch.ones(channels), bn_weight=torch.ones(channels),
                bn_bias=torch.zeros(channels))
    args.update(sizes)
    return args


@pytest.mark.parametrize("training, sizes", BN_SIZE_CASES)
def test_batchnorm_tensor_sizes(training, sizes):
    """PyTorch's error, word for word, in eager, in the op itself, and under torch.compile(fullgraph=True)."""
    x, w = torch.randn(2, 3, 5, 5), torch.randn(4, 3, 3, 3)
    a = bn_arguments(sizes)
    with pytest.raises(RuntimeError) as expected:
        F.batch_norm(F.conv2d(x, w), a["running_mean"], a["running_var"], a["bn_weight"], a["bn_bias"], training)
    message = str(expected.value)

    def ours(x, w):
        return dlkern.functional.conv_bn_act2d(x, w, None, a["running_mean"], a["running_var"], a["bn_weight"],
                                               a["bn_bias"], training)

    with pytest.raises(RuntimeError, match=f"^{re.escape(message)}$"):
        ours(x, w)
    with pytest.raises(Exception, match="should contain 4 elements not"):  # Dynamo may report another first
        torch.compile(ours, fullgraph=True, backend="aot_eager")(x, w)
    # The ops check too (their fakes as well, under FakeTensorMode), whoever calls them.
    geo = ([1, 1], [0, 0, 0, 0], [1, 1])
    args = (x, w, None, a["bn_weight"], a["bn_bias"], a["running_mean"], a["running_var"], None, None, 0.1, 1e-5,
            *geo, "relu", 0.0, 0.0, "none", [], False)
    with pytest.raises(RuntimeError, match=re.escape(message)):
        torch.ops.dlkern.conv_bn_train2d(*args)
    with FakeTensorMode() as mode, pytest.raises(RuntimeError, match=re.escape(message)):
        torch.ops.dlkern.conv_bn_train2d(*(mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in args))


@pytest.mark.parametrize(
    "training, eps, dtypes",
    [
        pytest.param(True, 0.0, {}, id="eps-0-train"),
        pytest.param(True, -1e-5, {}, id="eps-negative-train"),
        pytest.param(False, -1e-5, {}, id="eps-negative-eval"),
        pytest.param(True, 1e-5, dict(running_mean=torch.float64, running_var=torch.float64), id="float64-buffers"),
        pytest.param(False, 1e-5, dict(running_var=torch.float64), id="eval-float64-var"),
        pytest.param(True, 1e-5, dict(bn_weight=torch.float16), id="float16-weight"),
        pytest.param(True, 1e-5, dict(bn_bias=torch.float64), id="float64-bias"),
        pytest.param(False, 1e-5, dict(input=torch.float64, weight=torch.float64), id="float64-input-float-bn"),
    ],
)
def test_refused_as_pytorch_refuses(training, eps, dtypes):
    """eps <= 0 in training, eps < 0, BatchNorm tensors of another dtype: PyTorch's exception and message."""
    x, w = torch.randn(2, 3, 5, 5, dtype=dtypes.get("input")), torch.randn(4, 3, 3, 3, dtype=dtypes.get("weight"))
    a = {k: v.to(dtypes.get(k, v.dtype)) for k, v in bn_arguments({}).items()}
    with pytest.raises((RuntimeError, ValueError)) as expected:
        F.batch_norm(F.conv2d(x, w), a["running_mean"], a["running_var"], a["bn_weight"], a["bn_bias"], training,
                     eps=eps)
    with pytest.raises(type(expected.value), match=f"^{re.escape(str(expected.value))}$"):
        dlkern.functional.conv_bn_act2d(x, w, None, a["running_mean"], a["running_var"], a["bn_weight"],
                                        a["bn_bias"], training, eps=eps)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_empty_batch(path, momentum):
    """N = 0 in training: an empty output, zero gradients for every parameter, running statistics untouched and
    num_batches_tracked counted, as the stock Conv2d -> BatchNorm2d (whose BatchNorm returns early)."""
    torch.manual_seed(13)
    block, stock = make_pair(3, 4, 3, torch.float64, padding=1, bn_kw=dict(momentum=momentum))
    x = torch.randn(0, 3, 5, 5, **F64)
    out, ref = block(x.clone().requires_grad_()), stock(x.clone().requires_grad_())
    assert out.shape == ref.shape == (0, 4, 5, 5) and out.dtype == ref.dtype
    out.sum().backward()
    ref.sum().backward()
    for (name, p), q in zip(block.named_parameters(), stock.parameters()):
        assert p.grad is not None and torch.equal(p.grad, q.grad), name
    check_buffers(block, stock)
    assert block[1].num_batches_tracked.item() == 1


def test_conv_bias_gradient_is_exactly_zero(path):
    """The documented difference: a conv bias ahead of training BatchNorm has true gradient 0 (the batch mean
    cancels it); dlkern returns exactly 0, where PyTorch returns rounding noise."""
    torch.manual_seed(14)
    block, _ = make_pair(3, 4, 3, torch.float32, padding=1)
    block(torch.randn(2, 3, 5, 5)).square().sum().backward()
    assert torch.equal(block[0].bias.grad, torch.zeros(4))


STOCK_ACTIVATIONS = {
    "none": lambda u: u, "relu": F.relu, "leaky_relu": F.leaky_relu, "elu": F.elu, "softplus": F.softplus,
    "silu": F.silu, "swish": lambda u: u * torch.sigmoid(u), "gelu": F.gelu,
    "gelu_tanh": lambda u: F.gelu(u, approximate="tanh"), "sigmoid": torch.sigmoid, "tanh": torch.tanh,
    "hardsigmoid": lambda u: F.relu6(u + 3.0) / 6.0, "hardswish": lambda u: u * F.relu6(u + 3.0) / 6.0,
    "hardtanh": F.hardtanh, "hard_logistic": lambda u: torch.clamp(0.25 * u + 0.5, 0, 1),
}


@pytest.mark.parametrize("activation", FUSABLE)
def test_eval_backward_every_activation(path, activation):
    """Eval mode with gradients (fine-tuning with frozen BatchNorm), every fusable activation and none, on both
    paths (the composite once aliased its two outputs without an activation)."""
    torch.manual_seed(15)
    leaves = [torch.randn(2, 2, 4, 4, **F64), torch.randn(3, 2, 3, 3, **F64), torch.randn(3, **F64),
              torch.rand(3, **F64) + 0.5, torch.randn(3, **F64)]
    rm, rv = torch.randn(3, **F64) * 0.1, torch.rand(3, **F64) + 0.5

    def run(fn):
        xs = [t.clone().requires_grad_() for t in leaves]
        out = fn(*xs)
        out.backward(torch.linspace(-1, 1, out.numel(), **F64).view_as(out))
        return [out] + leaves_grads(xs)

    ours = run(lambda x, w, b, g, be: dlkern.functional.conv_bn_act2d(x, w, b, rm, rv, g, be, False, padding=1,
                                                                     activation=None if activation == "none"
                                                                     else activation))
    ref = run(lambda x, w, b, g, be: stock_block(x, w, b, rm, rv, g, be, False, STOCK_ACTIVATIONS[activation],
                                                 padding=1))
    for name, a, b in zip(["output", "input", "weight", "bias", "bn_weight", "bn_bias"], ours, ref):
        assert_close(a, b, msg=lambda m, name=name: f"{name}: {m}")
    if activation == "none":  # the module form of the report
        block, stock = make_pair(2, 3, 3, torch.float64, activation=nn.Identity(), padding=1)
        block.eval(), stock.eval()
        step(block, stock, leaves[0], torch.float64)


def functional_block(training, rm=None, rv=None):
    def f(x, w, gamma, beta):
        return dlkern.functional.conv_bn_act2d(x, w, None, rm, rv, gamma, beta, training, padding=1,
                                               activation="silu")

    def ref(x, w, gamma, beta):
        return stock_block(x, w, None, rm, rv, gamma, beta, training, F.silu, padding=1)

    return f, ref


def small_args():
    torch.manual_seed(16)
    return (torch.randn(2, 2, 3, 3, **F64), torch.randn(3, 2, 2, 2, **F64), torch.rand(3, **F64) + 0.5,
            torch.randn(3, **F64))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_torch_func_reverse_mode(training):
    """torch.func.grad, vjp, jacrev and vmap(grad) (per-sample gradients) as for the stock ops."""
    args = small_args()
    f, ref = functional_block(training, *(() if training else (torch.randn(3, **F64), torch.rand(3, **F64) + 0.5)))

    def loss(fn):
        return lambda *a: fn(*a).square().sum()

    for ours, theirs in zip(torch.func.grad(loss(f), argnums=(0, 1, 2, 3))(*args),
                            torch.func.grad(loss(ref), argnums=(0, 1, 2, 3))(*args)):
        assert_close(ours, theirs)
    (out, vjp_fn), (ref_out, ref_vjp_fn) = torch.func.vjp(f, *args), torch.func.vjp(ref, *args)
    assert_close(out, ref_out)
    g = torch.randn_like(out)
    for ours, theirs in zip(vjp_fn(g), ref_vjp_fn(g)):
        assert_close(ours, theirs)
    assert_close(torch.func.jacrev(f, argnums=2)(*args), torch.func.jacrev(ref, argnums=2)(*args))
    # vmap: each vmapped call is its own batch (its own statistics in training), as for the stock ops.
    xs = torch.randn(3, *args[0].shape, **F64)
    assert_close(torch.func.vmap(f, in_dims=(0, None, None, None))(xs, *args[1:]),
                 torch.func.vmap(ref, in_dims=(0, None, None, None))(xs, *args[1:]))
    per_sample = torch.func.vmap(torch.func.grad(loss(f), argnums=1), in_dims=(0, None, None, None))
    per_sample_ref = torch.func.vmap(torch.func.grad(loss(ref), argnums=1), in_dims=(0, None, None, None))
    assert_close(per_sample(xs, *args[1:]), per_sample_ref(xs, *args[1:]))


def test_unsupported_autograd_is_a_clear_error():
    """Forward mode and double backward raise errors naming the op, never a silent zero; vmap of a training
    block cannot update running statistics once per vmapped call."""
    args = small_args()
    f, _ = functional_block(True)
    forward_ad = "dlkern.conv_bn_act2d: forward-mode AD"
    with pytest.raises(NotImplementedError, match=forward_ad):
        torch.func.jvp(f, args, tuple(torch.ones_like(a) for a in args))
    with pytest.raises(NotImplementedError, match=forward_ad):
        torch.func.jacfwd(f, argnums=2)(*args)
    with torch.autograd.forward_ad.dual_level(), pytest.raises(NotImplementedError, match=forward_ad):
        f(torch.autograd.forward_ad.make_dual(args[0], torch.ones_like(args[0])), *args[1:])
    x = args[0].clone().requires_grad_()
    (gx,) = torch.autograd.grad(f(x, *args[1:]).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="dlkern.conv_bn_act2d: double backward"):
        gx.square().sum().backward()
    with pytest.raises((RuntimeError, NotImplementedError), match="dlkern.conv_bn_act2d: "):
        torch.func.hessian(lambda x: f(x, *args[1:]).sum())(args[0])
    f_running, _ = functional_block(True, torch.zeros(3, **F64), torch.ones(3, **F64))
    with pytest.raises(RuntimeError, match="vmap over a training block cannot update BatchNorm's running"):
        torch.func.vmap(f_running, in_dims=(0, None, None, None))(args[0][None].expand(2, -1, -1, -1, -1),
                                                                  *args[1:])


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_nonfinite_grad_on_flat_branch(training):
    """NaN/inf in grad_output where ReLU's output is 0: stock relu's backward selects 0 there, so every gradient
    stays finite; the fused backward must not turn g * 0 into NaN."""
    torch.manual_seed(3)
    block, stock = make_pair(2, 4, 3, torch.float64, padding=1)
    block.train(training), stock.train(training)
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    xb, xs = x.clone().requires_grad_(), x.clone().requires_grad_()
    yb, ys = block(xb), stock(xs)
    g = torch.randn_like(ys)
    flat = ys == 0
    assert flat.any() and (~flat).any()
    g[flat] = torch.tensor([float("nan"), float("inf")], dtype=torch.float64).repeat(int(flat.sum()))[:int(flat.sum())]
    ours = torch.autograd.grad(yb, [xb, *block.parameters()], g)
    theirs = torch.autograd.grad(ys, [xs, *stock.parameters()], g)
    for a, b in zip(ours, theirs):
        assert torch.isfinite(b).all()
        assert_close(a, b)


class _RecordOps(torch.utils._python_dispatch.TorchDispatchMode):
    """The ops a block's forward dispatches (the top-level ones: those that would launch on a GPU)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("path", ["triton", "composite"])
@pytest.mark.parametrize("affine", ["both", "weight_only", "none"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_eval_inference_is_one_launch(layout, affine, path, monkeypatch):
    """Inference (eval, no autograd): BatchNorm applied in the conv kernel's epilogue from the buffers as they are
    now -- one launch per block, nothing folded on the host, never stale -- matching stock eval, strided running
    buffers included."""
    if path == "composite":
        monkeypatch.setattr(triton_support, "_composite_forced", True)
    torch.manual_seed(11)
    bn_kw = {} if affine == "both" else dict(affine=False) if affine == "none" else {}
    block, stock = make_pair(3, 4, 3, torch.float64, padding=1, bn_kw=bn_kw)
    if affine == "weight_only":  # BatchNorm2d(bias=False): a weight, no bias
        for m in (block, stock):
            m[1].bias = None
    block.eval(), stock.eval()
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    var = torch.rand(8, dtype=torch.float64) + 0.5
    with torch.no_grad():
        for m in (block, stock):  # strided running buffers, written through .data (as an EMA would)
            m[1].running_var = var.clone()[::2]
            m[1].running_mean.data.copy_(torch.linspace(-1, 1, 4, dtype=torch.float64))
        triton_support.launch_counts.clear()
        with _RecordOps() as seen:
            out = block(x)
        assert seen.ops == ["dlkern.conv_bn_infer2d.default"]  # no host-side folding ops (each a GPU launch)
        if path == "triton":
            assert dict(triton_support.launch_counts) == {"conv_fwd_kernel": 1}
        assert_close(out, stock(x))
        for m in (block, stock):
            m[1].running_mean.data.add_(0.5)
        assert_close(block(x), stock(x))


_X, _W = torch.randn(2, 3, 6, 6), torch.randn(4, 3, 3, 3)


@pytest.mark.parametrize(
    "x, w, b, kw",
    [
        pytest.param(_X, _W, None, dict(stride=np.int64(2)), id="numpy-int-stride"),
        pytest.param(_X, _W, None, dict(stride=torch.tensor(2)), id="0d-tensor-stride"),
        pytest.param(_X, _W, None, dict(stride=torch.tensor([2])), id="1-element-tensor-stride"),
        pytest.param(_X, _W, None, dict(stride=(np.int32(1), 2), padding=np.int64(1)), id="numpy-in-tuple"),
        pytest.param(_X, _W, None, dict(dilation=(2,), padding=[1]), id="one-element-lists"),
        pytest.param(_X, _W, None, dict(stride=0), id="stride-0"),
        pytest.param(_X, _W, None, dict(stride=(1, -1)), id="stride-negative"),
        pytest.param(_X, _W, None, dict(dilation=0), id="dilation-0"),
        pytest.param(_X, _W, None, dict(dilation=(1, -2)), id="dilation-negative"),
        pytest.param(_X, _W, None, dict(padding=-1), id="padding-negative"),
        pytest.param(_X, _W, None, dict(padding="same", stride=2), id="same-strided"),
        pytest.param(_X, _W, None, dict(padding="SAME"), id="SAME"),
        pytest.param(_X, _W, None, dict(padding="same", dilation=(0, 1)), id="same-dilation-0"),
        pytest.param(_X, _W, None, dict(padding="same", dilation=-1), id="same-dilation-negative"),
        pytest.param(_X, _W, None, dict(padding="valid", stride=0), id="valid-stride-0"),
        pytest.param(_X, _W, None, dict(dilation=3), id="kernel-larger-than-input"),
        pytest.param(_X, _W, None, dict(stride=(1, 1, 1)), id="stride-3-long"),
        pytest.param(_X, _W, None, dict(stride=()), id="stride-empty"),
        pytest.param(_X, _W, None, dict(padding=(1, 1, 1, 1)), id="padding-4-long"),
        pytest.param(_X, _W, None, dict(stride=0, padding=-1), id="padding-before-stride"),
        pytest.param(_X, _W, None, dict(stride=(1, 2.0)), id="float-in-tuple"),
        pytest.param(_X.double(), _W, None, {}, id="float64-input-float32-weight"),
        pytest.param(_X, _W.double(), None, {}, id="float32-input-float64-weight"),
        pytest.param(_X.long(), _W, None, {}, id="int64-input"),
        pytest.param(_X, _W, torch.randn(4).double(), {}, id="bias-dtype"),
        pytest.param(_X, _W, torch.randn(4).double(), dict(stride=0), id="bias-dtype-before-stride"),
        pytest.param(_X, _W, torch.randn(5), {}, id="bias-shape"),
        pytest.param(_X, torch.randn(4, 2, 3, 3), None, dict(dilation=(0, 1)), id="channels-before-dilation-0"),
        pytest.param(_X[None], _W, None, {}, id="5d-input"),
        pytest.param(_X[None], _W, None, dict(padding="full"), id="5d-before-padding-string"),
        pytest.param(_X, _W, torch.randn(4).double(), dict(padding="full"), id="padding-string-before-bias"),
        pytest.param(_X[0], _W, None, {}, id="3d-input"),
    ],
)
def test_conv_arguments_read_as_conv2d_reads_them(x, w, b, kw):
    """Conv arguments as F.conv2d reads them (issue 18): what it accepts (NumPy ints, one-element integer
    tensors, one-element lists) computes the stock block; what it refuses raises its exception type and message,
    its check order included. The reference is the stock Conv2d -> BatchNorm2d (training) on the same inputs."""
    def stock(x):
        z = F.conv2d(x, w, b, **kw)
        return F.relu(nn.BatchNorm2d(w.shape[0], affine=False, track_running_stats=False).to(z.dtype)(z))

    def refusal(x):
        try:
            stock(x)
        except Exception as error:  # noqa: BLE001 (any refusal: its type and message are the contract)
            # PyTorch's parser names the function called: conv_bn_act2d for dlkern's
            return type(error), str(error).replace("conv2d(): argument", "conv_bn_act2d(): argument")
        return None

    refused = refusal(x)
    if refused is None:
        assert_close(dlkern.functional.conv_bn_act2d(x, w, b, None, None, training=True, **kw), stock(x))
        return
    # A few refusals come from the CPU conv kernel ATen picks for the shape (zero dilation, input and weight
    # dtypes): dlkern's message is then one of those PyTorch gives for some batch of these images.
    messages = {refused[1]} | ({refusal(x[:1])[1]} if x.dim() == 4 else set())
    for block in (dlkern.functional.conv_bn_act2d, dlkern.functional.conv_bn_act_pool2d):  # the pooled one too
        with pytest.raises(refused[0]) as raised:
            block(x, w, b, None, None, training=True, **kw)
        assert str(raised.value) in messages


def test_argument_cache_keys_on_types():
    """The remembered argument checks key on types as well as values: stride=1.0 stays refused after a stride=1
    call (1.0 == 1 would find the int's entry), and so do bool and float activation parameters."""
    x, w = torch.randn(2, 3, 5, 5), torch.randn(4, 3, 3, 3)
    f = dlkern.functional.conv_bn_act2d
    for _ in range(2):
        f(x, w, None, None, None, training=True, stride=1, padding=(1, 1))
        with pytest.raises(TypeError, match=r"argument 'stride' \(position 11\) must be tuple of ints, not float"):
            f(x, w, None, None, None, training=True, stride=1.0, padding=(1, 1))
        with pytest.raises(TypeError, match=r"argument 'padding' failed to unpack the object at pos 2"):
            f(x, w, None, None, None, training=True, padding=(1, 1.0))
        with pytest.raises(TypeError, match=r"argument 'dilation' \(position 13\) must be tuple of ints, not bool"):
            f(x, w, None, None, None, training=True, dilation=True)
        f(x, w, None, None, None, training=True, activation="elu", activation_params=(1,))
        with pytest.raises(TypeError, match="activation_params must be at most two floats"):
            f(x, w, None, None, None, training=True, activation="elu", activation_params=(True,))


@pytest.mark.parametrize("rows", [512, 16, 7])
def test_weight_gradient_in_one_split_or_many(rows, monkeypatch):
    """The weight gradient in one split (the GEMM writes dW and d(bias) themselves) or split over the rows (16 and
    7 rows a split: partials summed in a fixed order, a ragged last split) gives the same gradients; the folded
    eval block (bias gradient summed) too."""
    monkeypatch.setattr(conv_tiles, "rows_per_split", lambda M, device, programs: rows)
    torch.manual_seed(21)
    block, stock = make_pair(3, 4, 3, torch.float64, padding=1)
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64)
    for training in (True, False):
        block.train(training), stock.train(training)
        triton_support.launch_counts.clear()
        step(block, stock, x, torch.float64)
        assert triton_support.launch_counts["sum_splits_kernel"] == (0 if rows == 512 else 1)
