"""Train the seed's MNIST CNN (:class:`dlkern.models.MnistCNN`) -- what the seed script meant, without its bugs.

    python -m dlkern.train --dataset synthetic --epochs 2            # no files, no network
    python -m dlkern.train --download --epochs 5 --device cuda       # real MNIST
    torchrun --nproc_per_node=2 -m dlkern.train --dataset synthetic  # DistributedDataParallel

Adam on cross-entropy; per epoch the train and test loss and accuracy (tqdm bars with live values), and in
``--out-dir``: ``metrics.json`` (rewritten every epoch), ``curves.png``, and ``model.pth``, the state_dict of the
epoch with the best test accuracy so far (seed-compatible keys; loads into either backend). An epoch whose test
loss or accuracy is not finite (a diverged run: NaN weights) is never a best and never saved; ``metrics.json`` is
strict JSON, with ``null`` for a number that is not finite. Every file is written to a temporary name and renamed
over the old one, and a checkpoint and the metrics that name it are written with Ctrl-C held back, so an
interrupt never leaves a truncated file or a ``best_epoch`` that ``model.pth`` does not hold.

Ctrl-C (SIGINT) ends a run with one line on stderr, e.g. ``dlkern.train: interrupted at epoch 2 after 37 of 188
training steps; metrics in runs/mnist/metrics.json``, and exit status 130, no traceback. ``metrics.json`` then
holds the completed epochs as usual (``best_epoch`` and ``model.pth`` are the best of those) and an
``"interrupted"`` record of the epoch under way: ``epoch``, ``phase`` (``"train"``, ``"test"``, or
``"between epochs"`` with ``epoch`` the last completed one), and for each phase begun in that epoch
``<phase>_steps`` (counted so far), ``<phase>_steps_total``, ``<phase>_samples``, ``<phase>_loss`` and
``<phase>_acc`` (``null`` before the first step), and ``seconds``; under torchrun these partial numbers are rank
0's own (``"rank_0_only": true``), since the other processes may be gone. ``"interrupted"`` is ``null`` in a run
that finished. Interrupted before the first epoch starts, a run writes nothing.

Under torchrun each process trains on its own shard of every epoch (``--batch-size`` is per process), the
metrics are summed over processes, and only rank 0 prints, plots and saves. NCCL on CUDA, gloo on CPU.

``--cuda-graph`` (CUDA only) records the whole training step -- zero_grad, forward, loss, backward and
``Adam(capturable=True)`` -- in one CUDA graph after a few eager warm-up steps, then replays it for every batch of
the full size: the launch overhead of a step is one graph launch. A batch of another size (each epoch's smaller
last batch) runs eagerly, so every sample trains and counts, as without the flag.

Options that cannot work (a device that is not here, a size below one, a batch below two, an output folder that
cannot be written, ``--cuda-graph`` without CUDA or with what it cannot capture) stop the program with one
``dlkern.train: error: ...`` line and exit status 2 before any data is drawn or loaded. ``--epochs 0`` only
evaluates the initial weights.

Here: the command line's entry points and the epoch loop. Its parts: ``train_options`` (the options and their
checks), ``train_data`` (loading and batching), ``train_steps`` (the eager and CUDA-graph training step) and
``train_records`` (metrics, checkpoint and plot files; the record of an interrupted run).
"""

import math
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dlkern.data import DatasetError
from dlkern.models import MnistCNN
from dlkern.ops import triton_support
from dlkern.train_data import Batches, load_data
from dlkern.train_options import AMP_DTYPES, SYNTHETIC_SIZES, UsageError, build_parser, validate  # noqa: F401
from dlkern.train_records import (Progress, TrainingInterrupted, interrupted, save_checkpoint, sigint_deferred,
                                  write_metrics)
from dlkern.train_steps import GraphedStep, autocast, eager_step


def main(argv=None):
    """The command line: 0 on success; 2 with a one-line message for a bad option (found before any data is
    drawn or loaded) or a message saying where the dataset goes when it is missing or unreadable; 130 (the
    shell's code for SIGINT) with a one-line message on Ctrl-C, after writing what was measured."""
    try:
        args = build_parser().parse_args(argv)
        run(args)
    except (UsageError, DatasetError) as e:
        print(f"dlkern.train: error: {e}", file=sys.stderr)
        return 2
    except TrainingInterrupted as e:
        if e.main_rank:  # under torchrun every process gets the Ctrl-C; one says so
            print(f"dlkern.train: {e}", file=sys.stderr, flush=True)
        return 130
    except KeyboardInterrupt:  # before run() took over (parsing, checking the options, joining the process group)
        print("dlkern.train: interrupted before training started; nothing written", file=sys.stderr, flush=True)
        return 130
    return 0


