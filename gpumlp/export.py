"""A trained model outside gpumlp: a text summary, ONNX, and a PyTorch state_dict + module spec.

The model's input preprocessing (a :class:`gpumlp.presets.Prep`, or None for a
model that takes its inputs as they are) is an elementwise affine map
``x * scale + shift``; ONNX gets it as two leading nodes (Mul, Add), PyTorch
folded into the first Linear layer. Batch norm is exported in inference form
(running statistics); dropout is the identity at inference and left out of
ONNX (kept as ``nn.Dropout`` in PyTorch, where ``eval()`` disables it).

Both exports give class probabilities (softmax, or sigmoid for the logistic
and MSE costs, as ``MLP.predict_proba``); ONNX also gives the predicted class
index (``label``, the arg-max of the raw scores as ``MLP.predict``).
"""

from __future__ import annotations

import os

import numpy as np

from gpumlp.kernels.activations import GELU_TANH_A, LEAKY_SLOPE, SQRT_2_OVER_PI
from gpumlp.model import MLP

ONNX_OPSET = 17
ONNX_IR_VERSION = 8  # the IR of opset 17: loads in any onnxruntime since 1.13
TORCH_FORMAT = "gpumlp-torch-1"


# ------------------------------------------------------------------ summary
def layer_table(model: MLP) -> list[dict]:
    """One row per layer: index, type, details, output shape, trainable and state parameter counts."""
    rows, n = [], model.n_features
    arrays = model.state_arrays()
    for i, layer in enumerate(model.layers):
        name = type(layer).__name__
        params = sum(a.size for k, a in arrays.items() if k.startswith(f"param/{i}."))
        state = sum(a.size for k, a in arrays.items() if k.startswith(f"state/{i}."))
        if name == "Dense":
            details = f"{n}x{layer.n_out} + bias, {layer.act}"
            n = layer.n_out
        else:
            details = ", ".join(f"{k}={v}" for k, v in layer.config().items())
        rows.append({"index": i, "layer": name, "details": details, "output": (None, n),
                     "params": params, "state": state})  # fmt: skip
    return rows


def summary(model: MLP, prep=None) -> str:
    """A Keras-style text table: layers, output shapes ``(N, width)``, parameter counts and totals."""
    rows = layer_table(model)
    head = (
        f"MLP {model.config()['spec']}: loss {model.loss.name}, {model.dtype.name}, backend {model.be.name}"
    )
    lines = [head, f"input: (N, {model.n_features})" + (f", preprocessing {prep.scale}" if prep else "")]
    lines.append(f"{'#':>3}  {'layer':<10} {'output':<12} {'params':>10}  details")
    for r in rows:
        shape = f"(N, {r['output'][1]})"
        lines.append(f"{r['index']:>3}  {r['layer']:<10} {shape:<12} {r['params']:>10,}  {r['details']}")
    trainable, state = sum(r["params"] for r in rows), sum(r["state"] for r in rows)
    size = (trainable + state) * model.dtype.itemsize
    lines.append(f"total parameters: {trainable + state:,} (trainable {trainable:,}, running statistics "
                 f"{state:,}), {size / 2**20:.2f} MiB as {model.dtype.name}")  # fmt: skip
    return "\n".join(lines)


# ------------------------------------------------------------ preprocessing
def prep_affine(prep, n_features: int) -> tuple[np.ndarray, np.ndarray]:
    """(scale, shift), each (n_features,) float64, with ``prep.apply(x) == x * scale + shift``.
    Found by applying ``prep`` to 0 and 1; a non-affine preprocessing is an error."""
    if prep is None:
        return np.ones(n_features), np.zeros(n_features)
    probe = prep.apply(np.array([[0.0] * n_features, [1.0] * n_features, [255.0] * n_features]), np.float64)
    shift, scale = probe[0], probe[1] - probe[0]
    if not np.allclose(probe[2], 255.0 * scale + shift, rtol=1e-9, atol=1e-9):
        raise ValueError(f"preprocessing {prep.scale!r} is not elementwise affine; it cannot be exported")
    return scale, shift


# ---------------------------------------------------------------------- ONNX
def _onnx_gelu(node, const, x: str, name: str) -> str:
    """x (1 + erf(x / sqrt 2)) / 2 from opset-13 ops (ONNX's own Gelu needs opset 20)."""
    scaled = node("Mul", [x, const(f"{name}.inv_sqrt2", 1 / np.sqrt(2.0))], f"{name}.scaled")
    return _onnx_half_x_one_plus(node, const, x, node("Erf", [scaled], f"{name}.erf"), name)


def _onnx_gelu_tanh(node, const, x: str, name: str) -> str:
    """x (1 + tanh(sqrt(2/pi) (x + A x^3))) / 2, as torch's GELU(approximate="tanh")."""
    cube = node("Mul", [x, node("Mul", [x, x], f"{name}.sq")], f"{name}.cube")
    a_cube = node("Mul", [cube, const(f"{name}.a", GELU_TANH_A)], f"{name}.a_cube")
    inner = node("Add", [x, a_cube], f"{name}.inner")
    u = node("Mul", [inner, const(f"{name}.k", SQRT_2_OVER_PI)], f"{name}.u")
    return _onnx_half_x_one_plus(node, const, x, node("Tanh", [u], f"{name}.tanh"), name)


