"""dlkern.functional.max_pool2d against torch.nn.functional.max_pool2d: values, indices and strides equal,
gradients, errors, opcheck, torch.compile, and the CUDA build."""

import io
import itertools
import re
import zlib

import numpy as np
import pytest
import torch
import torch.utils._python_dispatch
import torch.nn.functional as TF

import dlkern
import dlkern.functional as F
from helpers import DEVICES, FLOAT_DTYPES, HAS_CUDA, assert_close

INT_DTYPES = [torch.uint8, torch.int8, torch.int32, torch.int64]

# Odd and even planes, a 3-D input, an empty batch, one channel, and planes barely larger than the window.
SHAPES = [(2, 3, 7, 9), (2, 3, 8, 8), (1, 1, 5, 6), (3, 7, 8), (0, 3, 6, 6), (2, 4, 3, 3)]

# Every argument that changes the result, including invalid combinations: where PyTorch raises, dlkern must
# raise the same error; everywhere else it must return the same values and indices.
ARGS = [
    dict(kernel_size=k, stride=s, padding=p, dilation=d, ceil_mode=c)
    for k, s, p, d, c in itertools.product(
        [1, 2, 3, (2, 3)], [None, 1, 2, (1, 2)], [0, 1, (0, 1)], [1, 2, (1, 2)], [False, True]
    )
]


