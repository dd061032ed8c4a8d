"""The fused inference-mode BatchNorm + ReLU: values and gradients against the reference (exactly, every
dtype and layout), against ATen's relu(batch_norm(x)) and an independent numpy formula, weight/bias
gradients only when the backward pass needs them, gradcheck, opcheck, torch.compile, bad input, and the
pre-activation ResNet built on it."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from robust_ext import batchnorm, reference
from robust_ext.batchnorm import batch_norm_relu, bn_relu
from robust_ext.models import PreActResNet

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
LAYOUTS = ["contiguous", "channels_last", "strided"]
# 4-D planes; 1x1 planes (rows of C); C wider than the kernel's repeated-scale buffer; 2-D; 3-D; 5-D
SHAPES = [(4, 6, 5, 7), (8, 16, 1, 1), (2, 700, 3, 2), (16, 9), (3, 5, 11), (2, 3, 4, 3, 5)]

pytestmark = pytest.mark.needs_extension  # these tests hold its kernel to the reference (conftest.py)


def layout(x, name):
    if name == "channels_last" and x.dim() in (4, 5):
        return x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    if name == "strided":  # every other channel of a wider tensor
        wide = torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:], dtype=x.dtype)
        wide[:, ::2] = x
        return wide[:, ::2]
    return x.contiguous()


def stats(c, seed=1, affine=True):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(c, generator=g)
    var = torch.rand(c, generator=g) * 2 + 0.05
    weight = torch.randn(c, generator=g) if affine else None
    bias = torch.randn(c, generator=g) if affine else None
    return mean, var, weight, bias


def leaf(x):
    """A leaf that requires grad with x's strides."""
    return x.detach().clone().requires_grad_(True) if x.is_contiguous() or x.dim() < 4 or x.is_contiguous(
        memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d) else x.detach().requires_grad_(True)


def assert_identical(a, b):
    """Equal values, NaN where NaN, and the same sign of every zero."""
    assert a.shape == b.shape and a.dtype == b.dtype
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    num = ~a.isnan()
    assert torch.equal(a.signbit()[num], b.signbit()[num])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout_name", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference_exactly(dtype, layout_name, shape):
    """Value and input gradient equal the reference's bit for bit (the same float32 math, one rounding)
    in every dtype and layout, and the output keeps x's strides."""
    g = torch.Generator().manual_seed(0)
    x = layout(torch.randn(shape, generator=g).to(dtype), layout_name)
    grad = torch.randn(shape, generator=g).to(dtype)
    mean, var, weight, bias = stats(shape[1])
    x1, x2 = leaf(x), leaf(x)
    out = batch_norm_relu(x1, mean, var, weight, bias, eps=1e-3)
    ref = reference.batch_norm_relu(x2, mean, var, weight, bias, eps=1e-3)
    assert out.stride() == torch.empty_like(x).stride()
    assert_identical(out, ref)
    assert (out == 0).any() and (out > 0).any()
    out.backward(grad)
    ref.backward(grad)
    assert_identical(x1.grad, x2.grad)


