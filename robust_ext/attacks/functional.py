"""The functional attacks: FGSM, FGSM-RS, BIM and PGD (L-inf). Conventions: :mod:`robust_ext.attacks`."""
from __future__ import annotations

import torch

from .. import ops
from . import _args, _loop

__all__ = ["fgsm", "fgsm_rs", "bim", "pgd"]


def pgd(model, x, y, *, eps, alpha, steps, random_start=True, restarts=1, targeted=False, early_stop=False,
        clip_min=0.0, clip_max=1.0, loss="ce", amp=False, generator=None):
    """PGD, Madry et al. 2018, "Towards Deep Learning Models Resistant to Adversarial Attacks".

    ``steps`` signed-gradient steps of size ``alpha``, each projected onto the L-inf ball of radius ``eps``
    around ``x`` and clipped to ``[clip_min, clip_max]``, from a uniform random point of the ball
    (``random_start=True``; drawn from ``generator``, or the default generator of x's device) or from ``x``.

    Args:
        model: maps images in ``[clip_min, clip_max]`` to logits ``[N, num_classes]``, normalization
            included (see :mod:`robust_ext.attacks`).
        x: images ``[N, ...]``, floating point; ``x_adv`` gets their dtype, device and layout.
        y: integer labels ``[N]``; the target labels when ``targeted``.
        eps, alpha: floats >= 0, or tensors with one value per sample.
        steps, restarts: integers >= 1.
        targeted: descend the loss towards ``y`` instead of ascending it away from ``y``.
        early_stop: see below.
        loss: ``"ce"`` (cross-entropy) or ``"margin"`` (``max_{j != y} z_j - z_y``).
        amp: ``False``, ``True`` (bfloat16 on CPU, float16 on CUDA) or a dtype: autocast for the model.
        generator: a ``torch.Generator`` for the random starts.

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
        ``x_adv`` with ``|x_adv - x|inf <= eps`` and ``clip_min <= x_adv <= clip_max``, detached.
    """
    return _loop.run(model, x, y, eps=eps, alpha=alpha, steps=steps, random_start=random_start,
                     restarts=restarts, targeted=targeted, early_stop=early_stop, clip_min=clip_min,
                     clip_max=clip_max, loss=loss, amp=amp, generator=generator)


def _kurakin_steps(eps, clip_min, clip_max) -> int:
    if isinstance(eps, torch.Tensor):
        raise ValueError("steps=None derives steps from a float eps; pass steps with a per-sample eps")
    e = _args.check_scalar_budget(eps, "eps") * 255.0 / max(clip_max - clip_min, 1e-12)
    return max(1, int(min(e + 4, 1.25 * e)))


def bim(model, x, y, *, eps, alpha, steps=None, targeted=False, early_stop=False, clip_min=0.0, clip_max=1.0,
        loss="ce", amp=False):
    """BIM (iterative FGSM), Kurakin et al. 2017, "Adversarial Examples in the Physical World".

    :func:`pgd` from ``x`` itself: no random start, no restarts. ``steps=None`` takes the paper's
    ``min(eps + 4, 1.25 eps)`` with eps counted in 255ths of the image range, as torchattacks'
    ``steps=0``. The update is torchattacks' PGD formula (bit-exact with ``torchattacks.PGD(...,
    random_start=False)``); torchattacks.BIM writes the same projection with max/min and agrees up to
    floating-point rounding.
    """
    if steps is None:
        steps = _kurakin_steps(eps, *_args.check_bounds(clip_min, clip_max))
    return _loop.run(model, x, y, eps=eps, alpha=alpha, steps=steps, random_start=False, restarts=1,
                     targeted=targeted, early_stop=early_stop, clip_min=clip_min, clip_max=clip_max, loss=loss,
                     amp=amp, generator=None)


def fgsm(model, x, y, *, eps, targeted=False, clip_min=0.0, clip_max=1.0, loss="ce", amp=False):
    """FGSM, Goodfellow et al. 2015, "Explaining and Harnessing Adversarial Examples":
    ``clip(x + eps * sign(grad))``, bit-exact with torchattacks.FGSM."""
    x, y, eps, lo, hi, obj = _loop.setup(model, x, y, eps, targeted, clip_min, clip_max, loss, amp)
    if x.shape[0] == 0:
        return x.clone()
    with _loop.eval_mode(model):
        grad, _ = obj.grad(x.detach(), y)
    if obj.targeted:
        grad.neg_()
    return ops.fgsm(x, grad, eps, lo, hi)


def fgsm_rs(model, x, y, *, eps, alpha=None, targeted=False, clip_min=0.0, clip_max=1.0, loss="ce", amp=False,
            generator=None):
    """FGSM with a random start, Wong et al. 2020, "Fast is better than free: Revisiting adversarial
    training": a uniform point of the eps-ball, then one step of ``alpha`` (default ``1.25 * eps``)
    projected back onto the ball."""
    if alpha is None:
        alpha = 1.25 * _args.check_scalar_budget(eps, "eps")
    return _loop.run(model, x, y, eps=eps, alpha=alpha, steps=1, random_start=True, restarts=1,
                     targeted=targeted, early_stop=False, clip_min=clip_min, clip_max=clip_max, loss=loss,
                     amp=amp, generator=generator)
