"""FAB and FAB-T (Croce & Hein, ICML 2020, "Minimally distorted adversarial examples with a fast adaptive
boundary attack"), L-inf and L2, as AutoAttack runs them. Conventions: :mod:`robust_ext.attacks`.

FAB looks for the *smallest* adversarial perturbation. The algorithm is the reference implementation's
(fra31/auto-attack, ``autoattack/fab_base.py`` and ``fab_pt.py``), which torchattacks' ``FAB`` copies:

* Per iteration, at the iterate ``x_k``: linearize the model, take the decision boundary closest to ``x_k`` in
  the linearization (untargeted: over every other class ``j``, the smallest
  ``|f_j - f_y| / ||grad(f_j - f_y)||_*``, ``*`` the dual norm; FAB-T: the boundary to the target class) and
  project both ``x_k`` and the clean ``x`` onto it within the box (:mod:`.fab_projections`): steps ``d_k``, ``d_0``.
* ``x_{k+1} = clip((1 - a)(x_k + eta d_k) + a (x + eta d_0))`` with ``a = min(max(|d_k| / (|d_k| + |d_0|), 0),
  alpha_max)`` (``|.|`` the norm; each at least 1e-8): a bias towards the clean point when the boundary is far.
* An iterate that fools the model and is closer to ``x`` than the best one found replaces it; every fooling
  iterate is then pulled back towards ``x``: ``x + beta (x_{k+1} - x)``.
* Restarts: the first run starts at ``x``, each next one at a random point at distance ``eps / 2`` (the
  reference's draw, from ``generator``). FAB-T runs ``restarts`` runs per target class, the 2nd, 3rd, ... most
  likely classes of the clean point (``n_target_classes`` of them, fewer for fewer classes); success is
  misclassification, as in the reference. A run attacks only the points no earlier run fooled within ``eps``.
* A point counts as fooled at budget ``eps`` when the smallest perturbation found is at most ``eps``
  (AutoAttack's use of FAB); the point returned is then that adversarial example, otherwise the clean ``x``.

Beyond the AutoAttack version:

* ``final_search=True`` (the default of :func:`fab` and :func:`fab_t`; AutoAttack's ``standard``, ``plus`` and
  ``rand`` versions run without it, as the reference does): after each run, a point fooled only beyond ``eps``
  gets the original FAB's final search (fra31/fab-attack, ``linear_approximation_search``, 3 steps): on the
  segment from ``x`` to the adversarial example, the point where the linear interpolation of the logits crosses
  the boundary, keeping the segment's adversarial end. It only shortens adversarial perturbations, so it can
  only add fooled points.
* ``early_stop=True`` (the default): a point leaves the batch as soon as an adversarial example within ``eps``
  is found. FAB would go on shrinking it, but the point counts as fooled either way: the robust accuracy is that
  of running every iteration (``early_stop=False``), in less time.
* The points a run fooled are re-predicted together after it (as the reference re-predicts each run's
  output): one the model then classifies correctly goes back to ``x`` and stays to be attacked.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

from ..reference import compute_dtype
from . import checks, core
from .apgd import _Batch, _leave
from .apgd import _rows_view as _view
from .core import eval_mode, rows_of
from .fab_projections import project_l2, project_linf

__all__ = ["fab", "fab_t", "check_fab_params", "FINAL_SEARCH_STEPS"]

FINAL_SEARCH_STEPS = 3  # the original FAB's linear approximation search
_NORMS = {"linf": (project_linf, 1.0, math.inf), "l2": (project_l2, 2.0, 2.0)}  # projection, dual p, p
_MIN_STEP = 1e-8  # the reference's floor on the two steps' norms in the bias towards x


def _boundary(model, x1, y, target, dual_p, dtype):
    """The hyperplane ``w . z = b`` of the linearized decision boundary closest to ``x1`` (flattened, in the
    compute dtype): untargeted over every class but ``y``, one backward per class; FAB-T to ``target``."""
    n, flat = x1.shape[0], x1.flatten(1)
    rows = torch.arange(n, device=x1.device)
    with torch.enable_grad():
        xg = x1.detach().to(dtype).requires_grad_(True)
        logits = model(xg)
        k = logits.shape[1]
        own = logits[rows, y]
        others = [target] if target is not None else [(y + j) % k for j in range(1, k)]
        diffs, grads = [], []
        for j, cls in enumerate(others):
            diff = logits[rows, cls] - own
            g = torch.autograd.grad(diff.sum(), xg, retain_graph=j < len(others) - 1, allow_unused=True)[0]
            diffs.append(diff.detach())
            grads.append(torch.zeros_like(xg) if g is None else g)
    df = torch.stack(diffs, 1).to(flat.dtype)  # [n, classes tried]
    dg = torch.stack(grads, 1).flatten(2).to(flat.dtype)  # [n, classes tried, D]
    if target is None:
        # The distances in class order, y's excluded: ties between classes break as the reference's argmin.
        dist = df.abs() / (1e-12 + dg.norm(p=dual_p, dim=2))
        by_class = torch.full((n, k), math.inf, dtype=dist.dtype, device=dist.device)
        by_class.scatter_(1, torch.stack(others, 1), dist)
        pick = (by_class.argmin(1) - y - 1) % k
    else:
        pick = torch.zeros_like(y)
    w = dg[rows, pick]
    b = (w * flat).sum(1) - df[rows, pick]
    return w, b


def _start(x, eps, p, generator):
    """The reference's random start: a random direction scaled to ``eps / 2`` in the norm (clipped later).

    Drawn on ``generator``'s device (the evaluation hands every attack a CPU generator, whatever the model's
    device), then moved to ``x``'s."""
    where = x.device if generator is None else generator.device
    if p == math.inf:
        t = torch.rand(x.shape, generator=generator, device=where, dtype=x.dtype).to(x.device).mul_(2).sub_(1)
        size = t.flatten(1).abs().amax(1)
    else:
        t = torch.randn(x.shape, generator=generator, device=where, dtype=x.dtype).to(x.device)
        size = t.flatten(1).norm(dim=1)
    e = _view(eps, x) if isinstance(eps, torch.Tensor) else eps
    return x + e * t / _view(size, x) * 0.5


