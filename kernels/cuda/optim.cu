// Fused in-place optimizer updates: one elementwise pass over the parameters,
// weight decay folded in (g_eff = g + l2*w + l1*sign(w)).
// Contract: kernels/reference.py (sgd_step, momentum_step, adagrad_step, rmsprop_step, adam_step).
#include "device_common.h"

#define GRID_STRIDE(i, n)                                                            \
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < (n); \
         i += (long long)gridDim.x * blockDim.x)

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

// bc1 = 1 - beta1^t, bc2 = 1 - beta2^t: the bias corrections, computed on the host.
template <typename T>
__device__ void adam_impl(T* __restrict__ w, const T* __restrict__ g, T* __restrict__ m, T* __restrict__ v,
                          long long n, T lr, T beta1, T beta2, T one_minus_beta1, T one_minus_beta2, T bc1, T bc2,
                          T eps, T l2, T l1) {
    GRID_STRIDE(i, n) {
        const T ge = effective_grad(w[i], g[i], l2, l1);
        const T mi = beta1 * m[i] + one_minus_beta1 * ge;
        const T vi = beta2 * v[i] + one_minus_beta2 * ge * ge;
        m[i] = mi;
        v[i] = vi;
        w[i] -= lr * (mi / bc1) / (dev_sqrt(vi / bc2) + eps);
    }
}

extern "C" __global__ void sgd_f32(float* __restrict__ w, const float* __restrict__ g, long long n, float lr,
                                   float l2, float l1) {
    sgd_impl(w, g, n, lr, l2, l1);
}
extern "C" __global__ void sgd_f64(double* __restrict__ w, const double* __restrict__ g, long long n, double lr,
                                   double l2, double l1) {
    sgd_impl(w, g, n, lr, l2, l1);
}

extern "C" __global__ void momentum_f32(float* __restrict__ w, const float* __restrict__ g,
                                        float* __restrict__ v, long long n, float lr, float mu, int nesterov,
                                        float l2, float l1) {
    momentum_impl(w, g, v, n, lr, mu, nesterov, l2, l1);
}
extern "C" __global__ void momentum_f64(double* __restrict__ w, const double* __restrict__ g,
                                        double* __restrict__ v, long long n, double lr, double mu,
                                        int nesterov, double l2, double l1) {
    momentum_impl(w, g, v, n, lr, mu, nesterov, l2, l1);
}

extern "C" __global__ void adagrad_f32(float* __restrict__ w, const float* __restrict__ g,
                                       float* __restrict__ h, long long n, float lr, float eps, float l2,
                                       float l1) {
    adagrad_impl(w, g, h, n, lr, eps, l2, l1);
}
extern "C" __global__ void adagrad_f64(double* __restrict__ w, const double* __restrict__ g,
                                       double* __restrict__ h, long long n, double lr, double eps, double l2,
                                       double l1) {
    adagrad_impl(w, g, h, n, lr, eps, l2, l1);
}

extern "C" __global__ void rmsprop_f32(float* __restrict__ w, const float* __restrict__ g,
                                       float* __restrict__ s, long long n, float lr, float rho,
                                       float one_minus_rho, float eps, float l2, float l1) {
    rmsprop_impl(w, g, s, n, lr, rho, one_minus_rho, eps, l2, l1);
}
extern "C" __global__ void rmsprop_f64(double* __restrict__ w, const double* __restrict__ g,
                                       double* __restrict__ s, long long n, double lr, double rho,
                                       double one_minus_rho, double eps, double l2, double l1) {
    rmsprop_impl(w, g, s, n, lr, rho, one_minus_rho, eps, l2, l1);
}

extern "C" __global__ void adam_f32(float* __restrict__ w, const float* __restrict__ g, float* __restrict__ m,
                                    float* __restrict__ v, long long n, float lr, float beta1, float beta2,
                                    float one_minus_beta1, float one_minus_beta2, float bc1, float bc2,
                                    float eps, float l2, float l1) {
    adam_impl(w, g, m, v, n, lr, beta1, beta2, one_minus_beta1, one_minus_beta2, bc1, bc2, eps, l2, l1);
}
extern "C" __global__ void adam_f64(double* __restrict__ w, const double* __restrict__ g,
                                    double* __restrict__ m, double* __restrict__ v, long long n, double lr,
                                    double beta1, double beta2, double one_minus_beta1, double one_minus_beta2,
                                    double bc1, double bc2, double eps, double l2, double l1) {
    adam_impl(w, g, m, v, n, lr, beta1, beta2, one_minus_beta1, one_minus_beta2, bc1, bc2, eps, l2, l1);
}
