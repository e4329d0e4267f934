"""Input checks at the API boundary: every message says what is wrong and how to fix it."""

from __future__ import annotations

import numpy as np


def check_features(X, n_features: int, what: str = "X") -> np.ndarray:
    """Host array-like -> (n, n_features) float array; rejects wrong rank/width, empty, NaN/inf."""
    X = np.asarray(X)
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
    if np.issubdtype(X.dtype, np.floating) and not _all_finite(X):
        bad = np.argwhere(~np.isfinite(X))[0]
        raise ValueError(
            f"{what} contains NaN or inf (first at row {bad[0]}, column {bad[1]}); "
            "clean or impute the data first"
        )
    return X


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
