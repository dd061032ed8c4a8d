"""robust_ext.evaluation: numbers against direct recomputation and closed forms, gradient-masking checks on
deliberately masked models (and silence on a normal one), JSON, plots, reproducibility, errors.

The model is robust_ext's SmallCNN trained for a few seconds on scikit-learn's 8x8 digits; the closed-form
checks use linear models, whose minimal L-inf fooling eps from class i to j is (z_i - z_j) / |w_i - w_j|_1.
"""
import dataclasses
import functools
import json
import math
import struct
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from robust_ext import attacks as A
from robust_ext.data import load_dataset, make_loader
from robust_ext.evaluation import (EvaluationWarning, GradientMaskingWarning, MaskingThresholds, Report,
                                   evaluate, gradient_masking_warnings, make_attack, minimal_eps, pgd_trajectory,
                                   robustness_margin, transfer_matrix, zero_gradient_mask)
from robust_ext.evaluation import plots
from robust_ext.evaluation._inputs import generator
from robust_ext.evaluation.margin import bisection_steps
from robust_ext.models import SmallCNN

EPS = [0.05, 0.1, 0.2, 0.3]
INF = math.inf


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """8x8 images gain nothing from threads, and two OpenMP threads on a busy 2-core machine are slow."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _train(model, x, y, iters, lr, seed):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr)
    for _ in range(iters):
        idx = torch.randint(0, len(y), (128,), generator=g)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    for p in model.parameters():
        p.grad = None
    return model.eval()


@pytest.fixture(scope="module")
def digits(one_thread):
    """(SmallCNN trained on the digits train split, the test split: 359 images)."""
    pytest.importorskip("sklearn", reason="the digits data set is scikit-learn's")
    train, test = load_dataset("digits", split="train"), load_dataset("digits", split="test")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = _train(SmallCNN(in_channels=1, input_size=8), train.images, train.labels, 150, 3e-3, 0)
    return model, test


@pytest.fixture(scope="module")
def softmax_regression(digits):
    """A second, different digits model (linear), for transfer."""
    train = load_dataset("digits", split="train")
    with torch.random.fork_rng():
        torch.manual_seed(1)
        return _train(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), train.images, train.labels, 300, 3e-2, 1)


@pytest.fixture(scope="module")
def evaluated(digits, tmp_path_factory):
    """(report, the warnings it issued, its plot directory) for fgsm/pgd/noise on the whole test split."""
    model, test = digits
    out = tmp_path_factory.mktemp("plots")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = evaluate(model, test, ["fgsm", "pgd", "noise"], eps=EPS, seed=0, progress=False, plot_dir=out)
    return report, caught, out


def _predict(model, x):
    with torch.no_grad():
        return model(x).argmax(1)


# ------------------------------------------------------------------------------------------- accuracy numbers
def test_model_is_accurate_and_clean_accuracy_is_recomputed(digits, evaluated):
    model, test = digits
    report, _, _ = evaluated
    direct = int((_predict(model, test.images) == test.labels).sum()) / len(test)
    assert direct > 0.9
    assert report.clean_accuracy == direct
    assert report.n_samples == len(test) == 359


def test_accuracy_success_rate_and_norms_equal_a_direct_recomputation(digits, evaluated):
    """Re-run each attack batch by batch (batch_size 256: two batches) from the same seeded streams."""
    model, test = digits
    report, _, _ = evaluated
    x_all, y_all = test.images, test.labels
    clean = _predict(model, x_all) == y_all
    n_correct = int(clean.sum())
    worst = [clean.clone() for _ in EPS]
    for i, name in enumerate(["fgsm", "pgd", "noise"]):
        for j, e in enumerate(EPS):
            g = generator(0, 0, i, j)
            adv = []
            for s in range(0, len(y_all), 256):
                x, y = x_all[s:s + 256], y_all[s:s + 256]
                if name == "fgsm":
                    adv.append(A.fgsm(model, x, y, eps=e))
                elif name == "pgd":
                    adv.append(A.pgd(model, x, y, eps=e, alpha=2.5 * e / 10, steps=10, early_stop=True, generator=g))
                else:
                    from robust_ext import ops
                    adv.append(ops.linf_random_init(x, e, generator=g))
            x_adv = torch.cat(adv)
            robust = clean & (_predict(model, x_adv) == y_all)
            worst[j] &= robust
            r = report.attacks[name]
            assert r["accuracy"][j] == int(robust.sum()) / len(y_all)
            assert r["success_rate"][j] == (n_correct - int(robust.sum())) / n_correct
            delta = (x_adv - x_all).double().flatten(1)
            assert r["linf_max"][j] == pytest.approx(delta.abs().amax(1).max().item(), rel=1e-12)
            assert r["linf_mean"][j] == pytest.approx(delta.abs().amax(1).mean().item(), rel=1e-9)
            assert r["l2_mean"][j] == pytest.approx(delta.norm(dim=1).mean().item(), rel=1e-9)
            assert r["l2_max"][j] == pytest.approx(delta.norm(dim=1).max().item(), rel=1e-12)
            assert r["linf_max"][j] <= e + 1e-6
    assert report.worst_case["accuracy"] == [int(w.sum()) / len(y_all) for w in worst]


def test_digits_model_numbers_are_sensible(evaluated):
    """What an ordinary small CNN does: PGD at least as strong as FGSM, noise harmless, accuracy -> 0."""
    report, _, _ = evaluated
    fgsm, pgd, noise = (report.attacks[k]["accuracy"] for k in ("fgsm", "pgd", "noise"))
    assert all(p <= f + 1 / report.n_samples for f, p in zip(fgsm, pgd))
    assert pgd[-1] < 0.05 and min(noise) > 0.85
    assert all(w <= min(a) for w, a in zip(report.worst_case["accuracy"], zip(fgsm, pgd, noise)))
    assert report.diagnostics["large_eps"]["accuracy"] < 0.05


def test_attack_objects_and_callables(digits):
    """robust_ext and torchattacks objects get eps set per grid point (the caller's eps untouched); a partial
    of a functional attack is recognised as its kind; deterministic FGSM gives the same numbers in every form."""
    model, test = digits
    obj = A.FGSM(model, eps=0.5)
    atks = ["fgsm", obj, functools.partial(A.fgsm)]
    try:
        import torchattacks
        atks.append(torchattacks.FGSM(model, eps=0.5))
    except ImportError:  # a test-only peer; the rest of the test stands without it
        pass
    report = evaluate(model, (test.images[:150], test.labels[:150]), atks, eps=[0.1, 0.2], min_eps=False,
                      large_eps=None, progress=False)
    assert list(report.attacks) == ["fgsm"] + [f"fgsm-{k}" for k in range(2, len(atks) + 1)]  # labels numbered
    assert [a["kind"] for a in report.attacks.values()] == ["fgsm"] * len(atks)
    accs = [a["accuracy"] for a in report.attacks.values()]
    assert all(a == accs[0] for a in accs) and accs[0][1] < accs[0][0] < report.clean_accuracy
    assert all(a.eps == 0.5 for a in atks[1::2])


def test_input_forms_give_the_same_numbers(digits):
    model, test = digits
    kw = dict(eps=[0.1], min_eps=True, large_eps=None, progress=False, max_samples=100, batch_size=64)
    a = evaluate(model, test, ["fgsm", "pgd"], **kw)
    b = evaluate(model, make_loader(test, 64), ["fgsm", "pgd"], **kw)
    c = evaluate(model, (test.images, test.labels), ["fgsm", "pgd"], **kw)
    for r in (b, c):
        assert r.n_samples == 100
        assert (r.clean_accuracy, r.attacks, r.worst_case, r.min_eps) == (a.clean_accuracy, a.attacks, a.worst_case,
                                                                           a.min_eps)
    assert a.config["data"] == {"name": "digits", "split": "test", "n_samples": 100}


def test_same_seed_same_report_and_global_rng_untouched(digits):
    model, test = digits
    kw = dict(eps=[0.1, 0.2], progress=False, max_samples=80, seed=7)
    state = torch.get_rng_state()
    a = evaluate(model, test, ["pgd", "noise"], **kw).to_dict()
    assert torch.equal(torch.get_rng_state(), state)
    b = evaluate(model, test, ["pgd", "noise"], **kw).to_dict()
    c = evaluate(model, test, ["pgd", "noise"], **{**kw, "seed": 8}).to_dict()
    for d in (a, b, c):
        d.pop("timing")
    assert a == b
    assert a["min_eps"]["values"] != c["min_eps"]["values"]  # random starts do depend on the seed


def test_model_mode_is_restored():
    model = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(4, 3)).train()
    x, y = torch.rand(10, 1, 2, 2), torch.randint(0, 3, (10,))
    a = evaluate(model, (x, y), ["pgd"], eps=[0.1], progress=False)
    b = evaluate(model, (x, y), ["pgd"], eps=[0.1], progress=False)
    assert model.training and model[1].training
    assert a.clean_accuracy == b.clean_accuracy  # dropout was off


def test_progress_bar_can_be_disabled(capsys):
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    data = (torch.rand(40, 1, 2, 2), torch.randint(0, 3, (40,)))
    kw = dict(eps=[0.1], batch_size=8, min_eps=False, large_eps=None)
    evaluate(model, data, ["fgsm"], progress=False, **kw)
    assert capsys.readouterr().err == ""
    evaluate(model, data, ["fgsm"], progress=True, **kw)
    err = capsys.readouterr().err
    assert "evaluate:" in err and "/5 [" in err


# ------------------------------------------------------------------------------------------------------ margin
def test_margin_from_known_curves():
    m = robustness_margin([0.1, 0.2, 0.3], [0.9, 0.6, 0.2], 0.5, clean_accuracy=1.0)
    assert m == {"target": 0.5, "grid": 0.2, "interpolated": pytest.approx(0.225), "lower_bound": False}
    m = robustness_margin([0.3, 0.1, 0.2], [0.2, 0.9, 0.6], 0.5)  # unsorted in, same curve
    assert (m["grid"], m["interpolated"]) == (0.2, pytest.approx(0.225))
    m = robustness_margin([0.1], [0.1], 0.5, clean_accuracy=0.9)  # crosses before the first grid point
    assert (m["grid"], m["interpolated"]) == (0.0, pytest.approx(0.05))
    assert robustness_margin([0.1, 0.2], [0.5, 0.4], 0.5, 1.0)["interpolated"] == 0.1  # == target stays
    m = robustness_margin([0.1, 0.2], [0.4, 0.7], 0.5, 1.0)  # the first crossing counts, not a later recovery
    assert m["grid"] == 0.0 and m["interpolated"] == pytest.approx(0.1 * 0.5 / 0.6)
    m = robustness_margin([0.1, 0.2], [0.8, 0.7], 0.5, 1.0)
    assert (m["grid"], m["interpolated"], m["lower_bound"]) == (0.2, 0.2, True)
    m = robustness_margin([0.1], [0.3], 0.5, clean_accuracy=0.4)
    assert (m["grid"], m["interpolated"], m["lower_bound"]) == (None, None, False)
    with pytest.raises(ValueError, match="target"):
        robustness_margin([0.1], [0.3], 1.5)


def test_report_margin_is_the_curves_margin(evaluated):
    report, _, _ = evaluated
    for name, r in report.attacks.items():
        assert r["margin"] == robustness_margin(report.eps, r["accuracy"], 0.5, report.clean_accuracy)
    m = report.margin()
    assert 0.05 < m["interpolated"] < 0.3 and not m["lower_bound"]
    assert report.margin("noise")["lower_bound"]


def _linear(w, b):
    model = nn.Linear(w.shape[1], w.shape[0]).double()
    with torch.no_grad():
        model.weight.copy_(w)
        model.bias.copy_(b)
    return model


def _closed_form_min_eps(w, b, x):
    z = x @ w.T + b
    i = z.argmax(1)
    gaps = (z.gather(1, i[:, None]) - z) / (w[i][:, None, :] - w[None]).abs().sum(2)  # [N, C]; inf/nan at j = i
    gaps[torch.arange(len(x)), i] = INF
    return gaps.min(1).values, i


UNCLIPPED = dict(clip_min=-INF, clip_max=INF)


def test_min_eps_binary_linear_matches_closed_form():
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(2, 12, generator=g, dtype=torch.float64), torch.randn(2, generator=g, dtype=torch.float64)
    x = torch.randn(300, 12, generator=g, dtype=torch.float64)
    true, pred = _closed_form_min_eps(w, b, x)
    eps_max, tol = 0.8, 1e-3
    y = pred.clone()
    y[:5] = 1 - y[:5]  # misclassified: minimal eps 0
    est = minimal_eps(_linear(w, b), x, y, eps_max=eps_max, tol=tol, generator=g, **UNCLIPPED)
    assert torch.equal(est[:5], torch.zeros(5, dtype=torch.float64))
    est, true = est[5:], true[5:]
    never = true > eps_max
    assert 0 < int(never.sum()) < len(true) - 50
    assert bool(est[never].isinf().all())
    diff = est[~never] - true[~never]
    assert float(diff.min()) >= -1e-12 and float(diff.max()) <= tol  # hi of a bracket of width <= tol


def test_min_eps_multiclass_linear():
    """Weights on disjoint coordinates make every pair's |w_i - w_j|_1 equal, so the runner-up class is
    the closest, PGD reaches it and bisection must land within tol; for general weights untargeted PGD may reach a farther
    class, but never an eps below the closed form (each value comes with an adversarial example)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 16, generator=g, dtype=torch.float64)
    w = torch.cat([torch.eye(10), torch.zeros(10, 6)], 1).double() * 3
    b = torch.randn(10, generator=g, dtype=torch.float64)
    true, pred = _closed_form_min_eps(w, b, x)
    # the margin loss's gradient is zero on the coordinates of the classes that are not runner-up, so from a
    # random start those stay where the start put them: exact only from the clean point
    for pgd in (make_attack("pgd"), make_attack("pgd", loss="margin", random_start=False)):
        est = minimal_eps(_linear(w, b), x, pred, eps_max=4.0, tol=1e-3, attack=pgd, generator=g, **UNCLIPPED)
        assert bool((est >= true - 1e-12).all()) and bool((est <= true + 1e-3).all())
    w = torch.randn(10, 16, generator=g, dtype=torch.float64)
    true, pred = _closed_form_min_eps(w, b, x)
    est = minimal_eps(_linear(w, b), x, pred, eps_max=4.0, tol=1e-3, generator=g, **UNCLIPPED)
    assert bool((est >= true - 1e-12).all())
    assert float((est - true).median()) < 0.05


