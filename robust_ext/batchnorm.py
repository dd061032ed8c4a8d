"""BatchNorm + ReLU fused for inference mode: ``relu(bn(x))`` in one pass over memory, and its gradient.

An attack runs the model in eval mode, where a BatchNorm layer is a per-channel affine map
``x * scale + shift`` from its running statistics. :func:`bn_relu` (a layer) and :func:`batch_norm_relu`
(functional) then run ``robust_ext::batch_norm_relu`` on CPU: one read of ``x`` and one write forward,
one read of the gradient and of the output and one write backward. ATen takes two ops each way and,
under bf16 autocast, returns BatchNorm's output in float32, so each layer also pays conversions around
the next convolution. The pre-activation ResNet's attack step (batch 128, 2 threads) is 1.13-1.18x
faster in bf16 channels_last and 1.19-1.26x in fp32 with it (README; ``benchmarks/bench_layers.py`` has
the layer alone, ``benchmarks/bench_attack.py`` the end-to-end figures).

Everywhere else it is ATen's ``F.relu(bn(x))`` unchanged: in training mode (batch statistics), without
running statistics, when the layer has hooks (its own or global ones) or a subclass ``forward``, on CUDA, without the extension
(``ROBUST_EXT_BACKEND=reference``), and under ``torch.func`` transforms or forward-mode AD.

Semantics (:func:`robust_ext.reference.batch_norm_relu`): ATen's inference-mode terms
``scale = reciprocal(sqrt(running_var + eps)) * weight``, ``shift = bias - running_mean * scale``, then
``relu(x * scale + shift)`` in float32 (float64 for float64 inputs), rounded once to ``x``'s dtype. In
float32 this equals ATen's ``relu(batch_norm(x))`` to rounding; in bf16 it differs from ATen's autocast
result (float32 out) by the final rounding. NaN propagates; the input gradient is ATen's ``grad * scale``
where the output is not ``<= 0`` (a NaN output passes it). ``weight``/``bias`` get their gradients as
through ``F.batch_norm`` in eval mode, computed only when the running backward pass needs them (an
attack's ``torch.autograd.grad(loss, x)`` does not, though the parameters require grad). Double backward,
``torch.compile`` (fake kernels) and every memory format work; the output keeps ``x``'s strides.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import _fused, reference
from . import ops as _ops

__all__ = ["batch_norm_relu", "bn_relu"]

_OP = "robust_ext::batch_norm_relu"
_HAS_CPU_KERNEL = _fused.has_cpu_kernel(_OP)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check(x, tensors, eps):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"x must be an (N, C, ...) tensor, got shape {tuple(x.shape)}")
    if x.dtype not in reference._FLOATS:
        raise TypeError(f"x must be float32, float64, float16 or bfloat16, got {x.dtype}")
    for name, t in tensors.items():
        if t is None and name in ("weight", "bias"):
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 1 or t.shape[0] != x.shape[1]:
            raise ValueError(f"{name} must be a 1-D tensor with one value per channel ({x.shape[1]}), "
                             f"got shape {tuple(t.shape)}")
        if t.dtype not in reference._FLOATS:
            raise TypeError(f"{name} must be a float tensor, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} must be on the same device as x ({x.device}), got {t.device}")
    if isinstance(eps, bool) or not (isinstance(eps, (int, float)) and 0 <= eps < float("inf")):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")


def batch_norm_relu(x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor,
                    weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                    eps: float = 1e-5) -> torch.Tensor:
    """``F.relu(F.batch_norm(x, running_mean, running_var, weight, bias, training=False, eps=eps))`` for an
    (N, C, ...) float tensor, fused on CPU. Differentiable in ``x``, ``weight`` and ``bias``."""
    _check(x, {"running_mean": running_mean, "running_var": running_var, "weight": weight, "bias": bias}, eps)
    if _fused.use_cpu_kernel(_HAS_CPU_KERNEL, x):
        return torch.ops.robust_ext.batch_norm_relu.default(x, weight, bias, running_mean, running_var, float(eps))
    return reference.batch_norm_relu(x, running_mean, running_var, weight, bias, eps)


def bn_relu(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """``F.relu(bn(x))`` for a BatchNorm layer (``nn.BatchNorm1d/2d/3d``, ``nn.SyncBatchNorm``), fused when
    ``bn`` normalizes with its running statistics (eval mode) and ``x`` is on CPU with the extension.

    A model calls it in place of ``F.relu(self.bn(x))``; the layer stays an ordinary BatchNorm module
    (state_dict, ``convert_sync_batchnorm``, training mode unchanged)."""
    if (bn.training or bn.running_mean is None or bn.running_var is None or not _fused.plain_call(bn)
            or not isinstance(x, torch.Tensor) or x.dtype not in reference._FLOATS
            or not _fused.use_cpu_kernel(_HAS_CPU_KERNEL, x)):
        return F.relu(bn(x))
    bn._check_input_dim(x)
    return torch.ops.robust_ext.batch_norm_relu.default(x, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                                                        bn.eps)


# ---- autograd ------------------------------------------------------------------------------------------

def _needed(ctx, i: int) -> bool:
    """Whether the running backward pass needs input ``i``'s gradient: an attack's ``autograd.grad(loss, x)``
    does not need BatchNorm's weight/bias gradients, though they require grad; ``loss.backward()`` does."""
    if not ctx.needs_input_grad[i]:
        return False
    try:  # next_functions has one edge per tensor argument (None arguments have none)
        node = ctx.next_functions[ctx.edges[i]][0]
        return node is not None and bool(torch._C._will_engine_execute_node(node))
    except Exception:  # outside the autograd engine (a traced backward): compute it
        return True


