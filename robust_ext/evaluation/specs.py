"""The attacks an evaluation runs: names with defaults, robust_ext/torchattacks attack objects, or callables,
all behind one call ``spec(model, x, y, eps, clip_min=, clip_max=, generator=)``.

Defaults of the named attacks (all L-inf, untargeted, cross-entropy):

* ``"fgsm"``: one signed-gradient step of size ε.
* ``"bim"``: ``steps=10`` steps of ``alpha = 2.5 ε / steps`` from the clean image.
* ``"pgd"``: as BIM from a uniform random start in the ε-ball, ``restarts=1``, with early stop (a sample
  leaves the batch at the first iterate that fools the model: as strong as the last iterate for accuracy,
  and faster).
* ``"noise"``: uniform random noise in the ε-ball (``draws=1``; with more draws a sample counts as fooled
  when any draw fools it), a sanity baseline that a gradient attack should beat.

``make_attack("pgd", steps=50, restarts=3)`` changes them; ``alpha`` set to a float is an absolute step size
used at every ε, ``None`` the 2.5 ε / steps rule.
"""
from __future__ import annotations

import copy
import functools
import numbers
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, Optional

import torch

from .. import attacks as A
from .. import ops
from ..attacks._args import check_int

KINDS = ("fgsm", "bim", "pgd", "noise")
ALPHA_FACTOR = 2.5
_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "fgsm": {"loss": "ce", "amp": False},
    "bim": {"steps": 10, "alpha": None, "loss": "ce", "amp": False},
    "pgd": {"steps": 10, "alpha": None, "random_start": True, "restarts": 1, "early_stop": True, "loss": "ce",
            "amp": False},
    "noise": {"draws": 1},
}
_FUNCTIONAL = {A.fgsm: "fgsm", A.bim: "bim", A.pgd: "pgd"}


@dataclass(frozen=True)
class AttackSpec:
    """One attack of an evaluation. ``name`` labels it in the report; ``kind`` is ``fgsm``, ``bim``,
    ``pgd``, ``noise`` (the gradient-masking checks compare kinds) or ``custom``; ``params`` its
    hyper-parameters as recorded in the report. ``per_sample_eps``: it takes a tensor of per-sample ε."""

    name: str
    kind: str
    params: Dict[str, Any]
    run: Callable = field(repr=False)
    per_sample_eps: bool = False

    def __call__(self, model, x, y, eps, *, clip_min=0.0, clip_max=1.0, generator=None, rebind=False):
        """``x_adv`` for budget ``eps`` (a float, or a per-sample tensor when ``per_sample_eps``).
        ``rebind`` makes an attack object attack ``model`` instead of the model it was built with."""
        return self.run(model, x, y, eps, clip_min, clip_max, generator, rebind)

    def describe(self) -> Dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "params": dict(self.params)}


def _check_params(kind: str, params: Dict[str, Any]) -> Dict[str, Any]:
    unknown = sorted(set(params) - set(_DEFAULTS[kind]))
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown} for attack {kind!r}; it takes {sorted(_DEFAULTS[kind])}")
    p = {**_DEFAULTS[kind], **params}
    for key in ("steps", "restarts", "draws"):
        if key in p:
            check_int(p[key], f"{kind}: {key}", 1)
    alpha = p.get("alpha")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not alpha >= 0):
        raise ValueError(f"{kind}: alpha must be None (2.5 eps / steps) or a float >= 0, got {alpha!r}")
    if "loss" in p and p["loss"] not in A.LOSSES:
        raise ValueError(f"{kind}: loss must be one of {A.LOSSES}, got {p['loss']!r}")
    return p


def _alpha(p, eps):
    return p["alpha"] if p["alpha"] is not None else eps * (ALPHA_FACTOR / p["steps"])


def _noise(model, x, y, eps, lo, hi, generator, draws):
    x_adv = ops.linf_random_init(x, eps, lo, hi, generator=generator)
    for _ in range(draws - 1):
        with torch.no_grad():
            fooled = model(x_adv).argmax(1) != y
        if bool(fooled.all()):
            break
        candidate = ops.linf_random_init(x, eps, lo, hi, generator=generator)
        x_adv = torch.where(fooled.view((-1,) + (1,) * (x.dim() - 1)), x_adv, candidate)
    return x_adv


