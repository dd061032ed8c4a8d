"""PNG plots of an evaluation, drawn on matplotlib ``Figure`` objects with the Agg canvas: no pyplot, so no
global backend or figure state is touched and nothing needs a display."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence, Union

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .._io import atomic_write
from ..attacks.threats import norm_label
from ._inputs import eval_mode, predict
from .autoattack_report import AutoAttackReport

PathLike = Union[str, "os.PathLike[str]"]
_LINESTYLES = ("-", "--", ":", "-.")
_MARKERS = ("o", "s", "^", "D", "v", "P")
_GREEN, _RED = "#1a7f37", "#cf222e"


def _save(fig: Figure, path: PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))


def _curves(report, with_worst: bool) -> Dict[str, tuple]:
    """name -> (eps, accuracy) of a :class:`~robust_ext.evaluation.Report` (one per attack, and the worst case)
    or of an :class:`~robust_ext.evaluation.AutoAttackReport` (its robust accuracy); each from ε = 0."""
    if isinstance(report, AutoAttackReport):
        n = report.n_samples
        curves = {f"AutoAttack ({report.config.get('version')}, {n} pts)":
                  [r["robust_accuracy"] for r in report.results]}
    else:
        curves = {name: a["accuracy"] for name, a in report.attacks.items()}
        if report.worst_case and with_worst:
            curves["worst case"] = report.worst_case["accuracy"]
    out = {}
    for name, acc in curves.items():
        eps, acc = list(report.eps), list(acc)
        if eps[0] > 0:
            eps, acc = [0.0] + eps, [report.clean_accuracy] + acc
        out[name] = (eps, acc)
    return out


def plot_accuracy_curves(reports, path: PathLike, *, title: Optional[str] = None) -> Path:
    """Robust accuracy vs ε: one line per attack (plus the worst case), from ε = 0 at clean accuracy.

    ``reports``: a :class:`~robust_ext.evaluation.Report` or :class:`~robust_ext.evaluation.AutoAttackReport`,
    a list of them, or a dict name -> report (or a tuple of reports of that model, e.g. its FGSM/BIM
    evaluation and its AutoAttack run: AutoAttack's line then stands for the worst case) for several models
    (one line style per model). The first report's target accuracy is drawn dashed.
    """
    if not isinstance(reports, Mapping):
        reports = [reports] if not isinstance(reports, (list, tuple)) else list(reports)
        reports = {r.config.get("model", {}).get("name", f"model {i}"): r for i, r in enumerate(reports)}
    if not reports:
        raise ValueError("plot_accuracy_curves needs at least one report")
    reports = {m: tuple(r) if isinstance(r, (list, tuple)) else (r,) for m, r in reports.items()}
    fig = Figure(figsize=(10.5, 5))
    ax = fig.add_subplot()
    colors: Dict[str, str] = {}
    palette = [f"C{i}" for i in range(10)]
    for k, (model, rs) in enumerate(reports.items()):
        has_aa = any(isinstance(r, AutoAttackReport) for r in rs)
        curves = {name: c for r in rs for name, c in _curves(r, with_worst=not has_aa).items()}
        for j, (name, (eps, acc)) in enumerate(curves.items()):
            worst = name == "worst case"
            color = colors.setdefault(name, "black" if worst or name.startswith("AutoAttack")
                                      else palette[len(colors) % 10])
            label = name if len(reports) == 1 else f"{model}: {name}"
            # The worst case is a wide pale band under the attacks' lines: where an attack is the worst case
            # its line runs inside the band instead of being hidden by it.
            style = (dict(linewidth=6, alpha=0.25, zorder=1, solid_capstyle="round") if worst else
                     dict(linewidth=1.6, marker=_MARKERS[j % len(_MARKERS)], markersize=5, zorder=3))
            ax.plot(eps, acc, color=color, linestyle="-" if worst else _LINESTYLES[k % 4], label=label, **style)
    first = next(iter(reports.values()))[0]
    target = first.config.get("target_accuracy")
    if target is not None:
        ax.axhline(target, color="grey", linestyle="--", linewidth=1, zorder=2,
                   label=f"target: {target:.0%} robust accuracy (margin)")
    ax.set_xlabel(f"eps ({norm_label(first.config.get('norm', 'linf'))})")
    ax.set_ylabel("robust accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9, loc="center left", bbox_to_anchor=(1.01, 0.5))  # beside the axes: hides no line
    ax.set_title(title or f"robust accuracy vs eps ({first.n_samples} samples of "
                          f"{first.config.get('data', {}).get('name', 'data')})")
    fig.tight_layout()
    return _save(fig, path)


def _image(t: torch.Tensor, lo: float, hi: float):
    """An image tensor as something imshow takes: H x W (grey) or H x W x 3 in [0, 1]."""
    t = t.detach().float().cpu()
    if t.dim() == 3 and t.shape[0] in (1, 3):
        t = t[0] if t.shape[0] == 1 else t.permute(1, 2, 0)
    elif t.dim() == 1 and math.isqrt(t.numel()) ** 2 == t.numel():
        side = math.isqrt(t.numel())
        t = t.view(side, side)
    elif t.dim() != 2:
        raise ValueError(f"cannot draw an image of shape {list(t.shape)}: expected C x H x W with C = 1 or 3, "
                         "H x W, or a flat square image")
    if math.isfinite(lo) and math.isfinite(hi) and hi > lo:
        t = (t - lo) / (hi - lo)
    else:
        t = (t - t.min()) / (t.max() - t.min()).clamp_min(1e-12)
    return t.clamp(0, 1).numpy()


def _label(i: int, classes: Optional[Sequence[str]]) -> str:
    return str(classes[i]) if classes is not None and i < len(classes) else str(i)


def plot_adversarial_examples(model, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor, path: PathLike, *,
                              classes: Optional[Sequence[str]] = None, n: int = 8, title: Optional[str] = None,
                              clip_min: float = 0.0, clip_max: float = 1.0) -> Path:
    """A grid of the first ``n`` images: clean (top row), perturbation scaled to fill the grey range
    (middle), adversarial (bottom). Each image's title is the model's prediction, green when it equals the
    label and red when not."""
    n = min(n, x.shape[0])
    if n == 0:
        raise ValueError("plot_adversarial_examples needs at least one image")
    if x_adv.shape != x.shape:
        raise ValueError(f"x_adv must have x's shape {list(x.shape)}, got {list(x_adv.shape)}")
    x, x_adv, y = x[:n], x_adv[:n].to(x.device), y[:n].to(x.device)
    with eval_mode(model):
        pred_clean, pred_adv = predict(model, x).cpu(), predict(model, x_adv).cpu()
    y = y.cpu()
    delta = (x_adv - x).detach().float().cpu()
    scale = float(delta.abs().max())
    fig = Figure(figsize=(1.5 * n + 0.8, 5.2))
    axes = fig.subplots(3, n, squeeze=False)
    for i in range(n):
        rows = [(x[i], pred_clean[i], clip_min, clip_max), (delta[i], None, -max(scale, 1e-12), max(scale, 1e-12)),
                (x_adv[i], pred_adv[i], clip_min, clip_max)]
        for r, (img, pred, lo, hi) in enumerate(rows):
            ax = axes[r][i]
            ax.imshow(_image(img, lo, hi), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if pred is not None:
                ok = int(pred) == int(y[i])
                ax.set_title(f"pred {_label(int(pred), classes)}" + ("" if ok else f"\n(label {_label(int(y[i]), classes)})"),
                             color=_GREEN if ok else _RED, fontsize=8)
    for r, name in enumerate(("clean", f"delta (x{1 / scale:.3g})" if scale > 0 else "delta (0)", "adversarial")):
        axes[r][0].set_ylabel(name, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_model_comparison(models: Mapping[str, torch.nn.Module], x: torch.Tensor, y: torch.Tensor,
                          x_adv: Mapping[str, torch.Tensor], path: PathLike, *,
                          classes: Optional[Sequence[str]] = None, title: Optional[str] = None,
                          clip_min: float = 0.0, clip_max: float = 1.0) -> Path:
    """The same images attacked on several models: the clean images (top row), then each model's adversarial
    image with that model's prediction (green when correct, red when fooled), one row per model."""
    n = x.shape[0]
    if n == 0 or not models:
        raise ValueError("plot_model_comparison needs at least one image and one model")
    fig = Figure(figsize=(1.5 * n + 1.6, 1.7 * (len(models) + 1) + 0.4))
    axes = fig.subplots(len(models) + 1, n, squeeze=False)
    rows = [("clean", None, x)] + [(name, model, x_adv[name]) for name, model in models.items()]
    for r, (name, model, images) in enumerate(rows):
        pred = None
        if model is not None:
            with eval_mode(model):
                pred = predict(model, images.to(x.device)).cpu()
        for i in range(n):
            ax = axes[r][i]
            ax.imshow(_image(images[i], clip_min, clip_max), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if pred is None:
                ax.set_title(f"label {_label(int(y[i]), classes)}", fontsize=9)
            else:
                ok = int(pred[i]) == int(y[i])
                ax.set_title(f"pred {_label(int(pred[i]), classes)}", color=_GREEN if ok else _RED, fontsize=9)
        axes[r][0].set_ylabel(name, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_class_probabilities(probs: torch.Tensor, y: torch.Tensor, path: PathLike, *,
                             classes: Optional[Sequence[str]] = None, n: int = 4, title: Optional[str] = None) -> Path:
    """For the first ``n`` images, the probability of every class along an attack's steps (``probs`` from
    :func:`~robust_ext.evaluation.pgd_trajectory`, ``[steps + 1, N, num_classes]``); the true class thick."""
    if probs.dim() != 3 or probs.shape[1] != y.shape[0]:
        raise ValueError(f"probs must be [steps + 1, N, num_classes] with N = len(y) = {y.shape[0]}, got "
                         f"{list(probs.shape)}")
    n = min(n, probs.shape[1])
    if n == 0:
        raise ValueError("plot_class_probabilities needs at least one image")
    probs, y = probs.detach().float().cpu(), y.cpu()
    steps = list(range(probs.shape[0]))
    fig = Figure(figsize=(3.2 * n, 3.2))
    axes = fig.subplots(1, n, squeeze=False)[0]
    palette = [f"C{i}" for i in range(10)]
    for i, ax in enumerate(axes):
        label = int(y[i])
        for c in range(probs.shape[2]):
            true = c == label
            ax.plot(steps, probs[:, i, c].numpy(), color=palette[c % 10], linewidth=2.5 if true else 1,
                    label=_label(c, classes) + (" (true)" if true else ""))
        final = int(probs[-1, i].argmax())
        ax.set_title(f"label {_label(label, classes)} -> {_label(final, classes)}",
                     color=_GREEN if final == label else _RED, fontsize=9)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("probability")
    axes[-1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_transfer_matrix(result, path: PathLike, *, title: Optional[str] = None) -> Path:
    """A heat map of a :class:`~robust_ext.evaluation.TransferResult`'s accuracy matrix (rows: the model the
    adversarial examples were made on; columns: the model scoring them)."""
    names, acc = result.names, result.accuracy
    fig = Figure(figsize=(1.2 * len(names) + 2.5, 1.0 * len(names) + 1.8))
    ax = fig.add_subplot()
    image = ax.imshow(acc, vmin=0, vmax=1, cmap="viridis")
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, f"{acc[i][j]:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if acc[i][j] < 0.5 else "black")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("scored on")
    ax.set_ylabel("made on")
    fig.colorbar(image, ax=ax, label="robust accuracy")
    ax.set_title(title or f"transfer: {result.attack['name']}, eps = {result.eps:.4g}", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_tradeoff(rows: Sequence[Mapping], path: PathLike, *, title: Optional[str] = None) -> Path:
    """The accuracy-robustness trade-off: one point per model, clean accuracy against robust accuracy
    (AutoAttack's where the rows have it, else PGD's), labelled with the ε it was trained at. ``rows``: dicts
    with ``train_eps``, ``clean``, ``eval_eps`` and ``autoattack`` or ``pgd``."""
    return _save(tradeoff_figure(rows, title=title), path)


def tradeoff_figure(rows: Sequence[Mapping], *, title: Optional[str] = None) -> Figure:
    """:func:`plot_tradeoff`'s figure. Models that land close together (the robust ones often do) get their
    labels stacked so that no two overlap."""
    if not rows:
        raise ValueError("plot_tradeoff needs at least one row")
    fig = Figure(figsize=(6, 4.5))
    ax = fig.add_subplot()
    clean = [r["clean"] for r in rows]
    key = "autoattack" if all("autoattack" in r for r in rows) else "pgd"
    robust = [r[key] for r in rows]
    ax.plot(clean, robust, color="grey", linewidth=0.8, zorder=1)
    points = ax.scatter(clean, robust, c=[r["train_eps"] for r in rows], cmap="viridis", s=50, zorder=2)
    fig.colorbar(points, ax=ax, label="training ε")
    ax.set_xlabel("clean accuracy")
    ax.set_ylabel(f"{'AutoAttack' if key == 'autoattack' else 'PGD'} accuracy at ε = {rows[0]['eval_eps']:g}")
    ax.grid(alpha=0.3)
    ax.set_title(title or "accuracy-robustness trade-off")
    fig.tight_layout()
    _stacked_labels(fig, ax, [(r["clean"], r[key], f"ε={r['train_eps']:g}") for r in rows])
    return fig


def _stacked_labels(fig: Figure, ax, labels, dx: float = 6.0, dy: float = 4.0) -> None:
    """Each (x, y, text) labelled dx, dy points right of and above its point, moved down in steps of its
    own height (then up, if down leaves the axes) until its box meets no label placed before it."""
    canvas = FigureCanvasAgg(fig)  # the final limits and the layout, so that text extents are in display units
    canvas.draw()
    renderer = canvas.get_renderer()
    placed = []
    for x, y, text in sorted(labels, key=lambda l: -l[1]):
        note = ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=8)
        height = note.get_window_extent(renderer).height * 72.0 / fig.dpi + 1.0
        for k in [0] + [sign * step for step in range(1, 2 * len(labels) + 1) for sign in (-1, 1)]:
            note.set_position((dx, dy + k * height))
            box = note.get_window_extent(renderer)
            if not any(box.overlaps(other) for other in placed):
                break
        placed.append(note.get_window_extent(renderer))
