"""The sites of ``dlkern.convert``'s graph pass: Conv2d -> BatchNorm2d (-> activation (-> MaxPool2d)) calls in a
torch.fx graph of one module's forward (``dlkern.convert_forward`` traces it and gives the module the rewritten
forward), and :func:`fused_conv_bn`, what a rewritten forward calls for each.

On the graph a site is a conv call whose only user is a BatchNorm2d call; then, when the BatchNorm's only user is a
residual add (``+``, ``+=``, ``torch.add``, ``Tensor.add``/``add_`` of another tensor, on either side, ResNet's
blocks), that too; then, when the only user is a fusable activation (a module, a function or a tensor method,
mapped to dlkern's catalog), that too (and a residual add after it, when none came before); and when the
activation's only user is an ``nn.MaxPool2d`` whose windows do not overlap, that too (sites without a residual).
A conv whose only user is such a max pool, itself followed by a BatchNorm2d, is a site with the pool before
BatchNorm. Each site becomes one call of :func:`fused_conv_bn` on the very modules (read through ``get_attr``:
nothing moves). A BatchNorm followed by anything else is fused as far as it can be and what follows stays stock,
with a note saying so. ``dlkern.convert_forward`` builds the graphs (a Sequential's from its children).
"""

import operator
from typing import NamedTuple

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules import module as _module_globals
from torch.nn.modules.utils import _pair

import dlkern.nn as dnn
from dlkern import catalog
from dlkern.nn.conv import _has_hooks, activation_spec, fused_forward
from dlkern.ops.conv_epilogue import pool_fusable

__all__ = ["FusedSite", "fused_conv_bn"]

# Activations a site may absorb: the catalog's module types and dlkern's twins of them (exact types: a subclass may
# compute something else; activation_spec then refuses learnable ones, PReLU say).
_CATALOG_TYPES = tuple(cls for a in catalog.CATALOG.values() for cls in a.module_types())
ACTIVATION_TYPES = frozenset(t for t in (*_CATALOG_TYPES, *(getattr(dnn, n) for n in dnn.__all__))
                             if isinstance(t, type) and issubclass(t, _CATALOG_TYPES))


class FusedSite(tuple):
    """One fused conv -> BatchNorm site of a :class:`~dlkern.convert.ConversionReport`: the qualified names
    (conv, batchnorm[, activation[, maxpool]]) as a tuple ((conv, maxpool, batchnorm[, activation]) for a pool
    before BatchNorm, ``pool_before_bn``), and how: ``block`` (the dlkern block computing it, or
    the module whose converted forward does), ``activation`` (the catalog's name; "none" for none), ``residual``
    ("none", or where a residual add joined the site: "before_act", "after_act"), ``note`` (why less than what
    follows was fused)."""

    def __new__(cls, names, block, activation, note="", residual="none", pool_before_bn=False):
        site = super().__new__(cls, names)
        site.block, site.activation, site.note, site.residual = block, activation, note, residual
        site.pool_before_bn = pool_before_bn
        return site

    def __reduce__(self):
        return FusedSite, (tuple(self), self.block, self.activation, self.note, self.residual, self.pool_before_bn)

    @property
    def pooled(self):
        return self.pool_before_bn or len(self) == 4

    def __str__(self):
        note = f"; {self.note}" if self.note else ""
        pooled = ["pooled before BatchNorm" if self.pool_before_bn else "pooled"] if self.pooled else []
        how = [self.activation] + pooled + \
            ([f"residual add {self.residual.replace('_', ' ')}"] if self.residual != "none" else [])
        return f"{' + '.join(self)} into {self.block} ({', '.join(how)}){note}"


def stock_conv(module):
    """Whether `module` computes nn.Conv2d's function: a Conv2d whose class inherits forward and _conv_forward
    (a subclass changing only defaults or initialization, or a parametrized one)."""
    cls = type(module)
    return (isinstance(module, nn.Conv2d) and cls.forward is nn.Conv2d.forward
            and cls._conv_forward is nn.Conv2d._conv_forward)


def stock_bn(module):
    """Whether `module` computes nn.BatchNorm2d's function: a BatchNorm2d whose class inherits forward."""
    return isinstance(module, nn.BatchNorm2d) and type(module).forward is nn.BatchNorm2d.forward


def poolable(pool):
    """Whether a max pool after a fused activation joins its site: an exact (stock or dlkern) MaxPool2d without
    hooks whose output is a tensor (return_indices=True gives a tuple)."""
    return type(pool) in (nn.MaxPool2d, dnn.MaxPool2d) and not pool.return_indices and not _has_hooks(pool)


