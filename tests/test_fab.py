"""robust_ext.attacks.fab: FAB and FAB-T (Croce & Hein 2020).

* The projections against exact solutions of the same problems on random small ones (the box binding on
  some coordinates, the hyperplane out of the box's reach on others): L-inf against scipy's linprog, L2
  against an enumeration of every active set (each coordinate free, at its lower or at its upper bound).
* Linear models, where the smallest adversarial perturbation has a closed form: FAB fools a point exactly when
  ``eps`` is a little above it (the reference's 1.05 overshoot and 0.9 backward step converge from above) and
  never below it; FAB-T finds it only when the nearest boundary's class is among its target classes.
* Invariants: within eps and the box, dtype kept, points not fooled returned clean, early stop equals running
  every iteration, the model's mode and parameters' grads untouched, reproducibility.
* The reference's trajectory: the first run (no random start) finds the same smallest perturbation per point
  as torchattacks' ``FAB`` (a port of fra31/auto-attack's), up to float rounding.
* Strength on conftest's digits CNN against torchattacks' FAB (a port of the reference; 100 steps, one restart;
  ``multi_targeted`` with 10 classes for FAB-T), L-inf and L2, on the first 100 of the 250 test digits to keep
  the file short.
"""
import copy
import importlib
import itertools
import math

import pytest
import torch
from torch import nn

from robust_ext import attacks as A
from robust_ext.attacks.fab import fab, fab_t
from robust_ext.attacks.fab_projections import project_l2, project_linf

from conftest import DEVICES

pytestmark = pytest.mark.usefixtures("one_thread")

EPS = {"linf": 0.1, "l2": 0.5}  # digits CNN, 100 points: clean 98%, FAB about 45% at both
P = {"linf": math.inf, "l2": 2.0}


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def fooled(model, x, y):
    with torch.no_grad():
        return model(x).argmax(1) != y


def dist(a, b, p):
    return (a.double() - b.double()).flatten(1).norm(p=p, dim=1)


# ---- the projections against exact solutions -------------------------------------------------------------

def _problems(seed, m, n, lo, hi):
    """Random rows: points with some coordinates on the box's bounds, hyperplanes near and far."""
    g = torch.Generator().manual_seed(seed)
    x = lo + (hi - lo) * torch.rand(m, n, generator=g, dtype=torch.float64)
    on_bound = torch.rand(m, n, generator=g) < 0.25
    x = torch.where(on_bound, torch.where(torch.rand(m, n, generator=g) < 0.5, lo, hi), x).to(torch.float64)
    w = torch.randn(m, n, generator=g, dtype=torch.float64)
    w[torch.rand(m, n, generator=g) < 0.1] = 0.0
    w[0] = 0.0  # a hyperplane with w = 0: nothing moves
    # b from a random box point pushed away: most rows need to move, some cannot reach the plane in the box
    z = lo + (hi - lo) * torch.rand(m, n, generator=g, dtype=torch.float64)
    b = (w * z).sum(1) * (1 + 2 * torch.rand(m, generator=g, dtype=torch.float64))
    return x, w, b


def _linprog_linf(x, w, b, lo, hi):
    """min t s.t. |d_i| <= t, w.(x + d) = b, lo <= x + d <= hi; None when infeasible."""
    from scipy.optimize import linprog
    n = len(x)
    c = [0.0] * n + [1.0]
    rows = []
    for i in range(n):  # d_i - t <= 0, -d_i - t <= 0
        rows.append([1.0 if j == i else 0.0 for j in range(n)] + [-1.0])
        rows.append([-1.0 if j == i else 0.0 for j in range(n)] + [-1.0])
    res = linprog(c, A_ub=rows, b_ub=[0.0] * (2 * n), A_eq=[list(w) + [0.0]], b_eq=[b - float(w @ x)],
                  bounds=[(lo - xi, hi - xi) for xi in x] + [(0, None)], method="highs")
    return res.x[-1] if res.status == 0 else None


def _box_min(x, w, b, lo, hi):
    """The smallest |w.z - b| over the box (an LP over z with the sign of w.x - b)."""
    from scipy.optimize import linprog
    s = 1.0 if float(w @ x) - b >= 0 else -1.0
    res = linprog(list(s * w), bounds=[(lo, hi)] * len(x), method="highs")
    return abs(res.fun - s * b)


