"""The graph pass of ``dlkern.convert``: a module whose own ``forward()`` calls Conv2d -> BatchNorm2d sites gets a
forward that runs each as one fused call (the sites: ``dlkern.convert_graph``).

A module whose forward may call a Conv2d (a child, or one in a child ``nn.ModuleList``/``nn.ModuleDict``) is traced
by torch.fx on its own, every submodule a leaf: the graph holds that forward's calls and none of its children's.
An ``nn.Sequential`` (or a subclass) running ``nn.Sequential.forward`` gets the graph that forward traces to, built
directly: each child called once, by its own name, in order (torch.fx's tracer would name a module held at two
indices by its first one). Its sites are rewritten there, and the module keeps its identity: its ``__class__``
becomes a cached subclass of its own class (same name, so ``isinstance`` and ``repr`` are unchanged) whose
``forward`` runs the rewritten graph. The graph names modules, it does not hold them: each call reads the module
there now, and a site whose modules no longer fuse (replaced, hooked) calls them one by one.
Python decides some things while tracing: ``self.training`` (so forward is traced in both modes), the module's
plain attributes (numbers, strings, flags, None), its children's names in order and which are None, the names in
order inside the children the forward reaches into (a loop over a ModuleList, a Sequential's own children), and the
arguments (optional ones take their defaults). The new forward runs the rewritten graph only where all of these are
as traced, and the class's own forward, unfused, otherwise: changing ``block.downsample`` or a flag, appending to
a Sequential or a ModuleList after conversion never computes a stale graph (``dlkern.convert`` again fuses anew).
What no guard sees, as with any torch.fx trace: Python side effects in forward (prints, counters, in-place ``+=`` on
an input) happen once at conversion, and type checks on the inputs (``isinstance(x, Tensor)``) see torch.fx's
proxies. The subclass pickles as (own class, generated source), so deepcopy, pickle and ``torch.save(model)``
rebuild it (in a new process too: unpickling imports dlkern); converting again re-traces the class's own forward
and changes nothing. Indexing it as its class does gives what the class gives, a slice of a Sequential the stock
class (``seq[1:3]`` is a plain ``nn.Sequential`` of the stock children, unfused). A ``torch.fx.GraphModule`` has
its own graph rewritten instead.
"""

import inspect
import operator
import warnings

import torch.fx as fx
from torch import nn
from torch.fx.graph_module import _format_import_block, _forward_from_src
from torch.package import sys_importer

from dlkern import catalog
from dlkern.convert_graph import FusedSite, _find_sites, _rewrite, fused_conv_bn

__all__ = ["fuse_forward", "runs_children_in_order"]


class _Tracer(fx.Tracer):
    """Traces one module's own forward: every submodule is a leaf (a call_module node)."""

    def is_leaf_module(self, m, module_qualified_name):
        return True


class _Untraceable(Exception):
    pass


_MODULE_INTERNALS = frozenset(vars(nn.Module())) | {"_compiled_call_impl", "dlkern_report"}
_MISSING = object()


def _plain(value):
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    return isinstance(value, tuple) and all(_plain(v) for v in value)


def runs_children_in_order(module):
    """Whether `module`'s forward is nn.Sequential's: each child called once, in order, on the previous output."""
    base = getattr(type(module), "_dlkern_base", type(module))
    return (issubclass(base, nn.Sequential) and base.forward is nn.Sequential.forward
            and base.__iter__ is nn.Sequential.__iter__)


def _sequential_graph(module):
    """The graph nn.Sequential.forward traces to on `module`, each child named by its own name."""
    graph = fx.Graph()
    out = graph.placeholder("input")
    for name, child in module._modules.items():
        if child is None:
            raise _Untraceable(f"its child {name} is None (nn.Sequential.forward would call None)")
        out = graph.call_module(name, (out,))
    graph.output(out)
    return graph


