"""Data augmentation: random small translations of square images."""

from __future__ import annotations

import numpy as np


def shift_images(X: np.ndarray, max_shift: int, rng: np.random.Generator) -> np.ndarray:
    """Shift each flattened square image (n, side*side) by a random (dy, dx) in
    [-max_shift, max_shift]²; uncovered pixels repeat the edge (background).
    Returns a new array of X's shape and dtype."""
    n, d = X.shape
    side = int(round(d**0.5))
    if side * side != d:
        raise ValueError(f"shift augmentation needs square images; {d} features is not a square")
    if not 0 <= max_shift < side:
        raise ValueError(f"max_shift must be in [0, {side}), got {max_shift}")
    s = max_shift
    padded = np.pad(X.reshape(n, side, side), ((0, 0), (s, s), (s, s)), mode="edge")
    dy, dx = rng.integers(-s, s + 1, size=(2, n))
    rows = (np.arange(side)[None, :] + s - dy[:, None])[:, :, None]  # (n, side, 1)
    cols = (np.arange(side)[None, :] + s - dx[:, None])[:, None, :]  # (n, 1, side)
    return padded[np.arange(n)[:, None, None], rows, cols].reshape(n, d)
