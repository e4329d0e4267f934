"""The emulated device's streams: CUDA's ordering rules, the happens-before race checker
(StreamRaceError) and the deferred schedule that turns ordering bugs into wrong numbers."""

import gc
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from gpumlp.kernels import cuda_emu, cuda_host

AXPY = r"""
extern "C" __global__ void axpy(const float* __restrict__ x, float* __restrict__ y, float a, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = a * x[i] + y[i];
}
"""
cuda = cuda_emu.cuda


@pytest.fixture(scope="module")
def axpy():
    return cuda_emu.RawModule(code=AXPY).get_function("axpy")


def _launch(kernel, x, y, a=2.0):
    kernel((1,), (64,), (x, y, np.float32(a), np.int32(x.size)))


def _synced_pair(n=16):
    """x = 0..n-1 and y = 1 on the device, uploaded and waited for."""
    x, y = cuda_emu.asarray(np.arange(n, dtype=np.float32)), cuda_emu.ones(n, dtype=np.float32)
    cuda.Device().synchronize()
    return x, y


def test_write_on_one_stream_read_on_another_needs_an_event(axpy):
    x, y = _synced_pair()
    s1, s2 = cuda.Stream(non_blocking=True), cuda.Stream(non_blocking=True)
    with s1:
        _launch(axpy, x, y)  # writes y on s1
    with s2, pytest.raises(cuda_emu.StreamRaceError) as err:
        _launch(axpy, y, x)  # reads y on s2, nothing orders it after s1's write
    msg = str(err.value)
    assert "kernel axpy reads a float32 (16,) device buffer allocated at tests/test_cuda_streams.py:" in msg
    assert f"on stream {s2._id} (non-blocking), but kernel axpy wrote it on stream {s1._id}" in msg
    with s2:
        s2.wait_event(s1.record())
        _launch(axpy, y, x)  # x = 2 * (2 * x + 1) + x
    s2.synchronize()
    np.testing.assert_array_equal(x.get(), 5 * np.arange(16) + 2)


def test_host_read_without_sync_is_a_race(axpy):
    x, y = _synced_pair()
    s = cuda.Stream(non_blocking=True)
    with s:
        _launch(axpy, x, y)
    for read in (y.get, lambda: float(y[3]), y.tolist, lambda: cuda_emu.asnumpy(y)):
        with pytest.raises(
            cuda_emu.StreamRaceError, match="on the legacy null stream, but kernel axpy wrote"
        ):
            read()
    assert y.get(stream=s)[3] == 7  # a read on the writer's stream waits for it
    assert float(y[3]) == 7  # and the host has now waited for s
    with s:
        _launch(axpy, x, y)
        done = s.record()
    done.synchronize()  # so does waiting for an event recorded after the write
    assert y.get()[3] == 13


def test_the_result_of_an_array_op_is_written_on_its_stream(axpy):
    """A new array made by arithmetic on a non-blocking stream is that stream's write: reading it
    on the host without waiting for the stream is a race."""
    x, _ = _synced_pair()
    s = cuda.Stream(non_blocking=True)
    with s:
        doubled = x * 2
    with pytest.raises(cuda_emu.StreamRaceError, match="on the legacy null stream, but numpy.multiply wrote"):
        doubled.get()
    s.synchronize()
    assert doubled.get()[0] == 2 * x.get()[0]


def test_graph_replayed_on_a_stream_that_does_not_wait_for_its_inputs(axpy):
    x, y = _synced_pair()
    capture, other = cuda.Stream(non_blocking=True), cuda.Stream(non_blocking=True)
    with capture:
        capture.begin_capture()
        _launch(axpy, x, y)
        graph = capture.end_capture()
    with other:
        x[...] = 5  # the graph's input, written on another stream
    with pytest.raises(cuda_emu.StreamRaceError, match="graph replay of kernel axpy reads"):
        graph.launch(capture)
    capture.wait_event(other.record())
    graph.launch(capture)
    capture.synchronize()
    np.testing.assert_array_equal(y.get(), np.full(16, 11))


def test_the_legacy_null_stream_synchronises_with_blocking_streams_only(axpy):
    x, y = _synced_pair()
    blocking = cuda.Stream()
    with blocking:
        _launch(axpy, x, y)
    _launch(axpy, y, x)  # the null stream waits for the blocking stream's work
    with blocking:
        _launch(axpy, x, y)  # and the blocking stream for the null stream's
    non_blocking = cuda.Stream(non_blocking=True)
    with non_blocking:
        with pytest.raises(cuda_emu.StreamRaceError, match=r"wrote it on stream \d+ \(blocking\)"):
            _launch(axpy, y, x)


def test_a_collected_blocking_stream_still_orders_the_null_stream(axpy):
    """A blocking stream that is garbage collected leaves the emulator's set of blocking streams,
    and the null stream stays ordered after what that stream waited for."""
    x, y = _synced_pair()
    other = cuda.Stream(non_blocking=True)
    with other:
        _launch(axpy, x, y)  # writes y on a stream the null stream does not wait for
    blocking = cuda.Stream()
    blocking.wait_event(other.record())  # ... but this blocking stream does
    ident = blocking._id
    del blocking
    gc.collect()
    assert ident not in {s._id for s in cuda_emu._BLOCKING}
    _launch(axpy, y, x)  # the null stream waits for the (collected) blocking stream's wait
    for _ in range(50):
        cuda.Stream()
    gc.collect()
    assert len(cuda_emu._BLOCKING) < 50


