"""dlkern.convert on models it was not written for: the same function in train and eval mode, the stock module
tree (names, classes, named_parameters), state_dicts both ways with strict=True, and a report of what was and was
not converted. float64, tiny shapes; the fused op runs in Triton's interpreter here (tests/test_convert_contract.py
checks the rest of the contract on the op's PyTorch composite)."""

import copy
import io
import logging

import pytest
import torch
from torch import nn

import dlkern
from dlkern.nn import ConvBNActPool2d, ConvBNReLU2d
from helpers import assert_close


def cbr(c_in, c_out, act, **kw):
    return [nn.Conv2d(c_in, c_out, 3, padding=1, **kw), nn.BatchNorm2d(c_out), act]


class VGGish(nn.Module):
    """Blocks with GELU, SiLU and ELU, a nested Sequential, and a head with its own activations."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            *cbr(3, 8, nn.GELU()), *cbr(8, 8, nn.SiLU()), nn.MaxPool2d(2),
            nn.Sequential(*cbr(8, 6, nn.ELU(alpha=0.5)), nn.MaxPool2d(2, ceil_mode=True)),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(6 * 2 * 2, 8), nn.LeakyReLU(0.2), nn.Linear(8, 3),
                                  nn.Tanh())

    def forward(self, x):
        return self.head(self.features(x))


class Mixed(nn.Module):
    """What convert must leave alone, or fuse only in part (conv -> BatchNorm, what follows staying stock)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            *cbr(2, 4, nn.ReLU6()),                         # fused (ReLU6 is Hardtanh(0, 6))
            nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.BatchNorm2d(4), nn.ReLU(),   # groups=2: not fused
            nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.Dropout(0.0), nn.Softplus(beta=2.0),  # conv -> BN fused
            *cbr(4, 4, nn.PReLU(4, init=0.1)),              # conv -> BN fused; learnable PReLU replaced
            nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), nn.BatchNorm2d(4), nn.SiLU(),  # not fused
            nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),       # conv without BatchNorm
            nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4),   # BatchNorm at the very end: conv -> BN fused
        )
        self.conv = nn.Conv2d(4, 4, 1)                      # outside a Sequential: fused in Mixed.forward
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.Hardtanh(-0.5, 0.5)

    def forward(self, x):
        return self.act(self.bn(self.conv(self.body(x))))


def randomize_bn(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 2.0)
    return model


def check_same_function(stock, ours, x, steps=(True, False), call=None):
    """Outputs, input and parameter gradients, and (training) the updated running statistics agree, a step in
    each mode of ``steps`` (None: the modes as they are). ``call`` computes ours (a compiled form, say)."""
    for training in steps:
        if training is not None:
            stock.train(training), ours.train(training)
        xs, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_s, out_o = stock(xs), (ours if call is None else call)(xo)
        assert_close(out_o, out_s)
        g = torch.randn_like(out_s)
        out_s.backward(g), out_o.backward(g)
        assert_close(xo.grad, xs.grad)
        for (name, ps), po in zip(stock.named_parameters(), ours.parameters(), strict=True):
            assert_close(po.grad, ps.grad, msg=lambda m, name=name: f"{name}: {m}")
        check_state_dicts_equal(stock, ours)
        stock.zero_grad(), ours.zero_grad()


def check_state_dicts_equal(stock, ours):
    assert_state_dict(ours.state_dict(), stock.state_dict())


