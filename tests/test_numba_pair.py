"""Two-core step graphs (gpumlp.kernels.numba_pair): a step split between the calling thread and
a spinning worker trains like the per-kernel step (to rounding: OpenBLAS may round a band of a
product differently from the whole), gives the cores and OpenBLAS's threads back after every
epoch, stops cleanly when a half fails, and stays on one core where it should."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import numpy as np
import pytest

pytest.importorskip("numba")

from threaded_training import three_threads_training  # noqa: E402

from gpumlp import backend  # noqa: E402
from gpumlp.kernels import numba_cpu, numba_graph, numba_pair  # noqa: E402
from gpumlp.model import MLP  # noqa: E402

PAIR = numba_pair.PAIR
needs_pair = pytest.mark.skipif(not PAIR.available(), reason="two cores and NumPy's bundled OpenBLAS needed")


@pytest.fixture
def pair_steps(monkeypatch):
    """Counts the steps that ran on two cores in this test."""
    ran = []
    real = PAIR.step

    def counting(*args):
        done = real(*args)
        ran.append(done)
        return done

    monkeypatch.setattr(PAIR, "step", counting)
    monkeypatch.setenv("GPUMLP_STEP_GRAPHS", "2")
    return ran


def _train(mode: str, spec: str, fit_kw: dict, model_kw: dict, n: int = 700, features: int = 64):
    rng = np.random.default_rng(0)
    X, y = rng.uniform(-1, 1, (n, features)).astype(np.float32), rng.integers(0, 10, n)
    os.environ["GPUMLP_STEP_GRAPHS"] = mode
    try:
        be = backend._REGISTRY["numba"]()
        model = MLP(spec, backend=be, seed=3, **model_kw)
        hist = model.fit(X, y, epochs=2, seed=5, **fit_kw)
    finally:
        os.environ["GPUMLP_STEP_GRAPHS"] = "2"
    return model.state_arrays(), [r["loss"] for r in hist.records]


CASES = {
    "adam256-like: ReLU, softmax, Adam (GEMMs by columns and rows, Adam by halves)": (
        "64-256-10", dict(batch_size=128, optimizer="adam", lr=1e-3), dict(act="relu")),
    "seed-like: sigmoid, logistic, SGD + L2 in the GEMM, a split-K first layer": (
        "784-64-10", dict(batch_size=100, optimizer="sgd", lr=0.05, l2=1e-3),
        dict(act="sigmoid", loss="logistic")),
    "dropout, momentum, clipping": (
        "64-96-48-10", dict(batch_size=128, optimizer="momentum", lr=0.02, clip_norm=1.0),
        dict(act="relu", dropout=0.2)),
    # not RMSProp or Adam here: the bias before a batch norm has a gradient of rounding noise only,
    # which they scale up to steps of lr
    "batch norm, shifts, momentum": (
        "64-128-10", dict(batch_size=100, optimizer="momentum", lr=0.02, augment_shift=1),
        dict(act="relu", batchnorm=True)),
}  # fmt: skip


@needs_pair
@pytest.mark.parametrize("case", CASES)
def test_two_core_steps_train_like_the_per_kernel_step(pair_steps, case):
    spec, fit_kw, model_kw = CASES[case]
    features = int(spec.split("-")[0])
    two = _train("2", spec, fit_kw, model_kw, features=features)
    assert pair_steps and all(pair_steps), "the steps did not run on two cores"
    plain = _train("0", spec, fit_kw, model_kw, features=features)
    np.testing.assert_allclose(two[1], plain[1], rtol=1e-5)
    for name in plain[0]:
        np.testing.assert_allclose(two[0][name], plain[0][name], rtol=1e-4, atol=1e-6, err_msg=name)
    assert PAIR.owner is None and PAIR.serving is None  # parked after the last epoch
    assert numba_cpu._BLAS_THREADS() >= 2  # OpenBLAS has its threads back


@needs_pair
def test_a_wide_step_stays_on_one_core(pair_steps):
    """A GEMM of 2^26 multiply-adds or more: OpenBLAS's own two threads do better (deep1024)."""
    fit_kw = dict(batch_size=128, optimizer="sgd", lr=0.01)
    _train("2", "512-1024-10", fit_kw, dict(act="relu"), n=300, features=512)
    assert not any(pair_steps)


