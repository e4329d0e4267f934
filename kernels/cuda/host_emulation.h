// host_emulation.h -- run unchanged CUDA C++ kernels on the CPU.
//
//   g++ -std=c++20 -fopenmp -O2 -shared -fPIC -include host_emulation.h kernels.cu
//
// Thread model (correctness, not speed). Blocks of a grid run one after
// another; the threads of a block (at most 1024; gpumlp's kernels use <= 256) are
//  * by default, fibers (ucontext) on the calling OS thread, scheduled
//    round-robin from barrier to barrier: deterministic, fast, and a barrier
//    that can never complete (divergent __syncthreads) is reported as a
//    deadlock instead of hanging. The launch's seed orders the blocks and each
//    sweep of the threads: in order (0), reversed (1) or seeded random; the
//    racecheck sanitizer (cuda_host.py) compares the outputs of these schedules;
//  * with -DCUDA_EMU_OPENMP, an OpenMP team of OS threads, so that races a real
//    GPU could show can show here too (slow: a barrier costs a context switch
//    per thread). cuda_host.py sets it when GPUMLP_CUDA_EMU_THREADS=openmp.
// In both modes:
//  * threadIdx/blockIdx/blockDim/gridDim are thread_local (set per fiber);
//  * __syncthreads() is the block barrier (an orphaned `omp barrier` with OpenMP);
//  * __shared__ is `static`: one copy shared by the whole team, reused by the
//    next block -- sound because one block runs at a time and the launches of
//    a library are serialized by its mutex (g++ -fno-gnu-unique keeps the state
//    of each library its own);
//  * warp shuffles go through a per-warp exchange buffer between two per-warp
//    barriers; every resident lane of the warp must take part (the mask
//    argument is not interpreted: the kernels use FULL_MASK);
//  * atomics are std::atomic_ref; math maps to <cmath>.
//  * wmma (tensor cores) at the level of the documented API, see nvcuda::wmma below.
// With -DCUDA_EMU_MEMCHECK (fibers only) every memory access of the kernels is
// checked: see "memcheck and initcheck" below.
// Not emulated: dynamic (extern) shared memory, cooperative groups, textures,
// warp votes, clocks.
#pragma once
#define CUDA_HOST_EMULATION 1  // lets a .cu file skip device-only headers such as <mma.h>

#include <math.h>
#include <link.h>
#include <omp.h>
#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <numeric>
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

// ------------------------------------------------ launch options and report
// One per launch, filled by cuda_host.py (a ctypes mirror of these structs).
struct Region {                 // a pointer argument of the kernel
    unsigned long long start;   // its address
    unsigned long long bytes;   // its extent
    unsigned int elem;          // its element size (0: its loads are not checked for the poison pattern)
    unsigned int pad;
};
enum Fault : unsigned int { no_fault, out_of_bounds, misaligned, uninitialised, trapped };
enum Check : unsigned int { check_bounds = 1, check_init = 2 };
struct LaunchInfo {
    unsigned long long seed;    // in: order of blocks and threads: 0 in order, 1 reversed, else seeded random
    const Region* regions;      // in: the pointer arguments (sanitizer builds)
    unsigned int nregions;      // in
    unsigned int checks;        // in: Check bits (sanitizer builds)
    const Region* shared;       // in: the kernels' __shared__ variables (racecheck)
    unsigned int nshared;       // in
    int shared_fill;            // in: byte each block's shared memory starts with; < 0: left as it is
    unsigned int fault;         // out: the first Fault, which ended the launch
    unsigned int size;          // out: bytes accessed
    unsigned int is_write;      // out
    unsigned int float_atomics; // out: a float atomic ran (its sums depend on the order)
    unsigned long long addr;    // out: address accessed
    unsigned int thread[3];     // out: threadIdx of the faulting thread
    unsigned int block[3];      // out: blockIdx of the faulting thread
};

// Two exchange buffers used alternately, so one barrier per shuffle suffices:
// a slot is rewritten two shuffles later, after the next barrier has proven
// that every lane finished reading it.
inline unsigned long long warp_slots[2][1024];
inline std::mutex launch_mutex;
inline LaunchInfo* info;  // of the launch in progress (set under launch_mutex)
inline std::atomic<bool> float_atomics;

