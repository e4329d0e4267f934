"""Numba step graphs against the per-kernel step: same weights, and how much faster.

For each config it trains the same model from the same seed for one shuffled epoch twice, with
the numba backend replaying its full-size steps as step graphs (``gpumlp.kernels.numba_graph``,
the default) and kernel by kernel (``replays_steps=False``), and checks that the weights agree bit
for bit. Then it times epochs of both, interleaved in one process, and prints the median µs per
step and the median of the per-round ratios (< 1: the graph is faster).

Usage: ``python bench/step_graphs.py [--configs seed,adam256,deep1024] [--samples 11000] [--repeats 7]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys

import numpy as np

from gpumlp.backend import get_backend
from gpumlp.bench.runner import CONFIGS
from gpumlp.model import MLP
from gpumlp.train import fit


def _fit(backend, cfg, X, y, seed: int):
    """(model, History) after one epoch of ``cfg`` from model seed 0, shuffled by ``seed``."""
    model = MLP(cfg.spec, act=cfg.act, loss=cfg.loss, dtype="float32", backend=backend, seed=0)
    hist = fit(model, X, y, epochs=1, batch_size=cfg.batch_size, optimizer=cfg.optimizer, lr=cfg.lr,
               reduction=cfg.reduction, seed=seed, divergence_factor=None)  # fmt: skip
    return model, hist


def compare(cfg_name: str, X, y, repeats: int) -> dict:
    """Per-kernel and graph µs/step (medians), their ratio and the largest weight difference."""
    cfg, graphs = CONFIGS[cfg_name], get_backend("numba")
    kernels = dataclasses.replace(graphs, replays_steps=False)
    steps = -(-X.shape[0] // cfg.batch_size)
    (a, _), (b, _) = _fit(graphs, cfg, X, y, 0), _fit(kernels, cfg, X, y, 0)  # also compiles
    wa, wb = a.state_arrays(), b.state_arrays()
    diff = max(float(np.max(np.abs(wa[k] - wb[k]))) for k in wa)
    times: dict[str, list[float]] = {"graph": [], "kernels": []}
    for r in range(repeats):
        for name, be in (("graph", graphs), ("kernels", kernels)):
            times[name].append(_fit(be, cfg, X, y, r + 1)[1].records[0]["seconds"] / steps)
    ratios = [g / k for g, k in zip(times["graph"], times["kernels"])]
    return {
        "config": cfg_name, "kernel_us": statistics.median(times["kernels"]) * 1e6,
        "graph_us": statistics.median(times["graph"]) * 1e6, "ratio": statistics.median(ratios), "diff": diff,
    }  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default="seed,adam256,deep1024")
    ap.add_argument("--samples", type=int, default=11000)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)
    from gpumlp.data import load_mnist, scale_pixels

    m = load_mnist()
    X, y = scale_pixels(m.x_train[: args.samples]), m.y_train[: args.samples]
    print("| config | per-kernel µs/step | graph µs/step | graph / per-kernel (median) | max abs Δw, 1 epoch |")  # noqa: E501
    print("|---|---|---|---|---|")
    for name in args.configs.split(","):
        r = compare(name, X, y, args.repeats)
        print(f"| {name} | {r['kernel_us']:.1f} | {r['graph_us']:.1f} | {r['ratio']:.3f} | {r['diff']:.2g} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
