"""The fused ReLU + 2x2 max-pool layer: values and gradients against ATen's relu-then-max_pool2d (the
reference) and against an independent per-window loop, every dtype and layout, special values, odd and
wide shapes, opcheck, torch.compile, bad input, and the small CNN built on it."""
import itertools

import numpy as np
import pytest
import torch
from torch import nn

from robust_ext import reference
from robust_ext.models import SmallCNN
from robust_ext.pooling import ReLUMaxPool2d, relu_max_pool2d

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
LAYOUTS = ["nchw", "channels_last", "strided"]
# even; odd H and W (floor mode); 2x2; one output per plane; a row wider than one NCHW tile (OW > 1024)
# and a channels_last row wider than one buffer (C > 2048)
SHAPES = [(4, 8, 12, 10), (3, 5, 7, 9), (2, 3, 2, 2), (2, 6, 3, 3), (1, 2, 4, 2100), (1, 2100, 2, 4)]

pytestmark = pytest.mark.needs_extension  # these tests hold its kernel to the reference (conftest.py)


def layout(x, name):
    if name == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if name == "strided":  # every other channel of a wider tensor
        wide = torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:], dtype=x.dtype)
        wide[:, ::2] = x
        return wide[:, ::2]
    return x.contiguous()


def special_values(shape, dtype, seed=0):
    """Random values on a coarse grid (many ties), with NaN, +-inf, +-0 and all-negative windows."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-3, 4, shape, generator=g).to(dtype) / 2
    flat = x.view(-1)
    n = flat.numel()
    idx = torch.randperm(n, generator=g)
    flat[idx[: n // 40]] = float("nan")
    flat[idx[n // 40: n // 20]] = float("inf")
    flat[idx[n // 20: n // 13]] = float("-inf")
    flat[idx[n // 13: n // 8]] = -0.0
    return x


def run(fn, x, grad):
    leaf = x.detach().clone().requires_grad_(True) if x.is_contiguous() or x.is_contiguous(
        memory_format=torch.channels_last) else x.detach().requires_grad_(True)
    out = fn(leaf)
    out.backward(grad)
    return out.detach(), leaf.grad


def assert_identical(a, b):
    assert a.shape == b.shape and a.dtype == b.dtype
    assert torch.equal(a.isnan(), b.isnan())
    assert torch.equal(torch.nan_to_num(a, nan=0.0), torch.nan_to_num(b, nan=0.0))


@pytest.mark.parametrize("dtype,layout_name,shape", list(itertools.product(DTYPES, LAYOUTS, SHAPES)))
def test_matches_reference_exactly(dtype, layout_name, shape):
    x = layout(special_values(shape, dtype), layout_name)
    grad = torch.randn(shape[0], shape[1], shape[2] // 2, shape[3] // 2).to(dtype)
    out, gx = run(relu_max_pool2d, x, grad)
    ref_out, ref_gx = run(reference.relu_max_pool2d, x, grad)
    assert_identical(out, ref_out)
    assert torch.equal(gx, ref_gx)
    if layout_name == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert gx.is_contiguous(memory_format=torch.channels_last)


def per_window(x: np.ndarray, grad: np.ndarray):
    """An independent definition: each 2x2 window's max after ReLU; its gradient to the first maximal
    tap in row-major order when that max is > 0, or to the last NaN tap of a window with a NaN."""
    n, c, h, w = x.shape
    out = np.zeros((n, c, h // 2, w // 2), x.dtype)
    gx = np.zeros_like(x)
    for i, j, a, b in itertools.product(range(n), range(c), range(h // 2), range(w // 2)):
        taps = [x[i, j, 2 * a + dy, 2 * b + dx] for dy in (0, 1) for dx in (0, 1)]
        nans = [t for t, v in enumerate(taps) if np.isnan(v)]
        if nans:
            out[i, j, a, b], winner = np.nan, nans[-1]
        else:
            m = max(taps)
            out[i, j, a, b] = max(m, 0.0)
            winner = taps.index(m) if m > 0 else None
        if winner is not None:
            gx[i, j, 2 * a + winner // 2, 2 * b + winner % 2] = grad[i, j, a, b]
    return out, gx


@pytest.mark.parametrize("layout_name", LAYOUTS)
@pytest.mark.parametrize("shape", [(2, 3, 6, 8), (1, 4, 5, 7)])
def test_matches_independent_loop(layout_name, shape):
    x = layout(special_values(shape, torch.float64, seed=1), layout_name)
    grad = torch.randn(shape[0], shape[1], shape[2] // 2, shape[3] // 2, dtype=torch.float64)
    out, gx = run(relu_max_pool2d, x, grad)
    want_out, want_gx = per_window(x.numpy(), grad.numpy())
    assert_identical(out, torch.from_numpy(want_out))
    assert torch.equal(gx, torch.from_numpy(want_gx))


def test_hand_computed_windows():
    nan = float("nan")
    x = torch.tensor([[[[1.0, 5.0, -1.0, -2.0, nan, 1.0],
                        [5.0, 0.0, -3.0, -0.0, 2.0, nan]]]])
    out, gx = run(relu_max_pool2d, x, torch.tensor([[[[10.0, 20.0, 30.0]]]]))
    assert_identical(out, torch.tensor([[[[5.0, 0.0, nan]]]]))
    # tie 5 = 5: the first tap (row 0) takes it; all <= 0: no gradient; two NaN: the last one
    assert torch.equal(gx, torch.tensor([[[[0.0, 10.0, 0.0, 0.0, 0.0, 0.0],
                                           [0.0, 0.0, 0.0, 0.0, 0.0, 30.0]]]]))


def test_empty_batch_and_module():
    x = torch.randn(0, 3, 6, 6, requires_grad=True)
    out = ReLUMaxPool2d()(x)
    assert out.shape == (0, 3, 3, 3)
    out.sum().backward()
    assert x.grad.shape == x.shape
    assert "kernel_size=2" in repr(ReLUMaxPool2d())


@pytest.mark.parametrize("layout_name", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 3, 6, 5), (1, 3, 2, 2), (3, 2, 3, 2)])  # 1x1 outputs: ambiguous layouts
def test_opcheck(layout_name, dtype, shape):
    x = layout(torch.randn(shape).to(dtype), layout_name)
    torch.library.opcheck(torch.ops.robust_ext.relu_max_pool2d.default, (x.requires_grad_(True),))
    out, code = torch.ops.robust_ext.relu_max_pool2d(x.detach())
    torch.library.opcheck(torch.ops.robust_ext.relu_max_pool2d_backward.default,
                          (torch.randn_like(out), code, *shape[2:], layout_name == "channels_last"))


@pytest.mark.parametrize("bad,match", [
    (torch.randn(3, 4, 4), "4-D"),
    (torch.ones(1, 1, 4, 4, dtype=torch.int64), "float32, float64"),
    (torch.randn(1, 1, 1, 4), "at least 2x2"),
    ([1.0, 2.0], "torch.Tensor"),
])
def test_bad_input(bad, match):
    with pytest.raises((TypeError, ValueError), match=match):
        relu_max_pool2d(bad)


def test_zero_sign_and_nan_bits_are_canonical():
    """The documented bit-level differences from ATen: an all-non-positive window gives +0, a NaN window
    the canonical quiet NaN (numerically the same values)."""
    x = torch.tensor([[[[-0.0, -1.0, float("nan"), 1.0], [-2.0, -0.0, 1.0, 2.0]]]])
    out = relu_max_pool2d(x)
    assert out[0, 0, 0, 0].item() == 0 and not torch.signbit(out[0, 0, 0, 0])
    assert out[0, 0, 0, 1].isnan() and out.view(torch.int32)[0, 0, 0, 1].item() == 0x7FC00000


def test_noncontiguous_and_expanded_grad_out():
    x = torch.randn(2, 3, 6, 8)
    for grad in (torch.ones(1, 1, 1, 1).expand(2, 3, 3, 4), torch.randn(2, 3, 4, 3).transpose(2, 3)):
        out, gx = run(relu_max_pool2d, x, grad)
        ref_out, ref_gx = run(reference.relu_max_pool2d, x, grad)
        assert torch.equal(gx, ref_gx)


def test_func_transforms_and_forward_ad_match_aten():
    """torch.func grad / jvp / vmap and forward-mode AD through the small CNN: the same as the unfused
    network (the layer hands them to ATen's ops)."""
    torch.manual_seed(0)
    model = SmallCNN().eval()
    plain = plain_small_cnn(model).eval()
    x, t = torch.rand(3, 1, 28, 28), torch.randn(3, 1, 28, 28)
    for m in (model, plain):
        m.requires_grad_(False)
    g = [torch.func.grad(lambda z, m=m: m(z).square().sum())(x) for m in (model, plain)]
    assert torch.equal(g[0], g[1]) and g[0].abs().sum() > 0
    j = [torch.func.jvp(m, (x,), (t,))[1] for m in (model, plain)]
    assert torch.equal(j[0], j[1]) and j[0].abs().sum() > 0
    v = [torch.func.vmap(m)(x.unsqueeze(1)) for m in (model, plain)]
    assert torch.allclose(v[0], v[1])
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level():
        tangents = [fwAD.unpack_dual(m(fwAD.make_dual(x, t))).tangent for m in (model, plain)]
    assert torch.equal(tangents[0], tangents[1]) and tangents[0].abs().sum() > 0


def test_backward_op_rejects_mismatched_sizes():
    out, code = torch.ops.robust_ext.relu_max_pool2d(torch.randn(1, 2, 6, 6))
    with pytest.raises(RuntimeError, match="does not pool to"):
        torch.ops.robust_ext.relu_max_pool2d_backward(torch.randn_like(out), code, 8, 8, False)
    with pytest.raises(RuntimeError, match="grad_out must have the shape"):
        torch.ops.robust_ext.relu_max_pool2d_backward(torch.randn(1, 2, 2, 2), code, 6, 6, False)
    with pytest.raises(RuntimeError, match="same device"):
        torch.ops.robust_ext.relu_max_pool2d_backward(torch.randn_like(out, device="meta"), code, 6, 6, False)


def plain_small_cnn(model: SmallCNN) -> SmallCNN:
    """The same weights with nn.ReLU + nn.MaxPool2d instead of the fused layer."""
    plain = SmallCNN()
    plain.load_state_dict(model.state_dict())
    plain.features = nn.Sequential(*list(plain.features)[:3], nn.ReLU(), nn.MaxPool2d(2, stride=2))
    return plain


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("amp", [False, True])
def test_small_cnn_equals_unfused_model(channels_last, amp):
    """Logits and input gradients of the small CNN equal the unfused network's exactly, fp32 and bf16."""
    torch.manual_seed(0)
    model = SmallCNN().eval()
    plain = plain_small_cnn(model).eval()
    assert set(model.state_dict()) == set(plain.state_dict())
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.rand(16, 1, 28, 28).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (16,))
    results = []
    for m in (model, plain):
        m.to(memory_format=fmt)
        xa = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            logits = m(xa)
        (g,) = torch.autograd.grad(torch.nn.functional.cross_entropy(logits.float(), y), xa)
        results.append((logits, g))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


