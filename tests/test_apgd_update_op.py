"""The fused APGD update ops (linf_apgd_update, l2_apgd_update): bit-identical in fp32/fp64 to the step and
projection ops composed as APGD composed them, against reference.py and an independent float64 evaluation
of the formula (the bounds of docs/ops.md), momentum 1 as the step, thread count, layouts, per-sample
budgets, empty inputs, errors, opcheck, torch.compile, and the threat-model seam APGD calls them through."""
import math

import pytest
import torch

from robust_ext import ops, reference
from robust_ext.attacks import LINF, L2, apgd
from _cases import DTYPES, LAYOUTS, Delegating, images, layout, on_threads
from conftest import DEVICES

NORMS = ["linf", "l2"]
HALF = (torch.float16, torch.bfloat16)


def same(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def op(norm, inplace=False):
    return getattr(ops, f"{norm}_apgd_update" + ("_" if inplace else ""))


def ref_op(norm):
    return getattr(reference, f"{norm}_apgd_update")


def inputs(shape=(4, 3, 9, 11), dtype=torch.float32, device="cpu", seed=0, spread=0.05):
    """(x_adv, x_prev, grad, x): x_adv and x_prev near x, partly outside a small ball and outside [0, 1]."""
    x_adv, grad, x = images(shape=shape, dtype=torch.float64, seed=seed, spread=spread)
    g = torch.Generator().manual_seed(seed + 1000)
    x_prev = x + spread * torch.randn(shape, generator=g, dtype=torch.float64)
    return tuple(t.to(dtype=dtype, device=device) for t in (x_adv, x_prev, grad, x))


def composed(norm, x_adv, x_prev, grad, x, alpha, eps, momentum, lo=0.0, hi=1.0):
    """APGD's update as robust_ext.attacks.apgd composed it from the step and projection ops."""
    z = getattr(ops, f"{norm}_step_")(x_adv.clone(), grad, x, alpha, eps, lo, hi)
    if momentum != 1.0:
        z.sub_(x_adv).mul_(momentum).add_(x_adv).add_((x_adv - x_prev).mul_(1.0 - momentum))
        getattr(ops, f"{norm}_project_")(z, x, eps, lo, hi)
    return z


# ---- the formula in float64, and its error bounds (docs/ops.md) -----------------------------------------

def column(v, x):
    """A budget as a float64 tensor broadcasting over x's samples."""
    if isinstance(v, torch.Tensor):
        return v.double().reshape((-1,) + (1,) * (x.dim() - 1))
    return torch.full((x.shape[0],) + (1,) * (x.dim() - 1), float(v), dtype=torch.float64)


def linf_f64(x_adv, x_prev, grad, x, alpha, eps, m, lo=0.0, hi=1.0):
    xa, xp, g, xx = (t.double() for t in (x_adv, x_prev, grad, x))
    a, e = column(alpha, x), column(eps, x)
    z = torch.minimum(torch.maximum(xa + a * g.sign().nan_to_num(0.0), xx - e), xx + e).clamp(lo, hi)
    v = xa + m * (z - xa) + (1 - m) * (xa - xp)
    return torch.minimum(torch.maximum(v, xx - e), xx + e).clamp(lo, hi)


def linf_bound(x_adv, x_prev, x, alpha, eps):
    """|out - f64| <= 16 u (|x| + |x_adv| + |x_prev| + |alpha| + eps): eleven roundings, none at a larger magnitude."""
    u = 2.0**-53 if x.dtype == torch.float64 else 2.0**-24
    mag = x.double().abs() + x_adv.double().abs() + x_prev.double().abs() + column(alpha, x).abs() + column(eps, x)
    return 16 * u * mag


def rows(t):
    return t.double().reshape(t.shape[0], -1)


def l2_f64(x_adv, x_prev, grad, x, alpha, eps, m, lo=0.0, hi=1.0):
    """(out, z, v, step size per element) of the L2 update, in float64 from the formula."""
    xa, xp, g, xx = rows(x_adv), rows(x_prev), rows(grad).nan_to_num(0.0), rows(x)
    a, e = column(alpha, xx), column(eps, xx)
    gn = g.norm(dim=1, keepdim=True)
    step = a * torch.where(gn > 0, g / gn, 0.0)
    d = xa - xx + step
    z = (xx + d * torch.where(d.norm(dim=1, keepdim=True) > e, e / d.norm(dim=1, keepdim=True), 1.0)).clamp(lo, hi)
    v = xa + m * (z - xa) + (1 - m) * (xa - xp)
    d2 = v - xx
    n2 = d2.norm(dim=1, keepdim=True)
    out = (xx + d2 * torch.where(n2 > e, e / n2, 1.0)).clamp(lo, hi)
    return out, z, v, step.abs()


def l2_bound(x_adv, x_prev, x, eps, m, z, v, step, dtype):
    """docs/ops.md: E_z the L2 step's bound (tests/test_l2_ops.py), E_v = m E_z + u (2|z - x_adv| +
    2|x_adv - x_prev| + 2|x| + 3|v - x|), |out - f64| <= E_v + |v - x| (||E_v|| / eps + 80 u) + u (4|x| + 2|v - x|)
    (+ half a storage ulp of z inside E_z and of out for fp16/bf16)."""
    u = 2.0**-53 if dtype == torch.float64 else 2.0**-24
    xa, xp, xx = rows(x_adv), rows(x_prev), rows(x)
    e = column(eps, xx)
    half_ulp = torch.finfo(dtype).eps / 2 if dtype in HALF else 0.0
    e_z = u * (4 * xx.abs() + 80 * ((xa - xx).abs() + step)) + half_ulp * z.abs()
    e_v = m * e_z + u * (2 * (z - xa).abs() + 2 * (xa - xp).abs() + 2 * xx.abs() + 3 * (v - xx).abs())
    radial = e_v.norm(dim=1, keepdim=True) / e.clamp_min(1e-300) + 80 * u
    out_mag = (xx + (v - xx).abs()).abs()
    return e_v + (v - xx).abs() * radial + u * (4 * xx.abs() + 2 * (v - xx).abs()) + half_ulp * out_mag


def check_formula(norm, out, x_adv, x_prev, grad, x, alpha, eps, m, lo=0.0, hi=1.0):
    if norm == "linf":
        f64 = linf_f64(x_adv, x_prev, grad, x, alpha, eps, m, lo, hi)
        err = (out.double() - f64).abs()
        assert (err <= linf_bound(x_adv, x_prev, x, alpha, eps)).all(), err.max()
        return
    f64, z, v, step = l2_f64(x_adv, x_prev, grad, x, alpha, eps, m, lo, hi)
    err = (rows(out) - f64).abs()
    tol = l2_bound(x_adv, x_prev, x, eps, m, z, v, step, out.dtype)
    assert (err <= tol).all(), (err - tol).max()


def check_half_rule(out, ref, f64):
    """fp16/bf16 (STYLE.md): the error against float64 at most 2x the reference's own."""
    assert (out.double() - f64).abs().max() <= 2 * (ref.double() - f64).abs().max() + 1e-12


# ---- bit identity with the composed ops ------------------------------------------------------------------

@pytest.mark.usefixtures("impl")  # the extension, then the reference (the fallback), each against its own ops
@pytest.mark.parametrize("momentum", [0.75, 0.9, 0.3, 0.0])  # 0.9: float32(1 - m) != 1 - float32(m)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("norm", NORMS)
def test_bit_identical_to_the_composed_ops(norm, dtype, momentum):
    x_adv, x_prev, grad, x = inputs(dtype=dtype, seed=1, spread=0.2)
    grad.view(-1)[5::41] = math.nan
    grad[2, 0, 0, :3] = torch.tensor([math.inf, -math.inf, 0.0])
    alpha = torch.tensor([0.1, 0.03, -0.05, 0.4], dtype=torch.float64)  # APGD's per-sample step (eta)
    for eps, lo, hi in ((0.1, 0.0, 1.0), (torch.tensor([0.0, 0.05, 0.3, 2.0]), -0.5, 1.2)):
        expected = composed(norm, x_adv, x_prev, grad, x, alpha, eps, momentum, lo, hi)
        same(op(norm)(x_adv, x_prev, grad, x, alpha, eps, momentum, lo, hi), expected)
        inplace = x_adv.clone()
        assert op(norm, True)(inplace, x_prev, grad, x, alpha, eps, momentum, lo, hi) is inplace
        same(inplace, expected)


@pytest.mark.parametrize("norm", NORMS)
def test_an_apgd_trajectory_is_bit_identical(norm):
    """Ten updates feeding each other, as APGD does (x_prev is x_adv on the first step; eta halves)."""
    x_adv, _, grad, x = inputs(shape=(6, 2, 8, 8), seed=2, spread=0.0)
    eps = 0.1 if norm == "linf" else 0.5
    eta = torch.full((6,), 2 * eps)
    fused = (x_adv, x_adv)
    plain = (x_adv, x_adv)
    for k in range(10):
        g = grad.roll(k, 0) * (1 + k)
        m = 1.0 if k == 0 else 0.75
        fused = (op(norm)(fused[0], fused[1], g, x, eta, eps, m), fused[0])
        plain = (composed(norm, plain[0], plain[1], g, x, eta, eps, m), plain[0])
        same(fused[0], plain[0])
        eta = torch.where(torch.arange(6) % 2 == k % 2, eta * 0.5, eta)
    assert not torch.equal(fused[0], x_adv)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", NORMS)
def test_momentum_one_is_the_step(norm, dtype):
    x_adv, x_prev, grad, x = inputs(dtype=dtype, seed=3, spread=0.2)
    x_prev.fill_(math.nan)  # not read
    step = getattr(ops, f"{norm}_step")(x_adv, grad, x, 0.05, 0.1)
    same(op(norm)(x_adv, x_prev, grad, x, 0.05, 0.1, 1.0), step)
    same(op(norm, True)(x_adv.clone(), x_prev, grad, x, 0.05, 0.1, 1.0), step)
    same(ref_op(norm)(x_adv, x_prev, grad, x, 0.05, 0.1, 1.0, 0.0, 1.0), step)


# ---- against the reference and the formula -------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lay", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", NORMS)
def test_matches_reference_and_formula(norm, dtype, lay, device):
    x_adv, x_prev, grad, x = inputs(dtype=dtype, device=device, seed=4, spread=0.2)
    args = (layout(x_adv, lay), layout(x_prev, lay, "x_prev"), layout(grad, lay, "grad"), layout(x, lay, "x"))
    alpha, eps, m = (0.03, 0.05, 0.75) if norm == "linf" else (0.4, 0.5, 0.75)
    out = op(norm)(*args, alpha, eps, m)
    assert out.stride() == torch.empty_like(args[0]).stride()
    ref = ref_op(norm)(*args, alpha, eps, m, 0.0, 1.0)
    if norm == "linf" and dtype in HALF:
        check_half_rule(out, ref, linf_f64(x_adv, x_prev, grad, x, alpha, eps, m))
    else:
        if norm == "l2" and dtype == torch.float64:  # reference.py's fp64 sqrt may be 1 ulp off (test_l2_ops.py)
            check_formula(norm, ref, x_adv, x_prev, grad, x, alpha, eps, m)
        else:
            same(out, ref)
        check_formula(norm, out, x_adv, x_prev, grad, x, alpha, eps, m)
    if dtype in (torch.float32, torch.float64):  # the layout changes no bit
        same(out, op(norm)(x_adv, x_prev, grad, x, alpha, eps, m))
    inplace = args[0].clone()
    assert op(norm, True)(inplace, *args[1:], alpha, eps, m) is inplace
    same(inplace, out)


@pytest.mark.parametrize("norm", NORMS)
def test_formula_on_wider_inputs(norm):
    """Other bounds, negative alpha, momentum 0 and 1/3, larger moves: the formula's bound holds in fp32/fp64."""
    for dtype in (torch.float32, torch.float64):
        x_adv, x_prev, grad, x = inputs(shape=(5, 3, 7, 6), dtype=dtype, seed=5, spread=0.5)
        for alpha, eps, m, lo, hi in ((-0.2, 0.3, 1 / 3, -1.0, 2.0), (0.7, 1.5, 0.0, 0.0, 1.0),
                                      (0.01, 4.0, 0.9, -0.2, 0.8)):
            out = op(norm)(x_adv, x_prev, grad, x, alpha, eps, m, lo, hi)
            check_formula(norm, out, x_adv, x_prev, grad, x, alpha, eps, m, lo, hi)
            assert out.min() >= lo and out.max() <= hi


@pytest.mark.parametrize("norm", NORMS)
def test_per_sample_budgets(norm):
    x_adv, x_prev, grad, x = inputs(shape=(5, 2, 7, 3), seed=6, spread=0.1)
    eps = torch.tensor([0.0, 0.01, 0.05, 0.3, 1.0])
    alpha = torch.tensor([0.1, -0.02, 0.0, 0.01, 0.5], dtype=torch.float64)
    out = op(norm)(x_adv, x_prev, grad, x, alpha, eps, 0.75)
    same(out, ref_op(norm)(x_adv, x_prev, grad, x, 0.0, 0.0, 0.75, 0.0, 1.0, alpha, eps))
    check_formula(norm, out, x_adv, x_prev, grad, x, alpha, eps, 0.75)
    same(out[0], x[0])  # eps = 0: the sample stays at x
    for i in range(5):  # each sample as a call with its own scalar budgets
        one = op(norm)(x_adv[i:i + 1], x_prev[i:i + 1], grad[i:i + 1], x[i:i + 1], float(alpha[i]), float(eps[i]), 0.75)
        same(out[i:i + 1], one)
    same(op(norm)(x_adv, x_prev, grad, x, torch.tensor(0.02, dtype=torch.float64), torch.tensor(0.05), 0.75),
         op(norm)(x_adv, x_prev, grad, x, 0.02, 0.05, 0.75))


@pytest.mark.parametrize("shape", [(1, 3, 200, 150), (3, 1, 241, 97), (64, 3, 16, 16)])
@pytest.mark.parametrize("norm", NORMS)
def test_thread_count_independent(norm, shape):
    """One large sample (the L2 sums split over chunks), few samples, many: the same bits on 1 and 2 threads."""
    x_adv, x_prev, grad, x = inputs(shape=shape, seed=7, spread=0.1)
    eps = torch.linspace(0.01, 2.0, shape[0])
    results = on_threads(lambda: op(norm)(x_adv, x_prev, grad, x, 0.3, eps, 0.75))
    same(results[0], results[1])
    same(results[0], ref_op(norm)(x_adv, x_prev, grad, x, 0.3, 0.0, 0.75, 0.0, 1.0, None, eps))


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 0), (0,), ()])
@pytest.mark.parametrize("norm", NORMS)
def test_empty_and_scalar(norm, shape):
    x = torch.rand(shape)
    assert op(norm)(x, x, x, x, 0.1, 0.1, 0.75).shape == shape
    assert op(norm, True)(x.clone(), x, x, x, 0.1, 0.1, 0.75).shape == shape
    if len(shape) and shape[0] == 0:
        assert op(norm)(x, x, x, x, torch.empty(0), torch.empty(0), 0.75).shape == shape


