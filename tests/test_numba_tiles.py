"""The register tiles of ``gpumlp.kernels.numba_tiles`` against NumPy: every tile edge, offsets,
transposed and strided operands, alpha/beta, both dtypes, both vector layouts, NaN/inf, and no
write outside the target rows."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("numba")
from gpumlp.kernels import numba_tiles  # noqa: E402

TOL = {np.float32: 2e-5, np.float64: 1e-12}  # relative to sum |a||b| over k


def operands(rng, m, k, n, dtype, trans_a=False):
    """a (m, k) (a transposed view with ``trans_a``) and b (k, n), standard normal."""
    a = rng.standard_normal((k, m) if trans_a else (m, k)).astype(dtype)
    b = rng.standard_normal((k, n)).astype(dtype)
    return (a.T if trans_a else a), b


def check_product(c, a, b, alpha=1.0, beta=0.0, c0=None):
    """c == alpha * a @ b + beta * c0 within TOL of sum |a||b|, computed in float64."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    want = alpha * (a64 @ b64) + (beta * c0.astype(np.float64) if beta else 0.0)
    scale = np.abs(alpha) * (np.abs(a64) @ np.abs(b64)) + (abs(beta) * np.abs(c0) if beta else 0.0) + 1e-30
    err = np.max(np.abs(c - want) / scale)
    assert err < TOL[c.dtype.type], f"max relative error {err:.3g}"


def tile(c, a, b, alpha=1.0, beta=0.0):
    numba_tiles.tile_rows(c, 0, a, 0, a.shape[0], b, alpha, beta, numba_tiles.dot_panel(b))


EDGES_M = (1, 2, 3, 5, 6, 7, 8, 13, 100)  # every row count left over: 1-3 rows take a tile of that size
EDGES_N = (1, 15, 16, 17, 63, 64, 65, 100, 129)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("m", EDGES_M)
def test_every_tile_edge_matches_numpy(dtype, m):
    rng = np.random.default_rng(m)
    for n in EDGES_N:
        for k in (1, 3, 37):
            a, b = operands(rng, m, k, n, dtype)
            c = np.full((m, n), np.nan, dtype)  # beta 0: c is only written, its NaNs never read
            tile(c, a, b)
            check_product(c, a, b)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_rows_result_does_not_depend_on_its_neighbours(dtype):
    """Each row comes out bit for bit the same whether it runs alone (a 1-row tile), beside one
    other row, or in a full or partial MR-row tile: every element is the same FMA chain over k."""
    rng = np.random.default_rng(3)
    a, b = operands(rng, 13, 784, 100, dtype)
    whole = np.empty((13, 100), dtype)
    tile(whole, a, b)
    for m in range(1, 2 * numba_tiles.MR + 2):
        part = np.empty((m, 100), dtype)
        tile(part, a[13 - m :], b)
        assert np.array_equal(part, whole[13 - m :]), m


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_transposed_strided_operands_alpha_beta(dtype):
    rng = np.random.default_rng(1)
    for m, k, n in ((100, 784, 100), (784, 100, 100), (13, 50, 37)):
        a, b = operands(rng, m, k, n, dtype, trans_a=True)
        c0 = rng.standard_normal((m, n)).astype(dtype)
        c = c0.copy()
        tile(c, a, b, -0.25, 0.5)
        check_product(c, a, b, -0.25, 0.5, c0)
        big = rng.standard_normal((2 * m, 2 * k)).astype(dtype)  # a with row and column strides
        a2 = big[::2, ::2]
        c = np.empty((m, n), dtype)
        tile(c, a2, b)
        check_product(c, a2, b)


