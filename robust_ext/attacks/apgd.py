"""APGD and APGD-T (Croce & Hein, ICML 2020, "Reliable evaluation of adversarial robustness with an ensemble
of diverse parameter-free attacks"), under any threat model. Conventions: :mod:`robust_ext.attacks`.

The algorithm is the reference implementation's (fra31/auto-attack, ``autoattack/autopgd_base.py``), which
torchattacks and adv-lib follow:

* From a start ``x_0`` in the ball, step ``eta = 2 eps`` per sample. Iterate ``k``:
  ``z = P(x_k + eta * step direction)`` (the threat model's steepest-ascent step) and
  ``x_{k+1} = P(x_k + a (z - x_k) + (1 - a)(x_k - x_{k-1}))`` with momentum ``a = 0.75`` (``a = 1`` on the first
  step, so ``x_1 = z``), ``P`` the projection onto the ball and the bounds.
* Per sample, the best point (highest loss, strictly higher replaces it) and its gradient are kept.
* At the checkpoints of :func:`checkpoint_schedule` a sample halves its step and restarts from its best point
  (with the best point's gradient; the next momentum term runs from the iterate before the last to it)
  when :func:`halve_step` says so.
* A sample is fooled when any iterate, the start included, fools the model; points the model misclassifies
  (targeted: already classifies as the target) are not attacked. Restarts, and APGD-T's target classes,
  attack only the points no earlier run fooled.

Differences from the reference, none of which changes what is computed for a sample:

* The random start is the threat model's (``threat.init``, uniform in the L-inf ball, from ``generator``); the
  reference draws a point at distance exactly ``eps`` from its global RNG.
* ``early_stop=True`` (the default) drops a sample from the batch at its first fooling iterate and returns it:
  the same robust accuracy as running every iteration, in less time, for a deterministic model. For a
  randomized one, "fooled at one iterate" is one random draw: use ``early_stop=False`` (AutoAttack's ``rand``
  version does), which runs every iteration and returns the last fooling iterate, as the reference.
* A point never fooled comes back as the highest-loss point found (the reference returns the clean image).
* The last iterate's gradient is not computed (nothing uses it), and nothing waits for the host between
  iterations but early stop's check of which samples leave (none without early stop).
"""
from __future__ import annotations

import math
import numbers
from typing import List, Optional

import torch

from ..reference import compute_dtype
from . import checks, core
from .core import eval_mode, rows_of

__all__ = ["apgd", "apgd_t", "apgd_loop", "rank_targets", "checkpoint_schedule", "halve_step", "StepRule",
           "MOMENTUM", "MALT_CANDIDATES"]

MOMENTUM = 0.75
MALT_CANDIDATES = 9  # the classes target_order="malt" re-ranks: AutoAttack's 9 likeliest targets
TARGET_ORDERS = ("logits", "malt")


def check_target_order(order) -> str:
    if order not in TARGET_ORDERS:
        raise ValueError(f"target_order must be 'logits' or 'malt', got {order!r}")
    return order
_FIRST, _DECAY, _MIN = 0.22, 0.03, 0.06  # the checkpoint schedule's fractions of the iterations


def checkpoint_schedule(steps: int) -> List[int]:
    """The iterations (counted from 1) after which APGD tests its step size, for ``steps`` iterations.

    The paper's checkpoints are ``w_j = ceil(p_j * steps)`` with ``p_0 = 0``, ``p_1 = 0.22`` and
    ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``. The reference implementation computes them in whole
    iterations: the first interval ``int(0.22 steps)``, each next one ``int(0.03 steps)`` shorter but never
    shorter than ``int(0.06 steps)`` (each of the three at least 1). Both give 22, 41, 57, 70, 80, 87, 93, 99
    for 100 iterations; for others they can differ (20: the reference's 4, 7, 9, 10, 11, ..., 20, the
    formula's 5, 9, 12, ...). This follows the reference, as torchattacks and adv-lib do.
    """
    steps = checks.check_int(steps, "steps", 1)
    interval, decay, shortest = (max(int(f * steps), 1) for f in (_FIRST, _DECAY, _MIN))
    out, w = [], interval
    while w <= steps:
        out.append(w)
        interval = max(interval - decay, shortest)
        w += interval
    return out