def test_torch_compile_small_cnn_fullgraph():
    torch.manual_seed(0)
    model = SmallCNN().eval()
    x = torch.rand(8, 1, 28, 28)
    y = torch.randint(0, 10, (8,))

    def input_grad(x):
        x = x.clone().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        return torch.autograd.grad(loss, x)[0]

    torch._dynamo.reset()
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        compiled = torch.compile(input_grad, fullgraph=True)
        assert torch.allclose(compiled(x), input_grad(x), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("layout_name", ["nchw", "channels_last"])
def test_double_backward_matches_reference(layout_name):
    """create_graph=True (e.g. a gradient penalty): second-order gradients equal ATen's."""
    x = layout(special_values((2, 3, 6, 7), torch.float64, seed=2).nan_to_num(0.0, 3.0, -3.0), layout_name)
    results = []
    for fn in (relu_max_pool2d, reference.relu_max_pool2d):
        w = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
        xa = x.clone().requires_grad_(True)
        out = fn(xa * w)
        (g,) = torch.autograd.grad((out * out).sum(), xa, create_graph=True)
        (h,) = torch.autograd.grad(g.pow(2).sum(), w)
        results.append((g.detach(), h))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.allclose(results[0][1], results[1][1], rtol=1e-12, atol=0)
    assert results[0][1].abs() > 0
