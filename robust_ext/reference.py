"""Pure-PyTorch implementation of every robust_ext op: the run-time fallback when the compiled extension
is absent, and the oracle the tests hold the kernels to.

Each function has the same signature and semantics as its op schema in ``csrc/robust_ext.cpp`` and does
the same operations in the same order with the same casts as the kernels' math headers
(``csrc/<family>/<family>_math.h``, ``csrc/philox.h``): fp32/fp64 results are bit-identical to the
kernels' (the L2 ops' fp64 ones agree to a few ulps: ATen's sqrt, see the L2 section). Half types (fp16,
bf16) are computed in fp32 and rounded once.
"""
from __future__ import annotations

import math
import struct

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


# csrc/checks.h kMaxBudget: float32's max. An infinite (or overflowing) budget times a zero gradient element
# would write NaN, which the ops never do.
MAX_BUDGET = torch.finfo(torch.float32).max


def _check_budget(value, per_sample, name, non_negative, x, values=True):
    if per_sample is None:
        if math.isnan(value):
            raise RuntimeError(f"{name} must not be NaN")
        if non_negative and value < 0:
            raise RuntimeError(f"{name} must be >= 0, got {value}")
        if abs(value) > MAX_BUDGET:
            raise RuntimeError(f"{name} must be finite and at most {MAX_BUDGET:g} in magnitude (an infinite budget "
                               f"times a zero gradient would be NaN), got {value}")
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
    bad = t.isnan() | (t.double().abs() > MAX_BUDGET)
    bad = (bad | (t < 0)).any() if non_negative else bad.any()
    what = (f"{name} must be >= 0 and not NaN for every sample, and finite (at most float32's max)" if non_negative
            else f"{name} must not be NaN for any sample, and finite (at most float32's max)")
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


def may_self_overlap(t):
    """csrc/checks.h may_self_overlap: two elements of ``t`` may share memory (exact for strides >= 0)."""
    if t.numel() <= 1 or _dense(t):
        return False
    reach = 0
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz > 1):
        if stride <= reach:
            return True
        reach += stride * (size - 1)
    return False


def _overlap(a, b):
    """ATen's assert_no_overlap condition: the same storage and intersecting byte ranges."""
    if not a.numel() or not b.numel() or a.untyped_storage()._cdata != b.untyped_storage()._cdata:
        return False
    lo = lambda t: t.data_ptr() + sum(min(0, st) * (sz - 1) for st, sz in zip(t.stride(), t.shape)) * t.element_size()  # noqa: E731
    hi = lambda t: t.data_ptr() + (sum(max(0, st) * (sz - 1) for st, sz in zip(t.stride(), t.shape)) + 1) * t.element_size()  # noqa: E731
    return lo(a) < hi(b) and lo(b) < hi(a)


_SHARED = ("unsupported operation: some elements of the input tensor and the written-to tensor refer to a single "
           "memory location, which may cause the results to be incorrect. Please clone() the tensor before "
           "performing the operation.")


def _check_writable(x_adv, *inputs, budgets=()):
    """csrc/checks.h check_writable: no element of x_adv may alias another, x_adv may not partly overlap an
    input, and a per-sample budget may not overlap x_adv at all (ATen's messages)."""
    if torch.compiler.is_compiling():  # fake tensors have no memory; the extension's fake kernels skip it too
        return
    if may_self_overlap(x_adv):
        raise RuntimeError("unsupported operation: more than one element of the written-to tensor refers to a single "
                           "memory location. Please clone() the tensor before performing the operation.")
    if any(_partly_overlap(x_adv, t) for t in inputs) or any(b is not None and _overlap(x_adv, b) for b in budgets):
        raise RuntimeError(_SHARED)


def _check_step(x_adv, grad, x, alpha, eps, clip_min, clip_max, alpha_t, eps_t, values=True):
    _check_project(x_adv, x, eps, clip_min, clip_max, eps_t, values)
    _check_like(grad, "grad", x, "x")
    _check_budget(alpha, alpha_t, "alpha", False, x, values)