def fusable_windows(pool):
    """Whether the max pool's windows fit the conv block's epilogue: they do not overlap, dilation 1."""
    kernel = _pair(pool.kernel_size)
    return pool_fusable(kernel, _pair(pool.stride if pool.stride else kernel), _pair(pool.dilation))


def why_not_site(conv, bn):
    """None when conv -> bn can be fused (whatever follows), else the reason it cannot."""
    if not stock_conv(conv):
        return f"{type(conv).__name__} overrides Conv2d.forward (or _conv_forward): it may compute something else"
    if not stock_bn(bn):
        return f"{type(bn).__name__} overrides BatchNorm2d.forward: it may compute something else"
    if conv.groups != 1:
        return f"groups={conv.groups} (the fused block needs groups=1)"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} (the fused block needs 'zeros')"
    if bn.num_features != conv.out_channels:
        return f"followed by {bn!r}, which does not match its {conv.out_channels} channels"
    if _has_hooks(conv) or _has_hooks(bn):
        return "a forward or backward hook is registered on the conv or BatchNorm (fusing would skip it)"
    return None


def why_not_activation(act):
    """None when the module `act` after a BatchNorm can join its site, else why not."""
    if type(act) not in ACTIVATION_TYPES:
        return f"followed by {type(act).__name__}, not an activation dlkern fuses"
    try:
        activation_spec(act, "dlkern.convert")
    except NotImplementedError:
        return f"followed by {act!r}: activations with learnable parameters are not fused"
    if _has_hooks(act):
        return "a forward or backward hook is registered on the activation (fusing would skip it)"
    return None


# ----------------------------------------------------------------------------------------- activations as calls

_F = torch.nn.functional
# Functions and tensor methods computing a catalog activation: key -> (callable, catalog name, the names of the
# arguments after the input, in order). "relu6" is hardtanh(0, 6); "gelu" picks gelu/gelu_tanh by `approximate`.
_FUNCTIONS = {
    "torch.nn.functional.relu": (_F.relu, "relu", ("inplace",)),
    "torch.relu": (torch.relu, "relu", ()),
    "torch.relu_": (torch.relu_, "relu", ()),
    "torch.nn.functional.leaky_relu": (_F.leaky_relu, "leaky_relu", ("negative_slope", "inplace")),
    "torch.nn.functional.leaky_relu_": (_F.leaky_relu_, "leaky_relu", ("negative_slope",)),
    "torch.nn.functional.elu": (_F.elu, "elu", ("alpha", "inplace")),
    "torch.nn.functional.elu_": (_F.elu_, "elu", ("alpha",)),
    "torch.nn.functional.softplus": (_F.softplus, "softplus", ("beta", "threshold")),
    "torch.nn.functional.silu": (_F.silu, "silu", ("inplace",)),
    "torch.nn.functional.gelu": (_F.gelu, "gelu", ("approximate",)),
    "torch.sigmoid": (torch.sigmoid, "sigmoid", ()),
    "torch.sigmoid_": (torch.sigmoid_, "sigmoid", ()),
    "torch.tanh": (torch.tanh, "tanh", ()),
    "torch.tanh_": (torch.tanh_, "tanh", ()),
    "torch.nn.functional.hardsigmoid": (_F.hardsigmoid, "hardsigmoid", ("inplace",)),
    "torch.nn.functional.hardswish": (_F.hardswish, "hardswish", ("inplace",)),
    "torch.nn.functional.hardtanh": (_F.hardtanh, "hardtanh", ("min_val", "max_val", "inplace")),
    "torch.nn.functional.hardtanh_": (_F.hardtanh_, "hardtanh", ("min_val", "max_val")),
    "torch.nn.functional.relu6": (_F.relu6, "relu6", ("inplace",)),
    **{f"Tensor.{m}": (getattr(torch.Tensor, m), m.rstrip("_"), ())
       for m in ("relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_")},
}
_KEY_OF_FUNCTION = {fn: key for key, (fn, _, _) in _FUNCTIONS.items() if not key.startswith("Tensor.")}
_ADDS = {operator.add, operator.iadd, torch.add}
_IN_PLACE_ADDS = {operator.iadd, "add_"}  # they write their first operand: only the site's own output may be it


