"""What :func:`robust_ext.training.train` returns."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional


@dataclass
class TrainResult:
    """What :func:`train` did. ``history``: one dict per epoch (also the ``"epoch"`` lines of the log):
    ``epoch``, ``lr`` (of the epoch's last step), ``train_loss`` (the optimized loss), ``train_acc`` (on the
    examples trained on: adversarial ones for fgsm_rs/pgd), ``train_clean_acc`` (when mixing), ``test_loss``,
    ``test_acc``, ``robust_acc`` (PGD-eval_steps at ``robust_eps``), ``robust_on`` ("test" or "train"), ``train_time_s``,
    ``images_per_s`` (training images of all processes per second of training), ``eval_time_s``,
    ``collapsed``. Best is by ``robust_acc`` when it is measured, else ``test_acc``, else there is none.
    After a catastrophic-overfitting stop the model holds the best epoch's weights; otherwise the last's."""

    history: List[Dict[str, Any]]
    epochs_completed: int
    best_metric: Optional[str] = None
    best_epoch: Optional[int] = None
    best_value: Optional[float] = None
    stopped_early: bool = False
    stop_reason: Optional[str] = None
    last_path: Optional[Path] = None
    best_path: Optional[Path] = None
    log_path: Optional[Path] = None
    plot_path: Optional[Path] = None
    resumed_from: Optional[Path] = None

    @property
    def final(self) -> Dict[str, Any]:
        return self.history[-1] if self.history else {}
