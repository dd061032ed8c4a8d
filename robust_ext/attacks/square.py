"""Square Attack (Andriushchenko, Croce, Flammarion & Hein, ECCV 2020, "Square Attack: a query-efficient black-box
adversarial attack via random search"), L-inf and L2. Conventions: :mod:`robust_ext.attacks`.

A score-based random search: it reads the model's logits, never a gradient. The algorithm is the reference
implementation's (fra31/auto-attack, ``autoattack/square.py``; torchattacks ports it):

* Start (one query): L-inf, vertical stripes, ``x + eps * sign`` with one random sign per channel and column
  (:func:`stripes_init`); L2, the image tiled with ``h // 5``-pixel squares of :func:`square_pattern`, each
  with a random sign per channel and a random transpose, scaled to L2 norm ``eps`` (:func:`l2_init`).
* Query ``i`` (``i = 0 .. n_queries - 1``) proposes a change of the best point so far in a square window of
  side :func:`window_size` ``(p_selection(i))``, at a uniformly random position:
  L-inf, the window set to ``x + eps * sign`` (one random sign per channel); L2, the window refilled with
  :func:`square_pattern` plus the normalized old window content, a second random window emptied, the mass
  moved so that the perturbation keeps L2 norm ``eps`` (:func:`propose_l2`). The proposal replaces the best
  point when its loss is strictly better or it fools the model.
* The loss is ``loss`` on the logits (``"margin"``: ``max_{j != y} z_j - z_y``, the default; ``"ce"``).
  A sample is fooled when the model's prediction changes (targeted: becomes ``y``).

Differences from the reference, none of which changes how a sample's search is distributed:

* Every random choice is drawn per sample: the reference shares the window position and the L-inf channel signs
  between all images of a batch (the paper's Algorithm 1 and its first implementation draw them per image).
  Each query draws uniforms for every sample of the batch from a CPU ``generator`` (one generator per restart,
  seeded from ``generator``), and a sample uses its own row: its result depends on the seed and its index in
  the batch, not on which other samples are still running.
* A sample leaves the working batch at its first fooling query and keeps that point (``early_stop=True``):
  only samples still robust are queried, and the loop ends when none is left. This is the reference's own
  behaviour (it queries only points with a positive margin), minus the queries of rows already fooled. With
  ``early_stop=False`` the whole batch is queried every time, fooled rows frozen: the same result, every query
  run, no host sync per query (but amp's confirmations).
* A sample the model does not fool comes back as its lowest-loss point over the restarts (the reference
  returns the clean image); a fooled one as its first fooling point; a misclassified one unchanged.
* The ball and the bounds are the threat model's projection (``clip_min``/``clip_max`` instead of 0 and 1);
  "fooled" is the argmax of the logits (the reference reads ``margin <= 0``: the same but for exact ties).
* ``targeted=True`` descends ``loss`` towards the target ``y`` (the reference uses cross-entropy there).

Kept from the reference on purpose: the window's offset is uniform in ``[0, h - s)`` (the last position is never
drawn), the schedule is rescaled to ``n_queries`` by ``int(i / n_queries * 10000)`` (``rescale_schedule=True``,
the reference's class default; AutoAttack's versions run it with ``False``), the start counts as a
query, so a sample costs at most ``n_queries + 1`` forwards per restart (and one for the clean check). So is
the L2 update's ill-conditioned case: when window 1's content is proportional to minus the pattern about to be
added (an earlier query wrote that pattern there with the other sign), the new content cancels to rounding noise,
which the normalization scales up; such a query is as random here as in the reference, not the same.

Host syncs: early stop reads which samples leave once per query (twice with ``amp``, whose fooled rows are
confirmed in full precision); each restart reads which samples are left. The uniforms of a query are a small
CPU tensor copied to the device (no device sync).
"""
from __future__ import annotations

import functools
import math
import numbers
from typing import Optional

import torch

