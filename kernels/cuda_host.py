"""Build CUDA C++ sources for the CPU and launch their kernels through ctypes.

The ``.cu`` files are compiled *unchanged* by g++ with ``cuda/host_emulation.h``
force-included (it implements the CUDA thread model: fibers, or an OpenMP team). For every
kernel :func:`parse_kernels` finds in the source (``extern "C" __global__`` functions and the
float32/float64 pairs of cuda/device_common.h's ``GPUMLP_F32_F64``), a generated launcher
``cuda_emu_launch_<name>(gx, gy, gz, bx, by, bz, info, args...)`` runs the grid
(``info``: the schedule in, a sanitizer's finding out; see ``LaunchInfo`` in the header).
Libraries are cached under ``$GPUMLP_CACHE/cuda_emu`` (default
``~/.cache/gpumlp/cuda_emu``), keyed by a hash of everything that goes into
the build, and published with an atomic rename so concurrent builds are safe.

Threads of a block run as fibers by default (deterministic, fast, deadlocks
reported); ``GPUMLP_CUDA_EMU_THREADS=openmp`` runs them as an OpenMP team of
OS threads instead, to hunt races (much slower).

``GPUMLP_EMU_SANITIZE=memcheck,racecheck,initcheck`` (any subset) turns on the kernel
sanitizers for modules built afterwards; a finding raises :class:`SanitizerError`.
memcheck and initcheck use a second build whose every load and store is checked by the
header; racecheck runs each launch in three schedules and compares the outputs.

Kernel arguments are checked against the parsed C signature *exactly*, because
a real CuPy launch silently corrupts on a mismatch: ``float`` wants
``numpy.float32``, ``int`` wants ``numpy.int32``, ``double`` a Python float or
``numpy.float64``, ``long long`` a Python int or ``numpy.int64``; a pointer
wants a C-contiguous device array of the pointee's dtype.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

CUDA_DIR = Path(__file__).resolve().parent / "cuda"
EMULATION_HEADER = CUDA_DIR / "host_emulation.h"
# -fno-gnu-unique: each library keeps its own copy of the emulation's state and of the kernels'
# __shared__ variables (the dynamic linker would otherwise merge them across libraries).
CXXFLAGS = ("-std=c++20", "-fopenmp", "-O2", "-shared", "-fPIC", "-Wall", "-fno-gnu-unique")
# What `empty` leaves in every element under initcheck, by element size: a signalling NaN for
# floats (arithmetic never produces one, so a computed value never matches) and an unlikely
# integer; bools get 0xA5, which is neither False nor True. The checked build gets them as
# -DCUDA_EMU_POISON<bytes>, so they are written only here. Every byte is a valid uint8 (0xA5 is
# pixel 165, and MNIST holds 15,288 of them), so a 1-byte buffer is checked only while no byte of it
# has been written (:func:`_pattern_marks`): a read from it is then a read of uninitialised memory.
POISON = {1: 0xA5, 2: 0x7DA5, 4: 0x7FA5A5A5, 8: 0x7FF5A5A5A5A5A5A5}
# The checked flavour (memcheck, initcheck): g++ calls the header's __asan_* hooks before every
# load and store, outside the stack and globals; no vector or merged accesses, whose alignment
# is the compiler's, not the kernel's.
CHECKED_FLAGS = (
    "-DCUDA_EMU_MEMCHECK",
    "-fsanitize=kernel-address",
    "--param=asan-instrumentation-with-call-threshold=0",
    "--param=asan-stack=0",
    "--param=asan-globals=0",
    "-fno-tree-vectorize",
    "-fno-store-merging",
    *(f"-DCUDA_EMU_POISON{size}={value:#x}ull" for size, value in POISON.items()),
)
SANITIZERS = ("memcheck", "racecheck", "initcheck")

# A plain kernel, or a float32/float64 pair from device_common.h's GPUMLP_F32_F64(name, (params), (args))
# or GPUMLP_F32_F64_SUFFIX(name, suffix, (params), (args)).
_KERNEL_RE = re.compile(
    r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(([^)]*)\)'
    r"|\bGPUMLP_F32_F64(?:_SUFFIX)?\s*\(\s*(\w+)\s*,\s*(?:(\w+)\s*,\s*)?\(([^)]*)\)",
    re.S,
)
_FLOAT_TYPES = {"f32": "float", "f64": "double"}  # GPUMLP_F32_F64's kernels: name suffix -> T
_COMMENT_RE = re.compile(r"//[^\n]*|/\*.*?\*/", re.S)

# C base type -> (ctypes scalar type, NumPy dtype, accepted Python/NumPy scalar types)
_SCALARS: dict[str, tuple[Any, np.dtype, tuple[type, ...]]] = {
    "float": (ctypes.c_float, np.dtype(np.float32), (np.float32,)),
    "double": (ctypes.c_double, np.dtype(np.float64), (float, np.float64)),
    "int": (ctypes.c_int, np.dtype(np.int32), (np.int32,)),
    "unsigned char": (ctypes.c_ubyte, np.dtype(np.uint8), (np.uint8,)),
    "unsigned int": (ctypes.c_uint, np.dtype(np.uint32), (np.uint32,)),
    "long long": (ctypes.c_longlong, np.dtype(np.int64), (int, np.int64)),
    "unsigned long long": (ctypes.c_ulonglong, np.dtype(np.uint64), (np.uint64,)),
    "bool": (ctypes.c_bool, np.dtype(np.bool_), (bool, np.bool_)),
}
_SCALARS["unsigned"] = _SCALARS["unsigned int"]
_SCALARS["long long int"] = _SCALARS["long long"]


@dataclass(frozen=True)
class Param:
    """One kernel parameter: C base type, pointer or not, name; ``const``: a pointer to const
    (the kernel only reads through it)."""

    name: str
    base: str
    pointer: bool
    const: bool = False

    @property
    def dtype(self) -> np.dtype:
        """NumPy dtype of the scalar or of the pointee."""
        return _SCALARS[self.base][1]

    def describe(self) -> str:
        """The parameter as C spells it, e.g. ``float* out``."""
        return f"{self.base}{'*' if self.pointer else ''} {self.name}"


def _parse_param(kernel: str, text: str) -> Param:
    toks = text.replace("*", " * ").split()
    name = toks[-1]
    pointer = toks.count("*")
    base = " ".join(t for t in toks[:-1] if t not in ("const", "*", "__restrict__", "volatile"))
    if pointer > 1 or base not in _SCALARS:
        raise ValueError(f"kernel {kernel}: cannot emulate parameter {text.strip()!r}")
    const = bool(pointer) and "const" in toks[: toks.index("*")]
    return Param(name, base, bool(pointer), const)


def parse_kernels(code: str) -> dict[str, tuple[Param, ...]]:
    """Kernel name -> parameters, for every ``extern "C" __global__`` function in ``code``, in
    source order; ``GPUMLP_F32_F64(name, (params), (args))`` gives name_f32 and name_f64 with
    T = float and T = double in params, as the macro in cuda/device_common.h does
    (``GPUMLP_F32_F64_SUFFIX(name, suffix, ...)``: name_f32<suffix> and name_f64<suffix>)."""
    code = _COMMENT_RE.sub("", code)
    out = {}
    for name, params, pair, tail, typed in _KERNEL_RE.findall(code):
        if name:
            out[name] = _parse_params(name, params)
        for suffix, ctype in _FLOAT_TYPES.items() if pair else ():
            kernel = f"{pair}_{suffix}{tail}"
            out[kernel] = _parse_params(kernel, re.sub(r"\bT\b", ctype, typed))
    return out


def _parse_params(kernel: str, params: str) -> tuple[Param, ...]:
    items = [p for p in params.split(",") if p.strip() and p.strip() != "void"]
    return tuple(_parse_param(kernel, p) for p in items)


def sanitizers() -> frozenset[str]:
    """The sanitizers ``$GPUMLP_EMU_SANITIZE`` turns on (comma-separated names from :data:`SANITIZERS`)."""
    return _parse_sanitizers(os.environ.get("GPUMLP_EMU_SANITIZE", ""))


@functools.lru_cache(maxsize=8)  # asked on every `empty`: parse each setting once
def _parse_sanitizers(text: str) -> frozenset[str]:
    names = frozenset(n.strip().lower() for n in text.split(",") if n.strip())
    if not names <= set(SANITIZERS):
        raise ValueError(
            f"GPUMLP_EMU_SANITIZE={text!r}: unknown {sorted(names - set(SANITIZERS))}; "
            f"use a comma-separated subset of {', '.join(SANITIZERS)}"
        )
    return names


def _pattern_marks(a: np.ndarray) -> bool:
    """Does :data:`POISON` tell the uninitialised elements of buffer ``a`` from data? Yes for
    elements of 2 bytes and more; for 1-byte elements only while every byte still holds it
    (as ``empty`` left it), since a written byte may hold it as data. Else the buffer's loads are
    not checked for it (the checked build compares an element against the pattern only when its
    region's element size, 0 here, is the load's size)."""
    return a.itemsize > 1 or not a.size or bool((a.view(np.uint8) == POISON[1]).all())


def poison(a: np.ndarray) -> np.ndarray:
    """Fill a fresh device buffer (any shape) as uninitialised memory: floats with NaN; under
    initcheck every element of 1, 2, 4 or 8 bytes with :data:`POISON`, which the checked build
    reports when a kernel loads it. Returns ``a``."""
    if "initcheck" in sanitizers() and a.dtype.kind in "biuf" and a.itemsize in POISON:
        a.view(f"u{a.itemsize}").fill(POISON[a.itemsize])
    elif a.dtype.kind in "fc":
        a.fill(np.nan)
    return a


def cache_dir() -> Path:
    """Where built libraries live: ``$GPUMLP_CACHE/cuda_emu`` or ``~/.cache/gpumlp/cuda_emu``."""
    root = os.environ.get("GPUMLP_CACHE") or Path.home() / ".cache" / "gpumlp"
    return Path(root) / "cuda_emu"


def _launcher_source(kernels: dict[str, tuple[Param, ...]]) -> str:
    lines = ["// generated by gpumlp.kernels.cuda_host: one launcher per kernel", '#include "kernel.cu"', ""]
    for name, params in kernels.items():
        decl = ", ".join(
            ["unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz"]
            + ["cuda_emu::LaunchInfo* info"]
            + [p.describe() for p in params]
        )
        call = ", ".join(p.name for p in params)
        # The closure copies the arguments: memcheck allows accesses to it, not to this frame.
        lines += [
            f'extern "C" int cuda_emu_launch_{name}({decl}) {{',
            "    return cuda_emu::launch(dim3(gx, gy, gz), dim3(bx, by, bz), info,",
            f"                            [=] {{ {name}({call}); }});",
            "}",
        ]
    return "\n".join(lines) + "\n"


def _flags(sanitize: frozenset[str]) -> tuple[str, ...]:
    mode = os.environ.get("GPUMLP_CUDA_EMU_THREADS", "fibers").lower()
    if mode not in ("fibers", "openmp"):
        raise ValueError(f"GPUMLP_CUDA_EMU_THREADS must be 'fibers' or 'openmp', got {mode!r}")
    if mode == "openmp" and sanitize:
        raise ValueError(
            f"GPUMLP_EMU_SANITIZE={','.join(sorted(sanitize))} runs a block's threads as fibers, in chosen "
            "orders: unset GPUMLP_CUDA_EMU_THREADS=openmp (or GPUMLP_EMU_SANITIZE)"
        )
    if mode == "openmp":
        return CXXFLAGS + ("-DCUDA_EMU_OPENMP",)
    return CXXFLAGS + (CHECKED_FLAGS if sanitize & {"memcheck", "initcheck"} else ())


def build(code: str, sanitize: frozenset[str] | None = None) -> Path:
    """Compile ``code`` (CUDA C++) for the host emulation; return the cached ``.so`` path.

    ``sanitize`` (default: :func:`sanitizers`) with memcheck or initcheck builds the
    checked flavour, where every memory access of the kernels goes through the header's hooks."""
    cxx = os.environ.get("CXX", "g++")
    flags = _flags(sanitizers() if sanitize is None else sanitize)
    launchers = _launcher_source(parse_kernels(code))
    key = hashlib.sha256(
        "\0".join([code, launchers, EMULATION_HEADER.read_text(), cxx, *flags]).encode()
    ).hexdigest()[:24]
    target = cache_dir() / f"{key}.so"
    if target.exists():
        return target
    if shutil.which(cxx) is None:
        raise RuntimeError(f"the emulated CUDA device needs a C++20 compiler with OpenMP; {cxx!r} not found")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="build-", dir=target.parent) as tmp:
        Path(tmp, "kernel.cu").write_text(code)
        Path(tmp, "launchers.cpp").write_text(launchers)
        out = Path(tmp, "lib.so")
        cmd = [
            cxx,
            *flags,
            "-include",
            str(EMULATION_HEADER),
            f"-I{CUDA_DIR}",
            "launchers.cpp",
            "-o",
            str(out),
        ]
        proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"host-emulation build failed ({' '.join(cmd)}):\n{proc.stderr[-4000:]}")
        os.replace(out, target)  # atomic: concurrent builders publish identical files
    return target