def test_bisection_runs_one_batched_attack_per_step():
    g = torch.Generator().manual_seed(2)
    w, b = torch.randn(2, 8, generator=g, dtype=torch.float64), torch.randn(2, generator=g, dtype=torch.float64)
    x = torch.randn(64, 8, generator=g, dtype=torch.float64)
    spec = make_attack("fgsm")
    calls = []

    def counted(model, xs, ys, eps, norm, lo, hi, gen, rebind):
        calls.append((xs.shape[0], eps.shape))
        return spec.run(model, xs, ys, eps, norm, lo, hi, gen, rebind)
    _, pred = _closed_form_min_eps(w, b, x)
    minimal_eps(_linear(w, b), x, pred, eps_max=1.0, tol=1 / 64, attack=dataclasses.replace(spec, run=counted),
                **UNCLIPPED)
    assert len(calls) == 1 + bisection_steps(1.0, 1 / 64) == 7
    assert calls[0] == (64, (64,))  # every sample in one call, each with its own eps


def test_report_min_eps_on_a_linear_model(tmp_path):
    g = torch.Generator().manual_seed(3)
    w, b = torch.randn(2, 6, generator=g, dtype=torch.float64), torch.randn(2, generator=g, dtype=torch.float64)
    x = torch.randn(120, 6, generator=g, dtype=torch.float64)
    true, pred = _closed_form_min_eps(w, b, x)
    report = evaluate(_linear(w, b), (x, pred), ["fgsm", "pgd"], eps=[0.1, 0.3], min_eps_tol=1e-3, batch_size=50,
                      progress=False, **UNCLIPPED)
    values = torch.tensor(report.min_eps["values"], dtype=torch.float64)
    assert bool((values[true > 0.3] == INF).all()) and int((true > 0.3).sum()) > 0
    fooled = true <= 0.3
    assert bool(((values[fooled] - true[fooled]) >= -1e-12).all() and ((values[fooled] - true[fooled]) <= 1e-3).all())
    finite = values[fooled]
    assert report.min_eps["median"] == float(np.median(values.numpy()))
    assert report.min_eps["mean_fooled"] == pytest.approx(float(finite.mean()), rel=1e-12)
    assert report.min_eps["fooled_fraction"] == pytest.approx(float(fooled.double().mean()))
    assert report.diagnostics["large_eps"] is None  # no pixel range: no large-eps check
    # FGSM is the optimal attack of a binary linear model: its accuracy is the closed form's
    for j, e in enumerate([0.1, 0.3]):
        assert report.attacks["fgsm"]["accuracy"][j] == pytest.approx(float((true > e).double().mean()))
    # strict JSON with inf as "inf", and back
    path = report.to_json(tmp_path / "r.json")
    text = path.read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert '"inf"' in text
    back = Report.from_json(path)
    assert back == report and back.min_eps["values"][int(torch.nonzero(~fooled)[0])] == INF


