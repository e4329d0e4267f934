"""The CPU step experiments in bench/ run end to end on a small MNIST slice and say what they measured."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("numba")
ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str, env: dict | None = None) -> str:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_step_breakdown_times_every_kernel_of_the_seed_step(tmp_path):
    """Every call of the real step is filed under its kernel and role: the seed's forward GEMMs, its
    input-gradient GEMM and both SGD-in-GEMM weight steps (plain SGD folds the update into them)."""
    out = tmp_path / "breakdown.md"
    text = _run(
        "step_breakdown.py", "--configs", "seed", "--epochs", "1", "--samples", "600", "--out", str(out)
    )
    assert out.read_text().strip() == text.strip()
    for row in (
        "matmul x·W 100x784x100", "matmul x·W 100x100x10", "matmul dz·Wᵀ 100x10x100",
        "sgd_matmul_step W -= lr·xᵀ·dz 784x100x100", "sgd_matmul_step W -= lr·xᵀ·dz 100x100x10",
        "bias_act sigmoid 100x100", "act_grad sigmoid 100x100", "sigmoid_bce 100x10", "gather_pixels 600x784",
        "sgd_step 110", "**Python + glue**", "**step total**",
    ):  # fmt: skip
        assert f"| {row}" in text, row
    shares = [float(line.rsplit("|", 2)[-2]) for line in text.splitlines() if line.startswith("| **all ")]
    assert 0 < sum(shares) <= 100.5  # the kernels' shares of one step


def test_step_graphs_match_the_per_kernel_step_exactly():
    """The script checks before it times: after one shuffled epoch (with a last, partial batch,
    which runs kernel by kernel) the one-core step-graph model's weights equal the per-kernel
    model's bit for bit, the two-core one's to rounding. adam256 replays Adam, which reads its
    step count inside the jitted kernel."""
    text = _run("step_graphs.py", "--configs", "seed,adam256", "--samples", "2650", "--repeats", "1")
    rows = {
        line.split("|")[1].strip(): line.split("|") for line in text.splitlines() if line.startswith("| ")
    }
    for config in ("seed", "adam256"):
        assert float(rows[config][7]) == 0.0, rows[config]  # one core: bit for bit
        assert float(rows[config][8]) < 1e-3, rows[config]  # two cores: to rounding
        assert float(rows[config][5]) > 0 and float(rows[config][6]) > 0  # ratios were measured


def test_parallel_after_gemm_measures_every_case(tmp_path):
    """The script behind the README's Threads paragraph runs against the current kernels (it calls
    their serial and parallel variants directly, so a changed kernel signature fails here)."""
    out = tmp_path / "parallel.md"
    text = _run("parallel_after_gemm.py", "--rounds", "1", "--out", str(out))
    assert out.read_text().strip() == text.strip()
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| case")]
    names = [row.split("|")[1].strip() for row in rows]
    assert names == [
        "Adam 203k, arithmetic", "Adam 203k, alone", "Adam 203k, after a 128x784x256 GEMM",
        "bias+ReLU 4M, alone", "bias+ReLU 4M, after a 4096x1024x1024 GEMM",
        "predict 784-1024-1024-10 layer by layer, batch 4096",
    ]  # fmt: skip
    assert all(float(row.split("|")[2]) > 0 and float(row.split("|")[3]) > 0 for row in rows)


def test_split_k_times_both_ways_and_classifies_by_the_rule(tmp_path):
    """The script behind ``numba_cpu._split_k``'s rule times each shape as one GEMM and as two
    halves of K through ``matmul`` (it asserts which one ran), and sorts them by the rule: the
    seed's first layer is picked, adam256's is not."""
    out = tmp_path / "split_k.md"
    text = _run("split_k.py", "--quick", "--rounds", "1", "--out", str(out),
                env=dict(os.environ, OPENBLAS_NUM_THREADS="2"))  # fmt: skip
    assert out.read_text().strip() == text.strip()
    cells = [line.split("|")[1:-1] for line in text.splitlines() if line[:3] == "| 1"]
    times = {tuple(int(c) for c in row[:3]): (float(row[4]), float(row[5])) for row in cells}
    assert set(times) == {(100, 784, 100), (128, 784, 256)}
    assert all(one > 0 and split > 0 for one, split in times.values())
    assert "Shapes picked by the rule: 1," in text and "Shapes left to one GEMM: 1," in text


def test_prefetch_times_each_gather_with_and_without_its_hint(tmp_path):
    """The script behind the gathers' prefetch numbers compiles each gather body afresh with the
    hint a no-op (a renamed or re-signed body fails here) and times both."""
    out = tmp_path / "prefetch.md"
    text = _run("prefetch.py", "--rounds", "1", "--rows", "3000", "--out", str(out))
    assert out.read_text().strip() == text.strip()
    rows = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith("| gather")]
    assert [row[0].strip() for row in rows] == ["gather_rows", "gather_shifted ±2 px"]
    assert all(float(row[1]) > 0 and float(row[2]) > 0 for row in rows)


def test_pixel_gather_times_float_rows_against_codes_on_each_cpu_backend(tmp_path):
    """The script behind the Pixels numbers: both gathers at three batch sizes per backend, and
    both shifting gathers."""
    out = tmp_path / "pixel_gather.md"
    text = _run("pixel_gather.py", "--rounds", "1", "--rows", "3000", "--out", str(out))
    assert out.read_text().strip() == text.strip()
    rows = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith(("| numba", "| numpy"))]
    kinds = [("rows", 100), ("rows", 128), ("rows", 256), ("shifted ±2 px", 128)]
    expected = [(b, kind, n) for b in ("numba", "numpy") for kind, n in kinds]
    assert [(r[0].strip(), r[1].strip(), int(r[2])) for r in rows] == expected
    assert all(float(r[3]) > 0 and float(r[4]) > 0 for r in rows)


def test_cross_core_samples_adam_alone_and_after_a_two_thread_gemm(tmp_path):
    """The script behind the slow-phase diagnosis: each sample times the three, with the steal ticks."""
    out = tmp_path / "cross_core.md"
    _run("cross_core.py", "--seconds", "0.5", "--every", "0.1", "--out", str(out))
    samples = [line for line in out.read_text().splitlines() if re.match(r"\| \d\d:\d\d:\d\d \|", line)]
    rows = [[float(c) for c in line.split("|")[2:6]] for line in samples]
    assert rows and all(alone > 0 and after > 0 and forward > 0 for alone, after, _, forward in rows)
    assert all(abs(ratio - after / alone) < 0.01 for alone, after, ratio, _ in rows)


def test_two_core_sizes_times_both_modes_per_model(tmp_path):
    """The script behind the lower size limit of the two-core step: each model's row with its
    largest GEMM, both modes' epochs and their ratio."""
    out = tmp_path / "sizes.md"
    models = "64-32-10:100,128-64-10:100"
    text = _run("two_core_sizes.py", "--models", models, "--rows", "600", "--rounds", "1", "--out", str(out))
    assert out.read_text().strip() == text.strip()
    rows = [line.split("|") for line in text.splitlines() if line.startswith("| ") and "model" not in line]
    assert [(r[1].strip(), r[3].strip()) for r in rows] == [("64-32-10", "0.20M"), ("128-64-10", "0.82M")]
    assert all(float(r[4]) > 0 and float(r[5]) > 0 and float(r[6]) > 0 for r in rows)


