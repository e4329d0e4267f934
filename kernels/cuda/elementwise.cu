// Dense-layer tail kernels: bias + activation, activation backward, bias
// gradient (column sums); the on-device minibatch gather (of floats, or of 8-bit codes
// decoded), with or without shift augmentation, and the on-device shuffle.
// Contract: kernels/reference.py (bias_act, act_grad, bias_grad, gather_rows, gather_pixels,
// gather_shifted, permutation).
#include "device_common.h"

// y = act(z + b), and pre = z + b when keep. z, out, pre: (B, N) as n = B*N elements; b: (N,).
template <typename T>
__device__ void bias_act_impl(const T* __restrict__ z, const T* __restrict__ b, T* __restrict__ out,
                              T* __restrict__ pre, long long n, int ncol, int act, int keep, T slope) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const T s = z[i] + b[i % ncol];
        if (keep) pre[i] = s;
        out[i] = activate(s, act, slope);
    }
}

// out = grad_out * act'(.) from y and the pre-activation pre (y itself where act does not need it).
template <typename T>
__device__ void act_grad_impl(const T* __restrict__ grad_out, const T* __restrict__ y, const T* __restrict__ pre,
                              T* __restrict__ out, long long n, int act, T slope) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        out[i] = grad_out[i] * activate_grad(y[i], pre[i], act, slope);
    }
}

// out[c] = sum_r g[r, c]. Block (32, COL_Y) owns 32 columns; grid.x = ceil(N / 32).
template <typename T>
__device__ void bias_grad_impl(const T* __restrict__ g, T* __restrict__ out, int nrow, int ncol) {
    __shared__ T scratch[COL_Y][32];
    const int col = blockIdx.x * 32 + threadIdx.x;
    T acc = T(0);
    if (col < ncol) {
        for (int r = threadIdx.y; r < nrow; r += COL_Y) acc += g[(long long)r * ncol + col];
    }
    acc = column_sum(acc, scratch);
    if (threadIdx.y == 0 && col < ncol) out[col] = acc;
}

// out[b, :] = src[idx[b], :], rows of `width` elements; n = B * width.
template <typename T, typename I>
__device__ void gather_rows_impl(const T* __restrict__ src, const I* __restrict__ idx, T* __restrict__ out,
                                 long long n, long long width) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const long long row = i / width;
        out[i] = src[(long long)idx[row] * width + (i - row * width)];
    }
}

// A pixel as the gathers write it: a float as it is; an 8-bit code as code / divisor + offset,
// scale_pixels' arithmetic (an IEEE division, as without fast math, and no multiply-add to contract).
template <typename T>
__device__ inline T decoded(T value, T, T) { return value; }
template <typename T>
__device__ inline T decoded(unsigned char code, T divisor, T offset) { return (T)code / divisor + offset; }

// out[b, :] = the codes of row idx[b], decoded; rows of `width` uint8 codes; n = B * width.
template <typename T>
__device__ void gather_pixels_impl(const unsigned char* __restrict__ codes, const int* __restrict__ idx,
                                   T* __restrict__ out, long long n, long long width, T divisor, T offset) {
    GRID_STRIDE(i, n) {
        const long long row = i / width;
        out[i] = decoded(codes[(long long)idx[row] * width + (i - row * width)], divisor, offset);
    }
}

// Row r of out = the side x side image src[idx[r]] shifted by (dy, dx) drawn from
// h = philox_word(seed, *step, r), edge pixels repeated; n = B * side * side. src: float images
// (S = T), or 8-bit codes (S = unsigned char) decoded with divisor and offset.
template <typename T, typename S>
__device__ void shifted_rows(const S* __restrict__ src, const int* __restrict__ idx, T* __restrict__ out,
                             long long n, int side, int max_shift, unsigned long long seed,
                             const long long* __restrict__ step, T divisor, T offset) {
    const long long t = *step;
    const unsigned int span = 2 * max_shift + 1;
    const long long width = (long long)side * side;
    GRID_STRIDE(i, n) {
        const long long row = i / width;
        const int pixel = (int)(i - row * width), y = pixel / side, x = pixel - y * side;
        const unsigned int h = philox_word(seed, t, row);
        const int dy = (int)((h & 0xffffu) % span) - max_shift, dx = (int)((h >> 16) % span) - max_shift;
        const int sy = min(max(y - dy, 0), side - 1), sx = min(max(x - dx, 0), side - 1);
        out[i] = decoded(src[(long long)idx[row] * width + sy * side + sx], divisor, offset);
    }
}

