"""A register-tiled SIMD matrix product for Numba code: ``c = alpha * a @ b + beta * c``, row block
by row block, so that a fused kernel can multiply the rows it owns without leaving its thread.

Each tile is MR rows x NV vectors (W = 16 float32 / 8 float64 lanes with AVX-512, half that
without) of ``c``, whose accumulators stay in vector registers over the whole K loop: every step
loads NV vectors of a row of ``b`` and broadcasts one element of each of the MR rows of ``a``
(read in place with any strides, so ``x.T`` needs no copy). 1-3 rows (a batch of 1, the end of
a slice) take a tile of that many rows (``TILE_ROWS``), whose K loop is 2-3x shorter than an
MR-row tile's. Each tile is an LLVM function of its own, built once per (rows, vectors, dtype)
by an intrinsic, with explicit ``llvm.fma`` on vectors and masked
loads and stores for the last vector of a row (N needs no padding). It is marked ``noinline``:
inlined into a bigger kernel, LLVM's register allocation of the K loop degraded (measured: a fused
predict at 2.56 ms per 4096 rows instead of 1.62 ms).

Every element of ``c`` is one FMA chain over k in order, so a result does not depend on how rows
are split between threads. Where it pays (measured, ``bench/tiled_gemm.py``): ``b`` that fits a
core's L2 (the tile is at the FMA peak there); rows of a 1024-wide ``b`` lie 4 KiB apart and
alias in the caches, where OpenBLAS's packed GEMM wins.
"""

from __future__ import annotations

import platform

import llvmlite.binding as llvm_binding
import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ._jit import njit  # numba.njit, without the disk cache where none can be written

__all__ = ["AVX512", "DOT_MR", "DOT_NC", "MR", "NV", "SIMD_TILES", "SMALL_ROWS_MAX", "TILE_ROWS",
           "dot_columns", "dot_panel", "lanes", "pack_dot_panel", "tile_rows"]  # fmt: skip


def _targets(feature: str) -> bool:
    """Whether Numba compiles for a CPU with ``feature`` (e.g. "avx512f"): the host's features,
    unless NUMBA_CPU_NAME / NUMBA_CPU_FEATURES name another target (e.g. a portable ``haswell``
    build: a named CPU without named features is taken as AVX2 and FMA without AVX-512)."""
    name, features = numba.config.CPU_NAME, numba.config.CPU_FEATURES
    if features:
        return f"+{feature}" in features.split(",")
    if name not in (None, "host"):
        return feature in ("avx2", "fma")
    return f"+{feature}" in llvm_binding.get_host_cpu_features().flatten().split(",")


_X86 = platform.machine().lower() in ("x86_64", "amd64")
AVX512 = _X86 and _targets("avx512f")
# Whether the tiles compile to the vector code they were measured as (AVX2 or AVX-512 FMA); elsewhere
# they are correct but unmeasured, and the numba backend keeps BLAS.
SIMD_TILES = _X86 and _targets("avx2") and _targets("fma")
MR = 6  # rows per tile: MR * NV accumulators + NV vectors of b + a broadcast fit 32 (16) registers
NV = 4 if AVX512 else 2  # vectors per row of a tile
_VEC_BYTES = 64 if AVX512 else 32
_I1, _I32, _I64 = ir.IntType(1), ir.IntType(32), ir.IntType(64)


def lanes(dtype) -> int:
    """SIMD lanes per vector for ``dtype`` (float32/float64) on this CPU."""
    return _VEC_BYTES // np.dtype(dtype).itemsize


def _splat(builder: ir.IRBuilder, value: ir.Value, vec: ir.VectorType) -> ir.Value:
    one = builder.insert_element(ir.Constant(vec, ir.Undefined), value, ir.Constant(_I32, 0))
    lane0 = ir.Constant(ir.VectorType(_I32, vec.count), [0] * vec.count)
    return builder.shuffle_vector(one, ir.Constant(vec, ir.Undefined), lane0)


def _name(vec: ir.VectorType) -> str:
    """LLVM's overload suffix of a float vector type, e.g. v16f32."""
    return f"v{vec.count}f{'32' if isinstance(vec.element, ir.FloatType) else '64'}"


