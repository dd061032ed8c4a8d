"""Regression tests from a bad-input review: inputs that used to give a silently wrong result (images outside
the bounds, labels the model has no class for, truthy strings as flags, a model attacked in train mode, a
damaged AutoAttack state) now give one clear error, or are recomputed."""
import json

import pytest
import torch
from torch import nn

from robust_ext import attacks as A
from robust_ext.cli import main
from robust_ext.data import load_dataset
from robust_ext.evaluation import autoattack
from robust_ext.evaluation.autoattack_state import CHUNK_DIR, STATE_FILE


def linear_model(classes=10, features=1 * 4 * 4, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(features, classes)).eval()


def points(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 4, 4, generator=g), torch.randint(0, 10, (n,), generator=g)


ATTACKS = {  # every family: the PGD core, FGSM, APGD, APGD-T, FAB, Square, noise
    "pgd": lambda m, x, y, **k: A.pgd(m, x, y, eps=0.1, alpha=0.02, steps=2, **k),
    "fgsm": lambda m, x, y, **k: A.fgsm(m, x, y, eps=0.1, **k),
    "apgd": lambda m, x, y, **k: A.apgd(m, x, y, eps=0.1, steps=2, **k),
    "apgd_t": lambda m, x, y, **k: A.apgd_t(m, x, y, eps=0.1, steps=2, n_target_classes=2, **k),
    "fab": lambda m, x, y, **k: A.fab(m, x, y, eps=0.1, steps=2, **k),
    "square": lambda m, x, y, **k: A.square(m, x, y, eps=0.1, n_queries=2, **k),
    "noise": lambda m, x, y, **k: A.noise(m, x, y, eps=0.1, **k),
}


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_images_outside_the_bounds_are_refused(name):
    # Before: every attack but FAB clamped x_adv into [0, 1], 2.0 away from an x in [0, 3] at eps 0.1.
    model, (x, y) = linear_model(), points()
    with pytest.raises(RuntimeError, match=r"x must lie within the bounds \[clip_min, clip_max\] = \[0, 1\]"):
        ATTACKS[name](model, x * 3, y)
    ATTACKS[name](model, x * 3, y, clip_max=3.0)  # the same images with bounds that hold them


@pytest.mark.parametrize("name", ["apgd", "apgd_t", "fab", "square"])
def test_labels_the_model_has_no_class_for_are_refused(name):
    # Before: APGD, FAB and Square counted a label >= the number of classes as misclassified and returned x.
    model, (x, y) = linear_model(), points()
    y[3] = 10
    with pytest.raises(RuntimeError, match="y must hold class indices < 10"):
        ATTACKS[name](model, x, y)


@pytest.mark.parametrize("flag", ["targeted", "random_start", "early_stop"])
def test_flags_must_be_booleans(flag):
    # Before: targeted="False" ran a targeted attack (a non-empty string is truthy).
    model, (x, y) = linear_model(), points()
    with pytest.raises(ValueError, match=f"{flag} must be True or False, got 'False'"):
        A.pgd(model, x, y, eps=0.1, alpha=0.02, steps=2, **{flag: "False"})
    with pytest.raises(ValueError, match=f"{flag} must be True or False"):
        A.PGD(model, eps=0.1, alpha=0.02, steps=2, **{flag: "no"})(x, y)


@pytest.mark.parametrize("name, flag", [("apgd", "early_stop"), ("square", "early_stop"),
                                        ("square", "rescale_schedule"), ("fab", "final_search")])
def test_other_attacks_flags_must_be_booleans(name, flag):
    model, (x, y) = linear_model(), points()
    with pytest.raises(ValueError, match=f"{flag} must be True or False"):
        ATTACKS[name](model, x, y, **{flag: 1})


def test_built_in_data_is_checked_against_the_bounds():
    # Before: only your own files were checked; the built-in sets lie in [0, 1].
    with pytest.raises(ValueError, match=r"the images lie in \[0, 1\], outside the clip bounds \[0.5, 1\]"):
        load_dataset("digits", split="test", clip_min=0.5)
    assert len(load_dataset("digits", split="test", clip_min=-1.0, clip_max=2.0)) > 0


