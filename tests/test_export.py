"""Export: ONNX checked with onnxruntime, PyTorch state_dict + module spec, and the summary.

One small model is trained by the real CLI (standardized inputs, batch norm, dropout) on
a slice of MNIST; the exports must reproduce its predictions on 1,000 MNIST test images."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from gpumlp import MLP
from gpumlp.export import summary, to_onnx, torch_export
from gpumlp.presets import Prep

N_TEST = 1000


def gpumlp(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "GPUMLP_BACKEND": "numpy"}
    cmd = [sys.executable, "-m", "gpumlp", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(model file, model, prep, 1,000 raw MNIST test images, their labels) of a 2-epoch CLI run."""
    from gpumlp.data import load_mnist

    out = tmp_path_factory.mktemp("export") / "run"
    args = ["--limit", "3000", "--spec", "784-64-32-10", "--batchnorm", "--dropout", "0.1", "--epochs", "2"]
    proc = gpumlp("train", *args, "--scale", "standardize", "--valid", "500", "--no-progress", "--out", out)
    assert proc.returncode == 0, proc.stderr
    path = out / "model.npz"
    mnist = load_mnist()
    return (
        path,
        MLP.load(path, backend="numpy"),
        Prep.from_file(path),
        mnist.x_test[:N_TEST],
        mnist.y_test[:N_TEST],
    )


def gpumlp_outputs(model, prep, x):
    """(probabilities, predicted classes) of gpumlp itself on raw inputs."""
    inputs = prep.apply(x, model.dtype) if prep else x.astype(model.dtype)
    return model.predict_proba(inputs), model.predict(inputs)


