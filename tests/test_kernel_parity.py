"""Every kernel of every loadable backend against ``gpumlp.kernels.reference``.

Inputs are made on the host with NumPy, moved with ``be.asarray`` and read back
with ``be.to_host``, so the same tests run on device backends. Tolerances are
explicit per dtype (see TOL and the comments where a kernel needs more).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import TOL, assert_close
from conftest import device_step as _device_step
from conftest import random_data as _data
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpumlp import backend
from gpumlp.data import scale_pixels
from gpumlp.kernels import activations
from gpumlp.kernels import reference as ref
from gpumlp.optim import OPTIMIZERS, RULES, Optimizer

DTYPES = (np.float32, np.float64)
# Reductions over the batch (bias_grad, batch norm, summed losses): NumPy adds float32 rows
# sequentially in float32, error ~ B * eps * |partial sums|; backends may accumulate in float64.
RED_TOL = {np.float32: (1e-4, 1e-4), np.float64: (1e-11, 1e-11)}
# GEMM: BLAS/cuBLAS may block the K-sum differently; error grows like sqrt(K) * eps.
MM_TOL = {np.float32: (1e-4, 1e-4), np.float64: (1e-11, 1e-11)}

SHAPES = [(1, 1), (1, 10), (3, 7), (100, 10), (33, 65), (64, 100), (257, 1030)]
SMALL_SHAPES = [(1, 1), (1, 10), (3, 7), (100, 10), (33, 65)]
HYP = settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
shapes_st = st.tuples(st.integers(1, 257), st.integers(1, 1030))


def _labels(b: int, k: int, seed=1, dtype=np.int64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, k, b).astype(dtype)


def _empty(be, shape, dtype):
    return be.xp.empty(shape, dtype=dtype)


def _pre(act: str, s):
    """What act_grad's ``pre=`` gets: the pre-activation s where the table says the derivative needs it."""
    return s if activations.needs_input(act) else None


