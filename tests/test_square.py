"""robust_ext.attacks.square: the Square Attack (Andriushchenko et al. 2020), L-inf and L2.

* Closed forms written by hand from the reference (fra31/auto-attack ``autoattack/square.py``): the p schedule
  for 5000 queries and rescaled to 1000 and 300, the window sizes, the L2 pattern of a 3 x 3 square.
* The starts, read from the queries the model sees: L-inf stripes (``+-eps`` per channel and column), the L2
  tiling (an 8 x 8 image: every pixel but the first row and column at ``eps / 7``; 28 x 28: 25 squares of the
  pattern, each ``+-eps / 5`` times it or its transpose); every L-inf query on the ball's vertices, every L2
  query on its sphere.
* The reference's trajectory: torchattacks 3.5.1 ports the reference line by line (but for the L2 window mass,
  which it sums over the channels: the same for the digits' one channel). Fed each image's own uniforms in the
  reference's order, it must fool the same images at the same query (the draws run out together) and keep the
  same points. An L2 trajectory is compared only up to a proposal whose new window content cancels to rounding
  noise (both implementations then draw noise); with 200 queries on 12 digits that cut one of them short (97% of
  the L2 queries compared, all of the L-inf ones).
* Invariants: the ball, the bounds, dtype and layout, per-sample eps; misclassified points returned unchanged
  and never queried; only points still robust queried; early stop equals querying every row; restarts only add
  fooled points; reproducible; no host sync per query without early stop.
* Strength on conftest's digits CNN (250 test digits), against torchattacks.Square with the reference's settings
  (p_init 0.8, one restart, margin loss, seed 0), 500 queries so that the test stays well under a minute.
"""
import copy
import importlib
import math

import pytest
import torch
from torch import nn

from robust_ext import attacks as A
from robust_ext.attacks.square import p_selection, square, square_pattern, window_size
from robust_ext.attacks.threats import ThreatModel

from conftest import DEVICES

S = importlib.import_module("robust_ext.attacks.square")  # the module: the package exports the function

pytestmark = pytest.mark.usefixtures("one_thread")

LINF_EPS, L2_EPS = 0.1, 0.75  # digits CNN, 500 queries: robust accuracy about 58% and 37% (clean 98.4%)


@pytest.fixture(scope="module")
def torchattacks():
    return pytest.importorskip("torchattacks")


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def fooled(model, x, y):
    with torch.no_grad():
        return model(x).argmax(1) != y


class Recorder(nn.Module):
    """The model, keeping a copy of every batch it is queried with."""

    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, []

    def forward(self, x):
        self.calls.append(x.detach().clone())
        return self.net(x)


def interior(x):
    """Images in [0.25, 0.75]: no budget below 0.25 is clipped."""
    return 0.25 + 0.5 * x


# --- closed forms --------------------------------------------------------------------------------------------

def _expected_schedule(pieces, p_init=0.8):
    """[(first query, last query, divisor), ...] -> the p of every query."""
    return [p_init / d for first, last, d in pieces for _ in range(first, last + 1)]


def test_p_schedule_for_5000_queries():
    # The reference halves p after queries 10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000 of 10,000; for 5000
    # it reads int(2 i): p_init up to query 5, p/2 from 6 to 25, ...
    pieces = [(0, 5, 1), (6, 25, 2), (26, 100, 4), (101, 250, 8), (251, 500, 16), (501, 1000, 32),
              (1001, 2000, 64), (2001, 3000, 128), (3001, 4000, 256), (4001, 4999, 512)]
    assert [p_selection(i, 5000, 0.8) for i in range(5000)] == _expected_schedule(pieces)
    assert p_selection(0, 5000, 0.5) == 0.5 and p_selection(4999, 5000, 0.5) == 0.5 / 512


