"""Data sets of your own for :func:`robust_ext.data.load_dataset`: ``"file:PATH"`` (arrays ``x`` and ``y`` in an
``.npz`` or ``.pt`` file) and ``"folder:DIR"`` (image files and ``labels.csv``). See ``robust_ext.data``.

No file is trusted: ``np.load(allow_pickle=False)``, ``torch.load(weights_only=True)``, each archive's and
array's declared size bounded before anything is read, labels.csv names only files inside its folder, and
the images' values, shapes and labels are checked.
"""
from __future__ import annotations

import csv
import io
import math
import os
import zipfile
import zlib
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import numpy as np
import torch

from .checkpoints import check_archive, read_torch_file

PathLike = Union[str, "os.PathLike[str]"]
_DEFLATE_MAX_RATIO = 1032  # deflate codes 258 repeated bytes in 2 bits at best: no stream inflates further

OWN_SOURCES = ("file", "folder")
# Bounds for files of your own: what an array may declare (8 GiB of uint8 or float32 is far past what an
# attack or a training run here holds), the labels' range, one image's pixels, the labels file's size.
MAX_ARRAY_BYTES = 1 << 33
MAX_CLASSES = 1 << 16
MAX_IMAGE_PIXELS = 1 << 26
_LABELS_CSV_MAX_BYTES = 64 << 20


def own_source(name: str) -> Optional[Tuple[str, Path]]:
    kind, sep, rest = name.partition(":") if isinstance(name, str) else ("", "", "")
    if not sep or kind not in OWN_SOURCES:
        return None
    if not rest:
        raise ValueError(f"{kind}: needs a path, e.g. {kind}:/data/{'test.npz' if kind == 'file' else 'images'}")
    return kind, Path(rest).expanduser()


def _as_array(value, key: str, path: Path) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        if value.is_complex() or value.dtype == torch.bool or value.is_sparse:
            raise ValueError(f"{path}: {key} is a {value.dtype} tensor{' (sparse)' if value.is_sparse else ''}")
        value = value.detach().cpu()
        return (value.float() if value.dtype == torch.bfloat16 else value).numpy()
    if isinstance(value, np.ndarray):
        return value
    raise ValueError(f"{path}: {key} is a {type(value).__name__}, expected an array")


def _npz_members(path: Path) -> Dict[str, int]:
    """The arrays of an .npz and the bytes each member holds, after checking each header's shape fits."""
    check_archive(path, MAX_ARRAY_BYTES, _DEFLATE_MAX_RATIO, what="numpy .npz file", writer="numpy.savez")
    members = {}
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if not info.filename.endswith(".npy"):
                continue
            key = info.filename[:-4]
            try:
                with archive.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                    shape, _, dtype = read(f)
            except (ValueError, OSError, EOFError, zlib.error, zipfile.BadZipFile) as e:
                raise ValueError(f"{path}: array {key!r} has no readable .npy header: {e}") from None
            if dtype.hasobject:
                raise ValueError(f"{path}: array {key!r} holds Python objects ({dtype}); only numbers are read")
            if math.prod(shape) * dtype.itemsize > info.file_size:
                raise ValueError(f"{path}: array {key!r} declares shape {shape} of {dtype}, more than the "
                                 f"{info.file_size:,} bytes it holds")
            members[key] = info.file_size
    return members


def _read_tensor_file(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    suffix = path.suffix.lower()
    if suffix == ".npz":
        members = _npz_members(path)
        missing = [k for k in ("x", "y") if k not in members]
        if missing:
            raise ValueError(f"{path}: no array {' or '.join(map(repr, missing))} (it holds {sorted(members)}); "
                             "expected x (images) and y (labels)")
        try:
            with np.load(path, allow_pickle=False) as arrays:
                return arrays["x"], arrays["y"]
        except (ValueError, OSError, EOFError, zlib.error, zipfile.BadZipFile) as e:
            raise ValueError(f"{path}: unreadable .npz: {e}") from None
    if suffix in (".pt", ".pth"):
        data = read_torch_file(path, max_bytes=MAX_ARRAY_BYTES, what="tensor file")
        if not isinstance(data, dict) or not {"x", "y"} <= data.keys():
            found = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"{path}: expected a dict with tensors 'x' (images) and 'y' (labels), found {found}")
        return _as_array(data["x"], "x", path), _as_array(data["y"], "y", path)
    raise ValueError(f"{path}: expected an .npz (numpy) or .pt (torch) file holding arrays x and y")


