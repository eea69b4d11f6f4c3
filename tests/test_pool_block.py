"""dlkern.nn.ConvBNActPool2d / dlkern.functional.conv_bn_act_pool2d against the stock Conv2d -> BatchNorm2d ->
activation -> MaxPool2d (float64 references, tests/helpers.py tolerances): outputs, gradients, running statistics,
pool geometries, ties/NaN/-inf, layouts, state_dicts, hooks, errors, torch.compile and launch counts. Tiny shapes:
on CPU the Triton kernels run in Triton's interpreter."""

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import dlkern
from dlkern.nn import ConvBNActPool2d
from dlkern.ops import triton_support
from helpers import assert_close, assert_state_dicts_cross
from test_conv_bn import assert_grad_close

# Launches of one training step of a block whose input needs a gradient (test_training_step_launches), today's
# path: the fused conv block (3 Triton launches forward: conv + statistics, their merge with the running update,
# normalize + activation; 4 backward: BatchNorm-backward reduction, dL/dz, input grad, weight grad in one split)
# with the max pool fused in.
TRAIN_FORWARD_LAUNCHES = 3  # conv + statistics, their merge, normalize + activation + max pool
TRAIN_BACKWARD_LAUNCHES = 4  # reduction, dL/dz (through the pooled gradient), dgrad, wgrad (one split: no sum)

# dlkern ops that run a C++/CUDA kernel of their own (one launch each); the Triton ops count their launches.
_CPP_OPS = {"max_pool2d", "max_pool2d_values", "max_pool2d_backward"}


def make_pair(c_in, c_out, dtype, activation="relu", conv_kw=None, pool_kw=None, bn_kw=None):
    """(dlkern block in `dtype`, stock float64 Sequential) with the same random weights and running statistics."""
    conv_kw, pool_kw, bn_kw = conv_kw or {}, pool_kw or {}, bn_kw or {}
    block = ConvBNActPool2d(c_in, c_out, 3, **conv_kw, **bn_kw, activation=activation,
                            **{f"pool_{k}": v for k, v in pool_kw.items()})
    with torch.no_grad():
        bn = block[1]
        if bn.affine:
            bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.5, 0.5)
        if bn.track_running_stats:
            bn.running_mean.uniform_(-0.2, 0.2), bn.running_var.uniform_(0.5, 2.0)
    stock = nn.Sequential(nn.Conv2d(c_in, c_out, 3, **conv_kw), nn.BatchNorm2d(c_out, **bn_kw),
                          *copy.deepcopy(block[2:]))  # the stock activation and MaxPool2d
    assert type(stock[3]) is nn.MaxPool2d
    stock.load_state_dict(block.state_dict(), strict=True)
    return block.to(dtype), stock.double()


def check_step(block, stock, x):
    """One forward and backward of both (and of a copy of the stock model in the block's dtypes, the yardstick
    for float32 gradients, see test_conv_bn.assert_grad_close); compares the output, every gradient and the
    buffers. Tolerances are the input's dtype's: a float32 BatchNorm after a 16-bit conv (the fast-CIFAR mix)
    sums gradients from 16-bit activations (in eval, where BatchNorm is folded into the 16-bit conv, dlkern
    rounds at other points than the stock block)."""
    dtype = x.dtype
    same = copy.deepcopy(stock).to(dtype)
    same[1].to(next((t.dtype for t in block[1].state_dict().values() if t.is_floating_point()), dtype))
    xs = [x.detach().clone().requires_grad_(), x.detach().double().requires_grad_(),
          x.detach().clone().requires_grad_()]
    outs = [m(t) for m, t in zip((block, stock, same), xs)]
    assert outs[0].dtype == outs[2].dtype == dtype and outs[0].shape == outs[1].shape
    assert outs[0].is_contiguous(memory_format=torch.channels_last) == outs[1].is_contiguous(
        memory_format=torch.channels_last)
    assert_close(outs[0], outs[1])
    g = torch.randn_like(outs[1])
    for out in outs:
        out.backward(g.to(out.dtype))
    assert_grad_close("input", xs[0].grad, xs[1].grad, xs[2].grad)
    for (name, p), q, r in zip(block.named_parameters(), stock.parameters(), same.parameters(), strict=True):
        assert p.grad.dtype == p.dtype
        assert_grad_close(name, p.grad, q.grad, r.grad, dtype=dtype)
    for (name, a), b in zip(block.state_dict().items(), stock.state_dict().values(), strict=True):
        if a.is_floating_point():
            assert_close(a, b, dtype=dtype, msg=lambda m, name=name: f"{name}: {m}")
        else:
            assert torch.equal(a, b), name
    block.zero_grad(), stock.zero_grad()
    return outs[0]