// The schedule: successive values of a seeded splitmix64 stream.
inline unsigned long long rng_state;
inline unsigned long long next_random() {
    unsigned long long z = (rng_state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// Block k of the visiting order of n blocks: in order, reversed, or an affine
// permutation (a * k + b) mod n with a odd and coprime to n, for a seeded schedule.
struct BlockOrder {
    unsigned long long n, a = 1, b = 0;
    bool reversed = false;
    BlockOrder(unsigned long long n_, unsigned long long seed) : n(n_), reversed(seed == 1) {
        if (seed < 2) return;
        do a = next_random() % n | 1; while (std::gcd(a, n) != 1);
        b = next_random() % n;
    }
    uint3 operator()(unsigned long long k) const {
        const unsigned long long i = reversed ? n - 1 - k : (unsigned long long)(((__uint128_t)a * k + b) % n);
        return uint3(i % gridDim.x, (i / gridDim.x) % gridDim.y, i / ((unsigned long long)gridDim.x * gridDim.y));
    }
};

inline uint3 thread_index(unsigned int t, dim3 block) {
    return uint3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
}

#if defined(CUDA_EMU_OPENMP)
#if defined(CUDA_EMU_MEMCHECK)
#error "the memcheck/initcheck build runs the threads of a block as fibers"
#endif
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

inline void block_barrier() {
#pragma omp barrier
}

// All blocks with one OpenMP team (the OS decides the order of threads). 0 = ok,
// 2 = OpenMP did not give a full team (OMP_THREAD_LIMIT, nested parallelism).
template <typename F>
inline int run_grid(dim3 grid, dim3 block, const BlockOrder& order, F& body) {
    const unsigned int n = block.x * block.y * block.z;
    omp_set_dynamic(0);
    std::atomic<int> status{0};
#pragma omp parallel num_threads((int)n)
    {
        if ((unsigned int)omp_get_num_threads() != n) {
            status.store(2);
        } else {
            threadIdx = thread_index((unsigned int)omp_get_thread_num(), block);
            blockDim = block;
            gridDim = grid;
            for (unsigned long long k = 0; k < order.n; ++k) {
                blockIdx = order(k);
                shuffle_counter() = 0;
                body();
#pragma omp barrier
            }
        }
    }
    return status.load();
}

#else  // fibers

enum class State : unsigned char { runnable, at_block_barrier, at_warp_barrier, done, faulted };
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
inline bool in_kernel;  // a fiber runs (the sanitizer hooks check only then)
inline void (*current_invoke)(void*);
inline void* current_body;
inline size_t current_body_bytes;  // the launch's closure (the kernel's arguments, by value)

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

// The order in which one sweep visits the n threads of a block.
inline void thread_order(unsigned int* order, unsigned int n, unsigned long long seed) {
    for (unsigned int i = 0; i < n; ++i) order[i] = seed == 1 ? n - 1 - i : i;
    if (seed >= 2)
        for (unsigned int i = n - 1; i > 0; --i) std::swap(order[i], order[next_random() % (i + 1)]);
}

// One block: sweep over the runnable fibers, each running to its next barrier,
// until all are done. 0 = ok, 3 = deadlock, 4 = a sanitizer fault ended it.
inline int run_block(dim3 block, unsigned long long seed) {
    const unsigned int n = block.x * block.y * block.z;
    unsigned int order[1024];
    if (info->shared_fill >= 0)  // stale shared memory differs between schedules, as on a GPU
        for (unsigned int r = 0; r < info->nshared; ++r)
            std::memset((void*)info->shared[r].start, info->shared_fill, info->shared[r].bytes);
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
        thread_order(order, n, seed);
        for (unsigned int i = 0; i < n; ++i) {
            const unsigned int t = order[i];
            if (fibers[t].state != State::runnable) {
                live |= fibers[t].state != State::done;
                continue;
            }
            current = t;
            threadIdx = thread_index(t, block);
            in_kernel = true;
            swapcontext(&scheduler, &fibers[t].ctx);
            in_kernel = false;
            if (fibers[t].state == State::faulted) return 4;
            live |= fibers[t].state != State::done;
        }
        if (!live) return 0;
        if (!release(n)) return 3;
    }
}

template <typename F>
inline int run_grid(dim3, dim3 block, const BlockOrder& order, F& body) {
    current_invoke = [](void* b) { (*static_cast<F*>(b))(); };
    current_body = static_cast<void*>(&body);
    current_body_bytes = sizeof(F);
    for (unsigned int t = 0; t < block.x * block.y * block.z; ++t)
        if (!fibers[t].stack) fibers[t].stack = new char[fiber_stack_bytes];
    for (unsigned long long k = 0; k < order.n; ++k) {
        blockIdx = order(k);
        if (const int rc = run_block(block, info->seed)) return rc;
    }
    return 0;
}

#endif

#if defined(CUDA_EMU_MEMCHECK)
// ------------------------------------------------ memcheck and initcheck
// cuda_host.py compiles with -fsanitize=kernel-address and outline checks, so g++
// calls __asan_{load,store}{1,2,4,8,16,N}_noabort(address) before every memory
// access of the kernel code; no sanitizer runtime is linked, these are ours.
// While a fiber runs, an access must lie in a pointer argument of the launch
// (global memory), in this library's own segments (__shared__ statics, constants),
// in the fiber's stack or in the thread-local indices; global accesses must be
// naturally aligned, and a load (initcheck) must not read the poison pattern
// that `empty` leaves in a buffer (cuda_host.POISON). The first fault is
// recorded in the LaunchInfo and ends the launch (rc 4), as a GPU aborts the
// kernel, so the bad write does not corrupt the host process.
struct Span {
    uintptr_t lo, hi;
};
inline Span module_spans[16];
inline int n_module_spans = -1;

__attribute__((no_sanitize_address)) inline int add_module_spans(dl_phdr_info* i, size_t, void*) {
    const uintptr_t me = (uintptr_t)&fibers;
    bool mine = false;
    for (int k = 0; k < i->dlpi_phnum; ++k) {
        const uintptr_t lo = i->dlpi_addr + i->dlpi_phdr[k].p_vaddr;
        mine |= i->dlpi_phdr[k].p_type == PT_LOAD && me - lo < i->dlpi_phdr[k].p_memsz;
    }
    if (!mine) return 0;
    n_module_spans = 0;
    for (int k = 0; k < i->dlpi_phnum && n_module_spans < 16; ++k)
        if (i->dlpi_phdr[k].p_type == PT_LOAD) {
            const uintptr_t lo = i->dlpi_addr + i->dlpi_phdr[k].p_vaddr;
            module_spans[n_module_spans++] = Span{lo, lo + i->dlpi_phdr[k].p_memsz};
        }
    return 1;
}

template <typename T>
__attribute__((no_sanitize_address)) inline bool within(uintptr_t a, size_t size, const T& object) {
    return a - (uintptr_t)&object < sizeof(T) && a + size <= (uintptr_t)&object + sizeof(T);
}

// Memory of a block that is not global memory: __shared__ and other statics, the
// launch's closure, the thread-local indices (the fiber's stack is checked first).
__attribute__((no_sanitize_address)) inline bool private_memory(uintptr_t a, size_t size) {
    if (n_module_spans < 0) dl_iterate_phdr(add_module_spans, nullptr);
    for (int k = 0; k < n_module_spans; ++k)
        if (a - module_spans[k].lo < module_spans[k].hi - module_spans[k].lo) return true;
    return a - (uintptr_t)current_body < current_body_bytes || within(a, size, threadIdx) ||
           within(a, size, blockIdx) || within(a, size, blockDim) || within(a, size, gridDim) ||
           within(a, size, errno);  // g++ inlines math's errno stores
}

// Does the element at a hold the poison pattern of its size? The patterns are cuda_host.POISON,
// passed by cuda_host.py as -DCUDA_EMU_POISON<bytes>.
#if !defined(CUDA_EMU_POISON1) || !defined(CUDA_EMU_POISON2) || !defined(CUDA_EMU_POISON4) || \
    !defined(CUDA_EMU_POISON8)
#error "the checked build needs -DCUDA_EMU_POISON1/2/4/8 (cuda_host.CHECKED_FLAGS passes them)"
#endif
__attribute__((no_sanitize_address)) inline bool poisoned(uintptr_t a, size_t size) {
    switch (size) {
        case 1: return *(const unsigned char*)a == CUDA_EMU_POISON1;
        case 2: return *(const unsigned short*)a == CUDA_EMU_POISON2;
        case 4: return *(const unsigned int*)a == CUDA_EMU_POISON4;
        case 8: return *(const unsigned long long*)a == CUDA_EMU_POISON8;
        default: return false;
    }
}

[[noreturn]] __attribute__((no_sanitize_address)) inline void fault(Fault kind, uintptr_t a, size_t size,
                                                                  bool write) {
    info->fault = kind;
    info->addr = a;
    info->size = (unsigned int)size;
    info->is_write = write;
    const uint3 t = threadIdx, b = blockIdx;
    info->thread[0] = t.x, info->thread[1] = t.y, info->thread[2] = t.z;
    info->block[0] = b.x, info->block[1] = b.y, info->block[2] = b.z;
    yield_as(State::faulted);  // the scheduler abandons this fiber
    __builtin_unreachable();
}

// sized: a fixed-size access (natural alignment required); false for __asan_*N.
__attribute__((no_sanitize_address)) inline void check_access(uintptr_t a, size_t size, bool write, bool sized) {
    if (!in_kernel || a - (uintptr_t)fibers[current].stack < fiber_stack_bytes) return;  // locals
    const LaunchInfo& li = *info;
    for (unsigned int r = 0; r < li.nregions; ++r) {
        const Region& g = li.regions[r];
        if (a - g.start >= g.bytes) continue;
        if ((li.checks & check_bounds) && a + size > g.start + g.bytes) fault(out_of_bounds, a, size, write);
        if ((li.checks & check_bounds) && sized && (a & (size - 1))) fault(misaligned, a, size, write);
        if ((li.checks & check_init) && !write && size == g.elem && poisoned(a, size))
            fault(uninitialised, a, size, write);
        return;
    }
    if ((li.checks & check_bounds) && !private_memory(a, size)) fault(out_of_bounds, a, size, write);
}

}  // namespace cuda_emu

