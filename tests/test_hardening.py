"""Regression tests from adversarial testing: hostile data files and checkpoints, non-square images,
reproducible seeds, honest reports, and output paths the CLI refuses before doing any work."""
import gzip
import struct

import numpy as np
import pytest
import torch

from robust_ext._io import check_out_dir
from robust_ext.cli import main


def run(capsys, *argv):
    code = main(["-q", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err, *fragments):
    assert code == 2, err
    assert err.startswith("robust-ext: error:") and err.count("\n") == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err


def idx_bytes(array, code=0x08):
    return struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_idx_dir(root, images, labels, n_test=None):
    """train/t10k IDX files holding ``images`` (N x H x W uint8) and ``labels``; t10k the first n_test."""
    root.mkdir(parents=True, exist_ok=True)
    n_test = len(images) if n_test is None else n_test
    for prefix, (x, y) in (("train", (images, labels)), ("t10k", (images[:n_test], labels[:n_test]))):
        (root / f"{prefix}-images-idx3-ubyte").write_bytes(idx_bytes(x))
        (root / f"{prefix}-labels-idx1-ubyte").write_bytes(idx_bytes(y))
    return root


def random_idx_dir(root, n, hw, seed=0):
    rng = np.random.default_rng(seed)
    return write_idx_dir(root, rng.integers(0, 256, (n, *hw), dtype=np.uint8),
                         rng.integers(0, 10, n, dtype=np.uint8))


# ------------------------------------------------------------------------------------ 7: --out paths
def test_check_out_dir_creates_and_refuses(tmp_path):
    assert check_out_dir(tmp_path / "a" / "b").is_dir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="--out .*file: is an existing file"):
        check_out_dir(tmp_path / "file")
    with pytest.raises(ValueError, match=r"--out .*file is a file"):
        check_out_dir(tmp_path / "file" / "sub", flag="--out")
    with pytest.raises(ValueError, match="--plot-dir /proc/x: cannot create"):
        check_out_dir("/proc/x", flag="--plot-dir")


@pytest.mark.parametrize("command", [["train", "--data", "digits", "--epochs", "1"], ["demo", "--quick"],
                                     ["tradeoff", "--epochs", "1"]])
@pytest.mark.parametrize("where", ["file", "under_file", "proc"])
def test_out_is_checked_before_any_work(tmp_path, capsys, monkeypatch, command, where):
    import robust_ext.data
    import robust_ext.demo

    def no_work(*args, **kwargs):
        raise AssertionError("work started before --out was checked")

    monkeypatch.setattr(robust_ext.data, "load_dataset", no_work)
    monkeypatch.setattr(robust_ext.demo, "load_dataset", no_work)
    (tmp_path / "file").write_text("x")
    out = {"file": tmp_path / "file", "under_file": tmp_path / "file" / "run", "proc": "/proc/x"}[where]
    code, _, err = run(capsys, *command, "--out", str(out))
    one_line_error(code, err, f"--out {out}")
    assert (tmp_path / "file").read_text() == "x"


# ------------------------------------------------------------------------------ 3: seeded train
@pytest.mark.slow  # two CLI training runs on all of digits
def test_train_command_is_reproducible(tmp_path, capsys):
    states = []
    for run_dir in ("a", "b"):
        code, _, err = run(capsys, "train", "--data", "digits", "--method", "standard", "--epochs", "1",
                           "--batch-size", "256", "--seed", "3", "--out", str(tmp_path / run_dir))
        assert code == 0, err
        states.append(torch.load(tmp_path / run_dir / "last.pt", weights_only=True)["state_dict"])
    assert states[0].keys() == states[1].keys()
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k


# ------------------------------------------------------------------------------ 4: non-square images
def test_train_on_non_square_images(tmp_path, capsys):
    data_dir = random_idx_dir(tmp_path / "data", 16, (20, 40))
    code, _, err = run(capsys, "train", "--data", "mnist-idx", "--data-dir", str(data_dir), "--method", "standard",
                       "--epochs", "1", "--batch-size", "8", "--out", str(tmp_path / "run"))
    assert code == 0, err
    config = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["config"]
    assert config["input_size"] == [20, 40]


def test_train_refuses_images_the_model_cannot_take(tmp_path, capsys):
    data_dir = random_idx_dir(tmp_path / "data", 2, (1, 100000))
    code, _, err = run(capsys, "train", "--data", "mnist-idx", "--data-dir", str(data_dir), "--epochs", "1",
                       "--out", str(tmp_path / "run"))
    one_line_error(code, err, "--arch small_cnn", "1x100000")


