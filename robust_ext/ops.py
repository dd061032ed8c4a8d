"""The fused attack ops: robust_ext's public op API.

Every op has a functional form and, where it updates an adversarial example, an in-place ``_`` form
that mutates ``x_adv`` and returns it. ``alpha`` and ``eps`` are Python floats or tensors with one value
per sample (dim 0 of ``x``; a 0-d tensor applies to every sample). A negative ``alpha`` steps *down* the
gradient: that is the targeted attack's step. ``eps`` must be >= 0.

Semantics of the L-inf ops (``csrc/linf/linf_math.h``):

* ``sign(0) = 0`` as ``torch.sign``; a NaN gradient element counts as 0, so that element does not move
  (NaN is never written into ``x_adv`` from the gradient); a +-inf gradient element has sign +-1.
* projection then clipping: ``clip(x + clamp(v - x, -eps, eps), clip_min, clip_max)``, torchattacks'
  operation order, so fp32 results are bit-identical to torchattacks' PGD update.
* float16/bfloat16 are computed in float32 and rounded once; fp32/fp64 are bit-identical to
  :mod:`robust_ext.reference`.

The L2 ops (``csrc/l2/l2_math.h``) work per sample (dim 0): see :func:`l2_step`. Their sums of squares
have one fixed order, so results do not depend on thread count, vector width, memory layout or device
(CPU and CUDA compute the same bits). fp32/fp16/bf16 results are bit-identical to
:mod:`robust_ext.reference`, fp64 ones agree to a few ulps (tests/test_l2_ops.py states the bound).

The compiled extension serves the ops when it is built; otherwise (or with
``ROBUST_EXT_BACKEND=reference``) :mod:`robust_ext.reference` does, after a one-time warning.
"""
from __future__ import annotations

import logging
import math
import os
import warnings
from types import SimpleNamespace

import torch

from . import reference

__all__ = ["linf_step", "linf_step_", "linf_project", "linf_project_", "linf_apgd_update", "linf_apgd_update_", "fgsm",
           "linf_random_init", "l2_step", "l2_step_", "l2_project", "l2_project_", "l2_apgd_update", "l2_apgd_update_",
           "fgm", "l2_random_init", "backend", "build_info"]

log = logging.getLogger("robust_ext")

_OP_NAMES = ("linf_step", "linf_step_", "linf_project", "linf_project_", "linf_apgd_update", "linf_apgd_update_",
             "fgsm", "linf_random_init", "l2_step", "l2_step_", "l2_project", "l2_project_", "l2_apgd_update",
             "l2_apgd_update_", "fgm", "l2_random_init")


def _load_extension():
    """(ops namespace or None, reason) honouring ROBUST_EXT_BACKEND = auto | extension | reference."""
    choice = os.environ.get("ROBUST_EXT_BACKEND", "auto").strip().lower()
    if choice not in ("auto", "extension", "reference"):
        raise ValueError(f"ROBUST_EXT_BACKEND must be auto, extension or reference, got {choice!r}")
    if choice == "reference":
        log.info("robust_ext: ROBUST_EXT_BACKEND=reference, using the pure-PyTorch ops")
        return None, "forced by ROBUST_EXT_BACKEND=reference"
    try:
        from . import _C  # noqa: F401  (registers the robust_ext:: ops)
    except ImportError as e:
        if choice == "extension":
            raise ImportError(f"ROBUST_EXT_BACKEND=extension but robust_ext._C does not load: {e}") from e
        warnings.warn(f"robust_ext: the compiled extension is not available ({e}); every op runs on the "
                      "slower pure-PyTorch reference. Rebuild with `pip install --no-build-isolation .`.",
                      RuntimeWarning, stacklevel=3)
        return None, f"extension not loaded: {e}"
    # The overloads themselves: calling them skips the overload resolution of torch.ops.robust_ext.<op>.
    return SimpleNamespace(**{n: getattr(torch.ops.robust_ext, n).default for n in _OP_NAMES}), "extension loaded"


_EXT, _REASON = _load_extension()


