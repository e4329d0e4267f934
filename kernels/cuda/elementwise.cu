// Dense-layer tail kernels: bias + activation, activation backward, bias
// gradient (column sums) and the on-device minibatch gather.
// Contract: kernels/reference.py (bias_act, act_grad, bias_grad, gather_rows).
#include "device_common.h"

// y = act(z + b). z, out: (B, N) as n = B*N elements; b: (N,).
template <typename T>
__device__ void bias_act_impl(const T* __restrict__ z, const T* __restrict__ b, T* __restrict__ out,
                              long long n, int ncol, int act, T slope) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        out[i] = activate(z[i] + b[i % ncol], act, slope);
    }
}

// out = grad_out * act'(y), elementwise over n values.
template <typename T>
__device__ void act_grad_impl(const T* __restrict__ grad_out, const T* __restrict__ y, T* __restrict__ out,
                              long long n, int act, T slope) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        out[i] = grad_out[i] * activate_grad(y[i], act, slope);
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

extern "C" __global__ void bias_act_f32(const float* __restrict__ z, const float* __restrict__ b,
                                        float* __restrict__ out, long long n, int ncol, int act,
                                        float slope) {
    bias_act_impl(z, b, out, n, ncol, act, slope);
}
extern "C" __global__ void bias_act_f64(const double* __restrict__ z, const double* __restrict__ b,
                                        double* __restrict__ out, long long n, int ncol, int act,
                                        double slope) {
    bias_act_impl(z, b, out, n, ncol, act, slope);
}

extern "C" __global__ void act_grad_f32(const float* __restrict__ grad_out, const float* __restrict__ y,
                                        float* __restrict__ out, long long n, int act, float slope) {
    act_grad_impl(grad_out, y, out, n, act, slope);
}
extern "C" __global__ void act_grad_f64(const double* __restrict__ grad_out, const double* __restrict__ y,
                                        double* __restrict__ out, long long n, int act, double slope) {
    act_grad_impl(grad_out, y, out, n, act, slope);
}

extern "C" __global__ void bias_grad_f32(const float* __restrict__ g, float* __restrict__ out, int nrow,
                                         int ncol) {
    bias_grad_impl(g, out, nrow, ncol);
}
extern "C" __global__ void bias_grad_f64(const double* __restrict__ g, double* __restrict__ out, int nrow,
                                         int ncol) {
    bias_grad_impl(g, out, nrow, ncol);
}

extern "C" __global__ void gather_rows_f32_i32(const float* __restrict__ src, const int* __restrict__ idx,
                                               float* __restrict__ out, long long n, long long width) {
    gather_rows_impl(src, idx, out, n, width);
}
extern "C" __global__ void gather_rows_f32_i64(const float* __restrict__ src,
                                               const long long* __restrict__ idx, float* __restrict__ out,
                                               long long n, long long width) {
    gather_rows_impl(src, idx, out, n, width);
}
extern "C" __global__ void gather_rows_f64_i32(const double* __restrict__ src, const int* __restrict__ idx,
                                               double* __restrict__ out, long long n, long long width) {
    gather_rows_impl(src, idx, out, n, width);
}
extern "C" __global__ void gather_rows_f64_i64(const double* __restrict__ src,
                                               const long long* __restrict__ idx, double* __restrict__ out,
                                               long long n, long long width) {
    gather_rows_impl(src, idx, out, n, width);
}
