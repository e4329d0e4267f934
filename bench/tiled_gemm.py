"""An experiment: a register-tiled SIMD GEMM for the numba backend, against OpenBLAS.

Question: can the numba backend beat the GEMM floor (OpenBLAS through ``np.matmul``) at the MLP
shapes, and so ONNX Runtime's seed inference at batch 4096, with a GEMM of its own? Answer
measured here: the GEMM alone, yes, where ``b`` fits a core's L2; inside a training step or a
layer-by-layer ``predict`` it loses most of that, and beside OpenBLAS's thread pool it collapses, so
the training kernels keep OpenBLAS (see ``bench/results/tiled_gemm.md``). A whole predict as one
fused kernel on these tiles does pay: ``dense_chain`` (``gpumlp bench``'s inference section).

The GEMM: ``c = alpha * a @ b + beta * c`` through the register tiles of
``gpumlp.kernels.numba_tiles`` (which the numba backend's fused inference kernel, ``dense_chain``,
now uses), threads (``prange``) splitting the rows. Every element is one FMA chain over k in
order, so results do not depend on the thread split. The ``predict`` rows run the layer-by-layer
predict in every engine (``GPUMLP_CHAIN_MAX_WEIGHT_BYTES=0``): the fused one, ``dense_chain``,
calls no GEMM that an engine could replace.

    python bench/tiled_gemm.py [--rounds 3] [--out bench/results/tiled_gemm.md]

Every timing runs in a fresh process per engine (``openblas``, ``tiled``: every GEMM tiled;
``mixed``: tiled only where b <= 1 MiB), processes alternating round by round, the median of
the rounds' best reported: two spinning thread pools in one process would time each other.
Each tiled engine runs with a Numba cache of its own (the step graphs' source is the same).
"""

from __future__ import annotations

import functools

import numba
import numpy as np
from numba import prange

from gpumlp.kernels._jit import njit
from gpumlp.kernels.numba_tiles import MR, tile_rows

ROWS_PER_CHUNK = 96  # rows a thread takes at a time: a chunk of a (96 x K) stays in L2 across panels
PARALLEL_MIN_FLOPS = 4_000_000  # below: one thread (a parallel region costs a few microseconds)
MIXED_MAX_B_BYTES = 1 << 20  # engine "mixed": tiled where b fits a core's L2, else OpenBLAS


@njit(cache=True, error_model="numpy")
def _rows(c, a, b, alpha, beta, i0, i1):
    tile_rows(c, i0, a, i0, i1 - i0, b, alpha, beta, np.empty((0, a.shape[1]), c.dtype))  # vector tiles only


