// Dense GEMM without cuBLAS: C = op(A) @ op(B), so a training step can be
// captured in a CUDA graph (CuPy refuses cuBLAS during stream capture).
// Contract: kernels/reference.py (matmul).
//
// Storage is row-major (C-contiguous). op(A) is (M, K) and op(B) is (K, N):
//   trans_a == 0: A is (M, K), op(A)[i, k] = A[i * lda + k]
//   trans_a != 0: A is (K, M), op(A)[i, k] = A[k * lda + i]
//   trans_b == 0: B is (K, N), op(B)[k, j] = B[k * ldb + j]
//   trans_b != 0: B is (N, K), op(B)[k, j] = B[j * ldb + k]
//   C is (M, N), C[i, j] at C[i * ldc + j]; C is overwritten (K == 0 gives zeros).
//
// Launch: blockDim = (GEMM_TILE, GEMM_ROWS) = (32, 8), 256 threads (<= MAX_BLOCK);
// grid = (ceil(N / 32), min(ceil(M / 32), 65535)). Each block owns 32x32 tiles of
// C (grid-stride over tile rows, so any grid.y is correct); thread (tx, ty)
// computes the 4 outputs at rows ty, ty + 8, ty + 16, ty + 24 of column tx.
// Per K step: every thread loads 4 elements of each 32x32 operand tile into
// shared memory (coalesced for either storage order: the storage's fast index
// follows threadIdx.x), __syncthreads(), 32 multiply-adds per output,
// __syncthreads(). Out-of-range elements load as zero, so any M, N, K works.
#include "device_common.h"

#define GEMM_TILE 32
#define GEMM_ROWS 8
#define GEMM_PER_THREAD (GEMM_TILE / GEMM_ROWS)

template <typename T>
__device__ void gemm_impl(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ c, int m, int n,
                          int k, int lda, int ldb, int ldc, int trans_a, int trans_b) {
    // +1 column of padding: the transposed stores below hit 32 different banks.
    __shared__ T as[GEMM_TILE][GEMM_TILE + 1];  // as[i][kk] = op(A)[row0 + i, k0 + kk]
    __shared__ T bs[GEMM_TILE][GEMM_TILE + 1];  // bs[kk][j] = op(B)[k0 + kk, col0 + j]
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int col0 = blockIdx.x * GEMM_TILE;
    const int tiles_m = (m + GEMM_TILE - 1) / GEMM_TILE;
    for (int tm = blockIdx.y; tm < tiles_m; tm += gridDim.y) {  // block-uniform: barriers stay matched
        const int row0 = tm * GEMM_TILE;
        T acc[GEMM_PER_THREAD];
        for (int r = 0; r < GEMM_PER_THREAD; ++r) acc[r] = T(0);
        for (int k0 = 0; k0 < k; k0 += GEMM_TILE) {
            for (int r = 0; r < GEMM_PER_THREAD; ++r) {
                const int u = ty + r * GEMM_ROWS;  // 0..31, tx is the storage's fast index
                if (trans_a)
                    as[tx][u] = gemm_load(a, row0 + tx, k0 + u, m, k, lda, 1);
                else
                    as[u][tx] = gemm_load(a, row0 + u, k0 + tx, m, k, lda, 0);
                if (trans_b)
                    bs[tx][u] = gemm_load(b, k0 + tx, col0 + u, k, n, ldb, 1);
                else
                    bs[u][tx] = gemm_load(b, k0 + u, col0 + tx, k, n, ldb, 0);
            }
            __syncthreads();  // tiles are loaded
            for (int kk = 0; kk < GEMM_TILE; ++kk) {
                const T bv = bs[kk][tx];
                for (int r = 0; r < GEMM_PER_THREAD; ++r) acc[r] += as[ty + r * GEMM_ROWS][kk] * bv;
            }
            __syncthreads();  // everyone is done reading before the next load
        }
        const int col = col0 + tx;
        if (col < n) {
            for (int r = 0; r < GEMM_PER_THREAD; ++r) {
                const int row = row0 + ty + r * GEMM_ROWS;
                if (row < m) c[(long long)row * ldc + col] = acc[r];
            }
        }
    }
}

GPUMLP_F32_F64(gemm, (const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ c, int m, int n, int k,
                     int lda, int ldb, int ldc, int trans_a, int trans_b),
               (a, b, c, m, n, k, lda, ldb, ldc, trans_a, trans_b))
