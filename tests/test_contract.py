"""Every backend's kernel module exports exactly the reference's public API, same signatures."""

from __future__ import annotations

import inspect

import pytest

from gpumlp import backend
from gpumlp.kernels import reference


def _public_api(mod) -> dict[str, object]:
    """Public callables defined in ``mod`` (a module, or every public member of a kernels object
    such as cupy_gpu.CudaKernels) plus its public UPPER_CASE constants."""
    api = {}
    is_module = inspect.ismodule(mod)
    members = vars(mod) if is_module else {name: getattr(mod, name) for name in dir(mod)}
    for name, obj in members.items():
        if name.startswith("_") or inspect.ismodule(obj):
            continue
        if callable(obj) and (not is_module or getattr(obj, "__module__", None) == mod.__name__):
            api[name] = obj
        elif name.isupper() and not callable(obj):
            api[name] = obj
    return api


def _params(fn) -> list[tuple[str, object, object]]:
    """(name, kind, default) per parameter; annotations deliberately ignored."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


REF_API = _public_api(reference)
# constants whose value is the backend's own (the rest must be equal)
CAPABILITIES = {"SGD_IN_GEMM", "CHAIN_MAX_WEIGHT_BYTES"}


def _load(name: str) -> backend.Backend:
    try:
        return backend.get_backend(name)
    except backend.BackendUnavailable as e:
        pytest.skip(f"backend {name!r} unavailable: {e}")


def test_reference_api_is_nonempty():
    assert {"matmul", "softmax_xent", "adam_step", "ACTIVATIONS"} <= set(REF_API)


@pytest.mark.parametrize("name", backend.available_names())
def test_backend_exports_reference_api(name):
    api = _public_api(_load(name).k)
    missing, extra = set(REF_API) - set(api), set(api) - set(REF_API)
    assert not missing and not extra, f"{name}: missing {sorted(missing)}, extra {sorted(extra)}"
    for key, ref in REF_API.items():
        if callable(ref):
            assert _params(api[key]) == _params(ref), (
                f"{name}.{key}{inspect.signature(api[key])} != reference{inspect.signature(ref)}"
            )
        elif key in CAPABILITIES:  # what a backend can do: same name and type, its own value
            assert type(api[key]) is type(ref), f"{name}.{key} = {api[key]!r}, reference has {ref!r}"
        else:
            assert api[key] == ref, f"{name}.{key} = {api[key]!r}, reference has {ref!r}"


@pytest.mark.parametrize("name", backend.available_names())
def test_defaults_have_reference_types(name):
    # 1e-5 vs 1 or False vs 0 compare equal; a changed default type is still a contract change.
    k = _load(name).k
    for key, ref in REF_API.items():
        if callable(ref):
            got = [type(d) for _, _, d in _params(getattr(k, key))]
            assert got == [type(d) for _, _, d in _params(ref)], f"{name}.{key}"


def test_unknown_backend_lists_valid_names():
    with pytest.raises(backend.BackendUnavailable) as info:
        backend.get_backend("no-such-backend")
    msg = str(info.value)
    assert "no-such-backend" in msg
    for valid in backend.available_names():
        assert valid in msg


def test_auto_returns_loadable_backend(monkeypatch):
    monkeypatch.delenv("GPUMLP_BACKEND", raising=False)
    be = backend.get_backend("auto")
    assert be.name in backend.available_names()
    assert backend.get_backend(be.name) is be
    assert callable(be.k.matmul)
