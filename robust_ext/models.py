"""Models for the examples and tests and a name registry (checkpoints: :mod:`robust_ext.checkpoints`).

* :class:`SmallCNN`: the CNN of MATLAB's "Train Image Classification Network Robust to Adversarial Examples".
* :class:`PreActResNet`: a small pre-activation ResNet (He et al., "Identity Mappings in Deep Residual
  Networks", ECCV 2016), the usual architecture of CIFAR-10 adversarial training.
* :class:`Normalized`: ``model((x - mean) / std)``, so attacks work in [0, 1] pixel space.
* :class:`ExportedModel`: a ``torch.export`` program as a module the attacks can switch to eval mode.
* :func:`from_factory`: a model of the user's own, built by an importable factory (``"pkg.module:build"``).
* :func:`build_model`, :func:`register_model`, :func:`model_spec` (how a model was built: what a checkpoint
  records). :func:`save_checkpoint`, :func:`load_checkpoint` and :func:`load_model` live in
  :mod:`robust_ext.checkpoints` and are importable from here too.

Every other part of the library takes any ``nn.Module``; these models take their device and dtype from
their parameters and inputs only.
"""
from __future__ import annotations

import importlib
import math
import re
from typing import Any, Callable, Dict, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import _fused
from .batchnorm import bn_relu
from .checkpoints import FORMAT, MAX_CHECKPOINT_BYTES, load_checkpoint, load_model, save_checkpoint  # noqa: F401
from .pooling import ReLUMaxPool2d

_REGISTRY: Dict[str, Callable[..., nn.Module]] = {}
FACTORY = "factory"  # the arch recorded for a model of from_factory; never built from a file
# The built-in models refuse configs past this many parameters (1 GiB in fp32) before allocating any:
# far above what they are for (PreActResNet-18: 11 M), far below what exhausts a machine.
MAX_PARAMETERS = 2 ** 28


def _check_parameter_count(name: str, count: int, config: Dict[str, Any]) -> None:
    if count > MAX_PARAMETERS:
        raise ValueError(f"{name} with {config} would have {count:,} parameters, more than the {MAX_PARAMETERS:,} "
                         "the built-in models allow")


