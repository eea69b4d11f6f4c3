"""``dlkern.convert``: put dlkern's kernels into an existing model without changing its module tree or its
state_dict keys.

Every Conv2d -> BatchNorm2d site is fused, with what follows it where that can join (a residual add before or
after the activation, the activation as a module or a function, a max pool after it; or a max pool between the
conv and BatchNorm), in the forward of the module calling it: ``dlkern.convert_forward`` gives that module a
forward (torch.fx's graph of its own) that runs each site (found and rewritten by ``dlkern.convert_graph``) as one
fused call of ``dlkern.convert_graph.fused_conv_bn`` on the very same modules, read by name on every call. Nothing
moves: module names, classes and objects, state_dict keys, ``named_parameters()`` names and order, attributes and
hooks stay the stock model's. An ``nn.Sequential`` running ``nn.Sequential.forward`` is such a module like any
other (its graph calls each child by its own name, in order; ``seq[i]`` stays the module the user put there, the
sites' activations and pools the stock ones too).

Conv2d/BatchNorm2d subclasses that inherit ``forward`` count as the stock ops; a subclass overriding it, a run with
a hook already registered on one of its modules, groups != 1 or a padding mode other than zeros is left alone,
reported. A BatchNorm followed by nothing fusable (a learnable PReLU, an add of a scalar, nothing) is fused as
conv -> BatchNorm, what follows staying stock. Standalone activations and ``nn.MaxPool2d`` become their dlkern
twins, sharing the original's parameters. A forward torch.fx cannot trace keeps the class's own forward, unfused,
the reason in the report (its children are still converted).

What conversion changes that users can observe is the contract in :func:`convert`'s docstring.
"""

import copy
import logging
from dataclasses import dataclass, field

from torch import nn

import dlkern.nn as dnn
from dlkern import catalog
from dlkern.convert_forward import fuse_forward, runs_children_in_order
from dlkern.convert_graph import ACTIVATION_TYPES as _ACTIVATION_TYPES  # noqa: F401 (tests/test_catalog.py)
from dlkern.convert_graph import FusedSite
from dlkern.nn.conv import _has_hooks

__all__ = ["convert", "ConversionReport", "FusedSite"]

log = logging.getLogger(__name__)

# Stock module type -> its dlkern twin class, from the catalog: each entry's torch.nn module types map to the
# dlkern.nn class named as the entry's first one (ReLU6, Hardtanh(0, 6), to dlkern's Hardtanh); and the max pool.
# Exact types only: a subclass may compute something else. Every dlkern twin subclasses the stock class whose
# attributes it takes over (_twin); tests/test_catalog.py checks every stock type has one.
_TWINS = {
    **{cls: getattr(dnn, entry.modules[0].__name__) for entry in catalog.CATALOG.values() for cls in entry.modules
       if isinstance(cls, type) and cls.__module__.startswith("torch.nn")},
    nn.MaxPool2d: dnn.MaxPool2d,
}
_DLKERN_TYPES = {getattr(dnn, name) for name in dnn.__all__}


@dataclass
class ConversionReport:
    """What :func:`convert` did, by qualified module name (as in ``named_modules()``).

    ``fused``: one :class:`FusedSite` per Conv2d -> BatchNorm2d site now fused: a tuple of the stock names (conv,
    batchnorm[, activation[, maxpool]]) (an activation function is named by its call, ``relu(inplace=True)``), with
    ``block`` (the converted forward computing it: ``"Sequential.forward of features"``, ``"BasicBlock.forward of
    layer1.0"``), ``activation``, ``residual`` and ``pool_before_bn`` (what joined it) and ``note`` (what follows
    and stays stock, and why: a learnable PReLU, a stem's overlapping max pool, say). A
    model converted again lists its fused sites again. ``unfused``: (conv, batchnorm, why) for each site left
    alone. ``replaced``: (name, stock type, dlkern type). ``skipped``: (name, why) for everything left as it was,
    the unfused convs included.
    """

    fused: list = field(default_factory=list)
    replaced: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    unfused: list = field(default_factory=list)

    @property
    def sites(self):
        """How many Conv2d -> BatchNorm2d sites the model's forwards call (fused or not)."""
        return len(self.fused) + len(self.unfused)

    def __str__(self):
        lines = [f"dlkern.convert: fused {len(self.fused)} of {self.sites} Conv2d-BatchNorm2d sites, "
                 f"replaced {len(self.replaced)} modules, left {len(self.skipped)} as they were"]
        lines += [f"  fused    {site}" for site in self.fused]
        lines += [f"  replaced {name}: {old} -> dlkern.nn.{new}" for name, old, new in self.replaced]
        lines += [f"  skipped  {name}: {why}" for name, why in self.skipped]
        return "\n".join(lines)


