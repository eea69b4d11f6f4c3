"""dlkern.convert on torchvision's classification models: each converted several times in one process (the memo
once let ids be reused, dropping layers), compared with the stock model: state_dict keys, parameter order, outputs
in eval and in train mode, the running statistics a training forward leaves, a report that counts what the model
holds (its conv -> BatchNorm sites as counted on the stock model's run, each fused one calling the fused op once),
and a second conversion of the converted model that changes nothing.
(At 32x32 the last stages see 1x1 maps: training BatchNorm over 2 values per channel amplifies rounding
differences to 1e-5 and more, so training runs on 64x64.)

This checks the conversion's structure, not the kernels' numerics (tested in test_conv_bn.py and the others):
the models run in a subprocess without TRITON_INTERPRET, where dlkern's ops use their PyTorch composites on the
CPU (Triton's interpreter is far too slow for whole models). float64, 2 images of 64x64 (75x75 for inception_v3),
3 classes.
"""

import copy
import json
import os
import subprocess
import sys
import warnings

import pytest

CONVERSIONS = 3  # per model, in one process

# (fused, conv -> BatchNorm sites) per model: checked numbers (the sites are also counted on the stock model's
# training forward in the subprocess). What is not fused is a grouped or depthwise conv (groups != 1).
# `python tests/test_torchvision_convert.py --coverage` prints this as the README's table.
COVERAGE = {
    "convnext_tiny": (0, 0), "densenet121": (59, 59), "densenet161": (79, 79), "densenet169": (83, 83),
    "densenet201": (99, 99), "efficientnet_b0": (33, 49), "efficientnet_b1": (46, 69), "efficientnet_b2": (46, 69),
    "efficientnet_b3": (52, 78), "efficientnet_b4": (64, 96), "efficientnet_b5": (77, 116),
    "efficientnet_v2_s": (80, 110), "googlenet": (59, 59), "inception_v3": (94, 94), "mnasnet0_5": (35, 52),
    "mnasnet0_75": (35, 52), "mnasnet1_0": (35, 52), "mnasnet1_3": (35, 52), "mobilenet_v2": (35, 52),
    "mobilenet_v3_large": (31, 46), "mobilenet_v3_small": (23, 34), "regnet_x_1_6gf": (41, 59),
    "regnet_x_3_2gf": (55, 80), "regnet_x_400mf": (49, 71), "regnet_x_800mf": (37, 53), "regnet_y_1_6gf": (59, 86),
    "regnet_y_3_2gf": (47, 68), "regnet_y_400mf": (37, 53), "regnet_y_800mf": (33, 47), "resnet18": (20, 20),
    "resnet34": (36, 36), "resnet50": (53, 53), "resnext50_32x4d": (37, 53), "shufflenet_v2_x0_5": (37, 56),
    "shufflenet_v2_x1_0": (37, 56), "shufflenet_v2_x1_5": (37, 56), "shufflenet_v2_x2_0": (37, 56),
    "squeezenet1_0": (0, 0), "squeezenet1_1": (0, 0), "swin_t": (0, 0), "swin_v2_t": (0, 0),
}

# Left out, and why; every other model torchvision lists for classification is checked (new ones too).
_BIG = "over 30M parameters: seconds to build, copy and run in float64; its family's smaller members are checked"
SKIPPED = {
    **dict.fromkeys(["vit_b_16", "vit_b_32", "vit_h_14", "vit_l_16", "vit_l_32", "maxvit_t"],
                    "needs 224x224 inputs: seconds per float64 forward"),
    **dict.fromkeys(["alexnet", "convnext_small", "convnext_base", "convnext_large", "efficientnet_b6",
                     "efficientnet_b7", "efficientnet_v2_m", "efficientnet_v2_l", "regnet_x_8gf", "regnet_x_16gf",
                     "regnet_x_32gf", "regnet_y_8gf", "regnet_y_16gf", "regnet_y_32gf", "regnet_y_128gf",
                     "resnet101", "resnet152", "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2",
                     "wide_resnet101_2", "swin_s", "swin_b", "swin_v2_s", "swin_v2_b", "vgg11", "vgg11_bn", "vgg13",
                     "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn"], _BIG),
}
INPUT_SIZE = {"inception_v3": 75}  # the smallest input it accepts
BUILD_ARGS = {"inception_v3": {"aux_logits": False}}  # its auxiliary head needs 299x299


