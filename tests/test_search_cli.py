"""``gpumlp search``: the space from flags and files, successive halving, result files, and trials
on spawned local processes and on a real dask.distributed cluster over loopback (data sent once)."""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from gpumlp.distribute import LocalTrials, default_workers
from gpumlp.search_cli import build_space, parse_param, read_space_file, successive_halving

BASE = {"spec": "4-16-3", "act": "relu", "backend": "numpy", "batch_size": 32, "optimizer": "adam", "seed": 0}


def gpumlp(*args, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "GPUMLP_BACKEND": "numpy"}
    cmd = [sys.executable, "-m", "gpumlp", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def blobs(n: int = 300, seed: int = 0):
    """Three overlapping Gaussian blobs in 4-D: learnable, but the learning rate matters."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    return (rng.normal(size=(n, 4)) + 2.0 * np.eye(3, 4)[y]).astype(np.float32), y


@pytest.fixture(scope="module")
def blobs_npz(tmp_path_factory):
    path = tmp_path_factory.mktemp("search") / "blobs.npz"
    X, y = blobs()
    np.savez(path, X=X, y=y)
    return path


# ---------------------------------------------------------------- the space
def test_param_flags_parse_choices_and_ranges():
    assert parse_param("lr=log:1e-4:0.1") == ("lr", ("log", 1e-4, 0.1))
    assert parse_param("batch_size=int:16:128") == ("batch_size", ("int", 16, 128))
    assert parse_param("optimizer=adam,sgd") == ("optimizer", ["adam", "sgd"])
    assert parse_param("dropout=0,0.25") == ("dropout", [0, 0.25])
    assert parse_param("hidden=64,128-64") == ("hidden", [[64], [128, 64]])
    with pytest.raises(ValueError, match="expected NAME=SPEC"):
        parse_param("lr")
    with pytest.raises(ValueError, match="a range is log:LO:HI"):
        parse_param("lr=log:1e-4")


def test_space_files_json_and_toml_and_flags_win(tmp_path):
    (tmp_path / "s.json").write_text('{"lr": {"log": [1e-4, 1e-1]}, "optimizer": ["adam", "sgd"]}')
    (tmp_path / "s.toml").write_text('lr = {log = [1e-4, 1e-1]}\noptimizer = ["adam", "sgd"]\n')
    expected = {"lr": ("log", 1e-4, 1e-1), "optimizer": ["adam", "sgd"]}
    assert read_space_file(tmp_path / "s.json") == read_space_file(tmp_path / "s.toml") == expected
    args = argparse.Namespace(space=str(tmp_path / "s.toml"), param=["optimizer=rmsprop"])
    assert build_space(args) == {"lr": ("log", 1e-4, 1e-1), "optimizer": ["rmsprop"]}
    with pytest.raises(ValueError, match=r"unknown hyper-parameters \['learning_rate'\]"):
        build_space(argparse.Namespace(space=None, param=["learning_rate=0.1"]))
    (tmp_path / "bad.json").write_text('{"lr": 0.1}')
    with pytest.raises(ValueError, match="'lr' must be a list of choices"):
        read_space_file(tmp_path / "bad.json")


# ---------------------------------------------------------------- successive halving on real processes
def test_successive_halving_keeps_the_best_third_and_grows_the_budget():
    X, y = blobs()
    data = (X[:240], y[:240], X[240:], y[240:])
    configs = [{"lr": lr} for lr in (1e-5, 3e-5, 1e-4, 1e-2, 3e-2, 0.1)]
    trials = LocalTrials(data, workers=2)
    try:
        results = successive_halving(trials, configs, {**BASE, "epochs": 9}, eta=3, min_epochs=1, log=print)
    finally:
        trials.close()
    by_rung = {r: [t for t in results if t["rung"] == r] for r in (1, 2, 3)}
    assert [len(by_rung[r]) for r in (1, 2, 3)] == [6, 2, 1]
    assert [t["epochs"] for t in by_rung[1]] == [1] * 6 and by_rung[3][0]["epochs"] == 9
    first = sorted(by_rung[1], key=lambda t: -t["valid_acc"])
    assert {t["params"]["lr"] for t in by_rung[2]} == {t["params"]["lr"] for t in first[:2]}
    assert results[0] is by_rung[3][0] and results[0]["params"]["lr"] >= 1e-2  # tiny rates stopped early
    assert len({t["pid"] for t in results}) <= 2  # the two spawned workers ran every trial


def test_default_workers_is_one_per_two_cores_on_the_cpu():
    assert default_workers("numpy") == max(1, (os.cpu_count() or 1) // 2)


# ---------------------------------------------------------------- the command line
def test_cli_random_coarse_to_fine_writes_table_csv_json_and_plot(tmp_path, blobs_npz):
    out = tmp_path / "res"
    proc = gpumlp(
        "search", "--data", blobs_npz, "--hidden", "16", "--epochs", "10", "--batch-size", "32",
        "--param", "lr=log:3e-3:0.3", "--param", "optimizer=adam,sgd", "--trials", "3", "--rounds", "2",
        "--workers", "2", "--out", out, "--backend", "numpy", "--valid", "60",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["rank", "valid", "%", "epochs", "seconds", "lr", "optimizer"]
    assert "\r" not in proc.stderr and "Traceback" not in proc.stderr
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 6 and {r["round"] for r in rows} == {"1", "2"}
    body = json.loads((out / "results.json").read_text())
    accs = [t["valid_acc"] for t in body["trials"]]
    assert accs == sorted(accs, reverse=True) and body["best"]["valid_acc"] == accs[0] > 0.6  # chance: 1/3
    assert f"{100 * accs[0]:.2f}" in lines[1]
    if (out / "parallel.png").exists():
        assert (out / "parallel.png").read_bytes()[:4] == b"\x89PNG"
    else:
        pytest.importorskip("matplotlib")
        pytest.fail("parallel.png missing although matplotlib is installed")


def test_cli_errors_are_one_line(blobs_npz):
    proc = gpumlp("search", "--data", blobs_npz, "--param", "lr")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "gpumlp: error: --param 'lr': expected NAME=SPEC, e.g. lr=log:1e-4:1e-1 or optimizer=adam,sgd"
    ]


# ---------------------------------------------------------------- Dask
def _task_sizes(distributed):
    """A scheduler plugin recording the pickled size of every submitted task (function + arguments)."""
    from distributed.protocol import pickle as dask_pickle

    class TaskSizes(distributed.SchedulerPlugin):
        def __init__(self):
            self.sizes: dict[str, int] = {}

        def update_graph(self, scheduler, *, keys, **kwargs):
            for key in keys:
                ts = scheduler.tasks.get(key)
                if ts is not None and ts.run_spec is not None:
                    self.sizes[str(key)] = len(dask_pickle.dumps(ts.run_spec))

    return TaskSizes()


def test_dask_cluster_on_loopback_gets_the_data_once(blobs_npz):
    """A real scheduler and two workers in this process; the CLI joins it over tcp://127.0.0.1.
    The scheduler's event log shows one scatter, and every trial task is small: it names the
    scattered data instead of carrying it (as the Python API's executor path still does)."""
    distributed = pytest.importorskip("dask.distributed")
    from gpumlp.search import search

    X, y = blobs()
    data_bytes = X.nbytes + y.nbytes
    with distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=False,
        protocol="tcp",
        host="127.0.0.1",
        dashboard_address=None,
    ) as cluster:
        sizes = _task_sizes(distributed)
        cluster.scheduler.add_plugin(sizes)
        proc = gpumlp(
            "search", "--data", blobs_npz, "--hidden", "8", "--epochs", "2", "--backend", "numpy",
            "--param", "lr=0.003,0.03", "--param", "act=relu,tanh", "--method", "grid",
            "--dask", cluster.scheduler_address,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        events = [e for _, e in cluster.scheduler.get_events("all") if isinstance(e, dict)]
        scatters = [e for e in events if e.get("action") == "scatter"]
        assert len(scatters) == 1 and scatters[0]["count"] == 1  # one object, sent once
        trial_sizes = [n for k, n in sizes.sizes.items() if k.startswith("run_shared_trial")]
        assert len(trial_sizes) == 4 and max(trial_sizes) < data_bytes / 4, (trial_sizes, data_bytes)
        with distributed.Client(cluster.scheduler_address) as client:  # the data-per-trial path, for contrast
            search({"lr": [0.01]}, (X, y, X, y), method="grid", base=BASE | {"epochs": 1}, executor=client)
        per_trial = [n for k, n in sizes.sizes.items() if k.startswith("run_trial")]
        assert per_trial and min(per_trial) > data_bytes
    assert len(proc.stdout.splitlines()) == 1 + 4 + 2  # header, 4 trials, best and totals
    assert "dask at tcp://127.0.0.1" in proc.stderr
    assert "training data scattered to the workers 1 time(s)" in proc.stderr


def test_dask_local_starts_its_own_cluster(blobs_npz):
    pytest.importorskip("dask.distributed")
    proc = gpumlp(
        "search", "--data", blobs_npz, "--hidden", "8", "--epochs", "2", "--backend", "numpy",
        "--param", "lr=0.003,0.03", "--method", "grid", "--dask", "local", "--workers", "2",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "(2 workers)" in proc.stderr and "scattered to the workers 1 time(s)" in proc.stderr
    assert proc.stdout.splitlines()[-2].startswith("best: lr=")
    assert all(line.startswith("gpumlp: ") for line in proc.stderr.splitlines()), proc.stderr