# Conv 3x3 (padding 1 unless said) on tiny inputs, then the pool: MnistCNN's 2x2/2, odd sizes (floor and ceil),
# pool padding, dilation, overlapping windows (stride 1), rectangular windows.
POOLS = [
    pytest.param(6, 6, {}, dict(kernel_size=2), id="2x2-even"),
    pytest.param(7, 5, {}, dict(kernel_size=2), id="2x2-odd-floor"),
    pytest.param(7, 5, {}, dict(kernel_size=2, ceil_mode=True), id="2x2-odd-ceil"),
    pytest.param(7, 6, {}, dict(kernel_size=3, stride=2, padding=1), id="3x3-s2-pad1"),
    pytest.param(7, 7, {}, dict(kernel_size=3, stride=2, padding=1, ceil_mode=True), id="3x3-s2-pad1-ceil"),
    pytest.param(7, 6, {}, dict(kernel_size=2, stride=1, dilation=2), id="2x2-dilation2"),
    pytest.param(5, 6, {}, dict(kernel_size=3, stride=1), id="3x3-overlapping-s1"),
    pytest.param(8, 7, dict(stride=2, padding=0), dict(kernel_size=(1, 2), stride=(1, 2)), id="1x2-strided-conv"),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("H, W, conv_kw, pool_kw", POOLS)
def test_matches_stock(H, W, conv_kw, pool_kw, dtype):
    torch.manual_seed(0)
    block, stock = make_pair(2, 3, dtype, conv_kw={"padding": 1, **conv_kw}, pool_kw=pool_kw)
    for _ in range(2):  # two training steps: the running statistics are updated twice
        check_step(block, stock, torch.randn(2, 2, H, W, dtype=dtype))
    block.eval(), stock.eval()
    check_step(block, stock, torch.randn(2, 2, H, W, dtype=dtype))


@pytest.mark.parametrize("activation", ["leaky_relu", "hardtanh", "none"])
def test_other_activations(activation):
    torch.manual_seed(1)
    block, stock = make_pair(2, 3, torch.float64, activation, conv_kw=dict(padding=1), pool_kw=dict(kernel_size=2))
    for training in (True, False):
        block.train(training), stock.train(training)
        check_step(block, stock, torch.randn(2, 2, 5, 6, dtype=torch.float64))


@pytest.mark.parametrize("bn_kw", [dict(affine=False), dict(track_running_stats=False), dict(momentum=None)],
                         ids=["no-affine", "no-running-stats", "cumulative"])
def test_batchnorm_variants(bn_kw):
    torch.manual_seed(2)
    block, stock = make_pair(2, 3, torch.float64, conv_kw=dict(padding=1, bias=False), pool_kw=dict(kernel_size=2),
                             bn_kw=bn_kw)
    for training in (True, True, False):
        block.train(training), stock.train(training)
        check_step(block, stock, torch.randn(2, 2, 6, 5, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_channels_last(dtype):
    torch.manual_seed(3)
    block, stock = make_pair(2, 4, dtype, conv_kw=dict(padding=1), pool_kw=dict(kernel_size=2, ceil_mode=True))
    block.to(memory_format=torch.channels_last), stock.to(memory_format=torch.channels_last)
    for training in (True, False):
        block.train(training), stock.train(training)
        x = torch.randn(2, 2, 7, 6, dtype=dtype).contiguous(memory_format=torch.channels_last)
        out = check_step(block, stock, x)
        assert out.is_contiguous(memory_format=torch.channels_last)


def test_autocast_bfloat16():
    """Under CPU autocast: the output in bfloat16 and the running statistics in float32, each within bfloat16's
    tolerance of the stock block under the same autocast."""
    torch.manual_seed(4)
    block, stock = make_pair(4, 4, torch.float32, conv_kw=dict(padding=1), pool_kw=dict(kernel_size=2))
    stock.float()
    x = torch.randn(2, 4, 6, 6)
    for training in (True, False):
        block.train(training), stock.train(training)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, ref = block(x), stock(x)
        assert out.dtype == ref.dtype == torch.bfloat16
        assert_close(out.float(), ref.float(), dtype=torch.bfloat16)
        assert block[1].running_mean.dtype == torch.float32
        assert_close(block[1].running_mean, stock[1].running_mean, dtype=torch.bfloat16)
        assert_close(block[1].running_var, stock[1].running_var, dtype=torch.bfloat16)


# ------------------------------------------------------------------------------------------- the functional form


def functional_args(stock):
    conv, bn = stock[0], stock[1]
    return conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias


def stock_unpooled(stock, x):
    """The stock Conv2d -> BatchNorm2d -> activation on a copy (its running statistics stay as they were)."""
    return copy.deepcopy(stock)[:3](x)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("pool_kw", [dict(kernel_size=2), dict(kernel_size=3, stride=2, padding=1, ceil_mode=True),
                                     dict(kernel_size=2, stride=1, dilation=2)], ids=["2x2", "3x3-pad-ceil", "dil"])
def test_functional_return_indices(training, pool_kw):
    """return_indices=True gives F.max_pool2d's own int64 indices (and values) on the block's output."""
    torch.manual_seed(5)
    _, stock = make_pair(2, 3, torch.float64, conv_kw=dict(padding=1))
    stock.train(training)
    x = torch.randn(2, 2, 7, 6, dtype=torch.float64)
    expected, expected_indices = F.max_pool2d(stock_unpooled(stock, x), **pool_kw, return_indices=True)
    weight, bias, rm, rv, gamma, beta = functional_args(stock)
    pool = {f"pool_{k}": v for k, v in pool_kw.items()}
    out, indices = dlkern.functional.conv_bn_act_pool2d(
        x, weight, bias, rm.clone(), rv.clone(), gamma, beta, training=training, padding=1, **pool,
        return_indices=True)
    assert indices.dtype == torch.int64
    assert torch.equal(indices, expected_indices)
    assert_close(out, expected)
    alone = dlkern.functional.conv_bn_act_pool2d(x, weight, bias, rm.clone(), rv.clone(), gamma, beta,
                                                 training=training, padding=1, **pool)
    assert torch.equal(alone, out)


def test_functional_defaults_and_running_update():
    """The defaults are MaxPool2d(2)'s; training updates the running buffers (and num_batches_tracked) given."""
    torch.manual_seed(6)
    _, stock = make_pair(2, 3, torch.float64, activation="silu", conv_kw=dict(padding=1))
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64)
    weight, bias, rm, rv, gamma, beta = functional_args(stock)
    rm, rv, nbt = rm.clone(), rv.clone(), torch.tensor(0)
    out = dlkern.functional.conv_bn_act_pool2d(x, weight, bias, rm, rv, gamma, beta, True, 0.3, 1e-3, padding=1,
                                               activation="silu", num_batches_tracked=nbt)
    stock[1].momentum, stock[1].eps = 0.3, 1e-3
    assert_close(out, stock(x))
    assert_close(rm, stock[1].running_mean), assert_close(rv, stock[1].running_var)
    assert nbt.item() == 1


def test_ties_take_the_first_maximum():
    """Constant inputs make every window a tie (per channel, eval and train): the first maximum in window order
    wins, so indices and the input gradient are the stock model's."""
    torch.manual_seed(7)
    for training in (False, True):
        block, stock = make_pair(2, 3, torch.float64, conv_kw=dict(padding=0), pool_kw=dict(kernel_size=3, stride=2))
        block.train(training), stock.train(training)
        x = torch.full((2, 2, 9, 8), 0.75, dtype=torch.float64)
        z = stock_unpooled(stock, x)
        assert (z == z[:, :, :1, :1]).all()  # every window ties
        _, expected = F.max_pool2d(z, 3, 2, return_indices=True)
        _, indices = dlkern.functional.conv_bn_act_pool2d(
            x, *functional_args(copy.deepcopy(stock)), training=training, pool_kernel_size=3, pool_stride=2,
            return_indices=True)
        assert torch.equal(indices, expected)
        check_step(block, stock, x)
    # All zeros after ReLU (a large negative BatchNorm bias): ties of zeros, in eval.
    block.eval(), stock.eval()
    with torch.no_grad():
        block[1].bias.fill_(-100.0), stock[1].bias.fill_(-100.0)
    check_step(block, stock, torch.randn(2, 2, 9, 8, dtype=torch.float64))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_nan_propagates(training):
    """A NaN in the conv output wins its windows (eval: the windows over it; train: BatchNorm's statistics make the
    whole channel NaN), as in ATen's max pool: values and indices are the stock model's."""
    torch.manual_seed(8)
    block, stock = make_pair(1, 2, torch.float64, activation="none", pool_kw=dict(kernel_size=2))
    block.train(training), stock.train(training)
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    x[0, 0, 3, 4] = float("nan")
    z = stock_unpooled(stock, x)
    expected, expected_indices = F.max_pool2d(z, 2, return_indices=True)
    assert expected.isnan().all() if training else expected.isnan().any() and not expected.isnan().all()
    out, indices = dlkern.functional.conv_bn_act_pool2d(
        x, *functional_args(copy.deepcopy(stock)), training=training, activation=None, return_indices=True)
    torch.testing.assert_close(out, expected, equal_nan=True, rtol=1e-12, atol=1e-12)
    assert torch.equal(indices, expected_indices)
    torch.testing.assert_close(block(x), stock(x), equal_nan=True, rtol=1e-12, atol=1e-12)


def test_minus_infinity():
    """-inf in the conv output (1x1 conv, positive weight, eval): a window of -inf only gives -inf at its first
    element; elsewhere the finite maximum wins. Values, indices and the input gradient are the stock model's."""
    block, stock = make_pair(1, 1, torch.float64, activation="none", pool_kw=dict(kernel_size=2))
    for m in (block, stock):
        m[0] = nn.Conv2d(1, 1, 1).double()
        with torch.no_grad():
            m[0].weight.fill_(0.5), m[0].bias.fill_(0.25)
    block.eval(), stock.eval()
    x = torch.randn(1, 1, 4, 6, dtype=torch.float64)
    x[0, 0, 0:2, 0:2] = -float("inf")  # a whole window
    x[0, 0, 2, 3] = -float("inf")  # one element of a window
    expected, expected_indices = F.max_pool2d(stock_unpooled(stock, x), 2, return_indices=True)
    out, indices = dlkern.functional.conv_bn_act_pool2d(x, *functional_args(stock), activation=None,
                                                        return_indices=True)
    assert out[0, 0, 0, 0] == -float("inf") and indices[0, 0, 0, 0] == 0
    assert_close(out, expected)  # -inf where the stock model has it (assert_close compares infinities exactly)
    assert torch.equal(indices, expected_indices)
    xs, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    stock(xs).sum().backward(), block(xo).sum().backward()
    assert_close(xo.grad, xs.grad)


def test_empty_batch():
    torch.manual_seed(9)
    block, stock = make_pair(2, 3, torch.float64, conv_kw=dict(padding=1))
    x = torch.randn(0, 2, 6, 6, dtype=torch.float64)
    for training in (True, False):
        block.train(training), stock.train(training)
        out = block(x)
        assert out.shape == stock(x).shape == (0, 3, 3, 3)
        assert torch.equal(block[1].num_batches_tracked, stock[1].num_batches_tracked)


# ------------------------------------------------------------------------------------------- the module


def test_state_dicts_both_ways_and_fuse_shares():
    block = ConvBNActPool2d(3, 8, 3, padding=1, pool_kernel_size=3, pool_stride=2, pool_ceil_mode=True)
    stock = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.MaxPool2d(3, 2, ceil_mode=True))
    assert repr(block[3]) == repr(stock[3]) and repr(block[:3]) == repr(stock[:3])
    assert_state_dicts_cross(block, stock)
    fused = ConvBNActPool2d.fuse(*stock)
    assert all(a is b for a, b in zip(fused, stock, strict=True))
    assert type(fused[:2]) is nn.Sequential and list(fused[:2]) == list(stock[:2])  # slices are plain Sequentials
    x = torch.randn(2, 3, 7, 7)
    with torch.no_grad():
        assert_close(fused.eval()(x), stock.eval()(x))
        assert_close(ConvBNActPool2d.fuse(stock[0], stock[1], None, stock[3])(x), stock[3](stock[1](stock[0](x))))


def test_return_indices_pool_is_refused():
    conv, bn = nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3)
    message = ("ConvBNActPool2d: cannot hold MaxPool2d(kernel_size=2, stride=2, padding=0, dilation=1, "
               "ceil_mode=False): with return_indices=True it returns (values, indices), which a Sequential cannot "
               "pass on; use dlkern.functional.conv_bn_act_pool2d(..., return_indices=True)")
    with pytest.raises(ValueError, match=re.escape(message)):
        ConvBNActPool2d.fuse(conv, bn, nn.ReLU(), nn.MaxPool2d(2, return_indices=True))
    block = ConvBNActPool2d.fuse(conv, bn, nn.ReLU(), nn.MaxPool2d(2))
    block[3].return_indices = True  # set afterwards: refused at the call
    with pytest.raises(ValueError, match=re.escape(message)):
        block(torch.randn(2, 2, 6, 6))
    with pytest.raises(TypeError, match=r"ConvBNActPool2d: expected an nn.MaxPool2d after the activation, got "
                                        r"AvgPool2d"):
        ConvBNActPool2d.fuse(conv, bn, nn.ReLU(), nn.AvgPool2d(2))
    with pytest.raises(ValueError, match=r"ConvBNActPool2d: only groups=1 is supported, got groups=2"):
        ConvBNActPool2d(2, 4, 3, groups=2)
    with pytest.raises(ValueError, match=r"ConvBNActPool2d: unknown activation 'prelu'"):
        ConvBNActPool2d(2, 4, 3, activation="prelu")
    with pytest.raises(NotImplementedError, match=r"ConvBNActPool2d: cannot fuse activation PReLU"):
        ConvBNActPool2d.fuse(conv, bn, nn.PReLU(), nn.MaxPool2d(2))
    with pytest.raises(RuntimeError, match=r"dlkern.nn.ConvBNActPool2d: torch.jit.script is not supported"):
        torch.jit.script(block)


