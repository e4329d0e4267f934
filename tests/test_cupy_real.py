"""Real CuPy, no GPU needed: NVRTC compiles exactly what ``cupy.RawModule`` gets, the cupy
backend fails cleanly where no CUDA driver/GPU is usable, and the emulated device offers
only CuPy API that really exists.

Skips without CuPy (``pip install cupy-cuda13x``); the compile check also needs the NVRTC
library and CUDA headers as pip wheels or a CUDA toolkit (.ci/run installs all three).
"""

from __future__ import annotations

import ast
import logging
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import gpumlp
from gpumlp import backend
from gpumlp.backend import BackendUnavailable, get_backend
from gpumlp.kernels import cuda_emu, cupy_gpu
from gpumlp.kernels.cuda_host import parse_kernels

cupy = pytest.importorskip("cupy", reason="real CuPy not installed (pip install cupy-cuda13x)")

ARCHS = ("80", "90")  # A100, H100
STEMS = sorted(set(cupy_gpu._FILES.values()))
NO_GPU = "CuPy is installed but no CUDA driver/GPU is usable"


# ------------------------------------------------------- NVRTC compile check
@pytest.fixture(scope="module")
def nvrtc() -> types.ModuleType:
    """CuPy's NVRTC binding, once the NVRTC library loads."""
    mod = pytest.importorskip("cupy_backends.cuda.libs.nvrtc", reason="CuPy without its NVRTC binding")
    try:
        mod.getVersion()
    except RuntimeError as e:  # cuda.pathfinder's DynamicLibNotFoundError
        pytest.skip(f"NVRTC library not found (pip install nvidia-cuda-nvrtc): {e}")
    return mod


def _rawmodule_kwargs(stem: str, monkeypatch: pytest.MonkeyPatch) -> dict:
    """The keyword arguments cupy_gpu gives ``cupy.RawModule`` for ``<stem>.cu`` (recorded, not compiled)."""
    recorder = types.SimpleNamespace(RawModule=lambda **kwargs: kwargs)
    return cupy_gpu.CudaKernels(recorder)._module(stem)


def _nvrtc_options(options: tuple[str, ...], cc: str) -> tuple[str, ...]:
    """NVRTC options of ``RawModule(code=..., options=options)`` on an sm_<cc> GPU, as CuPy 14 adds them:
    ``assemble_cupy_compiler_options`` in cupy/_core/core.pyx (--std unless given, -I for CCCL, CuPy
    and CUDA headers), then cupy/cuda/compiler.py: -ftz=true, -arch=sm_<cc> (a cubin; compute_<cc>
    only with CUPY_COMPILE_WITH_PTX=1) and --device-as-default-execution-space (no jitify)."""
    from cupy._core import core

    try:
        assembled = core.assemble_cupy_compiler_options(tuple(options))
    except RuntimeError as e:  # RawModule fails the same way on a GPU
        pytest.skip(f"CuPy finds no CUDA headers (pip install nvidia-cuda-runtime): {e}")
    return (*assembled, "-ftz=true", f"-arch=sm_{cc}", "--device-as-default-execution-space")


def _compile(nvrtc: types.ModuleType, code: str, name: str, options: tuple[str, ...]) -> tuple[str, str]:
    """NVRTC-compile ``code`` -> (PTX, log); a compile error fails the test with NVRTC's log."""
    prog = nvrtc.createProgram(code, name, (), ())
    try:
        try:
            nvrtc.compileProgram(prog, options)
        except nvrtc.NVRTCError:
            pytest.fail(f"NVRTC cannot compile {name} ({' '.join(options)}):\n{nvrtc.getProgramLog(prog)}")
        return nvrtc.getPTX(prog).decode().rstrip("\0"), nvrtc.getProgramLog(prog)
    finally:
        nvrtc.destroyProgram(prog)


