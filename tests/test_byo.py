"""Bring your own model and data: file:/folder: data sets (never trusted), a model from an importable factory
(+ --weights), a torch.export archive, --mean/--std and --clip-min/--clip-max, through the library and the CLI."""
import io
import json
import sys
import zipfile

import numpy as np
import pytest
import torch
from torch import nn

from robust_ext import data, models
from robust_ext.checkpoints import load_exported, load_weights
from robust_ext.cli import main
from robust_ext.models import Normalized, from_factory, import_factory, load_model, save_checkpoint

FACTORY = '''
import torch
from torch import nn

def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))

def broken():
    raise RuntimeError("boom")

not_a_model = lambda: 3
'''


def _images(n=24, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3, 8, 8), dtype=np.uint8), (np.arange(n) % 4).astype(np.int64)


@pytest.fixture
def factory(tmp_path, monkeypatch):
    """``byo_factory:build`` importable from the current directory only (as a user's own module)."""
    (tmp_path / "byo_factory.py").write_text(FACTORY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "byo_factory", raising=False)
    yield "byo_factory"
    sys.modules.pop("byo_factory", None)


@pytest.fixture
def npz(tmp_path):
    x, y = _images()
    np.savez(tmp_path / "d.npz", x=x, y=y)
    return tmp_path / "d.npz"