def run(args):
    """Train as `args` (from :func:`build_parser`) say; returns the metrics written to metrics.json.

    Raises UsageError, before any data is drawn or loaded, for options that cannot work (see :func:`validate`),
    and TrainingInterrupted on Ctrl-C, after writing what was measured (see the module's docstring)."""
    validate(args)
    rank, world = _init_distributed(args)
    progress = Progress()
    try:
        metrics = _run(args, rank, world, progress)
        if world > 1:
            # rank 0 still writes files: the others wait, so that no rank tears gloo down while a peer is busy
            # (one rank aborted once at exit in a loaded test run, "terminate called without an active exception")
            dist.barrier()
        return metrics
    except KeyboardInterrupt:
        raise interrupted(progress, args, rank == 0, world) from None
    finally:
        if world > 1:
            dist.destroy_process_group()


def _init_distributed(args):
    """(rank, world size). torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; each process takes its own GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        args.device = str(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world


def _run(args, rank, world, progress):
    device = torch.device(args.device)
    main_rank = rank == 0
    torch.manual_seed(args.seed)  # the same initial weights in every process (DDP broadcasts rank 0's anyway)
    torch.backends.cudnn.benchmark = False  # cuDNN's autotuner picks algorithms by timing: not reproducible
    torch.backends.cudnn.deterministic = True

    train_set, test_set = load_data(args, main_rank, world)
    model = MnistCNN(in_channels=1, num_classes=10, backend=args.backend).to(device)
    notice = triton_support.fallback_notice(device, "models.MnistCNN") if args.backend == "dlkern" else None
    if notice and main_rank:  # said here, not as a warning in the middle of a progress bar
        print(f"note: {notice}", flush=True)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    train_model = model
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    eval_model = model  # not the DDP wrapper: evaluation needs no gradient sync, and shards may differ in length
    if args.compile:
        train_model, eval_model = torch.compile(train_model), torch.compile(eval_model)
    # capturable: Adam keeps its step count on the device and reads nothing on the host, so a graph can hold it.
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, capturable=args.cuda_graph)
    amp = AMP_DTYPES[args.amp]
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)  # fp16 gradients need loss scaling
    # A graph replays the autocast casts it recorded: autocast must not cache them (torch.cuda.graph's rule).
    step = eager_step(train_model, optimizer, scaler, amp, device, cache_casts=not args.cuda_graph)

    batches = Batches(train_set, test_set, args, device, memory_format, rank, world)
    metrics = {"config": dict(vars(args), world_size=world, preloaded=batches.preloaded), "epochs": [],
               "best_epoch": None, "best_test_acc": None, "interrupted": None}
    if args.cuda_graph:
        step = GraphedStep(step, optimizer)
        metrics["cuda_graph"] = step.counts  # how many steps warmed up, replayed, ran eagerly (updated in place)
    if args.epochs == 0:
        return _evaluate_only(metrics, eval_model, batches, amp, device, args, main_rank, world, progress)
    if main_rank and batches.drops_last:
        print(f"note: each epoch's last batch would hold 1 sample{' per process' if world > 1 else ''}; it is "
              f"left out (BatchNorm trains on a batch's statistics)", flush=True)
    shuffle = torch.Generator().manual_seed(args.seed)  # the same permutation in every process, then sharded
    progress.metrics = metrics
    for epoch in range(1, args.epochs + 1):
        steps = batches.train(shuffle)
        progress.begin_epoch(epoch, len(steps))
        train = _train_epoch(train_model, step, steps, device,
                             _bar(main_rank, args, len(steps), f"epoch {epoch}/{args.epochs} train"), progress)
        _sync_buffers(model, world)
        steps = batches.test()
        test = _evaluate(eval_model, steps, amp, device, _bar(main_rank, args, len(steps), f"epoch {epoch} test"),
                         progress)
        train, test = _reduce(train, world), _reduce(test, world)
        row = {"epoch": epoch, "train_loss": train[0], "train_acc": train[1], "test_loss": test[0],
               "test_acc": test[1], "train_samples": train[2], "test_samples": test[2],
               "seconds": time.perf_counter() - progress.start}
        # Diverged weights (NaN) score a NaN loss, and an accuracy that means nothing: never a best.
        finite = math.isfinite(row["test_loss"]) and math.isfinite(row["test_acc"])
        better = finite and (metrics["best_test_acc"] is None or row["test_acc"] > metrics["best_test_acc"])
        with sigint_deferred():  # the checkpoint and the metrics naming it: both written, or neither
            metrics["epochs"].append(row)
            if better and main_rank:  # the seed overwrote model.pth every epoch, better or not
                save_checkpoint(model, args.out_dir)
            if better:
                metrics["best_epoch"], metrics["best_test_acc"] = epoch, row["test_acc"]
            if main_rank:
                write_metrics(metrics, args.out_dir)
            progress.phase = "between epochs"
            if main_rank:
                kept = (f"model.pth keeps epoch {metrics['best_epoch']}" if metrics["best_epoch"] is not None
                        else "no model.pth written")
                verdict = (" | best so far, saved model.pth" if better else
                           "" if finite else f" | test loss {row['test_loss']:.4f}: not a best, {kept}")
                print(f"epoch {epoch}/{args.epochs}: train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f} | "
                      f"test loss {row['test_loss']:.4f} acc {row['test_acc']:.4f} | {row['seconds']:.1f}s"
                      + verdict, flush=True)
    return metrics


def _evaluate_only(metrics, model, batches, amp, device, args, main_rank, world, progress):
    """--epochs 0: the untrained model's test loss and accuracy, printed and written to metrics.json."""
    steps = batches.test()
    loss, acc, samples = _reduce(_evaluate(model, steps, amp, device, _bar(main_rank, args, len(steps), "test"),
                                           progress), world)
    metrics["untrained"] = {"test_loss": loss, "test_acc": acc, "test_samples": samples}
    if main_rank:
        with sigint_deferred():
            write_metrics(metrics, args.out_dir)
        print(f"--epochs 0: nothing trained; the initial weights score test loss {loss:.4f} acc {acc:.4f} "
              f"({samples} samples); wrote metrics.json, no model.pth", flush=True)
    return metrics


