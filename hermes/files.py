"""Atomic file writes and checksums shared by checkpoints, caches and outputs."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO


def _umask() -> int:
    """The process' file-creation mask (read without changing it where /proc allows)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """Create ``path`` through ``write(file)`` on a temporary file in the same folder, fsync it
    and ``os.replace`` it into place: readers see the old file or the complete new one, and a
    failure leaves no partial file behind. The file gets the permissions ``open()`` would give
    it (0666 less the umask), not the temporary file's private 0600. An ``OSError`` (disk
    full, permissions...) names ``path``, not the temporary file."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # a short prefix: a name near the file system's limit still has a temporary name
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:64]}.", suffix=".tmp",
                                   dir=path.parent)
        if hasattr(os, "fchmod"):
            try:
                os.fchmod(fd, 0o666 & ~_umask())
            except OSError:  # file systems without POSIX modes
                pass
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno is not None:
            raise OSError(exc.errno, f"{exc.strerror or exc} (writing {path})") from exc
        raise


class FolderBusyError(RuntimeError):
    """Another process is writing into the folder (it holds the folder's lock)."""


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str = "folder",
                waiting: Callable[[str], object] | None = None) -> Iterator[None]:
    """Hold ``folder``'s writer lock (``flock`` on ``folder/.hermes.lock``, created and
    removed here) for the ``with`` block. When another process holds it:
    :class:`FolderBusyError` at once, naming that process, or with ``waiting``, that is called
    with a line saying so and the lock is waited for. The kernel releases the lock of a killed
    process, so no lock goes stale. A no-op where ``fcntl`` is missing (Windows)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    path = Path(folder) / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "not known yet"
            busy = f"{what} {folder} is being written by another Hermes process (pid {holder})"
            if waiting is None:
                os.close(fd)
                raise FolderBusyError(f"{busy}; wait for it to finish, or write elsewhere") \
                    from None
            waiting(f"{busy}: waiting for it")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except BaseException:
                os.close(fd)
                raise
        try:  # the lock file may have been removed by its last holder since we opened it
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        finally:
            os.close(fd)


#: The lock file of :func:`folder_lock`.
LOCK_NAME = ".hermes.lock"


#: The temporary files of :func:`atomic_write` (``tempfile.mkstemp``: 8 random characters).
_TEMPORARY = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files :func:`atomic_write` left in ``folder`` when its process was
    killed mid-write (``.<name>.<random>.tmp``); call it where no other process writes into
    ``folder``. Returns the files removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if _TEMPORARY.match(p.name) and p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def atomic_write_bytes(path: str | os.PathLike, chunks: Iterable[bytes]) -> None:
    """Write ``chunks`` to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda f: [f.write(chunk) for chunk in chunks])


def atomic_write_json(path: str | os.PathLike, obj: object) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    atomic_write_bytes(path, [json.dumps(obj, indent=1).encode()])


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()
