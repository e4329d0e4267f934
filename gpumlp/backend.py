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
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
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
    device's), ``k`` the kernels with the reference contract (a module, or the
    CUDA backends' own :class:`~gpumlp.kernels.cupy_gpu.CudaKernels`). Devices
    with CUDA graphs also give ``stream()`` (a new non-blocking stream, a context
    manager making it current; ``wait_for_uploads`` orders it after the default
    stream's work) and ``capture(fn)``: record the launches of ``fn()`` on the
    current stream into a graph, without running them, and return ``replay()``,
    which launches the graph on the stream current when it is called.
    numba's ``capture`` records the step's kernel calls and replays them as one compiled
    function (``gpumlp.kernels.numba_graph``), split over two cores where there are two
    (``gpumlp.kernels.numba_pair``); ``replays_steps``: the training step uses ``capture`` for
    its full-size steps without being asked (numba: on one core its replay matches the per-kernel
    step bit for bit, on two to rounding; ``GPUMLP_STEP_GRAPHS=0`` turns it off, ``=1`` keeps it
    on one core); ``capture_first``: a capture runs nothing and needs nothing run before it
    (numba), so a graph's first step is its first replay, like every later one (a resumed fit
    replays the steps an uninterrupted one replays); else the step runs once for real before its
    capture (CUDA: everything it needs is then compiled and allocated). ``steps()`` is the context
    of an epoch's steps (numba: their replays may take a second core, released on exit).
    ``set_precision`` (CUDA backends) switches the float32 GEMM compute type;
    ``warmup(dtype) -> seconds`` (JIT backends) compiles every kernel ahead of use."""

    name: str
    xp: Any
    k: Any
    description: str = ""
    synchronize: Callable[[], None] = field(default=lambda: None)
    stream: Callable[[], contextlib.AbstractContextManager] = field(default=contextlib.nullcontext)
    capture: Callable[[Callable[[], None]], Callable[[], None]] | None = None
    replays_steps: bool = False
    capture_first: bool = False
    steps: Callable[[], contextlib.AbstractContextManager] = field(default=contextlib.nullcontext)
    set_precision: Callable[[str], None] | None = None
    warmup: Callable[[Any], float] | None = None

    def set_matmul_precision(self, precision: str) -> None:
        """``float32`` (exact, the default), ``tf32`` or ``bf16``: what float32 GEMMs may round
        their inputs to on tensor cores. For this whole backend; only CUDA backends have the
        choice (cuda-emu reproduces the rounding on the CPU)."""
        if self.set_precision is not None:
            self.set_precision(precision)
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
    from gpumlp.kernels import numba_cpu, numba_graph, numba_pair

    graphs = os.environ.get("GPUMLP_STEP_GRAPHS", "2").strip()
    if graphs not in ("0", "1", "2"):
        raise ValueError(
            "GPUMLP_STEP_GRAPHS must be 0 (steps kernel by kernel), 1 (step graphs on one core) or 2 "
            f"(step graphs on two cores where there are two, the default), got {graphs!r}"
        )
    return Backend(
        "numba",
        np,
        numba_cpu,
        "Numba-jitted fused CPU kernels, BLAS matmul",
        capture=numba_graph.capture,
        warmup=numba_cpu._warmup,  # the one place that binds numba's JIT warm-up
        replays_steps=graphs != "0",
        capture_first=True,
        steps=numba_pair.session,
    )


def _cupy_device() -> tuple[Any, str]:
    """(CuPy, a description of its first GPU), or BackendUnavailable saying what is missing."""
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
    dev = cupy.cuda.Device()
    props = cupy.cuda.runtime.getDeviceProperties(dev.id)
    gpu = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    about = (
        f"CuPy {cupy.__version__} on {gpu} (sm_{dev.compute_capability}): cuBLAS matmul + CUDA C++ kernels"
    )
    return cupy, about


def _emulated_device() -> tuple[Any, str]:
    from gpumlp.kernels import cuda_emu

    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise BackendUnavailable(
            f"backend 'cuda-emu' compiles the CUDA kernels for the CPU and needs a C++20 compiler "
            f"with OpenMP ({cxx!r} not found; set $CXX or install g++)"
        )
    return cuda_emu, "emulated CUDA device on the CPU: for correctness, not speed"


def make_cuda_backend(name: str, *, gemm: str | None = None, validate_labels: bool | None = None) -> Backend:
    """A new ``cupy`` or ``cuda-emu`` backend with its own kernels and state (not the cached one
    :func:`get_backend` returns). ``gemm``: "cublas" (default; ``$GPUMLP_GEMM``) or "own" (our
    gemm.cu for every matmul; graph captures use it anyway). ``validate_labels``: range-check loss
    labels with a small device->host read per call (default: on for cuda-emu only)."""
    from gpumlp.kernels import cupy_gpu

    devices = {"cupy": _cupy_device, "cuda-emu": _emulated_device}
    if name not in devices:
        raise ValueError(f"make_cuda_backend: name must be 'cupy' or 'cuda-emu', got {name!r}")
    xp, about = devices[name]()
    k = cupy_gpu.CudaKernels(
        xp,
        gemm=gemm or os.environ.get("GPUMLP_GEMM", "cublas"),
        validate_labels=name == "cuda-emu" if validate_labels is None else validate_labels,
    )
    return Backend(
        name,
        xp,
        k,
        about,
        synchronize=lambda: xp.cuda.Device().synchronize(),
        stream=lambda: xp.cuda.Stream(non_blocking=True),  # graphs cannot capture the legacy stream
        capture=lambda step: cupy_gpu.capture(k, step),
        set_precision=lambda precision: cupy_gpu.set_matmul_precision(k, precision),
    )


_REGISTRY: dict[str, Callable[[], Backend]] = {
    "numpy": _load_numpy,
    "numba": _load_numba,
    "cupy": lambda: make_cuda_backend("cupy"),
    "cuda-emu": lambda: make_cuda_backend("cuda-emu"),
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
    """name -> 'available: ...' or 'unavailable: <reason on one line>' for every backend; any
    failure to load counts as unavailable (e.g. CuPy installed without its CUDA libraries)."""
    report = {}
    for n in _REGISTRY:
        try:
            report[n] = "available: " + get_backend(n).description
        except Exception as e:
            report[n] = "unavailable: " + (" ".join(str(e).split()) or type(e).__name__)
    return report


def resolve_dtype(dtype: str | type | np.dtype) -> np.dtype:
    """'float32' | 'float64' | numpy dtype -> np.dtype; anything else is an error."""
    dt = np.dtype(DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype)
    if dt not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dt}")
    return dt