@pytest.mark.parametrize("norm", NORMS)
def test_aliased_inputs(norm):
    """x_prev may be x_adv itself (APGD's first momentum step), in place too; grad may be the written tensor."""
    x_adv, _, grad, x = inputs(seed=8, spread=0.2)
    expected = composed(norm, x_adv, x_adv, grad, x, 0.1, 0.3, 0.75)
    same(op(norm)(x_adv, x_adv, grad, x, 0.1, 0.3, 0.75), expected)
    y = x_adv.clone()
    op(norm, True)(y, y, grad, x, 0.1, 0.3, 0.75)
    same(y, expected)
    g = grad.clone()
    op(norm, True)(g, x_adv, g, x, 0.1, 0.3, 0.75)
    same(g, ref_op(norm)(grad, x_adv, grad, x, 0.1, 0.3, 0.75, 0.0, 1.0))


# ---- errors ----------------------------------------------------------------------------------------------

def err(match):
    return pytest.raises((RuntimeError, TypeError, ValueError), match=match)


@pytest.mark.usefixtures("impl")
@pytest.mark.parametrize("norm", NORMS)
def test_errors_name_the_argument(norm):
    X = torch.rand(4, 3, 5, 5)
    f, f_ = op(norm), op(norm, True)
    with err("x_prev must have the same shape as x"):
        f(X, torch.rand(4, 3, 5, 4), X, X, 0.1, 0.1, 0.75)
    with err("x_prev must have the same dtype as x"):
        f(X, X.double(), X, X, 0.1, 0.1, 0.75)
    with err("x_prev must be float32, float64, float16 or bfloat16"):
        f(X, X.int(), X, X, 0.1, 0.1, 0.75)
    with err("grad must have the same shape as x"):
        f(X, X, torch.rand(4, 3, 5, 4), X, 0.1, 0.1, 0.75)
    with err("x_adv must have the same dtype as x"):
        f_(X.half(), X, X, X, 0.1, 0.1, 0.75)
    for bad in (1.5, -0.1, math.nan):
        with err(r"momentum must be in \[0, 1\], got"):
            f(X, X, X, X, 0.1, 0.1, bad)
    with err("momentum must be a float"):
        f(X, X, X, X, 0.1, 0.1, torch.tensor(0.75))
    with err("alpha must not be NaN"):
        f(X, X, X, X, math.nan, 0.1, 0.75)
    with err("eps must be >= 0"):
        f(X, X, X, X, 0.1, -0.1, 0.75)
    with err("eps must be finite and at most 3.40282e\\+38"):
        f(X, X, X, X, 0.1, math.inf, 0.75)
    with err(r"alpha as a tensor must be 1-D with one value per sample \(4\), got shape \[3\]"):
        f(X, X, X, X, torch.full((3,), 0.1), 0.1, 0.75)
    with err("clip_min must be <= clip_max"):
        f(X, X, X, X, 0.1, 0.1, 0.75, 1.0, 0.0)
    with err("x_prev requires grad, but robust_ext ops are not differentiable"):
        f(X, X.clone().requires_grad_(True), X, X, 0.1, 0.1, 0.75)
    with err("more than one element of the written-to tensor refers to a single memory location"):
        f_(torch.rand(1, 3, 5, 5).expand(4, 3, 5, 5), X, X, X, 0.1, 0.1, 0.75)
    buf = torch.rand(200)
    with err("some elements of the input tensor and the written-to tensor refer to a single memory location"):
        f_(buf[1:101], buf[0:100], buf[100:200], buf[100:200], 0.1, 0.1, 0.75)
    x_adv = X.clone()
    with err("some elements of the input tensor and the written-to tensor refer to a single memory location"):
        f_(x_adv, X, X, X, x_adv[:, 0, 0, 0], 0.1, 0.75)


