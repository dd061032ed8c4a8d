"""Standard, FGSM-RS ("fast", Wong et al. 2020) and PGD (Madry et al. 2018) adversarial training.

>>> from robust_ext.training import TrainConfig, train
>>> result = train(model, train_set, test_set, TrainConfig(method="fgsm_rs", eps=0.1, epochs=5, out_dir="runs/a"))
>>> result.history[-1]["robust_acc"], result.best_path

One epoch-level record per epoch in ``result.history`` and in ``out_dir/metrics.jsonl``; curves in
``out_dir/curves.png``; ``out_dir/last.pt`` (exact resume with ``resume=True``) and ``out_dir/best.pt`` (by
robust accuracy), both loadable with :func:`robust_ext.models.load_model`. Multi-process under torchrun.
"""
from .config import METHODS, OPTIMIZERS, SCHEDULERS, TrainConfig
from .guard import CollapseGuard
from .loop import train
from .monitor import plot_curves, read_metrics
from .result import TrainResult

__all__ = ["train", "TrainConfig", "TrainResult", "CollapseGuard", "plot_curves", "read_metrics", "METHODS",
           "OPTIMIZERS", "SCHEDULERS"]
