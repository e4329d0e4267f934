"""What one training step asks of a GPU: launches, GEMMs, glue ops, bytes, transfers and syncs.

Runs the real training step (``gpumlp.step.TrainStep.epoch``) on the ``cuda-emu``
backend, i.e. the same ``kernels/cupy_gpu.py`` code that runs on a GPU, with the
emulated CuPy module instrumented for the duration of the measurement only (its
attributes are monkeypatched here and restored afterwards; no file is changed):

* ``RawKernel.__call__``: our CUDA kernel launches, by kernel name, and the bytes of
  their array arguments (each array counted once: an upper bound on DRAM traffic for
  arrays only read or only written; in-place arrays such as optimizer weights and
  moments are read *and* written, so up to 2x for those). ``gather_rows``/``gather_shifted`` get the
  whole training set as ``src`` but reads only the gathered rows, so its ``src`` is
  counted as the size of its output.
* ``matmul`` (module function and ``@``): cuBLAS GEMM calls, bytes of A, B and C, and
  2*M*N*K FLOPs.
* ndarray operators / ``__array_ufunc__`` / ``__array_function__`` / array methods /
  ``__setitem__`` / advanced indexing and the module's fall-through functions: other
  device operations CuPy would launch as its own elementwise/reduction kernels (views
  such as basic slicing, ``.T`` or ``reshape`` are not counted); ``zeros``/``ones``/
  ``full``/``*_like`` count as one memset/fill each.
* ``.get()``, ``.set()``, ``asarray(host)``, ``item()``, ``float()``... and
  ``Device/Stream/Event.synchronize``: host<->device transfers and host syncs.

Per-step numbers come from differencing whole epochs run by ``TrainStep.epoch`` itself:
for epochs of 1 step (E1), 2 steps (E2) and 1+N steps (EN), each after its own warm-up
epoch (kernel builds, workspace allocation, graph capture), are counted; per step = (EN - E1) / N
(checked to equal E2 - E1 exactly), per-epoch overhead = E1 - per step. As on the real
``cupy`` backend, the emulator's per-loss label range check (a device->host read) is
switched off (``make_cuda_backend("cuda-emu", validate_labels=False)``); ``--emu-label-check``
keeps it on.

Each config is profiled twice: eager steps (the default) and CUDA-graph steps
(``cuda_graphs=True``: ``Graph.launch`` is counted as one launch, and the kernels it
replays are counted separately as graph nodes). Besides the benchmark configs,
``full`` is deep1024 with Adam, dropout 0.2, batch norm, clipping and 2-pixel shift
augmentation: everything a step can contain.

Usage: ``python bench/gpu_step_profile.py [--steps 5] [--configs seed,adam256,deep1024,full]
[--out bench/results/gpu_step.md]``
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gpumlp.augment import Augment
from gpumlp.backend import make_cuda_backend
from gpumlp.bench.runner import CONFIGS, EPOCH_SAMPLES, Config
from gpumlp.model import MLP
from gpumlp.optim import Optimizer
from gpumlp.step import TrainState, TrainStep

# Assumptions of the napkin estimate (an H100 SXM without CUDA graphs).
LAUNCH_S = 3e-6  # per device operation: kernel launch / cuBLAS call overhead, host-bound, no CUDA graphs
HBM_BPS = 3.35e12  # H100 SXM HBM3 bandwidth, B/s
FP32_FLOPS = 50e12  # achievable FP32 (non-tensor-core) GEMM rate; peak ~67 TFLOP/s

_VIEW_METHODS = frozenset("reshape ravel transpose view squeeze swapaxes diagonal".split())
_FILL_FUNCS = frozenset("zeros ones full zeros_like ones_like full_like".split())
_ALLOC_FUNCS = frozenset("empty empty_like".split())
GRAPH_NODE_S = 1e-6  # per kernel node inside a replayed graph (device-side launch latency), assumed

# Profile-only configs: (benchmark config, extra MLP arguments, clip_norm, augment_shift).
_FULL = Config("784-1024-1024-10", "relu", "softmax_xent", "adam", 1e-3, 256, about="deep1024 + everything")
PROFILES = {name: (cfg, {}, None, 0) for name, cfg in CONFIGS.items()}
PROFILES["full"] = (_FULL, {"dropout": 0.2, "batchnorm": True}, 1.0, 2)


# ------------------------------------------------------------------ tallies
@dataclass
class Tally:
    """Counts, bytes and FLOPs per (category, name)."""

    n: Counter = field(default_factory=Counter)
    nbytes: Counter = field(default_factory=Counter)
    flops: Counter = field(default_factory=Counter)

    def add(self, cat: str, name: str, nbytes: int = 0, flops: int = 0) -> None:
        self.n[(cat, name)] += 1
        self.nbytes[(cat, name)] += int(nbytes)
        self.flops[(cat, name)] += int(flops)

    def __sub__(self, other: Tally) -> Tally:
        out = Tally()
        for mine, theirs, res in ((self.n, other.n, out.n), (self.nbytes, other.nbytes, out.nbytes)):
            for key in set(mine) | set(theirs):
                res[key] = mine[key] - theirs[key]
        for key in set(self.flops) | set(other.flops):
            out.flops[key] = self.flops[key] - other.flops[key]
        return out

    def scaled(self, k: int) -> Tally:
        """Divide every entry by k (exactly: raises if not divisible)."""
        out = Tally()
        for src, dst in ((self.n, out.n), (self.nbytes, out.nbytes), (self.flops, out.flops)):
            for key, v in src.items():
                q, r = divmod(v, k)
                if r:
                    raise AssertionError(f"{key}: {v} over {k} steps is not a whole number per step")
                dst[key] = q
        return out

    def same(self, other: Tally) -> bool:
        def strip(c: Counter) -> dict:
            return {key: v for key, v in c.items() if v}

        return all(strip(a) == strip(b) for a, b in zip(self._parts(), other._parts()))

    def _parts(self) -> tuple[Counter, Counter, Counter]:
        return self.n, self.nbytes, self.flops

    def count(self, cat: str) -> int:
        return sum(v for (c, _), v in self.n.items() if c == cat)

    def bytes_of(self, cat: str) -> int:
        return sum(v for (c, _), v in self.nbytes.items() if c == cat)

    def flops_of(self, cat: str) -> int:
        return sum(v for (c, _), v in self.flops.items() if c == cat)

    def names(self, cat: str) -> dict[str, int]:
        return {name: v for (c, name), v in sorted(self.n.items()) if c == cat and v}


# ---------------------------------------------------------- instrumentation
def _emu_nbytes(a: Any, emu: Any) -> int:
    return a.nbytes if isinstance(a, emu.ndarray) else 0


def _is_advanced(key: Any, emu: Any) -> bool:
    keys = key if isinstance(key, tuple) else (key,)
    return any(isinstance(k, (emu.ndarray, np.ndarray, list)) for k in keys)


class _Patcher:
    """Monkeypatches that :meth:`restore` undoes, and wrappers that record only the outermost
    emulated call (so the internals of one counted operation are not counted again)."""

    def __init__(self) -> None:
        self.saved: list[tuple[Any, str, Any]] = []
        self.depth = 0

    def patch(self, obj: Any, name: str, make: Any) -> None:
        """Replace ``obj.name`` by ``make(original)``."""
        orig = obj.__dict__[name] if isinstance(obj, type) else getattr(obj, name)
        self.saved.append((obj, name, orig))
        setattr(obj, name, make(orig))

    def counted(self, record: Any) -> Any:
        """A ``make`` for :meth:`patch`: wrap ``orig`` so that ``record(args, kwargs, result)``
        runs for outermost calls."""

        def make(orig: Any) -> Any:
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                self.depth += 1
                try:
                    res = orig(*args, **kwargs)
                finally:
                    self.depth -= 1
                if self.depth == 0:
                    record(args, kwargs, res)
                return res

            wrapper.__name__ = getattr(orig, "__name__", "wrapper")
            return wrapper

        return make

    def restore(self) -> None:
        """Undo every patch, last first."""
        for obj, name, orig in reversed(self.saved):
            setattr(obj, name, orig)
        self.saved.clear()


def _op_bytes(args: Any, res: Any, emu: Any) -> int:
    return sum(_emu_nbytes(a, emu) for a in [*args, res])


def _count_kernels(p: _Patcher, emu: Any, tally: Tally) -> None:
    """Our CUDA kernels (RawKernel launches) and CUDA graphs: one launch from the host, its
    kernels counted as graph nodes."""

    def rec_kernel(args: Any, kwargs: Any, res: Any) -> None:
        kernel, kargs = args[0], tuple(args[3])
        arrays = [a for a in kargs if isinstance(a, emu.ndarray)]
        nbytes = sum(a.nbytes for a in arrays)
        if kernel.name.startswith("gather_"):  # src is the whole training set (or labels); B rows are read
            nbytes += arrays[2].nbytes - arrays[0].nbytes
        tally.add("kernel", kernel.name, nbytes)

    p.patch(emu.RawKernel, "__call__", p.counted(rec_kernel))

    def rec_graph(args: Any, kwargs: Any, res: Any) -> None:
        tally.add("graph", "Graph.launch")
        for kernel, *_ in args[0]._launches:
            tally.add("node", kernel.name)

    p.patch(emu.cuda.graph.Graph, "launch", p.counted(rec_graph))


def _count_gemms(p: _Patcher, emu: Any, tally: Tally) -> None:
    """cuBLAS: ``matmul`` and ``@``, with the bytes of A, B, C and 2*M*N*K FLOPs."""

    def gemm(a: Any, b: Any, res: Any) -> None:
        m, k = a.shape[-2:]
        n = b.shape[-1]
        ta = "ᵀ" if not a.flags.c_contiguous else ""  # a transposed view: cuBLAS op flag, no copy
        tb = "ᵀ" if not b.flags.c_contiguous else ""
        tally.add("gemm", f"{m}x{k}{ta}@{k}x{n}{tb}", a.nbytes + b.nbytes + res.nbytes, 2 * m * n * k)

    p.patch(emu, "matmul", p.counted(lambda args, kw, res: gemm(args[0], args[1], res)))
    for name in ("__matmul__", "__imatmul__"):
        p.patch(emu.ndarray, name, p.counted(lambda args, kw, res: gemm(args[0], args[1], res)))
    p.patch(emu.ndarray, "__rmatmul__", p.counted(lambda args, kw, res: gemm(args[1], args[0], res)))


def _count_array_ops(p: _Patcher, emu: Any, tally: Tally) -> None:
    """Other device ops on arrays: operators, ufuncs, array functions, advanced indexing, setitem."""
    arith = "add sub mul truediv floordiv mod pow and or xor".split()
    names = [f"__{pre}{n}__" for n in arith for pre in ("", "r", "i")]
    names += [f"__{n}__" for n in "lt le gt ge eq ne neg pos abs invert".split()]
    for name in names:
        rec = p.counted(lambda args, kw, res, name=name: tally.add("op", name, _op_bytes(args, res, emu)))
        p.patch(emu.ndarray, name, rec)
    p.patch(
        emu.ndarray,
        "__array_ufunc__",
        p.counted(
            lambda args, kw, res: tally.add("op", f"ufunc.{args[1].__name__}", _op_bytes(args[3:], res, emu))
        ),
    )
    p.patch(
        emu.ndarray,
        "__array_function__",
        p.counted(
            lambda args, kw, res: tally.add("op", f"func.{args[1].__name__}", _op_bytes(args[3], res, emu))
        ),
    )

    def rec_getitem(args: Any, kw: Any, res: Any) -> None:
        if _is_advanced(args[1], emu):
            tally.add("op", "take (advanced indexing)", _op_bytes((), res, emu) * 2)

    p.patch(emu.ndarray, "__getitem__", p.counted(rec_getitem))
    p.patch(
        emu.ndarray,
        "__setitem__",
        p.counted(lambda args, kw, res: tally.add("op", "setitem", _op_bytes(args, res, emu))),
    )


def _count_methods(p: _Patcher, emu: Any, tally: Tally) -> None:
    """Array methods (``.fill``, ``.sum`` ...; views such as ``.reshape`` are free) and the
    module's fall-through functions (``xp.zeros``, ``xp.sqrt`` ...)."""

    def make_getattr(orig: Any) -> Any:
        def getattr_(self: Any, name: str) -> Any:
            fn = orig(self, name)

            def rec(args: Any, kw: Any, res: Any) -> None:
                shares = isinstance(res, emu.ndarray) and np.may_share_memory(res._a, self._a)
                if name == "fill":
                    tally.add("fill", f".{name}", self.nbytes)
                elif not (name in _VIEW_METHODS and shares):
                    tally.add("op", f".{name}", self.nbytes + _emu_nbytes(res, emu))

            return p.counted(rec)(fn)

        return getattr_

    p.patch(emu.ndarray, "__getattr__", make_getattr)

    def make_modgetattr(orig: Any) -> Any:
        def getattr_(name: str) -> Any:
            obj = orig(name)
            if not callable(obj) or isinstance(obj, type):
                return obj

            def rec(args: Any, kw: Any, res: Any) -> None:
                if name in _FILL_FUNCS:
                    tally.add("fill", f"xp.{name}", _emu_nbytes(res, emu))
                    tally.add("alloc", f"xp.{name}")
                else:
                    flat = [a for a in args if not isinstance(a, (list, tuple))]
                    flat += [a for a in args if isinstance(a, (list, tuple)) for a in a]
                    tally.add("op", f"xp.{name}", _op_bytes(flat, res, emu))

            return p.counted(rec)(obj)

        return getattr_

    p.patch(emu, "__getattr__", make_modgetattr)
    for name in _ALLOC_FUNCS:
        p.patch(emu, name, p.counted(lambda args, kw, res, name=name: tally.add("alloc", f"xp.{name}")))


