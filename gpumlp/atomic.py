"""Atomic file writes: a reader sees the old file or the new one, never a part of one.

:func:`atomic_write` writes to ``.<name>.<pid>.<random>.tmp`` in the target's directory,
flushes it to disk, gives it the permissions of a normally created file (the umask applied:
mkstemp's 0600 would make saved models and data private) and renames it over the target. On
an error the target is untouched and the temp file removed; after a kill, the temp file is
left behind and :func:`clean_stale_tmp` removes it once its writer process is gone.
Checkpoints, run JSON files, the MNIST cache and MNIST downloads are all written this way.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

_TMP_RE = re.compile(r"^\..+\.(\d+)\.[^.]+\.tmp$")


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temp file beside ``path`` for writing (``mode`` "wb" or "w"); on a clean exit it
    replaces ``path``. ``f.name`` is the temp file's path, e.g. to check what was written."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it: done once, at import, not per write
    os.umask(mask)  # (a per-write read would briefly give every other thread's new files umask 0)
    return mask


_UMASK = _read_umask()


def clean_stale_tmp(directory: str | os.PathLike) -> list[Path]:
    """Remove ``.<name>.<pid>.*.tmp`` files in ``directory`` whose writer process is gone -> removed."""
    removed = []
    for p in Path(directory).glob(".*.tmp"):
        m = _TMP_RE.match(p.name)
        if m and not pid_alive(int(m.group(1))):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
