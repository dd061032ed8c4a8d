"""The training monitor: a tqdm progress bar, a JSON-lines metrics log and PNG curves of loss and accuracy
per epoch (the panels of MATLAB's training-progress plot)."""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from .._io import atomic_write
from .._json import decode, dumps

log = logging.getLogger(__name__)


class MetricsLog:
    """Appends one JSON object per line to ``path`` and flushes it, so a killed run keeps every line it wrote.

    Each line has ``"event"``: ``"start"`` (config), ``"resume"``, ``"batch"`` (every ``log_every`` batches),
    ``"epoch"`` (the epoch's record, as in the result's history), ``"stop"``. After a resume the log may
    hold ``"batch"`` lines of an epoch that was lost and trained again; its ``"epoch"`` line comes once
    (:meth:`restore` writes the ones a killed run saved in its checkpoint but not here). A line a killed
    process left half-written is cut off when the log is opened again.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        _cut_torn_line(self.path)
        self._file = open(self.path, "a", encoding="utf-8")

    def restore(self, history: Sequence[Dict[str, Any]], stop: Optional[Dict[str, Any]] = None) -> int:
        """Append the ``"epoch"`` lines of ``history`` (a checkpoint's records) past the log's last one.

        A run killed between its checkpoint's rename and its log line saved an epoch the log lacks; on resume
        this makes the log match the checkpoint again. ``stop``: the fields of the checkpoint's ``"stop"``
        line, written when the stopping epoch's line was missing too. Returns the number of epoch lines written.
        """
        self._file.flush()
        last = max((r["epoch"] for r in read_metrics(self.path)), default=0)
        missing = [r for r in history if r["epoch"] > last]
        for record in missing:
            self.write("epoch", **record)
        if stop is not None and missing and missing[-1]["epoch"] == stop["epoch"]:
            self.write("stop", **stop)
        return len(missing)

    def write(self, event: str, **fields: Any) -> None:
        record = {"event": event, "time": round(time.time(), 3), **fields}
        self._file.write(dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _cut_torn_line(path: Path) -> None:
    try:
        with open(path, "rb+") as f:
            size = f.seek(0, 2)
            if size and (f.seek(size - 1) is None or f.read(1) != b"\n"):
                f.seek(0)
                f.truncate(f.read().rfind(b"\n") + 1)
                log.warning("%s: cut a line a killed run left unfinished", path)
    except FileNotFoundError:
        pass


def read_metrics(path: Path, event: Optional[str] = "epoch") -> List[Dict[str, Any]]:
    """The lines of a metrics log (only those of ``event`` unless it is None)."""
    with open(path, encoding="utf-8") as f:
        records = [decode(json.loads(line)) for line in f if line.strip()]
    return [r for r in records if event is None or r.get("event") == event]


class Progress:
    """A tqdm bar over one epoch's batches with loss, accuracy and images/s; a no-op when disabled."""

    def __init__(self, enabled: Optional[bool], total: int, desc: str):
        if enabled is None:
            enabled = sys.stderr.isatty()
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, desc=desc, unit="batch", leave=False, dynamic_ncols=True)

    @property
    def enabled(self) -> bool:
        return self.bar is not None

    def update(self, n: int = 1, **postfix: float) -> None:
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


_LOSS_CURVES = (("train_loss", "train"), ("test_loss", "test (clean)"))
_ACC_CURVES = (("train_acc", "train"), ("train_clean_acc", "train (clean)"), ("test_acc", "test (clean)"),
               ("robust_acc", "robust (PGD)"))


def plot_curves(history: Sequence[Dict[str, Any]], path: Path, title: str = "",
                train_label: str = "train") -> Optional[Path]:
    """Loss and accuracy per epoch, as a PNG written atomically; None (after a warning) without matplotlib.

    Uses matplotlib's Agg canvas directly: no pyplot, so the caller's backend and figures are untouched.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        log.warning("matplotlib is not installed: no training curves (pip install matplotlib)")
        return None
    path = Path(path)
    epochs = [r["epoch"] for r in history]
    fig = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(fig)
    for ax, curves, label in ((fig.add_subplot(1, 2, 1), _LOSS_CURVES, "loss"),
                              (fig.add_subplot(1, 2, 2), _ACC_CURVES, "accuracy")):
        for key, name in curves:
            name = train_label if name == "train" else name
            points = [(e, r[key]) for e, r in zip(epochs, history) if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, label=name)
        if label == "accuracy":
            ax.set_ylim(0, 1)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
    collapsed = [r["epoch"] for r in history if r.get("collapsed")]
    for ax in fig.axes:
        for e in collapsed:
            ax.axvline(e, color="red", linestyle="--", linewidth=1)
    if title:
        fig.suptitle(title)
    return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
