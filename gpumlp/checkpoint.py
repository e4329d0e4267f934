"""Checkpoint files: one ``.npz`` holding named arrays, a JSON header and a SHA-256 checksum.

Writes are atomic (:func:`gpumlp.atomic.atomic_write`), so a crash or a kill
mid-write leaves the previous checkpoint intact.
Reads are verified: the checksum covers the header and every array's name,
dtype, shape and bytes, so a flipped bit or a truncated file is a
:class:`CheckpointError` naming the file, never a wrong model.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from gpumlp.atomic import atomic_write

_META_KEY = "__meta__"
_SUM_KEY = "__sha256__"


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt or not a gpumlp checkpoint."""


def _digest(arrays: dict[str, np.ndarray], meta_bytes: bytes) -> str:
    """SHA-256 over the header and every array's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256(meta_bytes)
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"\0{name}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(a.view(np.uint8).reshape(-1) if a.size else b"")
    return h.hexdigest()


def write(path: str | os.PathLike, arrays: dict[str, np.ndarray], meta: dict) -> Path:
    """Atomically write host arrays and a JSON-able ``meta`` dict to ``path``, with a checksum."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    meta_bytes = json.dumps({**meta, "checksum": "sha256"}).encode()
    payload = dict(arrays)
    payload[_META_KEY] = np.frombuffer(meta_bytes, dtype=np.uint8)
    payload[_SUM_KEY] = np.frombuffer(_digest(arrays, meta_bytes).encode(), dtype=np.uint8)
    with atomic_write(path) as f:
        np.savez(f, **payload)
    return path


def read(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
    """Read and verify a checkpoint written by :func:`write` -> (arrays, meta)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # zip, zlib, npy-header and EOF errors alike: the file is damaged
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated ({type(e).__name__}: {e}); "
            "use an earlier checkpoint or retrain"
        ) from None
    if _META_KEY not in arrays:
        raise CheckpointError(f"{path} is not a gpumlp checkpoint (no header)")
    meta_bytes = arrays.pop(_META_KEY)
    stored = arrays.pop(_SUM_KEY, None)
    meta = _parse_meta(path, meta_bytes)
    if stored is None and meta.get("checksum") is not None:
        raise CheckpointError(f"checkpoint {path} is corrupt: its checksum is missing; use an earlier one")
    if stored is not None and _digest(arrays, meta_bytes.tobytes()).encode() != stored.tobytes():
        raise CheckpointError(
            f"checkpoint {path} is corrupt: SHA-256 checksum mismatch; use an earlier checkpoint or retrain"
        )
    meta.pop("checksum", None)
    return arrays, meta


def _parse_meta(path: Path, meta_bytes: np.ndarray) -> dict:
    """The JSON header as a dict, or CheckpointError."""
    if meta_bytes.dtype != np.uint8 or meta_bytes.ndim != 1:
        raise CheckpointError(
            f"{path} is corrupt: header has dtype {meta_bytes.dtype}, shape {meta_bytes.shape}"
        )
    try:
        meta = json.loads(meta_bytes.tobytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path} is corrupt: unreadable header ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} is corrupt: header is {type(meta).__name__}, not an object")
    return meta


def expect(path, container: dict, key: str, kind: type | tuple, what: str = "header"):
    """``container[key]`` if it is of type ``kind`` (a bool never passes for a number), else
    CheckpointError naming the file and the key."""
    value = container.get(key) if isinstance(container, dict) else None
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        shown = repr(value)[:60]
        raise CheckpointError(f"{path}: {what} key {key!r} is missing or malformed (got {shown})")
    return value


def expect_array(path, arrays: dict, key: str, shape: tuple, dtype=None) -> np.ndarray:
    """``arrays[key]`` if it has exactly ``shape`` (and a float/int ``dtype`` kind), else CheckpointError.
    Exact shapes: a (1,) array must never broadcast into a (100,) state."""
    a = arrays.get(key)
    if a is None:
        raise CheckpointError(
            f"{path}: array {key!r} is missing; the file is incomplete or not for this model"
        )
    if tuple(a.shape) != tuple(shape):
        raise CheckpointError(f"{path}: array {key!r} has shape {a.shape}, expected {tuple(shape)}")
    if dtype is not None and a.dtype.kind != np.dtype(dtype).kind:
        raise CheckpointError(f"{path}: array {key!r} has dtype {a.dtype}, expected {np.dtype(dtype)}")
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise CheckpointError(f"{path}: array {key!r} contains NaN or inf")
    return a
