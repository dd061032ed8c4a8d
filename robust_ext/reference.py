"""Pure-PyTorch implementation of every robust_ext op: the run-time fallback when the compiled extension
is absent, and the oracle the tests hold the kernels to.

Each function has the same signature and semantics as its op schema in ``csrc/robust_ext.cpp`` and does
the same operations in the same order with the same casts as the kernels' math headers
(``csrc/<family>/<family>_math.h``, ``csrc/philox.h``): fp32/fp64 results are bit-identical to the
kernels'. Half types (fp16, bf16) are computed in fp32 and rounded once.
"""
from __future__ import annotations

import math

import torch

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


# ---- checks (the same conditions and messages as csrc/checks.h) -------------------------------------

def _check_image(t, name):
    if not isinstance(t, torch.Tensor):
        raise RuntimeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in _FLOATS:
        raise RuntimeError(f"{name} must be float32, float64, float16 or bfloat16, got {t.dtype}")
    _check_no_grad(t, name)


def _check_no_grad(t, name):
    if torch.is_grad_enabled() and t.requires_grad:
        raise RuntimeError(f"{name} requires grad, but robust_ext ops are not differentiable; call them under "
                           f"torch.no_grad() or pass {name}.detach()")


def _check_like(t, name, ref, ref_name):
    _check_image(t, name)
    if t.shape != ref.shape:
        raise RuntimeError(f"{name} must have the same shape as {ref_name} {list(ref.shape)}, got {list(t.shape)}")
    if t.dtype != ref.dtype:
        raise RuntimeError(f"{name} must have the same dtype as {ref_name} ({ref.dtype}), got {t.dtype}")
    if t.device != ref.device:
        raise RuntimeError(f"{name} must be on the same device as {ref_name} ({ref.device}), got {t.device}")


def _check_bounds(clip_min, clip_max):
    if math.isnan(clip_min) or math.isnan(clip_max):
        raise RuntimeError("clip_min and clip_max must not be NaN")
    if clip_min > clip_max:
        raise RuntimeError(f"clip_min must be <= clip_max, got clip_min={clip_min} and clip_max={clip_max}")


def _check_budget(value, per_sample, name, non_negative, x, values=True):
    if per_sample is None:
        if math.isnan(value):
            raise RuntimeError(f"{name} must not be NaN")
        if non_negative and value < 0:
            raise RuntimeError(f"{name} must be >= 0, got {value}")
        return
    t = per_sample
    if t.dtype not in _FLOATS:
        raise RuntimeError(f"{name} as a tensor must be float32, float64, float16 or bfloat16, got {t.dtype}")
    if x.dim() < 1:
        raise RuntimeError(f"{name} is a per-sample tensor, so x needs a batch dimension (dim 0), got a 0-d x")
    if t.dim() != 1 or t.shape[0] != x.shape[0]:
        raise RuntimeError(f"{name} as a tensor must be 1-D with one value per sample ({x.shape[0]}), "
                           f"got shape {list(t.shape)}")
    if t.device != x.device:
        raise RuntimeError(f"{name} must be on the same device as x ({x.device}), got {t.device}")
    _check_no_grad(t, name)
    if not values or not t.numel():  # fake tensors have no values to check
        return
    bad = ((t < 0) | t.isnan()).any() if non_negative else t.isnan().any()
    what = (f"{name} must be >= 0 and not NaN for every sample" if non_negative
            else f"{name} must not be NaN for any sample")
    # A RuntimeError at once on CPU; on a GPU, as csrc/checks.h, no host sync per step: it fails at the
    # next sync. Traceable by torch.compile (a Python ``if`` on ``bad`` is not).
    torch._assert_async(~bad, what)


