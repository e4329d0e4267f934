"""The register-tiled GEMM of bench/tiled_gemm.py against NumPy, so that the experiment times a
correct GEMM: every tile edge, transposed and strided operands, alpha/beta, both dtypes, both
vector layouts, and results independent of the thread split."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("numba")
SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "tiled_gemm.py"
_spec = importlib.util.spec_from_file_location("tiled_gemm", SCRIPT)
tiled = sys.modules["tiled_gemm"] = importlib.util.module_from_spec(_spec)  # numba resolves globals by module
_spec.loader.exec_module(tiled)

TOL = {np.float32: 2e-5, np.float64: 1e-12}  # relative to sum |a||b| over k


def _case(rng, m, k, n, dtype, trans_a=False):
    a = rng.standard_normal((k, m) if trans_a else (m, k)).astype(dtype)
    b = rng.standard_normal((k, n)).astype(dtype)
    return (a.T if trans_a else a), b


def _check(c, a, b, alpha=1.0, beta=0.0, c0=None):
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    want = alpha * (a64 @ b64) + (beta * c0.astype(np.float64) if beta else 0.0)
    scale = np.abs(alpha) * (np.abs(a64) @ np.abs(b64)) + (abs(beta) * np.abs(c0) if beta else 0.0) + 1e-30
    err = np.max(np.abs(c - want) / scale)
    assert err < TOL[c.dtype.type], f"max relative error {err:.3g}"


EDGES_M = (1, 5, 6, 7, 13, 100)
EDGES_N = (1, 15, 16, 17, 63, 64, 65, 100, 129)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("m", EDGES_M)
def test_every_tile_edge_matches_numpy(dtype, m):
    rng = np.random.default_rng(m)
    for n in EDGES_N:
        for k in (1, 3, 37):
            a, b = _case(rng, m, k, n, dtype)
            c = np.full((m, n), np.nan, dtype)  # beta 0: c is only written, its NaNs never read
            tiled.gemm(c, a, b, 1.0, 0.0, 0)
            _check(c, a, b)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_transposed_strided_operands_alpha_beta(dtype):
    rng = np.random.default_rng(1)
    for m, k, n in ((100, 784, 100), (784, 100, 100), (13, 50, 37)):
        a, b = _case(rng, m, k, n, dtype, trans_a=True)
        c0 = rng.standard_normal((m, n)).astype(dtype)
        c = c0.copy()
        tiled.gemm(c, a, b, -0.25, 0.5, 0)
        _check(c, a, b, -0.25, 0.5, c0)
        big = rng.standard_normal((2 * m, 2 * k)).astype(dtype)  # a with row and column strides
        a2 = big[::2, ::2]
        c = np.empty((m, n), dtype)
        tiled.gemm(c, a2, b, 1.0, 0.0, 0)
        _check(c, a2, b)


def test_writes_nothing_outside_c():
    rng = np.random.default_rng(2)
    a, b = _case(rng, 13, 20, 37, np.float32)
    host = np.full((15, 60), 7.0, np.float32)
    c = host[1:14, 3:40]  # rows with a larger stride; sentinels around
    tiled.gemm(c, a, b, 1.0, 0.0, 0)
    _check(c, a, b)
    mask = np.ones_like(host, bool)
    mask[1:14, 3:40] = False
    assert np.all(host[mask] == 7.0)


def test_gemm_bt_takes_b_transposed():
    rng = np.random.default_rng(3)
    a, b = _case(rng, 100, 10, 100, np.float32)
    bt = np.ascontiguousarray(b.T)
    c = np.empty((100, 100), np.float32)
    tiled.gemm_bt(c, a, bt, 1.0, 0.0, 0)
    _check(c, a, b)


def test_nonfinite_inputs_propagate_like_numpy():
    a = np.ones((7, 5), np.float32)
    a[2, 3], a[4, 0] = np.inf, np.nan
    b = np.ones((5, 17), np.float32)
    b[3, 5] = 0.0  # inf * 0: NaN in that element, inf elsewhere in row 2
    c = np.empty((7, 17), np.float32)
    tiled.gemm(c, a, b, 1.0, 0.0, 0)
    with np.errstate(invalid="ignore"):
        want = a @ b
    assert np.array_equal(np.isnan(c), np.isnan(want)) and np.array_equal(np.isinf(c), np.isinf(want))
    assert np.array_equal(c[np.isfinite(want)], want[np.isfinite(want)])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_thread_split_does_not_change_a_bit(dtype):
    rng = np.random.default_rng(4)
    for m, k, n, trans in ((100, 784, 100, False), (784, 100, 100, True), (4096, 100, 10, False)):
        a, b = _case(rng, m, k, n, dtype, trans_a=trans)
        one = np.empty((m, n), dtype)
        tiled.gemm(one, a, b, 1.0, 0.0, 0)
        for chunk in (6, 54, 96):
            split = np.empty((m, n), dtype)
            tiled.gemm(split, a, b, 1.0, 0.0, chunk)
            assert np.array_equal(one, split), chunk


def test_the_other_vector_layout_in_a_subprocess(tmp_path):
    """The AVX2 layout (8-lane float32, 2 vectors a row) on a CPU with AVX-512, where the other
    tests run the AVX-512 one: Numba compiles for Haswell, in a fresh cache."""
    if not tiled.AVX512:
        pytest.skip("this CPU has no AVX-512: the other tests already run the AVX2 layout")
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path), NUMBA_CPU_NAME="haswell", NUMBA_CPU_FEATURES="")
    code = (
        "import importlib.util, sys, numpy as np\n"
        f"spec = importlib.util.spec_from_file_location('tiled_gemm', {str(SCRIPT)!r})\n"
        "g = importlib.util.module_from_spec(spec); spec.loader.exec_module(g); assert not g.AVX512\n"
        "rng = np.random.default_rng(0)\n"
        "for dt, tol in ((np.float32, 2e-5), (np.float64, 1e-12)):\n"
        "    for m, k, n in ((7, 5, 3), (13, 37, 17), (100, 784, 100), (6, 3, 33)):\n"
        "        a = rng.standard_normal((m, k)).astype(dt); b = rng.standard_normal((k, n)).astype(dt)\n"
        "        c = np.empty((m, n), dt); g.gemm(c, a, b, 1.0, 0.0, 0)\n"
        "        s = np.abs(a).astype(float) @ np.abs(b).astype(float)\n"
        "        assert np.max(np.abs(c - a.astype(float) @ b.astype(float)) / s) < tol, (dt, m, k, n)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@pytest.mark.parametrize("mixed", [False, True])
def test_engine_stand_in_takes_numba_cpus_gemm_arguments(mixed):
    """What the experiment puts in place of numba_cpu's OpenBLAS call computes the same thing for
    every transpose combination, alpha and beta (mixed: a 1.2 MiB b goes to OpenBLAS)."""
    engine, rng = tiled._engine_gemm(mixed), np.random.default_rng(5)
    for m, k, n in ((13, 20, 37), (40, 784, 400)):
        for ta in (False, True):
            for tb in (False, True):
                a = rng.standard_normal((k, m) if ta else (m, k)).astype(np.float32)
                b = rng.standard_normal((n, k) if tb else (k, n)).astype(np.float32)
                c0 = rng.standard_normal((m, n)).astype(np.float32)
                c = c0.copy()
                engine(c, a, b, 0.5, -1.0, ta, tb)
                _check(c, a.T if ta else a, b.T if tb else b, 0.5, -1.0, c0)
