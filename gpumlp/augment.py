"""What random augmentation a training run applies to its (square) images.

Everything is drawn on the device per training step and minibatch row from Philox streams
keyed by the run's seed, inside the minibatch gather: integer shifts alone go through the
exact, edge-repeating ``gather_shifted``; rotation, scaling, sub-pixel shifts and elastic
distortions (Simard et al. 2003) through ``gather_warped`` with bilinear sampling, the
displacement fields made by ``elastic_field``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gpumlp.kernels.images import image_side
from gpumlp.validate import check_float


@dataclass(frozen=True)
class Augment:
    """Augmentation limits: ``shift`` pixels (|dy|, |dx| <= shift), ``rotate`` degrees,
    ``scale`` (|factor - 1| <= scale), elastic fields of strength ``elastic_alpha`` (pixels per
    unit of smoothed noise; 0: none) smoothed by a Gaussian of ``elastic_sigma`` pixels."""

    shift: float = 0
    rotate: float = 0.0
    scale: float = 0.0
    elastic_alpha: float = 0.0
    elastic_sigma: float = 4.0

    def __post_init__(self) -> None:
        inf = math.inf
        check_float("augmentation shift", self.shift, 0.0, inf, high_open=True)
        check_float("augmentation rotate (degrees)", self.rotate, 0.0, 180.0)
        check_float("augmentation scale", self.scale, 0.0, 1.0, high_open=True)
        check_float("augmentation elastic_alpha", self.elastic_alpha, 0.0, inf, high_open=True)
        check_float("augmentation elastic_sigma", self.elastic_sigma, 0.0, inf, low_open=True, high_open=True)

    @property
    def active(self) -> bool:
        """True when any augmentation is on."""
        return bool(self.shift or self.rotate or self.scale or self.elastic_alpha)

    @property
    def warps(self) -> bool:
        """True when the run needs the bilinear warp (anything beyond whole-pixel shifts)."""
        return bool(self.rotate or self.scale or self.elastic_alpha or self.shift != int(self.shift))

    def check_images(self, width: int) -> int | None:
        """The side of the square images of ``width`` features, checking the shift fits -> side;
        None when no augmentation is on (then any width goes)."""
        return image_side(width, self.shift) if self.active else None