def _masked(module: ir.Module, vec: ir.VectorType, store: bool) -> ir.Function:
    ptr, mask = vec.as_pointer(), ir.VectorType(_I1, vec.count)
    opaque = llvm_binding.llvm_version_info >= (15,)  # pointers in intrinsic names: "p0", typed "p0v16f32"
    suffix = f"{_name(vec)}.p0" + ("" if opaque else _name(vec))
    if store:
        fnty = ir.FunctionType(ir.VoidType(), [vec, ptr, _I32, mask])
        return cgutils.get_or_insert_function(module, fnty, f"llvm.masked.store.{suffix}")
    return cgutils.get_or_insert_function(module, ir.FunctionType(vec, [ptr, _I32, mask, vec]),
                                          f"llvm.masked.load.{suffix}")  # fmt: skip


def _declare(module: ir.Module, name: str, args: list) -> tuple[ir.Function, bool]:
    """The internal, noinline void function ``name(*args)`` of ``module`` -> (it, True when its body
    is still to be written)."""
    fn = cgutils.get_or_insert_function(module, ir.FunctionType(ir.VoidType(), args), name)
    if not fn.is_declaration:
        return fn, False
    fn.linkage = "internal"
    fn.attributes.add("noinline")
    return fn, True


def _plus_beta_c(builder: ir.IRBuilder, keep_c: ir.Value, res: ir.Value, old, fma: ir.Function,
                 beta: ir.Value) -> ir.Value:  # fmt: skip
    """res, or fma(beta, old(), res) where keep_c: c is read (``old`` emits its load) only then."""
    with builder.if_else(keep_c) as (then, otherwise):
        with then:
            upd, from_then = builder.call(fma, [beta, old(), res]), builder.block
        with otherwise:
            from_else = builder.block
    value = builder.phi(res.type)
    value.add_incoming(upd, from_then)
    value.add_incoming(res, from_else)
    return value


def _row_pointers(builder: ir.IRBuilder, base: ir.Value, stride: ir.Value, nrows: ir.Value, mr: int) -> list:
    """Pointers to rows 0..mr-1 of ``base`` (``stride`` elements apart); rows past nrows point at the
    last valid row (a tile reads them, and does not store their results)."""
    last_row, rows = builder.sub(nrows, ir.Constant(_I64, 1)), []
    for r in (ir.Constant(_I64, r) for r in range(mr)):
        row = builder.select(builder.icmp_signed("<", r, nrows), r, last_row)
        rows.append(builder.gep(base, [builder.mul(row, stride)]))
    return rows


def _k_loop(builder: ir.IRBuilder, vec: ir.VectorType, count: int, stride: int, bound: ir.Value,
            step) -> list:  # fmt: skip
    """A loop kk = 0, stride, ... while kk < bound (skipped when bound <= 0) over ``count``
    accumulators of type vec from zero: ``step(kk, acc)`` emits one step -> the new ones. Leaves
    the builder after the loop -> the final accumulators (zero when the loop did not run)."""
    entry, zero = builder.block, ir.Constant(vec, [0.0] * vec.count)
    loop, after = builder.append_basic_block("k"), builder.append_basic_block("after_k")
    builder.cbranch(builder.icmp_signed(">", bound, ir.Constant(_I64, 0)), loop, after)
    builder.position_at_end(loop)
    kk = builder.phi(_I64)
    acc = [builder.phi(vec) for _ in range(count)]
    new = step(kk, acc)
    k_next, latch = builder.add(kk, ir.Constant(_I64, stride)), builder.block
    kk.add_incoming(ir.Constant(_I64, 0), entry)
    kk.add_incoming(k_next, latch)
    for p, n in zip(acc, new):
        p.add_incoming(zero, entry)
        p.add_incoming(n, latch)
    builder.cbranch(builder.icmp_signed("<", k_next, bound), loop, after)
    builder.position_at_end(after)
    out = []
    for n in new:
        p = builder.phi(vec)
        p.add_incoming(zero, entry)
        p.add_incoming(n, latch)
        out.append(p)
    return out


