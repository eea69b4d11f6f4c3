"""The activation catalog (dlkern/catalog.py) against PyTorch and against every face of dlkern that reads it, and
dlkern's import graph: no circle, the catalog and the flag leaf import nothing of dlkern, kernels/ nothing of the
op layer.

What the kernels compute for each name is tested in test_activation.py (test_forward_backward runs every name
through dlkern.functional against PyTorch in float64; test_opcheck runs every name through every op); here
only that those tests cover every name."""

import ast
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dlkern.functional as F
import dlkern.nn as dnn
from dlkern import catalog
from dlkern.catalog import CATALOG
from dlkern.kernels import activation as kernels

ROOT = Path(__file__).resolve().parent.parent
_NOT_PARAMS = {"input", "self", "inplace"}


def _defaults(function):
    """{parameter: default, None where it has none} of a Python function, or of the ATen op a builtin binds."""
    try:
        params = inspect.signature(function).parameters.values()
        return {p.name: None if p.default is p.empty else p.default for p in params}
    except ValueError:  # a builtin (F.softplus, F.gelu, F.prelu, torch.sigmoid): its ATen schema
        schema = getattr(torch.ops.aten, function.__name__).default._schema
        return {a.name: a.default_value for a in schema.arguments}


def _spec(*values):
    return tuple(v.tolist() if isinstance(v, torch.Tensor) else v for v in values)


@pytest.mark.parametrize("name", list(CATALOG))
def test_parameters_and_defaults_are_pytorchs(name):
    """Each entry's parameters are named and defaulted as in torch.nn.functional (or its ATen op), its module
    types' constructors and dlkern.functional; the keywords that select the entry exist there."""
    a = CATALOG[name]
    expected = {p.name: p.default for p in a.params}
    functions = [getattr(F, a.function)] + ([a.stock] if a.stock is not None else [])
    for function in functions:
        found = _defaults(function)
        assert {k: v for k, v in found.items() if k not in _NOT_PARAMS | dict(a.fixed).keys()} == expected, function
        assert all(k in found for k, _ in a.fixed), function
    for cls in a.module_types():
        init = _defaults(cls.__init__)
        assert all(init[p] == default for p, default in expected.items() if p in init), cls
        assert all(getattr(cls(**{k: v for k, v in a.kwargs().items() if k in init}), k) == v for k, v in a.fixed)
    assert a.defaults == tuple(float(p.default) for p in a.params if p.default is not None) + (0.0,) * (
        2 - sum(p.default is not None for p in a.params))


def test_every_module_type_maps():
    """Each module type of the catalog, built at the defaults (ReLU6 as it is), and its dlkern.nn twin map to the
    entry's name and defaults; every dlkern.nn activation class maps; modules dlkern does not cover map to None."""
    seen = set()
    for a in CATALOG.values():
        assert len(a.module_types()) == len(a.modules), a.name  # dlkern's own resolve once dlkern.nn is imported
        for cls in a.module_types():
            module = cls(**a.kwargs()) if cls is a.module_types()[0] else cls()
            spec = catalog.activation_spec(module)
            if a.channelwise and a.params[0].default is None:  # prelu: its weight Parameter
                assert spec == (a.name, module.weight, 0.0)
            elif cls is torch.nn.ReLU6:
                assert spec == ("hardtanh", 0.0, 6.0)
            else:
                assert spec == (a.name, *a.defaults), cls
            twin = getattr(dnn, cls.__name__, None)
            if twin is not None and twin is not cls:
                assert issubclass(twin, cls)
                assert _spec(*catalog.activation_spec(twin(**a.kwargs()))) == _spec(*spec)
                seen.add(twin)
            seen.add(cls)
    from dlkern.nn import activation

    assert {getattr(activation, n) for n in activation.__all__} <= seen
    assert catalog.activation_spec(torch.nn.GELU(approximate="tanh"))[0] == "gelu_tanh"
    for module in (torch.nn.Identity(), torch.nn.Mish(), torch.nn.SELU(), torch.nn.CELU(), torch.nn.Softmax(1)):
        assert catalog.activation_spec(module) is None


