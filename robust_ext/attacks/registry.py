"""One registry of the named attacks: name -> functional attack, its defaults, its step-size rule, the threat
models it supports and whether training can use it. The evaluation (:mod:`robust_ext.evaluation.specs`), the
training recipe (:class:`robust_ext.training.TrainConfig`), the training loop and the CLI's ``choices``
all read it; a new attack is its file plus one :func:`register_attack` call.
"""
from __future__ import annotations

import inspect
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from . import checks
from .apgd import apgd, apgd_t
from .fab import fab, fab_t
from .fgsm import FGSM_RS_ALPHA, fgsm, fgsm_rs
from .noise import noise
from .pgd import bim, pgd
from .square import square
from .threats import NORMS, get_threat

__all__ = ["AttackEntry", "ATTACKS", "register_attack", "get_attack", "attack_names", "ALPHA_FACTOR",
           "multi_step_alpha"]

ALPHA_FACTOR = 2.5  # Madry et al.'s step: 2.5 eps / steps reaches the ball's edge from anywhere in it


def multi_step_alpha(eps, params):
    """The default step of an iterative attack: ``2.5 * eps / steps`` (any norm)."""
    return eps * (ALPHA_FACTOR / params["steps"])


def _single_step_alpha(eps, params):
    return FGSM_RS_ALPHA * eps


@dataclass(frozen=True)
class AttackEntry:
    """A named attack.

    fn: ``fn(model, x, y, *, eps, norm, clip_min, clip_max, [generator,] **params) -> x_adv``.
    defaults: every hyper-parameter ``fn`` takes beyond those, with its default for an evaluation.
    alpha_rule: ``alpha_rule(eps, params)``, the step size when ``params["alpha"]`` is None.
    norms: the threat-model names it supports (a user-defined ThreatModel instance is always passed through).
    training: a training method can generate its examples (``TrainConfig(method=name)``).
    summary: one line for ``--help`` and the docs.
    """

    name: str
    fn: Callable
    defaults: Dict[str, Any] = field(default_factory=dict)
    alpha_rule: Optional[Callable[[Any, Dict[str, Any]], Any]] = None
    norms: Tuple[str, ...] = tuple(NORMS)
    training: bool = False
    summary: str = ""

    @property
    def random(self) -> bool:
        return "generator" in inspect.signature(self.fn).parameters

    def check_norm(self, norm):
        threat = get_threat(norm)
        if threat.name in NORMS and threat.name not in self.norms:
            raise ValueError(f"attack {self.name!r} does not support norm {threat.name!r}; it supports "
                             f"{', '.join(map(repr, self.norms))}")
        return threat

    def params(self, **overrides) -> Dict[str, Any]:
        """The defaults with ``overrides`` applied and checked (an unknown name is an error naming it)."""
        unknown = sorted(set(overrides) - set(self.defaults))
        if unknown:
            raise ValueError(f"unknown parameter(s) {unknown} for attack {self.name!r}; it takes "
                             f"{sorted(self.defaults)}")
        p = {**self.defaults, **overrides}
        for key in ("steps", "restarts", "draws"):
            if key in p:
                checks.check_int(p[key], f"{self.name}: {key}", 1)
        alpha = p.get("alpha")
        if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not alpha >= 0):
            raise ValueError(f"{self.name}: alpha must be None (the default rule) or a float >= 0, got {alpha!r}")
        if "loss" in p:
            try:
                checks.check_loss(p["loss"])
            except ValueError as e:
                raise ValueError(f"{self.name}: {e}") from None
        return p

    def alpha(self, eps, params):
        """``params["alpha"]``, or the default rule's step for ``eps`` (a float or per-sample tensor)."""
        if params.get("alpha") is not None or self.alpha_rule is None:
            return params.get("alpha")
        eps = checks.check_scalar_budget(eps, "eps")  # e.g. 10**400: the eps's error, not the product's
        alpha = self.alpha_rule(eps, params)
        if not isinstance(alpha, torch.Tensor) and not alpha <= checks.MAX_BUDGET:
            raise ValueError(f"eps={eps:.4g} makes {self.name}'s default step {alpha:.4g}, beyond float32's range: "
                             f"pass a smaller eps, or alpha")
        return alpha

    def __call__(self, model, x, y, eps, *, norm="linf", clip_min=0.0, clip_max=1.0, generator=None, **params):
        """Run the attack with ``params`` (checked, defaults filled) at budget ``eps``."""
        threat = self.check_norm(norm)
        p = self.params(**params)
        if "alpha" in p:
            p["alpha"] = self.alpha(eps, p)
        if self.random:
            p["generator"] = generator
        return self.fn(model, x, y, eps=eps, norm=threat, clip_min=clip_min, clip_max=clip_max, **p)


