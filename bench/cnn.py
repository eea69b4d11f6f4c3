"""cnn: real CNNs on a GPU -- a training step and inference, in images/s, dlkern against eager PyTorch and
torch.compile, side by side in one run.

Models (bench/cnn_models.py): torchvision's ``resnet18`` and ``resnet50`` (weights=None, 10 classes) and
``cifar-net``, a fast CIFAR-10 net in airbench's style (Conv -> MaxPool -> BatchNorm -> GELU groups, Conv2d and
BatchNorm2d subclasses that only change defaults); --quick: resnet18 and cifar-net. Inputs: 3x32x32 random
images and labels, batch 256 (--batches), channels_last (model and inputs), fp32 and bf16 autocast (--dtype
fp32,bf16; fp16 too when asked).

- ``train-step``: zero_grad, forward and cross-entropy under autocast, backward, then
  ``SGD(lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)`` (foreach, CUDA's default);
- ``inference``: eval-mode forward under ``torch.no_grad()`` and autocast.

Variants (``impl``), each built afresh from the same seed for every model, dtype and pass: ``eager`` (the stock
model), ``dlkern`` (``dlkern.convert(model)``, eager), and ``compile`` / ``compile-<mode>``
(``torch.compile(model, mode=...)`` for each of --compile-modes, default: ``default`` only; ``none`` leaves them
out) -- the forward and backward compiled, the loss and SGD eager, ``torch._dynamo.reset()`` between variants.

Each row: the median ms per step (CUDA events, L2 flushed before each call: bench/timing.py), images/s,
``x eager`` and ``x compile`` (that case's eager ms, and torch.compile default's, over this ms), GPU kernels per
step (torch.profiler), peak memory, and the first call's seconds (compilation, Triton JIT and autotuning; kept
out of the step time). CUDA only: without a GPU the suite says it is skipped (bench/fusion.py's ``coverage``
suite and the host suite's ResNet-18 row are what a CPU can tell about these models).
"""

import contextlib
import warnings

import torch
import torch.nn.functional as TF

import cnn_models
from timing import dtype_name, first_call_s, free_memory, launches, noisy, peak_mb, print_table, timed

MODELS = ("resnet18", "resnet50", cnn_models.CIFAR_NET)
QUICK_MODELS = ("resnet18", cnn_models.CIFAR_NET)
BATCH = 256
SIZE = 32
PASSES = ("train-step", "inference")
DTYPES = (torch.float32, torch.bfloat16)  # fp32 without autocast; 16-bit ones under autocast
SGD = dict(lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)


def _impls(run):
    modes = run.compile_modes if run.compile_modes is not None else ["default"]
    return ["eager", "dlkern"] + [f"compile-{m}" if m != "default" else "compile" for m in modes]


def _autocast(dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=dtype)


def build_step(name, impl, pass_, dtype, x, y):
    """step() for one variant (see the module's docstring): the model built, converted or compiled, and its
    optimizer, on x's device. Also what the tests run on a CPU (eager and dlkern)."""
    import dlkern

    torch.manual_seed(0)
    training = pass_ == "train-step"
    model = cnn_models.build(name).to(x.device, memory_format=torch.channels_last)
    if impl == "dlkern":
        model = dlkern.convert(model)
    model.train(training)
    call = model
    if impl.startswith("compile"):
        call = torch.compile(model, mode=impl.removeprefix("compile").removeprefix("-") or None)
    mark_step = impl in ("compile-reduce-overhead", "compile-max-autotune")  # the modes with CUDA graphs
    if training:
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], **SGD)

        def step():
            if mark_step:
                torch.compiler.cudagraph_mark_step_begin()
            optimizer.zero_grad(set_to_none=True)
            with _autocast(dtype):
                loss = TF.cross_entropy(call(x), y)
            loss.backward()
            optimizer.step()
    else:
        def step():
            if mark_step:
                torch.compiler.cudagraph_mark_step_begin()
            with torch.no_grad(), _autocast(dtype):
                call(x)
    step.model = model  # for the caller's report (dlkern's conversion report)
    return step


def inputs(batch, device):
    torch.manual_seed(1)
    x = torch.randn(batch, 3, SIZE, SIZE, device=device).contiguous(memory_format=torch.channels_last)
    return x, torch.randint(0, cnn_models.NUM_CLASSES, (batch,), device=device)


