"""The whole MNIST CNN (dlkern.models.MnistCNN): one training step and inference, in images per second.

- ``train-step``: zero_grad, forward, cross-entropy, backward, ``Adam(lr=1e-3).step()`` on a batch of random
  28x28 images and labels;
- ``inference``: eval-mode forward under ``torch.no_grad()``.

Variants (``impl``), each built afresh (same seed, same initial weights) for every pass and batch (64, 1024 and
8192; 64 and 8192 with ``--quick``, the torch.compile variants at 64 only):

- ``eager``: ``MnistCNN(backend="torch")``, stock PyTorch (cuDNN, ``torch.backends.cudnn.benchmark`` on);
- ``dlkern``: ``MnistCNN(backend="dlkern")``, eager;
- ``dlkern+graph``: the dlkern model with the whole step captured in one CUDA graph: static input and label
  tensors, ``Adam(capturable=True)``, warm-up on a side stream, gradients set to None before capture so the
  backward allocates them from the graph's pool, then each step copies its batch into the static tensors and
  replays the graph;
- ``compile``, ``compile-reduce-overhead``, ``compile-max-autotune``: ``torch.compile(MnistCNN(backend="torch"),
  mode=...)`` -- the model's forward and backward compiled, the loss and Adam eager (the usual setup);
  ``torch._dynamo.reset()`` between variants. The modes with CUDA graphs (reduce-overhead, max-autotune) mark
  each step's start with ``torch.compiler.cudagraph_mark_step_begin()``.

Each row: median ms per step, images/s, speedup over eager, GPU kernels per step (torch.profiler), peak
memory, ``compile_s`` (the first call: Dynamo/Inductor compilation, or Triton JIT and autotuning for dlkern)
and ``capture_s`` (the CUDA-graph capture) -- both kept out of the step time.

On a CPU the suite times ``eager`` and ``dlkern`` only. There dlkern's max pool is its C++ kernel, but its Triton
ops (the fused conv blocks, ReLU) run an equivalent PyTorch composite (dlkern warns once): a check that
the model runs, not a measure of dlkern's kernels. CUDA graphs need CUDA, and torch.compile is left to the GPU.
"""

import time
import warnings

import torch
import torch.nn.functional as TF

from dlkern.models import MnistCNN
from dlkern.ops import triton_support
from timing import first_call_s, free_memory, launches, noisy, peak_mb, print_table, timed

PASSES = ("train-step", "inference")
CPU_NOTE = "CPU: dlkern's Triton ops ran their PyTorch-composite fallback"


def _impls(run, first_batch):
    """The variants to time at one batch. --quick compiles at the first batch only (compiling takes long)."""
    if not run.cuda:
        return ["eager", "dlkern"]
    modes = run.compile_modes if run.compile_modes is not None else (
        ["default", "reduce-overhead"] if run.quick else ["default", "reduce-overhead", "max-autotune"])
    if run.quick and not first_batch:
        modes = []
    return ["eager", "dlkern", "dlkern+graph"] + [f"compile-{m}" if m != "default" else "compile" for m in modes]


def _kernel(impl, run):
    """What a row times."""
    if impl == "eager" or impl.startswith("compile"):
        return "PyTorch" if impl == "eager" else "Inductor"
    return "Triton + CUDA kernels" if run.cuda else "PyTorch composite + C++ max pool"


def _model(backend, pass_, device):
    torch.manual_seed(0)
    return MnistCNN(backend=backend).to(device).train(pass_ == "train-step")


def _eager_variant(impl, pass_, x, y, run):
    """(step, compile_s) for the eager and torch.compile variants."""
    model = _model("dlkern" if impl == "dlkern" else "torch", pass_, run.device)
    call = model
    if impl.startswith("compile"):
        call = torch.compile(model, mode=impl.removeprefix("compile").removeprefix("-") or None)
    mark_step = impl in ("compile-reduce-overhead", "compile-max-autotune")  # the modes that use CUDA graphs
    if pass_ == "train-step":
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

        def step():
            if mark_step:
                torch.compiler.cudagraph_mark_step_begin()
            optimizer.zero_grad(set_to_none=True)
            TF.cross_entropy(call(x), y).backward()
            optimizer.step()
    else:
        def step():
            if mark_step:
                torch.compiler.cudagraph_mark_step_begin()
            with torch.no_grad():
                call(x)
    compile_s = first_call_s(step, run)
    for _ in range(3):  # cuDNN's algorithm search, cudagraph trees' recording, caches
        step()
    return step, dict(compile_s=compile_s)


