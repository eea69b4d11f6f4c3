"""Host time: the CPU time between a user's call and the kernel launches, per op and per MnistCNN step.

At batch 64 a training step is host-bound on an H200 (its GPU work is ~0.2 ms), so this decides dlkern's speed
there. Each row is the median µs of one call (``ms`` holds it in milliseconds), dlkern against eager PyTorch,
side by side in one run:

- activations (every one, ``fwd`` without grad and ``fwd+bwd``: forward and ``torch.autograd.grad``), the max
  pool (``fwd``, ``fwd+bwd``), the fused conv block (``train-fwd``, ``train-fwd+bwd``, ``eval``) against
  Conv2d -> BatchNorm2d -> ReLU, and the MnistCNN ``train-step`` (zero_grad, forward, cross-entropy, backward,
  Adam) and ``inference`` (eval forward under no_grad), with kernel launches per call (``launches``);
- a ResNet-18 ``train-step`` (zero_grad, forward, cross-entropy, backward, SGD with momentum), ``dlkern.convert``
  of the model against the stock one, on a stand-in (bench/cnn_models.py's ``tiny_resnet18``: torchvision's
  ResNet and BasicBlock code, the same 20 conv -> BatchNorm sites, 8 channels in every stage, 2 images of
  3x32x32 on every device), so that neither side's time is arithmetic.

How, on a GPU: CUDA tensors at batch 64; ``ms`` is the enqueue time (no synchronization inside the timed call;
the queue is drained between calls) and ``wall_ms`` the time with a final synchronization.

How, without a GPU: dlkern runs its real GPU launch path under ``bench/host_stub.py`` (a stand-in Triton
driver and compile: everything up to the driver's launch runs, nothing is compiled or launched; see there for
what is left out); its C++ max pool runs its CPU kernel. Eager PyTorch runs on the CPU. Both at batch 1 (tiny
tensors for the single-op rows), so CPU kernels compute little: eager's figures include that little compute,
so they overstate its host time a bit; dlkern's Triton launch path does not depend on the batch. Launches: the
kernels a step would launch on a GPU, counted from the profiler's leaf ATen ops that launch a kernel (one per
op: an assumption for cuDNN's and cuBLAS's ops) plus dlkern's Triton launches; ``fills`` counts the zero/fill
kernels among them.
"""

import functools
import statistics
import time

import torch
import torch.nn.functional as TF

import dlkern.functional as F
from dlkern.catalog import CATALOG
from dlkern.models import MnistCNN
from dlkern.ops import triton_support
from cnn_models import tiny_resnet18
from timing import print_table

# dlkern activation -> (dlkern call, eager call), on an input x (channelwise weight w of C elements): every
# activation of the catalog at PyTorch's defaults against the PyTorch function it reproduces; dlkern's own
# against a composite (swish at beta 1.5, so that it is not SiLU).
_OWN = {
    "swish": (lambda x: F.swish(x, 1.5), lambda x: x * torch.sigmoid(1.5 * x)),
    "hard_logistic": (F.hard_logistic, lambda x: (0.25 * x + 0.5).clamp(0, 1)),
}


def _calls(a):
    if a.stock is None:
        return _OWN[a.name]
    calls = getattr(F, a.function), a.stock
    # The keyword that selects the entry (gelu_tanh: approximate='tanh') goes into both calls.
    return tuple(functools.partial(f, **dict(a.fixed)) for f in calls) if a.fixed else calls


ACTIVATIONS = {name: _calls(a) for name, a in CATALOG.items()}
# ATen ops that launch no kernel on a GPU (views, allocations, metadata), and those that are fills.
NO_KERNEL = {
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "view", "reshape", "_reshape_alias",
    "as_strided", "expand", "t", "transpose", "permute", "unsqueeze", "squeeze", "select", "slice", "detach",
    "alias", "lift_fresh", "_unsafe_view", "unbind", "split", "split_with_sizes", "chunk", "narrow", "set_",
    "_local_scalar_dense", "is_same_size", "resize_", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset",
    "_record_function_enter_new", "_record_function_exit",  # the profiler's markers (the optimizer's step)
}
FILLS = {"fill_", "zero_", "zeros", "zeros_like", "new_zeros", "ones_like", "full", "full_like", "_foreach_zero_"}
# dlkern's Triton ops: counted by the launches they make (the C++ max pool ops are one kernel each).
TRITON_OPS = {"activation", "activation_", "activation_backward", "activation_channelwise",
              "activation_channelwise_backward", "conv_bn_train2d", "conv_bn_infer2d", "conv_bias_act2d",
              "conv_bn_block2d_backward"}


