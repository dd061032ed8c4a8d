"""``fuse(model)``: a user's own model on the fused layers.

robust_ext's fused ReLU + 2x2 max-pool (:mod:`robust_ext.pooling`) and inference-mode BatchNorm + ReLU
(:mod:`robust_ext.batchnorm`) speed up an attack's forward and input-gradient backward. Its own models call
them directly; :func:`fuse` finds the same patterns in any model:

* ReLU (``nn.ReLU``, ``F.relu``, ``torch.relu``, ``.relu()``) feeding only a 2x2, stride-2 max-pool
  (``nn.MaxPool2d(2)``, ``F.max_pool2d(x, 2)``; no padding, dilation, ceil mode or indices), or that
  max-pool feeding only a ReLU: both become :func:`~robust_ext.pooling.relu_max_pool2d` (exact: the
  values and gradients of ATen's ops);
* a BatchNorm layer (``nn.BatchNorm1d/2d/3d``) feeding only a ReLU (that does not itself feed a pool): :func:`~robust_ext.batchnorm.bn_relu`,
  which runs the fused kernel in eval mode and ATen's ops in training mode (equal to rounding in fp32).

The model is traced with ``torch.fx``; where a module does not trace (data-dependent control flow), its
children are fused one by one and the module is listed as left unfused with the reason. A module with
hooks is never fused away (its hooks would not run). The fused model shares the original's parameters and
buffers (no copy) and has the same ``state_dict`` keys; a module whose trace would drop a parameter or
buffer is left as it is. What was fused and what was not: ``fuse(model, return_report=True)`` (and the log).
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn

from .batchnorm import bn_relu
from .pooling import ReLUMaxPool2d, relu_max_pool2d

__all__ = ["fuse", "FusionReport", "relu_pool"]

log = logging.getLogger("robust_ext.fuse")

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_RELU_FUNCTIONS = (F.relu, torch.relu, torch.nn.functional.relu)
_FRESH = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, *_BN)  # modules whose output is a new tensor


@dataclass
class FusionReport:
    """``fused``: (module path, pattern) per fusion; ``left``: (module path, reason) for what was not fused."""

    fused: List[Tuple[str, str]] = field(default_factory=list)
    left: List[Tuple[str, str]] = field(default_factory=list)

    def __str__(self):
        lines = [f"fused {len(self.fused)} pattern(s)"] + [f"  {p or '<model>'}: {k}" for p, k in self.fused]
        if self.left:
            lines += [f"left unfused {len(self.left)}"] + [f"  {p or '<model>'}: {r}" for p, r in self.left]
        return "\n".join(lines)


def relu_pool(x: torch.Tensor) -> torch.Tensor:
    """``max_pool2d(relu(x), 2)``: the fused op for a batch of 2-D maps, ATen's ops for anything else (an
    unbatched (C, H, W) input, which nn.MaxPool2d also takes)."""
    if x.dim() == 4 and x.shape[-1] >= 2 and x.shape[-2] >= 2:
        return relu_max_pool2d(x)
    return F.max_pool2d(F.relu(x), 2)


class _Tracer(fx.Tracer):
    """torch.fx's tracer, with robust_ext's own fused layer kept as a leaf (it checks its input's type)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, ReLUMaxPool2d) or super().is_leaf_module(m, qualname)


def _hooked(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def _pair(v, n):
    return v if isinstance(v, tuple) else (v,) * n


def _is_relu(node: fx.Node, modules) -> bool:
    if node.op == "call_module":
        m = modules[node.target]
        return type(m) is nn.ReLU and not _hooked(m) and (not m.inplace or _private_input(node, modules))
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS and len(node.args) == 1 and not node.kwargs.get("inplace", False)
    return node.op == "call_method" and node.target == "relu" and len(node.args) == 1 and not node.kwargs


def _private_input(node: fx.Node, modules) -> bool:
    """An in-place ReLU's input is a fresh tensor (a convolution's, linear layer's or BatchNorm's output, not a
    view of anything) read by nothing else: then the fused layer, which leaves its input as it is, changes no
    value another part of the model reads."""
    src = node.args[0] if node.args else None
    return (isinstance(src, fx.Node) and len(src.users) == 1 and src.op == "call_module"
            and type(modules[src.target]) in _FRESH)


def _is_pool2(node: fx.Node, modules) -> bool:
    """A 2x2, stride-2 max-pool with no padding, dilation, ceil mode or returned indices."""
    if node.op == "call_module":
        m = modules[node.target]
        return (type(m) is nn.MaxPool2d and not _hooked(m) and _pair(m.kernel_size, 2) == (2, 2)
                and _pair(m.stride if m.stride is not None else m.kernel_size, 2) == (2, 2)
                and _pair(m.padding, 2) == (0, 0) and _pair(m.dilation, 2) == (1, 1) and not m.ceil_mode
                and not m.return_indices)
    if node.op == "call_function" and node.target in (F.max_pool2d, torch.max_pool2d):
        names = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
        given = dict(zip(names, node.args[1:]), **node.kwargs)
        if any(isinstance(v, fx.Node) for v in given.values()):
            return False
        stride = given.get("stride") or given.get("kernel_size")
        return (_pair(given.get("kernel_size"), 2) == (2, 2) and _pair(stride, 2) == (2, 2)
                and _pair(given.get("padding", 0), 2) == (0, 0) and _pair(given.get("dilation", 1), 2) == (1, 1)
                and not given.get("ceil_mode", False) and not given.get("return_indices", False))
    return False


def _is_bn(node: fx.Node, modules) -> bool:
    return node.op == "call_module" and type(modules[node.target]) in _BN and not _hooked(modules[node.target])


def _only_user(node: fx.Node):
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _feeds_pool(relu: fx.Node, modules) -> bool:
    """The ReLU feeds only a 2x2 max-pool: fusing ReLU + pool there saves more than BatchNorm + ReLU (ATen's
    max-pool backward is the slower layer)."""
    user = _only_user(relu)
    return user is not None and _is_pool2(user, modules)


def _fuse_graph(gm: fx.GraphModule, prefix: str, report: FusionReport) -> int:
    modules = dict(gm.named_modules())
    graph, count = gm.graph, 0
    for node in list(graph.nodes):
        if node.graph is not graph or node.op == "output":
            continue
        nxt = _only_user(node)
        if nxt is None:
            continue
        first_relu = _is_relu(node, modules) and _is_pool2(nxt, modules)
        first_pool = _is_pool2(node, modules) and _is_relu(nxt, modules)
        if first_relu or first_pool:
            with graph.inserting_before(nxt):
                fused = graph.call_function(relu_pool, (node.args[0],))
            nxt.replace_all_uses_with(fused)
            graph.erase_node(nxt)
            graph.erase_node(node)
            report.fused.append((_join(prefix, _where(node)), "ReLU + max_pool2d(2)"))
            count += 1
        elif _is_bn(node, modules) and _is_relu(nxt, modules) and not _feeds_pool(nxt, modules):
            with graph.inserting_before(nxt):
                bn = graph.get_attr(node.target)
                fused = graph.call_function(bn_relu, (bn, node.args[0]))
            nxt.replace_all_uses_with(fused)
            graph.erase_node(nxt)
            graph.erase_node(node)
            report.fused.append((_join(prefix, node.target), "BatchNorm + ReLU"))
            count += 1
    if count:
        graph.lint()
        gm.recompile()
    return count


def _where(node: fx.Node) -> str:
    """A module's path; "" (the traced module itself) for a function or method call in its forward."""
    return node.target if node.op == "call_module" else ""


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else (prefix or name)


def _fuse_module(m: nn.Module, prefix: str, report: FusionReport) -> nn.Module:
    if _hooked(m):
        report.left.append((prefix, "has hooks"))
        return m
    try:
        gm = fx.GraphModule(m, _Tracer(autowrap_functions=(relu_pool, bn_relu)).trace(m))
    except Exception as e:  # data-dependent control flow, unsupported ops: fuse the children instead
        reason = f"does not trace with torch.fx ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
        if not any(True for _ in m.children()):
            return m
        report.left.append((prefix, reason))
        return _fuse_children(m, prefix, report)
    trial = FusionReport()
    if not _fuse_graph(gm, prefix, trial):
        return m
    if set(gm.state_dict()) != set(m.state_dict()):
        report.left.append((prefix, "its trace would drop parameters or buffers"))
        return _fuse_children(m, prefix, report)
    report.fused += trial.fused
    gm.train(m.training)
    return gm


def _fuse_children(m: nn.Module, prefix: str, report: FusionReport) -> nn.Module:
    new = {name: _fuse_module(child, _join(prefix, name), report) for name, child in m.named_children()}
    if all(new[name] is child for name, child in m.named_children()):
        return m
    out = copy.copy(m)  # the same class and attributes; its own dict of children
    out._modules = dict(m._modules)
    for name, child in new.items():
        out._modules[name] = child
    return out


def fuse(model: nn.Module, *, return_report: bool = False):
    """``model`` with its ReLU + max-pool and BatchNorm + ReLU patterns on robust_ext's fused layers (see the
    module docstring). Logits and input gradients equal the original's (exactly for the pooling, to
    rounding for BatchNorm); the result shares the original's parameters and has its state_dict keys
    (``model`` itself when nothing fuses). ``model`` is not changed. ``return_report=True`` returns
    ``(fused, FusionReport)``: what was fused, and what was left unfused with the reason."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    report = FusionReport()
    fused = _fuse_module(model, "", report)
    log.info("robust_ext.fuse: %s", str(report).replace("\n", "; "))
    return (fused, report) if return_report else fused