def register_model(name: str):
    """Decorator registering a class or factory under ``name`` for :func:`build_model` and checkpoints.

    :func:`load_model` first builds the model under ``torch.device("meta")`` to check a checkpoint's config
    against its weights, so a factory must build there too (create tensors, do not read their values).
    """
    def register(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model name {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory
    return register


def available_models() -> Tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def build_model(name: str, **config: Any) -> nn.Module:
    """Build the model registered as ``name`` with ``config``; the model remembers both for checkpoints.

    ``"factory"`` (what :func:`from_factory` records) is refused: a checkpoint's config names no code to import.
    """
    if name == FACTORY:
        spec = config.get("factory")
        raise ValueError(f"the model was built by the factory {spec!r}, and robust_ext imports no code a file "
                         f"names: rebuild it with models.from_factory({spec!r}) and checkpoints.load_weights "
                         f"(CLI: --model-factory {spec} --weights FILE)")
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; registered: {', '.join(available_models())}")
    model = _REGISTRY[name](**config)
    if getattr(model, "arch", None) is None:  # a factory returning a plain module: record how it was built
        model.arch, model.arch_config = name, dict(config)
    return model


def model_spec(model: nn.Module) -> Tuple[str, Dict[str, Any]]:
    """``(arch, config)`` such that ``build_model(arch, **config)`` rebuilds ``model``'s architecture.

    ValueError (saying how to fix it) for a model that :func:`build_model` did not make.
    """
    arch, config = getattr(model, "arch", None), getattr(model, "arch_config", None)
    if not isinstance(arch, str) or not isinstance(config, dict):
        raise ValueError(f"cannot checkpoint a {type(model).__name__}: it was not made by build_model; register "
                         "its factory with @register_model(name) and build it with build_model(name, **config), "
                         "or save its state_dict yourself")
    return arch, config


@register_model("small_cnn")
class SmallCNN(nn.Module):
    """conv3x3(32) - ReLU - conv3x3(64) - ReLU - maxpool 2x2/2 - linear(num_classes); returns logits.

    The last ReLU and the max-pool are one fused layer (:class:`robust_ext.pooling.ReLUMaxPool2d`: the
    same values and gradients as ``nn.ReLU(), nn.MaxPool2d(2)``, and the same state_dict keys).

    MATLAB's example uses ``convolution2dLayer(3, 32, Padding=1)``: with the default ``padding=1`` both
    convolutions keep 28x28 and the linear layer is 64*14*14 -> 10; with ``padding=0`` it is 64*12*12 -> 10.
    ``input_size`` is an int or (H, W); its softmax layer is left to the loss.
    """

    arch = "small_cnn"

    def __init__(self, in_channels: int = 1, num_classes: int = 10,
                 input_size: Union[int, Sequence[int]] = 28, padding: int = 1):
        super().__init__()
        h, w = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        out_h, out_w = (h + 4 * padding - 4) // 2, (w + 4 * padding - 4) // 2
        if padding < 0 or out_h < 1 or out_w < 1:
            raise ValueError(f"input_size {(h, w)} with padding {padding} leaves no feature map")
        _check_parameter_count("SmallCNN", in_channels * 32 * 9 + 32 + 32 * 64 * 9 + 64
                               + (64 * out_h * out_w + 1) * num_classes,
                               {"in_channels": in_channels, "num_classes": num_classes, "input_size": (h, w)})
        self.input_hw = (h, w)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=padding), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=padding), ReLUMaxPool2d())
        self.classifier = nn.Linear(64 * out_h * out_w, num_classes)
        self.arch_config = {"in_channels": in_channels, "num_classes": num_classes,
                            "input_size": input_size if isinstance(input_size, int) else [h, w],
                            "padding": padding}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.input_hw:
            raise ValueError(f"SmallCNN was built for {self.input_hw[0]}x{self.input_hw[1]} inputs, "
                             f"got shape {tuple(x.shape)}")
        f = self.features(x)
        if (type(self.classifier) is nn.Linear and _fused.plain_call(self.classifier) and not _fused.transformed(f)
                and f.is_contiguous(memory_format=torch.channels_last) and not f.is_contiguous()):
            # channels_last: flatten in (h, w, c) order -- a view, where torch.flatten would copy the map to
            # NCHW order (and back in the backward) -- against the classifier's weight permuted to match.
            n, c, h, w = f.shape
            weight = self.classifier.weight.view(-1, c, h, w).permute(0, 2, 3, 1).reshape(-1, c * h * w)
            return F.linear(f.permute(0, 2, 3, 1).reshape(n, -1), weight, self.classifier.bias)
        return self.classifier(torch.flatten(f, 1))


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus a shortcut (1x1 conv of the pre-activation when shapes change)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.shortcut = (nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
                         if stride != 1 or in_channels != out_channels else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = bn_relu(self.bn1, x)
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv2(bn_relu(self.bn2, self.conv1(out)))
        return out + shortcut


@register_model("preact_resnet")
class PreActResNet(nn.Module):
    """Pre-activation ResNet: conv3x3 stem, stages of :class:`PreActBlock`, BN-ReLU, global average pool, linear.

    Stage ``i`` has ``blocks[i]`` blocks of width ``width * 2**i``; every stage after the first halves the
    resolution. The default (width 16, one block per stage, ~0.3 M parameters) trains on a CPU;
    ``width=64, blocks=(2, 2, 2, 2)`` is PreActResNet-18. Any input size works (adaptive pooling).
    """

    arch = "preact_resnet"

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 16,
                 blocks: Sequence[int] = (1, 1, 1, 1)):
        super().__init__()
        blocks = tuple(int(b) for b in blocks)
        if width < 1 or not blocks or min(blocks) < 1:
            raise ValueError(f"need width >= 1 and at least one stage of >= 1 block, got width={width}, "
                             f"blocks={blocks}")
        count, channels = in_channels * width * 9, width
        for stage, n in enumerate(blocks):
            out = width * 2 ** stage
            count += (2 * channels + 9 * channels * out + (channels * out if channels != out or stage > 0 else 0)
                      + (n - 1) * (2 * out + 9 * out * out) + n * (2 * out + 9 * out * out))
            channels = out
        _check_parameter_count("PreActResNet", count + 2 * channels + (channels + 1) * num_classes,
                               {"in_channels": in_channels, "num_classes": num_classes, "width": width,
                                "blocks": list(blocks)})
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        layers, channels = [], width
        for stage, n in enumerate(blocks):
            out = width * 2 ** stage
            for i in range(n):
                layers.append(PreActBlock(channels, out, stride=2 if stage > 0 and i == 0 else 1))
                channels = out
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels, num_classes)
        self.arch_config = {"in_channels": in_channels, "num_classes": num_classes, "width": width,
                            "blocks": list(blocks)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = bn_relu(self.bn, self.layers(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


class Normalized(nn.Module):
    """``model((x - mean) / std)`` with per-channel ``mean``/``std`` buffers, for N x C x H x W inputs.

    Putting the normalization inside the model lets attacks clip and take steps in [0, 1] pixel space.
    """

    arch = "normalized"

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        # On the CPU whatever the default device: checked here, and built on the meta device by load_model.
        mean_t = torch.as_tensor(mean, dtype=torch.float32, device="cpu").flatten()
        std_t = torch.as_tensor(std, dtype=torch.float32, device="cpu").flatten()
        if mean_t.numel() != std_t.numel() or mean_t.numel() == 0:
            raise ValueError(f"mean and std need the same, non-zero length; got {mean_t.numel()} and {std_t.numel()}")
        if not bool((std_t > 0).all() and torch.isfinite(std_t).all() and torch.isfinite(mean_t).all()):
            raise ValueError(f"std must be positive and finite and mean finite; got mean={mean}, std={std}")
        self.model = model
        self.register_buffer("mean", mean_t.view(1, -1, 1, 1))
        self.register_buffer("std", std_t.view(1, -1, 1, 1))

    @property
    def arch_config(self) -> Dict[str, Any]:
        arch, config = model_spec(self.model)
        return {"model": {"arch": arch, "config": config},
                "mean": self.mean.flatten().tolist(), "std": self.std.flatten().tolist()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)


@register_model("normalized")
def _build_normalized(model: Dict[str, Any], mean: Sequence[float], std: Sequence[float]) -> Normalized:
    if not isinstance(model, dict) or not isinstance(model.get("arch"), str) or not isinstance(model.get("config"), dict):
        raise ValueError(f"'normalized' needs model={{'arch': name, 'config': {{...}}}}, got {model!r}")
    return Normalized(build_model(model["arch"], **model["config"]), mean, std)


class ExportedModel(nn.Module):
    """The module of a ``torch.export`` program (``ExportedProgram.module()``), callable like any model.

    An exported program is traced in one mode (export it in eval mode) and refuses ``train()``/``eval()``;
    this wrapper takes those calls for itself, so the attacks' and the evaluation's mode switches work.
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def train(self, mode: bool = True) -> "ExportedModel":
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


_FACTORY_SPEC = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def import_factory(spec: str) -> Callable[[], nn.Module]:
    """The callable named by ``"package.module:attribute"`` (the attribute may be dotted: ``mod:Class.make``).

    Imports the module: it runs its code, as any import does. ValueError saying what went wrong otherwise.
    """
    if not isinstance(spec, str) or not _FACTORY_SPEC.match(spec):
        raise ValueError(f"expected an importable factory as package.module:function, got {spec!r}")
    module_name, _, attribute = spec.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise ValueError(f"cannot import {module_name!r}: {e}") from None
    except (Exception, SystemExit) as e:  # the module's own code failed (or exited)
        raise ValueError(f"importing {module_name!r} raised {type(e).__name__}: {e}") from e
    for name in attribute.split("."):
        if not hasattr(target, name):
            raise ValueError(f"{module_name!r} has no attribute {attribute!r}")
        target = getattr(target, name)
    if not callable(target):
        raise ValueError(f"{attribute!r} in {module_name!r} is a {type(target).__name__}, not callable")
    return target


def from_factory(spec: str) -> nn.Module:
    """``import_factory(spec)()``: the user's model, recorded as built by ``spec`` for checkpoints.

    A checkpoint of it holds ``arch="factory"``, ``config={"factory": spec}`` and the state_dict;
    :func:`load_model` does not import what a file names, so rebuild it with ``from_factory(spec)`` and
    load the weights with :func:`robust_ext.checkpoints.load_weights` (CLI: ``--model-factory spec --weights
    FILE``). A factory returning a registered model (e.g. :class:`SmallCNN`) keeps that model's own record.
    """
    factory = import_factory(spec)
    try:
        model = factory()
    except (Exception, SystemExit) as e:  # SystemExit: a factory that calls exit() must not end the caller
        raise ValueError(f"calling {spec} raised {type(e).__name__}: {e}") from e
    if not isinstance(model, nn.Module):
        raise ValueError(f"{spec} returned a {type(model).__name__}, expected a torch.nn.Module")
    if getattr(model, "arch", None) is None:
        model.arch, model.arch_config = FACTORY, {"factory": spec}
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters (buffers excluded)."""
    return sum(math.prod(p.shape) for p in model.parameters())
