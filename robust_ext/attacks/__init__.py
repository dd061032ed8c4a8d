"""Evasion attacks on the fused ops, under L-inf or L2: FGSM/FGM, FGSM-RS, BIM, PGD, APGD/APGD-T, FAB/FAB-T, the
Square Attack, and random noise.

A functional core (:func:`fgsm`, :func:`fgsm_rs`, :func:`bim`, :func:`pgd`, :func:`apgd`, :func:`apgd_t`,
:func:`fab`, :func:`fab_t`, :func:`noise`, :func:`square`), thin classes with
torchattacks' call shape (``PGD(model, eps=8/255, alpha=2/255, steps=10)(images, labels)``, ``PGDL2``,
``FGM``), the attack core they share (:mod:`.core`), the threat models (:mod:`.threats`: ``LINF``, ``L2`` or
your own), the losses (:mod:`.losses`) and the registry of named attacks (:mod:`.registry`).

Conventions shared by every attack:

* ``model`` maps images in ``[clip_min, clip_max]`` to logits ``[N, num_classes]``. Normalization belongs
  inside the model, so that ``eps``, ``alpha`` and the bounds stay in image units::

      class Normalize(nn.Module):
          def __init__(self, mean, std):
              super().__init__()
              self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
              self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

          def forward(self, x):
              return (x - self.mean) / self.std

      model = nn.Sequential(Normalize([0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]), net)
      x_adv = pgd(model, images, labels, eps=8/255, alpha=2/255, steps=10)

* Device and dtype come from ``x``, never from the model's parameters; ``x_adv`` has ``x``'s dtype,
  device and layout. Labels ``y`` are an integer tensor of shape ``[N]`` (moved to ``x``'s device).
* Every submodule of the model is in eval mode during the attack and gets its own mode back afterwards,
  also when the model raises. Gradients are taken w.r.t. the input only (``torch.autograd.grad``):
  parameters' ``.grad`` are never touched. Calls under ``torch.no_grad()`` work.
* ``eps`` and ``alpha`` are floats >= 0 or tensors with one value per sample (shape ``[N]``), in the units
  of ``norm``: ``norm="linf"`` (the default) bounds every pixel's change, ``norm="l2"`` the Euclidean
  length of the whole perturbation. ``clip_min < clip_max`` bound the image.
* ``targeted=True``: ``y`` are the target labels and the steps descend the loss towards them.
* ``loss="ce"``: cross-entropy on the logits, summed over the batch so that a sample's gradient does not
  shrink with the batch size. ``loss="margin"``: the CW-style ``max_{j != y} z_j - z_y``; ``"dlr"``:
  Croce & Hein's scale-invariant Difference of Logits Ratio (:mod:`.losses`).
* ``amp=True`` runs the model's forward (and so its backward) under ``torch.autocast``: bfloat16 on CPU,
  float16 on CUDA, or pass the dtype. The gradient arrives in ``x``'s dtype and the fused step runs on the
  full-precision image. With ``amp=False`` an enclosing ``torch.autocast`` region applies as usual.
  float16 gradients of very confident samples can underflow to 0 (those pixels do not move); bfloat16
  has float32's range.
* Outside early stop the step loop never synchronizes with the host, and every step updates one ``x_adv``
  buffer in place. Works with ``torch.compile``d models (early stop's shrinking batch recompiles once for
  dynamic shapes).
"""
from .apgd import apgd, apgd_t
from .classes import APGD, APGDT, BIM, FAB, FABT, FGM, FGSM, FGSM_RS, PGD, PGDL2, Attack, Square
from .fab import fab, fab_t
from .fgsm import fgsm, fgsm_rs
from .losses import LOSSES, Loss, register_loss
from .noise import noise
from .pgd import bim, pgd
from .registry import ATTACKS, AttackEntry, register_attack
from .square import square
from .threats import L2, LINF, NORMS, ThreatModel

__all__ = ["fgsm", "fgsm_rs", "bim", "pgd", "apgd", "apgd_t", "fab", "fab_t", "noise", "Attack", "FGSM", "FGM",
           "FGSM_RS", "BIM", "PGD", "PGDL2", "APGD", "APGDT", "FAB", "FABT", "square", "Square",
           "LOSSES", "Loss", "register_loss", "ATTACKS", "AttackEntry", "register_attack", "ThreatModel", "LINF",
           "L2", "NORMS"]