def _enumerate_l2(x, w, b, lo, hi):
    """The exact min ||d||_2 s.t. w.(x + d) = b in the box: every coordinate free, at lo or at hi; the free
    ones take the least-norm solution of the equality. None when infeasible."""
    best = None
    for state in itertools.product((0, 1, 2), repeat=len(x)):
        d = torch.zeros_like(x)
        free = torch.tensor([s == 0 for s in state])
        for i, s in enumerate(state):
            if s:
                d[i] = (lo if s == 1 else hi) - x[i]
        r = b - float(w @ (x + d))
        wf = torch.where(free, w, torch.zeros_like(w))
        nf = float(wf @ wf)
        if nf == 0.0:
            if abs(r) > 1e-12:
                continue
        else:
            d = d + r / nf * wf
        if ((x + d) < lo - 1e-12).any() or ((x + d) > hi + 1e-12).any():
            continue
        if best is None or d.norm() < best.norm():
            best = d
    return best


@pytest.mark.parametrize("lo,hi", [(0.0, 1.0), (-1.0, 2.0)])
def test_projection_linf_is_the_linear_programs_solution(lo, hi):
    x, w, b = _problems(1, 60, 5, lo, hi)
    d = project_linf(x, w, b, lo, hi)
    assert torch.equal(d[0], torch.zeros_like(d[0]))
    assert ((x + d) >= lo - 1e-12).all() and ((x + d) <= hi + 1e-12).all()
    assert ((w == 0) <= (d == 0)).all()
    kinds = {"free": 0, "binding": 0, "out of reach": 0}
    for i in range(1, len(x)):
        t = _linprog_linf(x[i], w[i], float(b[i]), lo, hi)
        reached = float(w[i] @ (x[i] + d[i]))
        if t is None:  # the plane misses the box: the box point closest to it
            kinds["out of reach"] += 1
            assert abs(abs(reached - b[i]) - _box_min(x[i], w[i], float(b[i]), lo, hi)) < 1e-9
            continue
        assert abs(reached - b[i]) < 1e-9
        assert abs(d[i].abs().max() - t) < 1e-8, (i, d[i].abs().max().item(), t)
        # The reference's choice among the optima: every coordinate with w != 0 moves by t, or to the box.
        room = torch.where(w[i] * torch.sign(float(w[i] @ x[i]) - b[i]) > 0, x[i] - lo, hi - x[i])
        expected = torch.where(w[i] != 0, torch.minimum(room, torch.full_like(room, t)), torch.zeros_like(room))
        torch.testing.assert_close(d[i].abs(), expected, rtol=0, atol=1e-8)
        kinds["binding" if (room < t - 1e-9).any() else "free"] += 1
    assert min(kinds.values()) >= 3, kinds  # every case is exercised


@pytest.mark.parametrize("lo,hi", [(0.0, 1.0), (-1.0, 2.0)])
def test_projection_l2_is_the_exact_solution(lo, hi):
    x, w, b = _problems(2, 60, 4, lo, hi)
    d = project_l2(x, w, b, lo, hi)
    assert torch.equal(d[0], torch.zeros_like(d[0]))
    kinds = {"free": 0, "binding": 0, "out of reach": 0}
    for i in range(1, len(x)):
        exact = _enumerate_l2(x[i], w[i], float(b[i]), lo, hi)
        reached = float(w[i] @ (x[i] + d[i]))
        if exact is None:
            kinds["out of reach"] += 1
            assert abs(abs(reached - b[i]) - _box_min(x[i], w[i], float(b[i]), lo, hi)) < 1e-9
            continue
        torch.testing.assert_close(d[i], exact, rtol=0, atol=1e-9)
        on_box = ((x[i] + exact - lo).abs() < 1e-12) | ((x[i] + exact - hi).abs() < 1e-12)
        kinds["binding" if (on_box & (exact != 0)).any() else "free"] += 1
    assert min(kinds.values()) >= 3, kinds


def test_projection_float32_matches_float64():
    x, w, b = _problems(3, 200, 64, 0.0, 1.0)
    for project in (project_linf, project_l2):
        exact = project(x, w, b)
        single = project(x.float(), w.float(), b.float())
        assert single.dtype == torch.float32
        torch.testing.assert_close(single.double(), exact, rtol=0, atol=1e-5)


# ---- linear models: the smallest perturbation in closed form ----------------------------------------------

def _linear(weight, bias):
    model = nn.Sequential(nn.Flatten(), nn.Linear(weight.shape[1], weight.shape[0]))
    with torch.no_grad():
        model[1].weight.copy_(weight)
        model[1].bias.copy_(bias)
    return model


