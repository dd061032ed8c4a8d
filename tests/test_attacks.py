"""robust_ext.attacks: invariants, strength against torchattacks, model handling, errors.

The model is a small CNN trained for a few seconds on scikit-learn's 8x8 digits (scaled to [0, 1]);
it has BatchNorm and Dropout so that the attack's eval mode matters.
"""
import copy
import math

import pytest
import torch
from torch import nn

from robust_ext import attacks as A
from robust_ext import ops

EPS, ALPHA, STEPS = 0.1, 0.025, 10

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def torchattacks():
    return pytest.importorskip("torchattacks")


def accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_model_is_accurate(digits):
    model, x, y = digits
    assert accuracy(model, x, y) > 0.9


# ---- equal to / at least as strong as torchattacks --------------------------------------------------

def test_bim_equals_torchattacks_pgd_without_random_start_bit_exact(digits, torchattacks):
    model, x, y = digits
    ours = A.bim(model, x, y, eps=EPS, alpha=ALPHA, steps=STEPS)
    theirs = torchattacks.PGD(model, eps=EPS, alpha=ALPHA, steps=STEPS, random_start=False)(x, y)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_bim_matches_torchattacks_bim(digits, torchattacks):
    # torchattacks.BIM projects with max/min instead of x + clamp(v - x): the same up to rounding.
    model, x, y = digits
    ours = A.bim(model, x, y, eps=EPS, alpha=ALPHA, steps=STEPS)
    theirs = torchattacks.BIM(model, eps=EPS, alpha=ALPHA, steps=STEPS)(x, y)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-7)
    assert (ours != theirs).float().mean() < 0.01
    assert accuracy(model, ours, y) == accuracy(model, theirs, y)


def test_bim_class_equals_torchattacks_bim_defaults(digits, torchattacks):
    model, x, y = digits
    ours = A.BIM(model)(x, y)
    theirs = torchattacks.BIM(model)(x, y)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-7)


def test_fgsm_equals_torchattacks_bit_exact(digits, torchattacks):
    model, x, y = digits
    torch.testing.assert_close(A.fgsm(model, x, y, eps=EPS), torchattacks.FGSM(model, eps=EPS)(x, y), rtol=0, atol=0)
    torch.testing.assert_close(A.FGSM(model, eps=EPS)(x, y), torchattacks.FGSM(model, eps=EPS)(x, y), rtol=0, atol=0)


def test_pgd_at_least_as_strong_as_torchattacks(digits, torchattacks):
    model, x, y = digits
    ours = [accuracy(model, A.pgd(model, x, y, eps=EPS, alpha=ALPHA, steps=STEPS, generator=gen(s)), y)
            for s in range(3)]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        atk = torchattacks.PGD(model, eps=EPS, alpha=ALPHA, steps=STEPS, random_start=True)
        theirs = [accuracy(model, atk(x, y), y) for _ in range(3)]
    assert sum(ours) / 3 <= sum(theirs) / 3 + 0.01, (ours, theirs)
    assert max(ours) < accuracy(model, x, y) - 0.2


# ---- invariants -------------------------------------------------------------------------------------

ATTACKS = {
    "fgsm": lambda m, x, y, **k: A.fgsm(m, x, y, eps=EPS, **k),
    "fgsm_rs": lambda m, x, y, **k: A.fgsm_rs(m, x, y, eps=EPS, generator=gen(), **k),
    "bim": lambda m, x, y, **k: A.bim(m, x, y, eps=EPS, alpha=ALPHA, steps=3, **k),
    "pgd": lambda m, x, y, **k: A.pgd(m, x, y, eps=EPS, alpha=ALPHA, steps=3, generator=gen(), **k),
    "pgd_restarts": lambda m, x, y, **k: A.pgd(m, x, y, eps=EPS, alpha=ALPHA, steps=3, restarts=2, generator=gen(),
                                               **k),
    "pgd_early_stop": lambda m, x, y, **k: A.pgd(m, x, y, eps=EPS, alpha=ALPHA, steps=3, early_stop=True,
                                                 generator=gen(), **k),
    "pgd_es_restarts": lambda m, x, y, **k: A.pgd(m, x, y, eps=EPS, alpha=ALPHA, steps=3, early_stop=True,
                                                  restarts=2, generator=gen(), **k),
}


