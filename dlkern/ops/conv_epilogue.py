"""What follows the conv in a fused block, as one value: :class:`Epilogue`.

The op layer (dlkern/ops/conv_bn.py), the launchers (conv_launch.py), the composites (conv_composite.py) and the
kernels (kernels/conv_bn.py, as constexprs) all read the epilogue from this one descriptor; a new epilogue is a
new value of it, not a new op. Every fused op takes it as the same five schema arguments (:data:`SCHEMA`), after
the conv's: ``activation, p0, p1`` (the catalog's name and parameters; "none"), ``residual_at`` ("none",
"before_act": ``act(bn(z) + residual)`` as ResNet's blocks, "after_act": ``act(bn(z)) + residual``) and ``pool``
([] or a max pool, windows that do not overlap: [kh, kw, sh, sw, ph, pw, ceil_mode, before_bn], after the
activation, or with before_bn between the conv and BatchNorm, which then normalizes the pooled values).
BatchNorm's mode is the op's: training (batch statistics), inference (running statistics in the conv's
epilogue) or folded into the conv (eval with autograd).

Also here: the geometry of the pool (output size, window taps in one byte and back).
"""

from typing import NamedTuple

import torch

from dlkern.ops.max_pool import _pooling_output_size

SCHEMA = "str activation, float p0, float p1, str residual_at, int[] pool"
RESIDUALS = {"none": 0, "before_act": 1, "after_act": 2}  # the kernels' RESIDUAL constexpr


class Epilogue(NamedTuple):
    activation: str = "none"
    p0: float = 0.0
    p1: float = 0.0
    residual_at: str = "none"
    pool: tuple = ()  # () or (kh, kw, sh, sw, ph, pw, ceil_mode, before_bn)

    @classmethod
    def of(cls, activation, p0, p1, residual_at, pool):
        """From an op's five epilogue arguments (SCHEMA)."""
        if residual_at not in RESIDUALS:
            raise ValueError(f"dlkern.conv_bn_act2d: residual_at must be one of {sorted(RESIDUALS)}, got "
                             f"{residual_at!r}")
        if len(pool) not in (0, 8):
            raise ValueError(f"dlkern.conv_bn_act2d: pool must be [] or [kh, kw, sh, sw, ph, pw, ceil, before_bn], "
                             f"got {pool}")
        if pool and residual_at != "none":
            raise ValueError("dlkern.conv_bn_act2d: a residual and a max pool in one epilogue are not supported")
        return cls(activation, p0, p1, residual_at, tuple(int(v) for v in pool))

    def op_args(self):
        """The five schema arguments."""
        return self.activation, self.p0, self.p1, self.residual_at, list(self.pool)

    @property
    def residual(self):
        """The kernels' RESIDUAL constexpr: 0 none, 1 before the activation, 2 after it."""
        return RESIDUALS[self.residual_at]

    @property
    def window(self):
        """The pool as ((kh, kw), (sh, sw), (ph, pw), ceil_mode), or None."""
        if not self.pool:
            return None
        kh, kw, sh, sw, ph, pw, ceil, _ = self.pool
        return (kh, kw), (sh, sw), (ph, pw), bool(ceil)

    @property
    def pool_before_bn(self):
        """Whether the pool sits between the conv and BatchNorm (the kernels' POOL_BEFORE_BN)."""
        return bool(self.pool) and bool(self.pool[7])

    def with_pool(self, window, before_bn=False):
        """This epilogue with the pool ((kh, kw), (sh, sw), (ph, pw), ceil_mode) after the activation, or with
        ``before_bn`` between the conv and BatchNorm."""
        (kh, kw), (sh, sw), (ph, pw), ceil = window
        return self._replace(pool=(kh, kw, sh, sw, ph, pw, int(bool(ceil)), int(bool(before_bn))))


def pool_output_size(OH, OW, window):
    """(PH, PW) of a max pool ((kh, kw), (sh, sw), (ph, pw), ceil_mode) over an OH x OW map (dilation 1)."""
    (kh, kw), (sh, sw), (ph, pw), ceil_mode = window
    return (_pooling_output_size(OH, kh, ph, sh, 1, ceil_mode), _pooling_output_size(OW, kw, pw, sw, 1, ceil_mode))


def pool_fusable(kernel_size, stride, dilation):
    """Whether a max pool (kernel_size, stride, dilation as pairs) fuses into the block's training pass: windows
    that do not overlap (stride >= kernel), dilation 1, at most 256 taps (the position is one byte)."""
    return (all(s >= k for s, k in zip(stride, kernel_size)) and all(d == 1 for d in dilation)
            and kernel_size[0] * kernel_size[1] <= 256)


def _window_starts(pooled_shape, stride, padding, device):
    """(rows, cols): the first row and column of each pooled element's window (in the padding when negative)."""
    rows = torch.arange(pooled_shape[2], device=device).view(-1, 1) * stride[0] - padding[0]
    cols = torch.arange(pooled_shape[3], device=device).view(1, -1) * stride[1] - padding[1]
    return rows, cols


def window_taps(indices, width, kernel_size, stride, padding):
    """The window tap (kh * kernel_size[1] + kw, in uint8) of each of max_pool2d's flat indices (h * width + w);
    window_indices inverts it. A window of one or two rows, no wider than the plane, is decoded by a compare:
    ATen's int64 division costs 4x as much."""
    (kh, kw), (rows, cols) = kernel_size, _window_starts(indices.shape, stride, padding, indices.device)
    if kh <= 2 and kw <= width:
        rel = indices - (rows * width + cols)  # row * width + column within the window, the column < width
        taps = rel if kh == 1 else torch.where(rel >= width, rel - (width - kw), rel)
    else:  # a window column may exceed the plane's width: by the element's own row and column
        taps = (indices // width - rows) * kw + (indices % width - cols)
    return taps.to(torch.uint8)


def window_indices(taps, width, kernel_size, stride, padding):
    """max_pool2d's flat indices (h * width + w, int64) from window taps: window_taps inverted."""
    rows, cols = _window_starts(taps.shape, stride, padding, taps.device)
    tap = torch.arange(kernel_size[0] * kernel_size[1], device=taps.device)
    offsets = tap // kernel_size[1] * width + tap % kernel_size[1]  # (kernel taps,): no division per element
    return offsets.take(taps.long()).add_(rows * width + cols)
