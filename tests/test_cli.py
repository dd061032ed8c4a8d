"""The command line: each subcommand on tiny inputs, and one-line errors (exit 2) for what a user gets wrong."""
import json
import subprocess
import sys

import pytest
import torch

from robust_ext.cli import main
from robust_ext.demo import format_demo, run_demo
from robust_ext.models import SmallCNN, save_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "cnn.pt"
    save_checkpoint(path, SmallCNN())
    return path


def run(capsys, *argv):
    code = main(["-q", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_attack_writes_examples_and_report(tmp_path, checkpoint, capsys):
    code, out, _ = run(capsys, "attack", "--model", str(checkpoint), "--data", "mnist5k", "-n", "16",
                       "--attack", "pgd", "--eps", "0.1", "--steps", "3", "--out", str(tmp_path))
    assert code == 0
    report = json.loads((tmp_path / "attack.json").read_text())
    saved = torch.load(tmp_path / "adversarial.pt", weights_only=True)
    assert report["n"] == 16 and saved["x_adv"].shape == (16, 1, 28, 28)
    assert report["norms"]["linf_max"] <= 0.1 + 1e-6
    assert report["robust_accuracy"] <= report["clean_accuracy"]
    assert report["amp"] is False  # JSON false, as evaluate's params.amp and autoattack's config.amp
    assert (tmp_path / "adversarial_examples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(out)["attack"] == "pgd"


def test_evaluate_writes_report(tmp_path, checkpoint, capsys):
    code, out, _ = run(capsys, "evaluate", "--model", str(checkpoint), "-n", "16", "--attacks", "fgsm,pgd",
                       "--eps", "0.05,0.2", "--steps", "3", "--no-min-eps", "--out", str(tmp_path))
    assert code == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["eps"] == [0.05, 0.2] and set(report["attacks"]) == {"fgsm", "pgd"}
    assert (tmp_path / "accuracy_vs_eps.png").exists()


AMP_FACTORY = """
import torch
from robust_ext.models import SmallCNN
SEEN = []  # the autocast dtype (None: off) of every forward pass
class Recording(SmallCNN):
    def forward(self, x):
        SEEN.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return super().forward(x)
def build():
    torch.manual_seed(0)
    return Recording()
"""


@pytest.fixture
def recording_model(tmp_path, monkeypatch):
    """``amp_factory:build``: a CNN that records whether each forward pass ran under autocast, and in which dtype."""
    (tmp_path / "amp_factory.py").write_text(AMP_FACTORY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "amp_factory", raising=False)
    yield
    sys.modules.pop("amp_factory", None)


@pytest.mark.filterwarnings("ignore:.*bfloat16")
def test_amp_flag_reaches_the_attacks_and_the_reports(tmp_path, recording_model, capsys):
    common = ["--model-factory", "amp_factory:build", "-n", "8", "--eps", "0.1", "--steps", "2"]
    code, _, _ = run(capsys, "evaluate", *common, "--attacks", "pgd,fab", "--no-min-eps", "--out", "fp32")
    seen = sys.modules["amp_factory"].SEEN
    assert code == 0 and seen and set(seen) == {None}  # the default: fp32 throughout
    params = {k: v["params"] for k, v in json.loads((tmp_path / "fp32" / "report.json").read_text())["attacks"].items()}
    assert params["pgd"]["amp"] is False
    seen.clear()
    code, _, _ = run(capsys, "evaluate", *common, "--attacks", "pgd,fab", "--no-min-eps", "--amp", "bf16",
                     "--out", "bf16")
    assert code == 0 and torch.bfloat16 in seen
    assert None in seen  # the full-precision confirmations (and FAB, which has no amp)
    params = {k: v["params"] for k, v in json.loads((tmp_path / "bf16" / "report.json").read_text())["attacks"].items()}
    assert params["pgd"]["amp"] == "torch.bfloat16" and "amp" not in params["fab"]
    seen.clear()
    code, _, _ = run(capsys, "attack", *common, "--attack", "apgd", "--amp", "fp16", "--out", "attack")
    assert code == 0 and torch.float16 in seen
    assert json.loads((tmp_path / "attack" / "attack.json").read_text())["amp"] == "torch.float16"


@pytest.mark.parametrize("argv, message", [
    (["attack", "--model", "/nonexistent.pt", "--out", "{tmp}"], "--model /nonexistent.pt: no such file"),
    (["attack", "--model", "{ckpt}", "--data", "imagenet", "--out", "{tmp}"], "--data imagenet: unknown data set"),
    (["attack", "--model", "{ckpt}", "--attack", "cw", "--out", "{tmp}"], "invalid choice: 'cw'"),
    (["evaluate", "--model", "{ckpt}", "--attacks", "fgsm,deepfool", "-n", "4", "--out", "{tmp}"],
     "--attacks: unknown attack 'deepfool'"),
    (["evaluate", "--model", "{ckpt}", "--attacks", "autoattack,pgd", "-n", "4", "--out", "{tmp}"],
     "--attacks: autoattack runs alone"),
    (["evaluate", "--model", "{ckpt}", "--attacks", ",", "-n", "4", "--out", "{tmp}"],
     "--attacks: give one or more attack names"),
    (["attack", "--model", "{ckpt}", "--seed", "-1", "--out", "{tmp}"],
     "argument --seed: expected an integer in [0, 2**63), got '-1'"),
    (["evaluate", "--model", "{ckpt}", "--seed", str(2 ** 64), "--out", "{tmp}"], "argument --seed: expected an integer"),
    (["attack", "--model", "{ckpt}", "--data", "digits", "--out", "{tmp}"],
     "does not accept this data set's images"),
    (["attack", "--model", "{garbage}", "--out", "{tmp}"], "--model"),
    (["attack", "--model", "{ckpt}", "--data", "mnist-idx", "--out", "{tmp}"], "--data mnist-idx"),
    (["attack", "--model", "{ckpt}", "--attack", "bim", "--steps", "0", "--out", "{tmp}"],
     "argument --steps: expected an integer >= 1, got '0'"),
    (["evaluate", "--model", "{ckpt}", "--attacks", "fgsm", "--steps", "0", "--out", "{tmp}"],
     "argument --steps: expected an integer >= 1, got '0'"),
    (["tradeoff", "--eps", "0.1,0.1", "--out", "{tmp}"], "--eps: each training eps once, got 0.1,0.1"),
    (["attack", "--model", "{ckpt}", "--batch-size", "0", "--out", "{tmp}"], "--batch-size must be >= 1"),
    (["attack", "--model", "{ckpt}", "-n", "4", "--eps", "-1", "--out", "{tmp}"], "argument --eps: expected a finite number >= 0"),
    (["attack", "--model", "{ckpt}", "-n", "4", "--restarts", "0", "--out", "{tmp}"],
     "argument --restarts: expected an integer >= 1"),
    (["evaluate", "--model", "{ckpt}", "-n", "4", "--eps", "-0.1", "--out", "{tmp}"], "argument --eps: expected a finite number >= 0"),
    (["evaluate", "--model", "{ckpt}", "-n", "4", "--amp", "half", "--out", "{tmp}"],
     "argument --amp: expected one of auto, off, on, bf16, fp16, got 'half'"),
])
def test_user_errors_are_one_line(tmp_path, checkpoint, capsys, argv, message):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    argv = [a.format(tmp=tmp_path, ckpt=checkpoint, garbage=garbage) for a in argv]
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert err.startswith("robust-ext: error:") and message in err and "Traceback" not in err
    assert err.count("\n") == 1


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "robust_ext.cli", "info"], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["backend"]["cpu"] in ("extension", "reference")


@pytest.mark.slow  # trains two models; .ci/run also runs `robust-ext demo --quick`
def test_demo_pipeline_small(tmp_path, monkeypatch):
    """The demo's whole pipeline on a sliver of the data: files, table and targets are all there, and each
    model's "checkpoint" holds exactly the weights its numbers were scored on."""
    import robust_ext.demo

    scored, evaluate = {}, robust_ext.demo.evaluate

    def spy(model, *args, **kwargs):
        scored[kwargs["model_name"]] = {k: v.clone() for k, v in model.state_dict().items()}
        return evaluate(model, *args, **kwargs)

    monkeypatch.setattr(robust_ext.demo, "evaluate", spy)
    summary = run_demo(tmp_path, epochs=1, n_train=256, n_test=32, steps=2, curve=(0.1, 0.3), progress=False,
                       aa_points=8)
    assert set(summary["models"]) == {"standard", "robust"}
    for name in ("standard", "robust"):
        m = summary["models"][name]
        assert 0 <= m["bim"][0.3] <= m["bim"][0.1] + 1 / 32 <= m["clean"] + 2 / 32
        aa = m["autoattack"]  # AutoAttack on the first 8 digits: a point robust at 0.3 is robust at 0.1
        assert aa["points"] == 8 and 0 <= aa["robust"][0.3] <= aa["robust"][0.1] <= aa["clean"]
        assert json.loads((tmp_path / f"{name}_autoattack.json").read_text())["config"]["version"] == "fast"
        assert (tmp_path / name / "last.pt").exists() and (tmp_path / f"{name}_report.json").exists()
        assert m["checkpoint"] == str(tmp_path / name / "last.pt")  # no early stop: the final epoch was scored
        saved = torch.load(m["checkpoint"], weights_only=True)["state_dict"]
        assert all(torch.equal(saved[k], v) for k, v in scored[f"{name} CNN"].items())
    for png in ("accuracy_vs_eps.png", "adversarial_examples.png", "standard/curves.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "demo.json").read_text())["targets"].keys() == {
        "standard_clean", "robust_clean", "robust_autoattack_0.1"}  # no 0.15 on this grid: no gap target
    text = format_demo(summary)
    assert "MATLAB example's evaluation (reproduction)" in text and "AutoAttack fast, 8 digits" in text


def test_attack_success_rate_is_none_without_correct_samples(tmp_path, capsys):
    """No sample classified correctly: the success rate is undefined (None), not 0."""
    from robust_ext.data import load_dataset
    label = int(load_dataset("mnist5k", split="test").tensors[1][0])
    model = SmallCNN()
    with torch.no_grad():  # a constant model that always answers a wrong class
        model.classifier.weight.zero_()
        model.classifier.bias.zero_()
        model.classifier.bias[(label + 1) % 10] = 1.0
    ckpt = tmp_path / "wrong.pt"
    save_checkpoint(ckpt, model)
    code, _, _ = run(capsys, "attack", "--model", str(ckpt), "--data", "mnist5k", "--split", "test", "-n", "1",
                     "--attack", "fgsm", "--eps", "0.1", "--out", str(tmp_path / "out"))
    report = json.loads((tmp_path / "out" / "attack.json").read_text())
    assert code == 0 and report["clean_accuracy"] == 0.0 and report["success_rate"] is None
