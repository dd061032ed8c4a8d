"""AutoAttack's versions (Croce & Hein 2020, fra31/auto-attack ``AutoAttack.set_version``): which attacks the
ensemble runs, in which order, with which settings; and APGD with Expectation over Transformation for the
``rand`` version.

* ``standard``: APGD-CE (100 steps, 1 restart), APGD-T (100 steps, 9 target classes), FAB-T (100 steps, 9
  target classes, no final search), Square (5,000 queries, ``p_init`` 0.8, the p schedule read at the query
  index: the original's ``resc_schedule=False``).
* ``plus``: APGD-CE and APGD-DLR (5 restarts each), FAB (5 restarts), Square, APGD-T, FAB-T.
* ``rand``: APGD-CE and APGD-DLR, 1 restart, the gradient averaged over 20 draws of a randomized model, every
  point running every step (no early stop: one fooling draw is not a fooled point).
* ``fast`` (robust_ext's): APGD-CE (100 steps); APGD-T (100 steps) towards 3 of the 9 likeliest classes,
  nearest decision boundary first (MALT's ranking, :func:`robust_ext.attacks.apgd.rank_targets`); FAB-T
  (100 steps, with :func:`robust_ext.attacks.fab`'s final search) towards the 3 likeliest classes: a white-box
  attack of another family, as a check on APGD; then
  Square (5,000 queries) where the checks call for it: on every point still robust when FAB-T fooled any
  point that both APGD attacks missed (the gradients mislead APGD somewhere: the original's black-box check
  is then needed), else only on the points the sanity checks flag (all-zero input gradient), or on every
  point when a model-level check fires (randomized or softmax outputs, non-finite logits, a dynamic defense).
  It is checked against ``standard`` (``benchmarks/bench_eval.py``, tests/test_autoattack_fast.py), never assumed equal;
  where Square has to run everywhere it costs about as much as ``standard``'s Square.

Each attack is a registry entry (:mod:`robust_ext.attacks.registry`); a version whose attack is not
registered is an error naming it, never a weaker ensemble under the version's name.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch

from ..attacks import core
from ..attacks.apgd import apgd_loop
from ..attacks.checks import check_int
from ..attacks.registry import ATTACKS, get_attack
from .specs import AttackSpec, make_attack, resolve_attack, resolve_attacks

__all__ = ["VERSIONS", "ORIGINAL_NAMES", "EOT_DRAWS", "FAST_TARGETS", "resolve_ensemble", "apgd_eot", "EoTObjective"]

EOT_DRAWS = 20
_APGD = {"steps": 100, "restarts": 1}
_TARGETED = {"steps": 100, "restarts": 1, "n_target_classes": 9}
# The original's FAB has no final search, and its Square reads the p schedule unrescaled (resc_schedule=False).
_FAB = {"final_search": False}
_SQUARE = {"queries": 5000, "p_init": 0.8, "restarts": 1, "rescale_schedule": False}
FAST_TARGETS = 3
_ESCALATE = {"gate": "escalate"}  # the flagged points, or all when the attack before it fooled any

# The original's attack names -> (registry kind, the settings that make the registry's attack that one).
ORIGINAL_NAMES = {"apgd-ce": ("apgd", {"loss": "ce"}), "apgd-dlr": ("apgd", {"loss": "dlr"}),
                  "apgd-t": ("apgd_t", {}), "fab": ("fab", {}), "fab-t": ("fab_t", {}), "square": ("square", {})}

VERSIONS = {
    "standard": (("apgd-ce", _APGD), ("apgd-t", _TARGETED), ("fab-t", {**_TARGETED, **_FAB}), ("square", _SQUARE)),
    "plus": (("apgd-ce", {**_APGD, "restarts": 5}), ("apgd-dlr", {**_APGD, "restarts": 5}),
             ("fab", {**_APGD, "restarts": 5, **_FAB}), ("square", _SQUARE), ("apgd-t", _TARGETED),
             ("fab-t", {**_TARGETED, **_FAB})),
    # A randomized model: no early stop (a point fooled by one draw may not be by the next; every point runs every
    # step and returns its last fooling iterate, as the original's), and the ensemble's one forward decides.
    "rand": (("apgd-ce", {**_APGD, "eot": EOT_DRAWS, "early_stop": False}),
             ("apgd-dlr", {**_APGD, "eot": EOT_DRAWS, "early_stop": False})),
    "fast": (("apgd-ce", _APGD), ("apgd-t", {**_TARGETED, "n_target_classes": FAST_TARGETS, "target_order": "malt"}),
             ("fab-t", {**_TARGETED, "n_target_classes": FAST_TARGETS}), ("square", {**_SQUARE, **_ESCALATE})),
}

# The names other attack files may give a setting (the original's and the registry's conventions).
_ALIASES = {"queries": ("queries", "n_queries", "max_queries"), "steps": ("steps", "n_iter"),
            "restarts": ("restarts", "n_restarts"), "n_target_classes": ("n_target_classes",)}


class EoTObjective(core.Objective):
    """An :class:`~robust_ext.attacks.core.Objective` whose input gradient is the mean over ``draws`` forward
    and backward passes of a randomized model; the logits and objective are the last draw's (as the original's
    ``eot_iter``)."""

    def __init__(self, base: core.Objective, draws: int):
        self.__dict__.update(vars(base))
        self.draws = check_int(draws, "draws", 1)

    def grad(self, x_adv, y, t=None):
        total = None
        for _ in range(self.draws):
            g, logits, objective = super().grad(x_adv, y, t)
            total = g if total is None else total.add_(g)
        return total.div_(self.draws), logits, objective


def apgd_eot(model, x, y, *, eps, draws=EOT_DRAWS, steps=100, loss="ce", restarts=1, norm="linf", rho=0.75,
             early_stop=False, clip_min=0.0, clip_max=1.0, amp=False, generator: Optional[torch.Generator] = None):
    """:func:`robust_ext.attacks.apgd` following the gradient averaged over ``draws`` passes (EoT, Athalye et
    al. 2018): AutoAttack's ``rand`` version for models with randomness in the forward pass.

    ``early_stop`` is off by default: with a randomized model "fooled at some step" is one random draw, and
    stopping there would return the first lucky point instead of the last fooling iterate (measured on a model
    with noisy logits: 2.5-3.3 points higher robust accuracy with early stop)."""
    x, y, eps, lo, hi, obj, threat = core.setup(model, x, y, eps, False, clip_min, clip_max, loss, amp, norm)
    # The APGD loop takes its objective as an argument; EoT changes only the objective.
    return apgd_loop(model, x, y, eps, EoTObjective(obj, draws), threat, lo, hi, steps=steps, rho=rho,
                     restarts=restarts, early_stop=early_stop, generator=generator)


def _eot_spec(label: str, params: dict) -> AttackSpec:
    p = dict(params)

    def run(model, x, y, eps, norm, lo, hi, generator, rebind):
        return apgd_eot(model, x, y.to(x.device), eps=eps, norm=norm, clip_min=lo, clip_max=hi, generator=generator,
                        **{("draws" if k == "eot" else k): v for k, v in p.items()})
    return AttackSpec(label, "apgd", p, run, per_sample_eps=True)


def _settings(version: str, label: str, kind: str, wanted: dict) -> dict:
    """``wanted`` in the names the registered attack ``kind`` takes; a setting it cannot take is an error
    (but one restart, which an attack without restarts does anyway)."""
    defaults = get_attack(kind).defaults
    out = {}
    for key, value in wanted.items():
        name = next((a for a in _ALIASES.get(key, (key,)) if a in defaults), None)
        if name is None:
            if key == "restarts" and value == 1:
                continue
            raise ValueError(f"version {version!r} runs {label} with {key}={value!r}, but the registered attack "
                             f"{kind!r} takes no such parameter (it takes {sorted(defaults)})")
        out[name] = value
    return out


def _named(version: str, label: str, settings: dict, amp) -> AttackSpec:
    kind, fixed = ORIGINAL_NAMES.get(label, (label, {}))
    if kind not in ATTACKS:
        what = repr(kind) if label == kind else f"{kind!r} ({label})"
        raise ValueError(f"version {version!r} needs the attack {what}, which is not registered; "
                         f"registered: {', '.join(ATTACKS)}")
    wanted = {**fixed, **settings}
    eot, gate = wanted.pop("eot", None), wanted.pop("gate", None)
    if amp is not False and "amp" in get_attack(kind).defaults:
        wanted["amp"] = amp
    params = _settings(version, label, kind, wanted)
    if eot is not None:
        return _eot_spec(label, {**get_attack(kind).params(**params), "eot": eot})
    spec = make_attack(kind, name=label, **params)
    return spec if gate is None else replace(spec, gate=gate)


def resolve_ensemble(version: Optional[str], attacks, amp=False):
    """``(version, [AttackSpec, ...])``: a version's list, or (``attacks`` given, version None or "custom")
    the caller's list of registry names, the original's names (``"apgd-ce"``, ``"apgd-t"``, ...), specs,
    attack objects or callables."""
    if attacks is None:
        version = "standard" if version is None else version
        if version not in VERSIONS:
            raise ValueError(f"version must be one of {', '.join(map(repr, VERSIONS))} or 'custom' (with attacks=), "
                             f"got {version!r}")
        return version, [_named(version, label, settings, amp) for label, settings in VERSIONS[version]]
    if version not in (None, "custom"):
        raise ValueError(f"attacks= replaces the version's list: pass version='custom' (or None) with it, "
                         f"got version={version!r}")
    items = [attacks] if isinstance(attacks, (str, AttackSpec)) or callable(attacks) else list(attacks)
    if not items:
        raise ValueError("attacks must name at least one attack")
    specs = []
    for a in items:
        if isinstance(a, str) and (a in ORIGINAL_NAMES or a in ATTACKS):
            specs.append(_named("custom", a, {}, amp))
        elif isinstance(a, str):
            raise ValueError(f"attacks: unknown attack {a!r}; known: {', '.join(ATTACKS)}, or the original's "
                             f"{', '.join(ORIGINAL_NAMES)}")
        else:
            specs.append(resolve_attack(a))
    return "custom", resolve_attacks(specs)
