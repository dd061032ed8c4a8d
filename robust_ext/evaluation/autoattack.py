"""AutoAttack (Croce & Hein, ICML 2020, "Reliable evaluation of adversarial robustness with an ensemble of
diverse parameter-free attacks"): the ensemble and its bookkeeping, as fra31/auto-attack runs it.

>>> from robust_ext.evaluation import autoattack
>>> report = autoattack(model, test_set, eps=8/255, norm="linf", version="standard", state_path="aa_state")
>>> print(report.summary()); report.to_json("aa.json"); report.robustbench()

* The attacks run in the version's order (:mod:`.autoattack_versions`), each only on the points still robust:
  a point fooled by one attack is never attacked again, and records which attack fooled it. A point counts as
  fooled only when a full-precision forward of the attack's output misclassifies it and the output lies in
  the ε-ball and the bounds.
* The points still robust before an attack are split, in index order, into chunks of ``batch_size``; chunk
  ``k`` of attack ``i`` at ε ``j`` draws its random starts from a generator keyed by ``(seed, j, i, k)`` and
  re-seeds the global RNG from the same keys (randomized models). Its result depends on nothing else: the
  same report whichever process ran the chunk, and after any number of resumes.
* Under ``torchrun --nproc_per_node=N`` chunk ``k`` runs on rank ``k % N`` (gloo on CPU, NCCL on CUDA); the
  fooled masks are summed after each attack, so every rank holds the whole report.
* With ``state_path`` (a directory), every finished chunk and attack is on disk (:mod:`.autoattack_state`):
  a killed run resumes where it stopped; a resume with other settings is refused naming the setting.
* The original's checks (:mod:`.autoattack_checks`) run on the clean pass and after the attacks; each one that
  fires is an :class:`~robust_ext.evaluation.EvaluationWarning` and marks the report "this evaluation may be
  unreliable".
"""
from __future__ import annotations

import hashlib
import logging
import platform
import time
import warnings
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..attacks.checks import check_bounds, check_images_within, check_int
from ..attacks.threats import get_threat
from ..training import distributed
from . import autoattack_checks as checks
from ._inputs import as_batches, check_eps_grid, check_seed, eval_mode, generator, model_info, nonfinite_message, \
    resolve_device, rng_devices
from .autoattack_report import AutoAttackReport
from .autoattack_state import MISCLASSIFIED, ROBUST, EvaluationState
from .autoattack_versions import resolve_ensemble
from .diagnostics import EvaluationWarning, zero_gradient_mask

__all__ = ["autoattack", "AutoAttackReport"]

log = logging.getLogger("robust_ext.evaluation")

_CHUNK = 5  # the key of the chunks' streams in _inputs.generator (the runner uses 0-3)
DYNAMIC_POINTS = 8  # the dynamic check's one traced forward: a property of the model, not of the points


