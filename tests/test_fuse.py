"""robust_ext.fuse: a user's own model on the fused layers, with the original's logits, gradients and
state_dict, and a clear report of what it could not fuse."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robust_ext import attacks as A
from robust_ext.batchnorm import bn_relu
from robust_ext.fuse import fuse, relu_pool



def _calibrated(model):
    torch.manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


def plain_cnn(bn=False):
    torch.manual_seed(0)
    layers = [nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1)]
    layers += [nn.BatchNorm2d(16), nn.ReLU(inplace=True), nn.Conv2d(16, 16, 3, padding=1)] if bn else []
    layers += [nn.ReLU(), nn.MaxPool2d(kernel_size=2, stride=2), nn.Flatten(), nn.Linear(16 * 7 * 7, 10)]
    return _calibrated(nn.Sequential(*layers))


class Block(nn.Module):
    """A pre-activation block written the torchvision way, with three spellings of ReLU."""

    def __init__(self, c):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1, bias=False)

    def forward(self, x):
        out = self.conv1(F.relu(self.bn1(x)))
        return x + self.conv2(self.bn2(out).relu())


class PlainResNet(nn.Module):
    def __init__(self, branchy=False):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(Block(8), Block(8))
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 8 * 8, 10)
        self.branchy = branchy

    def forward(self, x):
        out = self.blocks(self.stem(x))
        if self.branchy and bool(out.sum() > 0):  # data-dependent control flow: torch.fx cannot trace it
            out = out * 1.0
        return self.fc(F.max_pool2d(torch.relu(self.bn(out)), 2).flatten(1))


def grads(model, x, y):
    x = x.clone().requires_grad_(True)
    logits = model(x)
    return logits.detach(), torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), x)[0]


def test_a_plain_cnn_fuses_exactly():
    model = plain_cnn()
    fused, report = fuse(model, return_report=True)
    assert [p for p, _ in report.fused] == ["1", "4"] and not report.left
    assert fused is not model and list(fused.state_dict()) == list(model.state_dict())
    x, y = torch.rand(6, 1, 28, 28), torch.arange(6)
    for a, b in zip(grads(model, x, y), grads(fused, x, y)):
        torch.testing.assert_close(b, a, rtol=0, atol=0)  # ReLU + pool fused: ATen's values and gradients
    assert sum(1 for n in fused.graph.nodes if n.target is relu_pool) == 2
    assert type(model[1]) is nn.ReLU and type(model[2]) is nn.MaxPool2d  # the original is not changed


class SharedInplace(nn.Module):
    """An in-place ReLU whose input another branch also reads (it sees the ReLU's output, in place)."""

    def __init__(self):
        super().__init__()
        self.conv, self.relu, self.pool = nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)
        self.fc = nn.Linear(4 * 14 * 14 * 2, 10)

    def forward(self, x):
        h = self.conv(x)
        p = self.pool(self.relu(h))
        return self.fc(torch.cat([p, F.max_pool2d(h, 2)], 1).flatten(1))


def test_an_inplace_relu_fuses_only_where_nothing_else_reads_its_input():
    # Before: the fused layer left h unchanged where the in-place ReLU had changed it: other logits.
    torch.manual_seed(0)
    shared = SharedInplace().eval()
    fused, report = fuse(shared, return_report=True)
    assert not report.fused
    x = torch.rand(4, 1, 28, 28)
    torch.testing.assert_close(fused(x), shared(x), rtol=0, atol=0)
    torch.manual_seed(0)
    private = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)).eval()
    fused, report = fuse(private, return_report=True)
    assert [k for _, k in report.fused] == ["ReLU + max_pool2d(2)"]
    torch.testing.assert_close(fused(x), private(x), rtol=0, atol=0)


def test_batchnorm_relu_fuses_unless_the_relu_feeds_a_pool():
    model = plain_cnn(bn=True)
    fused, report = fuse(model, return_report=True)
    assert sorted(k for _, k in report.fused) == ["BatchNorm + ReLU", "ReLU + max_pool2d(2)", "ReLU + max_pool2d(2)"]
    x, y = torch.rand(6, 1, 28, 28), torch.arange(6)
    (l0, g0), (l1, g1) = grads(model, x, y), grads(fused, x, y)
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)  # BatchNorm's scale/shift form: rounding
    torch.testing.assert_close(g1, g0, rtol=1e-4, atol=1e-6)
    model.train(), fused.train()
    torch.testing.assert_close(fused(x), model(x), rtol=0, atol=0)  # training mode: ATen's ops, batch stats


