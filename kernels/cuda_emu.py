"""An emulated CUDA device: the small part of CuPy that gpumlp uses, on the CPU.

This module *is* the array module (``xp``) of the ``cuda-emu`` backend. Its
:class:`ndarray` wraps a NumPy array (the "device memory") and, like CuPy's,
refuses to turn into a host array implicitly: ``np.asarray(a)`` raises
TypeError (use ``a.get()``), and mixing it with a ``numpy.ndarray`` in
arithmetic or in an ``xp`` function raises TypeError. Functions not listed
here fall through to NumPy's of the same name (``xp.sqrt``, ``xp.sum`` ...),
with the same host-array check. ``empty``/``empty_like`` fill floats with NaN
so code that reads uninitialised device memory shows it (under
``GPUMLP_EMU_SANITIZE=initcheck``, every element with ``cuda_host.POISON``, which kernels report).

:class:`RawModule` compiles the CUDA source with ``cuda_host`` (g++ + the host
emulation header) and its kernels run on the CPU. ``cuda`` offers
``runtime.getDeviceCount``, ``Device().synchronize()``, ``Stream``, ``Event``
and graph capture (``Stream.begin_capture``/``end_capture`` record RawModule
launches; ``Graph.launch(stream)`` replays them on that stream). While the
current stream captures, any other device work (arithmetic, copies, fills,
allocation, fancy indexing, reads to the host) raises :class:`CaptureError`:
the emulator could only run it at capture time, never at replay, which would
hide exactly the bug a graph test is for. Views (basic slicing, reshape of
contiguous data) stay allowed. For correctness, not speed.

Streams follow CUDA's rules. Every device operation (kernel launch, array
arithmetic and fills, ``asarray``/``set`` host-to-device copies, ``get`` and
the other host reads, device-to-device copies, graph replays) belongs to the
stream current when it is issued (or the one it is given). Work is FIFO within
a stream; the legacy null stream waits for, and is waited for by, *blocking*
streams but not ``non_blocking=True`` ones; ``Event.record`` /
``Stream.wait_event``, ``Stream``/``Event``/``Device.synchronize`` and host
reads (``get`` waits for its stream) order the rest; host-to-device copies
complete asynchronously. A happens-before checker (vector clocks per stream,
as ThreadSanitizer keeps per thread) logs the last writer and readers of every
byte range of every allocation and raises :class:`StreamRaceError` when an
access is not ordered after a conflicting one (``GPUMLP_EMU_RACECHECK=0``
turns it off). ``GPUMLP_EMU_SCHEDULE=deferred[:seed]`` queues the work per
stream and runs it only when something forces it (a synchronisation, a host
read, an array operation whose result the host needs), interleaving the
streams in a seeded random order, so an ordering bug also gives wrong numbers.
Argument errors still raise at the launch; errors while a kernel runs (a launch
configuration it refuses, a deadlock) then surface when its work runs, as CUDA
reports them asynchronously.
"""

from __future__ import annotations

import itertools
import os
import random
import sys
import threading
import time
import types
import weakref
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

from . import cuda_host

_IMPLICIT = (
    "Implicit conversion to a NumPy array is not allowed. Please use `.get()` to construct a NumPy "
    "array explicitly."
)


class CaptureError(RuntimeError):
    """Device work other than a RawModule launch while the current stream captures a graph."""


class StreamRaceError(RuntimeError):
    """Two accesses to the same device memory, at least one a write, that no stream order,
    event, synchronisation or implicit null-stream ordering puts one after the other."""


def _no_capture(what: str) -> None:
    """Raise CaptureError if the current stream is capturing a CUDA graph."""
    if _current_stream()._capture is not None:
        raise CaptureError(
            f"emulated device: {what} while the current stream captures a CUDA graph; the emulator "
            "records only RawModule kernel launches, so this would run once now and never at replay. "
            "Do it before capturing, or as a kernel."
        )


def _schedule() -> tuple[bool, random.Random]:
    """``$GPUMLP_EMU_SCHEDULE``: ``eager`` (default: work runs when issued) or ``deferred[:seed]``."""
    text = os.environ.get("GPUMLP_EMU_SCHEDULE", "eager").strip().lower()
    kind, _, seed = text.partition(":")
    if kind not in ("eager", "deferred") or (seed and (kind == "eager" or not seed.isdigit())):
        raise ValueError(f"GPUMLP_EMU_SCHEDULE={text!r}: expected eager, deferred or deferred:SEED (an int)")
    return kind == "deferred", random.Random(int(seed or 0))