@pytest.mark.parametrize("change, match", [
    (lambda x, y: (x * 3, y), r"the images lie in \[.*\], outside the clip bounds \[0, 1\]"),
    (lambda x, y: (x, torch.where(torch.arange(len(y)) == 2, -1, y)), "labels must be class indices >= 0, got -1"),
    (lambda x, y: (x, torch.where(torch.arange(len(y)) == 2, 10, y)), "labels must be class indices < 10"),
])
def test_autoattack_checks_points_before_any_work(change, match):
    # Before: a label of 10 counted as misclassified; -1 failed after the whole run.
    calls = []
    model = linear_model()
    model.register_forward_hook(lambda *a: calls.append(1))
    x, y = change(*points())
    with pytest.raises(ValueError, match=match):
        autoattack(model, (x, y), eps=0.1, version="standard", progress=False)
    assert len(calls) <= 1  # at most the one-image forward that tells the number of classes


def _aa(model, x, y, out):
    return autoattack(model, (x, y), eps=0.1, attacks=["apgd-ce"], batch_size=4, state_path=out, progress=False,
                      return_adversarial=False)


@pytest.mark.parametrize("damage, match", [
    (lambda s: s.update(codes=s["codes"].float()), "codes are not an integer tensor"),
    (lambda s: s["codes"].fill_(-5), "codes outside -1..1"),
    (lambda s: s["codes"].fill_(99), "codes outside -1..1"),
    (lambda s: s.pop("outside"), "missing entries"),
    (lambda s: s["clean"].pop("randomized"), "the clean pass's results are incomplete"),
    (lambda s: s.update(done=[1, 2]), "the finished attacks are not"),
])
def test_a_damaged_state_file_is_one_clear_error(tmp_path, damage, match):
    # Before: codes of -1 gave robust 100%, float codes 0%, a missing key a KeyError traceback.
    model, (x, y) = linear_model(), points()
    _aa(model, x, y, tmp_path)
    saved = torch.load(tmp_path / STATE_FILE, weights_only=True)
    damage(saved)
    torch.save(saved, tmp_path / STATE_FILE)
    with pytest.raises(ValueError, match=f"{STATE_FILE} is damaged \\({match}.*delete it to start over"):
        _aa(model, x, y, tmp_path)


def test_a_state_file_that_is_a_directory_is_refused_before_any_work(tmp_path):
    model, (x, y) = linear_model(), points()
    (tmp_path / STATE_FILE).mkdir()
    with pytest.raises(ValueError, match="is not a file"):
        _aa(model, x, y, tmp_path)


@pytest.mark.parametrize("damage", [
    lambda f: f.write_bytes(b"garbage"),
    lambda f: f.write_bytes(f.read_bytes()[:40]),
    lambda f: torch.save({**torch.load(f, weights_only=True), "x_adv": torch.zeros(0, 1, 4, 4),
                          "fooled": torch.ones(4, dtype=torch.bool)}, f),  # says 4 fooled, holds none
    lambda f: torch.save({**torch.load(f, weights_only=True), "fooled": torch.ones(4)}, f),
])
def test_a_damaged_chunk_is_recomputed(tmp_path, damage):
    # Before: a chunk claiming every point fooled gave robust 0%; a truncated one a traceback.
    model, (x, y) = linear_model(), points()
    first = _aa(model, x, y, tmp_path)
    chunks = sorted((tmp_path / CHUNK_DIR).glob("*.pt"))
    assert chunks
    for f in chunks:
        damage(f)
    again = _aa(model, x, y, tmp_path)
    assert again.fooled_by == first.fooled_by and again.results[0]["robust_accuracy"] == \
        first.results[0]["robust_accuracy"]


BN_FACTORY = '''
import torch
from torch import nn

MODES = []


class Recording(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                                 nn.Linear(4 * 8 * 8, 10))

    def forward(self, x):
        MODES.append(self.training)
        return self.net(x)


def build():
    torch.manual_seed(0)
    return Recording()  # in train mode, as nn.Module starts


def integer_logits():
    class Counts(nn.Module):
        def forward(self, x):
            return (x.flatten(1)[:, :10] * 10).long()
    return Counts()
'''


