"""The version-compatibility checks (README, "Supported versions"): what CI's compatibility stage runs on the oldest
supported pair (torch 2.11 + Triton 3.6, the GPU machine's stack) besides the launch-plan check and a sample of the
sm_90 compile check -- `make compat`, `pytest -m compat`. They run in the full suite too.

One forward and backward per op family against stock PyTorch (float64 references), through dlkern's public API,
with the Triton kernels in the interpreter on CPU (each test checks that they ran): the activations' elementwise
kernels, the channelwise (PReLU) backward, the C++ max pool, the fused conv block (training and eval), the fused
pool block. Then: the installed torch and Triton lie in the range dlkern declares, and the adaptations of
dlkern._compat hold on them."""

import importlib.metadata
import re

import pytest
import torch
import torch.nn.functional as TF
from torch import nn

import dlkern
import dlkern.functional as F
from dlkern import _compat
from dlkern.ops import conv_tiles, triton_support
from helpers import assert_close

pytestmark = pytest.mark.compat


def _ran(names, before):
    """The Triton kernels named launched since `before` (a copy of launch_counts) -- unless no Triton path runs
    on CPU tensors here (no interpreter: the composites compute, and are what is compared)."""
    if triton_support.cpu_runs_triton():
        for name in names:
            assert triton_support.launch_counts[name] > before[name], f"{name} did not run"


def test_activations_fwd_bwd():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    ref = x.detach().clone().requires_grad_()
    g = torch.randn_like(x)
    before = triton_support.launch_counts.copy()
    for ours, theirs in ((F.gelu, TF.gelu), (F.silu, TF.silu), (lambda t: F.elu(t, 0.5), lambda t: TF.elu(t, 0.5))):
        y, y_ref = ours(x), theirs(ref)
        assert_close(y, y_ref)
        (dx,), (dx_ref,) = torch.autograd.grad(y, x, g), torch.autograd.grad(y_ref, ref, g)
        assert_close(dx, dx_ref)
    _ran(["activation_fwd_kernel", "activation_bwd_kernel"], before)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_prelu_fwd_bwd(layout):
    """The channelwise backward: a loop over each split's range (runtime bounds: Triton 3.6's interpreter could
    not run it under numpy >= 2.4 without dlkern._compat's fix)."""
    torch.manual_seed(0)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(3, 4, 5, 6, dtype=torch.float64).contiguous(memory_format=fmt).requires_grad_()
    w = torch.rand(4, dtype=torch.float64, requires_grad=True)
    g = torch.randn_like(x)
    before = triton_support.launch_counts.copy()
    ours = torch.autograd.grad(F.prelu(x, w), (x, w), g)
    theirs = torch.autograd.grad(TF.prelu(x, w), (x, w), g)
    for a, b in zip(ours, theirs):
        assert_close(a, b)
    _ran(["channelwise_bwd_kernel"], before)


def test_max_pool_fwd_bwd():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, 8, dtype=torch.float64, requires_grad=True)
    y, idx = F.max_pool2d(x, 3, 2, 1, return_indices=True, ceil_mode=True)
    y_ref, idx_ref = TF.max_pool2d(x, 3, 2, 1, return_indices=True, ceil_mode=True)
    assert torch.equal(y, y_ref) and torch.equal(idx, idx_ref)
    g = torch.randn_like(y)
    assert torch.equal(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(y_ref, x, g)[0])


def _pair(block_type, **kw):
    torch.manual_seed(0)
    block = block_type(3, 4, 3, padding=1, **kw).double()
    with torch.no_grad():
        block[1].weight.uniform_(0.5, 1.5)
        block[1].bias.uniform_(-0.5, 0.5)
    stock = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          *([nn.MaxPool2d(2)] if block_type is dlkern.nn.ConvBNActPool2d else [])).double()
    stock.load_state_dict(block.state_dict(), strict=True)
    return block, stock


def _step(block, stock, x):
    """One forward and backward of both: output, input and parameter gradients, buffers."""
    xs = [x.detach().clone().requires_grad_() for _ in range(2)]
    outs = [m(t) for m, t in zip((block, stock), xs)]
    assert_close(outs[0], outs[1])
    g = torch.randn_like(outs[1])
    for out in outs:
        out.backward(g)
    assert_close(xs[0].grad, xs[1].grad)
    for (name, p), q in zip(block.named_parameters(), stock.parameters(), strict=True):
        if name == "0.bias" and block.training:  # before BatchNorm: dlkern's exact 0 against stock's rounding
            assert torch.all(p.grad == 0) and q.grad.abs().max() < 1e-12
        else:
            assert_close(p.grad, q.grad, msg=lambda m, name=name: f"{name}: {m}")
    for (name, a), b in zip(block.state_dict().items(), stock.state_dict().values(), strict=True):
        assert_close(a, b.to(a.dtype), msg=lambda m, name=name: f"{name}: {m}") if a.is_floating_point() else (
            torch.testing.assert_close(a, b))