_LAUNCH_ERRORS = {
    1: "bad launch configuration (block must have 1..1024 threads, grid dims >= 1)",
    2: "OpenMP did not provide a full team for the block (check OMP_THREAD_LIMIT, or a launch "
    "from inside another OpenMP parallel region)",
    3: "deadlock: threads wait at barriers that can never complete (a __syncthreads or warp "
    "shuffle not reached by every thread of the block/warp)",
}
_FAULT = 4  # a sanitizer fault or __trap() ended the launch; the LaunchInfo says which
_TRAPPED = 4  # cuda_emu::Fault::trapped


class SanitizerError(RuntimeError):
    """A kernel sanitizer (``GPUMLP_EMU_SANITIZE``) found a bug; the message names the kernel,
    the thread and block, and the argument involved."""


class _Region(ctypes.Structure):
    _fields_ = [
        ("start", ctypes.c_uint64),
        ("bytes", ctypes.c_uint64),
        ("elem", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    ]


class _LaunchInfo(ctypes.Structure):  # cuda_emu::LaunchInfo in host_emulation.h
    _fields_ = [
        ("seed", ctypes.c_uint64),
        ("regions", ctypes.POINTER(_Region)),
        ("nregions", ctypes.c_uint32),
        ("checks", ctypes.c_uint32),
        ("shared", ctypes.POINTER(_Region)),
        ("nshared", ctypes.c_uint32),
        ("shared_fill", ctypes.c_int32),
        ("fault", ctypes.c_uint32),
        ("size", ctypes.c_uint32),
        ("is_write", ctypes.c_uint32),
        ("float_atomics", ctypes.c_uint32),
        ("addr", ctypes.c_uint64),
        ("thread", ctypes.c_uint32 * 3),
        ("block", ctypes.c_uint32 * 3),
    ]


# racecheck: the schedules compared with the in-order run (seed 0, shared memory filled with 0xFF):
# (name, seed or None for a seeded random order, byte that fills each block's shared memory);
# and the tolerance for outputs that float atomics wrote (their sums depend on the order):
# |a - b| <= rtol * max|a|.
_IN_ORDER_FILL = 0xFF
_SCHEDULES = (("reversed", 1, 0x00), ("random", None, 0x5A))
_RANDOM_SEED = 0x5EED0000
_ATOMIC_RTOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}


