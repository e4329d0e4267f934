"""Numba step graphs against the per-kernel step: same weights, and how much faster, on one core
and on two.

For each config it trains the same model from the same seed for one shuffled epoch three ways with
the numba backend: kernel by kernel (``replays_steps=False``), replaying its full-size steps as
step graphs on one core (``GPUMLP_STEP_GRAPHS=1``) and on two (``=2``, the default where there are
two CPUs; ``gpumlp.kernels.numba_pair``). It checks that the one-core graph's weights equal the
per-kernel ones bit for bit and reports the two-core graph's largest difference (rounding: OpenBLAS
may round a band of a product differently from the whole). Then it times epochs of all three,
interleaved in one process, and prints the median µs per step and the medians of the per-round
ratios to the per-kernel step (< 1: the graph is faster).

Usage: ``python bench/step_graphs.py [--configs seed,adam256,deep1024] [--samples 11000] [--repeats 7]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys

import numpy as np

from gpumlp.backend import get_backend
from gpumlp.bench.runner import CONFIGS
from gpumlp.model import MLP
from gpumlp.train import fit

MODES = ("kernels", "one core", "two cores")


def _fit(mode: str, cfg, X, y, seed: int):
    """(model, History) after one epoch of ``cfg`` from model seed 0, shuffled by ``seed``, in ``mode``."""
    backend = get_backend("numba")
    if mode == "kernels":
        backend = dataclasses.replace(backend, replays_steps=False)
    os.environ["GPUMLP_STEP_GRAPHS"] = "1" if mode == "one core" else "2"  # read when a step is captured
    model = MLP(cfg.spec, act=cfg.act, loss=cfg.loss, dtype="float32", backend=backend, seed=0)
    hist = fit(model, X, y, epochs=1, batch_size=cfg.batch_size, optimizer=cfg.optimizer, lr=cfg.lr,
               reduction=cfg.reduction, seed=seed, divergence_factor=None)  # fmt: skip
    return model, hist


def compare(cfg_name: str, X, y, repeats: int) -> dict:
    """µs/step of each mode (medians), the graphs' ratios to the per-kernel step and their largest
    weight differences from it."""
    cfg = CONFIGS[cfg_name]
    steps = -(-X.shape[0] // cfg.batch_size)
    weights = {mode: _fit(mode, cfg, X, y, 0)[0].state_arrays() for mode in MODES}  # also compiles
    diff = {
        mode: max(float(np.max(np.abs(weights[mode][k] - weights["kernels"][k]))) for k in weights[mode])
        for mode in MODES[1:]
    }
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for r in range(repeats):
        for mode in MODES:
            times[mode].append(_fit(mode, cfg, X, y, r + 1)[1].records[0]["seconds"] / steps)
    ratio = {m: statistics.median(g / k for g, k in zip(times[m], times["kernels"])) for m in MODES[1:]}
    return {"config": cfg_name, "us": {m: statistics.median(times[m]) * 1e6 for m in MODES}, "ratio": ratio,
            "diff": diff}  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default="seed,adam256,deep1024")
    ap.add_argument("--samples", type=int, default=11000)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)
    from gpumlp.data import load_mnist, scale_pixels

    m = load_mnist()
    X, y = scale_pixels(m.x_train[: args.samples]), m.y_train[: args.samples]
    print("| config | per-kernel µs/step | one-core graph µs/step | two-core graph µs/step "
          "| one core / per-kernel | two cores / per-kernel "
          "| max abs Δw one core | max abs Δw two cores |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for name in args.configs.split(","):
        r = compare(name, X, y, args.repeats)
        us, ratio, diff = r["us"], r["ratio"], r["diff"]
        print(f"| {name} | {us['kernels']:.1f} | {us['one core']:.1f} | {us['two cores']:.1f} "
              f"| {ratio['one core']:.3f} | {ratio['two cores']:.3f} | {diff['one core']:.2g} "
              f"| {diff['two cores']:.2g} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