@pytest.fixture
def bn_factory(tmp_path, monkeypatch):
    import sys

    (tmp_path / "bn_factory.py").write_text(BN_FACTORY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("bn_factory", None)
    yield
    sys.modules.pop("bn_factory", None)


def test_cli_attacks_a_factory_model_in_eval_mode(tmp_path, bn_factory, capsys):
    # Before: --model-factory without --weights ran in train mode (BatchNorm statistics updated, batch-1 probe
    # refused the model).
    import sys

    code = main(["-q", "attack", "--model-factory", "bn_factory:build", "--data", "digits", "-n", "8", "--eps", "0.1",
                 "--steps", "2", "--out", str(tmp_path / "a")])
    capsys.readouterr()
    assert code == 0
    modes = sys.modules["bn_factory"].MODES
    assert modes and not any(modes)
    assert json.loads((tmp_path / "a" / "attack.json").read_text())["n"] == 8


def test_cli_refuses_a_model_with_integer_outputs(tmp_path, bn_factory, capsys):
    code = main(["-q", "attack", "--model-factory", "bn_factory:integer_logits", "--data", "digits", "-n", "8",
                 "--eps", "0.1", "--out", str(tmp_path / "a")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("robust-ext: error:") and err.count("\n") == 1, err
    assert "the model returns torch.int64 outputs; the attacks need floating-point logits" in err


def test_cli_reports_a_factory_that_exits(tmp_path, bn_factory, capsys):
    # Before: --model-factory builtins:exit ended robust-ext with status 0, no output and no files.
    code = main(["-q", "attack", "--model-factory", "builtins:exit", "--data", "digits", "-n", "8", "--eps", "0.1",
                 "--out", str(tmp_path / "a")])
    err = capsys.readouterr().err
    assert code == 2 and "raised SystemExit" in err and err.count("\n") == 1, err


def test_apgd_refuses_a_budget_whose_first_step_overflows():
    # Before: eps = 2e38 failed after the clean pass with "cannot be converted to type float without overflow".
    model, (x, y) = linear_model(), points()
    with pytest.raises(ValueError, match="eps must be <= 1.701e\\+38 for APGD, whose first step is 2 eps"):
        A.apgd(model, x, y, eps=2e38, steps=2, clip_min=-3e38, clip_max=3e38)


def test_cli_train_checks_mean_std_against_the_channels_before_training(tmp_path, capsys):
    # Before: a convolution's RuntimeError traceback, during training.
    code = main(["-q", "train", "--data", "digits", "--epochs", "1", "--mean", "0.5,0.5,0.5", "--std", "0.2,0.2,0.2",
                 "--out", str(tmp_path / "t")])
    err = capsys.readouterr().err
    assert code == 2 and "--mean/--std: 3 values, but the images have 1 channel(s)" in err and err.count("\n") == 1
    assert not (tmp_path / "t" / "last.pt").exists()


def test_cli_resume_of_another_architecture_is_one_clear_error(tmp_path, capsys):
    # Before: load_state_dict's RuntimeError traceback.
    out = str(tmp_path / "t")
    assert main(["-q", "train", "--data", "digits", "--epochs", "1", "--out", out]) == 0
    capsys.readouterr()
    code = main(["-q", "train", "--data", "digits", "--epochs", "1", "--arch", "preact_resnet", "--resume",
                 "--out", out])
    err = capsys.readouterr().err
    assert code == 2 and "cannot resume from" in err and "do not fit this model" in err and err.count("\n") == 1, err


@pytest.mark.parametrize("kwargs, match", [
    ({"n_examples": -1}, "n_examples must be an integer >= 0, got -1"),
    ({"eps": [0.0]}, r"min_eps bisects up to eps_max, by default the largest eps, which is 0.*--no-min-eps"),
    ({"plot_dir": "FILE"}, "plot_dir .*: is an existing file, expected a directory"),
])
def test_evaluate_checks_before_the_work(tmp_path, kwargs, match):
    # Before: plot_dir naming a file failed after the whole evaluation, n_examples=-1 was accepted, and eps 0
    # said "eps_max must be a finite float > 0" (a setting the caller never gave).
    from robust_ext.evaluation import evaluate

    calls = []
    model = linear_model()
    model.register_forward_hook(lambda *a: calls.append(1))
    (tmp_path / "file").write_text("x")
    kwargs = {k: (str(tmp_path / "file") if v == "FILE" else v) for k, v in kwargs.items()}
    with pytest.raises(ValueError, match=match):
        evaluate(model, points(), ["fgsm"], **{"eps": [0.1], "progress": False, **kwargs})
    assert not calls


def test_an_int_too_large_for_a_float_is_a_named_error():
    # Before: clip_max=10**400 raised a bare OverflowError from math.isnan.
    model, (x, y) = linear_model(), points()
    with pytest.raises(ValueError, match=r"clip_max must be a float, got 100000000000\.\.\."):
        A.pgd(model, x, y, eps=0.1, alpha=0.1, steps=1, clip_max=10 ** 400)
    with pytest.raises(ValueError, match="eps must be a finite float"):
        A.PGD(model, eps=10 ** 400)(x, y)
