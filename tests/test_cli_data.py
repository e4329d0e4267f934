"""``gpumlp train | eval | predict`` on data sets other than MNIST, end to end in real subprocesses:
.npz, .csv with a named label column, IDX directories (Fashion-MNIST names; 8x8 images with 26
classes), ``--dataset fashion-mnist`` from a loopback mirror; and logs that a CI log can read."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_datasets import letters_dir, needs_fashion, serve_fashion, write_idx

QUICK = ["--epochs", "2", "--hidden", "32", "--batch-size", "32", "--schedule", "constant", "--lr", "0.01"]


def gpumlp(*args, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m gpumlp ARGS`` on the numpy backend with stderr piped (not a terminal)."""
    full_env = {**os.environ, "GPUMLP_BACKEND": "numpy", **(env or {})}
    cmd = [sys.executable, "-m", "gpumlp", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env)


def train_eval_predict(tmp_path: Path, data_args: list, predict_file: Path, env=None, extra=()) -> tuple:
    """Train with ``data_args``, then eval (data found again from the model) and predict.
    -> (metrics.json, predict's output lines, the train process)."""
    out = tmp_path / "run"
    tr = gpumlp("train", *data_args, *QUICK, *extra, "--out", out, env=env)
    assert tr.returncode == 0, tr.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    ev = gpumlp("eval", out / "model.npz", env=env)
    assert ev.returncode == 0, ev.stderr
    assert f"test accuracy: {100 * metrics['test_accuracy']:.2f}%" in ev.stdout  # the same held-out rows
    report_rows = [line.split()[0] for line in ev.stdout.splitlines()[3:-4] if line.strip()]
    classes = json.loads((out / "metrics.json").read_text())["config"]["model"]["spec"].split("-")[-1]
    assert len(report_rows) == int(classes)  # one row per class, named by its label
    pr = gpumlp("predict", out / "model.npz", predict_file, env=env)
    assert pr.returncode == 0, pr.stderr
    return metrics, pr.stdout.split(), tr