def _dense(t):
    """ATen's is_non_overlapping_and_dense: some permutation of the dims is contiguous."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda p: p[1]):
        if size != 1:
            if stride != expected:
                return False
            expected *= size
    return True


def _partly_overlap(a, b):
    """ATen's get_overlap_status(a, b) == PARTIAL: dense views of one storage whose byte ranges overlap
    without being the same view. Non-dense views are 'too hard' for ATen too (the kernels copy them)."""
    if a is b or not a.numel() or not b.numel():
        return False
    if not (_dense(a) and _dense(b)):
        return False
    if a.untyped_storage()._cdata != b.untyped_storage()._cdata:  # ATen: the same storage, not just memory
        return False
    a0, b0 = a.data_ptr(), b.data_ptr()
    a1, b1 = a0 + a.numel() * a.element_size(), b0 + b.numel() * b.element_size()
    if (a0, a1) == (b0, b1):
        return a.stride() != b.stride()
    return a0 < b1 and b0 < a1


def _check_writable(x_adv, *inputs):
    """csrc/checks.h check_writable: x_adv may not partly overlap an input (the final ``copy_`` refuses an
    x_adv whose elements alias each other, with ATen's message)."""
    if torch.compiler.is_compiling():  # fake tensors have no memory; the extension's fake kernels skip it too
        return
    if any(_partly_overlap(x_adv, t) for t in inputs):
        raise RuntimeError("unsupported operation: some elements of the input tensor and the written-to tensor "
                           "refer to a single memory location, which may cause the results to be incorrect. "
                           "Please clone() the tensor before performing the operation.")


def _check_step(x_adv, grad, x, alpha, eps, clip_min, clip_max, alpha_t, eps_t, values=True):
    _check_project(x_adv, x, eps, clip_min, clip_max, eps_t, values)
    _check_like(grad, "grad", x, "x")
    _check_budget(alpha, alpha_t, "alpha", False, x, values)


def _check_project(x_adv, x, eps, clip_min, clip_max, eps_t, values=True):
    _check_image(x, "x")
    _check_like(x_adv, "x_adv", x, "x")
    _check_budget(eps, eps_t, "eps", True, x, values)
    _check_bounds(clip_min, clip_max)


# ---- the L-inf math (csrc/linf/linf_math.h) ---------------------------------------------------------

def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the math runs in: float64 for float64, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _budget(value, per_sample, x):
    """A float, or the per-sample tensor in the compute dtype shaped to broadcast over x's dim 0."""
    if per_sample is None:
        return value
    return per_sample.to(compute_dtype(x.dtype)).reshape((-1,) + (1,) * (x.dim() - 1))


def sign_or_zero(g: torch.Tensor) -> torch.Tensor:
    """torch.sign, except NaN -> 0 (a NaN gradient moves nothing)."""
    return (g > 0).to(g.dtype) - (g < 0).to(g.dtype)


def _project(v, x, eps, lo, hi):
    return torch.clamp(x + torch.clamp(v - x, -eps, eps), lo, hi)


def _step_math(x_adv, grad, x, alpha, eps, clip_min, clip_max, alpha_t, eps_t):
    ct = compute_dtype(x.dtype)
    xa, g, xx = x_adv.to(ct), grad.to(ct), x.to(ct)
    a, e = _budget(alpha, alpha_t, x), _budget(eps, eps_t, x)
    return _project(xa + a * sign_or_zero(g), xx, e, clip_min, clip_max).to(x.dtype)


def linf_step(x_adv, grad, x, alpha, eps, clip_min, clip_max, alpha_t=None, eps_t=None):
    _check_step(x_adv, grad, x, alpha, eps, clip_min, clip_max, alpha_t, eps_t)
    out = torch.empty_like(x_adv)
    out.copy_(_step_math(x_adv, grad, x, alpha, eps, clip_min, clip_max, alpha_t, eps_t))
    return out


def linf_step_(x_adv, grad, x, alpha, eps, clip_min, clip_max, alpha_t=None, eps_t=None):
    _check_step(x_adv, grad, x, alpha, eps, clip_min, clip_max, alpha_t, eps_t)
    _check_writable(x_adv, grad, x)
    x_adv.copy_(_step_math(x_adv, grad, x, alpha, eps, clip_min, clip_max, alpha_t, eps_t))


def _project_math(x_adv, x, eps, clip_min, clip_max, eps_t):
    ct = compute_dtype(x.dtype)
    return _project(x_adv.to(ct), x.to(ct), _budget(eps, eps_t, x), clip_min, clip_max).to(x.dtype)


def linf_project(x_adv, x, eps, clip_min, clip_max, eps_t=None):
    _check_project(x_adv, x, eps, clip_min, clip_max, eps_t)
    out = torch.empty_like(x_adv)
    out.copy_(_project_math(x_adv, x, eps, clip_min, clip_max, eps_t))
    return out


def linf_project_(x_adv, x, eps, clip_min, clip_max, eps_t=None):
    _check_project(x_adv, x, eps, clip_min, clip_max, eps_t)
    _check_writable(x_adv, x)
    x_adv.copy_(_project_math(x_adv, x, eps, clip_min, clip_max, eps_t))


def _check_fgsm(x, grad, eps, clip_min, clip_max, eps_t, values=True):
    _check_image(x, "x")
    _check_like(grad, "grad", x, "x")
    _check_budget(eps, eps_t, "eps", True, x, values)
    _check_bounds(clip_min, clip_max)


def _check_random_init(x, eps, clip_min, clip_max, seed, eps_t, values=True):
    _check_image(x, "x")
    _check_budget(eps, eps_t, "eps", True, x, values)
    _check_bounds(clip_min, clip_max)
    if not (isinstance(seed, torch.Tensor) and seed.dim() == 0 and seed.dtype == torch.int64):
        raise RuntimeError("seed must be a 0-d int64 tensor")


def fgsm(x, grad, eps, clip_min, clip_max, eps_t=None):
    _check_fgsm(x, grad, eps, clip_min, clip_max, eps_t)
    ct = compute_dtype(x.dtype)
    e = _budget(eps, eps_t, x)
    out = torch.empty_like(x)
    out.copy_(torch.clamp(x.to(ct) + e * sign_or_zero(grad.to(ct)), clip_min, clip_max))
    return out


# ---- Philox4x32-10 in int64 tensor arithmetic (csrc/philox.h) ----------------------------------------

_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_MASK32 = 0xFFFFFFFF


def _mulhilo(m: int, c: torch.Tensor):
    """(hi, lo) 32-bit halves of m * c for 32-bit m and c, without overflowing int64."""
    a = m * (c & 0xFFFF)           # < 2**48
    b = m * (c >> 16)              # < 2**48
    hi = (b + (a >> 16)) >> 16
    lo = (((b & 0xFFFF) << 16) + a) & _MASK32
    return hi, lo


def philox4x32_10(counter: torch.Tensor, seed) -> torch.Tensor:
    """Philox4x32-10 of 64-bit counters (int64 tensor, upper words 0) under a 64-bit key (a Python int, or
    a 0-d int64 tensor read as its two's-complement bits: no host sync): [..., 4] words."""
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    c0, c1 = counter & _MASK32, (counter >> 32) & _MASK32
    c2 = torch.zeros_like(counter)
    c3 = torch.zeros_like(counter)
    for _ in range(10):
        hi0, lo0 = _mulhilo(_M0, c0)
        hi1, lo1 = _mulhilo(_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _W0) & _MASK32, (k1 + _W1) & _MASK32
    return torch.stack((c0, c1, c2, c3), dim=-1)


def philox_words(n: int, seed, device) -> torch.Tensor:
    """The 32-bit word (as int64) element i of a flat tensor draws: word (i/16)%4 of counter (i/64)*16 + i%16."""
    blocks = (n + 63) // 64
    counters = torch.arange(blocks * 16, dtype=torch.int64, device=device)
    w = philox4x32_10(counters, seed).reshape(blocks, 16, 4).permute(0, 2, 1)
    return w.reshape(-1)[:n]


def unit_symmetric(r: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """32-bit words to uniform values in [-1, 1): 24 bits for float32, 32 bits for float64 (exact)."""
    if dtype == torch.float64:
        return (r - 2**31).to(torch.float64) * 2.0**-31
    return ((r >> 8) - 2**23).to(torch.float32) * 2.0**-23


def linf_random_init(x, eps, clip_min, clip_max, seed, eps_t=None):
    _check_random_init(x, eps, clip_min, clip_max, seed, eps_t)
    ct = compute_dtype(x.dtype)
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    u = unit_symmetric(philox_words(x.numel(), seed, x.device), ct).reshape(x.shape)
    out.copy_(torch.clamp(x.to(ct) + _budget(eps, eps_t, x) * u, clip_min, clip_max))
    return out


def relu_max_pool2d(x):
    """``max_pool2d(relu(x), kernel_size=2, stride=2)``: the fused pooling op's semantics, value and gradient."""
    return torch.nn.functional.max_pool2d(torch.relu(x), 2)


def batch_norm_relu(x, running_mean, running_var, weight=None, bias=None, eps=1e-5):
    """``relu(batch_norm(x))`` with the running statistics (inference mode), channel dim 1: computed in
    float32 (float64 for float64 ``x``) as ``x * scale + shift`` with ``scale = reciprocal(sqrt(running_var
    + eps)) * weight`` and ``shift = bias - running_mean * scale`` (ATen's inference terms, in its order),
    ReLU, then rounded to ``x``'s dtype: the semantics of ``robust_ext::batch_norm_relu``, value and
    gradient (the kernel derives scale and shift with these same ATen ops)."""
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    shape = (1, -1) + (1,) * (x.dim() - 2)
    scale = torch.reciprocal(torch.sqrt(running_var.to(ct) + eps))
    if weight is not None:
        scale = scale * weight.to(ct)
    shift = running_mean.to(ct) * scale
    shift = torch.neg(shift) if bias is None else bias.to(ct) - shift
    # ReLU on the rounded value, as the kernel (and ATen's relu after a bf16/fp16 batch_norm): a positive
    # value that rounds to 0 takes no gradient; a value <= 0 gives +0; NaN passes value and gradient.
    y = (x.to(ct) * scale.view(shape) + shift.view(shape)).to(x.dtype)
    return torch.where(y <= 0, 0, y)
