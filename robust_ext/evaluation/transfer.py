"""Transferability: adversarial examples made on one model, scored on every other."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch
from tqdm.auto import tqdm

from . import metrics
from ._inputs import as_batches, check_eps, check_seed, eval_mode, generator, model_info, predict, resolve_device, \
    rng_devices
from .._io import write_json
from .._json import decode, encode
from .specs import resolve_attack

# The random stream key evaluate() gives its first attack at its first ε: the diagonal of a transfer matrix
# then equals evaluate(model, data, [attack], eps=[eps], seed=seed)'s robust accuracy exactly.
_KEYS = (0, 0, 0)


@dataclass
class TransferResult:
    """``accuracy[i][j]``: robust accuracy of model ``names[j]`` on the adversarial examples made on model
    ``names[i]`` (a sample counts when ``names[j]`` classifies it correctly clean and adversarial); the
    diagonal is white-box. ``success_rate[i][j]``: the fraction of the samples ``names[j]`` classifies
    correctly that the examples made on ``names[i]`` fool."""

    names: List[str]
    eps: float
    attack: Dict
    n_samples: int
    clean_accuracy: Dict[str, float]
    accuracy: List[List[float]]
    success_rate: List[List[Optional[float]]]
    config: Dict

    def to_dict(self) -> Dict:
        return encode(asdict(self))

    @classmethod
    def from_dict(cls, d: Dict) -> "TransferResult":
        return cls(**{k: (v if k == "config" else decode(v)) for k, v in d.items()})

    def to_json(self, path, indent: int = 2) -> Path:
        return write_json(path, self.to_dict(), indent)


def transfer_matrix(models: Dict[str, torch.nn.Module], data, attack="pgd", eps: float = 8 / 255, *,
                    clip_min: float = 0.0, clip_max: float = 1.0, batch_size: int = 256,
                    max_samples: Optional[int] = None, device=None, seed: int = 0,
                    progress: bool = True) -> TransferResult:
    """Make adversarial examples with ``attack`` at ``eps`` on each model of ``models`` (name -> module) and
    score them on every model. ``attack`` as in :func:`~robust_ext.evaluation.evaluate` (an attack object
    is re-bound to each source model). Batches move to ``device`` (default: the first model's)."""
    if not isinstance(models, dict) or not models:
        raise ValueError("models must be a non-empty dict of name -> model")
    names = [str(k) for k in models]
    nets = list(models.values())
    spec = resolve_attack(attack)
    eps = check_eps(eps)
    seed = check_seed(seed)
    batches = as_batches(data, batch_size, max_samples)
    dev = resolve_device(nets[0], device)
    k = len(nets)
    clean_counts = [0] * k
    robust = [[0] * k for _ in range(k)]
    gens = [generator(seed, *_KEYS) for _ in nets]
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=rng_devices(dev)), eval_mode(*nets):
        torch.manual_seed(seed)
        for x, y in tqdm(batches, total=batches.num_batches, desc="transfer", disable=not progress, leave=False):
            if dev is not None:
                x, y = x.to(dev), y.to(dev)
            clean = [predict(m, x) == y for m in nets]
            for j in range(k):
                clean_counts[j] += int(clean[j].sum())
            for i, source in enumerate(nets):
                x_adv = spec(source, x, y, eps, clip_min=clip_min, clip_max=clip_max, generator=gens[i], rebind=True)
                for j, target in enumerate(nets):
                    ok = clean[j] & (predict(target, x_adv) == y)
                    robust[i][j] += int(ok.sum())
    n = batches.n
    return TransferResult(
        names=names, eps=eps, attack=spec.describe(), n_samples=n,
        clean_accuracy={name: c / n for name, c in zip(names, clean_counts)},
        accuracy=[[r / n for r in row] for row in robust],
        success_rate=[[metrics.success_rate(clean_counts[j], robust[i][j]) for j in range(k)]
                      for i in range(k)],
        config={"models": {name: model_info(m, name) for name, m in zip(names, nets)},
                "data": batches.describe(), "clip_min": clip_min, "clip_max": clip_max,
                "seed": seed, "device": str(dev), "seconds": time.perf_counter() - t0})
