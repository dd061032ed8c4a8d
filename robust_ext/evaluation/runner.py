"""``evaluate``: every attack at every ε over the data in one pass, with the margin, minimal ε and checks."""
from __future__ import annotations

import logging
import math
import platform
import time
import warnings
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import backend
from .._io import check_out_dir
from ..attacks.checks import check_int
from ..attacks.threats import get_threat, norm_label
from . import metrics
from ._inputs import (as_batches, check_eps, check_eps_grid, check_seed, eval_mode, generator, logits_of, model_info,
                      nonfinite_message, nonfinite_rows, predict, resolve_device, rng_devices)
from .diagnostics import EvaluationWarning, GradientMaskingWarning, MaskingThresholds, gradient_masking_warnings, \
    zero_gradient_mask
from .margin import bisection_steps, minimal_eps, summarize_minimal_eps
from .memory import PROBE_SAMPLES, working_batch_size
from .report import Report
from .specs import make_attack, resolve_attacks

log = logging.getLogger(__name__)

# The plots pick their examples among this many first samples: fooled ones first, so that they show something.
EXAMPLE_POOL = 64

# Keys of the independent random streams (see _inputs.generator); attack i at grid point j uses (0, i, j).
_ATTACK, _MIN_EPS, _LARGE_EPS, _EXAMPLES = 0, 1, 2, 3


def _version() -> str:
    import robust_ext  # at call time: robust_ext/__init__ may import this package before defining __version__
    return robust_ext.__version__


def _large_eps(large_eps, clip_min, clip_max, threat, sample_numel: int) -> Optional[float]:
    """The large-ε check's budget: given, or ("auto") the radius at which every image of the clip box can be
    moved to its centre under the threat model (None when the model does not say)."""
    if large_eps is None:
        return None
    if large_eps == "auto":
        span = clip_max - clip_min
        return threat.covering_radius(0.5 * span, sample_numel) if math.isfinite(span) and span > 0 else None
    return check_eps(large_eps, "large_eps", positive=True)


def _pgd_spec(specs):
    """The first PGD of the evaluation that takes per-sample ε, else PGD with its defaults."""
    return next((s for s in specs if s.kind == "pgd" and s.per_sample_eps), None) or make_attack("pgd")


def _reachable(spec, grid, accuracy):
    """An iterative attack's accuracies, NaN where its fixed step cannot cover ε (alpha · steps < ε): there
    a single FGSM step of ε beating it says nothing about the gradients."""
    alpha, steps = spec.params.get("alpha"), spec.params.get("steps")
    if spec.kind != "pgd" or alpha is None or steps is None:
        return accuracy
    return [a if alpha * steps >= e * (1 - 1e-9) else math.nan for e, a in zip(grid, accuracy)]


def _large_eps_spec(pgd, big):
    """The PGD of the large-ε check: the evaluation's own, unless its fixed step cannot cover that ε
    (alpha · steps below it), then one with the same steps and the default step size 2.5 ε / steps."""
    alpha = pgd.params.get("alpha")
    if alpha is None or big is None or alpha * pgd.params["steps"] >= big:
        return pgd
    return make_attack("pgd", steps=pgd.params["steps"], amp=pgd.params.get("amp", False))


def _working_batches(batches, model, dev, batch_size: int, state: dict):
    """The data's batches moved to ``dev``, each split to the working batch size (measured on the first)."""
    for xb, yb in batches:
        if "size" not in state:
            px, py = xb[:PROBE_SAMPLES], yb[:PROBE_SAMPLES]
            if dev is not None:
                px, py = px.to(dev), py.to(dev)
            state["size"] = working_batch_size(model, px, py, batch_size)
        size = state["size"]
        for s in range(0, xb.shape[0], size):
            x, y = xb[s:s + size], yb[s:s + size]
            yield (x.to(dev), y.to(dev)) if dev is not None else (x, y)


