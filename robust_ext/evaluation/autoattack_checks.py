"""The original AutoAttack's sanity checks (fra31/auto-attack ``checks.py``), each a reason to distrust an
evaluation: a randomized model (use the ``rand`` version), probabilities instead of logits, a forward pass that
computes gradients itself (a dynamic defense), points with an all-zero input gradient, and the black-box Square
attack succeeding where the white-box attacks failed.
"""
from __future__ import annotations

import sys

import torch

RANDOMIZED_DRAWS, RANDOMIZED_TOL = 5, 1e-4  # the original's n and alpha
SOFTMAX_TOL = 1e-5
BLACK_BOX = ("square",)  # registry kinds that use no gradient
BLACK_BOX_TOL = 0.002  # the original's alpha: a fraction of the points
UNRELIABLE = "this evaluation may be unreliable"
DYNAMIC_CALLS = frozenset({"grad", "backward", "_make_grads"})  # the original's: torch.autograd's entry points


def randomized(model, x: torch.Tensor, y: torch.Tensor, draws: int = RANDOMIZED_DRAWS,
               tol: float = RANDOMIZED_TOL) -> bool:
    """Do ``draws`` forwards of the same inputs differ: in their number of correct points, or in their
    L2-normalized outputs by more than ``tol``?"""
    outs = []
    with torch.no_grad():
        for _ in range(draws):
            out = model(x).float()
            outs.append(out / (out.norm(dim=1, keepdim=True) + 1e-10))
    correct = {int((o.argmax(1) == y).sum()) for o in outs}
    spread = max((outs[a] - outs[b]).norm(dim=1).max().item() for a in range(draws) for b in range(a + 1, draws))
    return len(correct) > 1 or spread > tol


def dynamic(model, x: torch.Tensor) -> bool:
    """Does one forward of ``x`` call a Python function named as torch.autograd's entry points
    (``torch.autograd.grad``, ``Tensor.backward``, ``_make_grads``)? The original's ``check_dynamic``: a model
    that optimizes at test time (a dynamic defense) may need an adaptive attack beyond AutoAttack. Like the
    original, it reads the names of the Python functions the forward calls (C++ and compiled code are not
    seen), with gradients enabled as they are when an attack runs the model."""
    seen = []

    def trace(frame, event, arg):
        if event == "call" and frame.f_code.co_name in DYNAMIC_CALLS:
            seen.append(frame.f_code.co_name)
        return None  # calls only, no line events

    before = sys.gettrace()
    sys.settrace(trace)
    try:
        with torch.enable_grad():
            model(x)
    finally:
        sys.settrace(before)
    return bool(seen)


def softmax_output(logits: torch.Tensor, tol: float = SOFTMAX_TOL) -> bool:
    """Are the model's outputs probabilities (every row in [0, 1] summing to 1) rather than logits?"""
    out = logits.detach().float()
    return bool(out.numel() and out.max() < 1 + tol and out.min() > -tol and ((out.sum(1) - 1).abs() < tol).all())


def messages(checks: dict, version: str) -> list:
    """The warnings ``checks`` (an :class:`AutoAttackReport`'s) call for."""
    out = []
    if checks.get("randomized"):
        out.append("the model's outputs differ between two forwards of the same inputs: it seems to be a randomized "
                   "defense" + (", evaluate it with version='rand' (EoT)" if version != "rand" else ""))
    if checks.get("dynamic"):
        out.append("the model's forward pass computes gradients (it calls torch.autograd): it seems to be a dynamic "
                   "defense, and AutoAttack may not be enough; evaluate it with an adaptive attack too")
    if checks.get("softmax_output"):
        out.append("the model's outputs are probabilities (in [0, 1], rows summing to 1): the attacks need the "
                   "logits; pass the model without its softmax")
    if checks.get("zero_gradient_points"):
        out.append(f"{checks['zero_gradient_points']} correctly classified points have an all-zero input gradient "
                   "of the cross-entropy loss: gradient-based attacks cannot move them")
    for e, (name, fraction) in checks.get("black_box", {}).items():
        out.append(f"the black-box {name!r} fooled {fraction:.2%} of the points at eps = {e} that every "
                   "white-box attack before it failed on: the gradients may be masked; run Square with more "
                   "queries and restarts, or an adaptive attack")
    return out