def _dims(kernel: str, what: str, v: Any) -> tuple[int, int, int]:
    t = (v,) if isinstance(v, (int, np.integer)) else tuple(v)
    if not 1 <= len(t) <= 3 or not all(isinstance(x, (int, np.integer)) and x >= 1 for x in t):
        raise ValueError(f"kernel {kernel}: {what} must be 1 to 3 positive ints, got {v!r}")
    return (*(int(x) for x in t), 1, 1)[:3]  # type: ignore[return-value]


def _type_name(t: type) -> str:
    return f"{'Python' if t.__module__ == 'builtins' else t.__module__}.{t.__name__}"


def _describe(p: Param, a: np.ndarray) -> str:
    return f"parameter `{p.describe()}` ({a.dtype}{list(a.shape)}, {a.nbytes} bytes)"


def _locate(addr: int, pointers: list[tuple[Param, np.ndarray]]) -> str:
    """Where ``addr`` lies relative to the nearest pointer argument."""
    best = None
    for p, a in pointers:
        lo, hi = a.ctypes.data, a.ctypes.data + a.nbytes
        if lo <= addr < hi:
            off = addr - lo
            return f"byte {off} (element {off // a.itemsize}) of {_describe(p, a)}"
        if addr >= hi:
            d, text = addr - hi + 1, f"{addr - hi} bytes after the end"
        else:
            d, text = lo - addr, f"{lo - addr} bytes before the start"
        if best is None or d < best[0]:
            best = (d, f"{text} of {_describe(p, a)}")
    return best[1] if best else "outside every argument (the kernel has no pointer parameters)"


