"""Datasets for ``dlkern.train``: MNIST read from its IDX files, and a synthetic digit set drawn in-process so
training runs on a machine without network access.

Both give ``(images, labels)``: uint8 images of shape (N, 28, 28) and int64 labels of shape (N,), on the CPU.
"""

import gzip
import math
import os

import torch

__all__ = ["DatasetError", "load_mnist", "synthetic_digits", "MNIST_MEAN", "MNIST_STD"]

# Mean and standard deviation of MNIST's training pixels (scaled to [0, 1]), the customary normalization.
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081

_FILES = {True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


class DatasetError(RuntimeError):
    """A dataset's files are missing or unreadable; the message says where they go and what else to do."""


def load_mnist(data_dir, train=True, download=False):
    """MNIST's training (60000) or test (10000) images and labels from the IDX files under ``data_dir``.

    The files are looked for in torchvision's layout (``data_dir/MNIST/raw/``), then in ``data_dir`` itself,
    plain or gzipped. ``download=True`` first fetches them with ``torchvision.datasets.MNIST`` (which needs
    torchvision and network access); reading never needs torchvision.
    """
    if download:
        try:
            from torchvision.datasets import MNIST
        except ImportError as e:
            raise DatasetError(f"--download needs torchvision ({e}); or put the MNIST IDX files in "
                               f"{os.path.join(data_dir, 'MNIST', 'raw')}, or use --dataset synthetic") from e
        try:
            MNIST(root=data_dir, train=train, download=True)
        except Exception as e:  # network errors come in many types; say what to do instead
            raise DatasetError(f"downloading MNIST into {data_dir} failed: {e}\n{_where(data_dir)}") from e
    images_name, labels_name = _FILES[train]
    images = _read_idx(_find(data_dir, images_name), 3, data_dir)
    labels = _read_idx(_find(data_dir, labels_name), 1, data_dir)
    if images.shape[1:] != (28, 28) or images.shape[0] != labels.shape[0] or int(labels.max()) > 9:
        raise DatasetError(f"MNIST files in {data_dir} are inconsistent: images {tuple(images.shape)}, labels "
                           f"{tuple(labels.shape)} (largest label {int(labels.max())})\n{_where(data_dir)}")
    return images, labels.long()


def _where(data_dir):
    names = ", ".join(n for pair in _FILES.values() for n in pair)
    return (f"MNIST's IDX files ({names}; plain or .gz) go in {os.path.join(data_dir, 'MNIST', 'raw')} (or in "
            f"{data_dir} itself). Pass --download to fetch them, --data-dir to look elsewhere, or train on "
            f"generated digits with --dataset synthetic (no files, no network).")


def _find(data_dir, name):
    for folder in (os.path.join(data_dir, "MNIST", "raw"), data_dir):
        for candidate in (name, name + ".gz"):
            path = os.path.join(folder, candidate)
            if os.path.isfile(path):
                return path
    raise DatasetError(f"MNIST file {name} not found under {data_dir}.\n{_where(data_dir)}")


def _read_idx(path, ndim, data_dir):
    """An IDX file of unsigned bytes (magic 0x00 0x00 0x08 ndim, then ndim big-endian int32 sizes, then data)."""
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # also a truncated or not-really-gzip file
        raise DatasetError(f"cannot read {path}: {e}\n{_where(data_dir)}") from e
    header = 4 + 4 * ndim
    if len(raw) < header or raw[:4] != bytes([0, 0, 8, ndim]):
        raise DatasetError(f"{path} is not an IDX file of {ndim}-D unsigned bytes (bad header {raw[:4].hex()})\n"
                           f"{_where(data_dir)}")
    shape = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    if len(raw) != header + math.prod(shape):
        raise DatasetError(f"{path} is truncated or corrupt: header says {shape}, that is "
                           f"{header + math.prod(shape)} bytes, the file has {len(raw)}\n{_where(data_dir)}")
    return torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8).reshape(shape)


# ---------------------------------------------------------------------------------------------- synthetic digits
# Each digit is a set of pen strokes (line segments) in a unit box, x to the right and y downwards, in one of a
# few styles per class (a 7 with or without its crossbar, an open or closed 4, ...). An image is its digit's
# strokes with a gap where the pen lifted, bent by a smooth random displacement and put through a random affine
# map (rotation, scale, shear, shift), drawn with a random pen width and pressure as an anti-aliased distance
# field, among stray strokes (clutter), on an uneven background with noise, sometimes partly covered by a blot
# or an eraser patch. Hard on purpose: a correct CNN does not reach 100% in a couple of epochs, so accuracy can
# tell a subtly wrong training backend from a right one.


def _polyline(*points):
    return [(points[i], points[i + 1]) for i in range(len(points) - 1)]


def _arc(cx, cy, rx, ry, start, stop, pieces=8):
    """An elliptical arc from angle `start` to `stop` in degrees (0 = right, 90 = down), as segments."""
    angles = [math.radians(start + (stop - start) * i / pieces) for i in range(pieces + 1)]
    return _polyline(*[(cx + rx * math.cos(a), cy + ry * math.sin(a)) for a in angles])


