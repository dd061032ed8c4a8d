"""Argument checks shared by the attacks, the evaluation, training and the CLI: each error names the argument,
what was expected and what came."""
from __future__ import annotations

import functools
import logging
import math
import numbers

import torch

from ..reference import MAX_BUDGET, compute_dtype
from .losses import get_loss
from .threats import get_threat

# Layouts that x_adv (a clone or empty_like of x) keeps and the fused step's fast path takes.
_LAYOUTS = (torch.contiguous_format, torch.channels_last, torch.channels_last_3d)


def shown(value) -> str:
    """``repr(value)``, shortened for numbers too long to read (e.g. ``10**400``)."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:12]}...{text[-6:]} ({len(text)} characters)"


OUTSIDE_BOUNDS = ("x must lie within the bounds [clip_min, clip_max] = [{lo:g}, {hi:g}] (the attacks keep their "
                  "points within them, so an image outside would move further than eps): pass the images' range")
LABEL_RANGE = "y must hold class indices < {k}, the number of the model's logits"
NEGATIVE_LABELS = ("y must hold class indices >= 0 (a negative label such as cross-entropy's ignore index -100 "
                   "would leave its sample unperturbed)")


def _describe(v) -> str:
    return f"a {v.dtype} tensor" if isinstance(v, torch.Tensor) else type(v).__name__


def check_bool(value, name: str) -> bool:
    """``value`` if it is True or False: a string such as "False" is truthy, and would silently mean True."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


# The largest budget (the ops' rule, csrc/checks.h and reference.MAX_BUDGET), checked here before any work.


def _float_or_inf(value) -> bool:
    """A real number a float holds (infinities included; not NaN, not an int too large for a float)."""
    try:
        return not math.isnan(float(value))
    except OverflowError:
        return False


def _finite_real(value) -> bool:
    try:
        return math.isfinite(value) and abs(value) <= MAX_BUDGET
    except OverflowError:  # an int too large for a float, e.g. 10**400
        return False


def check_scalar_budget(value, name: str):
    """A float budget checked and returned as float; a tensor passed through (checked against x later)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not _finite_real(value) or value < 0:
        raise ValueError(f"{name} must be a finite float >= 0 (at most {MAX_BUDGET:.4g}) or a tensor of per-sample "
                         f"values, got {shown(value)}")
    return float(value)


def check_budget(value, name: str, x: torch.Tensor):
    """eps or alpha: a float >= 0, or a tensor (0-d or [N]) returned as [N] in the ops' compute dtype."""
    value = check_scalar_budget(value, name)
    if not isinstance(value, torch.Tensor):
        return value
    if not value.is_floating_point():
        raise TypeError(f"{name} as a tensor must have a floating-point dtype, got {value.dtype}")
    n = x.shape[0]
    if value.dim() == 0:
        value = value.expand(n)
    if value.shape != (n,):
        raise ValueError(f"{name} as a tensor must have shape [] or [{n}] (one value per sample), "
                         f"got {list(value.shape)}")
    value = value.detach().to(device=x.device, dtype=compute_dtype(x.dtype)).contiguous()
    # One host sync before the attack starts, for an error here rather than from inside the loop.
    if n and bool(((value < 0) | ~value.isfinite() | (value.abs() > MAX_BUDGET)).any()):
        raise ValueError(f"{name} must be finite and >= 0 for every sample (at most {MAX_BUDGET:.4g})")
    return value


def check_bounds(clip_min, clip_max) -> tuple[float, float]:
    for v, name in ((clip_min, "clip_min"), (clip_max, "clip_max")):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not _float_or_inf(v):
            raise ValueError(f"{name} must be a float, got {shown(v)}")
    if not clip_min < clip_max:  # one rule for attacks, evaluation, training and the CLI
        raise ValueError(f"clip_min must be < clip_max, got clip_min={clip_min} and clip_max={clip_max}")
    return float(clip_min), float(clip_max)


def check_loss(loss):
    """A registered loss name (or a Loss), checked; returned as given."""
    get_loss(loss)
    return loss


