"""pytest-benchmark epochs: one pass over 55,000 MNIST samples per config and backend.

Run with ``pytest bench/ --benchmark-only`` (add ``--benchmark-json PATH`` to keep the
numbers). Each round is one full epoch through ``gpumlp.train.fit``; the first
epoch of every (config, backend) is a warm-up and is not timed. Unavailable
backends (and PyTorch when not installed) are skipped with the reason.
``GPUMLP_BENCH_SAMPLES`` shortens the epoch (the time is then for that many samples).
"""

from __future__ import annotations

import os

import pytest

from gpumlp.backend import BackendUnavailable, get_backend
from gpumlp.bench.runner import CONFIGS, EPOCH_SAMPLES, PEERS, Config

BACKENDS = ("numpy", "numba", "cupy", "torch")
SAMPLES = int(os.environ.get("GPUMLP_BENCH_SAMPLES", EPOCH_SAMPLES))


@pytest.fixture(scope="module")
def mnist():
    from gpumlp.data import load_mnist, scale_pixels

    m = load_mnist()
    return scale_pixels(m.x_train[:SAMPLES], "0,1"), m.y_train[:SAMPLES]


def _epoch_runner(name: str, cfg: Config, X, y):
    """-> a zero-argument function running one more epoch on a warm model."""
    if name in PEERS:
        pytest.importorskip("torch", reason="the PyTorch peer needs torch: pip install 'gpumlp[peer]'")
        from gpumlp.bench.peers import TorchRecipe

        peer = TorchRecipe(cfg.widths, cfg.act, cfg.loss, cfg.optimizer, cfg.lr)
        peer.fit(X, y, 1, cfg.batch_size, cfg.reduction)  # warm-up
        return lambda: peer.fit(X, y, 1, cfg.batch_size, cfg.reduction)
    try:
        get_backend(name)
    except BackendUnavailable as e:
        pytest.skip(str(e))
    from gpumlp.model import MLP
    from gpumlp.train import fit

    model = MLP(cfg.spec, act=cfg.act, loss=cfg.loss, backend=name)
    kw = dict(
        epochs=1, batch_size=cfg.batch_size, optimizer=cfg.optimizer, lr=cfg.lr, reduction=cfg.reduction
    )
    fit(model, X, y, **kw)  # warm-up: JIT, thread pools, buffers
    return lambda: fit(model, X, y, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_epoch(benchmark, mnist, config, backend):
    """Seconds for one epoch of ``config`` on ``backend``."""
    X, y = mnist
    cfg = CONFIGS[config]
    run = _epoch_runner(backend, cfg, X, y)
    benchmark.group = f"epoch {config} {cfg.spec}"
    benchmark.extra_info.update({"samples": X.shape[0], "spec": cfg.spec, "batch_size": cfg.batch_size})
    benchmark.pedantic(run, rounds=3, iterations=1)