# ---- the op machinery ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["linf_apgd_update", "linf_apgd_update_", "l2_apgd_update", "l2_apgd_update_"])
@pytest.mark.needs_extension
def test_opcheck(name):
    x_adv, x_prev, grad, x = inputs(shape=(3, 2, 5, 4), seed=9)
    eps_t = torch.tensor([0.01, 0.2, 0.3])
    for args in ((x_adv, x_prev, grad, x, 0.1, 0.3, 0.75, 0.0, 1.0),
                 (x_adv, x_prev, grad, x, 0.0, 0.0, 0.75, 0.0, 1.0, eps_t, eps_t),
                 (x_adv, x_prev, grad, x, 0.1, 0.3, 1.0, 0.0, 1.0)):
        torch.library.opcheck(getattr(torch.ops.robust_ext, name).default, (args[0].clone(),) + args[1:])


def test_torch_compile_fullgraph():
    """Both ops, functional and in place, per-sample budgets, trace with no graph break and give the eager bits."""
    x_adv, x_prev, grad, x = inputs(shape=(3, 2, 5, 4), seed=10, spread=0.2)
    eta, eps = torch.tensor([0.1, 0.2, 0.05]), torch.tensor([0.3, 0.5, 0.1])

    def updates(x_adv, x_prev, grad, x, eta, eps):
        a = ops.linf_apgd_update(x_adv, x_prev, grad, x, eta, 0.1, 0.75)
        b = x_adv.clone()
        ops.l2_apgd_update_(b, x_prev, grad, x, eta, eps, 0.75)
        return a, b

    torch._dynamo.reset()
    compiled = torch.compile(updates, fullgraph=True)
    for got, want in zip(compiled(x_adv, x_prev, grad, x, eta, eps), updates(x_adv, x_prev, grad, x, eta, eps)):
        same(got, want)


