"""The emulated device's kernel sanitizers (``GPUMLP_EMU_SANITIZE``), each shown catching a
deliberately broken kernel, with the kernel, thread, block and argument named; and the correct
twin of each kernel passing, so that a sanitizer that reports everything would fail here too.

The kernel parity tests run under all three sanitizers in CI (``.ci/run``).
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from gpumlp.kernels import cuda_emu, cuda_host

ALL = "memcheck,racecheck,initcheck"

BROKEN = r"""
// out-of-bounds: i == n writes one past the end (and reads x[-1] when shift is set)
extern "C" __global__ void off_by_one(const float* x, float* y, int n, int shift) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i <= n) y[i] = x[i < n ? i - shift : 0];
}
// misaligned: a float loaded from 2 bytes into an element
extern "C" __global__ void misaligned(const float* x, float* y, int n) {
    const int i = threadIdx.x;
    if (i < n) y[i] = *reinterpret_cast<const float*>(reinterpret_cast<const char*>(x) + 4 * i + 2);
}
// each thread reads its neighbour's slot; sync != 0 waits for the writes first
extern "C" __global__ void neighbour(const float* x, float* y, int sync) {
    __shared__ float s[256];
    const int t = threadIdx.x;
    s[t] = 2 * x[t];
    if (sync) __syncthreads();
    y[t] = s[(t + 1) % blockDim.x];
}
// block 1 reads what block 0 writes: nothing orders blocks within a launch
extern "C" __global__ void across_blocks(int* flag, int* out) {
    if (threadIdx.x == 0 && blockIdx.x == 0) flag[0] = 7;
    if (threadIdx.x == 0 && blockIdx.x == 1) out[0] = flag[0];
}
// float atomics: the sum's rounding depends on the order of the additions
extern "C" __global__ void atomic_sum(const float* x, float* total, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) atomicAdd(total, x[i]);
}
extern "C" __global__ void gather(const int* idx, const float* x, float* y, int n) {
    const int i = threadIdx.x;
    if (i < n) y[i] = x[idx[i]];
}
extern "C" __global__ void gather_bytes(const int* idx, const unsigned char* x, unsigned char* y, int n) {
    const int i = threadIdx.x;
    if (i < n) y[i] = x[idx[i]];
}
"""


@pytest.fixture(scope="module")
def checked():
    """BROKEN built and loaded with all three sanitizers on."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GPUMLP_EMU_SANITIZE", ALL)
        return cuda_emu.RawModule(code=BROKEN)


@pytest.fixture
def sanitize(monkeypatch):
    """All three on for the test (``empty`` poisons under initcheck)."""
    monkeypatch.setenv("GPUMLP_EMU_SANITIZE", ALL)


def _dev(a) -> cuda_emu.ndarray:
    return cuda_emu.asarray(np.asarray(a))


def _finding(module, kernel: str, grid: int, block: int, *args) -> str:
    """The message of the SanitizerError that launching ``kernel`` raises."""
    with pytest.raises(cuda_host.SanitizerError) as e:
        module.get_function(kernel)((grid,), (block,), args)
    return str(e.value)


def test_memcheck_reports_an_out_of_bounds_write(checked, sanitize):
    x, y = _dev(np.arange(40, dtype=np.float32)), cuda_emu.zeros(40, dtype=np.float32)
    msg = _finding(checked, "off_by_one", 2, 32, x, y, np.int32(40), np.int32(0))
    assert msg.startswith("memcheck: kernel off_by_one grid=(2, 1, 1) block=(32, 1, 1)")
    assert "thread (8, 0, 0) of block (1, 0, 0)" in msg  # global index 40 == n
    assert "out-of-bounds write of 4 bytes, 0 bytes after the end of parameter `float* y` (float32[40]" in msg


def test_memcheck_reports_a_read_before_the_start(checked, sanitize):
    x, y = _dev(np.arange(64, dtype=np.float32)), cuda_emu.zeros(65, dtype=np.float32)
    with pytest.raises(cuda_host.SanitizerError, match=re.escape("thread (0, 0, 0) of block (0, 0, 0)")) as e:
        checked.get_function("off_by_one")((1,), (64,), (x, y, np.int32(64), np.int32(1)))
    assert "out-of-bounds read of 4 bytes, 4 bytes before the start of parameter `float* x`" in str(e.value)