def _setup_context(ctx, inputs, output):
    x, weight, bias, mean, var, eps = inputs
    ctx.eps = eps
    tensors = [isinstance(t, torch.Tensor) for t in inputs]
    ctx.edges = [sum(tensors[:i]) if tensors[i] else None for i in range(len(inputs))]
    ctx.bias_dtype = bias.dtype if bias is not None else None
    wants_params = any(t is not None and t.requires_grad for t in (weight, bias))
    ctx.save_for_backward(x if wants_params else None, output, weight, mean, var)


def _terms(weight, mean, var, eps, ct, shape):
    invstd = torch.reciprocal(torch.sqrt(var.to(ct) + eps)).view(shape)
    scale = invstd if weight is None else invstd * weight.to(ct).view(shape)
    return invstd, scale


def _backward(ctx, grad):
    x, out, weight, mean, var = ctx.saved_tensors
    ct = _compute_dtype(out.dtype)
    shape = (1, -1) + (1,) * (out.dim() - 2)
    need_x = ctx.needs_input_grad[0]
    need_w, need_b = _needed(ctx, 1), _needed(ctx, 2)
    gx = gw = gb = None
    create_graph = torch.is_grad_enabled()
    # The gradient ReLU passes, in ATen ops: for double backward and for the parameter gradients.
    passed = torch.where(out <= 0, 0, grad.to(ct)) if (create_graph and need_x) or need_w or need_b else None
    if create_graph and need_x:  # the same formula as the kernel, differentiable
        _, scale = _terms(weight, mean, var, ctx.eps, ct, shape)
        gx = (passed * scale).to(out.dtype)
    elif need_x:
        gx = torch.ops.robust_ext.batch_norm_relu_backward.default(grad, out, weight, var, ctx.eps)
    if need_w or need_b:
        dims = [0] + list(range(2, out.dim()))
        gb = passed.sum(dims).to(ctx.bias_dtype) if need_b else None
        if need_w:
            invstd, _ = _terms(None, mean, var, ctx.eps, ct, shape)
            gw = (passed * ((x.to(ct) - mean.to(ct).view(shape)) * invstd)).sum(dims).to(weight.dtype)
    return gx, gw, gb, None, None, None


def _register():
    @torch.library.register_fake(_OP)
    def _(x, weight, bias, running_mean, running_var, eps):
        torch._check(x.dim() >= 2, lambda: f"x must be an (N, C, ...) tensor, got shape {tuple(x.shape)}")
        torch._check(x.dtype in reference._FLOATS,
                     lambda: f"x must be float32, float64, float16 or bfloat16, got {x.dtype}")
        for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                        ("running_var", running_var)):
            if t is not None:
                torch._check(t.dim() == 1 and t.shape[0] == x.shape[1],
                             lambda: f"{name} must be a 1-D tensor with one value per channel")
        return torch.empty_like(x)

    @torch.library.register_fake(_OP + "_backward")
    def _(grad_out, out, weight, running_var, eps):
        torch._check(grad_out.shape == out.shape, lambda: "grad_out must have the shape of out")
        torch._check(grad_out.dtype == out.dtype, lambda: "grad_out must have out's dtype")
        return torch.empty_like(out)

    torch.library.register_autograd(_OP, _backward, setup_context=_setup_context)


if _ops._EXT is not None:
    _register()
