"""Catastrophic-overfitting guard for fast adversarial training.

FGSM-based training can suddenly lose all robustness to multi-step attacks within an epoch while its
FGSM accuracy keeps rising (Wong, Rice and Kolter 2020, "Fast is better than free", Sec. 5). They watch the
PGD accuracy once per epoch and stop when it drops by more than 0.2 below the best seen so far.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional


def diverged(epoch: int, record: Dict[str, Any]) -> Optional[str]:
    """Why an epoch's record shows a diverged run (a non-finite training loss: the weights are NaN or infinite,
    and every prediction is class 0), or None. Checked for every method, with or without the guard."""
    loss = record.get("train_loss")
    if loss is not None and not math.isfinite(float(loss)):
        return (f"diverged: the training loss is {float(loss)} at epoch {epoch} (a learning rate too high for this "
                f"model?)")
    return None


class CollapseGuard:
    """Watches one robust accuracy per epoch; :meth:`update` returns why the run collapsed, or None.

    Collapse: the accuracy falls more than ``drop`` below the best epoch's, or below ``floor`` (when
    ``floor > 0``) after an epoch had reached the floor. A NaN accuracy (a diverged model) is a collapse.
    """

    def __init__(self, drop: float = 0.2, floor: float = 0.0):
        self.drop, self.floor = float(drop), float(floor)
        self.best = -math.inf
        self.best_epoch: Optional[int] = None

    def update(self, epoch: int, robust_acc: float) -> Optional[str]:
        acc = float(robust_acc)
        if math.isnan(acc):
            return f"catastrophic overfitting: robust accuracy is NaN at epoch {epoch}"
        if acc > self.best:
            self.best, self.best_epoch = acc, epoch
            return None
        if self.best - acc > self.drop:
            return (f"catastrophic overfitting: robust accuracy fell from {self.best:.4f} (epoch {self.best_epoch}) "
                    f"to {acc:.4f} (epoch {epoch}), more than guard_drop={self.drop}")
        if self.floor > 0 and self.best >= self.floor > acc:
            return (f"catastrophic overfitting: robust accuracy fell to {acc:.4f} at epoch {epoch}, below "
                    f"guard_floor={self.floor} (best {self.best:.4f} at epoch {self.best_epoch})")
        return None

    def state_dict(self) -> Dict[str, Any]:
        return {"best": None if self.best == -math.inf else self.best, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.best = -math.inf if state["best"] is None else float(state["best"])
        self.best_epoch = state["best_epoch"]