# ================================================================== dense
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(  # one row or column of the result: numba's is a gemv
    "mkn", [(1, 1, 1), (3, 5, 7), (100, 784, 100), (257, 33, 1030), (1, 784, 100), (100, 784, 1)]
)
@pytest.mark.parametrize("trans", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("with_out", [False, True])
def test_matmul(be, dtype, mkn, trans, with_out):
    m, k, n = mkn
    ta, tb = trans
    a = _data((k, m) if ta else (m, k), dtype, 1)
    b = _data((n, k) if tb else (k, n), dtype, 2)
    expected = ref.matmul(a, b, trans_a=ta, trans_b=tb)
    out = _empty(be, (m, n), dtype) if with_out else None
    got = be.k.matmul(be.asarray(a), be.asarray(b), out=out, trans_a=ta, trans_b=tb)
    if with_out:
        assert got is out
    assert_close(expected, be.to_host(got), *MM_TOL[dtype], what=f"matmul{mkn}{trans}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "mkn", [(1, 1, 1), (3, 5, 7), (784, 100, 100), (33, 257, 65), (1, 300, 50), (50, 300, 1)]
)
@pytest.mark.parametrize("trans", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("l2", [0.0, 1e-2])
def test_sgd_matmul_step(be, dtype, mkn, trans, l2):
    # w -= lr * (op(a) @ op(b) + l2 * w): BLAS backends fold it into one GEMM (beta = 1 - lr*l2)
    # instead of rounding the product, then the step: a GEMM's tolerance, not bit-identical.
    m, k, n = mkn
    ta, tb = trans
    a, b = _data((k, m) if ta else (m, k), dtype, 1), _data((n, k) if tb else (k, n), dtype, 2)
    w = _data((m, n), dtype, 3)
    expected = w.copy()
    ref.sgd_matmul_step(expected, a, b, 0.05, l2, trans_a=ta, trans_b=tb)
    wd, work = be.asarray(w), _empty(be, (m, n), dtype)
    assert be.k.sgd_matmul_step(wd, be.asarray(a), be.asarray(b), 0.05, l2, ta, tb, work=work) is None
    assert_close(expected, be.to_host(wd), *MM_TOL[dtype], what=f"sgd_matmul_step{mkn}{trans}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_sgd_matmul_step_strided_operands(be, dtype):
    # a column slice (rows not contiguous) and no work buffer: BLAS backends fall back to
    # matmul + sgd_step instead of reading the wrong elements
    a, b, w = _data((20, 12), dtype, 1), _data((20, 9), dtype, 2), _data((6, 9), dtype, 3)
    expected = w.copy()
    ref.sgd_matmul_step(expected, a[:, ::2], b, 0.1, 1e-3, trans_a=True)
    wd = be.asarray(w)
    be.k.sgd_matmul_step(wd, be.asarray(a)[:, ::2], be.asarray(b), 0.1, 1e-3, trans_a=True)
    assert_close(expected, be.to_host(wd), *MM_TOL[dtype], what="sgd_matmul_step strided")


def test_numba_sgd_matmul_step_never_forms_the_gradient():
    # the fold's point: BLAS updates w from the GEMM, the work buffer stays untouched
    try:
        k = backend.get_backend("numba").k
    except backend.BackendUnavailable as e:
        pytest.skip(str(e))
    a, b, w = _data((50, 30), np.float32, 1), _data((50, 20), np.float32, 2), _data((30, 20), np.float32, 3)
    if not k._blas_ready(w, a, b, True, False):
        pytest.skip("NumPy's bundled OpenBLAS not found: numba forms the product (tested above)")
    work = np.full_like(w, np.nan)
    k.sgd_matmul_step(w, a, b, 0.1, 0.0, trans_a=True, work=work)
    assert np.isnan(work).all() and np.isfinite(w).all()


# ============================================================ dense chain
# (batch, widths): one to three layers, tile edges (1, 5, 7 rows; widths 1, 63, 65, 129) and more
# rows than one block of the numba kernel (48)
CHAINS = [(1, (3, 7)), (5, (784, 100, 10)), (7, (20, 65, 17, 1)), (97, (129, 64, 63, 10)),
          (300, (33, 16, 129, 5))]  # fmt: skip


def _chain_args(widths, dtype, seed=0):
    """Weights scaled by 1/sqrt(fan_in), so every layer's pre-activations stay O(1), and biases."""
    rng = np.random.default_rng(seed)
    ws = [(rng.standard_normal((k, n)) / math.sqrt(k)).astype(dtype) for k, n in zip(widths[:-1], widths[1:])]
    bs = [(0.1 * rng.standard_normal(n)).astype(dtype) for n in widths[1:]]
    return ws, bs


def _chain_acts(case: int, n_layers: int) -> list[str]:
    """The activations of chain ``case``: ref.ACTIVATIONS in turn across CHAINS' layers, so that
    every activation runs in some chain (first, middle or last layer)."""
    first = sum(len(w) - 1 for _, w in CHAINS[:case])
    return [ref.ACTIVATIONS[(first + i) % len(ref.ACTIVATIONS)] for i in range(n_layers)]


def test_chains_cover_every_activation():
    used = {a for i, (_, w) in enumerate(CHAINS) for a in _chain_acts(i, len(w) - 1)}
    assert used == set(ref.ACTIVATIONS)


def _dense_chain(be, x, ws, bs, acts, out=None, labels=None):
    """be.k.dense_chain on device copies -> (host activations, flag), the flag checked a Python bool."""
    ws, bs = [be.asarray(w) for w in ws], [be.asarray(b) for b in bs]
    got, flag = be.k.dense_chain(be.asarray(x), ws, bs, acts, out=out, labels=labels)
    assert type(flag) is bool, type(flag)
    return got, flag


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(len(CHAINS)), ids=[f"{b}x{'-'.join(map(str, w))}" for b, w in CHAINS])
@pytest.mark.parametrize("with_out", [False, True])
def test_dense_chain(be, dtype, case, with_out):
    batch, widths = CHAINS[case]
    x, (ws, bs) = _data((batch, widths[0]), dtype, case), _chain_args(widths, dtype, case)
    acts = _chain_acts(case, len(ws))
    expected, expected_flag = ref.dense_chain(x, ws, bs, acts)
    out = _empty(be, (batch, widths[-1]), dtype) if with_out else None
    got, flag = _dense_chain(be, x, ws, bs, acts, out=out)
    if with_out:
        assert got is out
    assert expected_flag is False and flag is False
    assert_close(expected, be.to_host(got), *MM_TOL[dtype], what=f"dense_chain {widths} {acts}")
    labels = be.xp.full(batch, -1, dtype=np.int64)  # and the arg-max, in the same call
    got, _ = _dense_chain(be, x, ws, bs, acts, out=out, labels=labels)
    np.testing.assert_array_equal(be.to_host(labels), be.to_host(got).argmax(axis=1))


def test_dense_chain_labels_take_the_first_maximum_or_the_first_nan(be):
    """labels follow np.argmax: ties go to the first column, a NaN wins. The NaN of row 1 is an
    overflow (3e38 * 2 = inf) plus a bias of -inf, in column 1 only."""
    x = be.asarray(np.array([[1, 0, 0], [3e38, 0, 0], [0, 1, 0], [0, 0, 0]], np.float32))
    w = be.asarray(np.array([[0, 2, 1], [5, 5, 0], [0, 0, 0]], np.float32))
    b = be.asarray(np.array([0, -np.inf, 0], np.float32))
    labels = be.xp.full(4, -1, dtype=np.int64)
    with np.errstate(over="ignore", invalid="ignore"):
        be.k.dense_chain(x, [w], [b], ["identity"], labels=labels)
    np.testing.assert_array_equal(be.to_host(labels), [2, 1, 0, 0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_chain_flags_nonfinite_products(be, dtype):
    """The flag: x @ weights[0] holds a NaN or inf, from a NaN/inf in x or from a finite x whose
    product overflows; a later layer's overflow is no sign of a bad x and does not set it."""
    widths = (20, 65, 17, 3)
    ws, bs = _chain_args(widths, dtype, 1)
    ws[0][4] = 2.0  # x[:, 4] * 2 overflows for x[:, 4] beyond half the dtype's range
    ws[0][7] = 0.0  # an input no unit reads: inf * 0 is still NaN
    ws[1][0] = 4.0  # unit 0 of layer 0 at a quarter of the range or more overflows layer 1
    acts = ["relu", "tanh", "identity"]
    big = float(np.finfo(dtype).max)
    cases = {  # (row, column, value of x there, expected flag)
        "ordinary": (0, 0, 1.0, False),
        "nan": (33, 5, np.nan, True),
        "+inf": (0, 19, np.inf, True),
        "-inf": (99, 0, -np.inf, True),
        "inf times 0": (10, 7, np.inf, True),
        "finite, first product overflows": (50, 4, 0.9 * big, True),
        "finite, second product overflows": (50, 4, 0.2 * big, False),
    }
    for name, (row, col, value, want) in cases.items():
        x = _data((100, widths[0]), dtype, 2)
        x[row, col] = value
        with np.errstate(all="ignore"):  # NumPy's matmul and activations of inf and NaN
            expected_flag = ref.dense_chain(x, ws, bs, acts)[1]
            _, flag = _dense_chain(be, x, ws, bs, acts)
        assert flag is expected_flag is want, name
        if name.startswith("finite"):  # the cases are what they say: x finite, and which product is not
            with np.errstate(all="ignore"):
                z0 = x[row] @ ws[0]
                z1 = np.maximum(z0 + bs[0], 0) @ ws[1]
            assert np.isfinite(x).all() and np.isfinite(z0).all() != want and not np.isfinite(z1).all()


def test_dense_chain_empty_batch(be):
    x, (ws, bs) = np.empty((0, 8), np.float32), _chain_args((8, 6, 3), np.float32)
    got, flag = _dense_chain(be, x, ws, bs, ["tanh", "identity"])
    assert be.to_host(got).shape == (0, 3) and flag is False


def _mismatched_chain(case: str):
    """dense_chain's arguments (x, weights, biases, acts) with one thing that does not chain."""
    x, (ws, bs) = _data((5, 8), np.float32, 1), _chain_args((8, 6, 3), np.float32)
    acts = ["relu", "identity"]
    return {
        "one weight too many": (x, ws + [ws[1]], bs, acts),
        "one bias too few": (x, ws, bs[:1], acts),
        "one activation too few": (x, ws, bs, acts[:1]),
        "no layer": (x, [], [], []),
        "rows not the previous width": (x, [ws[0], _chain_args((5, 3), np.float32)[0][0]], bs, acts),
        "rows not x's width": (x, [_chain_args((7, 6), np.float32)[0][0], ws[1]], bs, acts),
        "bias of the wrong width": (x, ws, [bs[0], bs[0]], acts),
        "2-d bias": (x, ws, [bs[0][None, :], bs[1]], acts),
    }[case]


@pytest.mark.parametrize(
    "case",
    ["one weight too many", "one bias too few", "one activation too few", "no layer",
     "rows not the previous width", "rows not x's width", "bias of the wrong width", "2-d bias"],
)  # fmt: skip
def test_dense_chain_rejects_mismatched_layers(be, case):
    x, ws, bs, acts = _mismatched_chain(case)
    with pytest.raises(ValueError, match="dense_chain: "):
        _dense_chain(be, x, ws, bs, acts)


def _numba_kernels():
    try:
        return backend.get_backend("numba").k
    except backend.BackendUnavailable as e:
        pytest.skip(str(e))


@pytest.mark.parametrize("dtype", DTYPES)
def test_numba_dense_chain_rows_do_not_depend_on_the_batch(dtype):
    """Every element is one FMA chain over k in order (numba_tiles), and the activations run
    along a row, whatever the tile, block or thread the row falls in: 4096 rows (split between
    threads) equal, bit for bit, the same rows run as a one-row batch (one thread), then rows
    1-99 (every tile shifted by a row) and the rest (split between threads elsewhere)."""
    k = _numba_kernels()
    widths = (784, 100, 63, 10)
    x, (ws, bs) = _data((4096, widths[0]), dtype, 3), _chain_args(widths, dtype, 3)
    acts = ["tanh", "gelu_tanh", "sigmoid"]  # the polynomial activations, whose loops vectorise
    whole, flag = k.dense_chain(x, ws, bs, acts)
    parts = [k.dense_chain(x[s], ws, bs, acts)[0] for s in (slice(0, 1), slice(1, 100), slice(100, 4096))]
    assert not flag
    np.testing.assert_array_equal(np.concatenate(parts), whole)


@pytest.mark.parametrize("row", [0, 2047, 3000, 4095])
def test_numba_dense_chain_flags_a_nonfinite_row_in_any_thread(row):
    """A NaN in any thread's slice of a parallel batch sets the flag, and stays in its row; the
    next clean call (same scratch) is not flagged."""
    k = _numba_kernels()
    widths = (784, 100, 10)
    x, (ws, bs) = _data((4096, widths[0]), np.float32, 4), _chain_args(widths, np.float32, 4)
    acts = ["tanh", "identity"]  # NaN through (numba's relu maps it to 0)
    clean, clean_flag = k.dense_chain(x, ws, bs, acts)
    x[row, 123] = np.nan
    got, flag = k.dense_chain(x, ws, bs, acts)
    assert flag is True and not clean_flag
    assert np.isnan(got[row]).all()
    np.testing.assert_array_equal(np.delete(got, row, axis=0), np.delete(clean, row, axis=0))
    x[row, 123] = 0.5
    assert k.dense_chain(x, ws, bs, acts)[1] is False


@pytest.mark.parametrize(
    "case",
    ["Fortran-ordered x", "strided x", "float64 x", "float16 throughout", "a float64 weight",
     "a float64 bias", "a Fortran-ordered weight", "a transposed out"],
)  # fmt: skip
def test_numba_dense_chain_rejects_layouts_and_dtypes_it_cannot_tile(case):
    """The tiles read x and the weights by rows of one float dtype: anything else is a ValueError,
    not a silent copy (the model hands it C-contiguous arrays of its dtype)."""
    k = _numba_kernels()
    x, (ws, bs) = _data((10, 8), np.float32, 1), _chain_args((8, 6, 3), np.float32)
    out = None
    if case == "Fortran-ordered x":
        x = np.asfortranarray(x)
    elif case == "strided x":
        x = _data((10, 16), np.float32, 1)[:, ::2]
    elif case == "float64 x":
        x = x.astype(np.float64)
    elif case == "float16 throughout":
        f16 = np.float16
        x, ws, bs = x.astype(f16), [w.astype(f16) for w in ws], [b.astype(f16) for b in bs]
    elif case == "a float64 weight":
        ws[1] = ws[1].astype(np.float64)
    elif case == "a float64 bias":
        bs[1] = bs[1].astype(np.float64)
    elif case == "a Fortran-ordered weight":
        ws[0] = np.asfortranarray(ws[0])
    else:
        out = np.empty((3, 10), np.float32).T
    with pytest.raises(ValueError, match="dense_chain: "):
        k.dense_chain(x, ws, bs, ["relu", "identity"], out=out)


# ============================================================ activations
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ref.ACTIVATIONS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_out", [False, True])
def test_bias_act(be, dtype, act, shape, with_out):
    z, b = _data(shape, dtype, 1, 3.0), _data(shape[1:], dtype, 2)
    out = _empty(be, shape, dtype) if with_out else None
    got = be.k.bias_act(be.asarray(z), be.asarray(b), act, out=out)
    if with_out:
        assert got is out
    assert_close(ref.bias_act(z, b, act), be.to_host(got), *TOL[dtype], what=f"bias_act {act}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ref.ACTIVATIONS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_out", [False, True])
def test_act_grad(be, dtype, act, shape, with_out):
    # y is a genuine activation output (relu zeros, sigmoid in (0,1), ...) of the pre-activation s
    s = _data(shape, dtype, 1, 3.0)
    y, pre = ref.bias_act(s, np.zeros(shape[1], dtype), act), _pre(act, s)
    gout = _data(shape, dtype, 2)
    out = _empty(be, shape, dtype) if with_out else None
    dpre = None if pre is None else be.asarray(pre)
    got = be.k.act_grad(be.asarray(gout), be.asarray(y), act, out=out, pre=dpre)
    if with_out:
        assert got is out
    assert_close(ref.act_grad(gout, y, act, pre=pre), be.to_host(got), *TOL[dtype], what=f"act_grad {act}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ["identity", "sigmoid", "tanh", "relu", "leaky_relu"])
def test_host_act_grad_of_the_arithmetic_derivatives_is_the_references_bit_for_bit(be, dtype, act):
    """These derivatives are a product or two in the activation's dtype; numba once formed
    1 - y and the leaky slope in float64 for float32 data (an int literal, a Python float),
    1 ulp off the reference. On CUDA, nvcc may fuse 1 - y*y into an FMA: tolerance applies."""
    if be.name not in ("numpy", "numba"):
        pytest.skip("host backends only: CUDA compilers contract multiply-adds")
    s, gout = _data((257, 1030), dtype, 1, 3.0), _data((257, 1030), dtype, 2)
    y = ref.bias_act(s, np.zeros(1030, dtype), act)
    got = be.to_host(be.k.act_grad(be.asarray(gout), be.asarray(y), act))
    np.testing.assert_array_equal(got, ref.act_grad(gout, y, act))
    if act in ("identity", "relu", "leaky_relu"):  # forward: one add and at most one product
        b = _data((1030,), dtype, 3)
        np.testing.assert_array_equal(be.to_host(be.k.bias_act(be.asarray(s), be.asarray(b), act)),
                                      ref.bias_act(s, b, act))  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ref.ACTIVATIONS)
def test_bias_act_of_nan_inf_and_signed_zeros_is_the_references(be, dtype, act):
    """NaN in, NaN out for every activation (a diverged step must reach the loss), and the
    reference's values at +-inf and +-0."""
    z = np.array([[np.nan, np.inf, -np.inf, -0.0, 0.0, 1.5, -1.5]], dtype)
    b = np.zeros(z.shape[1], dtype)
    with np.errstate(all="ignore"):
        expected = ref.bias_act(z, b, act)
        got = be.to_host(be.k.bias_act(be.asarray(z), be.asarray(b), act))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected), err_msg=act)
    finite = ~np.isnan(expected)
    assert_close(expected[finite], got[finite], *TOL[dtype], what=act)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ref.ACTIVATIONS)
def test_bias_act_keeps_the_pre_activation(be, dtype, act):
    # pre receives z + b: one rounding of one add on every backend, so bit for bit
    z, b = _data((33, 65), dtype, 1, 3.0), _data((65,), dtype, 2)
    pre = _empty(be, z.shape, dtype)
    y = be.k.bias_act(be.asarray(z), be.asarray(b), act, pre=pre)
    np.testing.assert_array_equal(be.to_host(pre), z + b)
    assert_close(ref.bias_act(z, b, act), be.to_host(y), *TOL[dtype], what=f"bias_act {act} with pre")


def test_unknown_activation_is_value_error(be):
    z = be.asarray(np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="relu"):
        be.k.bias_act(z, be.asarray(np.zeros(3, np.float32)), "swish")
    with pytest.raises(ValueError, match="relu"):
        be.k.act_grad(z, z, "swish")


@pytest.mark.parametrize("act", [a for a in ref.ACTIVATIONS if activations.needs_input(a)])
def test_act_grad_without_a_needed_pre_activation_is_value_error(be, act):
    z = be.asarray(np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match=f"derivative of '{act}' needs the pre-activation: pass pre="):
        be.k.act_grad(z, z, act)


@HYP
@given(shape=shapes_st, act=st.sampled_from(ref.ACTIVATIONS), seed=st.integers(0, 2**16))
@pytest.mark.parametrize("dtype", DTYPES)
def test_bias_act_act_grad_hypothesis(be, dtype, shape, act, seed):
    z, b, g = _data(shape, dtype, seed, 3.0), _data(shape[1:], dtype, seed + 1), _data(shape, dtype, seed + 2)
    y, pre = ref.bias_act(z, b, act), _pre(act, z + b)
    assert_close(
        y, be.to_host(be.k.bias_act(be.asarray(z), be.asarray(b), act)), *TOL[dtype], what="bias_act"
    )
    got = be.k.act_grad(be.asarray(g), be.asarray(y), act, pre=None if pre is None else be.asarray(pre))
    assert_close(ref.act_grad(g, y, act, pre=pre), be.to_host(got), *TOL[dtype], what="act_grad")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_out", [False, True])
def test_bias_grad(be, dtype, shape, with_out):
    gz = _data(shape, dtype, 3)
    out = _empty(be, shape[1:], dtype) if with_out else None
    got = be.k.bias_grad(be.asarray(gz), out=out)
    if with_out:
        assert got is out
    assert_close(ref.bias_grad(gz), be.to_host(got), *RED_TOL[dtype], what="bias_grad")


@pytest.mark.parametrize("src_shape", [(50, 784), (10, 3, 4), (1000,), (7, 1)])
@pytest.mark.parametrize("src_dtype", [np.float32, np.float64, np.uint8, np.int64])
@pytest.mark.parametrize("with_out", [False, True])
def test_gather_rows(be, src_shape, src_dtype, with_out):
    src = (np.random.default_rng(4).random(src_shape) * 200).astype(src_dtype)
    idx = np.random.default_rng(5).integers(0, src_shape[0], 33)  # repeats included
    expected = ref.gather_rows(src, idx)
    out = _empty(be, expected.shape, src_dtype) if with_out else None
    got = be.k.gather_rows(be.asarray(src), be.asarray(idx), out=out)
    if with_out:
        assert got is out
    np.testing.assert_array_equal(be.to_host(got), expected)  # a copy: exact


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [(127.5, -1.0), (255.0, 0.0)])
@pytest.mark.parametrize("with_out", [False, True])
def test_gather_pixels(be, dtype, scale, with_out):
    codes = np.random.default_rng(4).integers(0, 256, (300, 49), dtype=np.uint8)
    codes[:2] = [[0], [255]]  # both ends of the code range
    idx = np.random.default_rng(5).integers(0, 300, 257).astype(np.int32)  # > one block, repeats
    idx[:2] = [0, 1]
    expected = ref.gather_pixels(codes, idx, *scale, dtype)
    decoded = scale_pixels(codes, "-1,1" if scale[1] else "0,1", dtype)
    np.testing.assert_array_equal(expected, decoded[idx])  # the reference is scale_pixels, bit for bit
    out = _empty(be, expected.shape, dtype) if with_out else None
    got = be.k.gather_pixels(be.asarray(codes), be.asarray(idx), *scale, dtype, out=out)
    if with_out:
        assert got is out
    assert be.to_host(got).dtype == dtype
    np.testing.assert_array_equal(be.to_host(got), expected)  # one rounded division and add: exact


