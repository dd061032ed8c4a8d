"""Batches for training and evaluation: the epoch's order from a DistributedSampler (also in a single
process, so one process and N processes see the same global batches), read straight from in-memory tensors
when the data set is a two-tensor ``TensorDataset`` (``ImageDataset`` is one) or a ``Subset`` of one, else
through a DataLoader."""
from __future__ import annotations

import math
from typing import Iterator, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, TensorDataset


def derive_seed(seed: int, stream: int, rank: int = 0) -> int:
    """A well-mixed 64-bit seed for one random stream of one process."""
    return int(np.random.SeedSequence([seed, stream, rank]).generate_state(1, dtype=np.uint64)[0])


def check_dataset(dataset, name: str) -> None:
    if not isinstance(dataset, Dataset) or not hasattr(dataset, "__len__"):
        raise TypeError(f"{name} must be a map-style torch Dataset of (image, label) pairs with a length, "
                        f"got {type(dataset).__name__}")
    if len(dataset) == 0:
        raise ValueError(f"{name} is empty")
    base = dataset.dataset if isinstance(dataset, Subset) else dataset
    if isinstance(base, TensorDataset) and len(base.tensors) >= 2:
        labels = base.tensors[1]
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"{name}'s labels must be an integer tensor of class indices, got {labels.dtype}")
        if labels.numel() and bool((labels < 0).any()):  # cross-entropy would silently ignore -100
            raise ValueError(f"{name}'s labels must be class indices >= 0, got {int(labels.min())}")


class Batches:
    """Reads batches of ``dataset`` at given indices: by ``index_select`` from the tensors of a two-tensor
    ``TensorDataset`` or of a ``Subset`` of one, else through a DataLoader."""

    def __init__(self, dataset, num_workers: int, pin_memory: bool):
        self.dataset, self.num_workers, self.pin_memory = dataset, num_workers, pin_memory
        self.tensors, self.index_map = None, None
        base = dataset.dataset if isinstance(dataset, Subset) else dataset
        if isinstance(base, TensorDataset) and len(base.tensors) == 2 and num_workers == 0:
            self.tensors = base.tensors
            if base is not dataset:
                self.index_map = torch.as_tensor(dataset.indices, dtype=torch.int64)

    def __call__(self, indices: torch.Tensor, batch_size: int, drop_last: bool = False
                 ) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        chunks = list(indices.split(batch_size))
        if drop_last and chunks and len(chunks[-1]) < batch_size:
            chunks.pop()
        if self.tensors is not None:
            images, labels = self.tensors
            for chunk in chunks:
                if self.index_map is not None:
                    chunk = self.index_map.index_select(0, chunk)
                yield images.index_select(0, chunk), labels.index_select(0, chunk)
            return
        loader = DataLoader(self.dataset, batch_sampler=[c.tolist() for c in chunks],
                            num_workers=self.num_workers, pin_memory=self.pin_memory)
        yield from loader


def num_batches(n: int, batch_size: int, drop_last: bool) -> int:
    return n // batch_size if drop_last else math.ceil(n / batch_size)


class EpochOrder:
    """This process's indices for each epoch: DistributedSampler(shuffle=True, seed) at ``set_epoch(epoch - 1)``:
    a permutation from ``seed + epoch - 1``, padded by repeating its first samples to a multiple of the
    number of processes, and dealt round-robin. A pure function of (seed, epoch): resuming needs no state."""

    def __init__(self, dataset, seed: int, rank: int, world_size: int):
        self.sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)

    def __len__(self) -> int:
        return len(self.sampler)

    def indices(self, epoch: int) -> torch.Tensor:
        self.sampler.set_epoch(epoch - 1)
        return torch.tensor(list(self.sampler), dtype=torch.int64)