def halve_step(increases, interval: int, rho: float, halved_before, best, best_before):
    """APGD's step-size test at a checkpoint, per sample: halve where the loss increased in at most
    ``rho`` of the ``interval`` steps since the last checkpoint, or where the step was not halved at the last
    checkpoint (``halved_before`` False) and the best loss has not improved since it (``best_before >= best``)."""
    return (increases <= interval * rho) | (~halved_before & (best_before >= best))


class StepRule:
    """APGD's per-sample bookkeeping between checkpoints, from the start's loss ``loss0``.

    :meth:`observe` takes each iterate's loss and returns ``(improved, halve)``: where the loss beat the best
    so far (the best point moves there), and, at a checkpoint of :func:`checkpoint_schedule`, where the step
    halves (None between checkpoints). No host sync.
    """

    def __init__(self, loss0: torch.Tensor, steps: int, rho: float):
        self.best = loss0.clone()
        self.best_at_check = loss0.clone()
        # As the reference: the first checkpoint tests only the increases (its record starts "halved"), and
        # the first step's loss is compared with 0 (its loss history reads 0 before the first iterate).
        self.halved_at_check = torch.ones_like(loss0, dtype=torch.bool)
        self.prev = torch.zeros_like(loss0)
        self.increases = torch.zeros_like(loss0)
        self.rho = rho
        self._checkpoints = set(checkpoint_schedule(steps))
        self._count = self._last_check = 0

    def observe(self, loss: torch.Tensor):
        self.increases += loss > self.prev
        self.prev = loss
        improved = loss > self.best
        self.best = torch.where(improved, loss, self.best)
        self._count += 1
        if self._count not in self._checkpoints:
            return improved, None
        halve = halve_step(self.increases, self._count - self._last_check, self.rho, self.halved_at_check,
                           self.best, self.best_at_check)
        self._last_check = self._count
        self.halved_at_check, self.best_at_check = halve, self.best
        self.increases = torch.zeros_like(self.increases)
        return improved, halve

    def keep(self, index):
        for name in ("best", "best_at_check", "halved_at_check", "prev", "increases"):
            setattr(self, name, getattr(self, name).index_select(0, index))


class _Batch:
    """The per-sample state of the samples still running, compacted together when some leave: its tensors
    (one row per sample) and the objects with a ``keep(index)`` of their own."""

    def __init__(self, **state):
        self.__dict__.update(state)

    def keep(self, index):
        for name, v in list(vars(self).items()):
            if isinstance(v, torch.Tensor):
                setattr(self, name, v.index_select(0, index))
            elif hasattr(v, "keep"):
                v.keep(index)


def _rows_view(mask, like):
    return mask.view((-1,) + (1,) * (like.dim() - 1))


def _leave(s, hit, out, done):
    """Early stop: the samples ``hit`` leave with their current iterate."""
    keep = (~hit).nonzero().squeeze(1)  # the host sync early stop needs, once per iteration
    if keep.numel() == s.rows.numel():
        return
    gone = hit.nonzero().squeeze(1)
    leaving = s.rows.index_select(0, gone)
    out.index_copy_(0, leaving, s.x_adv.index_select(0, gone))
    done.index_fill_(0, leaving, True)
    s.keep(keep)


def _step(threat, s, momentum, lo, hi):
    s.x_prev, s.x_adv = s.x_adv, threat.apgd_update(s.x_adv, s.x_prev, s.grad, s.x, s.eta, s.eps, momentum, lo, hi)


