// Dropout (Philox masks, bit-identical to reference.hash_uniform) and
// batch norm (training forward, inference, backward).
// Contract: kernels/reference.py (hash_uniform, dropout_forward/backward, batchnorm_*).
#include "device_common.h"

// out[i] = (philox_word(seed, step, i) >> 8) / 2^24, exactly as the reference.
extern "C" __global__ void hash_uniform_f64(double* __restrict__ out, long long n, unsigned long long seed,
                                            const long long* __restrict__ step) {
    const long long t = *step;
    GRID_STRIDE(i, n) { out[i] = philox_uniform(seed, t, i); }
}

// Keep element i when the top 24 bits of its random word are >= thresh (= ceil(p * 2^24),
// i.e. u >= p exactly); mask = scale (= 1/(1-p) rounded to T) or 0; out = x * mask.
template <typename T>
__device__ void dropout_forward_impl(const T* __restrict__ x, T* __restrict__ out, T* __restrict__ mask,
                                     long long n, unsigned long long seed, const long long* __restrict__ step,
                                     unsigned int thresh, T scale) {
    const long long t = *step;
    GRID_STRIDE(i, n) {
        const T mk = (philox_word(seed, t, i) >> 8) >= thresh ? scale : T(0);
        mask[i] = mk;
        out[i] = x[i] * mk;
    }
}

template <typename T>
__device__ void mul_impl(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ out, long long n) {
    GRID_STRIDE(i, n) { out[i] = a[i] * b[i]; }
}

// Training-mode forward for 32 columns per block (blockDim (32, COL_Y)):
// mean, biased var, xhat = (x - mean) / sqrt(var + eps), out = gamma * xhat + beta.
// With update != 0 the running statistics move too: run = momentum * run +
// one_minus_momentum * stat, the variance unbiased by unbias = B / (B - 1).
template <typename T>
__device__ void batchnorm_forward_impl(const T* __restrict__ x, const T* __restrict__ gamma,
                                       const T* __restrict__ beta, T* __restrict__ out, T* __restrict__ xhat,
                                       T* __restrict__ mean_out, T* __restrict__ var_out, T* run_mean,
                                       T* run_var, int nrow, int ncol, T eps, T momentum, T one_minus_momentum,
                                       T unbias, int update) {
    __shared__ T scratch[COL_Y][32];
    const int col = blockIdx.x * 32 + threadIdx.x;
    const bool live = col < ncol;
    T s = T(0);
    if (live)
        for (int r = threadIdx.y; r < nrow; r += COL_Y) s += x[(long long)r * ncol + col];
    const T mean = column_sum(s, scratch) / T(nrow);
    T q = T(0);
    if (live)
        for (int r = threadIdx.y; r < nrow; r += COL_Y) {
            const T d = x[(long long)r * ncol + col] - mean;
            q += d * d;
        }
    const T var = column_sum(q, scratch) / T(nrow);
    if (!live) return;  // no barrier below
    const T sd = dev_sqrt(var + eps), ga = gamma[col], be = beta[col];
    for (int r = threadIdx.y; r < nrow; r += COL_Y) {
        const long long i = (long long)r * ncol + col;
        const T xh = (x[i] - mean) / sd;
        xhat[i] = xh;
        out[i] = ga * xh + be;
    }
    if (threadIdx.y == 0) {
        mean_out[col] = mean;
        var_out[col] = var;
        if (update) {
            run_mean[col] = momentum * run_mean[col] + one_minus_momentum * mean;
            run_var[col] = momentum * run_var[col] + one_minus_momentum * var * unbias;
        }
    }
}

// Inference: y = gamma * (x - mean) / sqrt(var + eps) + beta, elementwise over n = B*N.
template <typename T>
__device__ void batchnorm_inference_impl(const T* __restrict__ x, const T* __restrict__ gamma,
                                         const T* __restrict__ beta, const T* __restrict__ mean,
                                         const T* __restrict__ var, T* __restrict__ out, long long n, int ncol,
                                         T eps) {
    GRID_STRIDE(i, n) {
        const int c = (int)(i % ncol);
        out[i] = gamma[c] * (x[i] - mean[c]) / dev_sqrt(var[c] + eps) + beta[c];
    }
}

// Backward: dbeta = sum dy, dgamma = sum dy*xhat,
// dx = gamma/sqrt(var+eps) * (dy - dbeta/B - xhat * dgamma/B). Block (32, COL_Y).
template <typename T>
__device__ void batchnorm_backward_impl(const T* __restrict__ dy, const T* __restrict__ xhat,
                                        const T* __restrict__ gamma, const T* __restrict__ var,
                                        T* __restrict__ dx, T* __restrict__ dgamma, T* __restrict__ dbeta,
                                        int nrow, int ncol, T eps) {
    __shared__ T scratch[COL_Y][32];
    const int col = blockIdx.x * 32 + threadIdx.x;
    const bool live = col < ncol;
    T sb = T(0), sg = T(0);
    if (live)
        for (int r = threadIdx.y; r < nrow; r += COL_Y) {
            const long long i = (long long)r * ncol + col;
            sb += dy[i];
            sg += dy[i] * xhat[i];
        }
    const T db = column_sum(sb, scratch);
    const T dg = column_sum(sg, scratch);
    if (!live) return;
    const T g = gamma[col] / dev_sqrt(var[col] + eps), mb = db / T(nrow), mg = dg / T(nrow);
    for (int r = threadIdx.y; r < nrow; r += COL_Y) {
        const long long i = (long long)r * ncol + col;
        dx[i] = g * (dy[i] - mb - xhat[i] * mg);
    }
    if (threadIdx.y == 0) {
        dgamma[col] = dg;
        dbeta[col] = db;
    }
}

GPUMLP_F32_F64(dropout_forward, (const T* __restrict__ x, T* __restrict__ out, T* __restrict__ mask, long long n,
                                unsigned long long seed, const long long* __restrict__ step, unsigned int thresh,
                                T scale), (x, out, mask, n, seed, step, thresh, scale))

GPUMLP_F32_F64(mul, (const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ out, long long n),
               (a, b, out, n))

GPUMLP_F32_F64(batchnorm_forward, (const T* __restrict__ x, const T* __restrict__ gamma, const T* __restrict__ beta,
                                  T* __restrict__ out, T* __restrict__ xhat, T* __restrict__ mean,
                                  T* __restrict__ var, T* run_mean, T* run_var, int nrow, int ncol, T eps, T momentum,
                                  T one_minus_momentum, T unbias, int update),
               (x, gamma, beta, out, xhat, mean, var, run_mean, run_var, nrow, ncol, eps, momentum,
                one_minus_momentum, unbias, update))

GPUMLP_F32_F64(batchnorm_inference, (const T* __restrict__ x, const T* __restrict__ gamma, const T* __restrict__ beta,
                                    const T* __restrict__ mean, const T* __restrict__ var, T* __restrict__ out,
                                    long long n, int ncol, T eps), (x, gamma, beta, mean, var, out, n, ncol, eps))

GPUMLP_F32_F64(batchnorm_backward, (const T* __restrict__ dy, const T* __restrict__ xhat, const T* __restrict__ gamma,
                                   const T* __restrict__ var, T* __restrict__ dx, T* __restrict__ dgamma,
                                   T* __restrict__ dbeta, int nrow, int ncol, T eps),
               (dy, xhat, gamma, var, dx, dgamma, dbeta, nrow, ncol, eps))
