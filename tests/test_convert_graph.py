"""dlkern.convert on conv -> BatchNorm sites called from a module's own forward (dlkern.convert_forward): a
BasicBlock with a shared ReLU and a residual add, activations as modules, functions and tensor methods, Conv2d and
BatchNorm2d subclasses, forwards torch.fx cannot trace, hooks, the guards of the converted forward, and what users
keep: outputs, gradients and running statistics in train and eval (float64), state_dict keys both ways,
named_parameters, deepcopy / pickle / torch.save, converting twice, torch.compile(fullgraph=True).

The fused op runs its PyTorch composite here (fast); test_interpreter_runs_the_kernels runs Triton's interpreter."""

import copy
import io
import pickle

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import dlkern
from dlkern import convert_forward, convert_graph
from dlkern.ops import conv_block
from dlkern.ops import triton_support
from helpers import assert_close
from test_convert import check_same_function, check_state_dicts_cross, check_state_dicts_equal, randomize_bn


@pytest.fixture(autouse=True)
def composite(request, monkeypatch):
    """The fused op's PyTorch composite, except in test_interpreter_* (Triton's interpreter)."""
    if not request.node.name.startswith("test_interpreter"):
        monkeypatch.setattr(triton_support, "_composite_forced", True)


class FusedCalls:
    """Counts the fused op's calls (a site fused in a forward calls it once per run)."""

    def __init__(self, monkeypatch):
        self.count, original = 0, conv_block.conv_bn_block

        def counted(*args, **kwargs):
            self.count += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(conv_block, "conv_bn_block", counted)


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: one ReLU module used twice, a residual add, an optional downsample."""

    def __init__(self, c_in, c_out, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out, momentum=None)  # cumulative average: num_batches_tracked matters
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
        self.stride = stride

    def forward(self, x):
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class BasicConv2d(nn.Module):
    """GoogLeNet's / Inception's: conv, BatchNorm, then F.relu(inplace=True)."""

    def __init__(self, c_in, c_out, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x):
        x = self.conv(x)
        x = self.bn(x)
        return F.relu(x, inplace=True)


class Net(nn.Module):
    """A stem (conv -> BN -> relu method -> max pool), BasicConv2d, then two BasicBlocks."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.maxpool = nn.MaxPool2d(2, 2, 1)  # windows that do not overlap: it joins the stem's site
        self.branch = BasicConv2d(4, 4, kernel_size=1)
        self.layer = nn.Sequential(BasicBlock(4, 6, stride=2), BasicBlock(6, 6))

    def forward(self, x):
        x = self.maxpool(self.bn1(self.conv1(x)).relu())
        return self.layer(self.branch(x) + x)


def net():
    torch.manual_seed(0)
    return randomize_bn(Net()).double()


def test_resnet_like():
    stock = net()
    ours = dlkern.convert(stock)
    report = ours.dlkern_report
    assert report.fused == [  # in the order of named_modules()
        ("conv1", "bn1", "Tensor.relu()", "maxpool"),
        ("branch.conv", "branch.bn", "relu(inplace=True)"),
        ("layer.0.conv1", "layer.0.bn1", "layer.0.relu"), ("layer.0.conv2", "layer.0.bn2", "layer.0.relu"),
        ("layer.0.downsample.0", "layer.0.downsample.1"),
        ("layer.1.conv1", "layer.1.bn1", "layer.1.relu"), ("layer.1.conv2", "layer.1.bn2", "layer.1.relu"),
    ]
    assert report.sites == 7 and report.unfused == [] and report.skipped == []
    blocks = {site[0]: site for site in report.fused}
    assert blocks["conv1"].block == "Net.forward of the model" and blocks["conv1"].pooled
    assert blocks["layer.1.conv1"].block == "BasicBlock.forward of layer.1"
    assert blocks["layer.1.conv2"].activation == "relu" and blocks["layer.1.conv2"].note == ""
    assert blocks["layer.1.conv2"].residual == "before_act" and blocks["layer.1.conv1"].residual == "none"
    assert blocks["branch.conv"].activation == "relu"
    assert blocks["layer.0.downsample.0"].block == "Sequential.forward of layer.0.downsample"
    assert "conv1 + bn1 + Tensor.relu() + maxpool into Net.forward of the model (relu, pooled)" in str(report)
    # Nothing moved: the same modules and names, classes that are still the stock ones for isinstance and repr.
    assert type(ours.layer[1].conv1) is nn.Conv2d and type(ours.layer[1].relu) is dlkern.nn.ReLU
    assert isinstance(ours.layer[1], BasicBlock) and type(ours.layer[1]) is not BasicBlock
    assert type(ours.layer[1]).__name__ == "BasicBlock" and repr(ours.branch) == repr(stock.branch)
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    check_same_function(stock, ours, x)
    check_state_dicts_cross(stock, ours)


