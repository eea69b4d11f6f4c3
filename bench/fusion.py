"""coverage: which conv -> BatchNorm sites ``dlkern.convert`` fuses in real CNNs, model by model (any machine).

For each model of ``MODELS`` (torchvision's, built with weights=None and 10 classes, and the bench's CIFAR-10
net, bench/cnn_models.py) one ``dlkern.convert(model)`` on the CPU, and from its report
(``model.dlkern_report``): the conv -> BatchNorm sites (``report.sites``), how many are fused
(``len(report.fused)``), how many are not, and why not (the reasons, counted). Nothing runs a forward: this
reads the conversion, not the kernels. The last column is the (fused, sites) pair tests/test_torchvision_convert.py
checks for the model (its COVERAGE table, read from the file), where it checks one: a difference there means the
table or convert changed.
"""

import ast
import collections
import os
import re
import time
import warnings

import torch

import cnn_models
from timing import print_table

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = ("resnet18", "resnet34", "resnet50", "vgg11_bn", "vgg16_bn", "googlenet", "densenet121", "inception_v3",
          "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "regnet_y_400mf", "resnext50_32x4d",
          "shufflenet_v2_x1_0", cnn_models.CIFAR_NET)
QUICK_MODELS = ("resnet18", "resnet50", "vgg11_bn", "googlenet", "densenet121", "mobilenet_v2", cnn_models.CIFAR_NET)


def tested_coverage(path=os.path.join(os.path.dirname(HERE), "tests", "test_torchvision_convert.py")):
    """The tests' COVERAGE table {model: (fused, sites)}, read from the test file's source (importing it would
    import pytest); {} when the file or a literal table is not there."""
    try:
        with open(path) as f:
            tree = ast.parse(f.read())
    except OSError:
        return {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "COVERAGE" for t in node.targets):
            try:
                return ast.literal_eval(node.value)
            except ValueError:  # no longer a literal: nothing to compare with
                return {}
    return {}


def _reason(why):
    """A reason, counted across sites: the part before its first ':', numbers other than 1 as N ("groups=N (the
    fused block needs groups=1)")."""
    return re.sub(r"\b(?!1\b)\d+\b", "N", why.split(":")[0].strip())


def coverage_row(name):
    """One table row for model `name`: sites, fused, unfused, the reasons, seconds to build and convert."""
    import dlkern

    with warnings.catch_warnings():
        # torchvision's notes on googlenet's and inception_v3's future initialisation; the composites' "no
        # Triton on this device"
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        torch.manual_seed(0)
        model = cnn_models.build(name)
        built = time.perf_counter()
        report = dlkern.convert(model).dlkern_report
    reasons = collections.Counter(_reason(why) for _, _, why in report.unfused)
    return dict(suite="coverage", case=name, impl="dlkern", sites=report.sites, fused=len(report.fused),
                unfused=len(report.unfused),
                share=100 * len(report.fused) / report.sites if report.sites else None,
                why_unfused="; ".join(f"{n}x {r}" for r, n in reasons.most_common()) or None,
                build_s=built - start, convert_s=time.perf_counter() - built)


def run_suite(run):
    names = QUICK_MODELS if run.quick else MODELS
    tested = tested_coverage()
    rows = []
    for name in names:
        try:
            row = coverage_row(name)
        except Exception as e:  # one model that fails to convert must not cost the others
            run.fail("coverage", name, e)
            continue
        if name in tested:
            fused, sites = tested[name]
            same = (fused, sites) == (row["fused"], row["sites"])
            row["tested"] = f"{fused}/{sites}" + ("" if same else " (differs)")
        rows.append(row)
    total = dict(case="all", sites=sum(r["sites"] for r in rows), fused=sum(r["fused"] for r in rows),
                 unfused=sum(r["unfused"] for r in rows))
    total["share"] = 100 * total["fused"] / total["sites"] if total["sites"] else None
    print(f"\ncoverage: conv -> BatchNorm sites dlkern.convert fuses, per model (weights=None, "
          f"{cnn_models.NUM_CLASSES} classes; read from model.dlkern_report: sites = report.sites, fused = "
          f"len(report.fused)); 'tests' is "
          f"tests/test_torchvision_convert.py's COVERAGE (fused/sites)" + (" (--quick: a subset)" if run.quick else ""))
    print_table(rows + [total], [
        ("case", "model", "{}"), ("sites", "sites", "{}"), ("fused", "fused", "{}"), ("unfused", "unfused", "{}"),
        ("share", "% fused", "{:.0f}"), ("tested", "tests", "{}"), ("convert_s", "convert s", "{:.2f}"),
        ("why_unfused", "why not fused", "{}"),
    ])
    return rows
