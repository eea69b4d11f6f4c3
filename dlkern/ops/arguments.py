"""Arguments read as PyTorch reads them: its Python argument parser's int lists (``int[2] stride``: NumPy
integers, one-element integer tensors and SymInts accepted; floats and bools refused with the parser's words),
and ``F.conv2d``'s checks, in ATen's order and with its messages. The max pool and the conv blocks use these."""

import operator

import torch

_HEAP_TYPE = 1 << 9  # Py_TPFLAGS_HEAPTYPE: classes made by `class` statements, whose tp_name is the bare name


def type_name(value):
    """The type's name as PyTorch's argument errors spell it (CPython's tp_name): float, Tensor, numpy.float64."""
    t = type(value)
    return t.__name__ if t.__module__ == "builtins" or t.__flags__ & _HEAP_TYPE else f"{t.__module__}.{t.__name__}"


def int_or_none(value):
    """value read as one int the way PyTorch's argument parser reads it (is_int_or_symint): an int or SymInt, a NumPy
    integer or other ``__index__`` object, or a one-element integer or bool tensor; None for anything else."""
    if type(value) is int or isinstance(value, torch.SymInt):
        return value
    if isinstance(value, torch.Tensor):
        return int(value.item()) if value.numel() == 1 and not (value.is_floating_point() or value.is_complex()) else None
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def int_list(function, name, position, value):
    """An int or a sequence of ints, as a list: what PyTorch's parser accepts for an ``int[]`` argument of
    ``function`` (at 1-based ``position``), refused with its messages."""
    if type(value) is int:  # the common case, first
        return [value]
    where = f"{function}(): argument '{name}'"
    if not isinstance(value, (tuple, list)):  # torch.Size is a tuple
        single = int_or_none(value)
        if single is None:
            raise TypeError(f"{where} (position {position}) must be tuple of ints, not {type_name(value)}")
        return [single]
    ints = []
    for i, item in enumerate(value):
        # PyTorch tests only the first element as an int (no bool); it unpacks the others by __index__ (bool passes)
        n = int(item) if i > 0 and isinstance(item, bool) else int_or_none(item)
        if n is None and i == 0:
            raise TypeError(
                f"{where} (position {position}) must be tuple of ints, but found element of type {type_name(item)} "
                "at pos 0"
            )
        if n is None:
            raise TypeError(
                f'{where} failed to unpack the object at pos {i + 1} with error "type must be tuple of ints,but got '
                f'{type_name(item)}"'
            )
        ints.append(n)
    return ints


def is_plain(value):
    """Whether value is an int, a str, or a tuple/list of ints, exactly (no bool, float or other int-like type):
    what an argument cache may key on, since 1 == 1.0 == True would let one value's check stand for another's."""
    if type(value) in (int, str):
        return True
    return type(value) in (tuple, list) and all(type(v) is int for v in value)


# ---------------------------------------------------------------------------------------------- F.conv2d

_CPP_SCALAR_NAMES = {torch.float32: "float", torch.float64: "double", torch.float16: "c10::Half",
                     torch.bfloat16: "c10::BFloat16"}
SCALAR_NAMES = {torch.float32: "Float", torch.float64: "Double", torch.float16: "Half", torch.bfloat16: "BFloat16",
                torch.int64: "Long", torch.int32: "Int", torch.int16: "Short", torch.int8: "Char", torch.uint8: "Byte",
                torch.bool: "Bool"}


def conv2d_pair(function, name, position, value):
    """An ``int[2]`` conv argument (stride, padding, dilation) as [rows, columns]: one value is repeated."""
    values = int_list(function, name, position, value)
    if len(values) not in (1, 2):
        raise RuntimeError(
            f"expected {name} to be a single integer value or a list of 2 values to match the convolution dimensions, "
            f"but got {name}={values}"
        )
    return [values[0], values[-1]]