def _fixed_suffixes() -> dict[str, str]:
    """Kernels cupy_gpu launches with a literal suffix, e.g. ``_kernel("hash_uniform", "f64")``;
    every other kernel is picked by the array's dtype, so it needs an f32 and an f64 version."""
    calls = (n for n in ast.walk(ast.parse(Path(cupy_gpu.__file__).read_text())) if isinstance(n, ast.Call))
    return {
        c.args[0].value: c.args[1].value
        for c in calls
        if (getattr(c.func, "id", None) or getattr(c.func, "attr", None)) == "_kernel"
        and len(c.args) == 2
        and all(isinstance(a, ast.Constant) for a in c.args)
    }


@pytest.mark.parametrize("cc", ARCHS)
@pytest.mark.parametrize("stem", STEMS)
def test_rawmodule_source_compiles_with_nvrtc(nvrtc, stem: str, cc: str, monkeypatch):
    """Each module compiles as RawModule compiles it, warning-free, with the kernels _FILES routes to it."""
    kwargs = _rawmodule_kwargs(stem, monkeypatch)
    assert set(kwargs) == {"code", "options"}, f"RawModule now gets {sorted(kwargs)}: update _nvrtc_options"
    ptx, log = _compile(nvrtc, kwargs["code"], f"{stem}.cu", _nvrtc_options(kwargs["options"], cc))
    assert not log.strip(), f"NVRTC warnings for {stem}.cu on sm_{cc}:\n{log}"

    declared = set(parse_kernels(kwargs["code"]))  # plain kernels and GPUMLP_F32_F64 pairs
    assert set(re.findall(r"\.entry\s+(\w+)", ptx)) == declared
    bases = [base for base, s in cupy_gpu._FILES.items() if s == stem]
    fixed = _fixed_suffixes()
    for base in bases:
        for sfx in [fixed[base]] if base in fixed else ["f32", "f64"]:
            assert any(k == f"{base}_{sfx}" or k.startswith(f"{base}_{sfx}_") for k in declared), (
                f"{stem}.cu has no kernel {base}_{sfx}*"
            )
    suffixes = {b: re.escape(fixed[b]) if b in fixed else "f32|f64" for b in bases}
    routed = [rf"{b}_({suffixes[b]})(_\w+)?" for b in bases]
    unrouted = {k for k in declared if not any(re.fullmatch(pattern, k) for pattern in routed)}
    assert not unrouted, f"kernels in {stem}.cu that cupy_gpu._FILES does not map to it: {sorted(unrouted)}"


# ------------------------------------------------------- no usable GPU
@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Skip where CuPy sees a GPU; otherwise start from an empty backend cache."""
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError:
        count = 0
    if count:
        pytest.skip(f"{count} GPU(s) usable here: these tests check the fallbacks without one")
    monkeypatch.setattr(backend, "_CACHE", {})


def _gpumlp(*args: str) -> subprocess.CompletedProcess:
    """``python -m gpumlp ARGS`` in a fresh interpreter, $GPUMLP_BACKEND unset."""
    env = {k: v for k, v in os.environ.items() if k != "GPUMLP_BACKEND"}
    cmd = [sys.executable, "-m", "gpumlp", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)


def test_cupy_backend_unavailable(no_gpu):
    with pytest.raises(BackendUnavailable, match=NO_GPU):
        get_backend("cupy")


def test_auto_skips_cupy_and_says_why(no_gpu, caplog):
    with caplog.at_level(logging.INFO, logger="gpumlp"):
        assert get_backend("auto").name == "numba"
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("auto backend:")]
    assert line.startswith("auto backend: using numba") and f"skipped cupy: backend 'cupy': {NO_GPU}" in line


def test_cli_info_shows_cupy_unavailable(no_gpu):
    proc = _gpumlp("info")
    assert proc.returncode == 0, proc.stderr
    lines = [line.strip() for line in proc.stdout.splitlines()]
    assert f"cupy: {cupy.__version__}" in lines and "auto picks: numba" in lines
    for start in (f"cupy: unavailable: backend 'cupy': {NO_GPU} (", "GPU: none usable ("):
        assert any(line.startswith(start) for line in lines), proc.stdout


def test_cli_train_on_cupy_exits_2(no_gpu):
    proc = _gpumlp("train", "--backend", "cupy", "--limit", "500", "--spec", "784-16-10", "--no-progress")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"gpumlp: error: backend 'cupy': {NO_GPU} ("), proc.stderr


# ------------------------------------------------------- emulator vs real CuPy
# Emulator names real CuPy lacks on purpose: the emulator's own diagnostics, with no CuPy counterpart.
EMULATOR_ONLY = {
    "cupy.CaptureError",  # device work during graph capture; tests catch it as cuda_emu.CaptureError
    "cupy.StreamRaceError",  # two unordered accesses on different streams (the emulator's race checker)
}


def _defined_names(path: Path) -> list[str]:
    """Public top-level names a module file defines (def, class, assignment), not its imports."""
    names: list[str] = []
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.append(node.name)
        elif isinstance(node, ast.Assign):
            names += [t.id for t in node.targets if isinstance(t, ast.Name)]
    return [n for n in names if not n.startswith("_")]


def _emulated_api() -> set[str]:
    """CuPy paths of everything cuda_emu offers by name: its functions and classes, the ``cuda``
    namespaces, the classes' public members and the ndarray methods it forwards to NumPy."""
    paths: set[str] = set()

    def add(path: str, obj: object) -> None:
        paths.add(path)
        if isinstance(obj, types.SimpleNamespace):  # cuda, cuda.runtime, ...
            for name, value in vars(obj).items():
                add(f"{path}.{name}", value)
        elif isinstance(obj, type):  # methods, properties and class attributes
            paths.update(f"{path}.{name}" for name in vars(obj) if not name.startswith("_"))

    for name in _defined_names(Path(cuda_emu.__file__)):
        add(f"cupy.{name}", getattr(cuda_emu, name))
    probe = cuda_emu.ndarray((1,))
    paths |= {f"cupy.ndarray.{n}" for n in dir(np.ndarray) if not n.startswith("_") and hasattr(probe, n)}
    return paths


