"""dlkern.models.MnistCNN: the dlkern backend against the torch backend from the same weights, and checkpoints in
the seed script's layout. Batches of 2: on CPU the fused blocks run in Triton's interpreter (~1 s a step)."""

import copy

import pytest
import torch
from torch import nn

import dlkern
from dlkern.models import MnistCNN
from dlkern.ops import triton_support
from helpers import DEVICES, assert_close

SEED_KEYS = [f"mymodel.{i}.{p}" for c, b in ((0, 1), (4, 5), (8, 9)) for i, ps in (
    (c, ("weight", "bias")), (b, ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")))
    for p in ps] + [f"filter.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")]


class SeedModel(nn.Module):
    """The seed script's Mymodel, verbatim but for its forward, which called the missing self.classifier."""

    def __init__(self, in_channels, classnumber):
        super().__init__()
        self.mymodel = nn.Sequential(
            nn.Conv2d(in_channels=in_channels, out_channels=32, kernel_size=3, padding=1),
            nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2, 2),
            nn.Conv2d(in_channels=32, out_channels=32, kernel_size=3), nn.BatchNorm2d(32), nn.ReLU(),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(in_channels=32, out_channels=32, kernel_size=3), nn.BatchNorm2d(32), nn.ReLU(),
            nn.MaxPool2d(2, 2),
        )
        self.filter = nn.Sequential(nn.Linear(32 * 2 * 2, 64), nn.ReLU(), nn.Linear(64, classnumber))

    def forward(self, inputs):
        return self.filter(self.mymodel(inputs).view(-1, 32 * 2 * 2))