def _read_folder(directory: Path) -> Tuple[np.ndarray, np.ndarray]:
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise ModuleNotFoundError("folder: data is read with Pillow, which is not installed: pip install Pillow") from None
    labels_csv = directory / "labels.csv"
    if not labels_csv.is_file():
        raise FileNotFoundError(f"{labels_csv} does not exist: a folder: data set holds its images and a "
                                "labels.csv of filename,label rows")
    if labels_csv.stat().st_size > _LABELS_CSV_MAX_BYTES:
        raise ValueError(f"{labels_csv}: larger than {_LABELS_CSV_MAX_BYTES:,} bytes")
    try:
        rows = [r for r in csv.reader(io.StringIO(labels_csv.read_text(encoding="utf-8"))) if r]
    except (UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"{labels_csv}: unreadable CSV: {e}") from None
    first = 1
    if rows and len(rows[0]) == 2 and rows[0][1].strip().replace("_", "").isalpha() and rows[0][1].isascii():
        rows, first = rows[1:], 2  # a header such as filename,label (a word: a bad label such as -1 is no header)
    if not rows:
        raise ValueError(f"{labels_csv}: no filename,label rows")
    root, names, labels = directory.resolve(), [], []
    for i, row in enumerate(rows, first):
        label = row[1].strip() if len(row) == 2 else ""
        if not (label.isascii() and label.isdigit() and int(label) < MAX_CLASSES):
            raise ValueError(f"{labels_csv}: row {i} is {row!r}, expected filename,label (an integer label in "
                             f"0..{MAX_CLASSES - 1})")
        file = (directory / row[0].strip()).resolve()
        if not file.is_relative_to(root):
            raise ValueError(f"{labels_csv}: row {i} names {row[0]!r}, outside {directory}")
        names.append(file)
        labels.append(int(row[1]))
    images = None
    for i, file in enumerate(names):
        try:
            with Image.open(file) as im:
                if im.width * im.height > MAX_IMAGE_PIXELS:
                    raise ValueError(f"{im.width}x{im.height} is more than {MAX_IMAGE_PIXELS:,} pixels")
                mode = {"1": "L", "L": "L", "P": "RGB", "RGB": "RGB"}.get(im.mode)
                if mode is None:
                    raise ValueError(f"mode {im.mode}: convert it to grayscale (L) or RGB")
                pixels = np.asarray(im.convert(mode))
        except FileNotFoundError:
            raise FileNotFoundError(f"{file} (row {i + 1} of {labels_csv}) does not exist") from None
        except (OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as e:
            raise ValueError(f"{file}: not a readable image: {e}") from None
        pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
        if images is None:
            if len(names) * pixels.size > MAX_ARRAY_BYTES:
                raise ValueError(f"{labels_csv}: {len(names):,} images of {pixels.shape} take more than "
                                 f"{MAX_ARRAY_BYTES:,} bytes")
            images = np.empty((len(names), *pixels.shape), dtype=np.uint8)
        if pixels.shape != images.shape[1:]:
            raise ValueError(f"{file}: {pixels.shape[0]} x {pixels.shape[1]} x {pixels.shape[2]} (C x H x W), "
                             f"unlike the first image's {' x '.join(map(str, images.shape[1:]))}")
        images[i] = pixels
    return images, np.asarray(labels, dtype=np.int64)


def _check_own(images: np.ndarray, labels: np.ndarray, source: str, clip_min: float,
               clip_max: float) -> Tuple[np.ndarray, np.ndarray, Tuple[str, ...]]:
    """Images N x C x H x W, uint8 (to be scaled to [0, 1]) or float within [clip_min, clip_max]; labels
    integers 0..K-1; the class names "0".."K-1"."""
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4 or 0 in images.shape:
        raise ValueError(f"{source}: x must be images N x C x H x W (or N x H x W), got shape {images.shape}")
    if images.shape[3] in (1, 3) and images.shape[1] not in (1, 3):
        raise ValueError(f"{source}: x has shape {images.shape}, channels last (N x H x W x C): transpose it to "
                         "N x C x H x W")
    if labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(f"{source}: y must hold one label per image ({len(images)}), got shape {labels.shape}")
    if labels.dtype.kind not in "iu":
        raise ValueError(f"{source}: y must hold integer labels, got {labels.dtype}")
    if labels.min() < 0 or labels.max() >= MAX_CLASSES:
        raise ValueError(f"{source}: labels must be in 0..{MAX_CLASSES - 1}, found {labels.min()}..{labels.max()}")
    if images.dtype == np.uint8:
        low, high = images.min() / 255.0, images.max() / 255.0
    elif images.dtype.kind == "f":
        if not np.isfinite(images).all():
            raise ValueError(f"{source}: x holds NaN or infinite values")
        low, high = float(images.min()), float(images.max())
    else:
        raise ValueError(f"{source}: x must be uint8 (scaled to [0, 1]) or floating point, got {images.dtype}")
    if low < clip_min or high > clip_max:
        raise ValueError(f"{source}: x holds values in [{low:.6g}, {high:.6g}]{' (uint8 / 255)' if images.dtype == np.uint8 else ''}, "
                         f"outside the clip bounds [{clip_min:g}, {clip_max:g}]")
    return images, labels.astype(np.int64), tuple(str(i) for i in range(int(labels.max()) + 1))


def read_own(kind: str, path: Path, data_dir: Optional[PathLike], clip_min: float, clip_max: float):
    if data_dir is not None:
        raise ValueError(f"{kind}:{path} names its own path; data_dir does not apply")
    if kind == "file":
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist or is not a file")
        images, labels = _read_tensor_file(path)
    else:
        if not path.is_dir():
            raise FileNotFoundError(f"{path} does not exist or is not a directory")
        images, labels = _read_folder(path)
    return (*_check_own(images, labels, str(path), clip_min, clip_max), str(path))
