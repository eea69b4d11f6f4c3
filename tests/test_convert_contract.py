"""The contract a model converted by dlkern.convert keeps where its sites sit in an nn.Sequential: the module tree
the user built (names, classes, named_parameters, get_parameter), a module assigned at a stock index computed
(fused where it still fuses, one by one where not), children appended, inserted or deleted, slices, hooks,
deepcopy / pickle / torch.save (a fresh process too), converting twice, train/eval switching; each against the
stock model in float64 (outputs, every gradient, running statistics).

The fused op runs its PyTorch composite here (fast); test_interpreter_* run Triton's interpreter."""

import copy
import os
import pickle
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dlkern
from dlkern import convert_forward, convert_graph
from dlkern.models import MnistCNN
from dlkern.ops import triton_support
from helpers import assert_close
from test_convert import check_same_function, check_state_dicts_cross, check_state_dicts_equal, randomize_bn
from test_convert_graph import Loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def composite(request, monkeypatch):
    """The fused op's PyTorch composite, except in test_interpreter_* (Triton's interpreter)."""
    if not request.node.name.startswith("test_interpreter"):
        monkeypatch.setattr(triton_support, "_composite_forced", True)


@pytest.fixture
def fused_calls(monkeypatch):
    """The number of fused calls (sites run as one op) since the fixture was made, as a one-element list."""
    count, original = [0], convert_graph.fused_forward

    def counted(*args, **kwargs):
        count[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(convert_graph, "fused_forward", counted)
    return count


def stages():
    """conv -> BN -> ReLU -> max pool, conv -> BN -> ReLU, then a conv -> BN at the end: three sites."""
    torch.manual_seed(0)
    return randomize_bn(nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 3, 1), nn.BatchNorm2d(3),
    )).double()


X = torch.randn(2, 2, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def run_eval(model, x=X):
    with torch.no_grad():
        return model.eval()(x)


def test_names_are_the_stock_ones():
    """named_parameters (names and order), get_parameter, parameter groups by name, state_dict both ways."""
    stock = stages()
    ours = dlkern.convert(stock)
    assert [(n, p.shape) for n, p in ours.named_parameters()] == [(n, p.shape) for n, p in stock.named_parameters()]
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in stock.named_buffers()]
    assert [n for n, _ in ours.named_modules()] == [n for n, _ in stock.named_modules()]
    assert ours.get_parameter("0.weight") is ours[0].weight and ours.get_submodule("5") is ours[5]
    assert ours.get_buffer("1.running_mean") is ours[1].running_mean
    # Weight decay on conv weights only, chosen by name: the same parameters as in the stock model.
    decay = [n for n, p in ours.named_parameters() if p.ndim == 4]
    assert decay == ["0.weight", "4.weight", "7.weight"]
    assert list(ours.state_dict()) == list(stock.state_dict())
    assert ours.state_dict()._metadata == stock.state_dict()._metadata
    check_state_dicts_cross(stock, ours)


def test_mnist_cnn_names():
    torch.manual_seed(0)
    ours = MnistCNN(backend="dlkern")
    torch.manual_seed(0)
    ref = MnistCNN(backend="torch")
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert [type(m) for m in ours.mymodel] == [type(m) for m in ref.mymodel]
    assert ours.get_parameter("mymodel.4.weight") is ours.mymodel[4].weight
    assert [site.block for site in ours.dlkern_report.fused] == ["Sequential.forward of mymodel"] * 3
    assert all(site.pooled for site in ours.dlkern_report.fused)


def test_tree_and_report(fused_calls):
    stock = stages()
    ours = dlkern.convert(stock)
    report = ours.dlkern_report
    assert report.fused == [("0", "1", "2", "3"), ("4", "5", "6"), ("7", "8")]
    assert {site.block for site in report.fused} == {"Sequential.forward of the model"}
    assert report.fused[2].note == "conv -> BatchNorm fused; the forward returns it"
    assert report.replaced == [] and report.skipped == [] and report.unfused == []
    assert isinstance(ours, nn.Sequential) and type(ours).__name__ == "Sequential" and repr(ours) == repr(stock)
    assert [type(m) for m in ours] == [type(m) for m in stock] and len(ours) == len(stock)
    check_same_function(stock, ours, X)
    assert fused_calls[0] == 2 * 3  # train and eval, three sites each


