"""Benchmark robust_ext's fused ops against their eager, in-place, compiled and roofline baselines.

    python benchmarks/bench_ops.py                      # full run: 4 shapes x fp32/bf16 x 1 and all threads
    python benchmarks/bench_ops.py --quick --no-compile # smoke test, a few seconds
    python benchmarks/bench_ops.py --device cuda        # GPU (torch.utils.benchmark synchronizes)

Every figure is the median of ``torch.utils.benchmark.Timer.blocked_autorange`` and sits beside its
baselines from the same run. Baselines for the PGD L-inf step (``linf_step_``):

* torchattacks-style eager: ``adv = x_adv + alpha*grad.sign(); delta = clamp(adv - x, -eps, eps);
  adv = clamp(x + delta, 0, 1)`` (allocates a tensor per operation).
* best in-place eager: several in-place / ``out=`` formulations (buffers allocated outside the timed
  region); the fastest is kept and named. Candidates that hoist the per-attack bounds
  ``max(x-eps, 0)``, ``min(x+eps, 1)`` out of the step are marked: a PGD loop computes them once.
* ``torch.compile`` of the torchattacks formula, functional and writing into ``x_adv``; the faster is
  kept. Warm time; the first (cold) compile in the process and each configuration's compile are recorded.
* roofline: ``x_adv.addcmul_(grad, x, value=...)`` reads 3 tensors and writes 1, the step's traffic.

Baselines for the PGD L2 step (``l2_step_``, alpha = 0.5, eps = 2.0 per sample of the images in [0, 1]):

* torchattacks' PGDL2 update written as it is (3.5.1): ``grad / (norm + 1e-10)``, ``eps / delta_norms``,
  ``torch.min(factor, ones)``, all functional.
* best in-place eager: ``torch.linalg.vector_norm`` for both norms, ``addcmul_`` for the step and in-place
  scaling, shifting and clamping (the fastest of the candidates, named).
* ``torch.compile`` of the reference formula with ``torch.linalg.vector_norm`` (reference.py's own
  fixed-order sums are a 64-term unrolled loop, which inductor compiles for minutes). Its target holds only
  where the step's working set fits in the last-level cache (beyond that both are memory-bound).
* the L-inf roofline above: the fused L2 step is held to 1.5x the traffic-equivalent elementwise op.

APGD's update (``linf_apgd_update``, ``l2_apgd_update``; momentum 0.75, a per-sample step ``eta = 2 eps``)
beside the ops APGD composed before it (``ThreatModel.apgd_update``'s default: the step op on a copy, five
in-place PyTorch ops, the projection op), whose result is the fused op's bit for bit in fp32.

ns/element and GB/s use the op's minimal traffic (step and L2 step: 3 reads + 1 write; project and fgsm:
2 + 1; random init: 1 + 1; APGD's update: 4 + 1) for every implementation of that op, so GB/s compares
implementations of one op.
Benchmarks are not tests: a MISS is reported, never raised.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

import torch.utils.benchmark as tb

import robust_ext
from robust_ext import ops
from _common import cpu_model

ALPHA, EPS = 2 / 255, 8 / 255
L2_ALPHA, L2_EPS = 0.5, 2.0
ROOFLINE_VALUE = 1e-7  # addcmul_ scale: x_adv moves by < 1e-7 per call, so it never drifts
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
DEFAULT_SHAPES = "128x1x28x28,128x3x32x32,256x3x64x64,32x3x224x224"
QUICK_SHAPE = "128x1x28x28"

# (ratio name, numerator, denominator, comparison, target): the claims the fused ops are held to.
TARGETS = [
    ("fused/roofline", "step.fused_", "step.roofline", "<=", 1.3),
    ("torchattacks/fused", "step.torchattacks", "step.fused_", ">=", 5.0),
    ("best_inplace_eager/fused", "step.best_inplace", "step.fused_", ">=", 2.0),
    ("compiled/fused", "step.compiled", "step.fused_", ">=", 1.5),
    ("torchattacks_init/fused_init", "init.torchattacks", "init.fused", ">=", 5.0),
    ("l2_fused/linf_roofline", "l2.fused_", "step.roofline", "<=", 1.5),
    ("l2_torchattacks/fused", "l2.torchattacks", "l2.fused_", ">=", 5.0),
    ("l2_compiled/fused", "l2.compiled", "l2.fused_", ">=", 1.5),
]
# Targets that hold only where the step's working set fits in the last-level cache.
LLC_TARGETS = {"l2_compiled/fused"}
# Informational ratios, no target.
INFO_RATIOS = [
    ("torchattacks/fused_functional", "step.torchattacks", "step.fused"),
    ("best_per_call_inplace_eager/fused", "step.best_per_call_inplace", "step.fused_"),
    ("project_eager_inplace/fused_", "project.eager_inplace", "project.fused_"),
    ("project_eager/fused_", "project.eager", "project.fused_"),
    ("fgsm_eager/fused", "fgsm.eager", "fgsm.fused"),
    ("init_eager_inplace/fused_init", "init.eager_inplace", "init.fused"),
    ("l2_best_inplace_eager/fused", "l2.best_inplace", "l2.fused_"),
    ("l2_fused/linf_fused", "l2.fused_", "step.fused_"),
    ("l2_init_eager/fused_init", "l2init.eager", "l2init.fused"),
    ("apgd_composed/fused", "apgd.composed", "apgd.fused"),
    ("l2_apgd_composed/fused", "l2apgd.composed", "l2apgd.fused"),
]
# tensors read + written per element
STREAMS = {"step": 4, "project": 3, "fgsm": 3, "init": 2, "l2": 4, "l2init": 2, "apgd": 5, "l2apgd": 5}
MOMENTUM = 0.75


def _ta_step(x_adv, grad, x, alpha: float, eps: float):
    adv = x_adv + alpha * grad.sign()
    delta = torch.clamp(adv - x, min=-eps, max=eps)
    return torch.clamp(x + delta, min=0, max=1)


def _ta_step_into(x_adv, grad, x, alpha: float, eps: float):
    x_adv.copy_(_ta_step(x_adv, grad, x, alpha, eps))


def _ta_l2_step(adv_images, grad, images, alpha: float, eps: float):
    """torchattacks 3.5.1 PGDL2.forward's update, as written."""
    batch_size = len(images)
    grad_norms = torch.norm(grad.view(batch_size, -1), p=2, dim=1) + 1e-10
    grad = grad / grad_norms.view(batch_size, 1, 1, 1)
    adv_images = adv_images.detach() + alpha * grad
    delta = adv_images - images
    delta_norms = torch.norm(delta.view(batch_size, -1), p=2, dim=1)
    factor = eps / delta_norms
    factor = torch.min(factor, torch.ones_like(delta_norms))
    delta = delta * factor.view(-1, 1, 1, 1)
    return torch.clamp(images + delta, min=0, max=1).detach()