@pytest.mark.parametrize("n_queries, pieces", [
    (1000, [(0, 1, 1), (2, 5, 2), (6, 20, 4), (21, 50, 8), (51, 100, 16), (101, 200, 32), (201, 400, 64),
            (401, 600, 128), (601, 800, 256), (801, 999, 512)]),
    # int(i * 100 / 3): 33 at query 1, 200 at query 6, 8000 at query 240.
    (300, [(0, 0, 1), (1, 1, 2), (2, 6, 4), (7, 15, 8), (16, 30, 16), (31, 60, 32), (61, 120, 64), (121, 180, 128),
           (181, 240, 256), (241, 299, 512)]),
])
def test_p_schedule_rescaled(n_queries, pieces):
    assert [p_selection(i, n_queries, 0.8) for i in range(n_queries)] == _expected_schedule(pieces)


def test_p_schedule_as_autoattack_runs_it():
    # AutoAttack builds its Square with resc_schedule=False: the 10,000-query breakpoints read at the query
    # index itself, so 5000 queries end at p_init / 128 (after query 4000), never reaching 6000 and 8000.
    pieces = [(0, 10, 1), (11, 50, 2), (51, 200, 4), (201, 500, 8), (501, 1000, 16), (1001, 2000, 32),
              (2001, 4000, 64), (4001, 4999, 128)]
    assert [p_selection(i, 5000, 0.8, rescale=False) for i in range(5000)] == _expected_schedule(pieces)


@pytest.mark.parametrize("p, shape, linf, l2", [
    (0.8, (3, 32, 32), 29, 29),         # sqrt(819.2) = 28.6
    (0.05, (3, 32, 32), 7, 7),          # sqrt(51.2) = 7.16
    (0.8, (1, 8, 8), 7, 7),
    (0.05, (1, 8, 8), 2, 3),            # sqrt(3.2) = 1.79: L2 takes at least 3
    (0.8 / 512, (1, 8, 8), 1, 3),       # sqrt(0.1) = 0.32
    (0.5, (1, 12, 12), 8, 9),           # sqrt(72) = 8.49: L2 makes it odd
    (1.0, (1, 6, 10), 6, 6),            # sqrt(60) = 7.75, at most the shorter side
])
def test_window_size(p, shape, linf, l2):
    assert window_size(p, shape, "linf") == linf and window_size(p, shape, "l2") == l2


def test_l2_pattern_by_hand():
    # Top row: the 1 x 3 rectangle, weights 1 (centre) + 1/4 (the 3-wide ring); bottom rows: minus the 2 x 3
    # one (its centre at row 1); each half of unit norm, then the whole.
    top = torch.tensor([[0.25, 1.25, 0.25]], dtype=torch.float64) / math.sqrt(1.6875)
    bottom = -torch.tensor([[0.25, 0.25, 0.25], [0.25, 1.25, 0.25]], dtype=torch.float64) / math.sqrt(1.875)
    expected = torch.cat([top, bottom]) / math.sqrt(2.0)
    torch.testing.assert_close(square_pattern(3), expected, rtol=0, atol=1e-15)
    p = square_pattern(7)
    assert (p[:3] > 0).all() and (p[3:] < 0).all() and abs(p.square().sum().item() - 1.0) < 1e-12


# --- the starts and the queries the model sees ---------------------------------------------------------------

def _attacked_queries(digits, norm, eps, n_queries=30):
    model, x, y = digits
    x = interior(x[:40])
    y = model(x).argmax(1)  # every row attacked
    rec = Recorder(model)
    square(rec, x, y, eps=eps, n_queries=n_queries, norm=norm, early_stop=False, generator=gen())
    assert len(rec.calls) == n_queries + 2 and rec.calls[0].shape[0] == 40  # clean check, start, queries
    return x, rec.calls[1:]


def test_linf_start_is_stripes_and_every_query_a_vertex(digits):
    x, queries = _attacked_queries(digits, "linf", 0.1)
    d = queries[0] - x
    torch.testing.assert_close(d.abs(), torch.full_like(d, 0.1), rtol=0, atol=1e-6)
    assert torch.equal(d.sign(), d[:, :, :1, :].sign().expand_as(d))  # one sign per column
    assert (d[:, 0, 0, :] > 0).any(1).all() and (d[:, 0, 0, :] < 0).any(1).all()
    for q in queries[1:]:
        torch.testing.assert_close((q - x).abs(), torch.full_like(x, 0.1), rtol=0, atol=1e-6)


