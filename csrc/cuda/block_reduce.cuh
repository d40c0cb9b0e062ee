// Block-wide reductions of the CUDA kernels (ops.cu, broyden.cu, probes.cu): fixed
// reduction order (warp shuffles, then thread 0 or the first N threads over the warps in
// order), so results do not depend on scheduling. Every thread gets the result. Blocks
// are a multiple of 32 threads, at most 1024 (32 warps).
#pragma once

#include <cstdint>

namespace imp_fast {
namespace {

// Sums of N values over the block; red: N * 32 shared slots.
template <int N, typename T>
__device__ void block_sum_n(T (&v)[N], T* red) {
  for (int q = 0; q < N; ++q)
    for (int off = 16; off > 0; off >>= 1) v[q] += __shfl_down_sync(0xffffffffu, v[q], off);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  __syncthreads();  // earlier readers of red are done
  if (lane == 0)
    for (int q = 0; q < N; ++q) red[q * 32 + warp] = v[q];
  __syncthreads();
  if (threadIdx.x < N) {
    T t = T(0);
    for (int w = 0; w < nw; ++w) t += red[threadIdx.x * 32 + w];
    red[threadIdx.x * 32] = t;
  }
  __syncthreads();
  for (int q = 0; q < N; ++q) v[q] = red[q * 32];
}

// Sum over the block; red: 32 shared slots.
template <typename T>
__device__ T block_sum(T x, T* red) {
  T v[1] = {x};
  block_sum_n<1>(v, red);
  return v[0];
}

// Maximum of non-negative values over the block (NaN ignored: callers check finiteness
// separately). red: 32 shared slots.
template <typename T>
__device__ T block_max(T v, T* red) {
  for (int off = 16; off > 0; off >>= 1) v = fmax(v, __shfl_down_sync(0xffffffffu, v, off));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    T t = T(0);
    for (int w = 0; w < nw; ++w) t = fmax(t, red[w]);
    red[0] = t;
  }
  __syncthreads();
  return red[0];
}

// ||x|| over the block's sample, scale-safe, in double: x(j) in double; float-sourced
// values are summed in double directly (kScale false), double values are scaled by
// their largest magnitude first (kScale true; callers pass no NaN: their fast sum was
// finite or +inf). Returns 0 or +inf as they are.
template <bool kScale, typename Get>
__device__ double block_safe_norm(int64_t D, Get x, double* redd) {
  double scale = 1.0;
  if (kScale) {
    double mx = 0;
    for (int64_t j = threadIdx.x; j < D; j += blockDim.x) mx = fmax(mx, fabs(x(j)));
    mx = block_max(mx, redd);
    if (mx == 0.0 || isinf(mx)) return mx;
    scale = mx;
  }
  double s = 0;
  for (int64_t j = threadIdx.x; j < D; j += blockDim.x) {
    const double v = x(j) / scale;
    s += v * v;
  }
  return scale * sqrt(block_sum(s, redd));
}

}  // namespace
}  // namespace imp_fast
