"""numba step graphs (gpumlp.kernels.numba_graph): a full-size training step recorded once and
replayed as one compiled function trains exactly like the per-kernel step, and what cannot be
replayed runs kernel by kernel."""

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
from gpumlp.augment import Augment  # noqa: E402
from gpumlp.kernels import numba_cpu, numba_graph  # noqa: E402
from gpumlp.kernels.common import StepNotCapturable  # noqa: E402
from gpumlp.model import MLP  # noqa: E402
from gpumlp.optim import Schedule  # noqa: E402


@pytest.fixture
def compiled(monkeypatch):
    """The tapes numba_graph compiles in this test (one list of ops per captured step)."""
    tapes = []
    real = numba_graph._compile

    def spy(tape, **kw):
        tapes.append(tape)
        return real(tape, **kw)

    monkeypatch.setattr(numba_graph, "_compile", spy)
    return tapes


def _data(n=1050, features=64, classes=10, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, (n, features)).astype(np.float32), rng.integers(0, classes, n)


def _train(replays: bool, spec, fit_kw, model_kw=None, dtype="float32"):
    be = dataclasses.replace(backend.get_backend("numba"), replays_steps=replays)
    X, y = _data()
    model = MLP(spec, dtype=dtype, backend=be, seed=3, **(model_kw or {}))
    hist = model.fit(X.astype(dtype), y, epochs=3, seed=5, **fit_kw)
    return model.state_arrays(), [(r["loss"], r["train_acc"]) for r in hist.records]


CASES = {
    "seed: sigmoid, logistic, SGD + L2 (in the GEMM)": (
        "64-32-10", dict(batch_size=100, optimizer="sgd", lr=0.05, l2=1e-3),
        dict(act="sigmoid", loss="logistic")),
    "relu, softmax, momentum + L1, step schedule": (
        "64-48-24-10", dict(batch_size=64, optimizer="momentum", lr=0.02, l1=1e-4,
                            schedule=Schedule("step", gamma=0.5, step_size=1)), dict(act="relu")),
    "leaky ReLU, MSE, nesterov, summed loss": (
        "64-16-10", dict(batch_size=50, optimizer="nesterov", lr=1e-3, reduction="sum"),
        dict(act="leaky_relu", loss="mse")),
    "gelu, AdaGrad": ("64-32-10", dict(batch_size=128, optimizer="adagrad", lr=0.05), dict(act="gelu")),
    "silu, RMSProp": ("64-32-10", dict(batch_size=128, optimizer="rmsprop", lr=1e-3), dict(act="silu")),
    "relu, Adam (its step count read inside the kernel)": (
        "64-32-10", dict(batch_size=100, optimizer="adam", lr=1e-3, l2=1e-4), dict(act="relu")),
    "AdamW": ("64-32-10", dict(batch_size=100, optimizer="adamw", lr=1e-3), dict(act="relu")),
    "Lion, exponential schedule": (
        "64-32-10", dict(batch_size=100, optimizer="lion", lr=1e-4, schedule=Schedule("exp", gamma=0.9)),
        dict(act="relu")),
    "unshuffled": (
        "64-32-10", dict(batch_size=100, optimizer="sgd", lr=0.05, shuffle=False), dict(act="relu")),
    "dropout (its step read inside the kernel), Adam": (
        "64-32-16-10", dict(batch_size=100, optimizer="adam", lr=1e-3), dict(act="relu", dropout=0.2)),
    "batch norm, momentum": (
        "64-32-10", dict(batch_size=100, optimizer="momentum", lr=0.02), dict(act="relu", batchnorm=True)),
    "tanh: NumPy's tanh between two compiled segments": (
        "64-32-10", dict(batch_size=100, optimizer="momentum", lr=0.05), dict(act="tanh")),
    "augmentation: shifts": (
        "64-32-10", dict(batch_size=100, optimizer="sgd", lr=0.05, augment_shift=1), dict(act="relu")),
    "augmentation: rotation, scaling, shifts, elastic fields": (
        "64-32-10", dict(batch_size=100, optimizer="sgd", lr=0.05, augment=Augment(
            shift=1.5, rotate=10, scale=0.1, elastic_alpha=3.0, elastic_sigma=1.0)), dict(act="relu")),
    "clipping by norm and by value, gradient norms logged": (
        "64-32-10", dict(batch_size=100, optimizer="sgd", lr=0.5, clip_norm=0.5, clip_value=0.05,
                         log_grad_norms=True), dict(act="sigmoid")),
}  # fmt: skip


# float64 for a few: each case and dtype is a graph of its own to compile (about a second, once)
FLOAT64_CASES = (
    "seed: sigmoid, logistic, SGD + L2 (in the GEMM)", "dropout (its step read inside the kernel), Adam",
)