template <typename T>
__device__ void gather_shifted_impl(const T* __restrict__ src, const int* __restrict__ idx,
                                    T* __restrict__ out, long long n, int side, int max_shift,
                                    unsigned long long seed, const long long* __restrict__ step) {
    shifted_rows<T, T>(src, idx, out, n, side, max_shift, seed, step, T(1), T(0));
}

template <typename T>
__device__ void gather_shifted_pixels_impl(const unsigned char* __restrict__ codes, const int* __restrict__ idx,
                                           T* __restrict__ out, long long n, int side, int max_shift,
                                           unsigned long long seed, const long long* __restrict__ step,
                                           T divisor, T offset) {
    shifted_rows<T, unsigned char>(codes, idx, out, n, side, max_shift, seed, step, divisor, offset);
}

GPUMLP_F32_F64(bias_act, (const T* __restrict__ z, const T* __restrict__ b, T* __restrict__ out,
                         T* __restrict__ pre, long long n, int ncol, int act, int keep, T slope),
               (z, b, out, pre, n, ncol, act, keep, slope))

GPUMLP_F32_F64(act_grad, (const T* __restrict__ grad_out, const T* __restrict__ y, const T* __restrict__ pre,
                         T* __restrict__ out, long long n, int act, T slope),
               (grad_out, y, pre, out, n, act, slope))

GPUMLP_F32_F64(bias_grad, (const T* __restrict__ g, T* __restrict__ out, int nrow, int ncol), (g, out, nrow, ncol))

GPUMLP_F32_F64_SUFFIX(gather_rows, _i32, (const T* __restrict__ src, const int* __restrict__ idx,
                                          T* __restrict__ out, long long n, long long width), (src, idx, out, n, width))
GPUMLP_F32_F64_SUFFIX(gather_rows, _i64, (const T* __restrict__ src, const long long* __restrict__ idx,
                                          T* __restrict__ out, long long n, long long width), (src, idx, out, n, width))

GPUMLP_F32_F64(gather_pixels, (const unsigned char* __restrict__ codes, const int* __restrict__ idx,
                              T* __restrict__ out, long long n, long long width, T divisor, T offset),
               (codes, idx, out, n, width, divisor, offset))

GPUMLP_F32_F64(gather_shifted, (const T* __restrict__ src, const int* __restrict__ idx, T* __restrict__ out,
                               long long n, int side, int max_shift, unsigned long long seed,
                               const long long* __restrict__ step), (src, idx, out, n, side, max_shift, seed, step))

GPUMLP_F32_F64(gather_shifted_pixels,
               (const unsigned char* __restrict__ codes, const int* __restrict__ idx, T* __restrict__ out,
                long long n, int side, int max_shift, unsigned long long seed, const long long* __restrict__ step,
                T divisor, T offset),
               (codes, idx, out, n, side, max_shift, seed, step, divisor, offset))

// permutation(): keys[i] = word(i) << 32 | i. They are distinct, so sorting them gives the
// reference's stable argsort of the words whatever the sort.
extern "C" __global__ void perm_keys_u64(unsigned long long* __restrict__ keys, long long n,
                                         unsigned long long seed, long long epoch) {
    GRID_STRIDE(i, n) { keys[i] = (unsigned long long)philox_word(seed, epoch, i) << 32 | i; }
}

// The permutation from the sorted keys: their low 32 bits.
extern "C" __global__ void perm_index_u64(const unsigned long long* __restrict__ keys, int* __restrict__ out,
                                          long long n) {
    GRID_STRIDE(i, n) { out[i] = (int)(keys[i] & 0xffffffffull); }
}