def _l2_formula(x_adv, grad, x, alpha: float, eps: float):
    """The L2 step's formula with ATen's norms: what torch.compile gets (functional)."""
    view = (-1,) + (1,) * (x.dim() - 1)
    g = torch.nan_to_num(grad, nan=0.0)
    gn = torch.linalg.vector_norm(g.flatten(1), dim=1).view(view)
    d = x_adv - x + torch.where(gn > 0, alpha / gn, 0.0) * g
    dn = torch.linalg.vector_norm(d.flatten(1), dim=1).view(view)
    return torch.clamp(x + d * torch.where(dn > eps, eps / dn, 1.0), 0, 1)


def _apgd_composed(norm: str, x_adv, x_prev, grad, x, eta, eps: float, m: float):
    """APGD's update as robust_ext.attacks.apgd composed it before the fused op."""
    z = getattr(ops, f"{norm}_step_")(x_adv.clone(), grad, x, eta, eps)
    z.sub_(x_adv).mul_(m).add_(x_adv).add_((x_adv - x_prev).mul_(1.0 - m))
    return getattr(ops, f"{norm}_project_")(z, x, eps)


# In-place eager L2 step candidates (`view` = (-1, 1, 1, 1); `buf` a scratch tensor like x).
INPLACE_L2 = [
    ("addcmul_norms",
     "gn = torch.linalg.vector_norm(g.flatten(1), dim=1)\n"
     "xa.addcmul_(g, (l2_alpha / gn).view(view)).sub_(x)\n"
     "dn = torch.linalg.vector_norm(xa.flatten(1), dim=1)\n"
     "xa.mul_((l2_eps / dn).clamp_(max=1).view(view)).add_(x).clamp_(0, 1)"),
    ("buffer_delta",
     "gn = torch.linalg.vector_norm(g.flatten(1), dim=1)\n"
     "torch.sub(xa, x, out=buf).addcmul_(g, (l2_alpha / gn).view(view))\n"
     "dn = torch.linalg.vector_norm(buf.flatten(1), dim=1)\n"
     "torch.addcmul(x, buf, (l2_eps / dn).clamp_(max=1).view(view), out=xa).clamp_(0, 1)"),
]