# ----------------------------------------------------------------------------------------------------- transfer
def test_transfer_matrix_diagonal_is_white_box(digits, softmax_regression, tmp_path):
    model, test = digits
    models = {"cnn": model, "linear": softmax_regression}
    data = (test.images[:200], test.labels[:200])
    t = transfer_matrix(models, data, "pgd", eps=0.1, batch_size=128, progress=False)
    assert t.names == ["cnn", "linear"]
    for i, (name, m) in enumerate(models.items()):
        r = evaluate(m, data, ["pgd"], eps=[0.1], batch_size=128, min_eps=False, large_eps=None, progress=False)
        assert t.accuracy[i][i] == r.attacks["pgd"]["accuracy"][0]
        assert t.success_rate[i][i] == r.attacks["pgd"]["success_rate"][0]
        assert t.clean_accuracy[name] == r.clean_accuracy
    # made on the CNN, scored on the linear model, recomputed directly
    g, x, y = generator(0, 0, 0, 0), *data
    x_adv = torch.cat([A.pgd(model, x[s:s + 128], y[s:s + 128], eps=0.1, alpha=0.025, steps=10, early_stop=True,
                             generator=g) for s in (0, 128)])
    ok = (_predict(softmax_regression, x) == y) & (_predict(softmax_regression, x_adv) == y)
    assert t.accuracy[0][1] == int(ok.sum()) / 200
    assert t.accuracy[0][1] > t.accuracy[1][1]  # transferred examples are weaker than white-box ones
    d = json.loads(t.to_json(tmp_path / "t.json").read_text())
    assert d["accuracy"] == t.accuracy
    _check_png(plots.plot_transfer_matrix(t, tmp_path / "t.png"))


