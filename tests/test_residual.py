"""The residual epilogue (issue 20): ``act(bn(conv(x)) + residual)`` (ResNet's blocks) and ``act(bn(conv(x))) +
residual`` in the fused block, against stock F.conv2d -> F.batch_norm -> add -> activation in float64: outputs,
every gradient (the residual's too), running statistics; training, eval with autograd (BatchNorm folded) and
inference; Triton's interpreter and the PyTorch composite; no extra launch; layouts; a residual the epilogue does
not take (broadcast, another dtype) added as torch adds it; the double-backward guard; 16-bit autocast."""

import pytest
import torch
import torch.nn.functional as F

import dlkern.functional as DF
from dlkern.ops import triton_support
from dlkern.ops.conv_block import conv_bn_block
from helpers import assert_close, assert_outputs_and_grads_close, check_block_against_stock
from test_conv_bn import path  # noqa: F401 (the fixture: Triton's interpreter, the composite)

F64 = dict(dtype=torch.float64)
ACTS = {"relu": F.relu, "gelu": F.gelu, "none": lambda u: u}


def _tensors(seed=0, grad=True, shape=(2, 3, 6, 5), c_out=4, stride=1):
    torch.manual_seed(seed)
    x = torch.randn(*shape, **F64)
    w = torch.randn(c_out, shape[1], 3, 3, **F64)
    b = torch.randn(c_out, **F64)
    gamma, beta = torch.rand(c_out, **F64) + 0.5, torch.randn(c_out, **F64)
    oh, ow = (shape[2] - 1) // stride + 1, (shape[3] - 1) // stride + 1
    r = torch.randn(shape[0], c_out, oh, ow, **F64)
    leaves = [t.requires_grad_(grad) for t in (x, w, b, gamma, beta, r)]
    return leaves, (torch.randn(c_out, **F64), torch.rand(c_out, **F64) + 0.5)


def _stock(x, w, b, gamma, beta, r, running, training, act, at, stride=1):
    u = F.batch_norm(F.conv2d(x, w, b, stride, 1), *running, gamma, beta, training, 0.1, 1e-5)
    if at == "before_act":
        u = u + r
    u = ACTS[act](u)
    return u + r if at == "after_act" else u


def _ours(x, w, b, gamma, beta, r, running, training, act, at, stride=1):
    return conv_bn_block(x, w, b, *running, gamma, beta, None, training, 0.1, 1e-5, stride, 1, 1, act, (),
                         residual=r, residual_at=at)


@pytest.mark.parametrize("at", ["before_act", "after_act"])
@pytest.mark.parametrize("act", sorted(ACTS))
@pytest.mark.parametrize("mode", ["train", "eval-grad", "inference"])
def test_matches_stock(path, mode, act, at):
    training, grad = mode == "train", mode != "inference"
    leaves, running = _tensors(grad=grad, stride=2 if act == "gelu" else 1)
    stride = 2 if act == "gelu" else 1  # ResNet's first block of a stage: stride 2
    check_block_against_stock(lambda r: _ours(*leaves, r, training, act, at, stride),
                              lambda r: _stock(*leaves, r, training, act, at, stride), leaves, running, grad)


def test_no_extra_launch():
    """The residual rides in passes that run anyway: training 3 forward launches and 4 backward ones (the
    residual's gradient written in the dL/dz pass; the weight gradient in one split, so no sum), inference 1."""
    leaves, running = _tensors()
    triton_support.launch_counts.clear()
    out = _ours(*leaves, running, True, "relu", "before_act")
    assert sum(triton_support.launch_counts.values()) == 3
    triton_support.launch_counts.clear()
    out.sum().backward()
    assert dict(triton_support.launch_counts) == {
        "bn_act_bwd_reduce_kernel": 1, "grad_z_kernel": 1, "conv_bwd_input_kernel": 1, "conv_bwd_weight_kernel": 1}
    triton_support.launch_counts.clear()
    with torch.no_grad():
        _ours(*[t.detach() for t in leaves], running, False, "relu", "before_act")
    assert dict(triton_support.launch_counts) == {"conv_fwd_kernel": 1}


@pytest.mark.parametrize("layouts", [("channels_last", "contiguous"), ("contiguous", "channels_last"),
                                     ("channels_last", "channels_last")])
@pytest.mark.parametrize("training", [True, False])
def test_layouts(layouts, training):
    """Input and residual in different memory formats: the epilogue reads the residual in the output's layout."""
    (x, w, b, gamma, beta, r), running = _tensors()
    fmt = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}
    with torch.no_grad():
        x = x.contiguous(memory_format=fmt[layouts[0]]).requires_grad_()
        r = r.contiguous(memory_format=fmt[layouts[1]]).requires_grad_()
    leaves = [x, w, b, gamma, beta, r]
    ours = _ours(*leaves, [t.clone() for t in running], training, "relu", "before_act")
    stock = _stock(*leaves, running, training, "relu", "before_act")
    assert_outputs_and_grads_close(ours, stock, leaves)