class Scale(nn.Module):
    def forward(self, x):
        return x * 2


REPLACEMENTS = [  # (index, the new module, whether the site still runs fused)
    (2, nn.Tanh(), True), (2, nn.GELU(approximate="tanh"), True), (2, nn.LeakyReLU(0.3), True),
    (2, Scale(), False), (2, nn.PReLU(3, 0.1), False), (2, nn.Identity(), False),
    (1, nn.Identity(), False), (1, nn.BatchNorm2d(3, momentum=0.5), True),
    (0, nn.Conv2d(2, 3, 5, padding=2), True), (0, nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), False),
    (3, nn.AvgPool2d(2), False), (3, nn.MaxPool2d(3, 2, padding=1), True), (3, Scale(), False),
    (6, nn.Sigmoid(), True), (8, nn.Identity(), False),
]


@pytest.mark.parametrize("index,module,fused", REPLACEMENTS,
                         ids=[f"{i}-{type(m).__name__}" for i, m, _ in REPLACEMENTS])
def test_assigning_at_a_stock_index(index, module, fused, fused_calls):
    """seq[i] = module after conversion: the model computes the stock model with the same assignment (the site
    reads its modules on every call: fused where they still fuse, one by one where not)."""
    stock = stages()
    ours = dlkern.convert(stock)
    torch.manual_seed(2)
    stock[index] = randomize_bn(module.double())
    ours[index] = copy.deepcopy(stock[index])
    assert type(ours[index]) is type(module) and len(ours) == len(stock)
    check_same_function(stock, ours, X)
    assert fused_calls[0] == 2 * (3 if fused else 2)
    check_state_dicts_cross(stock, ours)


def test_growing_and_shrinking(fused_calls):
    """append, insert, extend, +=, del and pop after conversion: while the children are not the ones traced
    (names in order), nn.Sequential.forward runs (unfused); back to them, the fused forward; converting again fuses
    the new layout."""
    stock = stages()
    ours = dlkern.convert(stock)
    changes = [lambda s: s.append(nn.Sigmoid()), lambda s: s.__delitem__(-1),
               lambda s: s.insert(0, Scale()), lambda s: s.pop(0),
               lambda s: s.extend([nn.Conv2d(3, 3, 1).double(), nn.BatchNorm2d(3).double(), nn.ReLU()]),
               lambda s: s.__delitem__(slice(-3, None)), lambda s: s.__iadd__(nn.Sequential(nn.Tanh()))]
    fused_now = [False, True, False, True, False, True, False]
    for change, fused in zip(changes, fused_now, strict=True):
        torch.manual_seed(3)
        change(stock)
        torch.manual_seed(3)
        change(ours)
        ours.load_state_dict(stock.state_dict())
        assert [type(m) for m in ours] == [type(m) for m in stock]
        before = fused_calls[0]
        check_same_function(stock, ours, X)
        assert fused_calls[0] - before == (6 if fused else 0)
    # Now [stages..., Tanh]; with a ReLU inserted before the Tanh, converting again fuses the last run with it.
    stock.insert(9, nn.ReLU())
    ours.insert(9, nn.ReLU())
    again = dlkern.convert(ours, inplace=True)
    assert again.dlkern_report.fused == [("0", "1", "2", "3"), ("4", "5", "6"), ("7", "8", "9")]
    assert again.dlkern_report.replaced == [("10", "Tanh", "Tanh")]  # standalone: its twin
    assert [type(m) for m in again][:10] == [type(m) for m in stock][:10]
    before = fused_calls[0]
    check_same_function(stock, again, X)
    assert fused_calls[0] - before == 6


def test_pool_before_batchnorm(fused_calls):
    """Conv -> MaxPool -> BN -> GELU (fast CIFAR-10 nets) in a Sequential: one site, the pool inside the conv's
    epilogue; a module assigned at any of its indices is computed there."""
    torch.manual_seed(7)
    stock = randomize_bn(nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.MaxPool2d(2), nn.BatchNorm2d(3), nn.GELU(),
                                       nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))).double()
    ours = dlkern.convert(stock)
    assert ours.dlkern_report.fused == [("0", "1", "2", "3"), ("4", "5")]
    assert ours.dlkern_report.fused[0].pool_before_bn and [type(m) for m in ours] == [type(m) for m in stock]
    check_same_function(stock, ours, X)
    assert fused_calls[0] == 4
    for index, module in ((1, nn.AvgPool2d(2)), (1, nn.MaxPool2d(2, 1)), (3, nn.Tanh()), (2, nn.Identity())):
        stock[index], ours[index] = module, copy.deepcopy(module)
        check_same_function(stock, ours, X)
        check_state_dicts_equal(stock, ours)


