"""Fixtures shared by the test modules."""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

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