def _call_spec(key, args, kwargs):
    """(name, p0, p1) of the activation call `key`(input, *args, **kwargs), or a str saying why it is not fused."""
    _, entry, names = _FUNCTIONS[key]
    if len(args) > len(names) or set(kwargs) - set(names):
        return f"{key} is called with arguments dlkern does not read"
    bound = {**dict(zip(names, args)), **kwargs}
    if any(isinstance(v, fx.Node) for v in bound.values()):
        return f"{key} takes an argument computed in forward"
    bound.pop("inplace", None)  # the BatchNorm's output has no other user: in place or not is the same
    if entry == "relu6":
        return catalog.check_activation("hardtanh", (0.0, 6.0))
    if entry == "gelu":
        approximate = bound.pop("approximate", "none")
        if approximate not in ("none", "tanh"):
            return f"gelu(approximate={approximate!r})"
        entry = "gelu" if approximate == "none" else "gelu_tanh"
    params = tuple(bound.get(p.name, p.default) for p in catalog.CATALOG[entry].params)
    try:
        return catalog.check_activation(entry, params)
    except (TypeError, ValueError) as e:
        return str(e)


def _describe(node):
    if node.op == "call_module":
        return str(node.target)
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    return getattr(node.target, "__name__", str(node.target))


# ------------------------------------------------------------------------------------------------ the runtime


@fx.wrap
def fused_conv_bn(input, conv, bn, activation, pool, residual=None, residual_at="none", pool_before_bn=False):
    """``pool(activation(bn(conv(input))))`` as dlkern's fused op, from the modules as they are now: a converted
    forward's call for one site. ``activation``: None (none), an activation module, or a constant describing a
    function or method call (name, p0, p1, key in _FUNCTIONS, args, kwargs items); ``pool``: None or a MaxPool2d;
    ``residual``: a tensor added to the BatchNorm's output (``residual_at="before_act"``) or to the activation's
    (``"after_act"``); ``pool_before_bn``: the pool sits between the conv and BatchNorm. While any of the modules
    has a hook (or a global module hook is registered), or a module there no longer computes the stock op
    (replaced after conversion), it calls them one by one as the stock forward does."""
    spec = _spec_now(conv, bn, activation, pool)
    if spec is None:
        out = bn(pool(conv(input))) if pool_before_bn else bn(conv(input))
        if residual_at == "before_act":
            out = out + residual
        if isinstance(activation, tuple):
            out = _FUNCTIONS[activation[3]][0](out, *activation[4], **dict(activation[5]))
        elif activation is not None:
            out = activation(out)
        if residual_at == "after_act":
            out = out + residual
        return out if pool is None or pool_before_bn else pool(out)
    if residual is None and not pool_before_bn:
        return fused_forward(input, conv, bn, spec, pool, "dlkern.convert")
    return fused_forward(input, conv, bn, spec, pool, "dlkern.convert", residual, residual_at, pool_before_bn)


def _spec_now(conv, bn, activation, pool):
    if (_module_globals._global_forward_hooks or _module_globals._global_forward_pre_hooks
            or _module_globals._global_backward_hooks or _module_globals._global_backward_pre_hooks):
        return None
    if why_not_site(conv, bn) is not None or (pool is not None and not poolable(pool)):
        return None
    if activation is None:
        return "none", 0.0, 0.0
    if isinstance(activation, tuple):
        return activation[:3]
    if type(activation) not in ACTIVATION_TYPES or _has_hooks(activation):  # why_not_activation, spec computed once
        return None
    try:
        return activation_spec(activation, "dlkern.convert")
    except NotImplementedError:
        return None


# ------------------------------------------------------------------------------------------------- the sites


class _Site(NamedTuple):
    conv: fx.Node
    bn: fx.Node
    act: object  # None, or the activation's node
    act_arg: object  # what fused_conv_bn takes for it: None, a module target (str) or a call constant (tuple)
    pool: object  # None or the pool's node
    names: tuple
    activation: str
    note: str
    add: object = None  # None or the residual add's node
    residual: object = None  # the residual: the add's other operand
    residual_at: str = "none"  # "before_act" or "after_act" with an add
    pool_before_bn: bool = False  # the pool node sits between the conv and the BatchNorm

    def fused(self, block):
        """The report's FusedSite of this site, computed by `block`."""
        return FusedSite(self.names, block, self.activation, self.note, self.residual_at, self.pool_before_bn)


def _module_at(root, node, kind):
    if node.op != "call_module":
        return None
    module = root.get_submodule(node.target)
    return module if isinstance(module, kind) else None


