import os

import pytest
import torch

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
