"""Geometry of the square images stored one per row (MNIST: 784 features = 28x28), shared by
the framework's checks (``gpumlp.augment``) and every backend's augmentation kernels."""

from __future__ import annotations


def image_side(width: int, max_shift: float = 0) -> int:
    """Side of the square images stored as rows of ``width`` features, checking that a shift of
    ``max_shift`` pixels fits: 0 <= max_shift < side. -> side."""
    side = int(round(width**0.5))
    if side * side != width:
        raise ValueError(f"augmentation needs square images; {width} features is not a square")
    if not 0 <= max_shift < side:
        raise ValueError(
            f"augment shift must be below the image side {side}: max_shift must be in [0, {side}) "
            f"for {side}x{side} images, got {max_shift}"
        )
    return side
