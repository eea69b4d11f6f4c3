"""Time to accuracy: seconds of training until the MNIST CNN's test accuracy first reaches a target: 99% on
MNIST, 90% on the synthetic digits (hard on purpose: stock PyTorch reaches ~92% after 2 epochs of 12000 images),
75% on the quick CPU run's 3000 synthetic digits.

The recipe of ``python -m dlkern.train``: MnistCNN, Adam(lr=1e-3), cross-entropy, batch 64, seed 0 (the same
initial weights and the same batch order for every backend), images normalized with MNIST's mean and std, the
dataset on the device. Only training steps count: the clock stops (after a device sync) every few steps, the
whole test set is evaluated off the clock, and the run stops at the first evaluation at or above the target or when
its time budget is spent. A warm-up run on a throwaway model first takes Triton JIT, autotuning and cuDNN's
algorithm search out of the measurement.

Datasets: MNIST when its IDX files are under ``--data-dir`` (as ``dlkern.train`` reads them), and the synthetic
digits (``dlkern.data.synthetic_digits``, 12000 train / 2000 test as ``dlkern.train``; fewer in a quick CPU run)
always. Backends: ``dlkern`` against PyTorch eager (``eager``) on a GPU. On a CPU only the torch backend runs,
briefly: dlkern's CPU path there is a PyTorch composite (or Triton's interpreter), not its kernels.
"""

import time

import torch
import torch.nn.functional as TF

from dlkern.data import MNIST_MEAN, MNIST_STD, DatasetError, load_mnist, synthetic_digits
from dlkern.models import MnistCNN
from timing import free_memory, print_table, sync

TARGET_ACC = {"mnist": 0.99, "synthetic": 0.90}
QUICK_CPU_SYNTHETIC_TARGET = 0.75  # 3000 images: a correct run reaches 0.78-0.82 in 2 epochs
BATCH = 64
EVAL_BATCH = 1000
SYNTHETIC_SIZES = (12000, 2000)  # train, test: dlkern.train's
QUICK_CPU_SYNTHETIC_SIZES = (3000, 500)
EVAL_EVERY = {"mnist": 50, "synthetic": 20}  # training steps between evaluations


def _budget_s(run, dataset):
    """Seconds of training after which a backend that has not reached the target gives up."""
    if run.cuda:
        return 60 if run.quick or dataset == "synthetic" else 300
    return 15 if run.quick else 120


def _prepare(images, labels, device):
    x = images.unsqueeze(1).float().div_(255).sub_(MNIST_MEAN).div_(MNIST_STD)
    return x.to(device), labels.to(device)


def _accuracy(model, test_x, test_y):
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(test_x[i:i + EVAL_BATCH]).argmax(1) == test_y[i:i + EVAL_BATCH]).sum())
                      for i in range(0, len(test_y), EVAL_BATCH))
    model.train()
    return correct / len(test_y)


def _train_step(model, optimizer, x, y):
    optimizer.zero_grad(set_to_none=True)
    TF.cross_entropy(model(x), y).backward()
    optimizer.step()


def _target(run, dataset):
    if dataset == "synthetic" and run.quick and not run.cuda:
        return QUICK_CPU_SYNTHETIC_TARGET
    return TARGET_ACC[dataset]


