"""dlkern's activation family in one table, read by every layer: the ops (``dlkern.ops.activation``), the fused
conv block (``dlkern.ops.conv_bn``, ``dlkern.nn.conv``), ``dlkern.functional``, ``dlkern.convert``, the tests
and the benchmarks. tests/test_catalog.py holds it to PyTorch (defaults, module types) and to dlkern's own faces.

A leaf: it imports torch and the standard library only, never ``dlkern.ops`` or ``dlkern.nn`` (they read it).
dlkern's own module classes (Swish, HardLogistic) are named by their import path and looked up in
``sys.modules`` when a module is matched: an instance of one exists only once ``dlkern.nn.activation`` is
imported, so the lookup never needs to import it.
"""

import sys
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as TF

nn = torch.nn


class Param(NamedTuple):
    """One parameter of an activation: ``name`` as torch.nn.functional and the torch.nn module spell it (the
    module keeps it as an attribute of that name); ``default`` PyTorch's, or None for a tensor without default
    (prelu's weight)."""

    name: str
    default: Optional[float]


class Activation(NamedTuple):
    """One activation of the family (fields in the order the table gives them)."""

    name: str  # the kernels' ACT constexpr (act_fwd/act_grad in kernels/activation.py) and the ops' `act`
    function: str  # the dlkern.functional function computing it
    stock: Optional[Callable]  # the PyTorch function it reproduces; None for dlkern's own
    params: tuple = ()  # (Param, ...): the ops' p0, p1, in that order
    # (keyword, value) pairs that select this entry: a keyword of `function` and an attribute of the module
    # (gelu_tanh is gelu(approximate='tanh') and nn.GELU(approximate='tanh')).
    fixed: tuple = ()
    modules: tuple = ()  # the module types it stands for: torch.nn classes, dlkern's own by import path
    # What the out-of-place backward reads: "output" where ATen's reads the output and that is exact, else "input".
    saves: str = "input"
    # In place the input is gone: True where the backward then reads the output, exactly as ATen's relu_,
    # leaky_relu_, elu_, sigmoid_, tanh_ (so a later in-place op on the output makes the backward raise, as in
    # PyTorch); False where it keeps a copy of the input, as ATen's hardtanh_, silu_, ... (a later in-place op works).
    inplace_from_output: bool = False
    channelwise: bool = False  # p0 may be a tensor of 1 or C = x.size(1) elements (dlkern::activation_channelwise)
    fusable: bool = True  # the fused conv block computes it (learnable tensor parameters are not fused)

    @property
    def defaults(self):
        """(p0, p1) at PyTorch's defaults, 0.0 where the activation has no such parameter."""
        values = [p.default for p in self.params if p.default is not None]
        return tuple(float(v) for v in values + [0.0] * (2 - len(values)))

    def kwargs(self):
        """The keyword arguments of `function` (and of the first module type) at PyTorch's defaults."""
        return {**{p.name: p.default for p in self.params if p.default is not None}, **dict(self.fixed)}

    def module_types(self):
        """The module classes: torch.nn's, and dlkern's own once dlkern.nn is imported (left out before)."""
        return tuple(cls for cls in map(_resolve, self.modules) if cls is not None)


def _resolve(cls):
    if isinstance(cls, type):
        return cls
    module, _, name = cls.rpartition(".")
    return getattr(sys.modules.get(module), name, None)


