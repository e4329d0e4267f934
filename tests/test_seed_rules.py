"""The seed texts' stopping and clipping rules and the gradient-norm diagnostic, checked
against hand-computed full-batch gradient descent on every backend."""

import numpy as np
import pytest
from conftest import loadable_backends

from gpumlp.backend import BackendUnavailable, make_cuda_backend
from gpumlp.data import make_circles, make_moons, make_xor
from gpumlp.model import MLP

BACKENDS = loadable_backends()


def _softmax_grads(X, y, W, b):
    """Mean softmax cross-entropy gradients of the linear model X @ W + b (float64)."""
    z = X @ W + b
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(y)), y] -= 1.0
    p /= len(y)
    return X.T @ p, p.sum(axis=0)


def _by_hand(model, X, y, epochs, lr, clip_value=None):
    """Full-batch SGD on a 2-K linear model in float64 -> (W, b, per-epoch max |change|, grad norms)."""
    arrays = model.state_arrays()
    W, b = arrays["param/0.W"].astype(np.float64), arrays["param/0.b"].astype(np.float64)
    changes, norms = [], []
    for _ in range(epochs):
        gW, gb = _softmax_grads(X, y, W, b)
        norms.append(np.sqrt(np.sum(gW**2) + np.sum(gb**2)))
        if clip_value is not None:
            gW, gb = np.clip(gW, -clip_value, clip_value), np.clip(gb, -clip_value, clip_value)
        changes.append(max(np.abs(lr * gW).max(), np.abs(lr * gb).max()))
        W, b = W - lr * gW, b - lr * gb
    return W, b, changes, norms


def _data():
    X, y = make_xor(n=40, noise=0.3, seed=5)
    return X * 3.0, y  # large inputs: large gradients, so clipping by 0.05 bites


