"""From what size a numba training step gains from two cores: Adam epochs of MLPs of growing
width, with step graphs on two cores (``GPUMLP_STEP_GRAPHS=2``) and on one (``=1``), alternated
round by round in one process. Behind the lower limit of ``numba_graph._pays_on_two_cores``:
below it the two-core step would not be used, so this script forces it by lowering the limit.

Prints, per model, the largest GEMM of its step (multiply-adds), the best epoch of each mode
and the median of the per-round ratios (< 1: two cores are faster).

Usage: ``python bench/two_core_sizes.py [--models 64-32-10:100,...] [--rows 6000] [--rounds 5]
[--out bench/results/two_core_sizes.md]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import numpy as np

from gpumlp.kernels import numba_graph
from gpumlp.model import MLP

MODELS = "64-32-10:100,128-64-10:100,784-32-10:100,256-128-10:128,784-64-10:100,512-256-10:128"


def _best_epoch(spec: str, batch: int, mode: str, X, y) -> float:
    """Best of epochs 2-3 (the first compiles) of Adam on ``spec`` with step graphs in ``mode``."""
    os.environ["GPUMLP_STEP_GRAPHS"] = mode  # read when a step is captured
    model = MLP(spec, act="relu", backend="numba", seed=0)
    hist = model.fit(X, y, epochs=3, batch_size=batch, optimizer="adam", lr=1e-3, seed=1)
    return min(r["seconds"] for r in hist.records[1:])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=MODELS, help="spec:batch,... ")
    ap.add_argument("--rows", type=int, default=6000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    numba_graph._PAIR_MIN_MNK = 0  # measure below the limit too
    rng = np.random.default_rng(0)
    lines = ["| model | batch | largest GEMM (multiply-adds) | one core ms/epoch | two cores ms/epoch "
             "| two cores / one core (median) |", "|---|---|---|---|---|---|"]  # fmt: skip
    for item in args.models.split(","):
        spec, batch = item.split(":")
        widths, batch = [int(w) for w in spec.split("-")], int(batch)
        X = rng.uniform(-1, 1, (args.rows, widths[0])).astype(np.float32)
        y = rng.integers(0, widths[-1], args.rows)
        times: dict[str, list[float]] = {"1": [], "2": []}
        for _ in range(args.rounds):
            for mode in times:
                times[mode].append(_best_epoch(spec, batch, mode, X, y))
        ratio = statistics.median(two / one for two, one in zip(times["2"], times["1"]))
        largest = max(batch * a * b for a, b in zip(widths, widths[1:]))
        lines.append(f"| {spec} | {batch} | {largest / 1e6:.2f}M | {min(times['1']) * 1e3:.2f} "
                     f"| {min(times['2']) * 1e3:.2f} | {ratio:.2f} |")  # fmt: skip
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