@njit(cache=True, error_model="numpy", parallel=True)
def _gemm_parallel(c, a, b, alpha, beta, chunk):
    m = c.shape[0]
    for t in prange((m + chunk - 1) // chunk):
        _rows(c, a, b, alpha, beta, t * chunk, min(m, (t + 1) * chunk))


@njit(cache=True, error_model="numpy")
def gemm(c, a, b, alpha, beta, chunk):
    """c = alpha * a @ b + beta * c in place. a: (M, K) any strides (e.g. ``x.T``); b: (K, N) with
    unit column stride; c: (M, N), unit column stride; one float dtype; M, N, K > 0 (checked by
    the caller). beta 0: c is only written. chunk: rows per parallel task, a multiple of MR (0: one
    thread)."""
    if chunk == 0:
        _rows(c, a, b, alpha, beta, 0, c.shape[0])
    else:
        _gemm_parallel(c, a, b, alpha, beta, chunk)


@njit(cache=True, error_model="numpy")
def gemm_bt(c, a, bt, alpha, beta, chunk):
    """:func:`gemm` with b given transposed (bt: (N, K), any strides): b is first copied row by row
    (small b only: the copy is cheap there)."""
    b = np.empty((bt.shape[1], bt.shape[0]), dtype=bt.dtype)
    for j in range(bt.shape[0]):
        for kk in range(bt.shape[1]):
            b[kk, j] = bt[j, kk]
    gemm(c, a, b, alpha, beta, chunk)


# ------------------------------------------------------------------ the experiment
# The configured thread count, not numba.get_num_threads(): that starts the pool at import, and in
# that order every parallel region of a training process waited a scheduler time slice (8 ms).
_THREADS = numba.config.NUMBA_NUM_THREADS


@njit(error_model="numpy")
def _chunk(m, n, k):
    if _THREADS == 1 or 2.0 * m * n * k < PARALLEL_MIN_FLOPS:
        return 0
    share = -(-m // _THREADS)  # rows per thread, rounded up, then to whole tiles
    return min(ROWS_PER_CHUNK, -(-share // MR) * MR)


def _engine_gemm(mixed: bool):
    """A stand-in for numba_cpu's OpenBLAS call ``_gemm(c, a, b, alpha, beta, ta, tb, split_k)``
    (products it does not tile keep numba_cpu's split over K)."""
    from gpumlp.kernels import numba_cpu

    blas, limit = numba_cpu._gemm, MIXED_MAX_B_BYTES if mixed else 1 << 62

    @njit(error_model="numpy")
    def tiled(c, a, b, alpha, beta, ta, tb, split_k):
        if b.size * b.itemsize > limit:
            blas(c, a, b, alpha, beta, ta, tb, split_k)
            return
        op_a = a.T if ta else a
        chunk = _chunk(c.shape[0], c.shape[1], op_a.shape[1])
        if tb:
            gemm_bt(c, op_a, b, alpha, beta, chunk)
        else:
            gemm(c, op_a, b, alpha, beta, chunk)

    return tiled


GEMMS = [  # (label, m, k, n, a transposed): the configs' step GEMMs and batch-4096 inference
    ("predict seed x·W1", 4096, 784, 100, False), ("predict wide x·W2", 4096, 1024, 1024, False),
    ("seed x·W1", 100, 784, 100, False), ("seed xᵀ·dz1", 784, 100, 100, True),
    ("adam256 x·W1", 128, 784, 256, False), ("adam256 xᵀ·dz1", 784, 128, 256, True),
    ("deep1024 x·W2", 256, 1024, 1024, False), ("deep1024 xᵀ·dz2", 1024, 256, 1024, True),
]  # fmt: skip
STEP_CONFIGS = ("seed", "adam256", "deep1024")
PREDICT_MODELS = ("seed", "wide")


def _best_us(fn, seconds: float = 0.03, rounds: int = 7) -> float:
    import time

    fn()
    t0 = time.perf_counter()
    fn()
    inner = max(1, int(seconds / max(time.perf_counter() - t0, 1e-7)))
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - t0) / inner)
    return best * 1e6


def _worker(engine: str, samples: int) -> dict:
    """One process's measurements for one engine -> {row label: µs}."""
    from gpumlp.kernels import numba_cpu

    if engine != "openblas":
        numba_cpu._gemm = _engine_gemm(mixed=engine == "mixed")
    out, rng = {}, np.random.default_rng(0)
    for label, m, k, n, trans in GEMMS:
        a = rng.standard_normal((k, m) if trans else (m, k)).astype(np.float32)
        b, c = rng.standard_normal((k, n)).astype(np.float32), np.empty((m, n), np.float32)
        run = functools.partial(numba_cpu.matmul, a, b, out=c, trans_a=trans)
        out["gemm " + label] = _best_us(run)
    from gpumlp.bench.inference import MODELS
    from gpumlp.bench.runner import CONFIGS
    from gpumlp.data import load_mnist, scale_pixels
    from gpumlp.model import MLP
    from gpumlp.train import fit

    mnist = load_mnist()
    X, y = scale_pixels(mnist.x_train[:samples]), mnist.y_train[:samples]
    for name in STEP_CONFIGS:
        cfg = CONFIGS[name]
        model = MLP(cfg.spec, act=cfg.act, loss=cfg.loss, dtype="float32", backend="numba", seed=0)
        hist = fit(model, X, y, epochs=3, batch_size=cfg.batch_size, optimizer=cfg.optimizer, lr=cfg.lr,
                   reduction=cfg.reduction, seed=1, divergence_factor=None)  # fmt: skip
        steps = -(-samples // cfg.batch_size)
        out["step " + name] = min(r["seconds"] for r in hist.records[1:]) / steps * 1e6
    Xt = np.ascontiguousarray(scale_pixels(mnist.x_test[:4096]), dtype=np.float32)
    for name in PREDICT_MODELS:
        spec, act, loss = MODELS[name]
        model = MLP(spec, act=act, loss=loss, dtype="float32", backend="numba", seed=0)
        out["predict " + name + " b4096"] = _best_us(lambda model=model: model.predict(Xt))
    return out


def main(argv=None) -> int:
    import argparse
    import json
    import os
    import statistics
    import subprocess
    import sys
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--samples", type=int, default=11000, help="MNIST rows per training epoch")
    ap.add_argument("--out", help="also write the markdown here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args.worker, args.samples)))
        return 0
    engines = ("openblas", "tiled", "mixed")
    runs: dict[str, list[dict]] = {e: [] for e in engines}
    with tempfile.TemporaryDirectory() as cache:
        for _ in range(args.rounds):
            for engine in engines:
                own_cache = dict(os.environ, NUMBA_CACHE_DIR=os.path.join(cache, engine))
                env = dict(os.environ) if engine == "openblas" else own_cache
                env["GPUMLP_CHAIN_MAX_WEIGHT_BYTES"] = "0"  # predict layer by layer, on the engine's GEMM
                cmd = [sys.executable, __file__, "--worker", engine, "--samples", str(args.samples)]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
                runs[engine].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    med = {e: {row: statistics.median(r[row] for r in runs[e]) for row in runs[e][0]} for e in engines}
    lines = [
        "## A register-tiled GEMM against OpenBLAS, in the numba backend (float32)", "",
        f"`python bench/tiled_gemm.py --rounds {args.rounds} --samples {args.samples}`: median over "
        "rounds of each fresh process's best; tiled = every GEMM tiled, mixed = tiled where b <= 1 MiB, "
        "else OpenBLAS. Speed-up > 1: faster than OpenBLAS.", "",
        "| what | OpenBLAS µs | tiled µs | mixed µs | tiled speed-up | mixed speed-up |",
        "|---|---|---|---|---|---|",
    ]  # fmt: skip
    for row in med["openblas"]:
        o, t, x = (med[e][row] for e in engines)
        lines.append(f"| {row} | {o:.1f} | {t:.1f} | {x:.1f} | {o / t:.2f} | {o / x:.2f} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
