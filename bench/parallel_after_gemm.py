"""Why the Numba elementwise kernels stay serial beside a multi-threaded BLAS, and what Adam's
float32 arithmetic buys: the numbers behind the README's "Threads" paragraph, in one process.

    python bench/parallel_after_gemm.py [--rounds 15] [--out bench/results/parallel_after_gemm.md]

Each case is timed alone and right after a GEMM (OpenBLAS's workers then spin on the other cores),
serial and parallel variant interleaved round by round; the best round counts. The last table
times ``predict`` of 784-1024-1024-10 at batch 4096, layer by layer, under the rule (parallel only beside a
single-threaded BLAS) and with the parallel variants allowed everywhere (the rule before).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from gpumlp import MLP
from gpumlp.bench.machine import cpu_model
from gpumlp.kernels import numba_cpu as k


def best_us(fns: dict, rounds: int, inner: int, before=None) -> dict:
    """{name: best µs per call over interleaved rounds}; ``before()`` runs untimed before each call."""
    best = dict.fromkeys(fns, float("inf"))
    for fn in fns.values():
        fn()  # compiled or loaded from the cache
    for _ in range(rounds):
        for name, fn in fns.items():
            total = 0.0
            for _ in range(inner):
                if before:
                    before()
                t0 = time.perf_counter()
                fn()
                total += time.perf_counter() - t0
            best[name] = min(best[name], total / inner * 1e6)
    return best


def adam_cases(rounds: int) -> list[tuple]:
    """Adam on the 203,264 weights of 784-256-10 (float32)."""
    rng = np.random.default_rng(0)
    w, g, m, v = (rng.random(203264, dtype=np.float32) for _ in range(4))
    own = tuple(map(np.float32, (1e-3, 0.9, 0.999, 0.1, 0.001, 1e-8, 1.001, 1.0, 0.0, 0.0)))
    f64 = tuple(map(float, own))  # the same values as float64 scalars: the arithmetic before
    a, b = rng.random((128, 784), dtype=np.float32), rng.random((784, 256), dtype=np.float32)
    nt, n, step = k.numba.get_num_threads(), w.size, np.array([3], np.int64)
    rows = []
    lo, hi = np.uint64(0), np.uint64(n)  # unsigned, as the parallel variants pass them: SIMD loops
    dtype_fns = {"float64 scalars": lambda: k._adam_range(w, g, m, v, *f64, lo, hi),
                 "weights' dtype": lambda: k._adam_range(w, g, m, v, *own, lo, hi)}  # fmt: skip
    t = best_us(dtype_fns, rounds, 50)
    rows.append(("Adam 203k, arithmetic", t["float64 scalars"], t["weights' dtype"]))
    hyper = (1e-3, 0.9, 0.999, 1e-8, 1.0, 0.0, 0.0)  # lr, beta1, beta2, eps, keep, l2, l1
    par_fns = {"serial": lambda: k._adam_serial(w, g, m, v, step, *hyper),
               "parallel": lambda: k._adam_par(w, g, m, v, step, *hyper, nt)}  # fmt: skip
    for label, before in (("alone", None), ("after a 128x784x256 GEMM", lambda: a @ b)):
        t = best_us(par_fns, rounds, 20, before)
        rows.append((f"Adam 203k, {label}", t["serial"], t["parallel"]))
    return rows


def bias_act_cases(rounds: int) -> list[tuple]:
    """bias + ReLU on 4096x1024 (float32), serial vs parallel variant."""
    rng = np.random.default_rng(1)
    z, bias = rng.random((4096, 1024), dtype=np.float32), np.zeros(1024, np.float32)
    out, c = np.empty_like(z), np.empty_like(z)
    a, b = rng.random((4096, 1024), dtype=np.float32), rng.random((1024, 1024), dtype=np.float32)
    nt, relu = k.numba.get_num_threads(), k.activation("relu").code
    fns = {"serial": lambda: k._bias_act_serial(z, bias, out, out, False, relu),
           "parallel": lambda: k._bias_act_par(z, bias, out, out, False, relu, nt)}  # fmt: skip
    rows = []
    for label, before in (("alone", None), ("after a 4096x1024x1024 GEMM", lambda: np.matmul(a, b, out=c))):
        t = best_us(fns, rounds, 5, before)
        rows.append((f"bias+ReLU 4M, {label}", t["serial"], t["parallel"]))
    return rows


def predict_case(rounds: int) -> tuple:
    """predict of 784-1024-1024-10 at batch 4096, layer by layer (its fused path is timed by
    bench/predict_paths.py): the rule vs parallel variants everywhere."""
    net = MLP("784-1024-1024-10", act="relu", loss="softmax_xent", backend="numba", dtype="float32")
    x = np.random.default_rng(2).random((4096, 784), dtype=np.float32)
    rule, fused = k._blas_pool_idle, k.CHAIN_MAX_WEIGHT_BYTES

    def everywhere():
        k._blas_pool_idle = lambda: True
        try:
            net.predict(x)
        finally:
            k._blas_pool_idle = rule

    k.CHAIN_MAX_WEIGHT_BYTES = 0  # layer by layer
    try:
        t = best_us({"parallel everywhere": everywhere, "rule": lambda: net.predict(x)}, rounds, 1)
    finally:
        k.CHAIN_MAX_WEIGHT_BYTES = fused
    return ("predict 784-1024-1024-10 layer by layer, batch 4096", t["parallel everywhere"], t["rule"])


def render(rows: list[tuple], header: str) -> str:
    lines = [header, "", "| case | before / serial µs | now / parallel µs | ratio |", "|---|---|---|---|"]
    lines += [f"| {name} | {x:.1f} | {y:.1f} | {y / x:.2f} |" for name, x, y in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--out", help="also write the markdown here")
    args = ap.parse_args()
    env = {key: os.environ.get(key, "(unset)") for key in ("OPENBLAS_CORETYPE", "OPENBLAS_NUM_THREADS")}
    head = (
        f"## Numba elementwise kernels beside OpenBLAS, and Adam's arithmetic (float32)\n\n"
        f"{cpu_model()}, Numba threads {k.numba.get_num_threads()}, env {env}; "
        f"best of {args.rounds} interleaved rounds; `python bench/parallel_after_gemm.py`"
    )
    adam = adam_cases(args.rounds)
    tables = [
        (adam[:1], "Adam: float64 scalars (before) vs the weights' dtype (now)"),
        (adam[1:] + bias_act_cases(args.rounds), "Serial vs parallel variant (ratio > 1: parallel slower)"),
        ([predict_case(args.rounds)], "predict: parallel variants everywhere (before) vs the rule (now)"),
    ]
    text = "\n\n".join([head, *(render(rows, title) for rows, title in tables)])
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