@pytest.mark.parametrize("codes", [np.zeros((4, 3), np.float32), np.zeros((4, 3, 1), np.uint8)])
def test_gather_pixels_rejects_codes_that_are_not_2d_uint8(be, codes):
    with pytest.raises(ValueError, match="codes must be a C-contiguous 2-D uint8 array"):
        be.k.gather_pixels(be.asarray(codes), be.asarray(np.zeros(2, np.int32)), 255.0, 0.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("max_shift", [0, 2])
@pytest.mark.parametrize("with_out", [False, True])
def test_gather_shifted_pixels(be, dtype, max_shift, with_out):
    codes = np.random.default_rng(6).integers(0, 256, (50, 49), dtype=np.uint8)  # 7x7 images
    idx = np.random.default_rng(7).integers(0, 50, 257).astype(np.int32)  # > one block, repeats
    expected = ref.gather_shifted_pixels(codes, idx, max_shift, 3, 127.5, -1.0, dtype, step=11)
    decoded = scale_pixels(codes, "-1,1", dtype)
    np.testing.assert_array_equal(expected, ref.gather_shifted(decoded, idx, max_shift, seed=3, step=11))
    out = _empty(be, expected.shape, dtype) if with_out else None
    t = _device_step(be, 11)
    got = be.k.gather_shifted_pixels(be.asarray(codes), be.asarray(idx), max_shift, 3, 127.5, -1.0, dtype,
                                     step=t, out=out)  # fmt: skip
    if with_out:
        assert got is out
    np.testing.assert_array_equal(be.to_host(got), expected)


def _edge_shift(img: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """A square image translated by (dy, dx), uncovered pixels repeating the edge (by padding)."""
    s = max(abs(dy), abs(dx))
    padded = np.pad(img, s, mode="edge")
    return padded[s - dy : s - dy + img.shape[0], s - dx : s - dx + img.shape[1]]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("max_shift", [0, 1, 2, 6])
@pytest.mark.parametrize("with_out", [False, True])
def test_gather_shifted(be, dtype, max_shift, with_out):
    src = _data((50, 49), dtype, seed=6)  # 7x7 images
    idx = np.random.default_rng(7).integers(0, 50, 257).astype(np.int32)  # > one block, repeats
    expected = ref.gather_shifted(src, idx, max_shift, seed=3, step=11)
    out = _empty(be, expected.shape, dtype) if with_out else None
    t = _device_step(be, 11)
    got = be.k.gather_shifted(be.asarray(src), be.asarray(idx), max_shift, 3, step=t, out=out)
    if with_out:
        assert got is out
    np.testing.assert_array_equal(be.to_host(got), expected)  # a permuted copy: exact
    host_step = be.k.gather_shifted(be.asarray(src), be.asarray(idx.astype(np.int64)), max_shift, 3, step=11)
    np.testing.assert_array_equal(be.to_host(host_step), expected)


def test_gather_shifted_draws_every_shift_in_range():
    """Each row is its source image translated by some (dy, dx) in [-s, s]^2 with edges
    repeated; over many rows every shift occurs, and the next step draws new ones."""
    s, side = 2, 6
    src = np.random.default_rng(0).random((10, side * side))
    idx = np.arange(400) % 10
    out = ref.gather_shifted(src, idx, s, seed=1, step=5).reshape(-1, side, side)
    shifts = [(dy, dx) for dy in range(-s, s + 1) for dx in range(-s, s + 1)]
    seen = set()
    for r, i in enumerate(idx):
        img = src[i].reshape(side, side)
        match = [d for d in shifts if np.array_equal(_edge_shift(img, *d), out[r])]
        assert len(match) == 1, f"row {r} is not one edge-shift of image {i} within {s}"
        seen.add(match[0])
    assert seen == set(shifts)
    assert not np.array_equal(ref.gather_shifted(src, idx, s, seed=1, step=6), out.reshape(400, -1))
    np.testing.assert_array_equal(ref.gather_shifted(src, idx, 0, seed=1, step=5), src[idx])


def test_gather_shifted_rejects_bad_images(be):
    x = be.asarray(np.zeros((3, 10), np.float32))
    idx = be.asarray(np.zeros(2, np.int32))
    with pytest.raises(ValueError, match="10 features is not a square"):
        be.k.gather_shifted(x, idx, 1, 0)
    with pytest.raises(ValueError, match=r"max_shift must be in \[0, 3\)"):
        be.k.gather_shifted(be.asarray(np.zeros((3, 9), np.float32)), idx, 3, 0)


@pytest.mark.parametrize("n", [0, 1, 2, 255, 256, 1000, 60000])
@pytest.mark.parametrize("seed", [0, 2**32 + 7])
def test_permutation_bit_identical(be, n, seed):
    expected = ref.permutation(seed, n, epoch=4)
    assert expected.dtype == np.int32 and np.array_equal(np.sort(expected), np.arange(n))
    got = be.k.permutation(seed, n, epoch=4)
    np.testing.assert_array_equal(be.to_host(got), expected)
    out = _empty(be, (n,), np.int32)
    assert be.k.permutation(seed, n, 4, out=out) is out
    np.testing.assert_array_equal(be.to_host(out), expected)


def test_permutation_is_fresh_each_epoch_and_well_mixed():
    n = 10000
    perms = [ref.permutation(1, n, epoch) for epoch in range(3)]
    assert not np.array_equal(perms[0], perms[1]) and not np.array_equal(perms[1], perms[2])
    # a uniform shuffle leaves ~1 fixed point and no correlation between position and index
    for p in perms:
        assert (p == np.arange(n)).sum() < 10
        assert abs(np.corrcoef(p, np.arange(n))[0, 1]) < 0.05
    with pytest.raises(ValueError, match="n must be in"):
        ref.permutation(0, -1)


# ================================================================= losses
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_out", [False, True])
def test_softmax(be, dtype, shape, with_out):
    z = _data(shape, dtype, 6, 4.0)
    out = _empty(be, shape, dtype) if with_out else None
    got = be.k.softmax(be.asarray(z), out=out)
    if with_out:
        assert got is out
    assert_close(ref.softmax(z), be.to_host(got), *TOL[dtype], what="softmax")


LOSSES = ("softmax_xent", "sigmoid_bce", "mse")


def _check_loss(be, name, z, labels, dtype, grad_scale, with_out):
    exp_loss, exp_grad = getattr(ref, name)(z, labels, grad_scale=grad_scale)
    grad = _empty(be, z.shape, dtype) if with_out else None
    loss, got = getattr(be.k, name)(be.asarray(z), be.asarray(labels), grad=grad, grad_scale=grad_scale)
    if with_out:
        assert got is grad
    host_loss = be.to_host(loss)
    assert host_loss.shape == () and host_loss.dtype == dtype, f"{name} loss must be 0-d {dtype.__name__}"
    assert_close(exp_loss, host_loss, *RED_TOL[dtype], what=f"{name} loss")
    assert_close(exp_grad, be.to_host(got), *TOL[dtype], what=f"{name} grad")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mean", [False, True])
@pytest.mark.parametrize("with_out", [False, True])
def test_losses(be, dtype, name, shape, mean, with_out):
    # scale 3: logits up to ~+-12; saturated logits are covered by test_sigmoid_bce_huge_logits_finite
    z = _data(shape, dtype, 7, 3.0)
    labels = _labels(shape[0], shape[1], 8)
    _check_loss(be, name, z, labels, dtype, 1.0 / shape[0] if mean else 1.0, with_out)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("label_dtype", [np.int32, np.uint8])
def test_losses_other_label_dtypes(be, name, label_dtype):
    z = _data((20, 10), np.float32, 9)
    _check_loss(be, name, z, _labels(20, 10, 10, label_dtype), np.float32, 0.05, False)


@HYP
@given(shape=shapes_st, name=st.sampled_from(LOSSES), seed=st.integers(0, 2**16), mean=st.booleans())
@pytest.mark.parametrize("dtype", DTYPES)
def test_losses_hypothesis(be, dtype, shape, name, seed, mean):
    z = _data(shape, dtype, seed, 3.0)
    labels = _labels(shape[0], shape[1], seed + 1)
    _check_loss(be, name, z, labels, dtype, 1.0 / shape[0] if mean else 1.0, True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_correct_count(be, dtype, shape):
    # small integer scores make ties frequent: the first maximum must win
    scores = np.random.default_rng(11).integers(0, 3, shape).astype(dtype)
    labels = _labels(shape[0], shape[1], 12)
    got = be.to_host(be.k.correct_count(be.asarray(scores), be.asarray(labels)))
    expected = ref.correct_count(scores, labels)
    assert got.shape == () and got.dtype == np.int64
    assert int(got) == int(expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", LOSSES)
def test_losses_and_count_add_into_device_accumulators(be, dtype, name):
    z = _data((37, 10), dtype, 13, 3.0)
    labels = _labels(37, 10, 14)
    start = dtype(2.5)
    acc = be.asarray(np.asarray(start, dtype=dtype))
    count = be.asarray(np.asarray(7, dtype=np.int64))
    loss, _ = getattr(be.k, name)(be.asarray(z), be.asarray(labels), loss=acc)
    got = be.k.correct_count(be.asarray(z), be.asarray(labels), count=count)
    assert loss is acc and got is count  # accumulated in place, nothing new allocated
    expected = getattr(ref, name)(z, labels)[0] + start
    assert_close(np.asarray(expected), be.to_host(acc), *RED_TOL[dtype], what=f"{name} accumulator")
    assert int(be.to_host(count)) == 7 + int(ref.correct_count(z, labels))


# ============================================================= optimizers
# Every optimizer of gpumlp.optim.RULES, called with the arguments the training loop builds
# (Optimizer.kernel_kwargs); HYPER moves some hyper-parameters off their defaults (lr 0.01 else).
HYPER = {
    "sgd": {"lr": 0.1},
    "momentum": {"lr": 0.05, "momentum": 0.9},
    "nesterov": {"lr": 0.05, "momentum": 0.8},
    "adagrad": {"lr": 0.1},
    "rmsprop": {"lr": 0.01, "rho": 0.95},
    "adam": {"lr": 1e-3},
}
DECAY = {
    "none": {"weight_decay": 0.0},
    "l2": {"l2": 1e-2},  # with each optimizer's default weight decay (AdamW's 0.01)
    "l1": {"l1": 1e-3},
    "l1+l2+wd": {"l2": 5e-3, "l1": 1e-3, "weight_decay": 0.05},
}


def _run_optimizer(be, opt, decay, shape, dtype, steps=3, seed=13, device_t=True):
    o = Optimizer(opt, **{"lr": 0.01, **HYPER.get(opt, {}), **DECAY[decay]})
    fn_ref, fn = getattr(ref, o.rule.kernel), getattr(be.k, o.rule.kernel)
    w = _data(shape, dtype, seed)
    w[..., :1] = 0  # sign(0) = 0 for the l1 term
    state = [np.zeros(shape, dtype) for _ in o.rule.state]
    dw, dstate = be.asarray(w.copy()), [be.asarray(s.copy()) for s in state]
    for t in range(1, steps + 1):
        g = _data(shape, dtype, seed + t)
        assert fn_ref(w, g, *state, o.lr, **o.kernel_kwargs(t, decayed=True)) is None
        dt = _device_step(be, t) if device_t and o.rule.step else t
        assert fn(dw, be.asarray(g), *dstate, o.lr, **o.kernel_kwargs(dt, decayed=True)) is None
    for name, e, d in zip(["w", *o.rule.state], [w, *state], [dw, *dstate]):
        assert_close(e, be.to_host(d), *TOL[dtype], what=f"{opt}/{decay} {name}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("opt", OPTIMIZERS)
@pytest.mark.parametrize("decay", DECAY)
@pytest.mark.parametrize("shape", [(1,), (10,), (7, 3), (100, 10), (784, 100)])
def test_optimizer_steps(be, dtype, opt, decay, shape):
    _run_optimizer(be, opt, decay, shape, dtype)


@HYP
@given(n=st.integers(1, 5000), opt=st.sampled_from(list(OPTIMIZERS)), decay=st.sampled_from(list(DECAY)))
@pytest.mark.parametrize("dtype", DTYPES)
def test_optimizer_hypothesis(be, dtype, n, opt, decay):
    _run_optimizer(be, opt, decay, (n,), dtype, steps=2, seed=n, device_t=False)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", sorted({r.kernel for r in RULES.values() if r.step}))
def test_adam_late_step_on_device(be, dtype, kernel):
    """Bias correction at a large t read from the device, as a replayed CUDA graph does."""
    w, g = _data((50,), dtype, 3), _data((50,), dtype, 4)
    m, v = np.abs(_data((50,), dtype, 5)) * 0.1, np.abs(_data((50,), dtype, 6)) * 0.01
    dw, dm, dv = (be.asarray(a.copy()) for a in (w, m, v))
    getattr(ref, kernel)(w, g, m, v, lr=1e-3, t=12345)
    getattr(be.k, kernel)(dw, be.asarray(g), dm, dv, lr=1e-3, t=_device_step(be, 12345))
    assert_close(w, be.to_host(dw), *TOL[dtype], what=f"{kernel} t=12345")


def test_step_must_be_one_int(be):
    with pytest.raises((ValueError, TypeError), match="step|t "):
        be.k.dropout_forward(be.asarray(np.ones((2, 2))), 0.5, 1, step=be.asarray(np.array([1.0, 2.0])))


# ======================================================== gradient clipping
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 7, 1000, 100_003])
def test_sum_squares_and_clip_scale(be, dtype, n):
    a, b = _data((n,), dtype, 30), _data((n // 2 + 1,), dtype, 31, 3.0)
    expected = ref.sum_squares(a, out=ref.sum_squares(b), accumulate=True)
    got = be.k.sum_squares(be.asarray(a))
    assert_close(ref.sum_squares(a), be.to_host(got), *RED_TOL[dtype], what="sumsq")
    acc = be.xp.zeros((), dtype=dtype)
    assert be.k.sum_squares(be.asarray(b), out=acc) is acc
    be.k.sum_squares(be.asarray(a), out=acc, accumulate=True)
    assert_close(expected, be.to_host(acc), *RED_TOL[dtype], what="sumsq accumulated")
    be.k.sum_squares(be.asarray(b), out=acc)  # accumulate=False overwrites
    assert_close(ref.sum_squares(b), be.to_host(acc), *RED_TOL[dtype], what="sumsq overwritten")
    for max_norm in (0.5 * math.sqrt(float(expected)), 2.0 * math.sqrt(float(expected))):
        e, d = a.copy(), be.asarray(a)
        ref.clip_scale(e, expected, max_norm)
        be.k.clip_scale(d, be.asarray(expected), max_norm)
        assert_close(e, be.to_host(d), *TOL[dtype], what=f"clip_scale to {max_norm:.3g}")
    assert np.array_equal(e, a)  # the larger bound leaves g alone


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 7, 1000, 100_003])
def test_clip_value(be, dtype, n):
    a = _data((n,), dtype, 32, 2.0)
    a[0] = np.nan  # stays NaN: clipping must not hide a diverging run
    for value in (0.1, 1.0, 1e9):
        e, d = a.copy(), be.asarray(a)
        ref.clip_value(e, value)
        assert be.k.clip_value(d, value) is None
        # exact: a comparison and a copy of either g or the bound rounded to g's dtype
        np.testing.assert_array_equal(be.to_host(d), e, err_msg=f"clip_value {value}")
    assert np.isnan(e[0]) and np.array_equal(e[1:], a[1:])  # 1e9 leaves the rest alone


def test_clip_value_by_hand(be):
    g = be.asarray(np.array([[-3.0, -0.5, 0.0], [0.25, 2.0, np.inf]], np.float32))
    be.k.clip_value(g, 0.5)
    np.testing.assert_array_equal(be.to_host(g), [[-0.5, -0.5, 0.0], [0.25, 0.5, 0.5]])


# ================================================================ dropout
# Random123's published known-answer vectors for Philox4x32-10: (counter, key, output).
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("counter, key, expected", PHILOX_KAT)
def test_reference_philox_known_answers(counter, key, expected):
    assert tuple(int(w) for w in ref._philox4x32(counter, key)) == expected


def test_every_backend_draws_the_published_philox_stream(be):
    """Seed 0, step 0: elements 0..3 are the words of Philox4x32-10 at counter 0, key 0 (the
    first KAT), so every backend's dropout and shuffle stream is the published generator."""
    u = be.to_host(be.k.hash_uniform(0, 4, 0))
    np.testing.assert_array_equal(u * 2**24, [w >> 8 for w in PHILOX_KAT[0][2]])
    stream = (4, 7)  # block 1 of step 0 with seed 2^32 * 7 + 4 is the counter (1, 0, 0, 0), key (4, 7)
    words = ref._philox4x32((1, 0, 0, 0), stream)
    seed = stream[1] << 32 | stream[0]
    np.testing.assert_array_equal(
        be.to_host(be.k.hash_uniform(seed, 8, 0))[4:] * 2**24, [w >> 8 for w in words]
    )


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**31 + 7, 2**40 + 3, -5])
@pytest.mark.parametrize("n", [1, 7, 1000, 100_003])
def test_hash_uniform_bit_identical(be, seed, n):
    np.testing.assert_array_equal(be.to_host(be.k.hash_uniform(seed, n)), ref.hash_uniform(seed, n))


@pytest.mark.parametrize("step", [1, 2, 2**32 + 1, 2**40 + 77])
def test_hash_uniform_step_on_device(be, step):
    expected = ref.hash_uniform(5, 1000, step)
    assert not np.array_equal(expected, ref.hash_uniform(5, 1000, step + 1))  # each step draws anew
    np.testing.assert_array_equal(be.to_host(be.k.hash_uniform(5, 1000, step)), expected)
    np.testing.assert_array_equal(be.to_host(be.k.hash_uniform(5, 1000, _device_step(be, step))), expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9])
