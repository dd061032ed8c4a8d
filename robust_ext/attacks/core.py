"""The attack core: the iterate loop every gradient attack runs, over any threat model.

* :class:`Objective`: what an attack asks of the model (logits, the summed loss's input gradient, success,
  the per-sample objective), with amp and a full-precision confirmation of every "fooled" under amp.
* :func:`iterate`: ``steps`` steps of a :class:`~robust_ext.attacks.threats.ThreatModel` from a start,
  no host sync.
* :func:`iterate_early_stop`: the same, a sample leaving the working batch at its first fooling iterate.
* :func:`run`: random start, restarts keeping each sample's worst case, early stop with batch compaction:
  PGD in full generality (BIM, FGSM-RS and the L2 variants are special cases).
* :func:`eval_mode`, :func:`setup`: the model in eval mode for an attack; the shared argument checks.

An attack of a new paper uses these pieces and one threat model; it never names a norm.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
from torch import nn

from . import checks
from .losses import get_loss, per_sample_loss
from .threats import ThreatModel, get_threat

__all__ = ["Objective", "eval_mode", "setup", "iterate", "iterate_early_stop", "keep_worst", "run", "rows_of"]


class Objective:
    """What an attack asks of the model.

    ``loss`` names a :mod:`~robust_ext.attacks.losses` entry. The attack always *ascends*
    :meth:`objective`: the loss, or, for ``targeted`` with a loss that has no target of its own (CE,
    margin), minus the loss towards the target labels ``y``. A loss that takes a target (APGD-T's
    ``dlr_targeted``) gets it as ``t`` and is ascended; success is then misclassification of ``y``.
    """

    def __init__(self, model, loss="ce", targeted: bool = False, amp_dtype=None, device_type: str = "cpu"):
        self.model, self.loss = model, get_loss(loss)
        self.targeted = bool(targeted)
        self.descend = self.targeted and not self.loss.needs_target  # y holds the target labels
        self.amp_dtype, self.device_type = amp_dtype, device_type
        self.labels_checked = False  # against the number of logits, at the first forward (see success)

    def logits(self, x):
        if self.amp_dtype is None:
            return self.model(x)
        with torch.autocast(self.device_type, dtype=self.amp_dtype):
            return self.model(x)

    def objective(self, logits, y, t=None):
        """What the attack maximizes, per sample."""
        loss = per_sample_loss(logits, y, self.loss, t)
        return -loss if self.descend else loss

    def grad(self, x_adv, y, t=None):
        """(d sum_i objective_i / d x_adv, detached logits, detached per-sample objective). Makes x_adv
        require grad; the sum keeps each sample's gradient independent of the batch size. The backward runs
        outside autocast."""
        with torch.enable_grad():
            x_adv.requires_grad_(True)
            logits = self.logits(x_adv)
            objective = self.objective(logits, y, t)
            total = objective.sum()
            # A model whose output ignores its input (constant logits: the loss needs no grad at all, or
            # x_adv is not in its graph) has no gradient: nothing to follow, so nothing moves.
            g = torch.autograd.grad(total, x_adv, allow_unused=True)[0] if total.requires_grad else None
        return (torch.zeros_like(x_adv) if g is None else g), logits.detach(), objective.detach()

    def success(self, logits, y):
        # An attack's first forward comes through here with every row: a label the logits have no class for
        # would count as "fooled" (untargeted) or never (targeted) without a word. Checked once, without a host
        # sync (see checks.check_xy); later calls see subsets of the same labels.
        if not self.labels_checked and logits.dim() == 2 and y.numel():
            torch._assert_async((y < logits.shape[1]).all(), checks.LABEL_RANGE.format(k=logits.shape[1]))
            self.labels_checked = True
        pred = logits.argmax(1)
        return pred == y if self.descend else pred != y

    def confirmed(self, x_adv, y, hit):
        """``hit`` with every row that looks fooled under autocast re-checked by a full-precision forward:
        early stop must not keep a point that the model in full precision still classifies correctly."""
        if self.amp_dtype is None:
            return hit
        idx = hit.nonzero().squeeze(1)
        if idx.numel() == 0:
            return hit
        with torch.no_grad():
            ok = self.success(self.model(x_adv.index_select(0, idx)), y.index_select(0, idx))
        return hit.index_put((idx,), ok)


@contextlib.contextmanager
def eval_mode(*models):
    """Every submodule of each model in eval mode; each one's own mode restored afterwards, also on error."""
    modes = [(m, m.training) for model in models if isinstance(model, nn.Module) for m in model.modules()]
    for model in models:
        if isinstance(model, nn.Module):
            model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def setup(model, x, y, eps, targeted, clip_min, clip_max, loss, amp, norm="linf"):
    """The checks every attack starts with: (x, y, eps, lo, hi, Objective, ThreatModel)."""
    threat = get_threat(norm)
    x, y = checks.check_xy(x, y)
    eps = checks.check_budget(eps, "eps", x)
    lo, hi = checks.check_bounds(clip_min, clip_max)
    checks.check_within(x, lo, hi)
    obj = Objective(model, checks.check_loss(loss), checks.check_bool(targeted, "targeted"),
                    checks.amp_dtype(amp, x.device.type), x.device.type)
    return x, y, eps, lo, hi, obj, threat