def _graph_variant(pass_, x, y, run):
    """(step, times) for dlkern with the whole training step (or the forward) captured in one CUDA graph."""
    model = _model("dlkern", pass_, "cuda")
    static_x, static_y = x.clone(), y.clone()
    training = pass_ == "train-step"
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, capturable=True) if training else None

    def eager_step():
        if training:
            optimizer.zero_grad(set_to_none=True)
            TF.cross_entropy(model(static_x), static_y).backward()
            optimizer.step()
        else:
            with torch.no_grad():
                model(static_x)

    # Warm up on a side stream (Triton JIT and autotuning, lazy state), as torch.cuda.graph's documentation asks.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        compile_s = first_call_s(eager_step, run)
        for _ in range(3):
            eager_step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()

    graph = torch.cuda.CUDAGraph()
    start = time.perf_counter()
    if training:
        optimizer.zero_grad(set_to_none=True)  # backward inside the capture allocates .grad from the graph's pool
        with torch.cuda.graph(graph):
            TF.cross_entropy(model(static_x), static_y).backward()
            optimizer.step()
    else:
        with torch.no_grad(), torch.cuda.graph(graph):
            model(static_x)
    torch.cuda.synchronize()
    capture_s = time.perf_counter() - start

    def step():
        static_x.copy_(x)  # a real loop brings a new batch each step
        if training:
            static_y.copy_(y)
        graph.replay()

    step.graph = graph  # keeps the graph (and its memory pool) alive with the step
    for _ in range(3):
        step()
    return step, dict(compile_s=compile_s, capture_s=capture_s)


def run_suite(run):
    if not run.cuda:
        run.skip("model", "dlkern+graph and torch.compile variants", "CUDA graphs need a GPU, and compiling for "
                 "the CPU is left out of a CPU run (the compile modes are about GPU launch overhead)")
    rows = []
    fallback_warnings = set()
    for batch in run.batch_sizes():
        impls = _impls(run, batch == run.batch_sizes()[0])
        torch.manual_seed(1)
        x = torch.randn(batch, 1, 28, 28, device=run.device)
        y = torch.randint(0, 10, (batch,), device=run.device)
        for pass_ in PASSES:
            times = {}
            for impl in impls:
                step = None
                try:
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always")
                        if impl == "dlkern+graph":
                            step, setup = _graph_variant(pass_, x, y, run)
                        else:
                            step, setup = _eager_variant(impl, pass_, x, y, run)
                        ms, spread = timed(step, run)
                    for w in caught:  # the fallback's warning is summed up below; others pass through
                        if "PyTorch composite" in str(w.message):
                            fallback_warnings.update(triton_support._warned)
                        else:
                            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
                    times[impl] = ms
                    rows.append(dict(
                        suite="model", case="MnistCNN", impl=impl, dtype="float32", batch=batch, ms=ms,
                        images_per_s=batch / ms * 1e3, speedup=times["eager"] / ms if "eager" in times else None,
                        baseline="eager", launches=launches(step) if run.cuda else None,
                        peak_mb=peak_mb(step) if run.cuda else None,
                        note="; ".join(n for n in (CPU_NOTE if impl == "dlkern" and not run.cuda else None,
                                                    noisy(spread)) if n) or None,
                        spread=spread, kernel=_kernel(impl, run),
                        **setup, **{"pass": pass_},
                    ))
                except Exception as e:  # one failing variant must not cost the others
                    run.fail("model", f"{impl} {pass_} batch {batch}", e)
                finally:
                    step = None
                    free_memory(run)
        del x, y
    print("\nMnistCNN: one training step (forward, backward, Adam) and inference; x eager = eager ms / ms")
    print_table(rows, [
        ("pass", "pass", "{}"), ("batch", "batch", "{}"), ("impl", "impl", "{}"), ("ms", "ms", "{:.3f}"),
        ("images_per_s", "images/s", "{:,.0f}"), ("speedup", "x eager", "{:.2f}"), ("launches", "kernels", "{}"),
        ("peak_mb", "peak MB", "{:.0f}"), ("compile_s", "1st call s", "{:.1f}"), ("capture_s", "capture s", "{:.2f}"),
        ("spread", "spread", "{:.0%}"), ("note", "note", "{}"),
    ])
    if fallback_warnings:
        ops = ", ".join(f"dlkern.{op}" for op in sorted(fallback_warnings))
        print(f"note: {CPU_NOTE} ({ops}) -- the dlkern rows time those "
              "composites and dlkern's C++ max pool, not dlkern's GPU kernels")
    return rows