@pytest.mark.parametrize("with_out", [False, True])
def test_dropout_bit_identical(be, dtype, shape, p, with_out):
    x = _data(shape, dtype, 14)
    step = 3 + shape[0]
    e_out, e_mask = ref.dropout_forward(x, p, seed=99, step=step)
    bufs = {"out": _empty(be, shape, dtype), "mask": _empty(be, shape, dtype)} if with_out else {}
    out, mask = be.k.dropout_forward(be.asarray(x), p, 99, **bufs, step=_device_step(be, step))
    if with_out:
        assert out is bufs["out"] and mask is bufs["mask"]
    np.testing.assert_array_equal(be.to_host(mask), e_mask)  # same hash, same rounding: exact
    np.testing.assert_array_equal(be.to_host(out), e_out)
    g = _data(shape, dtype, 15)
    dx = _empty(be, shape, dtype) if with_out else None
    got = be.k.dropout_backward(be.asarray(g), mask, out=dx)
    np.testing.assert_array_equal(be.to_host(got), ref.dropout_backward(g, e_mask))


@HYP
@given(shape=shapes_st, p=st.floats(0.0, 0.95), seed=st.integers(-(2**40), 2**40))
@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_hypothesis(be, dtype, shape, p, seed):
    x = _data(shape, dtype, 16)
    e_out, e_mask = ref.dropout_forward(x, p, seed)
    out, mask = be.k.dropout_forward(be.asarray(x), p, seed)
    np.testing.assert_array_equal(be.to_host(mask), e_mask)
    np.testing.assert_array_equal(be.to_host(out), e_out)


