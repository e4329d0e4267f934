// Fused in-place optimizer updates: one elementwise pass over the parameters,
// weight decay folded in (g_eff = g + l2*w + l1*sign(w)); and gradient clipping
// by global norm (sum of squares, then a scale) or by value, all graph-replayable.
// Contract: kernels/reference.py (sgd_step, momentum_step, adagrad_step, rmsprop_step, adam_step,
// adamw_step, lion_step, sum_squares, clip_scale, clip_value).
#include "device_common.h"

template <typename T>
__device__ __forceinline__ T effective_grad(T w, T g, T l2, T l1) {
    return g + l2 * w + l1 * dev_sign(w);
}

template <typename T>
__device__ void sgd_impl(T* __restrict__ w, const T* __restrict__ g, long long n, T lr, T l2, T l1) {
    GRID_STRIDE(i, n) { w[i] -= lr * effective_grad(w[i], g[i], l2, l1); }
}

template <typename T>
__device__ void momentum_impl(T* __restrict__ w, const T* __restrict__ g, T* __restrict__ v, long long n, T lr,
                              T mu, int nesterov, T l2, T l1) {
    GRID_STRIDE(i, n) {
        const T ge = effective_grad(w[i], g[i], l2, l1);
        const T vi = mu * v[i] + ge;
        v[i] = vi;
        w[i] -= lr * (nesterov ? ge + mu * vi : vi);
    }
}

template <typename T>
__device__ void adagrad_impl(T* __restrict__ w, const T* __restrict__ g, T* __restrict__ h, long long n, T lr,
                             T eps, T l2, T l1) {
    GRID_STRIDE(i, n) {
        const T ge = effective_grad(w[i], g[i], l2, l1);
        const T hi = h[i] + ge * ge;
        h[i] = hi;
        w[i] -= lr * ge / (dev_sqrt(hi) + eps);
    }
}

// one_minus_rho = 1 - rho, rounded once on the host like the reference.
template <typename T>
__device__ void rmsprop_impl(T* __restrict__ w, const T* __restrict__ g, T* __restrict__ s, long long n, T lr,
                             T rho, T one_minus_rho, T eps, T l2, T l1) {
    GRID_STRIDE(i, n) {
        const T ge = effective_grad(w[i], g[i], l2, l1);
        const T si = rho * s[i] + one_minus_rho * ge * ge;
        s[i] = si;
        w[i] -= lr * ge / (dev_sqrt(si) + eps);
    }
}

// The step t is read on the device (so a replayed CUDA graph sees the current one);
// the bias corrections 1 - beta^t are computed in double from the exact (double)
// betas, as the reference does, then rounded to T. keep = 1 - lr*weight_decay is AdamW's
// decoupled decay, applied to w before the step (Adam passes 1: w * 1 == w exactly, and the
// step is a quotient, so no fused multiply-add can round differently).
template <typename T>
__device__ void adam_impl(T* __restrict__ w, const T* __restrict__ g, T* __restrict__ m, T* __restrict__ v,
                          long long n, T lr, T beta1, T beta2, T one_minus_beta1, T one_minus_beta2, T eps, T l2,
                          T l1, double beta1_d, double beta2_d, const long long* __restrict__ t, T keep) {
    const double step = (double)*t;
    const T bc1 = T(1.0 - pow(beta1_d, step)), bc2 = T(1.0 - pow(beta2_d, step));
    GRID_STRIDE(i, n) {
        const T wi = w[i];
        const T ge = effective_grad(wi, g[i], l2, l1);
        const T mi = beta1 * m[i] + one_minus_beta1 * ge;
        const T vi = beta2 * v[i] + one_minus_beta2 * ge * ge;
        m[i] = mi;
        v[i] = vi;
        w[i] = wi * keep - lr * (mi / bc1) / (dev_sqrt(vi / bc2) + eps);
    }
}

// Lion: c = beta1*m + (1-beta1)*g_eff; w -= lr*(sign(c) + weight_decay*w); m = beta2*m + (1-beta2)*g_eff.
template <typename T>
__device__ void lion_impl(T* __restrict__ w, const T* __restrict__ g, T* __restrict__ m, long long n, T lr,
                          T beta1, T beta2, T one_minus_beta1, T one_minus_beta2, T weight_decay, T l2, T l1) {
    GRID_STRIDE(i, n) {
        const T wi = w[i];
        const T ge = effective_grad(wi, g[i], l2, l1);
        const T mi = m[i];
        const T c = beta1 * mi + one_minus_beta1 * ge;
        w[i] = wi - lr * (dev_sign(c) + weight_decay * wi);
        m[i] = beta2 * mi + one_minus_beta2 * ge;
    }
}

GPUMLP_F32_F64(sgd, (T* __restrict__ w, const T* __restrict__ g, long long n, T lr, T l2, T l1),
               (w, g, n, lr, l2, l1))

GPUMLP_F32_F64(momentum, (T* __restrict__ w, const T* __restrict__ g, T* __restrict__ v, long long n, T lr, T mu,
                         int nesterov, T l2, T l1), (w, g, v, n, lr, mu, nesterov, l2, l1))