def test_hooks_run_children_one_by_one():
    """A hook on any child (the pool included) makes the block compute its children as the stock Sequential."""
    torch.manual_seed(10)
    block, stock = make_pair(2, 3, torch.float64, conv_kw=dict(padding=1), pool_kw=dict(kernel_size=2))
    seen = {"ours": [], "stock": []}
    for model, tag in ((block, "ours"), (stock, "stock")):
        model[3].register_forward_pre_hook(lambda m, i, tag=tag: seen[tag].append(i[0].clone()))
        model[3].register_forward_hook(lambda m, i, o: o * 2)
    check_step(block, stock, torch.randn(2, 2, 6, 6, dtype=torch.float64))  # its stock copies run the hooks too
    assert len(seen["ours"]) == 1
    assert_close(seen["ours"][0], seen["stock"][0])


# ------------------------------------------------------------------------------------------- errors, as PyTorch's


BAD_POOL_ARGS = [
    dict(kernel_size="a"), dict(kernel_size=2.5), dict(kernel_size=(2, 2, 2)), dict(kernel_size=[2, "b"]),
    dict(kernel_size=0), dict(kernel_size=2, stride=0), dict(kernel_size=2, padding=2), dict(kernel_size=2, padding=-1),
    dict(kernel_size=2, dilation=0), dict(kernel_size=9), dict(kernel_size=2, ceil_mode=1),
]