_A = Activation
CATALOG = {a.name: a for a in (
    _A("relu", "relu", TF.relu, modules=(nn.ReLU,), saves="output", inplace_from_output=True),
    _A("leaky_relu", "leaky_relu", TF.leaky_relu, (Param("negative_slope", 0.01),), modules=(nn.LeakyReLU,),
       inplace_from_output=True),
    _A("prelu", "prelu", TF.prelu, (Param("weight", None),), modules=(nn.PReLU,), channelwise=True, fusable=False),
    _A("elu", "elu", TF.elu, (Param("alpha", 1.0),), modules=(nn.ELU,), inplace_from_output=True),
    _A("softplus", "softplus", TF.softplus, (Param("beta", 1.0), Param("threshold", 20.0)), modules=(nn.Softplus,)),
    _A("silu", "silu", TF.silu, modules=(nn.SiLU,)),
    _A("swish", "swish", None, (Param("beta", 1.0),), modules=("dlkern.nn.activation.Swish",), channelwise=True),
    _A("gelu", "gelu", TF.gelu, fixed=(("approximate", "none"),), modules=(nn.GELU,)),
    _A("gelu_tanh", "gelu", TF.gelu, fixed=(("approximate", "tanh"),), modules=(nn.GELU,)),
    _A("sigmoid", "sigmoid", torch.sigmoid, modules=(nn.Sigmoid,), saves="output", inplace_from_output=True),
    _A("tanh", "tanh", torch.tanh, modules=(nn.Tanh,), saves="output", inplace_from_output=True),
    _A("hardsigmoid", "hardsigmoid", TF.hardsigmoid, modules=(nn.Hardsigmoid,)),
    # ATen's hardswish_ saves a copy of its input (HardswishBackward0's self), as hardsigmoid_ and silu_ do.
    _A("hardswish", "hardswish", TF.hardswish, modules=(nn.Hardswish,)),
    # ReLU6 is Hardtanh(0, 6) (a subclass keeping min_val/max_val): it maps to ("hardtanh", 0.0, 6.0).
    _A("hardtanh", "hardtanh", TF.hardtanh, (Param("min_val", -1.0), Param("max_val", 1.0)),
       modules=(nn.Hardtanh, nn.ReLU6)),
    _A("hard_logistic", "hard_logistic", None, modules=("dlkern.nn.activation.HardLogistic",)),
)}
del _A

# The views the layers read.
ACTIVATIONS = tuple(CATALOG)
SAVE_OUTPUT = frozenset(n for n, a in CATALOG.items() if a.saves == "output")
INPLACE_FROM_OUTPUT = frozenset(n for n, a in CATALOG.items() if a.inplace_from_output)
CHANNELWISE = frozenset(n for n, a in CATALOG.items() if a.channelwise)
# Scalar (float) parameters per activation, for the ops' range checks; prelu's weight is a tensor in PyTorch.
SCALAR_PARAM_COUNT = {n: k for n, a in CATALOG.items() if (k := sum(p.default is not None for p in a.params))}
# What the fused conv block accepts ("none": conv + BatchNorm alone), and its (p0, p1) at PyTorch's defaults.
FUSABLE = ("none",) + tuple(n for n, a in CATALOG.items() if a.fusable)
DEFAULT_PARAMS = {n: CATALOG[n].defaults if n in CATALOG else (0.0, 0.0) for n in FUSABLE}


_candidates_by_type = {}


def _candidates(module_type):
    # The entries whose module types module_type is (a subclass of), found once per type. Caching is sound: a
    # subclass of dlkern's Swish cannot exist before dlkern.nn.activation, so its lookup sees Swish resolved.
    found = _candidates_by_type.get(module_type)
    if found is None:
        found = _candidates_by_type[module_type] = tuple(
            a for a in CATALOG.values() if any(issubclass(module_type, cls) for cls in a.module_types())
        )
    return found


def activation_spec(module):
    """``(act, p0, p1)`` for a torch.nn (or dlkern.nn) activation module, or None for one dlkern does not cover.

    ``act`` names the activation for ``act_fwd``/``act_grad`` (dlkern.kernels.activation); p0/p1 are the module's
    parameters as floats, except for PReLU's weight and a learnable Swish's beta, which are the module's
    Parameter (1 or C elements). ReLU6 maps to ``("hardtanh", 0.0, 6.0)``.
    """
    for a in _candidates(type(module)):
        if all(getattr(module, key, None) == value for key, value in a.fixed):
            values = [getattr(module, p.name) for p in a.params]
            p0, p1 = [v if isinstance(v, torch.Tensor) else float(v) for v in values] + [0.0] * (2 - len(values))
            return a.name, p0, p1
    return None


def check_activation(activation, params=()):
    """(name, p0, p1) for a fusable activation name (None: "none"); missing parameters take PyTorch's defaults."""
    if activation is None:
        activation = "none"
    if activation not in FUSABLE:
        raise ValueError(
            f"conv_bn_act2d(): unknown activation {activation!r}; fusable: {sorted(FUSABLE)} "
            "(activations with learnable parameters, such as PReLU, are not fused)"
        )
    if len(params) > 2 or not all(isinstance(p, (int, float)) and not isinstance(p, bool) for p in params):
        raise TypeError(f"conv_bn_act2d(): activation_params must be at most two floats, got {params!r}")
    p0, p1 = (*params, *DEFAULT_PARAMS[activation][len(params):])
    return activation, float(p0), float(p1)
