"""Numba CPU kernels: the contract of ``gpumlp.kernels.reference``, fused and jitted.

Same public names, parameters and defaults as the reference (checked by
tests/test_contract.py); results agree within float tolerance, dropout masks
and ``hash_uniform`` bit for bit (tests/test_kernel_parity.py).

How the work is split
---------------------
* Dense ``matmul`` is BLAS. It and ``sgd_matmul_step`` call the OpenBLAS that NumPy ships
  (``cblas_?gemm`` by symbol, from jitted code, transposes as flags, ``cblas_?gemv`` for a single
  row or column; ``np.matmul`` where BLAS cannot take the operands), so that plain SGD rides on
  the weight-gradient GEMM (beta) and a step graph can replay every GEMM. A product with a long
  K and a small result runs as two batched halves of K on a 2-thread pool (``_split_k``). Inside
  a training step our own products lost to OpenBLAS (``bench/tiled_gemm.py``), but a whole eval
  forward whose weights fit a core's L2 is faster as one kernel: ``dense_chain`` (register tiles
  of ``numba_tiles``, each thread carrying a block of rows through every layer, no BLAS call).
* Wrappers call their jitted bodies through ``numba_graph.call`` (``_call``), which a step
  graph's capture records instead of running (see ``kernels/numba_graph.py``).
* Every other kernel is a Python wrapper that validates only what is cheap
  (activation name, contiguity of in-place targets) and calls one
  ``@njit(cache=True, error_model="numpy")`` kernel that makes a single pass over memory (batch
  norm: stats pass + output pass), writing into ``out=`` buffers, allocating
  only when none is given. One jitted kernel serves all activations: the
  activation is a small int code tested *outside* the inner loop, so each
  activation gets its own vectorisable loop without one compile per activation.
* Arithmetic on float32 data is done in float64 where scalars (lr, scale, ...)
  enter, and losses/column sums accumulate in float64; results are stored in
  the input dtype.

Threads (why BLAS and Numba don't fight over cores)
---------------------------------------------------
BLAS owns the cores. Kernels run one after the other, never concurrently
with a GEMM, but both OpenBLAS and Numba's OpenMP layer spin-wait after a
parallel region, so an alternating GEMM / kernel loop makes the two thread
teams starve each other (Adam on the 203k floats of 784-256-10 right after a
GEMM: 50 us serial, 4.1 ms parallel). So the ``prange`` variants run only
beside a single-threaded BLAS (or with an explicit ``GPUMLP_PAR_MIN``), and
there from 128k elements on 2 threads (measured after a one-thread GEMM: the
1-D kernels gain from 64k, bias+ReLU from 128k; at 32k all lose), scaled by
2/threads down to 64k (see ``_par_min``). ``GPUMLP_PAR_MIN`` sets it by hand.
The parallel variants run the very same jitted chunk body as the serial ones,
so both give identical results; their chunk bounds are unsigned, or LLVM
cannot rule out a negative (wrapped-around) index and leaves the loop scalar
(measured: parallel Adam 5x slower than serial, alone). ``NUMBA_NUM_THREADS=1``
makes every kernel serial.

Vectorisation notes: kernels use ``error_model="numpy"`` (division by zero
gives inf/nan like NumPy instead of a Python check, which also blocked SIMD
division: 8x slower Adam). Without Intel SVML, Numba's exp/log1p/tanh are scalar
libm calls, so the activations and losses use ``numba_math``'s polynomial versions
(<= 2.5 ulp, vectorised by LLVM) instead. NumPy's hand-tuned AVX-512 ufuncs still beat
them in two places (measured, see ``_SIMD_EXP_MIN``): ``tanh`` from 256 elements (bias add
in Numba, then ``np.tanh`` in place: 2 passes) and float64 ``sigmoid`` from 4096 elements
(3 passes around ``np.exp``). The only fast-math flag is ``contract`` (FMA) on the kernels
that inline the polynomials: NaN/inf semantics stay IEEE.
"""

from __future__ import annotations

import ctypes
import glob
import inspect
import math
import os
import sys
import threading
import time

import numba
import numpy as np
from llvmlite import binding as llvm_binding
from numba.extending import overload

from ._jit import njit  # numba.njit, without the disk cache where none can be written
from .activations import CODE_LIMIT as _CODE_LIMIT
from .activations import GELU_TANH_A as _GELU_TANH_A
from .activations import SQRT_2_OVER_PI as _SQRT_2_OVER_PI
from .activations import activation, grad_spec
from .common import PHILOX_M as _PHILOX_M
from .common import PHILOX_W as _PHILOX_W
from .common import accumulate as _accumulate  # the same 0-d accumulator glue as the reference
from .common import check_chain as _check_chain
from .common import check_permutation_size as _check_permutation_size
from .common import check_pixel_codes as _check_pixel_codes
from .common import gaussian_taps as _gaussian_taps
from .common import put as _put
from .common import step_value as _step_value
from .common import updates_running_stats as _updates_running_stats
from .images import image_side as _image_side
from .numba_graph import CAPTURABLE as _CAPTURABLE
from .numba_graph import PARALLEL_REGION as _PARALLEL
from .numba_graph import call as _call
from .numba_graph import call_host as _call_host
from .numba_graph import call_into as _call_into
from .numba_graph import call_split as _call_split
from .numba_graph import refuse as _refuse
from .numba_graph import refusing as _refusing
from .numba_math import exp as _exp
from .numba_math import log1p as _log1p
from .numba_math import sigmoid as _sigmoid
from .numba_math import tanh as _tanh
from .numba_pair import PAIR as _PAIR
from .numba_pair import barrier as _pair_barrier
from .numba_pair import go as _pair_go
from .numba_pair import next_step as _pair_next_step
from .numba_pair import session as _pair_session
from .numba_prefetch import prefetch_gather as _prefetch_gather
from .numba_tiles import MR as _MR
from .numba_tiles import SIMD_TILES as _SIMD_TILES
from .numba_tiles import dot_columns as _dot_columns
from .numba_tiles import pack_dot_panel as _pack_dot_panel
from .numba_tiles import tile_rows as _tile_rows
from .reference import ACTIVATIONS, LEAKY_SLOPE, LOG_EPS

# bias_act's internal passes around NumPy's vectorised exp (float64 sigmoid): beyond every activation code
_NEGATE, _SIGMOID_FINISH = _CODE_LIMIT, _CODE_LIMIT + 1
_INV_SQRT_2, _INV_SQRT_2PI = 1.0 / math.sqrt(2.0), 1.0 / math.sqrt(2.0 * math.pi)
# Elements from which a kernel uses its parallel variant (see the module docstring and _par_min).
_PAR_MIN_2_THREADS = 1 << 17  # measured on the 2-core dev box, beside a single-threaded BLAS
_PAR_MIN_FLOOR = 1 << 16
# Sizes from which float64 sigmoid (3 passes around NumPy's SIMD exp) and tanh (2 passes around
# np.tanh) beat the fused numba_math loop (bench/bench_kernels.py, test_bias_act_variants).
_SIMD_EXP_MIN = 1 << 12
_NUMPY_TANH_MIN = 1 << 8
_MASK32 = np.uint64(0xFFFFFFFF)
# Kernels that inline numba_math's polynomials let LLVM fuse multiply-adds (FMA): 20-35 % faster,
# and no less accurate. No other fast-math flag (NaN/inf semantics stay IEEE).
_CONTRACT = {"contract"}
_BCE_CAP = -math.log(LOG_EPS)  # largest per-class term of sigmoid_bce, as in the reference
_PROD_MAX = 2.0**900  # softmax_xent multiplies row sums (each <= K < 2^100) up to this, then logs


def _flat(a: np.ndarray, name: str) -> np.ndarray:
    """1-D view of a C-contiguous array (an error, not a silent copy, otherwise)."""
    if a.ndim == 1:
        return a
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (got strides {a.strides} for shape {a.shape})")
    return a.reshape(-1)


def _env_par_min() -> int | None:
    raw = os.environ.get("GPUMLP_PAR_MIN", "").strip()
    if not raw:
        return None
    try:
        value = int(float(raw))
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"GPUMLP_PAR_MIN must be a number of elements >= 1 (e.g. 500000), got {raw!r}")
    return value


_PAR_MIN = _env_par_min()  # None: adapt to the thread count