def _has_kernel(key: str) -> bool:
    return _EXT is not None and torch._C._dispatch_has_kernel_for_dispatch_key("robust_ext::linf_step", key)


_REF = SimpleNamespace(**{name: getattr(reference, name) for name in _OP_NAMES})
_IMPL = {"cpu": _EXT if _has_kernel("CPU") else _REF, "cuda": _EXT if _has_kernel("CUDA") else _REF}


def backend() -> dict:
    """Which implementation serves each device: {'cpu': 'extension' | 'reference', 'cuda': ..., 'reason': ...}."""
    name = {id(_EXT): "extension", id(_REF): "reference"}
    return {"cpu": name[id(_IMPL["cpu"])], "cuda": name[id(_IMPL["cuda"])], "reason": _REASON}


def build_info() -> str:
    """How the extension was built (torch version, threading, selected CPU ISA, CUDA), or why it is absent."""
    return torch.ops.robust_ext.build_info() if _EXT is not None else f"no extension ({_REASON})"


def _impl(x):
    # is_cpu / is_cuda: cheaper than x.device.type, which matters at ~2 us per op call
    try:
        return _IMPL["cpu"] if x.is_cpu else (_IMPL["cuda"] if x.is_cuda else _REF)
    except AttributeError:
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}") from None


def _budget(value, name: str, x):
    """A budget as the schema takes it: (float, None) or (0.0, per-sample tensor)."""
    if type(value) is float:
        return value, None
    if isinstance(value, torch.Tensor):
        if value.dim() == 0 and isinstance(x, torch.Tensor) and x.dim() > 0:
            value = value.expand(x.shape[0])
        return 0.0, value
    if isinstance(value, (float, int)) and not isinstance(value, bool):
        try:
            return float(value), None
        except OverflowError:  # an int too large for a float (10**400): the ops' finiteness check names it
            return (math.inf if value > 0 else -math.inf), None
    raise TypeError(f"{name} must be a float or a tensor with one value per sample, got {type(value).__name__}")


def _bound(value, name: str) -> float:
    if type(value) is float:
        return value
    if isinstance(value, (float, int)) and not isinstance(value, bool):
        return float(value)
    raise TypeError(f"{name} must be a float, got {type(value).__name__}")


def _step_args(x, alpha, eps, clip_min, clip_max):
    """(alpha, eps, clip_min, clip_max, alpha_t, eps_t) in the schema's order and types."""
    a, a_t = _budget(alpha, "alpha", x)
    e, e_t = _budget(eps, "eps", x)
    return a, e, _bound(clip_min, "clip_min"), _bound(clip_max, "clip_max"), a_t, e_t


def _apgd_args(x, alpha, eps, momentum, clip_min, clip_max):
    """(alpha, eps, momentum, clip_min, clip_max, alpha_t, eps_t) in the schema's order and types."""
    a, e, lo, hi, a_t, e_t = _step_args(x, alpha, eps, clip_min, clip_max)
    return a, e, _bound(momentum, "momentum"), lo, hi, a_t, e_t


def _ball_args(x, eps, clip_min, clip_max):
    """(eps, clip_min, clip_max, eps_t) in the schema's order and types."""
    e, e_t = _budget(eps, "eps", x)
    return e, _bound(clip_min, "clip_min"), _bound(clip_max, "clip_max"), e_t


def linf_step(x_adv, grad, x, alpha, eps, clip_min=0.0, clip_max=1.0):
    """One BIM/PGD step, fused: ``clip(project_eps(x_adv + alpha * sign(grad)))`` in one memory pass.

    Returns a new tensor with ``x_adv``'s layout. ``alpha < 0`` descends (targeted attacks).
    """
    return _impl(x).linf_step(x_adv, grad, x, *_step_args(x, alpha, eps, clip_min, clip_max))


def linf_step_(x_adv, grad, x, alpha, eps, clip_min=0.0, clip_max=1.0):
    """In-place :func:`linf_step`: updates and returns ``x_adv``."""
    _impl(x).linf_step_(x_adv, grad, x, *_step_args(x, alpha, eps, clip_min, clip_max))
    return x_adv


