"""Atomic file writes: a unique temporary file beside the target, flushed and fsync'ed, then renamed over
it, so a reader (or a crash) sees the old file or the new one, never a torn one."""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Union

from ._json import encode

PathLike = Union[str, "os.PathLike[str]"]


def atomic_write(path: PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
    """Calls ``write(f)`` on a binary file that replaces ``path`` only once it is complete."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, unlike mkstemp's 0600
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # persist the rename; not every platform can open a directory
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return path


def write_json(path: PathLike, value: Any, indent: int = 2) -> Path:
    """``value`` as strict JSON (non-finite floats as "inf"/"-inf"/"nan", see ``_json``), atomically."""
    text = json.dumps(encode(value), indent=indent, allow_nan=False) + "\n"
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def check_out_dir(path: PathLike, flag: str = "--out") -> Path:
    """Make sure ``path`` is, or can be made, a writable directory, before a command does any work.

    Creates it (and its parents) if missing and writes and removes a probe file in it. Raises ValueError
    naming ``flag`` when ``path`` is an existing file, lies under a file, or cannot be created or written.
    """
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path}: is an existing file, expected a directory (existing or to create)")
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"{flag} {path}: {parent} is a file, so no directory can be created under it")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot create or write to this directory: "
                         f"{e.strerror or type(e).__name__}") from None
    return path