GPUMLP_F32_F64(adagrad, (T* __restrict__ w, const T* __restrict__ g, T* __restrict__ h, long long n, T lr, T eps,
                        T l2, T l1), (w, g, h, n, lr, eps, l2, l1))

GPUMLP_F32_F64(rmsprop, (T* __restrict__ w, const T* __restrict__ g, T* __restrict__ s, long long n, T lr, T rho,
                        T one_minus_rho, T eps, T l2, T l1), (w, g, s, n, lr, rho, one_minus_rho, eps, l2, l1))

GPUMLP_F32_F64(adam, (T* __restrict__ w, const T* __restrict__ g, T* __restrict__ m, T* __restrict__ v, long long n,
                     T lr, T beta1, T beta2, T one_minus_beta1, T one_minus_beta2, T eps, T l2, T l1, double beta1_d,
                     double beta2_d, const long long* __restrict__ t),
               (w, g, m, v, n, lr, beta1, beta2, one_minus_beta1, one_minus_beta2, eps, l2, l1, beta1_d, beta2_d, t,
                T(1)))

// AdamW is Adam with w scaled by keep = 1 - lr*weight_decay (rounded once on the host like the reference).
template <typename... A>
__device__ __forceinline__ void adamw_impl(A... a) {
    adam_impl(a...);
}
GPUMLP_F32_F64(adamw, (T* __restrict__ w, const T* __restrict__ g, T* __restrict__ m, T* __restrict__ v, long long n,
                      T lr, T beta1, T beta2, T one_minus_beta1, T one_minus_beta2, T eps, T l2, T l1, double beta1_d,
                      double beta2_d, const long long* __restrict__ t, T keep),
               (w, g, m, v, n, lr, beta1, beta2, one_minus_beta1, one_minus_beta2, eps, l2, l1, beta1_d, beta2_d, t,
                keep))

GPUMLP_F32_F64(lion, (T* __restrict__ w, const T* __restrict__ g, T* __restrict__ m, long long n, T lr, T beta1,
                     T beta2, T one_minus_beta1, T one_minus_beta2, T weight_decay, T l2, T l1),
               (w, g, m, n, lr, beta1, beta2, one_minus_beta1, one_minus_beta2, weight_decay, l2, l1))

// Sum of x^2 over n elements, in double, written to *out (added to it when accumulate).
// One launch and deterministic: each block stores its partial sum, and the last block
// to finish (a ticket counter) adds the partials in block order, then resets the
// counter for the next launch, so the kernel also replays in a CUDA graph.
// partials: gridDim.x doubles; ticket: one zero-initialised unsigned int.
template <typename T>
__device__ void sum_squares_impl(const T* __restrict__ x, long long n, double* partials,
                                 unsigned int* ticket, T* out, int accumulate) {
    __shared__ double scratch[32];
    __shared__ int is_last;
    double s = 0.0;
    GRID_STRIDE(i, n) { s += (double)x[i] * (double)x[i]; }
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) {
        partials[blockIdx.x] = s;
        __threadfence();  // the partial is visible before the ticket says so
        is_last = atomicAdd(ticket, 1u) == gridDim.x - 1;
    }
    __syncthreads();
    if (!is_last) return;
    __threadfence();
    double total = 0.0;
    for (unsigned int b = threadIdx.x; b < gridDim.x; b += blockDim.x)
        total += ((volatile double*)partials)[b];
    total = block_sum(total, scratch);
    if (threadIdx.x == 0) {
        *out = accumulate ? T((double)*out + total) : T(total);
        *ticket = 0u;
    }
}

// g *= min(1, max_norm / (sqrt(*sumsq) + 1e-12)), the factor computed in double and
// rounded to T once (as the reference).
template <typename T>
__device__ void clip_scale_impl(T* __restrict__ g, const T* __restrict__ sumsq, long long n, double max_norm) {
    const double f = max_norm / (sqrt((double)*sumsq) + 1e-12);
    const T factor = T(f < 1.0 ? f : 1.0);
    GRID_STRIDE(i, n) { g[i] *= factor; }
}

GPUMLP_F32_F64(sum_squares, (const T* __restrict__ x, long long n, double* partials, unsigned int* ticket, T* out,
                            int accumulate), (x, n, partials, ticket, out, accumulate))

GPUMLP_F32_F64(clip_scale, (T* __restrict__ g, const T* __restrict__ sumsq, long long n, double max_norm),
               (g, sumsq, n, max_norm))

// g = clamp(g, -v, v) elementwise; written with comparisons (not fmin/fmax) so NaN stays NaN.
template <typename T>
__device__ void clip_value_impl(T* __restrict__ g, long long n, T v) {
    GRID_STRIDE(i, n) {
        const T gi = g[i];
        g[i] = gi > v ? v : (gi < -v ? -v : gi);
    }
}

GPUMLP_F32_F64(clip_value, (T* __restrict__ g, long long n, T v), (g, n, v))