def pytorch_error(fn):
    with pytest.raises(Exception) as info:
        fn()
    return type(info.value), str(info.value)


@pytest.mark.parametrize("pool_kw", BAD_POOL_ARGS, ids=[repr(kw) for kw in BAD_POOL_ARGS])
def test_bad_pool_arguments_raise_as_pytorch(pool_kw):
    """Word for word F.max_pool2d's errors from the functional, and the stock MaxPool2d's from the module whose pool
    has the bad attribute (its stride stays the one set at construction)."""
    torch.manual_seed(11)
    block, stock = make_pair(2, 3, torch.float64, conv_kw=dict(padding=1))
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    expected = pytorch_error(lambda: F.max_pool2d(stock_unpooled(stock, x), **pool_kw))
    pool = {f"pool_{k}": v for k, v in pool_kw.items()}
    with pytest.raises(expected[0], match=f"^{re.escape(expected[1])}$"):
        dlkern.functional.conv_bn_act_pool2d(x, *functional_args(copy.deepcopy(stock)), padding=1, **pool)
    for name, value in pool_kw.items():
        setattr(block[3], name, value)
        setattr(stock[3], name, value)
    expected = pytorch_error(lambda: stock(x))
    with pytest.raises(expected[0], match=f"^{re.escape(expected[1])}$"):
        block(x)