# ============================================================= batch norm
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 1), (3, 7), (100, 10), (64, 100), (257, 1030)])
@pytest.mark.parametrize("with_out", [False, True])
def test_batchnorm(be, dtype, shape, with_out):
    x = _data(shape, dtype, 17, 2.0) + np.asarray(0.5, dtype)
    gamma, beta = _data(shape[1:], dtype, 18), _data(shape[1:], dtype, 19)
    e = ref.batchnorm_forward(x, gamma, beta, eps=1e-5)
    bufs = {"out": _empty(be, shape, dtype), "xhat": _empty(be, shape, dtype)} if with_out else {}
    if with_out:
        bufs.update(mean=_empty(be, shape[1:], dtype), var=_empty(be, shape[1:], dtype))
    got = be.k.batchnorm_forward(be.asarray(x), be.asarray(gamma), be.asarray(beta), eps=1e-5, **bufs)
    if with_out:
        assert all(a is b for a, b in zip(got, bufs.values()))
    # stats are batch reductions: RED_TOL (reference float32 sums rows sequentially in float32)
    for name, a, b in zip(["out", "xhat", "mean", "var"], e, got):
        assert_close(a, be.to_host(b), *RED_TOL[dtype], what=f"batchnorm_forward {name}")
    # running statistics, updated in place by the same launch
    run = [np.abs(_data(shape[1:], dtype, s)) for s in (25, 26)]
    d_run = [be.asarray(r.copy()) for r in run]
    ref.batchnorm_forward(x, gamma, beta, 1e-5, running_mean=run[0], running_var=run[1], momentum=0.8)
    be.k.batchnorm_forward(
        be.asarray(x), be.asarray(gamma), be.asarray(beta), 1e-5,
        running_mean=d_run[0], running_var=d_run[1], momentum=0.8,
    )  # fmt: skip
    for name, a, b in zip(["running_mean", "running_var"], run, d_run):
        assert_close(a, be.to_host(b), *RED_TOL[dtype], what=f"batchnorm_forward {name}")

    g = _data(shape, dtype, 20)
    e_dx, e_dg, e_db = ref.batchnorm_backward(g, e[1], gamma, e[3])
    names = ("dx", "dgamma", "dbeta")
    outs = dict(zip(names, (_empty(be, s, dtype) for s in (shape, shape[1:], shape[1:])))) if with_out else {}
    args = [be.asarray(a) for a in (g, e[1], gamma, e[3])]
    got_dx, got_dg, got_db = be.k.batchnorm_backward(*args, eps=1e-5, **outs)
    if with_out:
        assert all(a is b for a, b in zip((got_dx, got_dg, got_db), outs.values()))
    for name, a, b in zip(["dx", "dgamma", "dbeta"], (e_dx, e_dg, e_db), (got_dx, got_dg, got_db)):
        assert_close(a, be.to_host(b), *RED_TOL[dtype], what=f"batchnorm_backward {name}")

    mean, var = (
        np.abs(_data(shape[1:], dtype, 21)),
        np.abs(_data(shape[1:], dtype, 22)) + np.asarray(0.1, dtype),
    )
    out = _empty(be, shape, dtype) if with_out else None
    args = [be.asarray(a) for a in (x, gamma, beta, mean, var)]
    got = be.k.batchnorm_inference(*args, eps=1e-3, out=out)
    if with_out:
        assert got is out
    expected = ref.batchnorm_inference(x, gamma, beta, mean, var, eps=1e-3)
    assert_close(expected, be.to_host(got), *TOL[dtype], what="batchnorm_inference")