def test_l2_start_on_8x8_and_every_query_on_the_sphere(digits):
    # 8 // 5 = 1-pixel squares from offset (8 - 5) // 2 = 1: every pixel but row 0 and column 0, 49 of them.
    x, queries = _attacked_queries(digits, "l2", 0.2)  # no pixel moves by more than 0.2: nothing clipped
    d = queries[0] - x
    assert torch.equal(d[:, :, 0, :], torch.zeros_like(d[:, :, 0, :]))
    assert torch.equal(d[:, :, :, 0], torch.zeros_like(d[:, :, :, 0]))
    torch.testing.assert_close(d[:, :, 1:, 1:].abs(), torch.full_like(d[:, :, 1:, 1:], 0.2 / 7), rtol=0, atol=1e-6)
    for q in queries:
        torch.testing.assert_close((q - x).flatten(1).norm(dim=1), torch.full((40,), 0.2), rtol=1e-5, atol=0)


def test_l2_start_tiles_28x28_with_the_pattern():
    # 28 // 5 = 5-pixel squares from offset 1, 5 x 5 of them per channel, each of unit norm: every one
    # eps / sqrt(50) times +-the pattern or +-its transpose (the same transpose for both channels).
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(2 * 28 * 28, 10))
    rec = Recorder(net)
    x = 0.25 + 0.5 * torch.rand(6, 2, 28, 28)
    y = net(x).argmax(1)
    square(rec, x, y, eps=1.0, n_queries=1, norm="l2", generator=gen())
    d = (rec.calls[1] - x) * math.sqrt(50.0)
    p = square_pattern(5).float()
    mask = torch.zeros(28, 28, dtype=torch.bool)
    mask[1:26, 1:26] = True
    assert torch.equal(d[:, :, ~mask], torch.zeros_like(d[:, :, ~mask]))
    candidates = torch.stack([p, -p, p.t(), -p.t()])  # plain, minus, transposed, minus transposed
    for i in range(1, 26, 5):
        for j in range(1, 26, 5):
            block = d[:, :, i:i + 5, j:j + 5]
            close = (block.unsqueeze(2) - candidates).abs().amax((3, 4)) < 1e-5  # [6, 2, 4]
            assert close.any(2).all()
            transposed = close[:, :, 2:].any(2)
            assert torch.equal(transposed[:, 0], transposed[:, 1])


# --- the reference's trajectory ------------------------------------------------------------------------------

def _recorded_draws(monkeypatch):
    records = []
    draw = S._draw

    def recording(gen, n_total, shape, rows_cpu, device):
        u = draw(gen, n_total, shape, rows_cpu, device)
        records.append((rows_cpu.clone(), u.cpu().clone()))
        return u
    monkeypatch.setattr(S, "_draw", recording)
    return records


def _reference_stream(records, norm, c=1):
    """One image's uniforms in the order the reference calls ``torch.rand``."""
    out = []
    for k, (_, u) in enumerate(records):
        v = u[0]
        if norm == "l2" and k == 0:  # per square: the pattern's transpose, then the channel signs
            v = torch.cat([v[:, c:], v[:, :c]], dim=1)
        elif norm == "l2":  # offsets, transpose, signs
            v = torch.cat([v[:4], v[4 + c:], v[4:4 + c]])
        out.append(v.flatten())
    return torch.cat(out).float()


def _margins(model, queries, label):
    with torch.no_grad():
        z = model(torch.cat(queries))
    return z[:, label] - z.scatter(1, torch.full((len(z), 1), label), -math.inf).amax(1)


