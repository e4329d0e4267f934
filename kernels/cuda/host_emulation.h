// host_emulation.h -- run unchanged CUDA C++ kernels on the CPU.
//
//   g++ -std=c++20 -fopenmp -O2 -shared -fPIC -include host_emulation.h kernels.cu
//
// Thread model (correctness, not speed). Blocks of a grid run one after
// another; the threads of a block (at most 1024; gpumlp's kernels use <= 256) are
//  * by default, fibers (ucontext) on the calling OS thread, scheduled
//    round-robin from barrier to barrier: deterministic, fast, and a barrier
//    that can never complete (divergent __syncthreads) is reported as a
//    deadlock instead of hanging;
//  * with -DCUDA_EMU_OPENMP, an OpenMP team of OS threads, so that races a real
//    GPU could show can show here too (slow: a barrier costs a context switch
//    per thread). cuda_host.py sets it when GPUMLP_CUDA_EMU_THREADS=openmp.
// In both modes:
//  * threadIdx/blockIdx/blockDim/gridDim are thread_local (set per fiber);
//  * __syncthreads() is the block barrier (an orphaned `omp barrier` with OpenMP);
//  * __shared__ is `static`: one copy shared by the whole team, reused by the
//    next block -- sound because one block runs at a time and launches are
//    serialized by a process-wide mutex (like the default stream);
//  * warp shuffles go through a per-warp exchange buffer between two per-warp
//    barriers; every resident lane of the warp must take part (the mask
//    argument is not interpreted: the kernels use FULL_MASK);
//  * atomics are std::atomic_ref; math maps to <cmath>.
//  * wmma (tensor cores) at the level of the documented API, see nvcuda::wmma below.
// Not emulated: dynamic (extern) shared memory, cooperative groups, textures,
// warp votes, clocks.
#pragma once
#define CUDA_HOST_EMULATION 1  // lets a .cu file skip device-only headers such as <mma.h>

#include <math.h>
#include <omp.h>
#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <type_traits>

struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
using uint3 = dim3;

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;
inline constexpr int warpSize = 32;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)

