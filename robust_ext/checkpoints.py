"""Model checkpoints that load without unpickling code.

:func:`save_checkpoint` writes ``{"format", "arch", "config", "state_dict", **extra}`` atomically;
:func:`load_checkpoint` reads one with ``torch.load(weights_only=True)`` after bounding its zip archive;
:func:`load_model` rebuilds the architecture through the registry of :mod:`robust_ext.models`, checked on the
meta device against the weights before anything is allocated. Every failure is a clear error naming the file.
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
from typing import Any, Dict, Union

import torch
from torch import nn

from ._io import atomic_write

log = logging.getLogger(__name__)
PathLike = Union[str, "os.PathLike[str]"]

_RESERVED = frozenset({"format", "arch", "config", "state_dict"})
FORMAT = "robust_ext.checkpoint/1"


def _registry():
    # robust_ext.models re-exports this module's functions, so it is imported when they run, not before.
    from . import models
    return models


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
    arch, config = _registry().model_spec(model)
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


def check_archive(path: Path, max_bytes: int, max_inflation: int = _MAX_INFLATION, what: str = "torch checkpoint",
                  writer: str = "torch.save") -> None:
    """Bound what a zip archive (torch.save's, numpy's .npz, torch.export's .pt2) may make its reader allocate:
    its entries' declared sizes, at most ``max_bytes`` and ``max_inflation`` times the file's size + 1 MiB."""
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            declared = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError, NotImplementedError) as e:
        raise ValueError(f"{path}: not a readable {what} (corrupt or truncated?): not the zip archive "
                         f"{writer} writes: {e}") from None
    bound = min(max_bytes, max_inflation * size + (1 << 20))
    if declared > bound:
        raise ValueError(f"{path}: its zip entries declare {declared:,} bytes, more than {bound:,} ({max_inflation}x "
                         f"the file's {size:,} bytes + 1 MiB, at most {max_bytes:,}): a decompression bomb, or a "
                         f"{what} larger than max_bytes allows")


def _torch_reason(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    key = [line for line in lines if "unsupported" in line.lower() or "failed reading" in line.lower()]
    return "; ".join(key) or (lines[-1] if lines else type(error).__name__)


def read_torch_file(path: PathLike, map_location: Any = "cpu", max_bytes: int = MAX_CHECKPOINT_BYTES,
                    what: str = "torch checkpoint") -> Any:
    """``torch.load(path, weights_only=True)`` of an untrusted file, its archive bounded first (see
    :func:`check_archive`). FileNotFoundError when missing, ValueError naming the file for anything else."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    check_archive(path, max_bytes, what=what)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: refused by torch.load(weights_only=True), so it is not a plain {what} "
                         f"(corrupt, or it holds arbitrary pickled objects): {_torch_reason(e)}") from e
    except Exception as e:  # a damaged file fails in many ways (RuntimeError, EOFError, KeyError, ...)
        raise ValueError(f"{path}: not a readable {what} (corrupt or truncated?): {_torch_reason(e)}") from e


def load_checkpoint(path: PathLike, map_location: Any = "cpu", max_bytes: int = MAX_CHECKPOINT_BYTES) -> Dict[str, Any]:
    """Read and validate a checkpoint written by :func:`save_checkpoint` with ``torch.load(weights_only=True)``.

    Returns the dict (``arch``, ``config``, ``state_dict`` and the extras). A missing file raises
    FileNotFoundError; a corrupt file, a non-checkpoint, or one holding arbitrary pickled objects ValueError.
    Before ``torch.load`` reads it, the zip archive's declared sizes are bounded (``max_bytes``, and 8 times
    the file's size), so a small file cannot make it allocate gigabytes.
    """
    path = Path(path)
    checkpoint = read_torch_file(path, map_location, max_bytes)
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
            skeleton = _registry().build_model(arch, **config)
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
    registry = _registry()
    if arch != registry.FACTORY and arch not in registry.available_models():
        raise ValueError(f"{path}: unknown architecture {arch!r}; registered: {', '.join(registry.available_models())}")
    _check_config(path, config)
    _check_fits(path, arch, config, checkpoint["state_dict"])
    try:
        model = registry.build_model(arch, **config)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: cannot build {arch!r} from config {config}: {e}") from e
    try:
        model.load_state_dict(checkpoint["state_dict"], strict=True)
    except RuntimeError as e:
        raise RuntimeError(f"{path}: state_dict does not match architecture {arch!r} with config {config}: {e}") from e
    if isinstance(map_location, (str, torch.device)):
        model.to(map_location)
    return model.eval()


