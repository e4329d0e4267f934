"""CuPy kernels: the contract of ``reference.py`` on NVIDIA GPUs.

Dense matmuls go to cuBLAS (``cupy.matmul``); everything else launches our
CUDA C++ from ``kernels/cuda/*.cu`` (compiled with ``RawModule`` on first use,
cached per backend). Scalars are passed with their exact C types (``float`` ->
``numpy.float32``, ``int`` -> ``numpy.int32``, ``long long`` -> ``numpy.int64``)
because a mismatch silently corrupts a launch. Losses and ``correct_count``
return 0-d *device* arrays and never synchronize.

:class:`CudaKernels` is bound to one array module: real CuPy (backend ``cupy``) or
the emulated device of ``cuda_emu`` (backend ``cuda-emu``: the same code, kernels
run on the CPU). Its public methods are exactly the reference's public names; all
state (options, compiled modules, workspaces) lives on the instance, so two backends,
two models or two threads in one process do not interfere. Module level holds only
constants and pure functions, plus :func:`capture` and :func:`set_matmul_precision`
for the backend. Nothing here imports CuPy: ``import gpumlp`` never needs it or a GPU.
"""

from __future__ import annotations

import math as _math
import threading as _threading
import warnings as _warnings
import weakref as _weakref
from collections.abc import Callable as _Callable
from pathlib import Path as _Path
from typing import Any as _Any

import numpy as np

from .activations import activation as _activation
from .activations import grad_spec as _grad_spec
from .common import chain_layers as _chain_layers
from .common import check_permutation_size as _check_permutation_size
from .common import check_pixel_codes as _check_pixel_codes
from .common import gaussian_taps as _gaussian_taps
from .common import updates_running_stats as _updates_running_stats
from .cuda_host import parse_kernels as _parse_kernels
from .images import image_side as _image_side
from .reference import ACTIVATIONS, LEAKY_SLOPE, LOG_EPS

_CUDA_DIR = _Path(__file__).resolve().parent / "cuda"
_INCLUDE = '#include "device_common.h"'
_BLOCK = 256  # threads per block for elementwise kernels (<= MAX_BLOCK in device_common.h)
_COL_BLOCK = (32, 8)  # column kernels: 32 columns x COL_Y row lanes
# "cublas": eager matmuls on cuBLAS via cupy.matmul (default); "own": always our tiled GEMM in
# cuda/gemm.cu. While the current stream captures a CUDA graph, matmuls use our GEMM either way:
# CuPy cannot capture cuBLAS calls (cupy issue 6290).
GEMMS = ("cublas", "own")
_GEMM_TILE, _GEMM_BLOCK = 32, (32, 8)  # must match GEMM_TILE / GEMM_ROWS in cuda/gemm.cu
_TC_TILE, _TC_BLOCK = 64, (256,)  # must match TC_M = TC_N and TC_THREADS in cuda/gemm_tc.cu
# cuBLAS compute type of float32 GEMMs: "float32" exact (default); "tf32" / "bf16" let tensor
# cores round the inputs to TensorFloat-32 (10-bit mantissa) / bfloat16 (7-bit), accumulating in float32.
_COMPUTE_TYPES = {"float32": "COMPUTE_TYPE_DEFAULT", "tf32": "COMPUTE_TYPE_TF32", "bf16": "COMPUTE_TYPE_BF16"}
_TC_DROP = {"tf32": 13, "bf16": 16}  # mantissa bits our tensor-core GEMM rounds off

# kernel name -> the .cu file that defines it
_FILES = {
    **dict.fromkeys(
        ("bias_act", "act_grad", "bias_grad", "gather_rows", "gather_pixels", "gather_shifted",
         "gather_shifted_pixels", "perm_keys", "perm_index"),
        "elementwise",
    ),
    **dict.fromkeys(("softmax", "softmax_xent", "sigmoid_bce", "mse", "correct_count"), "losses"),
    **dict.fromkeys(("sgd", "momentum", "adagrad", "rmsprop", "adam", "sum_squares", "clip_scale"), "optim"),
    **dict.fromkeys(("adamw", "lion"), "optim"),
    **dict.fromkeys(
        ("hash_uniform", "dropout_forward", "mul", "batchnorm_forward", "batchnorm_inference"), "dropout_bn"
    ),
    "batchnorm_backward": "dropout_bn",
    **dict.fromkeys(("signed_noise", "blur", "gather_warped"), "augment"),
    "clip_value": "optim",
    "gemm": "gemm",
    "gemm_tc": "gemm_tc",
}


# ------------------------------------------------------------------ pure helpers
def _source(stem: str) -> str:
    """The .cu file with device_common.h pasted in, so NVRTC needs no include path."""
    code = (_CUDA_DIR / f"{stem}.cu").read_text()
    return code.replace(_INCLUDE, (_CUDA_DIR / "device_common.h").read_text())


def _row_block(k: int) -> int:
    """Threads for a one-block-per-row kernel: a power of two in [32, 256] covering k."""
    return min(256, max(32, 1 << (max(k, 1) - 1).bit_length()))


