"""Two cores for one training step: a worker thread of our own that spins beside the calling
thread while a step graph replays, each core taking its half of every GEMM and every large
elementwise pass (``numba_graph`` generates the step; this module runs it). A big fused predict
(``numba_cpu.dense_chain`` with layers on OpenBLAS) runs on the same pair, half the rows a core.

Why not the thread pools we have: OpenBLAS's and Numba's pools each spin on the cores for a while
after their parallel region, so an alternating GEMM / elementwise step made the two teams starve
each other (the parallel Adam after a 2-thread GEMM lost 5-50x), and the elementwise half of a step
stayed on one core. Here one pair of threads does everything: OpenBLAS runs single-threaded
on each core's half, and the halves meet at barriers (two spinning counters, about 0.5 us a
round trip). Each core writes the same rows of a weight's gradient, optimizer state and
weights every step, so those stay in its own cache.

Protocol (``ctl``, int64, each counter on its own 64-byte line): the caller bumps GO and runs
the step with c=0; the worker, spinning in ``next_step``, sees GO move and runs it with c=1. A
step ends with a barrier, so when the caller returns the worker is done. Parking: the caller
sets PARK and bumps GO; the worker returns to Python and waits for its next graph. A core whose
half raises stops the step: the other leaves its barrier when it sees PARK, and the error
reaches the caller.

A session (:func:`session`, the steps of one epoch) holds the pair: OpenBLAS is set to one thread
and its pool shut down for it (a pool thread left spinning after a 2-thread GEMM took the
worker's core for ~0.1 s: two-core epochs ran 1.8x slower right after a 2-thread GEMM), and
restored after. One thread's session at a time; another thread's steps replay on their own core
meanwhile. A forked child forgets the parent's worker (which did not come along) and starts its own.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import platform
import queue
import threading
from collections.abc import Callable

import numba
import numpy as np
from llvmlite import ir
from numba.core import cgutils
from numba.extending import intrinsic

from ._jit import njit

GO, PARK, BARRIER = 0, 8, 16  # ctl slots; core c's barrier count at BARRIER + 8 c
_X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


@intrinsic
def _load_acquire(typingctx, arr, i):
    """arr[i] (int64), an atomic acquire load: later reads cannot move before it."""

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, signature.args[0], ary, [args[1]])
        return builder.load_atomic(ptr, "acquire", 8)

    return numba.types.int64(arr, i), codegen


@intrinsic
def _store_release(typingctx, arr, i, value):
    """arr[i] = value (int64), an atomic release store: earlier writes are visible before it."""

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, signature.args[0], ary, [args[1]])
        builder.store_atomic(args[2], ptr, "release", 8)
        return context.get_dummy_value()

    return numba.types.void(arr, i, numba.types.int64), codegen


@intrinsic
def _spin_pause(typingctx):
    """The x86 ``pause`` hint of a spin loop (nothing elsewhere)."""

    def codegen(context, builder, signature, args):
        if _X86:
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                                "llvm.x86.sse2.pause")  # fmt: skip
            builder.call(fn, [])
        return context.get_dummy_value()

    return numba.types.void(), codegen


if os.name == "posix":
    _sched_yield = numba.types.ExternalFunction("sched_yield", numba.types.int32())
else:  # no sched_yield to call: the waits only spin

    @njit(cache=True, nogil=True)
    def _sched_yield():
        return 0


_SPINS_BEFORE_YIELD = 1 << 12  # ~0.1 ms of pauses; then yield the core at every turn


@njit(cache=True, nogil=True)
def _wait(spins):
    """One turn of a spin wait: ``pause``, and after _SPINS_BEFORE_YIELD turns also give the core
    away (the other thread of the pair may be waiting for it, when the OS put both on one core).
    -> spins + 1."""
    _spin_pause()
    if spins >= _SPINS_BEFORE_YIELD:
        _sched_yield()
    return spins + 1


@njit(cache=True, nogil=True)
def barrier(ctl, c):
    """Wait until the other core has reached as many barriers as core c has (this one included)
    -> True, or False as soon as the step is being stopped (PARK: the other core failed)."""
    mine = ctl[BARRIER + 8 * c] + 1
    _store_release(ctl, BARRIER + 8 * c, mine)
    spins = 0
    while _load_acquire(ctl, BARRIER + 8 * (1 - c)) < mine:
        if _load_acquire(ctl, PARK) != 0:
            return False
        spins = _wait(spins)
    return True


@njit(cache=True, nogil=True)
def go(ctl):
    """Start a step: the worker, spinning in :func:`next_step`, runs it."""
    _store_release(ctl, GO, ctl[GO] + 1)


@njit(cache=True, nogil=True)
def next_step(ctl, seen):
    """Spin until GO moves past ``seen`` -> True to run the step, False to park."""
    spins = 0
    while _load_acquire(ctl, GO) == seen:
        spins = _wait(spins)
    return _load_acquire(ctl, PARK) == 0


def _openblas_controls():
    """(set_num_threads, get_num_threads, shutdown) of NumPy's bundled OpenBLAS, or None."""
    from . import numba_cpu

    lib = numba_cpu._OPENBLAS_LIB
    if lib is None:
        return None
    try:
        set_threads = ctypes.CFUNCTYPE(None, ctypes.c_int)(("scipy_openblas_set_num_threads64_", lib))
        shutdown = ctypes.CFUNCTYPE(ctypes.c_int)(("blas_thread_shutdown_", lib))
    except AttributeError:
        return None
    return set_threads, numba_cpu._BLAS_THREADS, shutdown


