"""``MLPClassifier``: a scikit-learn estimator around :class:`gpumlp.MLP`.

Every hyper-parameter is an ``__init__`` argument (so ``clone``, ``GridSearchCV``
and ``Pipeline`` work); ``fit`` returns self; any label values (ints such as
{3, 7}, strings) are mapped to class indices 0..K-1 and back through
``classes_``. With scikit-learn installed the class derives from its
``ClassifierMixin``/``BaseEstimator`` and validates input with its helpers
(the messages its checks expect); without it, gpumlp still imports and the
estimator works on NumPy arrays with a small stand-in for ``get_params``.

Optimizer state across calls, as scikit-learn's own MLPClassifier keeps its ``_optimizer``:
consecutive ``partial_fit`` calls are consecutive epochs of one run. Each continues the optimizer
state (Adam's moments, momentum, AdaGrad/RMSProp accumulators), the step count (Adam's bias
correction, dropout's masks), the epoch (the shuffle order and the learning-rate schedule's
position) and the shuffle seed of the call before, whether that was a ``partial_fit`` or a ``fit``
(a :class:`gpumlp.train.Carry`, pickled with the estimator as host arrays). ``fit``, with or
without ``warm_start``, starts fresh optimizer state and schedule (epoch 0, seeded by
``random_state``'s seed + ``n_iter_``); ``warm_start`` keeps only the weights. A ``partial_fit``
after ``set_params(optimizer=...)`` names another optimizer starts that one fresh, the same way;
other hyper-parameters (``lr``, ``batch_size``...) apply to the continued state. ``partial_fit``
never stops early: ``patience`` (and restoring the best weights) applies to ``fit`` only.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import numpy as np

from gpumlp.data import Pixels
from gpumlp.model import MLP
from gpumlp.validate import check_features

try:
    from sklearn.base import BaseEstimator, ClassifierMixin
    from sklearn.exceptions import NotFittedError
    from sklearn.utils.multiclass import check_classification_targets
    from sklearn.utils.validation import check_is_fitted, validate_data

    HAVE_SKLEARN = True
except ImportError:  # gpumlp works without scikit-learn
    HAVE_SKLEARN = False

    class NotFittedError(ValueError, AttributeError):
        """The estimator is used before ``fit``."""

    class ClassifierMixin:  # noqa: D101 - stand-in, nothing to add
        pass

    class BaseEstimator:
        """``get_params``/``set_params`` from the ``__init__`` signature, as scikit-learn's."""

        def get_params(self, deep: bool = True) -> dict:
            """Constructor arguments by name."""
            names = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
            return {name: getattr(self, name) for name in names}

        def set_params(self, **params):
            """Set constructor arguments; returns self."""
            valid = self.get_params()
            for name, value in params.items():
                if name not in valid:
                    raise ValueError(f"invalid parameter {name!r} for {type(self).__name__}; valid: {valid}")
                setattr(self, name, value)
            return self