# ---- the threat-model seam -------------------------------------------------------------------------------

class Composed(Delegating):
    """A threat model with only step_ and project_ (as a user's own): APGD's update is the base class's."""

    def __init__(self, base):
        self.base, self.name = base, "composed_" + base.name


@pytest.mark.parametrize("threat", [LINF, L2], ids=["linf", "l2"])
def test_threat_models_fused_update_equals_the_default(threat):
    x_adv, x_prev, grad, x = inputs(seed=11, spread=0.2)
    eta = torch.tensor([0.1, 0.2, 0.05, 0.4])
    for m in (1.0, 0.75):
        fused = threat.apgd_update(x_adv, x_prev, grad, x, eta, 0.3, m, 0.0, 1.0)
        same(fused, Composed(threat).apgd_update(x_adv, x_prev, grad, x, eta, 0.3, m, 0.0, 1.0))
        same(fused, op(threat.name)(x_adv, x_prev, grad, x, eta, 0.3, m))
    assert not torch.equal(x_adv, fused)


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.5)])
def test_apgd_runs_the_fused_op_with_the_composed_result(norm, eps, monkeypatch, one_thread):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(),
                                torch.nn.Linear(32, 10)).eval()
    x = torch.rand(24, 1, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)  # every point classified correctly: every one is attacked
    kw = dict(eps=eps, steps=12, early_stop=False)
    mine = apgd(model, x, y, norm=Composed(LINF if norm == "linf" else L2), generator=torch.Generator().manual_seed(1),
                **kw)
    calls = []
    fused_op = op(norm)
    monkeypatch.setattr(ops, f"{norm}_apgd_update", lambda *a, **k: calls.append(a[6]) or fused_op(*a, **k))
    fused = apgd(model, x, y, norm=norm, generator=torch.Generator().manual_seed(1), **kw)
    assert calls and set(calls) == {1.0, 0.75}
    same(fused, mine)
    assert not torch.equal(fused, x)
