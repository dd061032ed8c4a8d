"""The numbers of a report: robust accuracy, attack success rate, perturbation sizes, robustness margin.

Robust accuracy counts a sample as robust at ε when the model classifies it correctly both clean and under
the attack (the attacker may always leave an image unchanged, so robust accuracy never exceeds clean
accuracy; AutoAttack's convention). The success rate is the fraction of the originally correct samples that
the attack fools: ``(clean_correct - robust) / clean_correct``.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from ..attacks.threats import lp_distance


def perturbation_norms(x_adv: torch.Tensor, x: torch.Tensor):
    """Per-sample L-inf and L2 norms of ``x_adv - x``, in float64."""
    return lp_distance(x_adv, x, float("inf")), lp_distance(x_adv, x, 2.0)


def success_rate(clean_correct: int, robust: int) -> Optional[float]:
    """Fraction of the originally correct samples the attack fools; None when no sample was correct."""
    return (clean_correct - robust) / clean_correct if clean_correct else None


class Tally:
    """Sums over batches for one (attack, ε): robust count, L-inf/L2 perturbation sum and max, and how far
    the perturbations exceed ε in the evaluation's norm."""

    def __init__(self):
        self.n = self.robust = 0
        self.linf_sum = self.l2_sum = self.linf_max = self.l2_max = 0.0
        self.excess = -math.inf  # max over samples of ||delta|| - eps in the evaluation's norm

    def add(self, robust: torch.Tensor, linf: torch.Tensor, l2: torch.Tensor, eps: float, distance: torch.Tensor):
        self.n += robust.numel()
        self.robust += int(robust.sum())
        if linf.numel():
            self.linf_sum += float(linf.sum())
            self.l2_sum += float(l2.sum())
            self.linf_max = max(self.linf_max, float(linf.max()))
            self.l2_max = max(self.l2_max, float(l2.max()))
            self.excess = max(self.excess, float(distance.max()) - eps)

    def summary(self, clean_correct: int) -> dict:
        return {"accuracy": self.robust / self.n, "success_rate": success_rate(clean_correct, self.robust),
                "linf_mean": self.linf_sum / self.n, "linf_max": self.linf_max,
                "l2_mean": self.l2_sum / self.n, "l2_max": self.l2_max}


def robustness_margin(eps: Sequence[float], accuracy: Sequence[float], target: float,
                      clean_accuracy: Optional[float] = None) -> dict:
    """The largest ε at which robust accuracy stays >= ``target``, from an accuracy-vs-ε curve.

    The curve is ``(0, clean_accuracy)`` (when given and 0 is not in ``eps``) followed by the points sorted by
    ε. "Stays" means up to the first point below ``target``. Returns ``{"target", "grid", "interpolated",
    "lower_bound"}``: ``grid`` is the last grid ε before that point, ``interpolated`` the ε where the straight
    line between that grid point and the first one below ``target`` crosses ``target``. When no point falls
    below ``target`` both are the largest ε and ``lower_bound`` is True (the margin is at least that);
    when accuracy at the first point is already below ``target`` both are None.
    """
    if not 0.0 <= target <= 1.0:
        raise ValueError(f"target accuracy must be in [0, 1], got {target!r}")
    if len(eps) != len(accuracy) or not eps:
        raise ValueError(f"eps and accuracy must have the same, non-zero length, got {len(eps)} and {len(accuracy)}")
    points = sorted(zip((float(e) for e in eps), (float(a) for a in accuracy)))
    if clean_accuracy is not None and points[0][0] > 0:
        points.insert(0, (0.0, float(clean_accuracy)))
    result = {"target": float(target), "grid": None, "interpolated": None, "lower_bound": False}
    if points[0][1] < target:
        return result
    for (e0, a0), (e1, a1) in zip(points, points[1:]):
        if a1 < target:
            result["grid"] = e0
            result["interpolated"] = e0 + (a0 - target) / (a0 - a1) * (e1 - e0)
            return result
    result["grid"] = result["interpolated"] = points[-1][0]
    result["lower_bound"] = True
    return result