def test_names_and_order_of_parameters():
    """Where nothing sits in a Sequential, named_parameters() (names and order), named_buffers() and
    state_dict() are exactly the stock model's, so optimizer state and parameter groups cross."""
    torch.manual_seed(1)
    stock = randomize_bn(BasicBlock(4, 4)).double()
    ours = dlkern.convert(stock)
    assert len(ours.dlkern_report.fused) == 2
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in stock.named_parameters()]
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in stock.named_buffers()]
    assert list(ours.state_dict()) == list(stock.state_dict())
    assert ours.state_dict()._metadata == stock.state_dict()._metadata
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (stock, ours)]
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    for _ in range(2):
        for model, opt in zip((stock, ours), opts):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    ours.load_state_dict(stock.state_dict(), strict=True)
    opts[1].load_state_dict(opts[0].state_dict())
    check_same_function(stock, ours, x)
    params = list(stock.parameters())
    assert dlkern.convert(stock, inplace=True) is stock  # in place: the very Parameters (an optimizer keeps them)
    assert all(a is b for a, b in zip(params, stock.parameters(), strict=True))


def test_shared_block():
    """One block object called twice (and held twice) is converted once and stays shared."""
    torch.manual_seed(16)
    block = BasicBlock(3, 3)
    stock = randomize_bn(nn.Sequential(block, nn.Sequential(block), BasicConv2d(3, 3, kernel_size=1))).double()
    ours = dlkern.convert(stock)
    assert ours[0] is ours[1][0] and isinstance(ours[0], BasicBlock) and type(ours[0]) is not BasicBlock
    assert [site[0] for site in ours.dlkern_report.fused] == ["0.conv1", "0.conv2", "2.conv"]
    check_same_function(stock, ours, torch.randn(2, 3, 5, 5, dtype=torch.float64))


class Act(nn.Module):
    """conv -> BatchNorm -> `fn` (a function or a method call on the BatchNorm's output)."""

    def __init__(self, fn):
        super().__init__()
        self.conv, self.bn, self.fn = nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), fn

    def forward(self, x):
        return self.fn(self.bn(self.conv(x)))


ACTIVATIONS = [  # (the call, the catalog's name)
    (lambda y: F.relu(y, inplace=True), "relu"), (torch.relu, "relu"), (lambda y: y.relu(), "relu"),
    (lambda y: y.relu_(), "relu"), (torch.relu_, "relu"), (F.relu6, "hardtanh"),
    (lambda y: F.gelu(y, approximate="tanh"), "gelu_tanh"), (F.gelu, "gelu"), (F.silu, "silu"),
    (lambda y: F.leaky_relu(y, 0.2), "leaky_relu"), (lambda y: F.elu(y, alpha=0.5), "elu"),
    (torch.sigmoid, "sigmoid"), (lambda y: y.tanh(), "tanh"), (torch.tanh, "tanh"),
    (lambda y: F.hardtanh(y, -0.5, max_val=0.5), "hardtanh"), (F.hardsigmoid, "hardsigmoid"),
    (lambda y: F.softplus(y, beta=2.0), "softplus"), (nn.SiLU(), "silu"), (nn.ReLU6(inplace=True), "hardtanh"),
    (nn.GELU("tanh"), "gelu_tanh"),
]


