"""The fused L2 ops: against reference.py, a float64 evaluation of the formula and torchattacks' PGDL2
update; gradient edge cases; thread count, layout and per-sample budgets; opcheck and torch.compile.

Error bound against float64 (``bound`` below), per element, u the unit roundoff of the compute dtype
(2^-24 for fp32/fp16/bf16, 2^-53 for fp64):

    |out - f64| <= u * (4 |x| + 80 (|x_adv - x| + |alpha| |g| / ||g||))      (+ half an ulp of the storage
                                                                             dtype for fp16/bf16)
Why: a sum of squares in l2_math.h's order adds at most 64 terms per lane, then 4 lane levels and
log2(chunks) <= 31 chunk levels: relative error <= ~100 u in the worst case, so a norm (a square root)
is within ~50 u, and alpha / ||g|| and eps / ||d|| within ~52 u each. The step's d and its projection
d * f carry those relative errors on |alpha g / ||g||| and |d| <= |x_adv - x| + |alpha g| / ||g||
(~2 x 52 u), and the last additions and the clamp round once more on |x| + |d| (4 u |x| covers them).
Clipping is 1-Lipschitz. In practice the error is a few u; the bound is the worst case, so it holds on
any shape. fp32 and half types equal the reference bit for bit; fp64 ones agree within the same bound
(reference.py: ATen's sqrt may be 1 ulp off).
"""
import math

import numpy as np
import pytest
import scipy.stats
import torch

from robust_ext import ops, reference
from _cases import DTYPES, LAYOUTS, images, layout, on_threads
from conftest import DEVICES, FORCED_REFERENCE

EXACT_TO_REFERENCE = (torch.float32, torch.float16, torch.bfloat16)


def u_of(dtype):
    return 2.0**-53 if dtype == torch.float64 else 2.0**-24