def _run(obj, threat, x, y, t, eps, rows, *, steps, rho, lo, hi, early_stop, generator, out, done, best):
    """One APGD run from a random start on the samples ``rows`` (none of them fooled yet): a fooled sample's
    iterate goes to ``out`` and ``done`` is set; a sample not fooled gets its best point in ``out`` when its
    loss beats ``best``."""
    eta = (torch.full((rows.numel(),), 2.0 * eps, dtype=compute_dtype(x.dtype), device=x.device)
           if isinstance(eps, float) else eps * 2.0)
    s = _Batch(rows=rows, x=x, y=y, t=t, eps=eps, eta=eta,
               x_adv=threat.init(x, eps, lo, hi, generator=generator))
    for i in range(steps + 1):
        last = i == steps
        if last:  # only the loss and the prediction: no step follows
            with torch.no_grad():
                logits = obj.logits(s.x_adv)
            s.grad, loss = None, obj.objective(logits, s.y, s.t)
        else:
            s.grad, logits, loss = obj.grad(s.x_adv, s.y, s.t)
            s.x_adv = s.x_adv.detach()
        s.loss = loss
        hit = obj.confirmed(s.x_adv, s.y, obj.success(logits, s.y))
        if early_stop:
            _leave(s, hit, out, done)
            if s.rows.numel() == 0:
                return
        elif i == 0:
            s.hit, s.x_hit = hit, s.x_adv.clone()
        else:
            s.hit = s.hit | hit
            torch.where(_rows_view(hit, s.x_adv), s.x_adv, s.x_hit, out=s.x_hit)
        if i == 0:
            s.rule = StepRule(s.loss, steps, rho)
            s.x_best, s.grad_best, s.x_prev = s.x_adv.clone(), s.grad.clone(), s.x_adv
        else:
            improved, halve = s.rule.observe(s.loss)
            torch.where(_rows_view(improved, s.x_adv), s.x_adv, s.x_best, out=s.x_best)
            if last:
                break
            torch.where(_rows_view(improved, s.grad), s.grad, s.grad_best, out=s.grad_best)
            if halve is not None:
                s.eta = torch.where(halve, s.eta * 0.5, s.eta)
                m = _rows_view(halve, s.x_adv)
                s.x_adv, s.grad = torch.where(m, s.x_best, s.x_adv), torch.where(m, s.grad_best, s.grad)
        _step(threat, s, MOMENTUM if i else 1.0, lo, hi)
    _finish(s, out, done, best, early_stop)


def _finish(s, out, done, best, early_stop):
    """After a run: a sample fooled without early stop gets its last fooling iterate; one not fooled its best
    point, when its loss beats the best of earlier runs."""
    fooled = torch.zeros_like(s.rule.best, dtype=torch.bool) if early_stop else s.hit
    loss, before = s.rule.best.to(best.dtype), best.index_select(0, s.rows)
    better = ~fooled & (loss > before)
    result = out.index_select(0, s.rows)
    if not early_stop:
        result = torch.where(_rows_view(fooled, s.x_hit), s.x_hit, result)
    out.index_copy_(0, s.rows, torch.where(_rows_view(better, s.x_best), s.x_best, result))
    best.index_copy_(0, s.rows, torch.where(better, loss, before))
    done.index_copy_(0, s.rows, done.index_select(0, s.rows) | fooled)


def _check_rho(rho) -> float:
    if isinstance(rho, bool) or not isinstance(rho, numbers.Real) or not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho must be a float in [0, 1], got {rho!r}")
    return float(rho)