def _final_search(model, x0, adv, y, dtype):
    """The original FAB's linear approximation search on the segments from ``x0`` to ``adv`` (fooling)."""
    rows = torch.arange(x0.shape[0], device=x0.device)
    with torch.no_grad():
        lo_pt, hi_pt = x0, adv
        z_lo, z_hi = model(lo_pt.to(dtype)).to(x0.dtype), model(hi_pt.to(dtype)).to(x0.dtype)
        cls = z_hi.argmax(1)
        for _ in range(FINAL_SEARCH_STEPS):
            t1 = z_lo[rows, y] - z_lo[rows, cls]
            t2 = z_hi[rows, cls] - z_hi[rows, y]
            t = t1 / (t1 + t2 + 1e-10)
            t = torch.where((t >= 0) & (t <= 1), t, torch.ones_like(t)).to(x0.dtype)
            mid = lo_pt + (hi_pt - lo_pt) * _view(t, x0)
            z_mid = model(mid.to(dtype)).to(x0.dtype)
            mid_cls = z_mid.argmax(1)
            kept = mid_cls == y
            m = _view(kept, x0)
            lo_pt, z_lo = torch.where(m, mid, lo_pt), torch.where(kept[:, None], z_mid, z_lo)
            hi_pt, z_hi = torch.where(m, hi_pt, mid), torch.where(kept[:, None], z_hi, z_mid)
            cls = torch.where(kept, cls, mid_cls)
    return hi_pt


def _within(s):
    eps = s.eps.to(torch.float64) if isinstance(s.eps, torch.Tensor) else s.eps
    return s.best <= eps


