"""Images for ``predict``: PNG files in any common mode -> gray pixels 0..255, and the pixel
range of an input array detected (0..255 or already scaled to [0, 1]) or stated.

PNG modes: ``L`` as is; 16-bit gray (``I;16``, ``I``) divided by 257 (65535 -> 255);
``RGB`` to luma (ITU-R 601, as Pillow's ``convert("L")``); ``LA``, ``RGBA`` and palettes with
transparency composited over black, so transparent pixels are background (MNIST digits are
light strokes on black). Anything else is refused with a message.
"""

from __future__ import annotations

import os

import numpy as np

from gpumlp.data.idx import DataError

PIXEL_RANGES = ("auto", "0-255", "0-1")
_EIGHT_BIT = {"L", "RGB", "LA", "RGBA", "P", "PA", "1"}


def read_png(path: str | os.PathLike) -> np.ndarray:
    """A PNG file -> (H, W) float64 gray pixels in 0..255 (see the module docstring for modes)."""
    try:
        from PIL import Image
    except ImportError:
        raise DataError("reading PNG needs Pillow: pip install pillow (or -e '.[plot]')") from None
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode in ("I;16", "I;16B", "I;16L", "I"):
                return np.asarray(img, dtype=np.float64) / 257.0
            if mode not in _EIGHT_BIT:
                raise DataError(f"{path}: unsupported PNG mode {mode!r}; save it as 8-bit grayscale (L)")
            if mode == "L":
                return np.asarray(img, dtype=np.float64)
            la = np.asarray(img.convert("LA") if mode == "LA" else img.convert("RGBA"), dtype=np.float64)
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{path}: not a readable PNG ({e})") from None
    gray = la[..., 0] if la.shape[-1] == 2 else la[..., :3] @ np.array([0.299, 0.587, 0.114])
    return gray * (la[..., -1] / 255.0)  # over black: transparent pixels become background


def to_pixels_255(x: np.ndarray, pixels: str = "auto", name: str = "input") -> tuple[np.ndarray, str]:
    """Raw input values -> (values on the 0..255 scale, the range used: ``0-255`` or ``0-1``).

    ``auto``: integers are 0..255; floats with every value in [0, 1] are taken as already
    scaled (multiplied by 255); ``0-255`` / ``0-1`` state it. Complex, NaN/inf or values outside
    the range are a DataError naming ``name``."""
    if pixels not in PIXEL_RANGES:
        raise DataError(f"pixel range {pixels!r} unknown; use one of {', '.join(PIXEL_RANGES)}")
    x = np.asarray(x)
    if x.dtype.kind not in "uif" or x.size == 0:
        raise DataError(f"{name}: expected real pixel values, got {x.dtype} with shape {x.shape}")
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise DataError(f"{name}: pixel values contain NaN or inf")
    lo, hi = float(x.min()), float(x.max())
    if pixels == "auto":
        pixels = "0-1" if x.dtype.kind == "f" and lo >= 0 and hi <= 1 else "0-255"
    top = 1.0 if pixels == "0-1" else 255.0
    if lo < 0 or hi > top:
        raise DataError(
            f"{name}: pixel values span [{lo:g}, {hi:g}], outside {pixels}; pass raw pixels 0..255 "
            "or values scaled to [0, 1] (and say which with --pixels)"
        )
    return (x * 255.0 if pixels == "0-1" else x), pixels