def test_small_cnn_refuses_huge_inputs_before_allocating():
    from robust_ext.models import MAX_PARAMETERS, SmallCNN

    with pytest.raises(ValueError, match="parameters"):
        SmallCNN(input_size=(2100, 2100))  # a 705 M-parameter classifier
    assert MAX_PARAMETERS < 64 * 1050 * 1050 * 10
    assert SmallCNN(input_size=(20, 40)).classifier.in_features == 64 * 10 * 20


# ------------------------------------------------------------------------ 5: the demo names what it scored
def test_scored_checkpoint_names_the_file_holding_the_scored_weights(tmp_path):
    from robust_ext.demo import scored_checkpoint
    from robust_ext.models import SmallCNN, load_model, save_checkpoint
    from robust_ext.training import TrainResult

    torch.manual_seed(0)
    best, last, other = SmallCNN(), SmallCNN(), SmallCNN()
    result = TrainResult(history=[], epochs_completed=3, stopped_early=True, stop_reason="collapse",
                         last_path=save_checkpoint(tmp_path / "last.pt", last),
                         best_path=save_checkpoint(tmp_path / "best.pt", best))
    assert scored_checkpoint(last, result, tmp_path) == tmp_path / "last.pt"
    assert scored_checkpoint(best, result, tmp_path) == tmp_path / "best.pt"  # the guard restored the best epoch
    path = scored_checkpoint(other, result, tmp_path)
    assert path == tmp_path / "scored.pt"
    assert all(torch.equal(a, b) for a, b in zip(load_model(path).state_dict().values(), other.state_dict().values()))


# ------------------------------------------------------------------------ 1: decompression bombs
def peak_bytes(call, error=ValueError):
    """Run ``call`` (which must raise ``error``); return the message and the peak of traced allocations
    (numpy's and Python's buffers are traced)."""
    import tracemalloc

    tracemalloc.start()
    try:
        with pytest.raises(error) as info:
            call()
        return str(info.value), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def gzip_idx(path, dims, payload_bytes):
    """A gzip IDX file whose header declares ``dims`` (uint8) and whose stream holds payload_bytes zeros."""
    header = struct.pack(">BBBB", 0, 0, 0x08, len(dims)) + struct.pack(f">{len(dims)}I", *dims)
    with gzip.open(path, "wb", compresslevel=9) as f:
        f.write(header)
        for _ in range(payload_bytes >> 20):
            f.write(bytes(1 << 20))
    return path


def test_idx_bomb_inflates_no_further_than_its_header_declares(tmp_path):
    from robust_ext.data import read_idx

    path = gzip_idx(tmp_path / "bomb-idx3-ubyte.gz", (10, 1000, 1000), 64 << 20)  # declares 10 MB, holds 64
    assert path.stat().st_size < 100_000
    message, peak = peak_bytes(lambda: read_idx(path))
    assert "data beyond the 10000000 bytes" in message and str(path) in message
    assert peak < 16_000_000  # the declared 10 MB and a read's buffers; never the 64 MB the stream holds


def test_idx_header_declaring_more_than_the_file_can_inflate_to_is_refused_unread(tmp_path):
    from robust_ext.data import read_idx

    path = gzip_idx(tmp_path / "x-idx3-ubyte.gz", (60, 1000, 1000), 48 << 20)  # 48 MB in ~47 KB: 60 declared
    message, peak = peak_bytes(lambda: read_idx(path))
    assert peak < 1_000_000
    assert "truncated" in message and "can hold" in message


def test_idx_header_declaring_absurd_sizes_is_refused_unread(tmp_path):
    from robust_ext.data import MAX_IDX_BYTES, read_idx

    path = gzip_idx(tmp_path / "x-idx3-ubyte.gz", (10, 1000, 1000), 10 << 20)
    message, peak = peak_bytes(lambda: read_idx(path, max_bytes=1_000_000))
    assert "10,000,000 data bytes, more than the limit of 1,000,000" in message and peak < 1_000_000
    huge = gzip_idx(tmp_path / "huge-idx3-ubyte.gz", (60000, 1 << 14, 1 << 14), 0)
    message, peak = peak_bytes(lambda: read_idx(huge))
    assert f"limit of {MAX_IDX_BYTES:,}" in message and peak < 1_000_000