def assert_state_dict(actual, expected):
    assert list(actual) == list(expected)
    for name, a in actual.items():
        torch.testing.assert_close(a, expected[name], rtol=1e-12, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")


def check_state_dicts_cross(stock, ours):
    """Each loads the other's state_dict with strict=True (every entry changed first, so loading shows)."""
    sd = {k: v + 1 if v.is_floating_point() else v + 3 for k, v in stock.state_dict().items()}
    ours.load_state_dict(sd, strict=True)
    assert_state_dict(ours.state_dict(), sd)
    sd = {k: v * 2 for k, v in ours.state_dict().items()}
    stock.load_state_dict(sd, strict=True)
    assert_state_dict(stock.state_dict(), sd)


def check_stock_tree(stock, ours, replaced=()):
    """ours holds the stock model's module tree: the same names, the same classes (for isinstance and repr; a module
    with a converted forward is a subclass of its own class, named as it), but the reported dlkern twins; the same
    named_parameters() (names and order) and named_buffers()."""
    stock_modules, our_modules = dict(stock.named_modules()), dict(ours.named_modules())
    assert list(our_modules) == list(stock_modules)
    for name, module in our_modules.items():
        cls = type(stock_modules[name])
        if name in replaced:
            assert type(module) is getattr(dlkern.nn, replaced[name]), name
        else:
            assert getattr(type(module), "_dlkern_base", type(module)) is cls, name
            assert type(module).__name__ == cls.__name__ and repr(module) == repr(stock_modules[name]), name
    assert [(n, p.shape) for n, p in ours.named_parameters()] == [(n, p.shape) for n, p in stock.named_parameters()]
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in stock.named_buffers()]


def test_vgg_like():
    torch.manual_seed(0)
    stock = randomize_bn(VGGish()).double()
    ours = dlkern.convert(stock)
    report = ours.dlkern_report
    # A max pool right after a run joins its site.
    assert report.fused == [("features.0", "features.1", "features.2"),
                            ("features.3", "features.4", "features.5", "features.6"),
                            ("features.7.0", "features.7.1", "features.7.2", "features.7.3")]
    assert [site.block for site in report.fused] == ["Sequential.forward of features"] * 2 + [
        "Sequential.forward of features.7"]
    assert [site.activation for site in report.fused] == ["gelu", "silu", "elu"]
    assert {(name, new) for name, _, new in report.replaced} == {("head.2", "LeakyReLU"), ("head.4", "Tanh")}
    assert report.skipped == []
    # The stock tree: the modules a site absorbed are the stock ones, where the user put them.
    check_stock_tree(stock, ours, {"head.2": "LeakyReLU", "head.4": "Tanh"})
    assert type(ours.features[2]) is nn.GELU and type(ours.features[6]) is nn.MaxPool2d
    assert ours.head[2].negative_slope == 0.2 and ours.features[7][3].ceil_mode
    assert isinstance(ours.features, nn.Sequential) and type(ours.features) is not nn.Sequential
    assert type(ours.head) is nn.Sequential  # no site in it: its class stays
    assert "features.3 + features.4 + features.5 + features.6 into Sequential.forward of features" in str(report)
    check_report_matches_model(ours)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    check_same_function(stock, ours, x)
    check_state_dicts_cross(stock, ours)