def test_convert_has_a_twin_for_every_stock_type():
    """dlkern.convert swaps each stock module type of the catalog for a dlkern twin that computes the same."""
    convert = sys.modules["dlkern.convert"]
    for a in CATALOG.values():
        for cls in a.module_types():
            if cls.__module__.startswith("torch."):
                module = cls()
                twin = convert._twin(module)
                assert type(twin).__module__ == "dlkern.nn.activation"
                assert _spec(*catalog.activation_spec(twin)) == _spec(*catalog.activation_spec(module))
                assert cls in convert._ACTIVATION_TYPES and type(twin) in convert._ACTIVATION_TYPES


def test_views():
    """The sets the layers read are the table's columns (spelled out: a change here is a change of behaviour)."""
    assert catalog.ACTIVATIONS == (
        "relu", "leaky_relu", "prelu", "elu", "softplus", "silu", "swish", "gelu", "gelu_tanh", "sigmoid", "tanh",
        "hardsigmoid", "hardswish", "hardtanh", "hard_logistic",
    )
    assert catalog.SAVE_OUTPUT == {"sigmoid", "tanh", "relu"}
    assert catalog.INPLACE_FROM_OUTPUT == {"sigmoid", "tanh", "relu", "leaky_relu", "elu"}
    assert catalog.CHANNELWISE == {"prelu", "swish"}
    assert catalog.SCALAR_PARAM_COUNT == {"leaky_relu": 1, "elu": 1, "softplus": 2, "swish": 1, "hardtanh": 2}
    assert catalog.FUSABLE == ("none",) + tuple(n for n in catalog.ACTIVATIONS if n != "prelu")
    assert catalog.DEFAULT_PARAMS == {
        "none": (0.0, 0.0), "relu": (0.0, 0.0), "leaky_relu": (0.01, 0.0), "elu": (1.0, 0.0),
        "softplus": (1.0, 20.0), "silu": (0.0, 0.0), "swish": (1.0, 0.0), "gelu": (0.0, 0.0),
        "gelu_tanh": (0.0, 0.0), "sigmoid": (0.0, 0.0), "tanh": (0.0, 0.0), "hardsigmoid": (0.0, 0.0),
        "hardswish": (0.0, 0.0), "hardtanh": (-1.0, 1.0), "hard_logistic": (0.0, 0.0),
    }
    assert catalog.check_activation(None) == ("none", 0.0, 0.0)
    assert catalog.check_activation("softplus", (2,)) == ("softplus", 2.0, 20.0)
    with pytest.raises(ValueError, match=r"unknown activation 'prelu'; fusable: \['elu', "):
        catalog.check_activation("prelu")
    # The layers read these very objects.
    from dlkern.ops import activation as ops, conv_block

    assert ops.ACTIVATIONS is catalog.ACTIVATIONS and ops.SAVE_OUTPUT is catalog.SAVE_OUTPUT
    assert ops.activation_spec is catalog.activation_spec and conv_block.check_activation is catalog.check_activation


def test_kernels_and_tests_cover_every_name():
    """act_fwd/act_grad branch on exactly the catalog's names (the backward from the output and the parameter
    gradient on theirs), and test_activation runs every name through the kernels against PyTorch."""
    def branches(helper):
        tree = ast.parse(inspect.getsource(helper.fn))
        return {node.comparators[0].value for node in ast.walk(tree) if isinstance(node, ast.Compare)
                and isinstance(node.left, ast.Name) and node.left.id == "ACT"}

    assert branches(kernels.act_fwd) == branches(kernels.act_grad) == set(catalog.ACTIVATIONS)
    assert catalog.SAVE_OUTPUT | catalog.INPLACE_FROM_OUTPUT <= branches(kernels.act_grad_from_output)
    assert branches(kernels.act_grad_param) == catalog.CHANNELWISE
    import test_activation

    assert set(catalog.ACTIVATIONS) <= set(test_activation.CASE_IDS)
    assert {m[0] for m in test_activation.MODULES} == {
        cls.__name__ for a in CATALOG.values() for cls in a.module_types() if hasattr(dnn, cls.__name__)
        and cls.__module__.startswith("torch.")}


