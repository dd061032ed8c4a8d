"""PGD (Madry et al. 2018) and BIM (Kurakin et al. 2017), under any threat model (``norm="linf"`` or
``"l2"``). Conventions: :mod:`robust_ext.attacks`."""
from __future__ import annotations

import torch

from . import checks, core
from .threats import get_threat

__all__ = ["pgd", "bim"]


def pgd(model, x, y, *, eps, alpha, steps, random_start=True, restarts=1, targeted=False, early_stop=False,
        clip_min=0.0, clip_max=1.0, loss="ce", amp=False, generator=None, norm="linf"):
    """PGD, Madry et al. 2018, "Towards Deep Learning Models Resistant to Adversarial Attacks".

    ``steps`` steepest-ascent steps of size ``alpha`` under ``norm`` (L-inf: ``alpha * sign(grad)``; L2:
    ``alpha * grad / ||grad||_2``), each projected onto the ``norm`` ball of radius ``eps`` around ``x`` and
    clipped to ``[clip_min, clip_max]``, from a uniform random point of the ball (``random_start=True``;
    drawn from ``generator``, or the CPU default generator) or from ``x``.

    Args:
        model: maps images in ``[clip_min, clip_max]`` to logits ``[N, num_classes]``, normalization
            included (see :mod:`robust_ext.attacks`).
        x: images ``[N, ...]``, floating point; ``x_adv`` gets their dtype, device and layout.
        y: integer labels ``[N]``; the target labels when ``targeted``.
        eps, alpha: floats >= 0, or tensors with one value per sample.
        steps, restarts: integers >= 1.
        targeted: descend the loss towards ``y`` instead of ascending it away from ``y``.
        early_stop: see below.
        loss: a name of :data:`robust_ext.attacks.LOSSES` (``"ce"``, ``"margin"``, ``"dlr"``) or a Loss.
        amp: ``False``, ``True`` (bfloat16 on CPU, float16 on CUDA) or a dtype: autocast for the model.
        generator: a ``torch.Generator`` for the random starts.
        norm: ``"linf"``, ``"l2"`` or a :class:`~robust_ext.attacks.ThreatModel`.

    ``restarts > 1`` runs the attack again from new random points and keeps, per sample, the worst case:
    an iterate that fools the model beats one that does not, and otherwise the higher loss wins (for a
    targeted attack, the lower loss towards the target). Each restart costs one extra forward.

    ``early_stop=True`` drops a sample from the batch (forward and backward then run on the remaining
    rows only) at the first iterate that fools the model (targeted: that the model classifies as the
    target) and returns that iterate. For robust accuracy or success rate this is at least as strong as
    the final iterate and much faster; as training data it gives lower-loss examples than running every
    step. It syncs with the host once per step. A sample never fooled returns its last iterate. With
    ``amp`` a row that looks fooled under autocast is confirmed by a full-precision forward
    before it leaves.

    Returns:
        ``x_adv`` with ``||x_adv - x|| <= eps`` and ``clip_min <= x_adv <= clip_max``, detached.
    """
    return core.run(model, x, y, eps=eps, alpha=alpha, steps=steps, random_start=random_start,
                    restarts=restarts, targeted=targeted, early_stop=early_stop, clip_min=clip_min,
                    clip_max=clip_max, loss=loss, amp=amp, generator=generator, norm=norm)


def kurakin_steps(eps, clip_min, clip_max) -> int:
    """BIM's step count ``min(eps + 4, 1.25 eps)``, eps counted in 255ths of the image range (L-inf)."""
    if isinstance(eps, torch.Tensor):
        raise ValueError("steps=None derives steps from a float eps; pass steps with a per-sample eps")
    e = checks.check_scalar_budget(eps, "eps") * 255.0 / max(clip_max - clip_min, 1e-12)
    return max(1, int(min(e + 4, 1.25 * e)))


def bim(model, x, y, *, eps, alpha, steps=None, targeted=False, early_stop=False, clip_min=0.0, clip_max=1.0,
        loss="ce", amp=False, norm="linf"):
    """BIM (iterative FGSM), Kurakin et al. 2017, "Adversarial Examples in the Physical World".

    :func:`pgd` from ``x`` itself: no random start, no restarts. ``steps=None`` takes the paper's
    ``min(eps + 4, 1.25 eps)`` with eps counted in 255ths of the image range, as torchattacks'
    ``steps=0`` (L-inf only). The L-inf update is torchattacks' PGD formula (bit-exact with
    ``torchattacks.PGD(..., random_start=False)``); torchattacks.BIM writes the same projection with
    max/min and agrees up to floating-point rounding.
    """
    if steps is None:
        if get_threat(norm).name != "linf":
            raise ValueError("steps=None (the Kurakin rule) is defined for norm='linf' only; pass steps")
        steps = kurakin_steps(eps, *checks.check_bounds(clip_min, clip_max))
    return core.run(model, x, y, eps=eps, alpha=alpha, steps=steps, random_start=False, restarts=1,
                    targeted=targeted, early_stop=early_stop, clip_min=clip_min, clip_max=clip_max, loss=loss,
                    amp=amp, generator=None, norm=norm)
