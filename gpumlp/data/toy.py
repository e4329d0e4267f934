"""Toy 2-D classification sets for smoke tests and demos: X (n, 2) float64, y (n,) int64.

Every generator is deterministic given ``seed``, balances classes (counts differ by
at most one), adds isotropic Gaussian ``noise`` (a standard deviation) and shuffles rows.
"""

from __future__ import annotations

import numpy as np

from gpumlp.data.idx import DataError


def _check(name: str, n: int, noise: float, classes: int) -> None:
    """Reject sizes and noise levels that cannot give a balanced, valid set."""
    if int(n) != n or n < classes:
        raise DataError(f"{name}: n={n} must be an integer >= {classes} (one point per class at least)")
    if not noise >= 0:
        raise DataError(f"{name}: noise={noise} must be >= 0 (a Gaussian standard deviation)")


def _class_sizes(n: int, classes: int) -> list[int]:
    """Split n points into ``classes`` counts that differ by at most one."""
    return [n // classes + (c < n % classes) for c in range(classes)]


def _finish(parts: list[np.ndarray], noise: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Stack per-class point arrays, add noise, shuffle -> (X (n, 2) float64, y (n,) int64)."""
    x = np.concatenate(parts).astype(np.float64)
    y = np.concatenate([np.full(len(p), c, dtype=np.int64) for c, p in enumerate(parts)])
    x += rng.normal(0.0, noise, size=x.shape)
    order = rng.permutation(len(x))
    return x[order], y[order]


def make_xor(n: int = 400, noise: float = 0.1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """XOR blobs at (±1, ±1): class 1 where the signs differ -> (X (n, 2) float64, y (n,) int64)."""
    _check("make_xor", n, noise, 2)
    rng = np.random.default_rng(seed)
    # 4 corners; each class owns 2 diagonal corners and its points alternate between them
    corners = {0: np.array([[1.0, 1.0], [-1.0, -1.0]]), 1: np.array([[1.0, -1.0], [-1.0, 1.0]])}
    parts = [corners[c][np.arange(k) % 2] for c, k in enumerate(_class_sizes(n, 2))]
    return _finish(parts, noise, rng)


def make_circles(
    n: int = 400, noise: float = 0.05, factor: float = 0.5, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Two concentric circles, outer radius 1 (class 0), inner ``factor`` (class 1) -> X (n, 2), y (n,)."""
    _check("make_circles", n, noise, 2)
    if not 0 < factor < 1:
        raise DataError(f"make_circles: factor={factor} must be in (0, 1) (inner radius / outer radius)")
    rng = np.random.default_rng(seed)
    parts = []
    for radius, k in zip((1.0, factor), _class_sizes(n, 2)):
        t = np.linspace(0, 2 * np.pi, k, endpoint=False)
        parts.append(radius * np.stack([np.cos(t), np.sin(t)], axis=1))
    return _finish(parts, noise, rng)


def make_moons(n: int = 400, noise: float = 0.1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two interleaving half circles (class 0 upper, class 1 lower) -> (X (n, 2) float64, y (n,) int64)."""
    _check("make_moons", n, noise, 2)
    rng = np.random.default_rng(seed)
    k0, k1 = _class_sizes(n, 2)
    t0, t1 = np.linspace(0, np.pi, k0), np.linspace(0, np.pi, k1)
    upper = np.stack([np.cos(t0), np.sin(t0)], axis=1)
    lower = np.stack([1 - np.cos(t1), 0.5 - np.sin(t1)], axis=1)
    return _finish([upper, lower], noise, rng)


def make_spirals(
    n: int = 400, classes: int = 3, noise: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """``classes`` interleaved spiral arms from the origin  -> X (n, 2) float64, y (n,) int64.

    Here ``noise`` perturbs each point's angle (radians), not its coordinates.
    """
    _check("make_spirals", n, noise, 2)
    if int(classes) != classes or classes < 2 or n < classes:
        raise DataError(f"make_spirals: classes={classes} must be an integer in 2..n (n={n})")
    rng = np.random.default_rng(seed)
    parts = []
    for c, k in enumerate(_class_sizes(n, classes)):
        r = np.linspace(0.0, 1.0, k)
        # each arm turns 4 rad outwards; arms start evenly spaced around the circle
        t = np.linspace(0.0, 4.0, k) + 2 * np.pi * c / classes + rng.normal(0.0, noise, size=k)
        parts.append(r[:, None] * np.stack([np.sin(t), np.cos(t)], axis=1))
    return _finish(parts, 0.0, rng)
