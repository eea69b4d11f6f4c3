"""Checks dlkern's launch plans (dlkern.ops.triton_support.launch) against Triton's own launch path.

Run as a script (tests/test_launch_plans.py does), never with TRITON_INTERPRET: plans exist only for compiled
kernels. Under bench/host_stub.py's stand-in driver every launch reaches a kernel whose ``run`` is recorded here,
so each planned launch can be compared, argument by argument, with the launch Triton itself made for the same
key. Exits 1 with a message on the first mismatch.
"""

import os
import sys

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run without TRITON_INTERPRET"
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import torch  # noqa: E402

import dlkern  # noqa: E402
import dlkern.functional as F  # noqa: E402
import host_stub  # noqa: E402
from dlkern.kernels import conv_bn as dlkern_kernels  # noqa: E402
from dlkern.ops import conv_tiles  # noqa: E402
from dlkern.ops import triton_support  # noqa: E402

calls = []
host_stub._Kernel.run = lambda self, *args: calls.append((self.name, args))
# The stand-in compile's kernel; Triton's own path passes these three, a plan passes None (no hooks set).
TRITON_ONLY = slice(6, 9)


def record(fn):
    """The launches fn() makes, as (kernel, grid + stream + function + metadata, arguments)."""
    calls.clear()
    fn()
    return [(name, args[:TRITON_ONLY.start], args[TRITON_ONLY.stop:]) for name, args in calls]


def describe(a):
    """A launch argument as comparable: a tensor by its dtype, shape, strides and alignment (outputs are new
    tensors each call), anything else by type and value."""
    if isinstance(a, torch.Tensor):
        return ("tensor", a.dtype, tuple(a.shape), a.stride(), a.data_ptr() % 16)
    return (type(a).__name__, a)


def check(label, fn):
    """fn's launches through Triton's path (plans dropped first) and through the plans they made: identical."""
    triton_support._plans.clear()
    first = record(fn)
    planned_before = len(triton_support._plans)
    again = record(fn)
    assert first, f"{label}: no launch recorded"
    assert planned_before == len(first) or planned_before == len({str(f) for f in first}), (label, planned_before)
    assert len(first) == len(again), f"{label}: {len(first)} launches, then {len(again)}"
    for (name, head, args), (name2, head2, args2) in zip(first, again):
        assert name == name2 and head == head2, f"{label}: {name} launched as {head}, then {name2} as {head2}"
        theirs, ours = [describe(a) for a in args], [describe(a) for a in args2]
        assert theirs == ours, f"{label}: {name}: Triton passed {theirs}, the plan {ours}"
    assert len(triton_support._plans) == planned_before, f"{label}: the second call built new plans"
    print(f"ok   {label}: {len(first)} launches planned")


