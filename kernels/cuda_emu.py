"""An emulated CUDA device: the small part of CuPy that gpumlp uses, on the CPU.

This module *is* the array module (``xp``) of the ``cuda-emu`` backend. Its
:class:`ndarray` wraps a NumPy array (the "device memory") and, like CuPy's,
refuses to turn into a host array implicitly: ``np.asarray(a)`` raises
TypeError (use ``a.get()``), and mixing it with a ``numpy.ndarray`` in
arithmetic or in an ``xp`` function raises TypeError. Functions not listed
here fall through to NumPy's of the same name (``xp.sqrt``, ``xp.sum`` ...),
with the same host-array check. ``empty``/``empty_like`` fill floats with NaN
so code that reads uninitialised device memory shows it.

:class:`RawModule` compiles the CUDA source with ``cuda_host`` (g++ + the host
emulation header) and its kernels run on the CPU, synchronously. ``cuda``
offers ``runtime.getDeviceCount``, ``Device().synchronize()``, ``Stream``,
``Event`` and graph capture (``Stream.begin_capture``/``end_capture`` record
RawModule launches; ``Graph.launch`` replays them). While the current stream
captures, any other device work (arithmetic, copies, fills, allocation,
fancy indexing, reads to the host) raises :class:`CaptureError`: the emulator
could only run it at capture time, never at replay, which would hide exactly
the bug a graph test is for. Views (basic slicing, reshape of contiguous data)
stay allowed. For correctness, not speed.
"""

from __future__ import annotations

import os
import time
import types
import weakref
from typing import Any

import numpy as np

from . import cuda_host

_IMPLICIT = (
    "Implicit conversion to a NumPy array is not allowed. Please use `.get()` to construct a NumPy "
    "array explicitly."
)


class CaptureError(RuntimeError):
    """Device work other than a RawModule launch while the current stream captures a graph."""


def _no_capture(what: str) -> None:
    """Raise CaptureError if the current stream is capturing a CUDA graph."""
    if _get_current_stream()._capture is not None:
        raise CaptureError(
            f"emulated device: {what} while the current stream captures a CUDA graph; the emulator "
            "records only RawModule kernel launches, so this would run once now and never at replay. "
            "Do it before capturing, or as a kernel."
        )


class _OutOfMemoryError(MemoryError):
    """``cupy.cuda.memory.OutOfMemoryError``: the emulated device's memory is full."""


def _memory_limit() -> int:
    """Device memory in bytes: ``$GPUMLP_EMU_MEMORY`` (e.g. ``512M``, ``2G``), default 4 GiB."""
    text = os.environ.get("GPUMLP_EMU_MEMORY", "4G").strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    try:
        return int(float(text.rstrip("KMG")) * scale)
    except ValueError:
        raise ValueError(f"GPUMLP_EMU_MEMORY={text!r}: expected a size such as 512M or 2G") from None


_MEMORY = {"limit": _memory_limit(), "used": 0}


def _release(nbytes: int) -> None:
    _MEMORY["used"] -= nbytes


def _allocated(a: np.ndarray) -> np.ndarray:
    """Account a buffer that owns its memory against the device's capacity, as a GPU would."""
    if a.base is None and a.nbytes:
        if _MEMORY["used"] + a.nbytes > _MEMORY["limit"]:
            raise _OutOfMemoryError(
                f"Out of memory allocating {a.nbytes:,} bytes (allocated so far: {_MEMORY['used']:,} bytes, "
                f"device memory {_MEMORY['limit']:,} bytes; set GPUMLP_EMU_MEMORY to change it)."
            )
        _MEMORY["used"] += a.nbytes
        weakref.finalize(a, _release, a.nbytes)
    return a


def _unwrap(x: Any) -> Any:
    """Device arrays -> their NumPy buffers (recursing into lists/tuples); host arrays -> TypeError."""
    if isinstance(x, ndarray):
        return x._a
    if isinstance(x, np.ndarray):
        raise TypeError(f"Unsupported type {type(x)}: a host numpy.ndarray reached the emulated device")
    if isinstance(x, (list, tuple)):
        return type(x)(_unwrap(v) for v in x)
    return x


def _wrap(x: Any) -> Any:
    """NumPy results -> device arrays; NumPy scalars -> 0-d device arrays (CuPy returns those)."""
    if isinstance(x, np.ndarray):
        return ndarray._of(x)
    if isinstance(x, np.generic):
        return ndarray._of(np.asarray(x))
    if isinstance(x, tuple):
        return tuple(_wrap(v) for v in x)
    return x


