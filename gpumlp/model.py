"""MLP: a stack of layers built from a spec like ``"784-100-10"``, with
scikit-learn style ``fit / predict / predict_proba / score`` and save/load."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from gpumlp import checkpoint
from gpumlp.backend import Backend, get_backend, resolve_dtype
from gpumlp.layers import LAYER_TYPES, Activation, BatchNorm, Dense, Dropout, Layer, grown_rows
from gpumlp.losses import get_loss
from gpumlp.validate import (
    MAX_SEED,
    check_batch_size,
    check_bool,
    check_features,
    check_finite,
    check_float,
    check_int,
    check_labels,
)

# Parameters, gradients and up to two optimizer states per weight: refuse a spec that cannot fit.
_COPIES_PER_PARAM = 4


def parse_spec(spec: str | Sequence[int]) -> list[int]:
    """``"784-100-10"`` or ``[784, 100, 10]`` -> layer widths (input, hidden..., classes)."""
    bad = ValueError(f"bad layer spec {spec!r}: expected integer widths joined by '-', e.g. 784-100-10")
    try:
        parts = spec.split("-") if isinstance(spec, str) else list(spec)
    except TypeError:
        raise bad from None
    widths = []
    for w in parts:
        if isinstance(w, str) and w.strip().isdigit():
            widths.append(int(w))
        elif isinstance(w, (int, np.integer)) and not isinstance(w, bool):
            widths.append(int(w))
        else:
            raise bad
    if len(widths) < 2 or min(widths) < 1:
        raise ValueError(f"bad layer spec {spec!r}: need at least input and output widths, all >= 1")
    if widths[-1] < 2:
        raise ValueError(f"bad layer spec {spec!r}: the output layer needs >= 2 classes")
    return widths


def _check_memory(widths: list[int], dtype: np.dtype) -> None:
    """ValueError before allocating when the parameters alone would not fit in this machine's memory."""
    n_params = sum((a + 1) * b for a, b in zip(widths[:-1], widths[1:]))
    need = n_params * dtype.itemsize * _COPIES_PER_PARAM
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: let the allocation decide
        return
    if need > total:
        raise ValueError(
            f"spec {'-'.join(map(str, widths))} has {n_params:,} parameters: about {need / 2**30:.1f} GiB "
            f"with gradients and optimizer state, more than this machine's {total / 2**30:.1f} GiB; "
            "use narrower layers"
        )


def _default_init(act: str) -> str:
    return "he" if act in ("relu", "leaky_relu") else "xavier"