# ===================================== hand-computed cases for the reference itself
@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_hand_computed(dtype):
    b, k = 4, 10
    loss, grad = ref.softmax_xent(np.zeros((b, k), dtype), np.arange(b))
    assert loss.shape == () and loss.dtype == dtype
    assert math.isclose(float(loss), b * math.log(k), rel_tol=1e-6)  # uniform softmax: B log K
    expected = np.full((b, k), 0.1, dtype)
    expected[np.arange(b), np.arange(b)] -= 1
    assert_close(expected, grad, *TOL[dtype], what="softmax_xent grad of zeros")

    assert float(ref.bias_act(np.zeros((1, 1), dtype), np.zeros(1, dtype), "sigmoid")[0, 0]) == 0.5
    y = ref.bias_act(np.array([[-2.0, 0.0, 3.0]], dtype), np.zeros(3, dtype), "leaky_relu")
    assert_close(np.array([[-0.02, 0.0, 3.0]], dtype), y, *TOL[dtype], what="leaky_relu")
    # mse: 0.5 * sum (pred - onehot)^2 = 0.5 * (1 + 1) for pred = onehot of the wrong class
    loss, grad = ref.mse(np.array([[1.0, 0.0]], dtype), np.array([1]))
    assert float(loss) == 1.0 and grad.tolist() == [[1.0, -1.0]]
    # sigmoid_bce of zero logits: K * log 2 per row
    loss, _ = ref.sigmoid_bce(np.zeros((3, 5), dtype), np.array([0, 1, 2]))
    assert math.isclose(float(loss), 15 * math.log(2), rel_tol=1e-6)
    assert int(ref.correct_count(np.array([[1, 1, 0], [0, 2, 2]], dtype), np.array([0, 2]))) == 1
    # adam's first step moves every weight by lr * sign(g) (bias correction cancels)
    w, m, v = np.zeros(3, dtype), np.zeros(3, dtype), np.zeros(3, dtype)
    ref.adam_step(w, np.array([2.0, -0.5, 1e-3], dtype), m, v, lr=0.1, t=1)
    assert_close(np.array([-0.1, 0.1, -0.1], dtype), w, 1e-4, 1e-6, what="adam first step")


