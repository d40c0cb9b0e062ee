// imp_fast::pair_ratios: the Lipschitz probes' fused finite-difference ratios (CPU).
//
// The probes stack the B unperturbed samples and P perturbed copies into one batch of
// NB = (1 + P) * B rows (row (1 + p) * B + b is sample b under perturbation p) and, after
// every iteration, need
//
//   out[b, p] = ||y[(1 + p) B + b] - y[b]||_2 / dnorm[p, b]    (NaN if either row is NONFINITE)
//
// One op call per iteration: no (P * B, D) difference tensor, no float64 copy of y, no
// host synchronisation; only `out` is written. Matches
// imp_fast/backends/reference.py::pair_ratios (the ground truth):
//
// * differences and sums of squares in double. For float32 / float16 / bfloat16 storage
//   this is exact up to the summation's rounding (squares of float differences can
//   neither overflow nor underflow in double);
// * float64 storage: a fast double sum, recomputed scaled by the pair's largest
//   |difference| when it left the range where it is exact to rounding (overflow,
//   underflow, exactly zero): the reference's scale-safe norm;
// * the ratio is formed in double and rounded once to `out`'s dtype (the compute
//   dtype: float64 for float64 storage, else float32).
//
// CPU kernel: at::parallel_for over samples b; each task loops over p so row b stays in
// cache. The per-pair summation order is fixed (kLanes accumulators, pairwise tree), so
// results do not depend on the thread count. The CUDA twin is csrc/cuda/probes.cu.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "cpu_norms.h"
#include "lanes.h"
#include "probes_checks.h"
#include "step_common.h"

namespace imp_fast {
namespace {

// sum_j (x1[j] - x0[j])^2 in double, fixed order
template <typename s_t>
IMP_FAST_HOT double diff_sq_sum(const s_t* x0, const s_t* x1, int64_t n) {
  using L = Lanes<double>;
  L accl = L::zero();
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    const L d = L::load(x1 + j) - L::load(x0 + j);
    accl += d * d;
  }
  double acc[kLanes];
  accl.store(acc);
  for (int k = 0; j < n; ++j, ++k) {
    const double d = static_cast<double>(x1[j]) - static_cast<double>(x0[j]);
    acc[k] += d * d;
  }
  return lane_sum(acc);
}

template <typename s_t>
double pair_norm(const s_t* x0, const s_t* x1, int64_t n) {
  const double s = diff_sq_sum(x0, x1, n);
  if constexpr (std::is_same<s_t, double>::value) {
    // the reference's scale-safe norm of the difference (a NaN sum stays NaN)
    if (!sum_in_range(s) && !std::isnan(s)) return safe_norm<true>(n, [&](int64_t j) { return x1[j] - x0[j]; });
  }
  return std::sqrt(s);
}

void pair_ratios_cpu(const at::Tensor& y, const at::Tensor& dnorm, const at::Tensor& status,
                     const at::Tensor& out) {
  check_pair_ratios(y, dnorm, status, out);
  const int64_t P = dnorm.size(0), B = dnorm.size(1), D = y.size(1);
  if (B == 0 || P == 0) return;
  const int8_t* st = status.data_ptr<int8_t>();
  // >= ~32K elements of y per task
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, (P + 1) * D));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "pair_ratios_cpu", [&] {
    using s_t = scalar_t;
    const s_t* yp = y.data_ptr<s_t>();
    using o_t = at::opmath_type<s_t>;  // the compute dtype (checked: dnorm's and out's)
    const o_t* dn = dnorm.data_ptr<o_t>();
    o_t* op = out.data_ptr<o_t>();
    at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const s_t* x0 = yp + b * D;
        const bool bad0 = st[b] == kStatusNonfinite;
        for (int64_t p = 0; p < P; ++p) {
          const int64_t r = (1 + p) * B + b;
          double v;
          if (bad0 || st[r] == kStatusNonfinite) {
            v = std::numeric_limits<double>::quiet_NaN();
          } else {
            v = pair_norm(x0, yp + r * D, D) / static_cast<double>(dn[p * B + b]);
          }
          op[b * P + p] = static_cast<o_t>(v);
        }
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(imp_fast, m) {
  m.def("pair_ratios(Tensor y, Tensor dnorm, Tensor status, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(imp_fast, CPU, m) {
  m.impl("pair_ratios", &pair_ratios_cpu);
}

// Not differentiable (the probes measure, they do not train): skip the autograd layer,
// as the steps do (csrc/ops.cpp).
TORCH_LIBRARY_IMPL(imp_fast, Autograd, m) {
  m.impl("pair_ratios", torch::CppFunction::makeFallthrough());
}

}  // namespace imp_fast
