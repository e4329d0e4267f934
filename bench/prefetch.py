"""What the gathers' software prefetch (``kernels/numba_prefetch.py``) buys: each numba gather timed
with its hint and with the same kernel compiled without it, interleaved in one process.

    python bench/prefetch.py [--rounds 7] [--rows 55000] [--out bench/results/prefetch.md]

A minibatch of 128 random rows of a rows x 784 float32 set (MNIST's 55,000 by default: 172 MB,
beyond the caches, as in training), a fresh batch of indices per call; the median per call of each
round, the best round kept. ``gather_shifted`` shifts by up to 2 px.
"""

from __future__ import annotations

import argparse
import time
import types
from pathlib import Path

import numpy as np
from numba import njit

from gpumlp.bench.machine import cpu_model
from gpumlp.kernels import numba_cpu as k

BATCH, FEATURES, CALLS = 128, 784, 200


@njit
def _no_hint(src, idx, r):
    pass


def without_hint(kernel):
    """``kernel`` (a numba_cpu gather body) compiled afresh with its prefetch hint a no-op."""
    fn = kernel.py_func
    namespace = {**fn.__globals__, "_prefetch_gather": _no_hint}
    return njit(error_model="numpy")(types.FunctionType(fn.__code__, namespace, fn.__name__))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--rows", type=int, default=55_000)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    src = rng.random((args.rows, FEATURES), dtype=np.float32)
    out = np.empty((BATCH, FEATURES), np.float32)
    words = k._stream(0, 0, BATCH)
    shift_args = (28, 2, np.float32(1), np.float32(0), *words)  # float images: copied as they are
    cases = {
        "gather_rows": (k._gather_k, lambda fn, idx: fn(src, idx, out)),
        "gather_shifted ±2 px": (k._gather_shifted_k, lambda fn, idx: fn(src, idx, out, *shift_args)),
    }
    rows = []
    for name, (kernel, call) in cases.items():
        variants = {"hint": kernel, "no hint": without_hint(kernel)}
        best = dict.fromkeys(variants, float("inf"))
        for fn in variants.values():
            call(fn, np.arange(BATCH))  # compiled (or loaded) before timing
        for _ in range(args.rounds):
            for label, fn in variants.items():
                times = []
                for _ in range(CALLS):
                    idx = rng.integers(0, args.rows, BATCH)
                    t0 = time.perf_counter()
                    call(fn, idx)
                    times.append(time.perf_counter() - t0)
                best[label] = min(best[label], float(np.median(times)) * 1e6)
        plain, hinted = best["no hint"], best["hint"]
        rows.append(f"| {name} | {plain:.1f} | {hinted:.1f} | {plain / hinted:.2f} |")
    text = "\n".join([
        f"## Gathers with and without the prefetch hint ({cpu_model()}, one thread, float32)",
        "",
        f"`python bench/prefetch.py --rounds {args.rounds} --rows {args.rows}`: {BATCH} random rows of a "
        f"{args.rows} x {FEATURES} set per call; median of {CALLS} calls per round, best round.",
        "",
        "| kernel | no hint µs | hint µs | speed-up |",
        "|---|---|---|---|",
        *rows,
        "",
    ])  # fmt: skip
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
