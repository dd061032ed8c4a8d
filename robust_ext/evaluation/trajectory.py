"""PGD run step by step on the attack core, recording the class probabilities after every step."""
from __future__ import annotations

from typing import Optional

import torch

from ..attacks.checks import check_int
from ..attacks.core import Objective, iterate
from ..attacks.registry import multi_step_alpha
from ..attacks.threats import get_threat
from ._inputs import check_eps, eval_mode


def pgd_trajectory(model, x: torch.Tensor, y: torch.Tensor, *, eps: float, alpha: Optional[float] = None,
                   steps: int = 10, random_start: bool = True, clip_min: float = 0.0,
                   clip_max: float = 1.0, generator: Optional[torch.Generator] = None, norm="linf"):
    """Untargeted PGD under ``norm`` with no early stop, recording ``softmax(model(x_adv))`` at the start point and
    after each step.

    The same update as :func:`robust_ext.attacks.pgd` with ``loss="ce"`` (same random start from
    ``generator``, same summed cross-entropy, same fused step), so the final iterate equals ``pgd(..., early_stop=False)``'s. ``alpha`` defaults
    to ``2.5 * eps / steps``. Returns ``(probs [steps + 1, N, num_classes] float32 on the CPU, x_adv)``.
    """
    eps = check_eps(eps)
    check_int(steps, "steps", 1)
    alpha = multi_step_alpha(eps, {"steps": steps}) if alpha is None else check_eps(alpha, "alpha")
    threat = get_threat(norm)
    x = x.detach()
    y = y.to(x.device)
    probs = []
    objective = Objective(model, "ce", False, None, x.device.type)
    with eval_mode(model):
        x_adv = threat.init(x, eps, clip_min, clip_max, generator=generator) if random_start else x.clone()
        x_adv = iterate(objective, threat, x, y, x_adv, alpha, eps, steps, clip_min, clip_max,
                         on_step=lambda logits: probs.append(logits.float().softmax(1).cpu()))
        with torch.no_grad():
            probs.append(model(x_adv).float().softmax(1).cpu())
    return torch.stack(probs), x_adv