def _sfx(a: _Any, name: str) -> str:
    if a.dtype == np.float32:
        return "f32"
    if a.dtype == np.float64:
        return "f64"
    raise TypeError(f"{name}: expected a float32 or float64 array, got {a.dtype}")


def _seed64(seed: int) -> np.uint64:
    """A random stream's seed as the kernels' ``unsigned long long`` (mod 2^64, as the reference)."""
    return np.uint64(int(seed) & (2**64 - 1))


# ------------------------------------------------------- CuPy's private compute-type switch
def compute_type_switch(xp: _Any) -> tuple[_Callable, _Callable, dict[str, int]] | None:
    """CuPy's cuBLAS compute-type switch as ``(set_compute_type, get_compute_type, {precision: code})``
    for the precisions "float32", "tf32", "bf16"; None where this CuPy lacks it.

    The one place that touches CuPy's private ``cupy._core._routines_linalg`` (CuPy 9-14)."""
    linalg = getattr(getattr(xp, "_core", None), "_routines_linalg", None)
    setter, getter = getattr(linalg, "set_compute_type", None), getattr(linalg, "get_compute_type", None)
    codes = {p: getattr(linalg, name, None) for p, name in _COMPUTE_TYPES.items()}
    if setter is None or getter is None or None in codes.values():
        return None
    return setter, getter, codes


