"""Tests of robust_ext.models: shapes, parameter counts from independent formulas, checkpoint round trips,
and checkpoints that are corrupt, mismatched or carry arbitrary pickled objects."""
import os
import pickle
import random

import pytest
import torch
from torch import nn

from robust_ext import models
from robust_ext.pooling import ReLUMaxPool2d
from robust_ext.models import Normalized, PreActResNet, SmallCNN, build_model, load_checkpoint, load_model, save_checkpoint


def small_cnn_params(in_channels, num_classes, h, w, padding):
    """Conv2d(k=3): 9*cin*cout + cout; two 'valid-minus-padding' convs then a 2x2/2 pool; linear W + b."""
    side = lambda s: (s + 2 * padding - 2 + 2 * padding - 2) // 2
    return (9 * in_channels * 32 + 32) + (9 * 32 * 64 + 64) + (64 * side(h) * side(w) * num_classes + num_classes)


def preact_params(in_channels, num_classes, width, blocks):
    """Stem conv, per block two 3x3 convs + two BNs (+ a 1x1 shortcut when shapes change), final BN, linear."""
    total, c = 9 * in_channels * width, width
    for stage, n in enumerate(blocks):
        out = width * 2 ** stage
        for i in range(n):
            total += 2 * c + 9 * c * out + 2 * out + 9 * out * out
            total += c * out if c != out or (stage > 0 and i == 0) else 0
            c = out
    return total + 2 * c + c * num_classes + num_classes


