"""The AutoAttack ensemble (robust_ext.evaluation.autoattack): its bookkeeping (an attack runs only on the points
still robust), the report, resume after SIGKILL, torchrun, the original's sanity checks and the errors.

The attacks are the registry's APGD and APGD-T with few steps on a small MLP (tests/_autoattack_worker.py);
the versions' lists are checked for their names and settings, with stand-ins where FAB-T or Square are not
registered."""
import dataclasses
import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import _autoattack_worker as worker
from _procs import sigkill_when
from robust_ext.attacks.registry import ATTACKS, AttackEntry
from robust_ext.attacks.noise import noise
from robust_ext.cli import main as cli_main
from robust_ext.evaluation import AutoAttackReport, EvaluationWarning, autoattack, evaluate, make_attack
from robust_ext.evaluation import autoattack_versions as versions
from robust_ext.evaluation.autoattack_state import CHUNK_DIR, STATE_FILE

WORKER = str(Path(__file__).with_name("_autoattack_worker.py"))


@pytest.fixture(scope="module")
def setup(one_thread):
    """One thread, as the workers: bit-identical results across processes need the same thread count."""
    return worker.case()


def run(setup, attacks=None, **kwargs):
    model, x, y = setup
    kwargs = {"eps": worker.EPS, "batch_size": worker.BATCH, "seed": 3, "progress": False, **kwargs}
    return autoattack(model, (x, y), attacks=worker.attacks() if attacks is None else attacks, **kwargs)