def test_one_module_at_two_indices():
    """The same ReLU object at two indices: each index is its own place (the site after the second conv names
    it by its second index), and assigning at one of them changes that one only."""
    torch.manual_seed(4)
    relu = nn.ReLU()
    stock = randomize_bn(nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), relu,
                                       nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3), relu, relu)).double()
    ours = dlkern.convert(stock)
    assert ours.dlkern_report.fused == [("0", "1", "2"), ("3", "4", "5")]
    assert ours[2] is ours[5] and type(ours[2]) is nn.ReLU  # both absorbed: the stock object, still shared
    assert type(ours[6]) is dlkern.nn.ReLU  # standalone: its twin
    check_same_function(stock, ours, X)
    stock[5], ours[5] = nn.Tanh(), nn.Tanh()
    check_same_function(stock, ours, X)


def test_slices_are_stock_sequentials(fused_calls):
    stock = stages()
    ours = dlkern.convert(stock)
    for piece in (slice(0, 3), slice(0, 4), slice(2, 7), slice(4, None), slice(None), slice(None, None, 2)):
        sliced = ours[piece]
        assert type(sliced) is nn.Sequential and list(sliced) == list(ours)[piece], piece
        assert list(sliced.state_dict()) == list(stock[piece].state_dict())
        if piece.step is None:
            y = run_eval(stock[:piece.start]) if piece.start else X
            assert_close(run_eval(sliced, y), run_eval(stock[piece], y))
    assert fused_calls[0] == 0  # a slice computes the stock layers one by one


def test_hooks_run(fused_calls):
    """A hook registered after conversion on a conv, BatchNorm, activation or pool of a site (or a global module
    hook) runs, with the stock tensors: that site runs unfused, the others fused. Hooks on the Sequential run."""
    stock = stages()
    ours = dlkern.convert(stock)
    for index in (0, 1, 2, 3, 8):
        seen = {"stock": [], "ours": []}
        handles = [model[index].register_forward_hook(lambda m, i, o, tag=tag: seen[tag].append(o.clone()))
                   for tag, model in (("stock", stock), ("ours", ours))]
        before = fused_calls[0]
        check_same_function(stock, ours, X)
        assert fused_calls[0] - before == 2 * 2, index  # the hooked site's modules one by one
        assert len(seen["ours"]) == len(seen["stock"]) == 2
        for a, b in zip(seen["ours"], seen["stock"], strict=True):
            assert_close(a, b)
        for handle in handles:
            handle.remove()
    calls = []
    for model in (stock, ours):
        model.register_forward_pre_hook(lambda m, args: (args[0] * 2,))
        model.register_forward_hook(lambda m, args, out: calls.append(type(m).__name__))
    before = fused_calls[0]
    check_same_function(stock, ours, X)
    assert fused_calls[0] - before == 6 and calls == ["Sequential"] * 4
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, args, out: None)
    try:
        before = fused_calls[0]
        check_same_function(stock, ours, X)
        assert fused_calls[0] == before
    finally:
        handle.remove()


def test_train_eval_switching():
    stock = stages()
    ours = dlkern.convert(stock)
    check_same_function(stock, ours, X, steps=(True, False, True, True, False, True))
    for model in (stock, ours):  # a BatchNorm in eval inside a Sequential in training (frozen statistics)
        model.train()
        model[5].eval()
    check_same_function(stock, ours, X, steps=(None,))


def test_convert_twice_changes_nothing():
    stock = stages()
    ours = dlkern.convert(stock)
    twice = dlkern.convert(ours)
    assert type(twice) is type(ours) and [type(m) for m in twice.modules()] == [type(m) for m in ours.modules()]
    assert twice.dlkern_report.fused == ours.dlkern_report.fused
    assert [s.block for s in twice.dlkern_report.fused] == [s.block for s in ours.dlkern_report.fused]
    assert twice.dlkern_report.replaced == [] and twice.dlkern_report.skipped == []
    same = dlkern.convert(ours, inplace=True)
    assert same is ours and same.dlkern_report.fused == twice.dlkern_report.fused
    check_same_function(stock, twice, X)