_STYLES = [  # per digit, its styles
    [_arc(0.5, 0.5, 0.3, 0.42, 0, 360, 12),
     _arc(0.5, 0.5, 0.22, 0.42, 0, 360, 12) + _polyline((0.66, 0.2), (0.34, 0.8))],                  # 0, slashed
    [_polyline((0.52, 0.08), (0.52, 0.92)),
     _polyline((0.32, 0.25), (0.52, 0.08), (0.52, 0.92)) + _polyline((0.34, 0.92), (0.7, 0.92))],     # 1
    [_arc(0.5, 0.32, 0.27, 0.22, 200, 380, 6) + _polyline((0.75, 0.4), (0.2, 0.92), (0.82, 0.92)),
     _arc(0.5, 0.32, 0.27, 0.22, 200, 380, 6) + _polyline((0.75, 0.4), (0.3, 0.85))
     + _arc(0.3, 0.85, 0.08, 0.07, 0, 360, 5) + _polyline((0.36, 0.9), (0.82, 0.92))],                # 2, looped
    [_arc(0.48, 0.3, 0.24, 0.2, 210, 450, 7) + _arc(0.48, 0.7, 0.27, 0.22, 270, 510, 7),
     _polyline((0.22, 0.08), (0.75, 0.08), (0.45, 0.42)) + _arc(0.48, 0.68, 0.27, 0.24, 270, 510, 7)],  # 3, flat top
    [_polyline((0.66, 0.92), (0.66, 0.08), (0.18, 0.65), (0.85, 0.65)),
     _polyline((0.3, 0.08), (0.22, 0.6), (0.85, 0.6)) + _polyline((0.68, 0.25), (0.68, 0.92))],      # 4, open
    [_polyline((0.8, 0.08), (0.3, 0.08), (0.27, 0.45)) + _arc(0.5, 0.66, 0.27, 0.25, 220, 500, 8),
     _polyline((0.78, 0.1), (0.32, 0.1), (0.3, 0.48)) + _arc(0.48, 0.68, 0.25, 0.24, 230, 470, 6)],  # 5
    [_arc(0.72, 0.62, 0.47, 0.54, 250, 180, 5) + _arc(0.5, 0.7, 0.24, 0.21, 0, 360, 10),
     _polyline((0.62, 0.08), (0.3, 0.6)) + _arc(0.5, 0.7, 0.22, 0.2, 0, 360, 10)],                   # 6, straight
    [_polyline((0.18, 0.08), (0.82, 0.08), (0.4, 0.92)),
     _polyline((0.18, 0.1), (0.82, 0.08), (0.45, 0.92)) + _polyline((0.4, 0.5), (0.78, 0.5))],       # 7, crossed
    [_arc(0.5, 0.28, 0.19, 0.19, 0, 360, 9) + _arc(0.5, 0.7, 0.24, 0.22, 0, 360, 10),
     _polyline((0.3, 0.1), (0.7, 0.9), (0.3, 0.9), (0.7, 0.1), (0.3, 0.1))],                         # 8, crossed
    [_arc(0.5, 0.32, 0.23, 0.21, 0, 360, 10) + _polyline((0.73, 0.32), (0.62, 0.92)),
     _arc(0.5, 0.3, 0.22, 0.2, 0, 360, 10) + _arc(0.3, 0.32, 0.43, 0.6, 0, 100, 5)],                 # 9, curled
]
_FAR = ((-9.0, -9.0), (-9.0, -9.0))  # a segment that never comes near a pixel: padding, or a lifted pen


def _templates():
    """(10, styles, S, 2 ends, 2 coordinates) stroke segments, padded with far-away segments."""
    most = max(len(style) for styles in _STYLES for style in styles)
    return torch.tensor([[style + [_FAR] * (most - len(style)) for style in styles] for styles in _STYLES])


