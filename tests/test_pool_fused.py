"""The max pool fused into the conv block's training pass (dlkern::conv_bn_train2d with a pool epilogue, issue 13): against stock
Conv2d -> BatchNorm2d -> act -> MaxPool2d in float64 -- outputs, every gradient, running statistics -- through the
Triton kernels (interpreter) and the PyTorch composite; ties, NaN and -inf as ATen's max pool; pool padding,
ceil_mode, strides above the kernel; channels_last; opcheck; torch.compile; launches."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dlkern.ops import conv_block as ops
from dlkern.ops import conv_epilogue, conv_tiles
from dlkern.ops import triton_support
from helpers import assert_close

POOLS = [  # (kernel, stride, padding, ceil_mode), input height
    (((2, 2), (2, 2), (0, 0), False), 8),
    (((2, 2), (2, 2), (1, 1), True), 7),
    (((3, 2), (3, 2), (1, 0), False), 9),
    (((2, 2), (3, 3), (0, 0), True), 10),
]


def _stock(conv, bn, act, pool, x):
    k, s, p, ceil = pool
    return F.max_pool2d(act(bn(conv(x))), k, s, p, 1, ceil)


def _pair(dtype, c_in=3, c_out=4, seed=0):
    torch.manual_seed(seed)
    conv = nn.Conv2d(c_in, c_out, 3, padding=1).to(dtype)
    bn = nn.BatchNorm2d(c_out).to(dtype)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return conv, bn


def _ours(conv, bn, x, pool, activation="relu", buffers=None):
    rm, rv, nbt = buffers if buffers is not None else (bn.running_mean, bn.running_var, bn.num_batches_tracked)
    return ops.conv_bn_block(x, conv.weight, conv.bias, rm, rv, bn.weight, bn.bias, nbt, True, bn.momentum, bn.eps, 1, 1,
                       1, activation, (), pool=pool)


@pytest.mark.parametrize("path", ["triton", "composite"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("pool,height", POOLS, ids=[f"{p[0]}-{p[1]}-{p[2]}-{'ceil' if p[3] else 'floor'}"
                                                    for p, _ in POOLS])
def test_matches_stock(pool, height, layout, path, monkeypatch):
    if path == "composite":
        monkeypatch.setattr(triton_support, "_composite_forced", True)
    monkeypatch.setattr(conv_tiles, "MERGE_TILES", 1024)  # one merge pass, as at these sizes on a GPU
    conv, bn = _pair(torch.float64)
    ref_bn = nn.BatchNorm2d(4).double()
    ref_bn.load_state_dict(bn.state_dict())
    x = torch.randn(2, 3, height, height + 1, dtype=torch.float64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    buffers = (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
    before = sum(triton_support.launch_counts.values())
    out, pos = _ours(conv, bn, x, pool, buffers=buffers)
    k, st, pd, ceil = pool
    ref, indices = F.max_pool2d(F.relu(ref_bn(conv(x))), k, st, pd, 1, ceil, return_indices=True)
    assert pos.dtype == torch.uint8 and pos.shape == out.shape
    assert_close(out, ref, dtype=torch.float64)
    assert torch.equal(_as_indices(pos, pool, x.shape[3]), indices)
    g = torch.randn_like(ref)
    ours = torch.autograd.grad(out, (x, conv.weight, conv.bias, bn.weight, bn.bias), g)
    theirs = torch.autograd.grad(ref, (x, conv.weight, conv.bias, ref_bn.weight, ref_bn.bias), g)
    for name, a, b in zip(("input", "weight", "bias", "bn weight", "bn bias"), ours, theirs):
        if name == "bias":  # the conv bias before BatchNorm: dlkern's exact 0 against stock's rounding noise
            assert torch.all(a == 0) and b.abs().max() < 1e-12
            continue
        assert_close(a, b, dtype=torch.float64)
    assert_close(buffers[0], ref_bn.running_mean, dtype=torch.float64)
    assert_close(buffers[1], ref_bn.running_var, dtype=torch.float64)
    assert buffers[2].item() == ref_bn.num_batches_tracked.item() == 1
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)
    if path == "triton":  # conv + merge + normalize/act/pool; reduction, dL/dz, dgrad, wgrad, one split: no sum
        assert sum(triton_support.launch_counts.values()) - before == 3 + 4


def _as_indices(pos, pool, width):
    """ATen's flat indices (h*W + w) from the window taps."""
    (kh, kw), (sh, sw), (ph, pw), _ = pool
    rows = torch.arange(pos.shape[2]).view(-1, 1) * sh - ph
    cols = torch.arange(pos.shape[3]).view(1, -1) * sw - pw
    return (rows + pos.long() // kw) * width + cols + pos.long() % kw


@pytest.mark.parametrize("path", ["triton", "composite"])
def test_ties_nan_and_minus_inf_as_aten(path, monkeypatch):
    """Equal values: the first in window order wins; NaN wins over anything (the last NaN in order) -- as ATen's
    max pool, with the same indices; a -inf in the conv output makes its channel NaN through BatchNorm's batch
    statistics, in both. The gradient follows the chosen tap."""
    if path == "composite":
        monkeypatch.setattr(triton_support, "_composite_forced", True)
    nan, inf = float("nan"), float("inf")
    ties = [[1.0, 1.0, 2.0, 5.0], [1.0, 0.0, 5.0, 2.0], [nan, 3.0, -1.0, -1.0], [3.0, nan, -1.0, -1.0]]
    with_inf = [[-inf, 1.0, 2.0, 2.0], [0.0, 1.0, 2.0, 2.0], [4.0, 4.0, 1.0, 0.0], [4.0, 4.0, 0.0, 1.0]]
    x = torch.tensor([[ties, with_inf], [[r[::-1] for r in ties], with_inf]], dtype=torch.float64,
                     requires_grad=True)
    w = torch.eye(2, dtype=torch.float64).view(2, 2, 1, 1)  # z = x: order, ties, NaN survive BatchNorm
    pool = ((2, 2), (2, 2), (0, 0), False)
    out, pos = ops.conv_bn_block(x, w, None, None, None, None, None, None, True, 0.1, 1e-5, 1, 0, 1, "none", (), pool=pool)
    ref, indices = F.max_pool2d(F.batch_norm(F.conv2d(x, w), None, None, training=True), 2, return_indices=True)
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.nan_to_num(), ref.nan_to_num())
    assert torch.equal(_as_indices(pos, pool, 4), indices)
    assert out[:, 1].isnan().all()