# ------------------------------------------------------------------------------------------- compile, launches


def test_torch_compile_fullgraph():
    """The functional under torch.compile(fullgraph=True) (a graph break raises): training (with backward and the
    running update) and eval give eager's results."""
    torch.manual_seed(12)
    _, stock = make_pair(2, 4, torch.float32, conv_kw=dict(padding=1))
    weight, bias, rm, rv, gamma, beta = (t.detach().float().requires_grad_(t.requires_grad)
                                         for t in functional_args(stock))

    def block(x, rm, rv, training):
        return dlkern.functional.conv_bn_act_pool2d(x, weight, bias, rm, rv, gamma, beta, training, padding=1,
                                                    pool_kernel_size=3, pool_stride=2, pool_padding=1)

    compiled = torch.compile(block, fullgraph=True)
    x = torch.randn(2, 2, 7, 6)
    for training in (True, False):
        results = []
        for fn in (block, compiled):
            buffers = rm.clone(), rv.clone()
            xg = x.clone().requires_grad_()
            out = fn(xg, *buffers, training)
            out.backward(torch.ones_like(out))
            results.append((out.detach(), xg.grad, weight.grad.clone(), *buffers))
            weight.grad = bias.grad = gamma.grad = beta.grad = None
        for name, a, b in zip(("out", "input grad", "weight grad", "running_mean", "running_var"), *results):
            assert_close(a, b, msg=lambda m, name=name: f"{name}: {m}")


