"""One training step of ``python -m dlkern.train``: the eager step (:func:`eager_step`: zero_grad, forward, loss,
backward, optimizer step, under autocast) and ``--cuda-graph``'s replay of it (:class:`GraphedStep`)."""

import contextlib

import torch
import torch.nn.functional as F


def autocast(device, amp, cache_casts=True):
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=amp, cache_enabled=cache_casts)


def eager_step(model, optimizer, scaler, amp, device, cache_casts=True):
    """step(x, y) -> (logits, loss): one training step (zero_grad, forward, loss, backward, optimizer step)."""

    def step(x, y):
        with autocast(device, amp, cache_casts):
            logits = model(x)
            loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return logits, loss

    return step


@contextlib.contextmanager
def on_side_stream():
    """The block's work on a side stream, ordered after and before the main stream's: where warm-up steps run, as
    torch.cuda.graph's documentation asks (lazy per-stream state is set up away from the capture's streams)."""
    main, side = torch.cuda.current_stream(), torch.cuda.Stream()
    side.wait_stream(main)  # the batch was made on the main stream
    with torch.cuda.stream(side):
        yield
    main.wait_stream(side)


def capture(fn):
    """(graph, outputs): fn() recorded in a CUDA graph -- not run: each graph.replay() runs it, rewriting the same
    output tensors (and everything fn writes) in place."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn()
    return graph, outputs


class GraphedStep:
    """--cuda-graph: an eager training step (:func:`eager_step`) replayed from a CUDA graph.

    The first WARMUP_STEPS steps of the full batch shape (the first batch's) run eagerly on a side stream: they
    train as usual, and run every kernel once first (Triton compiles and autotunes there, Adam creates its
    state, cuDNN picks its algorithms), since nothing may sync the host or allocate outside the graph's pool
    during capture. The next one captures the step on static input and label tensors and replays it; every
    later full batch is copied into those tensors and replayed. A batch of another shape runs eagerly: a graph
    holds one shape, and an epoch's last batch is usually smaller. Each step returns (logits, loss); after a
    replay they are the graph's own output tensors, read before the next replay (the caller queues its reads
    on the same stream).

    The zero_grad inside the step sets the gradients to None before backward, so in the graph the backward
    writes fresh gradients from the graph's pool on every replay, not adding to stale ones -- and an eager step
    between replays (another shape) allocates its own without touching the graph's.
    """

    WARMUP_STEPS = 3

    def __init__(self, step, optimizer):
        self.step, self.optimizer = step, optimizer
        self.shape = None
        self.graph = None
        self.counts = {"warmup_steps": 0, "replayed_steps": 0, "eager_steps": 0}

    def __call__(self, x, y):
        if self.shape is None:
            self.shape = (x.shape, y.shape)
        if (x.shape, y.shape) != self.shape:
            self.counts["eager_steps"] += 1
            return self.step(x, y)
        if self.counts["warmup_steps"] < self.WARMUP_STEPS:
            self.counts["warmup_steps"] += 1
            with on_side_stream():
                return self.step(x, y)
        if self.graph is None:
            self.static_x, self.static_y = x.clone(), y.clone()
            self.optimizer.zero_grad(set_to_none=True)  # the warm-up's gradients go before capture, as documented
            self.graph, self.outputs = capture(lambda: self.step(self.static_x, self.static_y))
        self.static_x.copy_(x)
        self.static_y.copy_(y)
        self.graph.replay()
        self.counts["replayed_steps"] += 1
        return self.outputs

