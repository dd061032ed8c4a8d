"""Thin classes over the functional attacks, with torchattacks' call shape: ``atk = PGD(model, ...)``,
then ``atk(images, labels)``. Drop-in for torchattacks' FGSM, BIM, PGD and PGDL2 in their default mode."""
from __future__ import annotations

import torch

from . import checks
from .apgd import _check_rho, apgd, apgd_t, check_target_order
from .fab import check_fab_params, fab, fab_t
from .fgsm import fgsm, fgsm_rs
from .pgd import bim, pgd
from .square import _check_p_init, square
from .threats import ThreatModel

__all__ = ["Attack", "FGSM", "FGM", "FGSM_RS", "BIM", "PGD", "PGDL2", "APGD", "APGDT", "Square"]


def _fuse(model):
    from ..fuse import fuse  # the fused layers import the ops; loaded when asked for

    return fuse(model)


def _fmt(v) -> str:
    if isinstance(v, torch.Tensor):
        return f"tensor(shape={list(v.shape)})"
    if isinstance(v, torch.Generator):
        return "Generator"
    if isinstance(v, ThreatModel):
        return repr(v.name)
    return f"{v:.6g}" if isinstance(v, float) else repr(v)


class Attack:
    """Hyper-parameters at construction (checked there), ``atk(images, labels)`` runs the attack.
    They are plain attributes: ``atk.eps = 4/255`` changes the next call. ``fuse=True`` attacks
    :func:`robust_ext.fuse.fuse` of the model (its ReLU + pool and BatchNorm + ReLU on the fused layers;
    the same parameters)."""

    _fn = None

    def __init__(self, model, **params):
        fuse = params.pop("fuse", False)
        checks.check_hparams(params)
        if not isinstance(fuse, bool):
            raise ValueError(f"fuse must be True or False, got {fuse!r}")
        self.model = _fuse(model) if fuse else model
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

    def __init__(self, model, eps=8 / 255, *, targeted=False, clip_min=0.0, clip_max=1.0, loss="ce", amp=False,
                 norm="linf", fuse=False):
        super().__init__(model, eps=eps, targeted=targeted, clip_min=clip_min, clip_max=clip_max, loss=loss, amp=amp,
                         norm=norm, fuse=fuse)


class FGM(FGSM):
    """FGM, the L2 form of FGSM (Goodfellow et al. 2015; Miyato et al. 2017): ``x + eps * g / ||g||_2``,
    clipped; see :func:`fgsm` with ``norm="l2"``."""

    def __init__(self, model, eps=1.0, *, targeted=False, clip_min=0.0, clip_max=1.0, loss="ce", amp=False, fuse=False):
        super().__init__(model, eps=eps, targeted=targeted, clip_min=clip_min, clip_max=clip_max, loss=loss, amp=amp,
                         norm="l2", fuse=fuse)


class FGSM_RS(Attack):
    """FGSM with a random start (Wong et al. 2020, "Fast is better than free"); see :func:`fgsm_rs`."""

    _fn = staticmethod(fgsm_rs)

    def __init__(self, model, eps=8 / 255, alpha=None, *, targeted=False, clip_min=0.0, clip_max=1.0, loss="ce",
                 amp=False, generator=None, norm="linf", fuse=False):
        super().__init__(model, eps=eps, alpha=alpha, targeted=targeted, clip_min=clip_min, clip_max=clip_max,
                         loss=loss, amp=amp, generator=generator, norm=norm, fuse=fuse)


class BIM(Attack):
    """BIM (Kurakin et al. 2017, "Adversarial Examples in the Physical World"); see :func:`bim`."""

    _fn = staticmethod(bim)

    def __init__(self, model, eps=8 / 255, alpha=2 / 255, steps=10, *, targeted=False, early_stop=False,
                 clip_min=0.0, clip_max=1.0, loss="ce", amp=False, norm="linf", fuse=False):
        super().__init__(model, eps=eps, alpha=alpha, steps=steps, targeted=targeted, early_stop=early_stop,
                         clip_min=clip_min, clip_max=clip_max, loss=loss, amp=amp, norm=norm, fuse=fuse)


