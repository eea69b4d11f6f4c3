"""What ``python -m dlkern.train`` leaves behind: ``metrics.json``, ``curves.png`` and ``model.pth``, each replaced
whole (:func:`write_metrics`, :func:`save_checkpoint`), and the record of a run stopped by Ctrl-C
(:class:`Progress`, :func:`interrupted`, :class:`TrainingInterrupted`) with the SIGINT guards around the writes."""

import contextlib
import json
import math
import os
import signal
import threading
import time

import torch


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) during :func:`run`. ``str(e)`` is the one line the command line prints (where the run
    stopped, and where its metrics went); ``metrics`` is what ``metrics.json`` got (with its ``"interrupted"``
    record), None when the run was stopped before its first epoch and nothing was written. A KeyboardInterrupt,
    so code that catches those still does."""

    def __init__(self, message, metrics=None, main_rank=True):
        super().__init__(message)
        self.metrics, self.main_rank = metrics, main_rank


class Progress:
    """Where a run is, for the record :func:`interrupted` writes: the epoch under way, its phase ("setup",
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


def interrupted(progress, args, main_rank, world):
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
            write_metrics(metrics, args.out_dir, plot=False)  # curves.png already shows every completed epoch
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
def sigint_deferred():
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


def save_checkpoint(model, out_dir):
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


def write_metrics(metrics, out_dir, plot=True):
    """metrics.json (strict JSON) and, with `plot` and a completed epoch, curves.png, each replaced whole."""
    text = json.dumps(_json_numbers(metrics), indent=2, allow_nan=False)

    def dump(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    _replace(os.path.join(out_dir, "metrics.json"), dump)
    if plot and metrics["epochs"]:
        _plot(metrics["epochs"], run_title(metrics), os.path.join(out_dir, "curves.png"))


def run_title(metrics):
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

