"""``dlkern.convert``: put dlkern's kernels into an existing model without changing its state_dict keys.

Inside every ``nn.Sequential``, each Conv2d -> BatchNorm2d -> activation run becomes one
:class:`~dlkern.nn.ConvBNReLU2d` (sharing the conv's and BatchNorm's parameters and buffers), or, when an
``nn.MaxPool2d`` follows it (without ``return_indices``), one :class:`~dlkern.nn.ConvBNActPool2d` holding the pool
too. The block sits at the conv's index; the indices of the modules it absorbed hold ``nn.Identity``
placeholders, so integer indexing and every later index are unchanged. Two hooks on that Sequential keep its
state_dict in the stock layout: the block's entries ``i.0.*``/``i.1.*`` are saved as ``i.*``/``i+1.*`` and loaded
back from them, so the converted
and the stock model load each other's state_dicts with ``strict=True``. (Parameter order is unchanged too, so
optimizer state_dicts cross as well.) Standalone activations and ``nn.MaxPool2d`` become their dlkern twins,
sharing the original's parameters. Anything else, including subclasses of the stock modules (which may override
``forward``), is left alone; so is a run with a hook already registered on one of its modules.

What conversion changes that users can observe is the contract in :func:`convert`'s docstring.
"""

import copy
import logging
from dataclasses import dataclass, field

from torch import nn

import dlkern.nn as dnn
from dlkern import catalog
from dlkern.nn.conv import ConvBNActPool2d, ConvBNReLU2d, _ConvBNActBlock, _has_hooks, activation_spec

__all__ = ["convert", "ConversionReport"]

log = logging.getLogger(__name__)

# Stock module type -> its dlkern twin, built from the stock module's constructor arguments (parameters are
# then shared, see _twin). Exact types only: a subclass may compute something else. Every stock module type of
# the activation catalog has one (tests/test_catalog.py).
_TWINS = {
    nn.Sigmoid: lambda m: dnn.Sigmoid(),
    nn.Tanh: lambda m: dnn.Tanh(),
    nn.ReLU: lambda m: dnn.ReLU(m.inplace),
    nn.LeakyReLU: lambda m: dnn.LeakyReLU(m.negative_slope, m.inplace),
    nn.PReLU: lambda m: dnn.PReLU(m.num_parameters, m.init),
    nn.ELU: lambda m: dnn.ELU(m.alpha, m.inplace),
    nn.Softplus: lambda m: dnn.Softplus(m.beta, m.threshold),
    nn.SiLU: lambda m: dnn.SiLU(m.inplace),
    nn.GELU: lambda m: dnn.GELU(m.approximate),
    nn.Hardsigmoid: lambda m: dnn.Hardsigmoid(m.inplace),
    nn.Hardtanh: lambda m: dnn.Hardtanh(m.min_val, m.max_val, m.inplace),
    nn.ReLU6: lambda m: dnn.Hardtanh(0.0, 6.0, m.inplace),  # ReLU6 is Hardtanh(0, 6); dlkern has no own class
    nn.MaxPool2d: lambda m: dnn.MaxPool2d(m.kernel_size, m.stride, m.padding, m.dilation, m.return_indices,
                                          m.ceil_mode),
}
_DLKERN_TYPES = {getattr(dnn, name) for name in dnn.__all__}
# Activations the walk may fuse: the catalog's module types and dlkern's twins of them (activation_spec then
# decides, e.g. it refuses PReLU's learnable weight).
_CATALOG_TYPES = tuple(cls for a in catalog.CATALOG.values() for cls in a.module_types())
_ACTIVATION_TYPES = {t for t in set(_TWINS) | _DLKERN_TYPES if issubclass(t, _CATALOG_TYPES)}


@dataclass
class ConversionReport:
    """What :func:`convert` did, by qualified module name (as in ``named_modules()``).

    ``fused``: (conv, batchnorm, activation) names of each run now computed by one ConvBNReLU2d, (conv,
    batchnorm, activation, maxpool) names of each one ConvBNActPool2d computes (the block at the conv's name);
    ``replaced``: (name, stock type, dlkern type); ``skipped``: (name, why it was left as it is).
    """

    fused: list = field(default_factory=list)
    replaced: list = field(default_factory=list)
    skipped: list = field(default_factory=list)

    def __str__(self):
        lines = [f"dlkern.convert: fused {len(self.fused)} Conv2d-BatchNorm2d-activation(-MaxPool2d) runs, "
                 f"replaced {len(self.replaced)} modules, left {len(self.skipped)} as they were"]
        lines += [f"  fused    {' + '.join(names)} into {_block_type(names).__name__}" for names in self.fused]
        lines += [f"  replaced {name}: {old} -> dlkern.nn.{new}" for name, old, new in self.replaced]
        lines += [f"  skipped  {name}: {why}" for name, why in self.skipped]
        return "\n".join(lines)