# numel not a multiple of 3 x the plane or row length: each of the 3 threads' ranges starts mid-plane/row
@pytest.mark.parametrize("shape,fmt", [((10, 13, 37, 29), torch.contiguous_format),
                                       ((10, 13, 37, 29), torch.channels_last),
                                       ((4, 700, 7, 5), torch.channels_last), ((778, 111), torch.contiguous_format),
                                       ((2, 3, 5, 61, 67), torch.channels_last_3d)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_many_thread_chunks_match_reference(shape, fmt, dtype):
    """Sizes over several 32768-element chunks with odd C and plane sizes, on 3 threads: chunks start in
    the middle of planes and rows, where the kernel's first segment is partial."""
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        g = torch.Generator().manual_seed(5)
        x = torch.randn(shape, generator=g).to(dtype).contiguous(memory_format=fmt)
        grad = torch.randn(shape, generator=g).to(dtype)
        mean, var, weight, bias = stats(shape[1], seed=6)
        x1, x2 = leaf(x), leaf(x)
        out = batch_norm_relu(x1, mean, var, weight, bias)
        ref = reference.batch_norm_relu(x2, mean, var, weight, bias)
        assert_identical(out, ref)
        out.backward(grad)
        ref.backward(grad)
        assert_identical(x1.grad, x2.grad)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype,tiny", [(torch.float16, 1e-8), (torch.bfloat16, 1e-45)])
def test_values_that_round_to_zero_take_no_gradient(dtype, tiny):
    """A positive value that rounds to 0 in fp16/bf16 is 0 and takes no gradient, in the kernel, the
    reference and ATen's relu(batch_norm(x)) alike."""
    x = torch.zeros(1, 1, 2, dtype=dtype)
    args = (torch.zeros(1), torch.ones(1), torch.ones(1), torch.tensor([tiny]))
    grads = []
    for fn in (batch_norm_relu, reference.batch_norm_relu,
               lambda t, m, v, w, b, eps: F.relu(F.batch_norm(t, m, v, w, b, training=False, eps=eps))):
        xl = x.clone().requires_grad_(True)
        out = fn(xl, *args, eps=0.0)
        out.sum().backward()
        assert out.tolist() == [[[0.0, 0.0]]]
        grads.append(xl.grad.tolist())
    assert grads == [[[[0.0, 0.0]]]] * 3


@pytest.mark.parametrize("with_weight,with_bias", [(False, True), (True, False), (False, False)])
def test_gradients_without_weight_or_bias(with_weight, with_bias):
    """Absent weight or bias: the other parameter and x still get their gradients (gradcheck)."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 4, dtype=torch.float64, generator=g)
    x = (x + 0.3 * x.sign()).requires_grad_(True)
    mean, var, weight, bias = (t.double() for t in stats(3, seed=8))
    w = weight.requires_grad_(True) if with_weight else None
    b = bias.requires_grad_(True) if with_bias else None
    params = [t for t in (w, b) if t is not None]
    fn = lambda a, *p: batch_norm_relu(  # noqa: E731
        a, mean, var, p[0] if with_weight else None, p[-1] if with_bias else None)
    assert torch.autograd.gradcheck(fn, (x, *params))
    out = batch_norm_relu(x, mean, var, w, b)
    out.sum().backward()
    want = F.relu(F.batch_norm(x, mean, var, w, b, training=False))
    for t in params:
        ref_grad = torch.autograd.grad(want.sum(), t, retain_graph=True)[0]
        torch.testing.assert_close(t.grad, ref_grad)


@pytest.mark.parametrize("affine", [True, False])
def test_matches_aten_and_numpy(affine):
    """float32 against ATen's relu(batch_norm(x)) (to rounding) and float64 against a numpy formula."""
    x = torch.randn(6, 5, 4, 3)
    mean, var, weight, bias = stats(5, affine=affine)
    out = batch_norm_relu(x, mean, var, weight, bias, eps=1e-5)
    aten = F.relu(F.batch_norm(x, mean, var, weight, bias, training=False, eps=1e-5))
    torch.testing.assert_close(out, aten, rtol=2e-7, atol=1e-6)
    xd = x.double().numpy()
    w = weight.double().numpy() if affine else np.ones(5)
    b = bias.double().numpy() if affine else np.zeros(5)
    want = np.maximum((xd - mean.double().numpy()[None, :, None, None])
                      / np.sqrt(var.double().numpy()[None, :, None, None] + 1e-5)
                      * w[None, :, None, None] + b[None, :, None, None], 0)
    got = batch_norm_relu(x.double(), mean.double(), var.double(), weight.double() if affine else None,
                          bias.double() if affine else None, eps=1e-5)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)


def test_special_values():
    """NaN propagates and passes its gradient (as ATen's ReLU backward); +-inf saturate; a zero output
    takes no gradient."""
    x = torch.tensor([[float("nan"), float("inf"), float("-inf"), -1.0, 2.0, 0.0]]).view(1, 1, 6)
    mean, var = torch.zeros(1), torch.ones(1)
    xl = x.clone().requires_grad_(True)
    out = batch_norm_relu(xl, mean, var, eps=0.0)
    assert torch.isnan(out[0, 0, 0]) and out[0, 0, 1] == float("inf")
    assert out[0, 0, 2:].tolist() == [0.0, 0.0, 2.0, 0.0]
    out.backward(torch.full_like(out, 3.0))
    assert xl.grad.view(-1).tolist() == [3.0, 3.0, 0.0, 0.0, 3.0, 0.0]


def test_parameter_gradients_match_aten():
    """loss.backward() in eval mode gives weight and bias the gradients ATen's BatchNorm gives them."""
    torch.manual_seed(0)
    ours, theirs = nn.BatchNorm2d(7), nn.BatchNorm2d(7)
    with torch.no_grad():
        for bn in (ours, theirs):
            bn.weight.copy_(torch.linspace(-1, 2, 7))
            bn.bias.copy_(torch.linspace(0.5, -0.5, 7))
            bn.running_mean.copy_(torch.linspace(-0.3, 0.3, 7))
            bn.running_var.copy_(torch.linspace(0.5, 2.0, 7))
    ours.eval(), theirs.eval()
    x = torch.randn(5, 7, 6, 4)
    g = torch.randn(5, 7, 6, 4)
    xo, xt = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    bn_relu(ours, xo).backward(g)
    F.relu(theirs(xt)).backward(g)
    torch.testing.assert_close(xo.grad, xt.grad)
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.bias.grad, theirs.bias.grad, rtol=1e-5, atol=1e-5)


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_input_gradient_alone_skips_parameter_reductions():
    """autograd.grad(loss, x) -- what an attack asks -- computes no weight/bias reduction although the
    parameters require grad, and leaves their .grad untouched; loss.backward() computes them."""
    bn = nn.BatchNorm2d(4).eval()
    x = torch.randn(3, 4, 5, 5, requires_grad=True)
    loss = bn_relu(bn, x).square().sum()
    with _OpLog() as log:
        (gx,) = torch.autograd.grad(loss, x, retain_graph=True)
    assert any("batch_norm_relu_backward" in op for op in log.ops)
    assert not any("aten.sum" in op for op in log.ops), log.ops
    assert bn.weight.grad is None and bn.bias.grad is None
    with _OpLog() as log:
        loss.backward()
    assert any("aten.sum" in op for op in log.ops)
    assert bn.weight.grad is not None and bn.bias.grad is not None
    torch.testing.assert_close(x.grad, gx)


