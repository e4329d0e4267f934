"""Where search trials run, with the training data sent to each worker once, not with every trial.

- :class:`LocalTrials`: a ``spawn`` process pool (a forked CUDA context is invalid); the data
  reaches each worker once through the pool's initializer and stays in a module global there.
- :class:`DaskTrials`: a ``dask.distributed`` Client, on a ``LocalCluster`` it starts or on a
  running scheduler it joins (``tcp://HOST:PORT``); the data is scattered once (broadcast to every
  worker) and each trial gets the scattered future, which dask resolves on the worker.

Both submit :func:`run_shared_trial` and return ``concurrent.futures``-style futures.
"""

from __future__ import annotations

import os
import uuid

import numpy as np

from gpumlp.search import process_pool, trial_gpus

_WORKER_DATA: dict[str, tuple] = {}  # in each local worker: data token -> (X, y, X_valid, y_valid)


def default_workers(backend: str) -> int:
    """One worker per GPU on cupy, else one per two CPU cores (numba and BLAS use two threads well)."""
    return trial_gpus(backend) or max(1, (os.cpu_count() or 1) // 2)


def _keep_data(token: str, data: tuple) -> None:
    """Pool initializer: keep the data in this worker for every trial it runs."""
    _WORKER_DATA[token] = data


def run_shared_trial(params: dict, base: dict, data) -> dict:
    """One trial on a worker: ``data`` is the tuple itself (dask resolved its future) or the token of
    a local worker's copy. ``params["hidden"]`` (hidden widths) becomes the spec. A diverged run
    scores 0 with its error instead of failing the whole search."""
    from gpumlp.search import run_trial
    from gpumlp.train import TrainingDiverged

    data = _WORKER_DATA[data] if isinstance(data, str) else data
    run = dict(params)
    if "hidden" in run:
        hidden = run.pop("hidden")
        widths = str(base["spec"]).split("-")
        hidden = [hidden] if isinstance(hidden, int) else hidden
        run["spec"] = "-".join([widths[0], *map(str, hidden), widths[-1]])
    try:
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            result = run_trial(run, base, data)
    except TrainingDiverged as e:
        result = {"valid_acc": 0.0, "epochs": 0, "seconds": 0.0, "backend": "", "error": str(e)}
    result["params"] = params
    result["pid"] = os.getpid()
    return result


class LocalTrials:
    """``workers`` spawned processes, each holding the data from its start; with ``gpus`` > 0 each
    sees one GPU (:func:`gpumlp.search.process_pool`: of those in ``$CUDA_VISIBLE_DEVICES``, if set)."""

    def __init__(self, data: tuple, workers: int, gpus: int = 0):
        self.token = uuid.uuid4().hex
        self.pool = process_pool(workers, gpus, initializer=_keep_data, initargs=(self.token, data))
        self.description = f"{workers} local process{'es' * (workers > 1)} (spawn)"

    def submit(self, params: dict, base: dict):
        return self.pool.submit(run_shared_trial, params, base, self.token)

    def close(self) -> None:
        self.pool.shutdown(cancel_futures=True)


class DaskTrials:
    """Trials on a dask.distributed cluster: ``address`` ``local`` starts a LocalCluster of
    ``workers`` single-threaded worker processes; ``tcp://HOST:PORT`` joins a running scheduler."""

    def __init__(self, data: tuple, address: str, workers: int):
        try:
            from dask.distributed import Client, LocalCluster
        except ImportError:
            raise ImportError("--dask needs dask.distributed: pip install 'gpumlp[dask]'") from None
        from gpumlp import logs

        logs.silence_third_party()  # importing distributed sets its own log levels
        self.cluster = None
        if address == "local":
            self.cluster = LocalCluster(
                n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None
            )
            address = self.cluster.scheduler_address
        try:
            self.client = Client(address, timeout=30)
        except OSError as e:
            self.close()
            raise OSError(f"cannot reach the dask scheduler at {address} ({e}); is it running?") from None
        # One scatter, replicated to every worker: each trial then names the data instead of carrying it.
        [self.data] = self.client.scatter([data], broadcast=True, hash=False)
        n = len(self.client.scheduler_info(n_workers=-1)["workers"])
        self.description = f"dask at {address} ({n} worker{'s' * (n != 1)})"

    def submit(self, params: dict, base: dict):
        return self.client.submit(run_shared_trial, params, base, self.data, pure=False)

    def scatter_count(self) -> int:
        """How many scatters this client made, from the scheduler's event log."""
        events = self.client.get_events(self.client.id)  # the scheduler logs each scatter under the client
        return sum(1 for _, e in events if isinstance(e, dict) and e.get("action") == "scatter")

    def close(self) -> None:
        if getattr(self, "client", None) is not None:
            self.client.close()
        if self.cluster is not None:
            self.cluster.close()
