"""Property tests: on random shapes and edge values the kernels equal reference.py and keep the invariants."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from robust_ext import ops, reference

EDGE = [0.0, -0.0, 1.0, -1.0, 0.5, 1e-45, -1e-45, 1e-40, 3.4e38, -3.4e38, math.inf, -math.inf, math.nan]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@st.composite
def cases(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shape = tuple(draw(st.lists(st.integers(1, 9), min_size=1, max_size=4)))
    n = math.prod(shape)
    value = st.one_of(st.sampled_from(EDGE), st.floats(-2, 2, width=32))
    mk = lambda: torch.tensor(draw(st.lists(value, min_size=n, max_size=n)), dtype=torch.float64).reshape(shape)
    x_adv, grad = mk(), mk()
    x = torch.tensor(draw(st.lists(st.floats(-1, 2, width=32), min_size=n, max_size=n)),
                     dtype=torch.float64).reshape(shape)
    lo = draw(st.sampled_from([0.0, -1.0, 0.25]))
    hi = lo + draw(st.sampled_from([0.0, 0.5, 1.0, math.inf]))
    # Budgets up to float32's max (an infinite one is refused: tests/test_op_contract.py).
    eps = draw(st.sampled_from([0.0, 1e-30, 8 / 255, 0.3, 1.0, 3.4e38]))
    alpha = draw(st.sampled_from([0.0, 2 / 255, -0.01, 0.5, 1e-38]))
    per_sample = draw(st.booleans())
    if per_sample:
        eps = torch.tensor(draw(st.lists(st.sampled_from([0.0, 0.01, 0.5, 3.4e38]), min_size=shape[0],
                                         max_size=shape[0])))
    return [t.to(dtype) for t in (x_adv, grad, x)] + [alpha, eps, lo, hi]


def same(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.needs_extension
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_kernels_equal_reference(case):
    x_adv, grad, x, alpha, eps, lo, hi = case
    e_f, e_t = (0.0, eps) if isinstance(eps, torch.Tensor) else (eps, None)
    out = ops.linf_step(x_adv, grad, x, alpha, eps, lo, hi)
    same(out, reference.linf_step(x_adv, grad, x, alpha, e_f, lo, hi, None, e_t))
    same(ops.linf_project(x_adv, x, eps, lo, hi), reference.linf_project(x_adv, x, e_f, lo, hi, e_t))
    same(ops.fgsm(x, grad, eps, lo, hi), reference.fgsm(x, grad, e_f, lo, hi, e_t))
    seed = torch.tensor(99)
    same(torch.ops.robust_ext.linf_random_init(x, e_f, lo, hi, seed, e_t),
         reference.linf_random_init(x, e_f, lo, hi, seed, e_t))


@settings(max_examples=200, deadline=None)
@given(cases())
def test_invariants_hold_for_finite_inputs(case):
    """For finite x and x_adv: no NaN whatever the gradient, inside [lo, hi] and the eps-ball (up to rounding)."""
    x_adv, grad, x, alpha, eps, lo, hi = case
    x_adv = torch.nan_to_num(x_adv, nan=0.5, posinf=1.0, neginf=-1.0).clamp(-1e4, 1e4)
    out = ops.linf_step(x_adv, grad, x, alpha, eps, lo, hi)
    assert not out.isnan().any()
    assert (out >= lo).all() and (out <= hi).all()
    e = eps.reshape((-1,) + (1,) * (x.dim() - 1)).double() if isinstance(eps, torch.Tensor) else eps
    inside = (x.double() >= lo) & (x.double() <= hi)  # the ball and the box meet only if x is in the box
    tol = 2 * torch.finfo(x.dtype).eps * (x.double().abs() + 1)
    assert ((out.double() - x.double()).abs() <= e + tol)[inside].all()