def linf_project(x_adv, x, eps, clip_min=0.0, clip_max=1.0):
    """Projection onto the L-inf ball of radius ``eps`` around ``x``, then clipping: for custom step rules."""
    return _impl(x).linf_project(x_adv, x, *_ball_args(x, eps, clip_min, clip_max))


def linf_project_(x_adv, x, eps, clip_min=0.0, clip_max=1.0):
    """In-place :func:`linf_project`: updates and returns ``x_adv``."""
    _impl(x).linf_project_(x_adv, x, *_ball_args(x, eps, clip_min, clip_max))
    return x_adv


def linf_apgd_update(x_adv, x_prev, grad, x, alpha, eps, momentum, clip_min=0.0, clip_max=1.0):
    """APGD's update (Croce & Hein 2020) in the L-inf ball, fused: ``z = linf_step(x_adv, grad, x, alpha, eps)``
    (rounded to the dtype, as the step returns it), then the momentum point
    ``x_adv + momentum (z - x_adv) + (1 - momentum)(x_adv - x_prev)``, computed as
    ``((z - x_adv) * momentum + x_adv) + (x_adv - x_prev) * (1 - momentum)``, projected and clipped as
    :func:`linf_project` does; in one memory pass. ``momentum`` in [0, 1]; ``momentum == 1`` is the step
    itself (``x_prev`` is not read). In fp32/fp64 the result is bit-identical to those ops composed in PyTorch
    (``robust_ext.attacks.apgd`` did so). Returns a new tensor with ``x_adv``'s layout.
    """
    return _impl(x).linf_apgd_update(x_adv, x_prev, grad, x, *_apgd_args(x, alpha, eps, momentum, clip_min, clip_max))


def linf_apgd_update_(x_adv, x_prev, grad, x, alpha, eps, momentum, clip_min=0.0, clip_max=1.0):
    """In-place :func:`linf_apgd_update`: updates and returns ``x_adv`` (``x_prev`` may be ``x_adv`` itself)."""
    _impl(x).linf_apgd_update_(x_adv, x_prev, grad, x, *_apgd_args(x, alpha, eps, momentum, clip_min, clip_max))
    return x_adv


def fgsm(x, grad, eps, clip_min=0.0, clip_max=1.0):
    """FGSM (Goodfellow et al. 2015): ``clip(x + eps * sign(grad))``."""
    return _impl(x).fgsm(x, grad, *_ball_args(x, eps, clip_min, clip_max))