def blobs(n: int = 400, seed: int = 0):
    """Three well-separated Gaussian blobs in 4-D, labelled with strings."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    X = rng.normal(size=(n, 4)).astype(np.float32) + 4.0 * np.eye(3, 4)[y] * 3
    return X, np.array(["ant", "bee", "cat"])[y]


def test_npz_with_string_labels(tmp_path):
    X, y = blobs()
    np.savez(tmp_path / "blobs.npz", X=X, y=y)
    np.savez(tmp_path / "new.npz", x=X[:5])
    metrics, predicted, tr = train_eval_predict(
        tmp_path, ["--data", tmp_path / "blobs.npz"], tmp_path / "new.npz"
    )
    assert metrics["test_accuracy"] > 0.9 and metrics["config"]["model"]["spec"] == "4-32-3"
    assert metrics["config"]["data"]["scale"] == "standardize"  # features, not pixels
    assert sum(metrics["support"]) == 80  # --test-split 0.2 of 400 rows
    assert predicted == y[:5].tolist()  # the original labels, not class ids
    ev = gpumlp("eval", tmp_path / "run" / "model.npz")
    assert [line.split()[0] for line in ev.stdout.splitlines()[3:6]] == ["ant", "bee", "cat"]


def test_csv_with_a_named_label_column(tmp_path):
    X, y = blobs(seed=1)
    rows = ["f1,f2,label,f3,f4"] + [f"{a},{b},{lab},{c},{d}" for (a, b, c, d), lab in zip(X, y)]
    (tmp_path / "blobs.csv").write_text("\n".join(rows) + "\n")
    data = ["--data", tmp_path / "blobs.csv", "--label-column", "label"]
    metrics, predicted, _ = train_eval_predict(tmp_path, data, tmp_path / "blobs.csv")
    assert metrics["test_accuracy"] > 0.9
    assert np.mean(np.array(predicted) == y) > 0.9  # the model remembers its label column
    (tmp_path / "features.csv").write_text("\n".join(",".join(map(str, r)) for r in X[:4]) + "\n")
    pr = gpumlp("predict", tmp_path / "run" / "model.npz", tmp_path / "features.csv")
    assert pr.stdout.split() == predicted[:4]


def test_data_dir_with_fashion_mnist_named_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    d = tmp_path / "fashion"
    d.mkdir()
    for split, n in (("train", 600), ("t10k", 100)):
        y = (np.arange(n) % 10).astype(np.uint8)
        x = rng.integers(0, 60, (n, 28, 28), dtype=np.uint8)
        x[np.arange(n), 2 * y, 5:20] = 250  # a class-specific bright row
        write_idx(d / f"{split}-images-idx3-ubyte.gz", x)
        write_idx(d / f"{split}-labels-idx1-ubyte.gz", y)
    write_idx(tmp_path / "some.idx", x[:3])
    metrics, predicted, _ = train_eval_predict(tmp_path, ["--data-dir", d], tmp_path / "some.idx")
    assert metrics["test_accuracy"] > 0.8 and sum(metrics["support"]) == 100  # the directory's own test split
    assert sum(p == t for p, t in zip(predicted, ["0", "1", "2"])) >= 2  # the last 3 test images


def test_8x8_images_with_26_classes(tmp_path):
    d = letters_dir(tmp_path / "letters")
    np.savez(tmp_path / "few.npz", x=np.zeros((2, 8, 8), np.uint8))
    metrics, predicted, _ = train_eval_predict(
        tmp_path, ["--data", d], tmp_path / "few.npz", extra=["--epochs", "8"]
    )
    assert metrics["config"]["model"]["spec"] == "64-32-26" and len(metrics["f1"]) == 26
    assert metrics["test_accuracy"] > 0.3  # chance is 1/26
    assert all(1 <= int(c) <= 26 for c in predicted) and len(predicted) == 2  # labels 1..26 as in the files


@pytest.fixture(scope="module")
def fashion_url(tmp_path_factory):
    yield from serve_fashion(tmp_path_factory)


@needs_fashion
def test_dataset_fashion_mnist_from_a_loopback_mirror(tmp_path, fashion_url):
    env = {
        "GPUMLP_CACHE": str(tmp_path / "cache"),
        "GPUMLP_FASHION_MNIST_MIRRORS": f"{fashion_url}/good/",
    }
    write_idx(tmp_path / "x.idx", np.zeros((3, 28, 28), np.uint8))
    data = ["--dataset", "fashion-mnist", "--limit", "3000"]
    metrics, predicted, tr = train_eval_predict(
        tmp_path, data, tmp_path / "x.idx", env=env, extra=["--valid", "500"]
    )
    assert metrics["test_accuracy"] > 0.6 and sum(metrics["support"]) == 10000
    assert (tmp_path / "cache" / "fashion-mnist" / "train-images-idx3-ubyte.gz").is_file()
    assert "downloading http://127.0.0.1" in tr.stderr and len(predicted) == 3


# ---------------------------------------------------------------- flags and logs
def test_piped_log_has_no_carriage_returns_and_one_line_per_epoch(tmp_path):
    X, y = blobs()
    np.savez(tmp_path / "b.npz", X=X, y=y)
    proc = gpumlp(
        "train", "--data", tmp_path / "b.npz", "--epochs", "3", "--hidden", "8", "--optimizer", "sgd"
    )
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr and "\r" not in proc.stdout
    epochs = [line for line in proc.stderr.splitlines() if line.startswith("epoch ")]
    assert [e.split(" | ")[0] for e in epochs] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"]
    hyper = [line for line in proc.stderr.splitlines() if "hyper-parameters:" in line]
    assert len(hyper) == 1 and "optimizer sgd, lr 0.1," in hyper[0]  # SGD's usual rate, not Adam's 1e-3
    assert all(line.startswith(("gpumlp: ", "epoch ")) for line in proc.stderr.splitlines()), proc.stderr
    quiet = gpumlp("train", "--data", tmp_path / "b.npz", "--epochs", "2", "--hidden", "8", "--quiet")
    assert quiet.returncode == 0 and quiet.stderr == "" and "test accuracy" in quiet.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dat", "x.npz"], "unrecognized arguments: --dat"),  # no abbreviation of --data-dir
        (["--data", "MISSING"], "does not exist"),
        (
            ["--data", "BLOBS", "--spec", "4-100"],
            "--spec 4-100 does not match the data: it has 4 features and 3",
        ),
        (["--data", "BLOBS", "--dataset", "kmnist"], "--data and --dataset both name a data set"),
        (["--data", "BLOBS", "--hidden", "8,x"], "is not a comma-separated list of widths"),
        (["--data", "BLOBS", "--test-split", "1.5"], "must be a fraction in (0, 1)"),
    ],
)
def test_data_flag_errors_are_one_line(tmp_path, args, message):
    X, y = blobs(60)
    np.savez(tmp_path / "b.npz", X=X, y=y)
    subst = {"BLOBS": tmp_path / "b.npz", "MISSING": tmp_path / "missing.npz"}
    proc = gpumlp("train", *[subst.get(a, a) for a in args])
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpumlp: error:") and message in lines[0], proc.stderr


def test_preset_learning_rate_unchanged_without_a_new_optimizer():
    from gpumlp.cli import build_parser, resolve_config

    for argv, lr in (
        (["train"], 1e-3),
        (["train", "--optimizer", "adam"], 1e-3),
        (["train", "--preset", "seed"], 5e-4),
    ):
        assert resolve_config(build_parser().parse_args(argv))["fit"]["lr"] == lr
    seed_sgd = resolve_config(
        build_parser().parse_args(["train", "--preset", "seed", "--optimizer", "momentum"])
    )
    assert seed_sgd["fit"]["lr"] == pytest.approx(0.01 / 100)  # per sample: the seed preset sums over 100
    own = resolve_config(build_parser().parse_args(["train", "--optimizer", "sgd", "--lr", "0.3"]))
    assert own["fit"]["lr"] == 0.3


def test_plots_in_a_fresh_home_log_no_font_cache_chatter(tmp_path):
    """matplotlib builds its font cache under our cache dir, silently; no third-party lines leak."""
    pytest.importorskip("matplotlib")
    X, y = blobs()
    np.savez(tmp_path / "b.npz", X=X, y=y)
    env = {"HOME": str(tmp_path / "home"), "GPUMLP_CACHE": str(tmp_path / "cache"), "MPLCONFIGDIR": ""}
    args = [
        "--data",
        tmp_path / "b.npz",
        "--epochs",
        "1",
        "--hidden",
        "8",
        "--out",
        tmp_path / "run",
        "--plots",
    ]
    proc = gpumlp("train", *args, env=env)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "run" / "history.png").is_file() and (tmp_path / "cache" / "matplotlib").is_dir()
    assert all(line.startswith(("gpumlp: ", "epoch ")) for line in proc.stderr.splitlines()), proc.stderr
    assert "atplotlib" not in proc.stderr and "font" not in proc.stderr


def test_warnings_print_as_one_line_without_a_source_path(capsys, monkeypatch):
    import warnings

    from gpumlp import logs

    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # restored after the test
    logs.setup(logs.NORMAL)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("overflow encountered\n in exp", RuntimeWarning, stacklevel=1)
    assert capsys.readouterr().err == "gpumlp: warning: RuntimeWarning: overflow encountered in exp\n"