def _digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def _full_precision_logits(model, x):
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        out = model(x)
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != x.shape[0]:
        raise ValueError(f"model must return logits [N, num_classes], got "
                         f"{list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
    return out


def _confirm(model, spec, x, y, x_adv, eps, threat, lo, hi):
    """(fooled, outside): the attack's output misclassified by a full-precision forward and inside the ε-ball
    and the bounds; and the misclassified outputs outside them (not counted)."""
    if not isinstance(x_adv, torch.Tensor) or x_adv.shape != x.shape:
        raise ValueError(f"attack {spec.name!r} must return a tensor of x's shape {list(x.shape)}, got "
                         f"{getattr(x_adv, 'shape', type(x_adv).__name__)}")
    x_adv = x_adv.detach().to(x.dtype)
    slack = 4 * torch.finfo(x.dtype).eps * max(1.0, abs(lo), abs(hi)) * max(1.0, eps)
    flat = x_adv.flatten(1)
    inside = (threat.distance(x_adv, x) <= eps + slack).to(x.device)
    if flat.shape[1]:
        inside &= (flat >= lo - slack).all(1) & (flat <= hi + slack).all(1) & torch.isfinite(flat).all(1)
    wrong = _full_precision_logits(model, x_adv).argmax(1) != y
    return wrong & inside, wrong & ~inside, x_adv


def _reduce(t: torch.Tensor, ctx, comm_device) -> torch.Tensor:
    """``t`` summed over the processes, on the CPU."""
    if not ctx.distributed:
        return t
    return distributed.all_reduce_sum(t.to(comm_device), ctx).cpu()


def _settings(version, specs, threat, grid, lo, hi, seed, batch_size, x, y, model, amp, fuse) -> dict:
    params = (*model.state_dict().values(),) if isinstance(model, nn.Module) else ()
    return {"version": version, "attacks": [s.describe() for s in specs], "norm": threat.name, "eps": grid,
            "clip_min": lo, "clip_max": hi, "seed": seed, "batch_size": batch_size, "n_samples": len(y),
            "data": _digest([x, y]), "model": _digest(params), "amp": str(amp), "fuse": fuse}


def _clean_pass(model, x_all, y_all, dev, batch_size, ctx, comm_device, version):
    """Per point: correct, all-zero input gradient (of the correct ones), non-finite logits; the number of
    classes; the softmax, randomized and dynamic checks on the first chunk."""
    n = len(y_all)
    correct, zero, broken = (torch.zeros(n, dtype=torch.int32) for _ in range(3))
    flags = torch.zeros(4, dtype=torch.int32)  # softmax, randomized, classes, dynamic
    for k, s in enumerate(range(0, n, batch_size)):
        if k % ctx.world_size != ctx.rank:
            continue
        x, y = x_all[s:s + batch_size].to(dev), y_all[s:s + batch_size].to(dev)
        logits = _full_precision_logits(model, x)
        finite = torch.isfinite(logits).all(1)
        ok = (logits.argmax(1) == y) & finite
        if k == 0:
            flags[0] = int(checks.softmax_output(logits))
            flags[1] = int(version != "rand" and checks.randomized(model, x, y))
            flags[2] = logits.shape[1]
            flags[3] = int(checks.dynamic(model, x[:DYNAMIC_POINTS]))
        correct[s:s + len(y)] = ok.cpu().int()
        broken[s:s + len(y)] = (~finite).cpu().int()
        if ok.any():
            idx = ok.nonzero().squeeze(1)
            zero[s + idx.cpu()] = zero_gradient_mask(model, x[idx], y[idx]).cpu().int()
    correct, zero, broken, flags = (_reduce(t, ctx, comm_device) for t in (correct, zero, broken, flags))
    return {"correct": correct.bool(), "zero_gradient": int(zero.sum()), "flagged": zero.bool(),
            "nonfinite": int(broken.sum()),
            "softmax_output": bool(flags[0]), "randomized": bool(flags[1]), "num_classes": int(flags[2]),
            "dynamic": bool(flags[3])}


def _per_class(codes, y_all, attacks, num_classes):
    n = torch.bincount(y_all, minlength=num_classes)

    def acc(mask):
        hits = torch.bincount(y_all[mask], minlength=n.numel())
        return [None if c == 0 else h / c for h, c in zip(hits.tolist(), n.tolist())]
    out = {"n": n.tolist(), "clean": acc(codes != MISCLASSIFIED)}
    for i, name in enumerate(attacks):
        out[name] = acc((codes == ROBUST) | (codes > i + 1))
    return out


def _check_points(x, y, lo, hi) -> None:
    """Labels >= 0 and images within the bounds, before any work."""
    if len(y) and int(y.min()) < 0:
        raise ValueError(f"labels must be class indices >= 0, got {int(y.min())}")
    check_images_within(x, lo, hi)


def _flagged(clean: dict, n: int) -> torch.Tensor:
    """The points the checks flag: those with an all-zero input gradient at the clean pass, or every point when
    a check about the whole model fired."""
    if clean["randomized"] or clean["softmax_output"] or clean["nonfinite"] or clean.get("dynamic"):
        return torch.ones(n, dtype=torch.bool)
    return clean.get("flagged", torch.zeros(n, dtype=torch.bool))


def gate_mask(spec, i: int, codes: torch.Tensor, clean: dict) -> torch.Tensor:
    """Which points attack ``i`` of the list may run on at one ε, given the ε's codes (a point fooled by an
    attack after ``i`` still counts as robust before it): every point with no gate; with ``"flagged"``, the
    points the checks flag; with ``"escalate"``, those, or every point when the attack before it fooled any
    point (a second white-box attack found what the first ones missed: the gradients cannot be trusted, so
    the black-box attack runs everywhere)."""
    n = codes.numel()
    if spec.gate is None or (spec.gate == "escalate" and i > 0 and bool((codes == i).any())):
        return torch.ones(n, dtype=torch.bool)
    return _flagged(clean, n)


def _run_attack(model, spec, i, j, e, state, x_all, y_all, dev, threat, lo, hi, seed, batch_size, ctx, progress,
                return_adversarial):
    """Attack ``i`` at ε ``j`` on this process's chunks of the points still robust (a finished chunk read from the
    state): (this process's fooled mask [N], its count of outputs outside the ball, [(points, x_adv)] fooled)."""
    codes = state.codes[j]
    robust = ((codes == ROBUST) & gate_mask(spec, i, codes, state.clean)).nonzero().squeeze(1)
    chunks = list(robust.split(batch_size))
    mine = [k for k in range(len(chunks)) if k % ctx.world_size == ctx.rank]
    fooled_now = torch.zeros(len(y_all), dtype=torch.int32)
    outside = torch.zeros(1, dtype=torch.int32)
    found = []
    bar = tqdm(total=sum(len(chunks[k]) for k in mine), desc=f"{spec.name} eps={e:.4g}", unit="img",
               disable=not (progress and ctx.is_main), leave=False)
    for k in mine:
        points = chunks[k]
        rec = state.load_chunk(j, i, k, points, x_all.shape[1:])
        if rec is None:
            torch.manual_seed(generator(seed, _CHUNK, j, i, k).initial_seed())
            x, y = x_all[points].to(dev), y_all[points].to(dev)
            x_adv = spec(model, x, y, e, norm=threat, clip_min=lo, clip_max=hi,
                         generator=generator(seed, _CHUNK, j, i, k))
            fooled, out, x_adv = _confirm(model, spec, x, y, x_adv, e, threat, lo, hi)
            rec = (fooled.cpu(), x_adv[fooled].cpu(), int(out.sum()))
            state.save_chunk(j, i, k, points, *rec)
        fooled_now[points[rec[0]]] = 1
        outside += rec[2]
        if return_adversarial:
            found.append((points[rec[0]], rec[1]))
        bar.update(len(points))
        bar.set_postfix(left=len(robust) - int(fooled_now.sum()))
        if not progress and ctx.is_main:  # no bar (e.g. stderr is not a terminal): a log line per chunk
            log.info("autoattack %s eps=%.4g: chunk %d of %d done, %d of %d points left robust", spec.name, e,
                     k + 1, len(chunks), len(robust) - int(fooled_now.sum()), len(robust))
    bar.close()
    return fooled_now, outside, found


def autoattack(model, data, eps: Union[float, Sequence[float]] = 8 / 255, norm="linf", version: Optional[str] = None,
               attacks=None, *, clip_min: float = 0.0, clip_max: float = 1.0, batch_size: int = 256,
               max_samples: Optional[int] = None, device=None, seed: int = 0, amp=False, state_path=None,
               progress: bool = True, model_name: Optional[str] = None, data_name: Optional[str] = None,
               fuse: bool = False, return_adversarial: bool = True) -> AutoAttackReport:
    """Run AutoAttack on ``data`` at every ε of ``eps`` (each ε its own run of the ensemble).

    Args:
        model: images in ``[clip_min, clip_max]`` -> logits (normalization inside the model).
        data: an ``(images, labels)`` pair of tensors, a ``Dataset`` or a ``DataLoader``; ``max_samples``
            keeps the first ones. All points are held in memory (as the original's ``x_orig``).
        eps: a budget or a list of budgets in the units of ``norm`` (``"linf"``, ``"l2"`` or a ThreatModel).
        version: ``"standard"`` (the default), ``"plus"``, ``"rand"`` or ``"fast"`` (robust_ext's: APGD-CE and
            APGD-T on 3 MALT-ranked targets, FAB-T on 3 targets; Square only where the checks call for it; see
            :mod:`.autoattack_versions`); ``"custom"`` (or None) with ``attacks``.
        attacks: a custom list: registry names (``"apgd"``, ``"apgd_t"``, ...), the original's names
            (``"apgd-ce"``, ``"apgd-dlr"``, ``"apgd-t"``, ``"fab"``, ``"fab-t"``, ``"square"``), specs of
            :func:`~robust_ext.evaluation.make_attack`, attack objects or callables.
        batch_size: points per chunk (a chunk's random starts depend on its points, so it is a setting).
        amp: ``False``, ``True`` or a dtype: autocast inside the registry's attacks; fooled points are
            confirmed in full precision.
        seed: every random start and the global RNG of each chunk derive from it: same seed, same report.
        state_path: a directory to keep the state in and resume from (see :mod:`.autoattack_state`).
        progress: a tqdm bar per attack (points attacked, images/s, points left robust).
        fuse: attack :func:`robust_ext.fuse.fuse` of the model.
        return_adversarial: keep the adversarial examples in ``report.x_adv`` (main process).

    Returns an :class:`AutoAttackReport` (on every process of a distributed run).
    """
    t_start = time.perf_counter()
    threat = get_threat(norm)
    grid = check_eps_grid(eps)
    version, specs = resolve_ensemble(version, attacks, amp)
    seed = check_seed(seed)
    batch_size = check_int(batch_size, "batch_size", 1)
    lo, hi = check_bounds(clip_min, clip_max)
    if not isinstance(fuse, bool):
        raise ValueError(f"fuse must be True or False, got {fuse!r}")
    if fuse:
        from ..fuse import fuse as fuse_model

        model = fuse_model(model)
    batches = as_batches(data, batch_size, max_samples, data_name)
    pairs = [(x.cpu(), y.cpu()) for x, y in batches]
    x_all, y_all = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs]).long()
    n = len(y_all)
    _check_points(x_all, y_all, lo, hi)
    dev = resolve_device(model, device)
    ctx = distributed.setup(dev)
    if ctx.distributed and torch.distributed.get_backend() == "nccl":
        dev = torch.device("cuda", torch.cuda.current_device())
        if isinstance(model, nn.Module):
            model.to(dev)
    comm_device = dev if ctx.distributed and torch.distributed.get_backend() == "nccl" else torch.device("cpu")
    settings = _settings(version, specs, threat, grid, lo, hi, seed, batch_size, x_all, y_all, model, amp, fuse)
    state = EvaluationState(state_path, settings, len(grid), n, ctx.is_main)
    names = [s.name for s in specs]
    timing = {"clean_s": 0.0, "attacks_s": {name: 0.0 for name in names}}
    adversarial = {j: [] for j in range(len(grid))}
    keep = return_adversarial and ctx.is_main

    with torch.random.fork_rng(devices=rng_devices(dev)), eval_mode(model):
        if n:  # every rank alike, before any work: a label the model has no logit for
            with torch.no_grad():
                classes = _full_precision_logits(model, x_all[:1].to(dev)).shape[-1]
            if int(y_all.max()) >= classes:
                raise ValueError(f"labels must be class indices < {classes} (the model's logits), got labels up "
                                 f"to {int(y_all.max())}")
        torch.manual_seed(seed)
        if state.clean is None:
            t = time.perf_counter()
            clean = _clean_pass(model, x_all, y_all, dev, batch_size, ctx, comm_device, version)
            state.codes[:] = torch.where(clean.pop("correct"), ROBUST, MISCLASSIFIED).to(torch.int16)
            state.clean = clean
            state.save()
            timing["clean_s"] = time.perf_counter() - t
        for j, e in enumerate(grid):
            for i, spec in enumerate(specs):
                if (j, i) in state.done:
                    if keep:
                        adversarial[j] += list(state.saved_adversarial(j, i))
                    continue
                t = time.perf_counter()
                fooled_now, outside, found = _run_attack(model, spec, i, j, e, state, x_all, y_all, dev, threat, lo,
                                                         hi, seed, batch_size, ctx, progress, return_adversarial)
                fooled_now, outside = _reduce(fooled_now, ctx, comm_device).bool(), _reduce(outside, ctx, comm_device)
                state.codes[j][fooled_now] = i + 1
                state.outside[j, i] = int(outside)
                if return_adversarial:
                    gathered = distributed.gather_to_main(found, ctx)
                    if keep:
                        adversarial[j] += [pair for part in gathered for pair in part]
                state.done.add((j, i))
                state.save()
                timing["attacks_s"][spec.name] += time.perf_counter() - t
                log.info("autoattack eps=%.4g: robust accuracy after %s: %.2f%% (%d fooled)", e, spec.name,
                         100 * float((state.codes[j] == ROBUST).float().mean()), int(fooled_now.sum()))
    timing["total_s"] = time.perf_counter() - t_start
    report = _report(model, model_name, batches, version, specs, threat, grid, lo, hi, seed, batch_size, amp, ctx,
                     dev, state, y_all, timing)
    if keep:
        report.x_adv = {}
        for j, e in enumerate(grid):
            xa = x_all.clone()
            for idx, xs in adversarial[j]:
                xa[idx] = xs.to(xa.dtype)
            report.x_adv[e] = xa
    if ctx.is_main:
        for message in report.warnings:
            warnings.warn(message, EvaluationWarning, stacklevel=2)
    return report