def _bar(show, args, total, desc):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not show or args.no_progress, dynamic_ncols=True, leave=False)



def _train_epoch(model, step, steps, device, bar, progress=None):
    """(summed loss, correct) over the epoch as a float64 tensor on the device, and the sample count. With a
    :class:`Progress`, records the running sums after each step (for a report if Ctrl-C stops the epoch)."""
    model.train()
    sums, count = torch.zeros(2, dtype=torch.float64, device=device), 0
    if progress is not None:
        progress.begin("train", sums, len(steps))
    with bar:
        for i, (x, y) in enumerate(steps, 1):
            logits, loss = step(x, y)
            sums, count = _accumulate(sums, count, logits, y, loss, bar)
            if progress is not None:
                progress.parts["train"] = (sums, count, i, len(steps))
    return sums, count


@torch.no_grad()
def _evaluate(model, steps, amp, device, bar, progress=None):
    model.eval()
    sums, count = torch.zeros(2, dtype=torch.float64, device=device), 0
    if progress is not None:
        progress.begin("test", sums, len(steps))
    with bar:
        for i, (x, y) in enumerate(steps, 1):
            with autocast(device, amp):
                logits = model(x)
                loss = F.cross_entropy(logits, y)
            sums, count = _accumulate(sums, count, logits, y, loss, bar)
            if progress is not None:
                progress.parts["test"] = (sums, count, i, len(steps))
    return sums, count


def _accumulate(sums, count, logits, y, loss, bar):
    """(new sums, new count): a batch's summed loss and correct predictions added to `sums` on the device (the
    seed's `mean_loss /=` never added anything), and its samples to the count; advances the bar. `sums` is not
    changed in place, so a reference to it taken earlier keeps its value."""
    batch = torch.stack((loss.detach().double() * y.numel(), (logits.argmax(1) == y).sum().double()))
    sums, count = sums + batch, count + y.numel()
    bar.update()
    if not bar.disable and (bar.n % 10 == 0 or bar.n == bar.total):  # reading the sums syncs: not every step
        loss_sum, correct = sums.tolist()
        bar.set_postfix(loss=f"{loss_sum / count:.4f}", acc=f"{correct / count:.4f}", refresh=False)
    return sums, count


def _reduce(totals, world):
    """(mean loss, accuracy, samples) over every process."""
    sums, count = totals
    totals = torch.cat([sums, sums.new_tensor([count])])
    if world > 1:
        dist.all_reduce(totals)
    loss_sum, correct, count = totals.tolist()
    return loss_sum / max(count, 1), correct / max(count, 1), int(count)


def _sync_buffers(model, world):
    """BatchNorm's running statistics from rank 0 everywhere: DDP broadcasts them before each training forward,
    but every process then updates its own copy with its own batch."""
    if world > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)




if __name__ == "__main__":
    sys.exit(main())
