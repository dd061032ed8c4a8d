"""L2 attacks on the threat-model seam: against torchattacks' PGDL2, invariants, strength over random starts,
training and evaluation with norm="l2", the CLI."""
import functools
import json
import math

import pytest
import torch

from robust_ext import attacks as A
from robust_ext.cli import main
from robust_ext.evaluation import EvaluationWarning, evaluate
from robust_ext.models import SmallCNN, save_checkpoint
from robust_ext.training import train

pytestmark = pytest.mark.usefixtures("one_thread")

EPS, ALPHA, STEPS = 1.0, 0.25, 10


def l2(x_adv, x):
    return (x_adv.double() - x.double()).flatten(1).norm(dim=1)


def accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def torchattacks_pgdl2_from(model, x, y, start, eps, alpha, steps, reduction="mean", tiny=1e-10):
    """torchattacks.PGDL2's update, as it is written (mean CE, ``tiny`` = 1e-10 added to the gradient norm),
    from a given start: the formula our fused step replaces."""
    adv = start.clone()
    n = x.shape[0]
    for _ in range(steps):
        adv.requires_grad_(True)
        cost = torch.nn.functional.cross_entropy(model(adv), y, reduction=reduction)
        grad = torch.autograd.grad(cost, adv)[0]
        grad = grad / (grad.view(n, -1).norm(p=2, dim=1) + tiny).view(n, 1, 1, 1)
        adv = adv.detach() + alpha * grad
        delta = adv - x
        factor = torch.min(eps / delta.view(n, -1).norm(p=2, dim=1), torch.ones(n))
        adv = torch.clamp(x + delta * factor.view(-1, 1, 1, 1), 0, 1).detach()
    return adv


def test_zero_start_follows_torchattacks_pgdl2(digits):
    model, x, y = digits
    torchattacks = pytest.importorskip("torchattacks")
    theirs = torchattacks.PGDL2(model, eps=EPS, alpha=ALPHA, steps=1, random_start=False)(x, y)
    assert torch.equal(torchattacks_pgdl2_from(model, x, y, x, EPS, ALPHA, 1), theirs)  # the formula is theirs
    ours = A.PGDL2(model, eps=EPS, alpha=ALPHA, steps=1, random_start=False)(x, y)
    # Their formula on the summed loss without the 1e-10: ours to float32 rounding (the norms are summed in
    # another order), so not bit-identical.
    exact = torchattacks_pgdl2_from(model, x, y, x, EPS, ALPHA, 1, reduction="sum", tiny=0.0)
    assert (ours - exact).abs().max() < 1e-5
    # The difference that matters: torchattacks normalizes the batch-mean gradient with 1e-10 added to its
    # norm, so a confidently classified sample (mean-loss gradient norm ~1e-10) takes a shorter step than
    # alpha. Ours always steps alpha (measured on this model: 0.23 where torchattacks steps 0.15).
    length = lambda a: (a - x).flatten(1).norm(dim=1)  # noqa: E731
    assert (length(ours) >= length(theirs) - 1e-5).all() and (length(ours) > length(theirs) + 0.01).any()
    ten_ours = A.PGDL2(model, eps=EPS, alpha=ALPHA, steps=STEPS, random_start=False)(x, y)
    ten_theirs = torchattacks.PGDL2(model, eps=EPS, alpha=ALPHA, steps=STEPS, random_start=False)(x, y)
    assert accuracy(model, ten_ours, y) <= accuracy(model, ten_theirs, y) + 1 / len(y)


def test_invariants_and_per_sample_eps(digits):
    model, x, y = digits
    eps = torch.linspace(0.0, 2.0, x.shape[0])
    for early_stop in (False, True):
        x_adv = A.pgd(model, x, y, eps=eps, alpha=0.3, steps=5, norm="l2", early_stop=early_stop,
                      generator=torch.Generator().manual_seed(0))
        assert (l2(x_adv, x) <= eps.double() * (1 + 1e-5) + 1e-6).all()
        assert x_adv.min() >= 0 and x_adv.max() <= 1 and x_adv.dtype == x.dtype
    assert torch.equal(x_adv[0], x[0])  # eps = 0 does not move
    fgm = A.FGM(model, eps=1.5)(x, y)
    assert (l2(fgm, x) <= 1.5 * (1 + 1e-5)).all() and accuracy(model, fgm, y) < accuracy(model, x, y)
    start = A.L2.init(x, 1.0, 0.0, 1.0, generator=torch.Generator().manual_seed(1))
    assert (l2(start, x) <= 1.0 + 1e-5).all() and (l2(start, x) > 0).float().mean() > 0.99


