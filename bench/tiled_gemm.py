"""An experiment: a register-tiled SIMD GEMM for the numba backend, against OpenBLAS.

Question: can the numba backend beat the GEMM floor (OpenBLAS through ``np.matmul``) at the MLP
shapes, and so ONNX Runtime's seed inference at batch 4096, with a GEMM of its own? Answer
measured here: the GEMM alone, yes, where ``b`` fits a core's L2; inside a training step or a
``predict`` it loses most of that, and beside OpenBLAS's thread pool it collapses, so the kernels
keep OpenBLAS (see the issue-15 note and ``bench/results/tiled_gemm.md``).

The kernel: ``c = alpha * a @ b + beta * c`` with ``a`` read in place (each of MR rows a broadcast
stream, any strides, so ``x.T`` needs no copy) and ``b`` row by row; each MR x NV*W tile (W = 16
float32 / 8 float64 lanes with AVX-512, half that without) keeps its accumulators in vector
registers over the whole K loop. The tile is LLVM IR built through a Numba intrinsic (explicit
``llvm.fma`` on vectors, masked loads and stores for the last vector of a row, so N needs no
padding); the loops around it are plain jitted code, and threads (``prange``) split the rows.
Every element is one FMA chain over k in order, so results do not depend on the thread split.

    python bench/tiled_gemm.py [--rounds 3] [--out bench/results/tiled_gemm.md]

Every timing runs in a fresh process per engine (``openblas``, ``tiled``: every GEMM tiled;
``mixed``: tiled only where b <= 1 MiB), processes alternating round by round, the median of
the rounds' best reported: two spinning thread pools in one process would time each other.
Each tiled engine runs with a Numba cache of its own (the step graphs' source is the same).
"""

from __future__ import annotations

import functools

import llvmlite.binding as llvm_binding
import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from gpumlp.kernels._jit import njit


def _targets_avx512() -> bool:
    """Whether Numba compiles for a CPU with AVX-512: the host's features, unless NUMBA_CPU_NAME /
    NUMBA_CPU_FEATURES name another target (e.g. a portable ``haswell`` build)."""
    name, features = numba.config.CPU_NAME, numba.config.CPU_FEATURES
    if features:
        return "+avx512f" in features.split(",")
    if name not in (None, "host"):
        return False  # a named CPU without named features: assume the portable AVX2 layout
    return "+avx512f" in llvm_binding.get_host_cpu_features().flatten().split(",")


AVX512 = _targets_avx512()
MR = 6  # rows per tile: MR * NV accumulators + NV vectors of b + a broadcast fit 32 (16) registers
NV = 4 if AVX512 else 2  # vectors per row of a tile
ROWS_PER_CHUNK = 96  # rows a thread takes at a time: a chunk of a (96 x K) stays in L2 across panels
PARALLEL_MIN_FLOPS = 4_000_000  # below: one thread (a parallel region costs a few microseconds)
MIXED_MAX_B_BYTES = 1 << 20  # engine "mixed": tiled where b fits a core's L2, else OpenBLAS


_I1, _I32, _I64 = ir.IntType(1), ir.IntType(32), ir.IntType(64)


def lanes(dtype: np.dtype) -> int:
    """SIMD lanes per vector for ``dtype`` (float32/float64) on this CPU."""
    return (64 if AVX512 else 32) // np.dtype(dtype).itemsize


def _splat(builder: ir.IRBuilder, value: ir.Value, vec: ir.VectorType) -> ir.Value:
    one = builder.insert_element(ir.Constant(vec, ir.Undefined), value, ir.Constant(_I32, 0))
    lane0 = ir.Constant(ir.VectorType(_I32, vec.count), [0] * vec.count)
    return builder.shuffle_vector(one, ir.Constant(vec, ir.Undefined), lane0)


def _name(vec: ir.VectorType) -> str:
    """LLVM's overload suffix of a float vector type, e.g. v16f32."""
    return f"v{vec.count}f{'32' if isinstance(vec.element, ir.FloatType) else '64'}"