def conv2d_args(function, positions, stride, padding, dilation):
    """(stride, padding, dilation) of a conv2d as F.conv2d's parser reads them: [rows, columns] lists, padding
    also a string. Value checks (signs, the padding string, 'same' with a stride) are :func:`check_conv2d`'s, in ATen's order
    among the tensor checks. ``positions``: the 1-based positions of the three arguments, for the messages."""
    stride = conv2d_pair(function, "stride", positions[0], stride)
    dilation = conv2d_pair(function, "dilation", positions[2], dilation)
    if isinstance(padding, str):
        return stride, padding, dilation
    return stride, conv2d_pair(function, "padding", positions[1], padding), dilation


def check_conv2d(input, weight, bias, stride, padding, dilation):
    """F.conv2d's checks of its operands, in ATen's order and with its (CPU) messages, for ``conv2d_args``'s values.
    Returns the padding as (top, bottom, left, right): 'same' puts an odd extra row/column at the bottom/right."""
    if isinstance(padding, str):  # conv2d's string overload: its own checks come first
        _check_dims(input)
        if padding not in ("same", "valid"):
            raise RuntimeError(f"Invalid padding string: {padding!r}")
        if padding == "same" and stride != [1, 1]:
            raise RuntimeError("padding='same' is not supported for strided convolutions")
        if padding == "valid":
            padding = [0, 0, 0, 0]
        else:
            padding = []
            for d, k in zip(dilation, weight.shape[2:]):
                total = d * (k - 1)
                padding += [total // 2, total - total // 2]
    else:
        padding = [padding[0], padding[0], padding[1], padding[1]]
    if weight.dim() != 4:  # ATen's conv takes its dimensions from the weight, so its stride list is then "wrong"
        raise RuntimeError(
            f"expected stride to be a single integer value or a list of {weight.dim() - 2} values to match the "
            f"convolution dimensions, but got stride={stride}"
        )
    if bias is not None and bias.dtype != input.dtype:
        raise RuntimeError(
            f"Input type ({_CPP_SCALAR_NAMES.get(input.dtype, input.dtype)}) and bias type "
            f"({_CPP_SCALAR_NAMES.get(bias.dtype, bias.dtype)}) should be the same"
        )
    _check_dims(input)
    if min(padding) < 0:
        raise RuntimeError("negative padding is not supported")
    if min(stride) <= 0:
        raise RuntimeError("non-positive stride is not supported")
    if min(dilation) < 0:
        raise RuntimeError("dilation should be greater than zero")
    C_in, H, W = input.shape[-3:]
    if C_in != weight.shape[1]:
        raise RuntimeError(
            f"Given groups=1, weight of size {list(weight.shape)}, expected input{list(input.shape)} to have "
            f"{weight.shape[1]} channels, but got {C_in} channels instead"
        )
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise RuntimeError(
            f"Given weight of size {list(weight.shape)}, expected bias to be 1-dimensional with {weight.shape[0]} "
            f"elements, but got bias of size {list(bias.shape)} instead"
        )
    # ATen measures the kernel against 2 * the first of each padding pair (padding='same' never fails here).
    padded = (H + 2 * padding[0], W + 2 * padding[2])
    kernel = [d * (k - 1) + 1 for d, k in zip(dilation, weight.shape[2:])]
    if padded[0] < kernel[0] or padded[1] < kernel[1]:
        raise RuntimeError(
            f"Calculated padded input size per channel: ({padded[0]} x {padded[1]}). Kernel size: ({kernel[0]} x "
            f"{kernel[1]}). Kernel size can't be greater than actual input size"
        )
    if min(dilation) <= 0:
        raise RuntimeError(f"dilation should be greater than zero, but got {dilation}")
    if input.dtype != weight.dtype:
        raise RuntimeError(
            f"expected scalar type {SCALAR_NAMES.get(input.dtype, input.dtype)} but found "
            f"{SCALAR_NAMES.get(weight.dtype, weight.dtype)}"
        )
    return padding


def _check_dims(input):
    if input.dim() not in (3, 4):
        raise RuntimeError(
            f"Expected 3D (unbatched) or 4D (batched) input to conv2d, but got input of size: {list(input.shape)}"
        )
