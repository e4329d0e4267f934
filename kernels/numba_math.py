"""Vectorisable ``exp``, ``log1p`` and ``tanh`` for Numba kernels, float32 and float64.

Without Intel SVML, Numba lowers ``math.exp`` / ``math.log1p`` / ``math.tanh`` to scalar libm
calls, which stop LLVM from vectorising the loop around them. These are the classic
range-reduction + polynomial algorithms (Cephes ``expf``/``tanh``/``tanhf``, fdlibm/musl
``log1p``/``log1pf``) written with selects instead of branches and with scalar bit casts
(``_bits``/``_from_bits``, one LLVM ``bitcast`` each), so a loop that calls them becomes SIMD
code. float32 inputs are computed in float32 (twice the lanes), float64 in float64.

Inside ``@njit`` code call ``exp(x)``, ``log1p(x)``, ``tanh(x)`` on a float32 or float64
scalar: the variant is picked by the argument's type and inlined. Called from Python on an
array they map over it (used by the tests and the benchmarks).

Accuracy (max error in ulps of the result's dtype, measured over dense sweeps of the whole
float range and hypothesis-drawn inputs against NumPy in extended precision,
tests/test_numba_math.py):

========  =========  =========
function  float32    float64
========  =========  =========
exp       1 ulp      1.5 ulp
log1p     1 ulp      1 ulp
tanh      1.5 ulp    1.5 ulp
sigmoid   2.5 ulp    2.5 ulp
========  =========  =========

``sigmoid(x) = 1 / (1 + exp(-x))`` is the kernels' shared form: its error is exp's, damped by
``e / (1 + e) < 1``, plus the two roundings of the sum and the division. Like that formula in
NumPy it gives 0 once exp(-x) overflows (x < -88.7 float32, -709.8 float64), where the exact
value is a denormal.

Special values follow C99/NumPy: NaN in gives NaN out; ``exp(+inf) = inf``,
``exp(-inf) = 0``, overflow gives inf and underflow goes through the denormals to 0;
``log1p(-1) = -inf``, ``log1p(x < -1) = NaN``, ``log1p(inf) = inf``; ``tanh(±inf) = ±1``;
signed zeros are kept; denormal inputs are handled (no flush to zero).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload, register_jitable

from ._jit import njit  # numba.njit, without the disk cache where none can be written

__all__ = ["exp", "log1p", "sigmoid", "tanh"]

# ----------------------------------------------------------------- bit casts
_INT_OF = {types.float32: ir.IntType(32), types.float64: ir.IntType(64)}


@intrinsic
def _bits(typingctx, x):
    """The IEEE bits of a float32 / float64 scalar as an int64 (float32: sign-extended int32)."""
    if x not in _INT_OF:
        return None

    def codegen(context, builder, sig, args):
        raw = builder.bitcast(args[0], _INT_OF[x])
        return builder.sext(raw, ir.IntType(64)) if x == types.float32 else raw

    return types.int64(x), codegen


@intrinsic
def _from_bits(typingctx, i, like):
    """The float of ``like``'s type whose IEEE bits are the low bits of the int64 ``i``."""
    if like not in _INT_OF or i != types.int64:
        return None

    def codegen(context, builder, sig, args):
        raw = builder.trunc(args[0], ir.IntType(32)) if like == types.float32 else args[0]
        return builder.bitcast(raw, context.get_value_type(like))

    return like(i, like), codegen


