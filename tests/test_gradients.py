"""Finite-difference checks (float64, central differences) of every layer,
activation and cost, and of whole MLPs: the four backprop equations, verified."""

import numpy as np
import pytest

from gpumlp.backend import get_backend
from gpumlp.kernels.reference import ACTIVATIONS
from gpumlp.layers import Activation, BatchNorm, Dense, Dropout
from gpumlp.losses import LOSSES, get_loss
from gpumlp.model import MLP

BE = get_backend("numpy")
H = 1e-6
# Central differences in float64 are accurate to ~H² * f''' + eps/H ~ 1e-9 relative.
RTOL = 1e-6


def numerical_grad(f, x):
    """d f / d x by central differences, perturbing x in place."""
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        old = x[i]
        x[i] = old + H
        up = f()
        x[i] = old - H
        down = f()
        x[i] = old
        g[i] = (up - down) / (2 * H)
    return g


def assert_grad(analytic, numeric, what):
    scale = max(np.abs(numeric).max(), 1e-3)
    err = np.abs(analytic - numeric).max() / scale
    assert err < RTOL, f"{what}: relative gradient error {err:.2e} (max |num| {scale:.2e})"


def check_layer(layer, n_in=5, batch=4, seed=0, inputs=None):
    """Check dx and every d param of `layer` against sum(forward * R) for a random R."""
    rng = np.random.default_rng(seed)
    layer.build(BE, n_in, np.dtype(np.float64), rng)
    x = rng.normal(size=(batch, n_in)) if inputs is None else inputs
    y = layer.forward(x, train=True)
    r = rng.normal(size=y.shape)

    def objective():
        return float((layer.forward(x, train=True) * r).sum())

    objective()  # refresh the cached activations for the analytic pass
    dx = layer.backward(r.copy(), need_dx=True).copy()
    grads = {k: g.copy() for k, g in layer.grads.items()}
    assert_grad(dx, numerical_grad(objective, x), f"{type(layer).__name__} dx")
    for name, w in layer.params.items():
        assert_grad(grads[name], numerical_grad(objective, w), f"{type(layer).__name__} d{name}")


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_dense_gradients(act):
    # Inputs bounded away from the ReLU kink so finite differences do not straddle it.
    check_layer(Dense(3, act, init="xavier"))


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_activation_gradients(act):
    rng = np.random.default_rng(1)
    x = rng.uniform(0.1, 2.0, size=(4, 5)) * rng.choice([-1, 1], size=(4, 5))
    check_layer(Activation(act), inputs=x)


def test_batchnorm_gradients():
    check_layer(BatchNorm(), n_in=6, batch=7)


def test_dropout_gradients():
    # The mask is a function of (seed, step): a fixed step keeps it fixed while differencing.
    layer = Dropout(0.4, seed=3)
    rng = np.random.default_rng(0)
    layer.build(BE, 6, np.dtype(np.float64), rng)
    x = rng.normal(size=(5, 6))
    r = rng.normal(size=(5, 6))

    def objective():
        return float((layer.forward(x, train=True, step=7) * r).sum())

    objective()
    dx = layer.backward(r.copy(), need_dx=True).copy()
    assert_grad(dx, numerical_grad(objective, x), "Dropout dx")
    mask = layer._mask.copy()
    assert set(np.unique(mask)) <= {0.0, 1 / 0.6}
    assert 0 < (mask == 0).sum() < mask.size
    layer.forward(x, train=True, step=8)
    assert not np.array_equal(layer._mask, mask)  # the next step draws a new mask


@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_loss_gradients(loss_name, scale):
    loss = get_loss(loss_name)
    rng = np.random.default_rng(2)
    z = rng.normal(size=(4, 5)) * 3
    y = rng.integers(0, 5, size=4).astype(np.int32)
    _, g = loss(BE, z, y, grad_scale=scale)
    num = numerical_grad(lambda: float(loss(BE, z, y)[0]) * scale, z)
    assert_grad(g, num, f"{loss_name} d logits")


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(act="relu"),
        dict(act="sigmoid", loss="logistic", init="normal"),
        dict(act="tanh", loss="mse"),
        dict(act="leaky_relu", batchnorm=True),
        dict(act="relu", dropout=0.3),
        dict(act="gelu"),  # Dense keeps the pre-activation for act_grad
        dict(act="silu", batchnorm=True),  # Activation's input is the pre-activation
    ],
    ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()),
)
def test_whole_mlp_gradients(kwargs):
    model = MLP("6-5-4-3", dtype="float64", backend="numpy", seed=4, **kwargs)
    rng = np.random.default_rng(5)
    X = rng.normal(size=(8, 6))
    y = rng.integers(0, 3, size=8).astype(np.int32)
    for name, w, _, _ in model.parameters():  # nonzero biases: rows that dropout zeroes stay off ReLU's kink
        if name.endswith(".b"):
            w[...] = rng.normal(size=w.shape) * 0.1

    def loss():  # a fixed step: the same dropout masks in every evaluation
        return float(model.loss(BE, model.forward(X, train=True, step=3), y)[0])

    _, g = model.loss(BE, model.forward(X, train=True, step=3), y)
    model.backward(g)
    analytic = {name: grad.copy() for name, _, grad, _ in model.parameters()}
    for name, w, _, _ in model.parameters():
        assert_grad(analytic[name], numerical_grad(loss, w), f"MLP {name}")
