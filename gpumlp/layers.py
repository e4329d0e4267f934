"""Layers: Dense (matmul + fused bias/activation), Activation, Dropout, BatchNorm.

Each layer says *what* to compute and calls the backend's kernels for *how*.
A layer owns ``params`` and matching ``grads`` (same keys), keeps what its
backward pass needs from the last forward, and reuses per-shape workspaces so
the training step allocates nothing after the first batch of each shape.

    forward(x, train, step) -> y    x: (B, n_in)  -> y: (B, n_out); step: the training
                                    step (int or 1-element int64 device array), for dropout
    backward(dy, need_dx) -> dx     dy: (B, n_out) -> dx: (B, n_in) or None
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gpumlp.backend import Backend
from gpumlp.kernels.activations import activation
from gpumlp.validate import check_float, check_int

INITS = ("normal", "xavier", "he")


def init_weights(rng: np.random.Generator, n_in: int, n_out: int, init: str) -> np.ndarray:
    """Host float64 (n_in, n_out) weights: ``normal`` N(0, 0.1²), ``xavier``
    N(0, 2/(n_in+n_out)) (Glorot), ``he`` N(0, 2/n_in)."""
    std = {"normal": 0.1, "xavier": np.sqrt(2.0 / (n_in + n_out)), "he": np.sqrt(2.0 / n_in)}.get(init)
    if std is None:
        raise ValueError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")
    return rng.normal(0.0, std, size=(n_in, n_out))


def grown_rows(store: dict, key, shape: tuple[int, ...], xp, dtype):
    """The first ``shape[0]`` rows of the buffer ``store[key]`` (an ``xp`` array of ``dtype``),
    reallocated at ``shape`` only when missing or shorter: buffers grow to the largest batch seen."""
    buf = store.get(key)
    if buf is None or buf.shape[0] < shape[0]:
        buf = store[key] = xp.empty(shape, dtype=dtype)
    return buf[: shape[0]]


class Layer:
    """Base class: parameter bookkeeping and per-shape workspace buffers."""

    params: dict[str, Any]
    grads: dict[str, Any]
    decayed: tuple[str, ...] = ()  # params that L1/L2 regularisation applies to
    state_names: tuple[str, ...] = ()  # non-trained arrays saved with the model

    def build(self, be: Backend, n_in: int, dtype: np.dtype, rng: np.random.Generator) -> int:
        """Allocate parameters for inputs of width n_in; return the output width."""
        self.be, self.dtype = be, dtype
        self.params, self.grads, self._workspace, self._eval_workspace = {}, {}, {}, {}
        return n_in

    def _ws(self, name: str, shape: tuple[int, ...]):
        buf = self._workspace.get((name, shape))
        if buf is None:
            buf = self._workspace[(name, shape)] = self.be.xp.empty(shape, dtype=self.dtype)
        return buf

    def _eval_ws(self, name: str, shape: tuple[int, ...]):
        """Eval-mode twin of ``_ws``: the first ``shape[0]`` rows of one buffer per name and row
        shape, grown to the largest batch seen. Inference on any mix of batch sizes (a predict's
        last, shorter chunk; batch 1 after 4096) then allocates nothing once the largest has run,
        where exact-shape buffers would pile up one set per distinct size."""
        return grown_rows(self._eval_workspace, (name, shape[1:]), shape, self.be.xp, self.dtype)

    def _add_param(self, name: str, host_value: np.ndarray) -> None:
        self.params[name] = self.be.asarray(host_value, dtype=self.dtype)
        self.grads[name] = self.be.xp.zeros_like(self.params[name])

    def config(self) -> dict:
        """JSON-able constructor arguments."""
        return {}


class Dense(Layer):
    """Fully connected layer ``y = act(x @ W + b)``; the bias add and activation
    run as one fused kernel, the backward Hadamard product as another."""

    decayed = ("W",)

    def __init__(self, n_out: int, act: str = "identity", init: str = "xavier"):
        self._keeps_input = activation(act).needs_input  # keep the pre-activation for act_grad
        if init not in INITS:
            raise ValueError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")
        self.n_out, self.act, self.init = check_int("layer width", n_out, 1), act, init

    def build(self, be, n_in, dtype, rng):
        super().build(be, n_in, dtype, rng)
        self._add_param("W", init_weights(rng, n_in, self.n_out, self.init))
        self._add_param("b", np.zeros(self.n_out))
        return self.n_out

    def forward(self, x, train: bool, step=0):
        k, shape, ws = self.be.k, (x.shape[0], self.n_out), self._ws if train else self._eval_ws
        z = k.matmul(x, self.params["W"], out=ws("z", shape))
        # a separate output buffer: in place, Numba cannot prove no aliasing and won't vectorise
        pre = ws("pre", shape) if train and self._keeps_input else None
        y = k.bias_act(z, self.params["b"], self.act, out=ws("y", shape), pre=pre)
        if train:  # what backward needs; in eval mode, keep no reference to the caller's input
            self._x, self._y, self._pre = x, y, pre
        return y

    def backward(self, dy, need_dx: bool, sgd: tuple[float, float] | None = None):
        """With ``sgd`` = (lr, l2), W takes its SGD step inside the weight-gradient GEMM
        (``sgd_matmul_step``) after dx has used the old W; grads["W"] is then scratch."""
        k, x, W = self.be.k, self._x, self.params["W"]
        if self.act == "identity":
            dz = dy
        else:
            dz = k.act_grad(dy, self._y, self.act, out=self._ws("dz", dy.shape), pre=self._pre)
        if sgd is None:
            k.matmul(x, dz, out=self.grads["W"], trans_a=True)
        k.bias_grad(dz, out=self.grads["b"])
        dx = k.matmul(dz, W, out=self._ws("dx", x.shape), trans_b=True) if need_dx else None
        if sgd is not None:
            k.sgd_matmul_step(W, x, dz, *sgd, trans_a=True, work=self.grads["W"])
        return dx

    def config(self):
        return {"n_out": self.n_out, "act": self.act, "init": self.init}


class Activation(Layer):
    """Elementwise activation on its own (e.g. after BatchNorm)."""

    def __init__(self, act: str):
        self._keeps_input = activation(act).needs_input  # the input is the pre-activation
        self.act = act

    def build(self, be, n_in, dtype, rng):
        super().build(be, n_in, dtype, rng)
        self._zero_bias = be.xp.zeros(n_in, dtype=dtype)
        return n_in

    def forward(self, x, train: bool, step=0):
        ws = self._ws if train else self._eval_ws
        self._y = self.be.k.bias_act(x, self._zero_bias, self.act, out=ws("y", x.shape))
        self._pre = x if train and self._keeps_input else None
        return self._y

    def backward(self, dy, need_dx: bool):
        return self.be.k.act_grad(dy, self._y, self.act, out=self._ws("dx", dy.shape), pre=self._pre)

    def config(self):
        return {"act": self.act}


class Dropout(Layer):
    """Inverted dropout with rate p. Masks are Philox4x32-10 draws keyed by (layer
    seed, training step), so they are identical on every backend, reproducible
    on resume, and drawn on the device (a CUDA graph replays fresh masks); in
    eval mode the layer is the identity."""

    def __init__(self, p: float, seed: int = 0):
        self.p, self.seed = check_float("dropout rate", p, 0.0, 1.0, high_open=True), int(seed)

    def forward(self, x, train: bool, step=0):
        if not train or self.p == 0.0:
            self._mask = None
            return x
        y, self._mask = self.be.k.dropout_forward(
            x, self.p, self.seed, out=self._ws("y", x.shape), mask=self._ws("mask", x.shape), step=step
        )
        return y

    def backward(self, dy, need_dx: bool):
        if self._mask is None:
            return dy
        return self.be.k.dropout_backward(dy, self._mask, out=self._ws("dx", dy.shape))

    def config(self):
        return {"p": self.p, "seed": self.seed}


class BatchNorm(Layer):
    """Batch normalisation over the batch axis with learned scale/shift and
    running statistics (``momentum`` weights the old value) for eval mode.
    A training batch needs >= 2 samples (one has no variance: the output would be
    beta and the running variance would shrink), so one sample is a ValueError, as
    in PyTorch; ``fit`` refuses a batch size that would leave one."""

    state_names = ("running_mean", "running_var")

    def __init__(self, momentum: float = 0.9, eps: float = 1e-5):
        self.momentum = check_float("batch-norm momentum", momentum, 0.0, 1.0, high_open=True)
        self.eps = check_float("batch-norm eps", eps, 0.0, 1.0, low_open=True)

    def build(self, be, n_in, dtype, rng):
        super().build(be, n_in, dtype, rng)
        self._add_param("gamma", np.ones(n_in))
        self._add_param("beta", np.zeros(n_in))
        self.running_mean = be.xp.zeros(n_in, dtype=dtype)
        self.running_var = be.xp.ones(n_in, dtype=dtype)
        return n_in

    def forward(self, x, train: bool, step=0):
        k, p = self.be.k, self.params
        if not train:
            return k.batchnorm_inference(
                x, p["gamma"], p["beta"], self.running_mean, self.running_var, self.eps,
                out=self._eval_ws("y", x.shape),
            )  # fmt: skip
        if x.shape[0] < 2:  # as PyTorch: one sample has no batch variance; it would output beta
            raise ValueError(
                "batch norm needs at least 2 samples per training batch, got 1; pick a batch size "
                "(and sample count) so that no batch holds a single sample"
            )
        out = self._ws("y", x.shape)
        y, self._xhat, _, self._var = k.batchnorm_forward(
            x, p["gamma"], p["beta"], self.eps, out=out, xhat=self._ws("xhat", x.shape),
            mean=self._ws("mean", (x.shape[1],)), var=self._ws("var", (x.shape[1],)),
            running_mean=self.running_mean, running_var=self.running_var, momentum=self.momentum,
        )  # fmt: skip
        return y

    def backward(self, dy, need_dx: bool):
        dx, _, _ = self.be.k.batchnorm_backward(
            dy, self._xhat, self.params["gamma"], self._var, self.eps, dx=self._ws("dx", dy.shape),
            dgamma=self.grads["gamma"], dbeta=self.grads["beta"],
        )  # fmt: skip
        return dx

    def config(self):
        return {"momentum": self.momentum, "eps": self.eps}


LAYER_TYPES = {cls.__name__: cls for cls in (Dense, Activation, Dropout, BatchNorm)}
