"""``dlkern.convert``: put dlkern's kernels into an existing model without changing its state_dict keys.

Every Conv2d -> BatchNorm2d site is fused, with the activation after it (module or function) and a max pool after
that where they can join, wherever the model calls it:

- Inside an ``nn.Sequential`` (its own forward), each run becomes one :class:`~dlkern.nn.ConvBNReLU2d` (sharing
  the conv's and BatchNorm's parameters and buffers) at the conv's index, or one
  :class:`~dlkern.nn.ConvBNActPool2d` with the ``nn.MaxPool2d`` (without ``return_indices``) that follows; the
  indices of the modules it absorbed hold ``nn.Identity`` placeholders, so integer indexing and every later index
  are unchanged. Two hooks on that Sequential keep its state_dict in the stock layout: the block's entries
  ``i.0.*``/``i.1.*`` are saved as ``i.*``/``i+1.*`` and loaded back from them, so the converted and the stock
  model load each other's state_dicts with ``strict=True``.
- Anywhere else, in the forward of the module calling them: ``dlkern.convert_forward`` traces that forward with
  torch.fx and gives the module a forward that runs each site (found and rewritten by ``dlkern.convert_graph``) as
  one fused call on the very same modules (nothing moves: keys, parameter names and order, attributes and hooks
  stay the stock model's).

Conv2d/BatchNorm2d subclasses that inherit ``forward`` count as the stock ops; a subclass overriding it, a run with
a hook already registered on one of its modules, groups != 1 or a padding mode other than zeros is left alone,
reported. A BatchNorm followed by no fusable activation (a residual add, a learnable PReLU, nothing) is fused as
conv -> BatchNorm, what follows staying stock. Standalone activations and ``nn.MaxPool2d`` become their dlkern
twins, sharing the original's parameters.

What conversion changes that users can observe is the contract in :func:`convert`'s docstring.
"""

import copy
import logging
from dataclasses import dataclass, field

from torch import nn

import dlkern.nn as dnn
from dlkern.convert_forward import fuse_forward
from dlkern.convert_graph import ACTIVATION_TYPES as _ACTIVATION_TYPES  # noqa: F401 (tests/test_catalog.py)
from dlkern.convert_graph import FusedSite, poolable, why_not_activation, why_not_site
from dlkern.nn.conv import ConvBNActPool2d, ConvBNReLU2d, _ConvBNActBlock, _has_hooks, activation_spec

__all__ = ["convert", "ConversionReport", "FusedSite"]

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


@dataclass
class ConversionReport:
    """What :func:`convert` did, by qualified module name (as in ``named_modules()``).

    ``fused``: one :class:`FusedSite` per Conv2d -> BatchNorm2d site now fused: a tuple of the names (conv,
    batchnorm[, activation[, maxpool]]) (an activation function is named by its call, ``relu(inplace=True)``), with
    ``block`` (the ConvBNReLU2d/ConvBNActPool2d computing it, or the converted forward), ``activation`` and
    ``note`` (what follows the BatchNorm and stays stock: a residual add, say). A model converted again lists its
    fused sites again. ``unfused``: (conv, batchnorm, why) for each site left alone. ``replaced``: (name, stock
    type, dlkern type). ``skipped``: (name, why) for everything left as it was, the unfused convs included.
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
    """``module`` with every stock piece dlkern covers replaced by its dlkern twin: each Conv2d -> BatchNorm2d
    site fused with what follows it where that can join (an activation, module or function; then an
    ``nn.MaxPool2d`` without ``return_indices``): inside an ``nn.Sequential`` into one ``ConvBNReLU2d``
    (``ConvBNActPool2d``), elsewhere in the forward of the module calling it; standalone activations and
    ``nn.MaxPool2d`` swapped for dlkern's (details in the ``dlkern.convert`` module docstring).

    ``inplace=False`` (default) converts a deep copy and leaves ``module`` untouched. The returned model
    carries a :class:`ConversionReport` as ``dlkern_report``; the replacements are logged at INFO level, what
    could not be converted and why at DEBUG level (logger ``dlkern.convert``).

    What a user can observe (the contract):

    - The whole model computes the same function as the stock one, in train and eval mode (gradients and
      running statistics included; a conv bias ahead of BatchNorm gets an exact zero gradient, see
      ``ConvBNReLU2d``); ``state_dict``/``load_state_dict`` (strict), ``parameters()`` order, deepcopy and
      pickling behave as for the stock model. Converting a converted model changes nothing.
    - Sites outside a Sequential: nothing moves (``named_parameters()`` names too); the module calling them keeps
      its class's name and ``isinstance`` (its ``__class__`` is a cached subclass running the traced forward,
      ``type(m) is Block`` no longer holds). Its forward is torch.fx's trace: it runs only while the module's
      mode, plain attributes (numbers, flags, None children) and number of arguments are as traced, and the
      class's own forward (unfused) otherwise; Python side effects of the stock forward (prints, counters) happen
      at conversion only. A hook registered later on a conv, BatchNorm, activation or pool of a site (or a
      global module hook), or a module replaced there, makes that site call the modules one by one, as stock.
    - Structure inside a Sequential: ``seq[i]`` is the ConvBNReLU2d (ConvBNActPool2d) where the stock model has
      the conv; ``seq[i + 1]``, ``seq[i + 2]`` (and ``seq[i + 3]``) are ``nn.Identity`` placeholders where it has
      the BatchNorm, the activation (and the max pool). The absorbed stock modules are the block's children
      ``seq[i][0]``, ``seq[i][1]``, ``seq[i][2]`` (``seq[i][3]``), the very objects of an ``inplace=True``
      conversion; ``named_parameters()`` names them there (``seq.i.0.weight``) while ``state_dict`` keeps the
      stock keys (``seq.i.weight``), in the stock order.
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
        # Sequential's own forward (torchvision's Conv2dNormActivation, say) calls its children in order: fused
        # before converting them, so the absorbed modules stay stock. Any other forward is traced after its
        # children are converted (a shared activation is the twin there and everywhere).
        sequential = isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward
        if sequential:
            _fuse_runs(module, name, report)
        for child_name, child in list(module._modules.items()):
            if child is not None:
                new = _convert(child, _qualify(name, child_name), report, memo)
                if new is not child:
                    module._modules[child_name] = new
        if not sequential:
            fused, unfused, skipped = fuse_forward(module, name)
            report.fused += fused
            report.unfused += unfused
            report.skipped += [(conv, why) for conv, _, why in unfused] + skipped
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