def _masked(builder: ir.IRBuilder, vec: ir.VectorType, store: bool) -> ir.Function:
    ptr, mask = vec.as_pointer(), ir.VectorType(_I1, vec.count)
    opaque = llvm_binding.llvm_version_info >= (15,)  # pointers in intrinsic names: "p0", typed "p0v16f32"
    suffix = f"{_name(vec)}.p0" + ("" if opaque else _name(vec))
    if store:
        fnty = ir.FunctionType(ir.VoidType(), [vec, ptr, _I32, mask])
        return cgutils.get_or_insert_function(builder.module, fnty, f"llvm.masked.store.{suffix}")
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [ptr, _I32, mask, vec]),
                                          f"llvm.masked.load.{suffix}")  # fmt: skip


def _make_tile(nv: int):
    """The tile intrinsic, ``nv`` vectors a row: c[tile] = alpha * a[rows] @ b[:, cols] + beta * c[tile]."""

    @intrinsic
    def tile(typingctx, a, a0, rs, ks, b, b0, ldb, c, c0, ldc, k, nrows, ncols, alpha, beta):
        sig = types.void(a, a0, rs, ks, b, b0, ldb, c, c0, ldc, k, nrows, ncols, alpha, beta)

        def codegen(context, builder, signature, args):
            a, a0, rs, ks, b, b0, ldb, c, c0, ldc, k, nrows, ncols, alpha, beta = args
            real = context.get_value_type(signature.args[0].dtype)
            w = lanes(np.dtype(str(signature.args[0].dtype)))
            vec, vptr = ir.VectorType(real, w), ir.VectorType(real, w).as_pointer()
            fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec] * 3),
                                                 f"llvm.fma.{_name(vec)}")  # fmt: skip
            load, store = _masked(builder, vec, False), _masked(builder, vec, True)
            itemsize = np.dtype(str(signature.args[0].dtype)).itemsize
            align, zero = ir.Constant(_I32, itemsize), ir.Constant(vec, [0.0] * w)

            def data(i, value, offset):
                ptr = context.make_array(signature.args[i])(context, builder, value).data
                return builder.gep(ptr, [offset])

            pa, pb, pc = data(0, a, a0), data(4, b, b0), data(7, c, c0)
            i64 = lambda n: ir.Constant(_I64, n)  # noqa: E731
            last_row = builder.sub(nrows, i64(1))
            rows = []  # rows past nrows read the last valid row (their results are not stored)
            for r in range(MR):
                row = builder.select(builder.icmp_signed("<", i64(r), nrows), i64(r), last_row)
                rows.append(builder.gep(pa, [builder.mul(row, rs)]))
            lanes_i64 = ir.VectorType(_I64, w)
            lane_ids, valid = ir.Constant(lanes_i64, list(range(w))), _splat(builder, ncols, lanes_i64)
            # lane j of vector v is written where column v*w + j < ncols
            firsts = [_splat(builder, i64(v * w), lanes_i64) for v in range(nv)]
            masks = [builder.icmp_signed("<", builder.add(lane_ids, first), valid) for first in firsts]

            entry = builder.block
            loop, done = builder.append_basic_block("tile.k"), builder.append_basic_block("tile.out")
            builder.cbranch(builder.icmp_signed(">", k, i64(0)), loop, done)
            builder.position_at_end(loop)
            kk = builder.phi(_I64)
            acc = [builder.phi(vec) for _ in range(MR * nv)]
            brow = builder.gep(pb, [builder.mul(kk, ldb)])
            bptrs = [builder.bitcast(builder.gep(brow, [i64(v * w)]), vptr) for v in range(nv)]
            bv = [builder.call(load, [p, align, mask, zero]) for p, mask in zip(bptrs, masks)]
            koff = builder.mul(kk, ks)
            new = []
            for r in range(MR):
                x = _splat(builder, builder.load(builder.gep(rows[r], [koff])), vec)
                new += [builder.call(fma, [x, bv[v], acc[r * nv + v]]) for v in range(nv)]
            k_next = builder.add(kk, i64(1))
            kk.add_incoming(i64(0), entry)
            kk.add_incoming(k_next, loop)
            for p, n in zip(acc, new):
                p.add_incoming(zero, entry)
                p.add_incoming(n, loop)
            builder.cbranch(builder.icmp_signed("<", k_next, k), loop, done)

            builder.position_at_end(done)
            out = []
            for n in new:
                p = builder.phi(vec)
                p.add_incoming(zero, entry)
                p.add_incoming(n, loop)
                out.append(p)
            dt = signature.args[0].dtype
            alpha = context.cast(builder, alpha, signature.args[13], dt)
            beta = context.cast(builder, beta, signature.args[14], dt)
            va, vb = _splat(builder, alpha, vec), _splat(builder, beta, vec)
            keep_c = builder.fcmp_ordered("!=", beta, ir.Constant(real, 0.0))  # beta 0: c is not read (NaN?)
            for r in range(MR):
                with builder.if_then(builder.icmp_signed("<", i64(r), nrows)):
                    crow = builder.gep(pc, [builder.mul(i64(r), ldc)])
                    for v in range(nv):
                        ptr = builder.bitcast(builder.gep(crow, [i64(v * w)]), vptr)
                        res = builder.fmul(va, out[r * nv + v])
                        with builder.if_else(keep_c) as (then, otherwise):
                            with then:
                                old = builder.call(load, [ptr, align, masks[v], zero])
                                upd, from_then = builder.call(fma, [vb, old, res]), builder.block
                            with otherwise:
                                from_else = builder.block
                        value = builder.phi(vec)
                        value.add_incoming(upd, from_then)
                        value.add_incoming(res, from_else)
                        builder.call(store, [value, ptr, align, masks[v]])
            return context.get_dummy_value()

        return sig, codegen

    return tile