class CountLaunches(TorchDispatchMode):
    """Kernel launches: dlkern's Triton launches (launch_counts) plus one per dlkern op with a C++/CUDA kernel."""

    def __enter__(self):
        self.launches = -sum(triton_support.launch_counts.values())
        return super().__enter__()

    def __exit__(self, *exc):
        self.launches += sum(triton_support.launch_counts.values())
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "dlkern" and func._opname in _CPP_OPS:
            self.launches += 1
        return func(*args, **(kwargs or {}))


def test_training_step_launches():
    torch.manual_seed(13)
    block, _ = make_pair(2, 4, torch.float32, conv_kw=dict(padding=1))
    x = torch.randn(2, 2, 6, 6, requires_grad=True)
    with CountLaunches() as forward:
        out = block(x)
    with CountLaunches() as backward:
        out.backward(torch.ones_like(out))
    assert (forward.launches, backward.launches) == (TRAIN_FORWARD_LAUNCHES, TRAIN_BACKWARD_LAUNCHES)


@pytest.mark.parametrize("training", [True, False])
def test_cpu_without_triton_runs_the_unfused_block(training):
    """Where the Triton kernels do not run (a CPU outside the interpreter) the block is ATen's conv block (the
    composite) and dlkern's C++ max pool, not the fused op's composite, which would pool the same way and add the
    window taps' encoding and a scatter back; in the interpreter the fused op runs. Same results both ways."""
    torch.manual_seed(5)
    block, _ = make_pair(2, 4, torch.float64, conv_kw=dict(padding=1))
    block.train(training)
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64)

    def run(model):
        seen = []

        class Record(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func.namespace == "dlkern":
                    seen.append(func._opname)
                return func(*args, **(kwargs or {}))

        with Record(), torch.set_grad_enabled(training):
            out = model(x)
        return seen, out

    fused, fused_out = run(copy.deepcopy(block))
    with triton_support.composite_on_cpu():
        unfused, unfused_out = run(copy.deepcopy(block))
    assert fused == ["conv_bn_train2d" if training else "conv_bn_infer2d"]
    assert unfused == (["conv_bn_train2d", "max_pool2d"] if training else ["conv_bn_infer2d", "max_pool2d_values"])
    assert_close(unfused_out, fused_out)


@pytest.mark.parametrize("path", ["triton", "composite"])
@pytest.mark.parametrize("form", ["module", "functional", "indices", "weight"])
def test_double_backward_is_a_clear_error(path, form):
    """A gradient penalty through the pooled training block (create_graph=True) raises the block's clear error on
    every path, as ConvBNReLU2d's does: never a gradient without a graph, whose penalty would silently add
    nothing (issue 18: the fused path returned one)."""
    torch.manual_seed(21)
    block, _ = make_pair(2, 4, torch.float64, conv_kw=dict(padding=1))
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64, requires_grad=True)
    conv, bn = block[0], block[1]

    def run():
        if form == "module" or form == "weight":
            return block(x)
        out = dlkern.functional.conv_bn_act_pool2d(
            x, conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, training=True,
            padding=1, return_indices=form == "indices")
        return out[0] if form == "indices" else out

    with (triton_support.composite_on_cpu() if path == "composite" else torch.enable_grad()):
        out = run()
        wrt = conv.weight if form == "weight" else x
        (grad,) = torch.autograd.grad(out.square().sum(), wrt, create_graph=True)
        assert grad.requires_grad  # a penalty on it must reach autograd, not be a constant
        with pytest.raises(RuntimeError, match=r"dlkern\.conv_bn_act2d: double backward"):
            torch.autograd.grad(grad.square().sum(), [x, conv.weight])