def rows_of(t, index):
    """``t``'s rows ``index`` when it is a per-sample tensor; a float budget (or None) as it is."""
    return t.index_select(0, index) if isinstance(t, torch.Tensor) else t


def iterate(obj: Objective, threat: ThreatModel, x, y, x_adv, alpha, eps, steps, lo, hi, on_step=None):
    """``steps`` fused steps of ``threat`` from ``x_adv``; ``on_step(logits)`` sees each step's logits (at
    the point before the step), for callers that record the trajectory."""
    for _ in range(steps):
        grad, logits, _ = obj.grad(x_adv, y)
        if on_step is not None:
            on_step(logits)
        x_adv = x_adv.detach()
        threat.step_(x_adv, grad, x, alpha, eps, lo, hi)
    return x_adv


def iterate_early_stop(obj: Objective, threat: ThreatModel, x, y, x_adv, alpha, eps, steps, lo, hi, rows, out,
                       done):
    """:func:`iterate`, but a sample leaves the batch at the first iterate that fools the model: that
    iterate goes to ``out[row]`` and ``done[row]`` is set. Returns the rows still running, their x, y and
    last (unchecked) iterate."""
    for _ in range(steps):
        grad, logits, _ = obj.grad(x_adv, y)
        x_adv = x_adv.detach()
        hit = obj.confirmed(x_adv, y, obj.success(logits, y))
        keep = (~hit).nonzero().squeeze(1)  # the host sync early stop needs, once per step (twice with amp)
        if keep.numel() < rows.numel():
            fooled = hit.nonzero().squeeze(1)
            fooled_rows = rows.index_select(0, fooled)
            out.index_copy_(0, fooled_rows, x_adv.index_select(0, fooled))
            done.index_fill_(0, fooled_rows, True)
            rows, x, y, x_adv, grad = (t.index_select(0, keep) for t in (rows, x, y, x_adv, grad))
            alpha, eps = rows_of(alpha, keep), rows_of(eps, keep)
            if rows.numel() == 0:
                break
        threat.step_(x_adv, grad, x, alpha, eps, lo, hi)
    return rows, x, y, x_adv


def keep_worst(out, best, done, rows, x_adv, objective, hit):
    """Per sample: keep x_adv if it fools and the kept one does not, or if both do or both do not and
    x_adv's objective is higher. No host sync."""
    was_done, was_best = done[rows], best[rows]
    better = (hit & ~was_done) | ((hit == was_done) & (objective > was_best))
    mask = better.view((-1,) + (1,) * (x_adv.dim() - 1))
    out.index_copy_(0, rows, torch.where(mask, x_adv, out[rows]))
    best.index_copy_(0, rows, torch.where(better, objective.to(best.dtype), was_best))
    done.index_copy_(0, rows, was_done | hit)


def run(model, x, y, *, eps, alpha, steps, random_start, restarts, targeted, early_stop, clip_min, clip_max,
        loss, amp, generator: Optional[torch.Generator], norm="linf"):
    """PGD in full generality, under any threat model; FGSM-RS and BIM are special cases."""
    x, y, eps, lo, hi, obj, threat = setup(model, x, y, eps, targeted, clip_min, clip_max, loss, amp, norm)
    alpha = checks.check_budget(alpha, "alpha", x)
    steps = checks.check_int(steps, "steps", 1)
    restarts = checks.check_int(restarts, "restarts", 1)
    random_start = checks.check_bool(random_start, "random_start")
    early_stop = checks.check_bool(early_stop, "early_stop")
    if x.shape[0] == 0:
        return x.clone()

    def start(xs, e):
        return threat.init(xs, e, lo, hi, generator=generator) if random_start else xs.clone()

    with eval_mode(model):
        if restarts == 1 and not early_stop:
            return iterate(obj, threat, x, y, start(x, eps), alpha, eps, steps, lo, hi)
        n = x.shape[0]
        out = x.clone()
        best = torch.full((n,), -math.inf, dtype=torch.float64, device=x.device)
        done = torch.zeros(n, dtype=torch.bool, device=x.device)
        rows = torch.arange(n, device=x.device)
        for _ in range(restarts):
            xs, ys, a, e = x, y, alpha, eps
            if early_stop:  # a restart attacks only the samples no earlier restart fooled
                rows = (~done).nonzero().squeeze(1)
                if rows.numel() == 0:
                    break
                xs, ys, a, e = (rows_of(t, rows) for t in (x, y, alpha, eps))
                rows, xs, ys, x_adv = iterate_early_stop(obj, threat, xs, ys, start(xs, e), a, e, steps, lo, hi,
                                                         rows, out, done)
            else:
                x_adv = iterate(obj, threat, xs, ys, start(xs, e), a, e, steps, lo, hi)
            if restarts == 1:
                out.index_copy_(0, rows, x_adv)
                break
            with torch.no_grad():
                logits = obj.logits(x_adv)
            keep_worst(out, best, done, rows, x_adv, obj.objective(logits, ys), obj.success(logits, ys))
        return out
