"""The training recipe: :class:`TrainConfig`, checked when it is built; every error names the field."""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch

from ..attacks.checks import MAX_BUDGET, amp_dtype, check_bounds, check_int, shown
from ..attacks.registry import attack_names, get_attack, multi_step_alpha
from ..attacks.threats import NORMS



def methods():
    """"standard", then every registered attack that can generate training examples (fgsm_rs, pgd, and any
    registered later with ``training=True``)."""
    return ("standard",) + attack_names(training=True)


METHODS = methods()  # the built-in ones, at import
OPTIMIZERS = ("adam", "sgd")
SCHEDULERS = ("none", "cosine", "onecycle", "cyclic")

# Fields that shape the trajectory: resuming with other values would not continue the same run.
TRAJECTORY_FIELDS = ("method", "batch_size", "lr", "optimizer", "momentum", "weight_decay", "scheduler", "eps",
                     "alpha", "pgd_steps", "norm", "mix_ratio", "amp", "channels_last", "fuse", "seed", "drop_last", "clip_min",
                     "clip_max", "eval_eps", "eval_alpha", "eval_steps", "eval_samples", "guard", "guard_drop",
                     "guard_floor")


@dataclass(frozen=True)
class TrainConfig:
    """How :func:`robust_ext.training.train` trains.

    Method:
        method: ``"standard"``; ``"fgsm_rs"``: FGSM with a random start, "fast" adversarial training (Wong,
            Rice and Kolter 2020, "Fast is better than free"); ``"pgd"``: PGD adversarial training (Madry et
            al. 2018), ``pgd_steps`` steps of ``alpha`` from a random start.
        norm: the training attack's threat model, ``"linf"`` (default) or ``"l2"``; the per-epoch robust
            evaluation uses it too.
        eps: radius of the training attack in ``norm``, in image units (required for fgsm_rs and pgd).
        alpha: attack step; default the attack registry's rule: ``1.25 * eps`` for fgsm_rs (Wong et al.),
            ``2.5 * eps / pgd_steps`` for pgd.
        mix_ratio: weight ``r`` of the adversarial loss: ``loss = (1 - r) * CE(clean) + r * CE(adversarial)``,
            each the batch mean (Goodfellow et al. 2015's mixed objective; MATLAB's adversarial-training
            example retrains on a clean/adversarial mix). Default 1.0: adversarial examples only. With
            ``0 < r < 1`` the clean and adversarial halves go through the model as one batch of 2N, so a
            BatchNorm layer normalizes them together.
        clip_min, clip_max: the image range the attack keeps to.
    Optimization:
        epochs, batch_size (the global batch: split evenly over the processes of a distributed run),
        lr (the peak learning rate of a schedule), optimizer (``"adam"`` | ``"sgd"``), momentum (sgd),
        weight_decay, scheduler: ``"none"``, ``"cosine"`` (to 0 over the run), ``"onecycle"``
        (torch's OneCycleLR), ``"cyclic"`` (Wong et al.'s triangle: 0 -> lr at 40% of the run -> 0); every
        schedule steps per batch. drop_last: drop each epoch's last, partial batch.
        amp: ``False``; ``True`` (bfloat16 autocast on CPU, float16 with a GradScaler on CUDA); or the dtype.
            The attacks and the per-epoch evaluation run under the same autocast.
        channels_last: train in the channels-last memory format (faster convolutions on CPU with bf16).
        fuse: the attacks (training examples and the robust evaluation) run on
            :func:`robust_ext.fuse.fuse` of the model: its ReLU + max-pool and BatchNorm + ReLU on the fused
            layers, the same parameters (training itself runs the model as written).
    Evaluation and the catastrophic-overfitting guard (once per epoch, after training):
        eval_eps: radius of the robust evaluation; default ``eps`` (no robust evaluation when both are unset
            or 0). eval_steps, eval_alpha (default ``2.5 * eval_eps / eval_steps``): PGD with a random start
            from a seed fixed for the run, so every epoch attacks from the same starts.
        eval_samples: images attacked: the first ones of the test set, or, without a test set, a fixed
            seeded subset of the training set (Wong et al. watch a training batch).
        guard: stop when the robust accuracy collapses; default on for fgsm_rs. guard_drop: collapse when
            the accuracy falls more than this below the best epoch's (0.2 as Wong et al.); guard_floor:
            collapse when it falls below this after having reached it (0 disables).
    Run:
        seed: data order (a permutation per epoch from ``seed + epoch``, as DistributedSampler), the attacks'
            random starts and the evaluation. The global RNGs (torch, numpy, random) are not reseeded; they
            are saved in checkpoints and restored on resume.
        out_dir: where ``last.pt``, ``best.pt``, ``metrics.jsonl`` and ``curves.png`` go; ``None`` writes
            nothing (no checkpoints, no resume).
        log_every: also log one line every N batches (0: per epoch only). progress: a tqdm bar (default:
            when stderr is a terminal). plot: write ``curves.png`` each epoch.
        threads: ``torch.set_num_threads`` for the run (``None`` leaves it). num_workers: DataLoader workers
            for datasets that are not in-memory tensors. device: default the model's device (under
            torchrun with CUDA, ``cuda:LOCAL_RANK``).
    """

    method: str = "standard"
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    scheduler: str = "none"
    drop_last: bool = False
    eps: Optional[float] = None
    alpha: Optional[float] = None
    pgd_steps: int = 10
    norm: str = "linf"
    mix_ratio: Optional[float] = None
    clip_min: float = 0.0
    clip_max: float = 1.0
    amp: Union[bool, torch.dtype] = False
    channels_last: bool = False
    fuse: bool = False
    eval_eps: Optional[float] = None
    eval_steps: int = 10
    eval_alpha: Optional[float] = None
    eval_samples: int = 512
    guard: Optional[bool] = None
    guard_drop: float = 0.2
    guard_floor: float = 0.0
    seed: int = 0
    out_dir: Optional[Union[str, Path]] = None
    log_every: int = 0
    progress: Optional[bool] = None
    plot: bool = True
    threads: Optional[int] = None
    num_workers: int = 0
    device: Optional[Union[str, torch.device]] = None

    def __post_init__(self):
        _choice(self.method, "method", methods())
        _choice(self.optimizer, "optimizer", OPTIMIZERS)
        _choice(self.scheduler, "scheduler", SCHEDULERS)
        _choice(self.norm, "norm", tuple(NORMS))
        check_int(self.epochs, "epochs", 1)
        check_int(self.batch_size, "batch_size", 1)
        check_int(self.pgd_steps, "pgd_steps", 1)
        check_int(self.eval_steps, "eval_steps", 1)
        check_int(self.eval_samples, "eval_samples", 0)
        check_int(self.seed, "seed", 0)
        check_int(self.log_every, "log_every", 0)
        check_int(self.num_workers, "num_workers", 0)
        if self.threads is not None:
            check_int(self.threads, "threads", 1)
        _real(self.lr, "lr", low=0.0, strict=True)
        _real(self.momentum, "momentum", low=0.0, high=1.0)
        _real(self.weight_decay, "weight_decay", low=0.0)
        _real(self.guard_drop, "guard_drop", low=0.0, high=1.0)
        _real(self.guard_floor, "guard_floor", low=0.0, high=1.0)
        for name in ("eps", "alpha", "eval_eps", "eval_alpha"):
            if getattr(self, name) is not None:
                _real(getattr(self, name), name, low=0.0, high=MAX_BUDGET)
        _real(self.clip_min, "clip_min")
        _real(self.clip_max, "clip_max")
        check_bounds(self.clip_min, self.clip_max)
        for name in ("drop_last", "channels_last", "plot", "fuse"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name in ("guard", "progress"):
            if getattr(self, name) not in (None, True, False):
                raise ValueError(f"{name} must be None, True or False, got {getattr(self, name)!r}")
        if not (self.amp is True or self.amp is False or self.amp in (torch.float16, torch.bfloat16)):
            raise ValueError(f"amp must be False, True, torch.bfloat16 or torch.float16, got {self.amp!r}")
        if self.out_dir is not None and not isinstance(self.out_dir, (str, Path)):
            raise ValueError(f"out_dir must be a path or None, got {type(self.out_dir).__name__}")
        if self.device is not None:
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError) as e:
                raise ValueError(f"device must name a torch device, got {self.device!r}: {e}") from None

        adversarial = self.method != "standard"
        if adversarial and not self.eps:
            raise ValueError(f"eps must be set to a value > 0 for method {self.method!r}, got {self.eps!r}")
        if not adversarial:
            for name in ("alpha", "mix_ratio"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} applies to adversarial training only; method is 'standard'")
        if self.mix_ratio is not None:
            _real(self.mix_ratio, "mix_ratio", low=0.0, high=1.0)
        if self.guard and not self.robust_eval:
            raise ValueError("guard needs a robust evaluation: set eval_eps (or eps) > 0 and eval_samples > 0")

    # ------------------------------------------------------------------ resolved values
    @property
    def adversarial(self) -> bool:
        return self.method != "standard"

    @property
    def attack_alpha(self) -> Optional[float]:
        if not self.adversarial:
            return self.alpha
        return get_attack(self.method).alpha(self.eps, {"alpha": self.alpha, "steps": self.pgd_steps})

    @property
    def adv_weight(self) -> float:
        if not self.adversarial:
            return 0.0
        return 1.0 if self.mix_ratio is None else float(self.mix_ratio)

    @property
    def robust_eps(self) -> float:
        return float(self.eval_eps if self.eval_eps is not None else (self.eps or 0.0))

    @property
    def robust_alpha(self) -> float:
        if self.eval_alpha is not None:
            return float(self.eval_alpha)
        return multi_step_alpha(self.robust_eps, {"steps": self.eval_steps})

    @property
    def robust_eval(self) -> bool:
        return self.robust_eps > 0 and self.eval_samples > 0

    @property
    def guard_on(self) -> bool:
        return self.guard if self.guard is not None else (self.method == "fgsm_rs" and self.robust_eval)

    def amp_dtype(self, device_type: str) -> Optional[torch.dtype]:
        return amp_dtype(self.amp, device_type)  # the attacks' mapping: the same dtype for both

    def to_dict(self) -> Dict[str, Any]:
        """The fields as plain values (what a checkpoint loadable with weights_only=True may hold)."""
        d = dataclasses.asdict(self)
        d["out_dir"] = None if self.out_dir is None else str(self.out_dir)
        d["device"] = None if self.device is None else str(self.device)
        return d

    def to_json(self) -> Dict[str, Any]:
        d = self.to_dict()
        d["amp"] = str(self.amp) if isinstance(self.amp, torch.dtype) else self.amp
        return d


def _choice(value, name, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def _real(value, name, low=None, high=None, strict=False):
    try:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    except OverflowError:  # an int too large for a float
        ok = False
    if ok and low is not None:
        ok = value > low if strict else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        rng = "" if low is None else (f" > {low}" if strict else f" >= {low}")
        rng += "" if high is None else f" and <= {high}"
        raise ValueError(f"{name} must be a finite number{rng}, got {shown(value)}")


def resolve(config: Optional[TrainConfig], overrides: Dict[str, Any]) -> TrainConfig:
    """``config`` with ``overrides`` applied (an unknown name is an error naming it)."""
    if config is not None and not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"unknown TrainConfig field(s) {unknown}; known: {', '.join(sorted(known))}")
    return dataclasses.replace(config, **overrides) if config is not None else TrainConfig(**overrides)