def same(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def rows64(t):
    return t.double().reshape(t.shape[0], -1)


def per_sample(v, n):
    return v.double().reshape(-1, 1) if isinstance(v, torch.Tensor) else torch.full((n, 1), float(v), dtype=torch.float64)


def step_f64(x_adv, grad, x, alpha, eps, lo=0.0, hi=1.0):
    """The L2 step in float64, written from the formula (NaN gradient entries as 0)."""
    xa, g, xx = rows64(x_adv), rows64(grad).nan_to_num(0.0), rows64(x)
    a, e = per_sample(alpha, x.shape[0]), per_sample(eps, x.shape[0])
    gn = g.norm(dim=1, keepdim=True)
    unit = torch.where(gn > 0, g / gn, 0.0)
    d = xa - xx + a * unit
    dn = d.norm(dim=1, keepdim=True)
    f = torch.where(dn > e, e / dn, 1.0)
    return (xx + d * f).clamp(lo, hi).reshape(x.shape), (a * unit).abs().reshape(x.shape)


def bound(out, x_adv, x, step_size, dtype):
    """Per-element error bound of the module docstring."""
    u = u_of(dtype)
    tol = u * (4 * x.double().abs() + 80 * ((x_adv.double() - x.double()).abs() + step_size))
    if dtype in (torch.float16, torch.bfloat16):
        tol = tol + out.double().abs() * torch.finfo(dtype).eps / 2 + 1e-30
    return tol


def check_step(out, x_adv, grad, x, alpha, eps, lo=0.0, hi=1.0):
    f64, step = step_f64(x_adv, grad, x, alpha, eps, lo, hi)
    err = (out.double() - f64).abs()
    tol = bound(out, x_adv, x, step, out.dtype)
    assert (err <= tol).all(), (err - tol).max()


def reference_agrees(out, ref, x_adv, x, step):
    if out.dtype in EXACT_TO_REFERENCE:
        same(out, ref)
    else:
        assert ((out.double() - ref.double()).abs() <= bound(out, x_adv, x, step, out.dtype)).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lay", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_step_project_fgm(dtype, lay, device):
    x_adv, grad, x = images(dtype=dtype, device=device, spread=0.2)
    xa, g, xx = layout(x_adv, lay), layout(grad, lay, "grad"), layout(x, lay, "x")
    alpha, eps = 0.3, 0.5
    out = ops.l2_step(xa, g, xx, alpha, eps)
    assert out.stride() == torch.empty_like(xa).stride()
    check_step(out, x_adv, grad, x, alpha, eps)
    _, step = step_f64(x_adv, grad, x, alpha, eps)
    reference_agrees(out, reference.l2_step(xa, g, xx, alpha, eps, 0.0, 1.0), x_adv, x, step)
    # the layout does not change a bit: every sum runs in logical order
    same(out, ops.l2_step(x_adv, grad, x, alpha, eps))
    inplace = xa.clone()
    assert ops.l2_step_(inplace, g, xx, alpha, eps) is inplace
    same(inplace, out)

    out = ops.l2_project(xa, xx, 0.1, -0.5, 0.9)
    check_step(out, x_adv, torch.zeros_like(grad), x, 0.0, 0.1, -0.5, 0.9)
    reference_agrees(out, reference.l2_project(xa, xx, 0.1, -0.5, 0.9), x_adv, x, 0.0)
    same(ops.l2_project_(xa.clone(), xx, 0.1, -0.5, 0.9), out)

    out = ops.fgm(xx, g, 0.7)
    check_step(out, x, grad, x, 0.7, math.inf)
    _, step = step_f64(x, grad, x, 0.7, math.inf)
    reference_agrees(out, reference.fgm(xx, g, 0.7, 0.0, 1.0), x, x, step)


@pytest.mark.parametrize("dtype", DTYPES)
def test_per_sample_budgets_and_eps_zero(dtype):
    x_adv, grad, x = images(shape=(5, 2, 7, 3), dtype=dtype, seed=2, spread=0.1)
    eps = torch.tensor([0.0, 0.01, 0.05, 0.3, 1.0])
    alpha = torch.tensor([0.1, -0.02, 0.0, 0.01, 0.5], dtype=torch.float64)
    out = ops.l2_step(x_adv, grad, x, alpha, eps)
    check_step(out, x_adv, grad, x, alpha, eps)
    reference_agrees(out, reference.l2_step(x_adv, grad, x, 0.0, 0.0, 0.0, 1.0, alpha, eps), x_adv, x,
                     step_f64(x_adv, grad, x, alpha, eps)[1])
    same(out[0], x[0])  # eps = 0: the sample stays at x
    for i in range(5):  # each sample as a call with its own scalar budgets
        same(out[i:i + 1], ops.l2_step(x_adv[i:i + 1], grad[i:i + 1], x[i:i + 1], float(alpha[i]), float(eps[i])))
    same(ops.l2_step(x_adv, grad, x, torch.tensor(0.02, dtype=torch.float64), torch.tensor(0.05, dtype=torch.float64)),
         ops.l2_step(x_adv, grad, x, 0.02, 0.05))
    reference_agrees(ops.l2_project(x_adv, x, eps), reference.l2_project(x_adv, x, 0.0, 0.0, 1.0, eps), x_adv, x, 0.0)
    same(ops.fgm(x, grad, eps)[0], x[0])


def test_gradient_edge_cases():
    """Zero rows do not move (d = x_adv - x is still projected), NaN counts as 0, inf entries alone set the
    direction, and a gradient scaled by a power of two (tiny or huge) steps exactly as the original."""
    x_adv, grad, x = images(shape=(4, 3, 8, 8), dtype=torch.float64, seed=3, spread=0.3)
    grad = grad.sign() * (0.5 + grad.abs())  # no entry near 0: scaling by 2^-600 keeps every bit
    grad[1] = 0.0
    out = ops.l2_step(x_adv, grad, x, 0.2, 0.4)
    same(out[1], ops.l2_project(x_adv[1:2], x[1:2], 0.4)[0])
    for k in (-600, -80, 80, 600):
        same(ops.l2_step(x_adv, grad * 2.0**k, x, 0.2, 0.4), out)
        same(ops.fgm(x, grad * 2.0**k, 0.3), ops.fgm(x, grad, 0.3))
    g32, xa32, x32 = grad.float(), x_adv.float(), x.float()
    same(ops.l2_step(xa32, g32 * 2.0**-80, x32, 0.2, 0.4), ops.l2_step(xa32, g32, x32, 0.2, 0.4))

    nan = grad.clone()
    nan[0, 0, :3] = math.nan
    zeroed = nan.nan_to_num(0.0)
    same(ops.l2_step(x_adv, nan, x, 0.2, 0.4), ops.l2_step(x_adv, zeroed, x, 0.2, 0.4))
    nan[2] = math.nan  # an all-NaN row is a zero row
    assert not ops.l2_step(x_adv, nan, x, 0.2, 0.4).isnan().any()
    same(ops.l2_step(x_adv, nan, x, 0.2, 0.4)[2], ops.l2_project(x_adv[2:3], x[2:3], 0.4)[0])

    inf = grad.clone()
    inf[3, 0, 0, 0], inf[3, 1, 2, 2] = math.inf, -math.inf
    limit = torch.zeros_like(grad[3:4])
    limit[0, 0, 0, 0], limit[0, 1, 2, 2] = 1.0, -1.0
    same(ops.l2_step(x_adv, inf, x, 0.2, 0.4)[3:4], ops.l2_step(x_adv[3:4], limit, x[3:4], 0.2, 0.4))
    for dtype in (torch.float32, torch.bfloat16):
        args = [t.to(dtype) for t in (x_adv, inf, x)]
        same(ops.l2_step(*args, 0.2, 0.4), reference.l2_step(*args, 0.2, 0.4, 0.0, 1.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_each_sample_alone_with_edge_rows_between(dtype):
    """A batch whose rows mix the gradient's cases (ordinary, NaN entries, an infinite entry, zero, tiny,
    huge), in every order: each sample's result is the one it gets alone, on 1 and 2 threads. The kernel
    sums a sample's gradient while it finishes the sample before it and reads a NaN-free, finite gradient
    without its checks: no case may leak into its neighbour."""
    x_adv, grad, x = images(shape=(9, 2, 9, 7), dtype=torch.float64, seed=11, spread=0.2)
    grad = grad.sign() * (0.25 + grad.abs())
    grad[1, 0, 3, :2] = math.nan
    grad[2, 1, 4, 4] = -math.inf
    grad[3] = 0.0
    grad[4] *= 2.0**-70
    grad[5] *= 2.0**70
    grad[6, 1, 0, 0] = math.nan
    grad[6, 0, 0, 0] = math.inf
    x_prev = (x_adv + 0.05 * grad.nan_to_num(0.0, 0.0, 0.0).sign()).clamp(0, 1)
    order = [0, 1, 2, 3, 4, 5, 6, 7, 8, 6, 5, 4, 3, 2, 1, 0, 2, 6, 1, 3]  # every case before and after the others
    x_adv, grad, x, x_prev = (t[order].to(dtype) for t in (x_adv, grad, x, x_prev))
    alpha = torch.linspace(0.05, 0.6, len(order), dtype=torch.float64)
    eps = torch.linspace(0.2, 1.5, len(order), dtype=torch.float64)

    def run():
        return (ops.l2_step(x_adv, grad, x, alpha, eps), ops.fgm(x, grad, eps),
                ops.l2_apgd_update(x_adv, x_prev, grad, x, alpha, eps, 0.75))

    batched = on_threads(run)
    for a, b in zip(*batched):
        same(a, b)
    for i in range(len(order)):
        r = slice(i, i + 1)
        alone = (ops.l2_step(x_adv[r], grad[r], x[r], float(alpha[i]), float(eps[i])),
                 ops.fgm(x[r], grad[r], float(eps[i])),
                 ops.l2_apgd_update(x_adv[r], x_prev[r], grad[r], x[r], float(alpha[i]), float(eps[i]), 0.75))
        for got, want in zip(batched[0], alone):
            same(got[r], want)
    if dtype in EXACT_TO_REFERENCE:
        same(batched[0][0], reference.l2_step(x_adv, grad, x, 0.0, 0.0, 0.0, 1.0, alpha, eps))


def test_targeted_step_descends():
    x_adv, grad, x = images(seed=4, spread=0.0)
    x = x.clamp(0.2, 0.8)
    up, down = ops.l2_step(x, grad, x, 0.05, 1.0), ops.l2_step(x, grad, x, -0.05, 1.0)
    assert ((up - x) * grad).sum() > 0 and ((down - x) * grad).sum() < 0


@pytest.mark.parametrize("shape", [(1, 3, 200, 150), (3, 1, 241, 97), (64, 3, 16, 16)])
def test_thread_count_independent(shape):
    """One large sample (split over chunks), few samples, many samples: the same bits on 1 and 2 threads."""
    x_adv, grad, x = images(shape=shape, seed=5, spread=0.1)
    eps = torch.linspace(0.01, 2.0, shape[0])
    results = on_threads(lambda: (ops.l2_step(x_adv, grad, x, 0.3, eps), ops.l2_project(x_adv, x, eps),
                                  ops.fgm(x, grad, eps),
                                  ops.l2_random_init(x, eps, generator=torch.Generator().manual_seed(1))))
    for a, b in zip(*results):
        same(a, b)
    same(results[0][0], reference.l2_step(x_adv, grad, x, 0.3, 0.0, 0.0, 1.0, None, eps))


def test_matches_torchattacks_pgdl2_update():
    """torchattacks' PGDL2 update written as it is (3.5.1): equal within the bound on ordinary inputs. It
    divides by ||g|| + 1e-10, so a gradient of norm ~1e-10 takes a shorter step there (ours is scale-free),
    and eps = 0 with x_adv = x gives 0/0 = NaN there (ours returns x)."""
    x_adv, grad, x = images(shape=(8, 3, 16, 16), seed=6, spread=0.1)
    alpha, eps = 0.2, 0.5

    def torchattacks_step(adv_images, grad, images, alpha, eps):
        batch_size = len(images)
        grad_norms = torch.norm(grad.view(batch_size, -1), p=2, dim=1) + 1e-10
        grad = grad / grad_norms.view(batch_size, 1, 1, 1)
        adv_images = adv_images.detach() + alpha * grad
        delta = adv_images - images
        delta_norms = torch.norm(delta.view(batch_size, -1), p=2, dim=1)
        factor = eps / delta_norms
        factor = torch.min(factor, torch.ones_like(delta_norms))
        delta = delta * factor.view(-1, 1, 1, 1)
        return torch.clamp(images + delta, min=0, max=1).detach()

    ours = ops.l2_step(x_adv, grad, x, alpha, eps)
    theirs = torchattacks_step(x_adv, grad, x, alpha, eps)
    _, step = step_f64(x_adv, grad, x, alpha, eps)
    assert ((ours.double() - theirs.double()).abs() <= 2 * bound(ours, x_adv, x, step, torch.float32)).all()
    tiny = grad * 1e-12  # ||tiny|| ~ 3e-11 per sample: torchattacks' step is ~0.2 alpha long, ours alpha
    mid = torch.full_like(x, 0.5)
    theirs_len = (torchattacks_step(mid, tiny, mid, alpha, 10.0) - mid).flatten(1).norm(dim=1)
    ours_len = (ops.l2_step(mid, tiny, mid, alpha, 10.0) - mid).flatten(1).norm(dim=1)
    assert (theirs_len < 0.5 * alpha).all()
    torch.testing.assert_close(ours_len, torch.full_like(ours_len, alpha), rtol=1e-5, atol=0)
    assert torchattacks_step(x, torch.zeros_like(x), x, alpha, 0.0).isnan().all()
    same(ops.l2_step(x, torch.zeros_like(x), x, alpha, 0.0), x)


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 0), (0,), ()])
def test_empty_and_scalar(shape):
    x = torch.rand(shape)
    assert ops.l2_step(x, x, x, 0.1, 0.1).shape == shape
    assert ops.l2_step_(x.clone(), x, x, 0.1, 0.1).shape == shape
    assert ops.l2_project(x, x, 0.1).shape == shape
    assert ops.fgm(x, x, 0.1).shape == shape
    assert ops.l2_random_init(x, 0.1).shape == shape
    if len(shape) and shape[0] == 0:
        assert ops.l2_step(x, x, x, 0.1, torch.empty(0)).shape == shape


