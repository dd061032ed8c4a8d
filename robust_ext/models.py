"""Models for the examples and tests, a name registry, and checkpoints that load without unpickling code.

* :class:`SmallCNN`: the CNN of MATLAB's "Train Image Classification Network Robust to Adversarial Examples".
* :class:`PreActResNet`: a small pre-activation ResNet (He et al., "Identity Mappings in Deep Residual
  Networks", ECCV 2016), the usual architecture of CIFAR-10 adversarial training.
* :class:`Normalized`: ``model((x - mean) / std)``, so attacks work in [0, 1] pixel space.
* :func:`build_model`, :func:`register_model`; :func:`save_checkpoint` (atomic), :func:`load_checkpoint` and
  :func:`load_model` (``torch.load(weights_only=True)``, every failure a clear error naming the file).

Every other part of the library takes any ``nn.Module``; these models take their device and dtype from
their parameters and inputs only.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import pickle
import threading
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Dict, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ._io import atomic_write
from . import _fused
from .batchnorm import bn_relu
from .pooling import ReLUMaxPool2d

log = logging.getLogger(__name__)
PathLike = Union[str, "os.PathLike[str]"]

_REGISTRY: Dict[str, Callable[..., nn.Module]] = {}
_RESERVED = frozenset({"format", "arch", "config", "state_dict"})
FORMAT = "robust_ext.checkpoint/1"
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
    """Build the model registered as ``name`` with ``config``; the model remembers both for checkpoints."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; registered: {', '.join(available_models())}")
    model = _REGISTRY[name](**config)
    if getattr(model, "arch", None) is None:  # a factory returning a plain module: record how it was built
        model.arch, model.arch_config = name, dict(config)
    return model


def _spec(model: nn.Module) -> Tuple[str, Dict[str, Any]]:
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
        arch, config = _spec(self.model)
        return {"model": {"arch": arch, "config": config},
                "mean": self.mean.flatten().tolist(), "std": self.std.flatten().tolist()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)


@register_model("normalized")
def _build_normalized(model: Dict[str, Any], mean: Sequence[float], std: Sequence[float]) -> Normalized:
    if not isinstance(model, dict) or not isinstance(model.get("arch"), str) or not isinstance(model.get("config"), dict):
        raise ValueError(f"'normalized' needs model={{'arch': name, 'config': {{...}}}}, got {model!r}")
    return Normalized(build_model(model["arch"], **model["config"]), mean, std)


# ------------------------------------------------------------------------------------------ checkpoints
# Exact types: subclasses (numpy floats, IntEnum, defaultdict, ...) pickle as globals weights_only refuses.
_LEAVES = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.Size, torch.Tensor, nn.Parameter)


def _check_plain(value: Any, where: str) -> None:
    """Refuse at save time what ``torch.load(weights_only=True)`` would refuse at load time."""
    if type(value) in (dict, OrderedDict):
        for k, v in value.items():
            if type(k) not in (str, int):
                raise ValueError(f"{where} has a key of type {type(k).__name__}; use str or int keys")
            _check_plain(v, f"{where}[{k!r}]")
    elif type(value) in (list, tuple):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
    elif type(value) not in _LEAVES:
        raise ValueError(f"{where} is a {type(value).__module__}.{type(value).__qualname__}; a checkpoint holds "
                         "only None, bool, int, float, complex, str, bytes, tensors and lists/tuples/dicts of "
                         "them (convert it, e.g. with torch.as_tensor or float())")


def save_checkpoint(path: PathLike, model: nn.Module, **extra: Any) -> Path:
    """Write ``{"format", "arch", "config", "state_dict", **extra}`` to ``path`` atomically.

    The model must come from :func:`build_model` (or be a registered class). Tensors are stored on the CPU.
    The file is written to a temporary name in the same directory, fsynced, then renamed over ``path``, so a
    crash leaves either the old file or the new one, never half of one. Returns the path.
    """
    path = Path(path)
    arch, config = _spec(model)
    clash = _RESERVED & extra.keys()
    if clash:
        raise ValueError(f"extra keys {sorted(clash)} are reserved by the checkpoint format")
    _check_plain(config, "config")
    _check_plain(extra, "extra")
    state = model.state_dict()
    cpu_state = OrderedDict((k, v.detach().cpu()) for k, v in state.items())
    cpu_state._metadata = getattr(state, "_metadata", None)  # per-module versions, read by load_state_dict
    checkpoint = {"format": FORMAT, "arch": arch, "config": config, "state_dict": cpu_state, **extra}
    atomic_write(path, lambda f: torch.save(checkpoint, f))
    log.debug("saved %s checkpoint to %s", arch, path)
    return path


