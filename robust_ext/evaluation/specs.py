"""The attacks an evaluation runs: names of the attack registry with their defaults, robust_ext/torchattacks
attack objects, or callables, all behind one call ``spec(model, x, y, eps, norm=, clip_min=, clip_max=,
generator=)``.

The named attacks and their defaults are :data:`robust_ext.attacks.ATTACKS` (``python -m robust_ext.cli
evaluate --help`` lists them): ``"fgsm"``, ``"bim"`` (10 steps of 2.5 ε / steps from the clean image),
``"pgd"`` (the same from a random start, with early stop), ``"noise"`` (a uniform draw from the ε-ball),
each under the evaluation's norm. ``make_attack("pgd", steps=50, restarts=3)`` changes them; ``alpha`` set to a
float is an absolute step size used at every ε, ``None`` the registry's rule.
"""
from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, Optional

from .. import attacks as A
from ..attacks.registry import ATTACKS, get_attack

_FUNCTIONAL = {A.fgsm: "fgsm", A.bim: "bim", A.pgd: "pgd"}


GATES = (None, "flagged", "escalate")


@dataclass(frozen=True)
class AttackSpec:
    """One attack of an evaluation. ``name`` labels it in the report; ``kind`` is a registry name (the
    gradient-masking checks compare kinds) or ``custom``; ``params`` its hyper-parameters as recorded in the
    report. ``per_sample_eps``: it takes a tensor of per-sample ε. ``gate``: in an AutoAttack version, which of
    the points still robust it attacks: all of them (None); with ``"flagged"``, only those the sanity checks
    flag; with ``"escalate"``, those, or all of them when the attack before it fooled any point (see
    :func:`robust_ext.evaluation.autoattack.gate_mask`)."""

    name: str
    kind: str
    params: Dict[str, Any]
    run: Callable = field(repr=False)
    per_sample_eps: bool = False
    gate: Optional[str] = None

    def __post_init__(self):
        if self.gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {self.gate!r}")

    def __call__(self, model, x, y, eps, *, norm="linf", clip_min=0.0, clip_max=1.0, generator=None, rebind=False):
        """``x_adv`` for budget ``eps`` (a float, or a per-sample tensor when ``per_sample_eps``) under
        ``norm`` (named attacks; attack objects and callables keep their own). ``rebind`` makes an attack
        object attack ``model`` instead of the model it was built with."""
        return self.run(model, x, y, eps, norm, clip_min, clip_max, generator, rebind)

    def describe(self) -> Dict[str, Any]:
        out = {"name": self.name, "kind": self.kind, "params": dict(self.params)}
        if self.gate is not None:
            out["gate"] = self.gate
        return out

    def alpha(self, eps):
        """The step size this spec takes at ``eps`` (None for an attack without one or not from the registry)."""
        return get_attack(self.kind).alpha(eps, self.params) if self.kind in ATTACKS else None


def make_attack(kind: str, *, name: Optional[str] = None, **params) -> AttackSpec:
    """A named attack of the registry with its defaults overridden by ``params``; ``name`` labels it in the
    report (default: the kind)."""
    if kind not in ATTACKS:
        raise ValueError(f"unknown attack {kind!r}; known attacks: {', '.join(ATTACKS)} (or pass an attack object "
                         "or a callable(model, x, y, eps=eps) -> x_adv)")
    entry = get_attack(kind)
    p = entry.params(**params)

    def run(model, x, y, eps, norm, lo, hi, generator, rebind):
        return entry(model, x, y.to(x.device), eps, norm=norm, clip_min=lo, clip_max=hi, generator=generator, **p)
    return AttackSpec(name or kind, kind, p, run, per_sample_eps=True)


def _object_spec(atk) -> AttackSpec:
    kind = type(atk).__name__.lower()
    kind = kind if kind in ("fgsm", "bim", "pgd") else "custom"

    def run(model, x, y, eps, norm, lo, hi, generator, rebind):
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

    def run(model, x, y, eps, norm, lo, hi, generator, rebind):
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
    raise TypeError(f"an attack must be a name ({', '.join(ATTACKS)}), an AttackSpec, an attack object or a "
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