def trained_like(model, shape):
    """Non-default BatchNorm statistics and weights, so that a round trip that drops buffers shows."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    model.train()
    model(torch.rand(8, *shape))
    return model.eval()


# ------------------------------------------------------------------------------------------------ SmallCNN
def test_small_cnn_is_the_matlab_example():
    model = SmallCNN()
    kinds = [type(m) for m in model.features] + [type(model.classifier)]
    # the last ReLU and the 2x2 max-pool are one fused layer (tests/test_pooling.py holds it to both)
    assert kinds == [nn.Conv2d, nn.ReLU, nn.Conv2d, ReLUMaxPool2d, nn.Linear]
    conv1, conv2 = model.features[0], model.features[2]
    assert (conv1.in_channels, conv1.out_channels, conv1.kernel_size, conv1.padding) == (1, 32, (3, 3), (1, 1))
    assert (conv2.in_channels, conv2.out_channels, conv2.kernel_size, conv2.padding) == (32, 64, (3, 3), (1, 1))
    assert (model.classifier.in_features, model.classifier.out_features) == (64 * 14 * 14, 10)
    assert models.count_parameters(model) == 144_266


@pytest.mark.parametrize("cfg", [
    dict(), dict(padding=0), dict(in_channels=3, input_size=32, num_classes=5),
    dict(input_size=(20, 24), padding=0), dict(input_size=8, num_classes=3),
])
def test_small_cnn_shapes_and_parameter_count(cfg):
    model = SmallCNN(**cfg)
    size = cfg.get("input_size", 28)
    h, w = (size, size) if isinstance(size, int) else size
    x = torch.rand(4, cfg.get("in_channels", 1), h, w)
    assert model(x).shape == (4, cfg.get("num_classes", 10))
    expected = small_cnn_params(cfg.get("in_channels", 1), cfg.get("num_classes", 10), h, w, cfg.get("padding", 1))
    assert models.count_parameters(model) == expected


@pytest.mark.parametrize("cfg", [dict(), dict(in_channels=3, input_size=(20, 24), padding=0)])
def test_small_cnn_channels_last_classifier_equals_nchw(cfg):
    """In channels_last the classifier reads the map in (h, w, c) order against a permuted weight (no copy
    of the map): logits, input gradients and weight gradients equal the NCHW model's to rounding, and
    hooks on the classifier still run (they take the plain path)."""
    torch.manual_seed(0)
    model = SmallCNN(**cfg)
    twin = SmallCNN(**cfg)
    twin.load_state_dict(model.state_dict())
    twin.to(memory_format=torch.channels_last)
    h, w = model.input_hw
    x = torch.rand(6, cfg.get("in_channels", 1), h, w)
    y = torch.arange(6) % 10
    grads = []
    for m, xin in ((model, x), (twin, x.contiguous(memory_format=torch.channels_last))):
        xin = xin.clone().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(m(xin), y)
        loss.backward()
        grads.append((m(xin).detach(), xin.grad, m.classifier.weight.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    seen = []
    twin.classifier.register_forward_hook(lambda mod, i, o: seen.append(i[0].shape))
    twin(x.contiguous(memory_format=torch.channels_last))
    assert len(seen) == 1
    # a classifier that is not a plain nn.Linear takes the plain path too
    twin.classifier = nn.Sequential(nn.Dropout(0.0), model.classifier)
    torch.testing.assert_close(twin(x.contiguous(memory_format=torch.channels_last)), model(x),
                               rtol=1e-5, atol=1e-6)


def test_small_cnn_refuses_wrong_sizes():
    with pytest.raises(ValueError, match="28x28"):
        SmallCNN()(torch.rand(1, 1, 32, 32))
    with pytest.raises(ValueError, match="no feature map"):
        SmallCNN(input_size=4, padding=0)


# -------------------------------------------------------------------------------------------- PreActResNet
@pytest.mark.parametrize("cfg,size", [
    (dict(), 32), (dict(width=8, blocks=(2, 2, 2, 2)), 32), (dict(width=4, blocks=[1, 2]), 17),
    (dict(in_channels=1, num_classes=7, width=8), 28),
])
def test_preact_resnet_shapes_and_parameter_count(cfg, size):
    model = PreActResNet(**cfg).eval()
    assert model(torch.rand(3, cfg.get("in_channels", 3), size, size)).shape == (3, cfg.get("num_classes", 10))
    expected = preact_params(cfg.get("in_channels", 3), cfg.get("num_classes", 10), cfg.get("width", 16),
                             tuple(cfg.get("blocks", (1, 1, 1, 1))))
    assert models.count_parameters(model) == expected


def test_preact_block_matches_its_formula():
    """He et al. 2016, fig. 4(e): the projection shortcut takes the pre-activated input, as the residual does."""
    torch.manual_seed(0)
    block = models.PreActBlock(4, 8, stride=2).eval()
    for bn in (block.bn1, block.bn2):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 4, 9, 9)
    bn = lambda m, t: (t - m.running_mean[:, None, None]) / torch.sqrt(m.running_var[:, None, None] + m.eps) \
        * m.weight[:, None, None] + m.bias[:, None, None]
    pre = torch.relu(bn(block.bn1, x))
    residual = torch.conv2d(torch.relu(bn(block.bn2, torch.conv2d(pre, block.conv1.weight, stride=2, padding=1))),
                            block.conv2.weight, padding=1)
    expected = residual + torch.conv2d(pre, block.shortcut.weight, stride=2)
    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)
    identity = models.PreActBlock(8, 8, stride=1).eval()
    assert identity.shortcut is None
    y = torch.randn(2, 8, 5, 5)
    torch.testing.assert_close(identity(y) - y, identity.conv2(torch.relu(identity.bn2(identity.conv1(
        torch.relu(identity.bn1(y)))))), rtol=1e-5, atol=1e-5)


def test_preact_resnet18_size():
    # kuangliu/pytorch-cifar's PreActResNet18 has 11,171,146; the final BN (2 * 512) of He et al.'s design,
    # kept by the adversarial-training versions (Wong et al. 2020, Rice et al. 2020), adds 1,024.
    assert models.count_parameters(PreActResNet(width=64, blocks=(2, 2, 2, 2))) == 11_171_146 + 2 * 512


def test_preact_resnet_rejects_bad_config():
    with pytest.raises(ValueError, match="blocks"):
        PreActResNet(blocks=())
    with pytest.raises(ValueError, match="width"):
        PreActResNet(width=0)


@pytest.mark.parametrize("name,shape", [("small_cnn", (1, 28, 28)), ("preact_resnet", (3, 32, 32))])
def test_models_give_input_gradients_in_float64(name, shape):
    model = build_model(name).double().eval()
    x = torch.rand(2, *shape, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(model(x).logsumexp(1).sum(), x)
    assert grad.shape == x.shape and grad.dtype == torch.float64 and grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


# ------------------------------------------------------------------------------------------------ Normalized
def test_normalized_matches_manual_normalization():
    inner = SmallCNN(in_channels=3, input_size=32).eval()
    mean, std = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]
    model = Normalized(inner, mean, std).eval()
    x = torch.rand(5, 3, 32, 32)
    manual = inner((x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))
    torch.testing.assert_close(model(x), manual, rtol=0, atol=0)
    assert set(model.state_dict()) >= {"mean", "std"}


@pytest.mark.parametrize("mean,std", [([0.5], [0.0]), ([0.5, 0.5], [0.2]), ([], []), ([0.5], [float("nan")])])
def test_normalized_rejects_bad_statistics(mean, std):
    with pytest.raises(ValueError):
        Normalized(SmallCNN(), mean, std)


# ------------------------------------------------------------------------------------------------ registry
def test_build_model_registry():
    assert {"small_cnn", "preact_resnet", "normalized"} <= set(models.available_models())
    model = build_model("small_cnn", num_classes=4)
    assert isinstance(model, SmallCNN) and model.classifier.out_features == 4
    with pytest.raises(ValueError, match="unknown model 'resnet9000'.*small_cnn"):
        build_model("resnet9000")


def test_model_spec_is_public_and_checkpoints_live_in_their_module():
    """Training asks models.model_spec (no private reach-in); robust_ext.checkpoints holds save/load, and
    the old import path from models still works."""
    import robust_ext.checkpoints as checkpoints

    assert models.model_spec(SmallCNN(num_classes=3))[0] == "small_cnn"
    assert models.model_spec(SmallCNN(num_classes=3))[1]["num_classes"] == 3
    with pytest.raises(ValueError, match="build_model"):
        models.model_spec(nn.Linear(2, 2))
    assert not hasattr(models, "_spec")
    assert (models.save_checkpoint, models.load_checkpoint, models.load_model) == \
        (checkpoints.save_checkpoint, checkpoints.load_checkpoint, checkpoints.load_model)


@pytest.fixture
def registered_mlp():
    @models.register_model("test_mlp")
    def mlp(hidden=8):
        return nn.Sequential(nn.Flatten(), nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 2))
    yield "test_mlp"
    del models._REGISTRY["test_mlp"]


def test_custom_registered_model_round_trip(tmp_path, registered_mlp):
    model = build_model(registered_mlp, hidden=5)
    with pytest.raises(ValueError, match="already registered"):
        models.register_model(registered_mlp)(lambda: model)
    save_checkpoint(tmp_path / "m.pt", model)
    loaded = load_model(tmp_path / "m.pt")
    x = torch.rand(3, 2, 2)
    assert torch.equal(model(x), loaded(x)) and loaded[1].out_features == 5


def test_unregistered_model_cannot_be_checkpointed(tmp_path):
    with pytest.raises(ValueError, match="build_model"):
        save_checkpoint(tmp_path / "m.pt", nn.Linear(2, 2))
    with pytest.raises(ValueError, match="build_model"):
        save_checkpoint(tmp_path / "m.pt", Normalized(nn.Linear(2, 2), [0.0], [1.0]))
    assert not any(tmp_path.iterdir())


# --------------------------------------------------------------------------------------------- checkpoints
ROUND_TRIP = [
    ("small_cnn", lambda: SmallCNN(padding=0, num_classes=7), (1, 28, 28)),
    ("preact_resnet", lambda: build_model("preact_resnet", width=8, blocks=[1, 2]), (3, 32, 32)),
    ("normalized", lambda: Normalized(PreActResNet(width=4), [0.4, 0.5, 0.6], [0.2, 0.3, 0.25]), (3, 32, 32)),
]


@pytest.mark.parametrize("name,make,shape", ROUND_TRIP, ids=[r[0] for r in ROUND_TRIP])
def test_checkpoint_round_trip_gives_identical_outputs(tmp_path, name, make, shape):
    model = trained_like(make(), shape)
    path = save_checkpoint(tmp_path / "ckpt.pt", model, epoch=3, metrics={"acc": 0.5, "curve": [1.0, 0.5]},
                           note="x", best=torch.tensor([1.0, 2.0]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]  # no temporary left behind
    loaded = load_model(path)
    assert type(loaded) is type(model) and not loaded.training
    x = torch.rand(4, *shape)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    checkpoint = load_checkpoint(path)
    assert checkpoint["arch"] == name and checkpoint["epoch"] == 3 and checkpoint["metrics"]["curve"] == [1.0, 0.5]
    assert torch.equal(checkpoint["best"], torch.tensor([1.0, 2.0]))


def test_checkpoint_format_keys(tmp_path):
    save_checkpoint(tmp_path / "c.pt", SmallCNN(num_classes=3))
    raw = torch.load(tmp_path / "c.pt", weights_only=True)
    assert raw["arch"] == "small_cnn" and raw["config"] == {"in_channels": 1, "num_classes": 3, "input_size": 28,
                                                            "padding": 1}
    assert set(raw["state_dict"]) == set(SmallCNN().state_dict())


def test_save_is_atomic_when_writing_fails(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "c.pt", SmallCNN())
    before = path.read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, SmallCNN(num_classes=3))
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]


def test_save_into_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError):
        save_checkpoint(tmp_path / "nope" / "c.pt", SmallCNN())


@pytest.mark.parametrize("extra,match", [
    ({"state_dict": {}}, "reserved"), ({"arch": "x"}, "reserved"),
    ({"history": [1.0, object()]}, r"extra\['history'\]\[1\]"),
    ({"mean": __import__("numpy").float64(0.5)}, "numpy.float64"),
    ({"by": {(1, 2): 3}}, "key of type tuple"),
])
def test_save_refuses_extras_that_weights_only_would_refuse(tmp_path, extra, match):
    with pytest.raises(ValueError, match=match):
        save_checkpoint(tmp_path / "c.pt", SmallCNN(), **extra)
    assert not any(tmp_path.iterdir())


def test_corrupt_checkpoints_raise_clearly(tmp_path):
    good = save_checkpoint(tmp_path / "good.pt", SmallCNN()).read_bytes()
    cases = {"empty.pt": b"", "truncated.pt": good[: len(good) // 2], "text.pt": b"hello, not a checkpoint\n",
             "tail.pt": good[len(good) // 2:], **{f"random{i}.pt": random.Random(i).randbytes(2000) for i in range(20)}}
    for name, blob in cases.items():
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(ValueError, match=name):
            load_model(tmp_path / name)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_model(tmp_path / "missing.pt")


@pytest.mark.parametrize("content,match", [
    ({"a": 1}, "not a robust_ext checkpoint"),
    (SmallCNN().state_dict(), "bare state_dict"),
    ([1, 2, 3], "not a robust_ext checkpoint"),
    ({"arch": 3, "config": {}, "state_dict": {}}, "malformed"),
    ({"arch": "small_cnn", "config": {}, "state_dict": {"w": 1}}, "malformed"),
    ({"format": "robust_ext.checkpoint/9", "arch": "small_cnn", "config": {}, "state_dict": {}}, "format"),
])
def test_non_checkpoints_raise_clearly(tmp_path, content, match):
    torch.save(content, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=f"other.pt.*{match}"):
        load_model(tmp_path / "other.pt")


def test_unknown_architecture_and_bad_config(tmp_path):
    state = SmallCNN().state_dict()
    torch.save({"arch": "vit_huge", "config": {}, "state_dict": state}, tmp_path / "a.pt")
    with pytest.raises(ValueError, match="a.pt.*unknown architecture 'vit_huge'"):
        load_model(tmp_path / "a.pt")
    torch.save({"arch": "small_cnn", "config": {"depth": 3}, "state_dict": state}, tmp_path / "b.pt")
    with pytest.raises(ValueError, match="b.pt.*cannot build 'small_cnn'"):
        load_model(tmp_path / "b.pt")


@pytest.mark.parametrize("change", ["shape", "missing key", "extra key"])
def test_mismatched_state_dict_raises(tmp_path, change):
    path = save_checkpoint(tmp_path / "c.pt", SmallCNN())
    checkpoint = torch.load(path, weights_only=True)
    if change == "shape":
        checkpoint["config"]["num_classes"] = 5
    elif change == "missing key":
        del checkpoint["state_dict"]["classifier.bias"]
    else:
        checkpoint["state_dict"]["extra.weight"] = torch.zeros(1)
    torch.save(checkpoint, path)
    with pytest.raises(RuntimeError, match="c.pt.*does not match architecture 'small_cnn'"):
        load_model(path)


class RunsCommand:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_checkpoint_with_arbitrary_object_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    checkpoint = {"arch": "small_cnn", "config": {}, "state_dict": SmallCNN().state_dict(),
                  "payload": RunsCommand(f"touch {marker}")}
    torch.save(checkpoint, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="evil.pt.*weights_only"):
        load_model(tmp_path / "evil.pt")
    assert not marker.exists()
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(RunsCommand(f"touch {marker}"), protocol=2))  # legacy pickle
    with pytest.raises(ValueError, match="evil.pkl"):
        load_checkpoint(tmp_path / "evil.pkl")
    assert not marker.exists()