def rank_targets(model, x, y, clean_logits, threat, order: str = "logits", candidates=None):
    """The other classes of each sample, likeliest target first: ``[N, num_classes - 1]`` (``"logits"``) or
    ``[N, min(candidates, num_classes - 1)]`` (``"malt"``; ``candidates`` None: :data:`MALT_CANDIDATES`).

    * ``"logits"``: by decreasing clean logit, the reference's order (its 2nd, 3rd, ... most likely class).
    * ``"malt"`` (Melamed et al., NeurIPS 2024, "MALT powers up adversarial attacks"): the ``candidates`` most
      likely other classes re-ranked by the distance to their decision boundary under the model's linear
      approximation at ``x``, ``(z_y - z_t) / ||grad_x (z_y - z_t)||_*`` (``||.||_*`` the threat model's
      dual norm), nearest first: a class the logits rank third but a short step away is attacked first.
      Costs one forward and ``candidates`` backward passes, in full precision.
    """
    z = clean_logits.detach().float().scatter(1, y.unsqueeze(1), -math.inf)
    ranked = z.argsort(1, descending=True)[:, :z.shape[1] - 1]
    if check_target_order(order) == "logits":
        return ranked
    k = MALT_CANDIDATES if candidates is None else checks.check_int(candidates, "malt_candidates", 1)
    cand = ranked[:, :min(k, ranked.shape[1])]
    distances = []
    with torch.enable_grad(), torch.autocast(x.device.type, enabled=False):
        xg = x.detach().clone().requires_grad_(True)
        logits = model(xg).float()
        gap = logits.gather(1, y.unsqueeze(1)) - logits.gather(1, cand)  # [N, k], > 0 where y is predicted
        for j in range(cand.shape[1]):
            g = torch.autograd.grad(gap[:, j].sum(), xg, retain_graph=j + 1 < cand.shape[1])[0]
            distances.append(gap[:, j].detach() / (threat.dual_norm(g) + 1e-12))
    nearest = torch.stack(distances, 1).argsort(dim=1, stable=True)
    return cand.gather(1, nearest)


def apgd_loop(model, x, y, eps, obj, threat, lo, hi, *, steps, rho, restarts, early_stop, generator,
              n_target_classes=None, target_order="logits", malt_candidates=None):
    """The APGD iteration for checked inputs (:func:`robust_ext.attacks.core.setup`'s outputs) and a given
    objective: :func:`apgd` and :func:`apgd_t` call it, and so can an attack that changes only the objective
    (e.g. an expectation over transformations, :func:`robust_ext.evaluation.autoattack_versions.apgd_eot`).
    ``obj`` needs :class:`~robust_ext.attacks.core.Objective`'s ``grad``, ``success`` and ``confirmed``."""
    steps = checks.check_int(steps, "steps", 1)
    restarts = checks.check_int(restarts, "restarts", 1)
    early_stop = checks.check_bool(early_stop, "early_stop")
    rho = _check_rho(rho)
    largest = float(eps.max()) if isinstance(eps, torch.Tensor) and eps.numel() else float(eps or 0.0)
    if largest > checks.MAX_BUDGET / 2:  # one host read per call
        raise ValueError(f"eps must be <= {checks.MAX_BUDGET / 2:.4g} for APGD, whose first step is 2 eps, got "
                         f"{largest:.4g}")
    out = x.clone()
    n = x.shape[0]
    if n == 0:
        return out
    with eval_mode(model):
        with torch.no_grad():
            clean = model(x)  # full precision: which points count as already fooled, and APGD-T's targets
        done = obj.success(clean, y)
        best = torch.full((n,), -math.inf, dtype=torch.float64, device=x.device)
        if n_target_classes is None:
            targets = [None]
        else:
            ranked = rank_targets(model, x, y, clean, threat, target_order, malt_candidates)
            targets = list(ranked[:, :min(n_target_classes, ranked.shape[1])].unbind(1))
        for target in targets:
            for _ in range(restarts):
                rows = (~done).nonzero().squeeze(1)
                if rows.numel() == 0:
                    return out
                _run(obj, threat, x.index_select(0, rows), y.index_select(0, rows), rows_of(target, rows),
                     rows_of(eps, rows), rows, steps=steps, rho=rho, lo=lo, hi=hi, early_stop=early_stop,
                     generator=generator, out=out, done=done, best=best)
    return out


