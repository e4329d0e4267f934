"""Per-kernel micro-benchmarks, numpy vs numba, at MLP shapes.

Run: ``pytest bench/bench_kernels.py --benchmark-only`` (not collected by plain ``pytest``:
testpaths = tests). ``extra_info["bytes"]`` is the memory each call must move at least
(reads + writes), so GB/s = bytes / mean seconds; ``extra_info["compile_s"]`` is the
one-off JIT (or cache load) time of the numba kernels, kept out of the timings.
"""

from __future__ import annotations

import numpy as np
import pytest

from gpumlp import backend
from gpumlp.kernels.activations import needs_input

BACKENDS = ("numpy", "numba")
DTYPE = np.float32
ACT_SHAPES = [(100, 100), (100, 10), (256, 1024)]
WEIGHT_SHAPES = [(100, 100), (100, 10), (784, 1024)]
_COMPILE_S: dict[str, float] = {}


def _backend(name: str) -> backend.Backend:
    try:
        be = backend.get_backend(name)
    except backend.BackendUnavailable as e:
        pytest.skip(str(e))
    if name == "numba" and name not in _COMPILE_S:
        _COMPILE_S[name] = be.warmup(DTYPE)
    return be


def _run(benchmark, be, fn, nbytes: int):
    benchmark.extra_info["bytes"] = int(nbytes)
    benchmark.extra_info["backend"] = be.name
    benchmark.extra_info["compile_s"] = round(_COMPILE_S.get(be.name, 0.0), 3)
    fn()  # warm (and, for numba, make sure this exact signature is compiled)
    benchmark.pedantic(fn, rounds=30, iterations=10, warmup_rounds=1)


def _data(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(DTYPE)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("shape", ACT_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("act", ["relu", "sigmoid", "tanh", "gelu", "silu", "softplus"])
def test_bias_act(benchmark, name, shape, act):
    # as Dense.forward in training: the pre-activation is kept where act_grad needs it
    be = _backend(name)
    z, b, out = _data(shape), _data(shape[1:]), np.empty(shape, DTYPE)
    pre = np.empty(shape, DTYPE) if needs_input(act) else None
    nbytes = (2 + (pre is not None)) * z.nbytes + b.nbytes
    _run(benchmark, be, lambda: be.k.bias_act(z, b, act, out=out, pre=pre), nbytes)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("shape", ACT_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("act", ["relu", "sigmoid", "gelu", "silu", "softplus"])
def test_act_grad(benchmark, name, shape, act):
    be = _backend(name)
    g, y, out = _data(shape), np.abs(_data(shape, 1)) % 1, np.empty(shape, DTYPE)
    pre = _data(shape, 2) if needs_input(act) else None
    nbytes = (3 + (pre is not None)) * g.nbytes
    _run(benchmark, be, lambda: be.k.act_grad(g, y, act, out=out, pre=pre), nbytes)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("shape", [(100, 10), (256, 10), (256, 1024)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_softmax_xent(benchmark, name, shape):
    be = _backend(name)
    z, grad = _data(shape), np.empty(shape, DTYPE)
    labels = np.random.default_rng(2).integers(0, shape[1], shape[0])
    fn = lambda: be.k.softmax_xent(z, labels, grad=grad, grad_scale=1.0 / shape[0])  # noqa: E731
    _run(benchmark, be, fn, 2 * z.nbytes + labels.nbytes)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("shape", WEIGHT_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_adam_step(benchmark, name, shape):
    be = _backend(name)
    w, g, m, v = _data(shape), _data(shape, 1) * 1e-3, np.zeros(shape, DTYPE), np.zeros(shape, DTYPE)
    t = be.asarray(np.array([10], np.int64))  # the step on the device, as training passes it
    fn = lambda: be.k.adam_step(w, g, m, v, lr=1e-6, t=t, l2=1e-4)  # noqa: E731
    _run(benchmark, be, fn, 7 * w.nbytes)  # read w, g, m, v; write w, m, v


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("shape", WEIGHT_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_sgd_step(benchmark, name, shape):
    be = _backend(name)
    w, g = _data(shape), _data(shape, 1) * 1e-3
    _run(benchmark, be, lambda: be.k.sgd_step(w, g, lr=1e-6), 3 * w.nbytes)  # read w, g; write w


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("kernel", ["gather_rows", "gather_shifted"])
def test_minibatch_gather(benchmark, name, kernel):
    """One 256-image minibatch from the 55k training set, plain or with ±2-pixel shifts (the
    shift is drawn per row and applied while gathering: the same bytes move either way)."""
    be = _backend(name)
    src, out = _data((55_000, 784)), np.empty((256, 784), DTYPE)
    idx = np.random.default_rng(3).permutation(55_000)[:256].astype(np.int32)
    t = be.asarray(np.array([10], np.int64))
    if kernel == "gather_rows":
        fn = lambda: be.k.gather_rows(src, idx, out=out)  # noqa: E731
    else:
        fn = lambda: be.k.gather_shifted(src, idx, 2, 0, step=t, out=out)  # noqa: E731
    _run(benchmark, be, fn, 2 * out.nbytes + idx.nbytes)


@pytest.mark.parametrize("name", [*BACKENDS, "host-rng"])
def test_epoch_permutation(benchmark, name):
    """The epoch's shuffle of 55k samples: the contract's counter-hash permutation on a backend,
    against the host NumPy Generator.permutation the training loop used before."""
    out = np.empty(55_000, np.int32)
    if name == "host-rng":
        rng = np.random.default_rng(0)
        benchmark.extra_info["bytes"] = out.nbytes
        benchmark.pedantic(lambda: rng.permutation(55_000), rounds=30, iterations=10, warmup_rounds=1)
        return
    be = _backend(name)
    _run(benchmark, be, lambda: be.k.permutation(0, 55_000, 3, out=out), out.nbytes)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("shape", [(128, 1024), (256, 1024)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_dropout_forward(benchmark, name, shape):
    """Philox4x32-10 masks for a hidden layer, step on the device as training passes it."""
    be = _backend(name)
    x, out, mask = _data(shape), np.empty(shape, DTYPE), np.empty(shape, DTYPE)
    t = be.asarray(np.array([10], np.int64))
    fn = lambda: be.k.dropout_forward(x, 0.2, 7, out=out, mask=mask, step=t)  # noqa: E731
    _run(benchmark, be, fn, 3 * x.nbytes)  # read x; write out, mask