def _tile_function(module: ir.Module, real: ir.Type, itemsize: int, nv: int, mr: int) -> ir.Function:
    """The tile as a noinline LLVM function of ``module``: void(a*, rs, ks, b*, ldb, c*, ldc, k,
    nrows, ncols, alpha, beta) computes c[r, j] = alpha * sum_k a[r*rs + k*ks] b[k*ldb + j]
    + beta * c[r*ldc + j] for r < nrows <= mr, j < ncols <= nv * W (beta 0: c is not read)."""
    w = _VEC_BYTES // itemsize
    fptr = real.as_pointer()
    args = [fptr, _I64, _I64, fptr, _I64, fptr, _I64, _I64, _I64, _I64, real, real]
    fn, new = _declare(module, f"gpumlp_tile_{mr}x{nv}x{w}_f{itemsize * 8}", args)
    if not new:
        return fn
    pa, rs, ks, pb, ldb, pc, ldc, k, nrows, ncols, alpha, beta = fn.args
    builder = ir.IRBuilder(fn.append_basic_block("entry"))
    vec, vptr = ir.VectorType(real, w), ir.VectorType(real, w).as_pointer()
    fma = cgutils.get_or_insert_function(module, ir.FunctionType(vec, [vec] * 3), f"llvm.fma.{_name(vec)}")
    load, store = _masked(module, vec, False), _masked(module, vec, True)
    align, zero = ir.Constant(_I32, itemsize), ir.Constant(vec, [0.0] * w)
    i64 = lambda n: ir.Constant(_I64, n)  # noqa: E731
    rows = _row_pointers(builder, pa, rs, nrows, mr)
    lanes_i64 = ir.VectorType(_I64, w)
    lane_ids, valid = ir.Constant(lanes_i64, list(range(w))), _splat(builder, ncols, lanes_i64)
    # lane j of vector v is loaded and stored where column v*w + j < ncols
    firsts = [_splat(builder, i64(v * w), lanes_i64) for v in range(nv)]
    masks = [builder.icmp_signed("<", builder.add(lane_ids, first), valid) for first in firsts]

    def step(kk, acc):
        brow = builder.gep(pb, [builder.mul(kk, ldb)])
        bv = [builder.call(load, [builder.bitcast(builder.gep(brow, [i64(v * w)]), vptr), align, mask, zero])
              for v, mask in enumerate(masks)]  # fmt: skip
        koff, new = builder.mul(kk, ks), []
        for r in range(mr):
            x = _splat(builder, builder.load(builder.gep(rows[r], [koff])), vec)
            new += [builder.call(fma, [x, bv[v], acc[r * nv + v]]) for v in range(nv)]
        return new

    out = _k_loop(builder, vec, mr * nv, 1, k, step)
    va, vb = _splat(builder, alpha, vec), _splat(builder, beta, vec)
    keep_c = builder.fcmp_ordered("!=", beta, ir.Constant(real, 0.0))  # beta 0: c is not read (NaN?)
    for r in range(mr):
        with builder.if_then(builder.icmp_signed("<", i64(r), nrows)):
            crow = builder.gep(pc, [builder.mul(i64(r), ldc)])
            for v in range(nv):
                ptr = builder.bitcast(builder.gep(crow, [i64(v * w)]), vptr)
                res = builder.fmul(va, out[r * nv + v])
                old = lambda ptr=ptr, mask=masks[v]: builder.call(load, [ptr, align, mask, zero])  # noqa: E731
                value = _plus_beta_c(builder, keep_c, res, old, fma, vb)
                builder.call(store, [value, ptr, align, masks[v]])
    builder.ret_void()
    return fn


