"""CUDA kernels without a GPU: nvcc compile checks, the host emulation, the emulated
device's strictness, hand-made reduction cases, and a real-CuPy check that skips
with the reason when no GPU is usable.

Kernel-vs-reference parity over every backend lives in test_kernel_parity.py.
"""

from __future__ import annotations

import inspect
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from gpumlp.backend import BackendUnavailable, get_backend
from gpumlp.kernels import cuda_emu, cuda_host, reference

CUDA_DIR = Path(cuda_host.__file__).parent / "cuda"
CU_FILES = sorted(CUDA_DIR.glob("*.cu"))
NVCC = shutil.which("nvcc") or ("/usr/local/bin/nvcc" if os.access("/usr/local/bin/nvcc", os.X_OK) else None)


@pytest.fixture(scope="module")
def emu():
    """The cuda-emu backend (builds the kernels once; cached across runs)."""
    return get_backend("cuda-emu")


def _rel_err(got, ref) -> float:
    return float(np.max(np.abs(got - ref) / (1e-6 + np.abs(ref)))) if np.size(ref) else 0.0


# ------------------------------------------------------------------- nvcc
def test_there_are_kernel_sources():
    assert {p.stem for p in CU_FILES} >= {"elementwise", "losses", "optim", "dropout_bn"}


