"""What machine a benchmark ran on, and its measured peaks (GEMM GFLOP/s, copy GB/s).

Peaks are measured in the same process and run as the benchmarks they normalise,
so "% of peak" compares like with like (same threads, same BLAS, same load).
"""

from __future__ import annotations

import importlib
import os
import platform
import time
from collections.abc import Callable

import numpy as np

from gpumlp.bench.flops import matmul_flops

# Environment variables that change BLAS / threading behaviour: recorded, never changed.
ENV_VARS = (
    "OPENBLAS_CORETYPE",
    "OPENBLAS_L2_SIZE",
    "OPENBLAS_NUM_THREADS",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "NUMBA_NUM_THREADS",
    "NUMBA_THREADING_LAYER",
    "GPUMLP_BACKEND",
)
# (m, k, n) GEMM shapes that occur in the default configs' epochs.
GEMM_SHAPES = ((256, 1024, 1024), (256, 784, 1024), (128, 784, 256), (100, 784, 100))


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [f for f in ("avx", "avx2", "fma", "avx512f", "amx_tile") if f in have]
    except OSError:
        pass
    return []


def blas_info() -> dict:
    """NumPy's BLAS as built (numpy config) and as loaded (threadpoolctl, when installed)."""
    info: dict = {}
    try:
        cfg = np.show_config(mode="dicts")
        blas = cfg.get("Build Dependencies", {}).get("blas", {})
        info = {k: str(blas[k]) for k in ("name", "version", "openblas configuration") if k in blas}
    except Exception as e:  # numpy < 1.26 has no mode="dicts"
        info["error"] = str(e)
    try:
        from threadpoolctl import threadpool_info

        info["threadpools"] = [
            {
                k: str(v)
                for k, v in p.items()
                if k in ("internal_api", "version", "num_threads", "architecture")
            }
            for p in threadpool_info()
        ]
    except ImportError:
        pass
    return info


def _version(mod: str) -> str | None:
    try:
        return str(importlib.import_module(mod).__version__)
    except Exception:
        return None


def gpu_info() -> str | None:
    """Name of the first CUDA GPU (via CuPy, else torch), or None when there is none."""
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            props = cupy.cuda.runtime.getDeviceProperties(0)
            return props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    except Exception:
        pass
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:
        pass
    return None


def machine_info() -> dict:
    """JSON-able description of this machine and the software stack."""
    import gpumlp

    return {
        "cpu_model": cpu_model(),
        "cpu_flags": _cpu_flags(),
        "cores": os.cpu_count(),
        "affinity_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {
            "gpumlp": gpumlp.__version__,
            **{m: _version(m) for m in ("numpy", "numba", "torch", "cupy", "tqdm", "matplotlib")},
        },
        "blas": blas_info(),
        "env": {k: os.environ.get(k) for k in ENV_VARS},
        "gpu": gpu_info(),
        "loadavg": {"start": os.getloadavg()[0]} if hasattr(os, "getloadavg") else {},
    }


def best_time(
    fn: Callable[[], object], repeats: int, inner: int = 1, sync: Callable[[], None] = lambda: None
):
    """Best wall seconds of one call of ``fn`` over ``repeats`` timings of ``inner`` calls each."""
    fn()
    sync()  # warm-up: page faults, thread pools, JIT, caches
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        sync()
        best = min(best, (time.perf_counter() - t0) / inner)
    return best


def measure_gemm(dtype: np.dtype, quick: bool = False) -> list[dict]:
    """numpy.matmul GFLOP/s at each GEMM_SHAPES shape, best of several runs."""
    rng = np.random.default_rng(0)
    rows = []
    for m, k, n in GEMM_SHAPES[:2] if quick else GEMM_SHAPES:
        a = rng.standard_normal((m, k)).astype(dtype)
        b = rng.standard_normal((k, n)).astype(dtype)
        c = np.empty((m, n), dtype=dtype)
        t = best_time(lambda a=a, b=b, c=c: np.matmul(a, b, out=c), repeats=5 if quick else 15, inner=3)
        rows.append({"shape": [m, k, n], "seconds": t, "gflops": matmul_flops(m, k, n) / t / 1e9})
    return rows


def measure_copy_bandwidth(quick: bool = False, nbytes: int | None = None) -> dict:
    """GB/s of np.copyto (bytes read + bytes written), best of several runs; by default a
    large copy (memory bound), with ``nbytes`` e.g. 1 MiB a cache-resident one."""
    nbytes = nbytes or (64 if quick else 256) << 20
    src = np.ones(nbytes // 4, dtype=np.float32)
    dst = np.empty_like(src)
    inner = max(1, (16 << 20) // nbytes)
    t = best_time(lambda: np.copyto(dst, src), repeats=3 if quick else 7, inner=inner)
    return {"bytes": nbytes, "seconds": t, "gbs": 2 * nbytes / t / 1e9}


def measure_peaks(dtype: np.dtype, quick: bool = False) -> dict:
    """Measured GEMM peak (max over shapes) and memory bandwidth, for '% of peak' columns."""
    gemm = measure_gemm(dtype, quick)
    copy = measure_copy_bandwidth(quick)
    cached = measure_copy_bandwidth(quick, nbytes=1 << 20)  # ~ the working set of one MLP-shape kernel
    return {
        "dtype": np.dtype(dtype).name,
        "gemm": gemm,
        "gemm_gflops": max(r["gflops"] for r in gemm),
        "copy": copy,
        "copy_gbs": copy["gbs"],
        "copy_cached": cached,
        "copy_cached_gbs": cached["gbs"],
    }


def merge_peaks(first: dict, again: dict) -> dict:
    """Peaks measured at the start and at the end of a run -> the best of both (a busy
    machine depresses one of them), keeping both measurements for the record."""
    out = dict(first)
    keys = [k for k in ("gemm_gflops", "copy_gbs", "copy_cached_gbs") if k in first and k in again]
    for k in keys:
        out[k] = max(first[k], again[k])
    out["at_start"] = {k: first[k] for k in keys}
    out["at_end"] = {k: again[k] for k in keys}
    return out
