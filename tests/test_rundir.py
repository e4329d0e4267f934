"""Run directories and the CLI under hostile use: real ``gpumlp`` subprocesses.

Two runs into one ``--out``, rejected resumes, divergence (NaN and finite), damaged model
files, early Ctrl-C, a read-only Numba cache: each must leave the directory usable and
end with one ``gpumlp: error:`` line and a documented exit code, never a traceback.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gpumlp import checkpoint

TINY = ["--limit", "1000", "--spec", "784-16-10", "--valid", "0", "--no-progress"]
TINY += ["--optimizer", "adam", "--lr", "0.003", "--schedule", "constant"]
ROOT = Path(__file__).resolve().parents[1]


def gpumlp(*args, timeout: float = 120, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    """Run ``python -m gpumlp ARGS`` (numpy backend) -> completed process."""
    env = {**os.environ, "GPUMLP_BACKEND": "numpy", **(env or {})}
    cmd = [sys.executable, "-m", "gpumlp", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, **kw)


def one_error_line(proc, code: int) -> str:
    """Assert exit ``code`` with exactly one ``gpumlp: error:`` line and no traceback -> that line."""
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("gpumlp: error:")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def digests(out: Path) -> dict[str, bytes]:
    """The bytes of every file in a run directory (to prove nothing changed)."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def run2(tmp_path_factory) -> Path:
    """A finished 2-epoch run directory (copied by the tests that change it)."""
    out = tmp_path_factory.mktemp("run") / "out"
    proc = gpumlp("train", *TINY, "--epochs", "2", "--out", out)
    assert proc.returncode == 0, proc.stderr
    return out


def copy_run(run2: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(run2, out)
    return out


# ------------------------------------------------------------------ rejected resumes write nothing
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--spec", "784-24-10"], "was written for model"),
        (["--optimizer", "sgd"], "optimizer 'adam'"),
        (["--limit", "900"], "1000 samples"),
    ],
)
def test_rejected_resume_leaves_the_run_directory_untouched(run2, tmp_path, flags, message):
    out = copy_run(run2, tmp_path)
    before = digests(out)
    line = one_error_line(gpumlp("train", "--out", out, "--resume", "--epochs", "3", *flags), 2)
    assert message in line
    assert digests(out) == before  # config.json included: a later plain --resume still works
    proc = gpumlp("train", "--out", out, "--resume", "--epochs", "3", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads((out / "history.json").read_text())["records"]) == 3


# ------------------------------------------------------------------ divergence
def test_finite_divergence_exits_3_and_keeps_the_last_good_files(run2, tmp_path):
    out = copy_run(run2, tmp_path)
    before = digests(out)
    # Adam/ReLU at lr 1e6: the loss explodes but stays finite (1e14..1e28 before this check)
    line = one_error_line(gpumlp("train", "--out", out, "--resume", "--epochs", "4", "--lr", "1e6"), 3)
    assert "diverged" in line and "grew" in line
    after = digests(out)
    marker = json.loads(after.pop("diverged.json"))
    assert marker["lr"] == 1e6
    assert after == before  # checkpoint.npz, model.npz, config.json: the last good ones
    # a plain --resume would repeat the lr that diverged: refused, asking for a new one
    line = one_error_line(gpumlp("train", "--out", out, "--resume", "--epochs", "3"), 2)
    assert "diverged" in line and "--lr" in line
    line = one_error_line(gpumlp("train", "--out", out, "--resume", "--epochs", "3", "--lr", "1e6"), 2)
    assert "lower --lr" in line
    proc = gpumlp("train", "--out", out, "--resume", "--epochs", "3", "--lr", "0.001", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert not (out / "diverged.json").exists()
    assert json.loads((out / "config.json").read_text())["fit"]["lr"] == 0.001


def test_divergence_factor_flag_is_checked():
    line = one_error_line(gpumlp("train", *TINY, "--epochs", "1", "--divergence-factor", "0.5"), 2)
    assert "divergence_factor must be a finite number > 1" in line


def test_sgd_relu_huge_lr_is_divergence_not_success(tmp_path):
    args = [*TINY[:-6], "--optimizer", "sgd", "--act", "relu", "--lr", "1e6", "--epochs", "3"]
    line = one_error_line(gpumlp("train", *args, "--out", tmp_path / "o"), 3)
    assert "diverged" in line
    assert not (tmp_path / "o" / "model.npz").exists()


# ------------------------------------------------------------------ two processes, one --out
def test_two_concurrent_runs_into_one_out_directory(tmp_path):
    """The first run holds the lock for as long as the test needs (it is stopped with Ctrl-C only after
    the second has been refused), so the outcome does not depend on how fast either one starts."""
    out = tmp_path / "out"
    args = [sys.executable, "-m", "gpumlp", "train", *TINY, "--epochs", "100000", "--out", str(out)]
    env = {**os.environ, "GPUMLP_BACKEND": "numpy"}
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 60
        while not (out / "checkpoint.npz").is_file():  # lock held, config written, one epoch saved
            assert time.monotonic() < deadline and first.poll() is None, first.communicate()
            time.sleep(0.02)
        second = gpumlp("train", *TINY, "--epochs", "2", "--out", out)
        assert first.poll() is None, "the first run must still hold the lock"
    finally:
        first.send_signal(signal.SIGINT)
        _, f_err = first.communicate(timeout=120)
    line = one_error_line(second, 2)
    assert f"PID {first.pid}" in line and "different --out" in line
    assert first.returncode == 130 and "checkpoint is kept" in f_err, f_err
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["fit"]["epochs"] == 100000  # the first run's, untouched by the refused one
    done = checkpoint.read(out / "checkpoint.npz")[1]["train"]["epoch"]
    proc = gpumlp("train", "--out", out, "--resume", "--epochs", done + 1, "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "metrics.json").read_text())["epochs"] == done + 1


# ------------------------------------------------------------------ a refused run creates nothing
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--momentum", "0.5"], "--momentum does not apply to optimizer adam"),  # found before the data
        (["--patience", "2"], "--patience needs a validation set"),  # found after the data is loaded
    ],
)
def test_usage_error_after_the_lock_leaves_no_new_directory(tmp_path, flags, message):
    """An error found once ``--out`` is locked removes the directories this run created (nested ones
    too) when they hold only the lock file; one that existed before, empty or not, is kept as it was."""
    parent = tmp_path / "new"
    line = one_error_line(gpumlp("train", *TINY, "--epochs", "1", *flags, "--out", parent / "a" / "run"), 2)
    assert message in line
    assert list(tmp_path.iterdir()) == []
    kept = tmp_path / "kept"
    (kept / "empty").mkdir(parents=True)
    (kept / "full").mkdir()
    (kept / "full" / "notes.txt").write_text("mine")
    for out in (kept / "empty", kept / "full", kept / "empty" / "run"):
        assert message in one_error_line(gpumlp("train", *TINY, "--epochs", "1", *flags, "--out", out), 2)
    assert sorted(p.name for p in (kept / "empty").iterdir()) == [".lock"]  # existed: kept
    assert sorted(p.name for p in (kept / "full").iterdir()) == [".lock", "notes.txt"]
    assert (kept / "full" / "notes.txt").read_text() == "mine"