@pytest.mark.skipif(NVCC is None, reason="nvcc not found: CUDA compile check skipped")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("cu", CU_FILES, ids=lambda p: p.name)
def test_nvcc_compiles_without_warnings(cu: Path, arch: str, tmp_path: Path):
    cmd = [NVCC, "-ptx", f"-arch={arch}", "--Werror", "all-warnings", f"-I{CUDA_DIR}", str(cu)]
    proc = subprocess.run([*cmd, "-o", str(tmp_path / "k.ptx")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert ".entry" in (tmp_path / "k.ptx").read_text()


def _signature_asserts(kernels: dict) -> str:
    """C++ static_asserts that each kernel's type is exactly the parsed parameter list."""
    lines = ["#include <type_traits>"]
    for name, params in kernels.items():
        types = ", ".join(f"{'const ' if p.const else ''}{p.base}{'*' if p.pointer else ''}" for p in params)
        lines.append(f'static_assert(std::is_same_v<decltype(&{name}), void (*)({types})>, "{name}");')
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("cu", CU_FILES, ids=lambda p: p.name)
def test_parsed_kernels_are_what_the_compilers_build(cu: Path, tmp_path: Path):
    """parse_kernels expands GPUMLP_F32_F64 itself: its kernels and parameter types must be the
    compilers' (g++ with the host emulation; nvcc, whose PTX also lists every kernel it built)."""
    kernels = cuda_host.parse_kernels(cu.read_text())
    assert kernels and "GPUMLP_F32_F64" not in "".join(kernels)
    check = tmp_path / "check.cu"
    check.write_text(f'#include "{cu}"\n' + _signature_asserts(kernels))
    gxx = ["g++", *cuda_host.CXXFLAGS, "-fsyntax-only", "-x", "c++", "-include", cuda_host.EMULATION_HEADER]
    proc = subprocess.run([*gxx, f"-I{CUDA_DIR}", check], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if NVCC is None:
        pytest.skip("nvcc not found: checked against g++ only")
    ptx = tmp_path / "k.ptx"
    proc = subprocess.run([NVCC, "-ptx", "-arch=sm_80", f"-I{CUDA_DIR}", str(check), "-o", str(ptx)],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert set(re.findall(r"\.entry (\w+)\(", ptx.read_text())) == set(kernels)


def test_parse_kernels_expands_the_float_pair_macro():
    src = "GPUMLP_F32_F64(axpy, (const T* __restrict__ x, T* y, long long n, T a, double d), (x, y, n, a, d))"
    kernels = cuda_host.parse_kernels(src)
    assert {k: [p.describe() for p in v] for k, v in kernels.items()} == {
        "axpy_f32": ["float* x", "float* y", "long long n", "float a", "double d"],
        "axpy_f64": ["double* x", "double* y", "long long n", "double a", "double d"],
    }
    assert [p.const for p in kernels["axpy_f32"]] == [True, False, False, False, False]
    src = "GPUMLP_F32_F64_SUFFIX(take, _i64, (const T* x, const long long* i, T* y), (x, i, y))"
    assert {k: [p.describe() for p in v] for k, v in cuda_host.parse_kernels(src).items()} == {
        "take_f32_i64": ["float* x", "long long* i", "float* y"],
        "take_f64_i64": ["double* x", "long long* i", "double* y"],
    }


def test_nvrtc_source_is_self_contained():
    """What RawModule gets has device_common.h pasted in: no include path of ours needed (CUDA's
    own headers, such as gemm_tc.cu's <mma.h>, come from the include path CuPy gives NVRTC)."""
    from gpumlp.kernels import cupy_gpu

    for cu in CU_FILES:
        src = cupy_gpu._source(cu.stem)
        assert '#include "' not in src and "GPUMLP_DEVICE_COMMON_H" in src


# --------------------------------------------------------- host emulation
TINY = r"""
#include "device_common.h"
extern "C" __global__ void scale(const float* __restrict__ x, float* y, long long n, float a, int k) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += stride)
        y[i] = a * x[i] + k;
}
"""


def test_parse_kernel_signatures():
    (name, params), *_ = cuda_host.parse_kernels(TINY).items()
    assert name == "scale"
    assert [p.describe() for p in params] == ["float* x", "float* y", "long long n", "float a", "int k"]


def test_host_build_is_cached(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("GPUMLP_CACHE", str(tmp_path))
    so = cuda_host.build(TINY)
    assert so.parent == tmp_path / "cuda_emu" and so.exists()
    mtime = so.stat().st_mtime_ns
    assert cuda_host.build(TINY) == so and so.stat().st_mtime_ns == mtime
    assert [p.name for p in so.parent.iterdir()] == [so.name]  # no temp dirs left behind


def test_host_build_error_is_readable(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("GPUMLP_CACHE", str(tmp_path))
    with pytest.raises(RuntimeError, match="host-emulation build failed"):
        cuda_host.build('extern "C" __global__ void broken(float* x) { x[0] = undefined_name; }')


@pytest.fixture(scope="module")
def tiny():
    return cuda_emu.RawModule(code=TINY).get_function("scale")


def test_emulated_launch_runs(tiny):
    x = cuda_emu.asarray(np.arange(1000, dtype=np.float32))
    y = cuda_emu.zeros(1000, dtype=np.float32)
    tiny((3,), (64,), (x, y, 1000, np.float32(2), np.int32(1)))
    np.testing.assert_array_equal(y.get(), 2 * np.arange(1000, dtype=np.float32) + 1)


@pytest.mark.parametrize(
    ("pos", "bad", "match"),
    [
        (3, 2.0, r"kernel scale, parameter float a: expected numpy.float32, got Python.float"),
        (3, np.float64(2), r"parameter float a: expected numpy.float32, got numpy.float64"),
        (4, 1, r"parameter int k: expected numpy.int32, got Python.int"),
        (2, np.int32(5), r"parameter long long n: expected Python.int or numpy.int64"),
        (0, 12345, r"parameter float\* x: expected a device array, got int"),
        (0, np.zeros(4, np.float32), r"parameter float\* x: expected a device array, got ndarray"),
        (
            1,
            cuda_emu.zeros(4, dtype=np.float64),
            r"parameter float\* y: expected a float32 array, got float64",
        ),
    ],
)
def test_launch_rejects_wrong_c_types(tiny, pos, bad, match):
    args = [
        cuda_emu.zeros(4, dtype=np.float32),
        cuda_emu.zeros(4, dtype=np.float32),
        4,
        np.float32(1),
        np.int32(0),
    ]
    args[pos] = bad
    with pytest.raises(TypeError, match=match):
        tiny((1,), (32,), tuple(args))


def test_launch_rejects_bad_shapes(tiny):
    x = cuda_emu.zeros((4, 4), dtype=np.float32)
    with pytest.raises(TypeError, match="takes 5 arguments"):
        tiny((1,), (32,), (x, x))
    with pytest.raises(ValueError, match="not C-contiguous"):
        tiny((1,), (32,), (x.T, x, 16, np.float32(1), np.int32(0)))
    with pytest.raises(RuntimeError, match="bad launch configuration"):
        tiny((1,), (2048,), (x, x, 16, np.float32(1), np.int32(0)))


@pytest.mark.skipif(
    os.environ.get("GPUMLP_CUDA_EMU_THREADS", "fibers") != "fibers", reason="with OS threads it would hang"
)
def test_divergent_barrier_is_reported_as_deadlock():
    src = r"""extern "C" __global__ void stuck(int* x) {
        if (threadIdx.x == 0) __syncthreads(); else __syncwarp();
        x[threadIdx.x] = 1;
    }"""
    stuck = cuda_emu.RawModule(code=src).get_function("stuck")
    with pytest.raises(RuntimeError, match="deadlock"):
        stuck((1,), (32,), (cuda_emu.zeros(32, dtype=np.int32),))


# Warp shuffles, partial warps, block/column reductions and atomics, checked by hand.
REDUCE = r"""
#include "device_common.h"
// out[t] for each thread t of one block: the four shuffles' results, then the block sum.
extern "C" __global__ void shuffles(const int* __restrict__ x, int* __restrict__ out) {
    const int t = threadIdx.x, lane = t & 31, n = blockDim.x;
    const int v = x[t];
    out[0 * n + t] = __shfl_down_sync(FULL_MASK, v, 3);
    out[1 * n + t] = __shfl_xor_sync(FULL_MASK, v, 5);
    out[2 * n + t] = __shfl_up_sync(FULL_MASK, v, 2);
    out[3 * n + t] = __shfl_sync(FULL_MASK, v, (lane + 7) & 31);
}
extern "C" __global__ void sums(const double* __restrict__ x, double* __restrict__ out,
                                double* __restrict__ total, int rows, int cols) {
    __shared__ double scratch[32];
    for (int r = blockIdx.x; r < rows; r += gridDim.x) {
        double s = 0;
        for (int k = threadIdx.x; k < cols; k += blockDim.x) s += x[(long long)r * cols + k];
        const double bs = block_sum(s, scratch);
        const int t = threadIdx.x;
        const double bm = block_max(t < cols ? x[(long long)r * cols + t] : -1e300, scratch);
        if (threadIdx.x == 0) {
            out[2 * r] = bs;
            out[2 * r + 1] = bm;
            atomicAdd(total, bs);
        }
    }
}
"""


@pytest.fixture(scope="module")
def reduce_mod():
    return cuda_emu.RawModule(code=REDUCE)


@pytest.mark.parametrize("block", [32, 64, 48, 256])
def test_warp_shuffles(reduce_mod, block):
    x = np.arange(block, dtype=np.int32) * 7 + 1
    out = cuda_emu.zeros(4 * block, dtype=np.int32)
    reduce_mod.get_function("shuffles")((1,), (block,), (cuda_emu.asarray(x), out))
    got = out.get().reshape(4, block)
    t = np.arange(block)
    lane, base = t & 31, t & ~31
    resident = np.minimum(32, block - base)  # lanes of each thread's warp that exist

    def expect(src_lane, valid):
        src = base + src_lane
        ok = valid & (src_lane < resident)
        return np.where(ok, x[np.where(ok, src, 0)], x)

    np.testing.assert_array_equal(got[0], expect(lane + 3, lane + 3 < 32))
    np.testing.assert_array_equal(got[1], expect(lane ^ 5, np.ones(block, bool)))
    np.testing.assert_array_equal(got[2], expect(lane - 2, lane >= 2))
    np.testing.assert_array_equal(got[3], expect((lane + 7) & 31, np.ones(block, bool)))


@pytest.mark.parametrize(("block", "cols"), [(32, 1), (32, 33), (64, 10), (256, 1000), (128, 300)])
def test_block_reductions(reduce_mod, block, cols):
    rows = 5
    x = np.random.default_rng(cols).standard_normal((rows, cols))
    out, total = cuda_emu.zeros(2 * rows), cuda_emu.zeros(())
    reduce_mod.get_function("sums")(
        (2,), (block,), (cuda_emu.asarray(x), out, total, np.int32(rows), np.int32(cols))
    )
    got = out.get().reshape(rows, 2)
    np.testing.assert_allclose(got[:, 0], x.sum(axis=1), rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(got[:, 1], x[:, :block].max(axis=1))
    np.testing.assert_allclose(float(total.get()), x.sum(), rtol=1e-12)


# --------------------------------------------------- hand-made kernel cases
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("k", [1, 10, 33, 1000])
def test_softmax_xent_rows_crossing_block_sizes(emu, k, dtype):
    rng = np.random.default_rng(k)
    rows = 7
    logits = (rng.standard_normal((rows, k)) * 4).astype(dtype)
    logits[0, 0] = 80  # exp() would overflow float32 without the max shift
    labels = rng.integers(0, k, rows).astype(np.int32)
    loss, grad = emu.k.softmax_xent(emu.asarray(logits), emu.asarray(labels), grad_scale=1 / rows)
    ref_loss, ref_grad = reference.softmax_xent(logits, labels, grad_scale=1 / rows)
    tol = 1e-5 if dtype == np.float32 else 1e-12  # float32: a few ulps from exp/log and summation order
    assert loss.shape == () and loss.dtype == dtype
    np.testing.assert_allclose(emu.to_host(loss), ref_loss, rtol=tol)
    np.testing.assert_allclose(emu.to_host(grad), ref_grad, rtol=tol, atol=tol / rows)
    np.testing.assert_allclose(emu.to_host(grad).sum(axis=1), 0, atol=10 * tol)  # softmax rows sum to 1


def test_correct_count_across_many_blocks(emu):
    rng = np.random.default_rng(3)
    scores = rng.standard_normal((3000, 10)).astype(np.float32)
    labels = rng.integers(0, 10, 3000)
    got = emu.k.correct_count(emu.asarray(scores), emu.asarray(labels))
    assert got.shape == () and got.dtype == np.int64
    assert int(emu.to_host(got)) == int(reference.correct_count(scores, labels))


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.999])
def test_dropout_masks_bit_identical(emu, p):
    x = np.random.default_rng(0).standard_normal((33, 71)).astype(np.float32)
    out, mask = emu.k.dropout_forward(emu.asarray(x), p, seed=2**35 + 11)
    ref_out, ref_mask = reference.dropout_forward(x, p, seed=2**35 + 11)
    np.testing.assert_array_equal(emu.to_host(mask), ref_mask)
    np.testing.assert_array_equal(emu.to_host(out), ref_out)
    np.testing.assert_array_equal(emu.to_host(emu.k.hash_uniform(-5, 999)), reference.hash_uniform(-5, 999))


# ------------------------------------------------------ the emulated device
def test_backend_exposes_exactly_the_contract(emu):
    imported = {"annotations", "np"}  # reference's imports, not part of the contract
    assert {n for n in dir(emu.k) if not n.startswith("_")} == set(vars(reference)) - imported - {
        n for n in vars(reference) if n.startswith("_")
    }
    for name in (n for n in vars(reference) if not n.startswith("_") and n not in imported):
        ref = getattr(reference, name)
        if inspect.isfunction(ref):
            assert inspect.signature(getattr(emu.k, name)) == inspect.signature(ref), name
    assert emu.name == "cuda-emu" and "emulated" in emu.description


def test_backend_rejects_host_arrays(emu):
    z = np.zeros((2, 3), np.float32)
    with pytest.raises(TypeError, match="host numpy array, not a device array"):
        emu.k.bias_act(z, emu.asarray(np.zeros(3, np.float32)), "relu")
    with pytest.raises(ValueError, match="unknown activation"):
        emu.k.bias_act(emu.asarray(z), emu.asarray(np.zeros(3, np.float32)), "swish")


def test_emulated_losses_check_labels(emu):
    z = emu.asarray(np.zeros((2, 3), np.float32))
    for loss in ("softmax_xent", "sigmoid_bce", "mse"):
        with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
            getattr(emu.k, loss)(z, emu.asarray(np.array([0, 3])))


def test_emulated_arrays_stay_on_the_device():
    a = cuda_emu.asarray(np.arange(6.0).reshape(2, 3))
    with pytest.raises(TypeError, match="Implicit conversion"):
        np.asarray(a)
    with pytest.raises(TypeError, match="host numpy.ndarray"):
        a + np.ones(3)
    with pytest.raises(TypeError, match="host numpy.ndarray"):
        cuda_emu.sum(np.ones(3))
    h = a.get()
    h[0, 0] = 99
    assert a.get()[0, 0] == 0  # .get() is a copy
    b = a
    b += 1
    b[:, 0] *= 2
    assert b is a and a.get().tolist() == [[2, 2, 3], [8, 5, 6]]
    assert isinstance(cuda_emu.sqrt(a), cuda_emu.ndarray) and isinstance(a.sum(), cuda_emu.ndarray)
    assert float(cuda_emu.sum(a)) == 26 and a.T.shape == (3, 2) and a.dtype == cuda_emu.float64
    assert np.isnan(cuda_emu.empty(3, dtype=np.float32).get()).all()  # garbage is visible


def test_graph_capture_replays_launches(tiny):
    x = cuda_emu.asarray(np.ones(8, np.float32))
    y = cuda_emu.zeros(8, dtype=np.float32)
    stream = cuda_emu.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        tiny((1,), (32,), (x, y, 8, np.float32(3), np.int32(0)))
        tiny((1,), (32,), (y, x, 8, np.float32(1), np.int32(1)))
        graph = stream.end_capture()
    assert y.get().sum() == 0  # recorded, not run
    idx = cuda_emu.asarray(np.array([1]))
    work = {
        "in-place add": lambda: x.__iadd__(1),
        "allocation": lambda: cuda_emu.zeros(3),
        "get": lambda: x.get(),
        "fill": lambda: x.fill(0),
        "fancy indexing": lambda: x[idx],
        "host read": lambda: float(x[0]),
        "reduction": lambda: x.sum(),
    }
    with stream:
        stream.begin_capture()
        assert x[2:].shape == (6,) and x.reshape(2, 4).shape == (2, 4)  # views: no device work
        for what, fn in work.items():
            with pytest.raises(cuda_emu.CaptureError, match="captures a CUDA graph"):
                fn()
                pytest.fail(f"{what} ran during capture")
        stream.end_capture()
    graph.launch(stream)
    graph.launch(stream)
    stream.synchronize()  # the replays ran on a non-blocking stream: wait for it before reading
    np.testing.assert_array_equal(x.get(), np.full(8, 13, np.float32))  # x -> 3x+1, twice
    assert cuda_emu.cuda.runtime.getDeviceCount() == 1
    cuda_emu.cuda.Device().synchronize()


# ------------------------------------------------------------------ real GPU
@pytest.mark.gpu
def test_real_cupy_backend():
    try:
        be = get_backend("cupy")
    except BackendUnavailable as e:
        pytest.skip(str(e))
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((300, 10)).astype(np.float32)
    labels = rng.integers(0, 10, 300).astype(np.int32)
    loss, grad = be.k.softmax_xent(be.asarray(logits), be.asarray(labels), grad_scale=1 / 300)
    ref_loss, ref_grad = reference.softmax_xent(logits, labels, grad_scale=1 / 300)
    be.synchronize()
    np.testing.assert_allclose(be.to_host(loss), ref_loss, rtol=1e-5)
    np.testing.assert_allclose(be.to_host(grad), ref_grad, rtol=1e-5, atol=1e-7)
    _, mask = be.k.dropout_forward(be.asarray(logits), 0.3, seed=7)
    np.testing.assert_array_equal(be.to_host(mask), reference.dropout_forward(logits, 0.3, seed=7)[1])
    a, b = rng.standard_normal((64, 32)).astype(np.float32), rng.standard_normal((48, 32)).astype(np.float32)
    got = be.to_host(be.k.matmul(be.asarray(a), be.asarray(b), trans_b=True))
    np.testing.assert_allclose(got, a @ b.T, rtol=1e-4, atol=1e-4)
    assert be.name == "cupy" and "CuPy" in be.description
