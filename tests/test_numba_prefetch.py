"""The software prefetch of ``gpumlp.kernels.numba_prefetch`` in the numba gathers: the hint is
compiled in (a prefetch instruction in the machine code), and it changes no result, whatever
the indices (negative ones, repeats, the last rows, and one out of range, which still raises)."""

import platform
import re

import numpy as np
import pytest

pytest.importorskip("numba")
import numba  # noqa: E402

from gpumlp.kernels import numba_cpu, numba_prefetch, reference  # noqa: E402

WIDE, NARROW = 784, 3  # float32 rows of 3136 bytes (hinted) and 12 bytes (below MIN_ROW_BYTES)


def fresh_code(kernel, *args) -> tuple[str, str]:
    """(LLVM IR, machine code) of ``kernel`` (a cached dispatcher: its code cannot be inspected)
    compiled afresh for ``args``."""
    fn = numba.njit(error_model="numpy")(kernel.py_func)
    fn(*args)
    return "\n".join(fn.inspect_llvm().values()), "\n".join(fn.inspect_asm().values())


def test_the_gathers_compile_the_prefetch_hint():
    assert NARROW * 4 < numba_prefetch.MIN_ROW_BYTES <= WIDE * 4
    rng = np.random.default_rng(0)
    src, idx = rng.random((40, WIDE)).astype(np.float32), rng.integers(0, 40, 9)
    out = np.empty((9, WIDE), np.float32)
    words = numba_cpu._stream(0, 0, 9)
    for kernel, args in (
        (numba_cpu._gather_k, (src, idx, out)),
        (numba_cpu._gather_shifted_k, (src, idx, out, 28, 2, np.float32(1), np.float32(0), *words)),
    ):
        ir, asm = fresh_code(kernel, *args)
        assert re.search(r"call void @llvm\.prefetch", ir), f"{kernel.__name__}: no prefetch in its IR"
        if platform.machine().lower() in ("x86_64", "amd64"):
            assert re.search(r"\bprefetcht0\b", asm), f"{kernel.__name__}: no prefetcht0 in its machine code"


@pytest.mark.parametrize("width", [WIDE, NARROW])
def test_gathers_with_hints_copy_exactly_what_numpy_indexing_does(width):
    rng = np.random.default_rng(1)
    n = 300
    src = rng.random((n, width)).astype(np.float32)
    # negatives counted from the end, repeats, the first and last rows, and a batch shorter than AHEAD
    idx = np.concatenate([rng.integers(-n, n, 200), [0, n - 1, -1, -n, 5, 5]]).astype(np.int64)
    for batch in (idx, idx[:1], idx[: numba_prefetch.AHEAD], idx[::-1].copy()):
        np.testing.assert_array_equal(numba_cpu.gather_rows(src, batch), src[batch])


def test_an_index_out_of_range_still_raises_after_the_rows_before_it():
    """The hint for a row ahead skips an index out of range; the copy reaches it and raises."""
    src = np.arange(10 * WIDE, dtype=np.float32).reshape(10, WIDE)
    out = np.zeros((4, WIDE), np.float32)
    with pytest.raises(IndexError, match="row index out of range"):
        numba_cpu.gather_rows(src, np.array([3, 1, 10, 2]), out=out)
    np.testing.assert_array_equal(out[:2], src[[3, 1]])  # copied before the bad index, as without hints
    with pytest.raises(IndexError, match="row index out of range"):
        numba_cpu.gather_rows(src, np.array([0, -11]), out=out)


def test_gather_shifted_with_hints_matches_the_reference():
    rng = np.random.default_rng(2)
    src = rng.random((500, WIDE)).astype(np.float32)  # 28x28 images: wide rows, hinted
    idx = np.concatenate([rng.integers(-500, 500, 300), [499, -1, 0]]).astype(np.int64)
    for step in (0, 7):
        np.testing.assert_array_equal(
            numba_cpu.gather_shifted(src, idx, 2, seed=4, step=step),
            reference.gather_shifted(src, idx, 2, seed=4, step=step),
        )
