"""When the fused layers (robust_ext.pooling, robust_ext.batchnorm) run their CPU kernels."""
from __future__ import annotations

import torch

from . import ops as _ops


def has_cpu_kernel(op: str) -> bool:
    """The extension is loaded (not ``ROBUST_EXT_BACKEND=reference``) and has a CPU kernel for ``op``."""
    return _ops._EXT is not None and torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU")


def transformed(x: torch.Tensor) -> bool:
    """Under torch.func transforms (grad, vmap, jvp) or with a forward-mode AD tangent: the ops have only a
    reverse-mode formula, so these take ATen's ops (which have every rule)."""
    return (torch._C._functorch.peek_interpreter_stack() is not None
            or torch.autograd.forward_ad.unpack_dual(x).tangent is not None)


def use_cpu_kernel(has_kernel: bool, x: torch.Tensor) -> bool:
    return has_kernel and x.is_cpu and not transformed(x)
