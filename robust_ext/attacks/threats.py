"""Threat models: the norm ball an attack lives in, as the attack core sees it.

A threat model is what changes between L-inf and L2 attacks: how a random start is drawn, how one ascent
step moves a point, how a point is put back into the ball, and how far two points are apart. The attack
core (:mod:`robust_ext.attacks.core`) and every attack built on it call only these methods, so a new norm
is one new :class:`ThreatModel` (here or in the user's code) and nothing else.

Every method takes the budget ``eps`` (and ``alpha``) as a float or a per-sample tensor ``[N]`` and the
image bounds ``clip_min``/``clip_max``; ``step_`` and ``project_`` update ``x_adv`` in place and return it.
:data:`LINF` and :data:`L2` run on the fused ops of :mod:`robust_ext.ops`. A user's own, e.g. an L1 ball
with a sparse step, needs only the five methods::

    class L1(ThreatModel):
        name = "l1"
        def init(self, x, eps, clip_min, clip_max, generator=None): ...
        def step_(self, x_adv, grad, x, alpha, eps, clip_min, clip_max): ...
        def project_(self, x_adv, x, eps, clip_min, clip_max): ...
        def single_step(self, x, grad, eps, clip_min, clip_max): ...
        def distance(self, x_adv, x): ...

    pgd(model, x, y, eps=10.0, alpha=1.0, steps=20, norm=L1())
"""
from __future__ import annotations

import torch

from .. import ops

__all__ = ["ThreatModel", "LINF", "L2", "NORMS", "get_threat", "lp_distance", "norm_label"]


def lp_distance(x_adv: torch.Tensor, x: torch.Tensor, p: float) -> torch.Tensor:
    """Per-sample ``||x_adv - x||_p`` (p = inf or 2), computed in float64 ([N]; 0 for samples with no elements)."""
    delta = (x_adv.detach().to(torch.float64) - x.detach().to(torch.float64)).flatten(1)
    if delta.shape[1] == 0:
        return delta.new_zeros(delta.shape[0])
    return delta.abs().amax(1) if p == float("inf") else delta.norm(p=p, dim=1)


class ThreatModel:
    """The norm ball ``{v : ||v - x|| <= eps, clip_min <= v <= clip_max}`` an attack explores.

    Subclasses set ``name`` and implement the five methods below. All of them must leave a tensor of
    ``x``'s shape, dtype and device inside the ball and the bounds (``distance(result, x) <= eps`` up to
    the dtype's rounding), and must not synchronize with the host (the attack loop relies on that).
    """

    name: str = "?"

    def init(self, x, eps, clip_min, clip_max, generator=None) -> torch.Tensor:
        """A random start in the ball around ``x`` (a new tensor), drawn from ``generator``."""
        raise NotImplementedError

    def step_(self, x_adv, grad, x, alpha, eps, clip_min, clip_max) -> torch.Tensor:
        """One steepest-ascent step of length ``alpha`` along ``grad`` (``alpha < 0`` descends), projected
        onto the ball and clipped, in place."""
        raise NotImplementedError

    def project_(self, x_adv, x, eps, clip_min, clip_max) -> torch.Tensor:
        """``x_adv`` put back into the ball and the bounds, in place."""
        raise NotImplementedError

    def single_step(self, x, grad, eps, clip_min, clip_max) -> torch.Tensor:
        """The one-step attack from ``x`` (FGSM for L-inf, FGM for L2): a new tensor."""
        raise NotImplementedError

    def apgd_update(self, x_adv, x_prev, grad, x, alpha, eps, momentum, clip_min, clip_max) -> torch.Tensor:
        """APGD's next iterate (Croce & Hein 2020), a new tensor: ``z`` = one :meth:`step_` from ``x_adv``, then
        the momentum point ``x_adv + momentum (z - x_adv) + (1 - momentum)(x_adv - x_prev)`` put back with
        :meth:`project_` (``momentum == 1``: ``z`` itself). ``x_adv`` and ``x_prev`` are left as they are.
        Optional: this default composes :meth:`step_` and :meth:`project_`; :data:`LINF` and :data:`L2` run one
        fused op with the same result in fp32/fp64."""
        z = self.step_(x_adv.clone(), grad, x, alpha, eps, clip_min, clip_max)
        if momentum != 1.0:
            # The reference's order of operations, no fused multiply-add: x + (z - x) a + (x - x_prev)(1 - a).
            z.sub_(x_adv).mul_(momentum).add_(x_adv).add_((x_adv - x_prev).mul_(1.0 - momentum))
            self.project_(z, x, eps, clip_min, clip_max)
        return z

    def distance(self, x_adv, x) -> torch.Tensor:
        """Per-sample distance ``||x_adv - x||`` as float64 ``[N]``."""
        raise NotImplementedError

    def dual_norm(self, v: torch.Tensor) -> torch.Tensor:
        """Per-sample dual norm of ``v`` ``[N, ...]`` as float ``[N]``: the linear function ``<v, .>`` grows by at
        most ``dual_norm(v) * eps`` over the ball (MALT's target ranking divides a logit gap by it). Optional:
        only :func:`~robust_ext.attacks.apgd_t` with ``target_order="malt"`` asks for it."""
        raise NotImplementedError(f"threat model {self!r} has no dual_norm (needed by target_order='malt')")

    def covering_radius(self, half_width: float, numel: int):
        """The smallest radius at which the ball around any point of a box of half-width ``half_width`` in
        ``numel`` dimensions contains the box's centre (the evaluation's large-ε check: every image can then
        be turned into the same grey one); None when unknown."""
        return None

    def __repr__(self):
        return self.name.upper() if self.name in NORMS else f"{type(self).__name__}()"