def test_aliasing_inplace_inputs():
    x_adv, grad, x = images(seed=7)
    y = x.clone()
    ops.l2_step_(y, grad, y, 0.1, 0.3)
    same(y, reference.l2_step(x, grad, x, 0.1, 0.3, 0.0, 1.0))
    g = grad.clone()
    ops.l2_step_(g, g, x, 0.1, 0.3)
    same(g, reference.l2_step(grad, grad, x, 0.1, 0.3, 0.0, 1.0))


def test_invariants_ball_and_box():
    x_adv, grad, x = images(shape=(8, 3, 16, 16), seed=8, spread=0.5)
    x = x.clamp(0, 1)
    eps = torch.linspace(0, 3, 8)
    out = x_adv.clone()
    for _ in range(5):
        ops.l2_step_(out, grad, x, 0.7, eps)
        grad = -grad.roll(1, 0)
    dist = (out.double() - x.double()).flatten(1).norm(dim=1)
    assert (dist <= eps.double() * (1 + 1e-6)).all()
    assert out.min() >= 0 and out.max() <= 1


# ---- random init ----------------------------------------------------------------------------------

def init_f64(x, eps, seed):
    """The documented construction in float64 with exact log/cos/sin/exp on the same Philox words."""
    n_rows = x.shape[0]
    xx = x.double().reshape(n_rows, -1)
    n = xx.shape[1]
    fmt = reference._FMT[torch.float32 if x.dtype != torch.float64 else torch.float64]
    b = fmt.uniform
    blocks = (n_rows * n + 63) // 64
    w = reference.philox4x32_10(torch.arange(blocks * 16), seed).reshape(blocks, 16, 4)
    u1 = ((w[..., 0::2] >> (32 - b)) + 1).double() * 2.0**-b
    u2 = (w[..., 1::2] >> (32 - b)).double() * 2.0**-b
    rad = torch.sqrt(-2 * torch.log(u1))
    z = torch.stack((rad * torch.cos(2 * math.pi * u2), rad * torch.sin(2 * math.pi * u2)), dim=-1)  # [.., pair, 2]
    z = z.reshape(blocks, 16, 4).permute(0, 2, 1).reshape(-1)[:n_rows * n].reshape(n_rows, n)
    wr = reference.philox4x32_10(torch.arange(n_rows), seed, stream=1)[:, 0]
    ur = ((wr >> (32 - b)) + 1).double() * 2.0**-b
    r = per_sample(eps, n_rows)[:, 0] * ur ** (1.0 / n)
    step = z * (r / z.norm(dim=1))[:, None]
    return (xx + step).clamp(0, 1).reshape(x.shape), step.abs().reshape(x.shape)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lay", ["contiguous", "channels_last", "strided", "batch_inner"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_random_init_matches_reference_and_formula(dtype, lay, device):
    x = layout((0.2 + 0.6 * torch.rand(3, 4, 13, 7)).to(dtype=dtype, device=device), lay)
    seed = torch.tensor(987654321)
    init = torch.ops.robust_ext.l2_random_init if ops.backend()[device] == "extension" else reference.l2_random_init
    for eps in (0.5, torch.tensor([0.0, 0.1, 2.0], device=device)):
        e_f, e_t = (eps, None) if isinstance(eps, float) else (0.0, eps)
        out = init(x, e_f, 0.0, 1.0, seed, e_t)
        f64, step = init_f64(x.cpu(), eps.cpu() if e_t is not None else eps, 987654321)
        reference_agrees(out.cpu(), reference.l2_random_init(x, e_f, 0.0, 1.0, seed, e_t).cpu(), x.cpu(), x.cpu(), step)
        assert ((out.cpu().double() - f64).abs() <= bound(out.cpu(), x.cpu(), x.cpu(), step, dtype)).all()
        same(out, init(x.contiguous(), e_f, 0.0, 1.0, seed, e_t))  # the noise belongs to the logical element
        assert out.stride() == torch.empty_like(x).stride()