def _degenerate_l2(model, x, label, queries, records, n_queries):
    """The first query whose L2 proposal is rounding noise: its new window content ``sign * pattern + old /
    ||old||`` cancels (the window held minus that pattern), so the reference's normalization magnifies its
    rounding errors and no other implementation can follow it. len(queries) when none is."""
    margins = _margins(model, queries, label)
    for k in range(1, len(queries)):
        u = records[k][1][0]
        s = window_size(p_selection(k - 1, n_queries, 0.8), (1, 8, 8), "l2")
        top, left = (int(v * (8 - s)) for v in u[:2].tolist())
        best = queries[int(margins[:k].argmin())]  # strictly lower margins replace: the first minimum
        old = (best - x)[0, 0, top:top + s, left:left + s].double()
        pattern = square_pattern(s).t() if u[5] >= 0.5 else square_pattern(s)
        if ((1.0 if u[4] >= 0.5 else -1.0) * pattern + old / (1e-12 + old.norm())).norm() < 1e-3:
            return k
    return len(queries)


@pytest.mark.parametrize("norm, eps", [("linf", LINF_EPS), ("l2", L2_EPS)])
def test_same_trajectory_as_the_reference(digits, torchattacks, monkeypatch, norm, eps):
    """Image by image: our queries, then the reference's fed the same uniforms. L2 trajectories are compared up
    to a degenerate proposal (see :func:`_degenerate_l2`); the L-inf ones and most L2 ones in full."""
    model, x, y = digits
    ok = ~fooled(model, x, y)
    x, y = x[ok][:12], y[ok][:12]
    n_queries, complete, compared, total = 200, 0, 0, 0
    for i in range(len(y)):
        xi, yi = x[i:i + 1], y[i:i + 1]
        ours_model, ref_model = Recorder(model), Recorder(model)
        with monkeypatch.context() as m:
            records = _recorded_draws(m)
            ours = square(ours_model, xi, yi, eps=eps, n_queries=n_queries, norm=norm, generator=gen(i))
        stream, pos = _reference_stream(records, norm), [0]

        def scripted(shape, *args, _stream=stream, **kwargs):
            n = math.prod(shape)
            pos[0] += n
            return _stream[pos[0] - n:pos[0]].view(shape)
        ref = torchattacks.Square(ref_model, norm="Linf" if norm == "linf" else "L2", eps=eps, n_queries=n_queries,
                                  n_restarts=1, p_init=0.8, loss="margin")
        ref.init_hyperparam(xi)
        with monkeypatch.context() as m:
            m.setattr(torch, "rand", scripted)
            theirs = ref.attack_single_run(xi, yi)[1]
        a, b = ours_model.calls[1:], ref_model.calls  # ours starts with the check of the clean image
        n = len(b) if norm == "linf" else _degenerate_l2(model, xi, int(yi), b, records, n_queries)
        torch.testing.assert_close(torch.cat(a[:n]), torch.cat(b[:n]), rtol=0, atol=1e-5)
        compared, total = compared + n, total + len(b)
        if n == len(b):
            complete += 1
            assert len(a) == len(b) and pos[0] == stream.numel()  # both stopped at the same query
            assert torch.equal(fooled(model, ours, yi), fooled(model, theirs, yi))
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert complete >= (12 if norm == "linf" else 8) and compared >= 0.8 * total


