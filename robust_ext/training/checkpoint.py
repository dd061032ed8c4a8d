"""Training checkpoints: the model checkpoint of :mod:`robust_ext.models` (atomic write, loaded with
``torch.load(weights_only=True)``) plus a ``"training"`` entry holding everything an exact resume needs.

``last.pt`` is written after every epoch; ``load_model("last.pt")`` reads it as a plain model checkpoint.
Everything in it is a tensor, a number, a string, None, or a list/dict of them: RNG states included
(numpy's and Python's Mersenne-Twister keys are stored as int64 tensors).
"""
from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from .. import models
from .config import TRAJECTORY_FIELDS, TrainConfig

log = logging.getLogger(__name__)

STATE_FORMAT = "robust_ext.training/1"


# ---------------------------------------------------------------------------------------------- RNG
def capture_rng(attack_generator: torch.Generator) -> Dict[str, Any]:
    """This process's random states: torch CPU (and CUDA when initialized), numpy, random, the attacks'."""
    np_state = np.random.get_state(legacy=True)
    py_version, py_internal, py_gauss = random.getstate()
    cuda = ([s for s in torch.cuda.get_rng_state_all()]
            if torch.cuda.is_available() and torch.cuda.is_initialized() else None)
    return {
        "torch": torch.get_rng_state(),
        "cuda": cuda,
        "attack": attack_generator.get_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": int(py_version), "internal": torch.tensor(py_internal, dtype=torch.int64),
                   "gauss_next": None if py_gauss is None else float(py_gauss)},
    }


def restore_rng(state: Dict[str, Any], attack_generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        if len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        else:
            log.warning("checkpoint holds CUDA RNG states of %d devices, this process sees %d: not restored",
                        len(state["cuda"]), torch.cuda.device_count())
    attack_generator.set_state(state["attack"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["internal"].tolist()), p["gauss_next"]))


# ------------------------------------------------------------------------------------- save / load
def save_training_checkpoint(path: Path, model: torch.nn.Module, **training: Any) -> Path:
    """``models.save_checkpoint`` with ``training={"format": ..., **training}``."""
    return models.save_checkpoint(path, model, training={"format": STATE_FORMAT, **training})


def load_training_checkpoint(path: Path, map_location: Any = "cpu") -> Dict[str, Any]:
    """Read ``path`` with ``weights_only=True`` and check that it holds a training state."""
    checkpoint = models.load_checkpoint(path, map_location)
    training = checkpoint.get("training")
    if not isinstance(training, dict) or "optimizer" not in training:
        raise ValueError(f"{path}: a model checkpoint without training state (optimizer, RNG, epoch), so "
                         "training cannot resume from it; resume from the run's last.pt")
    if training.get("format") != STATE_FORMAT:
        raise ValueError(f"{path}: training state format {training.get('format')!r}; this robust_ext reads "
                         f"{STATE_FORMAT!r}")
    return checkpoint


def check_resumable(path: Path, saved: Dict[str, Any], config: TrainConfig) -> None:
    """Refuse to resume a run under a recipe that would not continue it."""
    current = config.to_dict()
    # A field newer than the checkpoint (e.g. norm) counts as its default, which is what the run used.
    default = TrainConfig().to_dict()
    changed = [f"{k}: {saved.get(k, default[k])!r} -> {current[k]!r}" for k in TRAJECTORY_FIELDS
               if saved.get(k, default[k]) != current[k]]
    if saved.get("epochs") != config.epochs and config.scheduler != "none":
        changed.append(f"epochs: {saved.get('epochs')!r} -> {config.epochs!r} (the {config.scheduler!r} "
                       "schedule spans the whole run; only scheduler='none' runs can be extended)")
    if changed:
        raise ValueError(f"cannot resume from {path}: the config differs from the checkpoint's in "
                         f"{'; '.join(changed)}")


def resume_path(resume: Any, out_dir: Optional[Path]) -> Optional[Path]:
    """Which checkpoint ``resume`` asks for: None (start fresh) or an existing file."""
    if resume is False or resume is None:
        return None
    if resume is True:
        if out_dir is None:
            raise ValueError("resume=True continues from out_dir/last.pt, but out_dir is not set")
        path = out_dir / "last.pt"
        if not path.is_file():
            log.info("resume=True: no %s yet, starting a new run", path)
            return None
        return path
    if isinstance(resume, (str, Path)):
        path = Path(resume)
        if not path.is_file():
            raise FileNotFoundError(f"resume checkpoint {path} does not exist")
        return path
    raise TypeError(f"resume must be False, True or a path, got {type(resume).__name__}")


def remove_stale_temporaries(out_dir: Path) -> List[Path]:
    """Delete the temporary files of checkpoint writes a killed process never renamed."""
    removed = []
    for name in ("last.pt", "best.pt"):
        for tmp in out_dir.glob(f".{name}.*.tmp"):
            try:
                tmp.unlink()
                removed.append(tmp)
            except OSError:
                pass
    if removed:
        log.info("removed %d unfinished checkpoint write(s) in %s", len(removed), out_dir)
    return removed
