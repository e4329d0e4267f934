"""Step graphs on the CPU: a training step's Numba kernel calls, recorded once and replayed as one
compiled function. The twin of the CUDA-graph step (``gpumlp.step.TrainStep``).

Why: a step of a small MLP makes about fifteen kernel calls of a few microseconds each, and the
Python around them (the wrappers' checks, Numba's dispatch of each call, the layers' code) costs
about a seventh of the seed step (bench/results/step_graphs.md). Replayed as one jitted function that
calls the same jitted kernel bodies with the same arguments, the step does the same arithmetic in
the same order, so its results are the per-kernel step's bit for bit.

How: while :func:`capture` runs ``step()``, the wrappers in ``CAPTURABLE`` call their jitted
bodies through :func:`call` / :func:`call_into`, which record ``(body, arguments)`` instead of
running them (a capture runs nothing, as a CUDA graph capture launches nothing), and every other
public numba kernel is :func:`refusing`. The tape becomes the source of one function
that calls the bodies in order on a tuple of the recorded arguments. Its source names only the
bodies, so it is the same for every step of the same structure; it compiles once and is cached
on disk like the kernels (a new name per structure: a hash of the source). A NumPy call that a
kernel makes in place (:func:`call_host`: NumPy's SIMD tanh, exp) splits the tape: the replay
runs one compiled function, the NumPy call, the next compiled function.

What cannot be replayed raises :class:`~gpumlp.kernels.common.StepNotCapturable` during the
capture, and the step runs kernel by kernel instead: a kernel not in ``CAPTURABLE`` (one whose
Python would read array contents; the Philox streams of dropout and augmentation, Adam and
clipping read their step or norm in jitted code instead), or a branch of a capturable one whose
result would return to Python (a sum without an accumulator array, a matmul without an output
array). A kernel's Python may depend only on shapes, dtypes, flags and its scalar arguments: all
are fixed for a graph, whose step re-records when the learning rate changes.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import threading
from collections.abc import Callable

import numba.core.registry
import numpy as np

from . import numba_pair
from ._jit import njit
from .common import StepNotCapturable

# The numba_cpu wrappers that record every jitted call they make and read no array contents.
CAPTURABLE = frozenset({
    "gather_rows", "matmul", "bias_act", "act_grad", "bias_grad", "softmax_xent", "sigmoid_bce",
    "mse", "correct_count", "sgd_step", "sgd_matmul_step", "momentum_step", "adagrad_step",
    "rmsprop_step", "adam_step", "adamw_step", "lion_step", "dropout_forward", "dropout_backward",
    "batchnorm_forward", "batchnorm_backward", "batchnorm_inference", "sum_squares", "clip_scale",
    "clip_value", "gather_shifted", "gather_warped", "elastic_field", "gather_pixels",
    "gather_shifted_pixels",
})  # fmt: skip

# One parallel region of the numba kernels at a time in the process. Numba's workqueue threading
# layer (its fallback without OpenMP or TBB) aborts the process when two threads launch parallel
# regions at once (measured: predict, and training with step graphs, from 3 threads), and concurrent
# callers would only oversubscribe the cores. The kernels try it and run serially when it is taken;
# a step graph that recorded a parallel variant holds it while it replays.
PARALLEL_REGION = threading.Lock()
_RECORDING = threading.local()  # .tape: the list being recorded on this thread, else absent/None
_COMPILED: dict[str, Callable] = {}  # graph source -> its jitted function, for this process


def _tape() -> list | None:
    return getattr(_RECORDING, "tape", None)


def call(body, *args):
    """``body(*args)`` for a jitted kernel body; while a step is being captured, recorded instead."""
    return call_split(None, body, *args)


def call_split(split: tuple | None, body, *args):
    """:func:`call`, recording also how a two-core step splits the call between its cores:
    ``("range", chunk, rows, count)``: ``chunk(*args[:count], lo, hi)`` over a half of the elements
    (of the rows with ``rows``) of ``args[0]`` each; ``("bands", ((position, axis), ...))``: ``body`` on
    a half each of the arguments at those positions, cut along those axes (the first one's length
    is halved); None: on the calling core only."""
    tape = _tape()
    if tape is None:
        return body(*args)
    tape.append((body, args, None, split))
    return None


def call_into(acc, body, *args, add: bool = True):
    """``acc += body(*args)`` into a 0-d accumulator, the sum cast to acc's dtype first (as NumPy
    adds a Python scalar), or ``acc[...] = body(*args)`` with add=False; while capturing,
    recorded instead. -> acc."""
    tape = _tape()
    if tape is None:
        value = body(*args)
        if add:
            acc += value
        else:
            acc[...] = value
    else:
        tape.append((body, args, (acc.reshape(1), add), None))
    return acc


def refuse(why: str) -> None:
    """Raise StepNotCapturable(why) while a step is being captured (a branch that cannot be replayed)."""
    if _tape() is not None:
        raise StepNotCapturable(why)


def refusing(kernel: Callable) -> Callable:
    """``kernel`` (a wrapper not in CAPTURABLE) made to raise StepNotCapturable while a step is
    being captured, so that a capture never runs it; outside a capture it just runs."""

    @functools.wraps(kernel)
    def guarded(*args, **kwargs):
        refuse(f"numba kernel {kernel.__name__!r} cannot be replayed in a step graph")
        return kernel(*args, **kwargs)

    return guarded


def call_host(fn: Callable, *args, **kwargs) -> None:
    """``fn(*args, **kwargs)``, a NumPy call between jitted kernels whose effect is on its ``out=``
    array (NumPy's SIMD tanh and exp); while capturing, recorded instead: the replay makes the
    same call between its compiled segments."""
    tape = _tape()
    if tape is None:
        fn(*args, **kwargs)
    else:
        tape.append((None, (fn, args, kwargs), None, None))


def capture(step: Callable[[], None]) -> Callable[[], None]:
    """Record the numba kernel calls of ``step()`` (on this thread) without running them and
    return ``replay()``, which runs them as one compiled function (one per run of kernels between
    NumPy calls, with those calls between them). Raises StepNotCapturable (having run no kernel)
    when the step calls a kernel that cannot be replayed."""
    tape = []
    _RECORDING.tape = tape
    try:
        step()
    finally:
        _RECORDING.tape = None
    runs = [(host, list(run)) for host, run in itertools.groupby(tape, key=lambda entry: entry[0] is None)]
    if len(runs) == 1 and not runs[0][0] and numba_pair.PAIR.possible():
        return _compile(runs[0][1], pair=True)
    ops = []
    for host, run in runs:
        if host:  # (None, (fn, args, kwargs), None, None) from call_host
            ops += [functools.partial(fn, *args, **kwargs) for _, (fn, args, kwargs), _, _ in run]
        else:
            ops.append(_compile(run))
    if len(ops) == 1:
        return ops[0]
    return lambda: [op() for op in ops]


class _Source:
    """The source of a graph function being written: its lines, and the tuple of arguments it reads."""

    def __init__(self):
        from . import numba_cpu as module  # the kernel bodies' module (it imports this one)

        self.module, self.flat, self.lines, self.slots = module, [], [], {}
        jitted = numba.core.registry.CPUDispatcher
        self.names = {id(v): k for k, v in vars(module).items() if isinstance(v, jitted)}

    def ref(self, a) -> str:
        """``P[i]``, the slot of argument a."""
        # Views of the same memory, as each call's reshape makes them, share one slot: every slot
        # is unboxed on every replay (about 0.1 us an array), and a step passes its arrays ~4 times.
        key = _view_key(a) if isinstance(a, np.ndarray) else None
        if key is None or key not in self.slots:
            self.flat.append(a)
            if key is not None:
                self.slots[key] = len(self.flat) - 1
        return f"P[{len(self.flat) - 1 if key is None else self.slots[key]}]"

    def name(self, body) -> str:
        if id(body) not in self.names:
            raise StepNotCapturable(f"a kernel body of {self.module.__name__} is not one of its jitted ones")
        return self.names[id(body)]

    def call(self, body, args, acc=None) -> str:
        """The line of one recorded call (into its accumulator when acc is given)."""
        call_src = f"{self.name(body)}({', '.join(map(self.ref, args))})"
        if acc is None:
            return call_src
        into, op = self.ref(acc[0]), "+=" if acc[1] else "="
        return f"{into}[0] {op} {into}.dtype.type({call_src})"

    def compiled(self, prefix: str, header: str) -> tuple[str, dict]:
        """Compile ``def {name}{header}:`` over the lines once per process, cached on disk.
        -> (name, the namespace holding it)."""
        body_src = "\n".join(f"    {line}" for line in self.lines)
        name = prefix + hashlib.sha1(body_src.encode()).hexdigest()[:16]
        if name not in _COMPILED:
            namespace = dict(vars(self.module), **_PAIR_NAMES)
            # cached on disk under this file's name; numba keys the cache by the function's (unique) name
            exec(compile(f"def {name}{header}:\n{body_src}\n", __file__, "exec"), namespace)
            options = dict(cache=True, error_model="numpy", nogil=prefix == _PAIR_PREFIX)
            namespace[name] = njit(**options)(namespace[name])
            _COMPILED[name] = namespace
        return name, _COMPILED[name]


def _compile(tape: list, pair: bool = False) -> Callable[[], None]:
    """Kernel calls of the tape as one jitted function of a tuple of their arguments -> its call.
    With ``pair``, also as the two-core step (:func:`_compile_pair`), which runs whenever the
    cores are free and falls back to the one-core function otherwise."""
    src = _Source()
    src.lines = [src.call(body, args, acc) for body, args, acc, _ in tape]
    name, namespace = src.compiled("_step_graph_", "(P)")
    replay = functools.partial(namespace[name], tuple(src.flat))
    if any(body.targetoptions.get("parallel") for body, _, _, _ in tape):
        one_core = replay

        def replay():
            with PARALLEL_REGION:
                one_core()

    if not pair or not _pays_on_two_cores(tape, src.module._gemm):
        return replay
    step, args = _compile_pair(tape)
    pair_step = numba_pair.PAIR.step

    def replay_on_two_cores():
        if not pair_step(step, args):
            replay()

    return replay_on_two_cores


def _view_key(a: np.ndarray) -> tuple:
    """What makes two arrays the same argument: memory, shape, strides, dtype and writability."""
    return (a.__array_interface__["data"][0], a.shape, a.strides, a.dtype.str, a.flags.writeable)


# The two-core step (numba_pair): each call of the tape on both cores, a half each, or on the calling
# core only, with a barrier wherever the other core's half must be done before the next call.
_PAIR_PREFIX = "_pair_step_"
_PAIR_NAMES = {f"_pair_{fn.__name__}": fn for fn in (numba_pair.barrier, numba_pair.go, numba_pair.next_step)}
_PAIR_MIN = 4096  # elements from which an elementwise pass is split between the cores
_PAIR_MIN_ROWS = 8  # rows from which a GEMM or a gather is
_PAIR_MIN_MNK, _PAIR_MAX_MNK = 1 << 19, 1 << 26  # the sizes of a step's largest GEMM that use two cores
_PAIR_ALIGN = 16  # an element range is cut at a multiple of this: no cache line written by both cores
_PAIR_BARRIER = "    if not _pair_barrier(ctl, c):\n            return seen"  # a stopped step ends there
# Core 0 (the caller) starts one step and runs its part; core 1 (the worker) runs its part of each
# step the caller starts, until it is parked. One function: its body is compiled once.
_PAIR_HEAD = ["if c == 0:", "    _pair_go(ctl)", "while c == 0 or _pair_next_step(ctl, seen):",
              "    seen += 1"]  # fmt: skip
_PAIR_TAIL = ["    if c == 0:", "        return seen", "return seen"]


def _pays_on_two_cores(tape: list, gemm) -> bool:
    """Whether the step's largest GEMM has from _PAIR_MIN_MNK to _PAIR_MAX_MNK multiply-adds.
    Smaller, the barriers cost more than the halves save (Adam steps, two cores over one, in
    bench/results/two_core_sizes.md: 1.21x the time at 100 x 64 x 32, 0.93x at 100 x 128 x 64,
    0.87-0.94x from 2.5M). Larger, OpenBLAS's
    own 2-thread GEMM wins, as it shares its packed operands between the threads: on deep1024 (256
    x 1024 x 1024) the two-core step read 1.06-1.07x the floor against 0.97-1.00x on one core,
    while adam256 (128 x 784 x 256) went from 1.28-1.31x to 1.16-1.17x."""
    gemms = [args for body, args, _, _ in tape if body is gemm]
    largest = max((c.shape[0] * c.shape[1] * (a.shape[0] if ta else a.shape[1])
                   for c, a, _, _, _, ta, _, _ in gemms), default=0)  # fmt: skip
    return _PAIR_MIN_MNK <= largest < _PAIR_MAX_MNK


def _compile_pair(tape: list) -> tuple[Callable, tuple]:
    """The tape as a two-core step -> (``step(P, ctl, c, seen)``: c=0 runs one step on the calling
    core, c=1 serves the steps on the worker until it is parked; P). Core c runs its part of each
    call: GEMMs by bands of rows or columns of their result (a split-K GEMM by halves of K, then the
    sum by rows), elementwise passes, gathers and bias sums by halves, everything else on core 0.
    Each core does the arithmetic the one-core step does on its half, so the result is the same
    bit for bit where OpenBLAS computes a band of a product as it computes it in the whole."""
    src, bounds, phases = _Source(), [], []

    def halves(n: int, align: int = 1, split: bool = True) -> tuple[str, str]:
        """Core c's [lo, hi) of n (all of it on core 0 without ``split``), as source."""
        mid = n // 2 // align * align or n // 2
        bounds.append(((0, mid), (mid, n)) if split else ((0, n), (0, 0)))
        return f"B[{len(bounds) - 1}, c, 0]", f"B[{len(bounds) - 1}, c, 1]"

    for body, args, acc, split in tape:
        phases += _pair_phases(src, halves, body, args, acc, split)
    lines, previous = [], None
    for both, line in phases:
        if previous is not None and (both or previous):
            lines.append(_PAIR_BARRIER)
        lines.append(f"    {line}" if both else f"    if c == 0:\n            {line}")
        previous = both
    table = np.array(bounds, np.int64).reshape(-1, 2, 2)
    src.lines = [f"B = {src.ref(table)}", *_PAIR_HEAD, *lines, _PAIR_BARRIER, *_PAIR_TAIL]
    name, namespace = src.compiled(_PAIR_PREFIX, "(P, ctl, c, seen)")
    return namespace[name], tuple(src.flat)


def _pair_phases(src: _Source, halves, body, args, acc, split) -> list[tuple[bool, str]]:
    """One recorded call as (on both cores?, line) phases of the two-core step. Only the arguments a
    line reads get a slot: every slot is unboxed on every replay."""
    if acc is None and body is src.module._gemm and args[0].shape[0] >= _PAIR_MIN_ROWS:
        c, a, b, alpha, beta, ta, tb = map(src.ref, args[:7])  # the last, split_k, chooses the line
        if args[-1] == 2:
            parts = src.ref(np.empty((2, *args[0].shape), args[0].dtype))
            lo, hi = halves(args[0].shape[0])
            part = f"_gemm_k_part({parts}, {a}, {b}, {ta}, {tb}, c)"
            return [(True, part), (True, f"_sum_parts({c}, {parts}, {lo}, {hi})")]
        if args[-1] == 1:  # a band of rows, or of columns when wider than tall: each core reads less
            rows, cols = args[0].shape
            by_cols = cols > rows and cols >= _PAIR_MIN_ROWS * 2
            lo, hi = halves(cols if by_cols else rows, _PAIR_ALIGN if by_cols else 1)
            kernel = "_gemm_cols" if by_cols else "_gemm_rows"
            return [(True, f"{kernel}({c}, {a}, {b}, {alpha}, {beta}, {ta}, {tb}, {lo}, {hi})")]
    if split is not None and split[0] == "range":
        _, chunk, rows, count = split
        both = args[0].size >= _PAIR_MIN
        lo, hi = halves(args[0].shape[0] if rows else args[0].size, 1 if rows else _PAIR_ALIGN, both)
        refs = ", ".join(map(src.ref, args[:count]))  # not the parallel variant's thread count
        return [(both, f"{src.name(chunk)}({refs}, np.uint64({lo}), np.uint64({hi}))")]
    if split is not None and split[0] == "bands":
        cuts = dict(split[1])
        first, axis = split[1][0]
        if args[first].shape[axis] >= _PAIR_MIN_ROWS and max(args[i].size for i in cuts) >= _PAIR_MIN:
            lo, hi = halves(args[first].shape[axis])
            refs = map(src.ref, args)
            banded = [f"{r}[{':, ' * cuts[i]}{lo}:{hi}]" if i in cuts else r for i, r in enumerate(refs)]
            return [(True, f"{src.name(body)}({', '.join(banded)})")]
    return [(False, src.call(body, args, acc))]