from ..reference import compute_dtype
from . import checks, core
from .core import eval_mode, rows_of

__all__ = ["square", "p_selection", "window_size", "square_pattern", "stripes_init", "l2_init", "propose_linf",
           "propose_l2"]

# p_selection's halvings at these iterations of a 10,000-query run: p_init / 2 after 10, / 4 after 50, ...
_BREAKPOINTS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def p_selection(it: int, n_queries: int = 5000, p_init: float = 0.8, rescale: bool = True) -> float:
    """The fraction ``p`` of the image a window covers at query ``it`` (counted from 0) of ``n_queries``: the
    reference's schedule for 10,000 queries, halving ``p_init`` after queries 10, 50, 200, 500, 1000, 2000,
    4000, 6000 and 8000 (``p_init / 512`` after the last), read at ``int(it / n_queries * 10000)`` when
    ``rescale`` (the reference's ``resc_schedule=True``, its class default), else at ``it`` (AutoAttack's
    ensemble runs Square with ``resc_schedule=False``: at 5,000 queries it stops at ``p_init / 128``)."""
    scaled = int(it / n_queries * 10000) if rescale else it
    halvings = sum(scaled > b for b in _BREAKPOINTS)
    return p_init / 2 ** halvings


def window_size(p: float, shape, norm: str) -> int:
    """The reference's window side for a fraction ``p`` of an image of ``shape`` ``(c, h, w)``:
    ``round(sqrt(p h w))``, at least 1 (L-inf) or at least 3 and odd (L2), at most ``min(h, w)``."""
    c, h, w = shape
    s = int(round(math.sqrt(p * (c * h * w) / c)))
    if norm == "linf":
        s = max(s, 1)
    else:
        s = max(s, 3)
        s += 1 - s % 2
    return min(s, h, w)