def _trace(module, base):
    """(number of required arguments, {training: graph}): base.forward traced on `module` in both modes, its
    optional arguments at their defaults. Raises _Untraceable with the reason."""
    if runs_children_in_order(module):
        return 1, {mode: _sequential_graph(module) for mode in (True, False)}
    params = list(inspect.signature(base.forward).parameters.values())[1:]
    required, defaults = 0, {}
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise _Untraceable(f"{base.__name__}.forward takes {'*' if p.kind is p.VAR_POSITIONAL else '**'}{p.name}")
        if p.default is not p.empty:
            defaults[p.name] = p.default
        elif p.kind is p.KEYWORD_ONLY:
            raise _Untraceable(f"{base.__name__}.forward takes a required keyword-only argument {p.name}")
        else:
            required += 1
    before = dict(vars(module))
    cls, training, graphs = module.__class__, module.training, {}
    try:
        module.__class__ = base
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for mode in (True, False):
                module.training = mode
                graphs[mode] = _Tracer().trace(module, concrete_args=defaults or None)
    except Exception as e:  # noqa: BLE001 (whatever torch.fx or the forward raise: the module stays as it is)
        raise _Untraceable(f"torch.fx cannot trace {base.__name__}.forward ({type(e).__name__}: "
                           f"{str(e).strip().splitlines()[0][:160] if str(e).strip() else ''})") from None
    finally:
        module.__class__, module.training = cls, training
        changed = sorted(k for k in set(before) | set(vars(module)) if vars(module).get(k, _MISSING) is not
                         before.get(k, _MISSING))
        for k in changed:  # put back what tracing changed
            if k in before:
                module.__dict__[k] = before[k]
            else:
                del module.__dict__[k]
    if any(k.startswith("_tensor_constant") for k in changed):
        raise _Untraceable(f"{base.__name__}.forward creates a tensor, which torch.fx would keep as a constant")
    if changed:
        raise _Untraceable(f"{base.__name__}.forward sets attributes of the module ({', '.join(changed)}), which a "
                           "traced forward would not")
    return required, graphs


def _source(graph):
    """The graph's forward as self-contained source (imports first): what the converted class compiles and
    pickles."""
    code = graph.python_code("self")
    return _format_import_block(code.globals, sys_importer) + code.src


def fuse_forward(module, name):
    """Fuse the conv -> BatchNorm sites of `module`'s own forward (`name`: its qualified name), in place.
    Returns (fused FusedSites, unfused (conv, bn, why), skipped (conv, why)); a module whose forward calls no
    Conv2d, or whose trace finds nothing to fuse, is left as it is."""
    if isinstance(module, fx.GraphModule):
        return _fuse_graph_module(module, name)
    base = getattr(type(module), "_dlkern_base", type(module))
    convs = _reachable_convs(module)
    if not convs or base.forward is nn.Module.forward:
        return [], [], []

    def q(target):
        return f"{name}.{target}" if name else target

    try:
        required, graphs = _trace(module, base)
    except _Untraceable as e:
        return [], [], [(q(c), f"{e}: left as it is") for c in convs]
    called = {n.target for g in graphs.values() for n in g.nodes if n.op == "call_module"}
    fused, unfused, skipped = {}, {}, {(q(c), f"not called by {base.__name__}.forward"): None
                                       for c in convs if c not in called}
    block = f"{base.__name__}.forward of {name or 'the model'}"
    sources, traced = {}, {}
    for mode, graph in graphs.items():
        src = graph.python_code("self").src
        if src in traced:  # the same trace in both modes (forward does not read self.training)
            sources[mode] = sources[traced[src]]
            continue
        traced[src] = mode
        sites, site_unfused, site_skipped = _find_sites(graph, module, name)
        for s in sites:
            fused.setdefault(s.names, s.fused(block))
            _rewrite(graph, s)
        unfused.update(dict.fromkeys(site_unfused))
        skipped.update(dict.fromkeys(site_skipped))
        if sites:
            _children_from_dict(graph, module)
        sources[mode] = graph if sites else None
    result = list(fused.values()), list(unfused), list(skipped)
    if not fused:
        module.__class__ = base  # nothing (any longer) to fuse: the class's own forward
        return result
    attrs = tuple(sorted(k for k, v in vars(module).items() if k not in _MODULE_INTERNALS and _plain(v)))
    children = tuple(module._modules)
    values = tuple(getattr(module, k) for k in attrs)
    nones = tuple(m is None for m in module._modules.values())
    # The children whose own children the forward calls by name (a ModuleList it loops over, "convs.0"): their
    # names, in order, are as traced too.
    reached = {n.target.partition(".")[0] for g in graphs.values() for n in g.nodes
               if n.op in ("call_module", "get_attr") and "." in n.target}
    inner_of = tuple(k for k in children if k in reached and module._modules[k] is not None
                     and module._modules[k]._modules)
    inner = tuple(tuple(module._modules[k]._modules) for k in inner_of)
    try:
        sources = {mode: _source(graph) for mode, graph in sources.items() if graph is not None}
        spec = (required, attrs, (children, inner_of),
                tuple(((mode, values, nones, inner), src) for mode, src in sources.items()))
        module.__class__ = converted_class(base, spec)
    except Exception as e:  # noqa: BLE001 (a function the forward calls cannot be imported by name, say)
        why = f"the traced {base.__name__}.forward cannot be compiled from its source ({type(e).__name__}: {e})"
        return [], [], [(site[0], why) for site in result[0]] + result[2]
    return result


