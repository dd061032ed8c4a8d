"""AutoAttack's ``fast`` version: MALT's target ranking (against its closed form on linear models, where the
linearization is exact), the gate that runs FAB-T and Square only where the sanity checks flag points, and
fast's robust accuracy against ``standard``'s on a trained model."""
import dataclasses
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import _autoattack_worker as worker
from robust_ext.attacks import apgd_t
from robust_ext.attacks.apgd import rank_targets
from robust_ext.attacks.threats import L2, LINF, ThreatModel
from robust_ext.evaluation import AttackSpec, EvaluationWarning, autoattack, make_attack
from robust_ext.evaluation import autoattack_versions as versions


class Affine(nn.Module):
    """z = W (x - x0) + b: its linearization is itself."""

    def __init__(self, w, b, x0):
        super().__init__()
        self.w, self.b, self.x0 = w, b, x0

    def forward(self, x):
        return (x - self.x0).flatten(1) @ self.w.T + self.b


def _malt_closed_form(w, z, y, candidates, dual):
    """Per sample: the `candidates` most likely other classes, ordered by (z_y - z_t) / ||w_y - w_t||_dual."""
    out = []
    for zi, yi in zip(z, y):
        others = [c for c in np.argsort(-zi, kind="stable") if c != yi][:candidates]
        dist = [(zi[yi] - zi[t]) / np.linalg.norm(w[yi] - w[t], ord=dual) for t in others]
        out.append([others[k] for k in np.argsort(dist, kind="stable")])
    return np.array(out)


@pytest.mark.parametrize("threat, dual", [(LINF, 1), (L2, 2)])
@pytest.mark.parametrize("candidates", [9, 4])
def test_malt_ranking_is_the_linear_boundary_distance(threat, dual, candidates):
    g = torch.Generator().manual_seed(0)
    d = 12
    # Rows of very different norms: the nearest boundary is often not the second-largest logit.
    w = torch.randn(10, d, generator=g, dtype=torch.float64) * torch.logspace(-1, 1, 10, dtype=torch.float64)[:, None]
    b = torch.randn(10, generator=g, dtype=torch.float64)
    x = torch.rand(32, 1, 3, 4, generator=g, dtype=torch.float64)
    model = Affine(w, b, 0.5)
    z = model(x)
    y = z.argmax(1)
    got = rank_targets(model, x, y, z, threat, "malt", candidates)
    expected = _malt_closed_form(w.numpy(), z.detach().numpy(), y.numpy(), candidates, dual)
    assert got.shape == (32, candidates) and (got.numpy() == expected).all()
    logits = rank_targets(model, x, y, z, threat, "logits")
    assert (logits.numpy() == np.argsort(-z.detach().numpy(), 1, kind="stable")[:, 1:]).all()
    assert (got.numpy() != logits[:, :candidates].numpy()).any(), "the case must tell the two orders apart"


def _decoy_case(n=4, d=20):
    """Class 0 predicted; class 1 second by logit but out of reach (no weight); class 2 third but reachable
    (L-inf eps 0.05 moves its logit by 0.05 * d = 1 > the gap of 0.5)."""
    w = torch.zeros(10, d)
    w[2] = 1.0
    b = torch.tensor([1.0, 0.9, 0.5] + [-5.0] * 7)
    return Affine(w, b, 0.5), torch.full((n, 1, 4, 5), 0.5), torch.zeros(n, dtype=torch.long)


@pytest.mark.parametrize("order, fooled", [("malt", True), ("logits", False)])
def test_one_malt_target_reaches_the_boundary_the_logits_order_misses(order, fooled):
    model, x, y = _decoy_case()
    x_adv = apgd_t(model, x, y, eps=0.05, steps=20, n_target_classes=1, target_order=order,
                   generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert ((model(x_adv).argmax(1) != y).all() if fooled else (model(x_adv).argmax(1) == y).all())
    assert (x_adv - x).abs().max() <= 0.05 + 1e-6


def test_malt_needs_the_threat_models_dual_norm():
    class NoDual(ThreatModel):
        name = "mine"
    model, x, y = _decoy_case()
    with pytest.raises(NotImplementedError, match="has no dual_norm"):
        rank_targets(model, x, y, model(x), NoDual(), "malt")
    with pytest.raises(ValueError, match="target_order must be 'logits' or 'malt', got 'random'"):
        apgd_t(model, x, y, eps=0.05, target_order="random")
    with pytest.raises(ValueError, match="malt_candidates"):
        apgd_t(model, x, y, eps=0.05, target_order="malt", malt_candidates=0)


def test_fast_version_list():
    version, specs = versions.resolve_ensemble("fast", None)
    assert version == "fast" and [s.name for s in specs] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    ce, t, fab, square = specs
    assert ce.params["steps"] == 100 and ce.params["loss"] == "ce" and ce.gate is None
    assert (t.params["steps"], t.params["n_target_classes"], t.params["target_order"]) == (100, 3, "malt")
    assert t.gate is None and fab.gate is None and square.gate == "escalate"
    assert (fab.params["steps"], fab.params["n_target_classes"]) == (100, 3) and square.params["n_queries"] == 5000


class Rounded(nn.Module):
    """Piecewise constant in the input where ``mask`` is set: an all-zero gradient for those points."""

    def __init__(self, model, masked):
        super().__init__()
        self.model, self.masked = model, masked

    def forward(self, v):
        rounded = torch.round(v * 4) / 4
        keep = self.masked(v).view(-1, *([1] * (v.dim() - 1)))
        return self.model(torch.where(keep, rounded, v))


def _gated_run(model, x, y, gate="flagged", first=None):
    calls = []
    noise = make_attack("noise", draws=1)

    def spy(m, xs, ys, eps, norm, lo, hi, generator, rebind):
        calls.append(xs.clone())
        return noise.run(m, xs, ys, eps, norm, lo, hi, generator, rebind)
    gated = dataclasses.replace(noise, name="gated", run=spy, gate=gate)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EvaluationWarning)
        r = autoattack(model, (x, y), eps=0.02, attacks=[first or make_attack("apgd", steps=5), gated],
                       batch_size=16, progress=False)
    seen = torch.cat(calls) if calls else x[:0]
    return r, seen