def _dot_function(module: ir.Module, real: ir.Type, itemsize: int, mr: int, nc: int) -> ir.Function:
    """The dot tile as a noinline LLVM function of ``module``: void(a*, lda, bt*, ldbt, c*, ldc, k,
    nrows, alpha, beta) computes c[r*ldc + j] = alpha * sum_k a[r*lda + k] bt[j*ldbt + k] + beta *
    c[r*ldc + j] for r < nrows <= mr, j < nc: vectors along k (W partial sums per element, added
    pairwise at the end), for the columns a vector along n would mostly waste (see tile_rows)."""
    w = _VEC_BYTES // itemsize
    fptr = real.as_pointer()
    args = [fptr, _I64, fptr, _I64, fptr, _I64, _I64, _I64, real, real]
    fn, new = _declare(module, f"gpumlp_dot_{mr}x{nc}x{w}_f{itemsize * 8}", args)
    if not new:
        return fn
    pa, lda, pbt, ldbt, pc, ldc, k, nrows, alpha, beta = fn.args
    builder = ir.IRBuilder(fn.append_basic_block("entry"))
    vec, vptr = ir.VectorType(real, w), ir.VectorType(real, w).as_pointer()
    fma = cgutils.get_or_insert_function(module, ir.FunctionType(vec, [vec] * 3), f"llvm.fma.{_name(vec)}")
    load = _masked(module, vec, False)
    align, zero = ir.Constant(_I32, itemsize), ir.Constant(vec, [0.0] * w)
    i64 = lambda n: ir.Constant(_I64, n)  # noqa: E731
    rows = _row_pointers(builder, pa, lda, nrows, mr)
    cols = [builder.gep(pbt, [builder.mul(i64(j), ldbt)]) for j in range(nc)]
    k_main = builder.and_(k, i64(-w))  # whole vectors; the rest of k: one masked step

    def step(kk, acc, mask=None):
        def vector(base):
            ptr = builder.bitcast(builder.gep(base, [kk]), vptr)
            if mask is None:
                return builder.load(ptr, align=itemsize)
            return builder.call(load, [ptr, align, mask, zero])

        av, bv = [vector(p) for p in rows], [vector(p) for p in cols]
        return [builder.call(fma, [av[r], bv[j], acc[r * nc + j]]) for r in range(mr) for j in range(nc)]

    acc = _k_loop(builder, vec, mr * nc, w, k_main, step)
    lane_ids = ir.Constant(ir.VectorType(_I64, w), list(range(w)))
    left = _splat(builder, builder.sub(k, k_main), ir.VectorType(_I64, w))
    mask = builder.icmp_signed("<", lane_ids, left)  # all false when w divides k: the step adds zeros
    sums = step(k_main, acc, mask)
    keep_c = builder.fcmp_ordered("!=", beta, ir.Constant(real, 0.0))  # beta 0: c is not read (NaN?)
    for r in range(mr):
        with builder.if_then(builder.icmp_signed("<", i64(r), nrows)):
            crow = builder.gep(pc, [builder.mul(i64(r), ldc)])
            for j in range(nc):
                res = builder.fmul(alpha, _pairwise_sum(builder, sums[r * nc + j]))
                ptr = builder.gep(crow, [i64(j)])
                old = lambda ptr=ptr: builder.load(ptr)  # noqa: E731
                builder.store(_plus_beta_c(builder, keep_c, res, old, _scalar_fma(module, real), beta), ptr)
    builder.ret_void()
    return fn


def _pairwise_sum(builder: ir.IRBuilder, v: ir.Value) -> ir.Value:
    """The lanes of float vector v added pairwise (halves until one lane is left): a scalar."""
    width = v.type.count
    while width > 1:
        width //= 2
        lo, hi = (ir.Constant(ir.VectorType(_I32, width), list(range(s, s + width))) for s in (0, width))
        v = builder.fadd(builder.shuffle_vector(v, v, lo), builder.shuffle_vector(v, v, hi))
    return builder.extract_element(v, ir.Constant(_I32, 0))


def _scalar_fma(module: ir.Module, real: ir.Type) -> ir.Function:
    suffix = "f32" if isinstance(real, ir.FloatType) else "f64"
    return cgutils.get_or_insert_function(module, ir.FunctionType(real, [real] * 3), f"llvm.fma.{suffix}")


SMALL_ROWS_MAX = 3  # up to this many rows take a tile of exactly as many rows (see tile_rows)
TILE_ROWS = (*range(1, SMALL_ROWS_MAX + 1), MR)  # the row counts of the tiles built