@pytest.fixture(scope="module")
def reference(setup):
    """The uninterrupted single-process run every other run is compared with."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EvaluationWarning)
        return run(setup)


def spying(specs, calls):
    """The same specs (same names, kinds and settings) recording which images each call attacks."""
    def wrap(spec):
        def run_(model, x, y, eps, norm, lo, hi, generator, rebind):
            calls.append((spec.name, eps, x.clone()))
            return spec.run(model, x, y, eps, norm, lo, hi, generator, rebind)
        return dataclasses.replace(spec, run=run_)
    return [wrap(s) for s in specs]


def point_ids(x_all, x):
    """Indices into x_all of the rows of x (the points are distinct)."""
    flat = x_all.flatten(1)
    return [int((flat == row).all(1).nonzero()) for row in x.flatten(1)]


def same(a: AutoAttackReport, b: AutoAttackReport):
    assert a.fooled_by == b.fooled_by
    assert a.results == b.results and a.clean_accuracy == b.clean_accuracy


# ------------------------------------------------------------------------------------------ bookkeeping
def test_each_attack_runs_only_on_points_still_robust(setup, reference):
    _, x, y = setup
    calls = []
    report = run(setup, spying(worker.attacks(), calls))
    same(report, reference)
    for j, e in enumerate(report.eps):
        fooled_by = report.fooled_by[j]
        seen = {name: [i for n, ee, xs in calls if n == name and ee == e for i in point_ids(x, xs)]
                for name in report.attacks}
        first, second = report.attacks
        # every point once, in chunks of at most batch_size; misclassified points never attacked
        assert sorted(seen[first]) == [i for i, f in enumerate(fooled_by) if f != "clean"]
        assert sorted(seen[second]) == [i for i, f in enumerate(fooled_by) if f not in ("clean", first)]
        assert not {i for i, f in enumerate(fooled_by) if f == first} & set(seen[second])
        assert report.results[j]["fooled"][first] > 0 and report.results[j]["fooled"][second] > 0
    assert all(len(xs) <= worker.BATCH for _, _, xs in calls)


def test_accuracy_after_each_attack_and_per_class(setup, reference):
    model, x, y = setup
    n = len(y)
    for j, r in enumerate(reference.results):
        after = list(r["accuracy_after"].values())
        assert list(r["accuracy_after"]) == ["clean", *reference.attacks]
        assert after == sorted(after, reverse=True) and r["robust_accuracy"] == after[-1]
        for k, name in enumerate(reference.attacks):
            assert round((after[k] - after[k + 1]) * n) == r["fooled"][name] == reference.fooled_by[j].count(name)
        assert reference.fooled_by[j].count(None) == round(r["robust_accuracy"] * n)
        pc = r["per_class"]
        assert sum(pc["n"]) == n and pc["n"] == torch.bincount(y, minlength=10).tolist()
        overall = {"clean": reference.clean_accuracy, **r["accuracy_after"]}
        for key in ["clean", *reference.attacks]:
            assert sum(a * c for a, c in zip(pc[key], pc["n"])) == pytest.approx(overall[key] * n)
    assert reference.clean_accuracy == pytest.approx(1 - 3 / 96)
    # each fooled point's example is in the ball and misclassified; the others are the clean images
    for j, e in enumerate(reference.eps):
        x_adv = reference.x_adv[e]
        fooled = torch.tensor([f not in (None, "clean") for f in reference.fooled_by[j]])
        assert (x_adv - x).abs().flatten(1).amax(1).max() <= e + 1e-6
        with torch.no_grad():
            assert (model(x_adv[fooled]).argmax(1) != y[fooled]).all()
        assert torch.equal(x_adv[~fooled], x[~fooled])


def test_report_fields_json_and_robustbench(reference, tmp_path):
    path = reference.to_json(tmp_path / "aa.json")
    back = AutoAttackReport.from_json(path)
    assert back == reference and back.x_adv is None
    d = json.loads(path.read_text())
    entry = d["robustbench"]
    assert entry == reference.robustbench()
    assert entry["clean_acc"] == f"{100 * reference.clean_accuracy:.2f}"
    assert entry["autoattack_acc"] == f"{100 * reference.results[-1]['robust_accuracy']:.2f}"
    assert (entry["eps"], entry["norm"], entry["threat_model"], entry["n_points"], entry["version"],
            entry["dataset"]) == (0.15, "linf", "Linf", 96, "custom", "tensors")
    assert reference.robustbench(0.1)["autoattack_acc"] == f"{100 * reference.results[0]['robust_accuracy']:.2f}"
    c = reference.config
    assert c["version"] == "custom" and [a["name"] for a in c["attacks"]] == ["apgd-ce", "apgd-t"]
    assert c["eps"] == worker.EPS and c["norm"] == "linf" and c["world_size"] == 1 and c["seed"] == 3
    assert reference.unreliable is None and reference.warnings == []
    text = reference.summary()
    assert "after apgd-t" in text and "96 points" in text and "unreliable" not in text


def test_the_curve_plot_draws_autoattack_as_its_robust_accuracy(reference, tmp_path):
    from robust_ext.evaluation.plots import _curves, plot_accuracy_curves

    back = AutoAttackReport.from_json(reference.to_json(tmp_path / "aa.json"))  # a report read back plots too
    for r in (reference, back):
        ((name, (eps, acc)),) = _curves(r, with_worst=True).items()
        assert name == "AutoAttack (custom, 96 pts)"
        assert eps == [0.0] + list(worker.EPS)
        assert acc == [reference.clean_accuracy] + [x["robust_accuracy"] for x in reference.results]
    assert plot_accuracy_curves({"m": back}, tmp_path / "c.png").stat().st_size > 1000


def test_same_seed_same_report_and_the_seed_matters(setup, reference):
    same(run(setup), reference)
    other = run(setup, seed=4)
    assert other.fooled_by != reference.fooled_by or not torch.equal(other.x_adv[0.1], reference.x_adv[0.1])


def test_full_precision_decides_and_outside_the_ball_does_not_count(setup):
    model, x, y = setup

    class AutocastLiar(nn.Module):
        """Misclassifies everything under autocast, nothing in full precision."""

        def forward(self, v):
            out = model(v)
            return out.roll(1, dims=1) if torch.is_autocast_enabled("cpu") else out

    def unchanged(m, xs, ys, eps):
        return xs.clone()

    def too_far(m, xs, ys, eps):
        return xs.roll(1, 0)  # another class's image: misclassified, far outside the ball
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = autoattack(AutocastLiar(), (x, y), eps=0.1, attacks=[unchanged], progress=False)
    assert r.results[0]["fooled"]["unchanged"] == 0 and r.clean_accuracy == pytest.approx(93 / 96)
    with pytest.warns(EvaluationWarning, match="outside the eps = 0.1 ball"):
        r = autoattack(model, (x, y), eps=0.1, attacks=[too_far], progress=False)
    assert r.results[0]["fooled"]["too_far"] == 0 and r.results[0]["outside_ball"]["too_far"] > 0
    amp = run(setup, [make_attack("apgd")], eps=[0.1], amp=True, max_samples=16)
    assert amp.config["attacks"][0]["params"]["amp"] is False  # a spec keeps its own settings
    amp = run(setup, ["apgd"], eps=[0.1], amp=True, max_samples=16)
    assert amp.config["attacks"][0]["params"]["amp"] is True


def test_l2_ensemble_stays_in_the_l2_ball(setup):
    _, x, _ = setup
    r = run(setup, [make_attack("apgd", steps=5), make_attack("apgd_t", steps=5, n_target_classes=2)], eps=[0.5],
            norm="l2", max_samples=32)
    assert r.config["norm"] == "l2" and r.robustbench()["threat_model"] == "L2"
    fooled = torch.tensor([f not in (None, "clean") for f in r.fooled_by[0]])
    delta = (r.x_adv[0.5] - x[:32]).flatten(1)
    assert fooled.any() and delta.norm(dim=1).max() <= 0.5 + 1e-5 and delta.abs().max() > 0.1


# ------------------------------------------------------------------------------------------ resume
def test_resume_after_sigkill_equals_an_uninterrupted_run(setup, reference, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(Path(WORKER).parent), OMP_NUM_THREADS="1")
    chunks = tmp_path / "state" / CHUNK_DIR
    # kill once the second attack at the first eps has finished a few chunks
    proc = sigkill_when([WORKER, str(tmp_path), "--slow"], env, lambda: len(list(chunks.glob("e0_a1_c*.pt"))) >= 3,
                        120)
    state = torch.load(tmp_path / "state" / STATE_FILE, weights_only=True)
    assert (0, 0) in [tuple(p) for p in state["done"]] and len(state["done"]) < 4, "the kill was meant to land mid-run"
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in chunks.glob("*.pt")}
    torn = chunks / f".e0_a1_c99.pt.{proc.pid}.0123abcd.tmp"  # what a kill during a write leaves
    torn.write_bytes(b"half a file")
    calls = []
    resumed = run(setup, spying(worker.attacks(), calls), state_path=tmp_path / "state")
    same(resumed, reference)
    for e in reference.eps:
        assert torch.equal(resumed.x_adv[e], reference.x_adv[e])
    assert resumed.config["resumed"]
    # finished chunks were read, not recomputed: their files untouched, and fewer attack calls than chunks
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in chunks.glob("*.pt")}
    assert all(after[name] == stamp for name, stamp in before.items())
    total = len(list(chunks.glob("*.pt")))
    assert 0 < len(calls) == total - len(before)
    assert not torn.exists() and not list((tmp_path / "state").rglob(".*.tmp"))
    calls.clear()
    same(run(setup, spying(worker.attacks(), calls), state_path=tmp_path / "state"), reference)
    assert calls == []  # a finished state recomputes nothing


@pytest.mark.parametrize("change, setting", [({"eps": [0.1, 0.2]}, "eps"), ({"seed": 4}, "seed"),
                                             ({"batch_size": 16}, "batch_size"), ({"attacks": ["apgd"]}, "attacks")])
def test_resume_with_other_settings_is_refused_naming_the_setting(setup, tmp_path, change, setting):
    run(setup, [make_attack("apgd", steps=1)], eps=[0.1], max_samples=16, state_path=tmp_path)
    kwargs = {"attacks": [make_attack("apgd", steps=1)], "eps": [0.1], "max_samples": 16, **change}
    with pytest.raises(ValueError, match=rf"state_path .*ran with {setting}"):
        run(setup, state_path=tmp_path, **kwargs)


def test_resume_refuses_another_model_or_data(setup, tmp_path):
    model, x, y = setup
    run(setup, ["apgd"], eps=[0.1], max_samples=8, state_path=tmp_path)
    other = worker.case(seed=1)[0]
    with pytest.raises(ValueError, match="ran with model="):
        autoattack(other, (x, y), eps=[0.1], attacks=["apgd"], batch_size=worker.BATCH, seed=3, max_samples=8,
                   progress=False, state_path=tmp_path)
    with pytest.raises(ValueError, match="ran with data="):
        autoattack(model, (x.flip(0), y.flip(0)), eps=[0.1], attacks=["apgd"], batch_size=worker.BATCH, seed=3,
                   max_samples=8, progress=False, state_path=tmp_path)


# ------------------------------------------------------------------------------------------ torchrun
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_match_one(setup, reference, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(WORKER).parent))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", WORKER, str(tmp_path)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        pytest.fail("torchrun timed out:\n" + err[-4000:])
    assert proc.returncode == 0, out[-2000:] + err[-4000:]
    report = AutoAttackReport.from_json(tmp_path / "report.json")
    assert report.config["world_size"] == 2
    same(report, reference)
    x_adv = torch.load(tmp_path / "x_adv.pt", weights_only=True)
    for e in reference.eps:
        assert torch.equal(x_adv[e], reference.x_adv[e])
    # the two ranks' state is one process's: resumed alone, nothing is recomputed
    calls = []
    resumed = run(setup, spying(worker.attacks(), calls), state_path=tmp_path / "state")
    same(resumed, reference)
    assert calls == [] and resumed.config["resumed"] and torch.equal(resumed.x_adv[0.15], reference.x_adv[0.15])


# ------------------------------------------------------------------------------------------ checks
class Randomized(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, v):
        return self.model(v + 0.05 * torch.randn_like(v))


class Rounded(nn.Module):
    """Piecewise constant in the input: an all-zero gradient everywhere."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, v):
        return self.model(torch.round(v * 4) / 4)