def test_gradcheck_and_gradgradcheck():
    """float64 numerical against analytical gradients for x, weight and bias, first and second order."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 2, 3, dtype=torch.float64, generator=g)
    x = x + 0.2 * x.sign()  # keep away from the ReLU kink
    mean, var, weight, bias = (t.double() for t in stats(3))
    x.requires_grad_(True), weight.requires_grad_(True), bias.requires_grad_(True)
    fn = lambda a, w, b: batch_norm_relu(a, mean, var, w, b, eps=1e-5)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, weight, bias))
    assert torch.autograd.gradgradcheck(fn, (x, weight, bias))


@pytest.mark.parametrize("shape,fmt", [((3, 4, 5, 2), torch.contiguous_format), ((3, 4, 5, 2), torch.channels_last),
                                       ((2, 1, 3, 3), torch.channels_last), ((2, 5, 1, 1), torch.channels_last),
                                       ((4, 6), torch.contiguous_format), ((0, 3, 2, 2), torch.contiguous_format)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(shape, fmt, dtype):
    x = torch.randn(shape).to(dtype).contiguous(memory_format=fmt).requires_grad_(True)
    mean, var, weight, bias = stats(shape[1])
    weight.requires_grad_(True)
    torch.library.opcheck(torch.ops.robust_ext.batch_norm_relu.default, (x, weight, bias, mean, var, 1e-5))
    out = torch.ops.robust_ext.batch_norm_relu.default(x.detach(), weight.detach(), bias, mean, var, 1e-5)
    torch.library.opcheck(torch.ops.robust_ext.batch_norm_relu_backward.default,
                          (torch.randn(shape).to(dtype), out, weight.detach(), var, 1e-5))


def test_layer_falls_back_to_aten_where_it_must():
    """Training mode (batch statistics, running stats updated as nn.BatchNorm2d does), no running stats,
    forward hooks: exactly ATen's result; eval mode: the fused op."""
    torch.manual_seed(0)
    bn, twin = nn.BatchNorm2d(3), nn.BatchNorm2d(3)
    x = torch.randn(4, 3, 5, 5)
    assert torch.equal(bn_relu(bn, x), F.relu(twin(x)))
    assert torch.equal(bn.running_mean, twin.running_mean) and torch.equal(bn.running_var, twin.running_var)
    bn.eval(), twin.eval()
    with _OpLog() as log:
        bn_relu(bn, x)
    assert any("robust_ext.batch_norm_relu" in op for op in log.ops)
    seen = []
    bn.register_forward_hook(lambda m, i, o: seen.append(o))
    assert torch.equal(bn_relu(bn, x), F.relu(twin(x))) and len(seen) == 1
    bwd = nn.BatchNorm2d(3).eval()
    calls = []
    bwd.register_full_backward_hook(lambda m, gi, go: calls.append(1))
    xl = x.clone().requires_grad_(True)
    bn_relu(bwd, xl).sum().backward()
    assert calls == [1]

    class Doubled(nn.BatchNorm2d):
        def forward(self, t):
            return 2 * super().forward(t)

    doubled = Doubled(3).eval()
    assert torch.equal(bn_relu(doubled, x), F.relu(2 * nn.BatchNorm2d(3).eval()(x)))
    handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: seen.append(type(m).__name__))
    try:
        plain = nn.BatchNorm2d(3).eval()
        bn_relu(plain, x)
    finally:
        handle.remove()
    assert seen[-1] == "BatchNorm2d"
    stateless = nn.BatchNorm2d(3, track_running_stats=False).eval()
    assert torch.equal(bn_relu(stateless, x), F.relu(F.batch_norm(x, None, None, stateless.weight, stateless.bias,
                                                                  training=True)))


