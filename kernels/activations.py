"""The activations: one table that every backend reads.

A row is an activation's name, its kernel code (the ``act`` integer that the Numba and CUDA
kernels switch on; ``ACT_<NAME>`` in ``cuda/device_common.h`` must equal it, which
tests/test_activations.py checks), whether its derivative needs the pre-activation ``s``
(else it comes from the output ``y`` alone, and the layer keeps no extra array), and its
NumPy definition: ``forward(s) -> y`` and ``derivative(y, s) -> act'(s)``, which
``reference.py`` evaluates and every backend is tested against.

Adding an activation: a row here, a ``case`` in ``activate``/``activate_grad`` of
``cuda/device_common.h`` (with its ``ACT_`` code) and a branch in ``_bias_act_rows`` and
``_act_grad_range`` of ``numba_cpu.py``; outside the kernels, its ONNX nodes and torch module in
``gpumlp/export.py``. The tests find each of these missing. Codes stay below ``CODE_LIMIT``: a
backend's internal passes use codes from there on, so they never collide with an activation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

LEAKY_SLOPE = 0.01
CODE_LIMIT = 100  # codes >= this are a backend's internal passes (numba_cpu's exp passes)
GELU_TANH_A = 0.044715  # GELU's tanh approximation (Hendrycks & Gimpel 2016): u = sqrt(2/pi) (s + A s^3)
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


@dataclass(frozen=True)
class ActivationSpec:
    """One activation: ``forward(s)`` and ``derivative(y, s)`` take and return NumPy arrays of one
    float dtype (``derivative`` may get ``s=None`` unless ``needs_input``)."""

    name: str
    code: int
    needs_input: bool
    forward: Callable[[np.ndarray], np.ndarray]
    derivative: Callable[[np.ndarray, np.ndarray | None], np.ndarray]


def _in_float64(fn):
    """``fn(x)`` computed in float64 (exp's overflow to inf is expected: no warning), rounded to x's dtype."""

    def wrapped(x: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            return np.asarray(fn(np.asarray(x, np.float64))).astype(x.dtype, copy=False)

    return wrapped


def _erfc(x: np.ndarray) -> np.ndarray:
    """erfc elementwise: NumPy has none, math.erfc is correctly rounded enough for an oracle."""
    return np.vectorize(math.erfc, otypes=[np.float64])(x)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _gelu_tanh_u(s: np.ndarray) -> np.ndarray:
    return SQRT_2_OVER_PI * (s + GELU_TANH_A * s**3)


# GELU: s * Phi(s), Phi(s) = erfc(-s / sqrt 2) / 2 (erfc, not 1 + erf: no cancellation for s < 0);
# Phi'(s) = exp(-s^2 / 2) / sqrt(2 pi).
_gelu = _in_float64(lambda s: 0.5 * s * _erfc(-s / math.sqrt(2.0)))
_gelu_grad = _in_float64(
    lambda s: 0.5 * _erfc(-s / math.sqrt(2.0)) + s * np.exp(-0.5 * s * s) / math.sqrt(2.0 * math.pi)
)
# GELU, tanh approximation: s (1 + tanh u) / 2 = s * sigmoid(2u) (the form without cancellation for s < 0);
# derivative p + 2 s p (1 - p) u'(s) with p = sigmoid(2u).
_gelu_tanh = _in_float64(lambda s: s * _sigmoid(2.0 * _gelu_tanh_u(s)))


def _gelu_tanh_grad_64(s: np.ndarray) -> np.ndarray:
    p = _sigmoid(2.0 * _gelu_tanh_u(s))
    return p + 2.0 * s * p * (1.0 - p) * SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_TANH_A * s * s)


_gelu_tanh_grad = _in_float64(_gelu_tanh_grad_64)
# SiLU (swish): s * sigmoid(s); derivative p (1 + s (1 - p)).
_silu = _in_float64(lambda s: s * _sigmoid(s))
_silu_grad = _in_float64(lambda s: _sigmoid(s) * (1.0 + s * (1.0 - _sigmoid(s))))
# softplus: log(1 + e^s) as max(s, 0) + log1p(e^-|s|) (no overflow); its derivative sigmoid(s)
# equals 1 - e^-y, so it needs only the output.
_softplus = _in_float64(lambda s: np.maximum(s, 0.0) + np.log1p(np.exp(-np.abs(s))))
_softplus_grad = _in_float64(lambda y: -np.expm1(-y))

_ROWS = (
    ActivationSpec("identity", 0, False, lambda s: s, lambda y, s: np.ones_like(y)),
    ActivationSpec("sigmoid", 1, False, lambda s: 1.0 / (1.0 + np.exp(-s)), lambda y, s: y * (1 - y)),
    ActivationSpec("tanh", 2, False, np.tanh, lambda y, s: 1 - y * y),
    ActivationSpec("relu", 3, False, lambda s: np.maximum(s, 0), lambda y, s: (y > 0).astype(y.dtype)),
    ActivationSpec(
        "leaky_relu", 4, False, lambda s: np.where(s > 0, s, s * LEAKY_SLOPE),
        lambda y, s: np.where(y > 0, 1, LEAKY_SLOPE).astype(y.dtype),
    ),  # fmt: skip
    ActivationSpec("gelu", 5, True, _gelu, lambda y, s: _gelu_grad(s)),
    ActivationSpec("gelu_tanh", 6, True, _gelu_tanh, lambda y, s: _gelu_tanh_grad(s)),
    ActivationSpec("silu", 7, True, _silu, lambda y, s: _silu_grad(s)),
    ActivationSpec("softplus", 8, False, _softplus, lambda y, s: _softplus_grad(y)),
)
TABLE = {row.name: row for row in _ROWS}
ACTIVATIONS = tuple(TABLE)  # the names, in code order


def activation(act: str) -> ActivationSpec:
    """The table's row for ``act``; an unknown name is a ValueError listing the valid ones."""
    spec = TABLE.get(act)
    if spec is None:
        raise ValueError(f"unknown activation {act!r}; choose one of {', '.join(ACTIVATIONS)}")
    return spec


def needs_input(act: str) -> bool:
    """Whether ``act_grad`` for ``act`` needs the pre-activation (``pre=``) besides the output."""
    return activation(act).needs_input


def grad_spec(act: str, pre) -> ActivationSpec:
    """The row for ``act_grad(..., act, pre=pre)``: a ValueError when its derivative needs the
    pre-activation and ``pre`` is None."""
    spec = activation(act)
    if spec.needs_input and pre is None:
        raise ValueError(
            f"act_grad: the derivative of {act!r} needs the pre-activation: pass pre= (the array that "
            "bias_act(..., pre=) filled)"
        )
    return spec
