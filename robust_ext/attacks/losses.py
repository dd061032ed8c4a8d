"""The attack objectives: a registry of per-sample losses an attack ascends.

Each :class:`Loss` maps float32 logits ``[N, C]``, the labels ``y`` ``[N]`` and, for a loss that needs
one, a target class per sample to a per-sample loss ``[N]``: larger is more adversarial. An attack called
with ``targeted=True`` and a loss without a target of its own (CE, margin) treats ``y`` as the target and
descends that loss (it maximizes ``-loss``).

* ``"ce"``: cross-entropy.
* ``"margin"``: ``max_{j != y} z_j - z_y`` (Carlini & Wagner 2017): > 0 exactly when the model is fooled.
* ``"dlr"``: the Difference of Logits Ratio (Croce & Hein 2020), ``-(z_y - max_{j != y} z_j) /
  (z_pi1 - z_pi3 + 1e-12)`` with ``z_pi1 >= z_pi2 >= ...`` the sorted logits: invariant to shifting and
  scaling the logits. Needs at least 3 classes.
* ``"dlr_targeted"``: ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12)`` towards the target ``t``
  (APGD-T). Needs at least 4 classes.

Register a loss of your own with :func:`register_loss`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

__all__ = ["Loss", "LOSSES", "register_loss", "get_loss", "per_sample_loss"]


@dataclass(frozen=True)
class Loss:
    """``fn(logits, y, target) -> [N]``; ``needs_target``: it takes the target class itself (APGD-T's
    losses) instead of being descended towards ``y``; ``min_classes``: the fewest classes it is defined for."""

    name: str
    fn: Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]
    needs_target: bool = False
    min_classes: int = 2


def _ce(logits, y, target=None):
    return F.cross_entropy(logits, y, reduction="none")


def _others_max(logits, y):
    return logits.scatter(1, y.unsqueeze(1), float("-inf")).amax(1)


def _margin(logits, y, target=None):
    return _others_max(logits, y) - logits.gather(1, y.unsqueeze(1)).squeeze(1)


def _dlr(logits, y, target=None):
    top = logits.topk(3, dim=1).values
    return -(logits.gather(1, y.unsqueeze(1)).squeeze(1) - _others_max(logits, y)) / (top[:, 0] - top[:, 2] + 1e-12)


def _dlr_targeted(logits, y, target):
    top = logits.topk(4, dim=1).values
    z_y = logits.gather(1, y.unsqueeze(1)).squeeze(1)
    z_t = logits.gather(1, target.unsqueeze(1)).squeeze(1)
    return -(z_y - z_t) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12)


LOSSES: Dict[str, Loss] = {}


def register_loss(loss: Loss) -> Loss:
    """Add ``loss`` to :data:`LOSSES` under its name (an existing name is an error)."""
    if not isinstance(loss, Loss):
        raise TypeError(f"loss must be a robust_ext.attacks.losses.Loss, got {type(loss).__name__}")
    if loss.name in LOSSES:
        raise ValueError(f"a loss named {loss.name!r} is already registered")
    LOSSES[loss.name] = loss
    return loss


for _loss in (Loss("ce", _ce), Loss("margin", _margin), Loss("dlr", _dlr, min_classes=3),
              Loss("dlr_targeted", _dlr_targeted, needs_target=True, min_classes=4)):
    register_loss(_loss)


def get_loss(loss) -> Loss:
    """A registered :class:`Loss` by name, or a Loss instance as it is."""
    if isinstance(loss, Loss):
        return loss
    if not isinstance(loss, str) or loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(map(repr, LOSSES))} or a Loss, got {loss!r}")
    return LOSSES[loss]


def per_sample_loss(logits: torch.Tensor, y: torch.Tensor, loss="ce", target: Optional[torch.Tensor] = None):
    """``loss`` of each row of ``logits`` (computed in float32 for half-precision logits)."""
    loss = get_loss(loss)
    if logits.dim() != 2:
        raise ValueError(f"model must return logits of shape [N, num_classes], got {list(logits.shape)}")
    if logits.shape[1] < loss.min_classes:
        raise ValueError(f"loss {loss.name!r} needs at least {loss.min_classes} classes, the model returns "
                         f"{logits.shape[1]}")
    if loss.needs_target and target is None:
        raise ValueError(f"loss {loss.name!r} needs a target class per sample")
    # Without a host sync (at once on the CPU, at the next sync on a GPU), instead of an IndexError deep in
    # the loss: labels must name one of the model's classes.
    torch._assert_async((y < logits.shape[1]).all(), f"labels must be < the model's {logits.shape[1]} classes")
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return loss.fn(logits, y, target)