def _check_project(x_adv, x, eps, clip_min, clip_max, eps_t, values=True):
    _check_image(x, "x")
    _check_like(x_adv, "x_adv", x, "x")
    _check_budget(eps, eps_t, "eps", True, x, values)
    _check_bounds(clip_min, clip_max)


def _check_apgd_update(x_adv, x_prev, grad, x, alpha, eps, momentum, clip_min, clip_max, alpha_t, eps_t,
                       values=True):
    _check_step(x_adv, grad, x, alpha, eps, clip_min, clip_max, alpha_t, eps_t, values)
    _check_like(x_prev, "x_prev", x, "x")
    if not 0.0 <= momentum <= 1.0:
        raise RuntimeError(f"momentum must be in [0, 1], got {momentum}")


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
    _check_writable(x_adv, grad, x, budgets=(alpha_t, eps_t))
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
    _check_writable(x_adv, x, budgets=(eps_t,))
    x_adv.copy_(_project_math(x_adv, x, eps, clip_min, clip_max, eps_t))


def _apgd_momentum(z, x_adv, x_prev, momentum):
    """csrc/compute.h apgd_momentum: x_adv + m (z - x_adv) + (1 - m)(x_adv - x_prev) in the reference
    implementation's order, one rounding per operation (m and the Python float 1 - m rounded to the dtype)."""
    return ((z - x_adv) * momentum + x_adv) + (x_adv - x_prev) * (1.0 - momentum)


def _linf_apgd_math(x_adv, x_prev, grad, x, alpha, eps, momentum, clip_min, clip_max, alpha_t, eps_t):
    z = _step_math(x_adv, grad, x, alpha, eps, clip_min, clip_max, alpha_t, eps_t)  # rounded to x's dtype
    if momentum == 1.0:  # the step itself (ball_ops.h)
        return z
    ct = compute_dtype(x.dtype)
    v = _apgd_momentum(z.to(ct), x_adv.to(ct), x_prev.to(ct), momentum)
    return _project(v, x.to(ct), _budget(eps, eps_t, x), clip_min, clip_max).to(x.dtype)


def linf_apgd_update(x_adv, x_prev, grad, x, alpha, eps, momentum, clip_min, clip_max, alpha_t=None, eps_t=None):
    _check_apgd_update(x_adv, x_prev, grad, x, alpha, eps, momentum, clip_min, clip_max, alpha_t, eps_t)
    out = torch.empty_like(x_adv)
    out.copy_(_linf_apgd_math(x_adv, x_prev, grad, x, alpha, eps, momentum, clip_min, clip_max, alpha_t, eps_t))
    return out


def linf_apgd_update_(x_adv, x_prev, grad, x, alpha, eps, momentum, clip_min, clip_max, alpha_t=None, eps_t=None):
    _check_apgd_update(x_adv, x_prev, grad, x, alpha, eps, momentum, clip_min, clip_max, alpha_t, eps_t)
    _check_writable(x_adv, x_prev, grad, x, budgets=(alpha_t, eps_t))
    x_adv.copy_(_linf_apgd_math(x_adv, x_prev, grad, x, alpha, eps, momentum, clip_min, clip_max, alpha_t, eps_t))


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


def philox4x32_10(counter: torch.Tensor, seed, stream: int = 0) -> torch.Tensor:
    """Philox4x32-10 of 64-bit counters (int64 tensor; third counter word ``stream``, fourth 0) under a
    64-bit key (a Python int, or a 0-d int64 tensor read as its two's-complement bits: no host sync):
    [..., 4] words."""
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    c0, c1 = counter & _MASK32, (counter >> 32) & _MASK32
    c2 = torch.full_like(counter, stream)
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


# ---- the L2 math (csrc/l2/l2_math.h) ----------------------------------------------------------------
#
# The same operations in the same order, sums of squares included (l2_math.h's lanes and trees), as the
# kernels. Only sqrt differs in how it is reached: ATen's vectorized CPU sqrt is not always correctly
# rounded, so float32 takes it in float64 and rounds (correctly rounded: a float32's square root is never
# within 2^-49 of a float32 rounding boundary); float64 uses torch.sqrt, which can be 1 ulp off the
# kernels' correctly rounded sqrt. So fp32/fp16/bf16 results are bit-identical to the kernels, fp64 ones
# agree to a few ulps (tests/test_l2_ops.py states the bound).

