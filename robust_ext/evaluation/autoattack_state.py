"""The state of an AutoAttack evaluation on disk, so that a run killed at any point (``kill -9`` included)
resumes without recomputing what it finished.

A state directory holds:

* ``autoattack_state.pt``: the settings the run was started with (as JSON text), the clean pass's results
  and, per ε, every point's code (robust, misclassified clean, or the attack that fooled it) after the last
  finished attack, with the list of finished (ε, attack) pairs. Written by the main process only, after the
  clean pass and after each attack.
* ``chunks/e{j}_a{i}_c{k}.pt``: one per chunk of points an attack ran on (ε ``j``, attack ``i``, chunk ``k``
  of the points still robust when the attack started): the chunk's points, which of them the attack fooled
  and their adversarial examples. Written by whichever process attacked the chunk, as soon as it is done.

Every file is written atomically (:func:`robust_ext._io.atomic_write`): a kill leaves the old file or the
new one. A chunk is the unit of work that survives a kill; the chunks of an attack depend only on the
codes before it, so a resumed run (with any number of processes) finds the same chunks.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional, Tuple

import torch

from .._io import atomic_write

log = logging.getLogger("robust_ext.evaluation")

STATE_FILE = "autoattack_state.pt"
CHUNK_DIR = "chunks"
ROBUST, MISCLASSIFIED = -1, 0  # codes; attack i (from 0) that fooled a point is code i + 1
_CLEAN_KEYS = {"zero_gradient", "flagged", "nonfinite", "softmax_output", "randomized", "num_classes"}


def _save(path: Path, value) -> None:
    atomic_write(path, lambda f: torch.save(value, f))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _normalized(settings: dict) -> dict:
    return json.loads(json.dumps(settings, default=str, sort_keys=True))


def _differences(saved: dict, wanted: dict, prefix: str = "") -> list:
    out = []
    for key in sorted(set(saved) | set(wanted)):
        a, b = saved.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append((prefix + key, a, b))
    return out


def _damage(saved, shape, n_attacks: int) -> Optional[str]:
    """What is wrong with a loaded state (None when nothing): the file is the user's, so it is checked before
    its codes decide a report."""
    if not isinstance(saved, dict) or not {"codes", "clean", "done", "outside"} <= saved.keys():
        return "missing entries"
    codes = saved["codes"]
    if not isinstance(codes, torch.Tensor) or codes.is_floating_point() or codes.is_complex() or \
            codes.dtype == torch.bool:
        return "codes are not an integer tensor"
    if tuple(codes.shape) != tuple(shape):
        return f"codes of shape {list(codes.shape)}, expected {list(shape)}"
    if codes.numel() and (int(codes.min()) < ROBUST or int(codes.max()) > n_attacks):
        return f"codes outside {ROBUST}..{n_attacks}"
    clean = saved["clean"]
    if clean is not None and not (isinstance(clean, dict) and _CLEAN_KEYS <= clean.keys()):
        return "the clean pass's results are incomplete"
    pairs = saved["done"]
    if not isinstance(pairs, (list, tuple)) or not all(
            isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(v, int) for v in p) for p in pairs):
        return "the finished attacks are not (eps, attack) index pairs"
    outside = saved["outside"]
    if not isinstance(outside, (list, tuple)) or not all(
            isinstance(o, (list, tuple)) and len(o) == 2 and isinstance(o[1], int) for o in outside):
        return "the counts of outputs outside the ball are malformed"
    return None


def _read_chunk(file: Path, sample_shape=None) -> Optional[dict]:
    """A chunk file's record, or None when it cannot be read or does not hold what a chunk holds."""
    try:
        rec = torch.load(file, weights_only=True)
        points, fooled, x_adv, outside = rec["points"], rec["fooled"], rec["x_adv"], rec["outside"]
    except Exception:
        return None
    ok = (isinstance(points, torch.Tensor) and points.dim() == 1 and not points.is_floating_point()
          and isinstance(fooled, torch.Tensor) and fooled.dtype == torch.bool and fooled.shape == points.shape
          and isinstance(x_adv, torch.Tensor) and x_adv.is_floating_point() and x_adv.dim() >= 1
          and x_adv.shape[0] == int(fooled.sum()) and isinstance(outside, int) and outside >= 0
          and (sample_shape is None or tuple(x_adv.shape[1:]) == tuple(sample_shape)))
    return rec if ok else None


