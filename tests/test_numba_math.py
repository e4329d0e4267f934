"""The vectorisable exp / log1p / tanh of kernels/numba_math.py against NumPy in extended
precision: the ulp bounds its docstring states, over dense sweeps of every float exponent
(denormals, the overflow and underflow edges, the sigmoid/softplus saturation regions),
hypothesis-drawn inputs and the special values."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

nm = pytest.importorskip("gpumlp.kernels.numba_math", exc_type=ImportError)

if np.finfo(np.longdouble).nmant < 63:  # the oracle needs more bits than float64
    pytest.skip("needs an extended-precision np.longdouble (x86)", allow_module_level=True)

FUNCS = ("exp", "log1p", "tanh", "sigmoid")
DTYPES = (np.float32, np.float64)
# max |ours - exact| in ulps of the result, as documented in numba_math's docstring
ULP_BOUND = {
    ("exp", np.float32): 1.0,
    ("exp", np.float64): 1.5,
    ("log1p", np.float32): 1.0,
    ("log1p", np.float64): 1.0,
    ("tanh", np.float32): 1.5,
    ("tanh", np.float64): 1.5,
    ("sigmoid", np.float32): 2.5,
    ("sigmoid", np.float64): 2.5,
}
_UINT = {np.float32: np.uint32, np.float64: np.uint64}
SPECIALS = [0.0, -0.0, np.inf, -np.inf, np.nan, 1.0, -1.0, -1.5, 1e-45, -1e-45, 5e-324, -5e-324, 1e300, -1e30]


def _exact(name: str, x: np.ndarray) -> np.ndarray:
    with np.errstate(all="ignore"):
        xl = x.astype(np.longdouble)
        if name != "sigmoid":
            return getattr(np, name)(xl)
        # as 1 / (1 + np.exp(-x)) in x's dtype: 0 once exp(-x) overflows (exact value a denormal)
        overflow = -xl > np.log(np.longdouble(np.finfo(x.dtype).max))
        return np.where(overflow, 0, 1 / (1 + np.exp(-xl)))


def check_ulps(name: str, x: np.ndarray) -> float:
    """Assert ours is within the bound of the exact value (NaN/inf/zero exactly as NumPy,
    signs included) at every x; return the max error in ulps."""
    dt = x.dtype.type
    got = getattr(nm, name)(x)
    exact = _exact(name, x)
    with np.errstate(all="ignore"):
        want = exact.astype(dt)  # NumPy's result rounded to x's dtype: the special values
    assert got.dtype == x.dtype
    special = ~np.isfinite(want) | (want == 0)
    same = (got == want) & (np.signbit(got) == np.signbit(want)) | (np.isnan(got) & np.isnan(want))
    # at the underflow edge a result may round to 0 or to the smallest denormal (half an ulp)
    with np.errstate(invalid="ignore"):  # the sweep's signalling NaNs
        edge = np.abs(got.astype(np.float64)) <= np.finfo(dt).smallest_subnormal
    bad = special & ~same & ~(edge & (np.signbit(got) == np.signbit(want)))
    assert not bad.any(), f"{name}: at x={x[bad][:5]} got {got[bad][:5]}, NumPy gives {want[bad][:5]}"
    fin = ~special & np.isfinite(got)
    ulp = np.spacing(np.abs(want[fin])).astype(np.longdouble)
    err = np.abs(got[fin].astype(np.longdouble) - exact[fin]) / ulp
    worst = float(err.max()) if err.size else 0.0
    bound = ULP_BOUND[(name, dt)]
    assert worst <= bound, f"{name} {dt.__name__}: {worst:.3f} ulp at x={x[fin][np.argmax(err)]!r} > {bound}"
    assert not (np.isfinite(want) & ~np.isfinite(got)).any(), f"{name}: spurious inf/NaN"
    return worst


def _every_exponent(dt, n: int = 250_000) -> np.ndarray:
    """n bit patterns spread evenly over all positive and negative floats (NaN and inf included)."""
    u = _UINT[dt]
    step = u(np.iinfo(u).max // n)
    return (np.arange(n, dtype=u) * step).view(dt)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", FUNCS)
def test_dense_sweep_of_the_whole_range(name, dtype):
    check_ulps(name, _every_exponent(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", FUNCS)
def test_dense_sweep_of_the_working_regions(name, dtype):
    # sigmoid = 1/(1+exp(-x)) saturates near |x| ~ 17 (f32) / 37 (f64) and exp under/overflows near
    # -104/89 (f32), -745/710 (f64); softplus uses log1p(exp(-|x|)) on (0, 1]; tanh saturates by ~20.
    regions = {"exp": (-760.0, 720.0), "log1p": (-1.0, 4.0), "tanh": (-25.0, 25.0), "sigmoid": (-800, 120)}
    lo, hi = regions[name]
    x = np.linspace(lo, hi, 200_001, dtype=np.float64).astype(dtype)
    check_ulps(name, x)
    check_ulps(name, np.linspace(-2.0, 2.0, 100_001, dtype=dtype))  # the split points (0.625, sqrt2-1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", FUNCS)
def test_special_values(name, dtype):
    with np.errstate(over="ignore"):
        x = np.array(SPECIALS, dtype=np.float64).astype(dtype)
    check_ulps(name, x)
    got = getattr(nm, name)(x)
    assert np.signbit(got[1]) == (name in ("log1p", "tanh"))  # -0.0 in: log1p and tanh keep -0.0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", FUNCS)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_property_any_float(name, dtype, data):
    x = data.draw(arrays(dtype, st.integers(1, 64), elements=st.floats(width=np.finfo(dtype).bits)))
    check_ulps(name, x)


@pytest.mark.parametrize("dtype", DTYPES)
def test_identities(dtype):
    # exp(x) * exp(-x) ~ 1 and tanh(x) = (e^2x - 1)/(e^2x + 1) where no cancellation, log1p(expm1) ~ x
    x = np.linspace(-20, 20, 4001, dtype=dtype)
    tol = 8 * np.finfo(dtype).eps
    np.testing.assert_allclose(nm.exp(x) * nm.exp(-x), 1.0, rtol=tol)
    well = x[x > -1]  # log1p near -1 is ill-conditioned
    np.testing.assert_allclose(nm.log1p(np.expm1(well)), well, rtol=tol, atol=tol)
    big = x[np.abs(x) > 1]
    e2 = nm.exp(2 * big)
    np.testing.assert_allclose(nm.tanh(big), (e2 - 1) / (e2 + 1), rtol=tol)


def test_rejects_integer_arrays():
    with pytest.raises(TypeError, match="float32 or float64"):
        nm.exp(np.arange(3))