def apgd(model, x, y, *, eps, steps=100, loss="ce", restarts=1, norm="linf", rho=0.75, targeted=False,
         early_stop=True, clip_min=0.0, clip_max=1.0, amp=False, generator: Optional[torch.Generator] = None):
    """APGD, Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an ensemble of diverse
    parameter-free attacks" (AutoAttack's APGD-CE with ``loss="ce"``, APGD-DLR with ``loss="dlr"``).

    ``steps`` iterations of projected gradient ascent with momentum 0.75 from a random start, the step
    starting at ``2 eps`` and halved per sample at fixed checkpoints when the loss stalls (see the module
    docstring for the exact rule).

    Args:
        model: maps images in ``[clip_min, clip_max]`` to logits ``[N, num_classes]``, normalization
            included (see :mod:`robust_ext.attacks`).
        x: images ``[N, ...]``, floating point; ``x_adv`` gets their dtype, device and layout.
        y: integer labels ``[N]``; the target labels when ``targeted``.
        eps: a float >= 0, or a tensor with one value per sample.
        steps, restarts: integers >= 1 (the reference's defaults: 100 and 1).
        loss: ``"ce"``, ``"dlr"`` (:mod:`robust_ext.attacks.losses`), or another registered loss without a
            target of its own.
        norm: ``"linf"``, ``"l2"`` or a :class:`~robust_ext.attacks.ThreatModel`.
        rho: the fraction of increasing steps below which the step halves (0.75).
        targeted: descend the loss towards ``y`` instead of ascending it away from ``y``.
        early_stop: a sample leaves the batch at its first fooling iterate and returns it (one host sync per
            iteration); for a deterministic model the robust accuracy is that of running every iteration (for
            a randomized one pass ``False``: see the module docstring).
        amp: ``False``, ``True`` (bfloat16 on CPU, float16 on CUDA) or a dtype: autocast for the model; every
            "fooled" is confirmed by a full-precision forward.
        generator: a ``torch.Generator`` for the random starts.

    Returns:
        ``x_adv`` with ``||x_adv - x|| <= eps`` and ``clip_min <= x_adv <= clip_max``, detached: for a fooled
        sample a fooling iterate, for a misclassified one ``x``, otherwise the highest-loss point found.
    """
    x, y, eps, lo, hi, obj, threat = core.setup(model, x, y, eps, targeted, clip_min, clip_max, loss, amp, norm)
    if obj.loss.needs_target:
        raise ValueError(f"loss {obj.loss.name!r} takes a target class per sample: use apgd_t")
    return apgd_loop(model, x, y, eps, obj, threat, lo, hi, steps=steps, rho=rho, restarts=restarts,
                   early_stop=early_stop, generator=generator)


def apgd_t(model, x, y, *, eps, steps=100, n_target_classes=9, restarts=1, norm="linf", loss="dlr_targeted",
           rho=0.75, early_stop=True, clip_min=0.0, clip_max=1.0, amp=False, target_order="logits",
           malt_candidates=MALT_CANDIDATES, generator: Optional[torch.Generator] = None):
    """APGD-T, Croce & Hein 2020 (AutoAttack's targeted APGD on the targeted DLR loss).

    :func:`apgd` on ``loss`` (``"dlr_targeted"``: ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)``) towards
    each of the ``n_target_classes`` most likely other classes of the clean image in turn (fewer when the
    model has fewer classes), ``restarts`` runs per target class, each run attacking only the points no earlier
    run fooled. Success is misclassification of ``y`` (not reaching the target). Needs at least 4 classes.
    ``target_order="malt"`` takes the targets from the ``malt_candidates`` likeliest classes nearest-boundary
    first (:func:`rank_targets`; AutoAttack's ``fast`` version attacks 3 of them).
    Other arguments and the result: :func:`apgd`.
    """
    n_target_classes = checks.check_int(n_target_classes, "n_target_classes", 1)
    checks.check_int(malt_candidates, "malt_candidates", 1)
    check_target_order(target_order)
    x, y, eps, lo, hi, obj, threat = core.setup(model, x, y, eps, False, clip_min, clip_max, loss, amp, norm)
    if not obj.loss.needs_target:
        raise ValueError(f"apgd_t needs a loss that takes a target class (e.g. 'dlr_targeted'), "
                         f"got {obj.loss.name!r}")
    return apgd_loop(model, x, y, eps, obj, threat, lo, hi, steps=steps, rho=rho, restarts=restarts,
                   early_stop=early_stop, generator=generator, n_target_classes=n_target_classes,
                   target_order=target_order, malt_candidates=malt_candidates)