# --------------------------------------------------------------------------------------- gradient masking
class _Wrap(nn.Module):
    def __init__(self, model, fn):
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, x):
        return self.model(self.fn(x))


class _Reverse(torch.autograd.Function):
    """Identity whose backward points the other way: gradient ascent then lowers the loss."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return -g


class _TrueOnlyOnTheClean(torch.autograd.Function):
    """Identity whose gradient is true at images of 1/16-multiples (every clean digit) and reversed elsewhere:
    FGSM, which takes the gradient at the clean image, works; PGD, from a random start, does not."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(((x * 16 - torch.round(x * 16)).abs() < 1e-4).flatten(1).all(1))
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        (clean,) = ctx.saved_tensors
        return torch.where(clean.view((-1,) + (1,) * (g.dim() - 1)), g, -g)


def _masking(model, test, attacks, eps, n=200):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = evaluate(model, test, attacks, eps=eps, min_eps=False, max_samples=n, progress=False)
    issued = [str(w.message) for w in caught if issubclass(w.category, GradientMaskingWarning)]
    assert issued == report.warnings
    return report


def test_no_masking_warning_on_the_normal_model(digits, evaluated):
    report, caught, _ = evaluated
    assert all(p.grad is None for p in digits[0].parameters())  # input gradients only
    assert report.warnings == []
    assert not [w for w in caught if issubclass(w.category, EvaluationWarning)]
    assert report.diagnostics["zero_grad_fraction"] == 0.0