def _smallest(model, x, y, dual):
    """min over j != y of (f_y - f_j) / ||w_y - w_j||_dual: the distance to misclassification (box aside)."""
    weight = model[1].weight.double()
    with torch.no_grad():
        z = model(x).double()
    margin = z.gather(1, y[:, None]) - z
    norms = (weight[y][:, None, :] - weight[None]).norm(p=dual, dim=2)
    return torch.where(torch.arange(z.shape[1])[None] == y[:, None], math.inf, margin / norms).amin(1)


@pytest.mark.parametrize("norm,dual", [("linf", 1.0), ("l2", 2.0)])
def test_linear_model_fooled_exactly_above_the_smallest_perturbation(norm, dual):
    g = gen(5)
    weight = torch.randn(5, 6, generator=g)
    model = _linear(weight, -0.5 * weight.sum(1) + 0.05 * torch.randn(5, generator=g))  # boundaries near 0.5
    x = 0.4 + 0.2 * torch.rand(64, 1, 2, 3, generator=g)  # far enough from the box for it not to bind
    y = model(x).argmax(1).detach()
    d = _smallest(model, x, y, dual)
    assert d.max() < 0.25
    above = fab(model, x, y, eps=(d * 1.06).float(), norm=norm)
    assert fooled(model, above, y).all()
    assert (dist(above, x, P[norm]) <= d * 1.06 + 1e-6).all()
    below = fab(model, x, y, eps=(d * 0.99).float(), norm=norm, restarts=3, generator=g)
    assert torch.equal(below, x)
    # Without early stop FAB goes on shrinking: it ends within 1% of the minimum, never below it.
    full = fab(model, x, y, eps=(d * 1.06).float(), norm=norm, early_stop=False)
    assert fooled(model, full, y).all()
    ratio = dist(full, x, P[norm]) / d
    assert (ratio >= 1 - 1e-5).all() and (ratio <= 1.01).all(), (ratio.min(), ratio.max())


def test_fab_t_targets_the_most_likely_classes():
    # y = 0 by a margin of 1 over class 1 and 2 over class 2, but class 2's boundary is 10x nearer in L-inf.
    weight = torch.tensor([[0.0, 0.0], [-1.0, -1.0], [20.0, 20.0]])
    model = _linear(weight, torch.tensor([0.0, -1.0, -2.0 - 20.0]))
    x = torch.full((4, 1, 1, 2), 0.5)
    y = torch.zeros(4, dtype=torch.long)
    assert torch.equal(model(x).argmax(1), y)
    # class 1 is reached at L-inf distance 1/2 (box aside), class 2 at 2/40 = 0.05
    one = fab_t(model, x, y, eps=0.06, n_target_classes=1)
    assert torch.equal(one, x)
    nine = fab_t(model, x, y, eps=0.06, n_target_classes=9)  # capped at the 2 other classes
    assert fooled(model, nine, y).all() and (dist(nine, x, math.inf) <= 0.06).all()
    assert fooled(model, fab(model, x, y, eps=0.06), y).all()


# ---- invariants -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("targeted", [False, True])
def test_within_eps_in_the_box_and_clean_when_not_fooled(digits, norm, targeted):
    model, x, y = digits
    x, y = x[:48], y[:48]
    eps = torch.linspace(0.0, 2 * EPS[norm], 48)
    x_adv = fab(model, x, y, eps=eps, norm=norm, steps=20, targeted=targeted, n_target_classes=3, restarts=2,
                generator=gen())
    hit = fooled(model, x_adv, y)
    assert 0 < hit.sum() < 48
    assert (dist(x_adv, x, P[norm]) <= eps.double()).all()
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    assert torch.equal(x_adv[~hit], x[~hit])
    lo, hi = -1.0, 2.0
    wide = fab(model, x, y, eps=3 * EPS[norm], norm=norm, steps=20, clip_min=lo, clip_max=hi)
    assert wide.min() >= lo and wide.max() <= hi and (dist(wide, x, P[norm]) <= 3 * EPS[norm] + 1e-6).all()


