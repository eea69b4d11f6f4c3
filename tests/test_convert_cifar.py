"""dlkern.convert on a fast CIFAR-10 trainer's net (the "airbench" style, written here): Conv2d and BatchNorm2d
subclasses that only change defaults and initialization (padding='same', no bias, BatchNorm's momentum and eps,
a frozen BatchNorm weight), Conv -> MaxPool -> BatchNorm -> GELU blocks (the pool inside the conv's epilogue),
Conv -> BatchNorm -> GELU, a whitening conv without BatchNorm, and a scaled linear head. Every conv -> BatchNorm
site is fused; the converted net computes the stock function in float64 in train and eval (outputs, every
gradient, the running statistics), converted several times in one process, through the PyTorch composite and,
once, Triton's interpreter."""

import copy

import pytest
import torch
from torch import nn

import dlkern
from dlkern.ops import triton_support
from helpers import assert_close


class Conv(nn.Conv2d):
    def __init__(self, c_in, c_out):
        super().__init__(c_in, c_out, kernel_size=3, padding="same", bias=False)

    def reset_parameters(self):
        super().reset_parameters()
        w = self.weight.data
        torch.nn.init.dirac_(w[:w.size(1)])


class BatchNorm(nn.BatchNorm2d):
    def __init__(self, num_features, momentum=0.6, eps=1e-12):
        super().__init__(num_features, eps=eps, momentum=1 - momentum)
        self.weight.requires_grad = False  # airbench trains BatchNorm's bias only


class ConvGroup(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv1 = Conv(c_in, c_out)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = BatchNorm(c_out)
        self.conv2 = Conv(c_out, c_out)
        self.norm2 = BatchNorm(c_out)
        self.activ = nn.GELU()

    def forward(self, x):
        x = self.conv1(x)
        x = self.pool(x)
        x = self.norm1(x)
        x = self.activ(x)
        x = self.conv2(x)
        x = self.norm2(x)
        x = self.activ(x)
        return x


class CifarNet(nn.Module):
    def __init__(self, widths=(4, 6, 8)):
        super().__init__()
        self.whiten = nn.Conv2d(3, 6, kernel_size=2, padding=0, bias=True)
        self.layers = nn.Sequential(nn.GELU(), ConvGroup(6, widths[0]), ConvGroup(widths[0], widths[1]),
                                    ConvGroup(widths[1], widths[2]), nn.MaxPool2d(2))
        self.head = nn.Linear(widths[2], 10, bias=False)

    def forward(self, x):
        x = self.layers(self.whiten(x))
        return self.head(x.flatten(1)) / 8


def _net():
    torch.manual_seed(0)
    net = CifarNet().double()
    with torch.no_grad():  # fresh statistics would make eval the identity
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(-1.0, 1.5)  # negative too: pooling after BatchNorm would differ
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return net


def _compare(stock, ours, x, training):
    stock, ours = copy.deepcopy(stock).train(training), copy.deepcopy(ours).train(training)
    xs, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_s, out_o = stock(xs), ours(xo)
    assert_close(out_o, out_s)
    g = torch.randn_like(out_s)
    out_s.backward(g)
    out_o.backward(g)
    assert_close(xo.grad, xs.grad, rtol=1e-9, atol=1e-9)
    for (name, p), (_, q) in zip(stock.named_parameters(), ours.named_parameters()):
        if p.requires_grad:
            assert_close(q.grad, p.grad, rtol=1e-9, atol=1e-9, msg=name)
    for (name, a), (_, b) in zip(stock.named_buffers(), ours.named_buffers()):
        assert torch.equal(a, b) if not a.is_floating_point() else torch.allclose(a, b, rtol=1e-12), name


def test_every_site_fused_and_the_stock_function(monkeypatch):
    monkeypatch.setattr(triton_support, "_composite_forced", True)
    stock = _net()
    x = torch.randn(2, 3, 17, 17, dtype=torch.float64)
    for _ in range(3):  # several conversions in one process
        ours = dlkern.convert(stock)
        report = ours.dlkern_report
        assert report.sites == 6 and len(report.fused) == 6 and report.unfused == []
        pooled = [site for site in report.fused if site.pool_before_bn]
        assert [tuple(s) for s in pooled] == [(f"layers.{i}.conv1", f"layers.{i}.pool", f"layers.{i}.norm1",
                                               f"layers.{i}.activ") for i in (1, 2, 3)]
        assert all(site.activation == "gelu" for site in report.fused)
        assert "(gelu, pooled before BatchNorm)" in str(report)
        assert [n for n, _ in ours.named_parameters()] == [n for n, _ in stock.named_parameters()]
        assert list(ours.state_dict()) == list(stock.state_dict())
        for training in (True, False):
            _compare(stock, ours, x, training)


@pytest.mark.parametrize("training", [True, False])
def test_interpreter_runs_the_kernels(training):
    """The same through Triton's interpreter: the pre-BatchNorm pool epilogue really runs (eval with autograd
    computes those sites unfused: BatchNorm does not fold across a max pool)."""
    stock = _net()
    ours = dlkern.convert(stock)
    triton_support.launch_counts.clear()
    _compare(stock, ours, torch.randn(2, 3, 17, 17, dtype=torch.float64), training)
    assert triton_support.launch_counts["conv_fwd_kernel"] == (6 if training else 3)
