"""Shared test helpers: devices, dtypes and per-dtype tolerances."""

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
