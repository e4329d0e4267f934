// Device helpers shared by kernels/cuda/*.cu (activations, Philox, reductions).
//
// Included by every .cu file. cupy_gpu.py pastes it into the source it hands to
// NVRTC (so no include path is needed); nvcc and the host emulation find it
// with -I. The include guard makes pasting it more than once harmless.
//
// Launch conventions used by the kernels:
//  * 1-D element kernels use grid-stride loops, so any grid size is correct.
//  * Row kernels (one block per row, grid-stride over rows) need blockDim.x a
//    multiple of 32 and at most MAX_BLOCK (256): the host emulation runs a block
//    as a team of OS threads, and 256 keeps that affordable.
//  * Column kernels use blockDim = (32, COL_Y): 32 columns x COL_Y row lanes.
#ifndef GPUMLP_DEVICE_COMMON_H
#define GPUMLP_DEVICE_COMMON_H

#define FULL_MASK 0xffffffffu
#define MAX_BLOCK 256
#define COL_Y 8

// 1-D grid-stride loop over n elements: correct for any grid size.
#define GRID_STRIDE(i, n)                                                            \
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < (n); \
         i += (long long)gridDim.x * blockDim.x)

// The float32 and float64 kernels of a templated body, with one parameter list:
//   GPUMLP_F32_F64(name, (T* __restrict__ w, const T* __restrict__ g, long long n, T lr), (w, g, n, lr))
// defines extern "C" name_f32 and name_f64, whose parameters are the list with T = float and
// T = double, each calling name_impl(args). T is an alias in a namespace of each kernel's own (a
// using-declaration brings the kernel back to file scope); C linkage keeps the plain symbol name.
// kernels/cuda_host.py's parse_kernels expands it the same way (tests/test_cuda_kernels.py checks
// that against the compilers). An old hand-written f32/f64 pair converts mechanically: keep the f32
// parameter list with float -> T and the call's arguments.
#define GPUMLP_KERNEL_AS(kname, type, name, params, args)   \
    namespace gpumlp_##kname {                             \
    using T = type;                                        \
    extern "C" __global__ void kname params { name##_impl args; } \
    }                                                      \
    using gpumlp_##kname::kname;
