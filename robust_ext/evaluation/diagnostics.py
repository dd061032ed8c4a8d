"""Signs that an evaluation's gradient attacks are blunted by gradient masking (Athalye et al. 2018,
"Obfuscated Gradients Give a False Sense of Security"; Carlini et al. 2019, "On Evaluating Adversarial
Robustness"), so that its robust accuracy overstates the model's robustness:

* a single-step attack (FGSM) beats the iterative one (PGD) at the same ε;
* uniform random noise beats PGD at the same ε;
* a fraction of the samples has an all-zero input gradient of the attack loss;
* PGD at a large ε (default half the pixel range: every image can then be turned into the same grey
  image) leaves accuracy well above 0.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional, Sequence, Tuple

import torch

from ..attacks.core import Objective
from ._inputs import eval_mode


class EvaluationWarning(UserWarning):
    """Something in an evaluation makes its numbers less trustworthy."""


class GradientMaskingWarning(EvaluationWarning):
    """A sign of gradient masking: the gradient attacks' robust accuracy is probably too optimistic."""


@dataclass(frozen=True)
class MaskingThresholds:
    """When the checks fire.

    accuracy_tol: FGSM or noise must beat PGD's robust accuracy by more than this (a fraction of the
        samples) and by at least ``min_samples`` samples, so that one unlucky sample does not fire it.
    zero_grad_fraction: more than this fraction of samples with an all-zero input gradient.
    large_eps_accuracy: robust accuracy under PGD at the large ε above this.
    """

    accuracy_tol: float = 0.02
    min_samples: int = 2
    zero_grad_fraction: float = 0.01
    large_eps_accuracy: float = 0.1

    def to_dict(self) -> dict:
        return asdict(self)


def zero_gradient_mask(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per sample: is the input gradient of the cross-entropy loss (the attacks' loss) all zero? A NaN
    gradient counts as zero, as the fused steps treat it. The model runs in eval mode."""
    objective = Objective(model, "ce", False, None, x.device.type)  # the attacks' own input gradient
    with eval_mode(model):
        grad, _, _ = objective.grad(x.detach().clone(), y.to(x.device))
    return (torch.nan_to_num(grad, nan=0.0) == 0).flatten(1).all(1)


def _beats(eps, weak, strong, n, t: MaskingThresholds):
    """The ε at which ``weak`` (e.g. FGSM) has a lower robust accuracy than ``strong`` (PGD) beyond noise."""
    return [e for e, a, b in zip(eps, weak, strong)
            if b - a > t.accuracy_tol and round((b - a) * n) >= t.min_samples]


def _fmt_eps(values) -> str:
    return ", ".join(f"{e:.4g}" for e in values)


def gradient_masking_warnings(eps: Sequence[float], curves: Sequence[Tuple[str, str, Sequence[float]]], n: int,
                              zero_grad_fraction: Optional[float] = None,
                              large_eps: Optional[Tuple[float, float]] = None,
                              thresholds: MaskingThresholds = MaskingThresholds()) -> list:
    """The warnings that fire, as messages.

    eps: the grid; curves: ``(name, kind, robust accuracy per ε)`` per attack; n: the number of samples;
    zero_grad_fraction: fraction of samples with an all-zero input gradient; large_eps: ``(ε, robust
    accuracy under PGD)`` at a large ε.
    """
    messages = []
    pgd = [(name, acc) for name, kind, acc in curves if kind == "pgd"]
    for name, kind, acc in curves:
        if kind not in ("fgsm", "noise"):
            continue
        what = "single-step FGSM" if kind == "fgsm" else "uniform random noise"
        for pgd_name, pgd_acc in pgd:
            hits = _beats(eps, acc, pgd_acc, n, thresholds)
            if hits:
                worst = max(b - a for e, a, b in zip(eps, acc, pgd_acc) if e in hits)
                messages.append(
                    f"gradient masking? {what} ({name!r}) leaves lower robust accuracy than {pgd_name!r} at "
                    f"eps = {_fmt_eps(hits)} (by up to {worst:.1%}): an iterative attack should be at least as "
                    "strong; its gradients are probably uninformative (masked, shattered or saturated).")
    if zero_grad_fraction is not None and zero_grad_fraction > thresholds.zero_grad_fraction:
        messages.append(
            f"gradient masking? {zero_grad_fraction:.1%} of the samples have an all-zero input gradient of the "
            "cross-entropy loss (non-differentiable or saturated layers): gradient attacks cannot move them, "
            "try a gradient-free attack or BPDA.")
    if large_eps is not None:
        e, acc = large_eps
        if not math.isnan(acc) and acc > thresholds.large_eps_accuracy:
            messages.append(
                f"gradient masking? robust accuracy under PGD at the large eps = {e:.4g} is still {acc:.1%}: at "
                "such a budget an attack that follows informative gradients drives accuracy towards 0.")
    return messages
