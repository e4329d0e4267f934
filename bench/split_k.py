"""When numba's ``matmul`` should cut a product in two over K: the measurements behind
``numba_cpu._split_k`` and its ``_SPLIT_K_RATIO`` and ``_SPLIT_K_MAX_ROWS``.

OpenBLAS splits a GEMM's rows and columns between its threads; for a small result over a long K
its two threads wait on each other over the whole K. Cut in two over K, the halves run as one
strided batched GEMM (one half per thread of OpenBLAS's pool) and one pass adds them. Each shape
of the grid is timed both ways through ``numba_cpu.matmul`` in one process (one thread pool:
OpenBLAS's), the two interleaved round by round, best round kept::

    python bench/split_k.py [--rounds 5] [--dtype float32] [--out bench/results/split_k.md]

Shapes whose halves are at or below 2e6 multiply-adds are not timed: OpenBLAS's batched GEMM on
its small-matrix path crashes in DYNAMIC_ARCH builds up to 0.3.31 (the split never asks for it).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from gpumlp.bench.machine import cpu_model
from gpumlp.kernels import numba_cpu as k

GRID_K = (256, 512, 784, 1024, 2048)
GRID_N = (32, 64, 100, 256, 512, 1024)
GRID_M = (16, 32, 64, 100, 128, 256, 512)
TARGET_S = 0.01  # each timed batch of calls lasts about this long


def timed_us(fn, rounds: int) -> float:
    """Best over rounds of the mean µs per call of ``fn`` (calls batched to about TARGET_S)."""
    fn()
    t0 = time.perf_counter()
    fn()
    inner = max(3, min(300, int(TARGET_S / max(time.perf_counter() - t0, 1e-7))))
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - t0) / inner * 1e6)
    return best


def measure(m: int, kk: int, n: int, dtype, rounds: int) -> tuple[float, float]:
    """(one GEMM µs, split µs) for op(a) (m, kk) @ b (kk, n), interleaved round by round."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((m, kk)).astype(dtype), rng.standard_normal((kk, n)).astype(dtype)
    out = np.empty((m, n), dtype)
    rule = k._SPLIT_K_RATIO, k._SPLIT_K_MAX_ROWS
    best = {True: float("inf"), False: float("inf")}
    try:
        for _ in range(rounds):
            for split in (False, True):
                k._SPLIT_K_RATIO, k._SPLIT_K_MAX_ROWS = (0, 1 << 30) if split else (1 << 30, 0)
                assert k._split_k(out, kk) == (2 if split else 1)
                best[split] = min(best[split], timed_us(lambda: k.matmul(a, b, out=out), 1))
    finally:
        k._SPLIT_K_RATIO, k._SPLIT_K_MAX_ROWS = rule
    return best[False], best[True]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    ap.add_argument("--quick", action="store_true", help="a few shapes (a smoke run)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    dtype = np.dtype(args.dtype).type
    if not k._SPLIT_K_DTYPES or k._BLAS_THREADS() != 2:
        raise SystemExit("needs NumPy's OpenBLAS with a batched GEMM, on 2 threads (OPENBLAS_NUM_THREADS=2)")
    grid = [(m, kk, n) for kk in GRID_K for n in GRID_N for m in GRID_M]
    shapes = [(m, kk, n) for m, kk, n in grid if m * n * (kk // 2) > k._SPLIT_K_MIN_MNK]
    if args.quick:
        shapes = [(100, 784, 100), (128, 784, 256)]
    rows, gains = [], {True: [], False: []}
    for m, kk, n in shapes:
        one, split = measure(m, kk, n, dtype, args.rounds)
        picked = kk >= k._SPLIT_K_RATIO * max(m, n) and m <= k._SPLIT_K_MAX_ROWS
        gains[picked].append(one / split)
        ratio = f"{kk / max(m, n):.2f}"
        rows.append(f"| {m} | {kk} | {n} | {ratio} | {one:.1f} | {split:.1f} | {one / split:.2f} |")
    lines = [
        f"## matmul: one GEMM or two batched halves of K ({args.dtype}, {cpu_model()}, 2 OpenBLAS threads)",
        "",
        f"`python bench/split_k.py --rounds {args.rounds} --dtype {args.dtype}`: best of the interleaved "
        f"rounds, through `numba_cpu.matmul`. The rule splits for K / max(m, n) >= {k._SPLIT_K_RATIO} "
        f"and m <= {k._SPLIT_K_MAX_ROWS}.",
        "",
        "| m | K | n | K / max(m, n) | one GEMM µs | split µs | speed-up |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]
    for picked, label in ((True, "picked by the rule"), (False, "left to one GEMM")):
        if gains[picked]:
            g = gains[picked]
            lines.append(
                f"Shapes {label}: {len(g)}, split speed-up median {np.median(g):.2f}, "
                f"range {min(g):.2f}-{max(g):.2f}, {sum(x > 1 for x in g)} faster.  "
            )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