def test_func_transforms_take_aten():
    bn = nn.BatchNorm2d(3).eval()
    x = torch.randn(2, 3, 4, 4)
    got = torch.func.grad(lambda t: bn_relu(bn, t).square().sum())(x)
    want = torch.func.grad(lambda t: F.relu(bn(t)).square().sum())(x)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("bad,match", [
    (lambda m, v, w, b: batch_norm_relu(torch.randn(4), m, v, w, b), "x must be an \\(N, C, ...\\) tensor"),
    (lambda m, v, w, b: batch_norm_relu(torch.ones(2, 3, 2, dtype=torch.int64), m, v, w, b), "x must be float32"),
    (lambda m, v, w, b: batch_norm_relu(torch.randn(2, 4, 2), m, v, w, b), "running_mean must be a 1-D tensor"),
    (lambda m, v, w, b: batch_norm_relu(torch.randn(2, 3, 2), m, v[:2], w, b), "running_var must be a 1-D tensor"),
    (lambda m, v, w, b: batch_norm_relu(torch.randn(2, 3, 2), m, v, w.long(), b), "weight must be a float tensor"),
    (lambda m, v, w, b: batch_norm_relu(torch.randn(2, 3, 2), m, v, w, b.to("meta")), "bias must be on the same device"),
    (lambda m, v, w, b: batch_norm_relu(torch.randn(2, 3, 2), m, v, w, b, eps=-1.0), "eps must be a finite number"),
    (lambda m, v, w, b: torch.ops.robust_ext.batch_norm_relu(torch.randn(2, 3, 2), w, b, m[:1], v, 1e-5),
     "running_mean must be a 1-D tensor with one value per channel"),
    (lambda m, v, w, b: torch.ops.robust_ext.batch_norm_relu(torch.randn(2, 3, 2), w, b, m, v, float("nan")),
     "eps must be finite"),
    (lambda m, v, w, b: torch.ops.robust_ext.batch_norm_relu_backward(torch.randn(2, 3, 3), torch.randn(2, 3, 2), w,
                                                                      v, 1e-5), "grad_out must have the shape"),
    (lambda m, v, w, b: torch.ops.robust_ext.batch_norm_relu_backward(torch.randn(2, 3, 2).double(),
                                                                      torch.randn(2, 3, 2), w, v, 1e-5),
     "grad_out must have out's dtype"),
])
def test_bad_input(bad, match):
    mean, var, weight, bias = stats(3)
    with pytest.raises((TypeError, ValueError, RuntimeError), match=match):
        bad(mean, var, weight, bias)