@pytest.mark.parametrize("fn,name", ACTIVATIONS, ids=[name for _, name in ACTIVATIONS])
def test_activation_forms(fn, name):
    torch.manual_seed(2)
    stock = randomize_bn(Act(fn)).double()
    ours = dlkern.convert(stock)
    (site,) = ours.dlkern_report.fused
    assert site.activation == name and len(site) == 3 and site.note == ""
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    if name != "hardsigmoid":
        check_same_function(stock, ours, x)
        return
    # ATen's float64 hardsigmoid backward multiplies by 1.0f / 6.0f (float32: a relative error of 3e-8), which
    # dlkern's backward does not: the input gradients agree to that.
    for training in (True, False):
        xs, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_s, out_o = stock.train(training)(xs), ours.train(training)(xo)
        assert_close(out_o, out_s)
        out_s.sum().backward(), out_o.sum().backward()
        assert_close(xo.grad, xs.grad, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("fn,why", [
    (nn.PReLU(3), "learnable"), (lambda y: y * 2, "followed by mul"), (lambda y: y.clamp(0, 1), "Tensor.clamp"),
    (lambda y: F.relu(y) + y, "used 2 times"), (lambda y: y + 1, "not a residual"),
    (lambda y: F.gelu(y) + 1, "gelu"),  # fused; the add after it stays
])
def test_what_follows_stays_stock(fn, why):
    torch.manual_seed(3)
    stock = randomize_bn(Act(fn)).double()
    ours = dlkern.convert(stock)
    (site,) = ours.dlkern_report.fused
    if why == "gelu":
        assert site.activation == "gelu"
    else:
        assert site.activation == "none" and why in site.note and site.note.startswith("conv -> BatchNorm fused;")
    check_same_function(stock, ours, torch.randn(2, 2, 5, 5, dtype=torch.float64))


class DefaultsConv(nn.Conv2d):
    """Changes only defaults and initialization: the stock op."""

    def __init__(self, c_in, c_out):
        super().__init__(c_in, c_out, 3, padding=1, bias=False)

    def reset_parameters(self):
        nn.init.normal_(self.weight, std=0.1)


class ScaledConv(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) * 2


class ShiftedBN(nn.BatchNorm2d):
    def forward(self, x):
        return super().forward(x) + 1


class Pair(nn.Module):
    def __init__(self, conv, bn):
        super().__init__()
        self.conv, self.bn, self.act = conv, bn, nn.ReLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


def test_subclasses():
    torch.manual_seed(4)
    stock = nn.Sequential(Pair(DefaultsConv(2, 3), nn.BatchNorm2d(3)), Pair(ScaledConv(3, 3, 1), nn.BatchNorm2d(3)),
                          Pair(nn.Conv2d(3, 3, 1), ShiftedBN(3)), DefaultsConv(3, 2), nn.BatchNorm2d(2), nn.SiLU())
    stock = randomize_bn(stock).double()
    ours = dlkern.convert(stock)
    report = ours.dlkern_report
    assert report.fused == [("0.conv", "0.bn", "0.act"), ("3", "4", "5")]  # in the model's order
    assert type(ours[3]) is DefaultsConv and type(ours[5]) is nn.SiLU  # the module tree as built
    assert report.fused[1].block == "Sequential.forward of the model"
    unfused = {conv: why for conv, _, why in report.unfused}
    assert "ScaledConv overrides Conv2d.forward" in unfused["1.conv"]
    assert "ShiftedBN overrides BatchNorm2d.forward" in unfused["2.conv"]
    assert type(ours[1]) is Pair and type(ours[2]) is Pair  # nothing to fuse: the class stays
    check_same_function(stock, ours, torch.randn(2, 2, 5, 5, dtype=torch.float64))


class DataDependent(nn.Module):
    """Control flow on a tensor's value: torch.fx cannot trace it; its Sequential child is still converted."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)
        self.body = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU())

    def forward(self, x):
        if x.sum() > 0:
            x = -x
        return self.body(self.bn(self.conv(x)))


def test_untraceable_forward_is_reported():
    torch.manual_seed(5)
    stock = randomize_bn(DataDependent()).double()
    ours = dlkern.convert(stock)
    report = ours.dlkern_report
    assert report.fused == [("body.0", "body.1", "body.2")]
    why = dict(report.skipped)["conv"]
    assert "torch.fx cannot trace DataDependent.forward" in why and "TraceError" in why
    assert type(ours) is DataDependent and type(ours.body[0]) is nn.Conv2d
    check_same_function(stock, ours, torch.randn(2, 2, 4, 4, dtype=torch.float64))


class Branchy(nn.Module):
    """Reads self.training, a flag and an optional argument; shares a conv output; pools before a BatchNorm (fused:
    the pool in the conv's epilogue)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.conv2, self.bn2 = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)
        self.conv3, self.pool, self.bn3 = nn.Conv2d(3, 3, 1), nn.MaxPool2d(2), nn.BatchNorm2d(3)
        self.scale = 1.0

    def forward(self, x, shift=None):
        y = F.silu(self.bn1(self.conv1(x)))
        if self.training:
            y = y * 0.5
        z = self.conv2(y)
        y = self.bn2(z) + z * self.scale  # the conv's output has two users: not fused
        if shift is not None:
            y = y + shift
        return F.relu(self.bn3(self.pool(self.conv3(y))))


def test_guards_and_what_is_not_fused(monkeypatch):
    torch.manual_seed(6)
    stock = randomize_bn(Branchy()).double()
    ours = dlkern.convert(stock)
    report = ours.dlkern_report
    assert report.fused == [("conv1", "bn1", "silu(inplace=False)"), ("conv3", "pool", "bn3", "relu(inplace=False)")]
    assert report.fused[1].pool_before_bn and report.fused[1].pooled
    unfused = {conv: why for conv, _, why in report.unfused}
    assert "used 2 times" in unfused["conv2"] and list(unfused) == ["conv2"]
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    check_same_function(stock, ours, x)  # both modes: traced twice (forward reads self.training)
    calls = FusedCalls(monkeypatch)
    for model in (stock, ours):
        model.eval()
        model.scale = 3.0  # a plain attribute changed after conversion: the class's own forward runs
    with torch.no_grad():
        assert_close(ours(x), stock(x))
        assert calls.count == 0
        assert_close(ours(x, torch.ones(())), stock(x, torch.ones(())))  # an optional argument: stock
        assert calls.count == 0
        ours.scale = stock.scale = 1.0
        assert_close(ours(x), stock(x))
        assert calls.count == 2  # the two fused sites


def test_downsample_set_after_conversion():
    """A child that was None at conversion and is a module now: the converted forward would skip it, so the
    class's own forward runs."""
    torch.manual_seed(7)
    stock = randomize_bn(BasicBlock(3, 3)).double()
    ours = dlkern.convert(stock)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    for model in (stock, ours):
        model.downsample = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)).double()
    ours.downsample.load_state_dict(stock.downsample.state_dict())
    check_same_function(stock, ours, x)


