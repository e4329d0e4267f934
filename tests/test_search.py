"""Grid / random / coarse-to-fine hyper-parameter search on real executors."""

from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import pytest

from gpumlp.data import make_circles
from gpumlp.search import grid, refine, sample, search


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