def run(capsys, *argv):
    code = main(["-q", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------------------------------------ data
def test_file_and_folder_data_read_the_same_images(tmp_path):
    from PIL import Image

    x, y = _images()
    np.savez_compressed(tmp_path / "u8.npz", x=x, y=y)
    np.savez(tmp_path / "f32.npz", x=x.astype(np.float32) / 255, y=y.astype(np.int32))
    torch.save({"x": torch.from_numpy(x), "y": torch.from_numpy(y)}, tmp_path / "d.pt")
    (tmp_path / "img").mkdir()
    for i in range(len(x)):
        Image.fromarray(x[i].transpose(1, 2, 0)).save(tmp_path / "img" / f"{i}.png")
    (tmp_path / "img" / "labels.csv").write_text("filename,label\n" + "".join(f"{i}.png,{y[i]}\n" for i in range(len(x))))
    expected = torch.from_numpy(x).float() / 255
    for name in ("file:" + str(tmp_path / "u8.npz"), f"file:{tmp_path}/f32.npz", f"file:{tmp_path}/d.pt",
                 f"folder:{tmp_path}/img"):
        ds = data.load_dataset(name, split="all")
        assert torch.equal(ds.images, expected) and torch.equal(ds.labels, torch.from_numpy(y)), name
        assert ds.num_classes == 4 and ds.labels.dtype == torch.int64 and ds.images.dtype == torch.float32
        train, test = data.load_dataset(name, split="train"), data.load_dataset(name, split="test")
        assert len(train) + len(test) == len(x) and len(test) == 4  # 20% of each class's 6
        assert torch.equal(torch.cat([train.images, test.images]).sort(0).values, expected.sort(0).values)


def test_float_images_outside_the_clip_bounds_are_refused_and_inside_kept(tmp_path):
    x, y = _images()
    np.savez(tmp_path / "wide.npz", x=x.astype(np.float32) / 255 * 2 - 1, y=y)
    with pytest.raises(ValueError, match=r"outside the clip bounds \[0, 1\]"):
        data.load_dataset(f"file:{tmp_path}/wide.npz", split="all")
    ds = data.load_dataset(f"file:{tmp_path}/wide.npz", split="all", clip_min=-1, clip_max=1)
    assert ds.images.min() < 0


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return f"file:{path}"


@pytest.mark.parametrize("make, message", [
    (lambda p: _npz(p, x=np.zeros((4, 3, 8, 8), np.uint8)), "no array 'y'"),
    (lambda p: _npz(p, x=np.zeros((4, 8, 8, 3), np.uint8), y=np.zeros(4, np.int64)), "channels last"),
    (lambda p: _npz(p, x=np.full((4, 1, 8, 8), np.nan, np.float32), y=np.zeros(4, np.int64)), "NaN"),
    (lambda p: _npz(p, x=np.zeros((4, 1, 8, 8), np.int32), y=np.zeros(4, np.int64)), "uint8 .*or floating"),
    (lambda p: _npz(p, x=np.zeros((4, 1, 8, 8), np.uint8), y=np.zeros(4, np.float32)), "integer labels"),
    (lambda p: _npz(p, x=np.zeros((4, 1, 8, 8), np.uint8), y=np.array([0, 1, -1, 2])), "labels must be in"),
    (lambda p: _npz(p, x=np.zeros((4, 1, 8, 8), np.uint8), y=np.array([0, 1, 2, 1 << 40])), "labels must be in"),
    (lambda p: _npz(p, x=np.zeros((4, 1, 8, 8), np.uint8), y=np.zeros(3, np.int64)), "one label per image"),
    (lambda p: _npz(p, x=np.array([None] * 4, dtype=object), y=np.zeros(4, np.int64)), "Python objects"),
])
def test_bad_arrays_are_one_clear_error(tmp_path, make, message):
    with pytest.raises(ValueError, match=message):
        data.load_dataset(make(tmp_path / "bad.npz"), split="all")


def test_npz_declaring_more_than_it_holds_is_refused_before_allocating(tmp_path):
    """A tiny member whose .npy header declares 64 GB: refused on the header, nothing allocated."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False,
                                                  "shape": (1 << 24, 1, 32, 32)})
    with zipfile.ZipFile(tmp_path / "bomb.npz", "w") as z:
        z.writestr("x.npy", header.getvalue() + b"\0" * 64)
        z.writestr("y.npy", header.getvalue())
    with pytest.raises(ValueError, match="declares shape .* more than the 1.. bytes it holds"):
        data.load_dataset(f"file:{tmp_path}/bomb.npz", split="all")


def test_pt_data_holding_code_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": torch.zeros(2, 1, 4, 4), "y": torch.zeros(2, dtype=torch.long), "p": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="weights_only"):
        data.load_dataset(f"file:{tmp_path}/evil.pt", split="all")


def test_folder_errors(tmp_path, monkeypatch):
    from PIL import Image

    folder = tmp_path / "img"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    Image.new("RGB", (9, 8)).save(folder / "b.png")
    name = f"folder:{folder}"
    with pytest.raises(FileNotFoundError, match="labels.csv"):
        data.load_dataset(name)
    for rows, message in (("a.png,0\nb.png,1\n", "unlike the first image's"), ("../secret.png,0\n", "outside"),
                          ("filename,label\na.png,cat\n", r"row 2 is .*expected filename,label \(an integer"), ("c.png,0\n", "does not exist"),
                          # a bad label in the first row is an error, not a header to skip
                          ("a.png,-1\nb.png,2\n", "row 1 is"), ("a.png,3.0\nb.png,2\n", "row 1 is"),
                          ("a.png,\u00b2\n", "row 1 is"), ("a.png,99999999999999999999999\n", r"row 1 .*0\.\.65535"),
                          ("a.png,0\nlabels.csv,1\n", "not a readable image")):
        (folder / "labels.csv").write_text(rows)
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            data.load_dataset(name, split="all")
    (folder / "labels.csv").write_text("a.png,0\n")
    monkeypatch.setitem(sys.modules, "PIL", None)  # Pillow not installed
    with pytest.raises(ModuleNotFoundError, match="pip install Pillow"):
        data.load_dataset(name, split="all")


def test_own_data_takes_no_data_dir(npz):
    with pytest.raises(ValueError, match="data_dir does not apply"):
        data.load_dataset(f"file:{npz}", data_dir=str(npz.parent))


# ------------------------------------------------------------------------------------------------ models
def test_factory_spec_errors(factory):
    sys.path.insert(0, ".")
    try:
        for spec, message in (("byo_factory", "package.module:function"), ("byo_factory:nope", "no attribute"),
                              ("no_such_module_xyz:build", "cannot import"), ("byo_factory:broken", "RuntimeError: boom"),
                              ("byo_factory:not_a_model", "returned a int")):
            with pytest.raises(ValueError, match=message):
                from_factory(spec)
        assert callable(import_factory("byo_factory:build"))
    finally:
        sys.path.remove(".")


def test_factory_checkpoint_is_refused_by_load_model_and_loaded_with_load_weights(factory, tmp_path):
    sys.path.insert(0, ".")
    try:
        model = Normalized(from_factory("byo_factory:build"), [0.5, 0.4, 0.3], [0.2, 0.2, 0.2])
    finally:
        sys.path.remove(".")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1)
    save_checkpoint(tmp_path / "own.pt", model)
    with pytest.raises(ValueError, match="built by the factory 'byo_factory:build'.*--model-factory byo_factory:build"):
        load_model(tmp_path / "own.pt")
    again = Normalized(import_factory("byo_factory:build")(), [0.5, 0.4, 0.3], [0.2, 0.2, 0.2])
    load_weights(again, tmp_path / "own.pt")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    torch.save(model.model.state_dict(), tmp_path / "bare.pt")  # the network alone, into a normalized model
    third = Normalized(import_factory("byo_factory:build")(), [0.5, 0.4, 0.3], [0.2, 0.2, 0.2])
    load_weights(third, tmp_path / "bare.pt")
    assert torch.equal(third.model[0].weight, model.model[0].weight)
    with pytest.raises(RuntimeError, match="trained with mean"):
        load_weights(Normalized(import_factory("byo_factory:build")(), [0.1], [0.2]), tmp_path / "own.pt")
    with pytest.raises(RuntimeError, match="hold a normalization"):
        load_weights(import_factory("byo_factory:build")(), tmp_path / "own.pt")
    with pytest.raises(RuntimeError, match=r"do not fit the model: unexpected keys: 3.weight.*shapes \(checkpoint vs model\)"):
        load_weights(nn.Sequential(nn.Linear(2, 2)), tmp_path / "bare.pt")


def test_exported_program_runs_attacks_in_eval_mode(tmp_path):
    from robust_ext.attacks import pgd

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 4)).eval()
    program = torch.export.export(net, (torch.rand(2, 3, 8, 8),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, tmp_path / "net.pt2")
    model = load_exported(tmp_path / "net.pt2")
    assert isinstance(model, models.ExportedModel) and not model.training
    x, y = torch.rand(5, 3, 8, 8), torch.arange(5) % 4
    assert torch.allclose(model(x), net(x), atol=1e-6)
    x_adv = pgd(model, x, y, eps=0.1, alpha=0.05, steps=2)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6 and not model.training
    (tmp_path / "junk.pt2").write_bytes(b"PK not a zip")
    with pytest.raises(ValueError, match="junk.pt2: not a readable torch.export archive"):
        load_exported(tmp_path / "junk.pt2")


# ------------------------------------------------------------------------------------------------ CLI
def import_factory_from(directory):
    sys.path.insert(0, str(directory))
    try:
        return import_factory("byo_factory:build")()
    finally:
        sys.path.remove(str(directory))


def test_cli_attack_and_evaluate_a_factory_model_on_own_data(factory, npz, tmp_path, capsys):
    net = import_factory_from(tmp_path)
    torch.save(net.state_dict(), tmp_path / "w.pt")
    code, out, err = run(capsys, "attack", "--model-factory", "byo_factory:build", "--weights", tmp_path / "w.pt",
                         "--data", f"file:{npz}", "--eps", "0.5", "--steps", "3", "--out", tmp_path / "a")
    assert code == 0, err
    report = json.loads(out)
    assert report["model"] == "byo_factory:build" and report["n"] == 24 and report["split"] == "all"
    code, _, err = run(capsys, "evaluate", "--model-factory", "byo_factory:build", "--weights", tmp_path / "w.pt",
                       "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25", "--data", f"file:{npz}", "--eps", "0.1",
                       "--steps", "2", "--no-min-eps", "--clip-min", "-1", "--clip-max", "2", "--out", tmp_path / "e")
    assert code == 0, err
    config = json.loads((tmp_path / "e" / "report.json").read_text())["config"]
    assert (config["clip_min"], config["clip_max"]) == (-1.0, 2.0)


def test_cli_clip_bounds_reach_the_attack(tmp_path, capsys):
    """The same export and data under [0, 1] and under [-1, 2]: only the wider bounds let x_adv leave [0, 1]."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4)).eval()
    torch.export.save(torch.export.export(net, (torch.rand(2, 3, 8, 8),),
                                          dynamic_shapes=({0: torch.export.Dim("batch")},)), tmp_path / "net.pt2")
    x, y = _images()
    np.savez(tmp_path / "d.npz", x=np.where(x > 127, 255, 0).astype(np.uint8), y=y)  # pixels at the bounds
    ranges = {}
    for lo, hi in ((0, 1), (-1, 2)):
        out = tmp_path / f"out{lo}"
        code, _, err = run(capsys, "attack", "--model", tmp_path / "net.pt2", "--data", f"file:{tmp_path}/d.npz",
                           "--attack", "fgsm", "--eps", "0.3", "--clip-min", lo, "--clip-max", hi, "--out", out)
        assert code == 0, err
        x_adv = torch.load(out / "adversarial.pt", weights_only=True)["x_adv"]
        ranges[lo] = (x_adv.min().item(), x_adv.max().item())
    assert ranges[0][0] >= 0 and ranges[0][1] <= 1
    assert ranges[-1][0] < 0 and ranges[-1][1] > 1


def test_cli_trains_a_factory_model_and_its_checkpoint_loads_back(factory, npz, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--model-factory", "byo_factory:build", "--mean", "0.5", "--std", "0.25", "--data",
            f"file:{npz}", "--method", "standard", "--batch-size", "8", "--out", out]
    code, _, err = run(capsys, *argv, "--epochs", "1")
    assert code == 0, err
    checkpoint = torch.load(out / "last.pt", weights_only=True)
    assert checkpoint["arch"] == "normalized"
    assert checkpoint["config"]["model"] == {"arch": "factory", "config": {"factory": "byo_factory:build"}}
    code, _, err = run(capsys, "evaluate", "--model", out / "last.pt", "--data", f"file:{npz}", "--out", tmp_path / "e")
    assert code == 2 and "--model-factory byo_factory:build --weights FILE" in err and err.count("\n") == 1
    code, _, err = run(capsys, "evaluate", "--model-factory", "byo_factory:build", "--weights", out / "last.pt",
                       "--mean", "0.5", "--std", "0.25", "--data", f"file:{npz}", "--eps", "0.1", "--steps", "2",
                       "--no-min-eps", "--out", tmp_path / "e")
    assert code == 0, err
    code, _, err = run(capsys, *argv, "--epochs", "2", "--resume")
    assert code == 0, err
    assert torch.load(out / "last.pt", weights_only=True)["training"]["epoch"] == 2


@pytest.mark.parametrize("argv, message", [
    (["attack", "--data", "file:{npz}"], "give --model FILE"),
    (["attack", "--model", "{pt2}", "--model-factory", "byo_factory:build", "--data", "file:{npz}"], "exclude each other"),
    (["attack", "--model", "{pt2}", "--weights", "{pt2}", "--data", "file:{npz}"], "--weights goes with --model-factory"),
    (["attack", "--model-factory", "byo_factory:nope", "--data", "file:{npz}"], "--model-factory byo_factory:nope: "),
    (["attack", "--model-factory", "byo_factory:build", "--weights", "{tmp}/none.pt", "--data", "file:{npz}"],
     "--weights {tmp}/none.pt: no such file"),
    (["attack", "--model-factory", "byo_factory:build", "--weights", "{pt2}", "--data", "file:{npz}"], "--weights {pt2}: "),
    (["evaluate", "--model", "{pt2}", "--mean", "0.5", "--data", "file:{npz}"], "--mean and --std go together"),
    (["evaluate", "--model", "{pt2}", "--mean", "0.5,0.5", "--std", "1,1", "--data", "file:{npz}"],
     "--mean/--std: 2 values, but the images have 3 channel(s)"),
    (["evaluate", "--model", "{pt2}", "--mean", "0.5", "--std", "0", "--data", "file:{npz}"], "--mean/--std: std must be positive"),
    (["attack", "--model", "{pt2}", "--std", "x", "--data", "file:{npz}"], "argument --std: expected comma-separated"),
    (["attack", "--model", "{pt2}", "--clip-min", "1", "--clip-max", "0", "--data", "file:{npz}"], "--clip-min must be below"),
    (["attack", "--model", "{pt2}", "--clip-min", "0.5", "--data", "file:{npz}"], "--data file:{npz}: {npz}: x holds values"),
    (["attack", "--model", "{pt2}", "--data", "file:{tmp}/none.npz"], "--data file:{tmp}/none.npz: "),
    (["attack", "--model", "{pt2}", "--data", "folder:{tmp}"], "labels.csv"),
    (["attack", "--model", "{pt2}", "--data", "file:{npz}", "--data-dir", "{tmp}"], "data_dir does not apply"),
    (["attack", "--model", "{tmp}/junk.pt2", "--data", "file:{npz}"], "--model {tmp}/junk.pt2: "),
    (["attack", "--model-factory", "byo_factory:build", "--data", "mnist5k", "-n", "4"], "does not accept this data set's images"),
    (["train", "--model-factory", "byo_factory:build", "--arch", "small_cnn", "--data", "file:{npz}"], "exclude each other"),
    (["train", "--weights", "{pt2}", "--data", "file:{npz}"], "--weights goes with --model-factory"),
    (["train", "--model-factory", "byo_factory:build", "--data", "digits"], "does not accept this data set's images"),
])
def test_cli_errors_are_one_line(factory, npz, tmp_path, capsys, argv, message):
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4)).eval()
    pt2 = tmp_path / "net.pt2"
    torch.export.save(torch.export.export(net, (torch.rand(2, 3, 8, 8),),
                                          dynamic_shapes=({0: torch.export.Dim("batch")},)), pt2)
    (tmp_path / "junk.pt2").write_bytes(b"junk")
    fill = dict(npz=npz, pt2=pt2, tmp=tmp_path)
    code, _, err = run(capsys, *[a.format(**fill) for a in argv], "--out", tmp_path / "out")
    assert code == 2, err
    assert err.startswith("robust-ext: error:") and message.format(**fill) in err and "Traceback" not in err
    assert err.count("\n") == 1
