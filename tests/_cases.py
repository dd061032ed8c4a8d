"""Inputs shared by the op tests: layouts, dtypes and an independent float64 formula."""
import torch

from robust_ext.attacks.threats import ThreatModel

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
LAYOUTS = ["contiguous", "channels_last", "transposed", "strided", "batch_inner", "mixed"]


def layout(t: torch.Tensor, name: str, role: str = "x_adv") -> torch.Tensor:
    """The same values as t (N, C, H, W) in the named memory layout."""
    if name == "contiguous":
        return t.contiguous()
    if name == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if name == "transposed":  # dense, samples outermost, not contiguous
        return t.transpose(2, 3).contiguous().transpose(2, 3)
    if name == "strided":  # not dense: every other element of a wider buffer
        wide = torch.empty(t.shape[:-1] + (2 * t.shape[-1],), dtype=t.dtype, device=t.device)
        view = wide[..., ::2]
        view.copy_(t)
        return view
    if name == "batch_inner":  # dense, but the batch dimension is not the outermost one
        return t.transpose(0, 1).contiguous().transpose(0, 1)
    if name == "mixed":  # x_adv channels_last, the other inputs contiguous
        return layout(t, "channels_last" if role == "x_adv" else "contiguous")
    raise ValueError(name)


def images(shape=(4, 3, 9, 11), dtype=torch.float32, device="cpu", seed=0, spread=0.05):
    """x in [0, 1], x_adv near x (partly outside a small ball, partly outside [0, 1]), grad ~ N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g, dtype=torch.float64)
    x_adv = x + spread * torch.randn(shape, generator=g, dtype=torch.float64)
    grad = torch.randn(shape, generator=g, dtype=torch.float64)
    grad.view(-1)[::7] = 0.0
    return tuple(t.to(dtype=dtype, device=device) for t in (x_adv, grad, x))


def per_sample(value, x, role):
    """Budget as the kernels see it, broadcast over x (float64)."""
    if isinstance(value, torch.Tensor):
        return value.double().reshape((-1,) + (1,) * (x.dim() - 1))
    return value


def step_f64(x_adv, grad, x, alpha, eps, lo, hi):
    """The step written another way (min/max of the ball's and the box's bounds), in float64."""
    xa, g, xx = x_adv.double(), grad.double(), x.double()
    a, e = per_sample(alpha, x, "alpha"), per_sample(eps, x, "eps")
    moved = xa + a * torch.sign(g).nan_to_num(0.0)
    return torch.minimum(torch.maximum(moved, xx - e), xx + e).clamp(lo, hi)


def ulp(t: torch.Tensor) -> torch.Tensor:
    """One unit in the last place of t's dtype at t's magnitude (as float64)."""
    info = torch.finfo(t.dtype)
    return (t.double().abs().clamp_min(info.tiny) * info.eps).double()


def on_threads(fn, counts=(1, 2)):
    """``[fn() at each thread count of counts]``, the caller's thread count restored after."""
    before = torch.get_num_threads()
    try:
        out = []
        for threads in counts:
            torch.set_num_threads(threads)
            out.append(fn())
        return out
    finally:
        torch.set_num_threads(before)


class Delegating(ThreatModel):
    """A user-style threat model with only ``init``, ``step_``, ``project_`` and ``distance``, each handed to
    the library's ``base``: a subclass replaces the one it tests (APGD's update is then the base class's)."""

    base: ThreatModel

    def init(self, x, eps, clip_min, clip_max, generator=None):
        return self.base.init(x, eps, clip_min, clip_max, generator)

    def step_(self, x_adv, grad, x, alpha, eps, clip_min, clip_max):
        return self.base.step_(x_adv, grad, x, alpha, eps, clip_min, clip_max)

    def project_(self, x_adv, x, eps, clip_min, clip_max):
        return self.base.project_(x_adv, x, eps, clip_min, clip_max)

    def distance(self, x_adv, x):
        return self.base.distance(x_adv, x)