def test_random_starts_are_at_least_as_strong_as_torchattacks(digits):
    """Robust accuracy over 8 random starts, a sample robust only if it survives every start: ours within
    1 point of torchattacks' (ours keeps the worst case itself, with early stop)."""
    model, x, y = digits
    torchattacks = pytest.importorskip("torchattacks")
    eps, alpha, steps = 0.8, 0.2, 10
    ours = A.pgd(model, x, y, eps=eps, alpha=alpha, steps=steps, norm="l2", restarts=8, early_stop=True,
                 generator=torch.Generator().manual_seed(0))
    robust_theirs = torch.ones_like(y, dtype=torch.bool)
    torch.manual_seed(0)
    for _ in range(8):
        adv = torchattacks.PGDL2(model, eps=eps, alpha=alpha, steps=steps, random_start=True)(x, y)
        with torch.no_grad():
            robust_theirs &= model(adv).argmax(1) == y
    ours_acc, theirs_acc = accuracy(model, ours, y), robust_theirs.float().mean().item()
    assert 0.05 < theirs_acc < accuracy(model, x, y) - 0.05  # a budget where the attack has work to do
    assert ours_acc <= theirs_acc + 0.01, (ours_acc, theirs_acc)


def test_targeted_l2_reaches_the_target(digits):
    model, x, y = digits
    target = (y + 3) % 10
    x_adv = A.pgd(model, x, target, eps=3.0, alpha=0.5, steps=20, norm="l2", targeted=True, random_start=False)
    with torch.no_grad():
        assert (model(x_adv).argmax(1) == target).float().mean() > 0.8


def test_bim_needs_steps_under_l2(digits):
    model, x, y = digits
    with pytest.raises(ValueError, match="norm='linf' only"):
        A.bim(model, x[:4], y[:4], eps=1.0, alpha=0.1, norm="l2")


def test_evaluation_measures_l2_and_flags_an_attack_outside_the_ball(digits):
    model, x, y = digits

    def linf_pgd(model, x, y, eps):  # an L-inf attack at the same number: far outside the L2 ball
        return A.pgd(model, x, y, eps=eps, alpha=eps / 4, steps=5, random_start=False)

    with pytest.warns(EvaluationWarning, match="larger than eps"):
        report = evaluate(model, (x[:64], y[:64]), ["fgsm", "pgd", linf_pgd], eps=[0.5, 1.0], norm="l2",
                          min_eps=True, progress=False)
    assert report.config["norm"] == "l2"
    assert report.attacks["pgd"]["l2_max"][1] <= 1.0 + 1e-5
    assert report.diagnostics["large_eps"]["eps"] == pytest.approx(0.5 * math.sqrt(64))
    fooled = [v for v in report.min_eps["values"] if 0 < v < math.inf]
    assert fooled and max(fooled) <= 1.0
    assert "eps (L2)" in report.summary()


def test_training_with_l2_pgd(digits, tmp_path, monkeypatch):
    """norm="l2" reaches the training attack and the per-epoch robust evaluation: every attack the run makes
    is an L2 PGD of the configured eps."""
    model, x, y = digits
    calls = []
    pgd = A.pgd

    @functools.wraps(pgd)
    def spy(*args, **kwargs):
        calls.append((A.threats.get_threat(kwargs["norm"]).name, kwargs["eps"]))
        return pgd(*args, **kwargs)

    monkeypatch.setitem(A.registry.ATTACKS, "pgd", A.registry.ATTACKS["pgd"].__class__(
        **{**A.registry.ATTACKS["pgd"].__dict__, "fn": spy}))
    monkeypatch.setattr(A, "pgd", spy)
    torch.manual_seed(0)
    net = SmallCNN(in_channels=1, input_size=8)
    train(net, torch.utils.data.TensorDataset(x, y), None, method="pgd", norm="l2", eps=1.0, pgd_steps=3, epochs=1, batch_size=50,
          eval_samples=50, progress=False, plot=False, out_dir=tmp_path)
    start = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert start["event"] == "start" and start["config"]["norm"] == "l2"
    assert len(calls) == 5 + 1 and set(calls) == {("l2", 1.0)}  # 5 training batches, 1 evaluation batch


def test_cli_evaluate_and_attack_with_l2(tmp_path, capsys):
    torch.manual_seed(0)
    ckpt = tmp_path / "m.pt"
    save_checkpoint(ckpt, SmallCNN())
    assert main(["-q", "evaluate", "--model", str(ckpt), "-n", "16", "--norm", "l2", "--eps", "1.0,2.0",
                 "--attacks", "fgsm,pgd", "--steps", "3", "--no-min-eps", "--out", str(tmp_path / "e")]) == 0
    report = json.loads((tmp_path / "e" / "report.json").read_text())
    assert report["config"]["norm"] == "l2" and report["eps"] == [1.0, 2.0]
    capsys.readouterr()
    assert main(["-q", "attack", "--model", str(ckpt), "-n", "16", "--norm", "l2", "--eps", "1.5", "--steps", "3",
                 "--out", str(tmp_path / "a")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["norm"] == "l2" and out["norms"]["l2_max"] <= 1.5 + 1e-5