# ----------------------------------------------------------------------- exp
_F = np.float32
_LOG2E64, _LN2HI64, _LN2LO64 = 1.4426950408889634, 6.93147180369123816490e-01, 1.90821492927058770002e-10
_ROUND64 = 6755399441055744.0  # 1.5 * 2^52: adding and subtracting it rounds to an integer
_EXP_MAX64, _EXP_MIN64 = 709.782712893384, -745.1332191019412  # beyond: inf / 0
_EXP_TAYLOR64 = tuple(1.0 / np.prod(np.arange(1, k + 1, dtype=np.float64)) for k in range(13, -1, -1))
(_E13, _E12, _E11, _E10, _E9, _E8, _E7, _E6, _E5, _E4, _E3, _E2, _E1, _E0) = _EXP_TAYLOR64
_LOG2E32, _LN2HI32, _LN2LO32 = _F(1.44269504088896341), _F(0.693359375), _F(-2.12194440e-4)
_ROUND32 = _F(12582912.0)  # 1.5 * 2^23
_EXP_MAX32, _EXP_MIN32 = _F(88.72283935546875), _F(-103.97208404541016)
_P0_32, _P1_32, _P2_32 = _F(1.9875691500e-4), _F(1.3981999507e-3), _F(8.3334519073e-3)
_P3_32, _P4_32, _P5_32 = _F(4.1665795894e-2), _F(1.6666665459e-1), _F(5.0000001201e-1)
_ONE32, _TWO32, _HALF32, _ZERO32 = _F(1.0), _F(2.0), _F(0.5), _F(0.0)
_INF32, _NAN32 = _F(np.inf), _F(np.nan)


@register_jitable(inline="always")
def _exp64(x):
    # x = n ln2 + r, |r| <= ln2/2; exp(r) by Taylor to r^13 (error < 2^-60); 2^n as two
    # power-of-two factors so that the denormal results round only once.
    xc = x if x < 710.0 else 710.0  # NaN takes this branch too: replaced at the end
    xc = xc if xc > -746.0 else -746.0
    n = (xc * _LOG2E64 + _ROUND64) - _ROUND64
    r = (xc - n * _LN2HI64) - n * _LN2LO64
    p = ((((((_E13 * r + _E12) * r + _E11) * r + _E10) * r + _E9) * r + _E8) * r + _E7) * r + _E6
    p = (((((p * r + _E5) * r + _E4) * r + _E3) * r + _E2) * r + _E1) * r + _E0
    k = np.int64(n)
    k1 = k >> 1
    y = p * _from_bits((k1 + 1023) << 52, x) * _from_bits((k - k1 + 1023) << 52, x)
    y = np.inf if x > _EXP_MAX64 else y
    y = 0.0 if x < _EXP_MIN64 else y
    return x if x != x else y


@register_jitable(inline="always")
def _exp32(x):
    # Cephes expf: the same reduction with a two-part ln2, a degree-7 polynomial.
    xc = x if x < _F(89.0) else _F(89.0)
    xc = xc if xc > _F(-104.0) else _F(-104.0)
    n = (xc * _LOG2E32 + _ROUND32) - _ROUND32
    r = (xc - n * _LN2HI32) - n * _LN2LO32
    p = ((((_P0_32 * r + _P1_32) * r + _P2_32) * r + _P3_32) * r + _P4_32) * r + _P5_32
    p = p * (r * r) + r + _ONE32
    k = np.int64(n)
    k1 = k >> 1
    y = p * _from_bits((k1 + 127) << 23, x) * _from_bits((k - k1 + 127) << 23, x)
    y = _INF32 if x > _EXP_MAX32 else y
    y = _ZERO32 if x < _EXP_MIN32 else y
    return x if x != x else y


