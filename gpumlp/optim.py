"""Optimizers (SGD, momentum/Nesterov, AdaGrad, RMSProp, Adam), L1/L2,
gradient clipping by global norm, and learning-rate schedules.

As in jax's ``optimizers``: an optimizer is written for one array (its state
arrays plus one fused in-place kernel call) and lifted to every parameter.
L1/L2 apply only to parameters a layer marks as decayed (weights, not biases
or batch-norm scale/shift), matching the classic reference implementation.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from gpumlp.backend import Backend

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam")
SCHEDULES = ("constant", "step", "exp")

# optimizer name -> (number of state arrays, kernel name)
_KERNELS = {
    "sgd": (0, "sgd_step"),
    "momentum": (1, "momentum_step"),
    "nesterov": (1, "momentum_step"),
    "adagrad": (1, "adagrad_step"),
    "rmsprop": (1, "rmsprop_step"),
    "adam": (2, "adam_step"),
}


@dataclass
class Optimizer:
    """Hyper-parameters of one update rule. ``name`` is one of OPTIMIZERS;
    ``momentum`` is mu (momentum/nesterov), ``rho`` the RMSProp decay,
    ``beta1``/``beta2`` Adam's; ``l1``/``l2`` regularisation strengths."""

    name: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    rho: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    l1: float = 0.0
    l2: float = 0.0

    def __post_init__(self):
        if self.name not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.name!r}; choose one of {', '.join(OPTIMIZERS)}")
        for field in ("lr", "eps", "l1", "l2"):
            value = getattr(self, field)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"optimizer {field} must be a finite number >= 0, got {value}")
        if self.lr == 0:
            raise ValueError("learning rate must be > 0")
        for field in ("momentum", "rho", "beta1", "beta2"):
            value = getattr(self, field)
            if not (math.isfinite(value) and 0 <= value < 1):
                raise ValueError(f"optimizer {field} must be a finite number in [0, 1), got {value}")

    def init_state(self, be: Backend, w) -> list:
        """Zeroed state arrays for one parameter (velocity, moments...)."""
        return [be.xp.zeros_like(w) for _ in range(_KERNELS[self.name][0])]

    def update(self, be: Backend, w, g, state: list, lr: float, t: int, decayed: bool) -> None:
        """Apply one in-place step to parameter w with gradient g at step t (1-based)."""
        k = getattr(be.k, _KERNELS[self.name][1])
        reg = {"l1": self.l1, "l2": self.l2} if decayed else {"l1": 0.0, "l2": 0.0}
        if self.name == "sgd":
            k(w, g, lr, **reg)
        elif self.name in ("momentum", "nesterov"):
            k(w, g, state[0], lr, self.momentum, self.name == "nesterov", **reg)
        elif self.name == "adagrad":
            k(w, g, state[0], lr, self.eps, **reg)
        elif self.name == "rmsprop":
            k(w, g, state[0], lr, self.rho, self.eps, **reg)
        else:
            k(w, g, state[0], state[1], lr, t, self.beta1, self.beta2, self.eps, **reg)

    def gemm_fold(self, lr: float, clipping: bool) -> tuple[float, float] | None:
        """(lr, l2) when this step on the weights can ride on their gradient's GEMM
        (``sgd_matmul_step``: plain SGD, no L1, no clipping, which needs the whole gradient
        first); None when the gradient must be formed and then stepped."""
        if self.name != "sgd" or self.l1 or clipping:
            return None
        return (lr, self.l2)

    def to_dict(self) -> dict:
        """JSON-able hyper-parameters."""
        return asdict(self)


def clip_grad_norm(be: Backend, grads: list, max_norm: float, sumsq=None):
    """Scale all gradients in place so their global L2 norm is at most max_norm.
    Two kernels per gradient array, all on the device (no host sync, graph-safe);
    ``sumsq`` is an optional 0-d device buffer for the squared norm. Returns the
    0-d squared pre-clip norm."""
    if sumsq is None:
        sumsq = be.xp.zeros((), dtype=grads[0].dtype)
    for i, g in enumerate(grads):
        be.k.sum_squares(g, out=sumsq, accumulate=i > 0)
    for g in grads:
        be.k.clip_scale(g, sumsq, max_norm)
    return sumsq


@dataclass(frozen=True)
class Schedule:
    """Learning rate per epoch (0-based): ``constant``; ``step`` multiplies by
    ``gamma`` every ``step_size`` epochs; ``exp`` multiplies by gamma each epoch."""

    kind: str = "constant"
    gamma: float = 0.1
    step_size: int = 10

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise ValueError(f"unknown lr schedule {self.kind!r}; choose one of {', '.join(SCHEDULES)}")
        if not 0 < self.gamma <= 1 or self.step_size < 1:
            raise ValueError("lr schedule needs 0 < gamma <= 1 and step_size >= 1")

    def lr(self, base_lr: float, epoch: int) -> float:
        """Learning rate to use during 0-based ``epoch``."""
        if self.kind == "step":
            return base_lr * self.gamma ** (epoch // self.step_size)
        if self.kind == "exp":
            return base_lr * self.gamma**epoch
        return base_lr