class MLP:
    """Multilayer perceptron for classification.

    spec: widths ``"784-100-10"``; act: hidden activation; loss: ``softmax_xent``,
    ``logistic`` (sigmoid cross-entropy, the classic seed cost) or ``mse``;
    init: ``normal`` | ``xavier`` | ``he`` (default by activation); dropout: rate
    after each hidden layer; batchnorm: normalise each hidden pre-activation;
    dtype: float32 | float64; backend: name or Backend (default ``auto``)."""

    def __init__(
        self,
        spec: str | Sequence[int] = "784-100-10",
        act: str = "relu",
        loss: str = "softmax_xent",
        init: str | None = None,
        dropout: float = 0.0,
        batchnorm: bool = False,
        dtype: str = "float32",
        backend: str | Backend | None = None,
        seed: int = 0,
    ):
        self.widths = parse_spec(spec)
        self.act, self.loss = act, get_loss(loss)
        self.init = init or _default_init(act)
        self.dropout = check_float("dropout rate", dropout, 0.0, 1.0, high_open=True)
        self.batchnorm = check_bool("batchnorm", batchnorm)
        self.seed = check_int("seed", seed, 0, MAX_SEED)
        self.dtype = resolve_dtype(dtype)
        _check_memory(self.widths, self.dtype)
        self.be = get_backend(backend)
        self._input_buffers: dict = {}  # host input casts for inference, see _device_input
        layers: list[Layer] = []
        for i, width in enumerate(self.widths[1:-1]):
            if self.batchnorm:
                layers += [Dense(width, "identity", self.init), BatchNorm(), Activation(act)]
            else:
                layers.append(Dense(width, act, self.init))
            if self.dropout > 0:
                layers.append(Dropout(self.dropout, seed=self.seed * 1000 + i))
        layers.append(Dense(self.widths[-1], self.loss.output_act, self.init))
        self.layers = layers
        rng = np.random.default_rng(self.seed)
        n = self.widths[0]
        for layer in self.layers:
            n = layer.build(self.be, n, self.dtype, rng)
        dense = [la for la in self.layers if isinstance(la, Dense)]
        # the layers of a dense_chain eval forward (Dropout is the identity in eval mode), if any
        chained = all(isinstance(la, (Dense, Dropout)) for la in self.layers)
        self._chain_layers = dense if chained else None
        self._chain_bytes = dense[-1].params["W"].nbytes  # the layer dense_chain always tiles
        self._groups = self._pack_parameters()

    def _pack_parameters(self) -> list[tuple[str, object, object, bool]]:
        """Move every parameter (and its gradient) into one flat buffer per group, decayed
        (weights) and not (biases, batch-norm scale/shift), leaving the layers views into
        them: the optimizer then updates a whole group in one fused kernel call."""
        xp, groups = self.be.xp, []
        for decayed in (True, False):
            items = [(la, nm) for la in self.layers for nm in la.params if (nm in la.decayed) == decayed]
            if not items:
                continue
            size = sum(la.params[nm].size for la, nm in items)
            w_flat, g_flat = xp.empty(size, dtype=self.dtype), xp.zeros(size, dtype=self.dtype)
            offset = 0
            for layer, name in items:
                p = layer.params[name]
                view = slice(offset, offset + p.size)
                w_flat[view] = p.reshape(-1)
                layer.params[name] = w_flat[view].reshape(p.shape)
                layer.grads[name] = g_flat[view].reshape(p.shape)
                offset += p.size
            groups.append(("weights" if decayed else "others", w_flat, g_flat, decayed))
        return groups

    # ----------------------------------------------------------- structure
    @property
    def n_features(self) -> int:
        return self.widths[0]

    @property
    def n_classes(self) -> int:
        return self.widths[-1]

    def parameters(self) -> list[tuple[str, object, object, bool]]:
        """[(name, param, grad, decayed)] for every trainable array, in a fixed order."""
        return [
            (f"{i}.{name}", w, layer.grads[name], name in layer.decayed)
            for i, layer in enumerate(self.layers)
            for name, w in layer.params.items()
        ]

    def param_groups(self) -> list[tuple[str, object, object, bool]]:
        """[(group, flat params, flat grads, decayed)]: what the optimizer updates, one call a group."""
        return self._groups

    def config(self) -> dict:
        """JSON-able constructor arguments (everything but the backend)."""
        return {
            "spec": "-".join(map(str, self.widths)),
            "act": self.act,
            "loss": self.loss.name,
            "init": self.init,
            "dropout": self.dropout,
            "batchnorm": self.batchnorm,
            "dtype": self.dtype.name,
            "seed": self.seed,
        }

    def summary(self) -> str:
        """Layers, output shapes and parameter counts as a text table (:func:`gpumlp.export.summary`)."""
        from gpumlp.export import summary

        return summary(self)

    def __repr__(self) -> str:
        inner = ", ".join(f"{type(la).__name__}({la.config()})" for la in self.layers)
        return f"MLP({self.config()['spec']}, backend={self.be.name}, layers=[{inner}])"

    # ------------------------------------------------------------- compute
    def forward(self, x, train: bool = False, step=0):
        """Device (B, n_features) -> device (B, n_classes) scores. ``step`` (int or
        1-element int64 device array) seeds dropout's masks in training mode."""
        for layer in self.layers:
            x = layer.forward(x, train, step)
        return x

    def backward(self, grad, sgd: tuple[float, float] | None = None) -> None:
        """Back-propagate d loss / d scores (B, n_classes), filling every layer's grads. With
        ``sgd`` = (lr, l2) the dense weights (the whole decayed group) take their SGD step
        in their gradient GEMM instead, and only the other groups are left to the optimizer."""
        for i in range(len(self.layers) - 1, -1, -1):
            layer = self.layers[i]
            if sgd is not None and isinstance(layer, Dense):
                grad = layer.backward(grad, need_dx=i > 0, sgd=sgd)
            else:
                grad = layer.backward(grad, need_dx=i > 0)

    def fit(self, X, y, **kwargs):
        """Train on host arrays X (n, n_features), y (n,) int; kwargs as :func:`gpumlp.train.fit`.
        Returns the :class:`gpumlp.train.History`."""
        from gpumlp.train import fit

        return fit(self, X, y, **kwargs)

    @property
    def inference_path(self) -> str:
        """How ``predict`` / ``predict_proba`` / ``decision_function`` run on this backend now:
        "dense_chain" (the backend's fused eval forward of the whole stack, see :meth:`_chain`) or
        "layers" (layer by layer, as ``forward``)."""
        return "layers" if self._chain() is None else "dense_chain"

    def _chain(self) -> tuple[list, list, list] | None:
        """(weights, biases, activations) when the backend runs this model's eval forward as one
        fused ``dense_chain`` (every layer Dense, or Dropout: the identity in eval mode; the last
        weight matrix within the backend's ``CHAIN_MAX_WEIGHT_BYTES``: bigger ones before it run
        on its GEMM inside the chain), else None."""
        dense = self._chain_layers
        if dense is None or not 0 < self._chain_bytes <= self.be.k.CHAIN_MAX_WEIGHT_BYTES:
            return None
        return [la.params["W"] for la in dense], [la.params["b"] for la in dense], [la.act for la in dense]

    def _checked_features(self, X, chain) -> np.ndarray:
        """X checked for inference; with a chain, NaN/inf are left to the chain's flag (see
        _eval_chunks): no pass over X just for them."""
        return check_features(X, self.n_features, dtype=self.dtype, finite=chain is None)

    def _eval_chunks(self, X: np.ndarray, batch_size: int, chain=None, out=None, labels=None):
        """Eval-mode forward over checked host X in chunks of ``batch_size`` rows; yields
        (start, stop, device scores (stop - start, n_classes)). The scores live in the layers'
        eval workspaces (or the chain's buffer): read them before the next chunk. With ``chain``
        (:meth:`_chain`), each chunk is one ``dense_chain`` call, straight into the rows of the
        host array ``out`` when given (and of ``labels``, the arg-max, when given), and a chunk
        whose first product is not finite gets the exact NaN/inf check of its rows."""
        for s in range(0, X.shape[0], batch_size):
            xb = X[s : s + batch_size]
            e = s + xb.shape[0]
            if chain is None:
                yield s, e, self.forward(self._device_input(xb), train=False)
                continue
            if out is None:
                rows = grown_rows(self._input_buffers, "scores", (e - s, self.n_classes), np, self.dtype)
            else:
                rows = out[s:e]
            picks = None if labels is None else labels[s:e]
            scores, nonfinite = self.be.k.dense_chain(self._device_input(xb), *chain, out=rows, labels=picks)
            if nonfinite:
                check_finite(xb, first_row=s)
            yield s, e, scores

    def _device_input(self, xb: np.ndarray):
        """Host chunk (B, n_features) -> C-contiguous device array of the model's dtype. On a host
        backend a chunk that already is one is used as it is, and any other dtype or layout is
        cast into one buffer reused across chunks and calls (the cast rounds as ``astype``)."""
        if self.be.xp is not np:
            return self.be.asarray(xb, dtype=self.dtype)
        if xb.dtype == self.dtype and xb.flags.c_contiguous:
            return xb
        buf = grown_rows(self._input_buffers, "x", xb.shape, np, self.dtype)
        np.copyto(buf, xb, casting="unsafe")
        return buf

    def decision_function(self, X, batch_size: int = 4096) -> np.ndarray:
        """Host (n, n_features) -> host (n, n_classes) raw scores, evaluated in chunks."""
        return self._host_outputs(X, batch_size, self._chain())

    def _host_outputs(self, X, batch_size, chain) -> np.ndarray:
        """The last layer's outputs (n, n_classes) on the host, by ``chain`` (:meth:`_chain`, its
        last activation possibly replaced) or, when None, by the layers."""
        batch_size = check_batch_size(batch_size)
        X = self._checked_features(X, chain)
        out = np.empty((X.shape[0], self.n_classes), dtype=self.dtype)
        for s, e, scores in self._eval_chunks(X, batch_size, chain, out=out):
            if chain is None:
                out[s:e] = self.be.to_host(scores)
        return out

    def predict_proba(self, X, batch_size: int = 4096) -> np.ndarray:
        """Host (n, n_features) -> (n, n_classes) class probabilities (outputs for MSE)."""
        chain, act = self._chain(), self.loss.proba_act
        if chain is not None and act is not None and "identity" in (act, chain[2][-1]):
            if act != "identity":  # the probabilities fold into the last layer: act(z + b)
                chain[2][-1] = act
            return self._host_outputs(X, batch_size, chain)
        scores = self._host_outputs(X, batch_size, chain)
        if self.be.xp is np:  # a host backend turns the scores into probabilities in place
            return self.loss.probabilities(self.be, scores, out=scores)
        return self.be.to_host(self.loss.probabilities(self.be, self.be.asarray(scores)))

    def predict(self, X, batch_size: int = 4096) -> np.ndarray:
        """Host (n, n_features) -> (n,) int64 predicted classes (arg-max of the scores, chunk by
        chunk: no (n, n_classes) array)."""
        batch_size, chain = check_batch_size(batch_size), self._chain()
        X = self._checked_features(X, chain)
        labels = np.empty(X.shape[0], dtype=np.int64)
        for s, e, scores in self._eval_chunks(X, batch_size, chain, labels=labels):
            if chain is None:
                np.argmax(self.be.to_host(scores), axis=1, out=labels[s:e])
        return labels

    def score(self, X, y) -> float:
        """Accuracy in [0, 1] on host data."""
        y = check_labels(y, np.asarray(X).shape[0], self.n_classes)
        return float((self.predict(X) == y).mean())

    # ------------------------------------------------------------ save/load
    def state_arrays(self) -> dict[str, np.ndarray]:
        """Host copies of every parameter and layer state, keyed 'param/i.name' / 'state/i.name'."""
        arrays = {f"param/{name}": np.array(self.be.to_host(w)) for name, w, _, _ in self.parameters()}
        for i, layer in enumerate(self.layers):
            for name in layer.state_names:
                arrays[f"state/{i}.{name}"] = np.array(self.be.to_host(getattr(layer, name)))
        return arrays

    def verify_state_arrays(self, arrays: dict[str, np.ndarray], source: str = "state") -> list:
        """CheckpointError (naming ``source``, the file, and the array) unless ``arrays`` holds every
        parameter and layer state with exactly this model's shape (nothing broadcasts) and a float
        dtype. -> [(host array, model array)] pairs for :meth:`load_state_arrays`."""
        targets = [(f"param/{name}", w) for name, w, _, _ in self.parameters()]
        targets += [
            (f"state/{i}.{name}", getattr(layer, name))
            for i, layer in enumerate(self.layers)
            for name in layer.state_names
        ]
        return [(checkpoint.expect_array(source, arrays, key, dst.shape, "f"), dst) for key, dst in targets]

    def load_state_arrays(self, arrays: dict[str, np.ndarray], source: str = "state") -> None:
        """Inverse of :meth:`state_arrays`: copy host arrays into this model, all verified first
        (:meth:`verify_state_arrays`), so a bad file changes nothing."""
        for src, dst in self.verify_state_arrays(arrays, source):
            dst[...] = self.be.asarray(src, dtype=self.dtype)

    def save(self, path: str | os.PathLike, extra_arrays: dict | None = None, extra_meta: dict | None = None):
        """Atomically write config + weights (+ any training state) to ``path`` (.npz)."""
        layers = [[type(la).__name__, la.config()] for la in self.layers]
        meta = {"format": "gpumlp-1", "model": self.config(), "layers": layers, **(extra_meta or {})}
        return checkpoint.write(path, {**self.state_arrays(), **(extra_arrays or {})}, meta)

    @classmethod
    def load(cls, path: str | os.PathLike, backend: str | Backend | None = None) -> MLP:
        """Rebuild a model saved by :meth:`save` on the given backend; the file is verified
        (checksum, every key and array with its shape), else :class:`checkpoint.CheckpointError`."""
        arrays, meta = checkpoint.read(path)
        return cls.from_checkpoint(path, arrays, meta, backend)

    @classmethod
    def from_checkpoint(cls, path, arrays: dict, meta: dict, backend: str | Backend | None = None) -> MLP:
        """A model from the verified (arrays, meta) of :func:`checkpoint.read` of ``path``."""
        if meta.get("format") != "gpumlp-1":
            raise checkpoint.CheckpointError(f"{path}: unknown checkpoint format {meta.get('format')!r}")
        config = checkpoint.expect(path, meta, "model", dict)
        keys = ("spec", "act", "loss", "init", "dropout", "batchnorm", "dtype", "seed")
        if sorted(config) != sorted(keys):
            raise checkpoint.CheckpointError(
                f"{path}: model config has keys {sorted(config)}, expected {list(keys)}"
            )
        try:
            model = cls(**config, backend=backend)
        except (TypeError, ValueError) as e:
            raise checkpoint.CheckpointError(f"{path}: bad model config ({e})") from None
        layers = checkpoint.expect(path, meta, "layers", list)
        saved = [la[0] if isinstance(la, list) and la else la for la in layers]
        if saved != [type(la).__name__ for la in model.layers] or not set(saved) <= set(LAYER_TYPES):
            raise checkpoint.CheckpointError(f"{path}: layer list {saved} does not match the config")
        model.load_state_arrays(arrays, source=str(path))
        return model


__all__ = ["MLP", "parse_spec", "Dense", "Dropout", "BatchNorm", "Activation"]