def llc_bytes():
    """The last-level cache's size from sysfs (None where unknown)."""
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    best = None
    for idx in sorted(base.glob("index*")) if base.exists() else []:
        try:
            size = (idx / "size").read_text().strip().upper()
            level = int((idx / "level").read_text())
        except OSError:
            continue
        mult = {"K": 1024, "M": 1024**2, "G": 1024**3}.get(size[-1], 1)
        value = int(size.rstrip("KMG")) * mult
        if best is None or level >= best[0]:
            best = (level, value)
    return best[1] if best else None


# In-place eager step candidates: (name, statement, hoists the bounds out of the step).
# `buf` is a preallocated scratch tensor; `g1` a private grad copy that may be overwritten (PGD
# discards the gradient after the step); `lo`, `hi` = max(x-eps, 0), min(x+eps, 1), built once.
INPLACE_STEP = [
    ("ta_order_signbuf",
     "torch.sign(g, out=buf)\nxa.add_(buf, alpha=alpha).sub_(x).clamp_(-eps, eps).add_(x).clamp_(0, 1)", False),
    ("ta_order_sign_grad_inplace",
     "xa.add_(g1.sign_(), alpha=alpha).sub_(x).clamp_(-eps, eps).add_(x).clamp_(0, 1)", False),
    ("bounds_per_call",
     "torch.sign(g, out=buf)\nxa.add_(buf, alpha=alpha)\n"
     "torch.sub(x, eps, out=lo1).clamp_(min=0)\ntorch.add(x, eps, out=hi1).clamp_(max=1)\nxa.clamp_(lo1, hi1)",
     False),
    ("hoisted_bounds_signbuf", "torch.sign(g, out=buf)\nxa.add_(buf, alpha=alpha).clamp_(lo, hi)", True),
    ("hoisted_bounds_sign_grad_inplace", "xa.add_(g1.sign_(), alpha=alpha).clamp_(lo, hi)", True),
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"one small shape ({QUICK_SHAPE}) and min_run_time 0.05 s: a smoke test")
    p.add_argument("--shapes", default=None, help=f"comma-separated NxCxHxW (default {DEFAULT_SHAPES})")
    p.add_argument("--dtypes", default="fp32,bf16", help=f"comma-separated, of {','.join(DTYPES)}")
    p.add_argument("--threads", default="1,all", help="comma-separated thread counts; 'all' = os.cpu_count()")
    p.add_argument("--device", default="cpu", help="cpu or cuda (thread counts are ignored on cuda)")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile (slow to warm up)")
    p.add_argument("--reuse-compile-cache", action="store_true",
                   help="use inductor's on-disk cache; by default a fresh one, so compile seconds are cold")
    p.add_argument("--min-run-time", type=float, default=None,
                   help="seconds per blocked_autorange measurement (default 0.2; 0.05 with --quick)")
    p.add_argument("--rounds", type=int, default=None,
                   help="measure every config this many times and keep each figure's fastest round: background "
                        "load only ever adds time (default 3; 1 with --quick)")
    p.add_argument("--out", default="benchmarks/results/bench_ops.json", help="JSON output path")
    return p.parse_args(argv)