def test_uploads_are_asynchronous_and_ordered_by_events(axpy):
    """A host-to-device copy is work on the current stream: another stream must wait for it."""
    x, y = cuda_emu.asarray(np.ones(16, np.float32)), cuda_emu.zeros(16, dtype=np.float32)
    s = cuda.Stream(non_blocking=True)
    with s, pytest.raises(cuda_emu.StreamRaceError, match="asarray \\(a host-to-device copy\\) wrote it"):
        _launch(axpy, x, y)
    s.wait_event(cuda.Stream.null.record())
    with s:
        _launch(axpy, x, y)
    s.synchronize()
    assert y.get().tolist() == [2.0] * 16


def test_disjoint_slices_on_two_streams_are_not_a_race(axpy):
    x, y = _synced_pair(64)
    s1, s2 = cuda.Stream(non_blocking=True), cuda.Stream(non_blocking=True)
    with s1:
        _launch(axpy, x[:32], y[:32])
    with s2:
        _launch(axpy, x[32:], y[32:])  # reads of x overlap nothing written; y halves are disjoint
        with pytest.raises(cuda_emu.StreamRaceError, match=r"\(bytes 124\.\.128\)"):
            _launch(axpy, x[31:33], y[31:33])  # y[31] was written on s1
    cuda.Device().synchronize()
    np.testing.assert_array_equal(y.get(), 2 * np.arange(64) + 1)


def test_concurrent_reads_of_a_const_input_are_not_a_race(axpy):
    other = 'extern "C" __global__ void f(float const* a, float* const b) {}'
    params = cuda_host.parse_kernels(AXPY + other)
    assert [p.const for p in params["axpy"]] == [True, False, False, False]
    assert [p.const for p in params["f"]] == [True, False]  # b: a const pointer to writable floats
    x, y = _synced_pair()
    z = cuda_emu.ones(16, dtype=np.float32)
    cuda.Device().synchronize()
    s1, s2 = cuda.Stream(non_blocking=True), cuda.Stream(non_blocking=True)
    with s1:
        _launch(axpy, x, y)
    with s2:
        _launch(axpy, x, z)  # x is const float*: two readers
    with s2, pytest.raises(cuda_emu.StreamRaceError, match=r"add\(\) writes"):
        cuda_emu.add(x, 1, out=x)  # but writing it races with s1's read


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **env}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=120
    )


UNORDERED = f"""
    import numpy as np
    from gpumlp.kernels import cuda_emu
    k = cuda_emu.RawModule(code={AXPY!r}).get_function("axpy")
    y = cuda_emu.zeros(16, dtype=np.float32)
    x = cuda_emu.asarray(np.ones(16, np.float32))  # uploaded on the null stream (queued when deferred)
    s = cuda_emu.cuda.Stream(non_blocking=True)
    WAIT
    with s:
        k((1,), (64,), (x, y, np.float32(2), np.int32(16)))
    cuda_emu.cuda.Device().synchronize()
    print(y.get()[0])
"""


def _deferred(script: str, seeds: range, racecheck: str = "0") -> list[str]:
    outs = []
    for seed in seeds:
        env = {"GPUMLP_EMU_SCHEDULE": f"deferred:{seed}", "GPUMLP_EMU_RACECHECK": racecheck}
        proc = _run(script, **env)
        assert proc.returncode == 0, proc.stderr
        outs.append(proc.stdout.strip())
    return outs


def test_deferred_schedule_turns_a_missing_wait_into_wrong_numbers():
    """With the checker off, the unordered upload shows as garbage (NaN) for some seeds; with the
    event wait, or on a blocking stream (ordered after the null stream's work), every seed gives 2."""
    unordered = _deferred(UNORDERED.replace("WAIT", ""), range(6))
    assert "nan" in unordered and "2.0" in unordered, unordered  # the order is the seed's
    waits = UNORDERED.replace("WAIT", "s.wait_event(cuda_emu.cuda.Stream.null.record())")
    assert set(_deferred(waits, range(3))) == {"2.0"}
    blocking = UNORDERED.replace("non_blocking=True", "").replace("WAIT", "")
    assert set(_deferred(blocking, range(3), racecheck="1")) == {"2.0"}


def test_racecheck_is_on_by_default_and_off_with_the_variable():
    on = _run(UNORDERED.replace("WAIT", ""))
    assert on.returncode == 1 and "StreamRaceError: kernel axpy reads a float32 (16,)" in on.stderr
    off = _run(UNORDERED.replace("WAIT", ""), GPUMLP_EMU_RACECHECK="0")
    assert off.returncode == 0 and off.stdout.strip() == "2.0", off.stderr  # eager: runs in issue order


def test_bad_schedule_is_a_clear_error():
    proc = _run("from gpumlp.kernels import cuda_emu", GPUMLP_EMU_SCHEDULE="lazy")
    assert "GPUMLP_EMU_SCHEDULE='lazy': expected eager, deferred or deferred:SEED" in proc.stderr