def test_large_eps_check_is_not_limited_by_a_fixed_small_step(digits):
    """A PGD with alpha * steps far below the large eps must not make a normal model look masked."""
    model, test = digits
    report = _masking(model, test, [make_attack("pgd", steps=5, alpha=0.01)], [0.05], n=64)
    assert report.diagnostics["large_eps"]["accuracy"] < 0.1
    assert report.warnings == []


def test_fgsm_beyond_an_iterative_attacks_reach_is_no_masking_sign(digits):
    """BIM with alpha * steps = 0.02 cannot reach eps = 0.3; FGSM at 0.3 beating it is expected, not masking."""
    model, test = digits
    report = _masking(model, test, ["fgsm", make_attack("pgd", steps=2, alpha=0.01, random_start=False)],
                      [0.02, 0.3], n=64)
    assert report.accuracy("fgsm", 0.3) < report.accuracy("pgd", 0.3) - 0.1
    assert report.warnings == []


def test_rounding_the_input_masks_the_gradient(digits):
    model, test = digits
    report = _masking(_Wrap(model, lambda x: torch.round(x * 16) / 16), test, ["fgsm", "pgd"], [0.1, 0.2])
    assert report.clean_accuracy > 0.9  # the digits are multiples of 1/16: rounding keeps them
    assert report.diagnostics["zero_grad_fraction"] == 1.0
    assert any("all-zero input gradient" in w for w in report.warnings)
    assert any("large eps = 0.5" in w for w in report.warnings)


