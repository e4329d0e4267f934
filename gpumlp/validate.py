"""Input checks at the API boundary: every message says what is wrong and how to fix it."""

from __future__ import annotations

import numbers

import numpy as np

MAX_SEED = 2**32 - 1


def check_int(name: str, value, low: int, high: int | None = None) -> int:
    """An integer (not bool, not 2.5) in [low, high] -> int, else ValueError giving the range."""
    rng = f"[{low}, {high}]" if high is not None else f">= {low}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if not (isinstance(value, float) and value.is_integer()):
            raise ValueError(f"{name} must be an integer {rng}, got {value!r}")
    value = int(value)
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be an integer {rng}, got {value}")
    return value


def check_float(name: str, value, low: float, high: float, low_open: bool = False, high_open: bool = False):
    """A finite real number in the interval (open/closed ends as given) -> float, else ValueError."""
    rng = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if high == np.inf:  # a lower bound only: say "> 0" rather than "in (0, inf)"
        rng = f"{'>' if low_open else '>='} {low:g}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number {rng}, got {value!r}")
    value = float(value)
    ok = np.isfinite(value) and (value > low if low_open else value >= low)
    ok = ok and (value < high if high_open else value <= high)
    if not ok:
        raise ValueError(f"{name} must be a finite number {rng}, got {value}")
    return value


def check_bool(name: str, value) -> bool:
    """A real bool (or numpy bool) -> bool; 'no', 0.5 or None are errors, not truthy guesses."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_features(X, n_features: int, what: str = "X", dtype=None, finite: bool = True) -> np.ndarray:
    """Host array-like -> (n, n_features) real array; rejects wrong rank/width, empty, complex,
    NaN/inf, and values that overflow ``dtype`` (the model's, e.g. float32) on conversion.
    ``finite=False`` leaves NaN/inf to the caller (:func:`check_finite` when a cheaper sign,
    such as a non-finite product, points at them)."""
    X = np.asarray(X)
    if X.dtype.kind == "c":
        raise TypeError(
            f"{what} is complex ({X.dtype}); pass real values (e.g. np.abs({what}) or {what}.real)"
        )
    if X.dtype == object or not (np.issubdtype(X.dtype, np.number) or X.dtype == bool):
        raise TypeError(f"{what} must be a numeric array, got dtype {X.dtype}")
    if X.ndim == 1 and n_features == X.shape[0]:
        raise ValueError(
            f"{what} has shape {X.shape}: pass a 2-D array (n_samples, {n_features}); "
            f"for one sample use {what}.reshape(1, -1)"
        )
    if X.ndim > 2 and int(np.prod(X.shape[1:])) == n_features:
        X = X.reshape(X.shape[0], -1)
    if X.ndim != 2:
        raise ValueError(f"{what} must be 2-D (n_samples, {n_features}), got shape {X.shape}")
    if X.shape[0] == 0:
        raise ValueError(f"{what} is empty (0 samples): nothing to train or predict on")
    if X.shape[1] != n_features:
        raise ValueError(
            f"{what} has {X.shape[1]} features per sample but the model's input layer expects "
            f"{n_features}; reshape the data or build the model with input width {X.shape[1]}"
        )
    if finite and np.issubdtype(X.dtype, np.floating) and not _all_finite(X):
        check_finite(X, what)
    _check_range(X, dtype, what)
    return X


def check_finite(X: np.ndarray, what: str = "X", first_row: int = 0) -> None:
    """ValueError naming the first NaN or inf of the 2-D array X (its rows numbered from
    ``first_row``, for a chunk of a bigger array); nothing when X is finite."""
    if np.issubdtype(X.dtype, np.floating) and not np.isfinite(X).all():
        bad = np.argwhere(~np.isfinite(X))[0]
        raise ValueError(
            f"{what} contains NaN or inf (first at row {first_row + bad[0]}, column {bad[1]}); "
            "clean or impute the data first"
        )


def _check_range(X: np.ndarray, dtype, what: str) -> None:
    """ValueError when X's values do not fit ``dtype`` (e.g. 1e39 in float64 -> inf in float32)."""
    if dtype is None or X.dtype.kind != "f" or X.dtype.itemsize <= np.dtype(dtype).itemsize:
        return  # integers up to 2**64 and narrower floats always fit float32
    limit = float(np.finfo(dtype).max)
    peak = max(abs(float(X.max(initial=0))), abs(float(X.min(initial=0))))  # no |X| temporary
    if peak > limit:
        check_finite(X, what)  # an inf is a NaN/inf error (check_features(finite=False) left it)
        raise ValueError(
            f"{what} has values up to {peak:g}, beyond the {np.dtype(dtype).name} range (±{limit:g}); "
            "scale the data (e.g. divide by its maximum) or use a float64 model"
        )


def check_batch_size(batch_size) -> int:
    """Batch size for prediction: an integer >= 1."""
    return check_int("batch_size", batch_size, 1)


def _all_finite(X: np.ndarray) -> bool:
    """No NaN or inf in float X. A big contiguous float32/64 array is first checked by its sum of
    squares (one BLAS pass, no (n, d) mask; 2x faster than the mask at 4096 x 784): a NaN or inf
    makes it non-finite, and only then, or when finite values overflow it, the exact check runs."""
    if (
        X.size >= 1 << 12  # below, the mask is small and the errstate costs more
        and X.dtype in (np.float32, np.float64)
        and (X.flags.c_contiguous or X.flags.f_contiguous)
    ):
        flat = X.ravel(order="K")
        with np.errstate(over="ignore", invalid="ignore"):
            if np.isfinite(np.dot(flat, flat)):
                return True
    return bool(np.isfinite(X).all())


def check_labels(y, n_samples: int, n_classes: int, what: str = "y") -> np.ndarray:
    """Array-like of class ids -> (n,) int32; rejects non-integers, wrong length, out-of-range ids."""
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == n_classes and y.shape[0] == n_samples:
        raise ValueError(
            f"{what} looks one-hot encoded {y.shape}; pass integer class ids, e.g. {what}.argmax(axis=1)"
        )
    if y.ndim != 1:
        raise ValueError(f"{what} must be 1-D (n_samples,) of integer class ids, got shape {y.shape}")
    if y.shape[0] != n_samples:
        raise ValueError(f"{what} has {y.shape[0]} labels but X has {n_samples} samples")
    if not np.issubdtype(y.dtype, np.integer):
        if np.issubdtype(y.dtype, np.floating) and np.isfinite(y).all() and (y == np.round(y)).all():
            y = y.astype(np.int64)
        else:
            raise ValueError(
                f"{what} must hold integer class ids 0..{n_classes - 1}, got dtype {y.dtype} "
                "with non-integer values"
            )
    if n_samples and (y.min() < 0 or y.max() >= n_classes):
        raise ValueError(
            f"{what} has labels in [{y.min()}, {y.max()}] but the model has {n_classes} "
            f"outputs, so labels must be in 0..{n_classes - 1}"
        )
    return y.astype(np.int32)
