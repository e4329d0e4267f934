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
    tape = _tape()
    if tape is None:
        return body(*args)
    tape.append((body, args, None))
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
        tape.append((body, args, (acc.reshape(1), add)))
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
        tape.append((None, (fn, args, kwargs), None))


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
    ops = []
    for host, run in itertools.groupby(tape, key=lambda entry: entry[0] is None):
        if host:  # (None, (fn, args, kwargs), None) from call_host
            ops += [functools.partial(fn, *args, **kwargs) for _, (fn, args, kwargs), _ in run]
        else:
            ops.append(_compile(list(run)))
    if len(ops) == 1:
        return ops[0]
    return lambda: [op() for op in ops]


def _compile(tape: list) -> Callable[[], None]:
    """Kernel calls of the tape as one jitted function of a tuple of their arguments -> its call."""
    from . import numba_cpu as module  # the kernel bodies' module (it imports this one)

    names = {id(v): k for k, v in vars(module).items() if isinstance(v, numba.core.registry.CPUDispatcher)}
    flat, lines, slots = [], [], {}

    def ref(a) -> str:
        # Views of the same memory, as each call's reshape makes them, share one slot: every slot
        # is unboxed on every replay (about 0.1 us an array), and a step passes its arrays ~4 times.
        key = _view_key(a) if isinstance(a, np.ndarray) else None
        if key is None or key not in slots:
            flat.append(a)
            if key is not None:
                slots[key] = len(flat) - 1
        return f"P[{len(flat) - 1 if key is None else slots[key]}]"

    for body, args, acc in tape:
        if id(body) not in names:
            raise StepNotCapturable(f"a kernel body of {module.__name__} is not one of its jitted functions")
        call_src = f"{names[id(body)]}({', '.join(map(ref, args))})"
        if acc is None:
            lines.append(f"    {call_src}")
        else:
            into, op = ref(acc[0]), "+=" if acc[1] else "="
            lines.append(f"    {into}[0] {op} {into}.dtype.type({call_src})")
    body_src = "\n".join(lines)
    name = "_step_graph_" + hashlib.sha1(body_src.encode()).hexdigest()[:16]
    fn = _COMPILED.get(name)
    if fn is None:
        namespace = dict(vars(module))
        # cached on disk under this file's name; numba keys the cache by the function's (unique) name
        exec(compile(f"def {name}(P):\n{body_src}\n", __file__, "exec"), namespace)
        fn = _COMPILED[name] = njit(cache=True, error_model="numpy")(namespace[name])
    replay = functools.partial(fn, tuple(flat))
    if not any(body.targetoptions.get("parallel") for body, _, _ in tape):
        return replay

    def replay_in_the_parallel_region():
        with PARALLEL_REGION:
            replay()

    return replay_in_the_parallel_region


def _view_key(a: np.ndarray) -> tuple:
    """What makes two arrays the same argument: memory, shape, strides, dtype and writability."""
    return (a.__array_interface__["data"][0], a.shape, a.strides, a.dtype.str, a.flags.writeable)
