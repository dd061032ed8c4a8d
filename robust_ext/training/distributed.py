"""Multi-process training: the process group, DistributedDataParallel, and metric reduction.

:func:`robust_ext.training.train` runs unchanged under ``torchrun --nproc_per_node=N script.py``: it joins
the process group torchrun describes in the environment (gloo on CPU, NCCL on CUDA), or uses one the
caller already initialized. A group train() creates stays up for later calls in the same process (a second
group in the same torchrun job would meet the first one's keys in torchrun's store, and can hang) and is
destroyed at exit. Each process trains on its share of every global batch, gradients are
averaged by DDP, epoch metrics are summed over processes, and only rank 0 writes files.
"""
from __future__ import annotations

import atexit
import logging
import os
from dataclasses import dataclass
from typing import Any, List, Optional

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)


@dataclass
class Context:
    rank: int = 0
    world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: Optional[torch.device]) -> Context:
    """Join the running process group, or create the one torchrun's environment describes."""
    if dist.is_available() and dist.is_initialized():
        return Context(dist.get_rank(), dist.get_world_size())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Context()
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={world} but this torch has no torch.distributed")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = device.type == "cuda" if device is not None else torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(local_rank if device is None or device.index is None else device.index)
    dist.init_process_group(backend)
    atexit.register(_destroy)
    log.info("joined process group: rank %d of %d, backend %s", dist.get_rank(), dist.get_world_size(), backend)
    return Context(dist.get_rank(), dist.get_world_size())


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def default_device(ctx: Context, model: nn.Module) -> torch.device:
    """cuda:LOCAL_RANK in a CUDA multi-process run, otherwise where the model's parameters are."""
    if ctx.distributed and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def wrap(model: nn.Module, ctx: Context, device: torch.device) -> nn.Module:
    if not ctx.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel
    if device.type != "cuda":
        return DistributedDataParallel(model)
    return DistributedDataParallel(model, device_ids=[device.index if device.index is not None
                                                      else torch.cuda.current_device()])


def all_reduce_sum(t: torch.Tensor, ctx: Context) -> torch.Tensor:
    if ctx.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_rank(flag: bool, ctx: Context, device: torch.device) -> bool:
    """True on every rank when it is True on some rank (one decision for all, e.g. to stop)."""
    if not ctx.distributed:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather_to_main(obj: Any, ctx: Context) -> Optional[List[Any]]:
    """Every rank's ``obj``, as a list on rank 0 (None elsewhere)."""
    if not ctx.distributed:
        return [obj]
    out = [None] * ctx.world_size if ctx.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_buffers(model: nn.Module, ctx: Context) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank, e.g. before evaluating."""
    if ctx.distributed:
        for b in model.buffers():
            dist.broadcast(b, src=0)


def barrier(ctx: Context) -> None:
    if ctx.distributed:
        dist.barrier()
