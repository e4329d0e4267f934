"""Checkpoint files: one ``.npz`` holding named arrays plus a JSON header.

Writes are atomic: the file is written to a temporary name in the same
directory, flushed to disk, then renamed over the target, so a crash or a
kill mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

_META_KEY = "__meta__"


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated or not a gpumlp checkpoint."""


def write(path: str | os.PathLike, arrays: dict[str, np.ndarray], meta: dict) -> Path:
    """Atomically write host arrays and a JSON-able ``meta`` dict to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = dict(arrays)
    payload[_META_KEY] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would make saved models private
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
    """Read a checkpoint written by :func:`write` -> (arrays, meta)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated ({e}); use an earlier checkpoint or retrain"
        ) from None
    if _META_KEY not in arrays:
        raise CheckpointError(f"{path} is not a gpumlp checkpoint (no header)")
    meta = json.loads(arrays.pop(_META_KEY).tobytes().decode())
    return arrays, meta
