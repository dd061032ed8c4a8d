"""FAB's projections (Croce & Hein, ICML 2020): the smallest step that takes a point onto a hyperplane
without leaving a box, under the L-inf and the L2 norm, for a batch of points and hyperplanes at once.

For rows ``x [M, D]``, ``w [M, D]``, ``b [M]`` and the box ``[lo, hi]`` (``x`` inside it):

    d = argmin ||d||  subject to  w . (x + d) = b,  lo <= x + d <= hi.

When no point of the box lies on the hyperplane, ``d`` takes ``x`` to the box's corner furthest towards it
(the box point with the smallest ``|w . z - b|``), as fra31/auto-attack's ``fab_projections.py`` does. That
file finds the active set by bisection over sorted break points; here every break point's reach is computed
at once and counted, which gives the same solution. A coordinate with ``w = 0`` (L2: ``|w| < 1e-8``, the
original's threshold) never moves.

Both norms share one structure. Flip the sign of ``w`` so that ``x`` must *lower* ``w . z`` by ``c >= 0``. Each
coordinate moves towards the bound that lowers ``w . z`` (``lo`` where ``w > 0``, ``hi`` where ``w < 0``) and
has ``room`` to it. With a multiplier ``lam >= 0`` a coordinate moves ``min(lam * k, room)`` (L-inf: ``k = 1``,
L2: ``k = |w|``), saturating at the break point ``lam = room / k``; the decrease reached is piecewise linear
and non-decreasing in ``lam``, so the break points sorted ascending bracket the ``lam`` that reaches ``c``.
"""
from __future__ import annotations

import torch

__all__ = ["project_linf", "project_l2", "L2_ZERO"]

L2_ZERO = 1e-8  # the original's L2 projection treats smaller |w| as 0


def _setup(x, w, b, lo, hi, zero):
    """(|w|, the direction each coordinate moves in, its room to the box, the decrease c >= 0 needed)."""
    c = (w * x).sum(1) - b
    flip = torch.where(c >= 0, 1.0, -1.0).to(w.dtype).unsqueeze(1)
    w = w * flip
    c = c * flip.squeeze(1)
    active = w.abs() > zero
    direction = torch.where(active, -torch.sign(w), torch.zeros_like(w))
    room = torch.where(w > 0, x - lo, hi - x).clamp_min(0)
    return w.abs() * active, direction, room, c


def _solve(weight, k, room, c):
    """The multiplier ``lam`` at which ``sum_i weight_i * min(lam * k_i, room_i)`` first reaches ``c``
    (``inf`` where it never does: the corner is the answer then)."""
    brk = torch.where(k > 0, room / k.clamp_min(torch.finfo(k.dtype).tiny), torch.full_like(room, torch.inf))
    brk, order = brk.sort(1)
    weight, k, room = weight.gather(1, order), k.gather(1, order), room.gather(1, order)
    saturated = torch.cumsum(weight * room, 1) - weight * room  # reach of the coordinates before each break point
    slope = torch.flip(torch.cumsum(torch.flip(weight * k, (1,)), 1), (1,))  # d reach / d lam from it on
    reach = saturated + torch.where(slope > 0, brk * slope, torch.zeros_like(slope))
    before = (reach < c.unsqueeze(1)).sum(1, keepdim=True)  # break points that fall short of c
    feasible = before < brk.shape[1]
    at = before.clamp_max(brk.shape[1] - 1)
    lam = (c.unsqueeze(1) - saturated.gather(1, at)) / slope.gather(1, at).clamp_min(torch.finfo(k.dtype).tiny)
    return torch.where(feasible, lam.clamp_min(0), torch.full_like(lam, torch.inf))


def _moves(lam, k, room):
    """Each coordinate's move ``min(lam * k, room)``; 0 where ``k = 0`` (also when ``lam`` is inf)."""
    return torch.where(k > 0, torch.minimum(lam * k, room), torch.zeros_like(room))


def project_linf(x, w, b, lo=0.0, hi=1.0):
    """The smallest-L-inf ``d`` with ``w . (x + d) = b`` and ``lo <= x + d <= hi``, per row (see the module)."""
    weight, direction, room, c = _setup(x, w, b, lo, hi, 0.0)
    k = (weight > 0).to(x.dtype)
    return direction * _moves(_solve(weight, k, room, c), k, room)


def project_l2(x, w, b, lo=0.0, hi=1.0):
    """The smallest-L2 ``d`` with ``w . (x + d) = b`` and ``lo <= x + d <= hi``, per row (see the module)."""
    weight, direction, room, c = _setup(x, w, b, lo, hi, L2_ZERO)
    return direction * _moves(_solve(weight, weight, room, c), weight, room)
