"""Host-side preprocessing: train/validation split, pixel scaling, per-feature standardization."""

from __future__ import annotations

import numpy as np

from gpumlp.data.idx import DataError

SCALE_MODES = ("0,1", "-1,1")
# mode -> (divisor, offset): a pixel p becomes p / divisor + offset, each step rounded to the float dtype
PIXEL_SCALES = {"0,1": (255.0, 0.0), "-1,1": (127.5, -1.0)}  # (p/255 - 0.5) * 2 == p/127.5 - 1
STD_FLOOR = 1e-8


def split_train_valid(
    x: np.ndarray, y: np.ndarray, n_valid: int = 5000
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Split (N, ...) x, (N,) y -> views (x_tr, y_tr, x_va, y_va); the LAST ``n_valid`` rows validate."""
    if len(x) != len(y):
        raise DataError(f"split_train_valid: x has {len(x)} rows but y has {len(y)}; pass matching arrays")
    n = len(x)
    if not 0 <= n_valid < n:
        raise DataError(
            f"split_train_valid: n_valid={n_valid} must be in 0..{n - 1} for {n} rows; "
            "choose a smaller validation set"
        )
    cut = n - n_valid
    return x[:cut], y[:cut], x[cut:], y[cut:]


def scale_pixels(x_uint8: np.ndarray, mode: str = "-1,1", dtype=np.float32) -> np.ndarray:
    """Pixels 0..255 (any shape) -> new float array in [0, 1] (mode "0,1") or [-1, 1] (mode "-1,1")."""
    if mode not in SCALE_MODES:
        modes = ", ".join(map(repr, SCALE_MODES))
        raise DataError(f"scale_pixels: unknown mode {mode!r}; use one of {modes}")
    dtype = np.dtype(dtype)
    if dtype.kind != "f":
        raise DataError(f"scale_pixels: dtype must be a float type such as float32, got {dtype}")
    x = np.asarray(x_uint8)
    if x.dtype.kind not in "uif":
        raise DataError(f"scale_pixels: expected numeric pixels 0..255 (uint8), got dtype {x.dtype}")
    out = x.astype(dtype)  # always a copy
    divisor, offset = PIXEL_SCALES[mode]
    out /= divisor
    if offset:
        out += offset
    return out


def standardize(x_train: np.ndarray, *others: np.ndarray) -> tuple[np.ndarray, ...]:
    """(N, F) arrays -> (x_train_std, *others_std) using x_train's per-feature mean and std.

    Features with std < 1e-8 in x_train are only centred, never divided (no blow-up on
    the test set). Float inputs keep their dtype; integer inputs become float32.
    """
    x_train = np.asarray(x_train)
    if x_train.ndim != 2 or len(x_train) == 0:
        raise DataError(f"standardize: x_train must be a non-empty (N, F) array, got shape {x_train.shape}")
    dtype = x_train.dtype if x_train.dtype.kind == "f" else np.dtype(np.float32)
    mean = x_train.mean(axis=0, dtype=np.float64)  # float64 statistics, whatever the data dtype
    std = x_train.std(axis=0, dtype=np.float64)
    scale = np.where(std < STD_FLOOR, 1.0, std)
    out = []
    for i, a in enumerate((x_train, *others)):
        a = np.asarray(a)
        if a.ndim != 2 or a.shape[1] != x_train.shape[1]:
            raise DataError(
                f"standardize: array {i} has shape {a.shape}, expected (M, {x_train.shape[1]}) like x_train"
            )
        z = a.astype(dtype)  # a copy in the output dtype, then in place: no float64 temporaries
        z -= mean.astype(dtype)
        z /= scale.astype(dtype)
        out.append(z)
    return tuple(out)