@pytest.mark.parametrize("block_type", ["ConvBNReLU2d", "ConvBNActPool2d"])
def test_conv_blocks_fwd_bwd(block_type, monkeypatch):
    """The fused conv block and the pool block: a training step (batch statistics, running update, every
    gradient) and an eval step, as the stock Sequential computes them."""
    block, stock = _pair(getattr(dlkern.nn, block_type))
    # 64 rows a split: the weight gradient in several splits, summed by sum_splits_kernel
    monkeypatch.setattr(conv_tiles, "rows_per_split", lambda M, device, programs: 64)
    before = triton_support.launch_counts.copy()
    _step(block, stock, torch.randn(2, 3, 6, 6, dtype=torch.float64))
    forward = "bn_act_pool_fwd_kernel" if block_type == "ConvBNActPool2d" else "bn_act_fwd_kernel"
    _ran(["conv_fwd_kernel", "bn_stats_finalize_kernel", forward, "bn_act_bwd_reduce_kernel", "grad_z_kernel",
          "conv_bwd_input_kernel", "conv_bwd_weight_kernel", "sum_splits_kernel"], before)
    block.eval(), stock.eval()
    block.zero_grad(), stock.zero_grad()
    _step(block, stock, torch.randn(2, 3, 6, 6, dtype=torch.float64))


# ------------------------------------------------------------------------------------------ the supported range


def _declared():
    """{package: (lowest, highest excluded)} from dlkern's installed requirements (setup.py's install_requires)."""
    found = {}
    for req in importlib.metadata.requires("dlkern") or []:
        m = re.fullmatch(r"(torch|triton)\s*\(?\s*([<>=!~][^)]*)\)?", req.split(";")[0].strip())
        if m:
            specs = dict(re.fullmatch(r"(>=|<)\s*([\d.]+)", s.strip()).groups() for s in m[2].split(","))
            found[m[1]] = (specs[">="], specs["<"])
    return found


def _release(version):
    return tuple(int(p) for p in re.match(r"[\d.]+", version)[0].rstrip(".").split("."))


def test_installed_versions_are_in_the_declared_range():
    import triton

    declared = _declared()
    assert set(declared) == {"torch", "triton"}, importlib.metadata.requires("dlkern")
    for name, version in (("torch", torch.__version__), ("triton", triton.__version__)):
        low, high = declared[name]
        assert _release(low) <= _release(version) < _release(high), f"{name} {version} outside >={low},<{high}"


def test_launcher_call_is_the_plans():
    """dlkern's launch plans call the compiled kernel's launcher with what JITFunction.run passes it; on every
    supported Triton that call is the one they know (else plans are off, and tests/launch_plan_check.py fails)."""
    assert _compat.launcher_call() == _compat.LAUNCHER_CALL


def test_unknown_launcher_call_turns_plans_off(monkeypatch):
    """Where JITFunction.run calls the launcher otherwise, plans are off, with one warning naming both calls."""
    monkeypatch.setattr(_compat, "launcher_call", lambda: ("grid", "stream", "*args"))
    with pytest.warns(UserWarning, match="takes Triton's own path"):
        assert _compat.planned_launches_supported.__wrapped__() is False


@pytest.mark.skipif(not triton_support.cpu_runs_triton(), reason="needs TRITON_INTERPRET=1 (no GPU visible)")
def test_interpreter_runs_loops_with_runtime_bounds():
    """A range() over kernel arguments and program ids in the interpreter (Triton 3.6 under numpy >= 2.4 needs
    dlkern._compat's fix for it; 3.7 on do not)."""
    import triton
    import triton.language as tl

    @triton.jit
    def sums(x_ptr, out_ptr, n, chunk, BLOCK: tl.constexpr):
        start = tl.program_id(0) * chunk
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for k in range(start, tl.minimum(start + chunk, n), BLOCK):
            offs = k + tl.arange(0, BLOCK)
            acc += tl.load(x_ptr + offs, mask=offs < tl.minimum(start + chunk, n), other=0.0)
        tl.store(out_ptr + tl.program_id(0), tl.sum(acc))

    x = torch.arange(100, dtype=torch.float32)
    out = torch.empty(4)
    sums[(4,)](x, out, 100, 30, BLOCK=8)
    assert torch.equal(out, torch.stack([x[i * 30:(i + 1) * 30].sum() for i in range(4)]))
    assert not _compat.interpreter_index_broken()