def test_memcheck_reports_a_misaligned_read(checked, sanitize):
    x, y = _dev(np.arange(33, dtype=np.float32)), cuda_emu.zeros(32, dtype=np.float32)
    msg = _finding(checked, "misaligned", 1, 32, x, y, np.int32(32))
    assert msg.startswith("memcheck: kernel misaligned grid=(1, 1, 1) block=(32, 1, 1), thread (")
    m = re.search(
        r"thread \((\d+), 0, 0\) of block \(0, 0, 0\): misaligned read of 4 bytes, byte (\d+) ", msg
    )
    assert m and int(m[2]) == 4 * int(m[1]) + 2, msg
    assert "of parameter `float* x` (float32[33], 132 bytes)" in msg


def test_correct_accesses_pass_memcheck(checked, sanitize):
    x, y = _dev(np.arange(40, dtype=np.float32)), cuda_emu.zeros(41, dtype=np.float32)
    checked.get_function("off_by_one")((2,), (32,), (x, y, np.int32(40), np.int32(0)))
    np.testing.assert_array_equal(y.get()[:40], np.arange(40))


def test_racecheck_reports_a_shared_memory_race(checked, sanitize):
    x, y = _dev(np.arange(64, dtype=np.float32)), cuda_emu.zeros(64, dtype=np.float32)
    msg = _finding(checked, "neighbour", 1, 64, x, y, np.int32(0))
    assert msg.startswith("racecheck: kernel neighbour grid=(1, 1, 1) block=(64, 1, 1): parameter `float* y`")
    assert "differs between the in-order and the reversed (seed 1) schedule" in msg and "__syncthreads" in msg


def test_racecheck_passes_the_kernel_with_its_barrier(checked, sanitize):
    x, y = _dev(np.arange(64, dtype=np.float32)), cuda_emu.zeros(64, dtype=np.float32)
    checked.get_function("neighbour")((1,), (64,), (x, y, np.int32(1)))
    np.testing.assert_array_equal(y.get(), 2 * np.roll(np.arange(64), -1))


def test_racecheck_reports_blocks_that_depend_on_their_order(checked, sanitize):
    flag, out = cuda_emu.zeros(1, dtype=np.int32), cuda_emu.zeros(1, dtype=np.int32)
    with pytest.raises(cuda_host.SanitizerError, match=r"racecheck: kernel across_blocks .*`int\* out`"):
        checked.get_function("across_blocks")((2,), (32,), (flag, out))


def test_racecheck_allows_float_atomics_their_rounding(checked, sanitize):
    rng = np.random.default_rng(3)
    x = rng.random(256).astype(np.float32) * np.float32(1000)
    orders = {float(np.cumsum(v, dtype=np.float32)[-1]) for v in (x, x[::-1])}
    assert len(orders) == 2, "the data must make the order visible, or this test checks nothing"
    total = cuda_emu.zeros(1, dtype=np.float32)
    checked.get_function("atomic_sum")((2,), (128,), (_dev(x), total, np.int32(256)))
    assert total.get()[0] == pytest.approx(float(x.astype(np.float64).sum()), rel=1e-5)


def test_initcheck_reports_a_read_of_an_uninitialised_int_buffer(checked, sanitize):
    idx, x, y = cuda_emu.empty(8, dtype=np.int32), _dev(np.ones(8, np.float32)), cuda_emu.zeros(8, np.float32)
    msg = _finding(checked, "gather", 1, 32, idx, x, y, np.int32(8))
    assert msg.startswith("initcheck: kernel gather") and "of block (0, 0, 0)" in msg
    assert "read of 4 bytes of uninitialised memory, byte" in msg and "parameter `int* idx` (int32[8]" in msg
    idx[...] = 3  # written: now it passes
    checked.get_function("gather")((1,), (32,), (idx, x, y, np.int32(8)))
    np.testing.assert_array_equal(y.get(), np.ones(8))


