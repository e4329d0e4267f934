"""CuPy kernels: the contract of ``reference.py`` on NVIDIA GPUs.

Dense matmuls go to cuBLAS (``cupy.matmul``); everything else launches our
CUDA C++ from ``kernels/cuda/*.cu`` (compiled with ``RawModule`` on first use,
cached per file). Scalars are passed with their exact C types (``float`` ->
``numpy.float32``, ``int`` -> ``numpy.int32``, ``long long`` -> ``numpy.int64``)
because a mismatch silently corrupts a launch. Losses and ``correct_count``
return 0-d *device* arrays and never synchronize.

The array module is bound per backend: ``make_backend(real=True)`` binds real
CuPy, ``make_backend(real=False)`` binds the emulated device of ``cuda_emu``
(same code, kernels run on the CPU). Each backend gets its own copy of this
module, which exposes exactly the reference's public names; this importable
module additionally has ``make_backend`` and binds CuPy lazily on first use,
so ``import gpumlp`` never needs CuPy or a GPU.
"""

from __future__ import annotations

import importlib.util as _importlib_util
import math as _math
import os as _os
import shutil as _shutil
import sys as _sys
from pathlib import Path as _Path
from typing import Any as _Any

import numpy as np

from .reference import (
    ACTIVATIONS,
    LEAKY_SLOPE,
    LOG_EPS,
    _check_permutation_size,
    _image_side,
    _updates_running_stats,
)

_cp: _Any = None  # the CuPy-like array module; bound by make_backend, else CuPy on first use
_CUDA_DIR = _Path(__file__).resolve().parent / "cuda"
_INCLUDE = '#include "device_common.h"'
_BLOCK = 256  # threads per block for elementwise kernels (<= MAX_BLOCK in device_common.h)
_COL_BLOCK = (32, 8)  # column kernels: 32 columns x COL_Y row lanes
_MODULES: dict[str, _Any] = {}
_KERNELS: dict[str, _Any] = {}
_GRID_CAP: list[int] = []
_SUMSQ_WORK: list[_Any] = []  # sum_squares' per-block partials and its ticket counter
# Check loss labels against [0, K): one tiny device->host copy per call, so on by default
# only on the emulated device (a debugging tool); the kernels never read out of bounds
# anyway (a bad label gives a NaN softmax_xent loss).
_VALIDATE_LABELS = True
# cuBLAS compute type of float32 GEMMs: "float32" exact (default); "tf32" / "bf16" let tensor
# cores round the inputs to TensorFloat-32 (10-bit mantissa) / bfloat16 (7-bit), accumulating in float32.
_COMPUTE_TYPES = {"float32": "COMPUTE_TYPE_DEFAULT", "tf32": "COMPUTE_TYPE_TF32", "bf16": "COMPUTE_TYPE_BF16"}
# "cublas": dense matmuls on cuBLAS via cupy.matmul (default); "own": our tiled GEMM in
# cuda/gemm.cu, which (unlike cuBLAS under CuPy, cupy issue 6290) works during CUDA-graph capture.
_GEMM = _os.environ.get("GPUMLP_GEMM", "cublas")
_GEMM_TILE, _GEMM_BLOCK = 32, (32, 8)  # must match GEMM_TILE / GEMM_ROWS in cuda/gemm.cu
_TC_TILE, _TC_BLOCK = 64, (256,)  # must match TC_M = TC_N and TC_THREADS in cuda/gemm_tc.cu
_TC_DROP = {"COMPUTE_TYPE_TF32": 13, "COMPUTE_TYPE_BF16": 16}  # mantissa bits rounded off

# kernel name -> the .cu file that defines it
_FILES = {
    **dict.fromkeys(
        ("bias_act", "act_grad", "bias_grad", "gather_rows", "gather_shifted", "perm_keys", "perm_index"),
        "elementwise",
    ),
    **dict.fromkeys(("softmax", "softmax_xent", "sigmoid_bce", "mse", "correct_count"), "losses"),
    **dict.fromkeys(("sgd", "momentum", "adagrad", "rmsprop", "adam", "sum_squares", "clip_scale"), "optim"),
    **dict.fromkeys(
        ("hash_uniform", "dropout_forward", "mul", "batchnorm_forward", "batchnorm_inference"), "dropout_bn"
    ),
    "batchnorm_backward": "dropout_bn",
    "gemm": "gemm",
    "gemm_tc": "gemm_tc",
}