def _run(model, s, threat, p, dual_p, project, *, steps, alpha_max, eta, beta, lo, hi, early_stop, final_search,
         out, done):
    """One FAB run on ``s``'s samples from its start ``s.x1``: each one fooled within eps leaves to ``out``."""
    dtype = out.dtype
    for _ in range(steps):
        n = s.x0.shape[0]
        w, b = _boundary(model, s.x1, s.y, s.t, dual_p, dtype)
        points = torch.cat((s.x1.flatten(1), s.x0.flatten(1)))
        d = project(points, torch.cat((w, w)), torch.cat((b, b)), lo, hi)
        size = d.norm(p=p, dim=1).clamp_min(_MIN_STEP)
        a = (size[:n] / (size[:n] + size[n:])).clamp(0, alpha_max)
        d1, d2 = d[:n].view_as(s.x1), d[n:].view_as(s.x1)
        a = _view(a, s.x1)
        s.x1 = ((s.x1 + eta * d1) * (1 - a) + (s.x0 + eta * d2) * a).clamp_(lo, hi)
        xq = s.x1.to(dtype)
        with torch.no_grad():
            fooled = model(xq).argmax(1) != s.y
        dist = threat.distance(xq, s.x0q)
        better = fooled & (dist < s.best)
        s.x_adv = torch.where(_view(better, xq), xq, s.x_adv)
        s.best = torch.where(better, dist, s.best)
        s.x1 = torch.where(_view(fooled, s.x1), s.x0 + (s.x1 - s.x0) * beta, s.x1)
        if early_stop:
            _leave(s, _within(s), out, done)  # early stop's host sync, once per iteration
            if s.rows.numel() == 0:
                return
    idx = ((s.best < math.inf) & ~_within(s)).nonzero().squeeze(1) if final_search else None
    if idx is not None and idx.numel():
        closer = _final_search(model, s.x0.index_select(0, idx), s.x_adv.index_select(0, idx).to(s.x0.dtype),
                               s.y.index_select(0, idx), dtype).to(dtype)
        s.x_adv.index_copy_(0, idx, closer)
        s.best.index_copy_(0, idx, threat.distance(closer, s.x0q.index_select(0, idx)))
    _leave(s, _within(s), out, done)


def _confirm(model, x, y, out, done, rows):
    """The reference's re-prediction of a run's output: a row that does not fool the model in this batch goes
    back to ``x`` and stays to be attacked."""
    if rows.numel() == 0:
        return
    with torch.no_grad():
        ok = model(out.index_select(0, rows)).argmax(1) != y.index_select(0, rows)
    wrong = rows[~ok]
    if wrong.numel():
        out.index_copy_(0, wrong, x.index_select(0, wrong))
        done.index_fill_(0, wrong, False)


def _check_float(value, name, low, high, low_included=True):
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value) \
        and (low <= value if low_included else low < value) and value <= high
    if not ok:
        raise ValueError(f"{name} must be a float in {'[' if low_included else '('}{low}, {high}], got {value!r}")
    return float(value)


def check_fab_params(alpha_max, eta, beta):
    """``(alpha_max, eta, beta)`` as floats: ``alpha_max`` and ``beta`` in [0, 1], ``eta`` > 0."""
    return (_check_float(alpha_max, "alpha_max", 0.0, 1.0),
            _check_float(eta, "eta", 0.0, checks.MAX_BUDGET, low_included=False),
            _check_float(beta, "beta", 0.0, 1.0))