ATTACKS: Dict[str, AttackEntry] = {}


def register_attack(entry: AttackEntry) -> AttackEntry:
    if not isinstance(entry, AttackEntry):
        raise TypeError(f"entry must be an AttackEntry, got {type(entry).__name__}")
    if entry.name in ATTACKS:
        raise ValueError(f"an attack named {entry.name!r} is already registered")
    ATTACKS[entry.name] = entry
    return entry


def get_attack(name: str) -> AttackEntry:
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; known attacks: {', '.join(ATTACKS)}")
    return ATTACKS[name]


def attack_names(training: bool = False) -> Tuple[str, ...]:
    """Every registered name, or those a training method can use."""
    return tuple(n for n, e in ATTACKS.items() if e.training or not training)


for _entry in (
    AttackEntry("fgsm", fgsm, {"loss": "ce", "amp": False},
                summary="one gradient step of size eps (L-inf FGSM, L2 FGM)"),
    AttackEntry("fgsm_rs", fgsm_rs, {"alpha": None, "loss": "ce", "amp": False}, _single_step_alpha,
                training=True, summary="FGSM from a random start, step 1.25 eps (Wong et al. 2020)"),
    AttackEntry("bim", bim, {"steps": 10, "alpha": None, "loss": "ce", "amp": False}, multi_step_alpha,
                summary="iterative FGSM from the clean image, step 2.5 eps / steps"),
    AttackEntry("pgd", pgd, {"steps": 10, "alpha": None, "random_start": True, "restarts": 1, "early_stop": True,
                             "loss": "ce", "amp": False}, multi_step_alpha, training=True,
                summary="PGD from a random start, step 2.5 eps / steps, early stop"),
    AttackEntry("noise", noise, {"draws": 1}, summary="uniform random noise in the eps-ball (a sanity baseline)"),
    AttackEntry("apgd", apgd, {"steps": 100, "restarts": 1, "loss": "ce", "rho": 0.75, "early_stop": True,
                               "amp": False},
                summary="APGD (Croce & Hein 2020): step 2 eps halved at checkpoints when the loss stalls, momentum "
                        "0.75, 100 steps; loss ce (APGD-CE) or dlr (APGD-DLR)"),
    AttackEntry("apgd_t", apgd_t, {"steps": 100, "restarts": 1, "n_target_classes": 9, "loss": "dlr_targeted",
                                   "rho": 0.75, "early_stop": True, "amp": False, "target_order": "logits",
                                   "malt_candidates": 9},
                summary="APGD-T (Croce & Hein 2020): APGD on the targeted DLR loss towards each of the 9 most "
                        "likely other classes"),
    AttackEntry("fab", fab, {"steps": 100, "restarts": 1, "alpha_max": 0.1, "eta": 1.05, "beta": 0.9,
                             "early_stop": True, "final_search": True},
                summary="FAB (Croce & Hein 2020): minimal adversarial examples by projections onto the linearized "
                        "boundary; fooled when found within eps"),
    AttackEntry("fab_t", fab_t, {"steps": 100, "restarts": 1, "n_target_classes": 9, "alpha_max": 0.1, "eta": 1.05,
                                 "beta": 0.9, "early_stop": True, "final_search": True},
                summary="FAB-T (Croce & Hein 2020): FAB towards each of the 9 most likely other classes"),
    AttackEntry("square", square, {"n_queries": 5000, "p_init": 0.8, "rescale_schedule": True, "loss": "margin",
                                   "restarts": 1, "early_stop": True, "amp": False}, norms=("linf", "l2"),
                summary="Square Attack (Andriushchenko et al. 2020): score-based random search over square windows, "
                        "5000 queries, margin loss; reads only the logits"),
):
    register_attack(_entry)
