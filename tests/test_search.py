"""Grid / random / coarse-to-fine hyper-parameter search on real executors."""

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import pytest

from gpumlp.data import make_circles
from gpumlp.search import coarse_to_fine, default_workers, grid, process_pool, refine, sample, search

_PARENT_STATE: list = []  # changed by a test at run time: a forked worker would inherit it


def _sees_parent_state() -> bool:
    return bool(_PARENT_STATE)


def _visible_gpu(barrier) -> str:
    barrier.wait(timeout=120)  # both workers hold a task at once, so both answer
    return os.environ["CUDA_VISIBLE_DEVICES"]


def _data():
    X, y = make_circles(n=300, noise=0.1, seed=0)
    return X[:200], y[:200], X[200:], y[200:]


BASE = {"spec": "2-16-2", "act": "relu", "backend": "numpy", "epochs": 15, "batch_size": 20}


def test_grid_enumerates_every_combination():
    configs = grid({"lr": [0.1, 0.01], "optimizer": ["sgd", "adam", "rmsprop"]})
    assert len(configs) == 6 and {"lr": 0.01, "optimizer": "adam"} in configs
    with pytest.raises(ValueError, match="grid search needs lists"):
        grid({"lr": ("log", 1e-4, 1e-1)})


def test_random_samples_stay_in_range_and_are_seeded():
    space = {"lr": ("log", 1e-4, 1e-1), "batch_size": ("int", 8, 64), "act": ["relu", "tanh"]}
    a, b = sample(space, 50, seed=1), sample(space, 50, seed=1)
    assert a == b
    assert all(1e-4 <= c["lr"] <= 1e-1 and 8 <= c["batch_size"] <= 64 for c in a)
    lrs = sorted(c["lr"] for c in a)
    assert lrs[0] < 1e-3 and lrs[-1] > 1e-2  # log-uniform spreads over decades


def test_refine_narrows_around_the_best():
    fine = refine({"lr": ("log", 1e-4, 1e-0), "act": ["relu", "tanh"]}, {"lr": 1e-2, "act": "tanh"}, 0.5)
    assert fine["act"] == ["tanh"]
    lo, hi = fine["lr"][1:]
    assert 1e-4 < lo < 1e-2 < hi < 1.0 and hi / lo == pytest.approx(100, rel=1e-6)


def test_coarse_to_fine_random_search_in_processes_finds_a_good_model():
    space = {"lr": ("log", 1e-4, 1.0), "optimizer": ["adam", "sgd"]}
    with ProcessPoolExecutor(max_workers=2) as ex:
        res = search(space, _data(), n_trials=4, rounds=2, base=BASE, executor=ex, seed=0)
    assert len(res.trials) == 8
    accs = [t["valid_acc"] for t in res.trials]
    assert accs == sorted(accs, reverse=True) and res.best["valid_acc"] >= 0.9


def test_grid_search_on_a_thread_pool():
    with ThreadPoolExecutor(max_workers=2) as ex:
        res = search(
            {"lr": [0.05, 1e-5]}, _data(), method="grid", base={**BASE, "optimizer": "adam"}, executor=ex
        )
    assert res.best["params"] == {"lr": 0.05} and res.trials[-1]["valid_acc"] < res.best["valid_acc"]


def test_unknown_hyper_parameter_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown hyper-parameters \['learning_rate'\]"):
        search({"learning_rate": [0.1]}, _data(), base=BASE)


def test_default_search_pool_spawns_its_workers():
    """A forked worker would inherit an initialised CUDA context; spawned ones start fresh
    (they do not see what this process changed at run time) and still run the search."""
    _PARENT_STATE.append(1)
    try:
        with process_pool(1) as ex:
            assert ex.submit(_sees_parent_state).result() is False
    finally:
        _PARENT_STATE.clear()
    res = search({"lr": [0.05, 1e-5]}, _data(), method="grid", base={**BASE, "optimizer": "adam"}, workers=2)
    assert res.best["params"] == {"lr": 0.05} and res.best["valid_acc"] >= 0.9


def _local_trials_pool(workers: int, gpus: int):
    """The pool behind ``gpumlp search``'s local trials (the data kept in each worker)."""
    from gpumlp.distribute import LocalTrials

    return LocalTrials(_data(), workers, gpus=gpus).pool


@pytest.mark.parametrize("make_pool", [process_pool, _local_trials_pool], ids=["search", "search-cli"])
@pytest.mark.parametrize("visible, expected", [(None, {"0", "1"}), ("3,5", {"3", "5"})])
def test_gpu_pool_gives_each_worker_its_own_gpu(monkeypatch, visible, expected, make_pool):
    """Both the search API's pool and the CLI's local trials pin one GPU per worker, chosen among
    $CUDA_VISIBLE_DEVICES when set (the CLI's pool used to hand out 0, 1 regardless)."""
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager, make_pool(2, gpus=2) as ex:
        barrier = manager.Barrier(2)
        assert {f.result() for f in [ex.submit(_visible_gpu, barrier) for _ in range(2)]} == expected


def test_coarse_to_fine_refines_around_the_best_trial_so_far():
    """A worse second round does not move the third round's space away from the first round's best."""
    space = {"lr": ("log", 1e-4, 1.0)}
    scores = iter([1.0, 0.0, 0.5])  # per round: round 1's trials are the best ones

    def run(configs):
        score = next(scores)
        return sorted(({"params": c, "valid_acc": score - abs(c["lr"] - 0.01)} for c in configs),
                      key=lambda t: -t["valid_acc"])  # fmt: skip

    trials = coarse_to_fine(space, run, method="random", n_trials=4, rounds=3, shrink=0.5, seed=7)
    by_round = [[t for t in trials if t["round"] == r] for r in (1, 2, 3)]
    best1 = max(by_round[0], key=lambda t: t["valid_acc"])

    def lrs(configs):
        return sorted(c["lr"] for c in configs)

    space2 = refine(space, best1["params"], 0.5)
    assert lrs(t["params"] for t in by_round[1]) == lrs(sample(space2, 4, 8))
    assert lrs(t["params"] for t in by_round[2]) == lrs(sample(refine(space2, best1["params"], 0.5), 4, 9))


def test_default_workers_per_backend(monkeypatch):
    cores = os.cpu_count() or 1
    assert default_workers("numpy") == default_workers("numba") == cores
    monkeypatch.setenv("GPUMLP_BACKEND", "numpy")
    assert default_workers() == cores
    try:
        import cupy

        gpus = cupy.cuda.runtime.getDeviceCount()
    except Exception:
        gpus = 0
    assert default_workers("cupy") == (gpus or cores)  # one per GPU where CuPy sees any