def test_conv_bn_act2d_documents_every_fusable_name():
    doc = F.conv_bn_act2d.__doc__
    for name, a in CATALOG.items():
        if a.fusable:
            assert f"'{name}'" in doc, name
            assert all(p.name in doc for p in a.params), name


# ---------------------------------------------------------------------------------------------------- imports


def _module_files():
    """{dotted name: path} of dlkern's Python modules (kernels/ is dlkern.kernels)."""
    files = {}
    for package, folder in (("dlkern", ROOT / "dlkern"), ("dlkern.kernels", ROOT / "kernels")):
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            files[".".join([package] + parts)] = path
    return files


def _import_graph():
    """{module: modules of dlkern it imports anywhere (in functions too)}; a package's __init__ is its own node,
    `from package import submodule` an edge to the submodule. Edges to a module's own packages are left out:
    Python runs those before the module anyway (`from dlkern import _C` is not a circle through dlkern's
    __init__)."""
    files = _module_files()
    graph = {}
    for name, path in files.items():
        edges = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name in files}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
                for a in node.names:
                    edges.add(f"{base}.{a.name}" if f"{base}.{a.name}" in files else base)
        graph[name] = {e for e in edges if e in files and e != name and not name.startswith(e + ".")}
    return graph


def _reachable(graph, start):
    seen, todo = set(), [start]
    while todo:
        for m in graph[todo.pop()] - seen:
            seen.add(m)
            todo.append(m)
    return seen


def test_no_import_circle():
    graph = _import_graph()
    assert {"dlkern.catalog", "dlkern._interpret", "dlkern.kernels.activation", "dlkern.functional"} <= set(graph)
    circles = sorted(m for m in graph if m in _reachable(graph, m))
    assert not circles, {m: sorted(graph[m]) for m in circles}


def test_layers():
    """The catalog and the version adaptations are leaves, the interpreter flag reads only the latter (it fixes
    an old interpreter); kernels/ imports only itself and the flag; the op layer nothing above it."""
    graph = _import_graph()
    assert _reachable(graph, "dlkern.catalog") == set() and _reachable(graph, "dlkern._compat") == set()
    assert _reachable(graph, "dlkern._interpret") == {"dlkern._compat"}
    flag = {"dlkern._interpret", "dlkern._compat"}
    for name in graph:
        if name.startswith("dlkern.kernels"):
            assert _reachable(graph, name) <= flag | {m for m in graph if m.startswith("dlkern.kernels")}
        if name.startswith("dlkern.ops"):
            assert not {m for m in _reachable(graph, name) if m.startswith(("dlkern.nn", "dlkern.functional",
                                                                            "dlkern.convert"))}, name


def test_leaves_import_alone():
    """In a fresh interpreter, with the dlkern package bare (its __init__, which imports every layer, not run):
    the catalog, the flag and the kernels load without dlkern's op, functional or nn layers."""
    code = """if True:
        import importlib.util, sys
        sys.modules["dlkern"] = importlib.util.module_from_spec(importlib.util.find_spec("dlkern"))
        import dlkern.catalog, dlkern._interpret, dlkern.kernels.activation, dlkern.kernels.conv_bn
        print(" ".join(sorted(m for m in sys.modules if m.startswith("dlkern"))))
    """
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["dlkern", "dlkern._compat", "dlkern._interpret", "dlkern.catalog", "dlkern.kernels",
                                  "dlkern.kernels.activation", "dlkern.kernels.conv_bn"]