def _count_transfers(p: _Patcher, emu: Any, tally: Tally) -> None:
    """Host <-> device copies (creation from host data, ``.set``, ``.get``, scalar reads) and
    explicit host synchronisation."""

    def rec_creation(name: str) -> Any:
        def rec(args: Any, kw: Any, res: Any) -> None:
            src = args[0] if args else kw.get("a", kw.get("obj"))
            if not isinstance(src, emu.ndarray):
                tally.add("h2d", f"xp.{name}", res.nbytes)
                tally.add("alloc", f"xp.{name}")
            elif res is not src:
                tally.add("op", f"xp.{name} (device copy)", src.nbytes + res.nbytes)
                tally.add("alloc", f"xp.{name}")

        return rec

    for name in ("asarray", "array", "ascontiguousarray"):
        p.patch(emu, name, p.counted(rec_creation(name)))
    p.patch(emu.ndarray, "set", p.counted(lambda args, kw, res: tally.add("h2d", ".set", args[0].nbytes)))
    for name in ("get", "item", "tolist", "__float__", "__int__", "__bool__", "__index__"):
        rec = p.counted(lambda args, kw, res, name=name: tally.add("d2h", name, args[0].nbytes))
        p.patch(emu.ndarray, name, rec)
    p.patch(
        emu,
        "asnumpy",
        p.counted(lambda args, kw, res: tally.add("d2h", "xp.asnumpy", np.asarray(res).nbytes)),
    )
    for cls in (emu.cuda.Device, emu.cuda.Stream, emu.cuda.Event):
        rec = p.counted(lambda args, kw, res, c=cls: tally.add("sync", f"{c.__name__}.synchronize"))
        p.patch(cls, "synchronize", rec)
    p.patch(
        emu.cuda.runtime,
        "deviceSynchronize",
        p.counted(lambda args, kw, res: tally.add("sync", "runtime.deviceSynchronize")),
    )