class CudaKernels:
    """The kernel contract on one CUDA array module ``xp`` (CuPy or ``cuda_emu``).

    ``gemm``: "cublas" or "own" (see GEMMS) for eager matmuls. ``validate_labels``: check loss
    labels against [0, K) with one tiny device->host read per call (a debugging aid; the kernels
    never read out of bounds, a bad label gives a NaN loss); never while capturing a graph."""

    ACTIVATIONS = ACTIVATIONS
    LEAKY_SLOPE = LEAKY_SLOPE
    LOG_EPS = LOG_EPS
    SGD_IN_GEMM = False  # sgd_matmul_step forms the product, then steps (see the reference)
    CHAIN_MAX_WEIGHT_BYTES = 0  # dense_chain is the layers one by one (see the reference)

    def __init__(self, xp: _Any, *, gemm: str = "cublas", validate_labels: bool = True) -> None:
        if gemm not in GEMMS:
            raise ValueError(f"gemm (GPUMLP_GEMM) must be 'cublas' or 'own', got {gemm!r}")
        self._xp, self._gemm, self._validate_labels = xp, gemm, bool(validate_labels)
        self._modules: dict[str, _Any] = {}
        self._functions: dict[str, _Any] = {}
        self._grid_cap = 0
        self._local = _threading.local()  # per thread: {stream: sum_squares workspace}
        self._precision_switch: _Any = False  # compute_type_switch(xp), looked up on first use
        self._warned = False

    def __repr__(self) -> str:
        return f"CudaKernels({getattr(self._xp, '__name__', self._xp)!r}, gemm={self._gemm!r})"

    # ------------------------------------------------------------------ plumbing
    def _module(self, stem: str) -> _Any:
        mod = self._modules.get(stem)
        if mod is None:
            mod = self._modules[stem] = self._xp.RawModule(code=_source(stem), options=("--std=c++17",))
        return mod

    def _function(self, stem: str, name: str) -> _Any:
        fn = self._functions.get(name)
        if fn is None:
            fn = self._functions[name] = self._module(stem).get_function(name)
        return fn

    def _kernel(self, base: str, suffix: str) -> _Any:
        return self._function(_FILES[base], f"{base}_{suffix}")

    def _load_all(self, stems: set[str]) -> None:
        """Compile and load the modules and fetch every kernel in them (so nothing loads mid-capture:
        with CUDA's lazy loading that can invalidate the capture)."""
        for stem in sorted(stems):
            for name in _parse_kernels(_source(stem)):
                self._function(stem, name)

    def _grid(self, n: int, block: int = _BLOCK) -> int:
        """Blocks for a grid-stride launch over n items: enough to fill the device, no more."""
        if not self._grid_cap:
            attrs = self._xp.cuda.Device().attributes
            per_sm = attrs.get("MaxBlocksPerMultiprocessor", 16)
            self._grid_cap = max(1, int(attrs["MultiProcessorCount"]) * int(per_sm))
        return max(1, min(-(-n // block), self._grid_cap))

    def _dev(self, a: _Any, name: str) -> _Any:
        """Check that ``a`` is a device array; return it C-contiguous."""
        if not isinstance(a, self._xp.ndarray):
            where = "host numpy array" if isinstance(a, np.ndarray) else type(a).__name__
            raise TypeError(f"{name} is a {where}, not a device array: move it with backend.asarray(...)")
        return a if a.flags.c_contiguous else self._xp.ascontiguousarray(a)

    def _inplace(self, a: _Any, name: str, like: _Any) -> _Any:
        """Check an array updated in place: device, C-contiguous, same shape and dtype as ``like``."""
        self._dev(a, name)
        if not a.flags.c_contiguous or a.shape != like.shape or a.dtype != like.dtype:
            raise ValueError(
                f"{name} must be a C-contiguous {like.dtype} array of shape {like.shape}, "
                f"got {a.dtype} {a.shape} (contiguous={a.flags.c_contiguous})"
            )
        return a

    def _out(self, out: _Any, name: str, shape: tuple, dtype: _Any) -> _Any:
        if out is None:
            return self._xp.empty(shape, dtype=dtype)
        self._dev(out, name)
        if not out.flags.c_contiguous or out.shape != tuple(shape) or out.dtype != dtype:
            raise ValueError(f"{name} must be a C-contiguous {np.dtype(dtype)} array of shape {tuple(shape)}")
        return out

    def _accumulator(self, acc: _Any, dtype: _Any) -> _Any:
        """A zeroed 0-d device scalar, or the caller's 0-d accumulator the kernel adds into."""
        if acc is None:
            return self._xp.zeros((), dtype=dtype)
        self._dev(acc, "accumulator")
        if acc.shape != () or acc.dtype != dtype:
            raise ValueError(
                f"the accumulator must be a 0-d {np.dtype(dtype)} device array, got {acc.dtype} {acc.shape}"
            )
        return acc

    def _step(self, t: _Any, name: str) -> _Any:
        """A per-step integer as the 1-element int64 device array the kernels read
        (an int is uploaded; the training loop passes device arrays, so no upload there)."""
        if isinstance(t, (int, np.integer)):
            return self._xp.full((1,), int(t), dtype=np.int64)
        t = self._dev(t, name)
        if t.size != 1 or t.dtype != np.int64:
            raise ValueError(
                f"{name} must be an int or a 1-element int64 device array, got {t.dtype} {t.shape}"
            )
        return t

    def _capturing(self) -> bool:
        try:
            return bool(self._xp.cuda.get_current_stream().is_capturing())
        except Exception:  # older CuPy without capture support, or the legacy stream under capture
            return False

    def _labels(self, labels: _Any, rows: int, cols: int, check: bool = True) -> _Any:
        """int32 device labels; out-of-range values raise ValueError (one small device->host
        read, only with validate_labels and never while capturing a CUDA graph)."""
        labels = self._dev(labels, "labels")
        if labels.shape != (rows,):
            raise ValueError(f"labels must have shape ({rows},), got {labels.shape}")
        if labels.dtype.kind not in "iu":
            raise TypeError(f"labels must be integers, got {labels.dtype}")
        if check and self._validate_labels and rows and not self._capturing():
            lo, hi = (int(v) for v in self._xp.stack((labels.min(), labels.max())).get())
            if lo < 0 or hi >= cols:
                raise ValueError(f"labels must lie in [0, {cols}), got values in [{lo}, {hi}]")
        return labels if labels.dtype == np.int32 else labels.astype(np.int32)

    def _elementwise(self, base: str, a: _Any, *args: _Any) -> None:
        n = a.size
        if n:
            self._kernel(base, _sfx(a, base))((self._grid(n),), (_BLOCK,), args)

    def _switch(self) -> tuple[_Callable, _Callable, dict[str, int]] | None:
        if self._precision_switch is False:
            self._precision_switch = compute_type_switch(self._xp)
        return self._precision_switch

    def _sumsq_workspace(self) -> tuple[_Any, _Any]:
        """sum_squares' per-block partials and last-block ticket for the current thread and stream.
        Launches on one stream run in order and may share them; launches that can overlap (other
        streams, other threads) must not: mixed partials would leave the ticket nonzero and every
        later norm wrong. The kernel's last block resets the ticket, inside a captured graph too."""
        mine = getattr(self._local, "sumsq", None)
        if mine is None:
            mine = self._local.sumsq = _weakref.WeakKeyDictionary()
        stream = self._xp.cuda.get_current_stream()
        work = mine.get(stream)
        if work is None:
            cp = self._xp
            work = mine[stream] = (cp.empty(self._grid(1 << 62), np.float64), cp.zeros(1, np.uint32))
        return work

    # --------------------------------------------------------------------- dense
    def matmul(self, a, b, out=None, trans_a=False, trans_b=False):
        """``op(a) @ op(b)`` on cuBLAS, or on gemm.cu with gemm="own" and always while the current
        stream captures a CUDA graph. (M,K)@(K,N) -> (M,N)."""
        if self._gemm == "cublas" and not self._capturing():
            self._dev(a, "a"), self._dev(b, "b")
            if out is not None:
                self._dev(out, "out")
            return self._xp.matmul(a.T if trans_a else a, b.T if trans_b else b, out=out)
        a, b = self._dev(a, "a"), self._dev(b, "b")
        if a.ndim != 2 or b.ndim != 2:
            raise ValueError(f"matmul needs 2-D operands, got shapes {a.shape} and {b.shape}")
        if a.dtype != b.dtype:
            raise TypeError(f"matmul: a and b must have the same dtype, got {a.dtype} and {b.dtype}")
        sfx = _sfx(a, "matmul")
        m, k = a.shape[::-1] if trans_a else a.shape
        k2, n = b.shape[::-1] if trans_b else b.shape
        if k != k2:
            raise ValueError(f"matmul: op(a) is ({m}, {k}) but op(b) is ({k2}, {n})")
        out = self._out(out, "out", (m, n), a.dtype)
        if m and n:
            args = (a, b, out, np.int32(m), np.int32(n), np.int32(k))
            args += (np.int32(a.shape[1]), np.int32(b.shape[1]), np.int32(n))  # lda, ldb, ldc
            args += (np.int32(bool(trans_a)), np.int32(bool(trans_b)))
            drop = self._tensor_core_drop() if sfx == "f32" else 0
            if drop:
                grid = (-(-n // _TC_TILE), min(-(-m // _TC_TILE), 65535))
                self._tensor_core_kernel()(grid, _TC_BLOCK, (*args, np.int32(drop)))
            else:
                grid = (-(-n // _GEMM_TILE), min(-(-m // _GEMM_TILE), 65535))
                self._kernel("gemm", sfx)(grid, _GEMM_BLOCK, args)
        return out

    def _tensor_core_kernel(self) -> _Any:
        """gemm_tc_f32, compiled on first use; a clear error where NVRTC lacks <mma.h>'s headers."""
        try:
            return self._kernel("gemm_tc", "f32")
        except Exception as e:  # CuPy's CompileException carries the NVRTC log
            raise RuntimeError(
                "the tensor-core GEMM (kernels/cuda/gemm_tc.cu, for --precision tf32/bf16 with CUDA "
                "graphs) did not compile: NVRTC needs the CUDA C runtime headers of <mma.h> (crt/mma.h). "
                "Install them (pip install nvidia-cuda-crt for CUDA 13 wheels, or a full CUDA toolkit), "
                f"or train without --cuda-graphs or with --precision float32. NVRTC said: {e}"
            ) from e

    def _tensor_core_drop(self) -> int:
        """Mantissa bits our GEMM rounds off float32 operands under the current compute type:
        0 (exact float32, the scalar kernel), 13 (TF32) or 16 (bf16) on the tensor-core kernel."""
        switch = self._switch()
        if switch is None:  # no compute-type switch: set_matmul_precision stayed in float32
            return 0
        _, get, codes = switch
        current = get(np.float32)
        drop = next((bits for precision, bits in _TC_DROP.items() if codes[precision] == current), 0)
        if drop and int(self._xp.cuda.Device().compute_capability) < 80:
            raise RuntimeError(
                "--precision tf32/bf16 in CUDA-graph steps needs TF32 tensor cores (compute capability "
                f"8.0+), this GPU is sm_{self._xp.cuda.Device().compute_capability}: use --precision "
                "float32 or eager steps"
            )
        return drop

    def dense_chain(self, x, weights, biases, acts, out=None, labels=None):
        """Eval forward of a stack of dense layers, layer by layer (one device->host read: the
        flag). -> (a (B, N_last), x_nonfinite), and the arg-max into ``labels``, as the reference."""
        a, nonfinite = _chain_layers(self.matmul, self.bias_act, self._dev(x, "x"), weights, biases, acts)
        if labels is not None:
            self._dev(labels, "labels")[...] = self._xp.argmax(a, axis=1)
        if out is not None:
            self._out(out, "out", a.shape, a.dtype)[...] = a
            a = out
        return a, nonfinite

    def bias_act(self, z, b, act, out=None, pre=None):
        """``act(z + b)`` in one pass, also storing z + b into ``pre`` when given.
        z: (B,N), b: (N,) -> (B,N)."""
        code = np.int32(_activation(act).code)
        z, b = self._dev(z, "z"), self._dev(b, "b")
        out = self._out(out, "out", z.shape, z.dtype)
        keep = pre is not None
        pre = self._out(pre, "pre", z.shape, z.dtype) if keep else out  # not written unless kept
        slope = z.dtype.type(LEAKY_SLOPE)
        size = np.int64(z.size)
        self._elementwise("bias_act", z, z, b, out, pre, size, np.int32(b.size), code, np.int32(keep), slope)
        return out

    def act_grad(self, grad_out, y, act, out=None, pre=None):
        """``grad_out * act'(.)`` from the activation's output y and, where the activation needs it,
        the pre-activation ``pre``. (B,N) -> (B,N)."""
        spec = _grad_spec(act, pre)
        grad_out, y = self._dev(grad_out, "grad_out"), self._dev(y, "y")
        pre = self._inplace(pre, "pre", y) if spec.needs_input else y  # read but unused where not needed
        out = self._out(out, "out", y.shape, y.dtype)
        slope = y.dtype.type(LEAKY_SLOPE)
        self._elementwise("act_grad", y, grad_out, y, pre, out, np.int64(y.size), np.int32(spec.code), slope)
        return out

    def bias_grad(self, grad_z, out=None):
        """Column sums of grad_z. (B,N) -> (N,)."""
        grad_z = self._dev(grad_z, "grad_z")
        rows, cols = grad_z.shape
        out = self._out(out, "out", (cols,), grad_z.dtype)
        if cols:
            grid = (-(-cols // _COL_BLOCK[0]),)
            self._kernel("bias_grad", _sfx(grad_z, "bias_grad"))(
                grid, _COL_BLOCK, (grad_z, out, np.int32(rows), np.int32(cols))
            )
        return out

    def gather_rows(self, src, idx, out=None):
        """Minibatch gather ``src[idx]`` on the device. src: (N,...), idx: (B,) int -> (B,...)."""
        src, idx = self._dev(src, "src"), self._dev(idx, "idx")
        shape = (idx.shape[0], *src.shape[1:])
        if src.dtype not in (np.float32, np.float64):  # e.g. labels or uint8 images: CuPy's own take
            res = self._xp.take(src, idx, axis=0, out=out)
            return res if out is None else out
        if idx.dtype not in (np.int32, np.int64):
            idx = idx.astype(np.int64)
        out = self._out(out, "out", shape, src.dtype)
        width = int(np.prod(src.shape[1:], dtype=np.int64))
        n = idx.shape[0] * width
        if n:
            name = "gather_rows"
            fn = self._kernel(name, f"{_sfx(src, name)}_{'i32' if idx.dtype == np.int32 else 'i64'}")
            fn((self._grid(n),), (_BLOCK,), (src, idx, out, np.int64(n), np.int64(width)))
        return out

    def gather_pixels(self, codes, idx, divisor, offset, dtype=np.float32, out=None):
        """Minibatch gather of 8-bit codes decoded on the device, ``codes[idx] / divisor + offset`` in
        ``dtype``, in one launch. codes: (N, F) uint8, idx: (B,) int -> (B, F) dtype."""
        codes, idx = self._dev(codes, "codes"), self._dev(idx, "idx")
        _check_pixel_codes(codes)
        if idx.dtype != np.int32:
            idx = idx.astype(np.int32)
        dt = np.dtype(dtype)
        out = self._out(out, "out", (idx.shape[0], codes.shape[1]), dt)
        scalars = (dt.type(divisor), dt.type(offset))
        width = np.int64(codes.shape[1])
        self._elementwise("gather_pixels", out, codes, idx, out, np.int64(out.size), width, *scalars)
        return out

    def gather_shifted(self, src, idx, max_shift, seed, step=0, out=None):
        """Minibatch gather with the reference's Philox-drawn, edge-repeating shifts, in one
        launch; ``step`` read on the device. src: (N, side*side) float, idx: (B,) int -> (B, side*side)."""
        return self._shifted("gather_shifted", src, idx, max_shift, seed, step, out, src.dtype, ())

    def gather_shifted_pixels(self, codes, idx, max_shift, seed, divisor, offset, dtype=np.float32, step=0,
                              out=None):  # fmt: skip
        """``gather_shifted`` of 8-bit codes decoded on the way (``code / divisor + offset`` in
        dtype), in one launch. codes: (N, side*side) uint8, idx: (B,) int -> (B, side*side) dtype."""
        codes = self._dev(codes, "codes")  # C-contiguous now: _shifted's own _dev keeps it as it is
        _check_pixel_codes(codes)
        dt = np.dtype(dtype)
        scale = (dt.type(divisor), dt.type(offset))
        return self._shifted("gather_shifted_pixels", codes, idx, max_shift, seed, step, out, dt, scale)

    def _shifted(self, name: str, src, idx, max_shift: int, seed: int, step, out, dtype, extra: tuple):
        """One launch of a shifting gather kernel ``name`` (its trailing scalars ``extra``)."""
        src, idx = self._dev(src, "src"), self._dev(idx, "idx")
        side = _image_side(src.shape[1], max_shift)
        if idx.dtype != np.int32:
            idx = idx.astype(np.int32)
        out = self._out(out, "out", (idx.shape[0], src.shape[1]), dtype)
        shift = (np.int32(side), np.int32(max_shift), _seed64(seed), self._step(step, "step"))
        self._elementwise(name, out, src, idx, out, np.int64(out.size), *shift, *extra)
        return out

    def elastic_field(self, seed, n, side, alpha, sigma, step=0, out=None, work=None):
        """The reference's Simard displacement fields, on the device in three launches: Philox noise,
        Gaussian blur along x into ``work``, along y (x alpha) back into out. -> (n, 2, side, side)."""
        _gaussian_taps(sigma)  # checks sigma
        shape = (n, 2, side, side)
        out = self._out(out, "out", shape, np.float32 if out is None else out.dtype)
        work = self._out(work, "work", shape, out.dtype)
        count, sfx = np.int64(out.size), _sfx(out, "elastic_field")
        if out.size:
            grid = (self._grid(out.size),), (_BLOCK,)
            self._kernel("signed_noise", sfx)(*grid, (out, count, _seed64(seed), self._step(step, "step")))
            for a, b, scale, along_rows in ((out, work, 1.0, 0), (work, out, float(alpha), 1)):
                args = (a, b, count, np.int32(side), float(sigma), scale, np.int32(along_rows))
                self._kernel("blur", sfx)(*grid, args)
        return out

    def gather_warped(self, src, idx, max_rotate, max_scale, max_shift, seed, step=0, field=None, out=None):
        """Minibatch gather with the reference's Philox-drawn rotation, scaling, translation and
        optional elastic ``field``, bilinear with edges repeated, one launch. src: (N, side*side),
        idx: (B,) int -> (B, side*side)."""
        src, idx = self._dev(src, "src"), self._dev(idx, "idx")
        side = _image_side(src.shape[1], 0)
        if idx.dtype != np.int32:
            idx = idx.astype(np.int32)
        out = self._out(out, "out", (idx.shape[0], src.shape[1]), src.dtype)
        if field is not None:
            field = self._out(field, "field", (idx.shape[0], 2, side, side), src.dtype)
        limits = (_math.radians(max_rotate), float(max_scale), float(max_shift))
        args = (src, idx, out if field is None else field, out, np.int64(out.size), np.int32(side), *limits)
        args += (np.int32(field is not None), _seed64(seed), self._step(step, "step"))
        self._elementwise("gather_warped", out, *args)
        return out

    def permutation(self, seed, n, epoch=0, out=None):
        """The reference's Philox-ordered permutation of range(n), made on the device: 64-bit
        keys word << 32 | index, CuPy's sort, their low words. -> (n,) int32 device array."""
        _check_permutation_size(n)
        out = self._out(out, "out", (n,), np.int32)
        if n:
            keys = self._xp.empty((n,), dtype=np.uint64)
            grid, count, seed64 = (self._grid(n),), np.int64(n), _seed64(seed)
            self._kernel("perm_keys", "u64")(grid, (_BLOCK,), (keys, count, seed64, np.int64(epoch)))
            keys.sort()
            self._kernel("perm_index", "u64")(grid, (_BLOCK,), (keys, out, count))
        return out

    # -------------------------------------------------------------------- losses
    def _row_loss(self, base, logits, labels, grad, grad_scale, loss, *extra):
        logits = self._dev(logits, "logits")
        rows, cols = logits.shape
        labels = self._labels(labels, rows, cols)
        grad = self._out(grad, "grad", logits.shape, logits.dtype)
        loss = self._accumulator(loss, logits.dtype)
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
            self._kernel(base, _sfx(logits, base))((self._grid(rows, 1),), (_row_block(cols),), args)
        return loss, grad

    def softmax(self, logits, out=None):
        """Row-wise softmax, stabilised by the row max. (B,K) -> (B,K)."""
        logits = self._dev(logits, "logits")
        rows, cols = logits.shape
        out = self._out(out, "out", logits.shape, logits.dtype)
        if logits.size:
            args = (logits, out, np.int32(rows), np.int32(cols))
            grid, block = (self._grid(rows, 1),), (_row_block(cols),)
            self._kernel("softmax", _sfx(logits, "softmax"))(grid, block, args)
        return out

    def softmax_xent(self, logits, labels, grad=None, grad_scale=1.0, loss=None):
        """Fused softmax cross-entropy: (0-d summed loss, grad_scale * (softmax - onehot)). (B,K) -> ..."""
        return self._row_loss("softmax_xent", logits, labels, grad, grad_scale, loss)

    def sigmoid_bce(self, logits, labels, grad=None, grad_scale=1.0, loss=None):
        """Fused logistic cost against one-hot targets: (0-d summed loss, grad_scale * (p - t))."""
        return self._row_loss("sigmoid_bce", logits, labels, grad, grad_scale, loss, -_math.log(LOG_EPS))

    def mse(self, pred, labels, grad=None, grad_scale=1.0, loss=None):
        """Fused half squared error against one-hot targets: (0-d summed loss, grad_scale * (pred - t))."""
        return self._row_loss("mse", pred, labels, grad, grad_scale, loss)

    def correct_count(self, scores, labels, count=None):
        """Rows whose argmax equals the label (first max wins), as a 0-d int64 device array
        (added into the accumulator ``count`` when given)."""
        scores = self._dev(scores, "scores")
        rows, cols = scores.shape
        labels = self._labels(labels, rows, cols, check=False)  # a bad label just never matches
        count = self._accumulator(count, np.int64)
        if scores.size:
            args = (scores, labels, count, np.int32(rows), np.int32(cols))
            self._kernel("correct_count", _sfx(scores, "correct_count"))((self._grid(rows),), (_BLOCK,), args)
        return count

    # ---------------------------------------------------------------- optimizers
    def _opt(self, base, w, g, states, *scalars, tail=()):
        """Launch optimizer ``base`` on w, g and its state arrays: ``scalars`` become w's
        dtype; ``tail`` (exactly typed values, device arrays) is passed as is, last."""
        self._inplace(w, "w", w)
        self._inplace(g, "g", w)
        for i, s in enumerate(states):
            self._inplace(s, f"state {i}", w)
        t = w.dtype.type
        self._elementwise(base, w, w, g, *states, np.int64(w.size), *(t(s) for s in scalars), *tail)

    def sgd_step(self, w, g, lr, l2=0.0, l1=0.0):
        """Plain gradient descent, in place: w -= lr * g_eff."""
        self._opt("sgd", w, g, (), lr, l2, l1)

    def sgd_matmul_step(self, w, a, b, lr, l2=0.0, trans_a=False, trans_b=False, work=None):
        """w -= lr * (op(a) @ op(b) + l2*w): the product into ``work`` (allocated if None), then sgd_step."""
        self.sgd_step(w, self.matmul(a, b, out=work, trans_a=trans_a, trans_b=trans_b), lr, l2)

    def momentum_step(self, w, g, v, lr, mu=0.9, nesterov=False, l2=0.0, l1=0.0):
        """Heavy-ball / Nesterov momentum (PyTorch convention), in place on w and v."""
        self._inplace(w, "w", w)
        self._inplace(g, "g", w)
        self._inplace(v, "v", w)
        t = w.dtype.type
        args = (w, g, v, np.int64(w.size), t(lr), t(mu), np.int32(bool(nesterov)), t(l2), t(l1))
        self._elementwise("momentum", w, *args)

    def adagrad_step(self, w, g, h, lr, eps=1e-8, l2=0.0, l1=0.0):
        """AdaGrad, in place on w and h."""
        self._opt("adagrad", w, g, (h,), lr, eps, l2, l1)

    def rmsprop_step(self, w, g, s, lr, rho=0.9, eps=1e-8, l2=0.0, l1=0.0):
        """RMSProp, in place on w and s."""
        self._opt("rmsprop", w, g, (s,), lr, rho, 1 - rho, eps, l2, l1)

    def adam_step(self, w, g, m, v, lr, t, beta1=0.9, beta2=0.999, eps=1e-8, l2=0.0, l1=0.0):
        """Adam with bias correction at step t (1-based; int or 1-element int64 device
        array, read on the device), in place on w, m, v."""
        tail = (np.float64(beta1), np.float64(beta2), self._step(t, "t"))
        self._opt("adam", w, g, (m, v), lr, beta1, beta2, 1 - beta1, 1 - beta2, eps, l2, l1, tail=tail)

    def adamw_step(
        self, w, g, m, v, lr, t, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, l2=0.0, l1=0.0
    ):
        """AdamW (decoupled weight decay) at step t (1-based; int or 1-element int64 device
        array, read on the device), in place on w, m, v."""
        keep = w.dtype.type(1 - lr * weight_decay)
        tail = (np.float64(beta1), np.float64(beta2), self._step(t, "t"), keep)
        self._opt("adamw", w, g, (m, v), lr, beta1, beta2, 1 - beta1, 1 - beta2, eps, l2, l1, tail=tail)

    def lion_step(self, w, g, m, lr, beta1=0.9, beta2=0.99, weight_decay=0.0, l2=0.0, l1=0.0):
        """Lion, in place on w and m."""
        self._opt("lion", w, g, (m,), lr, beta1, beta2, 1 - beta1, 1 - beta2, weight_decay, l2, l1)

    # ---------------------------------------------------------- gradient clipping
    def sum_squares(self, x, out=None, accumulate=False):
        """Sum of x**2 (double accumulation, one deterministic launch) as a 0-d device
        array of x's dtype; written into ``out``, or added to it with ``accumulate=True``."""
        x = self._dev(x, "x")
        _sfx(x, "sum_squares")
        if out is None:
            out, accumulate = self._xp.zeros((), dtype=x.dtype), False
        else:
            self._accumulator(out, x.dtype)
        args = (x, np.int64(x.size), *self._sumsq_workspace(), out, np.int32(bool(accumulate)))
        self._kernel("sum_squares", _sfx(x, "sum_squares"))((self._grid(x.size),), (_BLOCK,), args)
        return out

    def clip_scale(self, g, sumsq, max_norm):
        """Scale g in place by min(1, max_norm / (sqrt(sumsq) + 1e-12)), sumsq a 0-d
        device array read on the device (no sync)."""
        self._inplace(g, "g", g)
        sumsq = self._accumulator(sumsq, g.dtype)
        self._elementwise("clip_scale", g, g, sumsq, np.int64(g.size), np.float64(max_norm))

    def clip_value(self, g, value):
        """Clip g in place to [-value, value] elementwise (value rounded to g's dtype); NaN stays."""
        self._inplace(g, "g", g)
        self._elementwise("clip_value", g, g, np.int64(g.size), g.dtype.type(value))

    # ------------------------------------------------------------------- dropout
    def hash_uniform(self, seed, n, step=0):
        """Counter-based uniforms in [0,1), bit-identical to the reference. -> (n,) float64 device array."""
        out = self._xp.empty((n,), dtype=np.float64)
        if n:
            args = (out, np.int64(n), _seed64(seed), self._step(step, "step"))
            self._kernel("hash_uniform", "f64")((self._grid(n),), (_BLOCK,), args)
        return out

    def dropout_forward(self, x, p, seed, out=None, mask=None, step=0):
        """Inverted dropout with Philox masks (bit-identical to the reference). -> (out, mask)."""
        if not 0 <= p < 1:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        x = self._dev(x, "x")
        out = self._out(out, "out", x.shape, x.dtype)
        mask = self._out(mask, "mask", x.shape, x.dtype)
        thresh = np.uint32(_math.ceil(p * (1 << 24)))  # u >= p  <=>  (h >> 8) >= ceil(p * 2^24), exactly
        args = (
            x,
            out,
            mask,
            np.int64(x.size),
            _seed64(seed),
            self._step(step, "step"),
            thresh,
            x.dtype.type(1.0 / (1.0 - p)),
        )
        self._elementwise("dropout_forward", x, *args)
        return out, mask

    def dropout_backward(self, grad_out, mask, out=None):
        """grad_out * mask. (B,N) -> (B,N)."""
        grad_out, mask = self._dev(grad_out, "grad_out"), self._dev(mask, "mask")
        out = self._out(out, "out", grad_out.shape, grad_out.dtype)
        self._elementwise("mul", grad_out, grad_out, mask, out, np.int64(grad_out.size))
        return out

    # ---------------------------------------------------------------- batch norm
    def batchnorm_forward(
        self,     x, gamma, beta, eps=1e-5, out=None, xhat=None, mean=None, var=None,
        running_mean=None, running_var=None, momentum=0.9,
    ):  # fmt: skip
        """Training-mode batch norm. x: (B,N) -> (out, xhat, mean, var); updates
        running_mean/running_var (N,) in place when given, in the same launch."""
        x, gamma, beta = self._dev(x, "x"), self._dev(gamma, "gamma"), self._dev(beta, "beta")
        rows, cols = x.shape
        out = self._out(out, "out", x.shape, x.dtype)
        xhat = self._out(xhat, "xhat", x.shape, x.dtype)
        mean, var = self._out(mean, "mean", (cols,), x.dtype), self._out(var, "var", (cols,), x.dtype)
        update = _updates_running_stats(running_mean, running_var)
        if update:
            running_mean = self._inplace(running_mean, "running_mean", mean)
            running_var = self._inplace(running_var, "running_var", var)
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
            self._kernel("batchnorm_forward", _sfx(x, "batchnorm_forward"))(grid, _COL_BLOCK, args)
        return out, xhat, mean, var

    def batchnorm_inference(self, x, gamma, beta, mean, var, eps=1e-5, out=None):
        """Inference-mode batch norm with running statistics. x: (B,N) -> (B,N)."""
        x = self._dev(x, "x")
        gamma, beta, mean, var = (
            self._dev(a, n) for a, n in ((gamma, "gamma"), (beta, "beta"), (mean, "mean"), (var, "var"))
        )
        out = self._out(out, "out", x.shape, x.dtype)
        args = (x, gamma, beta, mean, var, out, np.int64(x.size), np.int32(x.shape[-1]), x.dtype.type(eps))
        self._elementwise("batchnorm_inference", x, *args)
        return out

    def batchnorm_backward(self, grad_out, xhat, gamma, var, eps=1e-5, dx=None, dgamma=None, dbeta=None):
        """Backward of training-mode batch norm. -> (dx, dgamma, dbeta)."""
        grad_out, xhat = self._dev(grad_out, "grad_out"), self._dev(xhat, "xhat")
        gamma, var = self._dev(gamma, "gamma"), self._dev(var, "var")
        rows, cols = grad_out.shape
        dx = self._out(dx, "dx", grad_out.shape, grad_out.dtype)
        dgamma = self._out(dgamma, "dgamma", (cols,), grad_out.dtype)
        dbeta = self._out(dbeta, "dbeta", (cols,), grad_out.dtype)
        if cols:
            t = grad_out.dtype.type
            args = (grad_out, xhat, gamma, var, dx, dgamma, dbeta, np.int32(rows), np.int32(cols), t(eps))
            grid = (-(-cols // _COL_BLOCK[0]),)
            self._kernel("batchnorm_backward", _sfx(grad_out, "batchnorm_backward"))(grid, _COL_BLOCK, args)
        return dx, dgamma, dbeta


# ------------------------------------------------------------------ for the backend
def capture(k: CudaKernels, step: _Callable[[], None]) -> _Callable[[], None]:
    """Record ``step()``'s launches on the current stream into a CUDA graph (not running them)
    and return ``replay()``, which launches the graph on the stream current when it is called.
    Every kernel the graph may launch is loaded first; matmuls use gemm.cu while capturing."""
    xp = k._xp
    k._load_all(set(_FILES.values()) - {"gemm_tc"})
    if k._tensor_core_drop():
        k._tensor_core_kernel()
    k._sumsq_workspace()  # the capturing stream's clipping workspace, allocated outside the graph
    stream = xp.cuda.get_current_stream()
    stream.begin_capture()
    try:
        step()
    finally:
        graph = stream.end_capture()
    return lambda: graph.launch(xp.cuda.get_current_stream())


def set_matmul_precision(k: CudaKernels, precision: str) -> None:
    """Make float32 GEMMs "float32" (exact, default), "tf32" or "bf16" (tensor cores) through
    CuPy's compute-type switch, for cuBLAS and for our own GEMM (graph steps). Where this CuPy
    lacks the switch, warn once and stay in exact float32."""
    if precision not in _COMPUTE_TYPES:
        raise ValueError(f"matmul precision must be one of {', '.join(_COMPUTE_TYPES)}, got {precision!r}")
    switch = k._switch()
    if switch is None:
        if precision != "float32" and not k._warned:
            k._warned = True
            version = getattr(k._xp, "__version__", "?")
            _warnings.warn(
                f"CuPy {version} has no cuBLAS compute-type switch (cupy._core._routines_linalg."
                f"set_compute_type and its codes): --precision {precision} is ignored, GEMMs stay exact "
                "float32. gpumlp is tested with CuPy 14.x (pip install -e '.[cuda13]').",
                RuntimeWarning,
                stacklevel=3,
            )
        return
    set_type, _, codes = switch
    set_type(np.float32, codes[precision])