def parse_shape(s):
    try:
        shape = tuple(int(d) for d in s.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--shapes: cannot read {s!r}, expected e.g. 128x3x32x32") from None
    if not shape or min(shape) < 1:
        raise SystemExit(f"--shapes: {s!r} must be positive dimensions")
    return shape


def parse_threads(s, device):
    if device.type != "cpu":
        return [torch.get_num_threads()]
    out = []
    for t in s.split(","):
        n = os.cpu_count() if t.strip() == "all" else int(t)
        if n < 1:
            raise SystemExit(f"--threads: {t!r} must be >= 1 or 'all'")
        if n not in out:
            out.append(n)
    return out




def measure(stmt, env, threads, min_run_time, warmup=2):
    """Median seconds of `stmt` at `threads` threads (warm-up outside the measurement)."""
    for _ in range(warmup):
        exec(stmt, env)
    m = tb.Timer(stmt=stmt, globals=env, num_threads=threads).blocked_autorange(min_run_time=min_run_time)
    return {"median_s": m.median, "iqr_s": m.iqr, "runs": len(m.times), "calls_per_run": m.number_per_run}


def make_inputs(shape, dtype, device, gen):
    x = torch.rand(shape, generator=gen, device="cpu").to(device=device, dtype=dtype)
    noise = 0.01 * torch.randn(shape, generator=gen, device="cpu").to(device=device, dtype=dtype)
    x_adv = (x + noise).clamp_(0, 1)
    grad = torch.randn(shape, generator=gen, device="cpu").to(device=device, dtype=dtype)
    return x, x_adv, grad


class Compiled:
    """torch.compile'd torchattacks step, functional and into x_adv; tracks compile seconds."""

    def __init__(self):
        torch._dynamo.config.recompile_limit = 1024
        torch._dynamo.config.accumulated_recompile_limit = 1 << 16
        self.fns = {"functional": torch.compile(_ta_step, dynamic=False),
                    "into_x_adv": torch.compile(_ta_step_into, dynamic=False),
                    "l2_formula": torch.compile(_l2_formula, dynamic=False)}
        self.cold_compile_s = None

    def first_call(self, name, args, device):
        """Compile (first call, timed) for the current shape/dtype/thread count."""
        t0 = time.perf_counter()
        out = self.fns[name](*args)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if self.cold_compile_s is None:
            self.cold_compile_s = dt
        return dt, out


def bench_config(shape, dtype, threads, device, min_run_time, compiled, gen):
    torch.set_num_threads(threads)
    x, x_adv, grad = make_inputs(shape, dtype, device, gen)
    n = x.numel()
    lo = (x - EPS).clamp_(min=0)
    hi = (x + EPS).clamp_(max=1)
    env = {"torch": torch, "ops": ops, "x": x, "g": grad, "alpha": ALPHA, "eps": EPS, "v": ROOFLINE_VALUE,
           "lo": lo, "hi": hi, "ta_step": _ta_step}
    t = {}  # "op.impl" -> measurement
    step_ref = ops.linf_step(x_adv, grad, x, ALPHA, EPS)
    project_ref = ops.linf_project(x_adv, x, EPS)
    fgsm_ref = ops.fgsm(x, grad, EPS)

    def run(key, stmt, expect=None, **fresh):
        """Time `stmt` with private copies of the tensors it mutates (given as name=tensor).

        With `expect`, one call on fresh copies first records how far the result (the statement's value,
        or `xa` after a multi-line statement) is from the fused op's: a baseline must compute the same op.
        """
        diff = None
        if expect is not None:
            local = dict(env, **{k: v.clone() for k, v in fresh.items()})
            if "\n" in stmt:
                exec(stmt, local)
                got = local["xa"]
            else:
                got = eval(stmt, local)
            diff = (got.double() - expect.double()).abs().max().item()
        local = dict(env, **{k: v.clone() for k, v in fresh.items()})
        t[key] = dict(measure(stmt, local, threads, min_run_time), max_abs_diff_vs_fused=diff)
        return t[key]

    # the step
    run("step.fused_", "ops.linf_step_(xa, g, x, alpha, eps)", step_ref, xa=x_adv)
    run("step.fused", "ops.linf_step(xa, g, x, alpha, eps)", step_ref, xa=x_adv)
    run("step.roofline", "xa.addcmul_(g, x, value=v)", xa=x_adv)
    run("step.torchattacks", "ta_step(xa, g, x, alpha, eps)", step_ref, xa=x_adv)
    candidates = {}
    for name, stmt, hoisted in INPLACE_STEP:
        m = run(f"step.inplace.{name}", stmt, step_ref, xa=x_adv, g1=grad, buf=grad, lo1=x, hi1=x)
        m["hoists_bounds"] = hoisted
        candidates[name] = m
    best = min(candidates, key=lambda k: candidates[k]["median_s"])
    best_pc = min((k for k in candidates if not candidates[k]["hoists_bounds"]),
                  key=lambda k: candidates[k]["median_s"])
    t["step.best_inplace"] = dict(candidates[best], variant=best)
    t["step.best_per_call_inplace"] = dict(candidates[best_pc], variant=best_pc)
    compile_s = {}
    if compiled is not None:
        timed = {}
        for name, fn in compiled.fns.items():
            if name.startswith("l2"):
                continue
            xa = x_adv.clone()
            compile_s[name], out = compiled.first_call(name, (xa, grad, x, ALPHA, EPS), device)
            diff = ((xa if out is None else out).double() - step_ref.double()).abs().max().item()
            timed[name] = dict(measure("cf(xa, g, x, alpha, eps)", dict(env, cf=fn, xa=xa), threads, min_run_time),
                               max_abs_diff_vs_fused=diff)
            t[f"step.compiled.{name}"] = timed[name]
        kept = min(timed, key=lambda k: timed[k]["median_s"])
        t["step.compiled"] = dict(timed[kept], variant=kept)

    # projection, FGSM, random init
    run("project.fused_", "ops.linf_project_(xa, x, eps)", project_ref, xa=x_adv)
    run("project.eager_inplace", "xa.sub_(x).clamp_(-eps, eps).add_(x).clamp_(0, 1)", project_ref, xa=x_adv)
    run("project.eager", "torch.clamp(x + torch.clamp(xa - x, -eps, eps), 0, 1)", project_ref, xa=x_adv)
    run("fgsm.fused", "ops.fgsm(x, g, eps)", fgsm_ref)
    run("fgsm.eager", "torch.clamp(x + eps * g.sign(), 0, 1)", fgsm_ref)
    run("init.fused", "ops.linf_random_init(x, eps)")
    run("init.torchattacks", "torch.clamp(x + torch.empty_like(x).uniform_(-eps, eps), min=0, max=1)")
    run("init.eager_inplace", "buf.uniform_(-eps, eps).add_(x).clamp_(0, 1)", buf=x)

    # the L2 step
    l2_ref = ops.l2_step(x_adv, grad, x, L2_ALPHA, L2_EPS)
    env.update(l2_alpha=L2_ALPHA, l2_eps=L2_EPS, view=(-1,) + (1,) * (x.dim() - 1), ta_l2=_ta_l2_step)
    run("l2.fused_", "ops.l2_step_(xa, g, x, l2_alpha, l2_eps)", l2_ref, xa=x_adv)
    run("l2.fused", "ops.l2_step(xa, g, x, l2_alpha, l2_eps)", l2_ref, xa=x_adv)
    run("l2.torchattacks", "ta_l2(xa, g, x, l2_alpha, l2_eps)", l2_ref, xa=x_adv)
    l2_candidates = {name: run(f"l2.inplace.{name}", stmt, l2_ref, xa=x_adv, buf=x) for name, stmt in INPLACE_L2}
    best_l2 = min(l2_candidates, key=lambda k: l2_candidates[k]["median_s"])
    t["l2.best_inplace"] = dict(l2_candidates[best_l2], variant=best_l2)
    if compiled is not None:
        xa = x_adv.clone()
        compile_s["l2_formula"], out = compiled.first_call("l2_formula", (xa, grad, x, L2_ALPHA, L2_EPS), device)
        t["l2.compiled"] = dict(measure("cf(xa, g, x, l2_alpha, l2_eps)", dict(env, cf=compiled.fns["l2_formula"], xa=xa),
                                        threads, min_run_time),
                                max_abs_diff_vs_fused=(out.double() - l2_ref.double()).abs().max().item())
    run("l2init.fused", "ops.l2_random_init(x, l2_eps)")
    run("l2init.eager", "torch.clamp(x + (lambda d: d * (torch.rand(d.shape[0], 1, 1, 1, device=d.device) / "
        "torch.linalg.vector_norm(d.flatten(1), dim=1).view(view)) * l2_eps)(torch.randn_like(x)), 0, 1)")

    # APGD's update: the fused op, then the ops it replaces
    xp = (2 * x - x_adv).clamp_(0, 1)
    eta = torch.full((x.shape[0],), 2 * EPS, device=device)
    l2_eta = torch.full((x.shape[0],), 2 * L2_EPS, device=device)
    env.update(xp=xp, eta=eta, l2_eta=l2_eta, m=MOMENTUM, composed=_apgd_composed)
    apgd_ref = ops.linf_apgd_update(x_adv, xp, grad, x, eta, EPS, MOMENTUM)
    run("apgd.fused", "ops.linf_apgd_update(xa, xp, g, x, eta, eps, m)", apgd_ref, xa=x_adv)
    run("apgd.composed", "composed('linf', xa, xp, g, x, eta, eps, m)", apgd_ref, xa=x_adv)
    l2_apgd_ref = ops.l2_apgd_update(x_adv, xp, grad, x, l2_eta, L2_EPS, MOMENTUM)
    run("l2apgd.fused", "ops.l2_apgd_update(xa, xp, g, x, l2_eta, l2_eps, m)", l2_apgd_ref, xa=x_adv)
    run("l2apgd.composed", "composed('l2', xa, xp, g, x, l2_eta, l2_eps, m)", l2_apgd_ref, xa=x_adv)

    return {"shape": list(shape), "dtype": str(dtype).replace("torch.", ""), "threads": threads,
            "device": str(device), "numel": n, "element_size": x.element_size(),
            "step_bytes": STREAMS["step"] * x.element_size() * n, "compile_s": compile_s or None, "timings": t}


def finish_config(rounds):
    """One config's record from its rounds: each figure's fastest round, then bandwidth and ratios."""
    first = rounds[0]
    t = {key: min((rd["timings"][key] for rd in rounds), key=lambda m: m["median_s"]) for key in first["timings"]}
    n, esize = first["numel"], first["element_size"]
    for key, m in t.items():
        nbytes = STREAMS[key.split(".")[0]] * esize * n
        m["ns_per_elem"] = m["median_s"] * 1e9 / n
        m["gb_per_s"] = nbytes / m["median_s"] / 1e9

    ratios = {}
    llc = llc_bytes() if first["device"] == "cpu" else None
    fits_llc = llc is None or first["step_bytes"] <= llc
    for name, num, den, cmp, target in TARGETS:
        if num in t and den in t:
            r = t[num]["median_s"] / t[den]["median_s"]
            ok = r <= target if cmp == "<=" else r >= target
            if name in LLC_TARGETS and not fits_llc:
                ratios[name] = {"value": r, "target": None, "status": "INFO", "note": "working set exceeds the LLC"}
                continue
            ratios[name] = {"value": r, "target": f"{cmp} {target}", "status": "PASS" if ok else "MISS"}
    for name, num, den in INFO_RATIOS:
        ratios[name] = {"value": t[num]["median_s"] / t[den]["median_s"], "target": None, "status": "INFO"}

    return dict(first, timings=t, ratios=ratios, rounds=len(rounds))


def call_overhead(device, min_run_time):
    """Fixed per-call cost from Python: each op on a 1-element tensor, beside ATen's addcmul_."""
    torch.set_num_threads(1)
    x = torch.full((1,), 0.5, device=device)
    env = {"torch": torch, "ops": ops, "x": x, "xa": x.clone(), "g": torch.ones_like(x), "alpha": ALPHA,
           "eps": EPS, "v": ROOFLINE_VALUE, "rx": getattr(torch.ops, "robust_ext", None)}
    stmts = {
        "ops.linf_step_ (public wrapper)": "ops.linf_step_(xa, g, x, alpha, eps)",
        "torch.ops.robust_ext.linf_step_.default (dispatcher only)":
            "rx.linf_step_.default(xa, g, x, alpha, eps, 0.0, 1.0, None, None)",
        "Tensor.addcmul_ (ATen in-place, Python binding)": "xa.addcmul_(g, x, value=v)",
        "torch.ops.aten.addcmul_.default (ATen via dispatcher)": "torch.ops.aten.addcmul_.default(xa, g, x, value=v)",
        "ops.linf_step (functional)": "ops.linf_step(xa, g, x, alpha, eps)",
        "torch.add (functional, ATen)": "torch.add(xa, g)",
        "ops.linf_random_init (incl. seed draw)": "ops.linf_random_init(x, eps)",
    }
    if ops.backend().get(device.type) != "extension":
        del stmts["torch.ops.robust_ext.linf_step_.default (dispatcher only)"]
    out = {k: measure(s, env, 1, min_run_time)["median_s"] * 1e6 for k, s in stmts.items()}
    torch.set_num_threads(os.cpu_count())
    return {"unit": "us per call, 1-element float32 tensor, 1 thread", "calls": out}


def fmt_row(cols, widths):
    return "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cols, widths)))


def print_config(r):
    shape = "x".join(map(str, r["shape"]))
    print(f"\n== {shape} {r['dtype']} threads={r['threads']} {r['device']}: {r['numel']:,} elements, "
          f"step moves {r['step_bytes'] / 1e6:.2f} MB ==")
    w = (64, 10, 8, 8, 9)
    print(fmt_row(("impl", "us", "ns/el", "GB/s", "max|diff|"), w))
    for key, m in r["timings"].items():
        label = key + (f" [{m['variant']}]" if "variant" in m else "") + (" *hoisted" if m.get("hoists_bounds") else "")
        d = m.get("max_abs_diff_vs_fused")
        print(fmt_row((label, f"{m['median_s'] * 1e6:.1f}", f"{m['ns_per_elem']:.3f}", f"{m['gb_per_s']:.1f}",
                       "-" if d is None else f"{d:.1e}"), w))
    if r["compile_s"]:
        print("compile s (first call for this config): "
              + ", ".join(f"{k} {v:.2f}" for k, v in r["compile_s"].items()))
    for name, q in r["ratios"].items():
        tgt = f" (target {q['target']}) {q['status']}" if q["target"] else ""
        print(f"  {name:38s} {q['value']:7.2f}{tgt}")


def print_summary(results):
    names = [n for n, *_ in TARGETS]
    w = [14, 8, 7] + [max(len(n), 12) for n in names]
    print("\n== summary: targeted ratios (PASS/MISS) ==")
    print(fmt_row(["shape", "dtype", "threads"] + names, w))
    for r in results:
        cells = [f"{r['ratios'][n]['value']:.2f} {r['ratios'][n]['status']}" if n in r["ratios"] else "-"
                 for n in names]
        print(fmt_row(["x".join(map(str, r["shape"])), r["dtype"], r["threads"]] + cells, w))


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False")
    shapes = [parse_shape(s) for s in (args.shapes or (QUICK_SHAPE if args.quick else DEFAULT_SHAPES)).split(",")]
    try:
        dtypes = [DTYPES[d.strip()] for d in args.dtypes.split(",")]
    except KeyError as e:
        raise SystemExit(f"--dtypes: unknown {e}, expected some of {','.join(DTYPES)}") from None
    threads = parse_threads(args.threads, device)
    min_run_time = args.min_run_time or (0.05 if args.quick else 0.2)
    rounds = args.rounds or (1 if args.quick else 3)

    backend = robust_ext.backend()
    if backend.get(device.type) != "extension":
        print(f"warning: robust_ext ops on {device.type} run the pure-PyTorch reference ({backend['reason']}): "
              "the 'fused' rows are not the extension", file=sys.stderr)
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv[1:] if argv is None else list(argv),
        "torch": torch.__version__, "robust_ext": robust_ext.__version__, "python": platform.python_version(),
        "build_info": robust_ext.build_info(), "backend": backend,
        "device": str(device), "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "threads": threads, "dtypes": [str(d).replace("torch.", "") for d in dtypes],
        "shapes": [list(s) for s in shapes], "min_run_time_s": min_run_time, "rounds": rounds,
        "alpha": ALPHA, "eps": EPS, "loadavg_start": os.getloadavg(),
        "bytes_per_element_moved": {k: f"{v} x element_size" for k, v in STREAMS.items()},
    }
    print(f"torch {meta['torch']} | {meta['build_info']} | {meta['cpu_model']} ({meta['cpu_count']} cpus) | "
          f"threads {threads} | min_run_time {min_run_time}s | load {meta['loadavg_start'][0]:.2f}")
    if meta["loadavg_start"][0] > 0.5 * os.cpu_count():
        print("warning: the machine is busy (load average above half the cores): timings will be noisy, "
              "multi-thread ones most", file=sys.stderr)

    t_start = time.perf_counter()
    overhead = call_overhead(device, min_run_time)
    print("\n== fixed per-call overhead (" + overhead["unit"] + ") ==")
    for k, us in overhead["calls"].items():
        print(f"  {k:58s} {us:7.2f} us")

    cache = None
    if not args.no_compile and not args.reuse_compile_cache:
        cache = tempfile.mkdtemp(prefix="bench_ops_inductor_")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        os.environ["TRITON_CACHE_DIR"] = os.path.join(cache, "triton")
    meta["inductor_cache"] = None if args.no_compile else ("reused" if args.reuse_compile_cache else "fresh")
    compiled = None if args.no_compile else Compiled()
    gen = torch.Generator().manual_seed(0)
    results = []
    for shape in shapes:
        for dtype in dtypes:
            for n in threads:
                r = finish_config([bench_config(shape, dtype, n, device, min_run_time, compiled, gen)
                                   for _ in range(rounds)])
                print_config(r)
                results.append(r)
    torch.set_num_threads(os.cpu_count())
    if cache:
        shutil.rmtree(cache, ignore_errors=True)
    print_summary(results)

    targeted = [q for r in results for q in r["ratios"].values() if q["target"]]
    meta.update(loadavg_end=os.getloadavg(), wall_s=time.perf_counter() - t_start,
                cold_compile_s=compiled.cold_compile_s if compiled else None)
    doc = {"meta": meta, "call_overhead": overhead, "results": results,
           "summary": {"targets": [{"ratio": n, "num": a, "den": b, "target": f"{c} {v}"} for n, a, b, c, v in TARGETS],
                       "pass": sum(q["status"] == "PASS" for q in targeted),
                       "miss": sum(q["status"] == "MISS" for q in targeted)}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    cold = f"cold compile {meta['cold_compile_s']:.1f} s; " if compiled else ""
    print(f"\n{doc['summary']['pass']} PASS, {doc['summary']['miss']} MISS; {cold}wall {meta['wall_s']:.0f} s; "
          f"wrote {out}")


if __name__ == "__main__":
    main()
