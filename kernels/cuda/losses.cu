// Fused losses (value + gradient in one launch), softmax and the accuracy count.
// Contract: kernels/reference.py (softmax, softmax_xent, sigmoid_bce, mse, correct_count).
//
// Row kernels: one block per row (grid-stride over rows), threads over the K
// columns, warp-shuffle + shared-memory reductions. Each block keeps its rows'
// loss in thread 0 and adds it once to the device scalar *loss (zeroed by the
// caller) with atomicAdd, so nothing synchronizes with the host.
#include "device_common.h"

// The stable softmax's statistics of a row z of ncol values: m = max z and s = sum exp(z - m),
// block-wide (every thread gets both). scratch: the caller's __shared__ T[32].
template <typename T>
__device__ __forceinline__ void row_max_sumexp(const T* z, int ncol, T* scratch, T& m, T& s) {
    m = z[0];
    for (int k = threadIdx.x; k < ncol; k += blockDim.x) m = dev_max(m, z[k]);
    m = block_max(m, scratch);
    s = T(0);
    for (int k = threadIdx.x; k < ncol; k += blockDim.x) s += dev_exp(z[k] - m);
    s = block_sum(s, scratch);
}

// loss += sum_rows [lse(z) - z[y]]; grad = scale * (softmax(z) - onehot(y)).
template <typename T>
__device__ void softmax_xent_impl(const T* __restrict__ logits, const int* __restrict__ labels,
                                  T* __restrict__ grad, T* __restrict__ loss, int nrow, int ncol, T scale) {
    __shared__ T scratch[32];
    T acc = T(0);
    for (int row = blockIdx.x; row < nrow; row += gridDim.x) {
        const T* z = logits + (long long)row * ncol;
        T* g = grad + (long long)row * ncol;
        T m, s;
        row_max_sumexp(z, ncol, scratch, m, s);
        const int y = labels[row];
        for (int k = threadIdx.x; k < ncol; k += blockDim.x) {
            g[k] = scale * (dev_exp(z[k] - m) / s - (k == y ? T(1) : T(0)));
        }
        // a label outside [0, K) must not read out of bounds: it makes the loss NaN
        if (threadIdx.x == 0) acc += (y >= 0 && y < ncol) ? (m + dev_log(s)) - z[y] : dev_log(T(-1));
    }
    if (threadIdx.x == 0) atomicAdd(loss, acc);
}

// Row-wise softmax(z) into out.
template <typename T>
__device__ void softmax_impl(const T* __restrict__ logits, T* __restrict__ out, int nrow, int ncol) {
    __shared__ T scratch[32];
    for (int row = blockIdx.x; row < nrow; row += gridDim.x) {
        const T* z = logits + (long long)row * ncol;
        T m, s;
        row_max_sumexp(z, ncol, scratch, m, s);
        for (int k = threadIdx.x; k < ncol; k += blockDim.x) out[(long long)row * ncol + k] = dev_exp(z[k] - m) / s;
    }
}

// The one-hot losses' row loop: over each row's columns k, term(i, k == label) writes element i's
// gradient and returns its loss term; the row sums, times factor, go to *loss once per block.
template <typename T, typename Term>
__device__ void onehot_loss_rows(const int* __restrict__ labels, T* __restrict__ loss, int nrow, int ncol,
                                 T factor, Term term) {
    __shared__ T scratch[32];
    T acc = T(0);
    for (int row = blockIdx.x; row < nrow; row += gridDim.x) {
        const int y = labels[row];
        T part = T(0);
        for (int k = threadIdx.x; k < ncol; k += blockDim.x) part += term((long long)row * ncol + k, k == y);
        part = block_sum(part, scratch);
        if (threadIdx.x == 0) acc += factor * part;
    }
    if (threadIdx.x == 0) atomicAdd(loss, acc);
}

// Logistic cost against one-hot targets: each term a softplus of +-z (never the log of a rounded p),
// capped at cap = -log(reference.LOG_EPS) as the reference caps it.
template <typename T>
__device__ void sigmoid_bce_impl(const T* __restrict__ logits, const int* __restrict__ labels,
                                 T* __restrict__ grad, T* __restrict__ loss, int nrow, int ncol, T scale,
                                 T cap) {
    onehot_loss_rows(labels, loss, nrow, ncol, T(1), [=](long long i, bool t) {
        const T p = T(1) / (T(1) + dev_exp(-logits[i]));
        // -log p = softplus(-z), -log(1-p) = softplus(z)
        const T s = t ? -logits[i] : logits[i];
        const T sp = dev_max(s, T(0)) + dev_log1p(dev_exp(-dev_max(s, -s)));
        grad[i] = scale * (p - (t ? T(1) : T(0)));
        return sp < cap ? sp : cap;
    });
}

// Half squared error against one-hot targets.
template <typename T>
__device__ void mse_impl(const T* __restrict__ pred, const int* __restrict__ labels, T* __restrict__ grad,
                         T* __restrict__ loss, int nrow, int ncol, T scale) {
    onehot_loss_rows(labels, loss, nrow, ncol, T(0.5), [=](long long i, bool t) {
        const T d = pred[i] - (t ? T(1) : T(0));
        grad[i] = scale * d;
        return d * d;
    });
}

// *count += #rows with argmax(scores[row]) == labels[row] (first max wins). One thread per row.
template <typename T>
__device__ void correct_count_impl(const T* __restrict__ scores, const int* __restrict__ labels,
                                   long long* __restrict__ count, int nrow, int ncol) {
    __shared__ int scratch[32];
    int hits = 0;
    for (int row = blockIdx.x * blockDim.x + threadIdx.x; row < nrow; row += gridDim.x * blockDim.x) {
        const T* s = scores + (long long)row * ncol;
        int best = 0;
        for (int k = 1; k < ncol; ++k) best = s[k] > s[best] ? k : best;
        hits += (best == labels[row]);
    }
    hits = block_sum(hits, scratch);
    if (threadIdx.x == 0 && hits > 0) {
        atomicAdd(reinterpret_cast<unsigned long long*>(count), (unsigned long long)hits);
    }
}

GPUMLP_F32_F64(softmax_xent, (const T* __restrict__ logits, const int* __restrict__ labels, T* __restrict__ grad,
                             T* __restrict__ loss, int nrow, int ncol, T scale),
               (logits, labels, grad, loss, nrow, ncol, scale))

GPUMLP_F32_F64(softmax, (const T* __restrict__ logits, T* __restrict__ out, int nrow, int ncol),
               (logits, out, nrow, ncol))

GPUMLP_F32_F64(sigmoid_bce, (const T* __restrict__ logits, const int* __restrict__ labels, T* __restrict__ grad,
                            T* __restrict__ loss, int nrow, int ncol, T scale, T cap),
               (logits, labels, grad, loss, nrow, ncol, scale, cap))

GPUMLP_F32_F64(mse, (const T* __restrict__ pred, const int* __restrict__ labels, T* __restrict__ grad,
                    T* __restrict__ loss, int nrow, int ncol, T scale), (pred, labels, grad, loss, nrow, ncol, scale))

GPUMLP_F32_F64(correct_count, (const T* __restrict__ scores, const int* __restrict__ labels,
                              long long* __restrict__ count, int nrow, int ncol), (scores, labels, count, nrow, ncol))