def test_reference_softmax_xent_huge_logits_finite():
    loss, grad = ref.softmax_xent(np.array([[1e4, -1e4, 0.0]]), np.array([1]))
    assert np.isfinite(loss) and float(loss) == 2e4 and np.isfinite(grad).all()


# ================================================ fused vs separate, every backend
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_losses_match_separate_kernels(be, dtype):
    b, k = 37, 13
    z, labels = _data((b, k), dtype, 23, 3.0), _labels(b, k, 24)
    dz, dl = be.asarray(z), be.asarray(labels)
    onehot = np.eye(k, dtype=dtype)[labels]
    p = be.to_host(be.k.softmax(dz)).astype(np.float64)
    loss, grad = be.k.softmax_xent(dz, dl, grad_scale=1.0 / b)
    # loss = -sum log softmax[label]
    assert math.isclose(float(be.to_host(loss)), -np.log(p[np.arange(b), labels]).sum(), rel_tol=1e-5)
    assert_close(((p - onehot) / b).astype(dtype), be.to_host(grad), *TOL[dtype], what="xent grad")
    s = be.to_host(be.k.bias_act(dz, be.asarray(np.zeros(k, dtype)), "sigmoid"))
    _, grad = be.k.sigmoid_bce(dz, dl)
    assert_close((s - onehot).astype(dtype), be.to_host(grad), *TOL[dtype], what="bce grad = sigmoid - t")
    correct = int(be.to_host(be.k.correct_count(dz, dl)))
    assert correct == int((p.argmax(axis=1) == labels).sum())


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_xent_zero_logits(be, dtype):
    loss, _ = be.k.softmax_xent(be.asarray(np.zeros((5, 10), dtype)), be.asarray(np.arange(5)))
    assert math.isclose(float(be.to_host(loss)), 5 * math.log(10), rel_tol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sigmoid_bce_huge_logits_finite(be, dtype):
    z = np.array([[100.0, -100.0, 30.0, -30.0], [1e4, -1e4, 0.0, 50.0]], dtype)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):  # the reference's exp/log
        loss, grad = be.k.sigmoid_bce(be.asarray(z), be.asarray(np.array([0, 1])))
    loss, grad = be.to_host(loss), be.to_host(grad)
    assert np.isfinite(loss) and np.isfinite(grad).all()
    # each saturated wrong-side logit costs -log(LOG_EPS) ~ 27.6
    assert 27 * 2 < float(loss) < 28 * 4, float(loss)


def test_bad_label_is_an_error_not_memory_corruption(be):
    # The contract leaves out-of-range labels undefined (the reference wraps negatives like
    # NumPy indexing; a GPU kernel cannot raise without a sync). Numba must not write out of bounds.
    if be.name != "numba":
        pytest.skip("out-of-range labels are undefined behaviour in the contract")
    z = be.asarray(np.zeros((2, 3), np.float32))
    for name in LOSSES:
        with pytest.raises((ValueError, IndexError)):
            getattr(be.k, name)(z, be.asarray(np.array([0, 3])))