def _report(model, model_name, batches, version, specs, threat, grid, lo, hi, seed, batch_size, amp, ctx, dev, state,
            y_all, timing) -> AutoAttackReport:
    import robust_ext

    n, clean, names = len(y_all), state.clean, [s.name for s in specs]
    clean_accuracy = float((state.codes[0] != MISCLASSIFIED).float().mean())
    results, fooled_by, black_box, issues = [], [], {}, []
    labels = ["clean"] + names
    for j, e in enumerate(grid):
        codes = state.codes[j]
        after = {"clean": clean_accuracy}
        for i, name in enumerate(names):
            after[name] = float(((codes == ROBUST) | (codes > i + 1)).float().mean())
        fooled = {name: int((codes == i + 1).sum()) for i, name in enumerate(names)}
        attacked = {}  # the points each attack ran on: robust before it (and flagged, for a gated one)
        for i, spec in enumerate(specs):
            before = (codes == ROBUST) | (codes >= i + 1)
            attacked[spec.name] = int((before & gate_mask(spec, i, codes, clean)).sum())
        out = {name: state.outside.get((j, i), 0) for i, name in enumerate(names)}
        results.append({"eps": e, "robust_accuracy": after[names[-1]], "accuracy_after": after, "attacked": attacked,
                        "fooled": fooled,
                        "outside_ball": out, "per_class": _per_class(codes, y_all, names, clean["num_classes"])})
        fooled_by.append([None if c == ROBUST else labels[c] for c in codes.tolist()])
        for i, spec in enumerate(specs):
            white_before = any(s.kind not in checks.BLACK_BOX for s in specs[:i])
            if spec.kind in checks.BLACK_BOX and white_before and fooled[spec.name] / n > checks.BLACK_BOX_TOL:
                black_box[f"{e:.6g}"] = (spec.name, fooled[spec.name] / n)
            if out[spec.name]:
                issues.append(f"attack {spec.name!r} returned {out[spec.name]} misclassified points outside the "
                              f"eps = {e:.4g} ball or the bounds: not counted as fooled")
    check = {"zero_gradient_points": clean["zero_gradient"], "randomized": clean["randomized"],
             "softmax_output": clean["softmax_output"], "dynamic": clean.get("dynamic", False), "black_box": black_box,
             "nonfinite_logits": clean["nonfinite"]}
    fired = checks.messages(check, version)
    if clean["nonfinite"]:
        fired.insert(0, nonfinite_message(clean["nonfinite"], n))
    config = {"model": model_info(model, model_name), "data": batches.describe(), "version": version,
              "attacks": [s.describe() for s in specs], "norm": threat.name, "eps": grid, "clip_min": lo,
              "clip_max": hi, "seed": seed, "batch_size": batch_size, "amp": amp, "world_size": ctx.world_size,
              "device": str(dev) if dev is not None else "cpu", "resumed": state.resumed,
              "versions": {"robust_ext": robust_ext.__version__, "torch": torch.__version__,
                           "numpy": np.__version__, "python": platform.python_version()}}
    return AutoAttackReport(config=config, n_samples=n, clean_accuracy=clean_accuracy, eps=grid, attacks=names,
                            results=results, fooled_by=fooled_by, checks=check, warnings=fired + issues,
                            unreliable=checks.UNRELIABLE if fired else None, timing=timing)