_VEC_BYTES = 64 if AVX512 else 32
_TILE_1, _TILE_2, _TILE_3, _TILE_4 = (_make_tile(min(nv, NV)) for nv in range(1, 5))


@njit(cache=True, error_model="numpy")
def _rows(c, a, b, alpha, beta, i0, i1):
    # rows i0..i1 of c: panel by panel (NV vectors wide), MR rows at a time
    m, n = c.shape
    k = a.shape[1]
    rs, ks = a.strides[0] // a.itemsize, a.strides[1] // a.itemsize
    ldb, ldc = b.strides[0] // b.itemsize, c.strides[0] // c.itemsize
    w = _VEC_BYTES // c.itemsize
    for j0 in range(0, n, NV * w):
        ncols = min(NV * w, n - j0)
        nv = (ncols + w - 1) // w
        for i in range(i0, i1, MR):
            nrows = min(MR, i1 - i)
            if nv == 4:
                _TILE_4(a, i * rs, rs, ks, b, j0, ldb, c, i * ldc + j0, ldc, k, nrows, ncols, alpha, beta)
            elif nv == 3:
                _TILE_3(a, i * rs, rs, ks, b, j0, ldb, c, i * ldc + j0, ldc, k, nrows, ncols, alpha, beta)
            elif nv == 2:
                _TILE_2(a, i * rs, rs, ks, b, j0, ldb, c, i * ldc + j0, ldc, k, nrows, ncols, alpha, beta)
            else:
                _TILE_1(a, i * rs, rs, ks, b, j0, ldb, c, i * ldc + j0, ldc, k, nrows, ncols, alpha, beta)


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
    """A stand-in for numba_cpu's OpenBLAS call ``_gemm(c, a, b, alpha, beta, ta, tb)``."""
    from gpumlp.kernels import numba_cpu

    blas, limit = numba_cpu._gemm, MIXED_MAX_B_BYTES if mixed else 1 << 62

    @njit(error_model="numpy")
    def tiled(c, a, b, alpha, beta, ta, tb):
        if b.size * b.itemsize > limit:
            blas(c, a, b, alpha, beta, ta, tb)
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
                env = None if engine == "openblas" else own_cache
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