@pytest.mark.parametrize(
    "case, dtype", [(c, "float32") for c in CASES] + [(c, "float64") for c in FLOAT64_CASES]
)
def test_step_graphs_train_bit_for_bit_like_the_per_kernel_step(compiled, case, dtype, monkeypatch):
    monkeypatch.setenv("GPUMLP_STEP_GRAPHS", "1")  # on one core (two: tests/test_numba_pair.py)
    spec, fit_kw, model_kw = CASES[case]
    with_graphs = _train(True, spec, fit_kw, model_kw, dtype)
    assert compiled, "no step was replayed as a graph"
    kernels = len(compiled)
    assert _train(False, spec, fit_kw, model_kw, dtype)[1] == with_graphs[1]  # loss and accuracy per epoch
    assert len(compiled) == kernels  # replays_steps=False compiled nothing
    weights, plain = with_graphs[0], _train(False, spec, fit_kw, model_kw, dtype)[0]
    for name in plain:
        np.testing.assert_array_equal(weights[name], plain[name], err_msg=name)


def test_a_step_that_cannot_be_captured_runs_kernel_by_kernel():
    """When the capture refuses, that step has already run for real and the fit goes on kernel by
    kernel, asking no more captures: the same weights as never trying."""
    tries = []

    def refusing(step):
        tries.append(step)
        raise StepNotCapturable("test")

    be = dataclasses.replace(backend.get_backend("numba"), capture=refusing)
    fit_kw, model_kw = dict(batch_size=100, optimizer="sgd", lr=0.05), dict(act="relu")
    X, y = _data()
    model = MLP("64-32-10", backend=be, seed=3, **model_kw)
    hist = model.fit(X, y, epochs=3, seed=5, **fit_kw)
    got = model.state_arrays(), [(r["loss"], r["train_acc"]) for r in hist.records]
    assert len(tries) == 1
    want = _train(False, "64-32-10", fit_kw, model_kw)
    assert got[1] == want[1]
    for name in want[0]:
        np.testing.assert_array_equal(got[0][name], want[0][name], err_msg=name)