def synthetic_digits(n, seed=0, chunk=512, progress=None):
    """`n` generated 28x28 digit images and their labels, the same for the same `seed` on every machine.

    `progress`: a description to show a tqdm bar with while drawing (None or False: no bar)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    u = lambda lo, hi, *shape: lo + (hi - lo) * torch.rand(n, *shape, generator=g)  # noqa: E731
    templates = _templates()
    strokes = templates[labels, torch.randint(0, templates.shape[1], (n,), generator=g)]  # (n, S, 2, 2)
    used = (strokes[:, :, 0, 0] > -9).sum(1)
    # The pen lifts: in about half the images a run of up to a fifth of the segments is missing (never a 1's
    # single stroke).
    gap_start = (u(0, 1) * used).long()
    gap_length = (u(-0.2, 0.2).clamp_min(0) * used).floor().long()
    index = torch.arange(strokes.shape[1])
    lifted = (index >= gap_start[:, None]) & (index < (gap_start + gap_length)[:, None])
    strokes = torch.where(lifted[:, :, None, None], torch.tensor(_FAR), strokes)
    # Wobble: a smooth random displacement of the unit box, so strokes bend but stay connected.
    freq, phase, amp = u(1.0, 3.0, 1, 1, 2), u(0.0, 2 * math.pi, 1, 1, 2), u(0.0, 0.09, 1, 1, 2)
    strokes = strokes + amp * torch.sin(2 * math.pi * freq * strokes.flip(-1) + phase)
    angle = u(-0.4, 0.4)                                      # radians, about +-23 degrees
    scale = u(0.7, 1.1, 1) * torch.stack([u(0.7, 1.2), torch.ones(n)], 1)  # overall size and aspect
    shear = u(-0.4, 0.4)
    cos, sin = torch.cos(angle), torch.sin(angle)
    # Unit box centred on 0, mapped to a 20-pixel box near the centre of the 28-pixel image (as MNIST's digits).
    linear = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)   # rotation (n, 2, 2)
    linear = linear @ torch.stack([torch.stack([torch.ones(n), shear], 1),
                                   torch.stack([torch.zeros(n), torch.ones(n)], 1)], 1)  # shear
    linear = linear * scale[:, None, :] * 20.0
    segments = (strokes - 0.5) @ linear.transpose(1, 2)[:, None] + (14.0 + u(-3.0, 3.0, 2))[:, None, None]
    # Clutter: 1-3 stray straight strokes, 3-9 pixels long, anywhere in the image.
    start = u(1.0, 27.0, 3, 2)
    direction = u(0, 2 * math.pi, 3)
    end = start + u(3.0, 9.0, 3, 1) * torch.stack([torch.cos(direction), torch.sin(direction)], -1)
    stray = torch.stack([start, end], 2)
    stray = torch.where((torch.arange(3) < torch.randint(1, 4, (n, 1), generator=g))[:, :, None, None],
                        stray, torch.tensor(_FAR))
    half_width, stray_width = u(0.5, 1.6), u(0.4, 1.0)
    images = torch.empty(n, 784)
    ys, xs = torch.meshgrid(torch.arange(28.0) + 0.5, torch.arange(28.0) + 0.5, indexing="ij")
    pixels = torch.stack([xs.flatten(), ys.flatten()], 1)  # (784, 2)
    for lo in _chunks(n, chunk, progress):
        hi = min(lo + chunk, n)
        ink = (half_width[lo:hi, None] + 0.5 - _distance(pixels, segments[lo:hi])).clamp(0, 1)
        stray_ink = (stray_width[lo:hi, None] + 0.5 - _distance(pixels, stray[lo:hi])).clamp(0, 1)
        images[lo:hi] = torch.maximum(ink, 0.8 * stray_ink)
    images = images * u(0.5, 1.0, 1)  # pen pressure
    # A blot (ink) or an eraser patch over a random 4-8 pixel square in a third of the images.
    corner, side = u(0, 1, 2), u(4, 8)
    low = corner * (28 - side[:, None])
    inside = ((pixels[None] >= low[:, None]) & (pixels[None] < (low + side[:, None])[:, None])).all(-1)
    patch = u(0, 1)
    images = torch.where(inside & (patch < 1 / 6)[:, None], torch.zeros(()), images)
    images = torch.where(inside & ((patch >= 1 / 6) & (patch < 1 / 3))[:, None], 0.6 * images + 0.4, images)
    # Uneven background: a linear ramp of random direction and strength, then noise.
    ramp = u(0, 0.25, 1) * ((pixels[None] - 14) / 14 * torch.nn.functional.normalize(u(-1, 1, 2), dim=1)[:, None]
                            ).sum(-1).add(1).div(2)
    images = images + ramp + u(0.04, 0.12, 1) * torch.randn(n, 784, generator=g)
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).reshape(n, 28, 28), labels


def _distance(pixels, segments):
    """(N, P) distance from each of P pixels (P, 2) to the nearest of each image's segments (N, S, 2, 2).

    |p - a - t (b - a)|^2 expanded, with the pixel-by-segment dot products as one batched matmul: a few passes
    over an (N, P, S) tensor instead of many over (N, P, S, 2)."""
    a, ab = segments[:, :, 0], segments[:, :, 1] - segments[:, :, 0]                    # (N, S, 2)
    ab_ab = (ab * ab).sum(-1).clamp_min(1e-9)[:, None]                                   # (N, 1, S)
    pa = pixels @ a.transpose(1, 2)                                                      # (N, P, S): p . a
    ap_ab = pixels @ ab.transpose(1, 2) - (a * ab).sum(-1)[:, None]                      # (p - a) . ab
    ap_ap = (pixels * pixels).sum(-1)[None, :, None] - 2 * pa + (a * a).sum(-1)[:, None]  # |p - a|^2
    t = (ap_ab / ab_ab).clamp_(0, 1)
    squared = ap_ap - t * (2 * ap_ab - t * ab_ab)
    return squared.amin(-1).clamp_min(0).sqrt()


def _chunks(n, chunk, progress):
    """range(0, n, chunk), advancing a tqdm bar (unit: images) when `progress` is a description."""
    if not progress:
        yield from range(0, n, chunk)
        return
    from tqdm import tqdm

    with tqdm(total=n, desc=progress, unit="img", dynamic_ncols=True, leave=False) as bar:
        for lo in range(0, n, chunk):
            yield lo
            bar.update(min(chunk, n - lo))
