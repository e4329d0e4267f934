"""The numba backend's fused predict (``dense_chain``), measured where its two choices are made.

1. Dot tiles (``numba_tiles.dot_columns``): one thread's ``tile_rows`` over a 4096-row product with
   every column in vector tiles, with the rule's last columns in dot tiles, and with every column
   in dot tiles. Behind the rule: the columns left over a vector, when few, and products narrower
   than a vector. Then the seed model's fused predict (``dense_chain``, both threads) with and
   without them (the script swaps ``numba_cpu._dot_columns`` for a rule that takes none).
2. Models with a weight matrix beyond ``CHAIN_MAX_WEIGHT_BYTES``: ``predict`` layer by layer
   (``CHAIN_MAX_WEIGHT_BYTES = 0``), as one chain on OpenBLAS's pool with the last layer tiled
   (the pair's limit raised out of reach), and as one chain on two cores of ours (the limit 0).
   Behind ``numba_cpu._CHAIN_PAIR_MIN_FLOPS``: the script sets these module constants itself.

Each cell is the best over rounds, the variants alternated round by round in one process.

Usage: ``python bench/predict_paths.py [--rounds 5] [--models 784-1024-1024-10,...]
[--batches 1,64,256,1024,4096] [--out bench/results/predict_paths.md]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from gpumlp.kernels import numba_cpu, numba_tiles
from gpumlp.model import MLP

SHAPES = ((784, 100), (100, 10), (1024, 10), (1024, 4), (784, 24), (784, 40))  # (K, N), 4096 rows
MODELS = "784-1024-1024-10,784-2048-10,784-512-512-10"
PATHS = ("layers", "chain, OpenBLAS's pool", "chain, two cores")


def _best(fn, rounds: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        best = min(best, (time.perf_counter() - t0) / repeats)
    return best


def _dot_table(rounds: int) -> list[str]:
    rng = np.random.default_rng(0)
    lines = ["| 4096 x K x N | dot columns (rule) | vector tiles ms | rule ms | all dot ms | rule speed-up |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for k, n in SHAPES:
        a = rng.standard_normal((4096, k)).astype(np.float32)
        b = rng.standard_normal((k, n)).astype(np.float32)
        c = np.empty((4096, n), np.float32)
        panels = (np.empty((0, k), np.float32), numba_tiles.dot_panel(b), np.ascontiguousarray(b.T))
        runs = [lambda a=a, b=b, c=c, p=p: numba_tiles.tile_rows(c, 0, a, 0, 4096, b, 1.0, 0.0, p)
                for p in panels]  # fmt: skip
        for run in runs:  # compiled, and in cache
            run()
        times = [[] for _ in runs]
        for _ in range(rounds):
            for run, t in zip(runs, times):
                t.append(_best(run, 1, 5))
        vec, rule, dot = (min(t) * 1e3 for t in times)
        lines.append(f"| 4096 x {k} x {n} | {panels[1].shape[0]} | {vec:.3f} | {rule:.3f} | {dot:.3f} "
                     f"| {vec / rule:.2f} |")  # fmt: skip
    return lines


def _seed_table(rounds: int) -> list[str]:
    rng = np.random.default_rng(2)
    ws = [(rng.standard_normal(s) / 28).astype(np.float32) for s in ((784, 100), (100, 10))]
    bs, acts = [np.zeros(100, np.float32), np.zeros(10, np.float32)], ["sigmoid", "identity"]
    X = rng.random((4096, 784), dtype=np.float32)
    rule = numba_cpu._dot_columns
    variants = {"vector tiles only": lambda n, dtype: 0, "dot tiles (the rule)": rule}
    lines = ["| batch | " + " | ".join(f"{v} µs" for v in variants) + " | speed-up |", "|---|---|---|---|"]
    try:
        for batch in (1, 64, 4096):
            x, labels, times = X[:batch], np.empty(batch, np.int64), {v: [] for v in variants}
            call = lambda x=x, labels=labels: numba_cpu.dense_chain(x, ws, bs, acts, labels=labels)  # noqa: E731
            for _ in range(rounds):
                for name, columns in variants.items():
                    numba_cpu._dot_columns, numba_cpu._CHAIN_SCRATCH.panels = columns, {}  # panels repacked
                    call()
                    times[name].append(_best(call, 1, max(3, 20000 // batch)))
            vec, dot = (min(t) * 1e6 for t in times.values())
            lines.append(f"| {batch} | {vec:.1f} | {dot:.1f} | {vec / dot:.2f} |")
    finally:
        numba_cpu._dot_columns, numba_cpu._CHAIN_SCRATCH.panels = rule, {}
    return lines


def _path_table(models: str, batches: list[int], rounds: int) -> list[str]:
    limit, pair_limit = numba_cpu.CHAIN_MAX_WEIGHT_BYTES, numba_cpu._CHAIN_PAIR_MIN_FLOPS
    settings = {PATHS[0]: (0, pair_limit), PATHS[1]: (limit, float("inf")), PATHS[2]: (limit, 0)}
    X = np.random.default_rng(1).random((max(batches), 784), dtype=np.float32)
    lines = ["| model | batch | " + " | ".join(f"{p} ms" for p in PATHS) + " | fastest |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    try:
        for spec in models.split(","):
            model = MLP(spec, act="relu", loss="softmax_xent", backend="numba")
            for batch in batches:
                x, times = X[:batch], {p: [] for p in PATHS}
                call = lambda m=model, x=x: m.predict(x)  # noqa: E731
                for _ in range(rounds):
                    for path, (cap, pair) in settings.items():
                        numba_cpu.CHAIN_MAX_WEIGHT_BYTES, numba_cpu._CHAIN_PAIR_MIN_FLOPS = cap, pair
                        call()
                        times[path].append(_best(call, 1, max(1, 2000 // batch)))
                best = {p: min(t) * 1e3 for p, t in times.items()}
                cells = " | ".join(f"{best[p]:.3f}" for p in PATHS)
                lines.append(f"| {spec} | {batch} | {cells} | {min(best, key=best.get)} |")
    finally:
        numba_cpu.CHAIN_MAX_WEIGHT_BYTES, numba_cpu._CHAIN_PAIR_MIN_FLOPS = limit, pair_limit
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--models", default=MODELS)
    ap.add_argument("--batches", default="1,64,256,1024,4096")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if not numba_tiles.SIMD_TILES:
        print("no tiles on this CPU (not x86 with AVX2 and FMA): nothing to measure", file=sys.stderr)
        return 1
    batches = [int(b) for b in args.batches.split(",")]
    text = "\n".join(["### Dot tiles (float32, one thread)", "", *_dot_table(args.rounds), "",
                      "### Fused seed predict, 784-100-10 sigmoid (float32)", "", *_seed_table(args.rounds),
                      "", "### Models with weights beyond the tiles' limit: predict paths (float32)", "",
                      *_path_table(args.models, batches, args.rounds)])  # fmt: skip
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