def _median_us(fn, run, sync):
    """Median host µs of fn() over enough calls for a stable median; the device queue is drained in between."""
    calls = 100 if run.quick else 400
    for _ in range(max(10, calls // 10)):
        fn()
    sync()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        sync()
    return 1e6 * statistics.median(times), 1e6 * (statistics.quantiles(times, n=10)[-1] - min(times))


def count_launches(fn):
    """(kernel launches, fills) of one fn() call: each ATen op below autograd that launches a kernel on a GPU
    counts one (an assumption for cuDNN/cuBLAS ops and foreach ops, which may launch more), each of dlkern's
    Triton ops counts the launches it makes."""
    from torch.utils._python_dispatch import TorchDispatchMode

    counts = {"kernels": 0, "fills": 0}

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            namespace, name = func.namespace, func._opname
            before = sum(triton_support.launch_counts.values())
            out = func(*args, **(kwargs or {}))
            if namespace == "dlkern":  # its Triton launches; an op that made none is a C++ kernel (max pool)
                launched = sum(triton_support.launch_counts.values()) - before
                counts["kernels"] += launched if launched or name in TRITON_OPS else 1
            elif name not in NO_KERNEL and not _host_scalars_only(name, args, kwargs):
                counts["kernels"] += 1
                counts["fills"] += name in FILLS
            return out

    with Count():
        fn()
    return counts["kernels"], counts["fills"]


def _host_scalars_only(name, args, kwargs):
    """Whether an op works on host-side scalars only in a GPU step: CPU tensors when CUDA is in use, or, in a CPU
    run, a foreach op over 0-dim tensors (Adam's step counters, which stay on the CPU for a CUDA model unless
    Adam is capturable or fused)."""
    from torch.utils._pytree import tree_leaves

    tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    if not tensors or any(t.is_cuda for t in tensors):
        return False
    return torch.cuda.is_initialized() or (name.startswith("_foreach_") and all(t.dim() == 0 for t in tensors))


def _conv_block_args(batch, device, requires_grad):
    torch.manual_seed(0)
    x = torch.randn(batch, 32, 14, 14, device=device, requires_grad=requires_grad)
    conv = torch.nn.Conv2d(32, 32, 3).to(device)
    bn = torch.nn.BatchNorm2d(32).to(device)
    return x, conv, bn


def _cases(run, batch, device):
    """[(case, pass, dlkern fn, eager fn)]. Inputs are built here, outside the timed calls."""
    tiny = (2, 3, 4, 4) if not run.cuda else (batch, 32, 28, 28)
    x = torch.randn(tiny, device=device, requires_grad=True)
    g = torch.randn_like(x)
    w = torch.full((tiny[1],), 0.25, device=device, requires_grad=True)
    cases = []
    names = run.ops or (["relu", "gelu", "prelu", "sigmoid"] if run.quick else list(ACTIVATIONS))
    for name in names:
        ours, theirs = ACTIVATIONS[name]
        args = (w,) if name == "prelu" else ()
        cases.append((name, "fwd", lambda f=ours, a=args: f(x.detach(), *[t.detach() for t in a]),
                      lambda f=theirs, a=args: f(x.detach(), *[t.detach() for t in a])))
        inputs = (x,) + args
        cases.append((name, "fwd+bwd", lambda f=ours, a=args, i=inputs: torch.autograd.grad(f(x, *a), i, g),
                      lambda f=theirs, a=args, i=inputs: torch.autograd.grad(f(x, *a), i, g)))

    gp = torch.randn(tiny[:2] + (tiny[2] // 2, tiny[3] // 2), device=device)
    cases.append(("max_pool2d 2x2", "fwd", lambda: F.max_pool2d(x.detach(), 2), lambda: TF.max_pool2d(x.detach(), 2)))
    cases.append(("max_pool2d 2x2", "fwd+bwd", lambda: torch.autograd.grad(F.max_pool2d(x, 2), x, gp),
                  lambda: torch.autograd.grad(TF.max_pool2d(x, 2), x, gp)))

    xc, conv, bn = _conv_block_args(batch, device, requires_grad=True)
    params = (xc, conv.weight, conv.bias, bn.weight, bn.bias)
    gz = torch.randn(batch, 32, 12, 12, device=device)

    def ours(training, with_grad=False):
        return F.conv_bn_act2d(xc if with_grad else xc.detach(), conv.weight, conv.bias, bn.running_mean,
                               bn.running_var, bn.weight, bn.bias, training=training)

    def theirs(training, with_grad=False):
        z = TF.conv2d(xc if with_grad else xc.detach(), conv.weight, conv.bias)
        return TF.relu(TF.batch_norm(z, bn.running_mean, bn.running_var, bn.weight, bn.bias, training))

    block = "conv 32->32 3x3 + BN + ReLU"
    cases.append((block, "train-fwd", lambda: ours(True), lambda: theirs(True)))
    cases.append((block, "train-fwd+bwd", lambda: torch.autograd.grad(ours(True, True), params, gz),
                  lambda: torch.autograd.grad(theirs(True, True), params, gz)))

    def no_grad(fn):
        def call():
            with torch.no_grad():
                return fn(False)
        return call

    cases.append((block, "eval", no_grad(ours), no_grad(theirs)))

    for pass_ in ("train-step", "inference"):
        cases.append(("MnistCNN", pass_, _model_call("dlkern", pass_, batch, device),
                      _model_call("torch", pass_, batch, device)))
    cases.append((RESNET_CASE, "train-step", _resnet_step(True, device), _resnet_step(False, device)))
    return cases


RESNET_CASE = "ResNet-18 stand-in"
RESNET_INPUT = (2, 3, 32, 32)  # BatchNorm trains on 2 values a channel at layer4's 1x1 maps


def _resnet_step(converted, device):
    """A training step of the stand-in ResNet-18 (bench/cnn_models.py), dlkern.convert-ed or stock: zero_grad,
    forward, cross-entropy, backward, SGD with momentum (foreach, CUDA's default)."""
    import dlkern

    torch.manual_seed(0)
    model = tiny_resnet18().to(device)
    if converted:
        model = dlkern.convert(model)
    x = torch.randn(RESNET_INPUT, device=device)
    y = torch.randint(0, 10, (RESNET_INPUT[0],), device=device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, foreach=True)

    def step():
        opt.zero_grad(set_to_none=True)
        TF.cross_entropy(model(x), y).backward()
        opt.step()
    return step


def _model_call(backend, pass_, batch, device):
    torch.manual_seed(0)
    model = MnistCNN(backend=backend).to(device).train(pass_ == "train-step")
    x = torch.randn(batch, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    if pass_ == "inference":
        def infer():
            with torch.no_grad():
                return model(x)
        return infer
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=True)  # CUDA's default, also on a CPU

    def step():
        opt.zero_grad(set_to_none=True)
        TF.cross_entropy(model(x), y).backward()
        opt.step()
    return step


def run_suite(run):
    import warnings

    batch = 64 if run.cuda else 1
    device = run.device
    if run.cuda:
        def measure(fn):
            enqueue, spread = _median_us(fn, run, torch.cuda.synchronize)
            wall, _ = _median_us(lambda: (fn(), torch.cuda.synchronize()), run, torch.cuda.synchronize)
            return enqueue, spread, wall
        import contextlib

        dlkern_path = contextlib.nullcontext
        how = f"CUDA, batch {batch}: enqueue time (no sync) and wall time"
    else:
        from host_stub import stand_in_gpu

        def measure(fn):
            us, spread = _median_us(fn, run, lambda: None)
            return us, spread, None

        dlkern_path = stand_in_gpu
        how = ("no GPU: dlkern's GPU launch path with a stand-in Triton driver (nothing compiled or launched), "
               "eager PyTorch on CPU tensors; batch 1 (the ResNet-18 stand-in: 2)")
    print(f"host: {how}")
    rows = []
    # Under the stand-in driver dlkern's outputs are never written: uninitialized memory, whose denormals would make
    # the CPU arithmetic that follows (Adam, the C++ max pool) 10-100x slower from run to run. Both sides run with
    # denormals flushed to zero.
    flushed = not run.cuda and torch.set_flush_denormal(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the CPU fallback's one-time notice does not apply under the stand-in
        with dlkern_path():
            cases = _cases(run, batch, device)
            for case, pass_, ours, theirs in cases:
                us, spread, wall = measure(ours)
                launches, fills = count_launches(ours)
                rows.append(dict(suite="host", case=case, impl="dlkern", batch=_batch(case, batch), ms=us / 1e3,
                                 spread_us=spread, wall_ms=None if wall is None else wall / 1e3,
                                 launches=launches, fills=fills, note=how, **{"pass": pass_}))
        for case, pass_, ours, theirs in cases:
            us, spread, wall = measure(theirs)
            launches, fills = count_launches(theirs)
            rows.append(dict(suite="host", case=case, impl="eager", batch=_batch(case, batch), ms=us / 1e3,
                             spread_us=spread,
                             wall_ms=None if wall is None else wall / 1e3, launches=launches, fills=fills,
                             note=how, **{"pass": pass_}))
    if flushed:
        torch.set_flush_denormal(False)
    eager = {(r["case"], r["pass"]): r["ms"] for r in rows if r["impl"] == "eager"}
    for r in rows:
        r["us"] = 1e3 * r["ms"]
        r["speedup"] = eager[(r["case"], r["pass"])] / r["ms"]
        r["host_ratio"] = 1 / r["speedup"]
    print_table(sorted(rows, key=lambda r: (r["case"], r["pass"], r["impl"])),
                [("case", "case", "{}"), ("pass", "pass", "{}"), ("impl", "impl", "{}"), ("us", "µs", "{:.1f}"),
                 ("spread_us", "p90-min µs", "{:.1f}"), ("host_ratio", "x eager", "{:.2f}"),
                 ("launches", "launches", "{}"), ("fills", "fills", "{}")])
    print(f"host: {RESNET_CASE}: torchvision's ResNet-18 code (20 conv -> BatchNorm sites) at 8 channels a stage, "
          f"{'x'.join(map(str, RESNET_INPUT))} inputs, SGD with momentum; dlkern = dlkern.convert(model)")
    return rows


def _batch(case, batch):
    return RESNET_INPUT[0] if case == RESNET_CASE else batch