# --- invariants ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm, eps", [("linf", 0.15), ("l2", 1.0)])
def test_inside_the_ball_and_the_bounds(digits, device, norm, eps):
    model, x, y = digits
    model, x, y = copy.deepcopy(model).to(device), x[:64].to(device), y[:64].to(device)
    per_sample = torch.linspace(0.0, eps, 64, device=device)
    for xs, e, amp in ((x, eps, False), (x.double(), eps, False), (x, per_sample, False), (x, eps, True)):
        m = copy.deepcopy(model).to(xs.dtype)
        out = square(m, xs, y, eps=e, n_queries=40, norm=norm, amp=amp, generator=gen())
        assert out.dtype == xs.dtype and out.device == xs.device and out.shape == xs.shape
        assert out.min() >= 0 and out.max() <= 1
        d = (out.double() - xs.double()).flatten(1)
        dist = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
        bound = torch.as_tensor(e, dtype=torch.float64, device=device)
        assert (dist <= bound * (1 + 1e-6) + 1e-7).all()
        assert fooled(m, out, y).any()


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_channels_last_kept(norm):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 10 * 10, 10))
    x = torch.rand(8, 3, 10, 10)
    y = net(x).argmax(1)
    a = square(net, x, y, eps=0.5, n_queries=20, norm=norm, generator=gen())
    b = square(net, x.contiguous(memory_format=torch.channels_last), y, eps=0.5, n_queries=20, norm=norm,
               generator=gen())
    assert b.is_contiguous(memory_format=torch.channels_last) and not b.is_contiguous()
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_misclassified_points_unchanged_and_never_queried(digits):
    model, x, y = digits
    x, y = x[:40], y[:40].clone()
    y[::2] = (y[::2] + 1) % 10  # half the labels wrong: those points are already "fooled"
    correct = int((~fooled(model, x, y)).sum())
    rec = Recorder(model)
    out = square(rec, x, y, eps=LINF_EPS, n_queries=50, generator=gen())
    assert torch.equal(out[::2], x[::2])
    sizes = [q.shape[0] for q in rec.calls]
    assert sizes[0] == 40 and sizes[1] == correct  # the clean check, then only the points still robust
    assert all(a >= b for a, b in zip(sizes[1:], sizes[2:])) and sizes[-1] < sizes[1]
    rec = Recorder(model)
    wrong = (model(x).argmax(1) + 1) % 10
    assert torch.equal(square(rec, x, wrong, eps=0.1, n_queries=5, generator=gen()), x) and len(rec.calls) == 1


def test_early_stop_equals_querying_every_row(digits):
    model, x, y = digits
    for norm, eps in (("linf", LINF_EPS), ("l2", L2_EPS)):
        a = square(model, x[:100], y[:100], eps=eps, n_queries=100, norm=norm, generator=gen(5))
        b = square(model, x[:100], y[:100], eps=eps, n_queries=100, norm=norm, early_stop=False, generator=gen(5))
        assert torch.equal(fooled(model, a, y[:100]), fooled(model, b, y[:100]))
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_restarts_only_add_fooled_points(digits):
    model, x, y = digits
    one = fooled(model, square(model, x, y, eps=LINF_EPS, n_queries=50, generator=gen(2)), y)
    two = fooled(model, square(model, x, y, eps=LINF_EPS, n_queries=50, restarts=2, generator=gen(2)), y)
    assert (two | ~one).all() and two.sum() > one.sum()