@pytest.mark.parametrize("residual", ["broadcast", "float32", "scalar-like"])
def test_residual_the_epilogue_does_not_take(residual):
    """A residual of another shape or dtype is added as torch's add does (broadcast, promoted), unfused."""
    (x, w, b, gamma, beta, r), running = _tensors()
    r = {"broadcast": torch.randn(1, 4, 1, 1, **F64), "float32": torch.randn(2, 4, 6, 5),
         "scalar-like": torch.tensor(0.5, **F64)}[residual].requires_grad_()
    leaves = [x, w, b, gamma, beta, r]
    ours = DF.conv_bn_act2d(x, w, b, *[t.clone() for t in running], gamma, beta, True, padding=1, residual=r)
    stock = _stock(*leaves, running, True, "relu", "before_act")
    assert ours.dtype == stock.dtype and ours.shape == stock.shape
    assert_outputs_and_grads_close(ours, stock, leaves)


def test_functional_and_bad_arguments():
    (x, w, b, gamma, beta, r), running = _tensors(grad=False)
    ours = DF.conv_bn_act2d(x, w, b, *running, gamma, beta, False, padding=1, activation="gelu", residual=r)
    assert_close(ours, _stock(x, w, b, gamma, beta, r, running, False, "gelu", "before_act"))
    with pytest.raises(ValueError, match="residual_at must be"):
        conv_bn_block(x, w, b, *running, gamma, beta, None, False, 0.1, 1e-5, 1, 1, 1, "relu", (), residual=r,
                      residual_at="middle")
    with pytest.raises(ValueError, match="residual and a fused max pool"):
        conv_bn_block(x, w, b, *running, gamma, beta, None, True, 0.1, 1e-5, 1, 1, 1, "relu", (),
                      pool=((2, 2), (2, 2), (0, 0), False), residual=r)
    with pytest.raises(RuntimeError, match="the residual must have the block output's shape"):
        torch.ops.dlkern.conv_bn_infer2d(x, w, b, *running, gamma, beta, r[:, :2], 1e-5, [1, 1], [1, 1, 1, 1],
                                         [1, 1], "relu", 0.0, 0.0, "before_act", [], False)


def test_double_backward_is_a_clear_error():
    leaves, running = _tensors()
    out = _ours(*leaves, running, True, "relu", "before_act")
    (gr,) = torch.autograd.grad(out.sum(), leaves[-1], create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gr.sum().backward()


@pytest.mark.parametrize("training", [True, False])
def test_autocast_bfloat16(training):
    """Under autocast the conv runs in bf16 and so do its output and the residual (a bf16 activation from the
    block before): against the stock ops under the same autocast, at bf16's tolerance."""
    (x, w, b, gamma, beta, _), running = _tensors(grad=False)
    r = torch.randn(2, 4, 6, 5, dtype=torch.bfloat16)
    x32, w32, b32, g32, be32 = (t.float() for t in (x, w, b, gamma, beta))
    running32 = [t.float() for t in running]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = conv_bn_block(x32, w32, b32, *[t.clone() for t in running32], g32, be32, None, training, 0.1, 1e-5,
                             1, 1, 1, "relu", (), residual=r)
        stock = F.relu(F.batch_norm(F.conv2d(x32, w32, b32, 1, 1), *running32, g32, be32, training, 0.1, 1e-5) + r)
    assert ours.dtype == stock.dtype == torch.bfloat16
    assert_close(ours, stock.float(), dtype=torch.bfloat16)


@pytest.mark.parametrize("training", [True, False])
def test_torch_compile_fullgraph(training):
    """torch.compile(fullgraph=True) of the block with a residual: the same values and gradients, the fused
    kernels running inside the compiled graph."""
    leaves, running = _tensors()

    def block(x, w, b, gamma, beta, r, rm, rv):
        return conv_bn_block(x, w, b, rm, rv, gamma, beta, None, training, 0.1, 1e-5, 1, 1, 1, "relu", (),
                             residual=r)

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    triton_support.launch_counts.clear()
    ours = compiled(*leaves, *[t.clone() for t in running])
    assert triton_support.launch_counts["conv_fwd_kernel"] == 1
    stock = _stock(*leaves, running, training, "relu", "before_act")
    assert_outputs_and_grads_close(ours, stock, leaves)