def test_hooks(monkeypatch):
    """A hook at conversion leaves its site unfused; one registered later (on a module of a fused site, or a
    global module hook) runs: that site then calls the modules one by one."""
    torch.manual_seed(8)
    stock = randomize_bn(BasicBlock(3, 3)).double()
    stock.conv2.register_forward_pre_hook(lambda m, args: (args[0] * 2,))
    ours = dlkern.convert(stock)
    report = ours.dlkern_report
    assert report.fused == [("conv1", "bn1", "relu")] and "hook" in report.unfused[0][2]
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    check_same_function(stock, ours, x)
    seen = {"stock": [], "ours": []}
    for tag, model in (("stock", stock), ("ours", ours)):
        model.bn1.register_forward_hook(lambda m, args, out, tag=tag: seen[tag].append(out.clone()))
    check_same_function(stock, ours, x)
    assert len(seen["ours"]) == len(seen["stock"]) == 2
    for a, b in zip(seen["ours"], seen["stock"]):
        assert_close(a, b)
    calls = FusedCalls(monkeypatch)
    count = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, args, out: count.append(type(m)))
    with torch.no_grad():
        ours(x)
    handle.remove()
    assert calls.count == 0 and count.count(nn.Conv2d) == 2


def test_module_replaced_after_conversion():
    """A module of a fused site replaced later (BatchNorm folded away, say): the site calls what is there now."""
    torch.manual_seed(9)
    stock = randomize_bn(BasicBlock(3, 3)).double()
    ours = dlkern.convert(stock)
    for model in (stock, ours):
        model.bn1 = nn.Identity()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    check_same_function(stock, ours, x)


class Loop(nn.Module):
    """Convs and BatchNorms in ModuleLists, called in a loop (test_convert_contract.py's too)."""

    def __init__(self, channels=3, stages=3, act=F.elu):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in range(stages))
        self.bns = nn.ModuleList(nn.BatchNorm2d(channels) for _ in range(stages))
        self.act = act

    def forward(self, x):
        for conv, bn in zip(self.convs, self.bns):
            x = self.act(bn(conv(x)))
        return x


def test_module_lists():
    torch.manual_seed(10)
    stock = randomize_bn(Loop()).double()
    ours = dlkern.convert(stock)
    assert ours.dlkern_report.fused == [(f"convs.{i}", f"bns.{i}", "elu(alpha=1.0, inplace=False)")
                                        for i in range(3)]
    check_same_function(stock, ours, torch.randn(2, 3, 4, 4, dtype=torch.float64))