def test_a_traceable_custom_model_fuses_every_spelling():
    model = _calibrated(PlainResNet())
    fused, report = fuse(model, return_report=True)
    assert {p for p, _ in report.fused} == {"blocks.0.bn1", "blocks.0.bn2", "blocks.1.bn1", "blocks.1.bn2", ""}
    assert set(fused.state_dict()) == set(model.state_dict())
    x, y = torch.rand(4, 3, 16, 16), torch.arange(4)
    (l0, g0), (l1, g1) = grads(model, x, y), grads(fused, x, y)
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g1, g0, rtol=1e-4, atol=1e-6)
    assert sum(1 for n in fused.graph.nodes if n.target is bn_relu) == 4


def test_an_untraceable_model_fuses_its_children_and_says_so():
    model = _calibrated(PlainResNet(branchy=True))
    fused, report = fuse(model, return_report=True)
    assert report.left and report.left[0][0] == "" and "does not trace with torch.fx" in report.left[0][1]
    assert {p for p, _ in report.fused} == {"blocks.0.bn1", "blocks.0.bn2", "blocks.1.bn1", "blocks.1.bn2"}
    assert type(fused) is PlainResNet and type(model.blocks[0]) is Block  # a copy, the original untouched
    assert fused.stem is model.stem  # sharing parameters
    x = torch.rand(4, 3, 16, 16)
    torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-5)
    fused.load_state_dict(model.state_dict())  # the same keys, strict


def test_what_is_not_fused():
    torch.manual_seed(0)
    seen = []
    relu = nn.ReLU()
    relu.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    for model in (nn.Sequential(nn.Conv2d(1, 4, 3), relu, nn.MaxPool2d(2)),  # a hook must still run
                  nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(3)),
                  nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2, padding=1)),
                  nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2, stride=1)),
                  nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True))):
        fused, report = fuse(model.eval(), return_report=True)
        assert fused is model and not report.fused
    model[0](torch.rand(1, 1, 8, 8))
    fuse(nn.Sequential(nn.Conv2d(1, 4, 3), relu, nn.MaxPool2d(2)))(torch.rand(1, 1, 8, 8))
    assert seen == [torch.Size([1, 4, 6, 6])]

    class TwoUsers(nn.Module):  # the ReLU's output is used twice: fusing it away would lose it
        def forward(self, x):
            r = F.relu(x)
            return F.max_pool2d(r, 2).sum() + r.sum()
    assert fuse(TwoUsers(), return_report=True)[1].fused == []


def test_unbatched_inputs_keep_atens_path():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2)).eval()
    fused = fuse(model)
    x = torch.rand(1, 9, 9)  # (C, H, W): nn.MaxPool2d takes it, the fused op does not
    torch.testing.assert_close(fused(x), model(x), rtol=0, atol=0)


def test_attacks_on_the_fused_model_equal_the_originals():
    model = plain_cnn()
    x, y = torch.rand(16, 1, 28, 28), torch.arange(16) % 10
    kw = dict(eps=0.1, alpha=0.02, steps=5)
    a = A.pgd(model, x, y, generator=torch.Generator().manual_seed(0), **kw)
    b = A.PGD(model, fuse=True, generator=torch.Generator().manual_seed(0), **kw)(x, y)
    torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_fuse_refuses_what_is_not_a_module():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        fuse(lambda x: x)


def test_evaluation_and_training_take_fuse():
    from robust_ext.evaluation import evaluate
    from robust_ext.training import train

    model = plain_cnn()
    torch.manual_seed(0)
    x, y = torch.rand(48, 1, 28, 28), torch.randint(0, 10, (48,))
    kw = dict(eps=[0.05, 0.1], min_eps=False, progress=False, large_eps=None)
    plain, fused = evaluate(model, (x, y), ["fgsm", "pgd"], **kw), evaluate(model, (x, y), ["fgsm", "pgd"], fuse=True, **kw)
    assert [tuple(f) for f in fused.config["fused"]["fused"]] == [("1", "ReLU + max_pool2d(2)"),
                                                                   ("4", "ReLU + max_pool2d(2)")]
    assert plain.config["fused"] is None
    for name in ("fgsm", "pgd"):  # the fused pooling is exact: the same attacks, the same numbers
        assert fused.attacks[name]["accuracy"] == plain.attacks[name]["accuracy"]
    states = []
    for f in (False, True):
        net = plain_cnn().train()
        train(net, torch.utils.data.TensorDataset(x, y), None, method="pgd", eps=0.1, pgd_steps=2, epochs=1, batch_size=16, eval_samples=16,
              fuse=f, progress=False, plot=False)
        states.append(net.state_dict())
    for k in states[0]:  # the training attacks ran on the fused layers, exactly as on ATen's
        torch.testing.assert_close(states[1][k], states[0][k], rtol=0, atol=0)