def evaluate(model, data, attacks=("fgsm", "pgd"), *, eps: Sequence[float], target_accuracy: float = 0.5,
             min_eps: Union[bool, str, object] = True, eps_max: Optional[float] = None,
             min_eps_tol: Optional[float] = None, large_eps: Union[str, float, None] = "auto",
             thresholds: MaskingThresholds = MaskingThresholds(), clip_min: float = 0.0, clip_max: float = 1.0,
             batch_size: int = 256, max_samples: Optional[int] = None, device=None, seed: int = 0,
             progress: bool = True, model_name: Optional[str] = None, data_name: Optional[str] = None,
             plot_dir=None, n_examples: int = 8, example_eps: Optional[float] = None, norm="linf",
             fuse: bool = False) -> Report:
    """Evaluate ``model``'s robustness to ``attacks`` at every ε of ``eps`` on ``data``.

    Args:
        model: images in ``[clip_min, clip_max]`` -> logits (normalization inside the model).
        data: an ``(images, labels)`` pair of tensors, a ``Dataset`` or a ``DataLoader``; ``max_samples``
            keeps the first ones. Batches move to ``device`` (default: the model's parameters' device).
        attacks: names (``"fgsm"``, ``"bim"``, ``"pgd"``, ``"noise"``; see :mod:`.specs` for defaults),
            :func:`make_attack` specs, attack objects (robust_ext or torchattacks classes: their ``eps`` is
            set per grid point, the rest kept) or callables ``fn(model, x, y, eps=eps) -> x_adv``.
        eps: the ε grid (sorted, duplicates dropped); every value finite and >= 0, in the units of ``norm``.
        fuse: attack :func:`robust_ext.fuse.fuse` of the model (its ReLU + max-pool and BatchNorm + ReLU on the
            fused layers, the same parameters; the report records what was fused).
        norm: the threat model: ``"linf"`` (default), ``"l2"`` or a
            :class:`~robust_ext.attacks.ThreatModel`. Named attacks run under it; budget checks, the minimal
            ε, the report and the plots measure distances in it (attack objects and callables keep their own
            norm: pass ones that match).
        target_accuracy: the robust accuracy that defines the robustness margin.
        min_eps: bisect each sample's minimal fooling ε up to ``eps_max`` (default: the largest ε) to within
            ``min_eps_tol`` (default ``eps_max / 256``) with the evaluation's first PGD (True), or with the
            named attack / spec given; False skips it.
        batch_size: samples per batch, capped by the memory available (measured on the first batch, see
            :mod:`.memory`; the report's ``working_batch_size`` says what ran, the log says when it capped).
        large_eps: the ε of the "accuracy falls towards 0" check ("auto": the radius that moves every image to
            the clip box's centre: half the clip range for L-inf, that times sqrt(pixels) for L2; None: skip).
        thresholds: when the gradient-masking warnings fire.
        seed: every random start and noise draw comes from generators derived from it, and the global RNG
            is seeded with it inside the evaluation (and restored afterwards): same seed, same report
            (but for timing).
        progress: a tqdm bar over the batches.
        plot_dir: if given, write there ``accuracy_vs_eps.png``, ``adversarial_examples.png`` and
            ``pgd_probabilities.png`` for the first ``n_examples`` samples at ``example_eps`` (default: the
            middle of the grid).

    Returns a :class:`Report`; each gradient-masking sign is also issued as a
    :class:`GradientMaskingWarning`, an attack leaving its ε-ball as an :class:`EvaluationWarning`.
    ``attacks="autoattack"`` runs the AutoAttack ensemble (standard version) at each ε instead and returns its
    :class:`~robust_ext.evaluation.AutoAttackReport` (see :func:`~robust_ext.evaluation.autoattack`).
    """
    if isinstance(attacks, str) and attacks == "autoattack":
        from .autoattack import autoattack

        return autoattack(model, data, eps, norm, clip_min=clip_min, clip_max=clip_max, batch_size=batch_size,
                          max_samples=max_samples, device=device, seed=seed, progress=progress,
                          model_name=model_name, data_name=data_name, fuse=fuse)
    t_start = time.perf_counter()
    threat = get_threat(norm)
    fusion = None
    if not isinstance(fuse, bool):
        raise ValueError(f"fuse must be True or False, got {fuse!r}")
    if fuse:
        from ..fuse import fuse as fuse_model

        model, fusion = fuse_model(model, return_report=True)
    grid = check_eps_grid(eps)
    specs = resolve_attacks(attacks)
    seed = check_seed(seed)
    metrics.robustness_margin([0.0], [1.0], target_accuracy)  # checks target_accuracy before the work
    if large_eps not in (None, "auto"):
        check_eps(large_eps, "large_eps", positive=True)
    pgd = _pgd_spec(specs)
    n_examples = check_int(n_examples, "n_examples", 0)
    if plot_dir is not None:
        check_out_dir(plot_dir, "plot_dir")  # before the work, not after it
    bisect = None
    if min_eps is not False:
        bisect = pgd if min_eps is True else resolve_attacks(min_eps)[0]
        if not bisect.per_sample_eps:
            raise ValueError(f"min_eps needs a named attack (it bisects a per-sample eps), got {bisect.name!r}")
        if eps_max is None and max(grid) <= 0:
            raise ValueError("min_eps bisects up to eps_max, by default the largest eps, which is 0: pass eps_max "
                             "> 0, or min_eps=False (CLI: --no-min-eps)")
        eps_max = check_eps(max(grid) if eps_max is None else eps_max, "eps_max", positive=True)
        min_eps_tol = eps_max / 256 if min_eps_tol is None else check_eps(min_eps_tol, "min_eps_tol", positive=True)
    batches = as_batches(data, batch_size, max_samples, data_name)
    dev = resolve_device(model, device)

    tallies = {(s.name, e): metrics.Tally() for s in specs for e in grid}
    worst_robust = [0] * len(grid)
    timing = {"clean_s": 0.0, "attacks_s": {s.name: 0.0 for s in specs}, "min_eps_s": 0.0, "diagnostics_s": 0.0}
    clean_correct, zero_grad, big_robust, min_eps_values, examples = [], 0, 0, [], None
    nonfinite, work = 0, {}
    gens = {(i, j): generator(seed, _ATTACK, i, j) for i in range(len(specs)) for j in range(len(grid))}
    gen_min, gen_big = generator(seed, _MIN_EPS), generator(seed, _LARGE_EPS)
    big, big_pgd, reuse_big = None, pgd, False  # set from the first batch (L2's radius needs its size)

    with torch.random.fork_rng(devices=rng_devices(dev)), eval_mode(model):
        torch.manual_seed(seed)
        for k, (x, y) in enumerate(tqdm(_working_batches(batches, model, dev, batch_size, work),
                                        total=batches.num_batches, desc="evaluate", disable=not progress,
                                        leave=False)):
            if not progress and k:  # no bar (e.g. stderr is not a terminal): a log line per batch instead
                log.info("evaluate: %d of %s batches done, %.0f s", k, batches.num_batches or "?",
                         time.perf_counter() - t_start)
            if examples is None:
                examples = (x[:max(EXAMPLE_POOL, n_examples)], y[:max(EXAMPLE_POOL, n_examples)])
                big = _large_eps(large_eps, clip_min, clip_max, threat, x[0].numel() if len(x) else 0)
                big_pgd = _large_eps_spec(pgd, big)
                reuse_big = (big is not None and any(s is big_pgd for s in specs)
                             and any(math.isclose(big, e) for e in grid))
            t = time.perf_counter()
            logits = logits_of(model, x)
            clean = logits.argmax(1) == y
            nonfinite += int(nonfinite_rows(logits).sum())
            clean_correct.append(clean.cpu())
            timing["clean_s"] += time.perf_counter() - t
            t = time.perf_counter()
            zero_grad += int(zero_gradient_mask(model, x, y).sum())
            timing["diagnostics_s"] += time.perf_counter() - t
            robust_all = [clean.clone() for _ in grid]
            for i, spec in enumerate(specs):
                t = time.perf_counter()
                for j, e in enumerate(grid):
                    x_adv = spec(model, x, y, e, norm=threat, clip_min=clip_min, clip_max=clip_max,
                                 generator=gens[i, j])
                    if not isinstance(x_adv, torch.Tensor) or x_adv.shape != x.shape:
                        raise ValueError(f"attack {spec.name!r} must return a tensor of x's shape {list(x.shape)}, "
                                         f"got {getattr(x_adv, 'shape', type(x_adv).__name__)}")
                    robust = clean & (predict(model, x_adv) == y)
                    tallies[spec.name, e].add(robust, *metrics.perturbation_norms(x_adv, x), e,
                                              threat.distance(x_adv, x))
                    robust_all[j] &= robust
                    if reuse_big and spec is big_pgd and math.isclose(big, e):
                        big_robust += int(robust.sum())
                timing["attacks_s"][spec.name] += time.perf_counter() - t
            for j, robust in enumerate(robust_all):
                worst_robust[j] += int(robust.sum())
            t = time.perf_counter()
            if big is not None and not reuse_big:
                x_adv = big_pgd(model, x, y, big, norm=threat, clip_min=clip_min, clip_max=clip_max,
                                generator=gen_big)
                big_robust += int((clean & (predict(model, x_adv) == y)).sum())
            timing["diagnostics_s"] += time.perf_counter() - t
            if bisect is not None:
                t = time.perf_counter()
                min_eps_values.append(minimal_eps(model, x, y, eps_max=eps_max, tol=min_eps_tol, attack=bisect,
                                                  clip_min=clip_min, clip_max=clip_max, generator=gen_min,
                                                  norm=threat).cpu())
                timing["min_eps_s"] += time.perf_counter() - t
    n = batches.n
    correct = torch.cat(clean_correct)
    n_correct = int(correct.sum())
    clean_accuracy = n_correct / n

    results, issues = {}, []
    for spec in specs:
        per_eps = [tallies[spec.name, e].summary(n_correct) for e in grid]
        r = {"kind": spec.kind, "params": spec.params, **{k: [p[k] for p in per_eps] for k in per_eps[0]}}
        r["margin"] = metrics.robustness_margin(grid, r["accuracy"], target_accuracy, clean_accuracy)
        results[spec.name] = r
        slack = 4 * torch.finfo(examples[0].dtype).eps * max(1.0, abs(clip_min), abs(clip_max))
        over = [e for e in grid if tallies[spec.name, e].excess > slack * max(1.0, e)]
        if over:
            issues.append(f"attack {spec.name!r} returned perturbations larger than eps at eps = "
                          f"{', '.join(f'{e:.4g}' for e in over)}: its numbers are not robust accuracy at those budgets")
    worst_acc = [r / n for r in worst_robust]
    worst_case = {"accuracy": worst_acc, "success_rate": [metrics.success_rate(n_correct, r) for r in worst_robust],
                  "margin": metrics.robustness_margin(grid, worst_acc, target_accuracy, clean_accuracy)}

    zero_grad_fraction = zero_grad / n
    big_check = (big, big_robust / n) if big is not None else None
    masking = gradient_masking_warnings(grid, [(s.name, s.kind, _reachable(s, grid, results[s.name]["accuracy"]))
                                               for s in specs], n, zero_grad_fraction, big_check, thresholds)
    if nonfinite:
        issues.insert(0, nonfinite_message(nonfinite, n))
    for message in issues:
        warnings.warn(message, EvaluationWarning, stacklevel=2)
    for message in masking:
        warnings.warn(message, GradientMaskingWarning, stacklevel=2)

    min_eps_summary = None
    if bisect is not None:
        min_eps_summary = summarize_minimal_eps(torch.cat(min_eps_values).numpy(), correct.numpy(), eps_max,
                                                min_eps_tol, bisect.describe())
        min_eps_summary["bisection_steps"] = bisection_steps(eps_max, min_eps_tol)

    config = {
        "model": model_info(model, model_name), "data": batches.describe(),
        "attacks": [s.describe() for s in specs], "norm": threat.name, "eps": grid, "clip_min": clip_min, "clip_max": clip_max,
        "target_accuracy": target_accuracy, "seed": seed, "batch_size": batch_size,
        "working_batch_size": work.get("size"), "thresholds": thresholds.to_dict(),
        "large_eps": big, "device": str(dev if dev is not None else examples[0].device),
        "dtype": str(examples[0].dtype).replace("torch.", ""),
        "versions": {"robust_ext": _version(), "torch": torch.__version__, "numpy": np.__version__,
                     "python": platform.python_version()},
        "backend": backend(),
        "fused": None if fusion is None else {"fused": fusion.fused, "left": fusion.left},
    }
    report = Report(config=config, n_samples=n, clean_accuracy=clean_accuracy, eps=grid, attacks=results,
                    worst_case=worst_case if len(specs) > 1 else None, min_eps=min_eps_summary,
                    diagnostics={"zero_grad_fraction": zero_grad_fraction, "nonfinite_logits": nonfinite,
                                 "large_eps": None if big_check is None else
                                 {"eps": big_check[0], "accuracy": big_check[1], "attack": big_pgd.describe()}},
                    warnings=issues + masking, timing=timing)
    if plot_dir is not None:
        t = time.perf_counter()
        report.plots = _write_plots(report, model, examples, n_examples, pgd, Path(plot_dir),
                                    grid[len(grid) // 2] if example_eps is None else example_eps,
                                    clip_min, clip_max, generator(seed, _EXAMPLES), threat)
        timing["plots_s"] = time.perf_counter() - t
    timing["total_s"] = time.perf_counter() - t_start
    log.info("evaluated %s: clean %.4f, %d attacks x %d eps in %.1f s", config["model"]["name"], clean_accuracy,
             len(specs), len(grid), timing["total_s"])
    return report


def showing_examples(model, x, y, x_adv, n: int) -> torch.Tensor:
    """Indices of ``n`` samples that make a plot's point: correct and fooled first, then correct and robust,
    then the rest, each group in data order."""
    with torch.no_grad():
        clean, adv = predict(model, x) == y, predict(model, x_adv) == y
    order = torch.cat([(clean & ~adv).nonzero(), (clean & adv).nonzero(), (~clean).nonzero()]).squeeze(1)
    return order[:n].to(x.device)


def _write_plots(report, model, examples, n, pgd, out: Path, eps, clip_min, clip_max, gen, threat) -> list:
    from . import plots  # matplotlib only when plots are asked for
    from .trajectory import pgd_trajectory

    out.mkdir(parents=True, exist_ok=True)
    x, y = examples
    eps = check_eps(eps, "example_eps")
    with eval_mode(model):
        x_adv = pgd(model, x, y, eps, norm=threat, clip_min=clip_min, clip_max=clip_max, generator=gen)
        pick = showing_examples(model, x, y, x_adv, n)
    x, y, x_adv = (t.index_select(0, pick) for t in (x, y, x_adv))
    probs, _ = pgd_trajectory(model, x, y, eps=eps, alpha=pgd.params.get("alpha"), steps=pgd.params.get("steps", 10),
                              random_start=pgd.params.get("random_start", True), clip_min=clip_min,
                              clip_max=clip_max, generator=gen, norm=threat)
    name = report.config["model"]["name"]
    where = f"eps = {eps:.4g} ({norm_label(threat.name)})"
    paths = [plots.plot_accuracy_curves(report, out / "accuracy_vs_eps.png"),
             plots.plot_adversarial_examples(model, x, y, x_adv, out / "adversarial_examples.png",
                                             title=f"{name} under {pgd.name}, {where}", clip_min=clip_min,
                                             clip_max=clip_max),
             plots.plot_class_probabilities(probs, y, out / "pgd_probabilities.png",
                                            title=f"{name}: class probabilities along {pgd.name}, {where}")]
    return [str(p) for p in paths]
