import os

import pytest
import torch

import robust_ext
from robust_ext import ops

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                   reason="CUDA runtime tests need a GPU"))]


@pytest.fixture(params=["extension", "reference"])
def impl(request, monkeypatch):
    """Runs a test through the public ops with the CPU served by the extension, then by the reference."""
    if request.param == "reference":
        monkeypatch.setitem(ops._IMPL, "cpu", ops._REF)
    elif robust_ext.backend()["cpu"] != "extension":
        pytest.fail("robust_ext._C is not serving CPU: " + robust_ext.backend()["reason"])
    return request.param


def pytest_report_header(config):
    return [f"robust_ext backend: {robust_ext.backend()}", f"robust_ext build: {robust_ext.build_info()}",
            f"ROBUST_EXT_BACKEND={os.environ.get('ROBUST_EXT_BACKEND', '')!r} threads={torch.get_num_threads()}"]
