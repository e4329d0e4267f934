"""Geometric augmentation kernels (elastic fields, warped gather) on every backend against the
reference, the reference against SciPy's Gaussian filter, and the geometry checked by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import TOL, assert_close, device_step, random_data

from gpumlp.kernels import reference as ref

DTYPES = (np.float32, np.float64)
# The warp computes coordinates and weights in float64 on every backend; float32 results differ
# by the rounding of the stored field (a few float32 ulp of a displacement of ~1 pixel).
WARP_TOL = {np.float32: (1e-5, 1e-5), np.float64: (1e-12, 1e-12)}


def test_elastic_field_is_scipy_gaussian_filter_of_the_philox_noise():
    ndimage = pytest.importorskip("scipy.ndimage")
    n, side, alpha, sigma = 3, 28, 34.0, 4.0
    field = ref.elastic_field(7, n, side, alpha, sigma, step=5, out=np.empty((n, 2, side, side)))
    noise = 2.0 * ref.hash_uniform(7, n * 2 * side * side, 5).reshape(n, 2, side, side) - 1.0
    for image in range(n):
        for channel in range(2):
            smooth = ndimage.gaussian_filter(noise[image, channel], sigma, mode="constant", truncate=4.0)
            np.testing.assert_allclose(field[image, channel], alpha * smooth, rtol=0, atol=1e-12)
    # Simard's alpha 34, sigma 4 moves pixels by about a pixel, a few at most
    assert 0.5 < np.abs(field).mean() < 2.0 and np.abs(field).max() < 8.0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, side, sigma", [(1, 7, 1.0), (3, 28, 4.0), (2, 12, 6.0)])
@pytest.mark.parametrize("with_out", [False, True])
def test_elastic_field(be, dtype, n, side, sigma, with_out):
    shape = (n, 2, side, side)
    expected = ref.elastic_field(3, n, side, 36.0, sigma, step=9, out=np.empty(shape, dtype))
    out = be.xp.empty(shape, dtype=dtype) if with_out else None
    work = be.xp.empty(shape, dtype=dtype) if with_out else None
    got = be.k.elastic_field(3, n, side, 36.0, sigma, step=device_step(be, 9), out=out, work=work)
    if with_out:
        assert got is out
    else:
        expected = expected.astype(np.float32)  # the default dtype
    rtol, atol = TOL[np.dtype(got.dtype).type]
    assert_close(expected, be.to_host(got), rtol, atol * 36, "elastic_field")


def test_elastic_field_of_images_wider_than_the_blur_table(be):
    """The CUDA blur keeps the weights of offsets below 256 in shared memory and computes wider
    ones as it goes: a 260-pixel side with radius int(4 * 66 + 0.5) = 264 uses both."""
    shape = (1, 2, 260, 260)
    expected = ref.elastic_field(5, 1, 260, 34.0, 66.0, step=2, out=np.empty(shape))
    got = be.k.elastic_field(5, 1, 260, 34.0, 66.0, step=device_step(be, 2), out=be.xp.empty(shape))
    rtol, atol = TOL[np.float64]
    assert_close(expected, be.to_host(got), rtol, atol * 34, "elastic_field")


def test_elastic_field_rejects_a_bad_sigma(be):
    with pytest.raises(ValueError, match="sigma must be > 0"):
        be.k.elastic_field(0, 1, 7, 34.0, 0.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("limits", [(0.0, 0.0, 0.0), (15.0, 0.15, 2.0), (180.0, 0.5, 3.5)])
@pytest.mark.parametrize("with_field", [False, True])
def test_gather_warped(be, dtype, limits, with_field):
    src = random_data((50, 144), dtype, seed=6)  # 12x12 images
    idx = np.random.default_rng(7).integers(0, 50, 257).astype(np.int32)  # > one block, repeats
    field = ref.elastic_field(1, 257, 12, 8.0, 2.0, out=np.empty((257, 2, 12, 12), dtype))
    field = field if with_field else None
    expected = ref.gather_warped(src, idx, *limits, seed=3, step=11, field=field)
    out = be.xp.empty(expected.shape, dtype=dtype)
    dev_field = None if field is None else be.asarray(field)
    t = device_step(be, 11)
    got = be.k.gather_warped(be.asarray(src), be.asarray(idx), *limits, 3, step=t, field=dev_field, out=out)
    assert got is out
    assert_close(expected, be.to_host(got), *WARP_TOL[dtype], "gather_warped")
    if limits == (0.0, 0.0, 0.0) and not with_field:
        np.testing.assert_array_equal(be.to_host(got), src[idx])  # no augmentation: a plain gather


def test_gather_warped_maps_a_linear_image_by_the_drawn_similarity():
    """Bilinear sampling reproduces a linear image exactly, so inside the image each output
    pixel equals the image's value at the source point computed here by hand."""
    side, a, b, c0 = 28, 0.7, -0.3, 5.0
    rows, cols = np.mgrid[0:side, 0:side].astype(np.float64)
    src = (a * rows + b * cols + c0).reshape(1, -1)
    idx = np.zeros(64, np.int32)
    out = ref.gather_warped(src, idx, 20.0, 0.2, 3.0, seed=4, step=2).reshape(64, side, side)
    u = 2.0 * ref.hash_uniform(4, 4 * 64, 2).reshape(64, 4) - 1.0
    angle, scale, ty, tx = u[:, 0] * math.radians(20.0), 1 + u[:, 1] * 0.2, u[:, 2] * 3.0, u[:, 3] * 3.0
    assert np.ptp(angle) > math.radians(20) and np.ptp(scale) > 0.2  # the draws cover the range
    c = (side - 1) / 2
    inside = 0
    for r in range(64):
        y, x = rows - c - ty[r], cols - c - tx[r]
        sy = (math.cos(angle[r]) * y + math.sin(angle[r]) * x) / scale[r] + c
        sx = (-math.sin(angle[r]) * y + math.cos(angle[r]) * x) / scale[r] + c
        ok = (sy >= 0) & (sy <= side - 1) & (sx >= 0) & (sx <= side - 1)
        np.testing.assert_allclose(out[r][ok], (a * sy + b * sx + c0)[ok], rtol=0, atol=1e-9)
        inside += ok.sum()
    assert inside > 0.8 * 64 * side * side