@contextlib.contextmanager
def instrument(emu: Any, tally: Tally) -> Iterator[None]:
    """Count device work done through the emulated CuPy module ``emu`` into ``tally``; every
    patch is undone on exit."""
    patcher = _Patcher()
    try:
        for count in (_count_kernels, _count_gemms, _count_array_ops, _count_methods, _count_transfers):
            count(patcher, emu, tally)
        yield
    finally:
        patcher.restore()


# --------------------------------------------------------------- measuring
@dataclass
class Profile:
    name: str
    cfg: Config
    steps: int
    per_step: Tally
    per_epoch: Tally
    linear: bool
    h2d_per_sample: float  # per-epoch uploads per sample (none: the epoch's order is made on the device)
    graphs: bool = False
    extras: str = ""


def profile_config(name: str, steps: int, label_check: bool, graphs: bool = False, seed: int = 0) -> Profile:
    """Per-step and per-epoch tallies of ``TrainStep.epoch`` on cuda-emu for one config
    of PROFILES, with eager or CUDA-graph steps."""
    cfg, extra, clip, shift = PROFILES[name]
    be = make_cuda_backend("cuda-emu", validate_labels=label_check)
    emu = be.xp
    model = MLP(cfg.spec, act=cfg.act, loss=cfg.loss, dtype="float32", backend=be, seed=seed, **extra)
    B, n = cfg.batch_size, (steps + 1) * cfg.batch_size
    rng = np.random.default_rng(seed)
    X = rng.random((n, model.n_features), dtype=np.float32)
    y = rng.integers(0, model.n_classes, size=n).astype(np.int32)
    Xd, yd = be.asarray(X, dtype=model.dtype), be.asarray(y)
    # as gpumlp.train.fit builds them (no validation, no checkpoint), one per epoch length k * B
    opt = Optimizer(cfg.optimizer, lr=cfg.lr)
    opt_state = [opt.init_state(be, w) for _, w, _, _ in model.param_groups()]
    st = TrainState(epoch=0, step=0, seed=seed)
    epochs = {}
    for k in (1, 2, steps + 1):
        epochs[k] = TrainStep(model, opt, opt_state, B, k * B, cfg.reduction, clip)
        epochs[k].configure(True, Augment(shift=shift), graphs)
        epochs[k].epoch(
            Xd, yd, cfg.lr, st
        )  # warm-up: kernel builds, workspaces (graph: eager step + capture)

    def epoch(k: int, tally: Tally) -> None:
        with instrument(emu, tally):
            epochs[k].epoch(Xd, yd, cfg.lr, st)
        st.epoch += 1

    e1, e2, en = Tally(), Tally(), Tally()
    epoch(1, e1)
    epoch(2, e2)
    epoch(steps + 1, en)
    per_step = (en - e1).scaled(steps)
    per_sample = en.bytes_of("h2d") / ((steps + 1) * B)
    extras = ", ".join(
        [
            *(f"{k}={v}" for k, v in extra.items()),
            *([f"clip={clip}"] if clip else []),
            *([f"shift={shift}"] if shift else []),
        ]
    )
    return Profile(
        name, cfg, steps, per_step, e1 - per_step, per_step.same(e2 - e1), per_sample, graphs, extras
    )