def test_copies_and_pickles(monkeypatch, fused_calls):
    stock = stages()
    ours = dlkern.convert(stock)
    pickled = pickle.dumps(ours)
    monkeypatch.setattr(convert_forward, "_CLASSES", {})  # as in a new process: rebuilt from the pickled source
    for other in (copy.deepcopy(ours), pickle.loads(pickled)):
        assert isinstance(other, nn.Sequential) and hasattr(type(other), "_dlkern_spec")
        assert [n for n, _ in other.named_parameters()] == [n for n, _ in stock.named_parameters()]
        assert other.dlkern_report.fused == ours.dlkern_report.fused
        before = fused_calls[0]
        check_same_function(stages(), other, X)  # a fresh stock model for each (training moves the statistics)
        assert fused_calls[0] - before == 6


def test_interpreter_saved_model_in_a_fresh_process(tmp_path):
    """torch.save(model) of a converted model, torch.load in a new Python process that imports dlkern: it computes
    what the stock model computes (Triton's interpreter runs the kernels there)."""
    stock = stages()
    ours = dlkern.convert(stock)
    ours[6] = nn.Tanh()  # assigned after conversion: saved as it is
    stock[6] = nn.Tanh()
    torch.save(ours, tmp_path / "model.pt")
    torch.save(X, tmp_path / "x.pt")
    script = (
        "import sys, torch, dlkern\n"
        "from dlkern.convert_graph import fused_conv_bn\n"
        "model = torch.load(sys.argv[1] + '/model.pt', weights_only=False)\n"
        "assert type(model).__name__ == 'Sequential' and hasattr(type(model), '_dlkern_spec')\n"
        "x = torch.load(sys.argv[1] + '/x.pt')\n"
        "with torch.no_grad():\n"
        "    torch.save({'eval': model.eval()(x), 'train': model.train()(x), 'state': model.state_dict()},\n"
        "               sys.argv[1] + '/out.pt')\n"
    )
    env = dict(os.environ, TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET", "1"))
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt")
    with torch.no_grad():
        assert_close(out["eval"], stock.eval()(X))
        assert_close(out["train"], stock.train()(X))
    for key, value in stock.state_dict().items():
        torch.testing.assert_close(out["state"][key], value, rtol=1e-12, atol=1e-12)


def test_interpreter_assigned_activation():
    """seq[2] = nn.Tanh() runs conv -> BN -> tanh -> pool in dlkern's kernels (Triton's interpreter)."""
    stock = stages()
    ours = dlkern.convert(stock)
    stock[2], ours[2] = nn.Tanh(), nn.Tanh()
    triton_support.launch_counts.clear()
    check_same_function(stock, ours, X)
    assert triton_support.launch_counts["conv_fwd_kernel"] > 0


def test_none_child_is_reported():
    """A Sequential holding None (its forward would call None) is left as it is, with the reason."""
    seq = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3), None)
    ours = dlkern.convert(seq)
    assert ours.dlkern_report.fused == [] and type(ours) is nn.Sequential
    assert "child 2 is None" in dict(ours.dlkern_report.skipped)["0"]


def test_module_list_appended_after_conversion(fused_calls):
    """A forward looping over ModuleLists was traced with their lengths: one appended to runs the class's own
    forward (unfused), which loops over the new one too."""
    torch.manual_seed(5)
    stock = randomize_bn(Loop(channels=2, stages=2, act=F.relu)).double()
    ours = dlkern.convert(stock)
    check_same_function(stock, ours, X)
    assert fused_calls[0] == 4
    for model in (stock, ours):
        torch.manual_seed(6)
        model.convs.append(nn.Conv2d(2, 2, 1).double())
        model.bns.append(nn.BatchNorm2d(2).double())
    check_same_function(stock, ours, X)
    assert fused_calls[0] == 4
    assert dlkern.convert(ours, inplace=True).dlkern_report.sites == 3


def test_compile_fullgraph():
    stock = stages()
    ours = dlkern.convert(stock)
    compiled = torch.compile(ours, fullgraph=True, backend="eager")
    check_same_function(stock, ours, X, call=compiled)
