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
"""

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import tempfile
import threading
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dlkern.data import MNIST_MEAN, MNIST_STD, DatasetError, load_mnist, synthetic_digits
from dlkern.models import BACKENDS, MnistCNN
from dlkern.ops import triton_support

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
SYNTHETIC_SIZES = (12000, 2000)  # train, test: about 7 s to draw on one idle CPU core


class UsageError(ValueError):
    """An option that cannot work (a size below one, a device that is not here, an output folder that cannot be
    written); the message says which and why, in one line."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) during :func:`run`. ``str(e)`` is the one line the command line prints (where the run
    stopped, and where its metrics went); ``metrics`` is what ``metrics.json`` got (with its ``"interrupted"``
    record), None when the run was stopped before its first epoch and nothing was written. A KeyboardInterrupt,
    so code that catches those still does."""

    def __init__(self, message, metrics=None, main_rank=True):
        super().__init__(message)
        self.metrics, self.main_rank = metrics, main_rank


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m dlkern.train", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Train the seed's MNIST CNN (dlkern.models.MnistCNN) with Adam. Under torchrun: "
                    "DistributedDataParallel, one shard per process.")
    p.add_argument("--epochs", type=int, default=5, help="passes over the training set")
    p.add_argument("--batch-size", type=int, default=64, help="training batch, per process")
    p.add_argument("--test-batch-size", type=int, default=1000, help="evaluation batch, per process")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate")
    p.add_argument("--device", default=None, help="cuda when available, else cpu")
    p.add_argument("--backend", choices=BACKENDS, default="dlkern", help="dlkern's kernels or stock torch.nn")
    p.add_argument("--amp", choices=tuple(AMP_DTYPES), default="none", help="autocast dtype (fp16 adds loss scaling)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--cuda-graph", action="store_true",
                   help=f"CUDA only: capture the whole training step (zero_grad, forward, loss, backward, "
                        f"Adam(capturable=True)) in one CUDA graph after {_GraphedStep.WARMUP_STEPS} eager warm-up "
                        f"steps and replay it for every full batch; a batch of another size (an epoch's smaller "
                        f"last batch) runs eagerly, so every sample trains and counts. Not with --compile, "
                        f"--amp fp16 (its loss scaling syncs the host) or torchrun")
    p.add_argument("--channels-last", action="store_true", help="channels_last model and inputs")
    p.add_argument("--dataset", choices=("mnist", "synthetic"), default="mnist",
                   help="MNIST's files, or digits drawn in-process (no files, no network)")
    p.add_argument("--data-dir", default="data", help="MNIST's IDX files go in DATA_DIR/MNIST/raw")
    p.add_argument("--download", action="store_true", help="fetch MNIST with torchvision first")
    p.add_argument("--train-size", type=int, default=None,
                   help=f"the first N training images (synthetic: N drawn; {SYNTHETIC_SIZES[0]} unless given)")
    p.add_argument("--test-size", type=int, default=None,
                   help=f"the same for the test set (synthetic: {SYNTHETIC_SIZES[1]} unless given)")
    p.add_argument("--data-loader", action="store_true",
                   help="batch through a DataLoader even when the dataset fits in device memory")
    p.add_argument("--seed", type=int, default=0, help="seeds the weights, the shuffling and the synthetic data")
    p.add_argument("--out-dir", default="runs/mnist", help="where model.pth, metrics.json and curves.png go")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (torch.set_num_threads); torch's default unless given")
    return p


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


def validate(args):
    """Checks what can be checked before any data is drawn or loaded; raises UsageError saying what is wrong.

    Fills in the default device (cuda when available, else cpu) and creates ``--out-dir``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    for name in ("test_batch_size", "test_size", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    # BatchNorm normalizes a training batch by the batch's own statistics: one image is not a batch.
    if args.batch_size < 2:
        raise UsageError(f"--batch-size must be at least 2 (BatchNorm trains on a batch's statistics), "
                         f"got {args.batch_size}")
    if args.train_size is not None and args.train_size < 2 * world:
        raise UsageError(f"--train-size must be at least 2" + (f" per process ({2 * world} for {world})"
                         if world > 1 else "") + f" (BatchNorm trains on a batch's statistics), got {args.train_size}")
    if args.epochs < 0:
        raise UsageError(f"--epochs must be at least 0, got {args.epochs}")
    if not args.lr >= 0:  # also NaN
        raise UsageError(f"--lr must be at least 0, got {args.lr}")
    if args.cuda_graph:
        _check_cuda_graph(args, world)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    args.device = _check_device(args.device)
    if args.cuda_graph and torch.device(args.device).type != "cuda":
        raise UsageError(f"--cuda-graph: CUDA graphs need a CUDA device, got --device {args.device}"
                         + ("" if torch.cuda.is_available() else
                            " (no CUDA GPU is visible here: torch.cuda.is_available() is False)"))
    _check_out_dir(args.out_dir)


def _check_cuda_graph(args, world):
    """What --cuda-graph cannot capture; UsageError saying which."""
    if args.compile:
        raise UsageError("--cuda-graph and --compile do not combine (torch.compile brings its own CUDA graphs, "
                         "with mode='reduce-overhead'); pick one")
    if args.amp == "fp16":
        raise UsageError("--cuda-graph cannot capture --amp fp16: its loss scaling reads the gradients on the host "
                         "every step; use --amp bf16 (no loss scaling)")
    if world > 1:
        raise UsageError(f"--cuda-graph runs in one process, not under torchrun ({world} processes): DDP's "
                         f"gradient all-reduce is not captured")


def _check_device(name):
    """The device's name when torch can compute on it here; else UsageError."""
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UsageError(f"--device {name}: not a device torch knows ({str(e).splitlines()[0]})") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UsageError(f"--device {name}: no CUDA GPU is visible here (torch.cuda.is_available() is False); "
                             f"use --device cpu")
        # Under torchrun each process takes GPU LOCAL_RANK.
        index = int(os.environ.get("LOCAL_RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else device.index
        if index is not None and index >= count:
            raise UsageError(f"--device {name}: GPU {index} requested, {count} visible")
        return name
    try:  # any other device type: does a tensor go there and come back?
        torch.ones(1, device=device).add(1).cpu().item()
    except Exception as e:  # errors here come in many types (NotImplementedError, RuntimeError, ...)
        raise UsageError(f"--device {name}: unusable here ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    return name


def _check_out_dir(out_dir):
    """Creates `out_dir` and checks a file can be written in it; else UsageError saying why."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):  # makedirs would say only "File exists"
        raise UsageError(f"--out-dir {out_dir} is a file, not a directory" if os.path.isfile(out_dir) else
                         f"--out-dir {out_dir} exists and is not a directory")
    try:
        os.makedirs(out_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as e:
        raise UsageError(f"--out-dir {out_dir}: cannot write there ({e.strerror or e})") from None


def run(args):
    """Train as `args` (from :func:`build_parser`) say; returns the metrics written to metrics.json.

    Raises UsageError, before any data is drawn or loaded, for options that cannot work (see :func:`validate`),
    and TrainingInterrupted on Ctrl-C, after writing what was measured (see the module's docstring)."""
    validate(args)
    rank, world = _init_distributed(args)
    progress = _Progress()
    try:
        metrics = _run(args, rank, world, progress)
        if world > 1:
            # rank 0 still writes files: the others wait, so that no rank tears gloo down while a peer is busy
            # (one rank aborted once at exit in a loaded test run, "terminate called without an active exception")
            dist.barrier()
        return metrics
    except KeyboardInterrupt:
        raise _interrupted(progress, args, rank == 0, world) from None
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

    train_set, test_set = _load_data(args, main_rank, world)
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
    step = _eager_step(train_model, optimizer, scaler, amp, device, cache_casts=not args.cuda_graph)

    batches = _Batches(train_set, test_set, args, device, memory_format, rank, world)
    metrics = {"config": dict(vars(args), world_size=world, preloaded=batches.preloaded), "epochs": [],
               "best_epoch": None, "best_test_acc": None, "interrupted": None}
    if args.cuda_graph:
        step = _GraphedStep(step, optimizer)
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
        with _sigint_deferred():  # the checkpoint and the metrics naming it: both written, or neither
            metrics["epochs"].append(row)
            if better and main_rank:  # the seed overwrote model.pth every epoch, better or not
                _save_checkpoint(model, args.out_dir)
            if better:
                metrics["best_epoch"], metrics["best_test_acc"] = epoch, row["test_acc"]
            if main_rank:
                _write(metrics, args.out_dir)
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


class _Progress:
    """Where a run is, for the record :func:`_interrupted` writes: the epoch under way, its phase ("setup",
    "train", "test", "between epochs"), when it started, and per phase begun in it a tuple (running sums,
    samples, steps counted, steps in all). The tuple is replaced whole after each counted step (the sums are
    never updated in place), so an interrupt between two statements still finds the three in agreement."""

    def __init__(self):
        self.metrics, self.epoch, self.phase, self.start, self.parts = None, None, "setup", None, {}

    def begin_epoch(self, epoch, train_steps):
        self.epoch, self.start, self.parts = epoch, time.perf_counter(), {"train": (None, 0, 0, train_steps)}
        self.phase = "train"

    def begin(self, phase, sums, total):
        self.parts[phase] = (sums, 0, 0, total)
        self.phase = phase


def _interrupted(progress, args, main_rank, world):
    """TrainingInterrupted for a Ctrl-C at `progress`, after rank 0 wrote metrics.json with the "interrupted"
    record (the completed epochs, best_epoch and model.pth stay as the last epoch left them). A second Ctrl-C
    while this runs is ignored."""
    with _sigint_ignored():
        metrics, epoch = progress.metrics, progress.epoch
        if metrics is None or epoch is None:  # the first epoch has not begun: nothing measured, nothing written
            where = "while evaluating the initial weights" if progress.phase == "test" else "before training started"
            return TrainingInterrupted(f"interrupted {where}; nothing written", None, main_rank)
        record = {"epoch": epoch, "phase": progress.phase}
        if progress.phase != "between epochs":
            for phase, (sums, count, done, total) in progress.parts.items():
                loss_sum, correct = sums.tolist() if count else (None, None)
                record.update({f"{phase}_steps": done, f"{phase}_steps_total": total, f"{phase}_samples": count,
                               f"{phase}_loss": loss_sum / count if count else None,
                               f"{phase}_acc": correct / count if count else None})
            record["seconds"] = time.perf_counter() - progress.start
        if world > 1:
            record["rank_0_only"] = True  # the other processes' partial sums are not gathered: they may be gone
        metrics["interrupted"] = record
        path = os.path.join(args.out_dir, "metrics.json")
        if main_rank:
            _write(metrics, args.out_dir, plot=False)  # curves.png already shows every completed epoch
        if progress.phase == "between epochs":
            where = f"after epoch {epoch}"
        else:
            _, _, done, total = progress.parts[progress.phase]
            where = (f"at epoch {epoch} after {done} of {total} training steps" if progress.phase == "train" else
                     f"at epoch {epoch} while evaluating, after {done} of {total} test batches")
        return TrainingInterrupted(f"interrupted {where}; metrics in {path}", metrics, main_rank)


def _sigint_handler_is_ours():
    """Whether this code may swap the SIGINT handler: in the main thread, with a handler Python installed."""
    return threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is not None


@contextlib.contextmanager
def _sigint_deferred():
    """Holds a Ctrl-C (SIGINT) back until the block ends, then delivers it to the handler that was there."""
    if not _sigint_handler_is_ours():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        signal.raise_signal(signal.SIGINT)


@contextlib.contextmanager
def _sigint_ignored():
    """Ignores Ctrl-C (SIGINT) in the block: a second one while an interrupted run writes its record."""
    if not _sigint_handler_is_ours():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _evaluate_only(metrics, model, batches, amp, device, args, main_rank, world, progress):
    """--epochs 0: the untrained model's test loss and accuracy, printed and written to metrics.json."""
    steps = batches.test()
    loss, acc, samples = _reduce(_evaluate(model, steps, amp, device, _bar(main_rank, args, len(steps), "test"),
                                           progress), world)
    metrics["untrained"] = {"test_loss": loss, "test_acc": acc, "test_samples": samples}
    if main_rank:
        with _sigint_deferred():
            _write(metrics, args.out_dir)
        print(f"--epochs 0: nothing trained; the initial weights score test loss {loss:.4f} acc {acc:.4f} "
              f"({samples} samples); wrote metrics.json, no model.pth", flush=True)
    return metrics


def _load_data(args, main_rank, world):
    """(train, test) as (uint8 images, int64 labels) on the CPU."""
    sizes = (args.train_size, args.test_size)
    if args.dataset == "synthetic":
        sizes = tuple(s if s is not None else d for s, d in zip(sizes, SYNTHETIC_SIZES))
        show = main_rank and not args.no_progress
        # Disjoint seeds for the two splits; every process draws the same sets.
        return tuple(synthetic_digits(n, seed=2 * args.seed + i, progress=show and f"drawing {split} digits")
                     for i, (n, split) in enumerate(zip(sizes, ("train", "test"))))
    if args.download and world > 1 and not main_rank:
        dist.barrier()  # rank 0 downloads first
    try:
        sets = [load_mnist(args.data_dir, train, download=args.download and main_rank) for train in (True, False)]
    finally:
        if args.download and world > 1 and main_rank:
            dist.barrier()
    return tuple((x[:n], y[:n]) for (x, y), n in zip(sets, sizes))


class _Batches:
    """Batches of normalized (N, 1, 28, 28) float images and labels on the device.

    Fast path: the uint8 dataset lives on the device and batches are gathered by indexing, one small kernel per
    batch. When it does not fit (or with --data-loader), a DataLoader gathers the same batches on the CPU and
    copies them over. Either way a process trains on its shard, every world-th sample of the epoch's permutation.
    """

    def __init__(self, train_set, test_set, args, device, memory_format, rank, world):
        self.device, self.memory_format, self.rank, self.world = device, memory_format, rank, world
        self.batch_size, self.test_batch_size = args.batch_size, args.test_batch_size
        nbytes = sum(t.nbytes for pair in (train_set, test_set) for t in pair)
        self.preloaded = not args.data_loader and _fits(nbytes, device)
        where = device if self.preloaded else torch.device("cpu")
        self.train_set = tuple(t.to(where) for t in train_set)
        self.test_set = tuple(t.to(where) for t in test_set)

    @property
    def drops_last(self):
        """Whether each process's last training batch would hold a single sample (and so is left out)."""
        n = len(self.train_set[1])
        return (n // self.world) % self.batch_size == 1

    def train(self, generator):
        n = len(self.train_set[1])
        order = torch.randperm(n, generator=generator)
        # Every process must take the same number of steps (DDP syncs each one): drop the last n % world.
        order = order[: n - n % self.world][self.rank::self.world]
        if self.drops_last:
            order = order[:-1]
        return self._batches(self.train_set, order.split(self.batch_size))

    def test(self):
        n = len(self.test_set[1])  # shards may differ by one sample: evaluation has no per-step sync
        return self._batches(self.test_set, torch.arange(self.rank, n, self.world).split(self.test_batch_size))

    def _batches(self, dataset, index_batches):
        if self.preloaded:
            return _Lazy(lambda i: self._prepare(*(t[i.to(self.device)] for t in dataset)), index_batches)
        pin = self.device.type == "cuda"
        # batch_size=None: the sampler yields whole index batches and TensorDataset gathers each in one go.
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*dataset), batch_size=None,
                                             sampler=index_batches, pin_memory=pin)
        return _Lazy(lambda batch: self._prepare(*(t.to(self.device, non_blocking=pin) for t in batch)),
                     loader, length=len(index_batches))

    def _prepare(self, images, labels):
        x = images.unsqueeze(1).float().div_(255).sub_(MNIST_MEAN).div_(MNIST_STD)
        return x.contiguous(memory_format=self.memory_format), labels


class _Lazy:
    """An iterable of `fn(item)` over `items`, with a length (for the progress bar)."""

    def __init__(self, fn, items, length=None):
        self.fn, self.items, self.length = fn, items, len(items) if length is None else length

    def __len__(self):
        return self.length

    def __iter__(self):
        return (self.fn(item) for item in self.items)


def _fits(nbytes, device):
    """Whether the dataset fits comfortably in device memory. CPU: it is there already."""
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        return 4 * nbytes < torch.cuda.mem_get_info(device)[0]
    return False


def _bar(show, args, total, desc):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not show or args.no_progress, dynamic_ncols=True, leave=False)


def _autocast(device, amp, cache_casts=True):
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=amp, cache_enabled=cache_casts)


def _eager_step(model, optimizer, scaler, amp, device, cache_casts=True):
    """step(x, y) -> (logits, loss): one training step (zero_grad, forward, loss, backward, optimizer step)."""

    def step(x, y):
        with _autocast(device, amp, cache_casts):
            logits = model(x)
            loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return logits, loss

    return step


@contextlib.contextmanager
def _on_side_stream():
    """The block's work on a side stream, ordered after and before the main stream's: where warm-up steps run, as
    torch.cuda.graph's documentation asks (lazy per-stream state is set up away from the capture's streams)."""
    main, side = torch.cuda.current_stream(), torch.cuda.Stream()
    side.wait_stream(main)  # the batch was made on the main stream
    with torch.cuda.stream(side):
        yield
    main.wait_stream(side)


def _capture(fn):
    """(graph, outputs): fn() recorded in a CUDA graph -- not run: each graph.replay() runs it, rewriting the same
    output tensors (and everything fn writes) in place."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn()
    return graph, outputs


class _GraphedStep:
    """--cuda-graph: an eager training step (:func:`_eager_step`) replayed from a CUDA graph.

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
            with _on_side_stream():
                return self.step(x, y)
        if self.graph is None:
            self.static_x, self.static_y = x.clone(), y.clone()
            self.optimizer.zero_grad(set_to_none=True)  # the warm-up's gradients go before capture, as documented
            self.graph, self.outputs = _capture(lambda: self.step(self.static_x, self.static_y))
        self.static_x.copy_(x)
        self.static_y.copy_(y)
        self.graph.replay()
        self.counts["replayed_steps"] += 1
        return self.outputs


def _train_epoch(model, step, steps, device, bar, progress=None):
    """(summed loss, correct) over the epoch as a float64 tensor on the device, and the sample count. With a
    :class:`_Progress`, records the running sums after each step (for a report if Ctrl-C stops the epoch)."""
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
            with _autocast(device, amp):
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


def _replace(path, write):
    """write(temporary path), then the temporary file renamed over `path`: a reader, or an interrupted or failed
    write, never leaves or sees half a file (the old one stays whole until the rename)."""
    tmp = path + ".tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _save_checkpoint(model, out_dir):
    state = model.state_dict()
    _replace(os.path.join(out_dir, "model.pth"), lambda tmp: torch.save(state, tmp))


def _json_numbers(obj):
    """`obj` with every float that is not finite (a diverged loss, --lr inf) as None: strict JSON has no NaN."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_numbers(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_numbers(v) for v in obj]
    return obj


def _write(metrics, out_dir, plot=True):
    """metrics.json (strict JSON) and, with `plot` and a completed epoch, curves.png, each replaced whole."""
    text = json.dumps(_json_numbers(metrics), indent=2, allow_nan=False)

    def dump(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    _replace(os.path.join(out_dir, "metrics.json"), dump)
    if plot and metrics["epochs"]:
        _plot(metrics["epochs"], _title(metrics), os.path.join(out_dir, "curves.png"))


def _title(metrics):
    """What a run trained: backend, dataset and its sizes, device (and the options that change the numbers)."""
    config, last = metrics["config"], metrics["epochs"][-1]
    extras = [f"{config['world_size']} processes" if config["world_size"] > 1 else "",
              f"amp {config['amp']}" if config["amp"] != "none" else "", "compiled" if config["compile"] else "",
              "channels_last" if config["channels_last"] else "", "CUDA graph" if config["cuda_graph"] else ""]
    return (f"MnistCNN, backend {config['backend']}, {config['dataset']} ({last['train_samples']} train / "
            f"{last['test_samples']} test), device {config['device']}"
            + "".join(f", {e}" for e in extras if e) + f", batch {config['batch_size']}, seed {config['seed']}")


def _plot(rows, title, path):
    # Figure without pyplot: no GUI backend, no global state (the Agg canvas is picked for PNG).
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in rows]
    fig = Figure(figsize=(10, 4), layout="constrained")
    for ax, what in zip(fig.subplots(1, 2), ("loss", "acc")):
        for split in ("train", "test"):
            ax.plot(epochs, [r[f"{split}_{what}"] for r in rows], marker="o", label=split)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel({"loss": "cross-entropy", "acc": "accuracy"}[what])
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize="medium")
    _replace(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))


if __name__ == "__main__":
    sys.exit(main())