# --------------------------------------------------------------- reporting
def _mb(b: float) -> str:
    return f"{b / 1e6:.3f}" if b < 1e7 else f"{b / 1e6:.1f}"


def _us(s: float) -> str:
    return f"{s * 1e6:.1f}"


def _label(p: Profile) -> str:
    c = p.cfg
    extras = f" {p.extras}" if p.extras else ""
    return f"{p.name} {c.spec} {c.act} {c.loss} {c.optimizer} b{c.batch_size}{extras}"


def _device_ops(t: Tally) -> int:
    return t.count("kernel") + t.count("gemm") + t.count("op") + t.count("fill")


def _names(t: Tally, *cats: str) -> str:
    parts = [f"{k} ×{v}" for c in cats for k, v in t.names(c).items()]
    return ", ".join(parts) or "–"


def _step_table(profiles: list[Profile]) -> list[str]:
    """Per eager step: launches by kind, bytes, FLOPs, transfers, allocations."""
    lines = [
        "### Per training step on a GPU, counted on cuda-emu (`TrainStep.epoch`, same `cupy_gpu.py` code)",
        "",
        "| config | our kernels | cuBLAS GEMMs | other device ops | = device ops | kernel MB | GEMM MB "
        "| GEMM MFLOP | H2D / D2H / syncs | allocs |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in profiles:
        t = p.per_step
        other = t.count("op") + t.count("fill")
        lines.append(
            f"| {_label(p)} | {t.count('kernel')} | {t.count('gemm')} | {other} | {_device_ops(t)} "
            f"| {_mb(t.bytes_of('kernel'))} | {_mb(t.bytes_of('gemm'))} | {t.flops_of('gemm') / 1e6:.1f} "
            f"| {t.count('h2d')} / {t.count('d2h')} / {t.count('sync')} | {t.count('alloc')} |"
        )
    return lines


def _launch_table(profiles: list[Profile]) -> list[str]:
    """What the launches of one eager step are, by name."""
    lines = [
        "",
        "### What the launches are (per step)",
        "",
        "| config | our kernels (RawKernel) | GEMMs (M×K @ K×N, ᵀ = transposed view) | other device ops |",
        "|---|---|---|---|",
    ]
    for p in profiles:
        t = p.per_step
        lines.append(
            f"| {p.name} | {_names(t, 'kernel')} | {_names(t, 'gemm')} | {_names(t, 'op', 'fill')} |"
        )
    return lines


def _epoch_table(profiles: list[Profile]) -> list[str]:
    """The once-per-epoch work outside the steps."""
    lines = [
        "",
        "### Per-epoch overhead (once per epoch, outside the steps)",
        "",
        "| config | device ops | H2D | D2H | syncs | detail |",
        "|---|---|---|---|---|---|",
    ]
    for p in profiles:
        t = p.per_epoch
        detail = _names(t, "kernel", "gemm", "op", "fill", "h2d", "d2h", "sync")
        lines.append(
            f"| {p.name} | {_device_ops(t)} | {t.count('h2d')} ({p.h2d_per_sample:g} B/sample) "
            f"| {t.count('d2h')} | {t.count('sync')} | {detail} |"
        )
    return lines


def _regime_table(profiles: list[Profile]) -> list[str]:
    """The napkin estimate: launch-, memory- and FLOP-bound times per eager step on an H100."""
    lines = [
        "",
        f"### Expected regime on an H100 (per step; epoch = {EPOCH_SAMPLES:,} samples)",
        "",
        "| config | launch-bound µs | memory-bound µs | GEMM-FLOP-bound µs | regime | epoch s (max of the "
        "three × steps) |",
        "|---|---|---|---|---|---|",
    ]
    for p in profiles:
        t = p.per_step
        total_bytes = t.bytes_of("kernel") + t.bytes_of("gemm") + t.bytes_of("op") + t.bytes_of("fill")
        est = {
            "launch": _device_ops(t) * LAUNCH_S,
            "memory": total_bytes / HBM_BPS,
            "FLOP": t.flops_of("gemm") / FP32_FLOPS,
        }
        regime = max(est, key=est.get)
        ratio = est[regime] / sorted(est.values())[-2]
        epoch_s = max(est.values()) * math.ceil(EPOCH_SAMPLES / p.cfg.batch_size)
        lines.append(
            f"| {p.name} | {_us(est['launch'])} | {_us(est['memory'])} | {_us(est['FLOP'])} "
            f"| {regime}-bound ({ratio:.1f}× the next) | {epoch_s:.3f} |"
        )
    return lines


def _graph_table(graph_profiles: list[Profile], profiles: list[Profile]) -> list[str]:
    """What CUDA graphs change per full-size step, against the eager ``profiles``."""
    lines = [
        "",
        "### With CUDA graphs (`cuda_graphs=True`): per full-size step",
        "",
        "| config | host calls: graph launches + other device ops | kernels inside the graph | "
        "H2D / D2H / syncs | allocs | launch-bound µs: host / graph nodes | regime vs eager |",
        "|---|---|---|---|---|---|---|",
    ]
    eager = {p.name: p for p in profiles}
    for p in graph_profiles:
        t = p.per_step
        host = t.count("graph") + _device_ops(t)
        host_s, node_s = host * LAUNCH_S, t.count("node") * GRAPH_NODE_S
        e = eager.get(p.name)
        gain = e and _device_ops(e.per_step) * LAUNCH_S / max(host_s, node_s)
        speedup = f"{gain:.1f}× fewer launch µs" if gain else ""
        lines.append(
            f"| {_label(p)} | {t.count('graph')} + {_device_ops(t)} ({_names(t, 'op', 'fill')}) "
            f"| {t.count('node')} | {t.count('h2d')} / {t.count('d2h')} / {t.count('sync')} "
            f"| {t.count('alloc')} | {_us(host_s)} / {_us(node_s)} | {speedup} |"
        )
    return lines


def _notes(all_profiles: list[Profile], label_check: bool) -> list[str]:
    """How it was measured and counted, and the estimate's assumptions."""
    check = all(p.linear for p in all_profiles)
    return [
        "",
        f"Measured over {all_profiles[0].steps} steps after a warm-up epoch, by differencing whole epochs "
        "of `TrainStep.epoch` (per step = (E(1+N) − E(1)) / N; checked equal to E(2) − E(1): "
        f"{'yes' if check else 'NO'}; per epoch = E(1) − per step). float32; only `full` has clipping, "
        "dropout, batch norm and shift augmentation. "
        f"Label range check of the emulator {'ON' if label_check else 'off, as on the real cupy backend'}.",
        "",
        "Counting: *our kernels* = `RawKernel` launches; *cuBLAS GEMMs* = `matmul` calls; *other device "
        "ops* = CuPy elementwise/reduction kernels from framework glue (operators, ufuncs, `xp.*` functions, "
        "`setitem`) plus memsets from `xp.zeros` (views such as slicing and `.T` not counted). Kernel MB = "
        "sum of `nbytes` of each launch's array arguments (each array once; `gather_rows`/`gather_shifted` "
        "counted as the rows it reads; in-place optimizer arrays are really read and written, up to 2× "
        "that); GEMM MB = A + B + C. *allocs* = memory-pool allocations per step (`xp.zeros` of the 0-d "
        "loss/count).",
        "",
        f"Estimate assumptions (H100 SXM, no CUDA graphs): {LAUNCH_S * 1e6:.0f} µs per device operation "
        "(kernel launch or cuBLAS call overhead, host-bound); "
        f"{HBM_BPS / 1e12:.2f} TB/s HBM3 for all bytes above (cache reuse ignored); GEMMs at "
        f"{FP32_FLOPS / 1e12:.0f} TFLOP/s FP32 without tensor cores (peak ~67). These are separate lower "
        "bounds; the regime is the largest. With graphs: the host pays "
        f"{LAUNCH_S * 1e6:.0f} µs per graph launch or copy, the device about {GRAPH_NODE_S * 1e6:.0f} µs "
        "per kernel node (assumed); the step costs the larger of the two, plus the memory and FLOP time "
        "above.",
    ]


def render(all_profiles: list[Profile], label_check: bool) -> str:
    """The markdown report: eager steps in detail, then what CUDA graphs change."""
    profiles = [p for p in all_profiles if not p.graphs]
    graph_profiles = [p for p in all_profiles if p.graphs]
    lines = [
        *_step_table(profiles),
        *_launch_table(profiles),
        *_epoch_table(profiles),
        *_regime_table(profiles),
        *_graph_table(graph_profiles, profiles),
        *_notes(all_profiles, label_check),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--configs", default="seed,adam256,deep1024,full", help=f"comma list of {', '.join(PROFILES)}"
    )
    ap.add_argument("--steps", type=int, default=5, help="measured steps (after a warm-up epoch)")
    ap.add_argument("--emu-label-check", action="store_true", help="keep the emulator's label range check")
    ap.add_argument("--out", help="also write the markdown to this file")
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in names if c not in PROFILES]
    if unknown:
        ap.error(f"unknown config(s) {unknown}; choose from {', '.join(PROFILES)}")
    profiles = [
        profile_config(c, args.steps, args.emu_label_check, graphs) for graphs in (False, True) for c in names
    ]
    text = render(profiles, args.emu_label_check)
    sys.stdout.write(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0 if all(p.linear for p in profiles) else 1


if __name__ == "__main__":
    sys.exit(main())
