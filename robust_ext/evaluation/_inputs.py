"""What every evaluation entry point does with its inputs: the data as batches, the ε grid, the device,
seeded generators and the model's eval mode."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Tuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from ..attacks.checks import check_int
from ..attacks.core import eval_mode  # noqa: F401  (one definition, re-exported for this package)
from ..data import make_loader

Batch = Tuple[torch.Tensor, torch.Tensor]


def check_eps_grid(eps) -> list:
    """The ε budgets as a sorted list of distinct floats; empty, negative, NaN or inf values raise."""
    if isinstance(eps, torch.Tensor):
        eps = eps.flatten().tolist()
    elif isinstance(eps, numbers.Real) and not isinstance(eps, bool):
        eps = [eps]
    try:
        values = list(eps)
    except TypeError:
        raise TypeError(f"eps must be a list of floats >= 0, got {type(eps).__name__}") from None
    if not values:
        raise ValueError("eps must list at least one budget, got an empty list")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v < 0:
            raise ValueError(f"every eps must be a finite float >= 0, got {v!r}")
    return sorted({float(v) for v in values})


def check_eps(eps, name: str = "eps", positive: bool = False) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(eps) or eps < 0 \
            or (positive and eps == 0):
        raise ValueError(f"{name} must be a finite float {'> 0' if positive else '>= 0'}, got {eps!r}")
    return float(eps)


def check_seed(seed) -> int:
    return check_int(seed, "seed", 0)


def generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU generator for one stream of the evaluation, independent of the other streams: the same seed and
    keys give the same numbers whichever attacks run before it (the fused ops take a CPU generator for any
    device)."""
    words = np.random.SeedSequence([seed, *keys]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed((int(words[0]) << 32) | int(words[1]))


@dataclass
class Batches:
    """The evaluation data as a re-iterable source of (x, y) batches, with its size and name."""

    source: Callable[[], Iterator[Batch]]
    n: int
    num_batches: int
    name: str
    split: Optional[str] = None

    def describe(self) -> dict:
        return {"name": self.name, "split": self.split, "n_samples": self.n}

    def __iter__(self) -> Iterator[Batch]:
        return self.source()


def _check_pair(x, y, where: str) -> Batch:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{where}: images must be a floating-point tensor, got "
                        f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    if not isinstance(y, torch.Tensor) or y.is_floating_point() or y.dtype == torch.bool or y.dim() != 1 \
            or x.dim() < 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"{where}: labels must be an integer tensor [N] matching the images' batch dimension, "
                         f"got {y.dtype if isinstance(y, torch.Tensor) else type(y).__name__} "
                         f"{list(y.shape) if isinstance(y, torch.Tensor) else ''} for images {list(x.shape)}")
    return x, y


def _tensor_batches(x, y, batch_size: int, n: int) -> Callable[[], Iterator[Batch]]:
    def source():
        for i in range(0, n, batch_size):
            yield x[i:min(i + batch_size, n)], y[i:min(i + batch_size, n)]
    return source


def _loader_batches(loader, n: int) -> Callable[[], Iterator[Batch]]:
    def source():
        seen = 0
        for batch in loader:
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise ValueError(f"the DataLoader must yield (images, labels) batches, got {type(batch).__name__}")
            x, y = _check_pair(batch[0], batch[1], "DataLoader batch")
            take = min(x.shape[0], n - seen)
            yield x[:take], y[:take]
            seen += take
            if seen >= n:
                return
    return source


def as_batches(data, batch_size: int = 256, max_samples: Optional[int] = None, name: Optional[str] = None) -> Batches:
    """``data`` as batches: an ``(images, labels)`` pair of tensors, a ``DataLoader`` yielding such pairs
    (its own batch size), or a ``Dataset`` of ``(image, label)`` items. ``max_samples`` keeps the first ones."""
    check_int(batch_size, "batch_size", 1)
    if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, numbers.Integral)
                                    or max_samples < 1):
        raise ValueError(f"max_samples must be None or an integer >= 1, got {max_samples!r}")
    limit = math.inf if max_samples is None else int(max_samples)
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        x, y = _check_pair(data[0], data[1], "data")
        dataset, default_name, loader = None, "tensors", None
    elif isinstance(data, TensorDataset) and len(data.tensors) >= 2:
        x, y = _check_pair(data.tensors[0], data.tensors[1], "data")
        dataset, default_name, loader = data, getattr(data, "name", type(data).__name__), None
    elif isinstance(data, DataLoader):
        dataset, default_name, loader = data.dataset, getattr(data.dataset, "name", type(data.dataset).__name__), data
    elif isinstance(data, Dataset):
        dataset, default_name, loader = data, getattr(data, "name", type(data).__name__), make_loader(data, batch_size)
    else:
        raise TypeError("data must be an (images, labels) pair of tensors, a Dataset or a DataLoader, "
                        f"got {type(data).__name__}")
    name = name or str(default_name)
    if loader is None:
        n = int(min(x.shape[0], limit))
        source, num_batches = _tensor_batches(x, y, int(batch_size), n), math.ceil(n / batch_size)
    else:
        try:
            n = int(min(len(loader.dataset), limit))
        except TypeError:
            raise TypeError("the DataLoader's dataset must have a length") from None
        source, num_batches = _loader_batches(loader, n), min(len(loader), math.ceil(n / (loader.batch_size or 1)))
    if n == 0:
        raise ValueError("data holds no samples")
    split = getattr(dataset, "split", None)
    return Batches(source, n, num_batches, name, split if isinstance(split, str) else None)


def resolve_device(model, device) -> Optional[torch.device]:
    """``device`` if given, else the device of the model's first parameter or buffer; None (keep the data's
    device) for a model with neither."""
    if device is not None:
        return torch.device(device)
    if isinstance(model, nn.Module):
        for t in (*model.parameters(), *model.buffers()):
            return t.device
    return None


def model_info(model, name: Optional[str] = None) -> dict:
    params = sum(p.numel() for p in model.parameters()) if isinstance(model, nn.Module) else None
    default = getattr(model, "arch", None) or type(model).__name__
    return {"name": name or str(default), "class": f"{type(model).__module__}.{type(model).__qualname__}",
            "parameters": params}


def logits_of(model, x: torch.Tensor) -> torch.Tensor:
    """The model's logits ``[N, num_classes]`` without autograd, checked."""
    with torch.no_grad():
        logits = model(x)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != x.shape[0]:
        raise ValueError(f"model must return logits [N, num_classes], got "
                         f"{list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}")
    return logits


def predict(model, x: torch.Tensor) -> torch.Tensor:
    return logits_of(model, x).argmax(1)


def nonfinite_rows(logits: torch.Tensor) -> torch.Tensor:
    """Per sample: does any logit hold NaN or inf? (A broken model: its argmax means nothing.)"""
    return (~torch.isfinite(logits)).any(1)


def nonfinite_message(count: int, n: int) -> str:
    return (f"the model returned non-finite logits (NaN or inf) for {count} of {n} samples: its predictions and "
            "every accuracy on those samples are meaningless (a broken checkpoint, or an overflow)")


def rng_devices(device: Optional[torch.device]) -> list:
    """The CUDA devices whose RNG state the evaluation forks (the CPU state is always forked)."""
    return [device] if device is not None and device.type == "cuda" else []
