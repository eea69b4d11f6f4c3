"""Kernel launches of a dlkern MnistCNN training step: how many, and no fill kernel in the backward.

Counted as bench/host.py counts them (each of dlkern's Triton launches, one per other op that launches a kernel
on a GPU), on the CPU under Triton's interpreter, where every Triton launch runs and is counted."""

import os
import sys

import torch
import torch.nn.functional as TF
from torch.utils._python_dispatch import TorchDispatchMode

from dlkern.models import MnistCNN
from dlkern.ops import conv_tiles, triton_support

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import host  # noqa: E402

# Per training step: each conv block (the max pool fused in) 3 launches forward (conv + statistics, their merge
# with the running update, normalize + activation + max pool) and 4 backward (reduction, dL/dz, input gradient,
# weight gradient), the weight gradient's split sum a fifth where it is split over the rows (block 1 here: 1568
# rows, over the interpreter's 512 a split), the input gradient none in block 1 (its input needs none); the
# head's ReLU 2.
DLKERN_TRITON = 3 * 3 + (5 - 1) + 4 + 4 + 2


class Record(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func._opname)
        return func(*args, **(kwargs or {}))


def test_training_step_launches_and_no_fills(monkeypatch):
    # The GPU's statistics merge: one pass up to 1024 row tiles (the interpreter's small tiles and threshold would
    # add a first level here).
    monkeypatch.setattr(conv_tiles, "MERGE_TILES", 1024)
    torch.manual_seed(0)
    model = MnistCNN(backend="dlkern").train()
    x, y = torch.randn(2, 1, 28, 28), torch.tensor([3, 7])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=True)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = TF.cross_entropy(model(x), y)
        seed = torch.ones_like(loss)  # the seed a plain loss.backward() fills: the user's, outside the backward
        with Record() as backward:
            torch.autograd.backward(loss, seed)
        opt.step()
        return backward.ops

    step()  # Adam's state is created on the first step
    before = triton_support.launch_counts.copy()
    launches, fills = host.count_launches(step)
    triton_launches = sum((triton_support.launch_counts - before).values())
    backward_ops = step()
    assert triton_launches == DLKERN_TRITON
    assert not set(backward_ops) & host.FILLS, sorted(set(backward_ops) & host.FILLS)
    assert fills == 1  # the seed, ones_like, taken outside the backward
    # dlkern's 25 Triton launches (no separate max pool), the head's and loss's 13 ATen ops, foreach Adam's 7.
    assert launches == DLKERN_TRITON + 13 + 7, launches