def test_predict_paths_times_the_dot_tiles_and_the_three_paths(tmp_path):
    """The script behind dense_chain's dot-tile rule and its two-core limit: a row per product
    shape with the rule's dot columns, and a row per model and batch with all three paths timed."""
    import numpy as np

    from gpumlp.kernels import numba_tiles

    if not numba_tiles.SIMD_TILES:
        pytest.skip("no tiles on this CPU")
    out = tmp_path / "paths.md"
    text = _run("predict_paths.py", "--rounds", "1", "--models", "784-2048-10", "--batches", "1,300",
                "--out", str(out))  # fmt: skip
    assert out.read_text().strip() == text.strip()
    rows = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith("| ")]
    dots = {r[0].strip(): int(r[1]) for r in rows if r[0].startswith(" 4096 x") and r[1].strip().isdigit()}
    assert dots["4096 x 784 x 100"] == numba_tiles.dot_columns(100, np.float32)
    assert dots["4096 x 100 x 10"] == 10 and len(dots) == 6
    seed = {int(r[0]): float(r[3]) for r in rows if r[0].strip() in ("1", "64", "4096")}
    assert sorted(seed) == [1, 64, 4096] and all(v > 0 for v in seed.values())
    paths = [r for r in rows if r[0].strip() == "784-2048-10"]
    assert [int(r[1]) for r in paths] == [1, 300]
    assert all(float(v) > 0 for r in paths for v in r[2:5])
