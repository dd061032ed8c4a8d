"""Uniform random noise in the eps-ball: the sanity baseline a gradient attack must beat (Carlini et al.
2019, "On Evaluating Adversarial Robustness")."""
from __future__ import annotations

import torch

from . import checks, core

__all__ = ["noise"]


def noise(model, x, y, *, eps, draws=1, clip_min=0.0, clip_max=1.0, generator=None, norm="linf"):
    """A uniform random point of the ``norm`` ball (the threat model's random start); with ``draws > 1`` a
    sample keeps the first draw that fools the model (one forward per extra draw)."""
    x, y, eps, lo, hi, obj, threat = core.setup(model, x, y, eps, False, clip_min, clip_max, "ce", False, norm)
    draws = checks.check_int(draws, "draws", 1)
    x_adv = threat.init(x, eps, lo, hi, generator=generator)
    with core.eval_mode(model):
        for _ in range(draws - 1):
            with torch.no_grad():
                fooled = obj.success(model(x_adv), y)
            if bool(fooled.all()):
                break
            candidate = threat.init(x, eps, lo, hi, generator=generator)
            x_adv = torch.where(fooled.view((-1,) + (1,) * (x.dim() - 1)), x_adv, candidate)
    return x_adv
