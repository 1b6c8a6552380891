"""Atomic, durable file writes: a crash never leaves half a file or a stray temporary."""

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