def _seed(x, generator):
    """A 64-bit Philox key drawn from ``generator``, by default from the CPU default generator whatever x's
    device: a CPU scalar (no device sync), and the same noise on every device for one torch.manual_seed."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    device = generator.device if generator is not None else torch.device("cpu")
    if device.type != "cpu" and device != x.device:
        raise ValueError(f"generator must be a CPU generator or on x's device ({x.device}), got {device}")
    return torch.randint(-2**63, 2**63 - 1, (), dtype=torch.int64, device=device, generator=generator)


def linf_random_init(x, eps, clip_min=0.0, clip_max=1.0, generator=None):
    """A uniform random start in the eps-ball: ``clip(x + U(-eps, eps))``.

    The noise comes from Philox4x32-10 inside the kernel, keyed by one 64-bit draw from ``generator``
    (default: the CPU default generator): ``torch.manual_seed`` or a seeded ``torch.Generator``
    reproduces it, and it is the same for any thread count, memory layout of ``x`` and device. Resolution: 24 random bits per
    element for float32/float16/bfloat16, 32 for float64.
    """
    impl = _impl(x)
    e, lo, hi, e_t = _ball_args(x, eps, clip_min, clip_max)
    return impl.linf_random_init(x, e, lo, hi, _seed(x, generator), e_t)


def l2_step(x_adv, grad, x, alpha, eps, clip_min=0.0, clip_max=1.0):
    """One PGD-L2 step, fused: per sample ``d = x_adv - x + alpha * g / ||g||_2``, then
    ``clip(x + d * min(1, eps / ||d||_2))``.

    Clipping after the projection keeps the point in the ball: the ball around ``x`` and the box are both
    convex and contain ``x`` (when x is in the box), so moving toward the box never leaves the ball.
    A NaN gradient entry counts as 0; a sample whose gradient is all zero (or NaN) does not move (its
    ``d = x_adv - x`` is still projected); nothing divides by zero. The norm of ``g`` is scale-free: tiny
    or huge gradients are scaled by a power of two before squaring, and a gradient with infinite entries
    moves along those entries only. (torchattacks' PGDL2 divides by ``||g|| + 1e-10`` instead, which
    shortens the step of a gradient whose norm is not >> 1e-10 and moves a zero gradient by 0 as well.)
    ``alpha < 0`` descends (targeted attacks). ``eps = 0`` returns ``x``. NaN or inf in ``x_adv`` or ``x``
    is not supported (NaN propagates into the sample). Returns a new tensor with ``x_adv``'s layout;
    inputs that are not contiguous are computed on contiguous copies.
    """
    return _impl(x).l2_step(x_adv, grad, x, *_step_args(x, alpha, eps, clip_min, clip_max))


def l2_step_(x_adv, grad, x, alpha, eps, clip_min=0.0, clip_max=1.0):
    """In-place :func:`l2_step`: updates and returns ``x_adv``."""
    _impl(x).l2_step_(x_adv, grad, x, *_step_args(x, alpha, eps, clip_min, clip_max))
    return x_adv


def l2_project(x_adv, x, eps, clip_min=0.0, clip_max=1.0):
    """Projection onto the L2 ball of radius ``eps`` around ``x`` (per sample), then clipping."""
    return _impl(x).l2_project(x_adv, x, *_ball_args(x, eps, clip_min, clip_max))


def l2_project_(x_adv, x, eps, clip_min=0.0, clip_max=1.0):
    """In-place :func:`l2_project`: updates and returns ``x_adv``."""
    _impl(x).l2_project_(x_adv, x, *_ball_args(x, eps, clip_min, clip_max))
    return x_adv


def l2_apgd_update(x_adv, x_prev, grad, x, alpha, eps, momentum, clip_min=0.0, clip_max=1.0):
    """APGD's update (Croce & Hein 2020) in the L2 ball, fused: per sample ``z = l2_step(x_adv, grad, x, alpha,
    eps)`` (rounded to the dtype, as the step returns it), then the momentum point
    ``v = ((z - x_adv) * momentum + x_adv) + (x_adv - x_prev) * (1 - momentum)`` and its projection
    ``clip(x + d * min(1, eps / ||d||_2))`` with ``d = v - x``, as :func:`l2_project` does. Three sums of squares
    per sample in the L2 ops' fixed order (the result does not depend on thread count, layout or device), one
    write. ``momentum`` in [0, 1]; ``momentum == 1`` is the step itself (``x_prev`` is not read). In
    fp32/fp64 the result is bit-identical to those ops composed in PyTorch. Returns a new tensor with
    ``x_adv``'s layout.
    """
    return _impl(x).l2_apgd_update(x_adv, x_prev, grad, x, *_apgd_args(x, alpha, eps, momentum, clip_min, clip_max))


def l2_apgd_update_(x_adv, x_prev, grad, x, alpha, eps, momentum, clip_min=0.0, clip_max=1.0):
    """In-place :func:`l2_apgd_update`: updates and returns ``x_adv`` (``x_prev`` may be ``x_adv`` itself)."""
    _impl(x).l2_apgd_update_(x_adv, x_prev, grad, x, *_apgd_args(x, alpha, eps, momentum, clip_min, clip_max))
    return x_adv


def fgm(x, grad, eps, clip_min=0.0, clip_max=1.0):
    """FGM, the L2 fast gradient method (Goodfellow et al. 2015; Miyato et al. 2017):
    ``clip(x + eps * g / ||g||_2)`` per sample, with :func:`l2_step`'s gradient rules."""
    return _impl(x).fgm(x, grad, *_ball_args(x, eps, clip_min, clip_max))