def test_mixed_sequential(caplog):
    torch.manual_seed(1)
    stock = randomize_bn(Mixed()).double()
    with caplog.at_level(logging.DEBUG, logger="dlkern.convert"):
        ours = dlkern.convert(stock)
    report = ours.dlkern_report
    assert report.fused == [("body.0", "body.1", "body.2"), ("body.6", "body.7"), ("body.10", "body.11"),
                            ("body.18", "body.19"), ("conv", "bn", "act")]
    body = "Sequential.forward of body"
    assert [(site.block, site.activation) for site in report.fused] == [
        (body, "hardtanh"), (body, "none"), (body, "none"), (body, "none"), ("Mixed.forward of the model", "hardtanh")]
    notes = [site.note for site in report.fused]
    assert notes[0] == "" and "Dropout" in notes[1] and "learnable" in notes[2] and "returns it" in notes[3]
    assert all(note.startswith("conv -> BatchNorm fused; ") for note in notes[1:4])
    skipped = dict(report.skipped)
    assert skipped.keys() == {"body.3", "body.13", "body.16"}
    assert "groups=2" in skipped["body.3"]
    assert "padding_mode" in skipped["body.13"]
    assert "not followed by an nn.BatchNorm2d" in skipped["body.16"]
    assert [(conv, bn) for conv, bn, _ in report.unfused] == [("body.3", "body.4"), ("body.13", "body.14")]
    assert report.sites == 7
    replaced = {name: new for name, _, new in report.replaced}
    assert replaced == {"body.5": "ReLU", "body.9": "Softplus", "body.12": "PReLU", "body.15": "SiLU",
                        "body.17": "ReLU", "act": "Hardtanh"}
    check_stock_tree(stock, ours, replaced)
    assert type(ours.body[2]) is nn.ReLU6 and type(ours.body[8]) is nn.Dropout  # absorbed: stock
    assert ours.body[12].weight is not stock.body[12].weight  # a deep copy...
    assert torch.equal(ours.body[12].weight, stock.body[12].weight)  # ...of the same values
    assert ours.body[9].beta == 2.0 and (ours.act.min_val, ours.act.max_val) == (-0.5, 0.5)
    assert isinstance(ours, Mixed) and type(ours) is not Mixed  # its forward is the converted one
    messages = [r.getMessage() for r in caplog.records]
    assert any("fused body.0 + body.1 + body.2" in m for m in messages)
    assert any(r.levelno == logging.DEBUG and "body.3" in r.getMessage() and "groups=2" in r.getMessage()
               for r in caplog.records)
    check_report_matches_model(ours)
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    check_same_function(stock, ours, x)
    check_state_dicts_cross(stock, ours)


def test_conv_without_batchnorm():
    stock = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Conv2d(3, 2, 3), nn.Sigmoid()).double()
    ours = dlkern.convert(stock)
    assert ours.dlkern_report.fused == []
    assert type(ours) is nn.Sequential  # nothing fused: the stock forward
    assert [type(m) for m in ours] == [nn.Conv2d, dlkern.nn.ReLU, nn.Conv2d, dlkern.nn.Sigmoid]
    assert [name for name, _ in ours.dlkern_report.skipped] == ["0", "2"]
    check_same_function(stock, ours, torch.randn(2, 1, 6, 6, dtype=torch.float64))


def test_copy_or_inplace():
    stock = nn.Sequential(*cbr(1, 2, nn.ReLU()), nn.PReLU())
    before = copy.deepcopy(stock)
    ours = dlkern.convert(stock)
    assert ours is not stock and type(stock) is nn.Sequential and [type(m) for m in stock] == [type(m) for m in before]
    assert not hasattr(stock, "dlkern_report")
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(1.0)
    check_state_dicts_equal(before, stock)  # the original is untouched
    modules, params = list(stock), list(stock.parameters())
    same = dlkern.convert(stock, inplace=True)
    assert same is stock and isinstance(stock, nn.Sequential) and type(stock[3]) is dlkern.nn.PReLU
    assert all(a is b for a, b in zip(modules[:3], stock, strict=False))  # the very conv, BatchNorm and ReLU
    assert all(a is b for a, b in zip(params, stock.parameters(), strict=True))  # an optimizer keeps working
    with pytest.raises(TypeError):
        dlkern.convert(torch.zeros(1))


def test_keys_survive_copy_pickle_and_reconversion():
    torch.manual_seed(2)
    stock = VGGish()
    ours = dlkern.convert(stock)
    keys, names = list(stock.state_dict()), [n for n, _ in stock.named_parameters()]
    assert list(copy.deepcopy(ours).state_dict()) == keys
    buffer = io.BytesIO()
    torch.save(ours, buffer)
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    assert list(loaded.state_dict()) == keys and [n for n, _ in loaded.named_parameters()] == names
    assert type(loaded.features) is type(ours.features)
    loaded.load_state_dict(stock.state_dict(), strict=True)
    twice = dlkern.convert(ours)  # changes nothing, and lists the same fused sites
    assert list(twice.state_dict()) == keys and twice.dlkern_report.fused == ours.dlkern_report.fused
    assert [type(m) for m in twice.modules()] == [type(m) for m in ours.modules()]
    assert twice.dlkern_report.replaced == []
    # A state_dict's metadata (BatchNorm's version) is the stock one.
    assert ours.state_dict()._metadata == stock.state_dict()._metadata
    # Parameters come in the stock order, under the stock names: optimizer state_dicts and groups cross.
    assert [n for n, _ in ours.named_parameters()] == names


