"""The threat-model seam: a user's own ThreatModel drives the attack core, the registries are the one source
of names, defaults and step rules, and bad norms/bounds fail one clear way everywhere."""
import json
import math

import pytest
import torch

from robust_ext import attacks as A
from robust_ext.attacks import core, registry
from robust_ext.attacks.losses import LOSSES, per_sample_loss
from robust_ext.attacks.threats import ThreatModel, get_threat
from robust_ext.cli import main
from robust_ext.evaluation import evaluate, make_attack
from robust_ext.models import SmallCNN, save_checkpoint
from robust_ext.training import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")


class PlainLinf(ThreatModel):
    """The L-inf ball written in plain torch ops by a user, in torchattacks' operation order (so it must
    match the fused LINF exactly in fp32), counting the core's calls."""

    name = "plain_linf"

    def __init__(self):
        self.calls = {"init": 0, "step_": 0, "project_": 0}

    def init(self, x, eps, clip_min, clip_max, generator=None):
        self.calls["init"] += 1
        return A.LINF.init(x, eps, clip_min, clip_max, generator)

    def step_(self, x_adv, grad, x, alpha, eps, clip_min, clip_max):
        self.calls["step_"] += 1
        v = x_adv + alpha * torch.nan_to_num(grad, nan=0.0).sign()
        return self.project_(x_adv.copy_(v), x, eps, clip_min, clip_max, count=False)

    def project_(self, x_adv, x, eps, clip_min, clip_max, count=True):
        self.calls["project_"] += count
        return x_adv.copy_(torch.clamp(x + torch.clamp(x_adv - x, -eps, eps), clip_min, clip_max))

    def single_step(self, x, grad, eps, clip_min, clip_max):
        return torch.clamp(x + eps * grad.sign(), clip_min, clip_max)

    def distance(self, x_adv, x):
        return (x_adv - x).double().flatten(1).abs().amax(1)


def test_a_user_threat_model_drives_pgd_and_matches_the_fused_linf(digits):
    model, x, y = digits
    mine = PlainLinf()
    kw = dict(eps=0.1, alpha=0.025, steps=5, random_start=True)
    ours = A.pgd(model, x, y, norm=mine, generator=torch.Generator().manual_seed(3), **kw)
    fused = A.pgd(model, x, y, norm="linf", generator=torch.Generator().manual_seed(3), **kw)
    assert mine.calls["init"] == 1 and mine.calls["step_"] == 5
    torch.testing.assert_close(ours, fused, rtol=0, atol=0)
    assert repr(mine) == "PlainLinf()"


def test_evaluation_measures_a_user_threat_model_with_its_distance(digits):
    model, x, y = digits
    report = evaluate(model, (x[:40], y[:40]), ["fgsm", "pgd"], eps=[0.05, 0.1], norm=PlainLinf(), min_eps=False,
                      progress=False, large_eps=None)
    assert report.config["norm"] == "plain_linf"
    assert report.attacks["pgd"]["accuracy"][1] <= report.attacks["pgd"]["accuracy"][0] <= report.clean_accuracy
    assert not report.warnings


def test_norm_names_users_write():
    assert get_threat("Linf") is A.LINF and get_threat("inf") is A.LINF and get_threat(float("inf")) is A.LINF
    assert get_threat("L2") is A.L2 and get_threat(2) is A.L2
    with pytest.raises(ValueError, match=r"norm must be one of 'linf', 'l2' or a ThreatModel, got 'l3'"):
        get_threat("l3")


@pytest.mark.parametrize("call", [
    lambda m, x, y: A.pgd(m, x, y, eps=0.1, alpha=0.01, steps=1, norm="l1"),
    lambda m, x, y: A.fgsm(m, x, y, eps=0.1, norm="l1"),
    lambda m, x, y: A.PGD(m, norm="l1"),
    lambda m, x, y: evaluate(m, (x, y), ["fgsm"], eps=[0.1], norm="l1", progress=False),
    lambda m, x, y: TrainConfig(method="pgd", eps=0.1, norm="l1"),
])
def test_an_unknown_norm_is_refused_naming_norm(digits, call):
    model, x, y = digits
    with pytest.raises(ValueError, match="norm must be one of"):
        call(model, x[:4], y[:4])


@pytest.mark.parametrize("call", [
    lambda m, x, y: A.pgd(m, x, y, eps=0.1, alpha=0.01, steps=1, clip_min=0.5, clip_max=0.5),
    lambda m, x, y: A.PGD(m, clip_min=1.0, clip_max=1.0),
    lambda m, x, y: evaluate(m, (x, y), ["fgsm"], eps=[0.1], clip_min=0.2, clip_max=0.2, progress=False),
    lambda m, x, y: TrainConfig(clip_min=0.3, clip_max=0.3),
])
def test_equal_bounds_are_refused_the_same_way_everywhere(digits, call):
    model, x, y = digits
    with pytest.raises(ValueError, match="clip_min must be < clip_max"):
        call(model, x[:4], y[:4])


