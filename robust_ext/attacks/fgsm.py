"""One-step attacks: FGSM (Goodfellow et al. 2015; its L2 form, FGM) and FGSM with a random start (Wong et
al. 2020). Conventions: :mod:`robust_ext.attacks`."""
from __future__ import annotations

from . import checks, core

__all__ = ["fgsm", "fgsm_rs", "FGSM_RS_ALPHA"]

FGSM_RS_ALPHA = 1.25  # Wong et al.'s step, a multiple of eps


def fgsm(model, x, y, *, eps, targeted=False, clip_min=0.0, clip_max=1.0, loss="ce", amp=False, norm="linf"):
    """FGSM, Goodfellow et al. 2015, "Explaining and Harnessing Adversarial Examples":
    ``clip(x + eps * sign(grad))``, bit-exact with torchattacks.FGSM. With ``norm="l2"``: FGM,
    ``clip(x + eps * grad / ||grad||_2)``."""
    x, y, eps, lo, hi, obj, threat = core.setup(model, x, y, eps, targeted, clip_min, clip_max, loss, amp, norm)
    if x.shape[0] == 0:
        return x.clone()
    with core.eval_mode(model):
        grad, _, _ = obj.grad(x.detach(), y)
    return threat.single_step(x, grad, eps, lo, hi)


def fgsm_rs(model, x, y, *, eps, alpha=None, targeted=False, clip_min=0.0, clip_max=1.0, loss="ce", amp=False,
            generator=None, norm="linf"):
    """FGSM with a random start, Wong et al. 2020, "Fast is better than free: Revisiting adversarial
    training": a uniform point of the eps-ball, then one step of ``alpha`` (default ``1.25 * eps``)
    projected back onto the ball."""
    if alpha is None:
        alpha = FGSM_RS_ALPHA * checks.check_scalar_budget(eps, "eps")
    return core.run(model, x, y, eps=eps, alpha=alpha, steps=1, random_start=True, restarts=1,
                    targeted=targeted, early_stop=False, clip_min=clip_min, clip_max=clip_max, loss=loss,
                    amp=amp, generator=generator, norm=norm)