_SUM_LANES, _SUM_DEPTH = 16, 64
_SUM_CHUNK = _SUM_LANES * _SUM_DEPTH
_LN2, _PI_HALF = 0.69314718055994530942, 1.57079632679489661923


class _Fmt:
    """Per compute dtype: the limits, bit layout and polynomial lengths of l2_math.h's L2Limits and Bits."""

    def __init__(self, dtype, low, high, min_exp, max_exp, uniform, mant, bias, one, sqrt2, itype, terms,
                 ln2_hi, ln2_lo):
        self.dtype, self.low, self.high, self.min_exp, self.max_exp = dtype, low, high, min_exp, max_exp
        self.uniform, self.mant, self.bias, self.one, self.sqrt2, self.itype = uniform, mant, bias, one, sqrt2, itype
        self.log_terms, self.trig_terms, self.exp_terms = terms
        self.ln2_hi, self.ln2_lo = ln2_hi, ln2_lo

    def c(self, v: float) -> float:
        """A constant rounded to the compute dtype (as static_cast<T>(double) in the kernels)."""
        return struct.unpack("f", struct.pack("f", v))[0] if self.dtype == torch.float32 else v


_FMT = {
    torch.float32: _Fmt(torch.float32, 2.0**-60, 2.0**60, -126, 127, 24, 23, 127, 0x3F800000, 0x3FB504F3,
                        torch.int32, (7, 6, 9), 0.693145751953125, 1.428606765330187e-06),
    torch.float64: _Fmt(torch.float64, 2.0**-500, 2.0**500, -1022, 1023, 32, 52, 1023, 0x3FF0000000000000,
                        0x3FF6A09E667F3BCD, torch.int64, (12, 10, 14), 6.93147180369123816490e-01,
                        1.90821492927058770002e-10),
}