@pytest.mark.parametrize("path", ["triton", "composite"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("pool,height", POOLS + [(((3, 3), (3, 3), (1, 1), True), 8)],
                         ids=[f"{p[0]}-{p[1]}-{p[2]}-{'ceil' if p[3] else 'floor'}" for p, _ in POOLS] + ["3x3"])
def test_inference_is_one_kernel(pool, height, layout, path, monkeypatch):
    """Eval without autograd: conv + BatchNorm (running statistics) + activation + max pool in one kernel that
    writes only the pooled output, equal to stock eval (ties and NaN included: a NaN input channel)."""
    if path == "composite":
        monkeypatch.setattr(triton_support, "_composite_forced", True)
    conv, bn = _pair(torch.float64, seed=7)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.3, 0.3)
        bn.running_var.uniform_(0.5, 1.5)
    bn.eval()
    x = torch.randn(2, 3, height, height + 1, dtype=torch.float64)
    x[1, :, 2, 3] = float("nan")
    x[0, :, :, :4] = 0.25  # equal values in whole windows: ties
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    before = triton_support.launch_counts.copy()
    with torch.no_grad():
        out, pos = ops.conv_bn_block(x, conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, None,
                               False, 0.1, 1e-5, 1, 1, 1, "silu", (), pool=pool)
        k, st, pd, ceil = pool
        ref = F.max_pool2d(F.silu(bn(conv(x))), k, st, pd, 1, ceil)
    assert pos is None
    assert torch.equal(out.isnan(), ref.isnan())
    assert_close(out.nan_to_num(), ref.nan_to_num(), dtype=torch.float64)
    if path == "triton":
        assert dict(triton_support.launch_counts - before) == {"conv_fwd_kernel": 1}
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)