def test_constant_logits_have_zero_gradient(digits):
    _, test = digits
    const = lambda x: torch.tensor([0.0, 3.0] + [0.0] * 8) + 0 * x.flatten(1).sum(1, keepdim=True)
    report = _masking(const, test, ["pgd"], [0.1])
    assert report.diagnostics["zero_grad_fraction"] == 1.0
    assert any("all-zero input gradient" in w for w in report.warnings)


def test_fgsm_stronger_than_pgd_is_flagged(digits):
    model, test = digits
    report = _masking(_Wrap(model, _TrueOnlyOnTheClean.apply), test, ["fgsm", "pgd"], [0.1, 0.2])
    assert report.attacks["fgsm"]["accuracy"][1] < 0.5 < report.attacks["pgd"]["accuracy"][1]
    assert any("single-step FGSM" in w for w in report.warnings)
    assert not any("random noise" in w or "all-zero" in w for w in report.warnings)


def test_noise_stronger_than_pgd_is_flagged(digits):
    model, test = digits
    pgd = make_attack("pgd", random_start=False)  # from the clean image, reversed gradients only help the model
    report = _masking(_Wrap(model, _Reverse.apply), test, [pgd, "noise"], [0.3, 0.5])
    assert report.attacks["noise"]["accuracy"][1] < report.attacks["pgd"]["accuracy"][1] - 0.05
    assert any("uniform random noise" in w for w in report.warnings)
    assert report.diagnostics["zero_grad_fraction"] == 0.0


