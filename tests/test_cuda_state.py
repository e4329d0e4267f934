"""Per-backend CUDA state (kernels/cupy_gpu.py) on the emulated device: options, compiled kernels and
workspaces belong to one backend, so backends, models, threads and streams in one process do not
interfere; a graph's kernels are all loaded before capture; a replay runs on the stream current when
it is called; CuPy's private compute-type switch is found, or missed with a warning."""

from __future__ import annotations

import threading
import types
import warnings
from pathlib import Path

import numpy as np
import pytest

from gpumlp.backend import get_backend, make_cuda_backend
from gpumlp.kernels import cuda_emu
from gpumlp.kernels.cupy_gpu import compute_type_switch
from gpumlp.model import MLP


def test_two_backends_in_one_process_keep_their_own_options():
    checked, unchecked = (make_cuda_backend("cuda-emu", validate_labels=v) for v in (True, False))
    logits, bad = np.zeros((2, 3)), np.array([0, 7])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\), got values in \[0, 7\]"):
        checked.k.softmax_xent(checked.asarray(logits), checked.asarray(bad))
    loss, _ = unchecked.k.softmax_xent(unchecked.asarray(logits), unchecked.asarray(bad))
    assert np.isnan(float(unchecked.to_host(loss)))  # no host read: the bad label shows as a NaN loss
    assert checked.k is not unchecked.k and checked.k is not get_backend("cuda-emu").k


def test_capture_loads_every_kernel_before_capturing():
    """A fresh backend has loaded nothing; its first capture must fetch every kernel the graph
    launches (our GEMM included, which eager steps on cuBLAS never fetched) before begin_capture:
    the emulated device refuses get_function and module loads during capture, as CUDA's lazy
    loading can invalidate a capture."""
    be = make_cuda_backend("cuda-emu")
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((20, 30)).astype(np.float32), rng.standard_normal((30, 10)).astype(np.float32)
    da, db = be.asarray(a), be.asarray(b)
    out, sumsq = be.xp.zeros((20, 10), dtype=np.float32), be.xp.zeros((), dtype=np.float32)
    be.synchronize()  # the uploads are done before the stream reads them
    with be.stream():
        replay = be.capture(lambda: (be.k.matmul(da, db, out=out), be.k.sum_squares(out, out=sumsq)))
        assert not be.to_host(out).any()  # recorded, not run
        replay()
    be.synchronize()
    np.testing.assert_allclose(be.to_host(out), a @ b, rtol=1e-5, atol=1e-5)
    assert float(be.to_host(sumsq)) == pytest.approx(float(np.sum((a @ b) ** 2)), rel=1e-5)


def test_replay_launches_on_the_stream_current_at_replay(monkeypatch):
    """The training loop may replay a graph under another stream than the one it was captured
    on; the replay must be ordered with that stream's copies into the graph's inputs."""
    be = make_cuda_backend("cuda-emu")
    x = be.asarray(np.arange(6.0))
    be.synchronize()  # the upload is done before the streams read it
    with be.stream() as captured_on:
        replay = be.capture(lambda: be.k.sgd_step(x, x, 0.5))
    launched_on = []
    real_launch = cuda_emu.cuda.graph.Graph.launch
    monkeypatch.setattr(
        cuda_emu.cuda.graph.Graph, "launch", lambda g, s=None: launched_on.append(s) or real_launch(g, s)
    )
    with be.stream() as current:
        replay()
    be.synchronize()
    assert launched_on == [current] and current is not captured_on
    np.testing.assert_array_equal(be.to_host(x), np.arange(6.0) / 2)


def _in_threads(fn, n: int = 2) -> list:
    """fn(i) for i < n, in n threads started together -> their results; a thread's exception is
    raised here (pytest would only warn about it)."""
    results: list = [None] * n
    errors: list[BaseException] = []
    start = threading.Barrier(n)

    def run(i: int) -> None:
        try:
            start.wait()
            results[i] = fn(i)
        except BaseException as e:  # re-raised in the calling thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def test_sum_squares_on_overlapping_streams_and_threads_gives_every_norm():
    """Each stream (per thread) has its own sum_squares workspace: two launches that may overlap on
    a GPU (two streams, two models in threads) must not share the partials and the last-block
    ticket, or their sums mix, the ticket stays nonzero and every later norm is wrong. (The
    emulated device runs one launch at a time, so here the threads interleave launch by launch;
    its stream race checker names a shared workspace.)"""
    be = get_backend("cuda-emu")
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal(100_000 + 1000 * i) for i in range(2)]
    expected = [float(np.sum(x * x)) for x in xs]

    def norms(i: int) -> list[float]:
        d = be.asarray(xs[i])
        be.synchronize()  # the upload is done before the stream reads it
        with be.stream():
            return [float(be.to_host(be.k.sum_squares(d))) for _ in range(5)]

    for i, got in enumerate(_in_threads(norms)):
        np.testing.assert_allclose(got, expected[i], rtol=1e-9, err_msg=f"thread {i}")
    later = float(be.to_host(be.k.sum_squares(be.asarray(xs[0]))))  # and nothing is left behind
    assert later == pytest.approx(expected[0], rel=1e-9)