def _find_sites(graph, root, name):
    """(sites, unfused (conv, bn, why), skipped (conv, why)) among the call_module nodes of `graph`, names
    qualified by `name`."""
    sites, unfused, skipped = [], [], []
    q = lambda target: f"{name}.{target}" if name else target  # noqa: E731
    for node in graph.nodes:
        conv = _module_at(root, node, nn.Conv2d)
        if conv is None:
            continue
        users = list(node.users)
        bn_nodes = [u for u in users if _module_at(root, u, nn.BatchNorm2d) is not None]
        if not bn_nodes:
            after = users[0] if len(users) == 1 else None
            bn_after = [u for u in after.users if _module_at(root, u, nn.BatchNorm2d) is not None] if after else []
            if bn_after and (_module_at(root, after, nn.MaxPool2d) is not None
                             or getattr(after.target, "__name__", "") in ("max_pool2d", "_max_pool2d")):
                bn_node = bn_after[0]  # Conv -> MaxPool -> BatchNorm (fast CIFAR-10 nets)
                why = why_not_site(conv, root.get_submodule(bn_node.target)) or _why_not_pool_before_bn(
                    root, node, after, bn_node)
                if why is not None:
                    unfused.append((q(node.target), q(bn_node.target), why))
                else:
                    sites.append(_site(root, node, bn_node, q, pre_pool=after))
            else:
                skipped.append((q(node.target), "not followed by an nn.BatchNorm2d"))
            continue
        for bn_node in bn_nodes:
            bn = root.get_submodule(bn_node.target)
            why = why_not_site(conv, bn)
            if why is None and len(users) > 1:
                why = f"the conv's output is used {len(users)} times (fusing needs the BatchNorm2d its only user)"
            if why is None and (len(node.args) != 1 or node.kwargs or bn_node.args != (node,) or bn_node.kwargs):
                why = "the conv or BatchNorm2d is called with more arguments than its input"
            if why is not None:
                unfused.append((q(node.target), q(bn_node.target), why))
                continue
            sites.append(_site(root, node, bn_node, q))
    return sites, unfused, skipped


def _why_not_pool_before_bn(root, conv, pool, bn):
    """None when the max pool `pool` between `conv` and `bn` joins the site, else why not."""
    module = _module_at(root, pool, nn.Module)
    if module is None or not poolable(module):
        return ("the max pool between the conv and its BatchNorm2d is not an nn.MaxPool2d dlkern fuses (a function "
                "call, return_indices, a hook)")
    if not fusable_windows(module):
        return f"the max pool between the conv and its BatchNorm2d has overlapping windows or dilation: {module!r}"
    if len(pool.users) != 1 or len(bn.users) < 1:
        return f"the max pool's output is used {len(pool.users)} times"
    if len(conv.args) != 1 or conv.kwargs or pool.args != (conv,) or pool.kwargs or bn.args != (pool,) or bn.kwargs:
        return "the conv, max pool or BatchNorm2d is called with more arguments than its input"
    return None


def _only_user(node):
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _residual_add(node, source):
    """(the add node, the residual) when `node` adds another tensor to `source` (source + r, r + source, in place
    only into source), else None."""
    if node is None or node.kwargs.get("alpha", 1) != 1 or set(node.kwargs) - {"alpha"}:
        return None
    if not ((node.op == "call_function" and node.target in _ADDS)
            or (node.op == "call_method" and node.target in ("add", "add_"))):
        return None
    if len(node.args) != 2 or source not in node.args:
        return None
    other = node.args[1] if node.args[0] is source else node.args[0]
    if not isinstance(other, fx.Node) or other is source:
        return None
    in_place = node.target in _IN_PLACE_ADDS
    return None if in_place and node.args[0] is not source else (node, other)