def test_gated_attack_runs_only_on_the_points_the_checks_flag(one_thread):
    base, x, y = worker.case(n=48)
    # smooth everywhere: no point flagged, the gated attack never runs
    r, seen = _gated_run(base, x, y)
    assert r.results[0]["attacked"]["gated"] == 0 and len(seen) == 0 and r.checks["zero_gradient_points"] == 0
    # an all-zero gradient on the points with a bright first pixel: those of them still robust, and only them
    masked = lambda v: v.flatten(1)[:, 0] > 0.5  # noqa: E731
    r, seen = _gated_run(Rounded(base, masked), x, y)
    flagged = masked(x)
    robust_before = torch.tensor([f not in ("clean", "apgd") for f in r.fooled_by[0]])
    expected = x[flagged & robust_before]
    assert r.checks["zero_gradient_points"] > 0 and len(expected) > 0
    assert r.results[0]["attacked"]["gated"] == len(expected) == len(seen)
    assert torch.equal(seen.sort(0).values, expected.sort(0).values) or \
        sorted(map(tuple, seen.flatten(1).tolist())) == sorted(map(tuple, expected.flatten(1).tolist()))
    # a check about the whole model (softmax outputs): every point still robust
    r, seen = _gated_run(nn.Sequential(base, nn.Softmax(1)), x, y)
    assert r.checks["softmax_output"] and r.results[0]["attacked"]["gated"] == len(seen) == sum(
        f not in ("clean", "apgd") for f in r.fooled_by[0])
    assert "gated ran only on the points the checks flag" in r.summary()


def _fools(points):
    """An attack that moves each of ``points`` (told apart by their pixels) by +0.01 in every pixel (within the
    ε = 0.02 ball) and returns every other input unchanged: with :class:`Flip` it fools exactly those."""
    def run(m, xs, ys, eps, norm, lo, hi, generator, rebind):
        out = xs.clone()
        for k in range(len(xs)):
            if any(torch.equal(xs[k], p) for p in points):
                out[k] = (xs[k] + 0.01).clamp(0, 1)
        return out
    return AttackSpec("first", "custom", {}, run)


class Flip(nn.Module):
    """``base``, but the images ``_fools(fool)`` returns for the points ``fool`` get another class's logits."""

    def __init__(self, base, fool):
        super().__init__()
        self.base, self.fool = base, fool

    def forward(self, v):
        z = self.base(v)
        hit = torch.zeros(len(v), dtype=torch.bool)
        for target in self.fool:
            hit |= ((v - (target + 0.01).clamp(0, 1)).flatten(1).abs().amax(1) == 0)
        return torch.where(hit[:, None], z.roll(1, dims=1), z)


def test_escalating_gate_runs_everywhere_only_after_the_attack_before_it_fooled_a_point(one_thread):
    base, x, y = worker.case(n=48)
    with torch.no_grad():
        correct = (base(x).argmax(1) == y).nonzero().squeeze(1)
    # the attack before it fools nothing: the escalating gate acts as "flagged" (no point flagged here)
    r, seen = _gated_run(base, x, y, gate="escalate", first=_fools([]))
    assert r.results[0]["fooled"]["first"] == 0 and r.results[0]["attacked"]["gated"] == 0 and len(seen) == 0
    # it fools two points: every other point still robust is attacked
    fool = [x[correct[0]], x[correct[5]]]
    r, seen = _gated_run(Flip(base, fool), x, y, gate="escalate", first=_fools(fool))
    assert r.results[0]["fooled"]["first"] == 2
    assert r.results[0]["attacked"]["gated"] == len(seen) == len(correct) - 2
    assert "gated ran on the points the checks flag, or on all when first fooled any" in r.summary()
    # the plain "flagged" gate after the same attack still runs nowhere
    r, seen = _gated_run(Flip(base, fool), x, y, gate="flagged", first=_fools(fool))
    assert r.results[0]["fooled"]["first"] == 2 and len(seen) == 0
    with pytest.raises(ValueError, match="gate must be one of"):
        dataclasses.replace(make_attack("noise"), gate="sometimes")


@pytest.mark.parametrize("eps", [0.1, 0.15])
def test_fast_is_as_strong_as_standard(one_thread, eps):
    """On the trained case: fast's robust accuracy within 0.3 points of standard's (on 96 points: equal)."""
    model, x, y = worker.case()
    kw = dict(eps=eps, batch_size=96, progress=False, seed=0)
    standard = autoattack(model, (x, y), version="standard", **kw)
    fast = autoattack(model, (x, y), version="fast", **kw)
    assert 0.2 < standard.robust_accuracy() < fast.clean_accuracy, "the case must leave some points robust"
    assert fast.robust_accuracy() <= standard.robust_accuracy() + 0.003
    # FAB-T runs on every point APGD left; Square only after FAB-T fooled one (no check fires on this model)
    r, n = fast.results[0], fast.n_samples
    assert r["attacked"]["fab-t"] == round(r["accuracy_after"]["apgd-t"] * n)
    assert r["attacked"]["square"] == (round(r["accuracy_after"]["fab-t"] * n) if r["fooled"]["fab-t"] else 0)
