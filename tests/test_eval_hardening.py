"""Evaluation and the attack command facing a broken model or a batch size too large for the machine."""
import json
import logging
import math

import pytest
import torch
from torch import nn

from robust_ext.cli import main
from robust_ext.evaluation import EvaluationWarning, evaluate
from robust_ext.evaluation import memory
from robust_ext.models import SmallCNN, save_checkpoint


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 1000), nn.ReLU(), nn.Linear(1000, 10)).eval()


def test_bytes_per_sample_counts_the_activations_autograd_keeps():
    x, y = torch.rand(6, 1, 8, 8), torch.arange(6)
    # By hand, per sample: the ReLU's 1000 floats, the loss's 10 log-softmax floats and its int64 label
    # (Linear's input is a view of x, and the weights are not per sample), doubled, plus 8 images of 64
    # floats; the loss's few scalars add a handful of bytes.
    expected = 2 * (1000 * 4 + 10 * 4 + 8) + 8 * 64 * 4
    assert expected <= memory.bytes_per_sample(_mlp(), x, y) <= expected + 16


def test_the_working_batch_is_capped_by_free_memory_with_the_same_results(monkeypatch, caplog):
    model = _mlp()
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(40, 1, 8, 8, generator=g), torch.randint(0, 10, (40,), generator=g)
    kw = dict(eps=[0.05, 0.2], min_eps=False, progress=False, large_eps=None, batch_size=100)
    full = evaluate(model, (x, y), ["fgsm", "bim"], **kw)
    per_sample = memory.bytes_per_sample(model, x, y)
    monkeypatch.setattr(memory, "available_memory", lambda device: 2 * 7 * per_sample + 1)
    with caplog.at_level(logging.WARNING, logger="robust_ext.evaluation"):
        capped = evaluate(model, (x, y), ["fgsm", "bim"], **kw)
    assert capped.config["working_batch_size"] == 7 and full.config["working_batch_size"] == 100
    assert "attacking 7 samples at a time" in caplog.text
    assert capped.clean_accuracy == full.clean_accuracy
    for name in ("fgsm", "bim"):  # the same decisions; perturbation means differ only by summation order
        assert capped.attacks[name]["accuracy"] == full.attacks[name]["accuracy"]
        assert capped.attacks[name]["linf_mean"] == pytest.approx(full.attacks[name]["linf_mean"], rel=1e-12)




def test_nonfinite_logits_are_their_own_warning_with_the_count():
    model = SmallCNN().eval()
    with torch.no_grad():
        model.classifier.weight.fill_(float("nan"))
    x, y = torch.rand(12, 1, 28, 28), torch.arange(12) % 10
    with pytest.warns(EvaluationWarning, match="non-finite logits .* for 12 of 12 samples"):
        report = evaluate(model, (x, y), ["fgsm"], eps=[0.1], min_eps=False, progress=False, large_eps=None)
    assert report.diagnostics["nonfinite_logits"] == 12


def test_attack_reports_nonfinite_logits(tmp_path, capsys):
    model = SmallCNN()
    with torch.no_grad():
        model.classifier.bias.fill_(float("inf"))
        model.classifier.bias[0] = -float("inf")
    ckpt = tmp_path / "broken.pt"
    save_checkpoint(ckpt, model)
    assert main(["attack", "--model", str(ckpt), "-n", "10", "--attack", "fgsm", "--out", str(tmp_path / "o")]) == 0
    out, err = capsys.readouterr()
    result = json.loads(out)
    assert result["nonfinite_logits"] == 10 and "non-finite logits" in result["warnings"][0]
    assert "non-finite logits (NaN or inf) for 10 of 10 samples" in err


def test_training_refuses_negative_and_float_labels():
    from robust_ext.training import train

    x = torch.rand(8, 1, 28, 28)
    for labels, error, match in ((torch.tensor([0, 1, 2, -100, 4, 5, 6, 7]), ValueError, "labels must be class indices >= 0, got -100"),
                                 (torch.arange(8).float(), TypeError, "labels must be an integer tensor")):
        with pytest.raises(error, match=match):
            train(SmallCNN(), torch.utils.data.TensorDataset(x, labels), None, epochs=1, progress=False, plot=False)


def test_attacks_name_labels_beyond_the_models_classes():
    from robust_ext import attacks as A

    model = SmallCNN().eval()
    x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 10, 3])
    for attack in (lambda: A.fgsm(model, x, y, eps=0.1), lambda: A.pgd(model, x, y, eps=0.1, alpha=0.01, steps=2)):
        with pytest.raises(RuntimeError, match="labels must be < the model's 10 classes"):
            attack()
