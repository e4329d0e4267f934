"""The GEMM of bench/tiled_gemm.py against NumPy, so that the experiment times a correct GEMM: b
given transposed, results independent of the thread split, the stand-in for OpenBLAS (the tiles
themselves: tests/test_numba_tiles.py)."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("numba")
from test_numba_tiles import check_product, operands  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "tiled_gemm.py"
_spec = importlib.util.spec_from_file_location("tiled_gemm", SCRIPT)
tiled = sys.modules["tiled_gemm"] = importlib.util.module_from_spec(_spec)  # numba resolves globals by module
_spec.loader.exec_module(tiled)


def test_gemm_bt_takes_b_transposed():
    rng = np.random.default_rng(3)
    a, b = operands(rng, 100, 10, 100, np.float32)
    bt = np.ascontiguousarray(b.T)
    c = np.empty((100, 100), np.float32)
    tiled.gemm_bt(c, a, bt, 1.0, 0.0, 0)
    check_product(c, a, b)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_thread_split_does_not_change_a_bit(dtype):
    rng = np.random.default_rng(4)
    for m, k, n, trans in ((100, 784, 100, False), (784, 100, 100, True), (4096, 100, 10, False)):
        a, b = operands(rng, m, k, n, dtype, trans_a=trans)
        one = np.empty((m, n), dtype)
        tiled.gemm(one, a, b, 1.0, 0.0, 0)
        for chunk in (6, 54, 96):
            split = np.empty((m, n), dtype)
            tiled.gemm(split, a, b, 1.0, 0.0, chunk)
            assert np.array_equal(one, split), chunk


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
                engine(c, a, b, 0.5, -1.0, ta, tb, 1)
                check_product(c, a.T if ta else a, b.T if tb else b, 0.5, -1.0, c0)