def test_random_init_reproducible_and_inside_ball():
    x = 0.3 + 0.4 * torch.rand(16, 3, 8, 8)
    torch.manual_seed(7)
    a = ops.l2_random_init(x, 0.1)
    b = ops.l2_random_init(x, 0.1)
    torch.manual_seed(7)
    same(ops.l2_random_init(x, 0.1), a)
    assert not torch.equal(a, b)
    eps = torch.linspace(0, 0.2, 16)
    out = ops.l2_random_init(x, eps, generator=torch.Generator().manual_seed(3))
    dist = (out.double() - x.double()).flatten(1).norm(dim=1)
    assert (dist <= eps.double() * (1 + 1e-6)).all() and dist[1:].min() > 0


def test_random_init_uniform_in_ball():
    """Radius: (r / eps)^n ~ U(0, 1); direction: for n = 2 the angle is uniform; the deviates are N(0, 1)."""
    gen = torch.Generator().manual_seed(11)
    for n in (1, 2, 5):
        x = torch.full((20000, n), 0.5, dtype=torch.float64)
        d = ops.l2_random_init(x, 0.25, generator=gen) - x
        r = d.norm(dim=1) / 0.25
        assert scipy.stats.kstest((r ** n).numpy(), "uniform").pvalue > 1e-3
        if n == 2:
            angle = torch.atan2(d[:, 1], d[:, 0]).numpy()
            assert scipy.stats.kstest(angle, "uniform", args=(-math.pi, 2 * math.pi)).pvalue > 1e-3
    z = reference.gaussians(200_000, 1234567, "cpu", torch.float32).double().numpy()
    assert scipy.stats.kstest(z, "norm").pvalue > 1e-3
    assert abs(z.mean()) < 4 / np.sqrt(z.size) and abs(z.std() - 1) < 0.01