def _operands(context, builder: ir.IRBuilder, signature, args, first: int) -> tuple[list, ir.Type, int]:
    """A tile function's operands from an intrinsic's arguments from ``first`` on: each array and the
    element offset after it become a pointer to that element, alpha and beta (the last two) are cast
    to the arrays' dtype, the rest pass as they are. -> (operands, LLVM float type, itemsize)."""
    kinds, values = signature.args[first:], args[first:]
    dt = next(t.dtype for t in kinds if isinstance(t, types.Array))
    out, i = [], 0
    while i < len(values) - 2:
        if isinstance(kinds[i], types.Array):
            data = context.make_array(kinds[i])(context, builder, values[i]).data
            out.append(builder.gep(data, [values[i + 1]]))
            i += 2
        else:
            out.append(values[i])
            i += 1
    out += [context.cast(builder, v, t, dt) for v, t in zip(values[-2:], kinds[-2:])]
    return out, context.get_value_type(dt), np.dtype(str(dt)).itemsize


def _switch_call(builder: ir.IRBuilder, selector: ir.Value, functions: dict, operands: list) -> None:
    """Call ``functions[value](*operands)`` for the int64 selector's value (nothing for another)."""
    done = builder.append_basic_block("tile_done")
    switch = builder.switch(selector, done)
    for value, fn in functions.items():
        block = builder.append_basic_block(f"tile_{value}")
        switch.add_case(ir.Constant(_I64, value), block)
        with builder.goto_block(block):
            builder.call(fn, operands)
            builder.branch(done)
    builder.position_at_end(done)


@intrinsic
def _tile(typingctx, mr, nv, a, a0, rs, ks, b, b0, ldb, c, c0, ldc, k, nrows, ncols, alpha, beta):
    """``_tile(mr, nv, a, a0, rs, ks, b, b0, ldb, c, c0, ldc, k, nrows, ncols, alpha, beta)``: the
    tile function of mr (one of TILE_ROWS) rows by nv (1..NV) vectors on the arrays' data from
    element offsets a0, b0, c0 (strides in elements), chosen by a switch on (mr, nv)."""
    sig = types.void(mr, nv, a, a0, rs, ks, b, b0, ldb, c, c0, ldc, k, nrows, ncols, alpha, beta)

    def codegen(context, builder, signature, args):
        operands, real, itemsize = _operands(context, builder, signature, args, 2)
        mr, nv = (context.cast(builder, v, t, types.int64) for v, t in zip(args[:2], signature.args[:2]))
        functions = {rows * 8 + vectors: _tile_function(builder.module, real, itemsize, vectors, rows)
                     for rows in TILE_ROWS for vectors in range(1, NV + 1)}  # fmt: skip
        _switch_call(builder, builder.add(builder.mul(mr, ir.Constant(_I64, 8)), nv), functions, operands)
        return context.get_dummy_value()

    return sig, codegen


DOT_MR = 4 if AVX512 else 2  # rows per dot tile: DOT_MR * DOT_NC accumulators + a and bt vectors
DOT_NC = 4  # columns per dot tile


@intrinsic
def _dot(typingctx, nc, a, a0, lda, bt, bt0, ldbt, c, c0, ldc, k, nrows, alpha, beta):
    """``_dot(nc, a, a0, lda, bt, bt0, ldbt, c, c0, ldc, k, nrows, alpha, beta)``: the dot tile of
    DOT_MR rows (nrows of them stored) by nc (1..DOT_NC) columns on the arrays' data from element
    offsets a0, bt0, c0 (row strides in elements, unit column strides), chosen by a switch on nc.
    One row count only: four columns of one row take ~K/4 FMAs, so fewer rows would save little."""
    sig = types.void(nc, a, a0, lda, bt, bt0, ldbt, c, c0, ldc, k, nrows, alpha, beta)

    def codegen(context, builder, signature, args):
        operands, real, itemsize = _operands(context, builder, signature, args, 1)
        nc = context.cast(builder, args[0], signature.args[0], types.int64)
        module = builder.module
        functions = {n: _dot_function(module, real, itemsize, DOT_MR, n) for n in range(1, DOT_NC + 1)}
        _switch_call(builder, nc, functions, operands)
        return context.get_dummy_value()

    return sig, codegen