def test_dtype_kept_and_misclassified_returned_clean(digits):
    model, x, y = digits
    x, y = x[:32], y[:32]
    model64 = copy.deepcopy(model).double()
    x_adv = fab(model64, x.double(), y, eps=EPS["linf"], steps=10)
    assert x_adv.dtype == torch.float64 and fooled(model64, x_adv, y).any()
    assert (dist(x_adv, x, math.inf) <= EPS["linf"]).all()
    wrong = (y + 1) % 10
    assert torch.equal(fab(model, x, wrong, eps=EPS["linf"], steps=5), x)
    assert fab(model, x[:0], y[:0], eps=0.1).shape == x[:0].shape


def test_model_mode_and_parameter_grads(digits):
    model, x, y = digits
    trained = copy.deepcopy(model).train()
    out = fab(trained, x[:16], y[:16], eps=EPS["linf"], steps=5)
    assert trained.training and all(m.training for m in trained.modules())
    assert all(p.grad is None for p in trained.parameters())
    torch.testing.assert_close(out, fab(model, x[:16], y[:16], eps=EPS["linf"], steps=5), rtol=0, atol=0)


@pytest.mark.parametrize("norm,targeted", [("linf", False), ("l2", True)])
def test_early_stop_equals_every_iteration_in_robust_accuracy(digits, norm, targeted):
    model, x, y = digits
    x, y = x[:64], y[:64]
    kw = dict(eps=EPS[norm], norm=norm, steps=30, targeted=targeted, n_target_classes=2, restarts=2)
    stopped = fab(model, x, y, early_stop=True, generator=gen(), **kw)
    full = fab(model, x, y, early_stop=False, generator=gen(), **kw)
    assert torch.equal(fooled(model, stopped, y), fooled(model, full, y))
    assert 0.1 < fooled(model, full, y).float().mean() < 0.9


@pytest.mark.parametrize("device", DEVICES)
def test_device_comes_from_the_inputs(digits, device):
    model, x, y = digits
    x, y = x[:32], y[:32]
    on_device = copy.deepcopy(model).to(device)
    # The generator's own device, and a CPU one for any device (what the evaluation hands every attack).
    for norm, gen_device in (("linf", device), ("l2", device), ("linf", "cpu"), ("l2", "cpu")):
        x_adv = fab(on_device, x.to(device), y.to(device), eps=EPS[norm], norm=norm, steps=10, restarts=2,
                    generator=torch.Generator(gen_device).manual_seed(0))
        assert x_adv.device == x.to(device).device
        assert (dist(x_adv.cpu(), x, P[norm]) <= EPS[norm] + 1e-6).all() and fooled(model, x_adv.cpu(), y).any()