def test_replays_outside_a_session_stay_on_one_core(pair_steps):
    """A step graph replayed outside the training loop's session never takes the worker."""
    rng = np.random.default_rng(0)
    a, b, out = rng.standard_normal((128, 64)), rng.standard_normal((64, 128)), np.empty((128, 128))
    numba_graph.capture(lambda: numba_cpu.matmul(a, b, out=out))()
    np.testing.assert_allclose(out, a @ b)
    assert pair_steps == [False] and PAIR.owner is None


@needs_pair
@pytest.mark.parametrize("bad_row", [3, 100], ids=["calling core's half", "worker's half"])
def test_a_failing_half_stops_the_step_and_frees_the_pair(pair_steps, bad_row):
    """An error in either core's half (a gather's row index out of range: rows 0-63 are the calling
    core's, 64-127 the worker's) reaches the caller; the worker parks, and the next step runs on two
    cores again."""
    rng = np.random.default_rng(0)
    src, idx, x = rng.standard_normal((200, 64)), rng.integers(0, 200, 128), np.empty((128, 64))
    w, out = rng.standard_normal((64, 128)), np.empty((128, 128))

    def step():
        numba_cpu.gather_rows(src, idx, out=x)
        numba_cpu.matmul(x, w, out=out)

    replay = numba_graph.capture(step)
    with numba_pair.session():
        replay()
        np.testing.assert_allclose(out, src[idx] @ w)
        idx[bad_row] = 10**6
        with pytest.raises(IndexError, match="row index out of range"):
            replay()
        assert PAIR.serving is None  # parked
        idx[bad_row] = 7
        replay()
        np.testing.assert_allclose(out, src[idx] @ w)
    assert pair_steps == [True, True] and PAIR.owner is None  # the failed step raised through the count


@needs_pair
def test_a_resumed_fit_continues_bit_for_bit_on_two_cores(pair_steps, tmp_path):
    """Every full-size step of a graph is a replay, the first one too (capture_first): a fit resumed
    from a checkpoint replays the steps an uninterrupted one replays, on the same cores."""
    rng = np.random.default_rng(0)
    X, y = rng.uniform(-1, 1, (450, 784)).astype(np.float32), rng.integers(0, 10, 450)
    fit_kw = dict(batch_size=100, optimizer="adam", lr=1e-3, seed=7)
    straight = MLP("784-64-10", backend="numba", seed=1, act="relu")
    h_straight = straight.fit(X, y, epochs=3, **fit_kw)
    ckpt = tmp_path / "ck.npz"
    MLP("784-64-10", backend="numba", seed=1, act="relu").fit(X, y, epochs=1, checkpoint_path=ckpt, **fit_kw)
    resumed = MLP("784-64-10", backend="numba", seed=1, act="relu")
    h_resumed = resumed.fit(X, y, epochs=3, checkpoint_path=ckpt, resume=True, **fit_kw)
    assert all(pair_steps)
    assert h_resumed["loss"] == h_straight["loss"]
    for name, a in straight.state_arrays().items():
        np.testing.assert_array_equal(resumed.state_arrays()[name], a, err_msg=name)


@needs_pair
def test_three_threads_train_at_once_one_of_them_on_two_cores():
    """One thread's epoch holds the pair; the others replay on their own core meanwhile (no
    deadlock, no error), each to within rounding of a lone run."""
    script = three_threads_training().replace(
        "print(errors, len(got), all(all(np.array_equal(g[k], want[k]) for k in want) for g in got))",
        "print(errors, len(got), all(all(np.allclose(g[k], want[k], rtol=1e-4, atol=1e-6) for k in want)"
        " for g in got))",
    )
    env = dict(os.environ, GPUMLP_STEP_GRAPHS="2")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[] 3 True", out.stdout


