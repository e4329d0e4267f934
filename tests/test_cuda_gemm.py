"""Our own GEMM (kernels/cuda/gemm.cu, selected by make_cuda_backend(gemm="own")) on the emulated device:
parity with NumPy for every transpose combination and awkward shapes, the launch checks, and a
short training run against the numpy backend. nvcc compile checks of gemm.cu come from
test_cuda_kernels.py, which globs every kernels/cuda/*.cu; here we only assert it is in that list.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import pytest

from gpumlp.backend import get_backend, make_cuda_backend
from gpumlp.kernels import cuda_host

CUDA_DIR = Path(cuda_host.__file__).parent / "cuda"

TOL = {np.float32: 1e-4, np.float64: 1e-11}
# (m, k, n): 1x1x1, tile-sized and not, K = 0 (zeros), several tiles in every direction
SHAPES = [
    (1, 1, 1),
    (3, 5, 7),
    (32, 32, 32),
    (33, 17, 65),
    (100, 784, 20),
    (40, 0, 3),
    (70, 33, 1),
    (130, 95, 70),
]


@pytest.fixture(scope="module")
def be():
    return get_backend("cuda-emu")


@pytest.fixture(scope="module")
def own_backend():
    return make_cuda_backend("cuda-emu", gemm="own")


@pytest.fixture
def own(own_backend, monkeypatch):
    """A cuda-emu backend of its own with the own GEMM selected (and the "cuBLAS" path made to fail)."""

    def no_cublas(*args, **kwargs):
        raise AssertionError("cupy.matmul (cuBLAS) called although gemm='own'")

    monkeypatch.setattr(own_backend.xp, "matmul", no_cublas)
    return own_backend


def _operands(m, k, n, trans_a, trans_b, dtype, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((k, m) if trans_a else (m, k)).astype(dtype)
    b = rng.standard_normal((n, k) if trans_b else (k, n)).astype(dtype)
    return a, b


def _check(got, a, b, trans_a, trans_b, dtype):
    """|got - ref| <= tol * (|op(a)| @ |op(b)|): the float error bound, scaled; ref in float64."""
    opa = (a.T if trans_a else a).astype(np.float64)
    opb = (b.T if trans_b else b).astype(np.float64)
    ref, bound = opa @ opb, np.abs(opa) @ np.abs(opb)
    assert got.shape == ref.shape and got.dtype == dtype
    tol = TOL[dtype]
    err = np.abs(got.astype(np.float64) - ref)
    assert np.all(err <= tol * bound + tol * np.abs(ref)), float(np.max(err - tol * bound))
    np.testing.assert_allclose(got, (a.T if trans_a else a) @ (b.T if trans_b else b), rtol=tol, atol=tol)


def test_gemm_source_is_built_and_checked():
    """test_cuda_kernels globs kernels/cuda/*.cu for its nvcc check; the parser sees both kernels."""
    cu = CUDA_DIR / "gemm.cu"
    assert cu in sorted(CUDA_DIR.glob("*.cu"))
    kernels = cuda_host.parse_kernels(cu.read_text())
    assert set(kernels) == {"gemm_f32", "gemm_f64"}
    for sfx, base in (("f32", "float"), ("f64", "double")):
        params = [p.describe() for p in kernels[f"gemm_{sfx}"]]
        ints = ["m", "n", "k", "lda", "ldb", "ldc", "trans_a", "trans_b"]
        assert params == [f"{base}* a", f"{base}* b", f"{base}* c", *(f"int {v}" for v in ints)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("trans_b", [False, True], ids=["B", "Bt"])
@pytest.mark.parametrize("trans_a", [False, True], ids=["A", "At"])
@pytest.mark.parametrize(("m", "k", "n"), SHAPES, ids=lambda v: str(v))
def test_own_gemm_matches_numpy(own, m, k, n, trans_a, trans_b, dtype):
    a, b = _operands(m, k, n, trans_a, trans_b, dtype, seed=m * 7 + k + n)
    got = own.to_host(own.k.matmul(own.asarray(a), own.asarray(b), trans_a=trans_a, trans_b=trans_b))
    _check(got, a, b, trans_a, trans_b, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_own_gemm_writes_out_and_accepts_views(own, dtype):
    a, b = _operands(37, 45, 29, False, False, dtype, seed=3)
    out = own.xp.empty((37, 29), dtype=dtype)  # NaN-filled on the emulated device
    got = own.k.matmul(own.asarray(a), own.asarray(b), out=out)
    assert got is out
    _check(own.to_host(out), a, b, False, False, dtype)
    # non-contiguous operands (transposed views) are made contiguous first
    at, bt = own.asarray(np.ascontiguousarray(a.T)), own.asarray(np.ascontiguousarray(b.T))
    _check(own.to_host(own.k.matmul(at.T, bt.T)), a, b, False, False, dtype)
    _check(own.to_host(own.k.matmul(at, bt, trans_a=True, trans_b=True)), a, b, False, False, dtype)


def test_own_gemm_grid_stride_over_tile_rows(own):
    """A grid with fewer rows of blocks than tile rows (the 65535 cap on real GPUs) is still correct."""
    a, b = _operands(150, 40, 70, True, False, np.float64, seed=4)
    c = own.xp.empty((150, 70), dtype=np.float64)
    args = (own.asarray(a), own.asarray(b), c, *map(np.int32, (150, 70, 40, 150, 70, 70, 1, 0)))
    own.k._kernel("gemm", "f64")((3, 2), (32, 8), args)
    _check(own.to_host(c), a, b, True, False, np.float64)


def test_own_gemm_rejects_bad_input(own):
    a32, b64 = own.asarray(np.ones((2, 3), np.float32)), own.asarray(np.ones((3, 4)))
    with pytest.raises(TypeError, match="same dtype"):
        own.k.matmul(a32, b64)
    with pytest.raises(ValueError, match=r"op\(a\) is \(2, 3\) but op\(b\) is \(4, 3\)"):
        own.k.matmul(own.asarray(np.ones((2, 3))), b64, trans_b=True)
    with pytest.raises(ValueError, match="C-contiguous float64 array of shape"):
        own.k.matmul(own.asarray(np.ones((2, 3))), b64, out=own.xp.empty((2, 5)))
    with pytest.raises(TypeError, match="host numpy array"):
        own.k.matmul(np.ones((2, 3)), b64)
    with pytest.raises(TypeError, match="float32 or float64"):
        own.k.matmul(own.asarray(np.ones((2, 3), np.int32)), own.asarray(np.ones((3, 4), np.int32)))


def test_gemm_setting_default_and_unknown(be, own_backend, monkeypatch):
    """The default is cuBLAS (cupy.matmul); gemm="own" on another backend in the same process
    leaves it so; an unknown choice is refused when the backend is made."""
    calls = []
    real = be.xp.matmul
    monkeypatch.setattr(be.xp, "matmul", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    ones = np.ones((2, 2))
    own_backend.k.matmul(own_backend.asarray(ones), own_backend.asarray(ones))
    assert not calls
    if "GPUMLP_GEMM" not in os.environ:
        be.k.matmul(be.asarray(ones), be.asarray(ones))
        assert calls == [1]
    with pytest.raises(ValueError, match=r"gemm \(GPUMLP_GEMM\) must be 'cublas' or 'own', got 'cutlass'"):
        make_cuda_backend("cuda-emu", gemm="cutlass")
    monkeypatch.setenv("GPUMLP_GEMM", "cutlass")
    with pytest.raises(ValueError, match="got 'cutlass'"):
        make_cuda_backend("cuda-emu")


def test_own_gemm_is_captured_in_a_graph(own):
    """The point of the own GEMM: its launches go into a CUDA graph and replay."""
    a, b = _operands(20, 50, 10, False, True, np.float32, seed=5)
    da, db = own.asarray(a), own.asarray(b)
    out = own.xp.zeros((20, 10), dtype=np.float32)
    stream = own.xp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        own.k.matmul(da, db, out=out, trans_b=True)
        graph = stream.end_capture()
    assert not own.to_host(out).any()  # recorded, not run
    graph.launch(stream)
    stream.synchronize()  # replayed on a non-blocking stream: wait for it before reading
    _check(own.to_host(out), a, b, False, True, np.float32)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_training_with_own_gemm_matches_numpy(own, dtype):
    from gpumlp.model import MLP

    rng = np.random.default_rng(0)
    X, y = rng.random((200, 784)), rng.integers(0, 10, 200)
    kw = dict(act="relu", dtype=dtype, seed=3)
    fit_kw = dict(epochs=2, batch_size=50, optimizer="momentum", lr=0.05)
    ref, emu = MLP("784-32-10", backend="numpy", **kw), MLP("784-32-10", backend=own, **kw)
    h_ref, h_emu = ref.fit(X, y, **fit_kw), emu.fit(X, y, **fit_kw)
    rtol = 1e-9 if dtype == "float64" else 2e-4
    for (name, w_ref, _, _), (_, w_emu, _, _) in zip(ref.parameters(), emu.parameters()):
        w_ref, w_emu = np.asarray(w_ref), emu.be.to_host(w_emu)
        np.testing.assert_allclose(w_emu, w_ref, rtol=rtol, atol=rtol * np.abs(w_ref).max(), err_msg=name)
    np.testing.assert_allclose(emu.decision_function(X), ref.decision_function(X), rtol=rtol, atol=rtol)
    assert h_emu is not None and h_ref is not None


def _round_mantissa(x: np.ndarray, bits: int) -> np.ndarray:
    """float32 rounded to nearest (ties to even) with ``bits`` mantissa bits, via frexp."""
    m, e = np.frexp(x.astype(np.float64))
    return np.ldexp(np.round(m * 2.0 ** (bits + 1)) / 2.0 ** (bits + 1), e).astype(np.float32)


@contextlib.contextmanager
def _precision(be, precision: str):
    """Run the block with float32 GEMMs at ``precision``; exact float32 again afterwards."""
    be.set_matmul_precision(precision)
    try:
        yield
    finally:
        be.set_matmul_precision("float32")


@pytest.mark.parametrize("gemm", ["cublas", "own"])
@pytest.mark.parametrize("precision, bits", [("tf32", 10), ("bf16", 7)])
def test_tensor_core_precision(be, own_backend, gemm, precision, bits):
    """set_matmul_precision goes through CuPy's compute-type switch. The emulated cuBLAS rounds
    float32 inputs like tensor cores; our GEMM (CUDA-graph steps) switches to its tensor-core
    kernel (wmma, emulated at the API level), which rounds the same way as it stages the tiles.
    Both accumulate in float32; float32 is exact again after."""
    be = own_backend if gemm == "own" else be
    rng = np.random.default_rng(7)
    a, b = (
        rng.standard_normal((33, 300)).astype(np.float32),
        rng.standard_normal((300, 20)).astype(np.float32),
    )
    with _precision(be, precision):
        got = be.to_host(be.k.matmul(be.asarray(a), be.asarray(b)))
        got_t = be.to_host(be.k.matmul(be.asarray(np.ascontiguousarray(a.T)), be.asarray(b), trans_a=True))
    expected = _round_mantissa(a, bits).astype(np.float64) @ _round_mantissa(b, bits)
    exact = a.astype(np.float64) @ b
    scale = np.abs(exact).max()
    for result in (got, got_t):  # a transposed operand is rounded too (BLAS may sum in another order)
        assert np.abs(result - expected).max() / scale < 1e-6  # exactly the rounded inputs, float32 sums
        assert np.abs(result - exact).max() / scale > 10 * 2.0**-23  # it really rounds
    assert np.abs(be.to_host(be.k.matmul(be.asarray(a), be.asarray(b))) - exact).max() / scale < 1e-6


def test_precision_needs_a_cuda_backend():
    with pytest.raises(Exception, match="needs a CUDA backend"):
        get_backend("numpy").set_matmul_precision("bf16")
    get_backend("numpy").set_matmul_precision("float32")  # the exact default is always fine


@pytest.mark.parametrize("m, k, n", [(1, 1, 1), (64, 32, 64), (65, 33, 63), (130, 95, 70), (100, 784, 10)])
@pytest.mark.parametrize("trans_a, trans_b", [(False, False), (True, False), (False, True), (True, True)])
def test_tensor_core_gemm_shapes_and_transposes(own, m, k, n, trans_a, trans_b):
    """gemm_tc_f32: partial 64x64 tiles and K steps, every storage order, TF32 rounding."""
    a, b = _operands(m, k, n, trans_a, trans_b, np.float32, seed=m + k + n)
    with _precision(own, "tf32"):
        got = own.to_host(own.k.matmul(own.asarray(a), own.asarray(b), trans_a=trans_a, trans_b=trans_b))
    opa, opb = (a.T if trans_a else a), (b.T if trans_b else b)
    expected = _round_mantissa(opa, 10).astype(np.float64) @ _round_mantissa(opb, 10)
    bound = np.abs(opa).astype(np.float64) @ np.abs(opb)
    assert np.all(np.abs(got - expected) <= 1e-6 * bound + 1e-30)


def _tf32_matmul_raises(be, message: str) -> None:
    with _precision(be, "tf32"), pytest.raises(RuntimeError, match=message):
        be.k.matmul(be.asarray(np.ones((2, 3), np.float32)), be.asarray(np.ones((3, 4), np.float32)))


def test_tensor_core_gemm_needs_compute_capability_8(own, monkeypatch):
    monkeypatch.setattr(type(own.xp.cuda.Device()), "compute_capability", "75")
    _tf32_matmul_raises(own, r"needs TF32 tensor cores \(compute capability 8.0\+\).*sm_75")


def test_graph_steps_train_in_tf32_on_tensor_cores(be, monkeypatch):
    """--precision tf32 --cuda-graphs: the captured step runs gemm_tc_f32 and trains like eager
    tf32 steps on cuBLAS (both round the operands identically, then add in float32)."""
    from gpumlp.model import MLP

    launched = []
    real_kernel = be.k._kernel
    monkeypatch.setattr(be.k, "_kernel", lambda base, sfx: launched.append(base) or real_kernel(base, sfx))
    rng = np.random.default_rng(1)
    X, y = rng.random((300, 784)).astype(np.float32), rng.integers(0, 10, 300)
    fit_kw = dict(epochs=2, batch_size=50, optimizer="adam", lr=1e-3, seed=2)
    with _precision(be, "tf32"):
        curves = {
            graphs: MLP("784-64-10", act="relu", backend=be, seed=2).fit(X, y, cuda_graphs=graphs, **fit_kw)[
                "loss"
            ]
            for graphs in (False, True)
        }
    assert "gemm_tc" in launched and "gemm" not in launched
    np.testing.assert_allclose(curves[True], curves[False], rtol=1e-4)
    assert curves[True][1] < curves[True][0]


def test_tensor_core_gemm_without_crt_headers_says_what_to_install(own, monkeypatch):
    """Wheel-only CUDA installs lack crt/mma.h unless nvidia-cuda-crt is there: NVRTC's failure
    (raised here as CuPy raises it, the compile itself is checked in test_cupy_real) is explained."""
    real_kernel = own.k._kernel

    def compile_fails(base, sfx):
        if base == "gemm_tc":
            raise RuntimeError('mma.h(55): catastrophic error: cannot open source file "crt/mma.h"')
        return real_kernel(base, sfx)

    monkeypatch.setattr(own.k, "_kernel", compile_fails)
    _tf32_matmul_raises(own, r"pip install nvidia-cuda-crt.*--precision float32.*crt/mma.h")