class HostKernel:
    """One emulated kernel: ``kernel(grid, block, args)`` checks the args and runs the grid."""

    def __init__(
        self,
        name: str,
        params: tuple[Param, ...],
        fn: Any,
        buffer_of: Any,
        sanitize: frozenset[str] = frozenset(),
        shared: list[tuple[int, int]] = (),  # type: ignore[assignment]
    ) -> None:
        self.name, self.params, self._fn, self._buffer_of = name, params, fn, buffer_of
        self.sanitize = sanitize
        self._shared = (_Region * max(1, len(shared)))(*[_Region(a, n, 1, 0) for a, n in shared])
        self._nshared = len(shared)
        self._launches = 0
        fn.restype = ctypes.c_int
        fn.argtypes = (
            [ctypes.c_uint] * 6
            + [ctypes.POINTER(_LaunchInfo)]
            + [ctypes.c_void_p if p.pointer else _SCALARS[p.base][0] for p in params]
        )

    def convert(self, args: tuple) -> list:
        """Check every argument against the C signature; return the ctypes values."""
        if len(args) != len(self.params):
            raise TypeError(f"kernel {self.name} takes {len(self.params)} arguments, got {len(args)}")
        return [self._convert(p, a) for p, a in zip(self.params, args)]

    def _convert(self, p: Param, a: Any) -> Any:
        where = f"kernel {self.name}, parameter {p.describe()}"
        if p.pointer:
            buf = self._buffer_of(a)
            if buf is None:
                raise TypeError(f"{where}: expected a device array, got {type(a).__name__}")
            if buf.dtype != p.dtype:
                raise TypeError(f"{where}: expected a {p.dtype} array, got {buf.dtype}")
            if not buf.flags.c_contiguous:
                raise ValueError(f"{where}: the array is not C-contiguous")
            return buf.ctypes.data
        accepted = _SCALARS[p.base][2]
        if type(a) not in accepted:
            want = " or ".join(
                t.__module__.replace("builtins", "Python") + "." + t.__name__ for t in accepted
            )
            raise TypeError(
                f"{where}: expected {want}, got {_type_name(type(a))} {a!r} "
                "(a real CuPy launch would pass the wrong bytes)"
            )
        return a.item() if isinstance(a, np.generic) else a

    def __call__(self, grid: Any, block: Any, args: tuple, shared_mem: int = 0) -> None:
        """Run the kernel on the CPU now (launches are synchronous here); under racecheck, in
        several schedules whose outputs must agree."""
        if shared_mem:
            raise NotImplementedError(f"kernel {self.name}: dynamic shared memory is not emulated")
        g, b = _dims(self.name, "grid", grid), _dims(self.name, "block", block)
        args = tuple(args)
        values = self.convert(args)
        if not self.sanitize:
            self._run(g, b, values, [], seed=0)
            return
        pointers = [(p, self._buffer_of(a)) for p, a in zip(self.params, args) if p.pointer]
        self._launches += 1
        if "racecheck" in self.sanitize:
            self._race_checked(g, b, values, pointers)
        else:
            self._run(g, b, values, pointers, seed=0)

    def _run(
        self, g: tuple, b: tuple, values: list, pointers: list, seed: int, fill: int = -1
    ) -> _LaunchInfo:
        """One launch in the schedule ``seed`` (0 in order, 1 reversed, else seeded random), each
        block's shared memory starting as bytes ``fill`` (unless < 0)."""
        regions = (_Region * max(1, len(pointers)))(
            *[_Region(a.ctypes.data, a.nbytes, a.itemsize * _pattern_marks(a), 0) for _, a in pointers]
        )
        checks = ("memcheck" in self.sanitize) | ("initcheck" in self.sanitize) << 1
        info = _LaunchInfo(seed=seed, regions=regions, nregions=len(pointers), checks=checks)
        info.shared, info.nshared, info.shared_fill = self._shared, self._nshared, fill
        rc = self._fn(*g, *b, ctypes.byref(info), *values)
        if rc == _FAULT and info.fault == _TRAPPED:
            raise RuntimeError(
                f"kernel {self.name} grid={g} block={b}: thread {tuple(info.thread)} of block "
                f"{tuple(info.block)} called __trap() (a device-side check failed; a GPU aborts the launch)"
            )
        if rc == _FAULT:
            raise SanitizerError(self._fault_message(info, g, b, pointers))
        if rc:
            raise RuntimeError(f"kernel {self.name} grid={g} block={b}: {_LAUNCH_ERRORS.get(rc, rc)}")
        return info

    def _fault_message(self, info: _LaunchInfo, g: tuple, b: tuple, pointers: list) -> str:
        who = (
            f"kernel {self.name} grid={g} block={b}, thread {tuple(info.thread)} of block {tuple(info.block)}"
        )
        access = f"{'write' if info.is_write else 'read'} of {info.size} bytes"
        where = _locate(info.addr, pointers)
        if info.fault == 3:
            return (
                f"initcheck: {who}: {access} of uninitialised memory, {where}: it still holds the pattern "
                f"0x{POISON[info.size]:x} that `empty` left (nothing wrote it before this read)"
            )
        what = "misaligned" if info.fault == 2 else "out-of-bounds"
        return f"memcheck: {who}: {what} {access}, {where}"

    def _race_checked(self, g: tuple, b: tuple, values: list, pointers: list) -> None:
        """Run the other schedules from the same inputs, then the in-order one (whose results
        stay); raise SanitizerError if an output differs."""
        arrays = [a for _, a in pointers]
        before = [a.copy() for a in arrays]
        others = []
        for label, seed, fill in _SCHEDULES:
            seed = _RANDOM_SEED + self._launches if seed is None else seed
            info = self._run(g, b, values, pointers, seed, fill)
            others.append((f"{label} (seed {seed})", [a.copy() for a in arrays], info.float_atomics))
            for a, saved in zip(arrays, before):
                a[...] = saved
        info = self._run(g, b, values, pointers, seed=0, fill=_IN_ORDER_FILL)
        for label, outs, atomics in others:
            for (p, a), other in zip(pointers, outs):
                bad = _differ(a, other, bool(atomics or info.float_atomics))
                if bad.any():
                    i = int(np.flatnonzero(bad)[0])
                    first = f"{a.reshape(-1)[i].item()!r} vs {other.reshape(-1)[i].item()!r}"
                    raise SanitizerError(
                        f"racecheck: kernel {self.name} grid={g} block={b}: parameter `{p.describe()}` "
                        f"differs between the in-order and the {label} schedule of blocks and threads "
                        f"at {int(bad.sum())} of {bad.size} elements (first at flat index {i}: {first}): "
                        "threads race on shared or global memory (a missing __syncthreads()?)"
                    )