def make_input(shape, dtype, device, channels_last=False, pattern="random"):
    """Inputs with many ties (small integers), or NaN and -inf sprinkled in."""
    g = torch.Generator().manual_seed(zlib.crc32(repr((shape, pattern)).encode()))
    if dtype.is_floating_point:
        x = torch.randint(-4, 5, shape, generator=g).to(dtype)
        if pattern == "random":
            x = torch.randn(shape, generator=g).to(dtype)
        elif pattern == "nan_inf":
            r = torch.rand(shape, generator=g)
            x = torch.where(r < 0.15, float("nan"), x.float()).to(dtype)
            x = torch.where(r > 0.7, float("-inf"), x.float()).to(dtype)
    else:
        lo = 0 if dtype == torch.uint8 else -4
        x = torch.randint(lo, lo + 9, shape, generator=g).to(dtype)
    x = x.to(device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    return x


def torch_error(fn):
    try:
        fn()
    except RuntimeError as e:
        return str(e)
    return None


def check_forward(x, args):
    """dlkern and PyTorch agree exactly on x with args: the same error, or the same values, indices, strides."""
    expected_error = torch_error(lambda: TF.max_pool2d(x, **args))
    if expected_error is not None:
        with pytest.raises(RuntimeError, match=re.escape(expected_error.splitlines()[0])):
            F.max_pool2d(x, **args)
        return False
    out, idx = F.max_pool2d(x, **args, return_indices=True)
    ref_out, ref_idx = TF.max_pool2d(x, **args, return_indices=True)
    msg = f"shape={tuple(x.shape)} stride={x.stride()} dtype={x.dtype} args={args}"
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{msg}\n{m}")
    assert torch.equal(idx, ref_idx), msg
    assert idx.dtype == torch.int64
    assert (out.stride(), idx.stride()) == (ref_out.stride(), ref_idx.stride()), msg
    values = F.max_pool2d(x, **args)  # no indices and no gradient: dlkern::max_pool2d_values on a CPU
    torch.testing.assert_close(values, ref_out, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{msg}\n{m}")
    assert values.stride() == ref_out.stride(), msg
    return True


# integers have no NaN or inf
DTYPE_PATTERNS = [(d, p) for d in FLOAT_DTYPES for p in ["random", "ties", "nan_inf"]] + [
    (d, "ties") for d in INT_DTYPES
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, pattern", DTYPE_PATTERNS, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_forward_matches_torch(device, dtype, pattern, channels_last):
    compared = 0
    for shape in SHAPES:
        if channels_last and len(shape) != 4:
            continue
        x = make_input(shape, dtype, device, channels_last, pattern)
        for args in ARGS:
            compared += check_forward(x, args)
    assert compared > 500  # most of the grid is valid: the comparison really ran


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    base = torch.randn(2, 6, 9, 11, device=device)
    for x in [base.transpose(2, 3), base[:, ::2, 1:, ::2], base.permute(1, 0, 2, 3), base[0].transpose(0, 2)]:
        for args in [dict(kernel_size=2), dict(kernel_size=3, stride=2, padding=1, ceil_mode=True)]:
            assert check_forward(x, args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_backward_matches_torch(device, dtype, channels_last):
    """Gradients against PyTorch's autograd in float64 on the same values (overlapping windows add up)."""
    cases = [
        ((2, 3, 8, 8), dict(kernel_size=2)),
        ((2, 3, 7, 9), dict(kernel_size=3, stride=1, padding=1)),  # overlapping windows
        ((2, 3, 7, 9), dict(kernel_size=(2, 3), stride=(1, 2), dilation=(2, 1), ceil_mode=True)),
        ((3, 7, 8), dict(kernel_size=3, stride=2, padding=1)),
        ((0, 3, 6, 6), dict(kernel_size=2)),
    ]
    for shape, args in cases:
        if channels_last and len(shape) != 4:
            continue
        x = make_input(shape, dtype, device, channels_last, "ties").requires_grad_()
        out = F.max_pool2d(x, **args)
        grad_out = torch.randn(out.shape, device=device).to(dtype)
        (grad,) = torch.autograd.grad(out, x, grad_out)

        x64 = x.detach().double().requires_grad_()
        ref_out = TF.max_pool2d(x64, **args)
        (ref_grad,) = torch.autograd.grad(ref_out, x64, grad_out.double())
        assert_close(grad, ref_grad)
        assert grad.stride() == x.stride() or grad.numel() == 0
        # PyTorch's own low-precision backward, too: identical where windows do not overlap
        (torch_grad,) = torch.autograd.grad(TF.max_pool2d(x, **args), x, grad_out)
        if args.get("stride") is None:
            assert torch.equal(grad, torch_grad)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck(device):
    # distinct values: no ties, so the max is differentiable
    x = (torch.randperm(2 * 3 * 7 * 6, device=device).double().view(2, 3, 7, 6) / 10).requires_grad_()
    for args in [
        dict(kernel_size=2),
        dict(kernel_size=3, stride=2, padding=1, ceil_mode=True),
        dict(kernel_size=(2, 3), stride=1, dilation=(2, 1)),
    ]:
        assert torch.autograd.gradcheck(lambda t: F.max_pool2d(t, **args), (x,))
        assert torch.autograd.gradgradcheck(lambda t: F.max_pool2d(t, **args), (x,))
    x_cl = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: F.max_pool2d(t, 3, 1, 1), (x_cl,))


def test_single_argument_forms():
    x = torch.randn(1, 2, 9, 9)
    same = [
        (dict(kernel_size=3), dict(kernel_size=(3, 3), stride=[3, 3], padding=(0, 0), dilation=(1, 1))),
        (dict(kernel_size=[3], stride=(2,)), dict(kernel_size=3, stride=2)),
        (dict(kernel_size=2, stride=[]), dict(kernel_size=2, stride=2)),
        (dict(kernel_size=torch.Size([2, 2])), dict(kernel_size=2)),
    ]
    for a, b in same:
        assert torch.equal(F.max_pool2d(x, **a), TF.max_pool2d(x, **b))


BAD_ARGS = [
    ((1, 4, 4), dict(kernel_size=0), "stride should not be zero"),
    ((1, 4, 4), dict(kernel_size=2, stride=0), "stride should not be zero"),
    ((1, 4, 4), dict(kernel_size=2, stride=-1), "stride should be greater than zero"),
    ((1, 4, 4), dict(kernel_size=0, stride=1), "kernel size should be greater than zero"),
    ((1, 4, 4), dict(kernel_size=2, dilation=0), "dilation should be greater than zero"),
    ((1, 4, 4), dict(kernel_size=2, padding=-1), "pad must be non-negative"),
    ((1, 4, 4), dict(kernel_size=2, padding=2), "pad should be at most half of effective kernel size"),
    ((1, 9, 9), dict(kernel_size=3, padding=2, dilation=2), "pad should be smaller than or equal to half"),
    ((1, 4, 4), dict(kernel_size=5), "Output size is too small"),
    ((1, 4, 4), dict(kernel_size=(1, 2, 3)), "kernel_size must either be a single int, or a tuple of two ints"),
    ((1, 4, 4), dict(kernel_size=2, stride=(1, 2, 3)), "stride must either be omitted, a single int"),
    ((1, 4, 4), dict(kernel_size=2, padding=(0, 0, 0)), "padding must either be a single int"),
    ((1, 4, 4), dict(kernel_size=2, dilation=(1, 1, 1)), "dilation must be either a single int"),
    ((4, 4), dict(kernel_size=2), "non-empty 3D or 4D"),
    ((1, 1, 4, 4, 4), dict(kernel_size=2), "non-empty 3D or 4D"),
    ((0, 4, 4), dict(kernel_size=2), "Expected 3D or 4D .* with optional 0 dim batch size"),
    ((1, 0, 4, 4), dict(kernel_size=2), "Expected 3D or 4D .* with optional 0 dim batch size"),
]


@pytest.mark.parametrize("shape, args, message", BAD_ARGS)
def test_bad_arguments_raise_like_torch(shape, args, message):
    x = torch.randn(shape)
    with pytest.raises(RuntimeError, match=message):
        TF.max_pool2d(x, **args)  # the message is PyTorch's own
    with pytest.raises(RuntimeError, match=message):
        F.max_pool2d(x, **args)
    # the fake (meta) function that torch.compile traces with rejects the same arguments
    with torch._subclasses.fake_tensor.FakeTensorMode():
        fake = torch.empty(shape)
        with pytest.raises(RuntimeError, match=message):
            F.max_pool2d(fake, **args)


def test_bad_types_and_dtypes():
    x = torch.randn(1, 4, 4)
    with pytest.raises(TypeError, match=re.escape("argument 'kernel_size' (position 2) must be tuple of ints, not fl")):
        F.max_pool2d(x, 2.5)
    with pytest.raises(TypeError, match=re.escape("argument 'stride' (position 3) must be tuple of ints, not str")):
        F.max_pool2d(x, 2, stride="2")
    with pytest.raises(TypeError, match=re.escape("argument 'padding' (position 4) must be tuple of ints, not bool")):
        F.max_pool2d(x, 2, padding=True)
    with pytest.raises(TypeError, match=re.escape("argument 'input' (position 1) must be Tensor, not list")):
        F.max_pool2d([[1.0]], 2)
    with pytest.raises(RuntimeError, match="not implemented for 'Bool'"):
        F.max_pool2d(torch.ones(1, 4, 4, dtype=torch.bool), 2)
    with pytest.raises(RuntimeError, match="not implemented for 'ComplexFloat'"):
        F.max_pool2d(torch.ones(1, 4, 4, dtype=torch.cfloat), 2)


def test_backward_op_checks_its_arguments():
    x = torch.randn(1, 2, 4, 4)
    out, idx = torch.ops.dlkern.max_pool2d(x, [2], [], [0], [1], False)
    args = ([2], [], [0], [1], False)
    with pytest.raises(RuntimeError, match="grad_output has shape"):
        torch.ops.dlkern.max_pool2d_backward(out[..., :1], x, idx, *args)
    with pytest.raises(RuntimeError, match="indices must be int64"):
        torch.ops.dlkern.max_pool2d_backward(out, x, idx.int(), *args)
    with pytest.raises(RuntimeError, match="does not match input dtype"):
        torch.ops.dlkern.max_pool2d_backward(out.double(), x, idx, *args)


def test_module_is_a_drop_in():
    ours = dlkern.nn.MaxPool2d(3, stride=2, padding=1, dilation=1, return_indices=True, ceil_mode=True)
    theirs = torch.nn.MaxPool2d(3, stride=2, padding=1, dilation=1, return_indices=True, ceil_mode=True)
    assert repr(ours) == repr(theirs)
    assert isinstance(ours, torch.nn.MaxPool2d)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    x = torch.randn(2, 3, 9, 9)
    for a, b in zip(ours(x), theirs(x)):
        assert torch.equal(a, b)
    assert torch.equal(dlkern.nn.MaxPool2d(2)(x), torch.nn.MaxPool2d(2)(x))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    x = torch.randn(2, 3, 7, 8, device=device, requires_grad=True)
    x_cl = torch.randn(2, 3, 8, 8, device=device).to(memory_format=torch.channels_last).requires_grad_()
    for inp, args in [
        (x, ([2, 2], [], [0, 0], [1, 1], False)),
        (x, ([3], [2], [1], [1], True)),
        (x_cl, ([3, 2], [1, 2], [1, 0], [1, 2], False)),
    ]:
        torch.library.opcheck(torch.ops.dlkern.max_pool2d.default, (inp, *args))
        if inp.device.type == "cpu":
            torch.library.opcheck(torch.ops.dlkern.max_pool2d_values.default, (inp.detach(), *args))
        out, idx = torch.ops.dlkern.max_pool2d(inp.detach(), *args)
        grad_out = torch.randn_like(out).requires_grad_()
        torch.library.opcheck(torch.ops.dlkern.max_pool2d_backward.default, (grad_out, inp.detach(), idx, *args))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()

    def step(t):
        out, idx = F.max_pool2d(t, 3, stride=2, padding=1, return_indices=True)
        return (out * out).sum(), idx

    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    for shape in [(2, 3, 9, 9), (2, 3, 12, 10)]:
        x = torch.randn(shape, device=device, requires_grad=True)
        loss, idx = compiled(x)
        (grad,) = torch.autograd.grad(loss, x)
        ref_loss, ref_idx = step(x)
        (ref_grad,) = torch.autograd.grad(ref_loss, x)
        assert torch.equal(idx, ref_idx)
        torch.testing.assert_close(loss, ref_loss)
        torch.testing.assert_close(grad, ref_grad)


def test_build_info_and_cuda_registration():
    info = dlkern.build_info
    assert info["torch"] == torch.__version__
    assert torch._C._dispatch_has_kernel_for_dispatch_key("dlkern::max_pool2d", "CPU")
    if info["with_cuda"]:
        # how a GPU-less CI proves the CUDA sources were compiled into the extension
        assert torch._C._dispatch_has_kernel_for_dispatch_key("dlkern::max_pool2d", "CUDA")
        assert torch._C._dispatch_has_kernel_for_dispatch_key("dlkern::max_pool2d_backward", "CUDA")
    elif HAS_CUDA:
        pytest.fail("a GPU is visible but dlkern._C was built without CUDA kernels")


def test_extension_for_another_torch_gives_a_clear_error(monkeypatch):
    from dlkern import _extension

    monkeypatch.setattr(_extension, "_read_build_info", lambda: {"torch": "1.0.0"})
    with pytest.raises(ImportError, match=r"built for torch 1\.0\.0.*pip install --no-build-isolation -e \."):
        _extension._load()
    monkeypatch.setattr(_extension, "_read_build_info", lambda: None)
    with pytest.raises(ImportError, match="not built"):
        _extension._load()


@pytest.mark.cuda
def test_cuda_matches_cpu_and_is_graph_capturable():
    x = torch.randn(64, 32, 28, 28, device="cuda")
    out, idx = F.max_pool2d(x, 2, return_indices=True)
    cpu_out, cpu_idx = F.max_pool2d(x.cpu(), 2, return_indices=True)
    assert torch.equal(out.cpu(), cpu_out) and torch.equal(idx.cpu(), cpu_idx)

    static_x = x.clone().requires_grad_()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up outside the graph
        F.max_pool2d(static_x, 2).sum().backward()
    torch.cuda.current_stream().wait_stream(stream)
    static_x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = F.max_pool2d(static_x, 2)
        static_out.sum().backward()
    static_x.data.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(static_out, TF.max_pool2d(static_x.detach(), 2))


@pytest.mark.cuda
def test_cuda_large_offsets():
    # more than 2**31 input elements: offsets must be 64-bit
    x = torch.empty(1, 1, 2**16 + 2, 2**15 + 2, device="cuda", dtype=torch.float16).normal_()
    out, idx = F.max_pool2d(x, 2, return_indices=True)
    ref_out, ref_idx = TF.max_pool2d(x, 2, return_indices=True)
    assert torch.equal(out, ref_out) and torch.equal(idx, ref_idx)


# ---------------------------------------------------------------------------------------------------------------
# Forward-mode AD and torch.func transforms, against PyTorch's max_pool2d under the same transforms
# ---------------------------------------------------------------------------------------------------------------

# NCHW, channels_last and 3-D inputs; overlapping windows (stride < kernel) and padding with ceil_mode
AD_CASES = [
    ((2, 3, 6, 7), False, dict(kernel_size=2)),
    ((2, 3, 6, 7), False, dict(kernel_size=3, stride=1, padding=1)),
    ((2, 3, 6, 7), True, dict(kernel_size=3, stride=2, padding=1, ceil_mode=True)),
    ((2, 3, 6, 7), True, dict(kernel_size=(2, 3), stride=1, dilation=(2, 1))),
    ((3, 5, 6), False, dict(kernel_size=3, stride=1)),
]


def ad_input(shape, channels_last, dtype=torch.float64):
    return make_input(shape, dtype, "cpu", channels_last, "ties")


@pytest.mark.parametrize("return_indices", [False, True])
@pytest.mark.parametrize("shape, channels_last, args", AD_CASES)
def test_forward_mode_ad_matches_torch(shape, channels_last, args, return_indices):
    """The output tangent is the input tangent at each window's argmax (never a silent zero): func.jvp, jacfwd and
    torch.autograd.forward_ad, each against PyTorch's max_pool2d under the same transform."""
    import torch.autograd.forward_ad as fwAD

    x = ad_input(shape, channels_last)
    t = torch.randn_like(x)  # in x's memory format
    ours = lambda a: F.max_pool2d(a, **args, return_indices=return_indices)  # noqa: E731
    theirs = lambda a: TF.max_pool2d(a, **args, return_indices=return_indices)  # noqa: E731

    out, out_t = torch.func.jvp(ours, (x,), (t,))
    ref, ref_t = torch.func.jvp(theirs, (x,), (t,))
    for a, b in zip(pytree_leaves((out, out_t)), pytree_leaves((ref, ref_t))):
        assert a.dtype == b.dtype and torch.equal(a, b)
    value_t = out_t[0] if return_indices else out_t
    assert value_t.abs().sum() > 0

    with fwAD.dual_level():
        res = ours(fwAD.make_dual(x, t))
        ref_res = theirs(fwAD.make_dual(x, t))
        res, ref_res = (r[0] if return_indices else r for r in (res, ref_res))
        tangent, ref_tangent = fwAD.unpack_dual(res).tangent, fwAD.unpack_dual(ref_res).tangent
        assert tangent is not None and torch.equal(tangent, ref_tangent)
        with torch.no_grad():  # forward mode does not need grad mode: the tangent still flows
            res = ours(fwAD.make_dual(x, t))
            assert torch.equal(fwAD.unpack_dual(res[0] if return_indices else res).tangent, ref_tangent)

    if not return_indices:
        assert torch.equal(torch.func.jacfwd(ours)(x), torch.func.jacfwd(theirs)(x))


def pytree_leaves(tree):
    return torch.utils._pytree.tree_leaves(tree)


@pytest.mark.parametrize("shape, channels_last, args", AD_CASES)
def test_func_transforms_match_torch(shape, channels_last, args):
    """grad, vjp, jacrev, vmap(grad), hessian and double backward through torch.func, as PyTorch's."""
    x = ad_input(shape, channels_last)
    w = torch.randn(TF.max_pool2d(x, **args).shape, dtype=x.dtype)

    def loss(pool):
        return lambda a: (pool(a, **args) ** 2 * w).sum()

    ours, theirs = loss(F.max_pool2d), loss(TF.max_pool2d)
    assert torch.equal(torch.func.grad(ours)(x), torch.func.grad(theirs)(x))
    out, pullback = torch.func.vjp(lambda a: F.max_pool2d(a, **args), x)
    ref_out, ref_pullback = torch.func.vjp(lambda a: TF.max_pool2d(a, **args), x)
    assert torch.equal(out, ref_out) and torch.equal(pullback(w)[0], ref_pullback(w)[0])
    jac = torch.func.jacrev(lambda a: F.max_pool2d(a, **args))(x)
    assert torch.equal(jac, torch.func.jacrev(lambda a: TF.max_pool2d(a, **args))(x))
    batch = torch.stack([x, x.flip(-1) * 2])
    assert torch.equal(torch.vmap(torch.func.grad(ours))(batch), torch.vmap(torch.func.grad(theirs))(batch))
    # second order: hessian-vector products through the backward's own derivatives
    hvp = torch.func.jvp(torch.func.grad(ours), (x,), (w.new_ones(x.shape),))[1]
    ref_hvp = torch.func.jvp(torch.func.grad(theirs), (x,), (w.new_ones(x.shape),))[1]
    assert torch.equal(hvp, ref_hvp)
    # PyTorch's own jacrev(grad) fails on channels_last ("NYI: querying is_contiguous inside of vmap"): its
    # Hessian on the same values in NCHW is the reference
    hessian = torch.func.jacrev(torch.func.grad(ours))(x)
    assert torch.equal(hessian, torch.func.jacrev(torch.func.grad(theirs))(x.contiguous()))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_vmap_matches_torch(channels_last):
    """vmap over 3-D and 4-D examples, any batch dim, nested, with indices; a bad example rank gives ATen's error."""
    x = make_input((2, 4, 3, 6, 7), torch.float32, "cpu", pattern="ties")
    args = dict(kernel_size=3, stride=2, padding=1, ceil_mode=True, return_indices=True)
    ours = lambda a: F.max_pool2d(a, **args)  # noqa: E731
    theirs = lambda a: TF.max_pool2d(a, **args)  # noqa: E731
    cases = [(x, 0), (x, 2), (x[0], 0), (x[0], 3)]
    for inp, dim in cases:
        if channels_last and inp.dim() == 4:
            inp = inp.to(memory_format=torch.channels_last)
        for a, b in zip(torch.vmap(ours, in_dims=dim)(inp), torch.vmap(theirs, in_dims=dim)(inp)):
            assert torch.equal(a, b)
    nested = torch.vmap(torch.vmap(ours))(x)
    assert all(torch.equal(a, b) for a, b in zip(nested, torch.vmap(torch.vmap(theirs))(x)))
    with pytest.raises(RuntimeError, match=re.escape("non-empty 3D or 4D (batch mode) tensor expected for input")):
        torch.vmap(ours)(x[0, 0])


def test_double_backward_matches_torch():
    """The backward is linear in grad_output: its own gradient reads the incoming gradient at the argmax."""
    x = ad_input((2, 3, 6, 7), False).requires_grad_()
    args = dict(kernel_size=3, stride=1, padding=1)
    (g,) = torch.autograd.grad((F.max_pool2d(x, **args) ** 2).sum(), x, create_graph=True)
    (gg,) = torch.autograd.grad(g.sum(), x)
    (ref_g,) = torch.autograd.grad((TF.max_pool2d(x, **args) ** 2).sum(), x, create_graph=True)
    (ref_gg,) = torch.autograd.grad(ref_g.sum(), x)
    assert torch.equal(g, ref_g) and torch.equal(gg, ref_gg)


# A vmap inside a jvp or a grad: torch.func.hessian is jacfwd(jacrev), vmap(jvp(vmap(vjp))), so the pooling's
# backward runs under a vmap under a jvp. 2x2, 3x3 stride 2 with padding, dilation 2, channels_last, a 3-D input,
# and batches of 2 examples x 3 channels.
SECOND_ORDER_CASES = [
    ((1, 1, 4, 4), False, dict(kernel_size=2)),
    ((2, 3, 6, 5), False, dict(kernel_size=3, stride=2, padding=1)),
    ((2, 3, 7, 7), False, dict(kernel_size=2, stride=1, dilation=2)),
    ((2, 3, 6, 5), True, dict(kernel_size=3, stride=2, padding=1, ceil_mode=True)),
    ((3, 5, 6), False, dict(kernel_size=(2, 3), stride=1, padding=(1, 0))),
]


@pytest.mark.parametrize("shape, channels_last, args", SECOND_ORDER_CASES,
                         ids=["2x2", "3x3_s2_p1", "dilation2", "channels_last", "3d"])
def test_hessian_and_forward_over_reverse_match_torch(shape, channels_last, args):
    """hessian, jvp(jacrev) and vmap(jvp(jacrev)) (forward over reverse, nested in a vmap), as PyTorch's in
    float64."""
    func = torch.func
    x = ad_input(shape, channels_last)
    t = torch.randn_like(x)
    w = torch.randn(TF.max_pool2d(x, **args).shape, dtype=x.dtype)

    def loss(pool):
        return lambda a: (pool(a, **args) ** 3 * w).sum()

    ours, theirs = loss(F.max_pool2d), loss(TF.max_pool2d)
    # PyTorch's own transforms fail on channels_last under a vmap ("NYI: querying is_contiguous inside of vmap"):
    # the same values in NCHW give the reference
    ref_x, ref_t = x.contiguous(), t.contiguous()
    hessian = func.hessian(ours)(x)
    assert hessian.shape == x.shape + x.shape and hessian.abs().sum() > 0
    assert torch.equal(hessian, func.hessian(theirs)(ref_x))
    out, out_t = func.jvp(func.jacrev(ours), (x,), (t,))
    ref_out, ref_out_t = func.jvp(func.jacrev(theirs), (ref_x,), (ref_t,))
    assert torch.equal(out, ref_out) and torch.equal(out_t, ref_out_t)
    torch.testing.assert_close(out_t, (hessian.flatten(x.dim()) @ t.flatten()).view(x.shape))  # H t

    batch, tangents = torch.stack([x, x.flip(-1) * 2]), torch.stack([t, -t])
    fwd_over_rev = lambda f: lambda a, b: func.jvp(func.jacrev(f), (a,), (b,))[1]  # noqa: E731
    hvps = torch.vmap(fwd_over_rev(ours))(batch, tangents)
    assert torch.equal(hvps, torch.vmap(fwd_over_rev(theirs))(batch.contiguous(), tangents.contiguous()))
    assert torch.equal(hvps[0], out_t)


def test_transforms_over_vmap_match_torch():
    """A jvp or grad over a vmap of the pooling, and of its backward; and the vmap rule generated for the
    Function torch.compile traces, under a grad."""
    from dlkern.ops.max_pool import _MaxPool2d

    func = torch.func
    x = ad_input((3, 2, 6, 7), False)
    t = torch.randn_like(x)
    args = dict(kernel_size=3, stride=2, padding=1)
    per_example = lambda pool: lambda b: pool(b, **args)  # noqa: E731
    over_vmap = lambda pool: lambda a: (torch.vmap(per_example(pool))(a) ** 3).sum()  # noqa: E731

    out, out_t = func.jvp(torch.vmap(per_example(F.max_pool2d)), (x,), (t,))
    ref_out, ref_out_t = func.jvp(torch.vmap(per_example(TF.max_pool2d)), (x,), (t,))
    assert torch.equal(out, ref_out) and torch.equal(out_t, ref_out_t)
    assert torch.equal(func.grad(over_vmap(F.max_pool2d))(x), func.grad(over_vmap(TF.max_pool2d))(x))
    assert torch.equal(func.jvp(func.grad(over_vmap(F.max_pool2d)), (x,), (t,))[1],
                       func.jvp(func.grad(over_vmap(TF.max_pool2d)), (x,), (t,))[1])

    traced = lambda b, **kw: _MaxPool2d.apply(b, [3], [2], [1], [1], False)[0]  # noqa: E731
    assert torch.equal(func.grad(over_vmap(traced))(x), func.grad(over_vmap(TF.max_pool2d))(x))


# ---------------------------------------------------------------------------------------------------------------
# Argument types: what PyTorch's argument parser accepts and refuses, with its messages
# ---------------------------------------------------------------------------------------------------------------


class Index:
    def __index__(self):
        return 2


ACCEPTED_ARGS = [
    dict(kernel_size=np.int64(2)),
    dict(kernel_size=np.int32(3), stride=np.uint8(1)),
    dict(kernel_size=torch.tensor(2)),
    dict(kernel_size=torch.tensor([3]), stride=torch.tensor(2, dtype=torch.int8)),
    dict(kernel_size=torch.tensor([[2]])),
    dict(kernel_size=torch.tensor(True)),
    dict(kernel_size=(np.int64(2), torch.tensor(3))),
    dict(kernel_size=[torch.tensor([2]), Index()]),
    dict(kernel_size=(Index(), 2)),
    dict(kernel_size=(2, True)),  # only the first element is checked for bool, as PyTorch's parser does
    dict(kernel_size=3, stride=np.int64(2), padding=torch.tensor(1), dilation=np.int16(1)),
    dict(kernel_size=2, padding=(np.int64(1), 0), dilation=(torch.tensor(1), 2)),
    dict(kernel_size=2, stride=()),
]


@pytest.mark.parametrize("args", ACCEPTED_ARGS, ids=repr)
def test_int_like_arguments_accepted_like_torch(args):
    x = make_input((2, 3, 7, 9), torch.float32, "cpu")
    out, idx = F.max_pool2d(x, **args, return_indices=True)
    ref_out, ref_idx = TF.max_pool2d(x, **args, return_indices=True)
    assert torch.equal(out, ref_out) and torch.equal(idx, ref_idx)


REFUSED_ARGS = [
    dict(kernel_size=2.0),
    dict(kernel_size="2"),
    dict(kernel_size=True),
    dict(kernel_size=None),
    dict(kernel_size=np.float64(2)),
    dict(kernel_size=np.bool_(True)),
    dict(kernel_size=np.array([2, 2])),
    dict(kernel_size=torch.tensor([2, 2])),
    dict(kernel_size=torch.tensor(2.0)),
    dict(kernel_size=(2.0, 2)),
    dict(kernel_size=(True, 2)),
    dict(kernel_size=(torch.tensor(2.0), 2)),
    dict(kernel_size=(2, 2.0)),
    dict(kernel_size=(2, "a")),
    dict(kernel_size=[np.int64(2), None]),
    dict(kernel_size=(2, torch.tensor([3, 3]))),
    dict(kernel_size=(2, torch.tensor(2.0))),
    dict(kernel_size=2, stride=1.0),
    dict(kernel_size=2, stride=(1, 1.5)),
    dict(kernel_size=2, padding=True),
    dict(kernel_size=2, padding=1.0),
    dict(kernel_size=2, dilation=1.0),
    dict(kernel_size=2, dilation=(1.0,)),
    dict(kernel_size=2, ceil_mode="no"),
    dict(kernel_size=2, ceil_mode=1),
    dict(kernel_size=2, ceil_mode=None),
    dict(kernel_size=2, ceil_mode=np.bool_(True)),
    dict(kernel_size=2, ceil_mode=torch.tensor(True)),
]


@pytest.mark.parametrize("args", REFUSED_ARGS, ids=repr)
def test_ill_typed_arguments_refused_like_torch(args):
    x = torch.randn(1, 2, 6, 6)
    with pytest.raises(TypeError) as expected:
        TF.max_pool2d(x, **args)
    with pytest.raises(TypeError) as got:
        F.max_pool2d(x, **args)
    assert str(got.value) == str(expected.value)
    with pytest.raises(TypeError) as got:
        dlkern.nn.MaxPool2d(**args)(x)
    assert str(got.value) == str(expected.value)


def test_non_tensor_input_refused_like_torch():
    for bad in ([[1.0]], 3, None):
        with pytest.raises(TypeError) as expected:
            TF.max_pool2d(bad, 2)
        with pytest.raises(TypeError) as got:
            F.max_pool2d(bad, 2)
        assert str(got.value) == str(expected.value)


def test_symint_arguments_under_torch_compile():
    """Sizes traced as SymInts (dynamic shapes) are ints to max_pool2d, as they are to PyTorch's."""
    torch._dynamo.reset()

    def step(t):
        return F.max_pool2d(t, t.shape[-1] // 3, stride=[t.shape[-2] // 4, 1])

    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    for shape in [(2, 3, 8, 9), (1, 2, 12, 6)]:
        x = torch.randn(shape)
        ref = TF.max_pool2d(x, shape[-1] // 3, stride=[shape[-2] // 4, 1])
        assert torch.equal(compiled(x), ref)


# ---------------------------------------------------------------------------------------------------------------
# TorchScript and export
# ---------------------------------------------------------------------------------------------------------------


def test_module_torchscript_refused_and_trace_matches_eager():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), dlkern.nn.MaxPool2d(2, ceil_mode=True))
    with pytest.raises(RuntimeError, match=r"dlkern.nn.MaxPool2d: torch.jit.script is not supported"):
        torch.jit.script(model)
    x = torch.randn(2, 3, 9, 9)
    traced = torch.jit.trace(model, (x,), check_trace=True, check_inputs=[(torch.randn(1, 3, 11, 8),)])
    for inp in [x, torch.randn(3, 3, 9, 9)]:
        assert torch.equal(traced(inp), model(inp))
    assert "dlkern::max_pool2d" in str(traced.inlined_graph)
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)  # the recorded graph holds the registered op, not a Python call
    buffer.seek(0)
    assert torch.equal(torch.jit.load(buffer)(x), model(x))


def test_export_matches_eager():
    model = dlkern.nn.MaxPool2d(3, stride=2, padding=1, return_indices=True)
    x = torch.randn(2, 3, 9, 9)
    exported = torch.export.export(model, (x,))
    assert "dlkern.max_pool2d" in str(exported.graph)
    for a, b in zip(exported.module()(x), model(x)):
        assert torch.equal(a, b)


def every_2x2_window(dtype, channels_last):
    """A (2, 3, 2, 512) input whose 256 2x2 windows hold every arrangement of NaN, -inf, 0 and 1 (ties, NaNs in
    every position), the channels rotated so that neighbouring lanes differ."""
    values = torch.tensor([float("nan"), float("-inf"), 0.0, 1.0], dtype=torch.float64)
    combos = torch.tensor(list(itertools.product(range(4), repeat=4)))  # (256, 4) in window scan order
    windows = values[combos].view(256, 2, 2).permute(1, 0, 2).reshape(2, 512)
    x = torch.stack([windows.roll(17 * c, dims=1) for c in range(3)])
    x = torch.stack([x, x.flip(-1)]).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_2x2_windows_select_what_torch_selects(dtype, channels_last):
    """The CPU's 2x2/stride-2 kernel reduces each window as a tree (pairs, then the pairs' maxima); it must pick the
    same value and index as ATen's scan: the first of equal maxima, a NaN over everything."""
    x = every_2x2_window(dtype, channels_last)
    assert check_forward(x, dict(kernel_size=2))
    assert check_forward(x[..., :7], dict(kernel_size=2))  # odd width: a column no window covers, a short row
    assert check_forward(x[..., :, :1, :], dict(kernel_size=(1, 2)))


_ISA_CHECK = """
import itertools, torch, torch.nn.functional as TF
import dlkern.functional as F
torch.manual_seed(0)
cases = [((2, 40, 9, 11), dict(kernel_size=2)), ((2, 5, 28, 28), dict(kernel_size=2)),
         ((3, 17, 7, 9), dict(kernel_size=3, stride=2, padding=1)), ((2, 3, 8, 9), dict(kernel_size=(2, 3), stride=1))]
for (shape, args), dtype, cl in itertools.product(cases, [torch.float32, torch.float64, torch.bfloat16, torch.int32],
                                                  [False, True]):
    x = (torch.randn(shape) * 3).round().to(dtype)
    if dtype.is_floating_point:
        x = x.masked_fill(torch.rand(shape) < 0.1, float("nan"))
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    out, idx = F.max_pool2d(x, **args, return_indices=True)
    ref, ref_idx = TF.max_pool2d(x, **args, return_indices=True)
    assert torch.equal(idx, ref_idx), ("indices", shape, args, dtype, cl)
    torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)  # max pooling selects: exact
    with torch.no_grad():  # the values-only kernel (channels_last)
        torch.testing.assert_close(F.max_pool2d(x, **args), ref, rtol=0, atol=0, equal_nan=True)
    if dtype.is_floating_point:
        g = torch.randn(out.shape).to(dtype)
        k = args["kernel_size"]
        pool = ([k, k] if isinstance(k, int) else list(k), [args.get("stride", 0)] if "stride" in args else [],
                [args.get("padding", 0)], [1], False)
        gi = torch.ops.dlkern.max_pool2d_backward(g, x, idx, *pool)
        ref_gi = torch.ops.aten.max_pool2d_with_indices_backward(g.double(), x.double(), *pool, ref_idx)
        tol = {torch.float64: 1e-12, torch.float32: 1.3e-6, torch.float16: 1e-3, torch.bfloat16: 1.6e-2}[dtype]
        assert torch.allclose(gi.double(), ref_gi, rtol=tol, atol=tol, equal_nan=True), ("backward", shape, args, dtype, cl)
print("ok")
"""


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_cpu_kernels_under_every_isa(capability):
    """The CPU kernels are compiled for AVX-512, AVX2 and the baseline ISA and picked at run time as ATen picks its
    own (ATEN_CPU_CAPABILITY lowers both): each variant this machine can run must agree with PyTorch."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    done = subprocess.run([sys.executable, "-c", _ISA_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_values_only_forward_runs_without_indices():
    """A CPU forward that needs neither gradient nor indices runs dlkern::max_pool2d_values (no index stores), and
    only then."""
    x = torch.randn(2, 3, 6, 6).contiguous(memory_format=torch.channels_last)
    seen = []

    class Record(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with Record():
        F.max_pool2d(x, 2)
        F.max_pool2d(x, 2, return_indices=True)
        F.max_pool2d(x.requires_grad_(), 2)
    assert seen == ["dlkern.max_pool2d_values.default", "dlkern.max_pool2d.default", "dlkern.max_pool2d.default"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int32], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_values_only_forward_matches_torch(dtype, channels_last):
    """The values-only forward selects what ATen selects: every 2x2 arrangement of ties and NaN, odd sizes, and a
    window that is not 2x2."""
    x = every_2x2_window(torch.float32 if dtype == torch.int32 else dtype, channels_last)
    if dtype == torch.int32:
        x = x.nan_to_num(nan=7, neginf=-5).to(dtype)
    cases = [(x, dict(kernel_size=2)), (x[..., :7], dict(kernel_size=2)), (x, dict(kernel_size=(2, 3), stride=1))]
    for part, args in cases:
        with torch.no_grad():
            assert torch.equal(F.max_pool2d(part, **args).isnan(), TF.max_pool2d(part, **args).isnan())
            assert torch.equal(F.max_pool2d(part, **args).nan_to_num(), TF.max_pool2d(part, **args).nan_to_num())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (2, 3, 7, 9), (1, 1, 2, 2), (3, 20, 5, 4), (4, 64, 65, 63)])
def test_2x2_backward_odd_sizes_and_foreign_indices(shape, channels_last, dtype):
    """The channels_last 2x2 tiling backward writes each element once: odd last rows/columns get 0, a -0 gradient
    lands as ATen's zero-filled sum stores it (+0), and indices that point outside their own window (passed by a
    caller) are scattered as ATen's backward scatters them -- in every image, or in one image of several. The
    largest shape is over the 4 MB above which each image is zeroed before it is written."""
    x = torch.randn(shape, dtype=dtype)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    out, idx = torch.ops.dlkern.max_pool2d(x, [2], [], [0], [1], False)
    g = torch.randn_like(out).masked_fill(torch.rand(out.shape) < 0.2, -0.0)
    pool = ([2, 2], [2, 2], [0, 0], [1, 1], False)

    def check(indices, exact):
        expected = torch.ops.aten.max_pool2d_with_indices_backward(g, x, *pool, indices)
        actual = torch.ops.dlkern.max_pool2d_backward(g, x, indices, [2], [], [0], [1], False)
        if exact:
            assert torch.equal(actual, expected) and torch.equal(actual.signbit(), expected.signbit())
        else:
            assert_close(actual, expected)  # repeated indices sum: the dtype's tolerance for a different order
        assert actual.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)

    check(idx, exact=True)
    foreign = torch.randint(0, shape[2] * shape[3], idx.shape)  # anywhere in the plane, repeats included
    check(foreign, exact=False)
    if shape[0] > 1:
        one_foreign = idx.clone()
        one_foreign[-1, -1, 0, 0] = shape[2] * shape[3] - 1  # one index of the last image leaves its window
        check(one_foreign, exact=False)


# ---------------------------------------------------------------------------------------------------------------
# Indices outside the plane: a window wholly in the padding, or a caller's indices. The backward skips them, the
# gathers (forward mode, double backward) give 0 there; nothing reads or writes outside its own plane.
# ---------------------------------------------------------------------------------------------------------------

# Dilation 2 puts both tap rows of every window (rows -1 and 1) outside a 1-row input: each window sees only
# padding, and ATen's forward returns -inf with indices 8, 10, 13, past the 8 elements of the plane (its own CPU
# backward then writes out of bounds, so it is never called on these inputs here).
PADDING_ONLY_ARGS = dict(kernel_size=(2, 3), stride=(4, 3), padding=(1, 1), dilation=(2, 1))


def reference_backward(grad_output, indices, input_shape):
    """grad_input with each grad_output added at its index, in float64 on the CPU; indices outside [0, H*W)
    skipped. Only in-bounds indices reach scatter_add_."""
    H, W = input_shape[-2:]
    idx = indices.cpu().flatten(-2)
    valid = (idx >= 0) & (idx < H * W)
    gi = torch.zeros(*input_shape[:-2], H * W, dtype=torch.float64)
    gi.scatter_add_(-1, idx.where(valid, 0), grad_output.cpu().double().flatten(-2).where(valid, 0))
    return gi.view(input_shape)


def reference_gather(t, indices):
    """t read at each index, in float64 on the CPU; 0 where the index is outside [0, H*W)."""
    H, W = t.shape[-2:]
    idx = indices.cpu().flatten(-2)
    valid = (idx >= 0) & (idx < H * W)
    return t.cpu().double().flatten(-2).gather(-1, idx.where(valid, 0)).where(valid, 0).view(indices.shape)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape, channels_last", [((1, 1, 1, 8), False), ((2, 3, 1, 8), False),
                                                  ((2, 3, 1, 8), True)], ids=["issue", "nchw", "channels_last"])
def test_window_wholly_in_padding(device, dtype, shape, channels_last):
    """ATen's values and out-of-plane indices; every derivative is 0 (the output is -inf whatever the input): the
    backward writes zeros, and forward mode, double backward and the torch.func transforms, which read at the
    indices, give zeros instead of failing (torch.gather raises on these indices; on a GPU it asserts)."""
    import torch.autograd.forward_ad as fwAD

    x = make_input(shape, dtype, device, channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    args = PADDING_ONLY_ARGS
    pool = lambda a: F.max_pool2d(a, **args)  # noqa: E731
    out, idx = F.max_pool2d(x, **args, return_indices=True)
    ref_out, ref_idx = TF.max_pool2d(x, **args, return_indices=True)  # ATen's forward is safe
    assert torch.equal(out, ref_out) and torch.equal(idx, ref_idx)
    assert torch.equal(idx.cpu(), torch.tensor([8, 10, 13]).expand(idx.shape)) and out.isneginf().all()

    # reverse mode (the op's C++ autograd)
    xg = x.clone().requires_grad_()
    y = pool(xg)
    go = torch.randn(y.shape, dtype=dtype, device=device).contiguous(memory_format=fmt).requires_grad_()
    (g,) = torch.autograd.grad(y, xg, go, create_graph=True)
    assert torch.equal(g, torch.zeros_like(x)) and g.is_contiguous(memory_format=fmt)
    # double backward: the gradient of the backward with respect to grad_output reads at the indices
    (gg,) = torch.autograd.grad(g, go, torch.randn_like(g))
    assert torch.equal(gg, torch.zeros_like(go))

    # forward mode, eager and torch.func
    t = torch.randn_like(x)
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(pool(fwAD.make_dual(x, t))).tangent
    assert torch.equal(tangent, torch.zeros_like(out))
    primal, tangent = torch.func.jvp(pool, (x,), (t,))
    assert torch.equal(primal, ref_out) and torch.equal(tangent, torch.zeros_like(out))
    assert torch.equal(torch.func.jacfwd(pool)(x), torch.zeros(out.shape + x.shape, dtype=dtype, device=device))
    # second order through the Python autograd.Functions (torch.func): Hessian and Hessian-vector product
    grad = torch.func.grad(lambda a: (pool(a) * go.detach()).sum())
    assert torch.equal(torch.func.jacrev(grad)(x), torch.zeros(x.shape + x.shape, dtype=dtype, device=device))
    assert torch.equal(torch.func.jvp(grad, (x,), (t,))[1], torch.zeros_like(x))
    if device == "cuda":
        torch.cuda.synchronize()  # a device-side assert would surface here


def out_of_plane_indices(indices, H, W):
    """The forward's indices with some moved just outside their plane (one past the end, one before the start),
    far outside it, and to the int64 extremes, in the first, a middle and the last plane."""
    plane = H * W
    bad = indices.clone()
    bad[0, 0, 0, 0] = plane  # the next plane's (NCHW) or image's (channels_last) first element
    bad[0, 0, -1, -1] = plane + W + 1
    bad[-1, -1, 0, 0] = -1  # the previous plane's last element
    bad[-1, -1, 0, 1] = -plane
    bad[-1, -1, -1, -1] = plane  # past the end of the whole tensor
    bad[1, 1, 1, 1] = 2**40
    bad[1, 1, 1, 2] = -(2**40)
    bad[1, 2, 0, 0] = torch.iinfo(torch.int64).max
    bad[1, 2, 0, 1] = torch.iinfo(torch.int64).min
    return bad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("pool", [([3], [1], [1]), ([2], [], [0])], ids=["3x3", "2x2_tiling"])
def test_backward_skips_indices_outside_the_plane(device, dtype, channels_last, pool):
    """dlkern::max_pool2d_backward given indices outside [0, H*W) skips them: every plane's gradient, the planes
    next to the bad indices' included, is the sum of its in-plane indices' gradients alone (a write past a plane
    would land in its neighbour; one far outside, or past the tensor, would crash). Every kernel: the NCHW and
    channels_last scatters, the channels_last 2x2 writer (whose images with such an index go to the scatter),
    16-bit types through their float buffer. The op's own derivatives read 0 at those indices."""
    kernel_size, stride, padding = pool
    op_args = (kernel_size, stride, padding, [1], False)
    shape = (4, 4, 6, 8)  # image 2 has no bad index: the channels_last 2x2 writer keeps it
    x = make_input(shape, dtype, device, channels_last)
    _, idx = torch.ops.dlkern.max_pool2d(x, *op_args)
    bad = out_of_plane_indices(idx, shape[2], shape[3])
    go = torch.randn(idx.shape, dtype=dtype, device=device)
    go = go.contiguous(memory_format=torch.channels_last) if channels_last else go
    for indices in (bad, bad.contiguous()):  # channels_last indices, and NCHW ones made channels_last by the op
        gi = torch.ops.dlkern.max_pool2d_backward(go, x, indices, *op_args)
        assert_close(gi.cpu(), reference_backward(go, indices, shape), dtype=dtype)

    # the backward's derivatives: reverse mode (C++ autograd), torch.func (Python), forward mode
    v = torch.randn_like(x)
    gor = go.clone().requires_grad_()
    gi = torch.ops.dlkern.max_pool2d_backward(gor, x, bad, *op_args)
    (ggo,) = torch.autograd.grad(gi, gor, v)
    assert torch.equal(ggo.cpu().double(), reference_gather(v, bad))
    from dlkern.ops.max_pool import max_pool2d_backward

    _, pullback = torch.func.vjp(lambda g: max_pool2d_backward(g, x, bad, *op_args), go)
    assert torch.equal(pullback(v)[0].cpu().double(), reference_gather(v, bad))
    _, tangent = torch.func.jvp(lambda g: max_pool2d_backward(g, x, bad, *op_args), (go,), (go,))
    assert_close(tangent.cpu(), reference_backward(go, bad, shape), dtype=dtype)
    if device == "cuda":
        torch.cuda.synchronize()


def _vm_flags(address):
    """The VmFlags of the mapping of this process that holds `address` (Linux /proc/self/smaps)."""
    flags = None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(a, 16) for a in head.split("-"))
                inside = lo <= address < hi
            elif head == "VmFlags:" and inside:
                flags = line.split()[1:]
    return flags