# A checkpoint's zip entries may declare at most this many bytes in all (torch.load allocates what they
# declare), and at most _MAX_INFLATION times the file's size: torch.save stores entries uncompressed, so
# only a recompressed file inflates at all, and weights deflate by far less than 8:1.
MAX_CHECKPOINT_BYTES = 1 << 32
_MAX_INFLATION = 8


def _check_archive(path: Path, max_bytes: int) -> None:
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            declared = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError, NotImplementedError) as e:
        raise ValueError(f"{path}: not a readable torch checkpoint (corrupt or truncated?): not the zip archive "
                         f"torch.save writes: {e}") from None
    bound = min(max_bytes, _MAX_INFLATION * size + (1 << 20))
    if declared > bound:
        raise ValueError(f"{path}: its zip entries declare {declared:,} bytes, more than {bound:,} ({_MAX_INFLATION}x "
                         f"the file's {size:,} bytes + 1 MiB, at most {max_bytes:,}): a decompression bomb, or a "
                         "checkpoint larger than load_checkpoint(max_bytes=...) allows")


def _torch_reason(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    key = [line for line in lines if "unsupported" in line.lower() or "failed reading" in line.lower()]
    return "; ".join(key) or (lines[-1] if lines else type(error).__name__)


def load_checkpoint(path: PathLike, map_location: Any = "cpu", max_bytes: int = MAX_CHECKPOINT_BYTES) -> Dict[str, Any]:
    """Read and validate a checkpoint written by :func:`save_checkpoint` with ``torch.load(weights_only=True)``.

    Returns the dict (``arch``, ``config``, ``state_dict`` and the extras). A missing file raises
    FileNotFoundError; a corrupt file, a non-checkpoint, or one holding arbitrary pickled objects ValueError.
    Before ``torch.load`` reads it, the zip archive's declared sizes are bounded (``max_bytes``, and 8 times
    the file's size), so a small file cannot make it allocate gigabytes.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    _check_archive(path, max_bytes)
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: refused by torch.load(weights_only=True), so it is not a plain checkpoint "
                         f"(corrupt, or it holds arbitrary pickled objects): {_torch_reason(e)}") from e
    except Exception as e:  # a damaged file fails in many ways (RuntimeError, EOFError, KeyError, ...)
        raise ValueError(f"{path}: not a readable torch checkpoint (corrupt or truncated?): {_torch_reason(e)}") from e
    if not isinstance(checkpoint, dict) or not {"arch", "config", "state_dict"} <= checkpoint.keys():
        found = sorted(map(str, checkpoint)) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        hint = ""
        if isinstance(checkpoint, dict) and checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
            hint = " (it looks like a bare state_dict: build the model and call load_state_dict)"
        raise ValueError(f"{path}: not a robust_ext checkpoint: expected a dict with 'arch', 'config' and "
                         f"'state_dict', found {found}{hint}")
    if checkpoint.get("format", FORMAT) != FORMAT:
        raise ValueError(f"{path}: checkpoint format {checkpoint['format']!r}; this robust_ext reads {FORMAT!r}")
    state = checkpoint["state_dict"]
    if not isinstance(checkpoint["arch"], str) or not isinstance(checkpoint["config"], dict) \
            or not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: malformed checkpoint: 'arch' must be a str, 'config' a dict and "
                         "'state_dict' a dict of tensors")
    return checkpoint


_CONFIG_INT = 1 << 20
_CONFIG_ITEMS, _CONFIG_LEAVES, _CONFIG_DEPTH = 256, 1024, 8


def _check_config(path: Path, config: Any) -> None:
    """Every value of an untrusted config within bounds no model here needs to exceed."""
    leaves = 0

    def walk(value: Any, where: str, depth: int) -> None:
        nonlocal leaves
        if depth > _CONFIG_DEPTH:
            raise ValueError(f"{path}: {where} nests deeper than {_CONFIG_DEPTH} levels")
        if isinstance(value, (dict, list, tuple)):
            if len(value) > _CONFIG_ITEMS:
                raise ValueError(f"{path}: {where} has {len(value):,} items, more than {_CONFIG_ITEMS}")
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for k, v in items:
                walk(v, f"{where}[{k!r}]", depth + 1)
            return
        leaves += 1
        if leaves > _CONFIG_LEAVES:
            raise ValueError(f"{path}: config holds more than {_CONFIG_LEAVES} values")
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > _CONFIG_INT:
            raise ValueError(f"{path}: {where} = {value} is out of range (integers within +-{_CONFIG_INT:,})")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{path}: {where} = {value} is not a finite number")
        if isinstance(value, str) and len(value) > _CONFIG_ITEMS:
            raise ValueError(f"{path}: {where} is a string of {len(value):,} characters")

    walk(config, "config", 0)


class _OverBudget(Exception):
    pass


@contextlib.contextmanager
def _registration_budget(limit: int):
    """Abort a model's construction in this thread once it registers more than ``limit`` modules and tensors."""
    owner, count = threading.get_ident(), 0

    def hook(*_):
        nonlocal count
        if threading.get_ident() == owner:
            count += 1
            if count > limit:
                raise _OverBudget
    registry = nn.modules.module
    handles = [registry.register_module_module_registration_hook(hook),
               registry.register_module_parameter_registration_hook(hook),
               registry.register_module_buffer_registration_hook(hook)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _mismatch(state: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor]) -> str:
    def some(keys):
        return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")

    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {list(state[k].shape)} vs {list(v.shape)}" for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    return "; ".join(f"{what}: {some(keys)}" for what, keys in (
        ("missing keys", missing), ("unexpected keys", unexpected), ("shapes (checkpoint vs model)", shapes)) if keys)