def _kernel_calls(rng, dtype):
    """For every CAPTURABLE kernel: (name, fresh arguments maker, call(k, args))."""
    f = lambda *shape: rng.standard_normal(shape).astype(dtype)  # noqa: E731
    lab = rng.integers(0, 10, 20).astype(np.int32)
    acc = lambda: np.zeros((), dtype)  # noqa: E731
    step = np.array([4], np.int64)
    codes = lambda *shape: rng.integers(0, 256, shape, dtype=np.uint8)  # noqa: E731
    opt = lambda name, *state, **kw: (  # noqa: E731
        name, lambda: (f(30, 7), f(30, 7), *[np.abs(f(30, 7)) for _ in state]),
        lambda k, a: getattr(k, name)(*a, 1e-2, **kw))
    return [
        ("gather_rows", lambda: (f(50, 9), rng.integers(-50, 50, 20), np.empty((20, 9), dtype)),
         lambda k, a: k.gather_rows(a[0], a[1], out=a[2])),
        ("gather_pixels", lambda: (codes(50, 9), rng.integers(-50, 50, 20), np.empty((20, 9), dtype)),
         lambda k, a: k.gather_pixels(a[0], a[1], 127.5, -1.0, a[2].dtype, out=a[2])),
        ("gather_shifted_pixels", lambda: (codes(50, 64), rng.integers(0, 50, 20), np.empty((20, 64), dtype)),
         lambda k, a: k.gather_shifted_pixels(a[0], a[1], 2, 3, 255.0, 0.0, a[2].dtype, step=step, out=a[2])),
        ("matmul", lambda: (f(20, 9), f(7, 9), np.empty((20, 7), dtype)),
         lambda k, a: k.matmul(a[0], a[1], out=a[2], trans_b=True)),
        ("bias_act", lambda: (f(20, 12), f(12), np.empty((20, 12), dtype), np.empty((20, 12), dtype)),
         lambda k, a: k.bias_act(a[0], a[1], "gelu", out=a[2], pre=a[3])),
        ("bias_act", lambda: (f(32, 40), f(40), np.empty((32, 40), dtype)),  # with NumPy's tanh in place
         lambda k, a: k.bias_act(a[0], a[1], "tanh", out=a[2])),
        ("bias_act", lambda: (f(64, 80), f(80), np.empty((64, 80), dtype)),  # float64: around NumPy's exp
         lambda k, a: k.bias_act(a[0], a[1], "sigmoid", out=a[2])),
        ("matmul", lambda: (f(20, 18), f(9, 7), np.empty((20, 7), dtype)),  # strided: np.matmul into out
         lambda k, a: k.matmul(a[0][:, ::2], a[1], out=a[2])),
        ("act_grad", lambda: (f(20, 12), f(20, 12), np.empty((20, 12), dtype)),
         lambda k, a: k.act_grad(a[0], np.abs(a[1]) % 1, "sigmoid", out=a[2])),
        ("bias_grad", lambda: (f(20, 12), np.empty(12, dtype)), lambda k, a: k.bias_grad(a[0], out=a[1])),
        ("softmax_xent", lambda: (f(20, 10), lab, np.empty((20, 10), dtype), acc()),
         lambda k, a: k.softmax_xent(a[0], a[1], grad=a[2], grad_scale=0.05, loss=a[3])),
        ("sigmoid_bce", lambda: (f(20, 10), lab, np.empty((20, 10), dtype), acc()),
         lambda k, a: k.sigmoid_bce(a[0], a[1], grad=a[2], loss=a[3])),
        ("mse", lambda: (f(20, 10), lab, np.empty((20, 10), dtype), acc()),
         lambda k, a: k.mse(a[0], a[1], grad=a[2], loss=a[3])),
        ("correct_count", lambda: (f(20, 10), lab, np.zeros((), np.int64)),
         lambda k, a: k.correct_count(a[0], a[1], count=a[2])),
        ("sgd_matmul_step", lambda: (f(9, 7), f(20, 9), f(20, 7)),
         lambda k, a: k.sgd_matmul_step(a[0], a[1], a[2], 0.1, 0.01, trans_a=True)),
        opt("sgd_step", l2=0.1, l1=0.01),
        opt("momentum_step", "v", mu=0.9, nesterov=True),
        opt("adagrad_step", "h"),
        opt("rmsprop_step", "s"),
        opt("adam_step", "m", "v", t=step),
        opt("adamw_step", "m", "v", t=step, weight_decay=0.1),
        opt("lion_step", "m"),
        ("dropout_forward", lambda: (f(20, 12), np.empty((20, 12), dtype), np.empty((20, 12), dtype)),
         lambda k, a: k.dropout_forward(a[0], 0.3, 7, out=a[1], mask=a[2], step=np.array([5]))),
        ("dropout_backward", lambda: (f(20, 12), f(20, 12), np.empty((20, 12), dtype)),
         lambda k, a: k.dropout_backward(a[0], a[1], out=a[2])),
        ("batchnorm_forward", lambda: (f(20, 12), f(12), f(12), *[np.empty((20, 12), dtype) for _ in "ox"],
                                       *[np.empty(12, dtype) for _ in "mv"], f(12), np.abs(f(12))),
         lambda k, a: k.batchnorm_forward(*a[:3], 1e-5, *a[3:7], running_mean=a[7], running_var=a[8])),
        ("batchnorm_backward", lambda: (f(20, 12), f(20, 12), f(12), np.abs(f(12)), np.empty((20, 12), dtype),
                                        np.empty(12, dtype), np.empty(12, dtype)),
         lambda k, a: k.batchnorm_backward(*a[:4], 1e-5, *a[4:])),
        ("batchnorm_inference",
         lambda: (f(20, 12), f(12), f(12), f(12), np.abs(f(12)), np.empty((20, 12), dtype)),
         lambda k, a: k.batchnorm_inference(*a[:5], 1e-5, out=a[5])),
        ("sum_squares", lambda: (f(20, 12), np.ones((), dtype)),
         lambda k, a: k.sum_squares(a[0], out=a[1], accumulate=True)),
        ("clip_scale", lambda: (f(20, 12), np.full((), 300.0, dtype)),
         lambda k, a: k.clip_scale(a[0], a[1], 2.0)),
        ("clip_value", lambda: (f(20, 12),), lambda k, a: k.clip_value(a[0], 0.5)),
        ("gather_shifted", lambda: (f(50, 64), rng.integers(0, 50, 20), np.empty((20, 64), dtype)),
         lambda k, a: k.gather_shifted(a[0], a[1], 2, 3, step=step, out=a[2])),
        ("elastic_field", lambda: tuple(np.empty((20, 2, 8, 8), dtype) for _ in "ow"),
         lambda k, a: k.elastic_field(3, 20, 8, 2.0, 1.0, step=step, out=a[0], work=a[1])),
        ("gather_warped", lambda: (f(50, 64), rng.integers(0, 50, 20), np.empty((20, 64), dtype),
                                   0.5 * f(20, 2, 8, 8)),
         lambda k, a: k.gather_warped(a[0], a[1], 10.0, 0.1, 1.5, 3, step=step, field=a[3], out=a[2])),
    ]  # fmt: skip


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_capturable_kernel_is_recorded_without_running_and_replays_what_it_does(dtype):
    cases = _kernel_calls(np.random.default_rng(0), dtype)
    assert {name for name, _, _ in cases} == numba_graph.CAPTURABLE
    for name, make, call in cases:
        direct = make()
        recorded = [a.copy() for a in direct]
        before = [a.copy() for a in recorded]
        call(numba_cpu, direct)
        replay = numba_graph.capture(lambda call=call, args=recorded: call(numba_cpu, args))
        for a, b in zip(recorded, before):
            np.testing.assert_array_equal(a, b, err_msg=f"{name}: the capture ran something")
        replay()
        for a, b in zip(recorded, direct):
            np.testing.assert_array_equal(a, b, err_msg=f"{name}: the replay differs")