#define CUDA_EMU_HOOKS(n)                                                                                      \
    extern "C" __attribute__((no_sanitize_address)) void __asan_load##n##_noabort(uintptr_t a) {             \
        cuda_emu::check_access(a, n, false, true);                                                           \
    }                                                                                                          \
    extern "C" __attribute__((no_sanitize_address)) void __asan_store##n##_noabort(uintptr_t a) {            \
        cuda_emu::check_access(a, n, true, true);                                                            \
    }
CUDA_EMU_HOOKS(1)
CUDA_EMU_HOOKS(2)
CUDA_EMU_HOOKS(4)
CUDA_EMU_HOOKS(8)
CUDA_EMU_HOOKS(16)
#undef CUDA_EMU_HOOKS
extern "C" __attribute__((no_sanitize_address)) void __asan_loadN_noabort(uintptr_t a, size_t n) {
    cuda_emu::check_access(a, n, false, false);
}
extern "C" __attribute__((no_sanitize_address)) void __asan_storeN_noabort(uintptr_t a, size_t n) {
    cuda_emu::check_access(a, n, true, false);
}
extern "C" void __asan_handle_no_return() {}

namespace cuda_emu {
#endif  // CUDA_EMU_MEMCHECK

// Run body() for every thread of every block, in the order info->seed says.
// 0 = ok, 1 = bad configuration, 2 = no full OpenMP team, 3 = deadlock,
// 4 = a sanitizer fault (described in *li).
template <typename F>
inline int launch(dim3 grid, dim3 block, LaunchInfo* li, F&& body) {
    const unsigned long long nthreads = (unsigned long long)block.x * block.y * block.z;
    if (nthreads == 0 || nthreads > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0)
        return 1;
    std::lock_guard<std::mutex> lock(launch_mutex);
    info = li;
    rng_state = li->seed;
    float_atomics.store(false, std::memory_order_relaxed);
    blockDim = block;
    gridDim = grid;
    const BlockOrder order((unsigned long long)grid.x * grid.y * grid.z, li->seed);
    const int rc = run_grid(grid, block, order, body);
    li->float_atomics = float_atomics.load(std::memory_order_relaxed);
    return rc;
}

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
// __trap(): a GPU aborts the kernel (the launch fails). Fibers: the thread stops and the launch ends
// with fault `trapped` (rc 4), which cuda_host.py raises; OpenMP threads cannot stop alone: abort.
#if defined(CUDA_EMU_OPENMP)
[[noreturn]] inline void __trap() {
    std::fputs("cuda-emu: a kernel called __trap()\n", stderr);
    std::abort();
}
#else
__attribute__((no_sanitize_address)) inline void __trap() {
    const uint3 t = threadIdx, b = blockIdx;
    cuda_emu::info->fault = cuda_emu::trapped;
    cuda_emu::info->thread[0] = t.x, cuda_emu::info->thread[1] = t.y, cuda_emu::info->thread[2] = t.z;
    cuda_emu::info->block[0] = b.x, cuda_emu::info->block[1] = b.y, cuda_emu::info->block[2] = b.z;
    cuda_emu::yield_as(cuda_emu::State::faulted);  // the scheduler abandons this fiber
}
#endif
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

// Float sums depend on the order of the additions (racecheck allows for that).
template <typename T>
inline void note_float_sum() {
    if constexpr (std::is_floating_point_v<T>) cuda_emu::float_atomics.store(true, std::memory_order_relaxed);
}
template <typename T, typename U>
inline T atomicAdd(T* addr, U v) {
    note_float_sum<T>();
    return std::atomic_ref<T>(*addr).fetch_add(static_cast<T>(v), std::memory_order_relaxed);
}
template <typename T, typename U>
inline T atomicSub(T* addr, U v) {
    note_float_sum<T>();
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
__attribute__((no_sanitize_address)) inline void fill_fragment(fragment<Use, M, N, K, T, L>& f, float v) {
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
__attribute__((no_sanitize_address)) inline void mma_sync(fragment<accumulator, 16, 16, 8, float>& d, const fragment<matrix_a, 16, 16, 8, TA, LA>& a,
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