def test_reproducible_from_a_generator(digits):
    model, x, y = digits
    a = square(model, x, y, eps=L2_EPS, n_queries=30, norm="l2", generator=gen(3))
    b = square(model, x, y, eps=L2_EPS, n_queries=30, norm="l2", generator=gen(3))
    c = square(model, x, y, eps=L2_EPS, n_queries=30, norm="l2", generator=gen(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_host_syncs_do_not_grow_with_the_queries_without_early_stop(digits, monkeypatch):
    model, x, y = digits
    counts = []
    for n_queries in (3, 30):
        n = [0]
        with monkeypatch.context() as m:
            for name in ("__bool__", "item", "tolist", "__int__", "__float__", "__index__", "nonzero", "cpu"):
                original = getattr(torch.Tensor, name)

                def counted(*args, _original=original, **kwargs):
                    n[0] += 1
                    return _original(*args, **kwargs)
                m.setattr(torch.Tensor, name, counted)
            for norm in ("linf", "l2"):
                square(model, x, y, eps=0.1, n_queries=n_queries, restarts=2, norm=norm, early_stop=False,
                       generator=gen())
        counts.append(n[0])
    assert counts[0] == counts[1]


def test_targeted_reaches_the_target(digits):
    model, x, y = digits
    target = (y + 1) % 10
    hits_targeted = (model(square(model, x, target, eps=0.2, n_queries=100, targeted=True, generator=gen()))
                     .argmax(1) == target).sum()
    hits_untargeted = (model(square(model, x, y, eps=0.2, n_queries=100, generator=gen())).argmax(1) == target).sum()
    assert hits_targeted > hits_untargeted


def test_argument_errors(digits):
    model, x, y = digits
    with pytest.raises(ValueError, match="at least 5 pixels"):
        square(nn.Flatten(), torch.rand(2, 1, 4, 4), torch.zeros(2, dtype=torch.long), eps=1.0, norm="l2")
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        square(nn.Identity(), torch.rand(2, 10), torch.zeros(2, dtype=torch.long), eps=0.1)
    for bad in (0.0, 1.5, True):
        with pytest.raises(ValueError, match="p_init"):
            square(model, x[:2], y[:2], eps=0.1, p_init=bad)
    with pytest.raises(ValueError, match="n_queries"):
        square(model, x[:2], y[:2], eps=0.1, n_queries=0)
    with pytest.raises(ValueError, match="dlr_targeted"):
        square(model, x[:2], y[:2], eps=0.1, loss="dlr_targeted")

    class L1(ThreatModel):
        name = "l1"
    with pytest.raises(ValueError, match="linf"):
        square(model, x[:2], y[:2], eps=0.1, norm=L1())
    with pytest.raises(ValueError, match="generator"):
        square(model, x[:2], y[:2], eps=0.1, generator="seed")


# --- class, registry, evaluation -----------------------------------------------------------------------------

def test_class_registry_and_evaluate(digits):
    from robust_ext.evaluation import evaluate

    model, x, y = digits
    atk = A.Square(model, norm="l2", eps=L2_EPS, n_queries=20, generator=gen(1))
    assert "n_queries=20" in repr(atk) and "p_init=0.8" in repr(atk)
    torch.testing.assert_close(atk(x, y), square(model, x, y, eps=L2_EPS, n_queries=20, norm="l2", generator=gen(1)),
                               rtol=0, atol=0)
    entry = A.ATTACKS["square"]
    assert {k: entry.defaults[k] for k in ("n_queries", "p_init", "loss", "restarts")} == {
        "n_queries": 5000, "p_init": 0.8, "loss": "margin", "restarts": 1}
    report = evaluate(model, (x[:40], y[:40]), ["square"], eps=[0.2], norm="linf", min_eps=False, progress=False,
                      large_eps=None, seed=0)
    assert report.accuracy("square", 0.2) < report.clean_accuracy


# --- strength ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("norm, eps", [("linf", LINF_EPS), pytest.param("l2", L2_EPS, marks=pytest.mark.slow)])
def test_as_strong_as_torchattacks(digits, torchattacks, norm, eps):
    """500 queries (the schedule rescaled) on the 250 digits, one seed each: robust accuracy no higher than
    torchattacks' + 0.5 point. Over seeds 0-4 both moved by about +-1.5 points (L-inf: ours 57.2-58.8%,
    torchattacks 57.2-60.4%; L2: ours 36.8-38.4%, torchattacks 36.0-38.0%)."""
    model, x, y = digits
    ours = square(model, x, y, eps=eps, n_queries=500, norm=norm, generator=gen(0))
    with torch.random.fork_rng():  # torchattacks seeds the global generators
        ref = torchattacks.Square(model, norm="Linf" if norm == "linf" else "L2", eps=eps, n_queries=500,
                                  n_restarts=1, p_init=0.8, loss="margin", seed=0)(x, y)
    acc_ours = 100 * (~fooled(model, ours, y)).float().mean().item()
    acc_ref = 100 * (~fooled(model, ref, y)).float().mean().item()
    assert 20 < acc_ref < 80
    assert acc_ours <= acc_ref + 0.5, (acc_ours, acc_ref)