def test_stale_temp_files_of_dead_writers_are_removed(run2, tmp_path):
    out = copy_run(run2, tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    dead_pid = int(dead.stdout)
    stale = out / f".checkpoint.npz.{dead_pid}.abc123.tmp"
    stale.write_bytes(b"x" * 1000)
    live = out / f".model.npz.{os.getpid()}.def456.tmp"  # a live writer's file is left alone
    live.write_bytes(b"y")
    proc = gpumlp("train", "--out", out, "--resume", "--epochs", "3", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert not stale.exists() and live.exists()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp") and p != live]


# ------------------------------------------------------------------ damaged files: one line, exit 2
def test_damaged_model_files_are_one_line_errors(run2, tmp_path):
    arrays, meta = checkpoint.read(run2 / "model.npz")
    cases = {}
    missing = dict(arrays)
    missing.pop(next(k for k in arrays if k.startswith("param/")))
    cases["missing_array.npz"] = (missing, meta, "is missing")
    no_layers = {k: v for k, v in meta.items() if k != "layers"}
    cases["missing_key.npz"] = (arrays, no_layers, "'layers'")
    for name, (a, m, _) in cases.items():
        checkpoint.write(tmp_path / name, a, m)
    flipped = bytearray((run2 / "checkpoint.npz").read_bytes())
    flipped[len(flipped) // 2] ^= 0x10
    (tmp_path / "flipped.npz").write_bytes(bytes(flipped))
    (tmp_path / "empty.npz").write_bytes(b"")
    for name, (_, _, message) in cases.items():
        assert message in one_error_line(gpumlp("eval", tmp_path / name), 2)
    assert "corrupt" in one_error_line(gpumlp("eval", tmp_path / "flipped.npz"), 2)
    npz = tmp_path / "x.npz"
    np.savez(npz, x=np.zeros((1, 784), np.uint8))
    assert "corrupt" in one_error_line(gpumlp("predict", tmp_path / "flipped.npz", npz), 2)
    assert "not a readable .npz" in one_error_line(
        gpumlp("predict", run2 / "model.npz", tmp_path / "empty.npz"), 2
    )
    out = copy_run(run2, tmp_path)
    shutil.copy(tmp_path / "flipped.npz", out / "checkpoint.npz")
    line = one_error_line(gpumlp("train", "--out", out, "--resume", "--epochs", "3"), 2)
    assert "corrupt" in line and "checkpoint.npz" in line


def test_huge_spec_is_a_memory_estimate_not_a_memoryerror():
    line = one_error_line(gpumlp("train", "--spec", "784-100000000-10", "--limit", "10"), 2)
    assert "GiB" in line and "narrower" in line


def test_data_dir_that_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    assert "is a file, not a directory" in one_error_line(gpumlp("train", "--data-dir", f), 2)


# ------------------------------------------------------------------ Ctrl-C and read-only caches
def test_ctrl_c_while_importing_exits_130_quietly():
    """SIGINT while the entry point (``python -m gpumlp`` and the console script) imports NumPy/Numba.
    The signal is sent once gpumlp's entry module is loaded, i.e. after the interpreter's own start."""
    code = "import sys; sys.argv = ['gpumlp', 'info']; import gpumlp.__main__ as m; print('up', flush=True); "
    code += "sys.exit(m.run())"
    for delay in (0.0, 0.02, 0.05, 0.15):
        p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert p.stdout.readline() == b"up\n"
        time.sleep(delay)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
        assert p.returncode == 130, err.decode()
        assert b"Traceback" not in err, err.decode()


def test_read_only_numba_cache_falls_back_with_one_warning(tmp_path):
    """A read-only install (no __pycache__ possible) and no writable NUMBA_CACHE_DIR or home cache."""
    pytest.importorskip("numba")
    pkg = tmp_path / "site" / "gpumlp"
    shutil.copytree(ROOT / "gpumlp", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "kernels", pkg / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    (pkg / "kernels" / "__pycache__").write_text("")  # a file where numba's in-tree cache would go
    nowhere = "/proc/gpumlp-no-such-dir"  # not creatable, even by root
    env = {"PYTHONPATH": str(tmp_path / "site"), "PYTHONDONTWRITEBYTECODE": "1", "GPUMLP_BACKEND": "numba"}
    env.update(NUMBA_CACHE_DIR=nowhere, XDG_CACHE_HOME=nowhere, HOME=nowhere)
    code = (
        "import gpumlp, sys; sys.exit(gpumlp.MLP('4-3-2', backend='numba').predict([[1, 2, 3, 4]]).size - 1)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
        env={**os.environ, **env}, cwd=tmp_path,  # not the checkout: its gpumlp would shadow the copy
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    warnings = [ln for ln in proc.stderr.splitlines() if "cannot cache" in ln]
    assert len(warnings) == 1, proc.stderr


def test_numba_serial_and_parallel_variants_load_from_the_disk_cache(tmp_path):
    """The variants numba_cpu._split generates, and numba_math's loops made by _elementwise, are
    compiled once, then loaded from the cache by the next process (a closure over a jitted body
    would miss it every run)."""
    pytest.importorskip("numba")
    code = (
        "import numpy as np; from gpumlp.kernels import numba_cpu as k, numba_math as m\n"
        "w, g = np.ones(8), np.ones(8)\n"
        "k._sgd_serial(w, g, 0.1, 0.0, 0.0); k._sgd_par(w, g, 0.1, 0.0, 0.0, 2); m.exp(w); m.tanh(w)\n"
        "fs = (k._sgd_serial, k._sgd_par, m._map_exp, m._map_tanh)\n"
        "print([sum(f.stats.cache_hits.values()) for f in fs])"
    )
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
            for _ in range(2)]  # fmt: skip
    assert [r.stdout.strip() for r in runs] == ["[0, 0, 0, 0]", "[1, 1, 1, 1]"], [r.stderr for r in runs]
    assert len(list(tmp_path.rglob("*_sgd_par-*.nbc"))) == 1  # one entry, not one more per run


# ------------------------------------------------------------------ predict inputs
def test_predict_reads_scaled_npz_and_png_modes_as_raw_pixels(run2, tmp_path):
    Image = pytest.importorskip("PIL.Image")
    from gpumlp.data import load_mnist

    x = load_mnist().x_test[:20]
    np.savez(tmp_path / "raw.npz", x=x)
    np.savez(tmp_path / "scaled.npz", x=x / 255.0)  # already in [0, 1]: not to be divided again
    digit = x[0].reshape(28, 28)
    Image.fromarray(np.stack([digit, np.full_like(digit, 255)], -1), "LA").save(tmp_path / "la.png")
    ink = np.stack([np.full_like(digit, 255), digit], -1)  # white ink whose alpha draws the digit
    Image.fromarray(ink, "LA").save(tmp_path / "ink.png")
    Image.fromarray(digit.astype(np.uint16) * 257).save(tmp_path / "i16.png")
    raw = gpumlp("predict", run2 / "model.npz", tmp_path / "raw.npz")
    assert raw.returncode == 0, raw.stderr
    scaled = gpumlp("predict", run2 / "model.npz", tmp_path / "scaled.npz")
    assert scaled.stdout.split() == raw.stdout.split(), scaled.stderr
    for png in ("ink.png", "la.png", "i16.png"):
        proc = gpumlp("predict", "--proba", run2 / "model.npz", tmp_path / png)
        ref = gpumlp("predict", "--proba", run2 / "model.npz", tmp_path / "raw.npz")
        assert proc.stdout.splitlines() == ref.stdout.splitlines()[:1], (png, proc.stderr)