_DEFERRED, _RNG = _schedule()
_RACECHECK = os.environ.get("GPUMLP_EMU_RACECHECK", "1").strip() != "0"


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


def _release(nbytes: int, key: int) -> None:
    _MEMORY["used"] -= nbytes
    _SHADOWS.pop(key, None)


def _allocated(a: np.ndarray) -> np.ndarray:
    """Account a buffer that owns its memory against the device's capacity, as a GPU would."""
    if a.base is None and a.nbytes:
        if _MEMORY["used"] + a.nbytes > _MEMORY["limit"]:
            raise _OutOfMemoryError(
                f"Out of memory allocating {a.nbytes:,} bytes (allocated so far: {_MEMORY['used']:,} bytes, "
                f"device memory {_MEMORY['limit']:,} bytes; set GPUMLP_EMU_MEMORY to change it)."
            )
        _MEMORY["used"] += a.nbytes
        if _RACECHECK:
            known = _SHADOWS.get(id(a))  # an array op's result, already logged as written by it
            _SHADOWS[id(a)] = shadow = _Shadow(a, _caller())
            shadow.log = known.log if known is not None else shadow.log
        weakref.finalize(a, _release, a.nbytes, id(a))
    return a


# --------------------------------------------- stream order and the race checker
_HOST: dict[int, int] = {}  # stream id -> its last op the host waited for (synchronize, get)
_SEQ = [0, 0]  # [ops issued so far, ops issued before the last Device.synchronize]
# Streams the legacy null stream synchronises with; one that is collected leaves its clock to the
# null stream (it can issue nothing more), so the set does not grow with every stream ever made.
_BLOCKING: weakref.WeakSet[_Stream] = weakref.WeakSet()
_PENDING: dict[int, _Stream] = {}  # deferred mode: streams with queued work, by id
_LOCAL = threading.local()  # the current-stream stack, per host thread as in CUDA
_SKIP_MODULES = (__name__, __package__ or __name__, "numpy", "gpumlp.backend")  # the wrappers, not the caller


def _caller() -> tuple | None:
    """Where the device work was asked for: the first frame outside the emulator, the kernel
    wrappers and NumPy, as (file, line, function); :func:`_place` words it when a report needs it."""
    f = sys._getframe(2)
    while f is not None and f.f_globals.get("__name__", "").startswith(_SKIP_MODULES):
        f = f.f_back
    return None if f is None else (f.f_code.co_filename, f.f_lineno, f.f_code.co_name)


def _place(site: tuple | None) -> str:
    """A :func:`_caller` site as ``gpumlp/train.py:210 (fit)``."""
    if site is None:
        return "an unknown place"
    path = Path(site[0])
    return f"{path.parent.name}/{path.name}:{site[1]} ({site[2]})"


class _Shadow:
    """The race checker's log of one allocation: recent accesses as
    (lo, hi, write, stream, clock, seq, op) over its bytes [lo, hi)."""

    __slots__ = ("dtype", "shape", "site", "nbytes", "log")

    def __init__(self, a: np.ndarray, site: tuple | None) -> None:
        self.dtype, self.shape, self.site, self.nbytes, self.log = a.dtype, a.shape, site, a.nbytes, []

    @property
    def what(self) -> str:
        """The allocation in words (only a race report needs them)."""
        return f"a {self.dtype} {self.shape} device buffer allocated at {_place(self.site)}"


_SHADOWS: dict[int, _Shadow] = {}


def _span(a: np.ndarray) -> tuple[_Shadow, int, int]:
    """The allocation a buffer (or view) lives in, and the bytes [lo, hi) it spans there."""
    root = a
    while isinstance(root.base, np.ndarray):
        root = root.base
    shadow = _SHADOWS.get(id(root))
    if shadow is None:  # memory NumPy made without passing through _allocated
        shadow = _SHADOWS[id(root)] = _Shadow(root, None)
        weakref.finalize(root, _SHADOWS.pop, id(root), None)
    lo, hi = np.lib.array_utils.byte_bounds(a)
    start = np.lib.array_utils.byte_bounds(root)[0]
    return shadow, lo - start, hi - start