# --------------------------------------------------------------------- log1p
# fdlibm's log(1+f) = f - f^2/2 + s (f^2/2 + R(s^2)), s = f / (2 + f), on 1+x reduced to
# [sqrt(2)/2, sqrt(2)) with the rounding of 1+x corrected by c (musl's log1p / log1pf).
_LG64 = (
    6.666666666666735130e-01,
    3.999999999940941908e-01,
    2.857142874366239149e-01,
    2.222219843214978396e-01,
    1.818357216161805012e-01,
    1.531383769920937332e-01,
    1.479819860511658591e-01,
)
_LG1, _LG2, _LG3, _LG4, _LG5, _LG6, _LG7 = _LG64
_LG1_32, _LG2_32 = _F(float.fromhex("0xaaaaaa.0p-24")), _F(float.fromhex("0xccce13.0p-25"))
_LG3_32, _LG4_32 = _F(float.fromhex("0x91e9ee.0p-25")), _F(float.fromhex("0xf89e26.0p-26"))
_LN2HI_L32, _LN2LO_L32 = _F(6.9313812256e-01), _F(9.0580006145e-06)
_SQRT2M1_64, _SQRT2M1_NEG64 = 0.41421356237309503, -0.2928932188134524  # 1+x in [sqrt2/2, sqrt2)
_SQRT2M1_32, _SQRT2M1_NEG32 = _F(0.41421354), _F(-0.29289323)


@register_jitable(inline="always")
def _log1p64(x):
    u = 1.0 + x
    ub = _bits(u)
    hu = (ub >> 32) + (0x3FF00000 - 0x3FE6A09E)
    k = (hu >> 20) - 0x3FF
    c = (1.0 - (u - x)) if k >= 2 else (x - (u - 1.0))
    c = c / u if k < 54 else 0.0
    f = _from_bits((((hu & 0x000FFFFF) + 0x3FE6A09E) << 32) | (ub & 0xFFFFFFFF), x) - 1.0
    near = (x < _SQRT2M1_64) & (x >= _SQRT2M1_NEG64)  # no reduction: log1p(x) from x itself
    f = x if near else f
    c = 0.0 if near else c
    dk = 0.0 if near else np.float64(k)
    hfsq = 0.5 * f * f
    s = f / (2.0 + f)
    z = s * s
    w = z * z
    r = z * (_LG1 + w * (_LG3 + w * (_LG5 + w * _LG7))) + w * (_LG2 + w * (_LG4 + w * _LG6))
    y = s * (hfsq + r) + (dk * _LN2LO64 + c) - hfsq + f + dk * _LN2HI64
    y = x if (x == np.inf) | (x == 0.0) else y  # +-0 keeps its sign
    y = -np.inf if x == -1.0 else y
    return np.nan if x < -1.0 else (x if x != x else y)


@register_jitable(inline="always")
def _log1p32(x):
    u = _ONE32 + x
    ub = _bits(u)
    iu = ub + (0x3F800000 - 0x3F3504F3)
    k = (iu >> 23) - 0x7F
    c = (_ONE32 - (u - x)) if k >= 2 else (x - (u - _ONE32))
    c = c / u if k < 25 else _ZERO32
    f = _from_bits((iu & 0x007FFFFF) + 0x3F3504F3, x) - _ONE32
    near = (x < _SQRT2M1_32) & (x >= _SQRT2M1_NEG32)
    f = x if near else f
    c = _ZERO32 if near else c
    dk = _ZERO32 if near else _F(k)
    s = f / (_TWO32 + f)
    z = s * s
    w = z * z
    r = z * (_LG1_32 + w * _LG3_32) + w * (_LG2_32 + w * _LG4_32)
    hfsq = _HALF32 * f * f
    y = s * (hfsq + r) + (dk * _LN2LO_L32 + c) - hfsq + f + dk * _LN2HI_L32
    y = x if (x == _INF32) | (x == _ZERO32) else y
    y = -_INF32 if x == -_ONE32 else y
    return _NAN32 if x < -_ONE32 else (x if x != x else y)


# ---------------------------------------------------------------------- tanh
# Cephes: |x| >= 0.625: 1 - 2 / (exp(2|x|) + 1) with the sign of x; below, an odd
# rational (float64) / polynomial (float32) in x^2 that keeps small arguments accurate.
_TP0, _TP1, _TP2 = -9.64399179425052238628e-1, -9.92877231001918586564e1, -1.61468768441708447952e3
_TQ0, _TQ1, _TQ2 = 1.12811678491632931402e2, 2.23548839060100448583e3, 4.84406305325125486048e3
_T0_32, _T1_32, _T2_32 = _F(-5.70498872745e-3), _F(2.06390887954e-2), _F(-5.37397155531e-2)
_T3_32, _T4_32 = _F(1.33314422036e-1), _F(-3.33332819422e-1)
_TANH_SPLIT64, _TANH_SPLIT32 = 0.625, _F(0.625)