class EvaluationState:
    """What an evaluation has done: in memory always, on disk when ``path`` is a directory.

    codes: int16 ``[n_eps, N]``; clean: the clean pass's results (None before it); done: the finished
    (ε index, attack index) pairs.
    """

    def __init__(self, path, settings: dict, n_eps: int, n: int, main: bool = True):
        self.path = None if path is None else Path(path)
        self.settings, self.main = _normalized(settings), main
        self.codes = torch.full((n_eps, n), ROBUST, dtype=torch.int16)
        self.clean: Optional[dict] = None
        self.done: set = set()
        self.outside: dict = {}  # (ε index, attack index) -> outputs outside the ball, not counted
        self.resumed = False
        if self.path is None:
            return
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"state_path {self.path}: is a file, expected a directory (existing or to create)")
        file = self.path / STATE_FILE
        if file.exists() and not file.is_file():
            raise ValueError(f"state_path {self.path}: {file} is not a file; remove it or use another state_path")
        if file.is_file():
            self._load(file)
        elif main:
            (self.path / CHUNK_DIR).mkdir(parents=True, exist_ok=True)
            self.save()

    def _load(self, file: Path) -> None:
        try:
            saved = torch.load(file, weights_only=True)
            settings = json.loads(saved["settings"])
            if not isinstance(settings, dict):
                raise TypeError(f"its settings are a {type(settings).__name__}")
        except Exception as e:  # a file of another program, or one from another version
            raise ValueError(f"state_path {self.path}: {file.name} is not an AutoAttack state "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); delete it "
                             f"to start over") from None
        diff = _differences(settings, self.settings)
        if diff:
            key, old, new = diff[0]
            raise ValueError(f"state_path {self.path}: the saved evaluation ran with {key}={old!r}, this one asks "
                             f"for {key}={new!r}; resume with the same settings or use another state_path")
        problem = _damage(saved, self.codes.shape, len(settings.get("attacks") or ()))
        if problem:
            raise ValueError(f"state_path {self.path}: {file.name} is damaged ({problem}); delete it to start over")
        self.codes, self.clean = saved["codes"].to(torch.int16), saved["clean"]
        self.done = {tuple(p) for p in saved["done"]}
        self.outside = {tuple(k): v for k, v in saved["outside"]}
        self.resumed = self.clean is not None  # not a state another rank of this run has just created
        self._remove_stale_temporaries()
        log.info("autoattack: resuming from %s (%d attack runs finished)", self.path, len(self.done))

    def _remove_stale_temporaries(self) -> None:
        """The temporary files of writes a kill interrupted (their writer's process is gone); a live process's
        are left alone, as another rank may be writing one now."""
        for tmp in (*self.path.glob(".*.tmp"), *(self.path / CHUNK_DIR).glob(".*.tmp")):
            pid = tmp.name.rsplit(".", 3)[-3]
            if pid.isdigit() and not _alive(int(pid)):
                tmp.unlink(missing_ok=True)

    def save(self) -> None:
        """The settings, clean results, codes and finished attacks, atomically (main process only)."""
        if self.path is None or not self.main:
            return
        _save(self.path / STATE_FILE, {"settings": json.dumps(self.settings, sort_keys=True), "codes": self.codes,
                                       "clean": self.clean, "done": sorted(self.done),
                                       "outside": sorted(self.outside.items())})

    def _chunk(self, j: int, i: int, k: int) -> Path:
        return self.path / CHUNK_DIR / f"e{j}_a{i}_c{k}.pt"

    def load_chunk(self, j: int, i: int, k: int, points, sample_shape=None
                   ) -> Optional[Tuple[torch.Tensor, torch.Tensor, int]]:
        """``(fooled mask, x_adv of the fooled points, outputs outside the ball)`` of a finished chunk, or None (not
        run, damaged, or its file is for other points): such a chunk is run again."""
        if self.path is None:
            return None
        file = self._chunk(j, i, k)
        if not file.is_file():
            return None
        rec = _read_chunk(file, sample_shape)
        if rec is None:
            log.warning("autoattack: %s is damaged: recomputing it", file)
            return None
        if not torch.equal(rec["points"], points):
            log.warning("autoattack: %s holds other points than this chunk: recomputing it", file)
            return None
        return rec["fooled"], rec["x_adv"], rec["outside"]

    def save_chunk(self, j: int, i: int, k: int, points, fooled, x_adv, outside: int) -> None:
        if self.path is not None:
            self._chunk(j, i, k).parent.mkdir(parents=True, exist_ok=True)
            _save(self._chunk(j, i, k), {"points": points, "fooled": fooled, "x_adv": x_adv, "outside": outside})

    def saved_adversarial(self, j: int, i: int):
        """Every saved chunk of (ε ``j``, attack ``i``) as ``(fooled points, their x_adv)``."""
        if self.path is None:
            return
        for file in sorted((self.path / CHUNK_DIR).glob(f"e{j}_a{i}_c*.pt")):
            rec = _read_chunk(file)
            if rec is not None:
                yield rec["points"][rec["fooled"]], rec["x_adv"]