def test_subclasses_and_hooks_are_left_alone():
    class MyReLU(nn.ReLU):  # a subclass may compute something else
        def forward(self, x):
            return super().forward(x) * 2

    stock = nn.Sequential(*cbr(1, 2, MyReLU()), MyReLU(), *cbr(2, 2, nn.ReLU()), nn.ReLU(), nn.ReLU())
    stock[5].register_forward_hook(lambda m, i, o: o + 1)
    stock[8].register_forward_pre_hook(lambda m, i: (i[0] - 1,))
    ours = dlkern.convert(stock)
    report = ours.dlkern_report
    assert report.replaced == [("6", "ReLU", "ReLU"), ("7", "ReLU", "ReLU")]
    assert report.fused == [("0", "1")] and "MyReLU" in report.fused[0].note  # conv -> BN; MyReLU stays
    assert [(conv, bn) for conv, bn, _ in report.unfused] == [("4", "5")]
    skipped = dict(report.skipped)
    assert "hook" in skipped["4"] and "hook" in skipped["8"]
    assert [type(m) for m in ours] == [nn.Conv2d, nn.BatchNorm2d, MyReLU, MyReLU, nn.Conv2d, nn.BatchNorm2d,
                                       dlkern.nn.ReLU, dlkern.nn.ReLU, nn.ReLU]
    x = torch.randn(2, 1, 5, 5)
    with torch.no_grad():
        assert_close(ours(x), stock(x))


def test_dlkern_activations_fuse_too():
    torch.manual_seed(3)
    stock = randomize_bn(nn.Sequential(*cbr(2, 3, dlkern.nn.Swish(1.5)), *cbr(3, 3, dlkern.nn.HardLogistic()),
                                       *cbr(3, 2, dlkern.nn.Swish(learnable=True)))).double()
    ours = dlkern.convert(stock)
    assert ours.dlkern_report.fused == [("0", "1", "2"), ("3", "4", "5"), ("6", "7")]
    assert "learnable" in ours.dlkern_report.fused[2].note  # conv -> BN fused, the learnable Swish stays
    check_same_function(stock, ours, torch.randn(2, 2, 5, 5, dtype=torch.float64))
    check_state_dicts_cross(stock, ours)


def test_sequential_subclasses():
    class Block(nn.Sequential):  # Sequential's own forward: fused (as torchvision's Conv2dNormActivation)
        pass

    class Reversed(nn.Sequential):  # its own forward, traced: bn, conv, relu
        def forward(self, x):
            for m in reversed(self):
                x = m(x)
            return x

    stock = nn.Sequential(Block(*cbr(1, 2, nn.ReLU())), Reversed(nn.ReLU(), *cbr(2, 2, nn.ReLU())[:2]))
    ours = dlkern.convert(stock)
    assert ours.dlkern_report.fused == [("0.0", "0.1", "0.2")]
    assert ours.dlkern_report.fused[0].block == "Block.forward of 0"
    assert isinstance(ours[0], Block) and type(ours[0]).__name__ == "Block" and type(ours[0][2]) is nn.ReLU
    assert type(ours[0][0:2]) is Block  # a slice is of the stock class, as the stock one's
    assert "not followed by an nn.BatchNorm2d" in dict(ours.dlkern_report.skipped)["1.1"]
    assert list(ours.state_dict()) == list(stock.state_dict())