def assert_in_ball(x_adv, x, eps, lo=0.0, hi=1.0):
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and x_adv.device == x.device
    assert not x_adv.requires_grad
    eps = torch.as_tensor(eps, dtype=x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
    ulp = torch.finfo(x.dtype).eps * max(abs(lo), abs(hi), 1.0)
    assert ((x_adv - x).abs() <= eps + ulp).all()
    assert (x_adv >= lo).all() and (x_adv <= hi).all()


@pytest.mark.parametrize("name", ATTACKS)
def test_eps_ball_and_bounds(digits, name):
    model, x, y = digits
    x_adv = ATTACKS[name](model, x, y)
    assert_in_ball(x_adv, x, EPS)
    assert accuracy(model, x_adv, y) < accuracy(model, x, y)


@pytest.mark.parametrize("name", ATTACKS)
def test_targeted_and_margin_run_everywhere(digits, name):
    model, x, y = digits
    target = (y + 1) % 10
    assert_in_ball(ATTACKS[name](model, x, target, targeted=True, loss="margin"), x, EPS)


def test_other_bounds_with_normalization_inside_the_model(digits):
    model, x, y = digits
    to_unit = nn.Sequential(_Affine(0.5, 0.5), model)  # the model sees (x + 1) / 2, x in [-1, 1]
    xs = x * 2 - 1
    x_adv = A.pgd(to_unit, xs, y, eps=2 * EPS, alpha=2 * ALPHA, steps=STEPS, clip_min=-1.0, clip_max=1.0,
                  generator=gen())
    assert_in_ball(x_adv, xs, 2 * EPS, -1.0, 1.0)
    unit = A.pgd(model, x, y, eps=EPS, alpha=ALPHA, steps=STEPS, generator=gen())
    assert abs(accuracy(to_unit, x_adv, y) - accuracy(model, unit, y)) <= 0.02


class _Affine(nn.Module):
    def __init__(self, scale, shift):
        super().__init__()
        self.scale, self.shift = scale, shift

    def forward(self, x):
        return x * self.scale + self.shift


def test_layouts_are_kept_and_non_contiguous_inputs_work(digits):
    model, x, y = digits
    cl = x.to(memory_format=torch.channels_last)
    out = A.pgd(model, cl, y, eps=EPS, alpha=ALPHA, steps=2, generator=gen())
    assert out.is_contiguous(memory_format=torch.channels_last)
    # The same attack; channels_last convolutions round differently, which can flip a gradient sign.
    same = A.pgd(model, x, y, eps=EPS, alpha=ALPHA, steps=2, generator=gen())
    assert (out != same).float().mean() < 1e-3
    wide = torch.cat([x, x], dim=3)[..., ::2]  # non-contiguous view
    assert_in_ball(A.bim(model, wide, y, eps=EPS, alpha=ALPHA, steps=2), wide, EPS)


def test_empty_batch(digits):
    model, x, y = digits
    for name in ATTACKS:
        assert ATTACKS[name](model, x[:0], y[:0]).shape == x[:0].shape


# ---- restarts, early stop, targeted, per-sample eps, losses ----------------------------------------

def _loss_and_fooled(model, x_adv, y, targeted=False):
    """Per sample: what the attack maximizes (the loss; minus it towards a target) and success."""
    with torch.no_grad():
        logits = model(x_adv)
    loss = nn.functional.cross_entropy(logits, y, reduction="none")
    return (-loss, logits.argmax(1) == y) if targeted else (loss, logits.argmax(1) != y)


@pytest.mark.parametrize("targeted", [False, True])
def test_restarts_never_weaker_per_sample(digits, targeted):
    # The first restart draws what a single run draws, so per sample the restarts' pick is at least as bad.
    model, x, y = digits
    labels = (y + 5) % 10 if targeted else y
    kw = dict(eps=EPS, alpha=ALPHA, steps=5, targeted=targeted)
    one = A.pgd(model, x, labels, generator=gen(3), **kw)
    three = A.pgd(model, x, labels, restarts=3, generator=gen(3), **kw)
    loss1, fooled1 = _loss_and_fooled(model, one, labels, targeted)
    loss3, fooled3 = _loss_and_fooled(model, three, labels, targeted)
    assert (fooled3 | ~fooled1).all(), "a sample fooled by one restart must stay fooled"
    both_robust = ~fooled1 & ~fooled3
    assert (loss3[both_robust] >= loss1[both_robust] - 1e-6).all()
    assert fooled3.sum() >= fooled1.sum()


class _Counting(nn.Module):
    """Counts the rows the attack forwards."""

    def __init__(self, model):
        super().__init__()
        self.model, self.rows, self.calls = model, 0, 0

    def forward(self, x):
        self.rows += x.shape[0]
        self.calls += 1
        return self.model(x)


@pytest.mark.parametrize("targeted", [False, True])
def test_early_stop_at_least_as_strong_and_cheaper(digits, targeted):
    # float64: early stop runs smaller batches, and fp32 kernels may round differently per batch size
    # (a rare gradient sign flip); in float64 both runs follow one trajectory until early stop leaves it.
    model, x, y = digits
    model, x = copy.deepcopy(model).double(), x.double()
    labels = (y + 3) % 10 if targeted else y
    full, es = _Counting(model), _Counting(model)
    kw = dict(eps=EPS, alpha=ALPHA, steps=STEPS, targeted=targeted)
    x_full = A.pgd(full, x, labels, generator=gen(1), **kw)
    x_es = A.pgd(es, x, labels, generator=gen(1), early_stop=True, **kw)
    assert_in_ball(x_es, x, EPS)
    with torch.no_grad():
        pred_full, pred_es = model(x_full).argmax(1), model(x_es).argmax(1)
    hit_full = pred_full == labels if targeted else pred_full != labels
    hit_es = pred_es == labels if targeted else pred_es != labels
    assert hit_es.sum() >= hit_full.sum() - 1
    # A sample that early stop returned before the last step is one it found fooling the model.
    stopped = (x_es != x_full).flatten(1).any(1)
    assert stopped.any() and hit_es[stopped].all()
    assert es.rows < (0.95 if targeted else 0.8) * full.rows


def test_early_stop_with_restarts_keeps_the_fooling_iterate(digits):
    model, x, y = digits
    x_adv = A.pgd(model, x, y, eps=EPS, alpha=ALPHA, steps=4, restarts=3, early_stop=True, generator=gen(2))
    single = A.pgd(model, x, y, eps=EPS, alpha=ALPHA, steps=4, early_stop=True, generator=gen(2))
    _, fooled = _loss_and_fooled(model, x_adv, y)
    _, fooled1 = _loss_and_fooled(model, single, y)
    assert fooled.sum() >= fooled1.sum()


def test_targeted_hits_targets(digits):
    model, x, y = digits
    target = (y + 1 + torch.randint(0, 9, y.shape, generator=gen())) % 10
    x_adv = A.pgd(model, x, target, eps=2 * EPS, alpha=ALPHA, steps=20, targeted=True, generator=gen())
    with torch.no_grad():
        hit = (model(x_adv).argmax(1) == target).float().mean().item()
    assert hit > 0.5  # chance is 0.1
    bim_hit = (model(A.bim(model, x, target, eps=2 * EPS, alpha=ALPHA, steps=20, targeted=True)).argmax(1)
               == target).float().mean().item()
    assert bim_hit > 0.5
    fgsm_adv = A.fgsm(model, x, target, eps=2 * EPS, targeted=True)
    assert (model(fgsm_adv).argmax(1) == target).float().mean() > (model(x).argmax(1) == target).float().mean()


@pytest.mark.parametrize("early_stop", [False, True])
def test_per_sample_eps(digits, early_stop):
    model, x, y = digits
    eps = torch.full((len(y),), EPS)
    eps[::3] = 0.0
    eps[1::3] = 2 * EPS
    x_adv = A.pgd(model, x, y, eps=eps, alpha=eps / 4, steps=STEPS, early_stop=early_stop, generator=gen())
    assert_in_ball(x_adv, x, eps)
    assert torch.equal(x_adv[::3], x[::3])
    _, fooled = _loss_and_fooled(model, x_adv, y)
    _, clean_wrong = _loss_and_fooled(model, x, y)
    assert fooled[1::3].float().mean() > fooled[2::3].float().mean() > clean_wrong[2::3].float().mean()


def test_per_sample_alpha_and_0d_eps(digits):
    model, x, y = digits
    ref = A.pgd(model, x, y, eps=EPS, alpha=ALPHA, steps=3, generator=gen())
    same = A.pgd(model, x, y, eps=torch.tensor(EPS), alpha=torch.full((len(y),), ALPHA), steps=3, generator=gen())
    torch.testing.assert_close(same, ref, rtol=0, atol=0)


def test_margin_loss(digits):
    model, x, y = digits
    clean = accuracy(model, x, y)
    ce = accuracy(model, A.pgd(model, x, y, eps=EPS, alpha=ALPHA, steps=STEPS, generator=gen()), y)
    margin = accuracy(model, A.pgd(model, x, y, eps=EPS, alpha=ALPHA, steps=STEPS, loss="margin", generator=gen()), y)
    assert margin < clean - 0.2 and abs(margin - ce) < 0.05
    # The margin is the only loss here that is exactly 0 where two logits tie: a margin > 0 means fooled.
    x_adv = A.bim(model, x, y, eps=EPS, alpha=ALPHA, steps=STEPS, loss="margin")
    with torch.no_grad():
        logits = model(x_adv)
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.scatter(1, y[:, None], -math.inf).amax(1)
    assert torch.equal(other > true, logits.argmax(1) != y)


def test_fgsm_rs_is_one_random_start_step(digits):
    model, x, y = digits
    rs = A.fgsm_rs(model, x, y, eps=EPS, generator=gen(4))
    torch.testing.assert_close(rs, A.pgd(model, x, y, eps=EPS, alpha=1.25 * EPS, steps=1, generator=gen(4)),
                               rtol=0, atol=0)
    assert A.FGSM_RS(model, eps=EPS, alpha=EPS / 2, generator=gen(4))(x, y).sub(x).abs().max() <= EPS + 1e-7


def test_bim_steps_none_follows_kurakin(digits):
    model, x, y = digits
    counting = _Counting(model)
    A.bim(counting, x, y, eps=8 / 255, alpha=1 / 255)
    assert counting.calls == 10  # min(8 + 4, 1.25 * 8)


# ---- amp, autocast, torch.compile, reproducibility --------------------------------------------------

def test_amp_bf16_on_cpu_similar_strength(digits):
    model, x, y = digits
    fp32 = accuracy(model, A.pgd(model, x, y, eps=EPS, alpha=ALPHA, steps=STEPS, generator=gen()), y)
    x_amp = A.pgd(model, x, y, eps=EPS, alpha=ALPHA, steps=STEPS, amp=True, generator=gen())
    assert x_amp.dtype == torch.float32
    assert_in_ball(x_amp, x, EPS)
    assert abs(accuracy(model, x_amp, y) - fp32) <= 0.05
    explicit = A.pgd(model, x, y, eps=EPS, alpha=ALPHA, steps=STEPS, amp=torch.bfloat16, generator=gen())
    torch.testing.assert_close(explicit, x_amp, rtol=0, atol=0)


class _FooledOnlyUnderAutocast(torch.nn.Module):
    """Predicts class 0 in full precision, class 1 under autocast; the logits depend on the input."""

    def forward(self, x):
        s = x.flatten(1).sum(1, keepdim=True)
        wrong = torch.is_autocast_enabled(x.device.type)
        return torch.cat([s * 0 + (0.0 if wrong else 10.0), s * 0 + (10.0 if wrong else 0.0), 0.01 * s], dim=1)


def test_amp_early_stop_confirms_in_full_precision():
    """A row that looks fooled only under autocast stays in the batch: the result is the last iterate."""
    x, y = torch.rand(6, 1, 4, 4), torch.zeros(6, dtype=torch.int64)
    model = _FooledOnlyUnderAutocast()
    kw = dict(eps=0.2, alpha=0.05, steps=4, amp=True)
    stopped = A.pgd(model, x, y, early_stop=True, generator=gen(), **kw)
    full = A.pgd(model, x, y, early_stop=False, generator=gen(), **kw)
    torch.testing.assert_close(stopped, full, rtol=0, atol=0)
    assert (stopped - x).abs().amax() > 0.1  # it did move: the iterates went on


def test_works_under_outer_autocast(digits):
    model, x, y = digits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_adv = A.pgd(model, x, y, eps=EPS, alpha=ALPHA, steps=STEPS, generator=gen())
        x_fgsm = A.fgsm(model, x, y, eps=EPS)
    assert x_adv.dtype == x_fgsm.dtype == torch.float32
    assert_in_ball(x_adv, x, EPS)
    assert accuracy(model, x_adv, y) < accuracy(model, x, y) - 0.2


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # inductor's
def test_works_with_a_compiled_model(digits):
    model, x, y = digits
    compiled = torch.compile(model)
    x_adv = A.pgd(compiled, x, y, eps=EPS, alpha=ALPHA, steps=3, generator=gen())
    eager = A.pgd(model, x, y, eps=EPS, alpha=ALPHA, steps=3, generator=gen())
    assert (x_adv != eager).float().mean() < 1e-3  # inductor may round differently: a rare sign flip
    assert_in_ball(A.pgd(compiled, x, y, eps=EPS, alpha=ALPHA, steps=3, early_stop=True, generator=gen()), x, EPS)


def test_reference_backend_gives_the_same_attack(digits, monkeypatch):
    model, x, y = digits
    kw = dict(eps=EPS, alpha=ALPHA, steps=3, restarts=2, generator=gen())
    fused = A.pgd(model, x, y, **kw)
    monkeypatch.setitem(ops._IMPL, "cpu", ops._REF)
    torch.testing.assert_close(A.pgd(model, x, y, **kw | dict(generator=gen())), fused, rtol=0, atol=0)


def test_reproducible_with_a_seed(digits):
    model, x, y = digits
    a = A.pgd(model, x, y, eps=EPS, alpha=ALPHA, steps=2, restarts=2, generator=gen(7))
    b = A.pgd(model, x, y, eps=EPS, alpha=ALPHA, steps=2, restarts=2, generator=gen(7))
    c = A.pgd(model, x, y, eps=EPS, alpha=ALPHA, steps=2, restarts=2, generator=gen(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    with torch.random.fork_rng():
        torch.manual_seed(5)
        d = A.PGD(model, eps=EPS, alpha=ALPHA, steps=2)(x, y)
        torch.manual_seed(5)
        e = A.PGD(model, eps=EPS, alpha=ALPHA, steps=2)(x, y)
    assert torch.equal(d, e)


# ---- how the model is treated -----------------------------------------------------------------------

def test_eval_mode_during_attack_and_every_mode_restored(digits):
    model, x, y = digits
    expected = A.pgd(model, x, y, eps=EPS, alpha=ALPHA, steps=2, generator=gen())
    try:
        model.train()
        model[1].eval()  # a mixed state, e.g. frozen BatchNorm: must come back as it was
        modes = [m.training for m in model.modules()]
        got = A.pgd(model, x, y, eps=EPS, alpha=ALPHA, steps=2, generator=gen())
        assert [m.training for m in model.modules()] == modes
        A.fgsm(model, x, y, eps=EPS)
        assert [m.training for m in model.modules()] == modes
    finally:
        model.eval()
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


class _Raises(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(64)

    def forward(self, x):
        assert not self.training, "the attack must run the model in eval mode"
        raise RuntimeError("model failed")


@pytest.mark.parametrize("attack", ["pgd", "fgsm", "pgd_early_stop"])
def test_mode_restored_when_the_model_raises(digits, attack):
    _, x, y = digits
    model = _Raises().train()
    with pytest.raises(RuntimeError, match="model failed"):
        ATTACKS[attack](model, x, y)
    assert model.training and model.bn.training


@pytest.mark.parametrize("name", ATTACKS)
def test_parameter_grads_untouched(digits, name):
    model, x, y = digits
    marker = [torch.full_like(p, 7.0) for p in model.parameters()]
    for p, m in zip(model.parameters(), marker):
        p.grad = m.clone()
    try:
        ATTACKS[name](model, x, y)
        assert all(torch.equal(p.grad, m) for p, m in zip(model.parameters(), marker))
    finally:
        for p in model.parameters():
            p.grad = None
    ATTACKS[name](model, x, y)
    assert all(p.grad is None for p in model.parameters())


def test_device_and_dtype_come_from_the_inputs(digits):
    model, x, y = digits
    weight = torch.randn(64, 10, generator=gen(), dtype=torch.float64)

    def linear(images):  # a plain function without parameters
        return images.flatten(1) @ weight
    x64 = x.double()
    x_adv = A.pgd(linear, x64, y.int(), eps=EPS, alpha=ALPHA, steps=3, generator=gen())
    assert x_adv.dtype == torch.float64
    assert_in_ball(x_adv, x64, EPS)


def test_works_under_no_grad(digits):
    model, x, y = digits
    expected = A.bim(model, x, y, eps=EPS, alpha=ALPHA, steps=2)
    with torch.no_grad():
        torch.testing.assert_close(A.bim(model, x, y, eps=EPS, alpha=ALPHA, steps=2), expected, rtol=0, atol=0)


# ---- no host sync, one buffer -----------------------------------------------------------------------

def test_no_host_sync_without_early_stop(digits, monkeypatch):
    model, x, y = digits

    def sync(*args, **kwargs):
        raise AssertionError("host synchronisation inside the attack")
    A.pgd(model, x, y, eps=EPS, alpha=ALPHA, steps=1, generator=gen())  # warm up lazy initialisations
    for name in ("__bool__", "item", "tolist", "__int__", "__float__", "__index__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    A.pgd(model, x, y, eps=EPS, alpha=ALPHA, steps=3, generator=gen())
    A.pgd(model, x, y, eps=EPS, alpha=ALPHA, steps=3, restarts=2, targeted=True, loss="margin", generator=gen())
    A.fgsm(model, x, y, eps=EPS)


def test_each_step_updates_one_buffer_in_place(digits, monkeypatch):
    model, x, y = digits
    seen = []
    step = ops.linf_step_

    def spy(x_adv, *args, **kwargs):
        seen.append(x_adv.data_ptr())
        return step(x_adv, *args, **kwargs)
    monkeypatch.setattr(ops, "linf_step_", spy)
    A.pgd(model, x, y, eps=EPS, alpha=ALPHA, steps=5, generator=gen())
    assert len(seen) == 5 and len(set(seen)) == 1


# ---- classes ----------------------------------------------------------------------------------------

def test_classes_call_shape_and_repr(digits):
    model, x, y = digits
    atk = A.PGD(model, eps=EPS, alpha=ALPHA, steps=3, random_start=True, generator=gen(9))
    torch.testing.assert_close(atk(x, y), A.pgd(model, x, y, eps=EPS, alpha=ALPHA, steps=3, generator=gen(9)),
                               rtol=0, atol=0)
    text = repr(atk)
    assert text.startswith("PGD(") and "eps=0.1" in text and "steps=3" in text and "random_start=True" in text
    assert repr(A.FGSM(model)).startswith("FGSM(eps=0.0313725")
    assert "alpha=None" in repr(A.FGSM_RS(model)) and "steps=10" in repr(A.BIM(model))
    for cls in (A.FGSM, A.FGSM_RS, A.BIM, A.PGD):
        assert "et al." in cls.__doc__
    atk.steps = 1  # hyper-parameters are plain attributes
    assert "steps=1," in repr(atk)


# ---- errors -----------------------------------------------------------------------------------------

BAD = [
    (dict(eps=-0.1), "eps"),
    (dict(eps=float("nan")), "eps"),
    (dict(eps=torch.full((3,), 0.1)), "eps"),
    (dict(eps=torch.tensor([0.1, -0.1] * 4)), "eps"),
    (dict(eps=torch.ones(8, dtype=torch.long)), "eps"),
    (dict(alpha=-0.01), "alpha"),
    # Non-finite or float32-overflowing budgets are refused (inf times a zero gradient would write NaN).
    (dict(eps=float("inf")), "eps must be a finite float"),
    (dict(alpha=float("inf")), "alpha must be a finite float"),
    (dict(alpha=1e39), "alpha must be a finite float"),
    (dict(eps=10 ** 400), "eps must be a finite float"),
    (dict(eps=torch.full((8,), float("inf"))), "eps must be finite"),
    (dict(alpha=torch.full((8,), 1e39, dtype=torch.float64)), "alpha must be finite"),
    (dict(steps=0), "steps"),
    (dict(steps=2.5), "steps"),
    (dict(restarts=0), "restarts"),
    (dict(loss="hinge"), "loss"),
    (dict(amp="fp8"), "amp"),
    (dict(clip_min=1.0, clip_max=0.0), "clip_min"),
]


@pytest.mark.parametrize("kwargs,name", BAD, ids=[f"{n}-{i}" for i, (_, n) in enumerate(BAD)])
def test_bad_arguments_name_the_argument(digits, kwargs, name):
    model, x, y = digits
    args = dict(eps=EPS, alpha=ALPHA, steps=2) | kwargs
    with pytest.raises((ValueError, TypeError), match=name):
        A.pgd(model, x[:8], y[:8], **args)


@pytest.mark.parametrize("labels,match", [
    (lambda y: y.float(), "y must be an integer tensor"),
    (lambda y: y[:, None], r"y must have shape \[8\]"),
    (lambda y: y[:4], r"y must have shape \[8\]"),
    (lambda y: y.tolist(), "y must be an integer tensor"),
    (lambda y: torch.where(torch.arange(8) == 3, -100, y), "y must hold class indices >= 0"),
])
def test_bad_labels(digits, labels, match):
    model, x, y = digits
    for attack in (lambda *a: A.pgd(*a, eps=EPS, alpha=ALPHA, steps=1), lambda *a: A.fgsm(*a, eps=EPS)):
        with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
            attack(model, x[:8], labels(y[:8]))


def test_bad_x_and_constructor_errors(digits):
    model, x, y = digits
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        A.pgd(model, (x * 16).long(), y, eps=EPS, alpha=ALPHA, steps=1)
    with pytest.raises(ValueError, match="steps"):
        A.PGD(model, steps=0)
    with pytest.raises(ValueError, match="eps"):
        A.FGSM(model, eps=-1.0)
    with pytest.raises(ValueError, match="loss"):
        A.BIM(model, loss="nll")
    with pytest.raises(ValueError, match="steps=None"):
        A.bim(model, x, y, eps=torch.full((len(y),), EPS), alpha=ALPHA)


class _ConstantLogits(torch.nn.Module):
    """No parameters, output independent of the input: the loss needs no gradient at all."""

    def forward(self, x):
        return torch.tensor([[2.0, 0.0, -1.0]]).expand(x.shape[0], 3)


def test_model_that_ignores_its_input_moves_nothing():
    """No gradient to follow: FGSM and BIM return the input, PGD its random start (no crash)."""
    x = torch.rand(4, 1, 5, 5)
    y = torch.zeros(4, dtype=torch.long)
    model = _ConstantLogits()
    assert torch.equal(A.fgsm(model, x, y, eps=0.1), x)
    assert torch.equal(A.bim(model, x, y, eps=0.1, alpha=0.02, steps=3), x)
    start = ops.linf_random_init(x, 0.1, generator=torch.Generator().manual_seed(5))
    out = A.pgd(model, x, y, eps=0.1, alpha=0.02, steps=3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(out, start)