def fab(model, x, y, *, eps, steps=100, restarts=1, targeted=False, n_target_classes=9, norm="linf",
        alpha_max=0.1, eta=1.05, beta=0.9, early_stop=True, final_search=True, clip_min=0.0, clip_max=1.0,
        generator: Optional[torch.Generator] = None):
    """FAB (``targeted=False``) or FAB-T (``targeted=True``), Croce & Hein 2020, at budget ``eps``: see the module
    docstring for the algorithm.

    Args:
        model: maps images in ``[clip_min, clip_max]`` to logits ``[N, num_classes]`` (see
            :mod:`robust_ext.attacks`).
        x: images ``[N, ...]``, floating point; the result has their dtype, device and layout.
        y: the true labels ``[N]`` (also for FAB-T, which picks its target classes itself).
        eps: a float >= 0 or one value per sample: a point counts as fooled when FAB finds an adversarial
            example within it, and sets the radius of the restarts' random starts (``eps / 2``).
        steps, restarts: iterations per run and runs (per target class for FAB-T); AutoAttack: 100 and 1.
        targeted, n_target_classes: FAB-T towards each of the ``n_target_classes`` most likely other classes
            of the clean point in turn (at most ``num_classes - 1``).
        norm: ``"linf"`` or ``"l2"`` (the projections exist for these two).
        alpha_max, eta, beta: the largest bias towards ``x`` (0.1), the overshoot (1.05), the backward step
            after a fooling iterate (0.9): the reference's defaults.
        early_stop: a point leaves the batch once fooled within ``eps`` (the same result, less time).
        final_search: after each run, the original FAB's final search on the points fooled only beyond
            ``eps`` (it can only add fooled points); AutoAttack's FAB has none, and its versions turn it off.
        generator: a ``torch.Generator`` for the restarts' random starts (a CPU one serves any device).

    Returns:
        ``x_adv``, detached: for a point fooled within ``eps`` the smallest adversarial example found (when
        early stop let it run to the end) within ``eps`` and the bounds; for every other point ``x`` itself.
    """
    x, y, eps, lo, hi, _, threat = core.setup(model, x, y, eps, False, clip_min, clip_max, "ce", False, norm)
    if threat.name not in _NORMS:
        raise ValueError(f"fab supports norm 'linf' or 'l2' (its projections), got {threat!r}")
    project, dual_p, p = _NORMS[threat.name]
    steps = checks.check_int(steps, "steps", 1)
    restarts = checks.check_int(restarts, "restarts", 1)
    n_target_classes = checks.check_int(n_target_classes, "n_target_classes", 1)
    alpha_max, eta, beta = check_fab_params(alpha_max, eta, beta)
    for name, flag in (("targeted", targeted), ("early_stop", early_stop), ("final_search", final_search)):
        checks.check_bool(flag, name)
    out = x.clone()
    n = x.shape[0]
    if n == 0:
        return out
    work = compute_dtype(x.dtype)
    with eval_mode(model):
        with torch.no_grad():
            clean = model(x)
        if clean.dim() != 2 or clean.shape[1] < 2:
            raise ValueError(f"FAB needs logits of shape [N, num_classes >= 2], got {list(clean.shape)}")
        torch._assert_async((y < clean.shape[1]).all(), checks.LABEL_RANGE.format(k=clean.shape[1]))
        done = clean.argmax(1) != y
        targets = [None]
        if targeted:
            ranked = clean.detach().float().scatter(1, y.unsqueeze(1), -math.inf).argsort(1, descending=True)
            targets = list(ranked[:, :min(n_target_classes, clean.shape[1] - 1)].unbind(1))
        for target in targets:
            for restart in range(restarts):
                rows = (~done).nonzero().squeeze(1)
                if rows.numel() == 0:
                    return out
                x0q = x.index_select(0, rows)
                x0, e = x0q.to(work), rows_of(eps, rows)
                x1 = _start(x0, e, p, generator).clamp_(lo, hi) if restart else x0.clone()
                s = _Batch(rows=rows, x0=x0, x0q=x0q, y=y.index_select(0, rows), t=rows_of(target, rows), eps=e,
                           x1=x1, x_adv=x0q.clone(),
                           best=torch.full((rows.numel(),), math.inf, dtype=torch.float64, device=x.device))
                before = done.clone()
                _run(model, s, threat, p, dual_p, project, steps=steps, alpha_max=alpha_max, eta=eta, beta=beta,
                     lo=lo, hi=hi, early_stop=early_stop, final_search=final_search, out=out, done=done)
                _confirm(model, x, y, out, done, (done & ~before).nonzero().squeeze(1))
    return out


def fab_t(model, x, y, *, eps, steps=100, restarts=1, n_target_classes=9, norm="linf", alpha_max=0.1, eta=1.05,
          beta=0.9, early_stop=True, final_search=True, clip_min=0.0, clip_max=1.0,
          generator: Optional[torch.Generator] = None):
    """FAB-T: :func:`fab` with ``targeted=True`` (AutoAttack's ``fab-t``: 9 target classes, 100 steps, 1 restart,
    ``final_search=False``)."""
    return fab(model, x, y, eps=eps, steps=steps, restarts=restarts, targeted=True, n_target_classes=n_target_classes,
               norm=norm, alpha_max=alpha_max, eta=eta, beta=beta, early_stop=early_stop, final_search=final_search,
               clip_min=clip_min, clip_max=clip_max, generator=generator)