def main():
    import triton

    from dlkern import _compat

    # Plans are off where the installed Triton's launcher call differs from theirs (every check below would fail).
    assert _compat.planned_launches_supported(), (
        f"triton {triton.__version__}: JITFunction.run calls the launcher as {_compat.launcher_call()}, "
        f"not {_compat.LAUNCHER_CALL}: dlkern's launch plans need adapting to it")
    torch.manual_seed(0)
    with host_stub.stand_in_gpu():
        x = torch.randn(2, 8, 5, 6, requires_grad=True)
        g = torch.randn_like(x)
        w = torch.rand(8, requires_grad=True)
        check("relu", lambda: F.relu(x.detach()))
        check("gelu fwd+bwd", lambda: torch.autograd.grad(F.gelu(x), x, g))
        check("prelu fwd+bwd", lambda: torch.autograd.grad(F.prelu(x, w), (x, w), g))
        check("strided softplus", lambda: F.softplus(x.detach().transpose(2, 3)[:, :, ::2]))
        block = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.BatchNorm2d(16))
        xc = torch.randn(2, 8, 6, 6, requires_grad=True)
        gz = torch.randn(2, 16, 6, 6)

        def conv_block():
            conv, bn = block
            y = F.conv_bn_act2d(xc, conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                training=True, padding=1)
            return torch.autograd.grad(y, (xc, conv.weight, conv.bias, bn.weight, bn.bias), gz)

        check("conv block train fwd+bwd", conv_block)

        def conv_eval():
            conv, bn = block
            with torch.no_grad():
                F.conv_bn_act2d(xc, conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                training=False, padding=1)

        check("conv block eval", conv_eval)

        pool_block = dlkern.nn.ConvBNActPool2d(8, 16, 3, padding=1)
        xp = torch.randn(2, 8, 6, 6, requires_grad=True)
        gp = torch.randn(2, 16, 3, 3)
        check("pool block train fwd+bwd", lambda: torch.autograd.grad(pool_block(xp), (xp, pool_block[0].weight), gp))

        def pool_eval():
            with torch.no_grad():
                pool_block.eval()(xp)
            pool_block.train()

        check("pool block eval", pool_eval)

        # A plan is per key: a 16-byte-misaligned input is a new plan (Triton specializes on alignment) ...
        triton_support._plans.clear()
        base = torch.randn(2 * 8 * 5 * 6 + 1)
        F.relu(base[:-1].view(2, 8, 5, 6))
        n = len(triton_support._plans)
        F.relu(base[1:].view(2, 8, 5, 6))
        assert len(triton_support._plans) == n + 1, "a misaligned input reused an aligned input's plan"
        # ... and so is a new dtype, or a size that changes an int argument.
        F.relu(base[:-1].view(2, 8, 5, 6).double())
        F.relu(torch.randn(3, 8, 5, 6))
        assert len(triton_support._plans) == n + 3, "a new dtype or size reused a plan"

        # The autotuner's choice is per key: with two keys tuned to different tiles, each plan keeps its own
        # (Autotuner.best_config holds only the last one tuned), and the statistics kernel reads the row tile
        # that the conv kernel of that call used.
        benchmarked = []

        def bench(self, *args, config, **meta):  # small M: BLOCK_M 64 is "fastest"; large M: 128
            rows = args[self.arg_names.index("M")]
            benchmarked.append(rows)
            return [float(config.kwargs["BLOCK_M"] if rows < 100 else -config.kwargs["BLOCK_M"])] * 3

        host_stub.autotuner.Autotuner._bench = bench
        conv_tiles.AUTOTUNE = True  # DLKERN_AUTOTUNE=1
        triton_support._plans.clear()
        conv, bn = torch.nn.Conv2d(1, 32, 3), torch.nn.BatchNorm2d(32)
        finalize = dlkern_kernels.bn_stats_finalize_kernel
        tile = finalize.arg_names.index("rows_per_tile")
        for inp, expected in ((torch.randn(2, 1, 8, 8), 64), (torch.randn(2, 1, 30, 30), 128),
                              (torch.randn(2, 1, 8, 8), 64), (torch.randn(4, 1, 20, 20), 128),
                              (torch.randn(5, 1, 20, 20), 128)):
            launches = record(lambda: F.conv_bn_act2d(inp, conv.weight, conv.bias, None, None, bn.weight, bn.bias,
                                                      training=True))
            tiles = [args[tile] for name, _, args in launches if name == "bn_stats_finalize_kernel"]
            assert tiles == [expected], f"input {list(inp.shape)}: statistics over row tiles {tiles}, not {expected}"
        # The key holds M rounded up to a power of two: a batch of 5 (M = 1620) reuses the tuning of the batch of
        # 4 (M = 1296), as an epoch's ragged last batch reuses the full batches'.
        assert 1620 not in benchmarked and 1296 in benchmarked, benchmarked
        print("ok   autotuned tiles per key, M bucketed")

        # Under a Triton whose launcher call the plans do not know (dlkern._compat), every launch takes Triton's
        # own path and no plan is kept.
        saved = triton_support.planned_launches_supported
        triton_support.planned_launches_supported = lambda: False
        try:
            triton_support._plans.clear()
            for _ in range(2):
                launches = record(lambda: torch.autograd.grad(F.gelu(x), x, g))
                assert len(launches) == 2 and not triton_support._plans, (launches, triton_support._plans)
        finally:
            triton_support.planned_launches_supported = saved
        print("ok   an unknown launcher call: Triton's own path, no plans")
    print("launch plans: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
