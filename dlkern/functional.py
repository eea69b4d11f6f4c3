"""dlkern's functional API: the same signatures and semantics as ``torch.nn.functional`` (and ``torch`` for
``sigmoid``/``tanh``), running dlkern's kernels. ``import dlkern.functional as F`` can replace PyTorch's."""

import torch

from dlkern.ops import max_pool as _max_pool  # noqa: F401  (registers fake and autograd)

__all__ = ["max_pool2d"]


def _int_list(name, value):
    """An int or a sequence of ints, as a list: what torch.nn.functional accepts for pooling arguments."""

    def is_int(v):
        return isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool)

    if is_int(value):
        return [value]
    if isinstance(value, (tuple, list, torch.Size)) and all(is_int(v) for v in value):
        return list(value)
    raise TypeError(f"max_pool2d(): argument '{name}' must be an int or a tuple of ints, not {value!r}")


def max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    """2-D max pooling, as ``torch.nn.functional.max_pool2d``; runs dlkern's C++ (CPU) or CUDA kernel.

    Returns the pooled values, or ``(values, indices)`` with ``return_indices=True``; indices are int64, flat
    ``h * W + w`` within each plane. A channels_last input gives channels_last outputs.
    """
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"max_pool2d(): argument 'input' must be a Tensor, not {type(input).__name__}")
    output, indices = torch.ops.dlkern.max_pool2d(
        input,
        _int_list("kernel_size", kernel_size),
        [] if stride is None else _int_list("stride", stride),
        _int_list("padding", padding),
        _int_list("dilation", dilation),
        bool(ceil_mode),
    )
    return (output, indices) if return_indices else output