def test_masking_rules_on_synthetic_curves():
    t = MaskingThresholds()
    curves = [("fgsm", "fgsm", [0.80, 0.50]), ("pgd", "pgd", [0.81, 0.60]), ("noise", "noise", [0.95, 0.90])]
    (msg,) = gradient_masking_warnings([0.1, 0.2], curves, 1000, 0.0, (0.5, 0.0), t)
    assert "'fgsm'" in msg and "eps = 0.2 " in msg
    # one sample of difference is never enough, however small n is
    assert gradient_masking_warnings([0.1], [("f", "fgsm", [0.0]), ("p", "pgd", [0.1])], 10) == []
    assert len(gradient_masking_warnings([0.1], [("f", "fgsm", [0.0]), ("p", "pgd", [0.2])], 10)) == 1
    assert gradient_masking_warnings([0.1], [], 10, zero_grad_fraction=0.01) == []
    assert len(gradient_masking_warnings([0.1], [], 10, zero_grad_fraction=0.02)) == 1
    assert len(gradient_masking_warnings([0.1], [], 10, large_eps=(0.5, 0.11))) == 1


def test_zero_gradient_mask_counts_per_sample():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3, 2), nn.ReLU())  # a dead ReLU row has zero gradient
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]))
        model[1].bias.zero_()
    x = torch.tensor([[1.0, 2, 0], [-1, -1, 0], [-1, 3, 0]]).view(3, 1, 3)
    assert zero_gradient_mask(model, x, torch.tensor([0, 0, 1])).tolist() == [False, True, False]


def test_an_attack_leaving_its_ball_is_flagged(digits):
    model, test = digits

    def cheat(model, x, y, eps):
        return (x + 2 * eps).clamp(0, 1)
    with pytest.warns(EvaluationWarning, match="larger than eps"):
        evaluate(model, test, [cheat], eps=[0.1], max_samples=50, min_eps=False, large_eps=None, progress=False)


# ---------------------------------------------------------------------------------------------- JSON and plots
def test_json_round_trip(evaluated, tmp_path):
    report, _, _ = evaluated
    path = report.to_json(tmp_path / "report.json")
    d = json.loads(path.read_text())
    assert Report.from_json(path) == report == Report.from_dict(d)
    cfg = d["config"]
    assert cfg["model"] == {"name": "small_cnn", "class": "robust_ext.models.SmallCNN", "parameters": 29066}
    assert cfg["data"] == {"name": "digits", "split": "test", "n_samples": 359}
    assert [a["name"] for a in cfg["attacks"]] == ["fgsm", "pgd", "noise"]
    assert cfg["attacks"][1]["params"]["steps"] == 10 and cfg["seed"] == 0 and cfg["eps"] == EPS
    assert set(cfg["versions"]) >= {"torch", "robust_ext"}
    assert d["timing"]["total_s"] > 0 and set(d["timing"]["attacks_s"]) == {"fgsm", "pgd", "noise"}
    assert len(d["min_eps"]["values"]) == 359
    assert "clean accuracy" in report.summary()


def _check_png(path, min_side=200, max_side=4000):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert min_side <= width <= max_side and min_side <= height <= max_side, (width, height)
    assert data.endswith(b"IEND\xaeB`\x82") and len(data) > 5000
    return width, height


def test_plots_are_valid_pngs(evaluated, tmp_path):
    report, _, out = evaluated
    assert sorted(p.rsplit("/", 1)[-1] for p in report.plots) == ["accuracy_vs_eps.png", "adversarial_examples.png",
                                                                    "pgd_probabilities.png"]
    for p in report.plots:
        _check_png(out / p.rsplit("/", 1)[-1])
    other = dataclasses.replace(report, config={**report.config, "model": {"name": "copy"}})
    _check_png(plots.plot_accuracy_curves({"a": report, "b": other}, tmp_path / "two.png"))


