"""``python -m dlkern.train``'s command line: its options (:func:`build_parser`) and the checks that refuse the
ones that cannot work (:func:`validate`) before any data is drawn or loaded."""

import argparse
import os
import tempfile

import torch

from dlkern.models import BACKENDS
from dlkern.train_steps import GraphedStep

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
SYNTHETIC_SIZES = (12000, 2000)  # train, test: about 7 s to draw on one idle CPU core


class UsageError(ValueError):
    """An option that cannot work (a size below one, a device that is not here, an output folder that cannot be
    written); the message says which and why, in one line."""


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
                        f"Adam(capturable=True)) in one CUDA graph after {GraphedStep.WARMUP_STEPS} eager warm-up "
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

