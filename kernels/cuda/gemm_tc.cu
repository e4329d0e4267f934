// Dense GEMM on tensor cores for --precision tf32 / bf16 in CUDA-graph steps (sm_80+):
// C = op(A) @ op(B) in float32, the storage conventions of gemm.cu.
// Contract: kernels/reference.py (matmul), with the operands rounded as
// cupy_gpu._set_matmul_precision says (the emulated cuBLAS rounds the same way).
//
// The operands are rounded to nearest even to TF32's 10 or bfloat16's 7 mantissa bits as
// they are staged in shared memory (a bfloat16 value is exactly a TF32 value, so TF32
// MMAs then multiply exactly what bf16 MMAs would), and warps accumulate in float32
// with wmma m16n16k8. Launch: 256 threads (8 warps as 4 x 2); grid = (ceil(N / 64),
// min(ceil(M / 64), 65535)). Each block owns 64x64 tiles of C, each warp a 16x32
// strip (two 16x16 accumulators); K advances 32 at a time through zero-padded tiles.
//
// Kept apart from gemm.cu because <mma.h> needs the CUDA C runtime headers (crt/),
// which a wheel-only CUDA install lacks unless nvidia-cuda-crt is installed.
#include "device_common.h"
#if !defined(CUDA_HOST_EMULATION)
#include <mma.h>
#endif

#define TC_M 64
#define TC_N 64
#define TC_K 32
#define TC_PAD 4  // wmma needs row strides that are multiples of 16 bytes
#define TC_THREADS 256

// x with its lowest `drop` mantissa bits rounded off, to nearest even (NaN kept):
// drop 13 gives TF32, 16 gives bfloat16.
__device__ __forceinline__ float round_mantissa(float x, int drop) {
    if (x != x) return x;
    unsigned long long u = __float_as_uint(x);
    u = (u + ((u >> drop) & 1ull) + (1ull << (drop - 1)) - 1ull) >> drop << drop;
    return __uint_as_float((unsigned int)u);
}

extern "C" __global__ void gemm_tc_f32(const float* __restrict__ a, const float* __restrict__ b,
                                       float* __restrict__ c, int m, int n, int k, int lda, int ldb, int ldc,
                                       int trans_a, int trans_b, int drop) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
    using namespace nvcuda;
    __shared__ __align__(32) float as[TC_M][TC_K + TC_PAD];  // as[i][kk] = op(A)[row0 + i, k0 + kk]
    __shared__ __align__(32) float bs[TC_K][TC_N + TC_PAD];  // bs[kk][j] = op(B)[k0 + kk, col0 + j]
    __shared__ __align__(32) float cs[TC_M][TC_N + TC_PAD];  // the block's C tile, then to global
    const int tid = threadIdx.x, warp = tid / 32;
    const int wr = (warp / 2) * 16, wc = (warp % 2) * 32;  // the warp's strip of the tile
    const int col0 = blockIdx.x * TC_N;
    const int tiles_m = (m + TC_M - 1) / TC_M;
    for (int tm = blockIdx.y; tm < tiles_m; tm += gridDim.y) {  // block-uniform: barriers stay matched
        const int row0 = tm * TC_M;
        wmma::fragment<wmma::accumulator, 16, 16, 8, float> acc[2];
        wmma::fill_fragment(acc[0], 0.0f);
        wmma::fill_fragment(acc[1], 0.0f);
        for (int k0 = 0; k0 < k; k0 += TC_K) {
            // consecutive threads take consecutive elements of the storage order (coalesced)
            for (int e = tid; e < TC_M * TC_K; e += TC_THREADS) {
                const int ai = trans_a ? e % TC_M : e / TC_K, ak = trans_a ? e / TC_M : e % TC_K;
                as[ai][ak] = round_mantissa(gemm_load(a, row0 + ai, k0 + ak, m, k, lda, trans_a), drop);
                const int bk = trans_b ? e % TC_K : e / TC_N, bj = trans_b ? e / TC_K : e % TC_N;
                bs[bk][bj] = round_mantissa(gemm_load(b, k0 + bk, col0 + bj, k, n, ldb, trans_b), drop);
            }
            __syncthreads();  // tiles are staged
            for (int kk = 0; kk < TC_K; kk += 8) {
                wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major> fa;
                wmma::load_matrix_sync(fa, &as[wr][kk], TC_K + TC_PAD);
                for (int f = 0; f < 2; ++f) {
                    wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major> fb;
                    wmma::load_matrix_sync(fb, &bs[kk][wc + 16 * f], TC_N + TC_PAD);
                    wmma::mma_sync(acc[f], fa, fb, acc[f]);
                }
            }
            __syncthreads();  // everyone is done reading before the next tiles
        }
        wmma::store_matrix_sync(&cs[wr][wc], acc[0], TC_N + TC_PAD, wmma::mem_row_major);
        wmma::store_matrix_sync(&cs[wr][wc + 16], acc[1], TC_N + TC_PAD, wmma::mem_row_major);
        __syncthreads();  // the C tile is complete
        for (int e = tid; e < TC_M * TC_N; e += TC_THREADS) {
            const int i = e / TC_N, j = e % TC_N;
            if (row0 + i < m && col0 + j < n) c[(long long)(row0 + i) * ldc + col0 + j] = cs[i][j];
        }
        __syncthreads();  // cs is rewritten by the next tile row
    }
#endif
}
