"""Output files and directories.

Atomic file writes: a unique temporary file beside the target, flushed and fsync'ed, then renamed over it,
so a reader (or a crash) sees the old file or the new one, never a torn one. Output directories: checked
before any work (:func:`check_out_dir`) and held by one writer at a time (:func:`run_dir_lock`).
"""
from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
import threading
from pathlib import Path
from typing import IO, Any, Callable, Dict, Iterator, List, Union

from ._json import dumps

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
    text = dumps(value, indent) + "\n"
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


LOCK_NAME = ".lock"
# The lock files this process holds: realpath -> [holding thread, fd, depth]. flock excludes other open
# files of the same lock file, so the holding thread re-enters through this table (the CLI takes --out,
# then training.train takes the same directory) while other threads are refused like other processes.
_held: Dict[str, List[int]] = {}
_held_guard = threading.Lock()


def _holder(fd: int) -> str:
    try:
        pid = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        pid = ""
    return f"pid {pid}" if pid.isdigit() else "pid unknown"


@contextlib.contextmanager
def run_dir_lock(path: PathLike, flag: str = "--out") -> Iterator[Path]:
    """Hold ``path`` as a run directory: one writer at a time.

    Checks ``path`` as :func:`check_out_dir` does (creating it), then takes an exclusive, non-blocking
    ``fcntl.flock`` on ``path/.lock`` and writes this process's id into it. Another process, or another
    thread of this one, holding the directory makes it raise ValueError: "``flag`` ``path`` is in use by
    another robust-ext process (pid N)". The kernel drops a flock when its process dies, so a crashed run
    leaves no stale lock; the file stays (removing it would let two writers lock two different files).
    Re-entrant in the thread that holds it. Yields the directory.
    """
    import fcntl

    path = check_out_dir(path, flag)
    lock = path / LOCK_NAME
    key, me = os.path.realpath(lock), threading.get_ident()
    with _held_guard:
        held = _held.get(key)
        if held is not None and held[0] == me:
            held[2] += 1
    if held is not None and held[0] != me:
        raise ValueError(f"{flag} {path} is in use by another robust-ext process (pid {os.getpid()})")
    if held is None:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _holder(fd)
            os.close(fd)
            if isinstance(e, BlockingIOError):
                raise ValueError(f"{flag} {path} is in use by another robust-ext process ({holder})") from None
            raise ValueError(f"{flag} {path}: cannot lock {lock}: {e.strerror or type(e).__name__}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        with _held_guard:
            _held[key] = [me, fd, 1]
    try:
        yield path
    finally:
        with _held_guard:
            entry = _held[key]
            entry[2] -= 1
            if entry[2] == 0:
                del _held[key]
        if entry[2] == 0:
            os.close(entry[1])  # releases the flock
