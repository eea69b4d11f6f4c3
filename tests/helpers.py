"""Shared test helpers: devices, dtypes, per-dtype tolerances, and state_dict round trips."""

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

# Every test that takes a device runs on CPU; the CUDA variant is marked and skipped, visibly, without a GPU.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]

FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

# Relative tolerance from each dtype's resolution (as FlagGems); atol covers values near zero.
TOLERANCES = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=1.3e-6, atol=1e-6),
    torch.float16: dict(rtol=1e-3, atol=1e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
}


def assert_close(actual, expected, dtype=None, **kw):
    """assert_close with dlkern's tolerance for `dtype` (default: actual's dtype); `expected` may be float64."""
    tol = dict(TOLERANCES[dtype or actual.dtype])
    tol.update(kw)
    torch.testing.assert_close(actual, expected.to(actual.dtype), **tol)


def assert_state_dicts_cross(block, stock):
    """A dlkern block and its stock Sequential have the same state_dict keys (conv and BatchNorm) and load each
    other's state_dicts with strict=True, values included."""
    assert list(block.state_dict()) == list(stock.state_dict()) == [
        "0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked"]
    stock[1].running_mean.fill_(0.25)
    block.load_state_dict(stock.state_dict(), strict=True)
    assert torch.equal(block[1].running_mean, stock[1].running_mean)
    block[0].weight.data.fill_(0.5)
    stock.load_state_dict(block.state_dict(), strict=True)
    assert torch.equal(stock[0].weight, block[0].weight)


def assert_outputs_and_grads_close(ours, stock, leaves, rtol=1e-10, atol=1e-10):
    """ours == stock (dlkern's tolerance for their dtype), and so are their gradients with respect to ``leaves``
    for one random output gradient (rtol/atol: the gradients', float64 by default)."""
    assert_close(ours, stock)
    g = torch.randn_like(stock)
    for a, b in zip(torch.autograd.grad(ours, leaves, g), torch.autograd.grad(stock, leaves, g), strict=True):
        assert_close(a, b, rtol=rtol, atol=atol)


def check_block_against_stock(ours, stock, leaves, running, grad):
    """ours(running) and stock(running) (functions of the BatchNorm buffers they update, called with copies of
    ``running`` and ``running`` itself), with autograd when ``grad``: outputs, gradients with respect to ``leaves``
    and the updated buffers agree."""
    ours_running = [t.clone() for t in running]
    with torch.set_grad_enabled(grad):
        out_ours, out_stock = ours(ours_running), stock(running)
    for a, b in zip(ours_running, running, strict=True):
        assert_close(a, b)
    if grad:
        assert_outputs_and_grads_close(out_ours, out_stock, leaves)
    else:
        assert_close(out_ours, out_stock)