def _thp_mode():
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return re.search(r"\[(\w+)\]", f.read()).group(1)
    except OSError:
        return None


@pytest.mark.skipif(_thp_mode() not in ("madvise", "always"), reason="needs Linux transparent huge pages")
def test_large_cpu_outputs_are_advised_onto_huge_pages():
    # A fresh 100 MB gradient on 4 KB pages spends most of its time in page faults; dlkern advises outputs above
    # 32 MB onto 2 MB pages (VmFlags "hg") and leaves smaller ones, which may share glibc's heap, alone.
    x = torch.randn(1024, 32, 28, 28)  # the MnistCNN's first pool at batch 1024: a 103 MB input gradient
    y, ind = F.max_pool2d(x, 2, return_indices=True)
    g = torch.randn_like(y)
    grad = torch.ops.dlkern.max_pool2d_backward(g, x, ind, [2, 2], [2, 2], [0, 0], [1, 1], False)
    assert "hg" in _vm_flags(grad.data_ptr() + grad.nbytes // 2)
    assert "hg" in _vm_flags(ind.data_ptr() + ind.nbytes // 2)  # 51 MB of int64 indices
    ref = torch.ops.aten.max_pool2d_with_indices_backward(g, x, [2, 2], [2, 2], [0, 0], [1, 1], False, ind)
    assert torch.equal(grad, ref)
    small = torch.ops.dlkern.max_pool2d_backward(g[:8], x[:8], ind[:8], [2, 2], [2, 2], [0, 0], [1, 1], False)
    assert "hg" not in (_vm_flags(small.data_ptr()) or [])