def test_one_core_settings_keep_training_on_one_core():
    """OMP_NUM_THREADS=1 (one OpenBLAS thread) or GPUMLP_STEP_GRAPHS=1: no two-core step."""
    script = """
from gpumlp.kernels import numba_pair
print(numba_pair.PAIR.possible(), numba_pair.PAIR.available())
"""
    for env, want in ((dict(OPENBLAS_NUM_THREADS="1"), "False"), (dict(GPUMLP_STEP_GRAPHS="1"), "False False")):  # noqa: E501
        out = subprocess.run([sys.executable, "-c", script], env=dict(os.environ, **env), capture_output=True,
                             text=True, timeout=120)  # fmt: skip
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.split()[-1] == "False" and out.stdout.strip().endswith(want), out.stdout


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("trans_a, trans_b", [(False, False), (True, False), (False, True), (True, True)])
def test_the_bands_of_a_two_core_gemm_make_the_product(dtype, trans_a, trans_b):
    """Each core's part of a GEMM (a band of rows, of columns, or a half of K and a band of the
    sum), both parts together, against np.matmul within a GEMM's rounding. (Not bit for bit
    against the one-core GEMM: under the OPENBLAS_CORETYPE=Haswell pin neither a band nor a
    plain GEMM of a K half rounds as the whole / the batched GEMM's part does.)"""
    if numba_cpu._BLAS_THREADS is None:
        pytest.skip("needs NumPy's bundled OpenBLAS")
    rng = np.random.default_rng(1)
    m, k, n, alpha, beta = 100, 784, 60, 0.5, 0.25
    a = rng.standard_normal((k, m) if trans_a else (m, k)).astype(dtype)
    b = rng.standard_normal((n, k) if trans_b else (k, n)).astype(dtype)
    c0 = rng.standard_normal((m, n)).astype(dtype)
    want = alpha * np.matmul(a.T if trans_a else a, b.T if trans_b else b) + beta * c0
    tol = dict(rtol=0, atol=50 * np.finfo(dtype).eps * np.abs(want).max())
    for band, size in ((numba_cpu._gemm_rows, m), (numba_cpu._gemm_cols, n)):
        c = c0.copy()
        for lo, hi in ((0, size // 2), (size // 2, size)):
            band(c, a, b, alpha, beta, trans_a, trans_b, lo, hi)
        np.testing.assert_allclose(c, want, **tol, err_msg=band.__name__)
    parts, c = np.empty((2, m, n), dtype), np.empty((m, n), dtype)
    for p in (0, 1):
        numba_cpu._gemm_k_part(parts, a, b, trans_a, trans_b, p)
    numba_cpu._sum_parts(c, parts, 0, m // 2)
    numba_cpu._sum_parts(c, parts, m // 2, m)
    np.testing.assert_allclose(c, (want - beta * c0) / alpha, **tol)


def _elementwise_calls(rng):
    """(name, fresh arguments, call(args)) for kernels a two-core step splits by halves."""
    f = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    empty = lambda *shape: np.empty(shape, np.float32)  # noqa: E731
    codes = rng.integers(0, 256, (300, 784), dtype=np.uint8)
    step = np.array([3], np.int64)
    k = numba_cpu
    return [
        ("gather_rows", lambda: (f(300, 784), rng.integers(-300, 300, 128), empty(128, 784)),
         lambda a: k.gather_rows(a[0], a[1], out=a[2])),
        ("gather_pixels", lambda: (codes, rng.integers(0, 300, 128), empty(128, 784)),
         lambda a: k.gather_pixels(a[0], a[1], 127.5, -1.0, np.float32, out=a[2])),
        ("bias_act", lambda: (f(128, 256), f(256), empty(128, 256), empty(128, 256)),
         lambda a: k.bias_act(a[0], a[1], "sigmoid", out=a[2], pre=a[3])),
        ("act_grad", lambda: (f(128, 256), np.abs(f(128, 256)) % 1, empty(128, 256)),
         lambda a: k.act_grad(a[0], a[1], "sigmoid", out=a[2])),
        ("bias_grad", lambda: (f(128, 256), empty(256)), lambda a: k.bias_grad(a[0], out=a[1])),
        ("adam_step", lambda: (f(784, 256), f(784, 256), np.abs(f(784, 256)), np.abs(f(784, 256))),
         lambda a: k.adam_step(*a, 1e-3, t=step, l2=1e-4)),
    ]  # fmt: skip


@needs_pair
@pytest.mark.parametrize("index", range(6), ids=[c[0] for c in _elementwise_calls(np.random.default_rng(0))])
def test_elementwise_halves_on_two_cores_are_bit_for_bit(pair_steps, index):
    """A kernel split by halves of its elements, rows or columns does on each core the arithmetic
    it does on the whole (the chunk bodies of the parallel variants; a column sum keeps its row
    order), so the two-core replay equals the direct call bit for bit. (A GEMM of 2^19
    multiply-adds rides along: a step without one stays on one core.)"""
    rng = np.random.default_rng(index)
    name, make, call = _elementwise_calls(rng)[index]
    direct = make()
    recorded = [a.copy() for a in direct]
    a, b, out = rng.standard_normal((128, 64)), rng.standard_normal((64, 128)), np.empty((128, 128))
    replay = numba_graph.capture(lambda: (call(recorded), numba_cpu.matmul(a, b, out=out)))
    call(direct)
    with numba_pair.session():
        replay()
    assert pair_steps == [True]
    for got, want in zip(recorded, direct):
        np.testing.assert_array_equal(got, want, err_msg=name)


def _train_and_report(queue) -> None:
    rng = np.random.default_rng(0)
    X, y = rng.uniform(-1, 1, (450, 784)).astype(np.float32), rng.integers(0, 10, 450)
    ran = []
    real = PAIR.step
    PAIR.step = lambda *args: ran.append(real(*args)) or ran[-1]
    MLP("784-64-10", backend="numba", seed=1, act="relu").fit(X, y, epochs=1, batch_size=100)
    queue.put((bool(ran) and all(ran), PAIR.owner is None))


@needs_pair
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_trains_on_two_cores_of_its_own(pair_steps):
    """The worker thread does not survive a fork: the child forgets it (os.register_at_fork) and
    starts its own, instead of waiting forever at a barrier for a thread that is not there."""
    import multiprocessing

    _train("2", "784-64-10", dict(batch_size=100, optimizer="sgd", lr=0.05), dict(act="relu"), features=784)
    assert PAIR.worker is not None and all(pair_steps)  # the parent has its worker
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_train_and_report, args=(queue,))
    child.start()
    child.join(120)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child hung")
    assert child.exitcode == 0 and queue.get(timeout=5) == (True, True)


def test_a_session_inside_a_session_is_the_outer_ones():
    """A big predict opens a session of its own; inside the training loop's session (same thread)
    that one is the outer's: the pair stays held until the outer session ends."""
    if not numba_pair.PAIR.available():
        pytest.skip("no two cores of ours here")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 40)).astype(np.float32)
    ws = [rng.standard_normal((40, 30)).astype(np.float32), rng.standard_normal((30, 10)).astype(np.float32)]
    bs = [np.zeros(30, np.float32), np.zeros(10, np.float32)]
    threads = numba_cpu._BLAS_THREADS()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(numba_cpu, "CHAIN_MAX_WEIGHT_BYTES", 1)
        mp.setattr(numba_cpu, "_CHAIN_PAIR_MIN_FLOPS", 0)
        with numba_pair.session():
            got = numba_cpu.dense_chain(x, ws, bs, ["relu", "identity"])[0]
            assert numba_pair.PAIR.owner == threading.get_ident() and numba_cpu._BLAS_THREADS() == 1
        assert numba_pair.PAIR.owner is None and numba_cpu._BLAS_THREADS() == threads
    np.testing.assert_allclose(got, np.maximum(x @ ws[0], 0) @ ws[1], rtol=1e-5, atol=1e-5)