@register_jitable(inline="always")
def _tanh64(x):
    a = abs(x)
    big = 1.0 - 2.0 / (_exp64(a + a) + 1.0)
    big = big if x >= 0 else -big
    s = x * x
    small = x + x * s * (((_TP0 * s + _TP1) * s + _TP2) / (((s + _TQ0) * s + _TQ1) * s + _TQ2))
    small = x if x == 0.0 else small  # -0.0 stays -0.0
    return big if a >= _TANH_SPLIT64 else small


@register_jitable(inline="always")
def _tanh32(x):
    a = abs(x)
    big = _ONE32 - _TWO32 / (_exp32(a + a) + _ONE32)
    big = big if x >= _ZERO32 else -big
    s = x * x
    small = ((((_T0_32 * s + _T1_32) * s + _T2_32) * s + _T3_32) * s + _T4_32) * s * x + x
    small = x if x == _ZERO32 else small
    return big if a >= _TANH_SPLIT32 else small


@register_jitable(inline="always")
def _sigmoid64(x):
    return 1.0 / (1.0 + _exp64(-x))


@register_jitable(inline="always")
def _sigmoid32(x):
    return _ONE32 / (_ONE32 + _exp32(-x))


# ------------------------------------------------ public names: jit + arrays
def _by_dtype(f32, f64):
    def pick(x):
        if x == types.float32:
            return lambda x: f32(x)
        if x == types.float64:
            return lambda x: f64(x)
        return None

    return pick


def _elementwise(f):
    """A jitted loop ``out[i] = f(x[i])`` over flat arrays, f one of the overloaded scalar functions
    below. (A closure over a plain function: Numba's disk cache keys it by the function's name.)"""

    @njit(cache=True, error_model="numpy")
    def loop(x, out):
        for i in range(x.size):
            out[i] = f(x[i])

    return loop


def _mapped(loop, x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x)
    if x.dtype not in (np.float32, np.float64):
        raise TypeError(f"expected a float32 or float64 array, got {x.dtype}")
    out = np.empty_like(x)
    loop(x.reshape(-1), out.reshape(-1))
    return out


def exp(x: np.ndarray) -> np.ndarray:
    """e**x elementwise (<= 1 ulp f32, 1.5 f64). x: float32/float64 array (scalar in @njit) -> same dtype."""
    return _mapped(_map_exp, x)


def log1p(x: np.ndarray) -> np.ndarray:
    """log(1 + x) elementwise (<= 1 ulp). x: float32/float64 array (or scalar inside @njit) -> same dtype."""
    return _mapped(_map_log1p, x)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-x)) elementwise (<= 2.5 ulp). x: float32/float64 array (scalar in @njit) -> same."""
    return _mapped(_map_sigmoid, x)


def tanh(x: np.ndarray) -> np.ndarray:
    """tanh(x) elementwise (<= 1.5 ulp). x: float32/float64 array (or scalar inside @njit) -> same dtype."""
    return _mapped(_map_tanh, x)


_map_exp, _map_log1p = _elementwise(exp), _elementwise(log1p)
_map_sigmoid, _map_tanh = _elementwise(sigmoid), _elementwise(tanh)
overload(exp, inline="always")(_by_dtype(_exp32, _exp64))
overload(log1p, inline="always")(_by_dtype(_log1p32, _log1p64))
overload(sigmoid, inline="always")(_by_dtype(_sigmoid32, _sigmoid64))
overload(tanh, inline="always")(_by_dtype(_tanh32, _tanh64))