def test_row_offsets_write_only_their_rows():
    """c[c0 + r] = a[a0 + r] @ b for r < m: other rows and columns of c (a view with a larger row
    stride) keep their sentinels."""
    rng = np.random.default_rng(2)
    a, b = operands(rng, 20, 20, 37, np.float32)
    host = np.full((15, 60), 7.0, np.float32)
    c = host[1:14, 3:40]
    numba_tiles.tile_rows(c, 2, a, 5, 9, b, 1.0, 0.0, np.ascontiguousarray(b[:, 31:].T))  # 6 by dot tiles
    check_product(c[2:11], a[5:14], b)
    mask = np.ones_like(host, bool)
    mask[3:12, 3:40] = False
    assert np.all(host[mask] == 7.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dot_tiles_any_share_of_the_columns(dtype):
    """b's last nd columns by the dot tiles (vectors along k, a masked step for the rest of k),
    for every nd from none to all, row and column counts past a dot tile's, alpha/beta."""
    rng = np.random.default_rng(5)
    w = numba_tiles.lanes(dtype)
    for m, k, n in ((1, 1, 1), (5, 3, 6), (numba_tiles.DOT_MR + 1, 2 * w + 3, 11), (13, 784, 100), (9, w, 2)):
        a, b = operands(rng, m, k, n, dtype)
        for nd in sorted({0, 1, n // 2, n - 1, n}):
            c0 = rng.standard_normal((m, n)).astype(dtype)
            c = c0.copy()
            numba_tiles.tile_rows(c, 0, a, 0, m, b, 0.5, -1.5, np.ascontiguousarray(b[:, n - nd :].T))
            check_product(c, a, b, 0.5, -1.5, c0)


def test_dot_columns_rule():
    """All columns of a product narrower than a vector, else the part of a vector left over when
    it is at most a quarter of one; dot_panel packs exactly those, transposed."""
    w = numba_tiles.lanes(np.float32)
    assert [numba_tiles.dot_columns(n, np.float32) for n in (1, w - 1, w, w + 1, 2 * w + w // 4)] == [
        1, w - 1, 0, 1, w // 4]  # fmt: skip
    assert numba_tiles.dot_columns(2 * w + w // 4 + 1, np.float32) == 0
    b = np.arange(12.0 * 100, dtype=np.float32).reshape(12, 100)
    nd = numba_tiles.dot_columns(100, np.float32)
    assert np.array_equal(numba_tiles.dot_panel(b), b[:, 100 - nd :].T)


def test_nonfinite_inputs_propagate_like_numpy():
    a = np.ones((7, 5), np.float32)
    a[2, 3], a[4, 0] = np.inf, np.nan
    b = np.ones((5, 17), np.float32)
    b[3, 5] = 0.0  # inf * 0: NaN in that element, inf elsewhere in row 2
    c = np.empty((7, 17), np.float32)
    tile(c, a, b)
    with np.errstate(invalid="ignore"):
        want = a @ b
    assert np.array_equal(np.isnan(c), np.isnan(want)) and np.array_equal(np.isinf(c), np.isinf(want))
    assert np.array_equal(c[np.isfinite(want)], want[np.isfinite(want)])


def test_the_tile_is_a_function_of_its_own():
    """The tiles (vector and dot) are called, not inlined: inlined into a bigger kernel the vector
    tile's K loop lost its register allocation (the fused predict ran at 2.56 instead of 1.6 ms per
    4096 rows)."""
    import numba

    fresh = numba.njit(error_model="numpy")(numba_tiles.tile_rows.py_func)  # not from the disk cache
    a, b, c = np.ones((6, 8), np.float32), np.ones((8, 16), np.float32), np.empty((6, 16), np.float32)
    fresh(c, 0, a, 0, 6, b, 1.0, 0.0, np.ascontiguousarray(b[:, 12:].T))
    check_product(c, a, b)
    ir = "\n".join(fresh.inspect_llvm().values())
    assert "noinline" in ir and re.search(r"call (fastcc )?void @gpumlp_tile_", ir)
    assert re.search(r"call (fastcc )?void @gpumlp_dot_", ir)


def test_the_other_vector_layout_in_a_subprocess(tmp_path):
    """The AVX2 layout (8-lane float32, 2 vectors a row) on a CPU with AVX-512, where the other
    tests run the AVX-512 one: Numba compiles for Haswell, in a fresh cache; the tiles (vector and
    dot, both dtypes) and the numba backend's float32 dense_chain against NumPy there."""
    if not numba_tiles.AVX512:
        pytest.skip("this CPU has no AVX-512: the other tests already run the AVX2 layout")
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path), NUMBA_CPU_NAME="haswell", NUMBA_CPU_FEATURES="")
    code = (
        "import numpy as np\n"
        "from gpumlp.kernels import numba_tiles as t, numba_cpu as k, reference as r\n"
        "assert not t.AVX512 and t.SIMD_TILES and t.lanes(np.float32) == 8\n"
        "rng = np.random.default_rng(0)\n"
        "for dt, tol in ((np.float32, 2e-5), (np.float64, 1e-12)):\n"
        "    for m, kk, n in ((7, 5, 3), (13, 37, 17), (100, 784, 100), (6, 3, 33)):\n"
        "        a = rng.standard_normal((m, kk)).astype(dt); b = rng.standard_normal((kk, n)).astype(dt)\n"
        "        c = np.empty((m, n), dt); t.tile_rows(c, 0, a, 0, m, b, 1.0, 0.0, t.dot_panel(b))\n"
        "        s = np.abs(a).astype(float) @ np.abs(b).astype(float)\n"
        "        assert np.max(np.abs(c - a.astype(float) @ b.astype(float)) / s) < tol, (dt, m, kk, n)\n"
        "x = rng.standard_normal((300, 40)).astype(np.float32)\n"  # one dtype: each compiles ~7 s
        "ws = [rng.standard_normal(s).astype(np.float32) for s in ((40, 33), (33, 10))]\n"
        "bs = [rng.standard_normal(w.shape[1]).astype(np.float32) for w in ws]\n"
        "acts = ['tanh', 'identity']\n"
        "got, want = k.dense_chain(x, ws, bs, acts), r.dense_chain(x, ws, bs, acts)\n"
        "assert got[1] == want[1] == False and np.allclose(got[0], want[0], rtol=1e-4, atol=1e-5)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