# ---- the op machinery -------------------------------------------------------------------------------

@pytest.mark.parametrize("op", ["l2_step", "l2_step_", "l2_project", "l2_project_", "fgm", "l2_random_init"])
@pytest.mark.needs_extension
def test_opcheck(op):
    x_adv, grad, x = images(shape=(3, 2, 5, 4), seed=9)
    eps_t = torch.tensor([0.01, 0.2, 0.3])
    seed = torch.tensor(1234)
    cases = {
        "l2_step": [(x_adv, grad, x, 0.1, 0.3, 0.0, 1.0), (x_adv, grad, x, 0.0, 0.0, 0.0, 1.0, eps_t, eps_t)],
        "l2_project": [(x_adv, x, 0.03, 0.0, 1.0), (x_adv, x, 0.0, 0.0, 1.0, eps_t)],
        "fgm": [(x, grad, 0.3, 0.0, 1.0), (x, grad, 0.0, 0.0, 1.0, eps_t)],
        "l2_random_init": [(x, 0.3, 0.0, 1.0, seed), (x, 0.0, 0.0, 1.0, seed, eps_t)],
    }
    for args in cases[op.rstrip("_")]:
        args = tuple(a.clone() if isinstance(a, torch.Tensor) and a is x_adv else a for a in args)
        torch.library.opcheck(getattr(torch.ops.robust_ext, op).default, args)


