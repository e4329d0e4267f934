"""Fixtures shared by the test modules."""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from gpumlp import backend


def loadable_backends() -> list[str]:
    """Names of the backends that load here (numpy always; numba, cuda-emu, cupy when they can)."""
    names = []
    for name in backend.available_names():
        try:
            backend.get_backend(name)
        except backend.BackendUnavailable:
            continue
        names.append(name)
    return names


@pytest.fixture(scope="module", params=backend.available_names())
def be(request) -> backend.Backend:
    """Each registered backend in turn; those that cannot load here skip with the reason."""
    try:
        return backend.get_backend(request.param)
    except backend.BackendUnavailable as e:
        pytest.skip(f"backend {request.param!r} unavailable: {e}")


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass


@contextlib.contextmanager
def loopback_server(root: str | os.PathLike) -> Iterator[str]:
    """Serve the files below ``root`` over HTTP on 127.0.0.1 (a free port) while the block runs;
    yields the base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


# ------------------------------------------------- kernel comparisons (parity and augmentation tests)
# Elementwise kernels: float32 backends may compute in float64 and round once while the
# reference rounds every float32 op (a few ulp apart, 1e-5 is ~80 ulp); float64 results differ
# only by operation order.
TOL = {np.float32: (1e-5, 1e-6), np.float64: (1e-12, 1e-12)}


def assert_close(expected, got, rtol: float, atol: float, what: str = "") -> None:
    """|got - expected| <= atol + rtol*|expected| everywhere (NaN == NaN), same shape and dtype;
    on failure report the max abs difference and the first mismatching index."""
    e, g = np.asarray(expected), np.asarray(got)
    assert g.shape == e.shape, f"{what}: shape {g.shape} != expected {e.shape}"
    assert g.dtype == e.dtype, f"{what}: dtype {g.dtype} != expected {e.dtype}"
    e64, g64 = e.astype(np.float64), g.astype(np.float64)
    bad = ~np.isclose(g64, e64, rtol=rtol, atol=atol, equal_nan=True)
    if bad.any():
        diff = np.abs(g64 - e64)
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{bad.size} mismatches (rtol={rtol}, atol={atol}); "
            f"max abs diff {np.nanmax(diff):.3g}; first at {first}: got {g64[first]!r}, "
            f"expected {e64[first]!r}"
        )


def random_data(shape, dtype, seed=0, scale=1.0) -> np.ndarray:
    """Standard normal samples of ``shape`` times ``scale`` as ``dtype``, seeded."""
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(dtype)


def device_step(be, t: int):
    """A step number as the training loop passes it: a 1-element int64 device array."""
    return be.asarray(np.array([t], dtype=np.int64))