def _children_from_dict(graph, module):
    """The graph's reads of `module`'s children (the modules of the fused calls) as `self._modules[name]`, a dict
    lookup, not `self.name` (nn.Module.__getattr__, ~0.7 µs a read). The same module either way: the guard runs
    the graph only while the children's names are as traced."""
    reads = [n for n in graph.nodes if n.op == "get_attr" and n.target in module._modules]
    if not reads:
        return
    with graph.inserting_before(reads[0]):
        children = graph.get_attr("_modules")
    for node in reads:
        with graph.inserting_before(node):
            child = graph.call_function(operator.getitem, (children, node.target))
        node.replace_all_uses_with(child)
        graph.erase_node(node)


def _reachable_convs(module, prefix=""):
    """The Conv2d children of `module`, and those in its ModuleList/ModuleDict children: what its forward may
    call."""
    found = []
    for child_name, child in module._modules.items():
        if isinstance(child, nn.Conv2d):
            found.append(prefix + child_name)
        elif type(child) in (nn.ModuleList, nn.ModuleDict):
            found += _reachable_convs(child, f"{prefix}{child_name}.")
    return found


def _fuse_graph_module(gm, name):
    """A GraphModule's forward is its graph: rewrite that and recompile (its own pickling keeps working). Sites a
    conversion rewrote before are listed again."""
    block = f"GraphModule.forward of {name or 'the model'}"
    fused = [_rewritten_site(gm, node, name, block) for node in gm.graph.nodes
             if node.op == "call_function" and node.target is fused_conv_bn]
    sites, unfused, skipped = _find_sites(gm.graph, gm, name)
    fused += [s.fused(block) for s in sites]
    for s in sites:
        _rewrite(gm.graph, s)
    if sites:
        gm.graph.lint()
        gm.recompile()
    return fused, unfused, skipped


def _rewritten_site(gm, node, name, block):
    """The FusedSite of a fused_conv_bn call already in a graph (its note is not kept)."""
    _, conv, bn, act, pool, *more = node.args
    residual_at, pool_before_bn = (more[1], more[2]) if more else ("none", False)
    q = (lambda target: f"{name}.{target}" if name else target)  # noqa: E731
    names, activation = (q(conv.target), q(bn.target)), "none"
    if pool_before_bn:
        names = (q(conv.target), q(pool.target), q(bn.target))
    if isinstance(act, fx.Node):
        module = gm.get_submodule(act.target)
        spec = catalog.activation_spec(module)  # None for a module replaced since (the call then runs it)
        names, activation = names + (q(act.target),), spec[0] if spec else type(module).__name__
    elif act is not None:
        names, activation = names + (f"{act[3].rpartition('.')[2]}(...)",), act[0]
    if pool is not None and not pool_before_bn:
        names += (q(pool.target),)
    return FusedSite(names, block, activation, "", residual_at, pool_before_bn)


# A converted module's class: (own class, spec) -> the cached subclass. The spec is (number of arguments, names of
# the guarded attributes, (names of the children in order, the children whose own names are guarded), ((training,
# attribute values, which children are None, those children's names in order), source) for each traced mode with
# something fused).
_CLASSES = {}