def test_onnx_cli_export_matches_gpumlp_on_1000_mnist_images(trained, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    path, model, prep, x, y = trained
    proc = gpumlp("export", path, tmp_path / "m.onnx", "--format", "onnx")
    assert proc.returncode == 0, proc.stderr
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    proba, label = sess.run(["probabilities", "label"], {"input": x.astype(np.float32)})
    ref_proba, ref_label = gpumlp_outputs(model, prep, x)
    assert proba.dtype == np.float32 and proba.shape == (N_TEST, 10)
    np.testing.assert_array_equal(label, ref_label)
    np.testing.assert_allclose(proba, ref_proba, rtol=0, atol=1e-5)
    assert (label == y).mean() > 0.6  # a trained model (chance: 0.1)
    import onnx

    ops = [n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node]
    hidden = ["Gemm", "BatchNormalization", "Relu"]
    assert ops == ["Mul", "Add", *hidden, *hidden, "Gemm", "Softmax", "ArgMax"]  # no Dropout


@pytest.mark.parametrize(
    "act, loss, batchnorm, dtype",
    [
        ("sigmoid", "logistic", False, "float32"),
        ("tanh", "mse", False, "float64"),  # exported as float32
        ("leaky_relu", "softmax_xent", True, "float32"),
    ],
)
def test_onnx_every_activation_and_cost(act, loss, batchnorm, dtype):
    """Random models (no prep) of every hidden activation and cost agree with onnxruntime."""
    ort = pytest.importorskip("onnxruntime")
    model = MLP("20-16-12-5", act=act, loss=loss, batchnorm=batchnorm, dtype=dtype, backend="numpy", seed=3)
    x = np.random.default_rng(1).normal(size=(64, 20)).astype(np.float32)
    if batchnorm:  # move the running statistics off their initial 0/1
        model.fit(x, np.arange(64) % 5, epochs=2, batch_size=16, optimizer="adam", lr=1e-2)
    sess = ort.InferenceSession(to_onnx(model).SerializeToString(), providers=["CPUExecutionProvider"])
    proba, label = sess.run(None, {"input": x})
    ref_proba, ref_label = gpumlp_outputs(model, None, x)
    np.testing.assert_array_equal(label, ref_label)
    np.testing.assert_allclose(proba, ref_proba, rtol=0, atol=1e-5)


@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "silu", "softplus"])
def test_onnx_and_torch_exports_of_the_newer_activations(act):
    """GELU (exact: Erf; tanh form: Tanh) and SiLU built from opset-17 ops, softplus as ONNX Softplus,
    and torch's GELU/SiLU/Softplus modules: both reproduce gpumlp's probabilities, also where the
    pre-activations reach the tails (inputs times 4)."""
    ort = pytest.importorskip("onnxruntime")
    torch = pytest.importorskip("torch")
    from gpumlp.export import build_torch

    model = MLP("20-16-12-5", act=act, batchnorm=act == "silu", backend="numpy", seed=3)
    x = 4 * np.random.default_rng(1).normal(size=(64, 20)).astype(np.float32)
    sess = ort.InferenceSession(to_onnx(model).SerializeToString(), providers=["CPUExecutionProvider"])
    proba, label = sess.run(None, {"input": x})
    ref_proba, ref_label = gpumlp_outputs(model, None, x)
    np.testing.assert_array_equal(label, ref_label)
    np.testing.assert_allclose(proba, ref_proba, rtol=0, atol=1e-5)
    with torch.no_grad():
        torch_proba = build_torch(*torch_export(model))(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(torch_proba, ref_proba, rtol=0, atol=1e-5)


def test_every_activation_has_an_onnx_and_a_torch_export():
    from gpumlp.export import ONNX_ACTIVATIONS, TORCH_ACTIVATIONS
    from gpumlp.kernels.activations import ACTIVATIONS

    assert set(ONNX_ACTIVATIONS) == set(TORCH_ACTIVATIONS) == set(ACTIVATIONS)


def test_torch_cli_export_rebuilds_an_equal_sequential(trained, tmp_path):
    torch = pytest.importorskip("torch")
    from gpumlp.export import load_torch

    path, model, prep, x, _ = trained
    proc = gpumlp("export", path, tmp_path / "m.pt", "--format", "torch")
    assert proc.returncode == 0, proc.stderr
    net = load_torch(tmp_path / "m.pt")
    assert isinstance(net, torch.nn.Sequential) and not net.training
    names = [type(m).__name__ for m in net]
    assert names == ["Linear", "BatchNorm1d", "ReLU", "Dropout"] * 2 + ["Linear", "Softmax"]
    spec, state = torch_export(model, prep)
    saved = net.state_dict()
    assert set(saved) == set(state)
    for key, value in state.items():
        np.testing.assert_array_equal(saved[key].numpy(), value)
    with torch.no_grad():
        proba = net(torch.from_numpy(x.astype(np.float32))).numpy()
    ref_proba, ref_label = gpumlp_outputs(model, prep, x)
    # the preprocessing is folded into the first Linear: the same math, rounded differently
    np.testing.assert_allclose(proba, ref_proba, rtol=0, atol=1e-5)
    assert (proba.argmax(axis=1) == ref_label).mean() >= 0.998


def test_summary_counts_parameters(trained):
    _, model, prep, _, _ = trained
    text = summary(model, prep)
    # 784*64+64, 2*64 (BN), 64*32+32, 2*32 (BN), 32*10+10 trainable; 2*64 + 2*32 running statistics
    trainable = 784 * 64 + 64 + 128 + 64 * 32 + 32 + 64 + 32 * 10 + 10
    assert f"trainable {trainable:,}" in text and f"running statistics {2 * 64 + 2 * 32:,}" in text
    assert "preprocessing standardize" in text and "(N, 784)" in text
    assert text.count("Dense") == 3 and text.count("BatchNorm") == 2 and "(N, 10)" in text
    assert model.summary().splitlines()[2:] == text.splitlines()[2:]


def test_cli_summary_and_bad_export(trained, tmp_path):
    path = trained[0]
    proc = gpumlp("summary", path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == summary(trained[1], trained[2])
    bad = gpumlp("export", path, tmp_path / "m.x", "--format", "tflite")
    assert bad.returncode == 2 and "invalid choice: 'tflite'" in bad.stderr
    missing = gpumlp("export", tmp_path / "none.npz", tmp_path / "m.onnx", "--format", "onnx")
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_export_without_onnx_says_how_to_install(trained, tmp_path):
    code = "import sys; sys.modules['onnx'] = None; from gpumlp.cli import main; sys.exit(main(sys.argv[1:]))"
    args = ["export", str(trained[0]), str(tmp_path / "m.onnx"), "--format", "onnx"]
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and not (tmp_path / "m.onnx").exists()
    assert (
        proc.stderr.strip() == "gpumlp: error: ONNX export needs the onnx package: pip install 'gpumlp[onnx]'"
    )