// GPUMLP_F32_F64_SUFFIX(name, suffix, params, args): the same, named name_f32<suffix> and name_f64<suffix>.
#define GPUMLP_F32_F64_SUFFIX(name, suffix, params, args)                \
    GPUMLP_KERNEL_AS(name##_f32##suffix, float, name, params, args)      \
    GPUMLP_KERNEL_AS(name##_f64##suffix, double, name, params, args)
#define GPUMLP_F32_F64(name, params, args) GPUMLP_F32_F64_SUFFIX(name, , params, args)

// Activation codes: the table in kernels/activations.py (tests/test_activations.py checks them).
#define ACT_IDENTITY 0
#define ACT_SIGMOID 1
#define ACT_TANH 2
#define ACT_RELU 3
#define ACT_LEAKY_RELU 4
#define ACT_GELU 5
#define ACT_GELU_TANH 6
#define ACT_SILU 7
#define ACT_SOFTPLUS 8

// Precision-matched math: the float overloads keep float32 kernels in float32.
__device__ __forceinline__ float dev_exp(float x) { return expf(x); }
__device__ __forceinline__ double dev_exp(double x) { return exp(x); }
__device__ __forceinline__ float dev_log(float x) { return logf(x); }
__device__ __forceinline__ double dev_log(double x) { return log(x); }
__device__ __forceinline__ float dev_log1p(float x) { return log1pf(x); }
__device__ __forceinline__ double dev_log1p(double x) { return log1p(x); }
__device__ __forceinline__ float dev_tanh(float x) { return tanhf(x); }
__device__ __forceinline__ double dev_tanh(double x) { return tanh(x); }
__device__ __forceinline__ float dev_sqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double dev_sqrt(double x) { return sqrt(x); }
__device__ __forceinline__ float dev_erfc(float x) { return erfcf(x); }
__device__ __forceinline__ double dev_erfc(double x) { return erfc(x); }
__device__ __forceinline__ float dev_expm1(float x) { return expm1f(x); }
__device__ __forceinline__ double dev_expm1(double x) { return expm1(x); }

template <typename T>
__device__ __forceinline__ T dev_max(T a, T b) { return b > a ? b : a; }

template <typename T>
__device__ __forceinline__ T dev_sign(T x) { return T((x > T(0)) - (x < T(0))); }

template <typename T>
__device__ __forceinline__ T dev_sigmoid(T x) { return T(1) / (T(1) + dev_exp(-x)); }

// GELU's constants (activations.py): 1/sqrt(2), 1/sqrt(2 pi), sqrt(2/pi) and the tanh approximation's A.
#define GELU_INV_SQRT2 0.70710678118654752440
#define GELU_INV_SQRT_2PI 0.39894228040143267794
#define GELU_SQRT_2_OVER_PI 0.79788456080286535588
#define GELU_TANH_A 0.044715

// The tanh approximation's sigmoid(2u), u = sqrt(2/pi) (s + A s^3): (1 + tanh u) / 2 without cancellation.
template <typename T>
__device__ __forceinline__ T gelu_tanh_p(T s) {
    return dev_sigmoid(T(2) * T(GELU_SQRT_2_OVER_PI) * (s + T(GELU_TANH_A) * s * s * s));
}

// act(s) for an activation code; slope is reference.LEAKY_SLOPE. An unknown code traps (a GPU
// aborts the kernel; the host emulation reports the launch as failed) instead of guessing.
template <typename T>
__device__ __forceinline__ T activate(T s, int act, T slope) {
    switch (act) {
        case ACT_IDENTITY: return s;
        case ACT_SIGMOID: return T(1) / (T(1) + dev_exp(-s));
        case ACT_TANH: return dev_tanh(s);
        case ACT_RELU: return s <= T(0) ? T(0) : s;  // NaN stays NaN, as the reference's np.maximum
        case ACT_LEAKY_RELU: return s > T(0) ? s : s * slope;
        case ACT_GELU: return T(0.5) * s * dev_erfc(-s * T(GELU_INV_SQRT2));
        case ACT_GELU_TANH: return s * gelu_tanh_p(s);
        case ACT_SILU: return s * dev_sigmoid(s);
        case ACT_SOFTPLUS: return dev_max(s, T(0)) + dev_log1p(dev_exp(-dev_max(s, -s)));
        default: __trap(); return s;
    }
}

// act'(.) through the activation's output y, or its pre-activation s where the table says so.
template <typename T>
__device__ __forceinline__ T activate_grad(T y, T s, int act, T slope) {
    switch (act) {
        case ACT_IDENTITY: return T(1);
        case ACT_SIGMOID: return y * (T(1) - y);
        case ACT_TANH: return T(1) - y * y;
        case ACT_RELU: return y > T(0) ? T(1) : T(0);
        case ACT_LEAKY_RELU: return y > T(0) ? T(1) : slope;
        case ACT_GELU:
            return T(0.5) * dev_erfc(-s * T(GELU_INV_SQRT2)) + s * T(GELU_INV_SQRT_2PI) * dev_exp(T(-0.5) * s * s);
        case ACT_GELU_TANH: {
            const T p = gelu_tanh_p(s), du = T(GELU_SQRT_2_OVER_PI) * (T(1) + T(3 * GELU_TANH_A) * s * s);
            return p + T(2) * s * p * (T(1) - p) * du;
        }
        case ACT_SILU: {
            const T p = dev_sigmoid(s);
            return p * (T(1) + s * (T(1) - p));
        }
        case ACT_SOFTPLUS: return -dev_expm1(-y);  // sigmoid(s) = 1 - e^-y
        default: __trap(); return T(1);
    }
}

// Counter-based random words, as reference._hash32: element i of the stream (seed, step) is
// word i % 4 of Philox4x32-10 (Salmon et al., SC'11; Random123's and cuRAND's generator) with
// counter (i / 4, 0, step mod 2^32, step / 2^32) and key (seed mod 2^32, seed / 2^32).
__device__ __forceinline__ unsigned int philox_word(unsigned long long seed, long long step, long long i) {
    unsigned int c0 = (unsigned int)((unsigned long long)i >> 2), c1 = 0u;
    unsigned int c2 = (unsigned int)step, c3 = (unsigned int)((unsigned long long)step >> 32);
    unsigned int k0 = (unsigned int)seed, k1 = (unsigned int)(seed >> 32);
    for (int r = 0; r < 10; ++r) {
        if (r) {
            k0 += 0x9E3779B9u;
            k1 += 0xBB67AE85u;
        }
        const unsigned long long p0 = 0xD2511F53ull * c0, p1 = 0xCD9E8D57ull * c2;
        const unsigned int n0 = (unsigned int)(p1 >> 32) ^ c1 ^ k0, n2 = (unsigned int)(p0 >> 32) ^ c3 ^ k1;
        c1 = (unsigned int)p1;
        c3 = (unsigned int)p0;
        c0 = n0;
        c2 = n2;
    }
    switch (i & 3) {
        case 0: return c0;
        case 1: return c1;
        case 2: return c2;
        default: return c3;
    }
}

// uniform in [0, 1) of element i of the stream (seed, step), as reference.hash_uniform.
__device__ __forceinline__ double philox_uniform(unsigned long long seed, long long step, long long i) {
    return (double)(philox_word(seed, step, i) >> 8) * (1.0 / 16777216.0);
}

// op(X)[r, c] of a stored matrix, zero outside [0, rows) x [0, cols) of op(X).
template <typename T>
__device__ __forceinline__ T gemm_load(const T* __restrict__ x, int r, int c, int rows, int cols, int ld,
                                       int trans) {
    if (r >= rows || c >= cols) return T(0);
    return trans ? x[(long long)c * ld + r] : x[(long long)r * ld + c];
}

// Butterfly reductions: every lane of the warp gets the result.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
    for (int o = 16; o > 0; o >>= 1) v = dev_max(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

// Sum over a 1-D block (blockDim.x a multiple of 32); every thread gets it.
// scratch: the caller's __shared__ T[32]. Must be reached by all threads.
template <typename T>
__device__ T block_sum(T v, T* scratch) {
    if (blockDim.x == 32) return warp_sum(v);  // one warp: no shared-memory stage
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();  // earlier readers of scratch are done
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    if (warp == 0) {
        T w = warp_sum(lane < nwarps ? scratch[lane] : T(0));
        if (lane == 0) scratch[0] = w;
    }
    __syncthreads();
    return scratch[0];
}

// Max over a 1-D block; same rules as block_sum.
template <typename T>
__device__ T block_max(T v, T* scratch) {
    if (blockDim.x == 32) return warp_max(v);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    if (warp == 0) {
        T w = warp_max(scratch[lane < nwarps ? lane : 0]);
        if (lane == 0) scratch[0] = w;
    }
    __syncthreads();
    return scratch[0];
}

// Sum over threadIdx.y of a (32, COL_Y) block, in a fixed order; every thread
// of the column gets it. scratch: the caller's __shared__ T[COL_Y][32].
template <typename T>
__device__ T column_sum(T v, T (*scratch)[32]) {
    __syncthreads();
    scratch[threadIdx.y][threadIdx.x] = v;
    __syncthreads();
    T r = T(0);
    for (int j = 0; j < COL_Y; ++j) r += scratch[j][threadIdx.x];
    return r;
}

#endif  // GPUMLP_DEVICE_COMMON_H