def _unfused_forward(model, x):
    """PreActResNet's forward written with ATen's F.relu(bn(x)), as before the fused layer."""
    def block(b, t):
        out = F.relu(b.bn1(t))
        shortcut = t if b.shortcut is None else b.shortcut(out)
        return b.conv2(F.relu(b.bn2(b.conv1(out)))) + shortcut
    out = model.stem(x)
    for b in model.layers:
        out = block(b, out)
    out = F.relu(model.bn(out))
    return model.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


def _trained_stats_resnet():
    torch.manual_seed(0)
    model = PreActResNet()
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.rand(16, 3, 32, 32))
    return model.eval()


@pytest.mark.parametrize("channels_last", [False, True])
def test_preact_resnet_equals_unfused_model(channels_last):
    """The ResNet's eval-mode logits and input gradients equal the ATen-written network's (float32, to
    rounding); under bf16 autocast the gradient signs agree on nearly every pixel."""
    model = _trained_stats_resnet()
    x = torch.rand(8, 3, 32, 32)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.arange(8) % 10
    grads = []
    for fwd in (model, lambda t: _unfused_forward(model, t)):
        xl = x.clone().requires_grad_(True)
        logits = fwd(xl)
        grads.append((logits.detach(), torch.autograd.grad(F.cross_entropy(logits, y), xl)[0]))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-3, atol=1e-7)
    assert set(model.state_dict()) == set(PreActResNet().state_dict())
    signs = []
    for fwd in (model, lambda t: _unfused_forward(model, t)):
        xl = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = fwd(xl)
        signs.append(torch.autograd.grad(F.cross_entropy(logits.float(), y), xl)[0].sign())
    assert (signs[0] == signs[1]).float().mean() > 0.97


def test_torch_compile_fullgraph():
    model = _trained_stats_resnet()
    x = torch.rand(4, 3, 32, 32)
    y = torch.arange(4)

    def input_grad(t):
        t = t.clone().requires_grad_(True)
        return torch.autograd.grad(F.cross_entropy(model(t), y), t)[0]

    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)
    xl = x.clone().requires_grad_(True)
    gc = torch.autograd.grad(F.cross_entropy(compiled(xl), y), xl)[0]
    torch.testing.assert_close(gc, input_grad(x), rtol=1e-3, atol=1e-6)


def test_uses_fused_kernel_only_with_extension(monkeypatch):
    """Without the CPU kernel (reference backend) the function and the layer give the same result."""
    bn = nn.BatchNorm2d(3).eval()
    bn.running_var.fill_(0.5)
    x = torch.randn(2, 3, 4, 4)
    fused = bn_relu(bn, x)
    monkeypatch.setattr(batchnorm, "_HAS_CPU_KERNEL", False)
    with _OpLog() as log:
        plain = bn_relu(bn, x)
    assert not any("robust_ext" in op for op in log.ops)
    torch.testing.assert_close(fused, plain)


def test_raw_ops_are_differentiable_after_import_robust_ext():
    """`import robust_ext` alone registers both fused ops' autograd: torch.ops calls backprop."""
    code = (
        "import torch, robust_ext\n"
        "x = torch.randn(2, 3, 4, 4, requires_grad=True)\n"
        "y = torch.ops.robust_ext.batch_norm_relu(x, None, None, torch.zeros(3), torch.ones(3), 0.0)\n"
        "y.sum().backward()\n"
        "assert torch.equal(x.grad, (x > 0).float())\n"
        "x.grad = None\n"
        "out, code = torch.ops.robust_ext.relu_max_pool2d(x)\n"
        "out.sum().backward()\n"
        "assert x.grad.sum() == (out > 0).sum()\n"
        "print('ok')\n")
    import subprocess
    import sys
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]