def _fuse_runs(seq, name, report):
    """Replace each fusable Conv2d -> BatchNorm2d (-> activation (-> MaxPool2d)) run among seq's children, in
    place. A block an earlier conversion made is listed again."""
    names = list(seq._modules)
    i = 0
    while i < len(names):
        conv = seq._modules[names[i]]
        if isinstance(conv, _ConvBNActBlock) and hasattr(conv, "_dlkern_stock_names"):
            report.fused.append(FusedSite(tuple(_qualify(name, n) for n in conv._dlkern_stock_names),
                                          type(conv).__name__, _activation_name(conv[2]),
                                          getattr(conv, "_dlkern_note", "")))
        if not isinstance(conv, nn.Conv2d):
            i += 1
            continue
        bn, act, pool = (seq._modules[n] if n is not None else None for n in (names + [None] * 3)[i + 1:i + 4])
        why = why_not_site(conv, bn) if isinstance(bn, nn.BatchNorm2d) else "not followed by an nn.BatchNorm2d"
        if why is not None:
            report.skipped.append((_qualify(name, names[i]), why))
            if isinstance(bn, nn.BatchNorm2d):
                report.unfused.append((_qualify(name, names[i]), _qualify(name, names[i + 1]), why))
            i += 1
            continue
        act_why = "nothing follows it in the Sequential" if act is None else why_not_activation(act)
        note = "" if act_why is None else f"conv -> BatchNorm fused; {act_why}"
        if act_why is not None:
            block, run = ConvBNReLU2d.fuse(conv, bn, None), names[i:i + 2]
        elif pool is not None and poolable(pool):
            block, run = ConvBNActPool2d.fuse(conv, bn, act, pool), names[i:i + 4]
        else:
            block, run = ConvBNReLU2d.fuse(conv, bn, act), names[i:i + 3]
        block.training = bn.training  # the block reads each child's own mode; keep its flag consistent
        block._dlkern_stock_names = tuple(run)  # where its children sit in the stock Sequential
        block._dlkern_note = note
        seq._modules[names[i]] = block
        for n in run[1:]:
            seq._modules[n] = nn.Identity().train(bn.training)
        report.fused.append(FusedSite(tuple(_qualify(name, n) for n in run), type(block).__name__,
                                      _activation_name(block[2]), note))
        i += len(run)
    if _fused_blocks(seq) and not getattr(seq, "_dlkern_key_hooks", False):
        seq.register_state_dict_post_hook(_save_stock_keys)
        seq.register_load_state_dict_pre_hook(_load_stock_keys)
        seq._dlkern_key_hooks = True


def _activation_name(module):
    try:
        return activation_spec(module)[0]
    except NotImplementedError:  # replaced in a block after an earlier conversion: the block says so when run
        return type(module).__name__


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
        dropped |= {f"{prefix}{block}.{j}" for block, names in blocks.items() for j in range(len(names), 4)}
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
