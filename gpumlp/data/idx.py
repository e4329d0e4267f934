"""IDX file reader (the MNIST format), gzip or raw, with every header field checked.

Layout: magic ``00 00 <type> <ndim>`` (type 0x08 = unsigned byte), then ``ndim``
big-endian uint32 dimensions, then exactly ``prod(dims)`` bytes of data. Any
deviation is a :class:`DataError` that names the file, the problem and the fix.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np

IDX_UBYTE = 0x08
GZIP_MAGIC = b"\x1f\x8b"
_FIX = "delete the file and let load_mnist() download it again, or copy a good one in place"


class DataError(ValueError):
    """A data file or data argument is unusable; the message names it, says what is wrong and how to fix."""


def _read_bytes(path: Path) -> bytes:
    """Whole file as bytes, gunzipped when it is named ``*.gz`` or starts with the gzip magic."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        msg = f"{path}: cannot read file ({e.strerror or e}); check the path and permissions"
        raise DataError(msg) from e
    if path.suffix != ".gz" and not raw.startswith(GZIP_MAGIC):
        return raw
    if not raw.startswith(GZIP_MAGIC):
        raise DataError(f"{path}: not a gzip file (no gzip magic 1f 8b at the start); {_FIX}")
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: truncated or corrupt gzip stream ({e}); {_FIX}") from e


def parse_idx(buf: bytes, name: str = "<bytes>") -> np.ndarray:
    """Parse an uncompressed IDX byte string -> uint8 array of the header's shape; ``name`` is for errors."""
    if len(buf) < 4:
        raise DataError(f"{name}: truncated IDX file: {len(buf)} bytes, less than the 4-byte magic; {_FIX}")
    zero0, zero1, dtype_code, ndim = buf[0], buf[1], buf[2], buf[3]
    if zero0 != 0 or zero1 != 0:
        raise DataError(
            f"{name}: bad magic number {buf[:4].hex(' ')} (expected 00 00 08 <ndim>); not an IDX file. {_FIX}"
        )
    if dtype_code != IDX_UBYTE:
        raise DataError(
            f"{name}: unsupported IDX data type 0x{dtype_code:02x} in the magic number "
            f"(only 0x08 = unsigned byte is supported); {_FIX}"
        )
    if ndim == 0:
        raise DataError(f"{name}: bad magic number: IDX header says 0 dimensions; {_FIX}")
    header = 4 + 4 * ndim
    if len(buf) < header:
        raise DataError(
            f"{name}: truncated IDX header: {ndim} dims need {header} bytes, file has {len(buf)}; {_FIX}"
        )
    dims = tuple(int(d) for d in np.frombuffer(buf, dtype=">u4", count=ndim, offset=4))
    expected = math.prod(dims)  # Python ints: a forged header cannot overflow into a small number
    got = len(buf) - header
    if got < expected:
        raise DataError(
            f"{name}: truncated IDX data: dims {dims} need {expected} bytes after the header, "
            f"found {got}; {_FIX}"
        )
    if got > expected:
        raise DataError(
            f"{name}: size mismatch: dims {dims} need {expected} bytes after the header, "
            f"found {got} ({got - expected} extra); {_FIX}"
        )
    return np.frombuffer(buf, dtype=np.uint8, offset=header).reshape(dims).copy()


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (gzip or raw) -> uint8 array with the header's dims, e.g. (60000, 28, 28)."""
    path = Path(path)
    return parse_idx(_read_bytes(path), str(path))


def read_idx_splits(paths: Mapping[str, Path]) -> dict[str, np.ndarray]:
    """Read IDX files by role (``x_train``, ``y_train``[, ``x_test``, ``y_test``]) -> uint8 arrays by role,
    each split checked: images (N, H, W) or (N, F), labels (N,), the same N."""
    arrays = {role: read_idx(p) for role, p in paths.items()}
    for split in ("train", "test"):
        xr, yr = f"x_{split}", f"y_{split}"
        if xr not in arrays:
            continue
        x, y = arrays[xr], arrays[yr]
        if y.ndim != 1:
            raise DataError(
                f"{paths[yr]}: labels must be 1-D (N,), got shape {y.shape}; are images and labels swapped?"
            )
        if x.ndim < 2:
            raise DataError(
                f"{paths[xr]}: images must be (N, H, W) or (N, F), got shape {x.shape}; "
                "are images and labels swapped?"
            )
        if len(x) != len(y):
            raise DataError(
                f"{paths[xr]} has {len(x)} images but {paths[yr]} has {len(y)} labels; "
                "the counts must match (mixed-up or truncated files?)"
            )
    return arrays
