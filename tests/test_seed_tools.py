"""The seed texts' demonstrations, end to end: the nonlinear-data experiment, the data grids,
the gradient-norm plot and the self-contained HTML run report (rendered in headless Chromium).
CLI runs are real subprocesses on the numpy backend with tiny models."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpumlp.experiment import VARIANTS, features, run_nonlinear

TINY = ["--limit", "1500", "--spec", "784-32-10", "--optimizer", "adam", "--lr", "0.003", "--no-progress"]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--enable-logging=stderr", "--v=0", "--hide-scrollbars",
]  # fmt: skip
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="headless Chromium not installed (Debian: apt-get install chromium; .ci/run does)",
)


def gpumlp(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``python -m gpumlp ARGS`` on the numpy backend -> completed process."""
    env = {**os.environ, "GPUMLP_BACKEND": "numpy"}
    cmd = [sys.executable, "-m", "gpumlp", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def _is_picture(png: Path, min_ink: float = 0.01) -> np.ndarray:
    """Read a PNG and check it is not blank: enough non-white pixels, not one flat colour."""
    import matplotlib.image as mpimg

    img = mpimg.imread(png)[..., :3]
    ink = float((img.mean(axis=2) < 0.9).mean())
    assert ink > min_ink and img.std() > 0.05, f"{png} looks blank (ink {ink:.4f}, std {img.std():.4f})"
    return img


# ------------------------------------------------------------------ nonlinear experiment
@pytest.mark.parametrize("dataset", ["circles", "xor"])
def test_linear_model_fails_where_a_hidden_nonlinearity_or_squared_features_succeed(dataset):
    result = run_nonlinear(dataset, n=300, epochs=120)
    acc = {v.name: v.test_acc for v in result.variants}
    assert list(acc) == list(VARIANTS)
    assert 0.35 < acc["linear"] < 0.65, acc  # near chance: no line separates the classes
    for name in ("sigmoid", "tanh", "relu", "squared"):
        assert acc[name] >= 0.97, (name, acc)
    losses = {v.name: v.losses for v in result.variants}
    assert losses["relu"][-1] < 0.1 * losses["relu"][0]  # converges; the linear model cannot
    assert losses["linear"][-1] > 0.5 * losses["linear"][0]


def test_squared_features_are_the_degree_two_monomials():
    X = np.array([[2.0, -3.0], [0.5, 1.0]])
    np.testing.assert_array_equal(features(X, "x2"), [[2, -3, 4, 9, -6], [0.5, 1, 0.25, 1, 0.5]])


def test_bad_experiment_arguments_are_clear_errors():
    with pytest.raises(
        ValueError, match="unknown dataset 'ring'; choose one of circles, xor, moons, spirals"
    ):
        run_nonlinear("ring")
    with pytest.raises(ValueError, match="unknown variant"):
        run_nonlinear("xor", variants=("cubic",))


def test_cli_experiment_prints_the_table_and_writes_the_figure(tmp_path):
    proc = gpumlp(
        "experiment", "nonlinear", "--dataset", "moons", "--n", "200", "--epochs", "60", "--out", tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line for line in proc.stdout.splitlines() if line.split()[:1]}
    assert set(VARIANTS) <= set(rows)
    saved = json.loads((tmp_path / "nonlinear_moons.json").read_text())
    for v in saved["variants"]:  # the printed table and the JSON agree
        assert f"{100 * v['test_acc']:.1f}%" in rows[v["name"]]
        assert len(v["losses"]) == 60
    _is_picture(tmp_path / "nonlinear_moons.png")


def test_cli_experiment_rejects_an_unknown_dataset(tmp_path):
    proc = gpumlp("experiment", "nonlinear", "--dataset", "ring", "--out", tmp_path)
    assert proc.returncode == 2 and "invalid choice: 'ring'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_clip_value_bounds_the_steps_and_stop_param_change_stops(tmp_path):
    """SGD with every gradient element clipped to 1e-7 and lr 0.1 moves no parameter by more
    than 1e-8 per step, plus float32 rounding (half an ulp, <= 3e-8 for |w| < 0.5): at most 8e-8
    over the 2 steps of an epoch, below --stop-param-change 1e-7, so training stops after one
    epoch; without the clip it runs all 3."""
    base = ["--limit", "256", "--batch-size", "128", "--spec", "784-16-10", "--optimizer", "sgd"]
    base += ["--lr", "0.1", "--schedule", "constant", "--epochs", "3", "--valid", "100", "--no-progress"]
    runs = {}
    for clip in (["--clip-value", "1e-7"], []):
        out = tmp_path / f"clip{len(clip)}"
        proc = gpumlp("train", *base, *clip, "--stop-param-change", "1e-7", "--out", out)
        assert proc.returncode == 0, proc.stderr
        runs[bool(clip)] = (json.loads((out / "history.json").read_text()), proc.stdout)
    history, stdout = runs[True]
    assert len(history["records"]) == 1 and history["records"][0]["param_change"] <= 8e-8
    assert "stop: converged: no weight or bias changed by 1e-07 or more" in stdout
    assert len(runs[False][0]["records"]) == 3 and runs[False][0]["records"][0]["param_change"] > 1e-3


# ------------------------------------------------------------------ show-data
def test_show_data_writes_one_sample_per_class_and_variants(tmp_path):
    proc = gpumlp("show-data", "--digit", "3", "--n", "9", "--augment-shift", "2", "--out", tmp_path)
    assert proc.returncode == 0, proc.stderr
    _is_picture(tmp_path / "samples.png")
    _is_picture(tmp_path / "variants_3.png")
    assert "variants_3.png" in proc.stdout


def test_show_data_reads_the_data_dir_it_is_given(tmp_path):
    """--data-dir is honoured, not silently replaced by the default MNIST."""
    proc = gpumlp("show-data", "--data-dir", tmp_path / "nowhere", "--out", tmp_path)
    assert proc.returncode == 2 and "nowhere" in proc.stderr and "does not exist" in proc.stderr


def test_show_data_rejects_a_non_digit(tmp_path):
    proc = gpumlp("show-data", "--digit", "12", "--out", tmp_path)
    assert proc.returncode == 2 and "'12' is not a digit 0..9" in proc.stderr


# ------------------------------------------------------------------ run report
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny training run with gradient norms and plots, then its HTML report."""
    out = tmp_path_factory.mktemp("run") / "out"
    proc = gpumlp(
        "train", *TINY, "--epochs", "2", "--valid", "500", "--log-grad-norms", "--plots", "--out", out
    )
    assert proc.returncode == 0, proc.stderr
    proc = gpumlp("report", out)
    assert proc.returncode == 0, proc.stderr
    assert f"report: {out / 'report.html'}" in proc.stdout
    return out


def test_train_records_grad_norms_and_plots_them(run_dir):
    records = json.loads((run_dir / "history.json").read_text())["records"]
    for r in records:
        assert list(r["grad_norms"]) == ["dense1", "dense2"] and all(v > 0 for v in r["grad_norms"].values())
    _is_picture(run_dir / "grad_norms.png")
    assert json.loads((run_dir / "metrics.json").read_text())["machine"]["cores"] == os.cpu_count()


def test_report_is_one_self_contained_page(run_dir):
    page = (run_dir / "report.html").read_text()
    images = re.findall(r'<img [^>]*src="([^"]*)"', page)
    assert len(images) == 5  # curves, gradient norms, confusion matrix, misclassified, one per class
    assert all(src.startswith("data:image/png;base64,") for src in images)
    assert not re.search(r'(src|href)="(?!data:)', page)  # nothing to fetch
    assert "<script" not in page
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert f"{100 * metrics['test_accuracy']:.2f} %" in page
    for text in ("Per-class precision", "Hyper-parameters", "784-32-10", "Machine", "stop_param_change"):
        assert text in page, text


def test_report_of_a_missing_run_is_a_clear_error(tmp_path):
    proc = gpumlp("report", tmp_path / "nothing")
    assert proc.returncode == 2 and "run directory" in proc.stderr and "does not exist" in proc.stderr
    (tmp_path / "empty").mkdir()
    proc = gpumlp("report", tmp_path / "empty")
    assert proc.returncode == 2 and "history.json does not exist" in proc.stderr


def _chromium(page: Path, shot: Path, profile: Path) -> list[str]:
    """Screenshot ``page`` in headless Chromium -> the console messages it logged."""
    cmd = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--window-size=1200,2400"]
    proc = subprocess.run([*cmd, f"--screenshot={shot}", page.resolve().as_uri()], capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert shot.is_file(), proc.stderr
    return [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]


@needs_chromium
def test_console_and_blank_checks_can_fail(tmp_path):
    """The checks below can fail: a page with a script error logs it, a near-empty page is blank."""
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><p>x</p><script>undefinedFunction();</script></body></html>")
    console = _chromium(bad, tmp_path / "bad.png", tmp_path / "profile")
    assert any("undefinedFunction is not defined" in line for line in console), console
    with pytest.raises(AssertionError, match="looks blank"):
        _is_picture(tmp_path / "bad.png")


@needs_chromium
def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    shot = tmp_path / "report.png"
    console = _chromium(run_dir / "report.html", shot, tmp_path / "profile")
    assert console == []
    img = _is_picture(shot, min_ink=0.02)  # a white page with figures and tables: measured ~4 % ink
    assert img.shape[:2] == (2400, 1200)