def load_weights(model: nn.Module, path: PathLike, max_bytes: int = MAX_CHECKPOINT_BYTES) -> nn.Module:
    """Load the weights in ``path`` into ``model`` (a model of the user's own, e.g. :func:`models.from_factory`).

    ``path`` holds a bare state_dict (``torch.save(model.state_dict(), path)``) or a checkpoint of
    :func:`save_checkpoint` (its ``state_dict``). Read like a checkpoint (bounded archive,
    ``torch.load(weights_only=True)``); keys and shapes are compared with the model's before anything is
    copied: RuntimeError naming the file and the differences. A :class:`models.Normalized` model takes the
    weights of its network alone, or of itself when they hold the same ``mean`` and ``std``. Returns ``model``
    in eval mode.
    """
    path = Path(path)
    data = read_torch_file(path, max_bytes=max_bytes, what="weights file")
    state = data.get("state_dict") if isinstance(data, dict) and "state_dict" in data else data
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state_dict (a dict of tensors) or a robust_ext checkpoint, found "
                         f"{type(state).__name__}")
    target = model
    if isinstance(model, _registry().Normalized):
        if not {"mean", "std"} & state.keys():  # the network's weights; the normalization is the wrapper's
            target = model.model
        elif {"mean", "std"} <= state.keys() and not (
                state["mean"].shape == model.mean.shape and torch.allclose(state["mean"].float(), model.mean)
                and state["std"].shape == model.std.shape and torch.allclose(state["std"].float(), model.std)):
            def values(t):
                return [round(v, 6) for v in t.flatten().tolist()]
            raise RuntimeError(f"{path}: the weights were trained with mean {values(state['mean'])} and std "
                               f"{values(state['std'])}, the model normalizes with mean {values(model.mean)} and std "
                               f"{values(model.std)}")
    details = _mismatch(state, target.state_dict())
    if details:
        hint = (" (the weights hold a normalization: wrap the model in models.Normalized, CLI: --mean/--std)"
                if {"mean", "std"} <= state.keys() and not {"mean", "std"} <= target.state_dict().keys() else "")
        raise RuntimeError(f"{path}: the weights do not fit the model: {details}{hint}")
    target.load_state_dict(state, strict=True)
    return model.eval()


# torch.export writes weights uncompressed; its JSON graph deflates well, but far less than this.
_EXPORT_INFLATION = 64


def load_exported(path: PathLike, max_bytes: int = MAX_CHECKPOINT_BYTES) -> nn.Module:
    """The model of a ``torch.export.save`` archive (``.pt2``): ``torch.export.load(path).module()`` wrapped in
    :class:`models.ExportedModel`, in eval mode.

    Trust the file as you would code: ``torch.export.load`` unpickles parts of the archive (with
    ``weights_only=False`` where its first attempt fails), which :func:`load_model`'s checkpoints never need.
    The archive's declared sizes are bounded first; any failure is a ValueError naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"exported program {path} does not exist")
    check_archive(path, max_bytes, _EXPORT_INFLATION, what="torch.export archive", writer="torch.export.save")
    try:
        program = torch.export.load(path)
    except Exception as e:
        raise ValueError(f"{path}: not a readable torch.export archive: {type(e).__name__}: {_torch_reason(e)}") from e
    return _registry().ExportedModel(program.module()).eval()