# ------------------------------------------------------------------ plumbing
def _xp() -> _Any:
    global _cp
    if _cp is None:
        import cupy

        _cp = cupy
    return _cp


def _source(stem: str) -> str:
    """The .cu file with device_common.h pasted in, so NVRTC needs no include path."""
    code = (_CUDA_DIR / f"{stem}.cu").read_text()
    return code.replace(_INCLUDE, (_CUDA_DIR / "device_common.h").read_text())


def _module(stem: str) -> _Any:
    mod = _MODULES.get(stem)
    if mod is None:
        mod = _MODULES[stem] = _xp().RawModule(code=_source(stem), options=("--std=c++17",))
    return mod


def _kernel(base: str, suffix: str) -> _Any:
    name = f"{base}_{suffix}"
    fn = _KERNELS.get(name)
    if fn is None:
        fn = _KERNELS[name] = _module(_FILES[base]).get_function(name)
    return fn


def _grid(n: int, block: int = _BLOCK) -> int:
    """Blocks for a grid-stride launch over n items: enough to fill the device, no more."""
    if not _GRID_CAP:
        attrs = _xp().cuda.Device().attributes
        per_sm = attrs.get("MaxBlocksPerMultiprocessor", 16)
        _GRID_CAP.append(max(1, int(attrs["MultiProcessorCount"]) * int(per_sm)))
    return max(1, min(-(-n // block), _GRID_CAP[0]))


def _row_block(k: int) -> int:
    """Threads for a one-block-per-row kernel: a power of two in [32, 256] covering k."""
    return min(256, max(32, 1 << (max(k, 1) - 1).bit_length()))


def _sfx(a: _Any, name: str) -> str:
    if a.dtype == np.float32:
        return "f32"
    if a.dtype == np.float64:
        return "f64"
    raise TypeError(f"{name}: expected a float32 or float64 array, got {a.dtype}")


def _dev(a: _Any, name: str) -> _Any:
    """Check that ``a`` is a device array; return it C-contiguous."""
    cp = _xp()
    if not isinstance(a, cp.ndarray):
        where = "host numpy array" if isinstance(a, np.ndarray) else type(a).__name__
        raise TypeError(f"{name} is a {where}, not a device array: move it with backend.asarray(...)")
    return a if a.flags.c_contiguous else cp.ascontiguousarray(a)


def _inplace(a: _Any, name: str, like: _Any) -> _Any:
    """Check an array updated in place: device, C-contiguous, same shape and dtype as ``like``."""
    _dev(a, name)
    if not a.flags.c_contiguous or a.shape != like.shape or a.dtype != like.dtype:
        raise ValueError(
            f"{name} must be a C-contiguous {like.dtype} array of shape {like.shape}, "
            f"got {a.dtype} {a.shape} (contiguous={a.flags.c_contiguous})"
        )
    return a


def _out(out: _Any, name: str, shape: tuple, dtype: _Any) -> _Any:
    if out is None:
        return _xp().empty(shape, dtype=dtype)
    _dev(out, name)
    if not out.flags.c_contiguous or out.shape != tuple(shape) or out.dtype != dtype:
        raise ValueError(f"{name} must be a C-contiguous {np.dtype(dtype)} array of shape {tuple(shape)}")
    return out


def _accumulator(acc: _Any, dtype: _Any) -> _Any:
    """A zeroed 0-d device scalar, or the caller's 0-d accumulator the kernel adds into."""
    if acc is None:
        return _xp().zeros((), dtype=dtype)
    _dev(acc, "accumulator")
    if acc.shape != () or acc.dtype != dtype:
        raise ValueError(
            f"the accumulator must be a 0-d {np.dtype(dtype)} device array, got {acc.dtype} {acc.shape}"
        )
    return acc


def _step(t: _Any, name: str) -> _Any:
    """A per-step integer as the 1-element int64 device array the kernels read
    (an int is uploaded; the training loop passes device arrays, so no upload there)."""
    if isinstance(t, (int, np.integer)):
        return _xp().full((1,), int(t), dtype=np.int64)
    t = _dev(t, name)
    if t.size != 1 or t.dtype != np.int64:
        raise ValueError(f"{name} must be an int or a 1-element int64 device array, got {t.dtype} {t.shape}")
    return t


def _seed64(seed: int) -> np.uint64:
    """A random stream's seed as the kernels' ``unsigned long long`` (mod 2^64, as the reference)."""
    return np.uint64(int(seed) & (2**64 - 1))


def _act_code(act: str) -> np.int32:
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}; choose one of {', '.join(ACTIVATIONS)}")
    return np.int32(ACTIVATIONS.index(act))


def _capturing() -> bool:
    try:
        return bool(_xp().cuda.get_current_stream().is_capturing())
    except Exception:  # older CuPy without capture support
        return False


def _labels(labels: _Any, rows: int, cols: int, check: bool = True) -> _Any:
    """int32 device labels; out-of-range values raise ValueError (one small device->host
    read, skipped while capturing a CUDA graph or when _VALIDATE_LABELS is off)."""
    labels = _dev(labels, "labels")
    if labels.shape != (rows,):
        raise ValueError(f"labels must have shape ({rows},), got {labels.shape}")
    if labels.dtype.kind not in "iu":
        raise TypeError(f"labels must be integers, got {labels.dtype}")
    if check and _VALIDATE_LABELS and rows and not _capturing():
        lo, hi = (int(v) for v in _xp().stack((labels.min(), labels.max())).get())
        if lo < 0 or hi >= cols:
            raise ValueError(f"labels must lie in [0, {cols}), got values in [{lo}, {hi}]")
    return labels if labels.dtype == np.int32 else labels.astype(np.int32)


def _elementwise(base: str, a: _Any, *args: _Any) -> None:
    n = a.size
    if n:
        _kernel(base, _sfx(a, base))((_grid(n),), (_BLOCK,), args)


def _set_matmul_precision(precision: str) -> None:
    """Make float32 cuBLAS GEMMs "float32" (exact, default), "tf32" or "bf16" (tensor cores),
    through CuPy's compute-type switch (the emulated device rounds the inputs the same way).
    Our own gemm.cu (CUDA-graph steps) follows the same switch with its tensor-core kernel."""
    if precision not in _COMPUTE_TYPES:
        raise ValueError(f"matmul precision must be one of {', '.join(_COMPUTE_TYPES)}, got {precision!r}")
    linalg = _xp()._core._routines_linalg  # CuPy's private switch, present since CuPy 9
    linalg.set_compute_type(np.float32, getattr(linalg, _COMPUTE_TYPES[precision]))


# --------------------------------------------------------------------- dense
def matmul(a, b, out=None, trans_a=False, trans_b=False):
    """``op(a) @ op(b)`` on cuBLAS (or gemm.cu when _GEMM == "own"). (M,K)@(K,N) -> (M,N)."""
    if _GEMM == "cublas":
        _dev(a, "a"), _dev(b, "b")
        if out is not None:
            _dev(out, "out")
        return _xp().matmul(a.T if trans_a else a, b.T if trans_b else b, out=out)
    if _GEMM != "own":
        raise ValueError(f"GPUMLP_GEMM must be 'cublas' or 'own', got {_GEMM!r}")
    a, b = _dev(a, "a"), _dev(b, "b")
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"matmul needs 2-D operands, got shapes {a.shape} and {b.shape}")
    if a.dtype != b.dtype:
        raise TypeError(f"matmul: a and b must have the same dtype, got {a.dtype} and {b.dtype}")
    sfx = _sfx(a, "matmul")
    m, k = a.shape[::-1] if trans_a else a.shape
    k2, n = b.shape[::-1] if trans_b else b.shape
    if k != k2:
        raise ValueError(f"matmul: op(a) is ({m}, {k}) but op(b) is ({k2}, {n})")
    out = _out(out, "out", (m, n), a.dtype)
    if m and n:
        args = (a, b, out, np.int32(m), np.int32(n), np.int32(k))
        args += (np.int32(a.shape[1]), np.int32(b.shape[1]), np.int32(n))  # lda, ldb, ldc
        args += (np.int32(bool(trans_a)), np.int32(bool(trans_b)))
        drop = _tensor_core_drop() if sfx == "f32" else 0
        if drop:
            grid = (-(-n // _TC_TILE), min(-(-m // _TC_TILE), 65535))
            _tensor_core_kernel()(grid, _TC_BLOCK, (*args, np.int32(drop)))
        else:
            grid = (-(-n // _GEMM_TILE), min(-(-m // _GEMM_TILE), 65535))
            _kernel("gemm", sfx)(grid, _GEMM_BLOCK, args)
    return out


def _tensor_core_kernel() -> _Any:
    """gemm_tc_f32, compiled on first use; a clear error where NVRTC lacks <mma.h>'s headers."""
    try:
        return _kernel("gemm_tc", "f32")
    except Exception as e:  # CuPy's CompileException carries the NVRTC log
        raise RuntimeError(
            "the tensor-core GEMM (kernels/cuda/gemm_tc.cu, for --precision tf32/bf16 with CUDA graphs) "
            "did not compile: NVRTC needs the CUDA C runtime headers of <mma.h> (crt/mma.h). Install "
            "them (pip install nvidia-cuda-crt for CUDA 13 wheels, or a full CUDA toolkit), or train "
            f"without --cuda-graphs or with --precision float32. NVRTC said: {e}"
        ) from e


def _tensor_core_drop() -> int:
    """Mantissa bits our GEMM rounds off float32 operands under the current compute type:
    0 (exact float32, the scalar kernel), 13 (TF32) or 16 (bf16) on the tensor-core kernel."""
    linalg = _xp()._core._routines_linalg
    current = linalg.get_compute_type(np.float32)
    drop = next((bits for name, bits in _TC_DROP.items() if getattr(linalg, name) == current), 0)
    if drop and int(_xp().cuda.Device().compute_capability) < 80:
        raise RuntimeError(
            "--precision tf32/bf16 in CUDA-graph steps needs TF32 tensor cores (compute capability 8.0+), "
            f"this GPU is sm_{_xp().cuda.Device().compute_capability}: use --precision float32 or eager steps"
        )
    return drop


def bias_act(z, b, act, out=None):
    """``act(z + b)`` in one pass. z: (B,N), b: (N,) -> (B,N)."""
    code = _act_code(act)
    z, b = _dev(z, "z"), _dev(b, "b")
    out = _out(out, "out", z.shape, z.dtype)
    slope = z.dtype.type(LEAKY_SLOPE)
    _elementwise("bias_act", z, z, b, out, np.int64(z.size), np.int32(b.size), code, slope)
    return out


def act_grad(grad_out, y, act, out=None):
    """``grad_out * act'(.)`` from the activation's output y. (B,N) -> (B,N)."""
    code = _act_code(act)
    grad_out, y = _dev(grad_out, "grad_out"), _dev(y, "y")
    out = _out(out, "out", y.shape, y.dtype)
    slope = y.dtype.type(LEAKY_SLOPE)
    _elementwise("act_grad", y, grad_out, y, out, np.int64(y.size), code, slope)
    return out


def bias_grad(grad_z, out=None):
    """Column sums of grad_z. (B,N) -> (N,)."""
    grad_z = _dev(grad_z, "grad_z")
    rows, cols = grad_z.shape
    out = _out(out, "out", (cols,), grad_z.dtype)
    if cols:
        grid = (-(-cols // _COL_BLOCK[0]),)
        _kernel("bias_grad", _sfx(grad_z, "bias_grad"))(
            grid, _COL_BLOCK, (grad_z, out, np.int32(rows), np.int32(cols))
        )
    return out


def gather_rows(src, idx, out=None):
    """Minibatch gather ``src[idx]`` on the device. src: (N,...), idx: (B,) int -> (B,...)."""
    src, idx = _dev(src, "src"), _dev(idx, "idx")
    shape = (idx.shape[0], *src.shape[1:])
    if src.dtype not in (np.float32, np.float64):  # e.g. labels or uint8 images: CuPy's own take
        res = _xp().take(src, idx, axis=0, out=out)
        return res if out is None else out
    if idx.dtype not in (np.int32, np.int64):
        idx = idx.astype(np.int64)
    out = _out(out, "out", shape, src.dtype)
    width = int(np.prod(src.shape[1:], dtype=np.int64))
    n = idx.shape[0] * width
    if n:
        name = "gather_rows"
        fn = _kernel(name, f"{_sfx(src, name)}_{'i32' if idx.dtype == np.int32 else 'i64'}")
        fn((_grid(n),), (_BLOCK,), (src, idx, out, np.int64(n), np.int64(width)))
    return out


def gather_shifted(src, idx, max_shift, seed, step=0, out=None):
    """Minibatch gather with the reference's Philox-drawn, edge-repeating shifts, in one
    launch; ``step`` read on the device. src: (N, side*side) float, idx: (B,) int -> (B, side*side)."""
    src, idx = _dev(src, "src"), _dev(idx, "idx")
    side = _image_side(src.shape[1], max_shift)
    if idx.dtype != np.int32:
        idx = idx.astype(np.int32)
    out = _out(out, "out", (idx.shape[0], src.shape[1]), src.dtype)
    seed64, step_d = _seed64(seed), _step(step, "step")
    args = (src, idx, out, np.int64(out.size), np.int32(side), np.int32(max_shift), seed64, step_d)
    _elementwise("gather_shifted", out, *args)
    return out


def permutation(seed, n, epoch=0, out=None):
    """The reference's Philox-ordered permutation of range(n), made on the device: 64-bit
    keys word << 32 | index, CuPy's sort, their low words. -> (n,) int32 device array."""
    _check_permutation_size(n)
    out = _out(out, "out", (n,), np.int32)
    if n:
        keys = _xp().empty((n,), dtype=np.uint64)
        grid, count, seed64 = (_grid(n),), np.int64(n), _seed64(seed)
        _kernel("perm_keys", "u64")(grid, (_BLOCK,), (keys, count, seed64, np.int64(epoch)))
        keys.sort()
        _kernel("perm_index", "u64")(grid, (_BLOCK,), (keys, out, count))
    return out


# -------------------------------------------------------------------- losses
def _row_loss(base, logits, labels, grad, grad_scale, loss, *extra):
    logits = _dev(logits, "logits")
    rows, cols = logits.shape
    labels = _labels(labels, rows, cols)
    grad = _out(grad, "grad", logits.shape, logits.dtype)
    loss = _accumulator(loss, logits.dtype)
    if logits.size:
        t = logits.dtype.type
        args = (
            logits,
            labels,
            grad,
            loss,
            np.int32(rows),
            np.int32(cols),
            t(grad_scale),
            *(t(e) for e in extra),
        )
        _kernel(base, _sfx(logits, base))((_grid(rows, 1),), (_row_block(cols),), args)
    return loss, grad


def softmax(logits, out=None):
    """Row-wise softmax, stabilised by the row max. (B,K) -> (B,K)."""
    logits = _dev(logits, "logits")
    rows, cols = logits.shape
    out = _out(out, "out", logits.shape, logits.dtype)
    if logits.size:
        args = (logits, out, np.int32(rows), np.int32(cols))
        _kernel("softmax", _sfx(logits, "softmax"))((_grid(rows, 1),), (_row_block(cols),), args)
    return out


def softmax_xent(logits, labels, grad=None, grad_scale=1.0, loss=None):
    """Fused softmax cross-entropy: (0-d summed loss, grad_scale * (softmax - onehot)). (B,K) -> ..."""
    return _row_loss("softmax_xent", logits, labels, grad, grad_scale, loss)


def sigmoid_bce(logits, labels, grad=None, grad_scale=1.0, loss=None):
    """Fused logistic cost against one-hot targets: (0-d summed loss, grad_scale * (p - t))."""
    return _row_loss("sigmoid_bce", logits, labels, grad, grad_scale, loss, -_math.log(LOG_EPS))


def mse(pred, labels, grad=None, grad_scale=1.0, loss=None):
    """Fused half squared error against one-hot targets: (0-d summed loss, grad_scale * (pred - t))."""
    return _row_loss("mse", pred, labels, grad, grad_scale, loss)


def correct_count(scores, labels, count=None):
    """Rows whose argmax equals the label (first max wins), as a 0-d int64 device array
    (added into the accumulator ``count`` when given)."""
    scores = _dev(scores, "scores")
    rows, cols = scores.shape
    labels = _labels(labels, rows, cols, check=False)  # a bad label just never matches
    count = _accumulator(count, np.int64)
    if scores.size:
        args = (scores, labels, count, np.int32(rows), np.int32(cols))
        _kernel("correct_count", _sfx(scores, "correct_count"))((_grid(rows),), (_BLOCK,), args)
    return count


# ---------------------------------------------------------------- optimizers
def _opt(base, w, g, states, *scalars, tail=()):
    """Launch optimizer ``base`` on w, g and its state arrays: ``scalars`` become w's
    dtype; ``tail`` (exactly typed values, device arrays) is passed as is, last."""
    _inplace(w, "w", w)
    _inplace(g, "g", w)
    for i, s in enumerate(states):
        _inplace(s, f"state {i}", w)
    t = w.dtype.type
    _elementwise(base, w, w, g, *states, np.int64(w.size), *(t(s) for s in scalars), *tail)


def sgd_step(w, g, lr, l2=0.0, l1=0.0):
    """Plain gradient descent, in place: w -= lr * g_eff."""
    _opt("sgd", w, g, (), lr, l2, l1)


def sgd_matmul_step(w, a, b, lr, l2=0.0, trans_a=False, trans_b=False, work=None):
    """w -= lr * (op(a) @ op(b) + l2*w): the product into ``work`` (allocated if None), then sgd_step."""
    sgd_step(w, matmul(a, b, out=work, trans_a=trans_a, trans_b=trans_b), lr, l2)


def momentum_step(w, g, v, lr, mu=0.9, nesterov=False, l2=0.0, l1=0.0):
    """Heavy-ball / Nesterov momentum (PyTorch convention), in place on w and v."""
    _inplace(w, "w", w)
    _inplace(g, "g", w)
    _inplace(v, "v", w)
    t = w.dtype.type
    args = (w, g, v, np.int64(w.size), t(lr), t(mu), np.int32(bool(nesterov)), t(l2), t(l1))
    _elementwise("momentum", w, *args)


def adagrad_step(w, g, h, lr, eps=1e-8, l2=0.0, l1=0.0):
    """AdaGrad, in place on w and h."""
    _opt("adagrad", w, g, (h,), lr, eps, l2, l1)


def rmsprop_step(w, g, s, lr, rho=0.9, eps=1e-8, l2=0.0, l1=0.0):
    """RMSProp, in place on w and s."""
    _opt("rmsprop", w, g, (s,), lr, rho, 1 - rho, eps, l2, l1)


def adam_step(w, g, m, v, lr, t, beta1=0.9, beta2=0.999, eps=1e-8, l2=0.0, l1=0.0):
    """Adam with bias correction at step t (1-based; int or 1-element int64 device
    array, read on the device), in place on w, m, v."""
    tail = (np.float64(beta1), np.float64(beta2), _step(t, "t"))
    _opt("adam", w, g, (m, v), lr, beta1, beta2, 1 - beta1, 1 - beta2, eps, l2, l1, tail=tail)


# ---------------------------------------------------------- gradient clipping
def sum_squares(x, out=None, accumulate=False):
    """Sum of x**2 (double accumulation, one deterministic launch) as a 0-d device
    array of x's dtype; written into ``out``, or added to it with ``accumulate=True``."""
    x = _dev(x, "x")
    _sfx(x, "sum_squares")
    if out is None:
        out, accumulate = _xp().zeros((), dtype=x.dtype), False
    else:
        _accumulator(out, x.dtype)
    if not _SUMSQ_WORK:
        cp = _xp()
        _SUMSQ_WORK.extend((cp.empty(_grid(1 << 62), np.float64), cp.zeros(1, np.uint32)))
    args = (x, np.int64(x.size), *_SUMSQ_WORK, out, np.int32(bool(accumulate)))
    _kernel("sum_squares", _sfx(x, "sum_squares"))((_grid(x.size),), (_BLOCK,), args)
    return out


def clip_scale(g, sumsq, max_norm):
    """Scale g in place by min(1, max_norm / (sqrt(sumsq) + 1e-12)), sumsq a 0-d
    device array read on the device (no sync)."""
    _inplace(g, "g", g)
    sumsq = _accumulator(sumsq, g.dtype)
    _elementwise("clip_scale", g, g, sumsq, np.int64(g.size), np.float64(max_norm))


# ------------------------------------------------------------------- dropout
def hash_uniform(seed, n, step=0):
    """Counter-based uniforms in [0,1), bit-identical to the reference. -> (n,) float64 device array."""
    out = _xp().empty((n,), dtype=np.float64)
    if n:
        args = (out, np.int64(n), _seed64(seed), _step(step, "step"))
        _kernel("hash_uniform", "f64")((_grid(n),), (_BLOCK,), args)
    return out


def dropout_forward(x, p, seed, out=None, mask=None, step=0):
    """Inverted dropout with Philox masks (bit-identical to the reference). -> (out, mask)."""
    if not 0 <= p < 1:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    x = _dev(x, "x")
    out = _out(out, "out", x.shape, x.dtype)
    mask = _out(mask, "mask", x.shape, x.dtype)
    thresh = np.uint32(_math.ceil(p * (1 << 24)))  # u >= p  <=>  (h >> 8) >= ceil(p * 2^24), exactly
    args = (
        x,
        out,
        mask,
        np.int64(x.size),
        _seed64(seed),
        _step(step, "step"),
        thresh,
        x.dtype.type(1.0 / (1.0 - p)),
    )
    _elementwise("dropout_forward", x, *args)
    return out, mask


def dropout_backward(grad_out, mask, out=None):
    """grad_out * mask. (B,N) -> (B,N)."""
    grad_out, mask = _dev(grad_out, "grad_out"), _dev(mask, "mask")
    out = _out(out, "out", grad_out.shape, grad_out.dtype)
    _elementwise("mul", grad_out, grad_out, mask, out, np.int64(grad_out.size))
    return out


# ---------------------------------------------------------------- batch norm
def batchnorm_forward(
    x, gamma, beta, eps=1e-5, out=None, xhat=None, mean=None, var=None,
    running_mean=None, running_var=None, momentum=0.9,
):  # fmt: skip
    """Training-mode batch norm. x: (B,N) -> (out, xhat, mean, var); updates
    running_mean/running_var (N,) in place when given, in the same launch."""
    x, gamma, beta = _dev(x, "x"), _dev(gamma, "gamma"), _dev(beta, "beta")
    rows, cols = x.shape
    out = _out(out, "out", x.shape, x.dtype)
    xhat = _out(xhat, "xhat", x.shape, x.dtype)
    mean, var = _out(mean, "mean", (cols,), x.dtype), _out(var, "var", (cols,), x.dtype)
    update = _updates_running_stats(running_mean, running_var)
    if update:
        running_mean = _inplace(running_mean, "running_mean", mean)
        running_var = _inplace(running_var, "running_var", var)
    else:
        running_mean, running_var = mean, var  # not touched: update is 0
    if cols:
        f = x.dtype.type
        args = (x, gamma, beta, out, xhat, mean, var, running_mean, running_var)
        args += (
            np.int32(rows),
            np.int32(cols),
            f(eps),
            f(momentum),
            f(1 - momentum),
            f(rows / max(rows - 1, 1)),
            np.int32(update),
        )
        grid = (-(-cols // _COL_BLOCK[0]),)
        _kernel("batchnorm_forward", _sfx(x, "batchnorm_forward"))(grid, _COL_BLOCK, args)
    return out, xhat, mean, var


def batchnorm_inference(x, gamma, beta, mean, var, eps=1e-5, out=None):
    """Inference-mode batch norm with running statistics. x: (B,N) -> (B,N)."""
    x = _dev(x, "x")
    gamma, beta, mean, var = (
        _dev(a, n) for a, n in ((gamma, "gamma"), (beta, "beta"), (mean, "mean"), (var, "var"))
    )
    out = _out(out, "out", x.shape, x.dtype)
    args = (x, gamma, beta, mean, var, out, np.int64(x.size), np.int32(x.shape[-1]), x.dtype.type(eps))
    _elementwise("batchnorm_inference", x, *args)
    return out


def batchnorm_backward(grad_out, xhat, gamma, var, eps=1e-5, dx=None, dgamma=None, dbeta=None):
    """Backward of training-mode batch norm. -> (dx, dgamma, dbeta)."""
    grad_out, xhat = _dev(grad_out, "grad_out"), _dev(xhat, "xhat")
    gamma, var = _dev(gamma, "gamma"), _dev(var, "var")
    rows, cols = grad_out.shape
    dx = _out(dx, "dx", grad_out.shape, grad_out.dtype)
    dgamma = _out(dgamma, "dgamma", (cols,), grad_out.dtype)
    dbeta = _out(dbeta, "dbeta", (cols,), grad_out.dtype)
    if cols:
        t = grad_out.dtype.type
        args = (grad_out, xhat, gamma, var, dx, dgamma, dbeta, np.int32(rows), np.int32(cols), t(eps))
        grid = (-(-cols // _COL_BLOCK[0]),)
        _kernel("batchnorm_backward", _sfx(grad_out, "batchnorm_backward"))(grid, _COL_BLOCK, args)
    return dx, dgamma, dbeta


# ------------------------------------------------------------------ CUDA graphs
def _stream() -> _Any:
    """A fresh non-blocking stream, used as a context manager (graphs cannot capture stream 0)."""
    return _xp().cuda.Stream(non_blocking=True)


def _capture(step: _Any) -> _Any:
    """Record ``step()``'s launches on the current stream into a CUDA graph (not running them)
    and return ``replay()``. Matmuls use gemm.cu meanwhile: CuPy refuses cuBLAS during capture."""
    global _GEMM
    for stem in set(_FILES.values()) - {"gemm_tc"}:  # compile and load now: no NVRTC mid-capture
        _module(stem).compile()
    if _tensor_core_drop():
        _tensor_core_kernel()
    stream = _xp().cuda.get_current_stream()
    saved, _GEMM = _GEMM, "own"
    try:
        stream.begin_capture()
        try:
            step()
        finally:
            graph = stream.end_capture()
    finally:
        _GEMM = saved
    return lambda: graph.launch(stream)


# ------------------------------------------------------------------ backends
def _bind(cp: _Any, tag: str) -> _Any:
    """A fresh copy of this module bound to the array module ``cp``, minus ``make_backend``."""
    name = f"{__package__}._cupy_gpu_{tag}"
    if name in _sys.modules:
        return _sys.modules[name]
    spec = _importlib_util.spec_from_file_location(name, __file__)
    mod = _importlib_util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod._cp = cp
    del mod.make_backend
    _sys.modules[name] = mod
    return mod


def make_backend(real: bool = True) -> _Any:
    """Backend "cupy" (real=True: CuPy on a GPU) or "cuda-emu" (real=False: the emulated device)."""
    from gpumlp.backend import Backend, BackendUnavailable

    if not real:
        from . import cuda_emu

        cxx = _os.environ.get("CXX", "g++")
        if _shutil.which(cxx) is None:
            raise BackendUnavailable(
                f"backend 'cuda-emu' compiles the CUDA kernels for the CPU and needs a C++20 compiler "
                f"with OpenMP ({cxx!r} not found; set $CXX or install g++)"
            )
        mod = _bind(cuda_emu, "emu")
        return Backend(
            "cuda-emu",
            cuda_emu,
            mod,
            "emulated CUDA device on the CPU: for correctness, not speed",
            synchronize=lambda: cuda_emu.cuda.Device().synchronize(),
            stream=mod._stream,
            capture=mod._capture,
        )
    try:
        import cupy
    except ImportError as e:
        raise BackendUnavailable(
            f"backend 'cupy' needs CuPy: pip install -e '.[cuda12]' or '.[cuda13]' ({e})"
        ) from None
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # CUDARuntimeError and friends: no driver, no device
        raise BackendUnavailable(
            f"backend 'cupy': CuPy is installed but no CUDA driver/GPU is usable ({e})"
        ) from None
    if count == 0:
        raise BackendUnavailable("backend 'cupy': CuPy is installed but found no CUDA GPU")
    mod = _bind(cupy, "cupy")
    mod._VALIDATE_LABELS = False  # no per-step host sync on the GPU
    dev = cupy.cuda.Device()
    props = cupy.cuda.runtime.getDeviceProperties(dev.id)
    gpu = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    return Backend(
        "cupy",
        cupy,
        mod,
        f"CuPy {cupy.__version__} on {gpu} (sm_{dev.compute_capability}): cuBLAS matmul + CUDA C++ kernels",
        synchronize=lambda: cupy.cuda.Device().synchronize(),
        stream=mod._stream,
        capture=mod._capture,
    )