@pytest.mark.parametrize("dtype", DTYPES)
def test_numba_parallel_variants_match_reference(dtype, monkeypatch):
    # the prange variants only run above numba_cpu._par_min(threads) elements, beside a
    # single-threaded BLAS: force them here so they stay tested
    try:
        be = backend.get_backend("numba")
    except backend.BackendUnavailable as e:
        pytest.skip(str(e))
    monkeypatch.setattr(be.k, "_PAR_MIN", 1)
    shape = (37, 65)
    z, b = _data(shape, dtype, 30, 3.0), _data(shape[1:], dtype, 31)
    for act in ref.ACTIVATIONS:
        y, pre, kept = ref.bias_act(z, b, act), _pre(act, z + b), np.empty_like(z)
        assert_close(y, be.k.bias_act(z, b, act, pre=kept), *TOL[dtype], what=f"parallel bias_act {act}")
        np.testing.assert_array_equal(kept, z + b)
        expected = ref.act_grad(z, y, act, pre=pre)
        assert_close(expected, be.k.act_grad(z, y, act, pre=pre), *TOL[dtype], what="parallel act_grad")
    for opt in OPTIMIZERS:
        _run_optimizer(be, opt, "l1+l2+wd", shape, dtype)


def test_numba_parallel_variants_are_vectorised(monkeypatch):
    """Each parallel variant's chunk loop compiles to SIMD code, as the serial one: a chunk bound
    Numba types as a signed integer makes every index a possible negative one (wrapped around),
    and LLVM then left the loop scalar (2-5x slower than the serial variant, measured before the
    bounds became unsigned). Compiled afresh (cached code cannot be inspected) with the arguments
    the parity run passes."""
    numba = pytest.importorskip("numba")
    import re

    k = backend.get_backend("numba").k
    calls, call = {}, k._call_split
    spy = lambda split, fn, *a: (calls.setdefault(fn.__name__, (fn, a)), call(split, fn, *a))[1]  # noqa: E731
    monkeypatch.setattr(k, "_call_split", spy)
    monkeypatch.setattr(k, "_PAR_MIN", 1)
    shape = (37, 65)
    z, b = _data(shape, np.float32, 30, 3.0), _data(shape[1:], np.float32, 31)
    for act in ("relu", "sigmoid"):
        y = k.bias_act(z, b, act)
        k.act_grad(z, y, act)
    for opt in OPTIMIZERS:
        _run_optimizer(backend.get_backend("numba"), opt, "l1+l2+wd", shape, np.float32, steps=1)
    parallel = {name: fa for name, fa in calls.items() if name.endswith("_par")}
    assert {"_bias_act_par", "_act_grad_par", "_adam_at_par", "_sgd_par"} <= set(parallel)
    for name, (fn, args) in parallel.items():
        fresh = numba.njit(parallel=True, error_model="numpy")(fn.py_func)
        fresh(*args)
        ir = "\n".join(fresh.inspect_llvm().values())
        assert re.search(r"<\d+ x (float|double)>", ir), f"{name}: no vector arithmetic in its chunk loop"


def test_numba_parallel_variants_wait_for_a_single_threaded_blas(monkeypatch):
    """OpenBLAS's workers spin after each GEMM; a parallel region beside them lost 2-50x, so above
    the threshold the parallel variant runs only when BLAS is on one thread, or when asked for."""
    threadpool_limits = pytest.importorskip("threadpoolctl").threadpool_limits
    numba = pytest.importorskip("numba")
    k = backend.get_backend("numba").k
    if k._BLAS_THREADS is None or numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs NumPy's bundled OpenBLAS and at least 2 Numba threads")
    calls = []
    par, serial = (lambda *a: calls.append("par")), (lambda *a: calls.append("serial"))
    monkeypatch.setattr(k, "_PAR_MIN", None)
    big = k._par_min(numba.get_num_threads())
    with threadpool_limits(2, "blas"):
        k._run(par, serial, big)
    with threadpool_limits(1, "blas"):
        k._run(par, serial, big)
        k._run(par, serial, big - 1)
    monkeypatch.setattr(k, "_PAR_MIN", 10)
    with threadpool_limits(2, "blas"):
        k._run(par, serial, 10)
    assert calls == ["serial", "par", "serial", "par"]


def test_numba_parallel_threshold_adapts_to_the_thread_count(monkeypatch):
    try:
        k = backend.get_backend("numba").k
    except backend.BackendUnavailable as e:
        pytest.skip(str(e))
    monkeypatch.setattr(k, "_PAR_MIN", None)
    assert k._par_min(2) == 1 << 17  # measured on 2 threads beside a single-threaded BLAS
    assert k._par_min(3) == (1 << 18) // 3  # scaled by 2 / threads
    assert k._par_min(4) == k._par_min(16) == k._par_min(1024) == 1 << 16  # the floor
    monkeypatch.setenv("GPUMLP_PAR_MIN", "300000")
    assert k._env_par_min() == 300000
    monkeypatch.setenv("GPUMLP_PAR_MIN", "lots")
    with pytest.raises(ValueError, match="GPUMLP_PAR_MIN must be a number of elements"):
        k._env_par_min()


@pytest.mark.parametrize(
    "pair,limit,split", [(False, 1, 3), (True, 1, 3), (True, 3000, 2), (True, 10000, 1)],
    ids=["one core", "two cores, 3 on BLAS", "two cores, 2 on BLAS", "two cores, 1 on BLAS"],
)  # fmt: skip
def test_numba_dense_chain_with_layers_on_blas_first(monkeypatch, pair, limit, split):
    """Weights beyond CHAIN_MAX_WEIGHT_BYTES run on OpenBLAS before the tiles, the tiles taking the
    last one's bias and activation as they read: on OpenBLAS's pool (every layer but the last), or
    on two cores of ours (numba_pair: each core's rows through both; up to the last big weight).
    The reference's scores (to float32 rounding), labels that are the arg-max of the scores, its
    flag for a NaN in x (here in the second core's rows), and no flag for an overflow after the
    first product. float32, as the other chains of the tests: their kernels compile once."""
    k = _numba_kernels()
    monkeypatch.setattr(k, "CHAIN_MAX_WEIGHT_BYTES", limit)
    ran = []
    if pair:
        if not k._PAIR.possible():
            pytest.skip("no two cores of ours here (numba_pair.PAIR.possible() is False)")
        monkeypatch.setattr(k, "_CHAIN_PAIR_MIN_FLOPS", 0)
        on_pair = k._chain_on_pair
        monkeypatch.setattr(k, "_chain_on_pair", lambda *a: ran.append(on_pair(*a)) or ran[-1])
    widths = (100, 40, 30, 20, 10)  # weights of 16000, 4800, 2400 and 800 bytes
    x, (ws, bs) = _data((500, widths[0]), np.float32, 7), _chain_args(widths, np.float32, 7)
    assert k._chain_split(tuple(ws)) == split
    acts = ["tanh", "sigmoid", "relu", "identity"]
    labels = np.empty(500, np.int64)
    got, flag = k.dense_chain(x, ws, bs, acts, labels=labels)
    want, want_flag = ref.dense_chain(x, ws, bs, acts)
    assert not flag and not want_flag
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(labels, np.argmax(got, axis=1))
    bad = x.copy()
    bad[321, 5] = np.nan
    assert k.dense_chain(bad, ws, bs, acts)[1] is True
    huge = [w.copy() for w in ws]
    huge[1][:, 3] = np.finfo(np.float32).max  # finite x @ W0, then inf: the flag is the first product's
    with np.errstate(over="ignore", invalid="ignore"):
        assert k.dense_chain(x, huge, bs, acts)[1] is ref.dense_chain(x, huge, bs, acts)[1] is False
    assert len(ran) == (3 if pair else 0) and all(flags is not None for flags in ran)
    if pair:  # the cores' buffers once overlapped: a flag or a row from the other core, now and then
        with np.errstate(over="ignore", invalid="ignore"):
            for _ in range(100):
                assert k.dense_chain(x, huge, bs, acts)[1] is False
                np.testing.assert_array_equal(k.dense_chain(x, ws, bs, acts)[0], got)
    assert k._PAIR.owner is None  # each call's session ended