def test_mnist5k_csv_bomb_is_refused_after_a_bounded_read(tmp_path):
    from robust_ext.data import load_dataset

    row = (",".join(["0"] * 784) + ",1\n").encode()
    with gzip.open(tmp_path / "mnist_5k.csv.gz", "wb", compresslevel=9) as f:
        for _ in range((64 << 20) // len(row) + 1):  # 64 MB of rows, 7x what 5,000 digits take
            f.write(row)
    message, peak = peak_bytes(lambda: load_dataset("mnist5k", data_dir=tmp_path))
    assert "mnist_5k.csv.gz" in message and "inflates to more than" in message
    assert peak < 40_000_000


def test_cifar_pickle_cannot_allocate_arrays_it_does_not_hold(tmp_path):
    """numpy pickles an array as _reconstruct(ndarray, (0,), b'b') and then sets its state from the file's
    bytes; a crafted pickle calling _reconstruct (or ndarray) with a large shape allocates from nothing."""
    from robust_ext.data import load_dataset

    def pickled(call):
        return (b"\x80\x02}(U\x04data" + call + b"U\x06labels](eu.")

    shape = b"J\x00\xe1\xf5\x05\x85"  # (100_000_000,)
    reconstruct = b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + shape + b"U\x01b\x87R"
    direct = b"cnumpy\nndarray\n" + shape + b"\x85R"  # ndarray((100_000_000,))
    for name, call in (("reconstruct", reconstruct), ("ndarray", direct)):
        root = tmp_path / name
        root.mkdir()
        (root / "test_batch").write_bytes(pickled(call))
        message, peak = peak_bytes(lambda: load_dataset("cifar10", data_dir=root, split="test"))
        assert "test_batch" in message and peak < 10_000_000, message


# ------------------------------------------------------------------------ 6: labels, empty data
def cifar_dir(root, labels, n=None):
    import pickle

    root.mkdir(parents=True, exist_ok=True)
    n = len(labels) if n is None else n
    batch = {"data": np.zeros((n, 3072), dtype=np.uint8), "labels": labels}
    (root / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    return root


@pytest.mark.parametrize("labels, match", [
    ([1, -100], "0..9"), ([1, 10], "0..9"), ([1.0, 2.7], "ints"), ([True, False], "ints"), ([1, "2"], "ints"),
])
def test_cifar_labels_are_integers_in_range(tmp_path, labels, match):
    from robust_ext.data import load_dataset

    with pytest.raises(ValueError, match=f"test_batch.*{match}"):
        load_dataset("cifar10", data_dir=cifar_dir(tmp_path, labels), split="test")


def test_labels_out_of_range_and_empty_data_from_the_cli(tmp_path, capsys):
    from robust_ext.models import SmallCNN, save_checkpoint

    model = save_checkpoint(tmp_path / "cnn.pt", SmallCNN(in_channels=3, input_size=32))
    bad = cifar_dir(tmp_path / "bad", [3, -100])
    code, _, err = run(capsys, "attack", "--model", str(model), "--data", "cifar10", "--data-dir", str(bad),
                       "--out", str(tmp_path / "out"))
    one_line_error(code, err, "--data cifar10", "test_batch", "0..9")
    empty = write_idx_dir(tmp_path / "empty", np.zeros((0, 28, 28), np.uint8), np.zeros(0, np.uint8))
    for argv in (["attack", "--model", str(model)], ["evaluate", "--model", str(model)], ["train"]):
        code, _, err = run(capsys, *argv, "--data", "mnist-idx", "--data-dir", str(empty), "--out", str(tmp_path / "o"))
        one_line_error(code, err, "--data mnist-idx", "no samples")


def test_empty_split_is_one_clear_error(tmp_path):
    from robust_ext.data import load_dataset

    empty = write_idx_dir(tmp_path, np.zeros((0, 5, 5), np.uint8), np.zeros(0, np.uint8))
    with pytest.raises(ValueError, match=f"{tmp_path}: the train split holds no samples"):
        load_dataset("mnist-idx", data_dir=empty)
    with pytest.raises(ValueError, match="the test split holds no samples"):
        load_dataset("digits", split="test", test_fraction=0.001)


# ------------------------------------------------------------------------ 2: hostile checkpoints
def deflated(src, dst):
    """The same checkpoint with every zip entry deflate-compressed (torch.load reads it)."""
    import zipfile

    with zipfile.ZipFile(src) as zi, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zo:
        for info in zi.infolist():
            zo.writestr(info.filename, zi.read(info.filename))
    return dst


def test_deflated_checkpoint_is_refused_before_torch_load(tmp_path, monkeypatch):
    from robust_ext.models import SmallCNN, load_model, save_checkpoint

    plain = save_checkpoint(tmp_path / "plain.pt", SmallCNN(), padding=torch.zeros(64 << 20, dtype=torch.uint8))
    path = deflated(plain, tmp_path / "bomb.pt")
    assert path.stat().st_size < 1_000_000

    def no_load(*args, **kwargs):
        raise AssertionError("torch.load was called on an archive declaring 64 MB in a few hundred KB")

    monkeypatch.setattr(torch, "load", no_load)
    with pytest.raises(ValueError, match="bomb.pt.*declare"):
        load_model(path)


def test_recompressed_checkpoint_within_bounds_still_loads(tmp_path):
    from robust_ext.models import SmallCNN, load_model, save_checkpoint

    torch.manual_seed(0)
    model = SmallCNN()
    path = deflated(save_checkpoint(tmp_path / "plain.pt", model), tmp_path / "deflated.pt")
    loaded = load_model(path)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def tampered(tmp_path, model, **config):
    from robust_ext.models import save_checkpoint

    path = save_checkpoint(tmp_path / "t.pt", model)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["config"].update(config)
    torch.save(checkpoint, path)
    return path


def test_tiny_checkpoint_asking_for_a_deep_resnet_is_refused_before_building(tmp_path):
    from robust_ext.models import PreActResNet, load_model

    path = tampered(tmp_path, PreActResNet(width=4), blocks=[20000, 1])
    message, peak = peak_bytes(lambda: load_model(path), RuntimeError)
    assert peak < 20_000_000  # not 20,000 blocks of modules
    assert "t.pt" in message and "does not match" in message and len(message) < 1000, message[:1000]


@pytest.mark.parametrize("config, match", [
    ({"input_size": 10 ** 12}, "input_size"), ({"num_classes": -(2 ** 40)}, "num_classes"),
    ({"input_size": [28] * 5000}, "input_size"), ({"padding": float("nan")}, "padding"),
])
def test_checkpoint_config_values_are_bounded(tmp_path, config, match):
    from robust_ext.models import SmallCNN, load_model

    with pytest.raises(ValueError, match=f"t.pt.*config.*{match}"):
        load_model(tampered(tmp_path, SmallCNN(), **config))


def test_checkpoint_config_and_state_dict_shapes_are_compared_before_building(tmp_path, monkeypatch):
    """A config whose model would be large is refused on its declared shapes: nothing is allocated."""
    from robust_ext.models import SmallCNN, load_model

    path = tampered(tmp_path, SmallCNN(), input_size=[1000, 1000])  # a 160 M-parameter classifier
    allocated = []
    empty = torch.empty

    def spy(*args, **kwargs):
        t = empty(*args, **kwargs)
        if t.device.type != "meta" and t.numel() > 10 ** 6:
            allocated.append(t.shape)
        return t

    monkeypatch.setattr(torch, "empty", spy)
    with pytest.raises(RuntimeError, match="t.pt.*does not match"):
        load_model(path)
    assert not allocated


def test_train_sizes_the_classifier_for_the_labels_of_both_splits(tmp_path, capsys):
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    root.mkdir()
    for prefix, top in (("train", 11), ("t10k", 12)):  # mnist-idx counts classes up to each split's largest label
        labels = np.append(rng.integers(0, 10, 7), top).astype(np.uint8)
        (root / f"{prefix}-images-idx3-ubyte").write_bytes(idx_bytes(rng.integers(0, 256, (8, 6, 6), dtype=np.uint8)))
        (root / f"{prefix}-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
    code, _, err = run(capsys, "train", "--data", "mnist-idx", "--data-dir", str(root), "--method", "standard",
                       "--epochs", "1", "--batch-size", "8", "--out", str(tmp_path / "run"))
    assert code == 0, err
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["config"]["num_classes"] == 13


def test_hostile_files_are_one_line_errors_from_the_cli(tmp_path, capsys):
    from robust_ext.models import PreActResNet, SmallCNN, save_checkpoint

    bomb = deflated(save_checkpoint(tmp_path / "plain.pt", SmallCNN(), padding=torch.zeros(64 << 20, dtype=torch.uint8)),
                    tmp_path / "bomb.pt")
    deep = tampered(tmp_path, PreActResNet(width=4), blocks=[20000, 1])
    for model, fragment in ((bomb, "declare"), (deep, "does not match")):
        code, _, err = run(capsys, "attack", "--model", str(model), "-n", "2", "--out", str(tmp_path / "out"))
        one_line_error(code, err, f"--model {model}", fragment)
    data = tmp_path / "idx"
    random_idx_dir(data, 4, (28, 28))
    gzip_idx(data / "t10k-images-idx3-ubyte.gz", (10, 1000, 1000), 64 << 20)
    (data / "t10k-images-idx3-ubyte").unlink()
    code, _, err = run(capsys, "attack", "--model", str(tmp_path / "plain.pt"), "--data", "mnist-idx", "--data-dir",
                       str(data), "--out", str(tmp_path / "out"))
    one_line_error(code, err, "--data mnist-idx", "t10k-images-idx3-ubyte.gz", "data beyond")
