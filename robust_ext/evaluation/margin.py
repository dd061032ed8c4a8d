"""Each sample's minimal fooling ε, by bisection on a per-sample ε tensor: every sample of a batch bisects in
parallel, one attack call per bisection step."""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from ._inputs import check_eps, eval_mode, predict
from .specs import resolve_attack


def bisection_steps(eps_max: float, tol: float) -> int:
    """Halvings that shrink [0, eps_max] to a bracket no wider than ``tol``."""
    return max(0, math.ceil(math.log2(eps_max / tol)))


def minimal_eps(model, x: torch.Tensor, y: torch.Tensor, *, eps_max: float, tol: Optional[float] = None,
                attack="pgd", clip_min: float = 0.0, clip_max: float = 1.0,
                generator: Optional[torch.Generator] = None, norm="linf") -> torch.Tensor:
    """Per sample, the smallest ε in ``(0, eps_max]`` at which ``attack`` fools the model under ``norm``, to
    within ``tol``.

    ``attack``: a name or an :class:`~robust_ext.evaluation.AttackSpec` that takes per-sample ε (the named
    attacks do; default PGD with its defaults). Returns float64 ``[N]`` on x's device:

    * 0 for a sample the model misclassifies clean;
    * ``inf`` for a sample the attack does not fool at ``eps_max``;
    * otherwise ``hi`` of the final bracket ``(lo, hi]``: the attack found an adversarial example at ``hi``
      (so the true minimal ε is at most ``hi``) and failed at ``lo >= hi - tol`` (which bounds only this
      attack: a stronger one may succeed below ``lo``).

    ``tol`` defaults to ``eps_max / 256``; the bisection takes ``ceil(log2(eps_max / tol))`` attack calls
    after the one at ``eps_max``.
    """
    spec = resolve_attack(attack)
    if not spec.per_sample_eps:
        raise ValueError(f"minimal_eps needs an attack that takes per-sample eps (a named attack), got {spec.name!r}")
    eps_max = check_eps(eps_max, "eps_max", positive=True)
    tol = eps_max / 256 if tol is None else check_eps(tol, "tol", positive=True)
    y = y.to(x.device)
    out = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    with eval_mode(model):
        rows = (predict(model, x) == y).nonzero().squeeze(1)
        if rows.numel() == 0:
            return out
        xs, ys = x.index_select(0, rows), y.index_select(0, rows)
        hi = torch.full((rows.numel(),), eps_max, dtype=torch.float64, device=x.device)

        def fooled(eps):
            x_adv = spec(model, xs, ys, eps, norm=norm, clip_min=clip_min, clip_max=clip_max, generator=generator)
            return predict(model, x_adv) != ys

        reached = fooled(hi)
        out.index_fill_(0, rows[~reached], math.inf)
        rows, xs, ys, hi = rows[reached], xs[reached], ys[reached], hi[reached]
        lo = torch.zeros_like(hi)
        for _ in range(bisection_steps(eps_max, tol) if rows.numel() else 0):
            mid = (lo + hi) / 2
            hit = fooled(mid)
            hi = torch.where(hit, mid, hi)
            lo = torch.where(hit, lo, mid)
        out.index_copy_(0, rows, hi)
    return out


def summarize_minimal_eps(values: np.ndarray, clean_correct: np.ndarray, eps_max: float, tol: float,
                          attack: dict) -> dict:
    """Median and mean over the originally correct samples (the mean over the finite ones, i.e. the fooled
    ones, since the others are inf), the fraction fooled within eps_max, and every per-sample value."""
    correct = values[clean_correct]
    finite = correct[np.isfinite(correct)]
    return {"attack": attack, "eps_max": eps_max, "tol": tol, "n_correct": int(correct.size),
            "median": float(np.median(correct)) if correct.size else None,
            "mean_fooled": float(finite.mean()) if finite.size else None,
            "fooled_fraction": float(finite.size / correct.size) if correct.size else None,
            "values": [float(v) for v in values]}