@functools.lru_cache(maxsize=None)
def cpu_runs_bf16_natively() -> bool:
    """Whether oneDNN runs bfloat16 convolutions on this CPU (AVX-512 BF16 / AMX). Without it ATen takes its
    slow reference convolution: measured 7x slower than float32 (SmallCNN training step, AVX2 EPYC)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def amp_dtype(amp, device_type: str):
    """The autocast dtype amp asks for on this device type, or None for no autocast."""
    if amp is False or amp is None:
        return None
    if amp is True:
        amp = torch.float16 if device_type == "cuda" else torch.bfloat16
    if amp not in (torch.float16, torch.bfloat16):
        raise ValueError(f"amp must be False, True, torch.float16 or torch.bfloat16, got {amp!r}")
    if device_type == "cpu" and amp == torch.bfloat16 and not cpu_runs_bf16_natively():
        _warn_slow_bf16()
    return amp


@functools.lru_cache(maxsize=None)
def _warn_slow_bf16():
    logging.getLogger("robust_ext").warning(
        "robust_ext: this CPU has no native bfloat16 convolutions (oneDNN: no AVX-512 BF16/AMX), so bf16 autocast "
        "runs ATen's slow path, several times slower than float32; use amp=False (--amp off from the CLI) here")


def check_xy(x, y):
    """(x detached in a layout the fused ops take without copies, y as int64 on x's device)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {_describe(x)}")
    if x.dim() < 1:
        raise ValueError("x must have a batch dimension (dim 0), got a 0-d tensor")
    if (not isinstance(y, torch.Tensor) or y.is_floating_point() or y.is_complex()
            or y.dtype == torch.bool):
        raise TypeError(f"y must be an integer tensor of class indices, got {_describe(y)}")
    if y.shape != x.shape[:1]:
        raise ValueError(f"y must have shape [{x.shape[0]}] (one label per sample of x), got {list(y.shape)}")
    x = x.detach()
    if not any(x.is_contiguous(memory_format=f) for f in _LAYOUTS):
        x = x.contiguous()
    y = y.detach().to(device=x.device, dtype=torch.long)
    # Without a host sync (an error at once on the CPU, at the next sync on a GPU): a negative label would
    # be cross-entropy's ignore index (-100), a sample the attack silently leaves unperturbed.
    torch._assert_async((y >= 0).all(), NEGATIVE_LABELS)
    return x, y


def check_images_within(x: torch.Tensor, lo: float, hi: float, source: str = "") -> None:
    """ValueError unless every value of ``x`` lies in ``[lo, hi]`` (one host read: for data sets and evaluations
    before their work; the attacks use :func:`check_within`)."""
    if x.numel():
        low, high = (float(v) for v in torch.aminmax(x.detach().float()))
        if low < lo or high > hi:
            raise ValueError(f"{source}the images lie in [{low:.6g}, {high:.6g}], outside the clip bounds "
                             f"[{lo:g}, {hi:g}] (the attacks keep their points within the bounds: bounds that cut "
                             f"the images would move them further than eps)")


def check_within(x: torch.Tensor, lo: float, hi: float) -> None:
    """``x`` in ``[lo, hi]``, without a host sync (an error at once on the CPU, at the next sync on a GPU): an
    attack keeps its points within the bounds, so an image outside them would move further than eps."""
    if x.numel():
        torch._assert_async(((x >= lo) & (x <= hi)).all(), OUTSIDE_BOUNDS.format(lo=lo, hi=hi))


def check_hparams(params: dict) -> None:
    """The checks that need no input, for the classes' constructors."""
    check_scalar_budget(params["eps"], "eps")
    if params.get("alpha") is not None:
        check_scalar_budget(params["alpha"], "alpha")
    if params.get("steps") is not None:
        check_int(params["steps"], "steps", 1)
    check_int(params.get("restarts", 1), "restarts", 1)
    check_bounds(params["clip_min"], params["clip_max"])
    if "loss" in params:  # not every attack has one (FAB, Square's margin is fixed by the paper)
        check_loss(params["loss"])
    amp_dtype(params.get("amp", False), "cpu")
    get_threat(params.get("norm", "linf"))
