"""The training program's data: the datasets loaded or drawn (:func:`load_data`) and batched on the device
(:class:`Batches`), each process its own shard under torchrun."""

import torch
import torch.distributed as dist

from dlkern.data import MNIST_MEAN, MNIST_STD, load_mnist, synthetic_digits
from dlkern.train_options import SYNTHETIC_SIZES


def load_data(args, main_rank, world):
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


class Batches:
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

