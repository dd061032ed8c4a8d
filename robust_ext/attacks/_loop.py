"""The attack loop shared by FGSM-RS, BIM and PGD: the model's side (forward, loss, input gradient), the
in-place fused steps, early stop with compaction, and the worst case over restarts."""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from . import _args


def per_sample_loss(logits: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    """Cross-entropy, or the margin max_{j != y} z_j - z_y, of each row of logits."""
    if logits.dim() != 2:
        raise ValueError(f"model must return logits of shape [N, num_classes], got {list(logits.shape)}")
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    if loss == "ce":
        return F.cross_entropy(logits, y, reduction="none")
    others = logits.scatter(1, y.unsqueeze(1), float("-inf"))
    return others.amax(1) - logits.gather(1, y.unsqueeze(1)).squeeze(1)


class Objective:
    """What an attack asks of the model: logits, the summed loss's input gradient, success, objective."""

    def __init__(self, model, loss: str, targeted: bool, amp_dtype, device_type: str):
        self.model, self.loss, self.targeted = model, loss, targeted
        self.amp_dtype, self.device_type = amp_dtype, device_type

    def logits(self, x):
        if self.amp_dtype is None:
            return self.model(x)
        with torch.autocast(self.device_type, dtype=self.amp_dtype):
            return self.model(x)

    def grad(self, x_adv, y):
        """(d sum_i loss_i / d x_adv, detached logits). Makes x_adv require grad; the sum keeps each
        sample's gradient independent of the batch size. The backward runs outside autocast."""
        with torch.enable_grad():
            x_adv.requires_grad_(True)
            logits = self.logits(x_adv)
            loss = per_sample_loss(logits, y, self.loss).sum()
            # A model whose output ignores its input (constant logits: the loss needs no grad at all, or
            # x_adv is not in its graph) has no gradient: nothing to follow, so nothing moves.
            g = torch.autograd.grad(loss, x_adv, allow_unused=True)[0] if loss.requires_grad else None
        return (torch.zeros_like(x_adv) if g is None else g), logits.detach()

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

    def success(self, logits, y):
        pred = logits.argmax(1)
        return pred == y if self.targeted else pred != y

    def objective(self, logits, y):
        """What the attack maximizes, per sample: the loss, or minus the loss towards the target."""
        loss = per_sample_loss(logits, y, self.loss)
        return -loss if self.targeted else loss


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


def setup(model, x, y, eps, targeted, clip_min, clip_max, loss, amp):
    x, y = _args.check_xy(x, y)
    eps = _args.check_budget(eps, "eps", x)
    lo, hi = _args.check_bounds(clip_min, clip_max)
    obj = Objective(model, _args.check_loss(loss), bool(targeted), _args.amp_dtype(amp, x.device.type),
                    x.device.type)
    return x, y, eps, lo, hi, obj


def _rows(t, index):
    return t.index_select(0, index) if isinstance(t, torch.Tensor) else t


def _iterate(obj, x, y, x_adv, alpha, eps, steps, lo, hi, on_step=None):
    """``steps`` fused PGD steps from ``x_adv``; ``on_step(logits)`` sees each step's logits (at the point
    before the step), for callers that record the trajectory."""
    for _ in range(steps):
        grad, logits = obj.grad(x_adv, y)
        if on_step is not None:
            on_step(logits)
        x_adv = x_adv.detach()
        ops.linf_step_(x_adv, grad, x, alpha, eps, lo, hi)
    return x_adv


def _iterate_early_stop(obj, x, y, x_adv, alpha, eps, steps, lo, hi, rows, out, done):
    """:func:`_iterate`, but a sample leaves the batch at the first iterate that fools the model: that
    iterate goes to ``out[row]`` and ``done[row]`` is set. Returns the rows still running, their x, y and
    last (unchecked) iterate."""
    for _ in range(steps):
        grad, logits = obj.grad(x_adv, y)
        x_adv = x_adv.detach()
        hit = obj.confirmed(x_adv, y, obj.success(logits, y))
        keep = (~hit).nonzero().squeeze(1)  # the host sync early stop needs, once per step (twice with amp)
        if keep.numel() < rows.numel():
            fooled = hit.nonzero().squeeze(1)
            fooled_rows = rows.index_select(0, fooled)
            out.index_copy_(0, fooled_rows, x_adv.index_select(0, fooled))
            done.index_fill_(0, fooled_rows, True)
            rows, x, y, x_adv, grad = (t.index_select(0, keep) for t in (rows, x, y, x_adv, grad))
            alpha, eps = _rows(alpha, keep), _rows(eps, keep)
            if rows.numel() == 0:
                break
        ops.linf_step_(x_adv, grad, x, alpha, eps, lo, hi)
    return rows, x, y, x_adv


def _keep_worst(out, best, done, rows, x_adv, objective, hit):
    """Per sample: keep x_adv if it fools and the kept one does not, or if both do or both do not and
    x_adv's objective is higher. No host sync."""
    was_done, was_best = done[rows], best[rows]
    better = (hit & ~was_done) | ((hit == was_done) & (objective > was_best))
    mask = better.view((-1,) + (1,) * (x_adv.dim() - 1))
    out.index_copy_(0, rows, torch.where(mask, x_adv, out[rows]))
    best.index_copy_(0, rows, torch.where(better, objective.to(best.dtype), was_best))
    done.index_copy_(0, rows, was_done | hit)


def run(model, x, y, *, eps, alpha, steps, random_start, restarts, targeted, early_stop, clip_min, clip_max,
        loss, amp, generator):
    """PGD in full generality; FGSM-RS and BIM are special cases."""
    x, y, eps, lo, hi, obj = setup(model, x, y, eps, targeted, clip_min, clip_max, loss, amp)
    alpha = _args.check_budget(alpha, "alpha", x)
    steps = _args.check_int(steps, "steps", 1)
    restarts = _args.check_int(restarts, "restarts", 1)
    if obj.targeted:
        alpha = -alpha  # the fused step descends for a negative alpha
    if x.shape[0] == 0:
        return x.clone()

    def start(xs, e):
        return ops.linf_random_init(xs, e, lo, hi, generator=generator) if random_start else xs.clone()

    with eval_mode(model):
        if restarts == 1 and not early_stop:
            return _iterate(obj, x, y, start(x, eps), alpha, eps, steps, lo, hi)
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
                xs, ys, a, e = (_rows(t, rows) for t in (x, y, alpha, eps))
                rows, xs, ys, x_adv = _iterate_early_stop(obj, xs, ys, start(xs, e), a, e, steps, lo, hi,
                                                          rows, out, done)
            else:
                x_adv = _iterate(obj, xs, ys, start(xs, e), a, e, steps, lo, hi)
            if restarts == 1:
                out.index_copy_(0, rows, x_adv)
                break
            with torch.no_grad():
                logits = obj.logits(x_adv)
            _keep_worst(out, best, done, rows, x_adv, obj.objective(logits, ys), obj.success(logits, ys))
        return out