class MLPClassifier(ClassifierMixin, BaseEstimator):
    """Multilayer perceptron classifier trained by gpumlp's training loop.

    hidden_layer_sizes: widths of the hidden layers; activation, loss, init,
    dropout, batchnorm: as :class:`gpumlp.MLP`; optimizer (one of ``gpumlp.optim.OPTIMIZERS``),
    lr, momentum, l1, l2, weight_decay, clip_norm, schedule, epochs, batch_size, tol, patience,
    shuffle: as :func:`gpumlp.train.fit`; beta_1, beta_2, epsilon (scikit-learn's names): the
    moments' decays in [0, 1) and the denominator's term > 0, ``fit``'s beta1, beta2, eps; None takes
    the optimizer's default (Adam, AdamW: 0.9, 0.999, 1e-8, scikit-learn's values; Lion's beta2 is
    0.99). An optimizer that does not take one ignores it, as scikit-learn's sgd solver ignores
    beta_1 (epsilon: AdaGrad, RMSProp, Adam, AdamW; the betas: Adam, AdamW, Lion); a value out of
    range is an error whatever the optimizer; validation_fraction: share of the rows held out
    (stratified at random) to compute ``validation_scores_`` and for
    ``patience`` (``fit`` only); backend: ``numpy`` | ``numba`` | ``cupy`` | ``cuda-emu`` | None (auto);
    dtype: float32 | float64; random_state: int, None or a RandomState (seeds
    init, dropout and shuffling); warm_start: ``fit`` continues from the current
    weights; verbose: one line per epoch on stderr.

    Fitted attributes: ``classes_``, ``n_features_in_``, ``model_`` (the
    :class:`gpumlp.MLP`), ``loss_curve_``, ``validation_scores_`` (None without
    validation), ``n_iter_`` (epochs trained in all calls)."""

    def __init__(
        self,
        hidden_layer_sizes: Sequence[int] = (100,),
        activation: str = "relu",
        loss: str = "softmax_xent",
        init: str | None = None,
        dropout: float = 0.0,
        batchnorm: bool = False,
        optimizer: str = "adam",
        lr: float = 1e-3,
        momentum: float = 0.9,
        l1: float = 0.0,
        l2: float = 1e-4,
        weight_decay: float | None = None,
        beta_1: float | None = None,
        beta_2: float | None = None,
        epsilon: float | None = None,
        clip_norm: float | None = None,
        schedule: str = "constant",
        epochs: int = 200,
        batch_size: int = 200,
        tol: float | None = None,
        patience: int | None = None,
        validation_fraction: float = 0.0,
        shuffle: bool = True,
        backend: str | None = None,
        dtype: str = "float32",
        random_state=None,
        warm_start: bool = False,
        verbose: bool = False,
    ):
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.loss = loss
        self.init = init
        self.dropout = dropout
        self.batchnorm = batchnorm
        self.optimizer = optimizer
        self.lr = lr
        self.momentum = momentum
        self.l1 = l1
        self.l2 = l2
        self.weight_decay = weight_decay
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.clip_norm = clip_norm
        self.schedule = schedule
        self.epochs = epochs
        self.batch_size = batch_size
        self.tol = tol
        self.patience = patience
        self.validation_fraction = validation_fraction
        self.shuffle = shuffle
        self.backend = backend
        self.dtype = dtype
        self.random_state = random_state
        self.warm_start = warm_start
        self.verbose = verbose

    # ------------------------------------------------------------ fitting
    def fit(self, X, y) -> MLPClassifier:
        """Train on X (n_samples, n_features) and labels y (n_samples,) of any values; returns self.
        With ``warm_start`` and a model already fitted on the same classes, continue training it."""
        X, y = self._validate(X, y, reset=True)
        classes = np.unique(y)
        keep = self.warm_start and self._fitted() and np.array_equal(classes, self.classes_)
        keep = keep and self.model_.n_features == X.shape[1]
        if not keep:
            self.classes_ = classes
            self._start(X.shape[1])
        self._carry = _new_carry()  # fresh optimizer state and schedule, as scikit-learn's fit
        return self._train(X, y, self.epochs, self.patience)

    def partial_fit(self, X, y, classes=None) -> MLPClassifier:
        """One epoch over X, y, continuing the optimizer state, step count and schedule of the call
        before (see the module docstring). The first call needs ``classes`` (every label that will
        ever occur) unless the estimator is already fitted; returns self."""
        first = not self._fitted()
        X, y = self._validate(X, y, reset=first)
        if first:
            if classes is None:
                raise ValueError("the first partial_fit call needs classes=, e.g. classes=np.unique(y_all)")
            self.classes_ = np.unique(np.asarray(classes))
            self._start(X.shape[1])
        elif classes is not None and not np.array_equal(np.unique(np.asarray(classes)), self.classes_):
            raise ValueError(
                f"classes={classes!r} differs from the classes of the first call {self.classes_}"
            )
        carried = getattr(self, "_carry", None)  # None: fitted before estimators carried it
        optimizer = getattr(self.optimizer, "name", self.optimizer)  # a name, or an Optimizer
        if carried is None or carried.optimizer not in (None, optimizer):
            self._carry = _new_carry()  # set_params(optimizer=...) since: start that one fresh
        return self._train(X, y, 1, None)

    def _start(self, n_features: int) -> None:
        """A fresh model for ``n_features`` inputs and ``len(classes_)`` outputs."""
        if len(self.classes_) < 2:
            raise ValueError(
                f"MLPClassifier needs at least 2 classes in y, got only one class ({self.classes_[0]!r})"
            )
        sizes = [self.hidden_layer_sizes] if np.isscalar(self.hidden_layer_sizes) else self.hidden_layer_sizes
        spec = [n_features, *(int(s) for s in sizes), len(self.classes_)]
        self._seed = _seed_from(self.random_state)
        self.model_ = MLP(
            spec, act=self.activation, loss=self.loss, init=self.init, dropout=self.dropout,
            batchnorm=self.batchnorm, dtype=self.dtype, backend=self.backend, seed=self._seed,
        )  # fmt: skip
        self.loss_curve_, self.validation_scores_, self.n_iter_ = [], None, 0
        self._carry = _new_carry()

    def _train(self, X, y, epochs: int, patience: int | None) -> MLPClassifier:
        """Run the training loop for ``epochs`` more on validated X and raw labels y, from and into
        the carried optimizer state."""
        from gpumlp.train import fit

        idx = np.minimum(np.searchsorted(self.classes_, y), len(self.classes_) - 1)
        if np.any(self.classes_[idx] != y):
            unknown = np.setdiff1d(y, self.classes_)
            raise ValueError(f"y has labels {unknown.tolist()} not in classes_ {self.classes_.tolist()}")
        if not isinstance(X, Pixels):  # codes are decoded in the model's dtype by fit
            X = X.astype(self.model_.dtype, copy=False)
        train, valid = self._split(idx)
        history = fit(
            self.model_, X[train], idx[train],
            X_valid=None if valid is None else X[valid], y_valid=None if valid is None else idx[valid],
            epochs=epochs, batch_size=self.batch_size, optimizer=self.optimizer, lr=self.lr,
            momentum=self.momentum, l1=self.l1, l2=self.l2, weight_decay=self.weight_decay,
            beta1=self.beta_1, beta2=self.beta_2, eps=self.epsilon, clip_norm=self.clip_norm,
            schedule=self.schedule, shuffle=self.shuffle, seed=self._seed + self.n_iter_,
            tol=self.tol, patience=patience if valid is not None else None, verbose=self.verbose,
            carry=self._carry,
        )  # fmt: skip
        self.loss_curve_ = [*self.loss_curve_, *history["loss"]]
        if valid is not None:
            self.validation_scores_ = [*(self.validation_scores_ or []), *history["valid_acc"]]
        self.n_iter_ += len(history)
        return self

    def _split(self, idx: np.ndarray):
        """(train rows, validation rows | None): a stratified random share of each class validates."""
        if not self.validation_fraction:
            return np.arange(len(idx)), None
        if not 0 < self.validation_fraction < 1:
            raise ValueError(f"validation_fraction must be in [0, 1), got {self.validation_fraction}")
        rng = np.random.default_rng(self._seed + self.n_iter_)
        valid = np.concatenate(
            [rng.permutation(rows)[: int(round(self.validation_fraction * len(rows)))]
             for rows in (np.flatnonzero(idx == k) for k in range(len(self.classes_)))]
        )  # fmt: skip
        if len(valid) == 0 or len(valid) == len(idx):
            raise ValueError(
                f"validation_fraction={self.validation_fraction} leaves no train or no valid rows"
            )
        return np.setdiff1d(np.arange(len(idx)), valid), np.sort(valid)

    # --------------------------------------------------------- predicting
    def predict_proba(self, X) -> np.ndarray:
        """X (n_samples, n_features) -> (n_samples, n_classes) probabilities, columns in ``classes_``
        order."""
        self._check_fitted()
        X = self._validate(X, reset=False)
        return self.model_.predict_proba(X.astype(self.model_.dtype, copy=False))

    def predict(self, X) -> np.ndarray:
        """X (n_samples, n_features) -> (n_samples,) labels taken from ``classes_``."""
        index = self.predict_proba(X).argmax(axis=1)
        return self.classes_[index]

    def score(self, X, y, sample_weight=None) -> float:
        """Mean accuracy of ``predict(X)`` against y (weighted by ``sample_weight`` when given)."""
        return float(np.average(self.predict(X) == np.asarray(y).reshape(-1), weights=sample_weight))

    def summary(self) -> str:
        """Layers, output shapes and parameter counts of the fitted model (:func:`gpumlp.export.summary`)."""
        self._check_fitted()
        return self.model_.summary()

    # ------------------------------------------------------------ helpers
    def _fitted(self) -> bool:
        return hasattr(self, "model_")

    def _check_fitted(self) -> None:
        if HAVE_SKLEARN:
            check_is_fitted(self, "model_")
        elif not self._fitted():
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet; call fit first")

    def _validate(self, X, y="no_validation", reset: bool = True, dtype=(np.float64, np.float32)):
        """scikit-learn's input checks (messages its estimator checks expect) or a NumPy fallback;
        X alone unless y is given (y=None is an error, as in scikit-learn). Training images as
        :class:`~gpumlp.data.Pixels` stay codes (their codes checked); to predict, they are decoded."""
        if isinstance(X, Pixels):
            if isinstance(y, str) and y == "no_validation":
                return self._validate(X.decode(self.model_.dtype), y, reset)
            codes, y = self._validate(X.codes, y, reset, dtype=None)  # kept uint8
            return Pixels(codes, X.mode), y
        if HAVE_SKLEARN:
            if isinstance(y, str) and y == "no_validation":
                return validate_data(self, X, reset=reset, dtype=dtype)
            X, y = validate_data(self, X, y, reset=reset, dtype=dtype)
            check_classification_targets(y)
            return X, y
        X = np.asarray(X)
        if reset:
            if X.ndim != 2:
                raise ValueError(f"X must be 2-D (n_samples, n_features), got shape {X.shape}")
            self.n_features_in_ = X.shape[1]
        X = check_features(X, self.n_features_in_)
        if isinstance(y, str) and y == "no_validation":
            return X
        if y is None:
            raise ValueError(f"{type(self).__name__} requires y to be passed, but the target y is None")
        return X, np.asarray(y).reshape(-1)

    def __getstate__(self) -> dict:
        """Pickle the model as its config and host arrays (a backend holds modules)."""
        state = dict(super().__getstate__() if HAVE_SKLEARN else self.__dict__)  # a copy: never self's
        model = state.pop("model_", None)
        if model is not None:
            state["model_"] = ("gpumlp-mlp", model.config(), model.state_arrays(), model.be.name)
        return state

    def __setstate__(self, state: dict) -> None:
        packed = state.get("model_")
        if isinstance(packed, tuple) and packed[:1] == ("gpumlp-mlp",):
            _, config, arrays, backend = packed
            model = MLP(**config, backend=backend)
            model.load_state_arrays(arrays)
            state = {**state, "model_": model}
        if HAVE_SKLEARN:
            super().__setstate__(state)
        else:
            self.__dict__.update(state)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.non_deterministic = self.backend == "cupy"  # atomics in the GPU kernels
        return tags


def _new_carry():
    """An empty :class:`gpumlp.train.Carry` (imported here: gpumlp.train loads on first training)."""
    from gpumlp.train import Carry

    return Carry()


def _seed_from(random_state) -> int:
    """random_state (None, int or RandomState/Generator) -> an int seed for the model and the shuffle."""
    if random_state is None:
        return int(np.random.randint(0, 2**31 - 1))
    if isinstance(random_state, (int, np.integer)):
        return int(random_state)
    if isinstance(random_state, np.random.Generator):
        return int(random_state.integers(0, 2**31 - 1))
    return int(random_state.randint(0, 2**31 - 1))