class PGD(Attack):
    """PGD (Madry et al. 2018, "Towards Deep Learning Models Resistant to Adversarial Attacks"); see :func:`pgd`.

    >>> atk = PGD(model, eps=8/255, alpha=2/255, steps=10, random_start=True)
    >>> adv_images = atk(images, labels)
    """

    _fn = staticmethod(pgd)

    def __init__(self, model, eps=8 / 255, alpha=2 / 255, steps=10, random_start=True, *, restarts=1,
                 targeted=False, early_stop=False, clip_min=0.0, clip_max=1.0, loss="ce", amp=False, generator=None,
                 norm="linf", fuse=False):
        super().__init__(model, eps=eps, alpha=alpha, steps=steps, random_start=random_start, restarts=restarts,
                         targeted=targeted, early_stop=early_stop, clip_min=clip_min, clip_max=clip_max, loss=loss,
                         amp=amp, generator=generator, norm=norm, fuse=fuse)


class PGDL2(PGD):
    """PGD under the L2 norm (Madry et al. 2018), with torchattacks' ``PGDL2`` defaults; see :func:`pgd`
    with ``norm="l2"``.

    >>> atk = PGDL2(model, eps=1.0, alpha=0.2, steps=10, random_start=True)
    >>> adv_images = atk(images, labels)
    """

    def __init__(self, model, eps=1.0, alpha=0.2, steps=10, random_start=True, *, restarts=1, targeted=False,
                 early_stop=False, clip_min=0.0, clip_max=1.0, loss="ce", amp=False, generator=None, fuse=False):
        super().__init__(model, eps=eps, alpha=alpha, steps=steps, random_start=random_start, restarts=restarts,
                         targeted=targeted, early_stop=early_stop, clip_min=clip_min, clip_max=clip_max, loss=loss,
                         amp=amp, generator=generator, norm="l2", fuse=fuse)


class APGD(Attack):
    """APGD (Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an ensemble of diverse
    parameter-free attacks"); see :func:`apgd`. torchattacks' ``APGD`` argument order, with the paper's 100 steps.

    >>> atk = APGD(model, norm="linf", eps=8/255, steps=100, restarts=1, loss="ce")
    >>> adv_images = atk(images, labels)
    """

    _fn = staticmethod(apgd)

    def __init__(self, model, norm="linf", eps=8 / 255, steps=100, restarts=1, *, loss="ce", rho=0.75,
                 targeted=False, early_stop=True, clip_min=0.0, clip_max=1.0, amp=False, generator=None, fuse=False):
        _check_rho(rho)
        super().__init__(model, norm=norm, eps=eps, steps=steps, restarts=restarts, loss=loss, rho=rho,
                         targeted=targeted, early_stop=early_stop, clip_min=clip_min, clip_max=clip_max, amp=amp,
                         generator=generator, fuse=fuse)


class APGDT(Attack):
    """APGD-T (Croce & Hein 2020): APGD on the targeted DLR loss towards the most likely other classes; see
    :func:`apgd_t`. torchattacks' ``APGDT`` argument order (``n_target_classes`` in place of its ``n_classes``).

    >>> atk = APGDT(model, norm="linf", eps=8/255, steps=100, restarts=1, n_target_classes=9)
    >>> adv_images = atk(images, labels)
    """

    _fn = staticmethod(apgd_t)

    def __init__(self, model, norm="linf", eps=8 / 255, steps=100, restarts=1, *, n_target_classes=9,
                 loss="dlr_targeted", rho=0.75, early_stop=True, clip_min=0.0, clip_max=1.0, amp=False,
                 target_order="logits", malt_candidates=9, generator=None, fuse=False):
        _check_rho(rho)
        checks.check_int(n_target_classes, "n_target_classes", 1)
        checks.check_int(malt_candidates, "malt_candidates", 1)
        check_target_order(target_order)
        super().__init__(model, norm=norm, eps=eps, steps=steps, restarts=restarts,
                         n_target_classes=n_target_classes, loss=loss, rho=rho, early_stop=early_stop,
                         target_order=target_order, malt_candidates=malt_candidates, clip_min=clip_min, clip_max=clip_max, amp=amp, generator=generator, fuse=fuse)