def test_max_pool_joins_the_site():
    """A MaxPool2d (stock or dlkern's) whose windows do not overlap, right after a fusable run, joins its site; one
    with overlapping windows or dilation (noted), return_indices=True (a tuple output), a hooked one or a subclass
    stays outside. The modules stay where they are, the very objects (inplace)."""

    class MyPool(nn.MaxPool2d):
        pass

    torch.manual_seed(8)
    stock = randomize_bn(nn.Sequential(
        *cbr(2, 3, nn.ReLU()), nn.MaxPool2d(2, 2, padding=1, ceil_mode=True),
        *cbr(3, 3, nn.SiLU()), dlkern.nn.MaxPool2d(2, 1, dilation=2),
        *cbr(3, 3, nn.ReLU()), MyPool(1),
        *cbr(3, 3, nn.ELU()), nn.MaxPool2d(1),
        *cbr(3, 3, nn.ReLU()), nn.MaxPool2d(2, return_indices=True),
    )).double()
    stock[15].register_forward_hook(lambda m, i, o: o * 2)  # hooked: left as it is
    modules = list(stock)
    x = torch.randn(2, 2, 9, 8, dtype=torch.float64)
    with torch.no_grad():
        expected, expected_indices = stock.eval()(x)
    ours = dlkern.convert(stock, inplace=True)
    report = ours.dlkern_report
    assert report.fused == [("0", "1", "2", "3"), ("4", "5", "6"), ("8", "9", "10"), ("12", "13", "14"),
                            ("16", "17", "18")]
    assert [site.pooled for site in report.fused] == [True, False, False, False, False]
    assert "has overlapping windows or dilation" in report.fused[1].note
    assert all(a is b for i, (a, b) in enumerate(zip(modules[:19], ours, strict=False)) if i != 7)  # nothing moved
    assert type(ours[7]) is dlkern.nn.MaxPool2d  # dlkern's already: the same object
    assert type(ours[19]) is dlkern.nn.MaxPool2d and ours[19].return_indices  # standalone: its twin
    assert "hook" in dict(report.skipped)["15"]
    assert "0 + 1 + 2 + 3 into Sequential.forward of the model (relu, pooled)" in str(report)
    with torch.no_grad():
        out, indices = ours(x)
    assert_close(out, expected)
    assert torch.equal(indices, expected_indices)
    check_report_matches_model(ours)


def test_pool_state_dicts_and_slices():
    """MnistCNN-like stages: the converted model's state_dict is the stock one's (both ways, strict); a slice is a
    stock Sequential of the stock modules, computing what the stock model's slice computes."""
    torch.manual_seed(9)
    stage = [*cbr(2, 3, nn.ReLU()), nn.MaxPool2d(2)]
    stock = randomize_bn(nn.Sequential(*stage, *cbr(3, 4, nn.Hardtanh()), nn.MaxPool2d(2, ceil_mode=True))).double()
    ours = dlkern.convert(stock)
    assert list(ours.state_dict()) == list(stock.state_dict())
    assert ours.state_dict()._metadata.keys() == stock.state_dict()._metadata.keys()
    x = torch.randn(2, 2, 7, 7, dtype=torch.float64)
    check_same_function(stock, ours, x)
    check_state_dicts_cross(stock, ours)
    ours.load_state_dict(stock.state_dict())  # the cross check left them different
    with torch.no_grad():
        stock.eval(), ours.eval()
        for piece in (slice(None, 2), slice(None, 3), slice(1, 4), slice(4, None), slice(None)):
            assert type(ours[piece]) is nn.Sequential and list(ours[piece]) == list(ours)[piece], piece
            y = stock[:piece.start](x) if piece.start else x
            assert_close(ours[piece](y), stock[piece](y))


# ------------------------------------------------------------------------------------------- item: the memo (ids)


def converted(model):
    """The modules of `model` whose forward dlkern.convert rewrote."""
    return [m for m in model.modules() if hasattr(type(m), "_dlkern_spec")]