def _measure(name, impl, pass_, dtype, batch, x, y, run):
    """One row: the variant built and warmed up, then timed."""
    step = build_step(name, impl, pass_, dtype, x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.compile's and autocast's notes, once per variant
        compile_s = first_call_s(step, run)
        for _ in range(3):  # cuDNN's algorithm search, Triton's autotuning, cudagraph trees' recording
            step()
    ms, spread = timed(step, run)
    report = getattr(step.model, "dlkern_report", None)
    fused = f"{len(report.fused)}/{report.sites} conv-BN sites fused" if report is not None else None
    return dict(suite="cnn", case=name, impl=impl, dtype=dtype_name(dtype), layout="channels_last", batch=batch,
                ms=ms, images_per_s=batch / ms * 1e3, launches=launches(step), peak_mb=peak_mb(step),
                compile_s=compile_s,
                spread=spread, note="; ".join(n for n in (fused, noisy(spread)) if n) or None,
                kernel="Inductor" if impl.startswith("compile") else "dlkern + PyTorch" if impl == "dlkern"
                else "PyTorch", **{"pass": pass_})


def run_suite(run):
    if not run.cuda:
        run.skip("cnn", "the whole suite", "CUDA only: ResNet-18/50 and the CIFAR-10 net at batch 256 are timed on a "
                 "GPU (the coverage suite and the host suite's ResNet-18 row run on a CPU)")
        return []
    dtypes = [d for d in (run.dtypes or DTYPES) if d != torch.float64]
    if run.dtypes and torch.float64 in run.dtypes:
        run.skip("cnn", "float64", "autocast has no float64; the suite times fp32 and 16-bit autocast")
    models = QUICK_MODELS if run.quick else MODELS
    rows = []
    for batch in run.batches or [BATCH]:
        x, y = inputs(batch, "cuda")
        for name in models:
            for dtype in dtypes:
                for pass_ in PASSES:
                    for impl in _impls(run):
                        try:
                            rows.append(_measure(name, impl, pass_, dtype, batch, x, y, run))
                        except Exception as e:  # one failing variant must not cost the others
                            run.fail("cnn", f"{name} {impl} {pass_} {dtype} batch {batch}", e)
                        finally:
                            free_memory(run)
        del x, y
    _ratios(rows)
    device = torch.cuda.get_device_name()
    print(f"\ncnn: training step (forward, cross-entropy, backward, SGD momentum) and inference, 3x{SIZE}x{SIZE}, "
          f"channels_last; median ms per step; x eager / x compile = their ms over this ms ({device}, torch "
          f"{torch.__version__})")
    order = [dtype_name(d) for d in dtypes], _impls(run)
    print_table(sorted(rows, key=lambda r: (models.index(r["case"]), r["batch"], order[0].index(r["dtype"]),
                                            PASSES.index(r["pass"]), order[1].index(r["impl"]))), [
        ("case", "model", "{}"), ("pass", "pass", "{}"), ("dtype", "dtype", "{}"), ("batch", "batch", "{}"),
        ("impl", "impl", "{}"), ("ms", "ms", "{:.3f}"), ("images_per_s", "images/s", "{:,.0f}"),
        ("speedup", "x eager", "{:.2f}"), ("vs_compile", "x compile", "{:.2f}"), ("launches", "kernels", "{}"),
        ("peak_mb", "peak MB", "{:.0f}"), ("compile_s", "1st call s", "{:.1f}"), ("spread", "spread", "{:.0%}"),
        ("note", "note", "{}"),
    ])
    return rows


def _ratios(rows):
    """speedup (eager's ms / ms) and vs_compile (torch.compile default's ms / ms) within each case."""
    def key(r):
        return r["case"], r["pass"], r["dtype"], r["batch"]

    base = {(key(r), r["impl"]): r["ms"] for r in rows}
    for r in rows:
        eager, compiled = base.get((key(r), "eager")), base.get((key(r), "compile"))
        r["baseline"] = "eager"
        r["speedup"] = eager / r["ms"] if eager else None
        r["vs_compile"] = compiled / r["ms"] if compiled else None