def test_copies_pickles_and_saves(monkeypatch):
    stock = net()
    ours = dlkern.convert(stock)
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    buffer = io.BytesIO()
    torch.save(ours, buffer)
    pickled = pickle.dumps(ours)
    # A new process has no converted classes yet: they are rebuilt from the pickled source.
    monkeypatch.setattr(convert_forward, "_CLASSES", {})
    copies = [copy.deepcopy(ours), pickle.loads(pickled),
              torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)]
    calls = FusedCalls(monkeypatch)
    for other in copies:
        assert isinstance(other.layer[0], BasicBlock) and type(other.layer[0]) is not BasicBlock
        assert list(other.state_dict()) == list(stock.state_dict())
        assert other.dlkern_report.fused == ours.dlkern_report.fused
        check_same_function(stock, other, x, steps=(False,))
        other.load_state_dict(stock.state_dict())
    assert calls.count == 3 * len(ours.dlkern_report.fused)


def test_convert_twice_changes_nothing():
    stock = net()
    ours = dlkern.convert(stock)
    classes = [type(m) for m in ours.modules()]
    twice = dlkern.convert(ours)
    assert [type(m) for m in twice.modules()] == classes
    assert twice.dlkern_report.fused == ours.dlkern_report.fused and twice.dlkern_report.replaced == []
    again = dlkern.convert(stock)
    assert type(again.layer[1]) is type(ours.layer[1])  # one cached class per (class, traced forward)
    check_same_function(stock, twice, torch.randn(2, 3, 9, 9, dtype=torch.float64))


def test_graph_module():
    """A torch.fx GraphModule's graph is rewritten in place (and recompiled)."""
    torch.manual_seed(11)
    stock = randomize_bn(BasicBlock(3, 3)).double()
    traced = fx.symbolic_trace(stock)
    ours = dlkern.convert(traced)
    assert ours.dlkern_report.fused == [("conv1", "bn1", "relu"), ("conv2", "bn2", "relu")]
    assert ours.dlkern_report.fused[1].residual == "before_act"
    assert "dlkern_convert_graph_fused_conv_bn" in ours.code
    check_same_function(stock, ours, torch.randn(2, 3, 5, 5, dtype=torch.float64))
    assert dlkern.convert(ours).dlkern_report.fused == ours.dlkern_report.fused  # listed again, nothing changed
    loaded = pickle.loads(pickle.dumps(ours))
    assert "dlkern_convert_graph_fused_conv_bn" in loaded.code


def test_traced_again_by_torch_fx():
    """The fused call is a torch.fx leaf (torch.fx.wrap): tracing a converted block keeps it."""

    class Tracer(fx.Tracer):
        def is_leaf_module(self, m, qualname):
            return super().is_leaf_module(m, qualname) or type(m).__module__.startswith("dlkern")

    torch.manual_seed(12)
    stock = randomize_bn(BasicBlock(3, 3)).double()
    ours = dlkern.convert(stock)
    graph = Tracer().trace(ours)
    targets = [n.target for n in graph.nodes if n.op == "call_function"]
    assert targets.count(convert_graph.fused_conv_bn) == 2
    check_same_function(stock, fx.GraphModule(ours, graph), torch.randn(2, 3, 5, 5, dtype=torch.float64))


def test_compile_fullgraph():
    torch.manual_seed(13)
    stock = randomize_bn(BasicBlock(3, 4, stride=2)).double()
    ours = dlkern.convert(stock)
    compiled = torch.compile(ours, fullgraph=True, backend="eager")  # fullgraph: a graph break raises
    check_same_function(stock, ours, torch.randn(2, 3, 6, 6, dtype=torch.float64), call=compiled)


def test_jit_script_raises_trace_and_export_work():
    torch.manual_seed(14)
    stock = randomize_bn(BasicConv2d(2, 3, kernel_size=3)).double().eval()
    ours = dlkern.convert(stock)
    with pytest.raises(RuntimeError, match=r"BasicConv2d.forward was converted .* torch.jit.script is not supported"):
        torch.jit.script(ours)
    x, x2 = torch.randn(2, 2, 5, 5, dtype=torch.float64), torch.randn(2, 2, 5, 5, dtype=torch.float64)
    assert_close(torch.export.export(ours, (x,)).module()(x2), stock(x2))
    with torch.no_grad():
        assert_close(torch.jit.trace(ours, (x,))(x2), stock(x2))


def test_interpreter_runs_the_kernels():
    """The converted forward runs dlkern's Triton kernels (here in Triton's interpreter): tiny shapes."""
    torch.manual_seed(15)
    stock = randomize_bn(BasicBlock(2, 3, stride=2)).double()
    ours = dlkern.convert(stock)
    triton_support.launch_counts.clear()
    check_same_function(stock, ours, torch.randn(2, 2, 5, 5, dtype=torch.float64))
    assert triton_support.launch_counts["conv_fwd_kernel"] > 0