def _differ(a: np.ndarray, b: np.ndarray, float_atomics: bool) -> np.ndarray:
    """Flat mask of elements that differ: bit for bit, NaN equal to NaN; where float atomics ran,
    beyond ``_ATOMIC_RTOL * max|a|``."""
    a, b = a.reshape(-1), b.reshape(-1)
    if a.dtype.kind != "f":
        return a != b
    if float_atomics:
        scale = float(np.nanmax(np.abs(a))) if a.size and not np.isnan(a).all() else 0.0
        return ~np.isclose(a, b, rtol=0.0, atol=_ATOMIC_RTOL.get(a.dtype, 1e-3) * scale, equal_nan=True)
    return (a != b) & ~(np.isnan(a) & np.isnan(b))


def _shared_variables(path: Path, lib: ctypes.CDLL, probe: str) -> list[tuple[int, int]]:
    """(address, bytes) of the kernels' ``__shared__`` variables in the loaded ``lib``: the
    function-local statics (``_ZZ`` symbols) of the symbol table, outside the emulation and std."""
    try:
        out = subprocess.run(["nm", "-S", "--defined-only", str(path)], capture_output=True, text=True)
    except FileNotFoundError:
        raise RuntimeError("GPUMLP_EMU_SANITIZE=racecheck needs binutils' `nm` (it comes with g++)") from None
    symbols = {}
    for line in out.stdout.splitlines():
        parts = line.split()
        if len(parts) == 4:
            symbols[parts[3]] = (int(parts[0], 16), int(parts[1], 16), parts[2])
    base = ctypes.cast(getattr(lib, probe), ctypes.c_void_p).value - symbols[probe][0]
    own = ("_ZZN8cuda_emu", "_ZZNSt", "_ZZNKSt", "_ZZN9__gnu_cxx")
    return [
        (base + value, size)
        for name, (value, size, kind) in symbols.items()
        if kind in "bBVu" and name.startswith("_ZZ") and not name.startswith(own)
    ]


class HostModule:
    """A built library and its kernels, looked up by name."""

    def __init__(self, code: str, buffer_of: Any) -> None:
        self.kernels = parse_kernels(code)
        self.sanitize = sanitizers()
        self.path = build(code, self.sanitize)
        self._lib = ctypes.CDLL(str(self.path))
        self._buffer_of = buffer_of
        self._cache: dict[str, HostKernel] = {}
        self._shared = []
        if "racecheck" in self.sanitize and self.kernels:
            self._shared = _shared_variables(
                self.path, self._lib, f"cuda_emu_launch_{next(iter(self.kernels))}"
            )

    def get_function(self, name: str) -> HostKernel:
        """The kernel called ``name``; KeyError-like AttributeError when the source has none."""
        if name not in self._cache:
            if name not in self.kernels:
                raise AttributeError(f'no extern "C" __global__ kernel {name!r} in this module')
            fn = getattr(self._lib, f"cuda_emu_launch_{name}")
            self._cache[name] = HostKernel(
                name, self.kernels[name], fn, self._buffer_of, self.sanitize, self._shared
            )
        return self._cache[name]
