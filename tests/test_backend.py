"""Backend choice: the extension by default, the reference when forced or when the extension cannot load
(with one warning), and an error when the extension is required but missing."""
import os
import subprocess
import sys

import pytest

PROBE = """
import json, sys, warnings
if {block}:
    sys.modules["robust_ext._C"] = None  # makes `from . import _C` raise ImportError
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import robust_ext
    import robust_ext.ops  # a second import must not warn again
import torch
x = torch.rand(2, 3); g = torch.randn(2, 3)
out = robust_ext.ops.linf_step(x, g, x, 0.1, 0.2)
ref = robust_ext.reference.linf_step(x, g, x, 0.1, 0.2, 0.0, 1.0)
print(json.dumps({{"backend": robust_ext.backend(), "build": robust_ext.build_info(),
                  "warnings": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)],
                  "equal": bool(torch.equal(out, ref))}}))
"""


def probe(block=False, backend=None):
    env = dict(os.environ)
    env.pop("ROBUST_EXT_BACKEND", None)
    if backend is not None:
        env["ROBUST_EXT_BACKEND"] = backend
    return subprocess.run([sys.executable, "-c", PROBE.format(block=block)], capture_output=True, text=True,
                          env=env, timeout=120)


def result(proc):
    import json
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_default_is_the_extension():
    r = result(probe())
    assert r["backend"]["cpu"] == "extension" and r["warnings"] == [] and r["equal"]
    assert "built against torch" in r["build"]


def test_forced_reference():
    r = result(probe(backend="reference"))
    assert r["backend"]["cpu"] == "reference" and r["backend"]["cuda"] == "reference"
    assert r["warnings"] == [] and r["equal"] and "ROBUST_EXT_BACKEND=reference" in r["build"]


def test_missing_extension_falls_back_with_one_warning():
    r = result(probe(block=True))
    assert r["backend"]["cpu"] == "reference" and r["equal"]
    assert len(r["warnings"]) == 1 and "compiled extension is not available" in r["warnings"][0]


@pytest.mark.parametrize("backend, message", [("extension", "ROBUST_EXT_BACKEND=extension but robust_ext._C"),
                                              ("fast", "ROBUST_EXT_BACKEND must be auto, extension or reference")])
def test_required_extension_or_bad_value_is_an_error(backend, message):
    proc = probe(block=True, backend=backend)
    assert proc.returncode != 0 and message in proc.stderr
