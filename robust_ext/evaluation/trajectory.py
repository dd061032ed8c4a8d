"""PGD run step by step on the attacks' own loop, recording the class probabilities after every step."""
from __future__ import annotations

from typing import Optional

import torch

from .. import ops
from ..attacks._args import check_int
from ..attacks._loop import Objective, _iterate
from ._inputs import check_eps, eval_mode
from .specs import ALPHA_FACTOR


def pgd_trajectory(model, x: torch.Tensor, y: torch.Tensor, *, eps: float, alpha: Optional[float] = None,
                   steps: int = 10, random_start: bool = True, clip_min: float = 0.0,
                   clip_max: float = 1.0, generator: Optional[torch.Generator] = None):
    """Untargeted L-inf PGD with no early stop, recording ``softmax(model(x_adv))`` at the start point and
    after each step.

    The same update as :func:`robust_ext.attacks.pgd` with ``loss="ce"`` (same random start from
    ``generator``, same summed cross-entropy, same fused step), so the final iterate equals ``pgd(..., early_stop=False)``'s. ``alpha`` defaults
    to ``2.5 * eps / steps``. Returns ``(probs [steps + 1, N, num_classes] float32 on the CPU, x_adv)``.
    """
    eps = check_eps(eps)
    check_int(steps, "steps", 1)
    alpha = eps * ALPHA_FACTOR / steps if alpha is None else check_eps(alpha, "alpha")
    x = x.detach()
    y = y.to(x.device)
    probs = []
    objective = Objective(model, "ce", False, None, x.device.type)
    with eval_mode(model):
        x_adv = ops.linf_random_init(x, eps, clip_min, clip_max, generator=generator) if random_start else x.clone()
        x_adv = _iterate(objective, x, y, x_adv, alpha, eps, steps, clip_min, clip_max,
                         on_step=lambda logits: probs.append(logits.float().softmax(1).cpu()))
        with torch.no_grad():
            probs.append(model(x_adv).float().softmax(1).cpu())
    return torch.stack(probs), x_adv