def converted_class(base, spec):
    cls = _CLASSES.get((base, spec))
    if cls is None:
        cls = _CLASSES[(base, spec)] = _make_class(base, spec)
    return cls


def _rebuild(base, spec):
    """Unpickling (and deepcopy): an empty instance of the converted class; pickle then sets its state."""
    cls = converted_class(base, spec)
    return cls.__new__(cls)


def _make_class(base, spec):
    required, attrs, (children, inner_of), variants = spec
    compiled = {src: _forward_from_src(src, {}) for src in dict.fromkeys(src for _, src in variants)}
    table = {state: compiled[src] for state, src in variants}

    def key(self):
        """The state the graph to run is looked up by (None, matching none, where the children's names
        changed)."""
        modules = self._modules
        if tuple(modules) != children:
            return None
        return (self.training, tuple([getattr(self, k, _MISSING) for k in attrs]),
                tuple([m is None for m in modules.values()]),
                tuple([tuple(getattr(modules[k], "_modules", ())) for k in inner_of]))

    forward = _dispatcher(base.forward, table, key)

    def __reduce_ex__(self, protocol):
        return _rebuild, (base, spec), self.__getstate__()

    def __prepare_scriptable__(self):
        raise RuntimeError(
            f"dlkern.convert: {base.__name__}.forward was converted (its conv -> BatchNorm sites call dlkern's fused "
            "op); torch.jit.script is not supported. Use torch.jit.trace, torch.export or torch.compile, or script "
            "the stock model."
        )

    namespace = {"forward": forward, "__reduce_ex__": __reduce_ex__, "__prepare_scriptable__": __prepare_scriptable__,
                 "__module__": base.__module__, "__qualname__": base.__qualname__, "__doc__": base.__doc__,
                 "_dlkern_base": base, "_dlkern_spec": spec}
    if hasattr(base, "__getitem__"):
        namespace["__getitem__"] = _stock_getitem(base)
    return type(base)(base.__name__, (base,), namespace)


def _stock_getitem(base):
    """base.__getitem__, but a slice it builds as `self.__class__(...)` (nn.Sequential's) is of the stock class: a
    new container of the stock children, computing them one by one as the stock model's slice does."""
    getitem = base.__getitem__

    def __getitem__(self, idx):
        item = getitem(self, idx)
        if isinstance(idx, slice) and type(item) is type(self) and item is not self:
            item.__class__ = base
        return item

    __getitem__.__doc__ = getitem.__doc__
    return __getitem__


def _dispatcher(stock, table, key):
    """The converted forward, with the stock forward's parameters (so that torch.fx, torch.export and
    inspect.signature see them): the traced graph table[key(self)] where it exists and every optional argument
    is left at its default (the graph has them specialized), the stock forward otherwise."""
    params = list(inspect.signature(stock).parameters.values())
    names = {"_dlkern_table": table, "_dlkern_key": key, "_dlkern_stock": stock}
    head, required, call, defaults = [params[0].name], [], [params[0].name], []
    for i, p in enumerate(params[1:]):
        keyword = p.kind is p.KEYWORD_ONLY
        if keyword and "*" not in head:
            head.append("*")
        if p.default is p.empty:
            head.append(p.name)
            required.append(p.name)
        else:
            names[f"_dlkern_d{i}"] = p.default
            head.append(f"{p.name}=_dlkern_d{i}")
            defaults.append(f"{p.name} is _dlkern_d{i}")
        call.append(f"{p.name}={p.name}" if keyword else p.name)
    self = params[0].name
    src = (f"def forward({', '.join(head)}):\n"
           f"    if {' and '.join(defaults) or 'True'}:\n"
           f"        _dlkern_fn = _dlkern_table.get(_dlkern_key({self}))\n"
           f"        if _dlkern_fn is not None:\n"
           f"            return _dlkern_fn({', '.join([self, *required])})\n"
           f"    return _dlkern_stock({', '.join(call)})\n")
    exec(compile(src, f"<dlkern.convert: {stock.__qualname__}>", "exec"), names)  # noqa: S102
    forward = names["forward"]
    forward.__doc__ = stock.__doc__
    return forward