@pytest.mark.parametrize("pooled", [True, False], ids=["ConvBNActPool2d", "ConvBNReLU2d"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bn_dtype", ["same", "float32"], ids=["pure", "float32-batchnorm"])
def test_16bit_training(dtype, bn_dtype, pooled):
    """model.bfloat16()/.half() (BatchNorm's parameters and running buffers in 16 bits too: issue 18, the
    interpreter had no bf16 arithmetic for their update) and the fast-CIFAR mix (16-bit conv and activations,
    float32 BatchNorm): two training steps and eval against the float64 stock block, output and buffers within
    the dtype's tolerance, gradients within the yardstick of the stock block in the same dtypes."""
    torch.manual_seed(8)
    # A 1x1 window, stride 2: in 16 bits two values of a wider window often round to a tie, and which one is the
    # maximum then differs from float64's (and between interpreters: Triton 3.7's truncates to bf16, 3.6's rounds),
    # moving a whole gradient element; the windows' logic is checked in float32/float64 above.
    block, stock = make_pair(3, 4, dtype, conv_kw=dict(padding=1), pool_kw=dict(kernel_size=1, stride=2))
    if not pooled:
        block, stock = dlkern.nn.ConvBNReLU2d(3, 4, 3, padding=1), stock[:3]
        block.load_state_dict(stock.state_dict())
        block.to(dtype)
    if bn_dtype == "float32":
        block[1].float()
    for training in (True, True, False):
        block.train(training), stock.train(training)
        check_step(block, stock, torch.randn(2, 3, 6, 6, dtype=dtype))
    assert block[1].running_mean.dtype == (dtype if bn_dtype == "same" else torch.float32)