def test_tradeoff_labels_do_not_overlap(tmp_path):
    """Robust models often land on one spot of the trade-off plot (the measured run of docs/demo.md: three
    within 1.5 points at the same clean accuracy, and two identical here): every label stays readable."""
    rows = [{"train_eps": e, "eval_eps": 0.1, "clean": c, "autoattack": a, "pgd": a}
            for e, c, a in [(0.0, 0.965, 0.62), (0.05, 0.955, 0.855), (0.1, 0.96, 0.89), (0.15, 0.96, 0.895),
                            (0.2, 0.96, 0.905), (0.25, 0.96, 0.905)]]
    fig = plots.tradeoff_figure(rows)
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    labels = {t.get_text(): t.get_window_extent(renderer) for t in ax.texts}
    assert sorted(labels) == sorted(f"ε={r['train_eps']:g}" for r in rows)
    boxes = list(labels.values())
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not a.overlaps(b), (a, b)
    _check_png(plots.plot_tradeoff(rows, tmp_path / "tradeoff.png"))


def test_pgd_trajectory_is_pgd(digits):
    model, test = digits
    x, y = test.images[:6], test.labels[:6]
    probs, x_adv = pgd_trajectory(model, x, y, eps=0.1, steps=7, generator=generator(0, 5))
    expected = A.pgd(model, x, y, eps=0.1, alpha=2.5 * 0.1 / 7, steps=7, generator=generator(0, 5))
    torch.testing.assert_close(x_adv, expected, rtol=0, atol=0)
    assert probs.shape == (8, 6, 10)
    torch.testing.assert_close(probs.sum(2), torch.ones(8, 6))
    with torch.no_grad():
        torch.testing.assert_close(probs[-1], model(x_adv).softmax(1))
    assert float(probs[-1].gather(1, y[:, None]).mean()) < float(probs[0].gather(1, y[:, None]).mean())


# ------------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("kwargs, error, match", [
    (dict(attacks=["cw"]), ValueError, "unknown attack 'cw'"),
    (dict(eps=[]), ValueError, "at least one"),
    (dict(eps=[0.1, -0.1]), ValueError, "finite float >= 0"),
    (dict(eps=[float("nan")]), ValueError, "finite float >= 0"),
    (dict(eps="0.1"), ValueError, "finite float"),
    (dict(attacks=[]), ValueError, "at least one attack"),
    (dict(attacks=[42]), TypeError, "an attack must be"),
    (dict(target_accuracy=2.0), ValueError, "target accuracy"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(eps_max=0.0), ValueError, "eps_max"),
    (dict(min_eps=lambda m, x, y, eps: x), ValueError, "min_eps needs a named attack"),
    (dict(data=[1, 2, 3]), TypeError, "data must be"),
    (dict(data=(torch.rand(4, 2), torch.zeros(3, dtype=torch.long))), ValueError, "labels"),
    (dict(batch_size=0), ValueError, "batch_size"),
])
def test_bad_input_raises_clearly(kwargs, error, match):
    model = nn.Linear(2, 2)
    args = dict(data=(torch.rand(4, 2), torch.zeros(4, dtype=torch.long)), attacks=["fgsm"], eps=[0.1],
                progress=False)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        evaluate(model, args.pop("data"), args.pop("attacks"), **args)


def test_make_attack_checks_its_parameters():
    with pytest.raises(ValueError, match="unknown parameter"):
        make_attack("fgsm", steps=3)
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        make_attack("pgd", steps=0)
    with pytest.raises(ValueError, match="loss"):
        make_attack("bim", loss="hinge")
    assert make_attack("pgd", steps=20, name="pgd-20").describe()["params"]["steps"] == 20
