"""Hyper-parameter search: grid and random search, refined coarse to fine.

Trials run on any ``concurrent.futures.Executor``: a local process pool by
default, or e.g. a ``dask.distributed`` Client (its ``submit`` fits the same
interface) to spread trials over a cluster. Each trial builds a fresh MLP on
its worker's best backend, trains it, and reports validation accuracy.
The local pool *spawns* its workers (a forked CUDA context is invalid): one per
GPU when the trials run on the cupy backend, each worker seeing only its own
GPU, else one per CPU core.

A search space maps a parameter name (any :class:`gpumlp.model.MLP` or
:func:`gpumlp.train.fit` keyword) to either a list of choices or a range
``("log", lo, hi)`` / ``("uniform", lo, hi)`` / ``("int", lo, hi)``.
"""

from __future__ import annotations

import inspect
import itertools
import math
import multiprocessing
import os
from collections.abc import Mapping
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from gpumlp.model import MLP
from gpumlp.train import fit

RANGE_KINDS = ("log", "uniform", "int")
_MODEL_KEYS = set(inspect.signature(MLP.__init__).parameters) - {"self"}
_FIT_KEYS = set(inspect.signature(fit).parameters) - {"model", "X", "y"}


def _is_range(spec) -> bool:
    return isinstance(spec, tuple) and len(spec) == 3 and spec[0] in RANGE_KINDS


def _check_space(space: Mapping) -> None:
    for name, spec in space.items():
        if _is_range(spec):
            if not spec[1] < spec[2] or (spec[0] == "log" and spec[1] <= 0):
                raise ValueError(f"search range for {name!r} must have lo < hi (and lo > 0 for log): {spec}")
        elif not (isinstance(spec, list) and spec):
            raise ValueError(
                f"search space entry {name!r} must be a non-empty list of choices or a "
                f"(kind, lo, hi) range with kind in {RANGE_KINDS}; got {spec!r}"
            )


def grid(space: Mapping) -> list[dict]:
    """Every combination of the listed choices (ranges are not allowed in a grid)."""
    _check_space(space)
    ranged = [k for k, v in space.items() if _is_range(v)]
    if ranged:
        raise ValueError(f"grid search needs lists of choices, not ranges: {ranged}")
    keys = list(space)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(space[k] for k in keys))]


def sample(space: Mapping, n: int, seed: int = 0) -> list[dict]:
    """n random configurations: choices uniformly, ranges log-uniform/uniform/integer."""
    _check_space(space)
    rng = np.random.default_rng(seed)

    def draw(spec):
        if not _is_range(spec):
            return spec[rng.integers(len(spec))]
        kind, lo, hi = spec
        if kind == "log":
            return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
        if kind == "int":
            return int(rng.integers(lo, hi + 1))
        return float(rng.uniform(lo, hi))

    return [{k: draw(v) for k, v in space.items()} for _ in range(n)]


def refine(space: Mapping, best: Mapping, shrink: float = 0.3) -> dict:
    """A narrower space centred on ``best``: each range keeps ``shrink`` of its
    width (in log space for ``log``), clipped to the old bounds; choices are fixed."""
    out = {}
    for k, spec in space.items():
        if not _is_range(spec):
            out[k] = [best[k]]
            continue
        kind, lo, hi = spec
        f = (math.log if kind == "log" else float)(best[k])
        a, b = (math.log(lo), math.log(hi)) if kind == "log" else (lo, hi)
        half = (b - a) * shrink / 2
        na, nb = max(a, f - half), min(b, f + half)
        if kind == "log":
            out[k] = ("log", math.exp(na), math.exp(nb))
        elif kind == "int":
            out[k] = ("int", int(math.floor(na)), max(int(math.ceil(nb)), int(math.floor(na)) + 1))
        else:
            out[k] = ("uniform", na, nb)
    return out


def _gpu_count() -> int:
    """CUDA GPUs CuPy sees here (0 without CuPy or a driver); creates no CUDA context."""
    try:
        import cupy

        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:  # no CuPy, no driver, no device
        return 0


def trial_gpus(backend: str | None) -> int:
    """GPUs the trials run on: those CuPy sees for backend cupy or auto (which picks cupy where
    a GPU is usable; default ``$GPUMLP_BACKEND``, else auto), 0 for the CPU backends."""
    name = (backend or os.environ.get("GPUMLP_BACKEND") or "auto").lower()
    return _gpu_count() if name in ("cupy", "auto") else 0


def default_workers(backend: str | None = None) -> int:
    """Workers of the local search pool for trials on ``backend``: one per GPU when they run on
    the cupy backend, else one per CPU core."""
    return trial_gpus(backend) or os.cpu_count() or 1


def _init_worker(devices, initializer, initargs: tuple) -> None:
    """Worker initializer: make exactly one GPU visible (before anything initialises CUDA here),
    then run the pool's own ``initializer``."""
    if devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = devices.get()
    if initializer is not None:
        initializer(*initargs)


