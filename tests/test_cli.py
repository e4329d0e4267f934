"""The ``gpumlp`` command line, end to end: real subprocesses on the shipped MNIST files.

Every run uses the numpy backend (no JIT warm-up) and tiny models on a slice of the
data so that the whole file stays well under a minute on two cores.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

TINY = ["--limit", "2000", "--spec", "784-32-10", "--optimizer", "adam", "--lr", "0.003"]
TINY += ["--schedule", "constant", "--no-progress"]


def gpumlp(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run ``python -m gpumlp ARGS`` -> completed process (text stdout/stderr)."""
    env = {**os.environ, "GPUMLP_BACKEND": "numpy"}
    cmd = [sys.executable, "-m", "gpumlp", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny 2-epoch training run with --out; its directory and process."""
    out = tmp_path_factory.mktemp("run") / "out"
    proc = gpumlp("train", *TINY, "--epochs", "2", "--out", out)
    assert proc.returncode == 0, proc.stderr
    return out, proc


def test_train_writes_outputs(trained):
    out, proc = trained
    for name in ("model.npz", "checkpoint.npz", "history.json", "metrics.json", "config.json"):
        assert (out / name).is_file(), name
    history = json.loads((out / "history.json").read_text())
    assert [r["epoch"] for r in history["records"]] == [1, 2]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test_accuracy"] > 0.5
    assert metrics["backend"] == "numpy" and metrics["seconds"] > 0
    cm = np.array(metrics["confusion_matrix"])
    assert cm.shape == (10, 10) and cm.sum() == 10000
    assert np.trace(cm) / 10000 == pytest.approx(metrics["test_accuracy"])
    assert len(metrics["f1"]) == 10 and metrics["config"]["model"]["spec"] == "784-32-10"
    assert f"test accuracy: {100 * metrics['test_accuracy']:.2f}%" in proc.stdout
    assert "backend: numpy" in proc.stdout and "total seconds:" in proc.stdout
    assert "epoch 2/2" in proc.stderr  # per-epoch progress lines


def test_resume_continues(trained, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(trained[0], out)
    proc = gpumlp("train", "--out", out, "--resume", "--epochs", "3", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    records = json.loads((out / "history.json").read_text())["records"]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    first = json.loads((trained[0] / "history.json").read_text())["records"]
    assert records[:2] == first  # the first two epochs are the saved ones, not retrained
    assert "epoch 3/3" in proc.stderr and "epoch 1/3" not in proc.stderr


def test_eval(trained):
    out, _ = trained
    proc = gpumlp("eval", out / "model.npz")
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert f"test accuracy: {100 * metrics['test_accuracy']:.2f}%" in proc.stdout
    assert "precision" in proc.stdout and "macro avg" in proc.stdout


def test_predict_npz_matches_model(trained, tmp_path):
    from gpumlp.data import load_mnist
    from gpumlp.model import MLP
    from gpumlp.presets import Prep

    out, _ = trained
    x = load_mnist().x_test[:5]
    np.savez(tmp_path / "five.npz", x=x)
    proc = gpumlp("predict", out / "model.npz", tmp_path / "five.npz")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.split()
    model_path = out / "model.npz"
    model = MLP.load(model_path, backend="numpy")
    expected = model.predict(Prep.from_file(model_path).apply(x))
    assert [int(c) for c in lines] == expected.tolist()
    proba = gpumlp("predict", model_path, tmp_path / "five.npz", "--proba")
    rows = [line.split() for line in proba.stdout.splitlines()]
    assert len(rows) == 5 and all(len(r) == 11 for r in rows)
    assert [int(r[0]) for r in rows] == expected.tolist()
    assert all(abs(sum(map(float, r[1:])) - 1) < 1e-2 for r in rows)


def _count_reads(monkeypatch, name: str) -> list:
    """Every path named ``name`` that checkpoint.read or Path.read_text reads from now on (real reads)."""
    from pathlib import Path

    from gpumlp import checkpoint

    seen = []
    real_read, real_text = checkpoint.read, Path.read_text

    def read(path, *a, **kw):
        seen.extend([path] * (Path(path).name == name))
        return real_read(path, *a, **kw)

    def read_text(self, *a, **kw):
        seen.extend([self] * (self.name == name))
        return real_text(self, *a, **kw)

    monkeypatch.setattr(checkpoint, "read", read)
    monkeypatch.setattr(Path, "read_text", read_text)
    return seen


@pytest.mark.parametrize("command", ["eval", "predict"])
def test_eval_and_predict_read_the_model_file_once(trained, tmp_path, monkeypatch, capsys, command):
    """One read and checksum of model.npz gives the model, its preprocessing and its classes."""
    from gpumlp.cli import main
    from gpumlp.data import load_mnist

    out, _ = trained
    np.savez(tmp_path / "five.npz", x=load_mnist().x_test[:5])
    seen = _count_reads(monkeypatch, "model.npz")
    more = [str(tmp_path / "five.npz")] if command == "predict" else []
    assert main([command, str(out / "model.npz"), *more, "--backend", "numpy"]) == 0
    assert len(seen) == 1
    printed = capsys.readouterr().out
    assert len(printed.split()) == 5 if command == "predict" else "test accuracy:" in printed


@pytest.mark.parametrize("name", ["config.json", "checkpoint.npz"])
def test_resume_reads_config_and_checkpoint_once(trained, tmp_path, monkeypatch, name):
    """The checkpoint is checked before config.json is rewritten and that same read is what fit loads."""
    from gpumlp.cli import main

    out = tmp_path / "copy"
    shutil.copytree(trained[0], out)
    seen = _count_reads(monkeypatch, name)
    flags = ["--resume", "--epochs", "3", "--backend", "numpy", "--no-progress"]
    assert main(["train", "--out", str(out), *flags]) == 0
    assert len(seen) == 1


def test_info():
    proc = gpumlp("info")
    assert proc.returncode == 0, proc.stderr
    assert "gpumlp 0." in proc.stdout
    assert any(line.strip().startswith("numpy: available") for line in proc.stdout.splitlines())
    assert "auto picks:" in proc.stdout and "BLAS:" in proc.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--lr", "-1"], "--lr"),
        (["train", "--act", "swish"], "invalid choice: 'swish'"),
        (["train", "--spec", "784-abc-10"], "bad layer spec"),
        (["train", "--backend", "nope"], "unknown backend 'nope'"),
        (["train", "--backend", "numpy", "--precision", "tf32"], "needs a CUDA backend"),
        (["train", "--precision", "fp8"], "invalid choice: 'fp8'"),
        (["train", "--data-dir", "/nonexistent/mnist"], "does not exist"),
        (["train", "--resume"], "--resume needs --out"),
        (["train", "--lr-gamma", "3"], "gamma"),
        (["eval", "/nonexistent/model.npz"], "does not exist"),
        (["eval", "CORRUPT"], "corrupt"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_flags_exit_2(args, message, tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04 this is not a zip file")
    proc = gpumlp(*[str(bad) if a == "CORRUPT" else a for a in args])
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpumlp: error:"), proc.stderr
    assert message in lines[0]


def test_divergence_exits_3():
    args = ["--limit", "500", "--spec", "784-16-10", "--valid", "0", "--no-progress"]
    proc = gpumlp(
        "train", *args, "--act", "identity", "--optimizer", "sgd", "--reduction", "sum", "--lr", "1e20"
    )
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("gpumlp: error:")]
    assert len(errors) == 1 and "diverged" in errors[0]


def test_predict_png(trained, tmp_path):
    plt = pytest.importorskip("matplotlib.pyplot")
    from gpumlp.data import load_mnist

    out, _ = trained
    x = load_mnist().x_test[:5]
    np.savez(tmp_path / "five.npz", x=x)
    png = tmp_path / "digit.png"
    plt.imsave(png, x[0].reshape(28, 28), cmap="gray", vmin=0, vmax=255)  # RGBA PNG
    from_png = gpumlp("predict", out / "model.npz", png)
    from_npz = gpumlp("predict", out / "model.npz", tmp_path / "five.npz")
    assert from_png.returncode == 0, from_png.stderr
    assert from_png.stdout.split() == from_npz.stdout.split()[:1]


def test_negative_looking_scale_value_is_glued():
    from gpumlp.cli import build_parser, glue_negative_values

    argv = glue_negative_values(["train", "--scale", "-1,1", "--lr", "0.1"])
    assert argv == ["train", "--scale=-1,1", "--lr", "0.1"]
    assert build_parser().parse_args(argv).scale == "-1,1"


def test_tf32_training_on_the_emulated_device():
    """--precision tf32 on cuda-emu: tensor-core rounding emulated, training still learns."""
    args = ["--limit", "500", "--spec", "784-16-10", "--valid", "0", "--no-progress", "--epochs", "2"]
    proc = gpumlp("train", *args, "--backend", "cuda-emu", "--precision", "tf32", timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_train_with_rotation_scaling_and_elastic_augmentation(tmp_path):
    out = tmp_path / "aug"
    aug = ["--augment-rotate", "10", "--augment-scale", "0.1", "--augment-elastic", "20"]
    proc = gpumlp("train", *TINY, "--limit", "500", "--epochs", "1", *aug, "--out", out)
    assert proc.returncode == 0, proc.stderr
    fit = json.loads((out / "config.json").read_text())["fit"]
    assert (fit["augment_rotate"], fit["augment_scale"], fit["augment_elastic"]) == (10.0, 0.1, 20.0)
    assert fit["augment_elastic_sigma"] == 4.0  # the preset's default smoothing
    bad = gpumlp("train", *TINY, "--limit", "500", "--epochs", "1", "--augment-rotate", "270")
    assert bad.returncode != 0 and "rotate (degrees) must be a finite number in [0, 180]" in bad.stderr