@pytest.mark.skipif(FORCED_REFERENCE, reason="on the fallback, torch.compile traces reference.py's unrolled fixed-order "
                    "sums: minutes for this loop (test_torch_compile_reference_fullgraph covers the fallback)")
def test_torch_compile_pgd_l2_loop_fullgraph():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 8 * 8, 10)).eval()
    x = torch.rand(6, 1, 8, 8)
    y = torch.randint(0, 10, (6,))
    eps = torch.full((6,), 0.5)

    def pgd(x, y, eps, seed):
        x_adv = ops.l2_random_init(x, eps) if seed is None else x.clone()
        for _ in range(3):
            x_adv.requires_grad_(True)
            loss = torch.nn.functional.cross_entropy(model(x_adv), y, reduction="sum")
            (g,) = torch.autograd.grad(loss, x_adv)
            x_adv = x_adv.detach()
            ops.l2_step_(x_adv, g, x, 0.2, eps)
            x_adv = ops.l2_project(x_adv, x, 0.4)
        return ops.fgm(x_adv, g, 0.0)

    def ops_only(x_adv, g, x, eps):
        x_adv = ops.l2_step(x_adv, g, x, 0.2, eps)
        ops.l2_project_(x_adv, x, 0.4)
        return ops.fgm(x_adv, g, 0.1), ops.l2_random_init(x, eps)

    torch._dynamo.reset()
    with torch._dynamo.config.patch(trace_autograd_ops=True), torch._inductor.config.patch(fallback_random=True):
        # inductor's compiled model may round its gradient differently from eager, and an L2 step (unlike
        # the sign step) carries that into the result: the PGD loop agrees to rounding, the ops bit for bit
        compiled = torch.compile(pgd, fullgraph=True)
        torch.testing.assert_close(compiled(x, y, eps, 0), pgd(x, y, eps, 0), rtol=1e-5, atol=1e-6)
        torch.manual_seed(3)
        eager = pgd(x, y, eps, None)
        torch.manual_seed(3)
        torch.testing.assert_close(compiled(x, y, eps, None), eager, rtol=1e-5, atol=1e-6)
        g = torch.randn_like(x)
        compiled_ops = torch.compile(ops_only, fullgraph=True)
        torch.manual_seed(4)
        eager = ops_only(x + 0.1, g, x, eps)
        torch.manual_seed(4)
        for a, b in zip(compiled_ops(x + 0.1, g, x, eps), eager):
            same(a, b)


