"""How many samples an evaluation attacks at once: the requested batch size is a request, not a licence.

An attack's forward and backward hold the model's activations for every sample of the working batch. The
cap is measured, not guessed: one input-gradient pass on a few samples under
``torch.autograd.graph.saved_tensors_hooks`` counts the bytes autograd keeps per sample; with the attack's
own buffers (x, x_adv, the gradient, the best point: a few images per sample) and a factor 2 for the
forward's transient tensors, the working batch is the most samples that fit in half the memory available
now (``MemAvailable`` of /proc/meminfo on the CPU, the free memory on a CUDA device).
"""
from __future__ import annotations

import logging
import os
from typing import Optional

import torch

from ..attacks.core import Objective

log = logging.getLogger("robust_ext.evaluation")

PROBE_SAMPLES = 4
IMAGE_COPIES = 8  # x, x_adv, grad, the kept best point, a start, the fused ops' outputs, slack
BUDGET_FRACTION = 0.5


def available_memory(device: torch.device) -> Optional[int]:
    """Bytes free for new tensors on ``device`` now, or None when it cannot be read."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def bytes_per_sample(model, x: torch.Tensor, y: torch.Tensor) -> int:
    """Bytes one sample needs in an attack step: what autograd saves for the backward (measured on up to
    PROBE_SAMPLES samples, storages counted once, the input and the model's weights left out), times 2 for the forward's transients, plus the attack's
    image buffers."""
    xs, ys = x[:PROBE_SAMPLES].detach().clone(), y[:PROBE_SAMPLES]
    seen = {}
    fixed = {xs.untyped_storage().data_ptr()}  # the input and the weights are not activations
    if isinstance(model, torch.nn.Module):
        fixed |= {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}

    def pack(t):
        try:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. some subclasses)
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        Objective(model, "ce", False, None, xs.device.type).grad(xs, ys)
    saved = sum(n for ptr, n in seen.items() if ptr not in fixed)
    image = x[0].numel() * x.element_size()
    return max(1, 2 * saved // max(1, xs.shape[0]) + IMAGE_COPIES * image)


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def working_batch_size(model, x: torch.Tensor, y: torch.Tensor, requested: int) -> int:
    """``requested``, capped by the memory available on x's device (logged when it caps)."""
    free = available_memory(x.device)
    if free is None or x.shape[0] == 0:
        return requested
    per_sample = bytes_per_sample(model, x, y)
    cap = max(1, int(BUDGET_FRACTION * free) // per_sample)
    if cap < requested:
        log.warning("evaluate: batch_size=%d would need about %s (%s per sample measured, %s free on %s): "
                    "attacking %d samples at a time", requested, _size(requested * per_sample), _size(per_sample),
                    _size(free), x.device, cap)
        return cap
    return requested
