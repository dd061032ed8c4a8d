"""When the fused layers (robust_ext.pooling, robust_ext.batchnorm) and fused model paths run."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules import module as _module

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


_PLAIN_FORWARDS = {nn.modules.batchnorm._BatchNorm.forward, nn.SyncBatchNorm.forward, nn.Linear.forward}


def plain_call(module: nn.Module) -> bool:
    """Calling ``module(x)`` is exactly its class's stock ``forward`` (BatchNorm, SyncBatchNorm, Linear, not
    overridden by a subclass) with no hook of its own or global one: a fused path may then stand in for it."""
    return (type(module).forward in _PLAIN_FORWARDS
            and not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                     or module._backward_pre_hooks)
            and not (_module._global_forward_hooks or _module._global_forward_pre_hooks
                     or _module._global_backward_hooks or _module._global_backward_pre_hooks))