def _onnx_half_x_one_plus(node, const, x: str, t: str, name: str) -> str:
    """x / 2 * (1 + t), the node ``name``."""
    half_x = node("Mul", [x, const(f"{name}.half", 0.5)], f"{name}.half_x")
    return node("Mul", [half_x, node("Add", [t, const(f"{name}.one", 1.0)], f"{name}.one_plus")], name)


# activation -> builder(node, const, x, name) of its ONNX nodes (opset 17) after x
ONNX_ACTIVATIONS = {
    "identity": lambda node, const, x, name: x,
    "relu": lambda node, const, x, name: node("Relu", [x], name),
    "sigmoid": lambda node, const, x, name: node("Sigmoid", [x], name),
    "tanh": lambda node, const, x, name: node("Tanh", [x], name),
    "leaky_relu": lambda node, const, x, name: node("LeakyRelu", [x], name, alpha=LEAKY_SLOPE),
    "gelu": _onnx_gelu,
    "gelu_tanh": _onnx_gelu_tanh,
    "silu": lambda node, const, x, name: node("Mul", [x, node("Sigmoid", [x], f"{name}.sigmoid")], name),
    "softplus": lambda node, const, x, name: node("Softplus", [x], name),
}


def to_onnx(model: MLP, prep=None):
    """-> ``onnx.ModelProto`` (float32, opset 17): input ``input`` (N, n_features) as the model's
    preprocessing expects it (raw pixels for a CLI model), outputs ``probabilities`` (N, K) float32
    and ``label`` (N,) int64 class indices."""
    onnx, helper = _import_onnx()
    arrays = model.state_arrays()
    inits, nodes = [], []

    def const(name: str, value) -> str:
        inits.append(helper.make_tensor(name, onnx.TensorProto.FLOAT, np.shape(value),
                                        np.asarray(value, np.float32).ravel().tolist()))  # fmt: skip
        return name

    def node(op: str, inputs: list[str], name: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    x = "input"
    if prep is not None:
        scale, shift = prep_affine(prep, model.n_features)
        x = node("Mul", [x, const("prep.scale", scale)], "prep.scaled")
        x = node("Add", [x, const("prep.shift", shift)], "prep.out")
    for i, layer in enumerate(model.layers):
        kind, p = type(layer).__name__, (lambda name, i=i: arrays[f"param/{i}.{name}"])
        if kind == "Dense":
            x = node("Gemm", [x, const(f"{i}.W", p("W")), const(f"{i}.b", p("b"))], f"{i}.dense")
            x = ONNX_ACTIVATIONS[layer.act](node, const, x, f"{i}.{layer.act}")
        elif kind == "Activation":
            x = ONNX_ACTIVATIONS[layer.act](node, const, x, f"{i}.{layer.act}")
        elif kind == "BatchNorm":
            stats = [const(f"{i}.{s}", arrays[f"state/{i}.{s}"]) for s in ("running_mean", "running_var")]
            bn_in = [x, const(f"{i}.gamma", p("gamma")), const(f"{i}.beta", p("beta")), *stats]
            x = node("BatchNormalization", bn_in, f"{i}.batchnorm", epsilon=layer.eps)
        elif kind != "Dropout":  # dropout is the identity at inference
            raise ValueError(f"layer {kind} has no ONNX export")
    out_op = {"softmax_xent": "Softmax", "logistic": "Sigmoid"}.get(model.loss.name, "Identity")
    nodes.append(helper.make_node(out_op, [x], ["probabilities"], name="probabilities"))
    nodes.append(helper.make_node("ArgMax", [x], ["label"], name="label", axis=1, keepdims=0))
    graph = helper.make_graph(
        nodes, f"gpumlp_{model.config()['spec']}", [_onnx_io(helper, onnx, "input", model.n_features)],
        [_onnx_io(helper, onnx, "probabilities", model.n_classes),
         helper.make_tensor_value_info("label", onnx.TensorProto.INT64, ["N"])],
        initializer=inits,
    )  # fmt: skip
    proto = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)], producer_name="gpumlp"
    )
    proto.ir_version = ONNX_IR_VERSION
    onnx.checker.check_model(proto, full_check=True)
    return proto


def _onnx_io(helper, onnx, name: str, width: int):
    return helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, ["N", width])


def _import_onnx():
    try:
        import onnx
        from onnx import helper
    except ImportError:
        raise ImportError("ONNX export needs the onnx package: pip install 'gpumlp[onnx]'") from None
    return onnx, helper


def save_onnx(model: MLP, prep, path: str | os.PathLike) -> None:
    """Write :func:`to_onnx` to ``path`` (.onnx)."""
    onnx, _ = _import_onnx()
    onnx.save(to_onnx(model, prep), os.fspath(path))