def test_initcheck_reports_a_read_of_an_uninitialised_float_buffer(checked, sanitize):
    idx, x, y = (
        cuda_emu.zeros(4, dtype=np.int32),
        cuda_emu.empty(4, np.float32),
        cuda_emu.zeros(4, np.float32),
    )
    with pytest.raises(
        cuda_host.SanitizerError, match=r"initcheck: kernel gather.*`float\* x` \(float32\[4\]"
    ):
        checked.get_function("gather")((1,), (32,), (idx, x, y, np.int32(4)))


def test_initcheck_reports_a_read_of_a_byte_buffer_only_while_no_byte_of_it_is_written(checked, sanitize):
    """0xA5 is a valid uint8 (pixel 165): a written byte buffer that holds it is data, not poison."""
    idx, y = _dev(np.arange(8, dtype=np.int32)), cuda_emu.zeros(8, np.uint8)
    x = cuda_emu.empty(8, np.uint8)
    msg = _finding(checked, "gather_bytes", 1, 32, idx, x, y, np.int32(8))
    assert "read of 1 bytes of uninitialised memory" in msg and "`unsigned char* x` (uint8[8]" in msg
    pixels = np.array([165, 165, 165, 165, 165, 165, 165, 3], np.uint8)  # a run of 165s, as MNIST has
    x = _dev(pixels)
    checked.get_function("gather_bytes")((1,), (32,), (idx, x, y, np.int32(8)))
    np.testing.assert_array_equal(y.get(), pixels)


def test_empty_buffers_hold_the_poison_pattern_under_initcheck(monkeypatch):
    monkeypatch.delenv("GPUMLP_EMU_SANITIZE", raising=False)
    assert np.isnan(cuda_emu.empty(3, np.float32).get()).all()  # default: NaN floats
    monkeypatch.setenv("GPUMLP_EMU_SANITIZE", "initcheck")
    for dtype in (np.int32, np.int64, np.uint32, np.float32, np.float64, np.bool_):
        got = cuda_emu.empty((2, 3), dtype).get()
        assert (got.view(f"u{got.itemsize}") == cuda_host.POISON[got.itemsize]).all(), dtype
    assert np.isnan(cuda_emu.empty(2, np.float64).get()).all()  # still NaN for a float reader


def test_unknown_sanitizer_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("GPUMLP_EMU_SANITIZE", "memcheck,racechek")
    with pytest.raises(ValueError, match=r"unknown \['racechek'\]; use a comma-separated subset of memcheck"):
        cuda_emu.RawModule(code=BROKEN)


def test_sanitizers_need_fiber_threads(monkeypatch):
    monkeypatch.setenv("GPUMLP_EMU_SANITIZE", "racecheck")
    monkeypatch.setenv("GPUMLP_CUDA_EMU_THREADS", "openmp")
    with pytest.raises(ValueError, match="unset GPUMLP_CUDA_EMU_THREADS=openmp"):
        cuda_emu.RawModule(code=BROKEN)


def test_without_sanitizers_the_broken_kernels_run_silently(monkeypatch):
    """The plain build does not check: what the sanitizers add is what the tests above see."""
    monkeypatch.delenv("GPUMLP_EMU_SANITIZE", raising=False)
    plain = cuda_emu.RawModule(code=BROKEN)
    x, y = _dev(np.arange(64, dtype=np.float32)), cuda_emu.zeros(64, dtype=np.float32)
    plain.get_function("neighbour")((1,), (64,), (x, y, np.int32(0)))
    plain.get_function("misaligned")((1,), (32,), (x, y, np.int32(32)))


def test_openmp_threads_build_really_uses_openmp(monkeypatch):
    """GPUMLP_CUDA_EMU_THREADS=openmp must reach g++ (it once changed only the cache key):
    the threads of a block are then distinct OS threads of an OpenMP team."""
    monkeypatch.delenv("GPUMLP_EMU_SANITIZE", raising=False)
    monkeypatch.setenv("GPUMLP_CUDA_EMU_THREADS", "openmp")
    src = 'extern "C" __global__ void who(int* out) { out[threadIdx.x] = omp_get_thread_num(); }'
    out = cuda_emu.zeros(4, dtype=np.int32)
    cuda_emu.RawModule(code=src).get_function("who")((1,), (4,), (out,))
    assert sorted(out.get()) == [0, 1, 2, 3]
