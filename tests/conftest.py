import os

import pytest
import torch
from torch import nn

import robust_ext
from robust_ext import ops

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                   reason="CUDA runtime tests need a GPU"))]


# `ROBUST_EXT_BACKEND=reference python -m pytest` runs the suite on the pure-PyTorch fallback (as `.ci/run`
# does): tests of the compiled extension itself (marked `needs_extension`) are skipped then, and only then;
# in a normal run they fail loudly if the extension is not serving CPU.
FORCED_REFERENCE = os.environ.get("ROBUST_EXT_BACKEND", "").strip().lower() == "reference"
_FALLBACK_RUN = "ROBUST_EXT_BACKEND=reference: this run tests the fallback, not the extension"


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_extension: tests the compiled extension itself (skipped only "
                                       "under ROBUST_EXT_BACKEND=reference)")
    # pyproject.toml's addopts (-m 'not slow') leaves these out of the default run; `.ci/run` runs them
    # after it with `python -m pytest -q -m slow` (docs/testing.md).
    config.addinivalue_line("markers", "slow: left out of the default run (heavy duplicates, > 2**31-element "
                                       "tensors, long training/subprocess tests); run with -m slow")


def pytest_collection_modifyitems(config, items):
    if FORCED_REFERENCE:
        for item in items:
            if item.get_closest_marker("needs_extension"):
                item.add_marker(pytest.mark.skip(reason=_FALLBACK_RUN))


@pytest.fixture(params=["extension", "reference"])
def impl(request, monkeypatch):
    """Runs a test through the public ops with the CPU served by the extension, then by the reference."""
    if request.param == "reference":
        monkeypatch.setitem(ops._IMPL, "cpu", ops._REF)
    elif FORCED_REFERENCE:
        pytest.skip(_FALLBACK_RUN)
    elif robust_ext.backend()["cpu"] != "extension":
        pytest.fail("robust_ext._C is not serving CPU: " + robust_ext.backend()["reason"])
    return request.param


def pytest_report_header(config):
    return [f"robust_ext backend: {robust_ext.backend()}", f"robust_ext build: {robust_ext.build_info()}",
            f"ROBUST_EXT_BACKEND={os.environ.get('ROBUST_EXT_BACKEND', '')!r} threads={torch.get_num_threads()}"]


# A small trained model shared by the attack and threat-model tests.
def digits_cnn():
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.ReLU(), nn.Flatten(),
                         nn.Dropout(0.1), nn.Linear(32 * 4 * 4, 10))


@pytest.fixture(scope="module")
def one_thread():
    """8x8 images are too small to gain from threads; on a busy machine two OpenMP threads per process
    made every step ~20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits(one_thread):
    """(model in eval mode, 250 test images [N, 1, 8, 8] in [0, 1], their labels).

    250, not 256: with a power-of-two batch torchattacks' mean loss scales the gradient exactly, which
    would make the bit-exact comparisons below too easy."""
    datasets = pytest.importorskip("sklearn.datasets")
    d = datasets.load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16
    y = torch.tensor(d.target, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    train, test = perm[:1297], perm[1297:1297 + 250]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = digits_cnn()
        opt = torch.optim.Adam(model.parameters(), 1e-2)
        for _ in range(60):
            idx = train[torch.randint(0, len(train), (128,), generator=g)]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    for p in model.parameters():
        p.grad = None
    return model, x[test], y[test]