def _join(clock: dict[int, int], other: dict[int, int]) -> None:
    for sid, c in other.items():
        if clock.get(sid, -1) < c:
            clock[sid] = c


def _tick(s: _Stream) -> tuple[int, int]:
    """Issue one op on ``s`` -> (its clock on ``s``, its global sequence number). The legacy null
    stream first joins every blocking stream, and a blocking stream the null stream."""
    if s._id == 0:
        for b in _BLOCKING:
            _join(s._vc, b._vc)
    elif s._blocking:
        _join(s._vc, _NULL._vc)
    s._vc[s._id] += 1
    _SEQ[0] += 1
    return s._vc[s._id], _SEQ[0]


def _ordered(s: _Stream, rec: tuple) -> bool:
    """Is the logged access ``rec`` ordered before the op ``s`` issues now?"""
    sid, clock = rec[3]._id, rec[4]
    return sid == s._id or rec[5] <= _SEQ[1] or s._vc.get(sid, 0) >= clock or _HOST.get(sid, 0) >= clock


def _race(shadow: _Shadow, span: tuple[int, int], op: str, write: bool, s: _Stream, rec: tuple) -> str:
    lo, hi = max(span[0], rec[0]), min(span[1], rec[1])
    part = "" if (lo, hi) == (0, shadow.nbytes) else f" (bytes {lo}..{hi})"
    return (
        f"{op} {'writes' if write else 'reads'} {shadow.what}{part} on {s._name}, but {rec[6]} "
        f"{'wrote' if rec[2] else 'read'} it on {rec[3]._name} and nothing orders the two: record an "
        "Event on the first stream and wait_event it on the second, or synchronize"
    )


def _touch(s: _Stream, op: str, a: np.ndarray, write: bool, stamp: tuple[int, int]) -> None:
    """Check one access against the allocation's log, then log it."""
    if not a.nbytes:
        return
    shadow, lo, hi = _span(a)
    keep = []
    for rec in shadow.log:
        if rec[1] <= lo or hi <= rec[0]:
            keep.append(rec)
            continue
        if (write or rec[2]) and not _ordered(s, rec):
            raise StreamRaceError(_race(shadow, (lo, hi), op, write, s, rec))
        if lo <= rec[0] and rec[1] <= hi and (write or (rec[3] is s and not rec[2])):
            continue  # superseded: whatever is ordered after this access is ordered after that one
        keep.append(rec)
    keep.append((lo, hi, write, s, *stamp, op))
    if len(keep) > 32:  # drop what every later op is ordered after anyway
        keep = [r for r in keep if r[5] > _SEQ[1] and _HOST.get(r[3]._id, 0) < r[4]]
    shadow.log = keep


def _access(s: _Stream, op: str, reads: Any = (), writes: Any = ()) -> tuple[int, int]:
    """Issue an op on stream ``s`` that reads and writes these buffers: check and log it."""
    stamp = _tick(s)
    if _RACECHECK:
        for a in reads:
            _touch(s, op, a, False, stamp)
        for a in writes:
            _touch(s, op, a, True, stamp)
    return stamp


def _submit(s: _Stream, fn: Any, force: bool = False) -> None:
    """Run ``fn`` as the next work of ``s``: now, or (deferred) queued until something forces it."""
    if not _DEFERRED:
        fn()
        return
    deps: list = []
    if s._id == 0:
        deps = [(b, b._issued) for b in _BLOCKING if b._issued > b._done]
    elif s._blocking and _NULL._issued > _NULL._done:
        deps = [(_NULL, _NULL._issued)]
    s._queue.append((deps, fn))
    s._issued += 1
    _PENDING[s._id] = s
    if force:
        _drain(s)


def _drain(s: _Stream | None = None, upto: int | None = None) -> None:
    """Deferred mode: run queued work, one item of a seeded random runnable stream at a time,
    until ``s`` has run its first ``upto`` items (all it has; every stream's when ``s`` is None).
    The oldest queued item is always runnable: what it waits for was issued before it."""
    while _PENDING and (s is None or s._done < (s._issued if upto is None else upto)):
        ready = [t for t in _PENDING.values() if all(d._done >= n for d, n in t._queue[0][0])]
        t = ready[_RNG.randrange(len(ready))]
        _, fn = t._queue.popleft()
        t._done += 1
        if not t._queue:
            del _PENDING[t._id]
        fn()


