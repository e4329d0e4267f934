"""Backend registry: one name -> (array module, kernel module, transfers).

A backend is a kernel module implementing the contract of
``gpumlp.kernels.reference`` plus the array module ``xp`` its arrays live in.
Layers, losses and the training loop only ever talk to a :class:`Backend`.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np

log = logging.getLogger("gpumlp")

DTYPES = {"float32": np.float32, "float64": np.float64}
MATMUL_PRECISIONS = ("float32", "tf32", "bf16")
AUTO_ORDER = ("cupy", "numba", "numpy")


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here; the message says why and how to fix it."""


@dataclass
class Backend:
    """Everything the framework needs from a compute backend.

    ``xp`` is the NumPy-compatible array module (numpy, cupy, or the emulated
    device's), ``k`` the kernel module with the reference contract. Devices
    with CUDA graphs also give ``stream()`` (a new non-blocking stream, a context
    manager making it current; ``wait_for_uploads`` orders it after the default
    stream's work) and ``capture(fn)``: record the launches of ``fn()`` on the
    current stream into a graph, without running them, and return ``replay()``."""

    name: str
    xp: Any
    k: ModuleType
    description: str = ""
    synchronize: Callable[[], None] = field(default=lambda: None)
    stream: Callable[[], contextlib.AbstractContextManager] = field(default=contextlib.nullcontext)
    capture: Callable[[Callable[[], None]], Callable[[], None]] | None = None

    def set_matmul_precision(self, precision: str) -> None:
        """``float32`` (exact, the default), ``tf32`` or ``bf16``: what float32 GEMMs may round
        their inputs to on tensor cores. For this whole backend; only CUDA backends have the
        choice (cuda-emu reproduces the rounding on the CPU)."""
        if hasattr(self.k, "_set_matmul_precision"):
            self.k._set_matmul_precision(precision)
        elif precision != "float32":
            raise BackendUnavailable(
                f"matmul precision {precision!r} needs a CUDA backend (cupy, or cuda-emu to emulate it); "
                f"backend {self.name!r} computes exact float32 GEMMs"
            )

    def wait_for_uploads(self, stream) -> None:
        """Make ``stream`` (made by ``stream()``) wait for the work issued so far on the current
        stream (uploads, fills, loaded weights), through an event recorded there; a no-op without
        CUDA streams. CUDA orders nothing between a non-blocking stream and the default one."""
        if hasattr(stream, "wait_event"):
            event = self.xp.cuda.Event(disable_timing=True)
            event.record(self.xp.cuda.get_current_stream())
            stream.wait_event(event)

    def asarray(self, a, dtype=None):
        """Host (or device) array -> C-contiguous device array of ``dtype``."""
        # asarray(order="C"), not ascontiguousarray: that one turns 0-d arrays into shape (1,)
        return self.xp.asarray(a, dtype=dtype, order="C")

    def to_host(self, a) -> np.ndarray:
        """Device array or 0-d array -> NumPy array on the host."""
        get = getattr(a, "get", None)
        return np.asarray(get() if callable(get) else a)

    def __repr__(self) -> str:
        return f"Backend({self.name!r})"


def _load_numpy() -> Backend:
    from gpumlp.kernels import reference

    return Backend("numpy", np, reference, "NumPy reference kernels, BLAS matmul")


def _load_numba() -> Backend:
    try:
        importlib.import_module("numba")
    except ImportError as e:
        raise BackendUnavailable(
            f"backend 'numba' needs the numba package ({e}); install it with: pip install numba"
        ) from None
    from gpumlp.kernels import numba_cpu

    return Backend("numba", np, numba_cpu, "Numba-jitted fused CPU kernels, BLAS matmul")


def _load_cupy() -> Backend:
    from gpumlp.kernels import cupy_gpu

    return cupy_gpu.make_backend(real=True)


def _load_cuda_emu() -> Backend:
    from gpumlp.kernels import cupy_gpu

    return cupy_gpu.make_backend(real=False)


_REGISTRY: dict[str, Callable[[], Backend]] = {
    "numpy": _load_numpy,
    "numba": _load_numba,
    "cupy": _load_cupy,
    "cuda-emu": _load_cuda_emu,
}
_CACHE: dict[str, Backend] = {}


def available_names() -> tuple[str, ...]:
    """All registered backend names (whether or not they can run here)."""
    return tuple(_REGISTRY)


def get_backend(name: str | Backend | None = None) -> Backend:
    """Return a backend by name: ``auto`` (default; also ``$GPUMLP_BACKEND``),
    ``numpy``, ``numba``, ``cupy`` or ``cuda-emu``.

    ``auto`` tries cupy -> numba -> numpy and logs the one it picked; an
    explicitly named backend that cannot run raises :class:`BackendUnavailable`."""
    if isinstance(name, Backend):
        return name
    name = (name or os.environ.get("GPUMLP_BACKEND") or "auto").lower()
    if name == "auto":
        reasons = []
        for candidate in AUTO_ORDER:
            try:
                be = get_backend(candidate)
            except BackendUnavailable as e:
                reasons.append(f"{candidate}: {e}")
                continue
            log.info("auto backend: using %s%s", be.name, "".join(f" (skipped {r})" for r in reasons))
            return be
        raise AssertionError("numpy backend always loads")  # pragma: no cover
    if name not in _REGISTRY:
        raise BackendUnavailable(f"unknown backend {name!r}; choose one of auto, {', '.join(_REGISTRY)}")
    if name not in _CACHE:
        _CACHE[name] = _REGISTRY[name]()
    return _CACHE[name]


def backend_report() -> dict[str, str]:
    """name -> 'available: ...' or 'unavailable: <reason>' for every backend."""
    report = {}
    for n in _REGISTRY:
        try:
            report[n] = "available: " + get_backend(n).description
        except BackendUnavailable as e:
            report[n] = f"unavailable: {e}"
    return report


def resolve_dtype(dtype: str | type | np.dtype) -> np.dtype:
    """'float32' | 'float64' | numpy dtype -> np.dtype; anything else is an error."""
    dt = np.dtype(DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype)
    if dt not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dt}")
    return dt