def _check_model(name):
    """Runs in the subprocess: converts `name` CONVERSIONS times and compares each with the stock model.
    Returns a summary (counts) for the parent to check."""
    import torch
    import torchvision

    import dlkern
    from dlkern.nn import ConvBNActPool2d, ConvBNReLU2d
    from torch import nn

    torch.manual_seed(0)
    stock = torchvision.models.get_model(name, weights=None, num_classes=3, **BUILD_ARGS.get(name, {})).double()
    with torch.no_grad():  # BatchNorm's fresh statistics would make eval mode the identity
        for m in stock.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 2.0)
    fresh = copy.deepcopy(stock)
    size = INPUT_SIZE.get(name, 64)
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    expected = {}
    for training in (False, True):
        stock.train(training)
        torch.manual_seed(1)  # dropout and stochastic depth draw the same numbers in both models
        with torch.no_grad(), _SiteCounter(stock) as sites:
            expected[training] = _logits(stock(x))
    trained = stock.state_dict()  # the running statistics after one training forward
    stock = fresh.eval()
    parameters = [(n, p.shape) for n, p in stock.named_parameters()]
    summary = None
    for _ in range(CONVERSIONS):
        ours = dlkern.convert(stock)
        report = ours.dlkern_report
        assert list(ours.state_dict()) == list(trained), f"{name}: state_dict keys differ"
        assert [p.shape for p in ours.parameters()] == [s for _, s in parameters], f"{name}: parameter order"
        modules = dict(ours.named_modules(remove_duplicate=False))
        in_blocks = [site for site in report.fused if site.block in ("ConvBNReLU2d", "ConvBNActPool2d")]
        if not in_blocks:  # nothing moved into a block: the names are the stock ones too
            assert [(n, p.shape) for n, p in ours.named_parameters()] == parameters, f"{name}: parameter names"
        blocks = {id(m) for m in ours.modules() if isinstance(m, (ConvBNReLU2d, ConvBNActPool2d))}
        assert len(blocks) == len(in_blocks), f"{name}: {len(in_blocks)} fused in blocks, {len(blocks)} blocks"
        for site in report.fused:
            conv, bn, *absorbed = site
            if site in in_blocks:  # (bn, act) into a ConvBNReLU2d, (bn, act, pool) a ConvBNActPool2d
                assert type(modules[conv]).__name__ == site.block, f"{name}: {conv} is {type(modules[conv])}"
                assert all(type(modules[n]) is nn.Identity for n in (bn, *absorbed)), f"{name}: {site}"
            else:  # in a converted forward: the stock modules stay where they are
                assert isinstance(modules[conv], nn.Conv2d) and isinstance(modules[bn], nn.BatchNorm2d), site
        for mod_name, _, new in report.replaced:
            assert type(modules[mod_name]) is getattr(dlkern.nn, new), f"{name}: {mod_name} is not {new}"
        assert report.sites == sites.count, f"{name}: {report.sites} sites reported, {sites.count} run"
        for training in (False, True):
            ours.train(training)
            torch.manual_seed(1)
            with torch.no_grad(), _FusedCalls() as calls:
                out = _logits(ours(x))
            torch.testing.assert_close(out, expected[training], rtol=1e-9, atol=1e-9,
                                       msg=lambda m, t=training: f"{name} ({'train' if t else 'eval'}): {m}")
            if training:  # every fused site runs the fused op (googlenet's auxiliary heads only in training)
                assert calls.count == len(report.fused), f"{name}: {calls.count} fused calls, {len(report.fused)}"
        state = ours.state_dict()
        for key, value in trained.items():
            torch.testing.assert_close(state[key], value, rtol=1e-9, atol=1e-9, msg=lambda m, k=key: f"{name} {k}: {m}")
        summary = {"fused": len(report.fused), "sites": report.sites, "replaced": len(report.replaced)}
    classes = [type(m) for m in ours.modules()]
    again = dlkern.convert(ours, inplace=True)  # changes nothing
    assert [type(m) for m in again.modules()] == classes and again.dlkern_report.fused == report.fused, name
    return summary