def _enqueue(what: str, fn: Any, reads: Any = (), writes: Any = ()) -> None:
    """Device work on the current stream whose result the host does not need now."""
    _no_capture(what)
    s = _current_stream()
    _access(s, what, reads, writes)
    _submit(s, fn)


def _compute(what: str, fn: Any, reads: Any = (), writes: Any = ()) -> Any:
    """An array operation on the current stream whose result the host needs now (its shape):
    checked, run in stream order, and its freshly allocated results logged as written by it."""
    _no_capture(what)
    s = _current_stream()
    stamp = _access(s, what, reads, writes)
    box: list = []
    _submit(s, lambda: box.append(fn()), force=True)
    if _RACECHECK:
        inputs = [_span(a)[0] for a in (*reads, *writes) if a.nbytes]
        for r in box[0] if isinstance(box[0], tuple) else (box[0],):
            if isinstance(r, np.ndarray) and r.nbytes and _span(r)[0] not in inputs:
                _touch(s, what, r, True, stamp)
    return box[0]


def _host_read(a: ndarray, what: str, stream: Any = None) -> np.ndarray:
    """A device-to-host read of ``a`` on ``stream`` (default: the current one), which the host
    then waits for, as CuPy's blocking ``get`` does -> the buffer, ready to read."""
    _no_capture(what)
    s = stream or _current_stream()
    _access(s, what, reads=(a._a,))
    _drain(s)
    _join(_HOST, s._vc)
    return a._a


def _buffers(x: Any) -> list[np.ndarray]:
    """The device buffers in (already unwrapped) arguments, looking into lists, tuples and dicts."""
    if isinstance(x, np.ndarray):
        return [x]
    if isinstance(x, (list, tuple)):
        return [b for v in x for b in _buffers(v)]
    if isinstance(x, dict):
        return _buffers(list(x.values()))
    return []


# ------------------------------------------------------------------- arrays
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


_VIEWS = frozenset("ravel reshape squeeze swapaxes transpose view".split())  # no device work (views)
_METHODS = frozenset(
    "all any argmax argmin astype clip copy cumsum diagonal dot fill flatten max mean min nonzero prod "
    "ravel repeat reshape round sort argsort squeeze std sum swapaxes take trace transpose var view".split()
)
_IN_PLACE = frozenset("fill sort copyto place put putmask".split())  # write their first array


