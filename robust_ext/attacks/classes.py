"""Thin classes over the functional attacks, with torchattacks' call shape: ``atk = PGD(model, ...)``,
then ``atk(images, labels)``. Drop-in for torchattacks' FGSM, BIM and PGD in their default mode."""
from __future__ import annotations

import torch

from . import _args
from .functional import bim, fgsm, fgsm_rs, pgd

__all__ = ["FGSM", "FGSM_RS", "BIM", "PGD"]


def _fmt(v) -> str:
    if isinstance(v, torch.Tensor):
        return f"tensor(shape={list(v.shape)})"
    if isinstance(v, torch.Generator):
        return "Generator"
    return f"{v:.6g}" if isinstance(v, float) else repr(v)


class Attack:
    """Hyper-parameters at construction (checked there), ``atk(images, labels)`` runs the attack.
    They are plain attributes: ``atk.eps = 4/255`` changes the next call."""

    _fn = None

    def __init__(self, model, **params):
        _args.check_hparams(params)
        self.model = model
        self._names = tuple(params)
        for name, value in params.items():
            setattr(self, name, value)

    def __call__(self, images, labels):
        return type(self)._fn(self.model, images, labels, **{k: getattr(self, k) for k in self._names})

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(f'{k}={_fmt(getattr(self, k))}' for k in self._names)})"


class FGSM(Attack):
    """FGSM (Goodfellow et al. 2015, "Explaining and Harnessing Adversarial Examples"); see :func:`fgsm`."""

    _fn = staticmethod(fgsm)

    def __init__(self, model, eps=8 / 255, *, targeted=False, clip_min=0.0, clip_max=1.0, loss="ce", amp=False):
        super().__init__(model, eps=eps, targeted=targeted, clip_min=clip_min, clip_max=clip_max, loss=loss, amp=amp)


class FGSM_RS(Attack):
    """FGSM with a random start (Wong et al. 2020, "Fast is better than free"); see :func:`fgsm_rs`."""

    _fn = staticmethod(fgsm_rs)

    def __init__(self, model, eps=8 / 255, alpha=None, *, targeted=False, clip_min=0.0, clip_max=1.0, loss="ce",
                 amp=False, generator=None):
        super().__init__(model, eps=eps, alpha=alpha, targeted=targeted, clip_min=clip_min, clip_max=clip_max,
                         loss=loss, amp=amp, generator=generator)


class BIM(Attack):
    """BIM (Kurakin et al. 2017, "Adversarial Examples in the Physical World"); see :func:`bim`."""

    _fn = staticmethod(bim)

    def __init__(self, model, eps=8 / 255, alpha=2 / 255, steps=10, *, targeted=False, early_stop=False,
                 clip_min=0.0, clip_max=1.0, loss="ce", amp=False):
        super().__init__(model, eps=eps, alpha=alpha, steps=steps, targeted=targeted, early_stop=early_stop,
                         clip_min=clip_min, clip_max=clip_max, loss=loss, amp=amp)


class PGD(Attack):
    """PGD (Madry et al. 2018, "Towards Deep Learning Models Resistant to Adversarial Attacks"); see :func:`pgd`.

    >>> atk = PGD(model, eps=8/255, alpha=2/255, steps=10, random_start=True)
    >>> adv_images = atk(images, labels)
    """

    _fn = staticmethod(pgd)

    def __init__(self, model, eps=8 / 255, alpha=2 / 255, steps=10, random_start=True, *, restarts=1,
                 targeted=False, early_stop=False, clip_min=0.0, clip_max=1.0, loss="ce", amp=False, generator=None):
        super().__init__(model, eps=eps, alpha=alpha, steps=steps, random_start=random_start, restarts=restarts,
                         targeted=targeted, early_stop=early_stop, clip_min=clip_min, clip_max=clip_max, loss=loss,
                         amp=amp, generator=generator)