def dot_columns(n: int, dtype) -> int:
    """How many of a product's n columns (the last ones) the dot tiles take: all of them when n is
    under a vector, else the part of a vector left over, n % W, when at most a quarter of one (a
    vector tile spends a whole vector's FMAs on them). Measured (float32, AVX-512, one thread,
    ``bench/predict_paths.py``): 4096 x 1024 @ (1024, 10) 0.68 against 0.90 ms in a masked vector;
    4 of 100 columns, 1.08x; 24 or 40 columns all in dot tiles lost (0.81 against 0.78 ms, 1.27
    against 1.16); a fused 4096-row 784-100-10 predict 1.50 against 1.58 ms."""
    w = lanes(dtype)
    return n if n < w else (n % w if 4 * (n % w) <= w else 0)


def dot_panel(b: np.ndarray) -> np.ndarray:
    """The dot tiles' operand of b (K, N): its last ``dot_columns(N)`` columns, transposed and
    contiguous, (nd, K), b's dtype."""
    out = np.empty((dot_columns(b.shape[1], b.dtype), b.shape[0]), b.dtype)
    pack_dot_panel(b, out)
    return out


@njit(cache=True, error_model="numpy")
def pack_dot_panel(b, out):
    """out (nd, K) = b[:, N - nd:].T for b (K, N): the dot tiles' operand, into a buffer."""
    nd, n = out.shape[0], b.shape[1]
    for j in range(nd):
        for k in range(b.shape[0]):
            out[j, k] = b[k, n - nd + j]


@njit(cache=True, error_model="numpy")
def tile_rows(c, c0, a, a0, m, b, alpha, beta, bt):
    """c[c0 + r] = alpha * a[a0 + r] @ b + beta * c[c0 + r] for r < m, panel by panel (NV vectors
    of b's columns), MR rows at a time (1-3 rows left: a smaller tile); b's last bt.shape[0]
    columns (``dot_panel(b)``: bt is them transposed) by dot tiles where a's rows are contiguous.
    a: (>= a0 + m, K), any strides; b: (K, N) and c: (>= c0 + m, N), unit column stride; one float
    dtype; m, N, K > 0 (the caller checks). beta 0: c is only written."""
    n, k = c.shape[1], a.shape[1]
    rs, ks = a.strides[0] // a.itemsize, a.strides[1] // a.itemsize
    ldb, ldc = b.strides[0] // b.itemsize, c.strides[0] // c.itemsize
    w = _VEC_BYTES // c.itemsize
    nd = bt.shape[0] if ks == 1 or k == 1 else 0
    for j0 in range(0, n - nd, NV * w):
        ncols = min(NV * w, n - nd - j0)
        nv = (ncols + w - 1) // w
        for r in range(0, m, MR):
            # 1-3 rows left: a tile of that many. An MR-row tile costs the same for 1 row as for MR (its
            # missing rows repeat the last one); for 4-5 rows it beat two smaller tiles (measured).
            # Every element is the same FMA chain over k in every tile: results do not depend on it.
            nrows = min(MR, m - r)
            tile = nrows if nrows <= SMALL_ROWS_MAX else MR
            ao, co = (a0 + r) * rs, (c0 + r) * ldc + j0
            _tile(tile, nv, a, ao, rs, ks, b, j0, ldb, c, co, ldc, k, nrows, ncols, alpha, beta)
    ldbt = bt.strides[0] // bt.itemsize
    for r in range(0, m, DOT_MR):  # each element the same sum whatever its tile: rows stay independent
        nrows = min(DOT_MR, m - r)
        for j in range(0, nd, DOT_NC):
            ao, co = (a0 + r) * rs, (c0 + r) * ldc + n - nd + j
            _dot(min(DOT_NC, nd - j), a, ao, rs, bt, j * ldbt, ldbt, c, co, ldc, k, nrows, alpha, beta)