# ------------------------------------------------------------------- PyTorch
# activation -> (torch.nn module name, kwargs); the bench's torch peer uses it too
TORCH_ACTIVATIONS = {
    "identity": ("Identity", {}), "relu": ("ReLU", {}), "sigmoid": ("Sigmoid", {}), "tanh": ("Tanh", {}),
    "leaky_relu": ("LeakyReLU", {"negative_slope": LEAKY_SLOPE}), "gelu": ("GELU", {"approximate": "none"}),
    "gelu_tanh": ("GELU", {"approximate": "tanh"}), "silu": ("SiLU", {}), "softplus": ("Softplus", {}),
}  # fmt: skip


def torch_export(model: MLP, prep=None) -> tuple[list, dict[str, np.ndarray]]:
    """-> (spec, state_dict): ``spec`` is a JSON-able list of ``[torch.nn class name, kwargs]``
    whose ``nn.Sequential`` (see :func:`build_torch`) maps the model's raw inputs to its
    probabilities; ``state_dict`` holds its NumPy arrays under the Sequential's keys, with the
    preprocessing folded into the first Linear layer."""
    arrays, dt = model.state_arrays(), model.dtype
    spec, state, n = [], {}, model.n_features
    scale, shift = prep_affine(prep, n)
    for i, layer in enumerate(model.layers):
        kind, j = type(layer).__name__, len(spec)
        if kind == "Dense":
            W, b = arrays[f"param/{i}.W"].astype(np.float64), arrays[f"param/{i}.b"].astype(np.float64)
            if i == 0:  # (x * scale + shift) @ W + b == x @ (scale[:, None] * W) + (shift @ W + b)
                W, b = scale[:, None] * W, shift @ W + b
            spec.append(["Linear", {"in_features": n, "out_features": layer.n_out}])
            state.update({f"{j}.weight": W.T.astype(dt), f"{j}.bias": b.astype(dt)})
            n = layer.n_out
            if layer.act != "identity":
                spec.append(list(TORCH_ACTIVATIONS[layer.act]))
        elif kind == "Activation":
            spec.append(list(TORCH_ACTIVATIONS[layer.act]))
        elif kind == "BatchNorm":  # ours weights the old running value by momentum, PyTorch the new one
            spec.append(
                ["BatchNorm1d", {"num_features": n, "eps": layer.eps, "momentum": 1 - layer.momentum}]
            )
            state.update({f"{j}.weight": arrays[f"param/{i}.gamma"], f"{j}.bias": arrays[f"param/{i}.beta"],
                          f"{j}.running_mean": arrays[f"state/{i}.running_mean"],
                          f"{j}.running_var": arrays[f"state/{i}.running_var"],
                          f"{j}.num_batches_tracked": np.array(0, dtype=np.int64)})  # fmt: skip
        elif kind == "Dropout":
            spec.append(["Dropout", {"p": layer.p}])
        else:
            raise ValueError(f"layer {kind} has no PyTorch export")
    spec.append({"softmax_xent": ["Softmax", {"dim": 1}], "logistic": ["Sigmoid", {}]}.get(
        model.loss.name, ["Identity", {}]))  # fmt: skip
    return spec, state


def build_torch(spec: list, state_dict=None):
    """``nn.Sequential`` from a :func:`torch_export` spec, in eval mode, with ``state_dict``
    (tensors or NumPy arrays) loaded when given."""
    torch = _import_torch()
    net = torch.nn.Sequential(*(getattr(torch.nn, name)(**kwargs) for name, kwargs in spec))
    if state_dict is not None:
        tensors = {k: torch.as_tensor(np.asarray(v)) for k, v in state_dict.items()}
        net = net.to(next(iter(tensors.values())).dtype)
        net.load_state_dict(tensors, strict=True)
    return net.eval()


def save_torch(model: MLP, prep, path: str | os.PathLike) -> None:
    """Write ``{"format", "spec", "state_dict"}`` with ``torch.save`` (loadable with weights_only=True)."""
    torch = _import_torch()
    spec, state = torch_export(model, prep)
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}
    torch.save({"format": TORCH_FORMAT, "spec": spec, "state_dict": tensors}, os.fspath(path))


def load_torch(path: str | os.PathLike):
    """The ``nn.Sequential`` (eval mode) saved by :func:`save_torch`."""
    torch = _import_torch()
    saved = torch.load(os.fspath(path), weights_only=True)
    if not isinstance(saved, dict) or saved.get("format") != TORCH_FORMAT:
        raise ValueError(f"{path} is not a gpumlp PyTorch export (format {TORCH_FORMAT})")
    return build_torch(saved["spec"], saved["state_dict"])


def _import_torch():
    try:
        import torch
    except ImportError:
        raise ImportError("PyTorch export needs torch: pip install 'gpumlp[peer]'") from None
    return torch


EXPORTERS = {"onnx": save_onnx, "torch": save_torch}