def test_the_default_step_rules_come_from_the_registry():
    # Written out by hand: 2.5 eps / steps (Madry et al.) and 1.25 eps (Wong et al.).
    assert TrainConfig(method="pgd", eps=0.3, pgd_steps=10).attack_alpha == pytest.approx(0.075, rel=1e-15)
    assert TrainConfig(method="fgsm_rs", eps=0.1).attack_alpha == pytest.approx(0.125, rel=1e-15)
    assert TrainConfig(method="pgd", eps=0.3, alpha=0.01).attack_alpha == 0.01
    assert TrainConfig(eval_eps=0.2, eval_steps=20).robust_alpha == pytest.approx(0.025, rel=1e-15)
    assert make_attack("pgd", steps=4).alpha(0.2) == pytest.approx(0.125, rel=1e-15)
    assert make_attack("bim", alpha=0.01).alpha(0.2) == 0.01
    assert make_attack("fgsm").alpha(0.2) is None


def test_a_registered_attack_reaches_evaluation_training_and_the_cli(digits, tmp_path, capsys, monkeypatch):
    model, x, y = digits

    def half_pgd(model, x, y, *, eps, norm, clip_min, clip_max, generator, steps, alpha):
        return A.pgd(model, x, y, eps=eps, alpha=alpha, steps=steps, norm=norm, clip_min=clip_min,
                     clip_max=clip_max, generator=generator)

    entry = registry.AttackEntry("half_pgd", half_pgd, {"steps": 3, "alpha": None}, registry.multi_step_alpha,
                                 norms=("linf",), training=True, summary="a test attack")
    monkeypatch.setitem(registry.ATTACKS, "half_pgd", entry)
    report = evaluate(model, (x[:32], y[:32]), ["half_pgd"], eps=[0.1], min_eps=False, progress=False,
                      large_eps=None)
    assert report.attacks["half_pgd"]["params"] == {"steps": 3, "alpha": None}
    assert TrainConfig(method="half_pgd", eps=0.1, pgd_steps=4).attack_alpha == pytest.approx(0.0625, rel=1e-15)
    with pytest.raises(ValueError, match="attack 'half_pgd' does not support norm 'l2'; it supports 'linf'"):
        make_attack("half_pgd")(model, x[:4], y[:4], 0.1, norm="l2")
    ckpt = tmp_path / "m.pt"
    save_checkpoint(ckpt, SmallCNN())
    assert main(["-q", "attack", "--model", str(ckpt), "-n", "8", "--attack", "half_pgd", "--eps", "8/255",
                 "--out", str(tmp_path / "o")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["attack"] == "half_pgd" and out["eps"] == 8 / 255 and out["steps"] == 3  # its own default
    assert out["norms"]["linf_max"] <= 8 / 255 + 1e-7


def test_losses_on_hand_made_logits():
    z = torch.tensor([[4.0, 1.0, 3.0, 0.0, -1.0], [0.0, 5.0, 1.0, 2.0, 2.0]])
    y = torch.tensor([0, 2])
    t = torch.tensor([2, 3])
    # margin: max over the others minus the true logit.
    assert per_sample_loss(z, y, "margin").tolist() == [3.0 - 4.0, 5.0 - 1.0]
    # DLR: -(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3); sorted rows are [4, 3, 1, 0, -1] and [5, 2, 2, 1, 0].
    torch.testing.assert_close(per_sample_loss(z, y, "dlr"), torch.tensor([-(4 - 3) / (4 - 1), -(1 - 5) / (5 - 2)]))
    # targeted DLR: -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2).
    torch.testing.assert_close(per_sample_loss(z, y, "dlr_targeted", t),
                               torch.tensor([-(4 - 3) / (4 - 0.5), -(1 - 2) / (5 - 1.5)]))
    # DLR does not change when the logits are shifted and scaled.
    torch.testing.assert_close(per_sample_loss(3 * z + 7, y, "dlr"), per_sample_loss(z, y, "dlr"))
    with pytest.raises(ValueError, match="needs at least 4 classes"):
        per_sample_loss(z[:, :3], y, "dlr_targeted", t)
    assert set(LOSSES) >= {"ce", "margin", "dlr", "dlr_targeted"}


def test_targeted_pgd_descends_towards_the_target(digits):
    model, x, y = digits
    target = (y + 1) % 10
    obj = core.Objective(model, "ce", targeted=True)
    x_adv = A.pgd(model, x, target, eps=0.3, alpha=0.05, steps=10, targeted=True, random_start=False)
    with torch.no_grad():
        before = per_sample_loss(model(x), target, "ce")
        after = per_sample_loss(model(x_adv), target, "ce")
        hit = obj.success(model(x_adv), target)
    assert after.mean() < before.mean() and hit.float().mean() > 0.5
    assert torch.equal(hit, model(x_adv).argmax(1) == target)


def test_cli_norm_and_eps_flags(tmp_path, capsys):
    ckpt = tmp_path / "m.pt"
    save_checkpoint(ckpt, SmallCNN())
    assert main(["-q", "attack", "--model", str(ckpt), "-n", "4", "--norm", "l3", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("robust-ext: error: argument --norm: invalid choice: 'l3'") and err.count("\n") == 1
    assert main(["-q", "evaluate", "--model", str(ckpt), "-n", "4", "--eps", "1/0", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "argument --eps" in err and "8/255" in err and err.count("\n") == 1
    assert main(["-q", "evaluate", "--model", str(ckpt), "-n", "8", "--eps", "2/255,4/255", "--attacks", "fgsm",
                 "--no-min-eps", "--out", str(tmp_path / "e")]) == 0
    report = json.loads((tmp_path / "e" / "report.json").read_text())
    assert report["eps"] == [2 / 255, 4 / 255] and report["config"]["norm"] == "linf"
    assert math.isclose(report["config"]["eps"][1], 4 / 255)