def l2_random_init(x, eps, clip_min=0.0, clip_max=1.0, generator=None):
    """A uniform random start in the L2 ball of radius ``eps`` around each sample, then clipped.

    Construction (``csrc/l2/l2_math.h``): a direction ``z ~ N(0, I)`` by Box-Muller on the Philox4x32-10
    words of :func:`linf_random_init`'s element contract (words 0 and 1 of a counter give the cosine and
    sine deviates of the elements drawing them, words 2 and 3 likewise; 24 random bits per uniform, 32 for
    float64), a radius ``eps * U^(1/n)`` with ``n`` the sample's element count and ``U`` from word 0 of
    Philox stream 1 at counter = sample index, then ``clip(x + z * radius / ||z||)``. log, sin/cos and exp
    are fixed polynomials (IEEE arithmetic and sqrt only), so the values depend on the seed alone: not on
    thread count, vector width, memory layout or device. The seed is one 64-bit draw from ``generator``
    (default: the CPU default generator), as for :func:`linf_random_init`.
    """
    impl = _impl(x)
    e, lo, hi, e_t = _ball_args(x, eps, clip_min, clip_max)
    return impl.l2_random_init(x, e, lo, hi, _seed(x, generator), e_t)


def _register_fakes():
    """Meta kernels: shapes, dtypes and strides of the results, for torch.compile and FakeTensor."""
    lib = "robust_ext::"
    for norm, single, init in (("linf", "fgsm", "linf_random_init"), ("l2", "fgm", "l2_random_init")):
        @torch.library.register_fake(lib + f"{norm}_step")
        def _(x_adv, grad, x, alpha, eps, clip_min, clip_max, alpha_t=None, eps_t=None):
            reference._check_step(x_adv, grad, x, alpha, eps, clip_min, clip_max, alpha_t, eps_t, values=False)
            return torch.empty_like(x_adv)

        @torch.library.register_fake(lib + f"{norm}_step_")
        def _(x_adv, grad, x, alpha, eps, clip_min, clip_max, alpha_t=None, eps_t=None):
            reference._check_step(x_adv, grad, x, alpha, eps, clip_min, clip_max, alpha_t, eps_t, values=False)

        @torch.library.register_fake(lib + f"{norm}_project")
        def _(x_adv, x, eps, clip_min, clip_max, eps_t=None):
            reference._check_project(x_adv, x, eps, clip_min, clip_max, eps_t, values=False)
            return torch.empty_like(x_adv)

        @torch.library.register_fake(lib + f"{norm}_project_")
        def _(x_adv, x, eps, clip_min, clip_max, eps_t=None):
            reference._check_project(x_adv, x, eps, clip_min, clip_max, eps_t, values=False)

        @torch.library.register_fake(lib + f"{norm}_apgd_update")
        def _(x_adv, x_prev, grad, x, alpha, eps, momentum, clip_min, clip_max, alpha_t=None, eps_t=None):
            reference._check_apgd_update(x_adv, x_prev, grad, x, alpha, eps, momentum, clip_min, clip_max, alpha_t,
                                         eps_t, values=False)
            return torch.empty_like(x_adv)

        @torch.library.register_fake(lib + f"{norm}_apgd_update_")
        def _(x_adv, x_prev, grad, x, alpha, eps, momentum, clip_min, clip_max, alpha_t=None, eps_t=None):
            reference._check_apgd_update(x_adv, x_prev, grad, x, alpha, eps, momentum, clip_min, clip_max, alpha_t,
                                         eps_t, values=False)

        @torch.library.register_fake(lib + single)
        def _(x, grad, eps, clip_min, clip_max, eps_t=None):
            reference._check_fgsm(x, grad, eps, clip_min, clip_max, eps_t, values=False)
            return torch.empty_like(x)

        @torch.library.register_fake(lib + init)
        def _(x, eps, clip_min, clip_max, seed, eps_t=None):
            reference._check_random_init(x, eps, clip_min, clip_max, seed, eps_t, values=False)
            return torch.empty_like(x)

if _EXT is not None:
    _register_fakes()