def _rectangle(rows: int, cols: int) -> torch.Tensor:
    """Nested centred rectangles weighted ``1 / (k + 1)^2`` for the k-th one, unit L2 norm (float64)."""
    d = torch.zeros(rows, cols, dtype=torch.float64)
    r, c = rows // 2, cols // 2
    for k in range(max(rows // 2 + 1, cols // 2 + 1)):
        d[max(r - k, 0):min(r + k + 1, rows), max(c - k, 0):min(c + k + 1, cols)] += 1.0 / (k + 1) ** 2
    return d / d.square().sum().sqrt() if d.numel() else d


@functools.lru_cache(maxsize=None)
def square_pattern(s: int) -> torch.Tensor:
    """The L2 attack's ``s x s`` pattern (the reference's ``eta``, before its random transpose): the top
    ``s // 2`` rows one :func:`_rectangle`, the others minus one, unit L2 norm. Float64 on the CPU; do not
    modify it (it is cached)."""
    d = torch.cat([_rectangle(s // 2, s), -_rectangle(s - s // 2, s)])
    return d / d.square().sum().sqrt()


def _signs(u: torch.Tensor) -> torch.Tensor:
    return torch.where(u < 0.5, -1.0, 1.0)


def _offsets(u: torch.Tensor, h: int, w: int, s: int) -> torch.Tensor:
    """Windows' first row and column from uniforms ``u`` ``[n, 2 k]`` (row, column, row, ...): ``[n, k, 2]``,
    each uniform in ``[0, h - s)`` resp. ``[0, w - s)`` (0 when the window fills the side)."""
    return torch.stack((u[:, 0::2] * (h - s), u[:, 1::2] * (w - s)), 2).floor_().long()


@functools.lru_cache(maxsize=None)
def _pattern_pair(s: int, dtype, device) -> torch.Tensor:
    """:func:`square_pattern` and its transpose, ``[2, s, s]`` on ``device`` (cached: read only)."""
    eta = square_pattern(s)
    return torch.stack((eta, eta.t())).to(device=device, dtype=dtype)


def _patterns(s: int, flip: torch.Tensor, dtype) -> torch.Tensor:
    """:func:`square_pattern` per sample, transposed where ``flip``: ``[n, 1, s, s]``."""
    return _pattern_pair(s, dtype, flip.device).index_select(0, flip.long()).unsqueeze(1)


def stripes_init(x, eps, u):
    """The L-inf start before projection: ``x + eps * sign`` with one sign per channel and column, from the
    uniforms ``u`` ``[n, c, w]`` (``eps``: float or per-sample ``[n]``)."""
    n, c, _, w = x.shape
    e = eps.view(-1, 1, 1, 1) if isinstance(eps, torch.Tensor) else eps
    return x + (_signs(u).view(n, c, 1, w) * e).to(x.dtype)


def _tiles(h: int, w: int):
    """The L2 start's squares: side ``h // 5``, offsets from ``(h - 5 s) // 2`` in steps of ``s``, ``h // s``
    rows and ``w // s`` columns of them (the last ones cut at the image's edge, as the reference's slices)."""
    s = h // 5
    first = (h - 5 * s) // 2
    return s, [(first + i * s, first + j * s) for i in range(h // s) for j in range(w // s)]


def l2_init(x, eps, u):
    """The L2 start before projection, from the uniforms ``u`` ``[n, tiles, c + 1]`` (see :func:`_tiles`;
    per tile one sign per channel, then the transpose): the tiled patterns scaled to L2 norm ``eps``."""
    n, c, h, w = x.shape
    s, tiles = _tiles(h, w)
    cd = compute_dtype(x.dtype)
    delta = x.new_zeros((n, c, h, w), dtype=cd)
    for t, (i, j) in enumerate(tiles):
        if i >= h or j >= w:
            continue
        pat = _patterns(s, u[:, t, c] >= 0.5, cd)[:, :, :h - i, :w - j]
        delta[:, :, i:i + s, j:j + s] += pat * _signs(u[:, t, :c]).to(cd).view(n, c, 1, 1)
    return x + _scaled(delta, eps).to(x.dtype)


def _scaled(delta, eps):
    """``delta / (||delta||_2 + 1e-12) * eps`` per sample (the reference's ``normalize(delta) * eps``)."""
    norm = delta.flatten(1).square().sum(1).sqrt().view(-1, *([1] * (delta.dim() - 1)))
    e = eps.view(-1, *([1] * (delta.dim() - 1))) if isinstance(eps, torch.Tensor) else eps
    return delta / (norm + 1e-12) * e


def _window_mask(corner, s, h, w):
    """``[n, 1, h, w]`` boolean: each sample's ``s x s`` window at ``corner`` ``[n, 2]`` (row, column)."""
    rows = torch.arange(h, device=corner.device)
    cols = torch.arange(w, device=corner.device)
    top, left = corner[:, :1], corner[:, 1:]
    in_h = (rows >= top) & (rows < top + s)
    in_w = (cols >= left) & (cols < left + s)
    return (in_h[:, :, None] & in_w[:, None, :]).unsqueeze(1)


def propose_linf(x, x_best, eps, s, u):
    """An L-inf proposal before projection: ``x_best`` with the window (offsets from ``u[:, :2]``) moved by
    ``2 eps * sign`` (one sign per channel from ``u[:, 2:]``), which the projection turns into ``x + eps * sign``."""
    n, c, h, w = x.shape
    mask = _window_mask(_offsets(u[:, :2], h, w, s)[:, 0], s, h, w)
    e = eps.view(-1, 1) if isinstance(eps, torch.Tensor) else eps
    move = (2.0 * e * _signs(u[:, 2:2 + c])).to(x.dtype).view(n, c, 1, 1)
    return torch.where(mask, x_best + move, x_best)


def _flat_windows(corners, s, w):
    """Flat ``h * w`` indices of each sample's windows at ``corners`` ``[n, k, 2]``: ``[n, k, s * s]``, row-major."""
    ar = torch.arange(s, device=corners.device)
    rows = (corners[:, :, :1] + ar) * w
    cols = corners[:, :, 1:] + ar
    return (rows[:, :, :, None] + cols[:, :, None, :]).flatten(2)


def propose_l2(x, x_best, eps, s, u):
    """An L2 proposal before projection, from the uniforms ``u`` ``[n, 4 + c + 1]`` (window 1's and window 2's
    offsets, one sign per channel, the transpose). Per channel, window 1 gets the pattern times its sign plus
    its old content normalized, rescaled to ``sqrt(max(eps^2 - ||delta||^2, 0) / c + m^2)`` with ``m`` the
    channel's old mass in both windows; window 2 is emptied (window 1 written last); the whole perturbation is
    then scaled to L2 norm ``eps``."""
    n, c, h, w = x.shape
    cd = compute_dtype(x.dtype)
    xx = x.to(cd)
    delta = (x_best.to(cd) - xx).reshape(n, c, h * w)
    idx = _flat_windows(_offsets(u[:, :4], h, w, s), s, w)
    idx1, idx2 = (idx[:, k:k + 1].expand(n, c, s * s) for k in (0, 1))
    old = delta.gather(2, idx1)
    norm_old = old.square().sum(2, keepdim=True).sqrt()
    norm_image = delta.square().sum((1, 2), keepdim=True).sqrt()
    both = torch.zeros((n, 1, h * w), dtype=torch.bool, device=x.device).scatter_(2, idx.view(n, 1, -1), True)
    norm_windows = torch.where(both, delta, 0.0).square().sum(2, keepdim=True).sqrt()
    new = _patterns(s, u[:, 4 + c] >= 0.5, cd).view(n, 1, s * s) * _signs(u[:, 4:4 + c]).to(cd).view(n, c, 1)
    new = new + old / (1e-12 + norm_old)
    e = eps.view(-1, 1, 1) if isinstance(eps, torch.Tensor) else eps
    budget = ((e * e - norm_image.square()).clamp_min(0.0) / c + norm_windows.square()).sqrt()
    new = new / (1e-12 + new.square().sum(2, keepdim=True).sqrt()) * budget
    delta.scatter_(2, idx2, 0.0)
    delta.scatter_(2, idx1, new)
    return (xx + _scaled(delta.view(n, c, h, w), eps)).to(x.dtype)


class _Search:
    """One restart's state for the samples still searching, compacted when some leave."""

    def __init__(self, rows, rows_cpu, x, y, eps, x_best, score):
        self.rows, self.rows_cpu, self.x, self.y, self.eps, self.x_best, self.score = (
            rows, rows_cpu, x, y, eps, x_best, score)

    def keep(self, index, index_cpu):
        self.rows, self.x, self.y, self.x_best, self.score = (
            t.index_select(0, index) for t in (self.rows, self.x, self.y, self.x_best, self.score))
        self.eps = rows_of(self.eps, index)
        self.rows_cpu = self.rows_cpu.index_select(0, index_cpu)


def _draw(gen, n_total, shape, rows_cpu, device):
    """Uniforms ``[n_total, *shape]`` from ``gen`` (CPU, float64), the rows ``rows_cpu`` of them on ``device``."""
    u = torch.rand((n_total, *shape), generator=gen, dtype=torch.float64)
    if rows_cpu.numel() != n_total:
        u = u.index_select(0, rows_cpu)
    return u.to(device)


def _leave(st, hit, out, done):
    """Early stop: the rows ``hit`` leave with their current best point (their fooling one)."""
    hit_cpu = hit.cpu()  # the host sync early stop needs, once per query
    if not bool(hit_cpu.any()):
        return
    gone = hit_cpu.nonzero().squeeze(1).to(hit.device)
    leaving = st.rows.index_select(0, gone)
    out.index_copy_(0, leaving, st.x_best.index_select(0, gone).to(out.dtype))
    done.index_fill_(0, leaving, True)
    keep_cpu = (~hit_cpu).nonzero().squeeze(1)
    st.keep(keep_cpu.to(hit.device), keep_cpu)


def _restart(obj, threat, x, y, eps, rows, rows_cpu, n_total, gen, *, n_queries, p_init, rescale, lo, hi,
             early_stop, out, done, best):
    """One run of the search on the samples ``rows`` (none fooled yet): a fooled sample's point goes to
    ``out`` and ``done`` is set; one not fooled gets its lowest-loss point in ``out`` when it beats ``best``."""
    n, c, h, w = x.shape
    norm = threat.name
    if norm == "linf":
        start = stripes_init(x, eps, _draw(gen, n_total, (c, w), rows_cpu, x.device))
    else:
        tiles = len(_tiles(h, w)[1])
        start = l2_init(x, eps, _draw(gen, n_total, (tiles, c + 1), rows_cpu, x.device))
    threat.project_(start, x, eps, lo, hi)
    logits = obj.logits(start)
    st = _Search(rows, rows_cpu, x, y, eps, start, obj.objective(logits, y))
    hit = obj.confirmed(start, y, obj.success(logits, y))
    running = ~hit
    propose, extra = (propose_linf, 2 + c) if norm == "linf" else (propose_l2, 4 + c + 1)
    for i in range(n_queries):
        if early_stop:
            _leave(st, hit, out, done)
            if st.rows.numel() == 0:
                return
        s = window_size(p_selection(i, n_queries, p_init, rescale), (c, h, w), norm)
        u = _draw(gen, n_total, (extra,), st.rows_cpu, x.device)
        x_new = threat.project_(propose(st.x, st.x_best, st.eps, s, u), st.x, st.eps, lo, hi)
        logits = obj.logits(x_new)
        score = obj.objective(logits, st.y)
        hit = obj.confirmed(x_new, st.y, obj.success(logits, st.y))
        better = (score > st.score) | hit
        if not early_stop:  # fooled rows are frozen at their first fooling point
            better, hit = better & running, hit & running
            running = running & ~hit
        st.x_best = torch.where(better.view(-1, 1, 1, 1), x_new, st.x_best)
        st.score = torch.where(better, score, st.score)
    if early_stop:
        _leave(st, hit, out, done)
        running = torch.ones_like(st.score, dtype=torch.bool)
    fooled = ~running
    score, before = st.score.to(best.dtype), best.index_select(0, st.rows)
    better = ~fooled & (score > before)
    take = (fooled | better).view(-1, 1, 1, 1)
    out.index_copy_(0, st.rows, torch.where(take, st.x_best.to(out.dtype), out.index_select(0, st.rows)))
    best.index_copy_(0, st.rows, torch.where(better, score, before))
    done.index_copy_(0, st.rows, done.index_select(0, st.rows) | fooled)


def _check_p_init(p_init) -> float:
    if isinstance(p_init, bool) or not isinstance(p_init, numbers.Real) or not 0.0 < p_init <= 1.0:
        raise ValueError(f"p_init must be a float in (0, 1], got {p_init!r}")
    return float(p_init)


def _check_generator(generator):
    if generator is not None and (not isinstance(generator, torch.Generator) or generator.device.type != "cpu"):
        raise ValueError(f"generator must be a CPU torch.Generator or None, got {generator!r}")


def square(model, x, y, *, eps, n_queries=5000, p_init=0.8, rescale_schedule=True, loss="margin", restarts=1,
           norm="linf", targeted=False, early_stop=True, clip_min=0.0, clip_max=1.0, amp=False,
           generator: Optional[torch.Generator] = None):
    """Square Attack, Andriushchenko et al. 2020, "Square Attack: a query-efficient black-box adversarial attack
    via random search": a random search over square-shaped changes that reads only the logits (see the module
    docstring for the algorithm and its differences from the reference).

    Args:
        model: maps images in ``[clip_min, clip_max]`` to logits ``[N, num_classes]``.
        x: images ``[N, C, H, W]``, floating point (for ``norm="l2"`` at least 5 pixels high); ``x_adv`` gets
            their dtype, device and layout.
        y: integer labels ``[N]``; the target labels when ``targeted``.
        eps: a float >= 0, or a tensor with one value per sample.
        n_queries: queries per restart after the start (the reference's 5000); p_init: the first windows'
            fraction of the image (0.8); restarts: runs from new starts on the samples still robust.
        rescale_schedule: read :func:`p_selection`'s 10,000-query schedule at ``i / n_queries * 10000`` (the
            reference's class default); ``False`` reads it at ``i``, as AutoAttack's ensemble runs Square.
        loss: ``"margin"`` (the reference's default) or ``"ce"``, or another registered loss without a target.
        norm: ``"linf"`` or ``"l2"``.
        targeted: descend ``loss`` towards ``y``.
        early_stop: a sample leaves the batch at its first fooling query (one host sync per query); ``False``
            queries every row every time, fooled rows frozen: the same result, without host syncs.
        amp: ``False``, ``True`` (bfloat16 on CPU, float16 on CUDA) or a dtype: autocast for the model; every
            "fooled" is confirmed by a full-precision forward.
        generator: a CPU ``torch.Generator`` for every random choice (default: the CPU default generator).

    Returns:
        ``x_adv`` with ``||x_adv - x|| <= eps`` and ``clip_min <= x_adv <= clip_max``, detached: for a fooled
        sample its first fooling point, for a misclassified one ``x``, otherwise the lowest-loss point found.
    """
    x, y, eps, lo, hi, obj, threat = core.setup(model, x, y, eps, targeted, clip_min, clip_max, loss, amp, norm)
    if threat.name not in ("linf", "l2"):
        raise ValueError(f"square supports norm 'linf' and 'l2', got {threat!r}")
    if obj.loss.needs_target:
        raise ValueError(f"loss {obj.loss.name!r} takes a target class per sample; square takes 'margin' or 'ce'")
    if x.dim() != 4:
        raise ValueError(f"square needs images [N, C, H, W], got shape {list(x.shape)}")
    if threat.name == "l2" and x.shape[2] < 5:
        raise ValueError(f"square with norm='l2' needs images at least 5 pixels high (its start tiles them with "
                         f"h // 5 squares), got {x.shape[2]}")
    n_queries = checks.check_int(n_queries, "n_queries", 1)
    restarts = checks.check_int(restarts, "restarts", 1)
    p_init = _check_p_init(p_init)
    rescale_schedule = checks.check_bool(rescale_schedule, "rescale_schedule")
    early_stop = checks.check_bool(early_stop, "early_stop")
    _check_generator(generator)
    out = x.clone()
    n = x.shape[0]
    if n == 0:
        return out
    xc = x.contiguous()
    with eval_mode(model), torch.no_grad():
        done = obj.success(model(xc), y)  # full precision: the points already fooled are not attacked
        best = torch.full((n,), -math.inf, dtype=torch.float64, device=x.device)
        for _ in range(restarts):
            # A generator per restart: a restart's draws do not depend on how many queries the last one ran.
            seed = int(torch.randint(0, 2 ** 63 - 1, (), generator=generator))
            gen = torch.Generator().manual_seed(seed)
            rows_cpu = (~done).cpu().nonzero().squeeze(1)
            if rows_cpu.numel() == 0:
                break
            rows = rows_cpu.to(x.device)
            _restart(obj, threat, xc.index_select(0, rows), y.index_select(0, rows), rows_of(eps, rows),
                     rows, rows_cpu, n, gen, n_queries=n_queries, p_init=p_init, rescale=rescale_schedule, lo=lo,
                     hi=hi, early_stop=early_stop, out=out, done=done, best=best)
    return out