def _array_module_uses() -> set[str]:
    """CuPy paths the framework reaches through its array module: ``cp.X``, ``cupy.X`` and ``xp.X`` /
    ``<obj>.xp.X`` / ``self._xp.X`` in cupy_gpu.py and gpumlp/ (``xp`` is CuPy on the cupy backend)."""
    roots = {"_xp", "cp", "_cp", "cupy", "xp"}
    files = [Path(cupy_gpu.__file__), *Path(gpumlp.__file__).parent.rglob("*.py")]
    nodes = (n for f in files for n in ast.walk(ast.parse(f.read_text())) if isinstance(n, ast.Attribute))
    uses: set[str] = set()
    for node in nodes:
        parts = [node.attr]
        root = node.value
        while isinstance(root, ast.Attribute) and root.attr not in ("xp", "_xp"):
            parts.append(root.attr)
            root = root.value
        if isinstance(root, ast.Call):
            root = root.func
        if getattr(root, "id", None) in roots or getattr(root, "attr", None) in ("xp", "_xp"):
            uses.add(".".join(["cupy", *reversed(parts)]))
    return uses


def _in_cupy(path: str) -> bool:
    obj = cupy
    for part in path.split(".")[1:]:
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


def test_emulator_offers_only_real_cupy_api():
    api = _emulated_api()
    assert {"cupy.cuda.Stream.begin_capture", "cupy.cuda.graph.Graph.launch", "cupy.ndarray.get"} <= api
    assert {"cupy.cuda.runtime.getDeviceProperties", "cupy.RawModule.get_function"} <= api
    assert EMULATOR_ONLY <= api, "EMULATOR_ONLY names an entry the emulator no longer has"
    missing = {p for p in api - EMULATOR_ONLY if not _in_cupy(p)}
    top = sorted(p for p in missing if p.rpartition(".")[0] not in missing)  # not cupy.Stream's members too
    assert not top, f"cuda_emu offers names real CuPy {cupy.__version__} lacks: {top}"


def test_framework_uses_only_real_cupy_api():
    uses = _array_module_uses()
    assert {"cupy.RawModule", "cupy.cuda.get_current_stream", "cupy.cuda.runtime.getDeviceCount"} <= uses
    missing = sorted(p for p in uses if not _in_cupy(p))
    assert not missing, f"gpumlp uses names real CuPy {cupy.__version__} lacks: {missing}"