def convert(module, inplace=False):
    """``module`` with every stock piece dlkern covers replaced by its dlkern twin: each Conv2d -> BatchNorm2d ->
    activation run inside an ``nn.Sequential`` fused into one ``ConvBNReLU2d`` (into one ``ConvBNActPool2d`` with
    the ``nn.MaxPool2d`` that follows it, unless that pool has ``return_indices=True``), standalone activations and
    ``nn.MaxPool2d`` swapped for dlkern's (details in the ``dlkern.convert`` module docstring).

    ``inplace=False`` (default) converts a deep copy and leaves ``module`` untouched. The returned model
    carries a :class:`ConversionReport` as ``dlkern_report``; the replacements are logged at INFO level, what
    could not be converted and why at DEBUG level (logger ``dlkern.convert``).

    What a user can observe (the contract):

    - The whole model computes the same function as the stock one, in train and eval mode (gradients and
      running statistics included; a conv bias ahead of BatchNorm gets an exact zero gradient, see
      ``ConvBNReLU2d``); ``state_dict``/``load_state_dict`` (strict), ``parameters()`` order, deepcopy and
      pickling behave as for the stock model.
    - Structure: ``seq[i]`` is the ConvBNReLU2d (ConvBNActPool2d) where the stock model has the conv;
      ``seq[i + 1]``, ``seq[i + 2]`` (and ``seq[i + 3]``) are ``nn.Identity`` placeholders where it has the
      BatchNorm, the activation (and the max pool). The absorbed stock modules are the block's children
      ``seq[i][0]``, ``seq[i][1]``, ``seq[i][2]`` (``seq[i][3]``), the very objects of an ``inplace=True``
      conversion.
    - Slicing: a slice of the converted Sequential that keeps a block computes the block's whole run, even where
      it ends before the activation's (or pool's) index (``seq[:i + 2]`` computes conv -> BN -> activation where
      the stock one computes conv -> BN); a slice starting at a placeholder skips the absorbed modules. Slice the
      stock model for such pieces, or slice the block: ``seq[i][:2]`` is a plain ``nn.Sequential(conv, bn)``.
    - Hooks registered after conversion on an absorbed module (``seq[i][0]`` ... ``seq[i][3]``; forward,
      forward-pre, backward), and ``torch.nn.utils.prune`` (a forward-pre-hook on the conv), run: while any of
      them has such a hook, the block computes its children one by one as the stock Sequential does (unfused).
      A hook on a placeholder runs too, seeing the block's output. Global module hooks
      (``register_module_forward_hook``) see the block, not its children.
    - ``torch.jit.script`` raises a clear error (dlkern modules are not scriptable); ``torch.jit.trace``,
      ``torch.export`` and ``torch.compile`` work.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"dlkern.convert: expected an nn.Module, got {type(module).__name__}")
    root = module if inplace else copy.deepcopy(module)
    report = ConversionReport()
    root = _convert(root, "", report, memo={})
    root.dlkern_report = report
    for names in report.fused:
        log.info("fused %s into %s", " + ".join(names), _block_type(names).__name__)
    for name, old, new in report.replaced:
        log.info("replaced %s: %s -> dlkern.nn.%s", name or "<root>", old, new)
    for name, why in report.skipped:
        log.debug("left %s as it is: %s", name or "<root>", why)
    return root


def _qualify(prefix, name):
    return f"{prefix}.{name}" if prefix else name


def _convert(module, name, report, memo):
    """The converted `module` (itself, changed in place, or its twin). `memo` keeps shared modules shared: it maps
    id(module) to (module, result), holding `module` alive so that its id cannot be reused (by a placeholder or
    block created later in this conversion) while the memo exists."""
    if id(module) in memo:
        return memo[id(module)][1]
    result = module
    if type(module) in _TWINS and _has_hooks(module):
        report.skipped.append((name, "a forward or backward hook is registered on it (a twin would drop it)"))
    elif type(module) in _TWINS:
        result = _twin(module)
        report.replaced.append((name, type(module).__name__, type(result).__name__))
    elif type(module) not in _DLKERN_TYPES:  # a dlkern module (ConvBNReLU2d holds stock ones) is done already
        # Only where forward is Sequential's own (torchvision's Conv2dNormActivation, say) is the call order known.
        if isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward:
            _fuse_runs(module, name, report)
        else:
            for child_name, child in module.named_children():
                if type(child) is nn.Conv2d:
                    report.skipped.append((_qualify(name, child_name), "not in an nn.Sequential (or in a subclass "
                                           "with its own forward): the call order is unknown"))
        for child_name, child in list(module._modules.items()):
            if child is not None:
                new = _convert(child, _qualify(name, child_name), report, memo)
                if new is not child:
                    module._modules[child_name] = new
    memo[id(module)] = (module, result)
    return result


def _twin(module):
    """The dlkern twin of a stock module: same constructor arguments, same mode, the same Parameter and buffer
    objects (so an optimizer holding them keeps working after an in-place conversion)."""
    twin = _TWINS[type(module)](module)
    for name, param in module.named_parameters(recurse=False):
        setattr(twin, name, param)
    for name, buf in module.named_buffers(recurse=False):
        setattr(twin, name, buf)
    return twin.train(module.training)


def _why_not_fused(conv, bn, act):
    """None when conv -> bn -> act can be one ConvBNReLU2d, else the reason it cannot."""
    if conv.groups != 1:
        return f"groups={conv.groups} (the fused block needs groups=1)"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} (the fused block needs 'zeros')"
    if type(bn) is not nn.BatchNorm2d:
        return "not followed by an nn.BatchNorm2d"
    if bn.num_features != conv.out_channels:
        return f"followed by {bn!r}, which does not match its {conv.out_channels} channels"
    if type(act) not in _ACTIVATION_TYPES:
        return "its BatchNorm2d is not followed by an activation"
    try:
        activation_spec(act)
    except NotImplementedError as e:
        return str(e)
    if any(_has_hooks(m) for m in (conv, bn, act)):
        return "a forward or backward hook is registered on the conv, BatchNorm or activation (fusing would skip it)"
    return None


def _block_type(names):
    """The block a report.fused entry became: ConvBNActPool2d when it absorbed a max pool."""
    return ConvBNActPool2d if len(names) == 4 else ConvBNReLU2d


def _poolable(pool):
    """Whether the module after a fusable run joins its block: an exact (stock or dlkern) MaxPool2d without hooks
    whose output is a tensor (return_indices=True gives a tuple: that run stays a ConvBNReLU2d + the pool)."""
    return type(pool) in (nn.MaxPool2d, dnn.MaxPool2d) and not pool.return_indices and not _has_hooks(pool)


def _fuse_runs(seq, name, report):
    """Replace each fusable Conv2d -> BatchNorm2d -> activation (-> MaxPool2d) run among seq's children, in
    place."""
    names = list(seq._modules)
    i = 0
    while i < len(names):
        conv = seq._modules[names[i]]
        if type(conv) is not nn.Conv2d:
            i += 1
            continue
        bn, act, pool = (seq._modules[n] if n is not None else None for n in (names + [None] * 3)[i + 1:i + 4])
        why = _why_not_fused(conv, bn, act)
        if why is not None:
            report.skipped.append((_qualify(name, names[i]), why))
            i += 1
            continue
        if _poolable(pool):
            block, run = ConvBNActPool2d.fuse(conv, bn, act, pool), names[i:i + 4]
        else:
            block, run = ConvBNReLU2d.fuse(conv, bn, act), names[i:i + 3]
        block.training = bn.training  # the block reads each child's own mode; keep its flag consistent
        block._dlkern_stock_names = tuple(run)  # where its children sit in the stock Sequential
        seq._modules[names[i]] = block
        for n in run[1:]:
            seq._modules[n] = nn.Identity().train(bn.training)
        report.fused.append(tuple(_qualify(name, n) for n in run))
        i += len(run)
    if _fused_blocks(seq) and not getattr(seq, "_dlkern_key_hooks", False):
        seq.register_state_dict_post_hook(_save_stock_keys)
        seq.register_load_state_dict_pre_hook(_load_stock_keys)
        seq._dlkern_key_hooks = True


# The two state_dict hooks. Plain module-level functions that find the fused blocks on the module they are
# given: they survive deepcopy and pickling, and blocks added by a later convert() are found too.


def _fused_blocks(seq):
    """{block name: stock names of its children (conv, bn, activation[, pool])} for the fused blocks directly in
    seq."""
    return {name: m._dlkern_stock_names for name, m in seq._modules.items()
            if isinstance(m, _ConvBNActBlock) and hasattr(m, "_dlkern_stock_names")}


def _save_stock_keys(seq, state_dict, prefix, local_metadata):
    """state_dict post-hook: '<block>.<j>.<rest>' -> '<stock name j>.<rest>', keeping the order of entries."""
    blocks = _fused_blocks(seq)

    def stock(key):
        if key.startswith(prefix):
            parts = key[len(prefix):].split(".", 2)
            if len(parts) == 3 and parts[0] in blocks and parts[1] in _CHILD_INDICES[:len(blocks[parts[0]])]:
                return prefix + blocks[parts[0]][int(parts[1])] + "." + parts[2]
        return key

    items = [(stock(k), v) for k, v in state_dict.items()]
    state_dict.clear()
    state_dict.update(items)
    # Per-module metadata (BatchNorm's version) moves with its module; the block's and placeholders' own go.
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        dropped = {prefix + n for names in blocks.values() for n in names}
        items = [(stock(k + ".")[:-1], v) for k, v in metadata.items() if k not in dropped]
        metadata.clear()
        metadata.update(items)


_CHILD_INDICES = ("0", "1", "2", "3")


def _load_stock_keys(seq, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    """load_state_dict pre-hook: '<stock name j>.<rest>' -> '<block>.<j>.<rest>'. `state_dict` is load_state_dict's
    own copy (children are then given the matching entries of it), so renaming in place is safe."""
    fused = {n: (block, j) for block, names in _fused_blocks(seq).items() for j, n in enumerate(names)}
    for key in list(state_dict):
        if key.startswith(prefix):
            head, _, rest = key[len(prefix):].partition(".")
            if head in fused and rest:
                block, j = fused[head]
                state_dict[f"{prefix}{block}.{j}.{rest}"] = state_dict.pop(key)