def test_bf16_autocast():
    """Under bf16 autocast the pooled values are the rounded activations' maxima, as stock pools its bf16 output."""
    conv, bn = _pair(torch.float32, seed=3)
    ref_bn = nn.BatchNorm2d(4)
    ref_bn.load_state_dict(bn.state_dict())
    x = torch.randn(2, 3, 8, 8)
    pool = ((2, 2), (2, 2), (0, 0), False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = _ours(conv, bn, x, pool)
        ref = _stock(conv, ref_bn, F.relu, pool, x)
    assert out.dtype == ref.dtype == torch.bfloat16
    assert_close(out.float(), ref.float(), dtype=torch.bfloat16)


def test_not_fused_where_not_covered():
    assert conv_epilogue.pool_fusable((2, 2), (2, 2), (1, 1)) and conv_epilogue.pool_fusable((3, 3), (4, 4), (1, 1))
    assert not conv_epilogue.pool_fusable((3, 3), (2, 2), (1, 1))  # overlapping windows
    assert not conv_epilogue.pool_fusable((2, 2), (2, 2), (2, 1))  # dilation
    assert not conv_epilogue.pool_fusable((17, 16), (17, 16), (1, 1))  # 272 taps: more than a byte
    conv, bn = _pair(torch.float64)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    bn.eval()
    xg = x.clone().requires_grad_()  # eval with autograd (frozen BatchNorm fine-tuning): folded, then pooled
    assert ops.conv_bn_block(xg, conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, None, False,
                       0.1, 1e-5, 1, 1, 1, "relu", (), pool=((2, 2), (2, 2), (0, 0), False)) is None
    with torch.no_grad():  # inference with more taps than a row tile
        assert ops.conv_bn_block(x, conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, None,
                           False, 0.1, 1e-5, 1, 1, 1, "relu", (), pool=((9, 8), (9, 8), (0, 0), True)) is None
    empty = torch.randn(0, 3, 6, 6, dtype=torch.float64)
    assert _ours(conv, bn.train(), empty, ((2, 2), (2, 2), (0, 0), False)) is None


def test_opcheck_and_compile():
    conv, bn = _pair(torch.float64, seed=5)
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64, requires_grad=True)
    geo = ([1, 1], [1, 1, 1, 1], [1, 1])
    epilogue = ("relu", 0.0, 0.0, "none", [2, 2, 2, 2, 1, 0, 1, 0])  # the pool: kernel, stride, padding, ceil, after act
    args = (x, conv.weight, conv.bias, bn.weight, bn.bias, torch.zeros(4, dtype=torch.float64),
            torch.ones(4, dtype=torch.float64), torch.zeros((), dtype=torch.long), None, 0.1, 1e-5, *geo, *epilogue,
            False)
    torch.library.opcheck(torch.ops.dlkern.conv_bn_train2d.default, args)
    running = (torch.randn(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.5)
    torch.library.opcheck(torch.ops.dlkern.conv_bn_infer2d.default,
                          (x.detach(), conv.weight.detach(), conv.bias.detach(), *running, bn.weight.detach(),
                           bn.bias.detach(), None, 1e-5, *geo, *epilogue, False))
    out, z, stats, pos = torch.ops.dlkern.conv_bn_train2d(*args)
    torch.library.opcheck(
        torch.ops.dlkern.conv_bn_block2d_backward.default,
        (torch.randn_like(out), x.detach(), conv.weight.detach(), z, stats, bn.weight.detach(), bn.bias.detach(), None,
         pos, *geo, *epilogue, False, True, True),
    )

    def block(x, w, b, gamma, beta):
        return ops.conv_bn_block(x, w, b, None, None, gamma, beta, None, True, 0.1, 1e-5, 1, 1, 1, "relu", (),
                           pool=((2, 2), (2, 2), (0, 0), False))[0]

    params = (x, conv.weight, conv.bias, bn.weight, bn.bias)
    eager = block(*params)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")(*params)
    assert torch.equal(eager, compiled)
    g = torch.randn_like(eager)
    for a, b in zip(torch.autograd.grad(eager, params, g), torch.autograd.grad(compiled, params, g)):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kernel", [(1, 2), (2, 1), (2, 2), (2, 3), (3, 3)])
@pytest.mark.parametrize("width", [1, 2, 5])
def test_window_taps_round_trip(kernel, width):
    """window_taps (what the composite returns as pos) decodes ATen's flat indices by compares for windows of one
    or two rows no wider than the plane, else by division; window_indices inverts it. Checked against the
    division on every valid padding, stride >= kernel, both ceil modes, narrow planes included."""
    torch.manual_seed(width)
    for pad in itertools.product(range(kernel[0] // 2 + 1), range(kernel[1] // 2 + 1)):
        for extra, ceil in itertools.product([0, 1], [False, True]):
            stride = (kernel[0] + extra, kernel[1] + extra)
            x = torch.randn(2, 3, 5, width)
            try:
                _, idx = F.max_pool2d(x, kernel, stride, pad, 1, ceil, return_indices=True)
            except RuntimeError:  # the output would be empty
                continue
            rows = torch.arange(idx.shape[2]).view(-1, 1) * stride[0] - pad[0]
            cols = torch.arange(idx.shape[3]).view(1, -1) * stride[1] - pad[1]
            expected = (idx // width - rows) * kernel[1] + (idx % width - cols)
            taps = conv_epilogue.window_taps(idx, width, kernel, stride, pad)
            assert taps.dtype == torch.uint8 and torch.equal(taps.long(), expected), (pad, stride, ceil)
            assert torch.equal(conv_epilogue.window_indices(taps, width, kernel, stride, pad), idx), (pad, stride, ceil)