@pytest.mark.parametrize(
    "call",
    [
        lambda k, x: k.hash_uniform(0, 64, 3),  # not CAPTURABLE
        lambda k, x: k.sum_squares(x),  # no output array: the sum returns to Python
        lambda k, x: k.matmul(x[0], x),  # a vector operand, no output array: np.matmul's result
        lambda k, x: k.softmax_xent(x, np.zeros(64, np.int32)),  # no accumulator
    ],
    ids=["hash_uniform", "sum without output", "vector matmul without output", "loss without accumulator"],
)
def test_a_capture_refuses_what_it_cannot_replay_having_run_nothing(call):
    x = np.random.default_rng(1).standard_normal((64, 64)).astype(np.float32)
    before = x.copy()
    with pytest.raises(StepNotCapturable):
        numba_graph.capture(lambda: call(numba_cpu, x))
    np.testing.assert_array_equal(x, before)
    call(numba_cpu, x)  # outside a capture the same call just runs


def test_step_graphs_env_switch(monkeypatch):
    monkeypatch.setenv("GPUMLP_STEP_GRAPHS", "0")
    assert backend._REGISTRY["numba"]().replays_steps is False
    monkeypatch.setenv("GPUMLP_STEP_GRAPHS", "yes")
    with pytest.raises(ValueError, match="GPUMLP_STEP_GRAPHS must be 0 .*, 1 .* or 2"):
        backend._REGISTRY["numba"]()


_CACHED_GRAPH = """
import numpy as np
from gpumlp.kernels import numba_graph
from gpumlp.model import MLP
rng = np.random.default_rng(0)
X, y = rng.uniform(-1, 1, (300, 20)).astype(np.float32), rng.integers(0, 3, 300)
MLP("20-8-3", act="relu", backend="numba", seed=0).fit(X, y, epochs=1, batch_size=100)
fns = [ns[k] for name, ns in numba_graph._COMPILED.items() for k in ns if k.startswith(name)]
print(*(sum(sum(getattr(fn.stats, kind).values()) for fn in fns) for kind in ("cache_hits", "cache_misses")))
"""


def test_a_step_graph_compiles_once_and_loads_from_the_disk_cache_after():
    runs = [
        subprocess.run([sys.executable, "-c", _CACHED_GRAPH], capture_output=True, text=True, timeout=300)
        for _ in range(2)
    ]
    for r in runs:
        assert r.returncode == 0, r.stderr[-2000:]
    hits, misses = map(int, runs[1].stdout.split())
    assert hits >= 1 and misses == 0  # the step graph (one core), or the two-core step and its worker loop


_THREADS_TRAINING = three_threads_training(
    setup="""
recorded, compile_tape = [], numba_graph._compile
def spy(tape, **kw):  # whether the step graph holds a parallel variant
    recorded.append(any(body.targetoptions.get("parallel") for body, _, _, _ in tape))
    return compile_tape(tape, **kw)
numba_graph._compile = spy""",
    check_first='assert numba.threading_layer() == "workqueue" and any(recorded)',
)


def test_step_graphs_with_parallel_kernels_train_from_several_threads_under_the_workqueue_layer():
    """A step graph that recorded parallel variants (single-threaded BLAS, a low GPUMLP_PAR_MIN)
    replays them inside numba_graph.PARALLEL_REGION: three threads training at once used to abort
    the process under Numba's workqueue layer (its fallback without OpenMP or TBB). Each trains
    exactly as alone (parallel and serial variants agree bit for bit)."""
    env = dict(os.environ, NUMBA_THREADING_LAYER="workqueue", OPENBLAS_NUM_THREADS="1", GPUMLP_PAR_MIN="1000",
               NUMBA_NUM_THREADS="2")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", _THREADS_TRAINING], env=env, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[] 3 True", out.stdout
