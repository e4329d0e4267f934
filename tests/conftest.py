"""Fixtures shared by the test modules."""

from __future__ import annotations

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
