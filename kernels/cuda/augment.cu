// Geometric augmentation on the device: Simard-style elastic displacement fields (noise,
// then a separable Gaussian blur) and the warped minibatch gather (rotation, scaling,
// sub-pixel translation, optional field; bilinear, edges repeated).
// Contract: kernels/reference.py (elastic_field, gather_warped).
#include "device_common.h"

// out[i] = 2 * uniform_i - 1: the noise of n values.
template <typename T>
__device__ void signed_noise_impl(T* __restrict__ out, long long n, unsigned long long seed,
                                  const long long* __restrict__ step) {
    const long long t = *step;
    GRID_STRIDE(i, n) { out[i] = (T)(2.0 * philox_uniform(seed, t, i) - 1.0); }
}

#define BLUR_TAPS 256  // Gaussian weights kept in shared memory: |d| < BLUR_TAPS (all of them for side <= 256)

// exp(-d^2 / (2 sigma^2)), from the block's table where it holds d.
__device__ __forceinline__ double gauss_weight(const double* table, int d, double sigma) {
    const int a = d < 0 ? -d : d;
    return a < BLUR_TAPS ? table[a] : exp(-0.5 * (d / sigma) * (d / sigma));
}

// out = scale * src smoothed by the normalised Gaussian of std sigma (radius int(4 sigma + 0.5),
// as reference._gaussian_taps), zero outside, along x (along_rows = 0) or y (1) of each
// side x side image; src, out: n = images * side * side values; float64 sums. Each block computes
// the weights once (not 2 radius + 1 exps per element).
template <typename T>
__device__ void blur_impl(const T* __restrict__ src, T* __restrict__ out, long long n, int side, double sigma,
                          double scale, int along_rows) {
    __shared__ double table[BLUR_TAPS];
    const int radius = (int)(4.0 * sigma + 0.5);
    for (int d = threadIdx.x; d <= radius && d < BLUR_TAPS; d += blockDim.x)
        table[d] = exp(-0.5 * (d / sigma) * (d / sigma));
    __syncthreads();
    double norm = 0.0;
    for (int d = -radius; d <= radius; ++d) norm += gauss_weight(table, d, sigma);
    GRID_STRIDE(i, n) {
        const long long pixel = i % ((long long)side * side);
        const int at = along_rows ? (int)(pixel / side) : (int)(pixel % side);
        const long long stride = along_rows ? side : 1;
        double acc = 0.0;
        for (int d = max(-radius, -at); d <= min(radius, side - 1 - at); ++d) {
            acc += gauss_weight(table, d, sigma) / norm * (double)src[i + d * stride];
        }
        out[i] = (T)(scale * acc);
    }
}

// img (side*side) sampled at (sy, sx), bilinear, edge pixels repeated, in float64.
template <typename T>
__device__ __forceinline__ double bilinear(const T* __restrict__ img, int side, double sy, double sx) {
    const double y0 = floor(sy), x0 = floor(sx), fy = sy - y0, fx = sx - x0;
    const int r0 = min(max((int)y0, 0), side - 1) * side, r1 = min(max((int)y0 + 1, 0), side - 1) * side;
    const int c0 = min(max((int)x0, 0), side - 1), c1 = min(max((int)x0 + 1, 0), side - 1);
    const double top = (1 - fx) * (double)img[r0 + c0] + fx * (double)img[r0 + c1];
    const double bottom = (1 - fx) * (double)img[r1 + c0] + fx * (double)img[r1 + c1];
    return (1 - fy) * top + fy * bottom;
}

// Row r of out = src[idx[r]] rotated by angle, scaled and shifted about the centre, drawn from
// uniforms 4r .. 4r+3 of the stream (reference._warp_params), plus field[r] when given.
// n = B * side * side; limits: max angle (radians), max |scale - 1|, max shift (pixels).
template <typename T>
__device__ void gather_warped_impl(const T* __restrict__ src, const int* __restrict__ idx,
                                   const T* __restrict__ field, T* __restrict__ out, long long n, int side,
                                   double max_angle, double max_scale, double max_shift, int has_field,
                                   unsigned long long seed, const long long* __restrict__ step) {
    const long long t = *step, width = (long long)side * side;
    const double c = (side - 1) / 2.0;
    GRID_STRIDE(k, n) {
        const long long row = k / width;
        const int pixel = (int)(k - row * width), i = pixel / side, j = pixel - i * side;
        const double angle = (2.0 * philox_uniform(seed, t, 4 * row) - 1.0) * max_angle;
        const double scale = 1.0 + (2.0 * philox_uniform(seed, t, 4 * row + 1) - 1.0) * max_scale;
        const double ty = (2.0 * philox_uniform(seed, t, 4 * row + 2) - 1.0) * max_shift;
        const double tx = (2.0 * philox_uniform(seed, t, 4 * row + 3) - 1.0) * max_shift;
        const double cs = cos(angle) / scale, sn = sin(angle) / scale, y = i - c - ty, x = j - c - tx;
        double sy = cs * y + sn * x + c, sx = cs * x - sn * y + c;
        if (has_field) {
            sy += (double)field[(row * 2) * width + pixel];
            sx += (double)field[(row * 2 + 1) * width + pixel];
        }
        out[k] = (T)bilinear(src + (long long)idx[row] * width, side, sy, sx);
    }
}

GPUMLP_F32_F64(signed_noise, (T* __restrict__ out, long long n, unsigned long long seed,
                             const long long* __restrict__ step), (out, n, seed, step))

GPUMLP_F32_F64(blur, (const T* __restrict__ src, T* __restrict__ out, long long n, int side, double sigma,
                     double scale, int along_rows), (src, out, n, side, sigma, scale, along_rows))

GPUMLP_F32_F64(gather_warped, (const T* __restrict__ src, const int* __restrict__ idx, const T* __restrict__ field,
                              T* __restrict__ out, long long n, int side, double max_angle, double max_scale,
                              double max_shift, int has_field, unsigned long long seed,
                              const long long* __restrict__ step),
               (src, idx, field, out, n, side, max_angle, max_scale, max_shift, has_field, seed, step))