class _FusedBall(ThreatModel):
    """An Lp ball on robust_ext's fused ops: ``prefix`` names them (``<prefix>_random_init``, ``_step_``,
    ``_project_``, ``_apgd_update``), ``one_step`` the one-step attack. The ops are looked up when called, so a
    test or a user wrapping ``robust_ext.ops.<op>`` sees every call."""

    def __init__(self, name: str, p: float, prefix: str, one_step: str):
        self.name, self.p, self._prefix, self._one_step = name, p, prefix, one_step

    def _op(self, suffix):
        return getattr(ops, self._prefix + suffix)

    def init(self, x, eps, clip_min, clip_max, generator=None):
        return self._op("_random_init")(x, eps, clip_min, clip_max, generator=generator)

    def step_(self, x_adv, grad, x, alpha, eps, clip_min, clip_max):
        return self._op("_step_")(x_adv, grad, x, alpha, eps, clip_min, clip_max)

    def project_(self, x_adv, x, eps, clip_min, clip_max):
        return self._op("_project_")(x_adv, x, eps, clip_min, clip_max)

    def single_step(self, x, grad, eps, clip_min, clip_max):
        return getattr(ops, self._one_step)(x, grad, eps, clip_min, clip_max)

    def apgd_update(self, x_adv, x_prev, grad, x, alpha, eps, momentum, clip_min, clip_max):
        return self._op("_apgd_update")(x_adv, x_prev, grad, x, alpha, eps, momentum, clip_min, clip_max)

    def distance(self, x_adv, x):
        return lp_distance(x_adv, x, self.p)

    def dual_norm(self, v):
        v = v.detach().float().flatten(1)
        return v.abs().sum(1) if self.p == float("inf") else v.norm(dim=1)  # L1 for L-inf; L2 is self-dual

    def covering_radius(self, half_width, numel):
        # The farthest point of the box from its centre is a corner: half_width away in every coordinate.
        return half_width if self.p == float("inf") else half_width * numel ** (1.0 / self.p)


# L-inf: signed-gradient steps (Madry et al. 2018), elementwise clamp to the box. L2: normalized-gradient
# steps, radial projection onto the ball, then clipping to the box (torchattacks' PGDL2 and APGD's order).
LINF: ThreatModel = _FusedBall("linf", float("inf"), "linf", "fgsm")
L2: ThreatModel = _FusedBall("l2", 2.0, "l2", "fgm")
NORMS = {"linf": LINF, "l2": L2}


def norm_label(name: str) -> str:
    """How plots and tables name a norm: "L-inf", "L2", or a user threat model's own name."""
    return {"linf": "L-inf", "l2": "L2"}.get(name, name)


def get_threat(norm) -> ThreatModel:
    """A :class:`ThreatModel` from ``"linf"``, ``"l2"`` (case-insensitive; ``"inf"``, ``"Linf"`` and ``2``
    accepted as users write them) or a ThreatModel instance."""
    if isinstance(norm, ThreatModel):
        return norm
    key = norm
    if isinstance(norm, str):
        key = norm.strip().lower()
        key = {"inf": "linf", "l_inf": "linf", "linfty": "linf", "2": "l2"}.get(key, key)
    elif isinstance(norm, (int, float)) and not isinstance(norm, bool):
        key = {float("inf"): "linf", 2: "l2"}.get(norm, norm)
    if key not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(map(repr, NORMS))} or a ThreatModel, got {norm!r}")
    return NORMS[key]