def test_torch_compile_reference_fullgraph():
    """reference.py's L2 math traces with fullgraph (what the fallback gives torch.compile)."""
    x_adv, _, x = images(shape=(3, 2, 5, 4), seed=11, spread=0.3)
    project = torch.compile(lambda xa, x: reference.l2_project(xa, x, 0.2, 0.0, 1.0), fullgraph=True)
    torch._dynamo.reset()
    same(project(x_adv, x), reference.l2_project(x_adv, x, 0.2, 0.0, 1.0))


@pytest.mark.slow  # > 2**31 elements, 8 GB
@pytest.mark.needs_extension
def test_64bit_indexing():
    """More than 2^31 elements: a per-sample projection whose second sample lies past 32-bit offsets."""
    half = 2**30 + 64
    x = torch.zeros(2, half, dtype=torch.bfloat16)
    x_adv = torch.full((2, half), 0.5, dtype=torch.bfloat16)
    ops.l2_project_(x_adv, x, torch.tensor([1.0, 4.0]), -1.0, 1.0)
    for s, eps in ((0, 1.0), (1, 4.0)):
        expected = torch.tensor(eps / math.sqrt(half)).to(torch.bfloat16)
        for i in (0, half // 2, half - 1):
            assert x_adv[s, i] == expected, (s, i)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CPU-CUDA agreement needs a GPU")
@pytest.mark.parametrize("shape", [(4, 3, 9, 11), (2, 3, 300, 300)])  # block per sample; split sums
def test_cuda_matches_cpu_bitwise(shape):
    """Both backends sum in l2_math.h's order with correctly rounded sqrt and division: the same bits."""
    for dtype in DTYPES:
        x_adv, grad, x = images(shape=shape, dtype=dtype, seed=10, spread=0.2)
        eps = torch.linspace(0.0, 3.0, shape[0], dtype=torch.float64)
        cpu = (ops.l2_step(x_adv, grad, x, 0.4, eps), ops.l2_project(x_adv, x, eps), ops.fgm(x, grad, 0.5),
               ops.l2_random_init(x, eps, generator=torch.Generator().manual_seed(2)))
        xa, g, xx, e = x_adv.cuda(), grad.cuda(), x.cuda(), eps.cuda()
        gpu = (ops.l2_step(xa, g, xx, 0.4, e), ops.l2_project(xa, xx, e), ops.fgm(xx, g, 0.5),
               ops.l2_random_init(xx, e, generator=torch.Generator().manual_seed(2)))
        for a, b in zip(cpu, gpu):
            same(a, b.cpu())
