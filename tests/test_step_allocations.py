"""The numba loss kernels allocate nothing inside a training step.

Counted with Numba's own allocator statistics (NRT), which see every array a jitted function
allocates (tracemalloc does not). Numba also counts one bookkeeping record per array it receives
from Python; that cost is calibrated on a jitted function that allocates nothing, so each kernel
call must cost exactly its array arguments and no more.
"""

from __future__ import annotations

import numpy as np
import pytest

from gpumlp.kernels import reference as ref

numba = pytest.importorskip("numba")
from numba.core.runtime import _nrt_python, rtsys  # noqa: E402

from gpumlp.kernels import numba_cpu  # noqa: E402


@numba.njit
def _touch(a, b, c):
    return a.shape[0] + b.shape[0] + c.shape[0]


@pytest.fixture
def nrt_allocations():
    """() -> allocations counted so far, with Numba's statistics on for the test."""
    was_on = _nrt_python.memsys_stats_enabled()
    _nrt_python.memsys_enable_stats()
    yield lambda: rtsys.get_allocation_stats().alloc
    if not was_on:
        _nrt_python.memsys_disable_stats()


def _allocations(count, fn, *args, **kwargs) -> int:
    fn(*args, **kwargs)  # compiled or loaded from the cache before counting
    before = count()
    fn(*args, **kwargs)
    return count() - before


@pytest.mark.parametrize("kernel", ["softmax_xent", "sigmoid_bce"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("batch", [0, 1, 2, 100])
def test_loss_kernels_allocate_nothing_but_their_arguments(nrt_allocations, kernel, dtype, batch):
    """Before: softmax_xent allocated its row sums and sigmoid_bce its per-class float64 sums on
    every call (4 counted allocations for 3 arrays given). Their results still match the reference."""
    rng = np.random.default_rng(batch)
    z = (3 * rng.standard_normal((batch, 10))).astype(dtype)
    labels, grad, loss = rng.integers(0, 10, batch), np.empty_like(z), np.zeros((), dtype)
    a = np.zeros(3)
    per_array = _allocations(nrt_allocations, _touch, a, a, a) / 3
    fn = getattr(numba_cpu, kernel)
    got = _allocations(nrt_allocations, fn, z, labels, grad=grad, grad_scale=0.5, loss=loss)
    assert got == 3 * per_array, f"{kernel} allocated {got - 3 * per_array:g} arrays of its own"
    want_loss, want_grad = getattr(ref, kernel)(z, labels, grad_scale=0.5)
    got_loss, got_grad = fn(z, labels, grad=np.empty_like(z), grad_scale=0.5)
    tol = {np.float32: 1e-5, np.float64: 1e-12}[dtype]
    np.testing.assert_allclose(got_grad, want_grad, rtol=tol, atol=tol)
    np.testing.assert_allclose(float(got_loss), float(want_loss), rtol=tol)


def test_sigmoid_bce_needs_a_contiguous_grad():
    """Its first rows hold the per-class sums, so a strided grad is a clear error, not a wrong sum."""
    z = np.zeros((4, 10), np.float32)
    with pytest.raises(ValueError, match="grad must be C-contiguous"):
        numba_cpu.sigmoid_bce(z, np.zeros(4, np.int64), grad=np.empty((4, 20), np.float32)[:, ::2])