def _device_fn(fn: Any, name: str) -> Any:
    def call(*args: Any, **kwargs: Any) -> Any:
        if name not in _VIEWS:
            _no_capture(f"{name}()")
        return _wrap(fn(*_unwrap(args), **{k: _unwrap(v) for k, v in kwargs.items()}))

    call.__name__ = call.__qualname__ = name
    call.__doc__ = f"Emulated cupy.{name}: numpy.{name} on device arrays."
    return call


_VIEWS = frozenset("ravel reshape squeeze swapaxes transpose view".split())  # no device work (views)
_METHODS = frozenset(
    "all any argmax argmin astype clip copy cumsum diagonal dot fill flatten max mean min nonzero prod "
    "ravel repeat reshape round sort argsort squeeze std sum swapaxes take trace transpose var view".split()
)


class ndarray:  # noqa: N801 -- CuPy's name
    """A device array: a NumPy buffer that only ``.get()`` hands to the host."""

    __slots__ = ("_a",)
    __array_priority__ = 100

    def __init__(self, shape: Any, dtype: Any = float, order: str = "C") -> None:
        _no_capture("an allocation")
        self._a = _allocated(np.empty(shape, dtype=dtype, order=order))

    @classmethod
    def _of(cls, a: np.ndarray) -> ndarray:
        obj = cls.__new__(cls)
        obj._a = _allocated(a)
        return obj

    # -- attributes
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    size = property(lambda self: self._a.size)
    ndim = property(lambda self: self._a.ndim)
    nbytes = property(lambda self: self._a.nbytes)
    itemsize = property(lambda self: self._a.itemsize)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: self._a.flags)
    T = property(lambda self: ndarray._of(self._a.T))

    @property
    def device(self) -> _Device:
        """The (only) emulated device."""
        return _Device(0)

    def get(self, stream: Any = None, order: str = "C", out: np.ndarray | None = None) -> np.ndarray:
        """Copy to the host as a NumPy array."""
        _no_capture("a device-to-host copy (get)")
        if out is not None:
            out[...] = self._a
            return out
        return np.array(self._a, order=order, copy=True)

    def set(self, arr: np.ndarray, stream: Any = None) -> None:
        """Copy a host array into this device array."""
        _no_capture("a host-to-device copy (set)")
        self._a[...] = arr

    def item(self) -> Any:
        """The single element as a Python scalar."""
        _no_capture("reading a device value on the host")
        return self._a.item()

    def tolist(self) -> Any:
        """Copy to the host as nested lists."""
        _no_capture("a device-to-host copy (tolist)")
        return self._a.tolist()

    def __getattr__(self, name: str) -> Any:
        if name in _METHODS:
            return _device_fn(getattr(self._a, name), name)
        raise AttributeError(f"emulated cupy.ndarray has no attribute {name!r}")

    # -- NumPy interop: like CuPy, no implicit host conversion
    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        raise TypeError(_IMPLICIT)

    def __array_ufunc__(self, ufunc: Any, method: str, *inputs: Any, **kwargs: Any) -> Any:
        _no_capture(f"numpy.{ufunc.__name__}")
        out = kwargs.get("out")
        if out is not None:
            kwargs["out"] = _unwrap(out)
        res = getattr(ufunc, method)(*_unwrap(inputs), **kwargs)
        if out is not None:
            outs = out if isinstance(out, tuple) else (out,)
            return outs[0] if len(outs) == 1 else outs
        return _wrap(res)

    def __array_function__(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        _no_capture(f"numpy.{func.__name__}")
        return _wrap(func(*_unwrap(args), **{k: _unwrap(v) for k, v in kwargs.items()}))

    # -- indexing
    def __getitem__(self, key: Any) -> Any:
        if not _basic_index(key):
            _no_capture("advanced indexing")
        return _wrap(self._a[_unwrap_index(key)])

    def __setitem__(self, key: Any, value: Any) -> None:
        _no_capture("an assignment into a device array")
        self._a[_unwrap_index(key)] = value._a if isinstance(value, ndarray) else value

    def __len__(self) -> int:
        return len(self._a)

    def __iter__(self) -> Any:
        return (ndarray._of(r) if isinstance(r, np.ndarray) else _wrap(r) for r in self._a)

    def __repr__(self) -> str:
        return "emu_" + repr(self._a)

    def __bool__(self) -> bool:
        _no_capture("reading a device value on the host")
        return bool(self._a)

    def __float__(self) -> float:
        _no_capture("reading a device value on the host")
        return float(self._a)

    def __int__(self) -> int:
        _no_capture("reading a device value on the host")
        return int(self._a)

    def __index__(self) -> int:
        return self._a.__index__()


def _basic_index(key: Any) -> bool:
    """True for ints, slices, None and Ellipsis (views, no device work)."""
    keys = key if isinstance(key, tuple) else (key,)
    return all(k is None or k is Ellipsis or isinstance(k, (int, np.integer, slice)) for k in keys)


def _unwrap_index(key: Any) -> Any:
    if isinstance(key, tuple):
        return tuple(_unwrap_index(k) for k in key)
    return key._a if isinstance(key, ndarray) else key


def _unary(ufunc: Any) -> Any:
    def op(self: ndarray) -> Any:
        _no_capture(f"the array operation {ufunc.__name__}")
        return _wrap(ufunc(self._a))

    return op


def _binary(ufunc: Any, reflected: bool = False, inplace: bool = False) -> Any:
    def op(self: ndarray, other: Any) -> Any:
        _no_capture(f"the array operation {ufunc.__name__}")
        if isinstance(other, np.ndarray):
            raise TypeError(
                f"Unsupported type {type(other)}: a host numpy.ndarray reached the emulated device"
            )
        o = other._a if isinstance(other, ndarray) else other
        if inplace:
            ufunc(self._a, o, out=self._a)
            return self
        return _wrap(ufunc(o, self._a) if reflected else ufunc(self._a, o))

    return op


for _name, _uf in {
    "add": np.add,
    "sub": np.subtract,
    "mul": np.multiply,
    "truediv": np.true_divide,
    "floordiv": np.floor_divide,
    "mod": np.remainder,
    "pow": np.power,
    "matmul": np.matmul,
    "and": np.bitwise_and,
    "or": np.bitwise_or,
    "xor": np.bitwise_xor,
}.items():
    setattr(ndarray, f"__{_name}__", _binary(_uf))
    setattr(ndarray, f"__r{_name}__", _binary(_uf, reflected=True))
    setattr(ndarray, f"__i{_name}__", _binary(_uf, inplace=True))
for _name, _uf in {
    "lt": np.less,
    "le": np.less_equal,
    "gt": np.greater,
    "ge": np.greater_equal,
    "eq": np.equal,
    "ne": np.not_equal,
}.items():
    setattr(ndarray, f"__{_name}__", _binary(_uf))
for _name, _uf in {"neg": np.negative, "pos": np.positive, "abs": np.absolute, "invert": np.invert}.items():
    setattr(ndarray, f"__{_name}__", _unary(_uf))
ndarray.__hash__ = None  # type: ignore[assignment]


# ------------------------------------------------------------------ creation
def asarray(a: Any, dtype: Any = None, order: Any = None) -> ndarray:
    """Host data or a device array -> device array (no copy when already one of ``dtype``)."""
    if isinstance(a, ndarray) and (dtype is None or a.dtype == np.dtype(dtype)):
        return a
    _no_capture("asarray (a copy)")
    if isinstance(a, ndarray):
        return a.astype(dtype)
    return ndarray._of(np.array(a, dtype=dtype, order=order or "K", copy=True))


def array(obj: Any, dtype: Any = None, copy: bool = True, order: str = "K", ndmin: int = 0) -> ndarray:
    """Copy host data or a device array to a new device array."""
    _no_capture("array (a copy)")
    src = obj._a if isinstance(obj, ndarray) else obj
    return ndarray._of(np.array(src, dtype=dtype, copy=copy, order=order, ndmin=ndmin))


def ascontiguousarray(a: Any, dtype: Any = None) -> ndarray:
    """C-contiguous device array (copies only when needed)."""
    a = asarray(a, dtype=dtype)
    if a.flags.c_contiguous:
        return a
    _no_capture("ascontiguousarray (a copy)")
    return ndarray._of(np.ascontiguousarray(a._a))


def asnumpy(a: Any, stream: Any = None) -> np.ndarray:
    """Device array -> host NumPy array (host input passes through)."""
    return a.get() if isinstance(a, ndarray) else np.asarray(a)


def _poison(a: np.ndarray) -> np.ndarray:
    return cuda_host.poison(a)  # NaN floats; under GPUMLP_EMU_SANITIZE=initcheck a pattern it detects


def empty(shape: Any, dtype: Any = float, order: str = "C") -> ndarray:
    """Uninitialised device array (floats are NaN here, to expose reads of garbage)."""
    _no_capture("an allocation")
    return ndarray._of(_poison(np.empty(shape, dtype=dtype, order=order)))


def empty_like(a: Any, dtype: Any = None, order: str = "K", shape: Any = None) -> ndarray:
    """Uninitialised device array shaped like ``a`` (NaN-filled floats)."""
    _no_capture("an allocation")
    return ndarray._of(_poison(np.empty_like(_unwrap(a), dtype=dtype, order=order, shape=shape)))


def matmul(a: Any, b: Any, out: ndarray | None = None, **kwargs: Any) -> ndarray:
    """``a @ b`` (cuBLAS on a GPU, BLAS here; float32 inputs rounded as the compute type says)."""
    _no_capture("matmul (cuBLAS refuses capture under CuPy, cupy#6290)")
    a, b = (_tensor_core_inputs(x) for x in _unwrap((a, b)))
    if out is None:
        return _wrap(np.matmul(a, b, **kwargs))
    np.matmul(a, b, out=out._a, **kwargs)
    return out


# cuBLAS compute types, numbered as CuPy's cupy._core._routines_linalg.COMPUTE_TYPE_*
_MANTISSA_BITS = {1: 23, 7: 10, 6: 7}  # DEFAULT (exact float32), TF32, BF16
_COMPUTE_TYPE = {np.dtype(np.float32): 1}


def _set_compute_type(dtype: Any, compute_type: int) -> None:
    if compute_type not in _MANTISSA_BITS:
        known = sorted(_MANTISSA_BITS)
        raise ValueError(f"the emulated device supports compute types {known}, not {compute_type}")
    _COMPUTE_TYPE[np.dtype(dtype)] = compute_type


def _tensor_core_inputs(x: np.ndarray) -> np.ndarray:
    """A float32 GEMM operand rounded (to nearest even) to the mantissa the compute type keeps."""
    drop = 23 - _MANTISSA_BITS[_COMPUTE_TYPE.get(x.dtype, 1)]
    if x.dtype != np.float32 or drop == 0:
        return x
    u = x.view(np.uint32).astype(np.uint64)
    u = (u + ((u >> drop) & 1) + (1 << (drop - 1)) - 1) >> drop << drop
    return u.astype(np.uint32).view(np.float32)


# CuPy's private GEMM compute-type switch (cupy._core._routines_linalg), as cupy_gpu uses it.
_core = types.SimpleNamespace(
    _routines_linalg=types.SimpleNamespace(
        COMPUTE_TYPE_DEFAULT=1,
        COMPUTE_TYPE_TF32=7,
        COMPUTE_TYPE_BF16=6,
        set_compute_type=_set_compute_type,
        get_compute_type=lambda dtype: _COMPUTE_TYPE.get(np.dtype(dtype), 1),
    )
)


def get_array_module(*args: Any) -> Any:
    """This module when any argument is a device array, else numpy."""
    import sys

    return sys.modules[__name__] if any(isinstance(a, ndarray) for a in args) else np


def __getattr__(name: str) -> Any:
    """Fall through to NumPy: functions become device functions, anything else is NumPy's."""
    if name.startswith("__") or name in ("random", "linalg", "fft", "testing"):
        raise AttributeError(f"the emulated cupy module has no {name!r}")
    obj = getattr(np, name)  # AttributeError if NumPy lacks it too
    return _device_fn(obj, name) if callable(obj) and not isinstance(obj, type) else obj


# ------------------------------------------------------------- the "device"
_PROPERTIES = {
    "name": b"cuda-emu (CPU host emulation)",
    "totalGlobalMem": _MEMORY["limit"],
    "multiProcessorCount": 1,
    "maxThreadsPerBlock": 1024,
    "warpSize": 32,
    "major": 8,
    "minor": 0,
}


class _Device:
    """``cupy.cuda.Device``: the single emulated device."""

    def __init__(self, device: int = 0) -> None:
        if device != 0:
            raise ValueError(f"the emulated CUDA machine has one device (0), not {device}")
        self.id = 0

    compute_capability = "80"
    # 1 SM x 2 resident blocks: grid-stride kernels get 2-block grids, cheap to emulate
    attributes = {
        "MultiProcessorCount": 1,
        "MaxBlocksPerMultiprocessor": 2,
        "MaxThreadsPerBlock": 1024,
        "WarpSize": 32,
    }

    def synchronize(self) -> None:
        """Launches run synchronously here: nothing to wait for."""

    def use(self) -> None:
        """Make this the current device (it always is)."""

    def __enter__(self) -> _Device:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


class _Graph:
    """A captured sequence of kernel launches; ``launch()`` replays them in order."""

    def __init__(self, launches: list) -> None:
        self._launches = launches

    def launch(self, stream: Any = None) -> None:
        """Replay every recorded launch."""
        for kernel, grid, block, values in self._launches:
            kernel._replay(grid, block, values)


class _Stream:
    """``cupy.cuda.Stream``: a context manager that can record launches into a :class:`_Graph`."""

    _stack: list[_Stream] = []

    def __init__(self, null: bool = False, non_blocking: bool = False, ptds: bool = False) -> None:
        self._capture: list | None = None

    def __enter__(self) -> _Stream:
        _Stream._stack.append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        _Stream._stack.pop()

    def use(self) -> _Stream:
        """Make this the current stream (until another is entered)."""
        _Stream._stack[:] = [self]
        return self

    def synchronize(self) -> None:
        """Nothing is ever pending."""

    def begin_capture(self, mode: Any = None) -> None:
        """Start recording this stream's kernel launches instead of running them."""
        if self._capture is not None:
            raise RuntimeError("this stream is already capturing")
        self._capture = []

    def is_capturing(self) -> bool:
        """True between begin_capture and end_capture."""
        return self._capture is not None

    def end_capture(self) -> _Graph:
        """Stop recording; the launches become a replayable :class:`_Graph`."""
        if self._capture is None:
            raise RuntimeError("end_capture without begin_capture")
        graph, self._capture = _Graph(self._capture), None
        return graph


_Stream.null = _Stream(null=True)  # type: ignore[attr-defined]


def _get_current_stream() -> _Stream:
    """The innermost entered stream, or the null stream."""
    return _Stream._stack[-1] if _Stream._stack else _Stream.null  # type: ignore[attr-defined]


class _Event:
    """``cupy.cuda.Event`` timed with the host clock."""

    def __init__(self, block: bool = False, disable_timing: bool = False, interprocess: bool = False) -> None:
        self._t = 0.0

    def record(self, stream: Any = None) -> None:
        """Timestamp now."""
        self._t = time.perf_counter()

    def synchronize(self) -> None:
        """Nothing is ever pending."""


def _elapsed_ms(start: _Event, end: _Event) -> float:
    return (end._t - start._t) * 1e3


def _device_count() -> int:
    return 1


def _properties(device: int) -> dict:
    _Device(device)
    return dict(_PROPERTIES)


cuda = types.SimpleNamespace(
    memory=types.SimpleNamespace(OutOfMemoryError=_OutOfMemoryError),
    Device=_Device,
    Stream=_Stream,
    Event=_Event,
    get_current_stream=_get_current_stream,
    get_elapsed_time=_elapsed_ms,
    graph=types.SimpleNamespace(Graph=_Graph),
    runtime=types.SimpleNamespace(
        getDeviceCount=_device_count,
        getDeviceProperties=_properties,
        deviceSynchronize=lambda: None,
        runtimeGetVersion=lambda: 13000,
    ),
)


# --------------------------------------------------------------- RawModule
def _buffer_of(a: Any) -> np.ndarray | None:
    return a._a if isinstance(a, ndarray) else None


class RawKernel:
    """A kernel of a :class:`RawModule`: ``kernel(grid, block, args, shared_mem=0)``."""

    def __init__(self, host_kernel: cuda_host.HostKernel) -> None:
        self._k = host_kernel
        self.name = host_kernel.name

    def __call__(
        self, grid: Any, block: Any, args: tuple, *, shared_mem: int = 0, stream: Any = None
    ) -> None:
        """Launch now, or record the launch when the current stream is capturing."""
        s = stream or _get_current_stream()
        if s._capture is not None:
            self._k.convert(tuple(args))  # type errors surface at capture time, as with CuPy
            s._capture.append((self, grid, block, tuple(args)))
            return
        self._k(grid, block, args, shared_mem=shared_mem)

    def _replay(self, grid: Any, block: Any, args: tuple) -> None:
        """Run a recorded launch."""
        self._k(grid, block, args)


class RawModule:
    """``cupy.RawModule(code=..., options=...)`` built for the CPU by g++ (cached)."""

    def __init__(self, code: str, options: tuple = (), name_expressions: Any = None, **kwargs: Any) -> None:
        self.code, self.options = code, tuple(options)
        self._mod = cuda_host.HostModule(code, _buffer_of)

    def compile(self, log_stream: Any = None) -> None:
        """Compile now (here: already built by the constructor)."""

    def get_function(self, name: str) -> RawKernel:
        """The ``extern "C" __global__`` kernel ``name``."""
        return RawKernel(self._mod.get_function(name))
