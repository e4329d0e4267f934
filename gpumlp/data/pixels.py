"""Training images kept as their 8-bit codes and decoded one minibatch at a time.

A float32 copy of 55,000 MNIST images takes 172 MB, and every training step gathers its
minibatch's rows from it in random order, out of DRAM. Kept as the uint8 pixels they are, the
set takes 43 MB and the gather reads a quarter of the bytes, decoding each pixel on the way
(one division and one add, the arithmetic of :func:`scale_pixels`, so the minibatch is the same
bit for bit). Measured on one core, 128 rows of 784 from 55,000: 18-19 us for float32 rows,
9 us for codes decoded (``bench/pixel_gather.py``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gpumlp.data.idx import DataError
from gpumlp.data.preprocess import PIXEL_SCALES, SCALE_MODES, scale_pixels


class Pixels:
    """(N, F) uint8 pixel codes standing for ``scale_pixels(codes, mode)`` (mode ``"-1,1"`` or
    ``"0,1"``) in the model's float dtype. ``fit`` keeps the codes on its device and decodes each
    minibatch in its gather (the kernel ``gather_pixels``); everything else that reads them
    (validation, predict, ``np.asarray``) gets the decoded floats. (N, H, W) images are flattened.
    ``codes`` may also be a backend's device array (what ``fit`` uploads)."""

    __slots__ = ("codes", "mode")

    def __init__(self, codes: Any, mode: str = "-1,1") -> None:
        if mode not in PIXEL_SCALES:
            modes = ", ".join(map(repr, SCALE_MODES))
            raise DataError(f"Pixels: unknown mode {mode!r}; use one of {modes}")
        if not hasattr(codes, "dtype"):  # a list; NumPy and device arrays are kept
            codes = np.asarray(codes)
        if codes.dtype != np.uint8:
            raise DataError(
                f"Pixels: codes must be uint8 pixel values 0..255, got dtype {codes.dtype}; pass the raw "
                "images (as load_mnist gives them), or train on scale_pixels(...) floats instead"
            )
        if codes.ndim < 2:
            shape = tuple(codes.shape)
            raise DataError(f"Pixels: codes must be (N, F) or (N, H, W) images, got shape {shape}")
        codes = codes.reshape(codes.shape[0], -1)  # a view where it can be, as NumPy's reshape
        self.codes = codes if codes.flags.c_contiguous else codes.copy()
        self.mode = mode

    @property
    def shape(self) -> tuple[int, int]:
        """(N, F), as the decoded array's."""
        return tuple(self.codes.shape)

    @property
    def ndim(self) -> int:
        return 2

    @property
    def divisor(self) -> float:
        """A code is decoded as ``code / divisor + offset``, each step rounded to the float dtype."""
        return PIXEL_SCALES[self.mode][0]

    @property
    def offset(self) -> float:
        return PIXEL_SCALES[self.mode][1]

    def __len__(self) -> int:
        return self.codes.shape[0]

    def __getitem__(self, rows) -> Pixels:
        """The rows ``rows`` (a slice or an index array) as Pixels of the same mode."""
        picked = self.codes[rows]
        if picked.ndim != 2:
            raise IndexError(f"Pixels[{rows!r}]: select rows with a slice or an index array, not one row")
        return Pixels(picked, self.mode)

    def decode(self, dtype=np.float32) -> np.ndarray:
        """The (N, F) float array the codes of host Pixels stand for: ``scale_pixels(codes, mode,
        dtype)``. (On a device, the backend's ``gather_pixels`` decodes them, as ``fit`` does.)"""
        if not isinstance(self.codes, np.ndarray):
            raise TypeError("Pixels on a device: the backend's gather_pixels decodes them, not the host")
        return scale_pixels(self.codes, self.mode, dtype)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        if copy is False:  # NumPy 2's protocol: decoding always makes a new array
            raise ValueError("Pixels decode into a new array: np.asarray(pixels, copy=False) cannot be met")
        return self.decode(np.float32 if dtype is None else dtype)

    def __repr__(self) -> str:
        return f"Pixels({self.shape[0]}x{self.shape[1]} uint8, mode={self.mode!r})"