@pytest.mark.parametrize("name", BACKENDS)
def test_clip_value_clamps_each_gradient_element(name):
    X, y = _data()
    model = MLP("2-2", backend=name, dtype="float64", seed=1)
    W, b, _, _ = _by_hand(model, X, y, epochs=3, lr=0.5, clip_value=0.05)
    W_free, _, _, _ = _by_hand(model, X, y, epochs=3, lr=0.5)
    assert np.abs(W - W_free).max() > 0.05  # the clip changed the outcome
    model.fit(X, y, epochs=3, batch_size=len(y), shuffle=False, lr=0.5, clip_value=0.05)
    got = model.state_arrays()
    np.testing.assert_allclose(got["param/0.W"], W, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got["param/0.b"], b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", BACKENDS)
def test_stop_param_change_stops_when_every_weight_and_bias_moves_less_than_eps(name):
    X, y = make_moons(n=40, noise=0.3, seed=5)  # not separable: a finite optimum that GD settles into
    model = MLP("2-2", backend=name, dtype="float64", seed=1)
    _, _, changes, _ = _by_hand(model, X, y, epochs=40, lr=0.5)
    assert changes[30] < changes[3]  # the steps shrink as the loss flattens
    eps = (changes[9] + changes[10]) / 2
    stop = next(i for i, c in enumerate(changes) if c < eps) + 1  # 1-based epoch of the first small change
    hist = model.fit(X, y, epochs=40, batch_size=len(y), shuffle=False, lr=0.5, stop_param_change=eps)
    assert len(hist) == stop < 40
    assert hist.stop_reason.startswith("converged: no weight or bias changed")
    np.testing.assert_allclose(hist["param_change"], changes[:stop], rtol=1e-9)


@pytest.mark.parametrize("name", BACKENDS)
def test_grad_norms_are_the_per_layer_gradient_norms(name):
    X, y = _data()
    model = MLP("2-2", backend=name, dtype="float64", seed=1)
    _, _, _, norms = _by_hand(model, X, y, epochs=4, lr=0.5)
    hist = model.fit(X, y, epochs=4, batch_size=len(y), shuffle=False, lr=0.5, log_grad_norms=True)
    np.testing.assert_allclose([r["dense1"] for r in hist["grad_norms"]], norms, rtol=1e-9)


def test_grad_norms_are_rms_over_the_steps():
    """Two steps per epoch: sqrt((|g1|^2 + |g2|^2) / 2), g2 taken after the first update."""
    X, y = _data()
    model = MLP("2-2", backend="numpy", dtype="float64", seed=1)
    arrays = model.state_arrays()
    W, b = arrays["param/0.W"], arrays["param/0.b"]
    gW1, gb1 = _softmax_grads(X[:20], y[:20], W, b)
    gW2, gb2 = _softmax_grads(X[20:], y[20:], W - 0.5 * gW1, b - 0.5 * gb1)
    expected = np.sqrt((np.sum(gW1**2) + np.sum(gb1**2) + np.sum(gW2**2) + np.sum(gb2**2)) / 2)
    hist = model.fit(X, y, epochs=1, batch_size=20, shuffle=False, lr=0.5, log_grad_norms=True)
    assert hist["grad_norms"][0]["dense1"] == pytest.approx(expected, rel=1e-12)


def test_grad_norms_show_vanishing_gradients_in_a_deep_sigmoid_net():
    """Six sigmoid layers: the first layer's gradient is orders of magnitude smaller than the
    last's; with ReLU (He init) the layers stay within a small factor of each other."""
    X, y = make_circles(n=200, noise=0.05, seed=0)
    ratio = {}
    for act in ("sigmoid", "relu"):
        model = MLP("2-32-32-32-32-32-32-2", act=act, backend="numpy", seed=0)
        hist = model.fit(X, y, epochs=2, batch_size=50, optimizer="sgd", lr=0.1, log_grad_norms=True)
        norms = hist["grad_norms"][-1]
        assert list(norms) == [f"dense{i}" for i in range(1, 8)]
        ratio[act] = norms["dense1"] / norms["dense7"]
    assert ratio["sigmoid"] < 1e-3 and ratio["relu"] > 1e-2, ratio


def test_cuda_graphs_replay_clip_value_and_grad_norms_exactly(monkeypatch):
    """Clipping by value and the per-layer norm accumulators are kernels, so replayed graphs
    give the eager steps' losses, weights and norms bit for bit (the emulator raises on any
    non-kernel work during capture)."""
    try:
        be = make_cuda_backend("cuda-emu", gemm="own")  # eager steps on our GEMM too, as graphs use it
    except BackendUnavailable as e:
        pytest.skip(str(e))
    captures = []
    real_capture = be.capture
    monkeypatch.setattr(be, "capture", lambda fn: captures.append(fn) or real_capture(fn))
    X, y = make_circles(n=230, noise=0.05, seed=3)  # 4 full batches of 50 and a partial one
    kw = dict(epochs=3, batch_size=50, optimizer="momentum", lr=0.2, clip_value=0.02, log_grad_norms=True)
    runs = {}
    for graphs in (False, True):
        model = MLP("2-16-16-2", act="tanh", backend=be, seed=3)
        hist = model.fit(X, y, **kw, cuda_graphs=graphs)
        runs[graphs] = (hist["loss"], hist["grad_norms"], model.state_arrays())
    assert len(captures) == 1  # constant lr: one capture, then 11 replays
    assert runs[True][0] == runs[False][0] and runs[True][1] == runs[False][1]
    for key, eager in runs[False][2].items():
        np.testing.assert_array_equal(runs[True][2][key], eager, err_msg=key)
    ref = MLP("2-16-16-2", act="tanh", backend="numpy", seed=3)
    hist = ref.fit(X, y, **kw)
    np.testing.assert_allclose(runs[True][0], hist["loss"], rtol=1e-5)
    for got, want in zip(runs[True][1], hist["grad_norms"]):
        np.testing.assert_allclose(list(got.values()), list(want.values()), rtol=1e-4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"clip_value": 0.0}, "clip_value must be a finite number > 0"),
        ({"clip_value": float("inf")}, "clip_value must be a finite number > 0"),
        ({"stop_param_change": -1e-3}, "stop_param_change must be a finite number > 0"),
    ],
)
def test_bad_clip_value_and_stop_param_change_are_clear_errors(kwargs, message):
    X, y = make_xor(n=20)
    with pytest.raises(ValueError, match=message):
        MLP("2-4-2", backend="numpy").fit(X, y, **kwargs)