def _sqrt(v: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(v.double()).float() if v.dtype == torch.float32 else torch.sqrt(v)


def _pow2(k: torch.Tensor, fmt: _Fmt) -> torch.Tensor:
    """2**k exactly, for integer k in the normal range, from the exponent bits."""
    return ((k.to(fmt.itype) + fmt.bias) << fmt.mant).view(fmt.dtype)


def sum_squares(v: torch.Tensor) -> torch.Tensor:
    """Per-row sum of ``v**2`` for ``v`` of shape (N, n), in l2_math.h's order: chunks of 1024 elements,
    element k of a chunk in lane k % 16, 64 terms per lane in order, then a lane tree and a chunk tree."""
    N, n = v.shape
    P = -(-n // _SUM_CHUNK)
    if P == 0:
        return v.new_zeros(N)
    sq = torch.nn.functional.pad(v * v, (0, P * _SUM_CHUNK - n)).reshape(N, P, _SUM_DEPTH, _SUM_LANES)
    acc = sq[:, :, 0, :]
    for m in range(1, _SUM_DEPTH):
        acc = acc + sq[:, :, m, :]
    h = _SUM_LANES // 2
    while h >= 1:
        acc = acc[..., :h] + acc[..., h:2 * h]
        h //= 2
    p = acc[..., 0]
    s = 1
    while s < P:
        p = p.clone()
        p[:, 0:P - s:2 * s] = p[:, 0:P - s:2 * s] + p[:, s:P:2 * s]
        s *= 2
    return p[:, 0]


def _nan_to_zero(g):
    return torch.where(g == g, g, 0.0)


def _direction(g, s):
    return torch.where(g == math.inf, 1.0, torch.where(g == -math.inf, -1.0, _nan_to_zero(g) * s))


def _coef(num, sumsq):
    return torch.where(sumsq > 0, num / _sqrt(sumsq), 0.0)


def _factor(eps, sumsq):
    return torch.where(eps == 0, 0.0, torch.where(sumsq <= eps * eps, 1.0, eps / _sqrt(sumsq)))


def _rescale(max_abs, fmt):
    e = torch.frexp(max_abs)[1]
    pow2 = _pow2((-e).clamp(fmt.min_exp, fmt.max_exp), fmt)
    return torch.where(max_abs > 0, torch.where(max_abs == math.inf, 0.0, pow2), 1.0)


def _rows(t, ct):
    """t as (samples, elements per sample) in the compute dtype, logical order (a 0-d t is one sample)."""
    return t.to(ct).reshape(1, 1) if t.dim() == 0 else t.to(ct).reshape(t.shape[0], -1)


def _row_budget(value, per_sample, rows):
    """A budget as an (N, 1) column of the rows' dtype."""
    if per_sample is None:
        return torch.full((rows.shape[0], 1), value, dtype=rows.dtype, device=rows.device)
    return per_sample.to(rows.dtype).reshape(-1, 1)


def _grad_coef(g, num):
    """(num / ||dir(g)||, scale of dir) per row, both (N, 1): the first pass, then the rescaled one where
    the first pass's sum of squares is out of range (for the other rows the second pass is the first)."""
    fmt = _FMT[g.dtype]
    raw = _nan_to_zero(g)
    s0 = sum_squares(raw)
    need = ~((s0 >= fmt.low) & (s0 <= fmt.high))
    scale = torch.where(need, _rescale(raw.abs().amax(1), fmt), 1.0)[:, None]
    return _coef(num, sum_squares(_direction(g, scale))[:, None]), scale


def _l2_out(x, d, f, clip_min, clip_max):
    return torch.clamp(x + d * f, clip_min, clip_max)


def _l2_op(out, x, rows_fn):
    """Writes rows_fn() (an (N, n) result in the compute dtype) into ``out`` shaped as ``x``."""
    if out.numel():
        out.copy_(rows_fn().reshape(x.shape))
    return out


def _l2_step_math(x_adv, grad, x, alpha, eps, clip_min, clip_max, alpha_t, eps_t):
    ct = compute_dtype(x.dtype)
    xa, g, xx = _rows(x_adv, ct), _rows(grad, ct), _rows(x, ct)
    c, scale = _grad_coef(g, _row_budget(alpha, alpha_t, xx))
    d = (xa - xx) + c * _direction(g, scale)
    f = _factor(_row_budget(eps, eps_t, xx), sum_squares(d)[:, None])
    return _l2_out(xx, d, f, clip_min, clip_max)


def l2_step(x_adv, grad, x, alpha, eps, clip_min, clip_max, alpha_t=None, eps_t=None):
    _check_step(x_adv, grad, x, alpha, eps, clip_min, clip_max, alpha_t, eps_t)
    return _l2_op(torch.empty_like(x_adv), x, lambda: _l2_step_math(x_adv, grad, x, alpha, eps, clip_min, clip_max,
                                                                     alpha_t, eps_t))


def l2_step_(x_adv, grad, x, alpha, eps, clip_min, clip_max, alpha_t=None, eps_t=None):
    _check_step(x_adv, grad, x, alpha, eps, clip_min, clip_max, alpha_t, eps_t)
    _check_writable(x_adv, grad, x, budgets=(alpha_t, eps_t))
    _l2_op(x_adv, x, lambda: _l2_step_math(x_adv, grad, x, alpha, eps, clip_min, clip_max, alpha_t, eps_t))


def _l2_project_math(x_adv, x, eps, clip_min, clip_max, eps_t):
    ct = compute_dtype(x.dtype)
    xa, xx = _rows(x_adv, ct), _rows(x, ct)
    d = xa - xx
    return _l2_out(xx, d, _factor(_row_budget(eps, eps_t, xx), sum_squares(d)[:, None]), clip_min, clip_max)


def l2_project(x_adv, x, eps, clip_min, clip_max, eps_t=None):
    _check_project(x_adv, x, eps, clip_min, clip_max, eps_t)
    return _l2_op(torch.empty_like(x_adv), x, lambda: _l2_project_math(x_adv, x, eps, clip_min, clip_max, eps_t))


def l2_project_(x_adv, x, eps, clip_min, clip_max, eps_t=None):
    _check_project(x_adv, x, eps, clip_min, clip_max, eps_t)
    _check_writable(x_adv, x, budgets=(eps_t,))
    _l2_op(x_adv, x, lambda: _l2_project_math(x_adv, x, eps, clip_min, clip_max, eps_t))


def _l2_apgd_math(x_adv, x_prev, grad, x, alpha, eps, momentum, clip_min, clip_max, alpha_t, eps_t):
    z = _l2_step_math(x_adv, grad, x, alpha, eps, clip_min, clip_max, alpha_t, eps_t)
    if momentum == 1.0:  # the step itself (ball_ops.h)
        return z
    ct = compute_dtype(x.dtype)
    xa, xp, xx = _rows(x_adv, ct), _rows(x_prev, ct), _rows(x, ct)
    d = _apgd_momentum(z.to(x.dtype).to(ct), xa, xp, momentum) - xx  # z as the step op writes it
    return _l2_out(xx, d, _factor(_row_budget(eps, eps_t, xx), sum_squares(d)[:, None]), clip_min, clip_max)


def l2_apgd_update(x_adv, x_prev, grad, x, alpha, eps, momentum, clip_min, clip_max, alpha_t=None, eps_t=None):
    _check_apgd_update(x_adv, x_prev, grad, x, alpha, eps, momentum, clip_min, clip_max, alpha_t, eps_t)
    return _l2_op(torch.empty_like(x_adv), x, lambda: _l2_apgd_math(x_adv, x_prev, grad, x, alpha, eps, momentum,
                                                                     clip_min, clip_max, alpha_t, eps_t))


def l2_apgd_update_(x_adv, x_prev, grad, x, alpha, eps, momentum, clip_min, clip_max, alpha_t=None, eps_t=None):
    _check_apgd_update(x_adv, x_prev, grad, x, alpha, eps, momentum, clip_min, clip_max, alpha_t, eps_t)
    _check_writable(x_adv, x_prev, grad, x, budgets=(alpha_t, eps_t))
    _l2_op(x_adv, x, lambda: _l2_apgd_math(x_adv, x_prev, grad, x, alpha, eps, momentum, clip_min, clip_max, alpha_t,
                                           eps_t))


def fgm(x, grad, eps, clip_min, clip_max, eps_t=None):
    """FGM: ``clip(x + eps * g / ||g||)``, computed as the kernels do: a step from x_adv = x, no projection."""
    _check_fgsm(x, grad, eps, clip_min, clip_max, eps_t)

    def rows():
        ct = compute_dtype(x.dtype)
        xx, g = _rows(x, ct), _rows(grad, ct)
        c, scale = _grad_coef(g, _row_budget(eps, eps_t, xx))
        return _l2_out(xx, (xx - xx) + c * _direction(g, scale), 1.0, clip_min, clip_max)

    return _l2_op(torch.empty_like(x), x, rows)


def _log_unit(w, fmt):
    """log(u), u = (k + 1) 2^-B, k the word's top B bits (l2_math.h log_unit)."""
    m = ((w >> (32 - fmt.uniform)) + 1).to(fmt.dtype)
    bits = m.view(fmt.itype).to(torch.int64)
    e = (bits >> fmt.mant) - fmt.bias
    ybits = (bits & ((1 << fmt.mant) - 1)) | fmt.one
    big = ybits > fmt.sqrt2
    ybits = torch.where(big, ybits - (1 << fmt.mant), ybits)
    e = torch.where(big, e + 1, e)
    y = ybits.to(fmt.itype).view(fmt.dtype)
    t = (y - 1.0) / (y + 1.0)
    t2 = t * t
    p = fmt.c(1.0 / (2 * fmt.log_terms - 1))
    for k in range(fmt.log_terms - 2, -1, -1):
        p = p * t2 + fmt.c(1.0 / (2 * k + 1))
    return (e - fmt.uniform).to(fmt.dtype) * fmt.c(_LN2) + (t + t) * p


def _sincos_turn(w, fmt):
    """(cos, sin) of 2 pi u, u = k 2^-B (l2_math.h sincos_turn)."""
    b = fmt.uniform
    k = ((w >> (32 - b)) + (1 << (b - 3))) & ((1 << b) - 1)
    q = k >> (b - 2)
    phi = ((k & ((1 << (b - 2)) - 1)) - (1 << (b - 3))).to(fmt.dtype) * fmt.c(_PI_HALF / 2 ** (b - 2))
    p2 = phi * phi
    n = fmt.trig_terms
    sign = lambda j: -1.0 if j % 2 else 1.0  # noqa: E731
    ps = fmt.c(sign(n - 1) / float(math.factorial(2 * n - 1)))
    pc = fmt.c(sign(n - 1) / float(math.factorial(2 * n - 2)))
    for j in range(n - 2, -1, -1):
        ps = ps * p2 + fmt.c(sign(j) / float(math.factorial(2 * j + 1)))
        pc = pc * p2 + fmt.c(sign(j) / float(math.factorial(2 * j)))
    sn, cs = phi * ps, pc
    c = torch.where(q == 0, cs, torch.where(q == 1, -sn, torch.where(q == 2, -cs, sn)))
    s = torch.where(q == 0, sn, torch.where(q == 1, cs, torch.where(q == 2, -sn, -cs)))
    return c, s


def _box_muller(w_radius, w_angle, fmt):
    rad = _sqrt(-2.0 * _log_unit(w_radius, fmt))
    c, s = _sincos_turn(w_angle, fmt)
    return rad * c, rad * s


def gaussians(n: int, seed, device, dtype: torch.dtype) -> torch.Tensor:
    """The normal deviates of elements 0..n-1 (l2_math.h gaussian_at): Box-Muller on words (0, 1) and (2, 3)
    of each counter, the cosine to the even word's element, the sine to the odd one's."""
    fmt = _FMT[dtype]
    blocks = (n + 63) // 64
    w = philox4x32_10(torch.arange(blocks * 16, dtype=torch.int64, device=device), seed).reshape(blocks, 16, 4)
    z0, z1 = _box_muller(w[..., 0], w[..., 1], fmt)
    z2, z3 = _box_muller(w[..., 2], w[..., 3], fmt)
    return torch.stack((z0, z1, z2, z3), dim=-1).permute(0, 2, 1).reshape(-1)[:n]


def _exp_neg(y, fmt):
    kf = torch.floor(y * fmt.c(1.0 / _LN2) + 0.5)
    r = (y - kf * fmt.c(fmt.ln2_hi)) - kf * fmt.c(fmt.ln2_lo)
    p = fmt.c(1.0 / float(math.factorial(fmt.exp_terms - 1)))
    for j in range(fmt.exp_terms - 2, -1, -1):
        p = p * r + fmt.c(1.0 / float(math.factorial(j)))
    return p * _pow2(kf, fmt)


def l2_radius(count: int, n: int, seed, eps: torch.Tensor) -> torch.Tensor:
    """eps * U^(1/n) per sample, U in (0, 1] from word 0 of Philox stream 1 at counter = sample index."""
    fmt = _FMT[eps.dtype]
    w = philox4x32_10(torch.arange(count, dtype=torch.int64, device=eps.device), seed, stream=1)[:, 0]
    return eps * _exp_neg(_log_unit(w, fmt) / n, fmt)


def l2_random_init(x, eps, clip_min, clip_max, seed, eps_t=None):
    """Uniform in the L2 ball: ``clip(x + z * r / ||z||)``, z ~ N(0, I) (:func:`gaussians`), r = eps U^(1/n)."""
    _check_random_init(x, eps, clip_min, clip_max, seed, eps_t)

    def rows():
        ct = compute_dtype(x.dtype)
        xx = _rows(x, ct)
        N, n = xx.shape
        z = gaussians(N * n, seed, x.device, ct).reshape(N, n)
        r = l2_radius(N, n, seed, _row_budget(eps, eps_t, xx)[:, 0])
        return _l2_out(xx, z, _coef(r, sum_squares(z))[:, None], clip_min, clip_max)

    return _l2_op(torch.empty_like(x), x, rows)