def process_pool(
    max_workers: int, gpus: int = 0, initializer=None, initargs: tuple = ()
) -> ProcessPoolExecutor:
    """A pool of ``max_workers`` spawned processes (a forked CUDA context is invalid), each running
    ``initializer(*initargs)`` first. With ``gpus`` > 0, worker i sees only GPU i mod gpus (of those
    in ``$CUDA_VISIBLE_DEVICES``, if set) as its device 0."""
    ctx = multiprocessing.get_context("spawn")
    devices = None
    if gpus > 0:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else [str(i) for i in range(gpus)]
        devices = ctx.Queue()
        for i in range(max_workers):
            devices.put(ids[i % min(gpus, len(ids))].strip())
    init = (devices, initializer, initargs)
    return ProcessPoolExecutor(max_workers, mp_context=ctx, initializer=_init_worker, initargs=init)


def run_trial(params: dict, base: dict, data: tuple) -> dict:
    """Train one model: ``base`` defaults overridden by ``params``; data is
    (X, y, X_valid, y_valid). Returns params plus valid_acc, epochs and seconds."""
    merged = {**base, **params}
    model = MLP(**{k: v for k, v in merged.items() if k in _MODEL_KEYS})
    X, y, Xv, yv = data
    hist = model.fit(
        X, y, X_valid=Xv, y_valid=yv, **{k: v for k, v in merged.items() if k not in _MODEL_KEYS}
    )
    return {
        "params": params,
        "valid_acc": max(hist["valid_acc"]),
        "epochs": len(hist),
        "seconds": sum(hist["seconds"]),
        "backend": model.be.name,
    }


@dataclass
class SearchResult:
    """All trials, best first."""

    trials: list[dict] = field(default_factory=list)

    @property
    def best(self) -> dict:
        return self.trials[0]


def search(
    space: Mapping,
    data: tuple,
    *,
    method: str = "random",
    n_trials: int = 10,
    rounds: int = 1,
    shrink: float = 0.3,
    base: Mapping | None = None,
    executor: Executor | None = None,
    seed: int = 0,
    workers: int | None = None,
) -> SearchResult:
    """Grid or random search over ``space`` on data (X, y, X_valid, y_valid).

    With ``rounds > 1`` (random search only) each round samples ``n_trials``
    configurations from a space refined around the best so far: coarse to fine.
    ``base`` holds fixed MLP/fit keywords (e.g. spec, epochs, batch_size).
    Without an ``executor``, trials run in a local pool of ``workers`` spawned
    processes (default :func:`default_workers` for ``base["backend"]``, at most
    one per trial of a round)."""
    check_method(method, rounds)
    base = dict(base or {})
    unknown = set(space) - _MODEL_KEYS - _FIT_KEYS
    if unknown:
        raise ValueError(f"unknown hyper-parameters {sorted(unknown)}: use MLP or fit keyword names")
    own = executor is None
    if own:
        per_round = len(grid(space)) if method == "grid" else n_trials
        gpus = trial_gpus(base["backend"] if isinstance(base.get("backend"), str) else None)
        executor = process_pool(workers or min(gpus or os.cpu_count() or 1, max(1, per_round)), gpus=gpus)

    def run(configs: list[dict]) -> list[dict]:
        futures = [executor.submit(run_trial, c, base, data) for c in configs]
        return sorted((f.result() for f in futures), key=lambda t: -t["valid_acc"])

    try:
        trials = coarse_to_fine(
            space, run, method=method, n_trials=n_trials, rounds=rounds, shrink=shrink, seed=seed
        )
    finally:
        if own:
            executor.shutdown()
    return SearchResult(sorted(trials, key=lambda t: -t["valid_acc"]))


def check_method(method: str, rounds: int) -> None:
    """ValueError unless ``method`` is grid or random, and rounds > 1 come with random."""
    if method not in ("grid", "random"):
        raise ValueError(f"method must be 'grid' or 'random', got {method!r}")
    if method == "grid" and rounds != 1:
        raise ValueError("coarse-to-fine rounds need random search (method='random', --method random)")


def coarse_to_fine(
    space: Mapping, run, *, method: str, n_trials: int, rounds: int, shrink: float, seed: int
) -> list[dict]:
    """Search rounds: each runs ``run(configs) -> trials, best first`` on the grid of ``space`` or
    ``n_trials`` random samples of it, then narrows the space around the best trial so far
    (``refine``). -> every trial, each with its ``round`` (1-based), in the order run."""
    check_method(method, rounds)
    trials: list[dict] = []
    best = None
    for r in range(rounds):
        found = run(grid(space) if method == "grid" else sample(space, n_trials, seed + r))
        for t in found:
            t["round"] = r + 1
        trials += found
        if best is None or found[0]["valid_acc"] > best["valid_acc"]:
            best = found[0]
        if r + 1 < rounds:
            space = refine(space, best["params"], shrink)
    return trials
