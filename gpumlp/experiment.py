"""The lecture notes' experiment: a linear model fails on nonlinear 2-D data, a hidden
layer with a nonlinearity solves it, and so does a linear model on squared features.

:func:`run_nonlinear` trains the same small network five ways on one toy set and
returns the accuracies, loss curves and trained models; ``gpumlp experiment
nonlinear`` prints the table and draws the decision boundaries
(:func:`gpumlp.plots.plot_nonlinear`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from gpumlp.data import make_circles, make_moons, make_spirals, make_xor
from gpumlp.model import MLP

DATASETS = {"circles": make_circles, "xor": make_xor, "moons": make_moons, "spirals": make_spirals}
# name -> (hidden activation, input features). "linear": identity activation, so the whole
# network is one affine map; "squared": the same linear network on degree-2 features.
VARIANTS = {
    "linear": ("identity", "x"),
    "sigmoid": ("sigmoid", "x"),
    "tanh": ("tanh", "x"),
    "relu": ("relu", "x"),
    "squared": ("identity", "x2"),
}
FEATURE_NAMES = {"x": "x1, x2", "x2": "x1, x2, x1², x2², x1·x2"}


def features(X: np.ndarray, kind: str) -> np.ndarray:
    """(n, 2) points -> ``x``: themselves; ``x2``: (n, 5) [x1, x2, x1², x2², x1·x2]. The product
    is the square that XOR needs: x1·x2 = ((x1 + x2)² - (x1 - x2)²) / 4."""
    X = np.asarray(X, dtype=np.float64)
    if kind == "x":
        return X
    x1, x2 = X[:, 0], X[:, 1]
    return np.stack([x1, x2, x1**2, x2**2, x1 * x2], axis=1)


@dataclass
class VariantResult:
    """One trained variant: its accuracies, per-epoch losses and the model."""

    name: str
    act: str
    features: str
    train_acc: float
    test_acc: float
    losses: list[float]
    seconds: float
    model: MLP = field(repr=False)

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Classes of raw (n, 2) points (the variant's features are made here)."""
        return self.model.predict(features(X, self.features))


@dataclass
class NonlinearResult:
    """Every variant on one data set, with the train and test points."""

    dataset: str
    X: np.ndarray
    y: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    variants: list[VariantResult]

    def table(self) -> str:
        """The accuracies as an aligned text table."""
        rows = [f"{'model':<8} {'activation':<10} {'features':<24} {'train':>7} {'test':>7} {'seconds':>8}"]
        for v in self.variants:
            rows.append(
                f"{v.name:<8} {v.act:<10} {FEATURE_NAMES[v.features]:<24} "
                f"{100 * v.train_acc:>6.1f}% {100 * v.test_acc:>6.1f}% {v.seconds:>8.2f}"
            )
        return "\n".join(rows)

    def to_dict(self) -> dict:
        """JSON-able summary (no models, no points)."""
        keys = ("name", "act", "features", "train_acc", "test_acc", "losses", "seconds")
        rows = [{k: getattr(v, k) for k in keys} for v in self.variants]
        return {"dataset": self.dataset, "variants": rows}


def run_nonlinear(
    dataset: str = "circles",
    *,
    n: int = 400,
    noise: float | None = None,
    hidden: int = 16,
    epochs: int = 150,
    batch_size: int = 32,
    lr: float = 0.02,
    backend: str | None = "numpy",
    seed: int = 0,
    variants: tuple[str, ...] = tuple(VARIANTS),
) -> NonlinearResult:
    """Train each of ``variants`` (names of VARIANTS) as a 2-``hidden``-K network (Adam,
    softmax cross-entropy) on ``n`` points of ``dataset`` and test on ``n`` fresh points.
    ``noise`` defaults to each generator's own."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    make = DATASETS[dataset]
    kw = {} if noise is None else {"noise": noise}
    X, y = make(n=n, seed=seed, **kw)
    X_test, y_test = make(n=n, seed=seed + 1, **kw)
    k = int(y.max()) + 1
    results = []
    for name in variants:
        act, feats = VARIANTS[name]
        F, F_test = features(X, feats), features(X_test, feats)
        model = MLP([F.shape[1], hidden, k], act=act, backend=backend, seed=seed)
        t0 = time.perf_counter()
        hist = model.fit(F, y, epochs=epochs, batch_size=batch_size, optimizer="adam", lr=lr, seed=seed)
        seconds = time.perf_counter() - t0
        train_acc, test_acc = model.score(F, y), model.score(F_test, y_test)
        results.append(VariantResult(name, act, feats, train_acc, test_acc, hist["loss"], seconds, model))
    return NonlinearResult(dataset, X, y, X_test, y_test, results)