class Square(Attack):
    """Square Attack (Andriushchenko et al. 2020, "Square Attack: a query-efficient black-box adversarial attack
    via random search"); see :func:`square`. torchattacks' ``Square`` argument order (``restarts`` for its
    ``n_restarts``, a ``generator`` for its ``seed``).

    >>> atk = Square(model, norm="linf", eps=8/255, n_queries=5000, restarts=1, p_init=0.8, loss="margin")
    >>> adv_images = atk(images, labels)
    """

    _fn = staticmethod(square)

    def __init__(self, model, norm="linf", eps=8 / 255, n_queries=5000, restarts=1, p_init=0.8, loss="margin", *,
                 rescale_schedule=True, targeted=False, early_stop=True, clip_min=0.0, clip_max=1.0, amp=False,
                 generator=None, fuse=False):
        checks.check_int(n_queries, "n_queries", 1)
        _check_p_init(p_init)
        super().__init__(model, norm=norm, eps=eps, n_queries=n_queries, restarts=restarts, p_init=p_init, loss=loss,
                         rescale_schedule=rescale_schedule, targeted=targeted, early_stop=early_stop,
                         clip_min=clip_min, clip_max=clip_max, amp=amp, generator=generator, fuse=fuse)


class FAB(Attack):
    """FAB (Croce & Hein 2020, "Minimally distorted adversarial examples with a fast adaptive boundary attack");
    see :func:`fab`. torchattacks' ``FAB`` argument order; a point not fooled within ``eps`` comes back clean.

    >>> atk = FAB(model, norm="linf", eps=8/255, steps=100, restarts=1)
    >>> adv_images = atk(images, labels)
    """

    _fn = staticmethod(fab)

    def __init__(self, model, norm="linf", eps=8 / 255, steps=100, restarts=1, alpha_max=0.1, eta=1.05, beta=0.9, *,
                 early_stop=True, final_search=True, clip_min=0.0, clip_max=1.0, generator=None, fuse=False):
        check_fab_params(alpha_max, eta, beta)
        super().__init__(model, norm=norm, eps=eps, steps=steps, restarts=restarts, alpha_max=alpha_max, eta=eta,
                         beta=beta, early_stop=early_stop, final_search=final_search, clip_min=clip_min,
                         clip_max=clip_max, generator=generator, fuse=fuse)


class FABT(Attack):
    """FAB-T (Croce & Hein 2020): FAB towards each of the ``n_target_classes`` most likely other classes; see
    :func:`fab_t` (AutoAttack's ``fab-t``).

    >>> atk = FABT(model, norm="linf", eps=8/255, steps=100, restarts=1, n_target_classes=9)
    >>> adv_images = atk(images, labels)
    """

    _fn = staticmethod(fab_t)

    def __init__(self, model, norm="linf", eps=8 / 255, steps=100, restarts=1, *, n_target_classes=9,
                 alpha_max=0.1, eta=1.05, beta=0.9, early_stop=True, final_search=True, clip_min=0.0, clip_max=1.0,
                 generator=None, fuse=False):
        checks.check_int(n_target_classes, "n_target_classes", 1)
        check_fab_params(alpha_max, eta, beta)
        super().__init__(model, norm=norm, eps=eps, steps=steps, restarts=restarts,
                         n_target_classes=n_target_classes, alpha_max=alpha_max, eta=eta, beta=beta,
                         early_stop=early_stop, final_search=final_search, clip_min=clip_min, clip_max=clip_max,
                         generator=generator, fuse=fuse)
