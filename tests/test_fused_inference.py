"""Fused inference: the numba backend's ``predict`` / ``predict_proba`` / ``decision_function`` as
one ``dense_chain`` call per chunk (``MLP.inference_path``), tested through the public API only.

Which models take the fused path; that it gives the numpy backend's answers (labels, probabilities
with the loss's activation folded into the last layer, raw scores) chunk by chunk; that the NaN/inf
check it defers to a non-finite first product still names the first bad element of X exactly,
whichever chunk it lies in, while huge finite values pass; and GPUMLP_CHAIN_MAX_WEIGHT_BYTES.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import assert_close

from gpumlp import backend
from gpumlp.model import MLP

N = 4096 + 333  # two chunks at the default batch size, five at 1000: a short last chunk either way
SEED_MODEL = {"spec": "784-100-10", "act": "sigmoid", "loss": "logistic"}


def _numba_limit() -> int:
    """numba_cpu.CHAIN_MAX_WEIGHT_BYTES; skips where the numba backend does not load."""
    try:
        backend.get_backend("numba")
    except backend.BackendUnavailable as e:
        pytest.skip(str(e))
    from gpumlp.kernels import numba_cpu

    return numba_cpu.CHAIN_MAX_WEIGHT_BYTES


def _fused_limit() -> int:
    limit = _numba_limit()
    if not limit:
        pytest.skip("numba fuses no inference here (CHAIN_MAX_WEIGHT_BYTES = 0: not x86 AVX2+FMA)")
    return limit


@pytest.fixture(scope="module")
def X():
    """N MNIST-like rows in [0, 1) (float32); tests copy it before writing into it."""
    return np.random.default_rng(0).random((N, 784), dtype=np.float32)


def _twins(dtype="float32", **config):
    """The same model (numpy's initial weights, copied) on the numpy and the numba backend."""
    _numba_limit()
    config = {**SEED_MODEL, **config}
    spec = config.pop("spec")
    ref = MLP(spec, dtype=dtype, backend="numpy", seed=3, **config)
    fused = MLP(spec, dtype=dtype, backend="numba", seed=5, **config)
    fused.load_state_arrays(ref.state_arrays())
    return ref, fused


# ============================================================ which path
FUSED = [
    pytest.param({}, id="seed 784-100-10 sigmoid logistic"),
    pytest.param({"spec": "784-64-32-10", "act": "relu", "loss": "softmax_xent"}, id="784-64-32-10 relu"),
    pytest.param({"dropout": 0.2}, id="seed with dropout"),
    pytest.param({"spec": "784-64-32-10", "act": "tanh", "loss": "mse", "dropout": 0.5}, id="mse dropout"),
    pytest.param({"dtype": "float64"}, id="seed float64"),
    pytest.param({"spec": "784-1024-1024-10", "act": "relu", "loss": "softmax_xent"}, id="4 MiB then 40 KiB"),
]
LAYERS = [
    pytest.param({"batchnorm": True}, id="seed with batchnorm"),
    pytest.param({"spec": "784-64-32-10", "act": "relu", "batchnorm": True, "dropout": 0.1}, id="bn dropout"),
]


def _model(be, config: dict) -> MLP:
    """SEED_MODEL with ``config``'s changes on backend ``be`` (a name or a Backend)."""
    config = {**SEED_MODEL, **config}
    return MLP(config.pop("spec"), backend=be, **config)


@pytest.mark.parametrize("config", FUSED)
def test_dense_models_take_the_fused_path_on_numba(config):
    _fused_limit()
    assert _model("numba", config).inference_path == "dense_chain"


@pytest.mark.parametrize("config", LAYERS)
def test_batchnorm_and_big_weights_take_the_layers_on_numba(config):
    _numba_limit()
    assert _model("numba", config).inference_path == "layers"


@pytest.mark.parametrize("config", FUSED + LAYERS)
def test_the_other_backends_take_the_layers(config):
    """numpy's (and the CUDA backends') dense_chain is the layers one by one: never taken."""
    assert _model("numpy", config).inference_path == "layers"
    try:
        emu = backend.get_backend("cuda-emu")
    except backend.BackendUnavailable:
        return
    assert _model(emu, config).inference_path == "layers"


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_weight_limit_is_inclusive(dtype):
    """A last weight matrix of exactly CHAIN_MAX_WEIGHT_BYTES fuses, one input more does not
    (bigger ones before it run on the GEMM inside the chain)."""
    limit, itemsize = _fused_limit(), np.dtype(dtype).itemsize
    cols = limit // (itemsize * 256)
    if cols * itemsize * 256 != limit:
        pytest.skip(f"CHAIN_MAX_WEIGHT_BYTES = {limit} is no multiple of a 256-wide {dtype} row")
    at = MLP(f"20-256-{cols}", dtype=dtype, backend="numba")
    over = MLP(f"20-257-{cols}", dtype=dtype, backend="numba")
    assert at.inference_path == "dense_chain" and over.inference_path == "layers"


# ============================================================ the numpy backend's answers
PARITY = [  # the 3-layer spec 784-50-30-10 with
    pytest.param({"act": "sigmoid", "loss": "logistic"}, id="logistic sigmoid"),
    pytest.param({"act": "relu", "loss": "softmax_xent"}, id="softmax relu"),
    pytest.param({"act": "tanh", "loss": "mse"}, id="mse tanh"),
    pytest.param({"act": "relu", "loss": "softmax_xent", "dropout": 0.3}, id="dropout"),
]
# float32: the fused kernel's FMA chains round differently from BLAS's blocked sums (measured
# max 2.2e-6 on scores of magnitude ~3); float64: ~5e-15
CLOSE = {"float32": (1e-5, 1e-5), "float64": (1e-12, 1e-12)}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("config", PARITY)
def test_fused_predictions_match_the_numpy_backend(X, config, dtype):
    ref, fused = _twins(dtype, spec="784-50-30-10", **config)
    assert fused.inference_path == ("dense_chain" if _numba_limit() else "layers")
    for batch_size in (1000, None):  # None: the default (4096)
        size = () if batch_size is None else (batch_size,)
        labels = fused.predict(X, *size)
        assert labels.shape == (N,) and labels.dtype == np.intp
        agreement = (labels == ref.predict(X, *size)).mean()
        assert agreement >= (0.999 if dtype == "float32" else 1.0), agreement
        # predict_proba before decision_function: its folded output activation must not stay
        proba = fused.predict_proba(X, *size)
        assert proba.dtype == np.dtype(dtype)
        assert_close(ref.predict_proba(X, *size), proba, *CLOSE[dtype], what=f"predict_proba {batch_size}")
        scores = fused.decision_function(X, *size)
        want = ref.decision_function(X, *size)
        assert_close(want, scores, *CLOSE[dtype], what=f"decision_function {batch_size}")
    if config["loss"] == "logistic":  # the fold is the sigmoid of the scores, not of anything else
        sigmoid = (1 / (1 + np.exp(-scores.astype(np.float64)))).astype(proba.dtype)
        assert_close(sigmoid, proba, 1e-6, 1e-7, what="sigmoid(scores)")
    assert np.array_equal(fused.predict(X[:1]), labels[:1])  # a one-row chunk


def test_fused_predictions_of_other_input_layouts_and_dtypes(X):
    """uint8 images, float64 and Fortran-ordered X reach the chain as C-contiguous chunks of the
    model's dtype: the same outputs as the float32 X they equal."""
    ref, fused = _twins()
    images = (X[:1500] * 255).astype(np.uint8)
    with np.errstate(over="ignore"):  # the reference sigmoid's exp(-s) of saturated units
        want = ref.predict_proba(images.astype(np.float32))
    for variant in (images, images.astype(np.float64), np.asfortranarray(images.astype(np.float32))):
        assert_close(want, fused.predict_proba(variant, 1000), *CLOSE["float32"], what=str(variant.dtype))


def test_fused_predictions_after_training(X):
    """Training on numba (its step graphs, a flat parameter buffer) leaves weights the chain
    reads as they are: predictions equal the numpy backend's on the trained weights."""
    ref, fused = _twins(spec="784-32-10", act="relu", loss="softmax_xent")
    y = np.random.default_rng(1).integers(0, 10, 600)
    fused.fit(X[:600], y, epochs=1, batch_size=100, lr=0.1)
    ref.load_state_arrays(fused.state_arrays())
    assert fused.inference_path == ("dense_chain" if _numba_limit() else "layers")
    assert_close(ref.decision_function(X), fused.decision_function(X), *CLOSE["float32"], what="trained")


# ============================================================ NaN / inf in X
def _message(row: int, col: int) -> str:
    """gpumlp.validate.check_finite's message, as a pattern."""
    return re.escape(f"X contains NaN or inf (first at row {row}, column {col})")


@pytest.mark.parametrize("row, batch_size", [(4100, 4096), (1500, 1000), (0, 1000), (N - 1, 4096)])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("x_dtype", [np.float32, np.float64])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_nonfinite_x_is_named_exactly_in_any_chunk(X, row, batch_size, value, x_dtype, dtype):
    """The fused path skips the up-front NaN/inf pass and checks only a chunk whose first product
    is not finite: the error still names the first bad element of the whole X, as the layers do."""
    ref, fused = _twins(dtype)
    Xb = X.astype(x_dtype)
    Xb[row, 7] = value
    Xb[row + 1 :: 97, 300] = value  # later ones, in this chunk and the next: not the first
    for model in (fused, ref):
        for method in (model.predict, model.predict_proba, model.decision_function):
            with pytest.raises(ValueError, match=_message(row, 7)):
                method(Xb, batch_size)


def test_the_first_nonfinite_value_is_found_after_a_flagged_finite_chunk(X):
    """A finite chunk whose product overflows is flagged, checked and passes; the NaN of a later
    chunk is still the error."""
    ref, fused = _overflowing_twins()
    Xb = X.copy()
    Xb[10, 3] = 3e38  # chunk 0: overflows (see _overflowing_twins), finite
    Xb[2500, 400] = np.nan  # chunk 2
    for model in (fused, ref):
        with pytest.raises(ValueError, match=_message(2500, 400)):
            model.predict(Xb, 1000)


def _overflowing_twins():
    """The seed model on both backends with input 3's weights set to +-2: 3e38 there makes the
    first product +-inf in every order of summation (and the sigmoid turns it into 1 or 0), so the
    numpy backend's answer is as well defined as the fused one."""
    ref, fused = _twins()
    arrays = ref.state_arrays()
    arrays["param/0.W"][3] = 2.0 * np.where(np.arange(100) % 2, 1.0, -1.0)
    ref.load_state_arrays(arrays)
    fused.load_state_arrays(arrays)
    return ref, fused


def test_huge_finite_values_are_accepted(X):
    """3e38 is a float32: no NaN/inf error, whether the first product overflows (input 3) or not
    (a few other inputs: Xavier weights keep it finite); the labels are the numpy backend's."""
    ref, fused = _overflowing_twins()
    Xb = X.copy()
    Xb[10, 3] = Xb[4200, 3] = 3e38
    Xb[11, 3] = -3e38
    Xb[1500, [5, 600, 700]] = 3e38
    Xb[4300, 100] = -3e38
    with np.errstate(over="ignore", invalid="ignore"):  # the numpy backend's overflowing matmul and exp
        want = ref.predict(Xb, 1000)
        scores = ref.decision_function(Xb, 1000)
    assert np.isfinite(scores).all()  # the reference is well defined (see _overflowing_twins)
    for batch_size in (1000, 4096):
        np.testing.assert_array_equal(fused.predict(Xb, batch_size), want)
        got = fused.decision_function(Xb, batch_size)
        assert_close(scores, got, *CLOSE["float32"], what=f"decision_function {batch_size}")


# ============================================================ GPUMLP_CHAIN_MAX_WEIGHT_BYTES
def _run_with_limit(value: str, code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, GPUMLP_CHAIN_MAX_WEIGHT_BYTES=value)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


PATHS = (
    "from gpumlp.model import MLP\n"
    "from gpumlp.kernels import numba_cpu\n"
    "print(numba_cpu.CHAIN_MAX_WEIGHT_BYTES)\n"
    "print(MLP('784-100-10', act='sigmoid', loss='logistic', backend='numba').inference_path)\n"
    "print(MLP('784-1024-1024-10', backend='numba').inference_path)\n"
)


@pytest.mark.parametrize(
    "value, limit, paths",
    [("0", 0, ["layers", "layers"]), ("4194304", 4 << 20, ["dense_chain", "dense_chain"])],
)
def test_env_sets_the_weight_limit(value, limit, paths):
    """0 never fuses (on any CPU); 4 MiB lets the 1024-wide weights fuse too."""
    _numba_limit()
    out = _run_with_limit(value, PATHS)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [str(limit), *paths]


@pytest.mark.parametrize("value", ["abc", "-5", "-0.5", "inf", "nan"])
def test_env_bad_weight_limit_fails_the_import_naming_it(value):
    _numba_limit()
    out = _run_with_limit(value, "import gpumlp.kernels.numba_cpu")
    assert out.returncode != 0
    assert "ValueError" in out.stderr and "GPUMLP_CHAIN_MAX_WEIGHT_BYTES" in out.stderr, out.stderr[-2000:]


# ============================================================ threads
def test_predict_from_several_threads_under_the_workqueue_layer():
    """Numba's workqueue threading layer (its fallback without OpenMP or TBB) aborts the process
    when two threads launch parallel regions at once; predicting from three threads used to do
    that. One parallel region at a time: the other callers run serially, with the same results."""
    if not _numba_limit():
        pytest.skip("no fused inference on this CPU (CHAIN_MAX_WEIGHT_BYTES = 0)")
    code = (
        "import threading, numpy as np, numba\n"
        "from gpumlp.model import MLP\n"
        "m = MLP('784-100-10', act='sigmoid', loss='logistic', backend='numba', seed=0)\n"
        "x = np.random.default_rng(0).random((4096, 784), dtype=np.float32)\n"
        "want, errors = m.predict(x), []\n"
        "assert m.inference_path == 'dense_chain' and numba.threading_layer() == 'workqueue'\n"
        "def work():\n"
        "    try:\n"
        "        for _ in range(20):\n"
        "            assert (m.predict(x) == want).all() and np.isfinite(m.predict_proba(x)).all()\n"
        "    except Exception as e:\n"
        "        errors.append(repr(e))\n"
        "threads = [threading.Thread(target=work) for _ in range(3)]\n"
        "[t.start() for t in threads]; [t.join() for t in threads]\n"
        "print('errors', errors)\n"
    )
    env = dict(os.environ, NUMBA_THREADING_LAYER="workqueue")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "errors []", out.stdout
