"""The ops' contract for what would otherwise corrupt a result: non-finite budgets, elements of x_adv that
alias each other, per-sample budgets that alias x_adv. The extension and the reference refuse the same."""
import math

import pytest
import torch

from robust_ext import ops

pytestmark = pytest.mark.usefixtures("impl")

X = torch.rand(4, 3, 5, 5)
G = torch.where(torch.rand(4, 3, 5, 5) > 0.5, torch.randn(4, 3, 5, 5), torch.zeros(4, 3, 5, 5))  # zero entries

FINITE = "must be finite and at most 3.40282e\\+38"
STEPS = [
    ("linf_step", lambda a, e: ops.linf_step(X.clone(), G, X, a, e)),
    ("l2_step", lambda a, e: ops.l2_step(X.clone(), G, X, a, e)),
    ("linf_apgd_update", lambda a, e: ops.linf_apgd_update(X.clone(), X, G, X, a, e, 0.75)),
    ("l2_apgd_update_", lambda a, e: ops.l2_apgd_update_(X.clone(), X, G, X, a, e, 0.75)),
]


@pytest.mark.parametrize("name, step", STEPS)
@pytest.mark.parametrize("alpha, eps, which", [
    (math.inf, 0.1, "alpha"), (-math.inf, 0.1, "alpha"), (1e39, 0.1, "alpha"),  # 1e39 overflows float32
    (0.01, math.inf, "eps"), (0.01, 10 ** 400, "eps"),
])
def test_non_finite_scalar_budgets_are_refused(name, step, alpha, eps, which):
    with pytest.raises(RuntimeError, match=f"{which} {FINITE}"):
        step(alpha, eps)


def test_non_finite_budgets_everywhere():
    for call in (lambda: ops.fgsm(X, G, math.inf), lambda: ops.fgm(X, G, 1e39), lambda: ops.linf_project(X, X, 1e39),
                 lambda: ops.l2_project(X, X, math.inf), lambda: ops.linf_random_init(X, math.inf),
                 lambda: ops.l2_random_init(X, 10 ** 400)):
        with pytest.raises(RuntimeError, match=f"eps {FINITE}"):
            call()


@pytest.mark.parametrize("bad", [math.inf, 1e39])
def test_non_finite_per_sample_budgets_are_refused(bad):
    eps = torch.tensor([0.1, 0.2, bad, 0.3], dtype=torch.float64)
    with pytest.raises(RuntimeError, match="eps must be >= 0 and not NaN for every sample, and finite"):
        ops.linf_step(X.clone(), G, X, 0.01, eps)
    with pytest.raises(RuntimeError, match="alpha must not be NaN for any sample, and finite"):
        ops.l2_step(X.clone(), G, X, eps, 0.1)
    with pytest.raises(RuntimeError, match="eps must be >= 0 and not NaN for every sample, and finite"):
        ops.l2_apgd_update(X.clone(), X, G, X, 0.01, eps, 0.75)
    with pytest.raises(RuntimeError, match="alpha must not be NaN for any sample, and finite"):
        ops.linf_apgd_update_(X.clone(), X, G, X, eps, 0.1, 0.75)


def test_the_largest_finite_budget_writes_no_nan():
    out = ops.linf_step(X.clone(), G, X, torch.finfo(torch.float32).max, 0.1)
    assert not out.isnan().any() and ((out - X).abs() <= 0.1 + 1e-7).all()


def test_x_adv_whose_elements_alias_each_other_is_refused():
    base = torch.rand(16)
    x = torch.rand(4, 4)
    for x_adv in (base.as_strided((4, 4), (1, 1)), base[:4].expand(4, 4)):
        with pytest.raises(RuntimeError, match="more than one element of the written-to tensor"):
            ops.linf_project_(x_adv, x, 0.1)
        with pytest.raises(RuntimeError, match="more than one element of the written-to tensor"):
            ops.l2_step_(x_adv, x, x, 0.1, 0.1)
        with pytest.raises(RuntimeError, match="more than one element of the written-to tensor"):
            ops.linf_apgd_update_(x_adv, x, x, x, 0.1, 0.1, 0.75)
    strided = torch.rand(4, 8)[:, ::2]  # not dense, but no two elements alias: accepted
    assert ops.linf_project_(strided, x, 0.1) is strided


def test_a_per_sample_budget_that_views_x_adv_is_refused():
    x_adv, x = torch.rand(4, 4), torch.rand(4, 4)
    for eps in (x_adv[:, 0], x_adv.view(-1)[:4]):
        with pytest.raises(RuntimeError, match="some elements of the input tensor and the written-to tensor"):
            ops.linf_project_(x_adv, x, eps)
        with pytest.raises(RuntimeError, match="some elements of the input tensor and the written-to tensor"):
            ops.l2_step_(x_adv, x, x, eps, 0.5)
        with pytest.raises(RuntimeError, match="some elements of the input tensor and the written-to tensor"):
            ops.l2_apgd_update_(x_adv, x, x, x, 0.1, eps, 0.75)
    ops.linf_project_(x_adv, x, x_adv[:, 0].clone())  # a copy is fine
