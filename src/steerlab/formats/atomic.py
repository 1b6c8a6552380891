"""Atomic, durable file writes: a crash never leaves half a file or a stray temporary.

:func:`atomic_write_bytes` writes into an unnamed file (``O_TMPFILE``) in the target's
folder, fsyncs it and only then gives it a name and renames it over the target, so even a
killed process leaves nothing behind. Files get mode 0644 minus the umask.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from steerlab.core.errors import SteerlabError


def check_output(target: Path) -> None:
    """Refuse an output path whose folder cannot exist (checked before any model work).

    Raises:
        SteerlabError: a parent of ``target`` is a file, or ``target`` is a directory.
    """
    if target.is_dir():
        raise SteerlabError(f"output '{target}' is a directory: pass a file path")
    for parent in target.parents:
        if parent.exists():
            if not parent.is_dir():
                raise SteerlabError(
                    f"cannot write '{target}': '{parent}' is a file, not a directory"
                )
            break


def atomic_write(target: Path, write: Callable[[str], None], mode: int = 0o644) -> None:
    """Call ``write(tmp_path)``, fsync, then rename onto ``target``.

    The temporary file sits beside the target and is removed on any failure, so readers
    see the old file or the whole new one. The file gets ``mode`` (minus the umask).
    """
    check_output(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, mode & ~umask)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _link_unnamed(fd: int, name: Path) -> None:
    """Give the O_TMPFILE file ``fd`` a name: linkat(/proc/self/fd/N, AT_SYMLINK_FOLLOW)."""
    procfd = os.open("/proc/self/fd", os.O_RDONLY)
    try:
        # With a src_dir_fd, os.link calls linkat() and follows the magic link.
        os.link(str(fd), name, src_dir_fd=procfd, follow_symlinks=True)
    finally:
        os.close(procfd)


def _write_bytes(data: bytes) -> Callable[[str], None]:
    def write(tmp: str) -> None:
        Path(tmp).write_bytes(data)

    return write


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(target: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``target`` atomically and durably, leaving no temporary on a kill."""
    check_output(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    flag = getattr(os, "O_TMPFILE", 0)
    if not flag:  # not Linux: a named temporary, removed on any failure we see
        atomic_write(target, _write_bytes(data), mode)
        return
    try:
        fd = os.open(target.parent, flag | os.O_WRONLY, mode)
    except OSError:  # a file system without O_TMPFILE
        atomic_write(target, _write_bytes(data), mode)
        return
    tmp = target.parent / f".{target.name}.{os.getpid()}.{id(data):x}.tmp"
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
        _link_unnamed(fd, tmp)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise
    finally:
        os.close(fd)