class Purified(nn.Module):
    """A test-time defense: one signed-gradient step on the input (computed in the forward) before classifying."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, v):
        with torch.enable_grad():
            u = v.detach().requires_grad_(True)
            g, = torch.autograd.grad(self.model(u).logsumexp(1).sum(), u)
        return self.model(v - 0.01 * g.sign())


def _checks(model, x, y, attacks=("apgd",), **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = autoattack(model, (x, y), **{"eps": 0.1, "attacks": list(attacks), "batch_size": 16, "max_samples": 32,
                                         "progress": False, **kwargs})
    return r, [str(w.message) for w in caught if issubclass(w.category, EvaluationWarning)]


@pytest.mark.parametrize("wrap, check, message", [
    (lambda m: nn.Sequential(m, nn.Softmax(1)), "softmax_output", "outputs are probabilities"),
    (Randomized, "randomized", "randomized defense, evaluate it with version='rand'"),
    (Rounded, "zero_gradient_points", "all-zero input gradient"),
    (Purified, "dynamic", "it seems to be a dynamic defense"),
])
def test_checks_fire_on_crafted_models(setup, wrap, check, message):
    model, x, y = setup
    r, caught = _checks(wrap(model), x, y)
    assert r.checks[check] and any(message in w for w in caught)
    assert r.unreliable == "this evaluation may be unreliable" and any(message in w for w in r.warnings)
    clean, caught = _checks(model, x, y)
    assert not clean.checks[check] and clean.unreliable is None and caught == []


def test_black_box_succeeding_where_white_box_failed_is_flagged(setup):
    model, x, y = setup
    masked = Rounded(model)
    transfer = make_attack("apgd", steps=10)

    def run_on_smooth(m, xs, ys, eps, norm, lo, hi, generator, rebind):
        """A transfer attack from the smooth model, confirmed on the masked one: no gradient of it needed."""
        x_adv = transfer.run(model, xs, ys, eps, norm, lo, hi, generator, rebind)
        with torch.no_grad():
            return torch.where((m(x_adv).argmax(1) != ys).view(-1, 1, 1, 1), x_adv, xs)
    square = dataclasses.replace(transfer, name="square", kind="square", run=run_on_smooth)
    r, caught = _checks(masked, x, y, attacks=("apgd", square), eps=0.25)
    assert r.results[0]["fooled"]["apgd"] == 0 and r.results[0]["fooled"]["square"] > 0
    assert "0.25" in r.checks["black_box"] and any("black-box 'square' fooled" in w for w in caught)
    # the black-box attack first (no white-box attack failed before it): nothing to flag
    r, _ = _checks(masked, x, y, attacks=(square, "apgd"), eps=0.25)
    assert r.results[0]["fooled"]["square"] > 0 and r.checks["black_box"] == {}


# ------------------------------------------------------------------------------------------ versions
@pytest.fixture
def registered(monkeypatch):
    """FAB, FAB-T and Square as cheap stand-ins where their files have not landed (the originals' settings'
    names); the real entries otherwise."""
    def fake(name, defaults):
        def fn(model, x, y, *, eps, norm, clip_min, clip_max, generator=None, **params):
            return noise(model, x, y, eps=eps, norm=norm, clip_min=clip_min, clip_max=clip_max, draws=1,
                         generator=generator)
        monkeypatch.setitem(ATTACKS, name, AttackEntry(name, fn, defaults))
    for name, defaults in (("fab", {"steps": 10, "restarts": 1}),
                           ("fab_t", {"steps": 10, "restarts": 1, "n_target_classes": 3}),
                           ("square", {"n_queries": 100, "p_init": 0.3})):
        if name not in ATTACKS:
            fake(name, defaults)


@pytest.mark.parametrize("version, expected", [
    # fra31/auto-attack: FAB without a final search, Square with resc_schedule=False, rand with every step run.
    ("standard", [("apgd-ce", "apgd", {"steps": 100, "restarts": 1, "loss": "ce"}),
                  ("apgd-t", "apgd_t", {"steps": 100, "restarts": 1, "n_target_classes": 9}),
                  ("fab-t", "fab_t", {"steps": 100, "restarts": 1, "n_target_classes": 9, "final_search": False}),
                  ("square", "square", {"queries": 5000, "p_init": 0.8, "rescale_schedule": False})]),
    ("plus", [("apgd-ce", "apgd", {"restarts": 5, "loss": "ce"}), ("apgd-dlr", "apgd", {"restarts": 5, "loss": "dlr"}),
              ("fab", "fab", {"restarts": 5, "final_search": False}),
              ("square", "square", {"queries": 5000, "rescale_schedule": False}),
              ("apgd-t", "apgd_t", {"n_target_classes": 9}),
              ("fab-t", "fab_t", {"n_target_classes": 9, "final_search": False})]),
    ("rand", [("apgd-ce", "apgd", {"steps": 100, "restarts": 1, "loss": "ce", "eot": 20, "early_stop": False}),
              ("apgd-dlr", "apgd", {"steps": 100, "restarts": 1, "loss": "dlr", "eot": 20, "early_stop": False})]),
])
def test_versions_are_the_originals(registered, version, expected):
    got, specs = versions.resolve_ensemble(version, None)
    assert got == version and [(s.name, s.kind) for s in specs] == [(n, k) for n, k, _ in expected]
    aliases = {"queries": ("queries", "n_queries", "max_queries")}
    for spec, (_, _, settings) in zip(specs, expected):
        for key, value in settings.items():
            names = [a for a in aliases.get(key, (key,)) if a in spec.params]
            assert names and spec.params[names[0]] == value, (spec.name, key)


def test_version_needs_its_attacks_registered(registered, monkeypatch):
    monkeypatch.delitem(ATTACKS, "square")
    with pytest.raises(ValueError, match="version 'standard' needs the attack 'square'"):
        versions.resolve_ensemble("standard", None)


def test_a_setting_the_attack_cannot_take_is_an_error(monkeypatch):
    monkeypatch.setitem(ATTACKS, "square", AttackEntry("square", noise, {"draws": 1}))
    monkeypatch.setitem(ATTACKS, "fab_t", AttackEntry("fab_t", noise, {"draws": 1, "steps": 1, "n_target_classes": 1,
                                                                    "final_search": False}))
    with pytest.raises(ValueError, match="runs square with queries=5000, but the registered attack 'square' takes no"):
        versions.resolve_ensemble("standard", None)


def test_rand_version_averages_gradients_over_draws(setup):
    model, x, y = setup
    noisy = Randomized(model)
    base = versions.core.Objective(noisy, "ce", False, None, "cpu")
    eot = versions.EoTObjective(base, 3)
    torch.manual_seed(0)
    g, logits, _ = eot.grad(x[:4].clone(), y[:4])
    torch.manual_seed(0)
    draws = [base.grad(x[:4].clone(), y[:4]) for _ in range(3)]
    torch.testing.assert_close(g, sum(d[0] for d in draws) / 3, rtol=0, atol=1e-7)
    assert torch.equal(logits, draws[-1][1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = autoattack(noisy, (x, y), eps=0.1, version="rand", max_samples=8, progress=False)
    assert r.attacks == ["apgd-ce", "apgd-dlr"] and r.config["version"] == "rand"
    assert not r.checks["randomized"]  # expected of a model evaluated with rand: not a warning
    assert [a["params"]["eot"] for a in r.config["attacks"]] == [20, 20]


# ------------------------------------------------------------------------------------------ entry points
@pytest.fixture
def cheap_standard(monkeypatch):
    monkeypatch.setitem(versions.VERSIONS, "standard", (("apgd-ce", {"steps": 2}), ("apgd-t", {"steps": 2})))


def test_evaluate_dispatches_to_the_ensemble(setup, cheap_standard):
    model, x, y = setup
    r = evaluate(model, (x, y), "autoattack", eps=[0.1], norm="linf", max_samples=16, progress=False)
    assert isinstance(r, AutoAttackReport) and r.config["version"] == "standard"
    assert r.attacks == ["apgd-ce", "apgd-t"] and r.n_samples == 16


def test_cli_autoattack_writes_report_and_resumes(tmp_path, cheap_standard, capsys):
    from robust_ext.models import SmallCNN, save_checkpoint

    torch.manual_seed(0)
    save_checkpoint(tmp_path / "cnn.pt", SmallCNN())
    argv = ["-q", "evaluate", "--model", str(tmp_path / "cnn.pt"), "-n", "8", "--attacks", "autoattack",
            "--version", "standard", "--eps", "0.1", "--out", str(tmp_path / "out")]
    assert cli_main(argv) == 0
    first = json.loads((tmp_path / "out" / "autoattack.json").read_text())
    assert first["config"]["version"] == "standard" and first["robustbench"]["n_points"] == 8
    assert (tmp_path / "out" / STATE_FILE).is_file()
    assert cli_main(argv) == 0
    again = json.loads((tmp_path / "out" / "autoattack.json").read_text())
    assert again["config"]["resumed"] and again["fooled_by"] == first["fooled_by"]
    capsys.readouterr()
    assert cli_main(argv[:-4] + ["--eps", "0.2", "--out", str(tmp_path / "out")]) == 2
    assert "ran with eps=[0.1]" in capsys.readouterr().err
    assert first["config"]["amp"] is False  # JSON false, as evaluate's params.amp
    with warnings.catch_warnings():  # without native bf16 a warning says bf16 is slow here
        warnings.simplefilter("ignore")
        assert cli_main(argv[:-2] + ["--amp", "bf16", "--out", str(tmp_path / "bf16")]) == 0
    assert json.loads((tmp_path / "bf16" / "autoattack.json").read_text())["config"]["amp"] == "torch.bfloat16"


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("kwargs, message", [
    ({"version": "quick"}, r"version must be one of 'standard', 'plus', 'rand', 'fast' or 'custom'.*'quick'"),
    ({"version": "standard", "attacks": ["apgd"]}, "attacks= replaces the version's list"),
    ({"attacks": ["apgd", "deepfool"]}, "attacks: unknown attack 'deepfool'"),
    ({"attacks": []}, "attacks must name at least one attack"),
    ({"attacks": ["apgd"], "eps": -0.1}, "every eps must be a finite float >= 0"),
    ({"attacks": ["apgd"], "batch_size": 0}, "batch_size must be an integer >= 1"),
    ({"attacks": ["apgd"], "seed": -1}, "seed must be an integer >= 0"),
])
def test_bad_arguments_are_errors_naming_them(setup, kwargs, message):
    model, x, y = setup
    with pytest.raises(ValueError, match=message):
        autoattack(model, (x, y), **{"eps": 0.1, "progress": False, **kwargs})


def test_state_path_that_is_a_file_is_refused(setup, tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="state_path .*is a file"):
        run(setup, ["apgd"], eps=[0.1], max_samples=8, state_path=tmp_path / "f")
