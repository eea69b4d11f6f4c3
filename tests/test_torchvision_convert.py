"""dlkern.convert on torchvision's classification models: each converted several times in one process (the memo
once let ids be reused, dropping layers), compared with the stock model: state_dict keys, outputs in eval and in
train mode, the running statistics a training forward leaves, and a report that counts what the model holds.
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
        with torch.no_grad():
            expected[training] = _logits(stock(x))
    trained = stock.state_dict()  # the running statistics after one training forward
    stock = fresh.eval()
    summary = None
    for _ in range(CONVERSIONS):
        ours = dlkern.convert(stock)
        report = ours.dlkern_report
        assert list(ours.state_dict()) == list(trained), f"{name}: state_dict keys differ"
        modules = dict(ours.named_modules(remove_duplicate=False))
        blocks = {id(m) for m in ours.modules() if isinstance(m, (ConvBNReLU2d, ConvBNActPool2d))}
        assert len(blocks) == len(report.fused), f"{name}: {len(report.fused)} fused, {len(blocks)} blocks"
        for conv, *absorbed in report.fused:  # (bn, act) into a ConvBNReLU2d, (bn, act, pool) a ConvBNActPool2d
            block_type = ConvBNActPool2d if len(absorbed) == 3 else ConvBNReLU2d
            assert type(modules[conv]) is block_type, f"{name}: {conv} is {type(modules[conv]).__name__}"
            assert all(type(modules[n]) is nn.Identity for n in absorbed), f"{name}: {absorbed}"
        for mod_name, _, new in report.replaced:
            assert type(modules[mod_name]) is getattr(dlkern.nn, new), f"{name}: {mod_name} is not {new}"
        for training in (False, True):
            ours.train(training)
            torch.manual_seed(1)
            with torch.no_grad():
                out = _logits(ours(x))
            torch.testing.assert_close(out, expected[training], rtol=1e-9, atol=1e-9,
                                       msg=lambda m, t=training: f"{name} ({'train' if t else 'eval'}): {m}")
        state = ours.state_dict()
        for key, value in trained.items():
            torch.testing.assert_close(state[key], value, rtol=1e-9, atol=1e-9, msg=lambda m, k=key: f"{name} {k}: {m}")
        summary = {"fused": len(report.fused), "replaced": len(report.replaced)}
    return summary


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
    # The models the memo bug broke hold their blocks (counts checked against the model in the subprocess).
    assert summary["mobilenet_v2"]["fused"] == 18 and summary["mnasnet0_5"]["fused"] == 18
    assert summary["efficientnet_b0"]["fused"] == 17 and summary["regnet_y_400mf"]["fused"] == 17


if __name__ == "__main__":
    _main(sys.argv[1:])
