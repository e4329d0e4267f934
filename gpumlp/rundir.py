"""A training run's output directory (``--out``): one writer at a time, atomic files, divergence marker.

- :class:`RunLock`: an exclusive ``fcntl`` lock on ``DIR/.lock`` held for the whole run; a second
  run into the same directory fails at once with :class:`RunDirBusy` naming the holder's PID.
  The kernel drops the lock when the holder dies (even by ``kill -9``), so it never goes stale.
- :func:`write_json`: atomic (:func:`gpumlp.atomic.atomic_write`): readers see the old or the
  new file, never half of one.
- ``DIR/diverged.json``: written when a run diverges, so ``--resume`` can refuse to repeat the
  learning rate that diverged.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
from pathlib import Path

from gpumlp.atomic import atomic_write, clean_stale_tmp

LOCK_NAME = ".lock"
DIVERGED_NAME = "diverged.json"


class RunDirBusy(RuntimeError):
    """Another process is writing into the same run directory."""


class RunLock:
    """Exclusive lock on a run directory (created if needed); use as a context manager."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self._fd: int | None = None
        self._created: Path | None = None  # the outermost directory acquire() created, if any

    def acquire(self) -> RunLock:
        """Take the lock or raise RunDirBusy; then remove temp files left by dead writers."""
        missing = [d for d in (self.directory, *self.directory.parents) if not d.exists()]
        self.directory.mkdir(parents=True, exist_ok=True)
        self._created = missing[-1] if missing else None
        fd = os.open(self.directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            raise RunDirBusy(
                f"{self.directory} is in use by another gpumlp run (PID {holder}); wait for it to "
                "finish, or pass a different --out directory"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        clean_stale_tmp(self.directory)
        return self

    def release(self) -> None:
        """Drop the lock (the lock file stays; its PID line is cleared)."""
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def release_and_discard(self) -> None:
        """Release the lock, removing the directories acquire() created if they hold nothing but
        the lock file (a run that failed before writing anything leaves no trace); a directory that
        existed before, or holds anything else, is kept. The lock file goes while the lock is held,
        so no other run can be inside the directory."""
        created, self._created = self._created, None
        try:
            if self._fd is not None and created is not None:
                if {p.name for p in self.directory.iterdir()} == {LOCK_NAME}:
                    (self.directory / LOCK_NAME).unlink()
                    for d in (self.directory, *self.directory.parents):
                        d.rmdir()  # OSError when not empty: someone else wrote there, keep it
                        if d == created:
                            break
        except OSError:
            pass
        finally:
            self.release()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def write_json(path: str | os.PathLike, obj, default=None) -> None:
    """Write ``obj`` as indented JSON atomically (same-directory temp file, fsync, rename)."""
    path = Path(path)
    with atomic_write(path, "w") as f:
        f.write(json.dumps(obj, indent=2, default=default) + "\n")


def mark_diverged(directory: str | os.PathLike, base_lr: float, epoch: int, message: str) -> None:
    """Record that the run in ``directory`` diverged with base learning rate ``base_lr``."""
    write_json(Path(directory) / DIVERGED_NAME, {"lr": base_lr, "epoch": epoch, "message": message})


def check_resume_after_divergence(directory: str | os.PathLike, new_lr: float | None) -> None:
    """ValueError when the run diverged and ``new_lr`` (the --lr given) is absent or the same lr."""
    marker = Path(directory) / DIVERGED_NAME
    if not marker.is_file():
        return
    try:
        info = json.loads(marker.read_text())
        lr, epoch = float(info["lr"]), int(info["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        lr, epoch = None, "?"
    if new_lr is None or new_lr == lr:
        raise ValueError(
            f"this run diverged in epoch {epoch} with learning rate {lr}; resume with a lower --lr "
            f"(e.g. --resume --lr {lr / 10 if lr else 0.001:g}); the last good checkpoint is kept"
        )


def clear_diverged(directory: str | os.PathLike) -> None:
    """Forget a divergence once a resume with a new learning rate is accepted."""
    (Path(directory) / DIVERGED_NAME).unlink(missing_ok=True)
