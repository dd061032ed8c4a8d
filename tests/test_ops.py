"""The fused ops against reference.py (bit-exact for fp32/fp64), an independent float64 formula, their
invariants, every layout, per-sample budgets, empty inputs, opcheck and torch.compile."""
import pytest
import torch

import robust_ext
from robust_ext import ops, reference
from _cases import DTYPES, LAYOUTS, images, layout, step_f64, ulp
from conftest import DEVICES

EXACT = (torch.float32, torch.float64)


@pytest.mark.needs_extension
def test_extension_serves_cpu():
    assert robust_ext.backend()["cpu"] == "extension", robust_ext.backend()
    assert "OpenMP" in robust_ext.build_info()


def assert_same(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def assert_half_rule(ext, ref, f64):
    """Half types: the extension's error against float64 is at most 2x the reference's own error."""
    err_ext = (ext.double() - f64).abs().max()
    err_ref = (ref.double() - f64).abs().max()
    assert err_ext <= 2 * err_ref + 1e-12, (err_ext, err_ref)


def check_against_reference(ext, ref, f64, scale=1.0):
    """scale: the magnitude the kernel rounds at (|x| + eps), for the float64 comparison."""
    if ext.dtype in EXACT:
        assert_same(ext, ref)
        assert ((ext.double() - f64).abs() <= 2 * ulp(torch.full_like(ext, scale))).all()
    else:
        assert_half_rule(ext, ref, f64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lay", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_step_matches_reference(dtype, lay, device):
    x_adv, grad, x = images(dtype=dtype, device=device)
    args = [layout(x_adv, lay), layout(grad, lay, "grad"), layout(x, lay, "x")]
    ref = reference.linf_step(*args, 2 / 255, 8 / 255, 0.0, 1.0)
    out = ops.linf_step(*args, 2 / 255, 8 / 255)
    assert out.stride() == torch.empty_like(args[0]).stride()
    check_against_reference(out, ref, step_f64(x_adv, grad, x, 2 / 255, 8 / 255, 0.0, 1.0))
    inplace = args[0].clone()
    assert ops.linf_step_(inplace, args[1], args[2], 2 / 255, 8 / 255) is inplace
    assert_same(inplace, out)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lay", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_project_and_fgsm_match_reference(dtype, lay, device):
    x_adv, grad, x = images(dtype=dtype, device=device, seed=1, spread=0.2)
    xa, g, xx = layout(x_adv, lay), layout(grad, lay, "grad"), layout(x, lay, "x")
    f64 = step_f64(x_adv, torch.zeros_like(grad), x, 0.0, 0.03, -0.5, 0.9)
    out = ops.linf_project(xa, xx, 0.03, -0.5, 0.9)
    check_against_reference(out, reference.linf_project(xa, xx, 0.03, -0.5, 0.9), f64)
    inplace = xa.clone()
    assert_same(ops.linf_project_(inplace, xx, 0.03, -0.5, 0.9), out)

    f64 = (x.double() + 0.1 * torch.sign(grad.double())).clamp(0, 1)
    out = ops.fgsm(xx, g, 0.1)
    check_against_reference(out, reference.fgsm(xx, g, 0.1, 0.0, 1.0), f64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_per_sample_budgets(dtype):
    x_adv, grad, x = images(shape=(5, 2, 7, 3), dtype=dtype, seed=2, spread=0.1)
    eps = torch.tensor([0.0, 0.01, 0.05, 0.3, 1.0])
    alpha = torch.tensor([0.1, -0.02, 0.0, 0.01, 0.5], dtype=torch.float64)
    out = ops.linf_step(x_adv, grad, x, alpha, eps)
    ref = reference.linf_step(x_adv, grad, x, 0.0, 0.0, 0.0, 1.0, alpha, eps)
    check_against_reference(out, ref, step_f64(x_adv, grad, x, alpha, eps, 0.0, 1.0))
    assert_same(out[0], x[0])  # eps = 0 leaves the sample at x
    # each sample equals a call with its own scalar budgets
    for i in range(5):
        one = ops.linf_step(x_adv[i:i + 1], grad[i:i + 1], x[i:i + 1], float(alpha[i]), float(eps[i]))
        if dtype in EXACT:
            assert_same(out[i:i + 1], one)
    # a 0-d tensor applies to every sample
    assert_same(ops.linf_step(x_adv, grad, x, torch.tensor(0.02, dtype=torch.float64), torch.tensor(0.05, dtype=torch.float64)),
                ops.linf_step(x_adv, grad, x, 0.02, 0.05))
    out = ops.fgsm(x, grad, eps)
    assert_same(out, reference.fgsm(x, grad, 0.0, 0.0, 1.0, eps))
    out = ops.linf_project(x_adv, x, eps)
    assert_same(out, reference.linf_project(x_adv, x, 0.0, 0.0, 1.0, eps))


def test_per_sample_rows_split_across_threads():
    """Samples that straddle the threads' chunks still get their own budgets."""
    x_adv, grad, x = images(shape=(3, 1, 241, 97), seed=3)
    eps = torch.tensor([0.001, 0.02, 0.3])
    for threads in (1, 2):
        torch.set_num_threads(threads)
        out = ops.linf_step(x_adv, grad, x, 0.01, eps)
        assert_same(out, reference.linf_step(x_adv, grad, x, 0.01, 0.0, 0.0, 1.0, None, eps))


def test_targeted_step_descends():
    x_adv, grad, x = images(seed=4, spread=0.0)
    up, down = ops.linf_step(x_adv, grad, x, 0.01, 0.1, -1, 2), ops.linf_step(x_adv, grad, x, -0.01, 0.1, -1, 2)
    s = torch.sign(grad)
    assert ((up - x) * s >= 0).all() and ((down - x) * s <= 0).all()
    assert ((up - x)[s != 0].abs() > 0).all()


def test_gradient_edge_values():
    """sign(0) = 0, NaN gradient -> no move, +-inf -> +-1; nothing becomes NaN."""
    x = torch.full((1, 6), 0.5)
    x_adv = torch.tensor([[0.52, 0.52, 0.52, 0.52, 0.52, 0.52]])
    grad = torch.tensor([[0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-45]])
    out = ops.linf_step(x_adv, grad, x, 0.01, 0.05)
    expected = torch.tensor([[0.52, 0.52, 0.52, 0.53, 0.51, 0.53]])
    torch.testing.assert_close(out, expected)
    assert not out.isnan().any()
    torch.testing.assert_close(ops.fgsm(x, grad, 0.1), torch.tensor([[0.5, 0.5, 0.5, 0.6, 0.4, 0.6]]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_invariants(dtype):
    x_adv, grad, x = images(shape=(8, 3, 16, 16), dtype=dtype, seed=5, spread=0.5)
    eps = torch.linspace(0, 0.3, 8)
    x_c = x.clamp(0, 1)
    out = x_adv.clone()
    for _ in range(5):
        ops.linf_step_(out, grad, x_c, 0.07, eps)
        grad = -grad.roll(1, 0)
    dist = (out.double() - x_c.double()).abs().amax(dim=(1, 2, 3))
    assert (dist <= eps.double() + ulp(x_c).amax(dim=(1, 2, 3))).all()
    assert out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 0), (0,)])
def test_empty(shape):
    x = torch.empty(shape)
    assert ops.linf_step(x, x, x, 0.1, 0.1).shape == shape
    assert ops.linf_step_(x.clone(), x, x, 0.1, 0.1).shape == shape
    assert ops.linf_project(x, x, 0.1).shape == shape
    assert ops.fgsm(x, x, 0.1).shape == shape
    assert ops.linf_random_init(x, 0.1).shape == shape
    if shape[0] == 0:
        assert ops.linf_step(x, x, x, 0.1, torch.empty(0)).shape == shape


def test_aliasing_inplace_inputs():
    """x_adv may be x itself (FGSM-style first step) or the gradient buffer."""
    x_adv, grad, x = images(seed=6)
    expected = ops.linf_step(x, grad, x, 0.01, 0.03)
    y = x.clone()
    ops.linf_step_(y, grad, y, 0.01, 0.03)
    assert_same(y, reference.linf_step(x, grad, x, 0.01, 0.03, 0.0, 1.0))
    g = grad.clone()
    ops.linf_step_(g, g, x, 0.01, 0.03)
    assert_same(g, reference.linf_step(grad, grad, x, 0.01, 0.03, 0.0, 1.0))
    assert expected.shape == x.shape


@pytest.mark.parametrize("op", ["linf_step", "linf_step_", "linf_project", "linf_project_", "fgsm",
                                "linf_random_init"])
@pytest.mark.needs_extension
def test_opcheck(op):
    x_adv, grad, x = images(shape=(3, 2, 5, 4), seed=7)
    eps_t = torch.tensor([0.01, 0.02, 0.03])
    seed = torch.tensor(1234)
    cases = {
        "linf_step": [(x_adv, grad, x, 0.01, 0.03, 0.0, 1.0), (x_adv, grad, x, 0.0, 0.0, 0.0, 1.0, eps_t, eps_t)],
        "linf_project": [(x_adv, x, 0.03, 0.0, 1.0), (x_adv, x, 0.0, 0.0, 1.0, eps_t)],
        "fgsm": [(x, grad, 0.03, 0.0, 1.0), (x, grad, 0.0, 0.0, 1.0, eps_t)],
        "linf_random_init": [(x, 0.03, 0.0, 1.0, seed), (x, 0.0, 0.0, 1.0, seed, eps_t)],
    }
    for args in cases[op.rstrip("_")]:
        args = tuple(a.clone() if isinstance(a, torch.Tensor) and a is x_adv else a for a in args)
        torch.library.opcheck(getattr(torch.ops.robust_ext, op).default, args)


def test_torch_compile_pgd_loop_fullgraph():
    """A PGD loop built from the ops compiles with no graph break and gives the eager result."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 8 * 8, 10)).eval()
    x = torch.rand(6, 1, 8, 8)
    y = torch.randint(0, 10, (6,))
    eps = torch.full((6,), 0.1)

    def pgd(x, y, eps, seed):
        x_adv = ops.linf_random_init(x, eps, generator=None) if seed is None else x.clone()
        for _ in range(3):
            x_adv.requires_grad_(True)
            loss = torch.nn.functional.cross_entropy(model(x_adv), y, reduction="sum")
            (g,) = torch.autograd.grad(loss, x_adv)
            x_adv = x_adv.detach()
            ops.linf_step_(x_adv, g, x, 0.03, eps)
            x_adv = ops.linf_project(x_adv, x, 0.05)
        return ops.fgsm(x_adv, g, 0.0)

    torch._dynamo.reset()
    # fallback_random: compiled code draws the Philox key from torch's generator as eager code does
    with torch._dynamo.config.patch(trace_autograd_ops=True), torch._inductor.config.patch(fallback_random=True):
        compiled = torch.compile(pgd, fullgraph=True)
        assert_same(compiled(x, y, eps, 0), pgd(x, y, eps, 0))
        torch.manual_seed(3)
        eager = pgd(x, y, eps, None)
        torch.manual_seed(3)
        assert_same(compiled(x, y, eps, None), eager)