def test_reproducible_from_a_generator(digits):
    model, x, y = digits
    x, y = x[:48], y[:48]
    runs = [fab(model, x, y, eps=EPS["l2"], norm="l2", steps=10, restarts=3, generator=gen(s)) for s in (3, 3, 4)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


# ---- the reference's trajectory and strength, against torchattacks ------------------------------------------

@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("targeted", [False, True])
def test_first_run_is_the_references(digits, norm, targeted):
    """The first run starts at x (no randomness): with a budget no point exceeds and every iteration run, the
    smallest adversarial perturbation found per point is the reference's, up to float rounding."""
    torchattacks = pytest.importorskip("torchattacks")
    model, x, y = digits
    x, y = x[:50], y[:50]
    ref = torchattacks.FAB(model, norm="Linf" if norm == "linf" else "L2", eps=1e6, steps=100, n_restarts=1,
                           multi_targeted=targeted, n_classes=10)
    if targeted:
        ref.target_class = 2  # the most likely other class
        theirs = ref.attack_single_run_targeted(x, y, use_rand_start=False)
    else:
        theirs = ref.attack_single_run(x, y, use_rand_start=False)
    ours = fab(model, x, y, eps=1e6, norm=norm, targeted=targeted, n_target_classes=1, early_stop=False)
    assert torch.equal(fooled(model, ours, y), fooled(model, theirs, y)) and fooled(model, ours, y).all()
    torch.testing.assert_close(dist(ours, x, P[norm]), dist(theirs, x, P[norm]), rtol=0, atol=1e-4)



@pytest.mark.parametrize("targeted, norm", [  # the default run keeps untargeted L2 (the others ~5-10 s each)
    pytest.param(False, "linf", marks=pytest.mark.slow), (False, "l2"),
    pytest.param(True, "linf", marks=pytest.mark.slow), pytest.param(True, "l2", marks=pytest.mark.slow)])
def test_as_strong_as_torchattacks(digits, norm, targeted):
    torchattacks = pytest.importorskip("torchattacks")
    model, x, y = digits
    x, y = x[:100], y[:100]
    ours = 100 - 100 * fooled(model, fab(model, x, y, eps=EPS[norm], norm=norm, targeted=targeted), y).float().mean()
    ref = torchattacks.FAB(model, norm="Linf" if norm == "linf" else "L2", eps=EPS[norm], steps=100, n_restarts=1,
                           multi_targeted=targeted, n_classes=10)
    theirs = 100 - 100 * fooled(model, ref(x, y), y).float().mean()
    assert 20 < ours < 80
    assert ours <= theirs + 0.5, (ours, theirs)


# ---- registry, evaluation, classes, errors ---------------------------------------------------------------

def test_registry_and_evaluation(digits):
    from robust_ext.evaluation import evaluate
    model, x, y = digits
    assert A.ATTACKS["fab_t"].defaults == {"steps": 100, "restarts": 1, "n_target_classes": 9, "alpha_max": 0.1,
                                           "eta": 1.05, "beta": 0.9, "early_stop": True, "final_search": True}
    assert A.ATTACKS["fab"].defaults["steps"] == 100 and A.ATTACKS["fab"].defaults["restarts"] == 1
    report = evaluate(model, (x[:16], y[:16]), ["fab_t"], eps=[0.3, 0.8], norm="l2", min_eps=False, large_eps=None,
                      progress=False)
    assert report.accuracy("fab_t", 0.8) < report.accuracy("fab_t", 0.3) < report.clean_accuracy


def test_classes_match_the_functions(digits):
    model, x, y = digits
    x, y = x[:24], y[:24]
    atk = A.FAB(model, "l2", eps=0.5, steps=10, restarts=2, generator=gen(1))
    assert repr(atk).startswith("FAB(norm='l2', eps=0.5, steps=10, restarts=2, alpha_max=0.1, eta=1.05, beta=0.9")
    torch.testing.assert_close(atk(x, y), fab(model, x, y, eps=0.5, norm="l2", steps=10, restarts=2,
                                              generator=gen(1)), rtol=0, atol=0)
    atk_t = A.FABT(model, eps=0.1, steps=10, n_target_classes=2)
    torch.testing.assert_close(atk_t(x, y), fab_t(model, x, y, eps=0.1, steps=10, n_target_classes=2), rtol=0, atol=0)


@pytest.mark.parametrize("call,match", [
    (lambda m, x, y: fab(m, x, y, eps=0.1, alpha_max=1.5), "alpha_max"),
    (lambda m, x, y: fab(m, x, y, eps=0.1, eta=0.0), "eta"),
    (lambda m, x, y: fab(m, x, y, eps=0.1, beta=-0.1), "beta"),
    (lambda m, x, y: fab(m, x, y, eps=0.1, steps=0), "steps"),
    (lambda m, x, y: fab(m, x, y, eps=0.1, targeted=True, n_target_classes=0), "n_target_classes"),
    (lambda m, x, y: fab(m, x, y, eps=0.1, norm="l1"), "norm"),
    (lambda m, x, y: A.FAB(m, beta=2.0), "beta"),
    (lambda m, x, y: A.FABT(m, n_target_classes=0), "n_target_classes"),
])
def test_bad_arguments_name_the_argument(digits, call, match):
    model, x, y = digits
    with pytest.raises(ValueError, match=match):
        call(model, x[:4], y[:4])


@pytest.mark.parametrize("final_search", [True, False])
def test_final_search_runs_only_when_asked(digits, monkeypatch, final_search):
    """AutoAttack's FAB has no final search (its versions pass ``final_search=False``); fab's default runs it on
    the points fooled only beyond eps."""
    fab_module = importlib.import_module("robust_ext.attacks.fab")  # the package's name `fab` is the function
    model, x, y = digits
    x, y = x[:32], y[:32]
    calls = []
    real = fab_module._final_search
    monkeypatch.setattr(fab_module, "_final_search", lambda *a: calls.append(a[1].shape[0]) or real(*a))
    # A budget far below what FAB needs: it fools points only beyond it.
    x_adv = fab(model, x, y, eps=0.01, norm="linf", steps=10, final_search=final_search, generator=gen())
    assert bool(calls) == final_search and (not calls or calls[0] > 0)
    assert (dist(x_adv, x, P["linf"]) <= 0.01 + 1e-6).all()
    with pytest.raises(ValueError, match="final_search must be True or False"):
        fab(model, x, y, eps=0.1, final_search="no")