def check_report_matches_model(ours):
    """dlkern_report counts what the model really holds: each fused site's modules are the stock ones at the
    reported names (conv, BatchNorm[, activation[, max pool]]), called by the converted forward its ``block`` names;
    each replaced name holds a module of the reported dlkern type."""
    report = ours.dlkern_report
    modules = dict(ours.named_modules(remove_duplicate=False))
    for site in report.fused:
        conv, pool, bn, *act = site if site.pool_before_bn else (site[0], site[3] if site.pooled else None, *site[1:3])
        assert isinstance(modules[conv], nn.Conv2d) and isinstance(modules[bn], nn.BatchNorm2d), site
        assert pool is None or isinstance(modules[pool], nn.MaxPool2d), site
        owner = site.block.partition(" of ")[2]
        owner = ours if owner == "the model" else modules[owner]
        assert owner in converted(ours) and site.block.startswith(f"{type(owner).__name__}.forward of "), site
    assert not any(isinstance(m, (ConvBNReLU2d, ConvBNActPool2d)) for m in ours.modules())
    for name, _, new in report.replaced:
        assert type(modules[name]) is getattr(dlkern.nn, new), name


def test_repeated_conversion_keeps_every_layer():
    """The memo used to be keyed by id() of modules it let die: a module created later could get a freed module's
    id and be 'converted' into that module's twin (layers replaced by a MaxPool2d, say)."""
    torch.manual_seed(4)

    def block():
        return nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(1))

    stock = randomize_bn(nn.Sequential(*(block() for _ in range(4)))).double()
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    for _ in range(20):
        ours = dlkern.convert(stock)
        assert [[type(m) for m in b] for b in ours] == [[nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d]] * 4
        assert len(ours.dlkern_report.fused) == 4 and len(ours.dlkern_report.replaced) == 0
        assert len(converted(ours)) == 4
        check_report_matches_model(ours)
        check_same_function(stock, ours, x)


class SharedNested(nn.Module):
    """Nested Sequentials, depthwise convs (groups > 1: not fused), ReLU6, and modules used in two places."""

    def __init__(self):
        super().__init__()
        relu6 = nn.ReLU6()
        shared = nn.Sequential(*cbr(6, 6, nn.ReLU6()))  # called twice
        self.body = nn.Sequential(
            nn.Sequential(*cbr(3, 6, relu6), nn.Sequential(nn.Conv2d(6, 6, 3, padding=1, groups=6),
                                                           nn.BatchNorm2d(6), relu6)),
            shared,
            nn.Sequential(nn.Conv2d(6, 6, 3, padding=1, groups=3), nn.BatchNorm2d(6), nn.ReLU6(),
                          nn.Sequential(*cbr(6, 6, nn.Hardtanh(-0.5, 0.5)))),
            shared,
            relu6,
            nn.MaxPool2d(2),
        )

    def forward(self, x):
        return self.body(x)


def test_nested_depthwise_shared():
    torch.manual_seed(5)
    stock = randomize_bn(SharedNested()).double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    for _ in range(5):
        ours = dlkern.convert(stock)
        report = ours.dlkern_report
        assert report.fused == [("body.0.0", "body.0.1", "body.0.2"), ("body.1.0", "body.1.1", "body.1.2"),
                                ("body.2.3.0", "body.2.3.1", "body.2.3.2")]
        skipped = dict(report.skipped)
        assert "groups=6" in skipped["body.0.3.0"] and "groups=3" in skipped["body.2.0"]
        assert ours.body[1] is ours.body[3]  # still shared
        # One ReLU6 object sat in three places: absorbed into a site, after a depthwise conv, standalone. It stays
        # stock in the site; elsewhere one twin replaces it in both places.
        assert type(ours.body[0][2]) is nn.ReLU6 and ours.body[0][3][2] is ours.body[4]
        assert type(ours.body[4]) is dlkern.nn.Hardtanh
        assert type(ours.body[2][2]) is dlkern.nn.Hardtanh
        check_report_matches_model(ours)
        assert len(converted(ours)) == 3  # body.0, body.1 (= body.3), body.2.3
        check_same_function(stock, ours, x)
        check_state_dicts_cross(stock, ours)