def _named_runner(kind: str, p: Dict[str, Any]) -> Callable:
    def run(model, x, y, eps, lo, hi, generator, rebind):
        if kind == "noise":
            return _noise(model, x, y.to(x.device), eps, lo, hi, generator, p["draws"])
        common = {"clip_min": lo, "clip_max": hi, "loss": p["loss"], "amp": p["amp"]}
        if kind == "fgsm":
            return A.fgsm(model, x, y, eps=eps, **common)
        if kind == "bim":
            return A.bim(model, x, y, eps=eps, alpha=_alpha(p, eps), steps=p["steps"], **common)
        return A.pgd(model, x, y, eps=eps, alpha=_alpha(p, eps), steps=p["steps"], random_start=p["random_start"],
                     restarts=p["restarts"], early_stop=p["early_stop"], generator=generator, **common)
    return run


def make_attack(kind: str, *, name: Optional[str] = None, **params) -> AttackSpec:
    """A named attack (``"fgsm"``, ``"bim"``, ``"pgd"``, ``"noise"``) with its defaults overridden by
    ``params``; ``name`` labels it in the report (default: the kind)."""
    if kind not in KINDS:
        raise ValueError(f"unknown attack {kind!r}; known attacks: {', '.join(KINDS)} (or pass an attack object "
                         "or a callable(model, x, y, eps=eps) -> x_adv)")
    p = _check_params(kind, params)
    return AttackSpec(name or kind, kind, p, _named_runner(kind, p), per_sample_eps=True)


def _object_spec(atk) -> AttackSpec:
    kind = type(atk).__name__.lower()
    kind = kind if kind in ("fgsm", "bim", "pgd") else "custom"

    def run(model, x, y, eps, lo, hi, generator, rebind):
        a = copy.copy(atk)  # the caller's object keeps its eps
        a.eps = eps
        if rebind:
            a.model = model
        return a(x, y)
    return AttackSpec(type(atk).__name__.lower(), kind, {"repr": repr(atk)}, run)


def _callable_spec(fn) -> AttackSpec:
    base = fn.func if isinstance(fn, functools.partial) else fn
    kind = _FUNCTIONAL.get(base, "custom")
    label = getattr(base, "__name__", type(base).__name__)
    params = {k: repr(v) for k, v in fn.keywords.items()} if isinstance(fn, functools.partial) else {}
    params["callable"] = f"{getattr(base, '__module__', '?')}.{getattr(base, '__qualname__', label)}"

    def run(model, x, y, eps, lo, hi, generator, rebind):
        return fn(model, x, y, eps=eps)
    return AttackSpec(label, kind, params, run)


def resolve_attack(attack) -> AttackSpec:
    """An :class:`AttackSpec` from a name, a spec, an attack object (anything with ``model`` and ``eps``
    attributes called as ``atk(x, y)``: robust_ext's and torchattacks' classes), or a callable
    ``fn(model, x, y, eps=eps) -> x_adv`` (e.g. ``functools.partial(robust_ext.attacks.pgd, steps=20, alpha=0.01)``)."""
    if isinstance(attack, AttackSpec):
        return attack
    if isinstance(attack, str):
        return make_attack(attack)
    if callable(attack) and hasattr(attack, "eps") and hasattr(attack, "model"):
        return _object_spec(attack)
    if callable(attack):
        return _callable_spec(attack)
    raise TypeError(f"an attack must be a name ({', '.join(KINDS)}), an AttackSpec, an attack object or a "
                    f"callable, got {type(attack).__name__}")


def resolve_attacks(attacks) -> list:
    if isinstance(attacks, (str, AttackSpec)) or callable(attacks):
        attacks = [attacks]
    specs = [resolve_attack(a) for a in attacks]
    if not specs:
        raise ValueError("attacks must name at least one attack")
    seen: Dict[str, int] = {}
    for k, spec in enumerate(specs):  # "pgd", "pgd-2", ...: names key the report
        seen[spec.name] = seen.get(spec.name, 0) + 1
        if seen[spec.name] > 1:
            specs[k] = replace(spec, name=f"{spec.name}-{seen[spec.name]}")
    return specs
