"""The max pool between the conv and BatchNorm (Conv -> MaxPool -> BatchNorm -> act, fast CIFAR-10 nets; issue 20):
the conv's epilogue pools its tile and emits the pooled values' statistics, BatchNorm normalizes the pooled tensor
only, the backward sends dL/dz to each window's maximum through the window taps. Against stock F.conv2d ->
F.max_pool2d -> F.batch_norm -> act in float64 (outputs, every gradient, running statistics), training and
inference, Triton's interpreter and the PyTorch composite; pool padding, ceil_mode, strides above the kernel,
negative BatchNorm weights (where pooling after BatchNorm would differ); channels_last; ties; launches."""

import pytest
import torch
import torch.nn.functional as F

from dlkern.ops import triton_support
from dlkern.ops.conv_block import conv_bn_block
from dlkern.ops.conv_epilogue import window_taps
from helpers import assert_close, assert_outputs_and_grads_close, check_block_against_stock
from test_conv_bn import path  # noqa: F401 (the fixture: Triton's interpreter, the composite)

F64 = dict(dtype=torch.float64)
POOLS = [((2, 2), (2, 2), (0, 0), False), ((2, 2), (2, 2), (1, 1), True), ((3, 2), (3, 2), (1, 0), False),
         ((2, 2), (3, 3), (0, 0), True)]


def _leaves(grad, seed=0, shape=(2, 3, 8, 7)):
    torch.manual_seed(seed)
    x = torch.randn(*shape, **F64)
    w = torch.randn(4, shape[1], 3, 3, **F64)
    gamma = torch.rand(4, **F64) - 0.5  # some negative: max(bn(z)) != bn(max(z)) there
    beta = torch.randn(4, **F64)
    return [t.requires_grad_(grad) for t in (x, w, gamma, beta)]


def _stock(x, w, gamma, beta, running, training, act, pool):
    k, s, p, ceil = pool
    u = F.batch_norm(F.max_pool2d(F.conv2d(x, w, None, 1, 1), k, s, p, 1, ceil), *running, gamma, beta, training,
                     0.1, 1e-5)
    return getattr(F, act)(u)


def _ours(x, w, gamma, beta, running, training, act, pool):
    out = conv_bn_block(x, w, None, *running, gamma, beta, None, training, 0.1, 1e-5, 1, 1, 1, act, (), pool=pool,
                        pool_before_bn=True)
    return out[0]


@pytest.mark.parametrize("pool", POOLS, ids=[f"{p[0]}-{p[1]}-{p[2]}-{'ceil' if p[3] else 'floor'}" for p in POOLS])
@pytest.mark.parametrize("act", ["relu", "gelu"])
@pytest.mark.parametrize("mode", ["train", "train-no-grad", "inference"])
def test_matches_stock(path, mode, act, pool):
    training, grad = mode != "inference", mode == "train"
    leaves = _leaves(grad)
    running = (torch.randn(4, **F64), torch.rand(4, **F64) + 0.5)
    check_block_against_stock(lambda r: _ours(*leaves, r, training, act, pool),
                              lambda r: _stock(*leaves, r, training, act, pool), leaves, running, grad)


def test_launches_and_pooled_z():
    """Training: 3 forward launches, the conv writing only the pooled z (and its one-byte taps); the backward's
    4 launches (one weight-gradient split: no sum). Inference: one launch."""
    leaves = _leaves(True)
    pool = POOLS[0]
    triton_support.launch_counts.clear()
    out = _ours(*leaves, (None, None), True, "relu", pool)
    assert dict(triton_support.launch_counts) == {"conv_fwd_kernel": 1, "bn_stats_finalize_kernel": 1,
                                                  "bn_act_fwd_kernel": 1}
    triton_support.launch_counts.clear()
    out.sum().backward()
    assert sum(triton_support.launch_counts.values()) == 4
    args = [t.detach() for t in leaves]
    z_shape = out.shape
    _, z, _, pos = torch.ops.dlkern.conv_bn_train2d(args[0], args[1], None, args[2], args[3], None, None, None, None,
                                                    0.1, 1e-5, [1, 1], [1, 1, 1, 1], [1, 1], "relu", 0.0, 0.0, "none",
                                                    [2, 2, 2, 2, 0, 0, 0, 1], False)
    assert z.shape == pos.shape == z_shape and pos.dtype == torch.uint8
    full = F.conv2d(args[0], args[1], None, 1, 1)
    stock_pooled, idx = F.max_pool2d(full, 2, return_indices=True)
    assert_close(z, stock_pooled)
    assert torch.equal(pos, window_taps(idx, full.shape[3], (2, 2), (2, 2), (0, 0)))
    triton_support.launch_counts.clear()
    with torch.no_grad():
        _ours(*args, (torch.zeros(4, **F64), torch.ones(4, **F64)), False, "relu", pool)
    assert dict(triton_support.launch_counts) == {"conv_fwd_kernel": 1}


@pytest.mark.parametrize("training", [True, False])
def test_channels_last_and_ties(training):
    """A channels_last input (the output stays channels_last) whose conv output ties within windows (a constant
    input): the gradient goes to the first maximum of each window, as ATen's max pool's."""
    x, w, gamma, beta = _leaves(True, shape=(2, 3, 6, 6))
    with torch.no_grad():
        x = torch.ones_like(x).contiguous(memory_format=torch.channels_last).requires_grad_()
    leaves = [x, w, gamma, beta]
    running = (torch.randn(4, **F64), torch.rand(4, **F64) + 0.5)
    with torch.set_grad_enabled(training):  # (eval: inference; eval with autograd is not fused, see below)
        ours = _ours(*leaves, [t.clone() for t in running], training, "relu", POOLS[0])
        stock = _stock(*leaves, running, training, "relu", POOLS[0])
    assert ours.is_contiguous(memory_format=torch.channels_last)
    if training:
        assert_outputs_and_grads_close(ours, stock, leaves)
    else:
        assert_close(ours, stock)


def test_eval_with_autograd_is_not_fused():
    """BatchNorm cannot fold into the conv ahead of a pool (a negative scale swaps the maximum): eval with
    autograd returns None and the caller computes the block unfused."""
    leaves = _leaves(True)
    running = (torch.zeros(4, **F64), torch.ones(4, **F64))
    assert conv_bn_block(*leaves[:2], None, *running, *leaves[2:], None, False, 0.1, 1e-5, 1, 1, 1, "relu", (),
                         pool=POOLS[0], pool_before_bn=True) is None


def test_torch_compile_fullgraph():
    leaves = _leaves(True)

    def block(x, w, gamma, beta):
        return _ours(x, w, gamma, beta, (None, None), True, "gelu", POOLS[1])

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    triton_support.launch_counts.clear()
    ours = compiled(*leaves)
    assert triton_support.launch_counts["conv_fwd_kernel"] == 1
    stock = _stock(*leaves, (None, None), True, "gelu", POOLS[1])
    assert_outputs_and_grads_close(ours, stock, leaves)