def _device_fn(fn: Any, name: str, this: np.ndarray | None = None) -> Any:
    """``fn`` (a NumPy function, or a method of the buffer ``this``) as a device operation."""

    def call(*args: Any, **kwargs: Any) -> Any:
        args, kwargs = _unwrap(args), {k: _unwrap(v) for k, v in kwargs.items()}
        if name in _VIEWS:
            return _wrap(fn(*args, **kwargs))
        bufs = ([] if this is None else [this]) + _buffers((args, kwargs))
        writes = _buffers(kwargs.get("out"))
        if name in _IN_PLACE and bufs:
            writes.append(bufs[0])
        return _wrap(_compute(f"{name}()", lambda: fn(*args, **kwargs), bufs, writes))

    call.__name__ = call.__qualname__ = name
    call.__doc__ = f"Emulated cupy.{name}: numpy.{name} on device arrays."
    return call


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
        """Copy to the host as a NumPy array (on ``stream`` or the current one, then waiting for it)."""
        a = _host_read(self, "get (a device-to-host copy)", stream)
        if out is not None:
            out[...] = a
            return out
        return np.array(a, order=order, copy=True)

    def set(self, arr: np.ndarray, stream: Any = None) -> None:
        """Copy a host array into this device array (asynchronously, on ``stream`` or the current one)."""
        _no_capture("a host-to-device copy (set)")
        s, src, a = stream or _current_stream(), np.array(arr, copy=True), self._a  # src: the staged copy
        _access(s, "set (a host-to-device copy)", writes=(a,))
        _submit(s, lambda: a.__setitem__(Ellipsis, src))

    def item(self) -> Any:
        """The single element as a Python scalar."""
        return _host_read(self, "item (a device-to-host read)").item()

    def tolist(self) -> Any:
        """Copy to the host as nested lists."""
        return _host_read(self, "tolist (a device-to-host copy)").tolist()

    def __getattr__(self, name: str) -> Any:
        if name in _METHODS:
            return _device_fn(getattr(self._a, name), name, self._a)
        raise AttributeError(f"emulated cupy.ndarray has no attribute {name!r}")

    # -- NumPy interop: like CuPy, no implicit host conversion
    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        raise TypeError(_IMPLICIT)

    def __array_ufunc__(self, ufunc: Any, method: str, *inputs: Any, **kwargs: Any) -> Any:
        out = kwargs.get("out")
        if out is not None:
            kwargs["out"] = _unwrap(out)
        ins = _unwrap(inputs)
        res = _compute(
            f"numpy.{ufunc.__name__}",
            lambda: getattr(ufunc, method)(*ins, **kwargs),
            _buffers(ins),
            _buffers(kwargs.get("out")),
        )
        if out is not None:
            outs = out if isinstance(out, tuple) else (out,)
            return outs[0] if len(outs) == 1 else outs
        return _wrap(res)

    def __array_function__(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        return _device_fn(func, func.__name__)(*args, **kwargs)

    # -- indexing
    def __getitem__(self, key: Any) -> Any:
        if _basic_index(key):
            return ndarray._of(self._a[_view_key(key)])
        k = _unwrap_index(key)
        return _wrap(_compute("advanced indexing", lambda: self._a[k], [self._a, *_buffers(k)]))

    def __setitem__(self, key: Any, value: Any) -> None:
        k, a = _unwrap_index(key), self._a
        target = a[_view_key(key)] if _basic_index(key) else a
        if isinstance(value, ndarray):
            src = value._a
        elif isinstance(value, np.ndarray):
            src = np.array(value, copy=True)  # the staged copy of host memory
        else:
            src = value
        reads = _buffers(k) + ([src] if isinstance(value, ndarray) else [])
        _enqueue("an assignment into a device array", lambda: a.__setitem__(k, src), reads, [target])

    def __len__(self) -> int:
        return len(self._a)

    def __iter__(self) -> Any:
        return (self[i] for i in range(len(self)))

    def __repr__(self) -> str:
        return "emu_" + repr(self._a)

    def __bool__(self) -> bool:
        return bool(_host_read(self, "reading a device value on the host (bool)"))

    def __float__(self) -> float:
        return float(_host_read(self, "reading a device value on the host (float)"))

    def __int__(self) -> int:
        return int(_host_read(self, "reading a device value on the host (int)"))

    def __index__(self) -> int:
        return _host_read(self, "reading a device value on the host (index)").__index__()


def _basic_index(key: Any) -> bool:
    """True for ints, slices, None and Ellipsis (views, no device work)."""
    keys = key if isinstance(key, tuple) else (key,)
    return all(k is None or k is Ellipsis or isinstance(k, (int, np.integer, slice)) for k in keys)


def _view_key(key: Any) -> tuple:
    """A basic index that selects a view even where NumPy would return a scalar (``a[3]`` of a
    1-d array is a 0-d device array viewing the element, as in CuPy)."""
    keys = key if isinstance(key, tuple) else (key,)
    return keys if any(k is Ellipsis for k in keys) else (*keys, Ellipsis)


def _unwrap_index(key: Any) -> Any:
    if isinstance(key, tuple):
        return tuple(_unwrap_index(k) for k in key)
    return key._a if isinstance(key, ndarray) else key


def _unary(ufunc: Any) -> Any:
    def op(self: ndarray) -> Any:
        return _wrap(_compute(f"numpy.{ufunc.__name__}", lambda: ufunc(self._a), [self._a]))

    return op


def _binary(ufunc: Any, reflected: bool = False, inplace: bool = False) -> Any:
    def op(self: ndarray, other: Any) -> Any:
        if isinstance(other, np.ndarray):
            raise TypeError(
                f"Unsupported type {type(other)}: a host numpy.ndarray reached the emulated device"
            )
        a, o = self._a, other._a if isinstance(other, ndarray) else other
        what, reads = f"numpy.{ufunc.__name__}", [a, *_buffers(o)]
        if inplace:
            _enqueue(what, lambda: ufunc(a, o, out=a), reads, [a])
            return self
        return _wrap(_compute(what, lambda: ufunc(o, a) if reflected else ufunc(a, o), reads))

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
def _upload(data: np.ndarray, what: str) -> ndarray:
    """A new device array filled from (a staged copy of) host data by an asynchronous copy on the
    current stream; until the copy runs, deferred mode shows garbage there."""
    _no_capture(what)
    if not _DEFERRED:  # the copy runs now: the staged host copy becomes the device buffer
        out = ndarray._of(data)
        _enqueue(what, lambda: None, writes=[data])
        return out
    dev = _poison(np.empty_like(data))
    out = ndarray._of(dev)
    _enqueue(what, lambda: np.copyto(dev, data), writes=[dev])
    return out


def asarray(a: Any, dtype: Any = None, order: Any = None) -> ndarray:
    """Host data or a device array -> device array (no copy when already one of ``dtype``)."""
    if isinstance(a, ndarray) and (dtype is None or a.dtype == np.dtype(dtype)):
        return a
    if isinstance(a, ndarray):
        return a.astype(dtype)
    return _upload(np.array(a, dtype=dtype, order=order or "K", copy=True), "asarray (a host-to-device copy)")


def array(obj: Any, dtype: Any = None, copy: bool = True, order: str = "K", ndmin: int = 0) -> ndarray:
    """Copy host data or a device array to a new device array."""
    if not isinstance(obj, ndarray):
        data = np.array(obj, dtype=dtype, copy=True, order=order, ndmin=ndmin)
        return _upload(data, "array (a host-to-device copy)")
    src = obj._a
    fn = lambda: np.array(src, dtype=dtype, copy=copy, order=order, ndmin=ndmin)  # noqa: E731
    return _wrap(_compute("array (a copy)", fn, [src]))


def ascontiguousarray(a: Any, dtype: Any = None) -> ndarray:
    """C-contiguous device array (copies only when needed)."""
    a = asarray(a, dtype=dtype)
    if a.flags.c_contiguous:
        return a
    src = a._a
    return _wrap(_compute("ascontiguousarray (a copy)", lambda: np.ascontiguousarray(src), [src]))


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
    a, b = _unwrap((a, b))
    o = None if out is None else out._a

    def gemm() -> np.ndarray:
        return np.matmul(_tensor_core_inputs(a), _tensor_core_inputs(b), out=o, **kwargs)

    res = _compute("matmul", gemm, [a, b], [] if o is None else [o])
    return _wrap(res) if out is None else out


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


def _device_synchronize() -> None:
    """Wait for all work on every stream."""
    _drain()
    _SEQ[1] = _SEQ[0]


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
        """Wait for all work on every stream."""
        _device_synchronize()

    def use(self) -> None:
        """Make this the current device (it always is)."""

    def __enter__(self) -> _Device:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


class _Graph:
    """A captured sequence of kernel launches; ``launch(stream)`` replays them in order on ``stream``."""

    def __init__(self, launches: list) -> None:
        self._launches = launches

    def launch(self, stream: Any = None) -> None:
        """Replay every recorded launch on ``stream`` (default: the current one)."""
        s = stream or _current_stream()
        for kernel, grid, block, values in self._launches:
            kernel._issue(s, grid, block, values, "graph replay of kernel")


class _Stream:
    """``cupy.cuda.Stream``: FIFO device work; current inside ``with`` or after ``use()``. It can
    record its kernel launches into a :class:`_Graph` instead of running them."""

    _ids = itertools.count(1)

    def __init__(self, null: bool = False, non_blocking: bool = False, ptds: bool = False) -> None:
        if ptds:
            raise NotImplementedError("the emulated device has no per-thread default stream")
        self._capture: list | None = None
        self._id = 0 if null else next(_Stream._ids)
        self._blocking = not (null or non_blocking)
        self._vc = {self._id: 0}  # vector clock: per stream, its last op ordered before this one's next
        self._queue: deque = deque()  # deferred mode: (what it waits for, work) items
        self._issued = self._done = 0
        kind = "blocking" if self._blocking else "non-blocking"
        self._name = "the legacy null stream" if null else f"stream {self._id} ({kind})"
        if self._blocking:
            _BLOCKING.add(self)
            weakref.finalize(self, _join, _NULL._vc, self._vc)

    def __enter__(self) -> _Stream:
        _stream_stack().append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        _stream_stack().pop()

    def use(self) -> _Stream:
        """Make this the current stream (until another is entered)."""
        _stream_stack()[:] = [self]
        return self

    def synchronize(self) -> None:
        """Wait (on the host) for all work issued to this stream."""
        _drain(self)
        _join(_HOST, self._vc)

    def record(self, event: _Event | None = None) -> _Event:
        """Record ``event`` (a new one by default) at this point of the stream."""
        event = event or _Event()
        event.record(self)
        return event

    def wait_event(self, event: _Event) -> None:
        """Make later work on this stream wait for the work before ``event``'s record."""
        _join(self._vc, event._vc)
        if _DEFERRED and event._at is not None:
            self._queue.append(([event._at], lambda: None))
            self._issued += 1
            _PENDING[self._id] = self

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


_NULL = _Stream.null = _Stream(null=True)  # type: ignore[attr-defined]


def _stream_stack() -> list[_Stream]:
    stack = getattr(_LOCAL, "stack", None)
    if stack is None:
        stack = _LOCAL.stack = []
    return stack


def _current_stream() -> _Stream:
    """The innermost entered stream of this thread, or the legacy null stream."""
    stack = _stream_stack()
    return stack[-1] if stack else _NULL


class _Event:
    """``cupy.cuda.Event``: a point in a stream that other streams and the host can wait for
    (timed with the host clock)."""

    def __init__(self, block: bool = False, disable_timing: bool = False, interprocess: bool = False) -> None:
        self._t = 0.0
        self._vc: dict[int, int] = {}  # what the stream had reached at the record
        self._at: tuple[_Stream, int] | None = None  # deferred mode: (stream, items issued before it)

    def record(self, stream: Any = None) -> None:
        """Mark the current point of ``stream`` (default: the current stream)."""
        s = stream or _current_stream()
        if s._capture is not None:
            raise CaptureError("emulated device: recording an event while the stream captures a CUDA graph")
        _tick(s)  # ordered like work on s: after the null stream's earlier work when s is blocking
        _submit(s, lambda: None)
        self._vc, self._at, self._t = dict(s._vc), (s, s._issued), time.perf_counter()

    def synchronize(self) -> None:
        """Wait (on the host) for the work before the last record."""
        if self._at is not None:
            _drain(*self._at)
        _join(_HOST, self._vc)


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
    get_current_stream=_current_stream,
    get_elapsed_time=_elapsed_ms,
    graph=types.SimpleNamespace(Graph=_Graph),
    runtime=types.SimpleNamespace(
        getDeviceCount=_device_count,
        getDeviceProperties=_properties,
        deviceSynchronize=_device_synchronize,
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
        """Launch on ``stream`` (default: the current one), or record the launch when it captures."""
        s, args = stream or _current_stream(), tuple(args)
        if s._capture is not None:
            self._k.convert(args)  # type errors surface at capture time, as with CuPy
            s._capture.append((self, grid, block, args))
            return
        self._issue(s, grid, block, args, "kernel", shared_mem)

    def _issue(self, s: _Stream, grid: Any, block: Any, args: tuple, how: str, shared_mem: int = 0) -> None:
        """Launch on stream ``s``: pointers to const are read, every other pointer written."""
        if _DEFERRED:
            self._k.convert(args)  # argument errors at the launch, not when the work runs
        bufs = zip(self._k.params, map(_buffer_of, args))
        pointers = [(p, b) for p, b in bufs if p.pointer and b is not None]
        reads = [b for p, b in pointers if p.const]
        _access(s, f"{how} {self.name}", reads, [b for p, b in pointers if not p.const])
        _submit(s, lambda: self._k(grid, block, args, shared_mem=shared_mem))


class RawModule:
    """``cupy.RawModule(code=..., options=...)`` built for the CPU by g++ (cached)."""

    def __init__(self, code: str, options: tuple = (), name_expressions: Any = None, **kwargs: Any) -> None:
        _no_capture("loading a module (RawModule; CUDA's lazy loading may invalidate the capture)")
        self.code, self.options = code, tuple(options)
        self._mod = cuda_host.HostModule(code, _buffer_of)

    def compile(self, log_stream: Any = None) -> None:
        """Compile now (here: already built by the constructor)."""

    def get_function(self, name: str) -> RawKernel:
        """The ``extern "C" __global__`` kernel ``name``."""
        _no_capture(f"get_function({name!r}) (with CUDA's lazy loading this may invalidate the capture)")
        return RawKernel(self._mod.get_function(name))