def _time_to_accuracy(backend, train, test, budget_s, eval_every, target, run):
    """(seconds, steps, best accuracy, reached)."""
    (train_x, train_y), (test_x, test_y) = train, test
    backend_name = "torch" if backend == "eager" else backend
    # Warm-up on a throwaway model: the same shapes (full batches only, so one shape) and the same eval batches.
    model = MnistCNN(backend=backend_name).to(run.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(3):
        _train_step(model, optimizer, train_x[:BATCH], train_y[:BATCH])
    _accuracy(model, test_x, test_y)

    torch.manual_seed(0)
    model = MnistCNN(backend=backend_name).to(run.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    order_rng = torch.Generator().manual_seed(0)
    steps_per_epoch = len(train_y) // BATCH  # the last partial batch is dropped: one batch shape
    clock, steps, best = 0.0, 0, 0.0
    while clock < budget_s:
        order = torch.randperm(len(train_y), generator=order_rng).to(run.device)
        for first in range(0, steps_per_epoch, eval_every):
            sync(run)
            start = time.perf_counter()
            for i in range(first, min(first + eval_every, steps_per_epoch)):
                index = order[i * BATCH:(i + 1) * BATCH]
                _train_step(model, optimizer, train_x[index], train_y[index])
                steps += 1
            sync(run)
            clock += time.perf_counter() - start
            best = max(best, _accuracy(model, test_x, test_y))
            if best >= target:
                return clock, steps, best, True
            if clock >= budget_s:
                break
    return clock, steps, best, False


def run_suite(run):
    backends = ["dlkern", "eager"] if run.cuda else ["eager"]
    if not run.cuda:
        run.skip("accuracy", "the dlkern backend", "on a CPU dlkern's Triton ops run a PyTorch composite (or Triton's "
                 "interpreter, far too slow): only the torch backend trains, briefly")
    datasets = {}
    try:
        train_set, test_set = load_mnist(run.data_dir, train=True), load_mnist(run.data_dir, train=False)
        datasets["mnist"] = (train_set, test_set)
    except DatasetError as e:
        run.skip("accuracy", "MNIST", f"no readable MNIST files under {run.data_dir} "
                 f"({str(e).splitlines()[0]}); python -m dlkern.train --download --data-dir DIR fetches them")
    n_train, n_test = QUICK_CPU_SYNTHETIC_SIZES if run.quick and not run.cuda else SYNTHETIC_SIZES
    start = time.perf_counter()
    datasets["synthetic"] = (synthetic_digits(n_train, seed=0), synthetic_digits(n_test, seed=1))
    print(f"accuracy: drew {n_train} + {n_test} synthetic digits in {time.perf_counter() - start:.1f} s")

    rows = []
    for dataset, (train_set, test_set) in datasets.items():
        budget_s, eval_every, target = _budget_s(run, dataset), EVAL_EVERY[dataset], _target(run, dataset)
        train, test = _prepare(*train_set, run.device), _prepare(*test_set, run.device)
        times = {}
        for backend in backends:
            try:
                seconds, steps, best, reached = _time_to_accuracy(backend, train, test, budget_s, eval_every, target,
                                                                   run)
            except Exception as e:  # one failing backend must not cost the other
                run.fail("accuracy", f"{backend} on {dataset}", e)
                continue
            finally:
                free_memory(run)
            times[backend] = seconds if reached else None
            note = None if reached else f"not reached within the {budget_s} s budget"
            rows.append(dict(
                suite="accuracy", case=f"{dataset} to {target:.0%}", impl=backend, dtype="float32",
                size=f"{len(train[1])} train / {len(test[1])} test", batch=BATCH, tta_s=seconds if reached else None,
                train_s=seconds, steps=steps, epochs=steps / (len(train[1]) // BATCH), best_acc=best,
                reached=reached, baseline="eager", note=note, **{"pass": "train"},
            ))
        for r in rows:
            if r["case"].startswith(dataset) and times.get("eager") and times.get(r["impl"]):
                r["speedup"] = times["eager"] / times[r["impl"]]
    print(f"\ntime to a test accuracy (training seconds only, batch {BATCH}, Adam 1e-3)")
    print_table(rows, [
        ("case", "dataset", "{}"), ("size", "size", "{}"), ("impl", "impl", "{}"), ("tta_s", "seconds", "{:.2f}"),
        ("steps", "steps", "{}"), ("epochs", "epochs", "{:.2f}"), ("best_acc", "best acc", "{:.4f}"),
        ("speedup", "x eager", "{:.2f}"), ("note", "note", "{}"),
    ])
    return rows