// ------------------------------------------------------------------ math
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }
inline int max(int a, int b) { return a > b ? a : b; }
inline int min(int a, int b) { return a < b ? a : b; }
inline unsigned int max(unsigned int a, unsigned int b) { return a > b ? a : b; }
inline unsigned int min(unsigned int a, unsigned int b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline float max(float a, float b) { return fmaxf(a, b); }
inline float min(float a, float b) { return fminf(a, b); }
inline double max(double a, double b) { return fmax(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline unsigned int __float_as_uint(float x) { return std::bit_cast<unsigned int>(x); }
inline float __uint_as_float(unsigned int x) { return std::bit_cast<float>(x); }

namespace cuda_emu {

inline unsigned int linear_tid() {
    return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
}
inline unsigned int block_threads() { return blockDim.x * blockDim.y * blockDim.z; }

// Two exchange buffers used alternately, so one barrier per shuffle suffices:
// a slot is rewritten two shuffles later, after the next barrier has proven
// that every lane finished reading it.
inline unsigned long long warp_slots[2][1024];
inline std::mutex launch_mutex;

#if defined(CUDA_EMU_OPENMP)
// A reusable barrier for the resident lanes of one warp (sense by phase counter).
struct alignas(64) WarpBarrier {
    std::atomic<unsigned int> arrived{0};
    std::atomic<unsigned int> phase{0};
};
inline WarpBarrier warp_barriers[32];
inline void warp_sync() {
    const unsigned int tid = linear_tid(), base = tid & ~31u;
    const unsigned int lanes = std::min(32u, block_threads() - base);
    WarpBarrier& b = warp_barriers[tid >> 5];
    const unsigned int ph = b.phase.load(std::memory_order_acquire);
    if (b.arrived.fetch_add(1, std::memory_order_acq_rel) + 1 == lanes) {
        b.arrived.store(0, std::memory_order_relaxed);
        b.phase.fetch_add(1, std::memory_order_acq_rel);
        b.phase.notify_all();
        return;
    }
    for (int spin = 0; spin < 256; ++spin)
        if (b.phase.load(std::memory_order_acquire) != ph) return;
    while (b.phase.load(std::memory_order_acquire) == ph) b.phase.wait(ph, std::memory_order_acquire);
}

inline unsigned int& shuffle_counter() {
    static thread_local unsigned int count;
    return count;
}

// Run body() for every thread of every block. 0 = ok, 1 = bad configuration,
// 2 = OpenMP did not give a full team (OMP_THREAD_LIMIT, nested parallelism).
template <typename F>
inline int launch(dim3 grid, dim3 block, F&& body) {
    const unsigned long long nthreads = (unsigned long long)block.x * block.y * block.z;
    if (nthreads == 0 || nthreads > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0)
        return 1;
    std::lock_guard<std::mutex> lock(launch_mutex);
    omp_set_dynamic(0);
    std::atomic<int> status{0};
#pragma omp parallel num_threads((int)nthreads)
    {
        if ((unsigned long long)omp_get_num_threads() != nthreads) {
            status.store(2);
        } else {
            const unsigned int t = (unsigned int)omp_get_thread_num();
            threadIdx = uint3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
            blockDim = block;
            gridDim = grid;
            for (unsigned int bz = 0; bz < grid.z; ++bz)
                for (unsigned int by = 0; by < grid.y; ++by)
                    for (unsigned int bx = 0; bx < grid.x; ++bx) {
                        blockIdx = uint3(bx, by, bz);
                        shuffle_counter() = 0;
                        body();
#pragma omp barrier
                    }
        }
    }
    return status.load();
}

inline void block_barrier() {
#pragma omp barrier
}

#else  // fibers

enum class State : unsigned char { runnable, at_block_barrier, at_warp_barrier, done };
struct Fiber {
    ucontext_t ctx;
    State state;
    unsigned int shuffles;
    char* stack;
};
inline constexpr size_t fiber_stack_bytes = 64 * 1024;
inline Fiber fibers[1024];
inline ucontext_t scheduler;
inline unsigned int current;
inline void (*current_invoke)(void*);
inline void* current_body;

inline void yield_as(State s) {
    fibers[current].state = s;
    swapcontext(&fibers[current].ctx, &scheduler);
}
inline void warp_sync() { yield_as(State::at_warp_barrier); }
inline void block_barrier() { yield_as(State::at_block_barrier); }
inline unsigned int& shuffle_counter() { return fibers[current].shuffles; }

inline void fiber_main() {
    current_invoke(current_body);
    fibers[current].state = State::done;  // returns to uc_link = scheduler
}

// Release the threads whose barrier is complete; false if none can move (deadlock).
inline bool release(unsigned int n) {
    bool moved = false, all_at_block = true;
    for (unsigned int w = 0; w * 32 < n; ++w) {
        const unsigned int lo = w * 32, hi = std::min(n, lo + 32);
        bool all_at_warp = true, any = false;
        for (unsigned int t = lo; t < hi; ++t) {
            const State s = fibers[t].state;
            if (s == State::done) continue;
            any = true;
            all_at_warp &= s == State::at_warp_barrier;
            all_at_block &= s == State::at_block_barrier;
        }
        if (any && all_at_warp) {
            for (unsigned int t = lo; t < hi; ++t)
                if (fibers[t].state == State::at_warp_barrier) fibers[t].state = State::runnable;
            moved = true;
        }
    }
    if (!moved && all_at_block) {
        for (unsigned int t = 0; t < n; ++t)
            if (fibers[t].state == State::at_block_barrier) fibers[t].state = State::runnable, moved = true;
    }
    return moved;
}

// Run body() for every thread of every block. 0 = ok, 1 = bad configuration,
// 3 = deadlock (threads wait at barriers that can never complete).
template <typename F>
inline int launch(dim3 grid, dim3 block, F&& body) {
    const unsigned long long nthreads = (unsigned long long)block.x * block.y * block.z;
    if (nthreads == 0 || nthreads > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0)
        return 1;
    std::lock_guard<std::mutex> lock(launch_mutex);
    const unsigned int n = (unsigned int)nthreads;
    current_invoke = [](void* b) { (*static_cast<std::remove_reference_t<F>*>(b))(); };
    current_body = static_cast<void*>(&body);
    blockDim = block;
    gridDim = grid;
    for (unsigned int t = 0; t < n; ++t)
        if (!fibers[t].stack) fibers[t].stack = new char[fiber_stack_bytes];
    for (unsigned int bz = 0; bz < grid.z; ++bz)
        for (unsigned int by = 0; by < grid.y; ++by)
            for (unsigned int bx = 0; bx < grid.x; ++bx) {
                blockIdx = uint3(bx, by, bz);
                for (unsigned int t = 0; t < n; ++t) {
                    Fiber& f = fibers[t];
                    getcontext(&f.ctx);
                    f.ctx.uc_stack.ss_sp = f.stack;
                    f.ctx.uc_stack.ss_size = fiber_stack_bytes;
                    f.ctx.uc_link = &scheduler;
                    makecontext(&f.ctx, fiber_main, 0);
                    f.state = State::runnable;
                    f.shuffles = 0;
                }
                for (;;) {
                    bool live = false;
                    for (unsigned int t = 0; t < n; ++t) {
                        if (fibers[t].state != State::runnable) {
                            live |= fibers[t].state != State::done;
                            continue;
                        }
                        current = t;
                        threadIdx = uint3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
                        swapcontext(&scheduler, &fibers[t].ctx);
                        live |= fibers[t].state != State::done;
                    }
                    if (!live) break;
                    if (!release(n)) return 3;
                }
            }
    return 0;
}

#endif

// Every resident lane publishes v; returns the value of lane `src` of this warp
// (its own v when src < 0 or src is not resident).
template <typename T>
inline T exchange(T v, int src) {
    static_assert(sizeof(T) <= sizeof(unsigned long long) && std::is_trivially_copyable_v<T>,
                  "shuffles move at most 8 bytes");
    const unsigned int tid = linear_tid(), base = tid & ~31u;
    const int lanes = (int)std::min(32u, block_threads() - base);
    unsigned long long* slots = warp_slots[shuffle_counter()++ & 1u];
    std::memcpy(&slots[tid], &v, sizeof(T));
    warp_sync();
    T r = v;
    if (src >= 0 && src < lanes) std::memcpy(&r, &slots[base + src], sizeof(T));
    return r;
}

inline int lane_id() { return (int)(linear_tid() & 31u); }

}  // namespace cuda_emu

// ------------------------------------------------------------- intrinsics
inline void __syncthreads() { cuda_emu::block_barrier(); }
inline void __syncwarp(unsigned int = 0xffffffffu) { cuda_emu::warp_sync(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }

template <typename T>
inline T __shfl_sync(unsigned int, T v, int src_lane, int width = 32) {
    const int lane = cuda_emu::lane_id();
    return cuda_emu::exchange(v, (lane / width) * width + (src_lane % width));
}
template <typename T>
inline T __shfl_down_sync(unsigned int, T v, unsigned int delta, int width = 32) {
    const int lane = cuda_emu::lane_id();
    return cuda_emu::exchange(v, (lane % width) + (int)delta < width ? lane + (int)delta : -1);
}
template <typename T>
inline T __shfl_up_sync(unsigned int, T v, unsigned int delta, int width = 32) {
    const int lane = cuda_emu::lane_id();
    return cuda_emu::exchange(v, (lane % width) >= (int)delta ? lane - (int)delta : -1);
}
template <typename T>
inline T __shfl_xor_sync(unsigned int, T v, int lane_mask, int width = 32) {
    const int lane = cuda_emu::lane_id(), src = lane ^ lane_mask;
    return cuda_emu::exchange(v, src / width == lane / width ? src : -1);
}

template <typename T, typename U>
inline T atomicAdd(T* addr, U v) {
    return std::atomic_ref<T>(*addr).fetch_add(static_cast<T>(v), std::memory_order_relaxed);
}
template <typename T, typename U>
inline T atomicSub(T* addr, U v) {
    return std::atomic_ref<T>(*addr).fetch_sub(static_cast<T>(v), std::memory_order_relaxed);
}
template <typename T, typename U>
inline T atomicExch(T* addr, U v) {
    return std::atomic_ref<T>(*addr).exchange(static_cast<T>(v), std::memory_order_relaxed);
}
template <typename T, typename U>
inline T atomicMax(T* addr, U v) {
    std::atomic_ref<T> a(*addr);
    T old = a.load(std::memory_order_relaxed);
    while (old < static_cast<T>(v) && !a.compare_exchange_weak(old, static_cast<T>(v))) {
    }
    return old;
}
template <typename T, typename U>
inline T atomicMin(T* addr, U v) {
    std::atomic_ref<T> a(*addr);
    T old = a.load(std::memory_order_relaxed);
    while (old > static_cast<T>(v) && !a.compare_exchange_weak(old, static_cast<T>(v))) {
    }
    return old;
}
template <typename T, typename U, typename V>
inline T atomicCAS(T* addr, U compare, V val) {
    T expected = static_cast<T>(compare);
    std::atomic_ref<T>(*addr).compare_exchange_strong(expected, static_cast<T>(val));
    return expected;
}

// ------------------------------------------------------------------- wmma
// Warp matrix operations as the CUDA C++ API documents them. The real mapping of
// fragment elements to lanes is unspecified, so here every lane holds the whole
// tile: loads and mma_sync are computed by every lane alike, and store_matrix_sync
// writes element e from lane e % 32 (disjoint, race-free writes). mma_sync adds in
// float, k ascending; tensor cores add in another order (within float rounding).
// Only the m16n16k8 TF32 shape with float accumulators (what gemm.cu uses).
namespace nvcuda::wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
namespace precision {
struct tf32 {};
}  // namespace precision

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
    static_assert(M == 16 && N == 16 && K == 8, "the emulation has only the m16n16k8 (TF32) shape");
    static constexpr int rows = std::is_same_v<Use, matrix_b> ? K : M;
    static constexpr int cols = std::is_same_v<Use, matrix_a> ? K : N;
    static constexpr int num_elements = rows * cols;
    float x[num_elements];  // row-major op(tile)
};

template <typename Use, int M, int N, int K, typename T, typename L>
inline void fill_fragment(fragment<Use, M, N, K, T, L>& f, float v) {
    for (float& e : f.x) e = v;
}

template <typename Use, int M, int N, int K, typename T, typename L>
inline void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const float* p, unsigned int ldm) {
    using F = fragment<Use, M, N, K, T, L>;
    static_assert(std::is_same_v<L, row_major> || std::is_same_v<L, col_major>, "a and b carry a layout");
    for (int r = 0; r < F::rows; ++r)
        for (int c = 0; c < F::cols; ++c)
            f.x[r * F::cols + c] = std::is_same_v<L, row_major> ? p[r * ldm + c] : p[c * ldm + r];
}

template <typename TA, typename LA, typename TB, typename LB>
inline void mma_sync(fragment<accumulator, 16, 16, 8, float>& d, const fragment<matrix_a, 16, 16, 8, TA, LA>& a,
                     const fragment<matrix_b, 16, 16, 8, TB, LB>& b,
                     const fragment<accumulator, 16, 16, 8, float>& c) {
    float out[16 * 16];
    for (int i = 0; i < 16; ++i)
        for (int j = 0; j < 16; ++j) {
            float s = c.x[i * 16 + j];
            for (int k = 0; k < 8; ++k) s += a.x[i * 8 + k] * b.x[k * 16 + j];
            out[i * 16 + j] = s;
        }
    std::memcpy(d.x, out, sizeof out);
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 8, float>& f, unsigned int ldm,
                              layout_t layout) {
    for (int e = cuda_emu::lane_id(); e < 16 * 16; e += 32) {
        const int r = e / 16, c = e % 16;
        p[layout == mem_row_major ? r * ldm + c : c * ldm + r] = f.x[e];
    }
}
}  // namespace nvcuda::wmma
