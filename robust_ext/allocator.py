"""Keep freed memory in the process: glibc's default malloc gives large freed blocks back to the kernel
and page-faults them in again on the next call.

ATen and oneDNN allocate big scratch buffers for every convolution (fp32 NCHW ones are tens of MB) and
free them at once. glibc serves blocks above its mmap threshold with ``mmap`` and returns them with
``munmap``, and trims the top of the heap, so the next forward or backward touches fresh pages: every 4 KiB
page a kernel trap and a zero fill. Measured here (small CNN, batch 128, one PGD step, 1 thread): fp32
98-131 ms per step with the default allocator, 11,000-22,000 page faults per step and a third to a half of
the time in the kernel, against 63 ms (and ~80 faults) after :func:`tune_allocator`; a bf16
channels_last step spends ~8 of its 35 ms in page faults. How much depends on the allocator's history
(glibc moves its mmap threshold as blocks are freed), which also makes untuned timings noisy.

:func:`tune_allocator` sets glibc's ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD`` (``mallopt``) so blocks
up to 1 GiB come from the heap and freed memory stays there for the next step. The cost: the process
keeps its peak heap instead of returning it. It changes the whole process, so the library never calls it
on its own; the ``robust-ext`` command line does (``--default-malloc`` to skip). Preloading jemalloc or
tcmalloc (``LD_PRELOAD``), or the environment variables ``MALLOC_MMAP_THRESHOLD_=1073741824
MALLOC_TRIM_THRESHOLD_=1073741824``, do the same from outside.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys
from typing import Dict, Optional

__all__ = ["tune_allocator"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_LIMIT = 1 << 30
_OLD_GLIBC_CAP = 32 << 20


def _mallopt():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
        return None
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt


def tune_allocator(limit_bytes: int = _LIMIT) -> Optional[Dict[str, int]]:
    """Serve blocks up to ``limit_bytes`` from the heap and keep up to ``limit_bytes`` of freed memory at its
    top (glibc ``mallopt``), for the rest of the process. Returns the settings applied, or ``None`` where
    there is no glibc ``mallopt`` (nothing changed)."""
    if isinstance(limit_bytes, bool) or not isinstance(limit_bytes, int) or not 0 < limit_bytes < 2**31:
        raise ValueError(f"limit_bytes must be an int in (0, 2**31), got {limit_bytes!r}")
    mallopt = _mallopt()
    if mallopt is None:
        return None
    # glibc before 2.26 caps the mmap threshold at 32 MiB (HEAP_MAX_SIZE / 2): take the cap there
    mmap = next((v for v in (limit_bytes, min(limit_bytes, _OLD_GLIBC_CAP)) if mallopt(_M_MMAP_THRESHOLD, v) == 1),
                None)
    if mmap is None or mallopt(_M_TRIM_THRESHOLD, limit_bytes) != 1:
        raise RuntimeError("glibc refused mallopt(M_MMAP_THRESHOLD / M_TRIM_THRESHOLD); nothing to tune")
    return {"M_MMAP_THRESHOLD": mmap, "M_TRIM_THRESHOLD": limit_bytes}