def _site(root, conv, bn, q, pre_pool=None):
    """The site from conv -> bn (conv -> pre_pool -> bn): what follows the BatchNorm joins it where it can, else a
    note says why not."""
    if pre_pool is not None:  # with the pool inside the conv's epilogue: the activation joins, nothing after it
        names = (q(conv.target), q(pre_pool.target), q(bn.target))
        act, arg, spec, note = _activation(root, _only_user(bn), bn) if _only_user(bn) else (None, None, None, "")
        if act is not None:
            names += (q(act.target) if act.op == "call_module" else _call_name(act),)
        return _Site(conv, bn, act, arg, pre_pool, names, spec[0] if act else "none", note, pool_before_bn=True)
    names = (q(conv.target), q(bn.target))
    nxt = _only_user(bn)
    if nxt is None:
        note = f"conv -> BatchNorm fused; the BatchNorm2d's output is used {len(bn.users)} times"
        return _Site(conv, bn, None, None, None, names, "none", note)
    add, residual, residual_at, last = None, None, "none", bn
    found = _residual_add(nxt, bn)
    if found is not None:  # ResNet's order: BatchNorm, the residual add, the activation
        (add, residual), residual_at, last = found, "before_act", found[0]
        nxt = _only_user(add)
        if nxt is None:
            return _Site(conv, bn, None, None, None, names, "none", "", add, residual, residual_at)
    act, arg, spec, note = _activation(root, nxt, last)
    if act is None:
        return _Site(conv, bn, None, None, None, names, "none", "" if add is not None else note, add, residual,
                     residual_at)
    names += (q(act.target) if act.op == "call_module" else _call_name(act),)
    after = _only_user(act)
    if add is None and (found := _residual_add(after, act)) is not None:  # act(bn(conv(x))) + r
        return _Site(conv, bn, act, arg, None, names, spec[0], "", *found, "after_act")
    pool, note = None, ""
    if add is None and after is not None and after.args == (act,) and not after.kwargs:
        module = _module_at(root, after, nn.Module)
        if module is not None and poolable(module):
            if fusable_windows(module):
                pool = after
                names += (q(pool.target),)
            else:  # ResNet's stem: 3x3 windows, stride 2
                note = f"the max pool after it stays stock: {module!r} has overlapping windows or dilation"
    return _Site(conv, bn, act, arg, pool, names, spec[0], note, add, residual, residual_at)


def _call_name(node):
    args = [repr(a) for a in node.args[1:]] + [f"{k}={v!r}" for k, v in node.kwargs.items()]
    return f"{_describe(node)}({', '.join(args)})"


def _activation(root, node, bn):
    """(node, fused_conv_bn's argument, (name, p0, p1), "") when `node` is a fusable activation of `bn` (the
    BatchNorm's output, or the residual add's), else (None, None, None, why it is not)."""
    key = None
    if node.op == "call_function":
        key = _KEY_OF_FUNCTION.get(node.target)
    elif node.op == "call_method":
        key = f"Tensor.{node.target}"
    if node.op == "call_module":
        module = root.get_submodule(node.target)
        why = why_not_activation(module)
        if why is None and (node.args != (bn,) or node.kwargs):
            why = f"{node.target} is called with more arguments than its input"
        if why is None:
            return node, node.target, activation_spec(module), ""
    elif node.op == "output":
        why = "the forward returns it"
    elif node.target in _ADDS or (node.op == "call_method" and node.target in ("add", "add_")):
        why = "an add that is not a residual dlkern fuses (a scalar, alpha, or in place into the other operand)"
    elif key in _FUNCTIONS and node.args[:1] == (bn,):
        spec = _call_spec(key, node.args[1:], node.kwargs)
        if isinstance(spec, tuple):
            return node, (*spec, key, tuple(node.args[1:]), tuple(node.kwargs.items())), spec, ""
        why = spec
    else:
        why = f"followed by {_describe(node)}, not an activation dlkern fuses"
    return None, None, None, f"conv -> BatchNorm fused; {why}"


def _rewrite(graph, site):
    """One fused_conv_bn call in place of the site's nodes."""
    if site.pool_before_bn:
        nodes = [n for n in (site.conv, site.pool, site.bn, site.act) if n is not None]
    elif site.residual_at == "before_act":
        nodes = [n for n in (site.conv, site.bn, site.add, site.act) if n is not None]
    else:
        nodes = [n for n in (site.conv, site.bn, site.act, site.add, site.pool) if n is not None]
    last = nodes[-1]
    with graph.inserting_before(last):
        act = graph.get_attr(site.act_arg) if isinstance(site.act_arg, str) else site.act_arg
        pool = graph.get_attr(site.pool.target) if site.pool is not None else None
        args = (site.conv.args[0], graph.get_attr(site.conv.target), graph.get_attr(site.bn.target), act, pool)
        if site.add is not None or site.pool_before_bn:
            args += (site.residual, site.residual_at, site.pool_before_bn)
        fused = graph.call_function(fused_conv_bn, args)
    fused.meta["is_wrapped"] = True  # the generated code registers it with torch.fx.wrap: re-tracing keeps the call
    last.replace_all_uses_with(fused)
    for node in reversed(nodes):
        graph.erase_node(node)