def test_gather_warped_displaces_by_the_field_with_edges_repeated():
    side = 6
    src = np.arange(2 * side * side, dtype=np.float64).reshape(2, -1)
    idx = np.array([1, 0], np.int32)
    field = np.zeros((2, 2, side, side))
    field[0, 0] = 1.0  # row 0 samples one row down
    field[1, 1] = -2.0  # row 1 samples two columns left
    out = ref.gather_warped(src, idx, 0.0, 0.0, 0.0, seed=0, field=field).reshape(2, side, side)
    img = src.reshape(2, side, side)
    np.testing.assert_array_equal(out[0], img[1][np.minimum(np.arange(side) + 1, side - 1)])
    np.testing.assert_array_equal(out[1], img[0][:, np.maximum(np.arange(side) - 2, 0)])


def test_gather_warped_rejects_bad_shapes(be):
    idx = be.asarray(np.zeros(2, np.int32))
    with pytest.raises(ValueError, match="10 features is not a square"):
        be.k.gather_warped(be.asarray(np.zeros((3, 10), np.float32)), idx, 5.0, 0.1, 1.0, 0)
    with pytest.raises(ValueError, match="field"):
        bad = be.asarray(np.zeros((3, 2, 3, 3), np.float32))
        be.k.gather_warped(be.asarray(np.zeros((3, 9), np.float32)), idx, 5.0, 0.1, 1.0, 0, field=bad)


@pytest.mark.parametrize("width, shift", [(10, 1), (9, 3), (9, 3.5)])
def test_fit_and_every_kernel_check_images_with_one_rule(be, width, shift):
    """Augment.check_images (run by fit before training) and the gather kernels refuse the same
    images with the same message; an image that fits gives the same side."""
    from gpumlp.augment import Augment

    with pytest.raises(ValueError) as fit_error:
        Augment(shift=shift).check_images(width)
    idx = be.asarray(np.zeros(2, np.int32))
    with pytest.raises(ValueError) as kernel_error:
        be.k.gather_shifted(be.asarray(np.zeros((3, width), np.float32)), idx, int(shift), 0)
    assert str(fit_error.value).split(", got")[0] == str(kernel_error.value).split(", got")[0]
    assert Augment(shift=shift).check_images(16) == 4 and Augment().check_images(10) is None


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"shift": -1}, r"augmentation shift must be a finite number >= 0, got -1"),
        ({"rotate": 181.0}, r"augmentation rotate \(degrees\) must be a finite number in \[0, 180\]"),
        ({"scale": 1.0}, r"augmentation scale must be a finite number in \[0, 1\)"),
        ({"elastic_alpha": float("nan")}, r"augmentation elastic_alpha must be a finite number >= 0"),
        ({"elastic_sigma": 0.0}, r"augmentation elastic_sigma must be a finite number > 0"),
        ({"shift": True}, r"augmentation shift must be a number >= 0, got True"),
    ],
)
def test_augment_limits_are_checked_one_by_one(kw, message):
    from gpumlp.augment import Augment

    with pytest.raises(ValueError, match=message):
        Augment(**kw)
