"""Optimizers (SGD, momentum/Nesterov, AdaGrad, RMSProp, Adam, AdamW, Lion), L1/L2 and
decoupled weight decay, gradient clipping by global norm, and learning-rate schedules.

As in jax's ``optimizers``: an optimizer is written for one array (its state
arrays plus one fused in-place kernel call) and lifted to every parameter.
Each optimizer is one :class:`Rule` in ``RULES``: its kernel, its state arrays,
the hyper-parameters the kernel takes and how they are passed. Adding one is an
entry here plus its kernel on each backend (``kernels/reference.py`` first);
the CLI, checkpoints, the estimator, the bench's torch peer and the tests read
the table. L1/L2 and weight decay apply only to parameters a layer marks as
decayed (weights, not biases or batch-norm scale/shift), matching the classic
reference implementation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from gpumlp.backend import Backend

SCHEDULES = ("constant", "step", "exp")


@dataclass(frozen=True)
class Hyper:
    """A hyper-parameter's default and range: a decay rate in [0, 1) (``rate``), a finite number > 0
    (``positive``) or a finite number >= 0."""

    default: float
    rate: bool = False
    positive: bool = False


# Every hyper-parameter an optimizer may take (a field of Optimizer each), and its default.
HYPERS = {
    "momentum": Hyper(0.9, rate=True),
    "rho": Hyper(0.9, rate=True),
    "beta1": Hyper(0.9, rate=True),
    "beta2": Hyper(0.999, rate=True),
    "eps": Hyper(1e-8, positive=True),  # 0: 0/0 on an exactly-zero gradient (AdaGrad, RMSProp, Adam)
    "l1": Hyper(0.0),
    "l2": Hyper(0.0),
    "weight_decay": Hyper(0.0),
}
DECAYS = ("l1", "l2", "weight_decay")  # zero for parameters that are not decayed (biases, batch norm)


@dataclass(frozen=True)
class Rule:
    """One optimizer. Its step is ``be.k.<kernel>(w, g, *state, lr, **kwargs)``, in place, where
    kwargs are ``l2``, ``l1``, the kernel parameters of ``hyper`` (kernel parameter -> hyper-parameter
    name), ``fixed`` and, with ``step``, ``t`` (the 1-based step, a 1-element int64 device array in
    the training loop). ``state`` names the arrays shaped like the parameter, zeroed at the start
    (saved in checkpoints in this order). ``defaults`` overrides HYPERS' defaults; ``lr`` is the usual
    rate for minibatch-mean gradients on inputs of order 1; ``scale_invariant``: the gradient's scale
    (mean vs sum) cancels out; ``folds``: the step is ``sgd_step``, which can ride on the gradient's
    GEMM; ``torch``: the same update in ``torch.optim`` as (class name, keyword arguments) of an
    Optimizer, where one exists (its ``weight_decay`` is our ``l2``, except AdamW's)."""

    kernel: str
    state: tuple[str, ...] = ()
    hyper: dict[str, str] = field(default_factory=dict)
    fixed: dict = field(default_factory=dict)
    step: bool = False
    defaults: dict[str, float] = field(default_factory=dict)
    lr: float = 0.01
    scale_invariant: bool = False
    folds: bool = False
    torch: Callable[[Optimizer], tuple[str, dict]] | None = None


def _same(*names: str) -> dict[str, str]:
    return {n: n for n in names}


def _torch_sgd(o: Optimizer, **kw) -> tuple[str, dict]:
    return "SGD", {"weight_decay": o.l2, **kw}


def _torch_adam(name: str, o: Optimizer, weight_decay: float) -> tuple[str, dict]:
    return name, {"betas": (o.beta1, o.beta2), "eps": o.eps, "weight_decay": weight_decay}


# fmt: off
RULES: dict[str, Rule] = {
    "sgd": Rule("sgd_step", lr=0.1, folds=True, torch=_torch_sgd),
    "momentum": Rule(
        "momentum_step", ("v",), {"mu": "momentum"}, torch=lambda o: _torch_sgd(o, momentum=o.momentum)
    ),
    "nesterov": Rule(
        "momentum_step", ("v",), {"mu": "momentum"}, {"nesterov": True},
        torch=lambda o: _torch_sgd(o, momentum=o.momentum, nesterov=True),
    ),
    "adagrad": Rule(
        "adagrad_step", ("h",), _same("eps"), scale_invariant=True,
        torch=lambda o: ("Adagrad", {"eps": o.eps, "weight_decay": o.l2}),
    ),
    "rmsprop": Rule(
        "rmsprop_step", ("s",), _same("rho", "eps"), lr=0.001, scale_invariant=True,
        torch=lambda o: ("RMSprop", {"alpha": o.rho, "eps": o.eps, "weight_decay": o.l2}),
    ),
    "adam": Rule(
        "adam_step", ("m", "v"), _same("beta1", "beta2", "eps"), step=True, lr=0.001, scale_invariant=True,
        torch=lambda o: _torch_adam("Adam", o, o.l2),
    ),
    # Loshchilov & Hutter 2019, as torch.optim.AdamW: w -= lr*weight_decay*w, then Adam's step
    "adamw": Rule(
        "adamw_step", ("m", "v"), _same("beta1", "beta2", "eps", "weight_decay"), step=True,
        defaults={"weight_decay": 0.01}, lr=0.001, scale_invariant=True,
        torch=lambda o: _torch_adam("AdamW", o, o.weight_decay),
    ),
    # Chen et al. 2023 (arXiv 2302.06675): the sign of an interpolated momentum, so every weight
    # moves by lr; their rates are 3-10x AdamW's smaller. No torch.optim twin.
    "lion": Rule(
        "lion_step", ("m",), _same("beta1", "beta2", "weight_decay"), defaults={"beta2": 0.99},
        lr=3e-4, scale_invariant=True,
    ),
}
# fmt: on
OPTIMIZERS = tuple(RULES)
# The hyper-parameters only some optimizers take (each some rule's ``hyper`` value): the run
# configs' and the CLI flags' own keys, in the order a run's description lists them.
SPECIFIC_HYPERS = ("momentum", "weight_decay", "rho", "beta1", "beta2", "eps")


@dataclass
class Optimizer:
    """Hyper-parameters of one update rule. ``name`` is one of OPTIMIZERS;
    ``momentum`` is mu (momentum/nesterov), ``rho`` the RMSProp decay,
    ``beta1``/``beta2`` the moments' decays (Adam, AdamW, Lion); ``l1``/``l2`` regularisation
    strengths, ``weight_decay`` the decoupled decay of the optimizers that take it. None takes the
    optimizer's default (``RULES[name].defaults``, else ``HYPERS``); each optimizer reads only the
    hyper-parameters of its rule."""

    name: str = "sgd"
    lr: float = 0.01
    momentum: float | None = None
    rho: float | None = None
    beta1: float | None = None
    beta2: float | None = None
    eps: float | None = None
    l1: float | None = None
    l2: float | None = None
    weight_decay: float | None = None

    def __post_init__(self):
        if self.name not in RULES:
            raise ValueError(f"unknown optimizer {self.name!r}; choose one of {', '.join(OPTIMIZERS)}")
        rule = RULES[self.name]
        for name, hyper in HYPERS.items():
            if getattr(self, name) is None:
                setattr(self, name, rule.defaults.get(name, hyper.default))
        for name in ("lr", *(n for n, h in HYPERS.items() if not h.rate)):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"optimizer {name} must be a finite number {self._range(name)}, got {value}")
        if self.lr == 0:
            raise ValueError("learning rate must be > 0")
        for name in (n for n, h in HYPERS.items() if h.positive and getattr(self, n) == 0):
            default = rule.defaults.get(name, HYPERS[name].default)
            raise ValueError(
                f"optimizer {name} must be > 0 (it keeps a denominator off zero), got 0; "
                f"leave it None for the default {default:g}"
            )
        for name in (n for n, h in HYPERS.items() if h.rate):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0 <= value < 1):
                raise ValueError(f"optimizer {name} must be a finite number in [0, 1), got {value}")

    @staticmethod
    def _range(name: str) -> str:
        """'> 0' or '>= 0': the range of non-rate hyper-parameter ``name`` (or ``lr``)."""
        return "> 0" if name == "lr" or HYPERS[name].positive else ">= 0"

    @property
    def rule(self) -> Rule:
        """This optimizer's entry of RULES."""
        return RULES[self.name]

    def init_state(self, be: Backend, w) -> list:
        """Zeroed state arrays for one parameter (velocity, moments...), in ``rule.state`` order."""
        return [be.xp.zeros_like(w) for _ in self.rule.state]

    def kernel_kwargs(self, t, decayed: bool) -> dict:
        """The keyword arguments of ``rule.kernel`` after (w, g, *state, lr) at step ``t``
        (1-based int or 1-element int64 device array); the DECAYS are 0 unless ``decayed``."""
        rule = self.rule
        kw = {p: getattr(self, h) if decayed or h not in DECAYS else 0.0 for p, h in rule.hyper.items()}
        if rule.step:
            kw["t"] = t
        reg = {"l2": self.l2, "l1": self.l1} if decayed else {"l2": 0.0, "l1": 0.0}
        return {**kw, **rule.fixed, **reg}

    def update(self, be: Backend, w, g, state: list, lr: float, t: int, decayed: bool) -> None:
        """Apply one in-place step to parameter w with gradient g at step t (1-based)."""
        getattr(be.k, self.rule.kernel)(w, g, *state, lr, **self.kernel_kwargs(t, decayed))

    def gemm_fold(self, lr: float, clipping: bool) -> tuple[float, float] | None:
        """(lr, l2) when this step on the weights can ride on their gradient's GEMM
        (``sgd_matmul_step``: plain SGD, no L1, no clipping, which needs the whole gradient
        first); None when the gradient must be formed and then stepped."""
        if not self.rule.folds or self.l1 or clipping:
            return None
        return (lr, self.l2)

    def torch_twin(self) -> tuple[str, dict] | None:
        """(``torch.optim`` class name, keyword arguments besides params and lr) of the same update,
        or None when torch has none."""
        return self.rule.torch(self) if self.rule.torch else None

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