class _SiteCounter:
    """Counts the conv -> BatchNorm sites a forward runs: each BatchNorm2d call whose input is the very tensor a
    Conv2d call returned."""

    def __init__(self, model):
        from torch import nn

        self.model, self.count, self.nn = model, 0, nn

    def __enter__(self):
        outputs = {}

        def conv_hook(module, args, out):
            outputs[id(out)] = out

        def bn_hook(module, args):
            self.count += outputs.get(id(args[0])) is args[0]

        self.handles = [m.register_forward_hook(conv_hook) for m in self.model.modules()
                        if isinstance(m, self.nn.Conv2d)]
        self.handles += [m.register_forward_pre_hook(bn_hook) for m in self.model.modules()
                         if isinstance(m, self.nn.BatchNorm2d)]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


class _FusedCalls:
    """Counts the calls of the fused conv block (dlkern.ops.conv_block.conv_bn_block; the pooled block calls it
    once)."""

    def __enter__(self):
        from dlkern.ops import conv_block

        self.module, self.original, self.count = conv_block, conv_block.conv_bn_block, 0

        def counted(*args, **kwargs):
            self.count += 1
            return self.original(*args, **kwargs)

        conv_block.conv_bn_block = counted
        return self

    def __exit__(self, *exc):
        self.module.conv_bn_block = self.original


def _logits(out):
    return out.logits if hasattr(out, "logits") else out  # googlenet/inception return a namedtuple in training


def _models():
    import torchvision

    return [name for name in torchvision.models.list_models(module=torchvision.models) if name not in SKIPPED]


def _main(names):
    import torch

    warnings.filterwarnings("ignore")  # the composites' "no Triton on this device" notes
    torch.set_num_threads(1)
    print(json.dumps({name: _check_model(name) for name in names}))


def test_torchvision_models():
    pytest.importorskip("torchvision")
    names = _models()
    assert len(names) >= 40, names
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    here = os.path.dirname(os.path.abspath(__file__))
    # Two single-threaded processes (CI has 2 cores), each with every other model.
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), *names[i::2]], env=env, cwd=here,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    summary = {}
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-4000:]
        summary.update(json.loads(out.strip().splitlines()[-1]))
    assert sorted(summary) == sorted(names)
    # Every conv -> BatchNorm site fused but grouped/depthwise ones; the counts are checked against the model in the
    # subprocess (a model torchvision adds later is checked there, not here).
    measured = {name: (s["fused"], s["sites"]) for name, s in summary.items() if name in COVERAGE}
    assert measured == {name: COVERAGE[name] for name in measured}
    for name in ("resnet18", "resnet50", "googlenet", "inception_v3", "densenet121"):
        assert summary[name]["fused"] == summary[name]["sites"] > 0, name


def _coverage_table(names):
    """The README's table: fused sites / conv -> BatchNorm sites per model, measured now."""
    import torchvision

    import dlkern

    warnings.filterwarnings("ignore")
    print("| model | fused / conv→BN sites |\n| --- | --- |")
    for name in names or _models():
        model = torchvision.models.get_model(name, weights=None, num_classes=3, **BUILD_ARGS.get(name, {}))
        report = dlkern.convert(model, inplace=True).dlkern_report
        print(f"| {name} | {len(report.fused)} / {report.sites} |")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--coverage"]:
        _coverage_table(sys.argv[2:])
    else:
        _main(sys.argv[1:])