def _check_fits(path: Path, arch: str, config: Dict[str, Any], state: Dict[str, torch.Tensor]) -> None:
    """Build the architecture on the meta device (no memory for its tensors) and compare its state_dict's keys
    and shapes with the checkpoint's, before anything is allocated. Its construction is cut short once it
    registers far more modules and tensors than the state_dict holds (a config asking for a huge network)."""
    limit = 4 * len(state) + 64
    try:
        with _registration_budget(limit), torch.device("meta"):
            skeleton = build_model(arch, **config)
    except _OverBudget:
        raise RuntimeError(f"{path}: state_dict does not match architecture {arch!r} with config {config}: the "
                           f"config builds more than {limit} modules and tensors, the state_dict holds "
                           f"{len(state)} tensors") from None
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: cannot build {arch!r} from config {config}: {e}") from e
    except Exception as e:  # a factory that cannot build on the meta device cannot be checked first
        raise ValueError(f"{path}: cannot check {arch!r} with config {config} against the state_dict before "
                         f"building it: its factory fails on the meta device: {type(e).__name__}: {e}") from e
    details = _mismatch(state, skeleton.state_dict())
    if details:
        raise RuntimeError(f"{path}: state_dict does not match architecture {arch!r} with config {config}: "
                           f"{details}")


def load_model(path: PathLike, map_location: Any = "cpu", max_bytes: int = MAX_CHECKPOINT_BYTES) -> nn.Module:
    """Rebuild the model saved at ``path`` and load its weights; returned in eval mode.

    The model is moved to ``map_location`` when that names a device. Unknown architecture or invalid config:
    ValueError; a state_dict that does not fit the architecture: RuntimeError; both name the file. Nothing
    in the file is trusted: the config's values are bounded and the architecture is built first on the
    meta device and checked against the state_dict's keys and shapes, so the model allocated is exactly
    as large as the weights the file holds (``max_bytes``: see :func:`load_checkpoint`).
    """
    path = Path(path)
    checkpoint = load_checkpoint(path, map_location, max_bytes)
    arch, config = checkpoint["arch"], checkpoint["config"]
    if arch not in _REGISTRY:
        raise ValueError(f"{path}: unknown architecture {arch!r}; registered: {', '.join(available_models())}")
    _check_config(path, config)
    _check_fits(path, arch, config, checkpoint["state_dict"])
    try:
        model = build_model(arch, **config)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: cannot build {arch!r} from config {config}: {e}") from e
    try:
        model.load_state_dict(checkpoint["state_dict"], strict=True)
    except RuntimeError as e:
        raise RuntimeError(f"{path}: state_dict does not match architecture {arch!r} with config {config}: {e}") from e
    if isinstance(map_location, (str, torch.device)):
        model.to(map_location)
    return model.eval()


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters (buffers excluded)."""
    return sum(math.prod(p.shape) for p in model.parameters())