class _Pair:
    """The worker thread and the session that holds it (one per process)."""

    def __init__(self):
        self.ctl = np.zeros(BARRIER + 16, np.int64)
        self.lock = threading.Lock()
        self.owner: int | None = None  # thread ident holding the session
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.parked = threading.Semaphore(0)
        self.serving: tuple | None = None
        self.error: BaseException | None = None
        self.worker: threading.Thread | None = None
        self.blas_threads = 0

    @functools.cached_property
    def blas(self):
        return _openblas_controls()

    def possible(self) -> bool:
        """Whether step graphs should be compiled for two cores: OpenBLAS controllable, 2 CPUs in
        this process's affinity, GPUMLP_STEP_GRAPHS not 1 (one core)."""
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        two = os.environ.get("GPUMLP_STEP_GRAPHS", "2").strip() == "2"
        return self.blas is not None and cpus >= 2 and two

    def available(self) -> bool:
        """Two cores to use now: :meth:`possible`, at least 2 Numba threads, and OpenBLAS on exactly
        2 threads. One (OMP_NUM_THREADS=1, NUMBA_NUM_THREADS=1) keeps training on one core; more
        (a bigger CPU) are OpenBLAS's to use, as two cores of ours would idle the rest (unmeasured)."""
        return self.possible() and numba.get_num_threads() >= 2 and self.blas[1]() == 2

    def step(self, step_fn: Callable, args: tuple) -> bool:
        """Run one step of a two-core graph, ``step_fn(args, ctl, c, seen)``, on both cores -> False
        (having run nothing) when the pair is another thread's, or not available: the caller replays
        on its own core."""
        me = threading.get_ident()
        if self.owner != me and not (getattr(_SESSION, "open", False) and self._begin(me)):
            return False
        if self.serving is None or self.serving[0] is not step_fn or self.serving[1] is not args:
            self._park()
            self._serve(step_fn, args)
        try:
            step_fn(args, self.ctl, 0, 0)
        except BaseException:  # the worker leaves its barrier and parks, then the error goes on
            self._park()
            raise
        if self.ctl[PARK]:  # the worker's half raised: the step stopped at its next barrier
            error = self.error
            self._park()
            raise error
        return True

    def _begin(self, me: int) -> bool:
        if not self.lock.acquire(blocking=False):
            return False
        if not self.available():
            self.lock.release()
            return False
        set_threads, get_threads, shutdown = self.blas
        self.blas_threads = get_threads()
        set_threads(1)
        shutdown()  # its pool restarts at the next multi-threaded call
        self.owner = me
        return True

    def _serve(self, step_fn: Callable, args: tuple) -> None:
        if self.worker is None:
            self.worker = threading.Thread(target=self._work, name="gpumlp-pair", daemon=True)
            self.worker.start()
        self.serving = (step_fn, args)
        self.jobs.put((step_fn, args, int(self.ctl[GO])))

    def _work(self) -> None:
        while True:
            step_fn, args, seen = self.jobs.get()
            try:
                step_fn(args, self.ctl, 1, seen)
            except BaseException as e:  # noqa: BLE001 - handed to the caller, which raises it
                self.error = e
                self.ctl[PARK] = 1
            del step_fn, args  # parked: hold no model's buffers
            self.parked.release()

    def _park(self) -> None:
        """Stop the worker (spinning for a step, waiting at a barrier, or failed) and wait until it
        has left the graph; both barrier counts start again from 0."""
        if self.serving is None:
            return
        self.ctl[PARK] = 1
        go(self.ctl)
        self.parked.acquire()
        self.ctl[PARK] = self.ctl[BARRIER] = self.ctl[BARRIER + 8] = 0
        self.serving = self.error = None

    def end(self) -> None:
        """End the calling thread's session, if it holds one: park the worker, give OpenBLAS its
        threads back."""
        if self.owner != threading.get_ident():
            return
        try:
            self._park()
            self.blas[0](self.blas_threads)
        finally:
            self.owner = None
            self.lock.release()


    def after_fork_in_child(self) -> None:
        """A forked child has no worker thread (only the forking thread comes along): forget it,
        and a session's single-threaded OpenBLAS, so the child's steps start a pair of their own."""
        if self.owner is not None:
            self.blas[0](self.blas_threads)
        self.__init__()


PAIR = _Pair()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=PAIR.after_fork_in_child)
_SESSION = threading.local()  # .open: the calling thread's replays may take the pair


@contextlib.contextmanager
def session():
    """The training loop's steps inside (or a big predict's chunk): their step graphs may run on two
    cores (the first one that finds the pair free takes it for the rest of the session). On exit
    the worker parks and OpenBLAS gets its threads back. Replays outside a session stay on the
    calling core. A session inside another one of the same thread is the outer one's."""
    outer = getattr(_SESSION, "open", False)
    _SESSION.open = True
    try:
        yield
    finally:
        _SESSION.open = outer
        if not outer:
            PAIR.end()
