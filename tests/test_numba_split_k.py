"""numba ``matmul``'s split over K (``numba_cpu._split_k``): which products it cuts, that the sum of
the two batched halves is the product, and that a step graph replays it bit for bit."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("numba")

from threaded_training import three_threads_training  # noqa: E402

from gpumlp import backend  # noqa: E402
from gpumlp.kernels import numba_cpu, numba_graph  # noqa: E402
from gpumlp.model import MLP  # noqa: E402

DTYPES = (np.float32, np.float64)
TOL = {np.float32: 1e-5, np.float64: 1e-13}  # relative to sum |a||b| over K


@pytest.fixture
def two_blas_threads(monkeypatch):
    """The split's decision as on a 2-thread OpenBLAS pool, whatever this machine's pool is (the
    batched call itself runs on any pool: the parts are independent)."""
    if not numba_cpu._SPLIT_K_DTYPES:
        pytest.skip("NumPy's bundled OpenBLAS with a batched GEMM is not loaded")
    monkeypatch.setattr(numba_cpu, "_BLAS_THREADS", lambda: 2)


@pytest.mark.parametrize(
    "m, k, n, dtype, threads, parts",
    [
        (100, 784, 100, np.float32, 2, 2),  # the seed config's first layer
        (100, 784, 100, np.float64, 2, 2),
        (64, 1024, 100, np.float32, 2, 2),
        (128, 784, 256, np.float32, 2, 1),  # K < 5 max(m, n): measured no gain
        (256, 2048, 64, np.float32, 2, 1),  # more than 128 rows: OpenBLAS's own row split holds up
        (100, 785, 100, np.float32, 2, 1),  # odd K: the halves of a strided batch are equal
        (32, 784, 64, np.float32, 2, 1),  # each half below 2e6 multiply-adds (OpenBLAS's small path)
        (100, 784, 100, np.float32, 1, 1),  # one BLAS thread: nothing to split for
        (100, 784, 100, np.float32, 4, 1),  # more threads: unmeasured
        (100, 784, 100, np.int64, 2, 1),  # not a float GEMM
    ],
)
def test_which_products_are_split(two_blas_threads, monkeypatch, m, k, n, dtype, threads, parts):
    monkeypatch.setattr(numba_cpu, "_BLAS_THREADS", lambda: threads)
    assert numba_cpu._split_k(np.empty((m, n), dtype), k) == parts


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
def test_a_split_product_is_the_product(two_blas_threads, dtype, trans_a, trans_b):
    m, k, n = 100, 1024, 96
    rng = np.random.default_rng(int(trans_a) * 2 + int(trans_b))
    a = rng.standard_normal((k, m) if trans_a else (m, k)).astype(dtype)
    b = rng.standard_normal((n, k) if trans_b else (k, n)).astype(dtype)
    out = np.full((m, n), np.nan, dtype)
    assert numba_cpu._split_k(out, k) == 2
    got = numba_cpu.matmul(a, b, out=out, trans_a=trans_a, trans_b=trans_b)
    assert got is out
    a64, b64 = (a.T if trans_a else a).astype(np.float64), (b.T if trans_b else b).astype(np.float64)
    err = np.max(np.abs(out - a64 @ b64) / (np.abs(a64) @ np.abs(b64)))
    assert err < TOL[dtype], f"max relative error {err:.3g}"
    # the halves summed: not the unsplit GEMM's rounding, but within a GEMM's
    whole = np.matmul(a.T if trans_a else a, b.T if trans_b else b)
    np.testing.assert_allclose(out, whole, rtol=0, atol=50 * np.finfo(dtype).eps * np.abs(whole).max())


def test_a_step_graph_replays_the_split_bit_for_bit(two_blas_threads, monkeypatch):
    """A 784-64-10 model on batches of 100: its first layer's forward product is split."""
    assert numba_cpu._split_k(np.empty((100, 64), np.float32), 784) == 2
    monkeypatch.setenv("GPUMLP_STEP_GRAPHS", "1")  # on one core (two: tests/test_numba_pair.py)
    compiled, compile_tape = [], numba_graph._compile
    spy = lambda tape, **kw: (compiled.append(tape), compile_tape(tape, **kw))[1]  # noqa: E731
    monkeypatch.setattr(numba_graph, "_compile", spy)
    rng = np.random.default_rng(0)
    X, y = rng.uniform(-1, 1, (700, 784)).astype(np.float32), rng.integers(0, 10, 700)
    results = []
    for replays in (True, False):
        be = dataclasses.replace(backend.get_backend("numba"), replays_steps=replays)
        model = MLP("784-64-10", backend=be, seed=3, act="relu")
        hist = model.fit(X, y, epochs=2, batch_size=100, optimizer="adam", lr=1e-3, seed=5)
        results.append((model.state_arrays(), [r["loss"] for r in hist.records]))
    assert compiled, "no step was replayed as a graph"
    (graph_weights, graph_loss), (plain_weights, plain_loss) = results
    assert graph_loss == plain_loss
    for name in plain_weights:
        np.testing.assert_array_equal(graph_weights[name], plain_weights[name], err_msg=name)


_THREADS_TRAINING = three_threads_training(
    setup="assert numba_cpu._split_k(np.empty((100, 64), np.float32), 784) == 2"
)


def test_split_products_train_from_several_threads_at_once():
    """Three threads train a model whose first-layer forward is split, each calling OpenBLAS's
    batched GEMM while the others do: every thread's weights equal a lone run's bit for bit."""
    if not numba_cpu._SPLIT_K_DTYPES:
        pytest.skip("NumPy's bundled OpenBLAS with a batched GEMM is not loaded")
    env = dict(os.environ, OPENBLAS_NUM_THREADS="2", GPUMLP_STEP_GRAPHS="1")  # one core: bit for bit
    out = subprocess.run([sys.executable, "-c", _THREADS_TRAINING], env=env, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[] 3 True", out.stdout


_WITHOUT_BATCHED_GEMMS = """
import ctypes
lookup = ctypes.CDLL.__getattr__
def without_batched(lib, name):  # an OpenBLAS built without the batched GEMMs
    if "gemm_batch" in name:
        raise AttributeError(name)
    return lookup(lib, name)
ctypes.CDLL.__getattr__ = without_batched
import numpy as np
from gpumlp.kernels import numba_cpu
assert numba_cpu._BLAS_THREADS is not None and not numba_cpu._SPLIT_K_DTYPES
rng = np.random.default_rng(0)
a, b = rng.standard_normal((100, 784)).astype(np.float32), rng.standard_normal((784, 100)).astype(np.float32)
out = np.empty((100, 100), np.float32)
assert numba_cpu._split_k(out, 784) == 1
numba_cpu.matmul(a, b, out=out)
print(np.allclose(out, a @ b, rtol=1e-4, atol=1e-3))
"""


def test_an_openblas_without_batched_gemms_keeps_one_gemm(tmp_path):
    """Jitted code naming a symbol that resolves to nothing crashes the process when it compiles,
    even where the call is never reached: without the batched GEMMs the alias is still bound
    (to a function never called), ``matmul`` compiles afresh and computes one GEMM."""
    if not numba_cpu._SPLIT_K_DTYPES:
        pytest.skip("NumPy's bundled OpenBLAS with a batched GEMM is not loaded")
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))  # compiled here, not loaded from a cache
    out = subprocess.run([sys.executable, "-c", _WITHOUT_BATCHED_GEMMS], env=env, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "True", out.stdout