# ------------------------------------------------------------------------------------------- ConvBNReLU2d in eval


def stock_and_block(c_in=2, c_out=3, act=None, seed=6):
    """A stock Conv2d -> BatchNorm2d -> activation Sequential (float64, random statistics) and its fused twin."""
    torch.manual_seed(seed)
    stock = randomize_bn(nn.Sequential(*cbr(c_in, c_out, act or nn.ReLU()))).double().eval()
    block = ConvBNReLU2d.fuse(*copy.deepcopy(stock)).eval()
    return stock, block


def copy_values(src, dst):
    """dst's parameters and buffers take src's values (same keys)."""
    dst.load_state_dict(src.state_dict())


def test_eval_sees_writes_through_data():
    """EMA / weight averaging writes through .data under no_grad, which does not bump the version counter: eval
    must still use the current values (a cache keyed on versions served the old folding)."""
    stock, block = stock_and_block()
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        assert_close(block(x), stock(x))
        for step in range(3):
            for s, o in zip(stock.state_dict().values(), block.state_dict().values(), strict=True):
                if s.is_floating_point():
                    new = s * 0.9 + 0.1 * torch.rand_like(s) + 0.05 * step
                    s.data.copy_(new), o.data.copy_(new)  # as an EMA update does
            assert_close(block(x), stock(x))


def test_eval_sees_new_parameters():
    """A new Parameter may sit in a freed one's memory (same data_ptr, version 0; the CUDA caching allocator
    does this all the time): never served the old one's folding. Here the memory is one reused buffer."""
    stock, block = stock_and_block()
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    shape = block[0].weight.shape
    memory = bytearray(8 * shape.numel())
    for step in range(3):
        new = torch.randn(shape, dtype=torch.float64)
        memory[:] = new.numpy().tobytes()  # new values in the same memory, no tensor op (no version bump)
        block[0].weight = nn.Parameter(torch.frombuffer(memory, dtype=torch.float64).view(shape))
        stock[0].weight = nn.Parameter(new)
        with torch.no_grad():
            assert_close(block(x), stock(x))


def test_every_activation_name_of_the_op():
    """ConvBNReLU2d(activation=name) accepts exactly the names conv_bn_act2d accepts, with the same defaults."""
    from dlkern.catalog import FUSABLE, check_activation
    from dlkern.nn.conv import activation_spec

    torch.manual_seed(7)
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    for name in FUSABLE:
        block = ConvBNReLU2d(2, 3, 3, padding=1, activation=name, dtype=torch.float64)
        assert activation_spec(block[2]) == check_activation(name)  # the same name and default parameters
        randomize_bn(block)
        conv, bn = block[0], block[1]
        for training in (True, False):
            block.train(training)
            before = bn.running_mean.clone(), bn.running_var.clone()
            expected = dlkern.functional.conv_bn_act2d(
                x, conv.weight, conv.bias, before[0].clone(), before[1].clone(), bn.weight, bn.bias,
                training=training, padding=1, activation=name)
            assert_close(block(x), expected, msg=lambda m, n=name: f"{n}: {m}")
    with pytest.raises(ValueError, match=r"ConvBNReLU2d: unknown activation 'prelu'; names: \['elu', "):
        ConvBNReLU2d(2, 3, 3, activation="prelu")


# ------------------------------------------------------------------------------------------- what users can observe