def _par_min(nt: int) -> int:
    """Elements from which the parallel variants run on nt threads: GPUMLP_PAR_MIN when set,
    else the 2-thread measurement scaled by 2/nt (never below 64k elements)."""
    if _PAR_MIN is not None:
        return _PAR_MIN
    return max(_PAR_MIN_FLOOR, _PAR_MIN_2_THREADS * 2 // max(nt, 1))


def _blas_pool_idle() -> bool:
    """True when NumPy's OpenBLAS runs on the calling thread only. Its worker threads spin on
    their cores for a while after every GEMM, and a parallel region competing with them lost
    badly here (Adam on 203k floats: 0.12 ms serial, 6.4 ms parallel after a GEMM; 4M-element
    bias+ReLU: 1.0 vs 1.9 ms), so the parallel variants wait for a single-threaded BLAS (or an
    explicit GPUMLP_PAR_MIN). Unknown BLAS (MKL, Accelerate): assume a pool. While a two-core
    step session holds the cores (numba_pair), its worker spins on the other one: serial."""
    return _BLAS_THREADS is not None and _BLAS_THREADS() == 1 and _PAIR.owner is None


# One parallel region of these kernels at a time in the process (numba_graph.PARALLEL_REGION): a
# caller that finds it taken runs the serial variant on its own thread.


def _run(par, serial, n: int, *args) -> None:
    """Call the parallel variant (with the thread count) for big n, else the serial one. A step
    graph records the chunk body too, which its two-core form splits (see numba_graph)."""
    chunk = _CHUNKS.get(serial)  # (body, rows); absent for a stand-in (tests)
    split = ("range", *chunk, len(args)) if chunk else None
    if n >= (_PAR_MIN_FLOOR if _PAR_MIN is None else _PAR_MIN) and (nt := numba.get_num_threads()) > 1:
        if n >= _par_min(nt) and (_PAR_MIN is not None or _blas_pool_idle()) and _PARALLEL.acquire(False):
            try:
                _call_split(split, par, *args, nt)
            finally:
                _PARALLEL.release()
            return
    _call_split(split, serial, *args)


def _split(body, rows: bool = False) -> tuple:
    """The serial and the parallel variant of a chunk body ``body(*args, lo, hi)`` (a jitted kernel
    whose last two parameters bound the elements, or the rows with ``rows``, it handles), for _run:
    ``serial(*args)`` runs [0, n); ``par(*args, nt)`` cuts it into nt chunks run under ``numba.prange``.
    n is the first argument's size (row count with ``rows``). Both call the very same body, so
    they agree bit for bit. Use: ``_foo_serial, _foo_par = _split(_foo_range)``. The parallel
    chunks' bounds are unsigned: a signed one may be negative as far as LLVM knows, so every index
    might wrap around, and the loop stayed scalar (the serial variant's constant 0 is known).

    The two are written out as source compiled at the caller's line, not closures: Numba keys a
    closure's disk cache on its pickled cell contents, and a pickled dispatcher carries a fresh
    uuid each process, so a closure would miss the cache (and add a cache file) on every run."""
    params = list(inspect.signature(body.py_func).parameters)[:-2]
    args, first = ", ".join(params), params[0]
    n = f"{first}.shape[0]" if rows else f"{first}.size"
    name = body.__name__.rsplit("_", 1)[0]
    src = (
        f"def {name}_serial({args}):\n"
        f"    {body.__name__}({args}, 0, {n})\n"
        f"def {name}_par({args}, nt):\n"
        f"    step = ({n} + nt - 1) // nt\n"
        f"    for c in numba.prange(nt):\n"
        f"        {body.__name__}({args}, np.uint64(c * step), np.uint64(min({n}, (c + 1) * step)))\n"
    )
    line = sys._getframe(1).f_lineno  # tracebacks and cache file names point at (or just below) the call
    made: dict = {}
    exec(compile("\n" * (line - 1) + src, __file__, "exec"), globals(), made)
    serial = njit(cache=True, error_model="numpy")(made[f"{name}_serial"])
    _CHUNKS[serial] = (body, rows)
    return serial, njit(cache=True, parallel=True, error_model="numpy")(made[f"{name}_par"])


_CHUNKS: dict = {}  # serial variant -> (its chunk body, whether it bounds rows), for two-core step graphs


# ======================================================================= dense
def matmul(
    a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None, trans_a: bool = False, trans_b: bool = False
) -> np.ndarray:
    """``op(a) @ op(b)`` on NumPy's OpenBLAS, transposes as flags (np.matmul, transposes as views,
    where BLAS cannot take the operands as they are). (M,K)@(K,N) -> (M,N)."""
    if out is None and a.ndim == 2 and b.ndim == 2 and a.dtype == b.dtype:
        out = np.empty((a.shape[trans_a], b.shape[not trans_b]), dtype=a.dtype)
    if out is not None and _blas_ready(out, a, b, trans_a, trans_b):
        k = a.shape[0] if trans_a else a.shape[1]
        _call(_gemm, out, a, b, 1.0, 0.0, bool(trans_a), bool(trans_b), _split_k(out, k))
        return out
    if out is None:
        _refuse("matmul: operands BLAS cannot take, and no output array, go through np.matmul")
        return np.matmul(a.T if trans_a else a, b.T if trans_b else b)
    _call_host(np.matmul, a.T if trans_a else a, b.T if trans_b else b, out=out)
    return out


def _load_openblas():
    """Make the OpenBLAS that NumPy's wheels bundle (CBLAS, 64-bit ints) callable from jitted code
    by symbol (``_cblas``): the GEMM then shares np.matmul's library and thread pool, and code
    that calls it caches on disk (a ctypes address would change every process). -> (the library,
    its ``get_num_threads`` as a ctypes function), or (None, None) elsewhere (NumPy on
    MKL/Accelerate: ``matmul`` stays ``np.matmul`` and sgd_matmul_step forms the product, then steps)."""
    root = os.path.dirname(np.__file__)
    pats = ("../numpy.libs/libscipy_openblas64_*", ".dylibs/libscipy_openblas64_*")
    for path in sorted(p for pat in pats for p in glob.glob(os.path.join(root, pat))):
        try:
            lib = ctypes.CDLL(path)
            for name in _CBLAS_GEMMS.values():
                getattr(lib, name)
            threads = ctypes.CFUNCTYPE(ctypes.c_int)(("scipy_openblas_get_num_threads64_", lib))
        except (OSError, AttributeError):
            continue
        llvm_binding.load_library_permanently(path)
        _alias_batched_gemms(lib)
        return lib, threads
    return None, None


def _alias_batched_gemms(lib) -> None:
    """Make ``lib``'s strided batched GEMMs callable from jitted code as _CBLAS_BATCHED's names, and
    record their dtypes in _SPLIT_K_DTYPES. The scipy-openblas wheels export them without their
    prefix (``cblas_sgemm_batch_strided``), a name another BLAS in the process (an LP64 one) may
    export too: an alias of this library's own address cannot resolve to theirs. An OpenBLAS
    without them (an older build) gets the aliases all the same, bound to a function that is never
    called (_split_k then never splits): jitted code that names an unresolved symbol crashes the
    process when it is compiled, even in a branch never taken."""
    for real, alias in _CBLAS_BATCHED.items():
        names = (f"scipy_{alias.removeprefix('gpumlp_')}64_", alias.removeprefix("gpumlp_"))
        found = [getattr(lib, name) for name in names if hasattr(lib, name)]
        if found:
            _SPLIT_K_DTYPES.add(np.dtype(str(real)))
        function = found[0] if found else _NEVER_CALLED
        llvm_binding.add_symbol(alias, ctypes.cast(function, ctypes.c_void_p).value)


_NEVER_CALLED = ctypes.CFUNCTYPE(None)(lambda: None)  # kept alive: its address is a symbol's


_CBLAS_GEMMS = {numba.float32: "scipy_cblas_sgemm64_", numba.float64: "scipy_cblas_dgemm64_"}
_CBLAS_GEMVS = {numba.float32: "scipy_cblas_sgemv64_", numba.float64: "scipy_cblas_dgemv64_"}
_CBLAS_BATCHED = {
    numba.float32: "gpumlp_cblas_sgemm_batch_strided", numba.float64: "gpumlp_cblas_dgemm_batch_strided"
}  # fmt: skip
_SPLIT_K_DTYPES: set = set()  # the dtypes whose batched GEMM was found: only they split K
_OPENBLAS_LIB, _BLAS_THREADS = _load_openblas()
_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112


def _cblas(c, a, b, alpha, beta, ta, tb, m, n, k, lda, ldb):
    """cblas_?gemm on c with unit-stride rows, row-major, transposes as flags (jitted code only)."""
    raise NotImplementedError("called from jitted code only")


@overload(_cblas)
def _cblas_typed(c, a, b, alpha, beta, ta, tb, m, n, k, lda, ldb):
    i32, i64, ptr, real = numba.int32, numba.int64, numba.types.voidptr, c.dtype
    sig = numba.void(i32, i32, i32, i64, i64, i64, real, ptr, i64, ptr, i64, real, ptr, i64)
    gemm, cast = numba.types.ExternalFunction(_CBLAS_GEMMS[real], sig), np.dtype(str(real)).type

    def impl(c, a, b, alpha, beta, ta, tb, m, n, k, lda, ldb):
        gemm(_ROW_MAJOR, _TRANS if ta else _NO_TRANS, _TRANS if tb else _NO_TRANS, m, n, k, cast(alpha),
             a.ctypes, lda, b.ctypes, ldb, cast(beta), c.ctypes, c.strides[0] // c.itemsize)  # fmt: skip

    return impl


def _cblas_split_k(parts, a, b, ta, tb, m, n, k, lda, ldb):
    """parts[p] = op(a)[:, p*h:(p+1)*h] @ op(b)[p*h:(p+1)*h, :], h = k // len(parts), as one
    strided batched cblas_?gemm: OpenBLAS runs each part on a thread of its pool (jitted code
    only). parts: (P, m, n) C-contiguous."""
    raise NotImplementedError("called from jitted code only")


@overload(_cblas_split_k)
def _cblas_split_k_typed(parts, a, b, ta, tb, m, n, k, lda, ldb):
    i32, i64, ptr, real = numba.int32, numba.int64, numba.types.voidptr, parts.dtype
    operand = (ptr, i64, i64)  # data, leading dimension, stride between parts
    sig = numba.void(i32, i32, i32, i64, i64, i64, real, *operand, *operand, real, *operand, i64)
    batched, cast = numba.types.ExternalFunction(_CBLAS_BATCHED[real], sig), np.dtype(str(real)).type

    def impl(parts, a, b, ta, tb, m, n, k, lda, ldb):
        count = parts.shape[0]
        h = k // count
        # a part's first K column of op(a) / K row of op(b), in elements from the operand's start
        step_a, step_b = h * lda if ta else h, h if tb else h * ldb
        op_a, op_b = _TRANS if ta else _NO_TRANS, _TRANS if tb else _NO_TRANS
        batched(_ROW_MAJOR, op_a, op_b, m, n, h, cast(1.0), a.ctypes, lda, step_a, b.ctypes, ldb, step_b,
                cast(0.0), parts.ctypes, n, m * n, count)  # fmt: skip

    return impl


def _cblas_gemv(y, incy, mat, rows, cols, ld, trans, x, incx, alpha, beta):
    """cblas_?gemv, row-major: y = alpha * op(mat) @ x + beta * y (jitted code only)."""
    raise NotImplementedError("called from jitted code only")


@overload(_cblas_gemv)
def _cblas_gemv_typed(y, incy, mat, rows, cols, ld, trans, x, incx, alpha, beta):
    i32, i64, ptr, real = numba.int32, numba.int64, numba.types.voidptr, y.dtype
    sig = numba.void(i32, i32, i64, i64, real, ptr, i64, ptr, i64, real, ptr, i64)
    gemv, cast = numba.types.ExternalFunction(_CBLAS_GEMVS[real], sig), np.dtype(str(real)).type

    def impl(y, incy, mat, rows, cols, ld, trans, x, incx, alpha, beta):
        op, a, b = _TRANS if trans else _NO_TRANS, cast(alpha), cast(beta)
        gemv(_ROW_MAJOR, op, rows, cols, a, mat.ctypes, ld, x.ctypes, incx, b, y.ctypes, incy)

    return impl


@njit(cache=True, error_model="numpy")
def _gemm(c, a, b, alpha, beta, ta, tb, split_k):
    """c = alpha * op(a) @ op(b) + beta * c through OpenBLAS (operands checked by _blas_ready). A
    single row or column of c is one gemv: OpenBLAS's gemm took 3-8x longer for a 1x1024 @
    1024x1024 (a batch of 1: predict, and every GEMM of a training step but the weight gradient).
    split_k > 1 (alpha 1, beta 0, K a multiple of it; see _split_k): c is the sum of split_k
    partial products over K, one per thread of OpenBLAS's pool."""
    m, n = c.shape
    k = a.shape[0] if ta else a.shape[1]
    lda, ldb = a.strides[0] // a.itemsize, b.strides[0] // b.itemsize
    if split_k > 1:
        parts = np.empty((split_k, m, n), c.dtype)
        _cblas_split_k(parts, a, b, ta, tb, m, n, k, lda, ldb)
        _sum_parts(c, parts, 0, m)
    elif m == 1 and n > 1:  # c[0] = op(b)ᵀ op(a)[0]; op(a)[0, j] is a[j, 0] (stride lda) when ta
        if tb:
            _cblas_gemv(c, 1, b, n, k, ldb, False, a, lda if ta else 1, alpha, beta)
        else:
            _cblas_gemv(c, 1, b, k, n, ldb, True, a, lda if ta else 1, alpha, beta)
    elif n == 1 and m > 1:  # c[:, 0] = op(a) op(b)[:, 0]; op(b)[j, 0] is b[0, j] (stride 1) when tb
        if ta:
            _cblas_gemv(c, 1, a, k, m, lda, True, b, 1 if tb else ldb, alpha, beta)
        else:
            _cblas_gemv(c, 1, a, m, k, lda, False, b, 1 if tb else ldb, alpha, beta)
    else:
        _cblas(c, a, b, alpha, beta, ta, tb, m, n, k, lda, ldb)


@njit(cache=True, error_model="numpy")
def _sum_parts(c, parts, r0, r1):
    """Rows [r0, r1) of c = the sum of the partial products parts (P, m, n), in part order."""
    for i in range(r0, r1):
        for j in range(c.shape[1]):
            total = parts[0, i, j]
            for p in range(1, parts.shape[0]):
                total += parts[p, i, j]
            c[i, j] = total


@njit(cache=True, error_model="numpy")
def _gemm_rows(c, a, b, alpha, beta, ta, tb, r0, r1):
    """Rows [r0, r1) of _gemm(c, a, b, alpha, beta, ta, tb, 1): one core's band of a two-core GEMM."""
    if ta:
        _gemm(c[r0:r1], a[:, r0:r1], b, alpha, beta, ta, tb, 1)
    else:
        _gemm(c[r0:r1], a[r0:r1], b, alpha, beta, ta, tb, 1)


@njit(cache=True, error_model="numpy")
def _gemm_cols(c, a, b, alpha, beta, ta, tb, n0, n1):
    """Columns [n0, n1) of _gemm(c, a, b, alpha, beta, ta, tb, 1): a core's band of a two-core GEMM
    whose result is wider than tall (each core then reads half of op(b), the larger operand)."""
    if tb:
        _gemm(c[:, n0:n1], a, b[n0:n1], alpha, beta, ta, tb, 1)
    else:
        _gemm(c[:, n0:n1], a, b[:, n0:n1], alpha, beta, ta, tb, 1)


@njit(cache=True, error_model="numpy")
def _gemm_k_part(parts, a, b, ta, tb, p):
    """parts[p] = op(a) @ op(b) over the p-th of len(parts) equal spans of K: one core's part of a
    two-core split-K GEMM, as _cblas_split_k computes each part on a thread of OpenBLAS's pool."""
    k = a.shape[0] if ta else a.shape[1]
    h = k // parts.shape[0]
    lda, ldb = a.strides[0] // a.itemsize, b.strides[0] // b.itemsize
    span_a = a[p * h : (p + 1) * h] if ta else a[:, p * h : (p + 1) * h]
    span_b = b[:, p * h : (p + 1) * h] if tb else b[p * h : (p + 1) * h]
    _cblas(parts[p], span_a, span_b, 1.0, 0.0, ta, tb, parts.shape[1], parts.shape[2], h, lda, ldb)


SGD_IN_GEMM = _BLAS_THREADS is not None  # sgd_matmul_step is one cblas GEMM (else: product, then step)
_GEMM_DTYPES = frozenset({np.dtype(np.float32), np.dtype(np.float64)})


def _split_k(c: np.ndarray, k: int) -> int:
    """Into how many partial products over K ``matmul`` cuts c (m, n) = op(a) @ op(b): 2 on a
    2-thread OpenBLAS pool for at most _SPLIT_K_MAX_ROWS rows and an even K of at least
    _SPLIT_K_RATIO x max(m, n), else 1. OpenBLAS splits a GEMM's M and N between its threads, so
    a small output over a long K kept them waiting on each other: the seed config's first layer,
    100x784 @ 784x100, took 60 us; as two batched halves of K plus their sum, 44 us (2 threads,
    float32). Over a grid of m 16-512, n 32-1024, K 256-2048 (``bench/split_k.py``) the 29 shapes
    this rule picks gained 0-41 % (median 13-14 %, two runs); with m > 128 or a shorter K the
    split lost more often than it won. Each half must exceed OpenBLAS's small-matrix path
    (m n K/2 > 10^6), whose batched form crashes in DYNAMIC_ARCH builds up to OpenBLAS 0.3.31
    (fixed upstream in PR 5980): the split asks for twice that. More threads: unmeasured, so no
    split."""
    m, n = c.shape
    if (
        k % 2 or m > _SPLIT_K_MAX_ROWS or k < _SPLIT_K_RATIO * max(m, n)
        or m * n * (k // 2) < _SPLIT_K_MIN_MNK or c.dtype not in _SPLIT_K_DTYPES or _BLAS_THREADS() != 2
    ):  # fmt: skip
        return 1
    return 2


_SPLIT_K_RATIO = 5
_SPLIT_K_MAX_ROWS = 128
_SPLIT_K_MIN_MNK = 2_000_000


def _blas_ready(w, a, b, trans_a: bool, trans_b: bool) -> bool:
    """Whether the direct GEMM can take these operands as they are: one float dtype, rows
    with unit stride, w C-contiguous, shapes that agree and are not empty (else the generic
    path handles them or raises). Called on every matmul: plain checks, no generators."""
    dt = w.dtype
    if not (SGD_IN_GEMM and dt in _GEMM_DTYPES and a.dtype == dt and b.dtype == dt and a.ndim == b.ndim == 2):
        return False
    m, k = a.shape[::-1] if trans_a else a.shape
    k2, n = b.shape[::-1] if trans_b else b.shape
    (ra, ca), (rb, cb), size = a.strides, b.strides, dt.itemsize
    return (
        k == k2 and m > 0 and n > 0 and k > 0 and w.shape == (m, n) and w.flags.c_contiguous
        and ca == size and cb == size and ra >= a.shape[1] * size and rb >= b.shape[1] * size
    )  # fmt: skip


@njit(cache=True, error_model="numpy", fastmath=_CONTRACT)
def _bias_act_rows(z, b, out, pre, keep, code, r0, r1):
    # codes 1/2 (sigmoid/tanh) inline numba_math's SIMD polynomials; _NEGATE / _SIGMOID_FINISH are the
    # passes around NumPy's vectorised exp (see bias_act). keep: also store z + b into pre.
    n = z.shape[1]
    if keep:
        for i in range(r0, r1):
            for j in range(n):
                pre[i, j] = z[i, j] + b[j]
    if code == 0:
        for i in range(r0, r1):
            for j in range(n):
                out[i, j] = z[i, j] + b[j]
    elif code == 1:
        for i in range(r0, r1):
            for j in range(n):
                out[i, j] = _sigmoid(z[i, j] + b[j])
    elif code == 2:
        for i in range(r0, r1):
            for j in range(n):
                out[i, j] = _tanh(z[i, j] + b[j])
    elif code == 3:
        for i in range(r0, r1):
            for j in range(n):
                s = z[i, j] + b[j]
                out[i, j] = 0 if s <= 0 else s  # NaN stays NaN, as np.maximum: a diverged step must show
    elif code == 4:
        slope = z.dtype.type(LEAKY_SLOPE)
        for i in range(r0, r1):
            for j in range(n):
                s = z[i, j] + b[j]
                out[i, j] = s if s > 0 else s * slope
    elif code == 5:  # gelu: s Phi(s), Phi through erfc (no cancellation for s < 0)
        for i in range(r0, r1):
            for j in range(n):
                s = z[i, j] + b[j]
                out[i, j] = 0.5 * s * math.erfc(-s * _INV_SQRT_2)
    elif code == 6:  # gelu_tanh: s (1 + tanh u) / 2 = s sigmoid(2u)
        for i in range(r0, r1):
            for j in range(n):
                s = z[i, j] + b[j]
                out[i, j] = s * _sigmoid(2.0 * _SQRT_2_OVER_PI * (s + _GELU_TANH_A * s * s * s))
    elif code == 7:  # silu
        for i in range(r0, r1):
            for j in range(n):
                s = z[i, j] + b[j]
                out[i, j] = s * _sigmoid(s)
    elif code == 8:  # softplus: max(s, 0) + log1p(e^-|s|)
        for i in range(r0, r1):
            for j in range(n):
                s = z[i, j] + b[j]
                out[i, j] = max(s, 0.0) + _log1p(_exp(-abs(s)))
    elif code == _NEGATE:  # -(z + b), the argument of exp in the sigmoid
        for i in range(r0, r1):
            for j in range(n):
                out[i, j] = -(z[i, j] + b[j])
    elif code == _SIGMOID_FINISH:  # out holds exp(-(z + b)); finish the sigmoid in place
        for i in range(r0, r1):
            for j in range(n):
                out[i, j] = 1.0 / (1.0 + out[i, j])
    else:
        raise ValueError("bias_act: unknown activation code")


_bias_act_serial, _bias_act_par = _split(_bias_act_rows, rows=True)


def bias_act(
    z: np.ndarray, b: np.ndarray, act: str, out: np.ndarray | None = None, pre: np.ndarray | None = None
) -> np.ndarray:
    """Fused ``act(z + b)``, also storing z + b into ``pre`` when given. z: (B,N), b: (N,) -> (B,N),
    z's dtype."""
    code = activation(act).code
    if out is None:
        out = np.empty_like(z)
    keep = pre is not None
    pre = pre if keep else out  # not written unless kept
    n = z.size
    if code == 2 and n >= _NUMPY_TANH_MIN:
        _run(_bias_act_par, _bias_act_serial, n, z, b, out, pre, keep, 0)
        _call_host(np.tanh, out, out=out)
    elif code == 1 and z.dtype == np.float64 and n >= _SIMD_EXP_MIN:
        _run(_bias_act_par, _bias_act_serial, n, z, b, out, pre, keep, _NEGATE)
        _call_host(np.exp, out, out=out)
        _run(_bias_act_par, _bias_act_serial, n, out, b, out, pre, False, _SIGMOID_FINISH)
    else:
        _run(_bias_act_par, _bias_act_serial, n, z, b, out, pre, keep, code)
    return out


@njit(cache=True, error_model="numpy")
def _argmax_row(scores, i):
    # np.argmax(scores[i]): the first maximum, or the first NaN
    best = 0
    m = scores[i, 0]
    if m == m:
        for j in range(1, scores.shape[1]):
            v = scores[i, j]
            if v != v:
                return j
            if v > m:
                m = v
                best = j
    return best


# ================================================================ dense chain
def _env_chain_max() -> int | None:
    raw = os.environ.get("GPUMLP_CHAIN_MAX_WEIGHT_BYTES", "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(
            f"GPUMLP_CHAIN_MAX_WEIGHT_BYTES must be a number of bytes >= 0 (0: never fuse), got {raw!r}"
        )
    return int(value)


# dense_chain's register tiles beat OpenBLAS where a weight matrix fits a core's L2 (measured up to
# 1 MiB: seed predict 1.62 vs 2.35 ms at batch 4096; 4 MiB lost 0.55-0.8x). Only on x86 with AVX2
# or AVX-512, where the tiles were measured; GPUMLP_CHAIN_MAX_WEIGHT_BYTES sets it (0: never).
_CHAIN_ENV = _env_chain_max()
CHAIN_MAX_WEIGHT_BYTES = _CHAIN_ENV if _CHAIN_ENV is not None else (1 << 20 if _SIMD_TILES else 0)
_CHAIN_BLOCK = 8 * _MR  # rows a thread carries through every layer at a time (its slice of x stays in L2)
# Below: the calling thread alone. A parallel region costs a few microseconds, and right after
# BLAS calls (a training step) it waited 80 us for a batch of 1 whose work takes 6 us.
_CHAIN_PAR_MIN_FLOPS = 4_000_000
# From these flops a dense_chain with layers on OpenBLAS runs on two cores of ours (numba_pair), each
# core's rows through single-threaded OpenBLAS and the tiles; below, on OpenBLAS's pool but the last
# layer (the pool's threads spin after a GEMM: tiles in parallel then lost to tiles on one thread).
# A session costs ~0.15 ms; two cores gained 2-4 % at 4096 rows of three models (5-15 GFLOP); at 1024
# rows (1.4-3.8 GFLOP) they won 1-10 % in one run, lost up to 4 % in another (bench/predict_paths.py).
_CHAIN_PAIR_MIN_FLOPS = 4_000_000_000


@njit(error_model="numpy")
def _any_nonfinite(z):
    bad = False
    for i in range(z.shape[0]):
        for j in range(z.shape[1]):
            bad |= not (z[i, j] - z[i, j] == 0)  # NaN for NaN and inf; vectorised: no branch
    return bad


@njit(cache=True, error_model="numpy")
def _bias_act_checked(z, b, out, code, r0, r1):
    # rows [r0, r1) of out = act(z + b), block by block, -> whether they hold a NaN or inf in z
    # (tested while the block is in cache)
    bad = False
    keep = r1 < r0
    for i0 in range(r0, r1, _CHAIN_BLOCK):
        i1 = min(r1, i0 + _CHAIN_BLOCK)
        bad |= _any_nonfinite(z[i0:i1])
        _bias_act_rows(z, b, out, out, keep, code, i0, i1)
    return bad


@njit(cache=True, error_model="numpy")
def _chain_rows(x, lead_b, weights, panels, biases, codes, out, labels, work, r0, r1):
    # rows [r0, r1) through every layer, _CHAIN_BLOCK rows at a time, in one thread's work (3, >= block
    # * widest): the tiles' product in work[0], the activations in work[1] (or out, for the last
    # layer): separate arrays, so that bias_act's loop vectorises; labels (unless empty): the rows'
    # arg-max, taken while they are in cache. codes[0] >= 0: x is the input, -> x @ weights[0] not
    # finite; else x is a product before the chain, whose act(x + lead_b) (code -1 - codes[0]) is
    # the input, taken into work[2] block by block, -> x not finite.
    nonfinite = False
    last = len(weights) - 1
    keep = r1 < r0  # False, typed bool: a literal False would compile _bias_act_rows a second time (6 s)
    lead = codes[0] < 0
    for i0 in range(r0, r1, _CHAIN_BLOCK):
        m = min(_CHAIN_BLOCK, r1 - i0)
        src, s0 = x, i0
        if lead:
            n = x.shape[1]
            src, s0 = work[2, : m * n].reshape((m, n)), 0
            nonfinite |= _bias_act_checked(x[i0 : i0 + m], lead_b, src, -1 - codes[0], 0, m)
        for layer in range(last + 1):
            w = weights[layer]
            n = w.shape[1]
            z = work[0, : m * n].reshape((m, n))
            _tile_rows(z, 0, src, s0, m, w, 1.0, 0.0, panels[layer])
            if layer == 0 and not lead:
                nonfinite |= _any_nonfinite(z)
            dst = out[i0 : i0 + m] if layer == last else work[1, : m * n].reshape((m, n))
            _bias_act_rows(z, biases[layer], dst, dst, keep, codes[layer + lead], 0, m)
            src, s0 = dst, 0
        if labels.size:
            for r in range(m):
                labels[i0 + r] = _argmax_row(src, r)
    return nonfinite


@njit(cache=True, error_model="numpy")
def _pack_panels(weights, panels):
    for layer in range(len(weights)):
        _pack_dot_panel(weights[layer], panels[layer])


@njit(cache=True, error_model="numpy")
def _chain_serial(x, lead_b, weights, panels, biases, codes, out, labels, work, flags):
    _pack_panels(weights, panels)
    return _chain_rows(x, lead_b, weights, panels, biases, codes, out, labels, work[0], 0, x.shape[0])


@njit(cache=True, parallel=True, error_model="numpy")
def _chain_par(x, lead_b, weights, panels, biases, codes, out, labels, work, flags):
    # one slice of rows per thread (flags.size of them), whole tiles each: results do not depend on it
    _pack_panels(weights, panels)
    nt, m = flags.size, x.shape[0]
    share = (m + nt - 1) // nt
    step = (share + _MR - 1) // _MR * _MR
    for t in numba.prange(nt):
        lo, hi = min(m, t * step), min(m, (t + 1) * step)
        flags[t] = _chain_rows(x, lead_b, weights, panels, biases, codes, out, labels, work[t], lo, hi)
    return flags.any()


@njit(cache=True, error_model="numpy")
def _head_rows(x, head_ws, head_bs, head_codes, bufs, r0, r1):
    # x's rows [r0, r1) through the layers before dense_chain's tiles, on OpenBLAS, in this call's
    # own bufs (2, >= (r1 - r0) * widest), from its start: each product into bufs[0], act(z + b)
    # into bufs[1] but the last layer's (the tiles' lead, bufs[0] as (r1 - r0, N)). A buffer of its
    # own: the layers' views of one buffer differ in width, so two cores' rows would overlap.
    # -> x @ head_ws[0] not finite, as tested in the first layer's bias_act (False with one layer)
    m, last = r1 - r0, len(head_ws) - 1
    src, bad = x[r0:r1], False
    for i in range(last + 1):
        n = head_ws[i].shape[1]
        z = bufs[0, : m * n].reshape((m, n))
        if m > 0:
            _gemm(z, src, head_ws[i], 1.0, 0.0, False, False, 1)
        if i < last:
            src = bufs[1, : m * n].reshape((m, n))
            flag = _bias_act_checked(z, head_bs[i], src, head_codes[i], 0, m)
            bad |= flag and i == 0
    return bad


@njit(cache=True, nogil=True, error_model="numpy")
def _chain_pair(P, ctl, c, seen):
    # dense_chain with a head on two cores (numba_pair's protocol): core c's rows [bounds[c],
    # bounds[c + 1]) through the head (single-threaded OpenBLAS, in its own bufs[c]) and the tiles;
    # flags[0, c]: the head's flag, flags[1, c]: the tiles'
    if c == 0:
        _pair_go(ctl)
    while c == 0 or _pair_next_step(ctl, seen):
        seen += 1
        x, head_ws, head_bs, head_codes, bufs, lead_b, weights, panels, biases, codes = P[:10]
        out, labels, work, flags, bounds = P[10:]
        r0, r1 = bounds[c], bounds[c + 1]
        flags[0, c] = _head_rows(x, head_ws, head_bs, head_codes, bufs[c], r0, r1)
        m, n = r1 - r0, head_ws[len(head_ws) - 1].shape[1]
        lead = bufs[c, 0, : m * n].reshape((m, n))
        flags[1, c] = _chain_rows(lead, lead_b, weights, panels, biases, codes, out[r0:r1], labels[r0:r1],
                                  work[c], 0, m)  # fmt: skip
        if not _pair_barrier(ctl, c) or c == 0:
            return seen
    return seen


_CHAIN_CODES: dict = {}  # (activation names, split) -> their codes (see _chain_codes), per chain seen
_NO_LABELS = np.empty(0, np.int64)  # dense_chain without labels: the kernels skip an empty array
# (tiled layers, dtype char) whose serial and parallel variants are compiled; (layers, dtype char,
# "pool"): a chain whose pool path is compiled too (see dense_chain)
_CHAIN_COMPILED: set = set()
# per calling thread: arrays (work, flags), panels, head (buffers) and pair (flags, bounds), grown to
# the largest need
_CHAIN_SCRATCH = threading.local()


def _chain_scratch(dtype: np.dtype, nt: int, widest: int) -> tuple:
    """dense_chain's work (>= nt, 3, block * widest) and flags (nt,), reused across calls."""
    work, flags = getattr(_CHAIN_SCRATCH, "arrays", (None, None))
    if work is None or work.dtype != dtype or work.shape[0] < nt or work.shape[2] < _CHAIN_BLOCK * widest:
        rows = max(nt, numba.get_num_threads())  # one slot per thread: batch sizes may alternate
        width = max(widest, 0 if work is None or work.dtype != dtype else work.shape[2] // _CHAIN_BLOCK)
        work, flags = np.empty((rows, 3, _CHAIN_BLOCK * width), dtype), np.zeros(rows, np.bool_)
        _CHAIN_SCRATCH.arrays = work, flags
    return work, flags[:nt]


def _chain_panels(weights: tuple, dtype: np.dtype) -> tuple:
    """Per weight (K, N), the dot tiles' panel (``dot_columns(N)``, K), which the chain packs on each
    call: buffers kept per calling thread and chain of shapes."""
    panels = getattr(_CHAIN_SCRATCH, "panels", None)
    if panels is None:
        panels = _CHAIN_SCRATCH.panels = {}
    key = (dtype.char, *(w.shape for w in weights))
    if key not in panels:
        panels[key] = tuple(np.empty((_dot_columns(w.shape[1], dtype), w.shape[0]), dtype) for w in weights)
    return panels[key]


def _head_buffers(dtype: np.dtype, parts: int, size: int) -> np.ndarray:
    """dense_chain's head buffers, (parts, 2, size) (one part per core), from one flat array kept per
    calling thread."""
    flat = getattr(_CHAIN_SCRATCH, "head", None)
    if flat is None or flat.dtype != dtype or flat.size < parts * 2 * size:
        flat = _CHAIN_SCRATCH.head = np.empty(parts * 2 * size, dtype)
    return flat[: parts * 2 * size].reshape((parts, 2, size))


def _chain_split(weights: tuple) -> int:
    """How many leading layers dense_chain runs on OpenBLAS: up to the last weight matrix beyond
    CHAIN_MAX_WEIGHT_BYTES (the tiles lose to OpenBLAS there), the last layer always in the tiles."""
    big = [i + 1 for i, w in enumerate(weights) if w.nbytes > CHAIN_MAX_WEIGHT_BYTES]
    return min(big[-1] if big else 0, len(weights) - 1)


def dense_chain(x, weights, biases, acts, out=None, labels=None):
    """Eval forward of a stack of dense layers, fused: each thread carries a block of rows through
    every layer (register-tiled products, ``numba_tiles``; bias and activation on the block while
    it is in cache; the arg-max too, into ``labels``). With a weight matrix beyond
    CHAIN_MAX_WEIGHT_BYTES, layers run on OpenBLAS first (up to the last such one on two cores of
    ours for big batches, else all but the last layer), the tiles taking the last one's bias and
    activation as they read its product. -> (a (B, N_last), x_nonfinite) as the reference; x: (B,
    K0) C-contiguous, weights (K_l, N_l) C-contiguous, biases (N_l,), one float dtype; labels:
    (B,) int64."""
    _check_chain(x, weights, biases, acts)
    dt = x.dtype
    weights, biases = tuple(weights), tuple(biases)
    if dt not in _GEMM_DTYPES or not x.flags.c_contiguous:
        raise ValueError(f"dense_chain: x must be a C-contiguous float32/float64 array, got {dt} {x.strides}")
    for w, b in zip(weights, biases):
        if w.dtype != dt or b.dtype != dt or not w.flags.c_contiguous:
            raise ValueError(f"dense_chain: weights and biases must be C-contiguous {dt} arrays like x")
    m, n_out = x.shape[0], weights[-1].shape[1]
    if out is None:
        out = np.empty((m, n_out), dt)
    elif out.shape != (m, n_out) or out.dtype != dt or not out.flags.c_contiguous:
        raise ValueError(f"dense_chain: out must be a C-contiguous {dt} array of shape {(m, n_out)}")
    if labels is None:
        labels = _NO_LABELS
    elif labels.shape != (m,) or labels.dtype != np.int64 or not labels.flags.c_contiguous:
        raise ValueError(f"dense_chain: labels must be a contiguous int64 array of shape {(m,)}")
    if m == 0:
        return out, False
    split = _chain_split(weights)
    if split and 2 * m * sum(w.size for w in weights) >= _CHAIN_PAIR_MIN_FLOPS and _PAIR.possible():
        flags = _chain_on_pair(x, weights, biases, acts, split, out, labels)
        if flags is not None:
            if (len(weights), dt.char, "pool") not in _CHAIN_COMPILED:  # smaller batches: no compile then
                _chain_on_pool(x[:0], weights, biases, acts, len(weights) - 1, out[:0], labels[:0])
                _CHAIN_COMPILED.add((len(weights), dt.char, "pool"))
            return out, bool(flags[0 if split > 1 else 1].any())
    # else OpenBLAS's pool, then the last layer on this thread (its pool threads spin after a GEMM)
    return out, _chain_on_pool(x, weights, biases, acts, len(weights) - 1 if split else 0, out, labels)


def _chain_on_pool(x, weights: tuple, biases: tuple, acts, split: int, out, labels) -> bool:
    """dense_chain with ``split`` layers on OpenBLAS's pool, then the tiles on this thread (or, with
    no layer on OpenBLAS, on Numba's threads) -> x @ weights[0] not finite."""
    m = x.shape[0]
    head, tail = _chain_parts(x, weights, biases, acts, split, out, labels)
    n_tiled = 2 * m * sum(w.size for w in tail[2])
    nt = numba.get_num_threads() if n_tiled >= _CHAIN_PAR_MIN_FLOPS and not split else 1
    nt = max(1, min(nt, -(-m // _MR)))
    work, flags = _chain_scratch(x.dtype, nt, max(w.shape[1] for w in (tail[0], *tail[2])))
    head_flag = _head_rows(*head, 0, m) if split else False
    key = (len(tail[2]), x.dtype.char)
    if key not in _CHAIN_COMPILED:  # both variants at once: no compile (cache load) on a later batch size
        empty = (tail[0][:0], *tail[1:6], out[:0], labels[:0], work, flags)
        with _PARALLEL:
            _chain_par(*empty)
        _chain_serial(*empty)
        _CHAIN_COMPILED.add(key)
    if nt > 1 and _PARALLEL.acquire(False):
        try:
            tail_flag = _chain_par(*tail, work, flags)
        finally:
            _PARALLEL.release()
    else:
        tail_flag = _chain_serial(*tail, work, flags)
    return bool(head_flag if split > 1 else tail_flag)


def _chain_parts(x, weights: tuple, biases: tuple, acts, split: int, out, labels, parts: int = 1) -> tuple:
    """dense_chain's arguments, cut after ``split`` layers run on OpenBLAS -> (the head's for
    _head_rows, () without one, its buffers one part per core, a part for the whole batch; the tiles'
    for _chain_rows up to its work: (lead, lead_b, weights, panels, biases, codes, out, labels),
    lead the head's last product for one part, or x)."""
    m, dt = x.shape[0], x.dtype
    lead, lead_b, head = x, biases[0], ()
    if split:
        n, rows = weights[split - 1].shape[1], -(-m // parts)
        bufs = _head_buffers(dt, parts, rows * max(w.shape[1] for w in weights[:split]))
        mine = bufs[0] if parts == 1 else bufs
        head = (x, weights[:split], biases[:split], _chain_codes(acts[:split], 0), mine)
        lead, lead_b = bufs[0, 0, : m * n].reshape((m, n)) if parts == 1 else None, biases[split - 1]
    codes = _chain_codes(acts, split)
    tiled = weights[split:]
    return head, (lead, lead_b, tiled, _chain_panels(tiled, dt), biases[split:], codes, out, labels)


def _chain_on_pair(x, weights: tuple, biases: tuple, acts, split: int, out, labels) -> np.ndarray | None:
    """dense_chain on two cores of ours (numba_pair), each core's half of the rows through the head
    (single-threaded OpenBLAS) and the tiles -> flags (2, 2): [0] the head's per core, [1] the
    tiles'; None (having run nothing) when the pair is not free."""
    head, tail = _chain_parts(x, weights, biases, acts, split, out, labels, parts=2)
    work, _ = _chain_scratch(x.dtype, 2, max(w.shape[1] for w in (weights[split - 1], *tail[2])))
    if not hasattr(_CHAIN_SCRATCH, "pair"):
        _CHAIN_SCRATCH.pair = np.zeros((2, 2), np.bool_), np.zeros(3, np.int64)
    flags, bounds = _CHAIN_SCRATCH.pair
    flags[:], bounds[1:] = False, (x.shape[0] // 2, x.shape[0])
    _pack_panels(tail[2], tail[3])
    with _pair_session():
        if _PAIR.step(_chain_pair, (*head, *tail[1:], work, flags, bounds)):
            return flags
    return None


def _chain_codes(acts, split: int) -> np.ndarray:
    """dense_chain's activation codes (int64, never written), kept per chain: with ``split`` layers
    on OpenBLAS, -1 - the last one's code (the tiles' lead), then the tiled layers' codes."""
    key = (tuple(acts), split)
    codes = _CHAIN_CODES.get(key)
    if codes is None:
        tiled = [activation(a).code for a in acts[split:]]
        lead = [-1 - activation(acts[split - 1]).code] if split else []
        codes = _CHAIN_CODES[key] = np.array(lead + tiled, np.int64)
    return codes


@njit(cache=True, error_model="numpy")
def _act_grad_range(g, y, s, out, code, lo, hi):
    # s: the pre-activation, read only by the codes whose derivative needs it. one in y's dtype:
    # an int 1 would make float32 products float64, unlike the reference (NumPy's weak scalars)
    one = y.dtype.type(1)
    if code == 0:
        for i in range(lo, hi):
            out[i] = g[i]
    elif code == 1:
        for i in range(lo, hi):
            out[i] = g[i] * (y[i] * (one - y[i]))
    elif code == 2:
        for i in range(lo, hi):
            out[i] = g[i] * (one - y[i] * y[i])
    elif code == 3:
        for i in range(lo, hi):
            out[i] = g[i] if y[i] > 0 else 0
    elif code == 4:
        slope = y.dtype.type(LEAKY_SLOPE)
        for i in range(lo, hi):
            out[i] = g[i] if y[i] > 0 else g[i] * slope
    elif code == 5:  # gelu: Phi(s) + s phi(s)
        for i in range(lo, hi):
            x = s[i]
            out[i] = g[i] * (0.5 * math.erfc(-x * _INV_SQRT_2) + x * _INV_SQRT_2PI * math.exp(-0.5 * x * x))
    elif code == 6:  # gelu_tanh: p + 2 s p (1 - p) u'(s), p = sigmoid(2u)
        for i in range(lo, hi):
            x = s[i]
            p = _sigmoid(2.0 * _SQRT_2_OVER_PI * (x + _GELU_TANH_A * x * x * x))
            du = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_TANH_A * x * x)
            out[i] = g[i] * (p + 2.0 * x * p * (1.0 - p) * du)
    elif code == 7:  # silu: p (1 + s (1 - p)), p = sigmoid(s)
        for i in range(lo, hi):
            p = _sigmoid(s[i])
            out[i] = g[i] * (p * (1.0 + s[i] * (1.0 - p)))
    elif code == 8:  # softplus: sigmoid(s) = 1 - e^-y = 2t / (1 + t), t = tanh(y/2): SIMD, no cancellation
        for i in range(lo, hi):
            t = _tanh(0.5 * y[i])
            out[i] = g[i] * (2.0 * t / (1.0 + t))
    else:
        raise ValueError("act_grad: unknown activation code")


_act_grad_serial, _act_grad_par = _split(_act_grad_range)


def act_grad(
    grad_out: np.ndarray,
    y: np.ndarray,
    act: str,
    out: np.ndarray | None = None,
    pre: np.ndarray | None = None,
) -> np.ndarray:
    """Fused ``grad_out * act'(.)`` from the activation output y and, where the activation needs
    it, the pre-activation ``pre``. (B,N),(B,N),(B,N) -> (B,N)."""
    spec = grad_spec(act, pre)
    if out is None:
        out = np.empty_like(grad_out)
    g1, y1, o1 = _flat(grad_out, "grad_out"), _flat(y, "y"), _flat(out, "out")
    s1 = _flat(pre, "pre") if spec.needs_input else y1
    _run(_act_grad_par, _act_grad_serial, g1.size, g1, y1, s1, o1, spec.code)
    return out


@njit(cache=True, error_model="numpy")
def _bias_grad_k(gz, out):
    acc = np.zeros(gz.shape[1], np.float64)
    for i in range(gz.shape[0]):
        for j in range(gz.shape[1]):
            acc[j] += gz[i, j]
    for j in range(gz.shape[1]):
        out[j] = acc[j]


def bias_grad(grad_z: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Column sums (float64 accumulation). grad_z: (B,N) -> (N,), grad_z's dtype."""
    if out is None:
        out = np.empty(grad_z.shape[1], grad_z.dtype)
    _call_split(("bands", ((0, 1), (1, 0))), _bias_grad_k, grad_z, out)  # a half of the columns per core
    return out


@njit(cache=True, error_model="numpy")
def _source_row(idx, r, n):
    """Row idx[r] of an n-row source, negative indices counted from the end (as NumPy)."""
    k = idx[r]
    if k < 0:
        k += n
    if k < 0 or k >= n:
        raise IndexError("gather: row index out of range")
    return k


@njit(cache=True, error_model="numpy")
def _gather_k(src, idx, out):
    for r in range(idx.shape[0]):
        _prefetch_gather(src, idx, r)  # random rows come from DRAM: keep more of them in flight
        k = _source_row(idx, r, src.shape[0])
        for j in range(src.shape[1]):
            out[r, j] = src[k, j]


def gather_rows(src: np.ndarray, idx: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Minibatch gather ``src[idx]``. src: (N,...) any dtype, idx: (B,) int -> (B,...)."""
    nb = idx.shape[0]
    if out is None:
        out = np.empty((nb,) + src.shape[1:], dtype=src.dtype)
    if not (src.flags.c_contiguous and out.flags.c_contiguous):
        raise ValueError("gather_rows: src and out must be C-contiguous")
    rows = ("bands", ((1, 0), (2, 0)))  # a half of idx and out per core
    _call_split(rows, _gather_k, src.reshape(src.shape[0], -1), idx, out.reshape(nb, -1))
    return out


def _decoded(value, divisor, offset):
    """A pixel as the gathers write it (jitted code only): a float as it is; an 8-bit code as
    ``value / divisor + offset`` in the float type of divisor (gather_pixels' arithmetic)."""
    raise NotImplementedError("called from jitted code only")


@overload(_decoded, inline="always")
def _decoded_typed(value, divisor, offset):
    if isinstance(value, numba.types.Float):
        return lambda value, divisor, offset: value
    cast = np.dtype(str(divisor)).type
    return lambda value, divisor, offset: cast(value) / divisor + offset


@njit(cache=True, error_model="numpy")
def _gather_pixels_k(codes, idx, divisor, offset, out):
    # divisor and offset come in out's dtype: the decode is scale_pixels' float arithmetic, bit for bit
    for r in range(idx.shape[0]):
        _prefetch_gather(codes, idx, r)
        k = _source_row(idx, r, codes.shape[0])
        for j in range(codes.shape[1]):
            out[r, j] = _decoded(codes[k, j], divisor, offset)


def gather_pixels(
    codes: np.ndarray,
    idx: np.ndarray,
    divisor: float,
    offset: float,
    dtype=np.float32,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Minibatch gather of 8-bit codes, decoded: ``codes[idx] / divisor + offset`` in ``dtype``.
    codes: (N, F) uint8 C-contiguous, idx: (B,) int -> (B, F) dtype."""
    _check_pixel_codes(codes)
    out = _pixel_rows(out, idx.shape[0], codes.shape[1], dtype, "gather_pixels")
    scale = out.dtype.type(divisor), out.dtype.type(offset)
    _call_split(("bands", ((1, 0), (4, 0))), _gather_pixels_k, codes, idx, *scale, out)
    return out


def _pixel_rows(out, rows: int, width: int, dtype, name: str) -> np.ndarray:
    """The (rows, width) float output of a pixel gather: out, checked, or a new array."""
    dt = np.dtype(dtype)
    if out is None:
        return np.empty((rows, width), dt)
    if out.dtype != dt or out.shape != (rows, width) or not out.flags.c_contiguous:
        raise ValueError(f"{name}: out must be a C-contiguous {dt} array of shape {(rows, width)}")
    return out


# ====================================================================== losses
@njit(cache=True, error_model="numpy")
def _shift_rows(z, out):
    """out[i] = z[i] - max z[i]. z, out: (B,K)."""
    for i in range(z.shape[0]):
        m = z[i, 0]
        for j in range(1, z.shape[1]):
            m = max(m, z[i, j])
        for j in range(z.shape[1]):
            out[i, j] = z[i, j] - m


@njit(cache=True, error_model="numpy", fastmath=_CONTRACT)
def _exp_inplace(x):
    """x = exp(x) over a flat array: one long loop that vectorises (a K=10 row is too short)."""
    for t in range(x.size):
        x[t] = _exp(x[t])


@njit(cache=True, error_model="numpy", fastmath=_CONTRACT)
def _normalise_rows(out):
    """Divide each row of out by its sum s -> the sum over rows of log s. No buffer, one log per
    ~900 bits of product: the float64 product of the sums (each in [1, K]: the max term is 1)
    is logged when it might overflow with the next row, and at the end."""
    one = out.dtype.type(1)
    total, prod = 0.0, 1.0
    for i in range(out.shape[0]):
        s = out.dtype.type(0)
        for j in range(out.shape[1]):
            s += out[i, j]
        if prod > _PROD_MAX:
            total += math.log(prod)
            prod = 1.0
        prod *= s
        inv = one / s
        for j in range(out.shape[1]):
            out[i, j] *= inv
    return total + math.log(prod)


@njit(cache=True, error_model="numpy", fastmath=_CONTRACT)
def _softmax_k(z, out):
    _shift_rows(z, out)
    _exp_inplace(out.reshape(-1))
    _normalise_rows(out)


def softmax(logits: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Row-wise stable softmax, one row-resident pass. (B,K) -> (B,K)."""
    if out is None:
        out = np.empty_like(logits)
    _softmax_k(logits, out)
    return out


@njit(cache=True, error_model="numpy", fastmath=_CONTRACT)
def _softmax_xent_k(z, labels, grad, scale):
    # loss_i = log(sum_j exp(z_ij - m_i)) - (z_iy - m_i); grad = scale * (softmax - onehot)
    nb, k = z.shape
    total = 0.0
    _shift_rows(z, grad)
    for i in range(nb):
        y = labels[i]
        if y < 0 or y >= k:
            raise ValueError("softmax_xent: label out of range [0, K)")
        total -= grad[i, y]
    _exp_inplace(grad.reshape(-1))
    total += _normalise_rows(grad)
    for i in range(nb):
        grad[i, labels[i]] -= 1
    g, sc = grad.reshape(-1), grad.dtype.type(scale)
    for t in range(g.size):
        g[t] *= sc
    return total


_A = np.ndarray  # short, so the loss signatures fit on one line


def _row_loss(kernel, scores: _A, labels: _A, grad: _A | None, grad_scale, loss, *extra) -> tuple:
    """The wrappers' glue: ``kernel(scores, labels, grad, scale, *extra)`` -> its summed loss, with
    grad allocated when None (C-contiguous: the kernels use it flat) -> (0-d loss, grad)."""
    if grad is None:
        grad = np.empty_like(scores)
    _flat(grad, "grad")
    return _summed(loss, scores.dtype, kernel, scores, labels, grad, float(grad_scale), *extra), grad


def _summed(acc, dtype, body, *args, add: bool = True):
    """``body(*args)`` (a jitted kernel returning a sum) added into the 0-d accumulator ``acc``
    (written into it with add=False), or a new 0-d array of ``dtype`` when acc is None. -> acc."""
    if acc is None:
        _refuse("a summed kernel without an accumulator array returns its sum to Python")
        return _accumulate(None, body(*args), dtype)
    return _call_into(acc, body, *args, add=add)


def softmax_xent(logits: _A, labels: _A, grad: _A | None = None, grad_scale=1.0, loss=None) -> tuple:
    """Fused stable softmax cross-entropy + gradient from int labels.
    logits: (B,K), labels: (B,) int -> (0-d summed loss, (B,K) grad), logits' dtype."""
    return _row_loss(_softmax_xent_k, logits, labels, grad, grad_scale, loss)


@njit(cache=True, error_model="numpy", fastmath=_CONTRACT, inline="always")
def _bce_grad(x, hit, one):
    """The unscaled gradient of logit x vs target hit (0/1): sigmoid(x) - hit, without cancellation."""
    e = _exp(-abs(x))  # never exp of a large positive number: finite for any logit
    r = one / (one + e)
    p, q = (r, e * r) if x >= 0 else (e * r, r)  # sigmoid(x), 1 - sigmoid(x)
    return -q if hit else p


@njit(cache=True, error_model="numpy", fastmath=_CONTRACT, inline="always")
def _bce_softplus(z, logs, labels, i, j, zero, cap):
    """Element (i, j)'s term softplus(s) = max(s, 0) + log1p(e^-|s|), capped, from its log1p part."""
    s = -z[i, j] if labels[i] == j else z[i, j]
    return min(max(s, zero) + logs[i, j], cap)


@njit(cache=True, error_model="numpy")
def _check_labels(labels, r0, r1, k):
    for i in range(r0, r1):
        if labels[i] < 0 or labels[i] >= k:
            raise ValueError("sigmoid_bce: label out of range [0, K)")


@njit(cache=True, error_model="numpy", fastmath=_CONTRACT)
def _sigmoid_bce_k(z, labels, grad, scale, cap):
    # A term is softplus(s), s = -x for the label's class and x otherwise: max(s, 0) + log1p(e^-|x|),
    # capped. The log1p part, the same for both, is computed for all elements in one flat loop
    # that vectorises (a K=10 row is too short to) and parked in grad (no other buffer); the
    # terms are then summed class by class, each over its rows in order 0, 1, ..., B-1 in
    # float64, then over the classes in order. The gradient overwrites grad the same way: flat
    # as if no class were the label, then each row's label element.
    nb, k = z.shape
    one, zero, sc, cp = z.dtype.type(1), z.dtype.type(0), z.dtype.type(scale), z.dtype.type(cap)
    _check_labels(labels, 0, nb, k)
    zf, gf = z.reshape(-1), grad.reshape(-1)
    for t in range(zf.size):
        gf[t] = _log1p(_exp(-abs(zf[t])))
    total = 0.0
    for j in range(k):
        acc = 0.0
        for i in range(nb):
            acc += _bce_softplus(z, grad, labels, i, j, zero, cp)
        total += acc
    for t in range(zf.size):
        gf[t] = _bce_grad(zf[t], False, one) * sc
    for i in range(nb):
        grad[i, labels[i]] = _bce_grad(z[i, labels[i]], True, one) * sc
    return total


def sigmoid_bce(logits: _A, labels: _A, grad: _A | None = None, grad_scale=1.0, loss=None) -> tuple:
    """Fused logistic cost vs one-hot(labels), terms as capped softplus like the reference.
    logits: (B,K), labels: (B,) int -> (0-d summed loss, (B,K) grad), logits' dtype. grad's first
    rows double as the per-class sums, so it must be C-contiguous."""
    return _row_loss(_sigmoid_bce_k, logits, labels, grad, grad_scale, loss, _BCE_CAP)


@njit(cache=True, error_model="numpy")
def _mse_k(pred, labels, grad, scale):
    k = pred.shape[1]
    total = 0.0
    for i in range(pred.shape[0]):
        y = labels[i]
        if y < 0 or y >= k:
            raise ValueError("mse: label out of range [0, K)")
        for j in range(k):
            d = pred[i, j] - (1.0 if j == y else 0.0)
            total += d * d
            grad[i, j] = d * scale
    return 0.5 * total


def mse(pred: _A, labels: _A, grad: _A | None = None, grad_scale=1.0, loss=None) -> tuple:
    """Fused half squared error vs one-hot(labels).
    pred: (B,K), labels: (B,) int -> (0-d summed loss, (B,K) grad), pred's dtype."""
    return _row_loss(_mse_k, pred, labels, grad, grad_scale, loss)


@njit(cache=True, error_model="numpy")
def _correct_k(scores, labels):
    hits = 0
    for i in range(scores.shape[0]):
        best = _argmax_row(scores, i)
        if best == labels[i]:
            hits += 1
    return hits


def correct_count(scores: np.ndarray, labels: np.ndarray, count: np.ndarray | None = None) -> np.ndarray:
    """Rows whose argmax (first max wins) equals the label, added into ``count`` if given.
    (B,K),(B,) -> 0-d int64."""
    return _summed(count, np.int64, _correct_k, scores, labels)


# ================================================================== optimizers
# Each step is one pass over w (+ state): the effective gradient g + l2*w + l1*sign(w)
# is formed in registers, never stored. Flat 1-D views; a *_range body shared by the
# serial and the parallel variant.
@njit(cache=True, error_model="numpy")
def _sgd_range(w, g, lr, l2, l1, lo, hi):
    for i in range(lo, hi):
        wi = w[i]
        w[i] = wi - lr * (g[i] + l2 * wi + l1 * np.sign(wi))


_sgd_serial, _sgd_par = _split(_sgd_range)


def sgd_step(w: np.ndarray, g: np.ndarray, lr: float, l2: float = 0.0, l1: float = 0.0) -> None:
    """w -= lr * (g + l2*w + l1*sign(w)), one fused in-place pass. w, g: same shape."""
    w1, g1 = _flat(w, "w"), _flat(g, "g")
    _run(_sgd_par, _sgd_serial, w1.size, w1, g1, float(lr), float(l2), float(l1))


def sgd_matmul_step(
    w: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    lr: float,
    l2: float = 0.0,
    trans_a: bool = False,
    trans_b: bool = False,
    work: np.ndarray | None = None,
) -> None:
    """w -= lr * (op(a) @ op(b) + l2*w) as one BLAS GEMM, alpha = -lr, beta = 1 - lr*l2: the
    gradient is never stored (``work`` unused) and w is read and written once. Without
    NumPy's bundled OpenBLAS, or with operands BLAS cannot take as they are: matmul into
    ``work``, then sgd_step. a: (M,K) ((K,M) with trans_a), b: (K,N) ((N,K) with trans_b), w: (M,N)."""
    if _blas_ready(w, a, b, trans_a, trans_b):
        _call(_gemm, w, a, b, -float(lr), 1.0 - float(lr) * float(l2), bool(trans_a), bool(trans_b), 1)
    else:
        sgd_step(w, matmul(a, b, out=work, trans_a=trans_a, trans_b=trans_b), lr, l2)


@njit(cache=True, error_model="numpy")
def _momentum_range(w, g, v, lr, mu, nesterov, l2, l1, lo, hi):
    for i in range(lo, hi):
        wi = w[i]
        ge = g[i] + l2 * wi + l1 * np.sign(wi)
        v[i] = mu * v[i] + ge
        if nesterov:
            w[i] = wi - lr * (ge + mu * v[i])
        else:
            w[i] = wi - lr * v[i]


_momentum_serial, _momentum_par = _split(_momentum_range)


def momentum_step(
    w: _A, g: _A, v: _A, lr: float, mu: float = 0.9, nesterov: bool = False, l2: float = 0.0, l1: float = 0.0
) -> None:
    """Heavy-ball / Nesterov momentum (PyTorch convention), in place on w and v."""
    w1, g1, v1 = _flat(w, "w"), _flat(g, "g"), _flat(v, "v")
    scalars = (float(lr), float(mu), bool(nesterov), float(l2), float(l1))
    _run(_momentum_par, _momentum_serial, w1.size, w1, g1, v1, *scalars)


@njit(cache=True, error_model="numpy")
def _adagrad_range(w, g, h, lr, eps, l2, l1, lo, hi):
    for i in range(lo, hi):
        wi = w[i]
        ge = g[i] + l2 * wi + l1 * np.sign(wi)
        h[i] += ge * ge
        w[i] = wi - lr * ge / (math.sqrt(h[i]) + eps)


_adagrad_serial, _adagrad_par = _split(_adagrad_range)


def adagrad_step(w: _A, g: _A, h: _A, lr: float, eps: float = 1e-8, l2: float = 0.0, l1: float = 0.0) -> None:
    """AdaGrad, in place on w and h (same shape as w)."""
    w1, g1, h1 = _flat(w, "w"), _flat(g, "g"), _flat(h, "h")
    _run(_adagrad_par, _adagrad_serial, w1.size, w1, g1, h1, float(lr), float(eps), float(l2), float(l1))


@njit(cache=True, error_model="numpy")
def _rmsprop_range(w, g, s, lr, rho, eps, l2, l1, lo, hi):
    for i in range(lo, hi):
        wi = w[i]
        ge = g[i] + l2 * wi + l1 * np.sign(wi)
        s[i] = rho * s[i] + (1.0 - rho) * ge * ge
        w[i] = wi - lr * ge / (math.sqrt(s[i]) + eps)


_rmsprop_serial, _rmsprop_par = _split(_rmsprop_range)


def rmsprop_step(
    w: _A, g: _A, s: _A, lr: float, rho: float = 0.9, eps: float = 1e-8, l2: float = 0.0, l1: float = 0.0
) -> None:
    """RMSProp, in place on w and s (same shape as w)."""
    w1, g1, s1 = _flat(w, "w"), _flat(g, "g"), _flat(s, "s")
    scalars = (float(lr), float(rho), float(eps), float(l2), float(l1))
    _run(_rmsprop_par, _rmsprop_serial, w1.size, w1, g1, s1, *scalars)


@njit(cache=True, error_model="numpy")
def _adam_range(w, g, m, v, lr_c, b1, b2, omb1, omb2, eps, inv_bc2, keep, l2, l1, lo, hi):
    # lr_c = lr / (1 - b1^t), inv_bc2 = 1 / (1 - b2^t): one division and one sqrt per element;
    # keep = 1 - lr*weight_decay (AdamW's decoupled decay; 1.0 for Adam, and w * 1.0 == w exactly).
    # Every scalar comes in w's dtype (omb = 1 - b): float32 weights get float32 arithmetic, as in the
    # reference and the CUDA kernel, and twice the SIMD lanes of float64 (1.65x faster measured).
    for i in range(lo, hi):
        wi = w[i]
        ge = g[i] + l2 * wi + l1 * np.sign(wi)
        m[i] = b1 * m[i] + omb1 * ge
        v[i] = b2 * v[i] + omb2 * ge * ge
        w[i] = wi * keep - lr_c * m[i] / (math.sqrt(v[i] * inv_bc2) + eps)


@njit(cache=True, error_model="numpy")
def _adam_at_range(w, g, m, v, t, lr, beta1, beta2, eps, keep, l2, l1, lo, hi):
    """Adam on [lo, hi) at the step in t (a 1-element int64 array), read here rather than in Python
    so that a step graph replays it (numba_graph). The bias corrections are formed in float64 as
    Python forms them (a float power is libm's pow in both), then every scalar is rounded to w's dtype."""
    s, real = float(t[0]), w.dtype.type
    lr_c, inv_bc2 = lr / (1.0 - beta1**s), 1.0 / (1.0 - beta2**s)
    b1, b2, omb1, omb2 = real(beta1), real(beta2), real(1.0 - beta1), real(1.0 - beta2)
    _adam_range(w, g, m, v, real(lr_c), b1, b2, omb1, omb2, real(eps), real(inv_bc2), real(keep), real(l2),
                real(l1), lo, hi)  # fmt: skip


_adam_serial, _adam_par = _split(_adam_at_range)


def _adam_run(w, g, m, v, lr, t, beta1, beta2, eps, keep, l2, l1) -> None:
    """Adam's pass (AdamW's with keep < 1) on flat views of w, g, m, v."""
    w1, g1, m1, v1 = _flat(w, "w"), _flat(g, "g"), _flat(m, "m"), _flat(v, "v")
    scalars = (float(lr), float(beta1), float(beta2), float(eps), float(keep), float(l2), float(l1))
    _run(_adam_par, _adam_serial, w1.size, w1, g1, m1, v1, _step_array(t), *scalars)


def _step_array(t) -> np.ndarray:
    """A step (int or 1-element integer array) as the 1-element int64 array the jitted kernels read:
    the training loop's own array as it is, so that a step graph replays each step's value."""
    if isinstance(t, np.ndarray) and t.shape == (1,) and t.dtype == np.int64:
        return t
    return np.array([_step_value(t)], np.int64)


def adam_step(
    w: _A, g: _A, m: _A, v: _A, lr: float, t: int, beta1: float = 0.9, beta2: float = 0.999,
    eps: float = 1e-8, l2: float = 0.0, l1: float = 0.0
) -> None:
    """Adam with bias correction at step t (1-based; int or 1-element int64 array),
    in place on w, m, v (same shape)."""
    _adam_run(w, g, m, v, lr, t, beta1, beta2, eps, 1.0, l2, l1)


def adamw_step(
    w: _A, g: _A, m: _A, v: _A, lr: float, t: int, beta1: float = 0.9, beta2: float = 0.999,
    eps: float = 1e-8, weight_decay: float = 0.01, l2: float = 0.0, l1: float = 0.0
) -> None:
    """AdamW (decoupled weight decay) at step t (1-based; int or 1-element int64 array),
    in place on w, m, v (same shape): one pass, the decay as a factor on w."""
    keep = float(w.dtype.type(1 - float(lr) * float(weight_decay)))  # rounded to w's dtype, as the reference
    _adam_run(w, g, m, v, lr, t, beta1, beta2, eps, keep, l2, l1)


@njit(cache=True, error_model="numpy")
def _lion_range(w, g, m, lr, b1, b2, omb1, omb2, wd, l2, l1, lo, hi):
    # scalars in w's dtype, omb = 1 - b: the arithmetic of the reference, so that a weight Lion's
    # +-lr steps bring back to 0 is exactly 0 here too (sign(w) of the l1 term is discontinuous there)
    for i in range(lo, hi):
        wi = w[i]
        ge = g[i] + l2 * wi + l1 * np.sign(wi)
        c = b1 * m[i] + omb1 * ge
        w[i] = wi - lr * (np.sign(c) + wd * wi)
        m[i] = b2 * m[i] + omb2 * ge


_lion_serial, _lion_par = _split(_lion_range)


def lion_step(
    w: np.ndarray,
    g: np.ndarray,
    m: np.ndarray,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.99,
    weight_decay: float = 0.0,
    l2: float = 0.0,
    l1: float = 0.0,
) -> None:
    """Lion (Chen et al. 2023), in place on w and m (same shape as w)."""
    w1, g1, m1 = _flat(w, "w"), _flat(g, "g"), _flat(m, "m")
    args = _lion_scalars(w1.dtype, lr, beta1, beta2, weight_decay, l2, l1)
    _run(_lion_par, _lion_serial, w1.size, w1, g1, m1, *args)


def _lion_scalars(dtype, lr, beta1, beta2, weight_decay, l2, l1) -> tuple:
    """lion's scalar arguments in ``dtype``, 1 - beta rounded once."""
    t = np.dtype(dtype).type
    return t(lr), t(beta1), t(beta2), t(1 - beta1), t(1 - beta2), t(weight_decay), t(l2), t(l1)


# ===================================================================== dropout
# Philox4x32-10 on uint64 registers holding 32-bit words: Numba promotes uint32 products to
# 64 bits, and mixing signed with unsigned would go to float, so every constant is a uint64.
_PM0, _PM1 = np.uint64(_PHILOX_M[0]), np.uint64(_PHILOX_M[1])
_PW0, _PW1 = np.uint64(_PHILOX_W[0]), np.uint64(_PHILOX_W[1])
_S8 = np.uint64(8)
_S16 = np.uint64(16)
_S32 = np.uint64(32)
_MASK16 = np.uint64(0xFFFF)


@njit(cache=True, error_model="numpy")
def _philox_fill_k(key, w0, w1, w2, w3):
    """Blocks 0 .. len(w0)-1 of the stream key = (seed lo, seed hi, step lo, step hi): Philox4x32-10
    with counter (b, 0, step lo, step hi) and key (seed lo, seed hi); word j of block b into wj[b].
    Four separate outputs keep the loop SIMD-friendly (8x faster than interleaved stores)."""
    for b in range(w0.size):
        k0, k1 = key[0], key[1]
        c0, c1, c2, c3 = np.uint64(b), np.uint64(0), key[2], key[3]
        for _ in range(10):
            p0 = _PM0 * c0
            p1 = _PM1 * c2
            c0, c1, c2, c3 = (p1 >> _S32) ^ c1 ^ k0, p1 & _MASK32, (p0 >> _S32) ^ c3 ^ k1, p0 & _MASK32
            k0 = (k0 + _PW0) & _MASK32
            k1 = (k1 + _PW1) & _MASK32
        w0[b] = c0
        w1[b] = c1
        w2[b] = c2
        w3[b] = c3


@njit(cache=True, error_model="numpy")
def _word(w0, w1, w2, w3, i):
    """Element i of the stream: word i % 4 of block i // 4."""
    j, b = i & 3, i >> 2
    return w0[b] if j == 0 else (w1[b] if j == 1 else (w2[b] if j == 2 else w3[b]))


@njit(cache=True, error_model="numpy")
def _uniform(word):
    return np.float64(word >> _S8) * (1.0 / (1 << 24))


@njit(cache=True, error_model="numpy")
def _hash_uniform_k(w0, w1, w2, w3, out):
    """out[i] = uniform(element i of the stream), block by block: a call of _word per element
    passes four arrays, and their reference counting cost 40 ns an element (0.4 ms vs 2.4 at 55k)."""
    n, words = out.size, (w0, w1, w2, w3)
    for j in range(4):
        wj, lanes = words[j], out[j:n:4]
        for b in range(lanes.size):
            lanes[b] = _uniform(wj[b])


_SCRATCH = threading.local()  # per-thread Philox words, reused: no allocation per step


def _stream(seed: int, step, n: int) -> tuple:
    """The first n words of the stream (seed, step) as 4 arrays (block-major, see _word),
    views into a per-thread buffer that the next call overwrites. A jitted call fills them and
    reads the step itself (the training step's 1-element array), so a step graph replays it."""
    blocks = -(-n // 4)
    buf = getattr(_SCRATCH, "words", None)
    if buf is None or buf.shape[1] < blocks:
        buf = _SCRATCH.words = np.empty((4, max(blocks, 1024)), np.uint64)
    words = tuple(buf[j, :blocks] for j in range(4))
    _call(_philox_at_k, *_seed_words(seed), _step_array(step), *words)
    return words


@njit(cache=True, error_model="numpy")
def _philox_at_k(seed_lo, seed_hi, step, w0, w1, w2, w3):
    """_philox_fill_k for the stream (seed, step[0]): the key is (seed lo, seed hi, step lo, step hi)."""
    s = np.uint64(step[0])
    _philox_fill_k((seed_lo, seed_hi, s & _MASK32, s >> _S32), w0, w1, w2, w3)


def _seed_words(seed: int) -> tuple:
    """A stream's seed as its key's two uint64 words: seed mod 2^64, low and high halves."""
    seed = int(seed) & (2**64 - 1)
    return np.uint64(seed & 0xFFFFFFFF), np.uint64(seed >> 32)


def hash_uniform(seed: int, n: int, step=0) -> np.ndarray:
    """Counter-based uniforms in [0,1), bit-identical to the reference's Philox stream. -> (n,) float64."""
    out = np.empty(n, np.float64)
    _hash_uniform_k(*_stream(seed, step, n), out)
    return out


# ====================================================== shuffle and augmentation
@njit(cache=True, error_model="numpy")
def _permutation_keys_k(w0, w1, w2, w3, keys):
    """keys[i] = element i of the stream << 32 | i, block by block (as _hash_uniform_k)."""
    n, words = keys.size, (w0, w1, w2, w3)
    for j in range(4):
        wj, lanes = words[j], keys[j:n:4]
        for b in range(lanes.size):
            lanes[b] = (wj[b] << _S32) | np.uint64(4 * b + j)


def permutation(seed: int, n: int, epoch: int = 0, out: np.ndarray | None = None) -> np.ndarray:
    """Indices 0..n-1 in the order of their counter hash, ties by index: the distinct 64-bit
    keys hash << 32 | index (jitted), sorted, their low words (as the GPU does; NumPy's sort of
    64-bit keys beats a stable argsort of the hashes 1.6x). Bit-identical to the reference. -> (n,) int32."""
    _check_permutation_size(n)
    keys = np.empty(n, np.uint64)
    _permutation_keys_k(*_stream(seed, epoch, n), keys)
    keys.sort()
    return _put(out, (keys & _MASK32).astype(np.int32))


@njit(cache=True, error_model="numpy")
def _gather_shifted_k(src, idx, out, side, max_shift, divisor, offset, w0, w1, w2, w3):
    # src: float images, or uint8 codes decoded on the way (divisor, offset in out's dtype)
    span = 2 * max_shift + 1
    for r in range(idx.shape[0]):
        _prefetch_gather(src, idx, r)
        k = _source_row(idx, r, src.shape[0])
        h = _word(w0, w1, w2, w3, r)
        dy = np.int64(h & _MASK16) % span - max_shift
        dx = np.int64(h >> _S16) % span - max_shift
        lo, hi = max(dx, 0), side + min(dx, 0)  # columns j whose source j - dx is inside
        for i in range(side):
            s = min(max(i - dy, 0), side - 1) * side
            dst, row = out[r, i * side : (i + 1) * side], src[k, s : s + side]
            for j in range(lo):
                dst[j] = _decoded(row[0], divisor, offset)
            # the inside run as two aligned views indexed from 0: with row[j - dx] numba's
            # negative-index wraparound check stays in the loop and blocks vectorisation (3.5x)
            body, inside = dst[lo:hi], row[lo - dx : hi - dx]
            for j in range(hi - lo):
                body[j] = _decoded(inside[j], divisor, offset)
            for j in range(hi, side):
                dst[j] = _decoded(row[side - 1], divisor, offset)


def gather_shifted(
    src: np.ndarray, idx: np.ndarray, max_shift: int, seed: int, step=0, out: np.ndarray | None = None
) -> np.ndarray:
    """Minibatch gather with the reference's hash-drawn edge-repeating shifts, in one
    pass. src: (N, side*side) float, idx: (B,) int -> (B, side*side)."""
    side = _image_side(src.shape[1], max_shift)
    if out is None:
        out = np.empty((idx.shape[0], src.shape[1]), dtype=src.dtype)
    if not (src.flags.c_contiguous and out.flags.c_contiguous):
        raise ValueError("gather_shifted: src and out must be C-contiguous")
    one, zero = out.dtype.type(1), out.dtype.type(0)  # unused: floats are copied as they are
    _call(_gather_shifted_k, src, idx, out, side, max_shift, one, zero, *_stream(seed, step, idx.shape[0]))
    return out


def gather_shifted_pixels(
    codes: np.ndarray,
    idx: np.ndarray,
    max_shift: int,
    seed: int,
    divisor: float,
    offset: float,
    dtype=np.float32,
    step=0,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """``gather_shifted`` of 8-bit codes decoded on the way (``code / divisor + offset`` in dtype),
    in one pass. codes: (N, side*side) uint8, idx: (B,) int -> (B, side*side) dtype."""
    _check_pixel_codes(codes)
    side = _image_side(codes.shape[1], max_shift)
    out = _pixel_rows(out, idx.shape[0], codes.shape[1], dtype, "gather_shifted_pixels")
    scale = out.dtype.type(divisor), out.dtype.type(offset)
    _call(_gather_shifted_k, codes, idx, out, side, max_shift, *scale, *_stream(seed, step, idx.shape[0]))
    return out


@njit(cache=True, error_model="numpy")
def _signed_noise_k(w0, w1, w2, w3, flat):
    """flat[i] = 2 * uniform(element i of the stream) - 1, block by block (vectorisable)."""
    n, words = flat.size, (w0, w1, w2, w3)
    for j in range(4):
        wj, lanes = words[j], flat[j:n:4]
        for b in range(lanes.size):
            lanes[b] = 2.0 * _uniform(wj[b]) - 1.0


@njit(cache=True, error_model="numpy")
def _blur_k(taps, scale, src, out, rows):
    """out = scale * src smoothed by taps along axis 1 (rows=False: x) or 0 (rows=True: y) of
    each side x side image in src/out (n * side, side); float64 sums, zero outside. Each tap
    adds a shifted source row into a row accumulator, so the inner loop vectorises."""
    side, radius = src.shape[1], taps.size // 2
    acc = np.empty(side, np.float64)
    for row in range(src.shape[0]):
        i = row % side
        acc[:] = 0.0
        for k in range(taps.size):
            d = k - radius
            if rows and not 0 <= i + d < side:
                continue
            shift = 0 if rows else d
            lo, hi = max(0, -shift), min(side, side - shift)
            line = src[row + d] if rows else src[row]
            part, body = acc[lo:hi], line[lo + shift : hi + shift]
            for j in range(hi - lo):
                part[j] += taps[k] * np.float64(body[j])
        for j in range(side):
            out[row, j] = scale * acc[j]


def elastic_field(
    seed: int, n: int, side: int, alpha: float, sigma: float, step=0,
    out: _A | None = None, work: _A | None = None
) -> _A:
    """The reference's Simard displacement fields: Philox noise in [-1, 1), Gaussian-smoothed
    along x then y, times alpha. -> (n, 2, side, side) out's dtype (float32 when out is None)."""
    taps = _gaussian_taps(sigma)
    shape = (n, 2, side, side)
    out = np.empty(shape, np.float32) if out is None else out
    work = np.empty(shape, out.dtype) if work is None else work
    if out.shape != shape or work.shape != shape or not (out.flags.c_contiguous and work.flags.c_contiguous):
        raise ValueError(f"elastic_field: out and work must be C-contiguous arrays of shape {shape}")
    rows = (n * 2 * side, side)
    _call(_signed_noise_k, *_stream(seed, step, n * 2 * side * side), out.reshape(-1))
    _call(_blur_k, taps, 1.0, out.reshape(rows), work.reshape(rows), False)
    _call(_blur_k, taps, float(alpha), work.reshape(rows), out.reshape(rows), True)
    return out


@njit(cache=True, error_model="numpy")
def _bilinear(img, side, sy, sx):
    """img (side*side,) sampled at (sy, sx) with edge pixels repeated, in float64."""
    y0, x0 = math.floor(sy), math.floor(sx)
    fy, fx = sy - y0, sx - x0
    r0, r1 = min(max(y0, 0), side - 1) * side, min(max(y0 + 1, 0), side - 1) * side
    c0, c1 = min(max(x0, 0), side - 1), min(max(x0 + 1, 0), side - 1)
    top = (1 - fx) * np.float64(img[r0 + c0]) + fx * np.float64(img[r0 + c1])
    bottom = (1 - fx) * np.float64(img[r1 + c0]) + fx * np.float64(img[r1 + c1])
    return (1 - fy) * top + fy * bottom


@njit(cache=True, error_model="numpy")
def _gather_warped_k(src, idx, out, side, limits, field, w0, w1, w2, w3):
    c = (side - 1) / 2.0
    for r in range(idx.shape[0]):
        img = src[_source_row(idx, r, src.shape[0])]
        angle = (2.0 * _uniform(_word(w0, w1, w2, w3, 4 * r)) - 1.0) * limits[0]
        scale = 1.0 + (2.0 * _uniform(_word(w0, w1, w2, w3, 4 * r + 1)) - 1.0) * limits[1]
        ty = (2.0 * _uniform(_word(w0, w1, w2, w3, 4 * r + 2)) - 1.0) * limits[2]
        tx = (2.0 * _uniform(_word(w0, w1, w2, w3, 4 * r + 3)) - 1.0) * limits[2]
        cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
        for i in range(side):
            y = i - c - ty
            for j in range(side):
                x = j - c - tx
                sy, sx = cos * y + sin * x + c, cos * x - sin * y + c
                if field.shape[0]:
                    sy += np.float64(field[r, 0, i, j])
                    sx += np.float64(field[r, 1, i, j])
                out[r, i * side + j] = _bilinear(img, side, sy, sx)


def gather_warped(
    src: _A, idx: _A, max_rotate: float, max_scale: float, max_shift: float, seed: int, step=0,
    field: _A | None = None, out: _A | None = None
) -> _A:
    """Minibatch gather with the reference's Philox-drawn rotation, scaling and translation and an
    optional elastic ``field``, bilinear with edges repeated, in one pass.
    src: (N, side*side) float, idx: (B,) int -> (B, side*side)."""
    side, b = _image_side(src.shape[1], 0), idx.shape[0]
    if out is None:
        out = np.empty((b, src.shape[1]), dtype=src.dtype)
    if not (src.flags.c_contiguous and out.flags.c_contiguous):
        raise ValueError("gather_warped: src and out must be C-contiguous")
    if field is None:
        field = np.empty((0, 2, side, side), src.dtype)
    elif field.shape != (b, 2, side, side):
        raise ValueError(f"gather_warped: field must have shape {(b, 2, side, side)}, got {field.shape}")
    limits = np.array([math.radians(max_rotate), max_scale, max_shift], np.float64)
    _call(_gather_warped_k, src, idx, out, side, limits, field, *_stream(seed, step, 4 * b))
    return out


@njit(cache=True, error_model="numpy")
def _dropout_one(x, p, scale, out, mask, i, word):
    mk = scale if _uniform(word) >= p else x.dtype.type(0)
    mask[i] = mk
    out[i] = x[i] * mk  # x * 0 for dropped elements, as the reference (NaN stays NaN)


@njit(cache=True, error_model="numpy")
def _dropout_k(x, p, scale, out, mask, w0, w1, w2, w3):
    n = x.size
    for b in range(n // 4):  # whole blocks, their 4 elements unrolled: the loop vectorises
        _dropout_one(x, p, scale, out, mask, 4 * b, w0[b])
        _dropout_one(x, p, scale, out, mask, 4 * b + 1, w1[b])
        _dropout_one(x, p, scale, out, mask, 4 * b + 2, w2[b])
        _dropout_one(x, p, scale, out, mask, 4 * b + 3, w3[b])
    for i in range(n - n % 4, n):
        _dropout_one(x, p, scale, out, mask, i, _word(w0, w1, w2, w3, i))


def dropout_forward(
    x: np.ndarray,
    p: float,
    seed: int,
    out: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    step=0,
) -> tuple[np.ndarray, np.ndarray]:
    """Inverted dropout, mask from hash_uniform(seed, n, step) fused in. x: (B,N) -> (out, mask)."""
    if out is None:
        out = np.empty_like(x)
    if mask is None:
        mask = np.empty_like(x)
    scale = x.dtype.type(1.0 / (1.0 - p))  # the mask value, rounded once as the reference does
    words = _stream(seed, step, x.size)
    _call(_dropout_k, _flat(x, "x"), float(p), scale, _flat(out, "out"), _flat(mask, "mask"), *words)
    return out, mask


@njit(cache=True, error_model="numpy")
def _mul_k(a, b, out):
    for i in range(a.size):
        out[i] = a[i] * b[i]


def dropout_backward(grad_out: np.ndarray, mask: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """grad_out * mask. (B,N),(B,N) -> (B,N)."""
    if out is None:
        out = np.empty_like(grad_out)
    _call(_mul_k, _flat(grad_out, "grad_out"), _flat(mask, "mask"), _flat(out, "out"))
    return out


# ================================================================== batch norm
@njit(cache=True, error_model="numpy")
def _bn_forward_k(x, gamma, beta, eps, out, xhat, mean, var, run_mean, run_var, momentum, update):
    nb, n = x.shape
    mu = np.zeros(n, np.float64)
    for i in range(nb):
        for j in range(n):
            mu[j] += x[i, j]
    for j in range(n):
        mu[j] /= nb
    sq = np.zeros(n, np.float64)
    for i in range(nb):
        for j in range(n):
            d = x[i, j] - mu[j]
            sq[j] += d * d
    for j in range(n):
        sq[j] /= nb
        mean[j] = mu[j]
        var[j] = sq[j]
        if update:
            run_mean[j] = momentum * run_mean[j] + (1.0 - momentum) * mean[j]
            run_var[j] = momentum * run_var[j] + (1.0 - momentum) * var[j] * (nb / max(nb - 1, 1))
        sq[j] = 1.0 / math.sqrt(sq[j] + eps)  # now the inverse std
    for i in range(nb):
        for j in range(n):
            xhat[i, j] = (x[i, j] - mu[j]) * sq[j]
            out[i, j] = gamma[j] * xhat[i, j] + beta[j]


def batchnorm_forward(
    x: np.ndarray,
    gamma: np.ndarray,
    beta: np.ndarray,
    eps: float = 1e-5,
    out: np.ndarray | None = None,
    xhat: np.ndarray | None = None,
    mean: np.ndarray | None = None,
    var: np.ndarray | None = None,
    running_mean: np.ndarray | None = None,
    running_var: np.ndarray | None = None,
    momentum: float = 0.9,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Training batch norm (float64 stats, biased var). x: (B,N), gamma/beta: (N,)
    -> out (B,N), xhat (B,N), mean (N,), var (N,), x's dtype. Updates
    running_mean/running_var (N,) in place when given (see the reference)."""
    if out is None:
        out = np.empty_like(x)
    if xhat is None:
        xhat = np.empty_like(x)
    if mean is None:
        mean = np.empty(x.shape[1], x.dtype)
    if var is None:
        var = np.empty(x.shape[1], x.dtype)
    update = _updates_running_stats(running_mean, running_var)
    rm, rv = (running_mean, running_var) if update else (mean, var)  # untouched when not updating
    _call(_bn_forward_k, x, gamma, beta, float(eps), out, xhat, mean, var, rm, rv, float(momentum), update)
    return out, xhat, mean, var


@njit(cache=True, error_model="numpy")
def _bn_inference_k(x, gamma, beta, mean, var, eps, out):
    n = x.shape[1]
    for i in range(x.shape[0]):
        for j in range(n):
            out[i, j] = gamma[j] * (x[i, j] - mean[j]) / math.sqrt(var[j] + eps) + beta[j]


def batchnorm_inference(
    x: np.ndarray,
    gamma: np.ndarray,
    beta: np.ndarray,
    mean: np.ndarray,
    var: np.ndarray,
    eps: float = 1e-5,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Inference batch norm with running stats, one pass. x: (B,N), others (N,) -> (B,N)."""
    if out is None:
        out = np.empty_like(x)
    _call(_bn_inference_k, x, gamma, beta, mean, var, float(eps), out)
    return out


@njit(cache=True, error_model="numpy")
def _bn_backward_k(dy, xhat, gamma, var, eps, dx, dgamma, dbeta):
    nb, n = dy.shape
    sb = np.zeros(n, np.float64)
    sg = np.zeros(n, np.float64)
    for i in range(nb):
        for j in range(n):
            sb[j] += dy[i, j]
            sg[j] += dy[i, j] * xhat[i, j]
    for j in range(n):
        dbeta[j] = sb[j]
        dgamma[j] = sg[j]
    for i in range(nb):
        for j in range(n):
            g = gamma[j] / math.sqrt(var[j] + eps)
            dx[i, j] = g * (dy[i, j] - sb[j] / nb - xhat[i, j] * (sg[j] / nb))


def batchnorm_backward(
    grad_out: np.ndarray,
    xhat: np.ndarray,
    gamma: np.ndarray,
    var: np.ndarray,
    eps: float = 1e-5,
    dx: np.ndarray | None = None,
    dgamma: np.ndarray | None = None,
    dbeta: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Training batch-norm backward (float64 sums). (B,N),(B,N),(N,),(N,) -> dx (B,N), dgamma, dbeta (N,)."""
    if dx is None:
        dx = np.empty_like(grad_out)
    if dgamma is None:
        dgamma = np.empty(grad_out.shape[1], grad_out.dtype)
    if dbeta is None:
        dbeta = np.empty(grad_out.shape[1], grad_out.dtype)
    _call(_bn_backward_k, grad_out, xhat, gamma, var, float(eps), dx, dgamma, dbeta)
    return dx, dgamma, dbeta


# =========================================================== gradient clipping
@njit(cache=True, error_model="numpy")
def _sum_squares_k(x):
    s = 0.0
    for i in range(x.size):
        s += np.float64(x[i]) * x[i]
    return s


def sum_squares(x: np.ndarray, out: np.ndarray | None = None, accumulate: bool = False) -> np.ndarray:
    """Sum of x**2 (float64 accumulation) as a 0-d array of x's dtype; written into
    ``out`` (0-d), or added to it with ``accumulate=True``."""
    return _summed(out, x.dtype, _sum_squares_k, _flat(x, "x"), add=accumulate)


@njit(cache=True, error_model="numpy")
def _scale_k(g, factor):
    for i in range(g.size):
        g[i] *= factor


@njit(cache=True, error_model="numpy")
def _clip_scale_k(g, sumsq, max_norm):
    """Scale flat g by min(1, max_norm / (sqrt(sumsq) + 1e-12)), rounded to g's dtype as the
    reference; the norm is read here (sumsq: 1 element), so that a step graph replays it."""
    f = max_norm / (math.sqrt(np.float64(sumsq[0])) + 1e-12)
    _scale_k(g, g.dtype.type(f if f < 1.0 else 1.0))  # min(1.0, f) as Python's min, NaN included


def clip_scale(g: np.ndarray, sumsq: np.ndarray, max_norm: float) -> None:
    """Scale g in place by min(1, max_norm / (sqrt(sumsq) + 1e-12)); sumsq is 0-d."""
    _call(_clip_scale_k, _flat(g, "g"), np.asarray(sumsq).reshape(1), float(max_norm))


@njit(cache=True, error_model="numpy")
def _clip_value_k(g, v):
    for i in range(g.size):
        gi = g[i]
        g[i] = v if gi > v else (-v if gi < -v else gi)  # NaN fails both tests and stays


def clip_value(g: np.ndarray, value: float) -> None:
    """Clip g in place to [-value, value] elementwise (value rounded to g's dtype); NaN stays."""
    _call(_clip_value_k, _flat(g, "g"), g.dtype.type(value))


# ===================================================================== helpers
def _jit_cache_dir() -> str:
    """Directory of Numba's on-disk cache for this module ($NUMBA_CACHE_DIR/... or __pycache__)."""
    try:
        return str(_softmax_xent_k._cache._cache_path)
    except AttributeError:  # pragma: no cover - numba internals moved
        base = os.environ.get("NUMBA_CACHE_DIR")
        return base or os.path.join(os.path.dirname(os.path.abspath(__file__)), "__pycache__")


def _warmup(dtype=np.float32) -> float:
    """Compile (or load from cache) every kernel, serial and parallel, for ``dtype``. -> seconds."""
    dt = np.dtype(dtype)
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    z = rng.standard_normal((3, 4)).astype(dt)
    b = np.zeros(4, dt)
    lab = np.array([0, 3, 1], np.int64)
    nt = (2,)  # extra last argument of the parallel variants
    codes = [activation(name).code for name in ACTIVATIONS]
    for code in (*codes, _NEGATE, _SIGMOID_FINISH):
        for keep in (False, True):
            _bias_act_serial(z, b, np.empty_like(z), np.empty_like(z), keep, code)
            _bias_act_par(z, b, np.empty_like(z), np.empty_like(z), keep, code, *nt)
    for code in codes:
        _act_grad_serial(z.ravel(), z.ravel(), z.ravel(), np.empty(z.size, dt), code)
        _act_grad_par(z.ravel(), z.ravel(), z.ravel(), np.empty(z.size, dt), code, *nt)
    bias_grad(z)
    gather_rows(z, lab[[0, 2]])
    gather_pixels(np.zeros((3, 4), np.uint8), lab[[0, 2]], 127.5, -1.0, dt)
    softmax(z)
    for loss in (softmax_xent, sigmoid_bce, mse):
        loss(z, lab, grad_scale=1.0 / 3)
    correct_count(z, lab)
    w1, g1 = z.ravel().copy(), z.ravel().copy()
    s1, s2 = np.zeros_like(w1), np.zeros_like(w1)
    _sgd_serial(w1, g1, 0.1, 0.0, 0.0)
    _sgd_par(w1, g1, 0.1, 0.0, 0.0, *nt)
    sgd_matmul_step(z.T.copy(), z, z, 0.1, 0.0, trans_a=True)  # the BLAS call (not cached on disk)
    _momentum_serial(w1, g1, s1, 0.1, 0.9, False, 0.0, 0.0)
    _momentum_par(w1, g1, s1, 0.1, 0.9, False, 0.0, 0.0, *nt)
    _adagrad_serial(w1, g1, s1, 0.1, 1e-8, 0.0, 0.0)
    _adagrad_par(w1, g1, s1, 0.1, 1e-8, 0.0, 0.0, *nt)
    _rmsprop_serial(w1, g1, s1, 0.1, 0.9, 1e-8, 0.0, 0.0)
    _rmsprop_par(w1, g1, s1, 0.1, 0.9, 1e-8, 0.0, 0.0, *nt)
    t = np.ones(1, np.int64)
    _adam_serial(w1, g1, s1, s2, t, 1e-3, 0.9, 0.999, 1e-8, 1.0, 0.0, 0.0)
    _adam_par(w1, g1, s1, s2, t, 1e-3, 0.9, 0.999, 1e-8, 1.0, 0.0, 0.0, *nt)
    _lion_serial(w1, g1, s1, *_lion_scalars(dt, 0.1, 0.9, 0.99, 0.0, 0.0, 0.0))
    _lion_par(w1, g1, s1, *_lion_scalars(dt, 0.1, 0.9, 0.99, 0.0, 0.0, 0.0), *nt)
    hash_uniform(1, 4)
    permutation(1, 4)
    gather_shifted(np.ones((2, 9), dt), lab[[0, 1]] % 2, 1, 1)
    gather_shifted_pixels(np.zeros((2, 9), np.uint8), lab[[0, 1]] % 2, 1, 1, 127.5, -1.0, dt)
    _, mk = dropout_forward(z, 0.5, 1)
    dropout_backward(z, mk)
    y, xh, mean, var = batchnorm_forward(z, b + 1, b, running_mean=b + 0, running_var=b + 1)
    sum_squares(z)
    clip_scale(z.ravel().copy(), sum_squares(z), 1.0)
    clip_value(z.ravel().copy(), 0.5)
    batchnorm_inference(z, b + 1, b, mean, var)
    batchnorm_backward(z, xh, b + 1, var)
    return time.perf_counter() - t0


# The public kernels a step graph cannot replay refuse to run inside a capture (numba_graph).
for _name, _fn in list(globals().items()):
    if inspect.isfunction(_fn) and _fn.__module__ == __name__ and not _name.startswith("_"):
        if _name not in _CAPTURABLE:
            globals()[_name] = _refusing(_fn)
del _name, _fn