def convert(module, inplace=False):
    """``module`` with dlkern's kernels in it: each Conv2d -> BatchNorm2d site fused with what follows it where that
    can join (an activation, module or function; then an ``nn.MaxPool2d`` without ``return_indices``), in the
    forward of the module calling it (an ``nn.Sequential``'s too); standalone activations and ``nn.MaxPool2d``
    swapped for dlkern's (details in the ``dlkern.convert`` module docstring).

    ``inplace=False`` (default) converts a deep copy and leaves ``module`` untouched. The returned model
    carries a :class:`ConversionReport` as ``dlkern_report``; the replacements are logged at INFO level, what
    could not be converted and why at DEBUG level (logger ``dlkern.convert``).

    What a user can observe (the contract):

    - The whole model computes the same function as the stock one, in train and eval mode (gradients and
      running statistics included; a conv bias ahead of BatchNorm gets an exact zero gradient, see
      ``ConvBNReLU2d``). Converting a converted model changes nothing and lists the same fused sites.
    - The module tree is the stock one: the same names and objects (an ``inplace=True`` conversion keeps the very
      convs, BatchNorms and other modules, and every Parameter), so ``state_dict``/``load_state_dict`` with
      ``strict=True`` both ways, ``named_parameters()`` names and order, ``get_parameter`` and parameter groups by
      name are the stock model's; deepcopy, pickle and ``torch.save(model)`` round trip (a new process that
      unpickles it imports dlkern). What changes: stock activation and max pool modules become their dlkern twins
      (listed in ``replaced``; the same names, parameters and buffers), except those a site in a Sequential
      absorbed, which stay the stock objects.
    - A module whose forward was converted (listed as a site's ``block``) keeps its class's name, ``repr`` and
      ``isinstance``, but its ``__class__`` is a cached subclass running the traced forward: ``type(m) is
      nn.Sequential`` (or ``is Block``) no longer holds. That forward runs only while the module's mode, plain
      attributes (numbers, flags, None), its children's names in order (and which are None), the names inside a
      ModuleList/ModuleDict its forward loops over, and the number of arguments are as traced; otherwise the
      class's own forward runs (unfused). So appending, inserting or deleting in a converted Sequential (or a
      ModuleList a forward loops over) computes the stock function, unfused until ``dlkern.convert`` runs again.
      Python side effects of a stock forward (prints, counters) happen at conversion only.
    - Sequentials: ``seq[i]`` is the stock module, ``len`` and iteration are the stock ones, and a slice
      ``seq[a:b]`` is a plain ``nn.Sequential`` (the class of the stock one's slice) of the stock modules,
      computing them one by one. Assigning ``seq[i] = module`` at any index is computed: a site reads its modules
      on every call, fused while they still fuse (``seq[2] = nn.Tanh()`` makes that site conv -> BN -> tanh),
      called one by one as the stock Sequential does where not (a non-activation, a learnable one, a BatchNorm
      folded away to ``nn.Identity``).
    - Hooks registered later on a conv, BatchNorm, activation or pool of a site (forward, forward-pre, backward;
      ``torch.nn.utils.prune``'s forward-pre-hook too), or a global module hook, run: that site then calls its
      modules one by one, as stock. Hooks on the module owning the forward run as on the stock one.
    - ``torch.jit.script`` raises a clear error (a converted forward is not scriptable); ``torch.jit.trace``,
      ``torch.export`` and ``torch.compile`` (``fullgraph=True`` too) work.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"dlkern.convert: expected an nn.Module, got {type(module).__name__}")
    root = module if inplace else copy.deepcopy(module)
    report = ConversionReport()
    root = _convert(root, "", report, memo={})
    order = {name: i for i, (name, _) in enumerate(root.named_modules(remove_duplicate=False))}
    for entries in (report.fused, report.unfused, report.skipped):  # in the model's order, not the walk's
        entries.sort(key=lambda entry: order.get(entry[0], len(order)))
    root.dlkern_report = report
    for site in report.fused:
        log.info("fused %s", site)
    for name, old, new in report.replaced:
        log.info("replaced %s: %s -> dlkern.nn.%s", name or "<root>", old, new)
    for name, why in report.skipped:
        log.debug("left %s as it is: %s", name or "<root>", why)
    return root


def _qualify(prefix, name):
    return f"{prefix}.{name}" if prefix else name


def _convert(module, name, report, memo):
    """The converted `module` (itself, changed in place, or its twin). `memo` keeps shared modules shared: it maps
    id(module) to (module, result), holding `module` alive so that its id cannot be reused (by a module created
    later in this conversion) while the memo exists."""
    if id(module) in memo:
        return memo[id(module)][1]
    result = module
    if type(module) in _TWINS and _has_hooks(module):
        report.skipped.append((name, "a forward or backward hook is registered on it (a twin would drop it)"))
    elif type(module) in _TWINS:
        result = _twin(module)
        report.replaced.append((name, type(module).__name__, type(result).__name__))
    elif type(module) not in _DLKERN_TYPES:  # a dlkern module (ConvBNReLU2d holds stock ones) is done already
        # Sequential's own forward (torchvision's Conv2dNormActivation's too) calls each child once, in order: its
        # sites are fused before its children are converted, so the modules a site absorbs stay the stock ones
        # (seq[i] is what the user put there). Any other forward may call one module in several places: it is
        # traced after its children are converted (a shared activation is the twin there and everywhere).
        in_order = runs_children_in_order(module)
        absorbed = _fuse_forward(module, name, report) if in_order else ()
        for child_name, child in list(module._modules.items()):
            if child is not None and child_name not in absorbed:
                new = _convert(child, _qualify(name, child_name), report, memo)
                if new is not child:
                    module._modules[child_name] = new
        if not in_order:
            _fuse_forward(module, name, report)
    memo[id(module)] = (module, result)
    return result


def _fuse_forward(module, name, report):
    """Fuse the sites `module`'s own forward calls (dlkern.convert_forward) and report them; returns the names
    of its children the fused sites absorbed."""
    fused, unfused, skipped = fuse_forward(module, name)
    report.fused += fused
    report.unfused += unfused
    report.skipped += [(conv, why) for conv, _, why in unfused] + skipped
    prefix = _qualify(name, "")
    return {n[len(prefix):] for site in fused for n in site if n.startswith(prefix)}


def _twin(module):
    """The dlkern twin of a stock module: the stock module's attributes (its constructor arguments, mode, the very
    Parameter and buffer objects, so an optimizer holding them keeps working after an in-place conversion), in
    the twin class, a subclass of the stock one's (dlkern's Hardtanh for ReLU6: its attributes are Hardtanh's).
    Twins are made only of modules without hooks, whose state is theirs alone."""
    twin = _TWINS[type(module)].__new__(_TWINS[type(module)])
    state = module.__dict__
    twin.__dict__.update({k: copy.copy(v) if isinstance(v, (dict, set, list)) else v for k, v in state.items()})
    return twin