def test_sum_squares_on_two_unordered_streams():
    """Two non-blocking streams with no ordering between them, as two models' steps on a GPU:
    each launch has its own workspace, so neither writes memory the other uses (the stream race
    checker, where on, would name a shared one)."""
    be = get_backend("cuda-emu")
    rng = np.random.default_rng(2)
    xs = [rng.standard_normal(5000), rng.standard_normal(7000)]
    ds = [be.asarray(x) for x in xs]
    be.synchronize()  # the uploads are done before either stream reads them
    streams = [be.xp.cuda.Stream(non_blocking=True) for _ in xs]
    sums = []
    for s, d in zip(streams, ds):
        with s:
            sums.append(be.k.sum_squares(d))
    for s, got, x in zip(streams, sums, xs):
        s.synchronize()
        assert float(be.to_host(got)) == pytest.approx(float(np.sum(x * x)), rel=1e-12)


def test_two_models_training_in_threads_match_training_alone():
    """Two models with clipping and Adam on one cuda-emu backend, in two threads at once, end
    with the weights each gets when trained alone."""
    rng = np.random.default_rng(5)
    X, y = rng.random((300, 784)).astype(np.float32), rng.integers(0, 10, 300)
    be = get_backend("cuda-emu")
    kw = dict(epochs=1, batch_size=50, optimizer="adam", lr=1e-3, clip_norm=0.5)

    def train(seed: int) -> dict:
        model = MLP("784-16-10", act="relu", backend=be, seed=seed)
        model.fit(X, y, seed=seed, **kw)
        return model.state_arrays()

    alone = [train(seed) for seed in (1, 2)]
    together = _in_threads(lambda i: train(i + 1))
    for mine, ref in zip(together, alone):
        assert mine is not None and mine.keys() == ref.keys()
        for key in ref:
            np.testing.assert_array_equal(mine[key], ref[key], err_msg=key)


def test_compute_type_switch_of_real_cupy_is_found():
    """The private names exist in the CuPy the tests run against, and their codes are the
    compute types CuPy itself names DEFAULT / TF32 / BF16 (no GPU needed to look them up)."""
    cupy = pytest.importorskip("cupy", reason="real CuPy not installed")
    switch = compute_type_switch(cupy)
    assert switch is not None, f"CuPy {cupy.__version__}: no compute-type switch found"
    linalg = cupy._core._routines_linalg
    assert {p: linalg.compute_type_to_str(c) for p, c in switch[2].items()} == {
        "float32": "COMPUTE_TYPE_DEFAULT",
        "tf32": "COMPUTE_TYPE_TF32",
        "bf16": "COMPUTE_TYPE_BF16",
    }


def test_precision_without_cupys_private_switch_warns_once_and_stays_float32(monkeypatch):
    """A CuPy without cupy._core._routines_linalg's switch: tf32 is refused with one warning
    and matmuls stay exact float32."""
    monkeypatch.setattr(cuda_emu, "_core", types.SimpleNamespace())
    be = make_cuda_backend("cuda-emu")
    with pytest.warns(RuntimeWarning, match=r"no cuBLAS compute-type switch.*--precision tf32 is ignored"):
        be.set_matmul_precision("tf32")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        be.set_matmul_precision("bf16")  # once is enough
        be.set_matmul_precision("float32")
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((8, 300)).astype(np.float32), rng.standard_normal((300, 4)).astype(np.float32)
    for gemm in ("cublas", "own"):
        k = be.k if gemm == "cublas" else make_cuda_backend("cuda-emu", gemm="own").k
        got = be.to_host(k.matmul(be.asarray(a), be.asarray(b)))
        exact = a.astype(np.float64) @ b
        assert np.abs(got - exact).max() / np.abs(exact).max() < 1e-6, gemm
    with pytest.raises(ValueError, match="matmul precision must be one of float32, tf32, bf16"):
        be.set_matmul_precision("fp8")


def test_cuda_extras_accept_only_the_tested_cupy_major():
    """cupy_gpu relies on CuPy's private compute-type switch, so the extras cap CuPy at the major
    version tested (14.x); the CuPy these tests run against is inside the cap."""
    tomllib = pytest.importorskip("tomllib")
    requirements = pytest.importorskip("packaging.requirements")
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    extras = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]
    for extra in ("cuda12", "cuda13"):
        [req] = [requirements.Requirement(r) for r in extras[extra] if r.startswith("cupy-")]
        accepted = [v for v in ("13.6.0", "14.0.0", "14.2.0", "14.9.1", "15.0.0") if v in req.specifier]
        assert accepted == ["14.0.0", "14.2.0", "14.9.1"], f"{extra}: {req}"
        try:
            import cupy
        except ImportError:
            continue
        assert cupy.__version__ in req.specifier, f"tests run against CuPy {cupy.__version__}, {extra}: {req}"