def pair(dtype=torch.float32, seed=0):
    """(dlkern, torch) MnistCNNs with equal weights and non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    ours = MnistCNN(backend="dlkern")
    torch.manual_seed(seed)
    ref = MnistCNN(backend="torch")
    with torch.no_grad():  # running statistics away from (0, 1), so eval mode really uses them
        for name, buf in ref.named_buffers():
            if name.endswith("running_mean"):
                buf.uniform_(-0.2, 0.2)
            elif name.endswith("running_var"):
                buf.uniform_(0.5, 2.0)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours.to(dtype), ref.to(dtype)


def assert_tensor_close(name, actual, expected):
    """float64: float64's tolerance. float32: the fused kernels sum in another order than ATen's, and training
    BatchNorm's backward cancels (n*g - sum(g) - x_hat*sum(g*x_hat)), so each tensor is held to 1e-4 of its own
    largest value (conv biases before BatchNorm have true gradient 0: dlkern's is exactly 0, ATen's ~1e-7)."""
    if actual.dtype == torch.float64:
        assert_close(actual, expected, msg=lambda m: f"{name}: {m}")
    else:
        scale = max(expected.abs().max().item(), 1.0)
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-4 * scale, msg=lambda m: f"{name}: {m}")


def test_construction():
    torch.manual_seed(0)
    ours = MnistCNN()
    torch.manual_seed(0)
    ref = MnistCNN(backend="torch")
    assert list(ours.state_dict()) == list(ref.state_dict()) == SEED_KEYS
    for (name, a), b in zip(ours.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), name  # building draws the same random numbers
    assert [type(m) for m in ours.mymodel] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d] * 3  # as built
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert type(ours.filter[1]) is dlkern.nn.ReLU and type(ref.filter[1]) is nn.ReLU
    assert not any(type(m).__module__.startswith("dlkern") for m in ref.children() for m in m.modules())
    assert MnistCNN(3, 7, backend="torch")(torch.randn(2, 3, 28, 28)).shape == (2, 7)
    with pytest.raises(ValueError, match="backend"):
        MnistCNN(backend="cudnn")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_outputs_and_gradients_match(dtype, training):
    ours, ref = pair(dtype)
    ours.train(training), ref.train(training)
    x = torch.randn(2, 1, 28, 28, dtype=dtype)
    # The input asks for a gradient too, so input gradients are compared (test_eval_weight_gradients_only below
    # covers an input without one).
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ours, out_ref = ours(x_ours), ref(x_ref)
    assert_tensor_close("output", out_ours, out_ref)
    g = torch.randn_like(out_ref)
    out_ours.backward(g)
    out_ref.backward(g)
    assert_tensor_close("input grad", x_ours.grad, x_ref.grad)
    # Parameters come in the same order, with the same names.
    for (name, expected), p in zip(ref.named_parameters(), ours.parameters(), strict=True):
        assert_tensor_close(name, p.grad, expected.grad)
    for (name, a), b in zip(ours.state_dict().items(), ref.state_dict().values()):  # running statistics
        assert_tensor_close(name, a, b) if a.is_floating_point() else torch.testing.assert_close(a, b)


def test_eval_weight_gradients_only():
    """Eval mode, an input that needs no gradient (fine-tuning with frozen BatchNorm statistics, say)."""
    ours, ref = pair()
    ours.eval(), ref.eval()
    x = torch.randn(2, 1, 28, 28)
    ours(x).sum().backward()
    ref(x).sum().backward()
    for (name, expected), p in zip(ref.named_parameters(), ours.parameters(), strict=True):
        assert_tensor_close(name, p.grad, expected.grad)


def test_adam_steps_match():
    ours, ref = pair(torch.float64, seed=1)
    opt_ours = torch.optim.Adam(ours.parameters(), lr=1e-3)
    opt_ref = torch.optim.Adam(ref.parameters(), lr=1e-3)
    torch.manual_seed(2)
    for _ in range(3):
        x, y = torch.randn(2, 1, 28, 28, dtype=torch.float64), torch.randint(0, 10, (2,))
        losses = []
        for model, opt in ((ours, opt_ours), (ref, opt_ref)):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        assert_close(*losses)
    for (name, a), b in zip(ours.state_dict().items(), ref.state_dict().values()):
        # A conv bias before BatchNorm has true gradient 0: dlkern's is exactly 0, ATen's ~1e-16 of rounding,
        # which Adam (eps 1e-8) turns into steps of ~1e-11 -- and the bias goes into BatchNorm's running mean.
        conv_bias = name in ("mymodel.0.bias", "mymodel.4.bias", "mymodel.8.bias")
        tol = dict(atol=1e-9) if conv_bias or name.endswith("running_mean") else {}
        assert_close(a, b, msg=lambda m, name=name: f"{name}: {m}", **tol) if a.is_floating_point() else \
            torch.testing.assert_close(a, b)
    # The optimizers hold their parameters in the same order: their state_dicts cross as well.
    opt_ref.load_state_dict(opt_ours.state_dict())


def test_seed_checkpoint_loads(tmp_path):
    torch.manual_seed(3)
    seed = SeedModel(in_channels=1, classnumber=10)
    x = torch.randn(64, 1, 28, 28)
    seed(x)  # one training forward: non-trivial running statistics
    seed.eval()
    path = tmp_path / "model.pth"
    torch.save(seed.state_dict(), path)
    x = x[:2]
    expected = seed(x)
    for backend in ("torch", "dlkern"):
        model = MnistCNN(backend=backend)
        model.load_state_dict(torch.load(path, weights_only=True), strict=True)
        with torch.no_grad():
            assert_tensor_close(backend, model.eval()(x), expected)
        assert list(model.state_dict()) == list(seed.state_dict())
        seed.load_state_dict(model.state_dict(), strict=True)  # and back


def test_channels_last_eval():
    ours, ref = pair()
    ours.eval(), ref.eval()
    x = torch.randn(2, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert_tensor_close("output", ours.to(memory_format=torch.channels_last)(x), ref(x))


def assert_error_like_pytorchs(name, actual, same_dtype_torch, reference, dtype):
    """Under autocast both models round to `dtype` at different points (dlkern once after the fused BatchNorm,
    PyTorch after the conv and again after BatchNorm), so neither is "right": each is compared with the float64
    model, and dlkern's error may be at most 4x PyTorch's own under the same autocast, plus one rounding of the
    tensor's largest value in `dtype` (PyTorch's error can happen to be ~0, e.g. the last bias's gradient).
    Triton's interpreter rounds float32 -> bfloat16 by truncation (twice the error, all of one sign, so sums
    drift): there bfloat16 gets 8x (fp16, rounded to nearest there, keeps 4x; seen up to 5x for bf16)."""
    reference = reference.double()
    ours = (actual.double() - reference).abs().max().item()
    theirs = (same_dtype_torch.double() - reference).abs().max().item()
    floor = torch.finfo(dtype).eps * reference.abs().max().item()
    factor = 8 if dtype == torch.bfloat16 and triton_support.INTERPRETING else 4
    assert ours <= factor * theirs + floor, f"{name}: error {ours:.3g}, PyTorch's under autocast {theirs:.3g}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_autocast_matches_torch(dtype, training):
    """The whole MnistCNN under torch.autocast (CPU autocast here; the second block gets a 16-bit input from the
    first): output, every gradient and the running statistics, against stock PyTorch under the same autocast."""
    ours, ref = pair()
    ref64 = copy.deepcopy(ref).double()
    for model in (ours, ref, ref64):
        model.train(training)
    x = torch.randn(2, 1, 28, 28)
    with torch.autocast("cpu", dtype=dtype):
        out, out_ref = ours(x), ref(x)
    out64 = ref64(x.double())
    assert out.dtype == out_ref.dtype == dtype
    assert_error_like_pytorchs("output", out, out_ref, out64, dtype)
    g = torch.randn(out64.shape)
    out.float().backward(g)
    out_ref.float().backward(g)
    out64.backward(g.double())
    for (name, p), q, r in zip(ours.named_parameters(), ref.parameters(), ref64.parameters(), strict=True):
        assert_error_like_pytorchs(name, p.grad, q.grad, r.grad, dtype)
    for (name, a), b, c in zip(ours.state_dict().items(), ref.state_dict().values(), ref64.state_dict().values()):
        assert a.dtype == b.dtype, name  # float32 running statistics, as PyTorch's
        if a.is_floating_point():
            assert_error_like_pytorchs(name, a, b, c, dtype)
        else:
            assert torch.equal(a, b), name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_torch_compile_fullgraph(mode, device):
    """The dlkern MnistCNN under torch.compile(fullgraph=True) -- a graph break raises -- in the default mode and in
    reduce-overhead: the eval forward and a training step (forward, backward, Adam) equal the eager model's,
    running statistics included, and the compiled step launches dlkern's kernels as the eager one does. On CUDA,
    reduce-overhead must really take CUDA graphs (no cudagraph skip); for CPU tensors Inductor skips them, but
    Dynamo still traces the whole model as it would for CUDA."""
    torch._dynamo.reset()  # each mode traces afresh
    torch._dynamo.utils.counters.clear()
    eager = pair()[0].to(device)
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, mode=mode, fullgraph=True)
    torch.manual_seed(4)
    x, y = torch.randn(2, 1, 28, 28, device=device), torch.randint(0, 10, (2,), device=device)
    with torch.no_grad():
        assert_tensor_close("eval output", compiled.eval()(x), eager.eval()(x))
    launched = []
    for m, call in ((eager, eager), (model, compiled)):
        optimizer = torch.optim.Adam(m.parameters(), lr=1e-3)
        call.train()
        triton_support.launch_counts.clear()
        torch.compiler.cudagraph_mark_step_begin()  # reduce-overhead's step boundary (a no-op on CPU)
        nn.functional.cross_entropy(call(x), y).backward()
        optimizer.step()
        launched.append(dict(triton_support.launch_counts))
    assert launched[1] == launched[0] and launched[0]  # the compiled step runs dlkern's kernels, as eager does
    for (name, a), b in zip(model.state_dict().items(), eager.state_dict().values()):
        assert_tensor_close(name, a, b) if a.is_floating_point() else torch.testing.assert_close(a, b)
    if device == "cuda" and mode == "reduce-overhead":
        assert torch._dynamo.utils.counters["inductor"]["cudagraph_skips"] == 0
