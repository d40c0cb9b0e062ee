// CUDA twin of csrc/probes.cpp: imp_fast::pair_ratios, the Lipschitz probes' fused
// finite-difference ratios
//
//   out[b, p] = ||y[(1 + p) B + b] - y[b]||_2 / dnorm[p, b]    (NaN if either row is NONFINITE)
//
// One thread block per (b, p) pair: each thread accumulates its strided share of the
// squared differences in double, then a block reduction in a fixed order
// (deterministic). float64 storage: a sum that left the range where it is exact to
// rounding (overflow, underflow, exactly zero) is recomputed scaled by the pair's
// largest |difference| (the reference's scale-safe norm). Thread 0 forms the ratio in
// double and rounds it once to out's dtype. Only `out` is written; no workspace, no
// host synchronisation. Arguments are checked as on CPU (csrc/probes_checks.h).
#ifdef IMP_FAST_WITH_CUDA

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <type_traits>

#include "../probes_checks.h"
#include "../step_common.h"
#include "block_reduce.cuh"

namespace imp_fast {
namespace {

constexpr int kPairThreads = 256;

template <typename s_t, typename o_t>
__global__ void pair_ratios_kernel(const s_t* __restrict__ y, const o_t* __restrict__ dnorm,
                                   const int8_t* __restrict__ status, o_t* __restrict__ out, int64_t B,
                                   int64_t P, int64_t D) {
  __shared__ double red[32];
  const int64_t pair = blockIdx.x;  // b * P + p: out's layout
  const int64_t b = pair / P, p = pair % P;
  const int64_t r = (1 + p) * B + b;
  if (status[b] == kStatusNonfinite || status[r] == kStatusNonfinite) {  // uniform over the block
    if (threadIdx.x == 0) out[pair] = static_cast<o_t>(NAN);
    return;
  }
  const s_t* x0 = y + b * D;
  const s_t* x1 = y + r * D;
  double s = 0;
  for (int64_t j = threadIdx.x; j < D; j += blockDim.x) {
    const double d = static_cast<double>(x1[j]) - static_cast<double>(x0[j]);
    s += d * d;
  }
  s = block_sum(s, red);
  double n = sqrt(s);
  if (std::is_same<s_t, double>::value && !sum_in_range(s) && !isnan(s)) {  // uniform over the block
    // no NaN difference here (s would be NaN): the scale-safe norm of ops.cu
    n = block_safe_norm<true>(
        D, [&](int64_t j) { return static_cast<double>(x1[j]) - static_cast<double>(x0[j]); }, red);
  }
  if (threadIdx.x == 0) out[pair] = static_cast<o_t>(n / static_cast<double>(dnorm[p * B + b]));
}

void pair_ratios_cuda(const at::Tensor& y, const at::Tensor& dnorm, const at::Tensor& status,
                      const at::Tensor& out) {
  check_pair_ratios(y, dnorm, status, out);
  const int64_t P = dnorm.size(0), B = dnorm.size(1), D = y.size(1);
  if (B == 0 || P == 0) return;
  TORCH_CHECK(B * P <= static_cast<int64_t>(INT32_MAX), "imp_fast.pair_ratios: B * P = ", B * P,
              " pairs exceed the CUDA grid (one block per pair)");
  const c10::cuda::CUDAGuard guard(y.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "pair_ratios_cuda", [&] {
    using o_t = at::opmath_type<scalar_t>;  // the compute dtype (checked: dnorm's and out's)
    pair_ratios_kernel<scalar_t, o_t><<<static_cast<unsigned int>(B * P), kPairThreads, 0, stream>>>(
        y.data_ptr<scalar_t>(), dnorm.data_ptr<o_t>(), status.data_ptr<int8_t>(), out.data_ptr<o_t>(), B, P, D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(imp_fast, CUDA, m) {
  m.impl("pair_ratios", &pair_ratios_cuda);
}

}  // namespace imp_fast

#endif  // IMP_FAST_WITH_CUDA
