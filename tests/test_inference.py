"""The prediction path: allocation-free after warm-up, bit-identical to its definition, and keeping no
reference to the caller's data; inference section of the bench."""

from __future__ import annotations

import gc
import importlib.util
import itertools
import time
import tracemalloc
import warnings
import weakref

import numpy as np
import pytest

from gpumlp.model import MLP

BACKENDS = ["numpy", "numba"]
MODELS = [
    ("784-100-10", "sigmoid", "logistic", {}),
    ("784-64-32-10", "relu", "softmax_xent", {}),
    ("784-50-10", "tanh", "mse", {}),
    ("784-40-10", "relu", "softmax_xent", {"batchnorm": True, "dropout": 0.2}),
]


def _inputs(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    x = np.random.default_rng(seed).random((n, 784))
    return {
        "float32": x.astype(np.float32),
        "float64": x,
        "uint8": (x * 255).astype(np.uint8),
        "fortran": np.asfortranarray(x.astype(np.float32)),
    }


def _extra_bytes(fn) -> int:
    """Peak bytes traced while ``fn()`` runs, less what its result holds."""
    gc.collect()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        result = fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak - result.nbytes


SMALL = [("784-100-10", "sigmoid", "logistic"), ("784-64-10", "relu", "softmax_xent")]
BIG = ("784-2048-10", "relu", "softmax_xent")  # its first layer on OpenBLAS; 4096 rows: two cores


@pytest.mark.parametrize(
    "kind,spec,act,loss",  # each input kind once, each model once in float32
    [("float32", *SMALL[0]), ("float32", *SMALL[1]), ("float64", *SMALL[0]), ("uint8", *SMALL[1]),
     ("float32", *BIG)],
)  # fmt: skip
def test_predict_allocates_only_its_result_after_warm_up(kind, spec, act, loss):
    """After one call at the largest chunk, predict / predict_proba on any number of rows (a short
    last chunk, batch 1, batch 64) allocate only the array they return: no per-size workspaces, no
    (n, classes) scores array behind predict, no second array behind predict_proba, no cast copy,
    no (n, features) mask for the finiteness check. (numba: the numpy reference kernels allocate
    temporaries by design.)"""
    model = MLP(spec, act=act, loss=loss, backend="numba")
    warm = _inputs(4096)[kind]
    model.predict(warm), model.predict_proba(warm)
    for n in (4096 + 1000, 1, 64, 333):
        X = _inputs(n, seed=n)[kind]
        for fn in (model.predict, model.predict_proba):
            extra = _extra_bytes(lambda fn=fn, X=X: fn(X))
            # a few KiB of Python objects (views, frames, the sigmoid's zero bias); the scores of
            # the 1000-row chunk alone would be 40 KB, its workspaces 800 KB, a cast of it 3 MB
            assert extra < 16384, f"{fn.__name__} on {n} {kind} rows allocated {extra} extra bytes"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec,act,loss,kw", MODELS)
def test_predict_and_proba_equal_their_definitions_bit_for_bit(backend, spec, act, loss, kw):
    """predict is the arg-max of decision_function, predict_proba the loss's probabilities of it,
    exactly, for every input dtype and layout and for chunked evaluation; any input equals its
    float32 C-ordered cast."""
    model = MLP(spec, act=act, loss=loss, backend=backend, seed=3, **kw)
    for n, bs in ((1, 4096), (4200, 4096), (2500, 1000)):
        xs = _inputs(n, seed=n)
        cast = xs["uint8"].astype(np.float32)
        for kind, X in xs.items():
            scores = model.decision_function(X, batch_size=bs)
            np.testing.assert_array_equal(model.predict(X, batch_size=bs), scores.argmax(axis=1))
            proba = model.predict_proba(X, batch_size=bs)
            expected = model.loss.probabilities(model.be, scores.copy())
            assert proba.dtype == expected.dtype and proba.tobytes() == expected.tobytes(), kind
        np.testing.assert_array_equal(
            model.decision_function(xs["uint8"], bs), model.decision_function(cast, bs)
        )
        np.testing.assert_array_equal(
            model.decision_function(xs["fortran"], bs), model.decision_function(xs["float32"], bs)
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_prediction_keeps_no_reference_to_the_input(backend):
    model = MLP("784-32-10", backend=backend)
    X = _inputs(50)["float32"]
    ref = weakref.ref(X)
    model.predict(X), model.predict_proba(X), model.decision_function(X)
    del X
    gc.collect()
    assert ref() is None, "the model still holds the caller's input array after predicting"


def test_training_after_prediction_is_unchanged():
    """Eval-mode workspaces are separate from the training step's: predicting between fits (at the
    training batch size, too) does not change what training computes."""
    rng = np.random.default_rng(0)
    X, y = rng.random((256, 784), dtype=np.float32), rng.integers(0, 10, 256)
    a, b = MLP("784-32-10", backend="numba"), MLP("784-32-10", backend="numba")
    a.fit(X, y, epochs=1, batch_size=64, seed=1)
    b.fit(X, y, epochs=1, batch_size=64, seed=1)
    b.predict(X[:64]), b.predict_proba(X[:7])
    a.fit(X, y, epochs=1, batch_size=64, seed=2)
    b.fit(X, y, epochs=1, batch_size=64, seed=2)
    for (_, wa, _, _), (_, wb, _, _) in zip(a.parameters(), b.parameters()):
        np.testing.assert_array_equal(wa, wb)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["C", "F", "strided"])
def test_predict_rejects_nan_and_inf_anywhere_and_accepts_huge_finite_values(dtype, layout):
    """The finiteness check's fast path (a sum of squares) never decides alone: NaN, +inf and -inf
    are found at their place, and finite values whose squares overflow are accepted."""
    model = MLP("784-8-10", backend="numba")

    def arrange(a):
        if layout == "F":
            return np.asfortranarray(a)
        return np.repeat(a, 2, axis=0)[::2] if layout == "strided" else a

    for bad in (np.nan, np.inf, -np.inf):
        X = np.zeros((100, 784), dtype=dtype)
        X[30, 5] = bad
        with pytest.raises(ValueError, match="NaN or inf \\(first at row 30, column 5\\)"):
            model.predict(arrange(X))
    huge = np.full((100, 784), 1e20, dtype=dtype)  # float32 squares overflow, float64 ones don't
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and the overflowing check does not warn
        assert model.predict(arrange(huge)).shape == (100,)


def test_bench_checks_every_runner_before_timing_it():
    """A runner whose labels or probabilities disagree with the numpy backend stops the inference
    bench with the runner's name and both measures; the real peers pass."""
    from gpumlp.bench import inference as I

    X = np.random.default_rng(0).random((300, 784), dtype=np.float32)
    peers = [I.TORCH] if importlib.util.find_spec("torch") else []
    peers += [I.ORT] if I.ort_unavailable("float32") is None else []
    runners = I.build_runners("784-100-10", "sigmoid", "logistic", ["numba"], peers, "float32")
    ref = MLP("784-100-10", act="sigmoid", loss="logistic", backend="numpy", seed=0)
    checks = I.check_runners(runners, ref, X)
    assert set(checks) == {"numba", *peers}
    assert all(c["max_abs_diff"] <= I.PROBA_ATOL and c["label_agreement"] >= 0.999 for c in checks.values())
    good = runners["numba"]
    runners["shifted"] = {
        "predict": lambda X: (good["predict"](X) + 1) % 10,
        "predict_proba": good["predict_proba"],
    }
    with pytest.raises(RuntimeError, match="shifted disagrees with the numpy backend.*labels agree on 0.00%"):
        I.check_runners(runners, ref, X)


def test_interleaved_best_times_each_fn_after_a_warm_up_in_every_round():
    from gpumlp.bench import inference as I

    calls: list[tuple[str, float]] = []
    fns = {k: (lambda k=k: calls.append((k, time.perf_counter()))) for k in "ab"}
    best = I.interleaved_best(fns, repeats=3, inner=2, pool=lambda key: "blas")
    runs = [list(g) for _, g in itertools.groupby(calls, key=lambda c: c[0])]
    assert [r[0][0] for r in runs] == ["a", "b"] * 3  # per round: a's calls, then b's
    for run in runs:  # warm-up calls for about WARM_UP_S (at least one), then the 2 timed ones
        assert len(run) >= 3 and run[-2][1] - run[0][1] >= 0.9 * I.WARM_UP_S
    assert set(best) == {"a", "b"} and all(0 < t < 1 for t in best.values())


def test_bench_gives_a_fused_predict_numbas_pool_and_names_its_path():
    """The numba backend's fused predict runs on Numba's threads, not BLAS's: the bench pauses
    between it and the floor's matmuls (as between any two pools) and says which path each model
    took; a layer-by-layer predict stays with BLAS."""
    from gpumlp.bench import inference as I
    from gpumlp.bench.report import inference_legend, inference_table
    from gpumlp.kernels import numba_cpu

    if not numba_cpu.CHAIN_MAX_WEIGHT_BYTES:
        pytest.skip("no fused inference on this CPU (CHAIN_MAX_WEIGHT_BYTES = 0)")
    runners = I.build_runners("784-100-10", "sigmoid", "logistic", ["numpy", "numba"], [], "float32")
    pools = I.runner_pools(runners)
    assert pools == {"numpy": ("blas", "layers"), "numba": ("numba", "dense_chain"), I.FLOOR: ("blas", None)}
    X = np.random.default_rng(0).random((64, 784), dtype=np.float32)
    rows = I.time_inference("seed", X, ["numba"], [], "float32", repeats=1, batches=(64,))
    assert {r.get("inference_path") for r in rows} == {"dense_chain", None}  # None: the floor's row
    text = inference_table({"inference": rows}, markdown=True) + inference_legend({"inference": rows})
    assert "gpumlp inference paths: numba: dense_chain on seed" in text