def test_hooks_on_a_site_run():
    """Hooks registered after conversion on a fused site's modules (seq[0], [1], [2]: the stock ones) run as in
    the stock model: forward, forward-pre and backward hooks, with the stock tensors (the site runs unfused)."""
    stock, _ = stock_and_block(act=nn.ReLU6())
    stock.train()
    ours = dlkern.convert(stock)
    assert ours.dlkern_report.fused == [("0", "1", "2")]
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    seen = {}

    def register(model, tag):
        seen[tag] = []
        model[0].register_forward_pre_hook(lambda m, i: seen[tag].append(("pre", i[0].clone())))
        model[1].register_forward_hook(lambda m, i, o: seen[tag].append(("fwd", o.clone())))
        model[1].register_forward_hook(lambda m, i, o: o * 2)  # changes the output
        model[2].register_full_backward_hook(lambda m, gi, go: seen[tag].append(("bwd", go[0].clone())))

    register(stock, "stock")
    register(ours, "ours")
    check_same_function(stock, ours, x, steps=(True, False))
    assert [k for k, _ in seen["ours"]] == [k for k, _ in seen["stock"]] == ["pre", "fwd", "bwd"] * 2
    for (_, a), (_, b) in zip(seen["ours"], seen["stock"], strict=True):
        assert_close(a, b)


def test_prune_after_conversion_trains():
    """torch.nn.utils.prune works through a forward-pre-hook on the conv: after conversion it trains as stock."""
    from torch.nn.utils import prune

    stock, _ = stock_and_block()
    stock.train()
    ours = dlkern.convert(stock)
    prune.l1_unstructured(stock[0], "weight", amount=0.5)
    prune.l1_unstructured(ours[0], "weight", amount=0.5)
    assert list(ours.state_dict()) == list(stock.state_dict())  # 0.weight_orig, 0.weight_mask, ...
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (stock, ours)]
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    for _ in range(3):
        losses = []
        for model, opt in zip((stock, ours), opts):
            opt.zero_grad()
            loss = model(x).square().mean()
            loss.backward()
            opt.step()
            losses.append(loss)
        assert_close(losses[1], losses[0])
    check_state_dicts_equal(stock, ours)


def test_indexing_and_slicing():
    """The module tree is the stock one: seq[i] is the stock module, len and iteration are the stock ones, and a
    slice is a plain nn.Sequential of the stock modules computing what the stock slice computes (unfused)."""
    stock, _ = stock_and_block(act=nn.ReLU6())
    ours = dlkern.convert(stock)
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    assert len(ours) == 3 and [type(m) for m in ours] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU6]
    assert [type(ours[i]) for i in (0, 1, 2, -1)] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU6, nn.ReLU6]
    with torch.no_grad():
        for piece in (slice(None, 2), slice(None, 1), slice(1, None), slice(2, 3), slice(None)):
            assert type(ours[piece]) is nn.Sequential and list(ours[piece]) == list(ours)[piece]
            y = stock[:piece.start](x) if piece.start else x
            assert_close(ours[piece](y), stock[piece](y))


def test_jit_trace():
    """torch.jit.trace of a converted eval model passes its own check (the fold cache once changed the recorded
    graph between runs) and matches eager on new inputs."""
    stock, _ = stock_and_block()
    ours = dlkern.convert(stock).eval()
    x, x2 = torch.randn(2, 2, 5, 5, dtype=torch.float64), torch.randn(2, 2, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        traced = torch.jit.trace(ours, (x,), check_trace=True)
        assert_close(traced(x), stock(x))
        assert_close(traced(x2), stock(x2))


def test_jit_script_raises_and_export_works():
    stock, _ = stock_and_block()
    ours = dlkern.convert(stock)
    with pytest.raises(RuntimeError, match=r"Sequential.forward was converted .* torch.jit.script is not supported"):
        torch.jit.script(ours)
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    for training in (False, True):
        stock.train(training), ours.train(training)
        exported = torch.export.export(ours, (x,)).module()
        assert_close(exported(x), stock(x))


def test_empty_batch():
    """An empty batch passes through a block and a converted model as through the stock ones (train and eval)."""
    stock, block = stock_and_block()
    ours = dlkern.convert(stock)
    x = torch.randn(0, 2, 5, 5, dtype=torch.float64)
    for training in (True, False):
        for model in (stock, block, ours):
            model.train(training)
        expected = stock(x)
        assert expected.shape == (0, 3, 5, 5)
        assert_close(block(x), expected)
        assert_close(ours(x), expected)
        check_state_dicts_equal(stock, ours)
