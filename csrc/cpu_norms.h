// Scale-safe residual norms of the CPU kernels (ops.cpp, broyden.cpp, probes.cpp): the
// rare path taken when a fast float sum of squares left the range where it is exact to
// rounding (step_common.h: sum_in_range). Mirrors the reference backend's rule.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "step_common.h"

namespace imp_fast {

// ||x|| of n values x = get(j) in double: with kScale false (values narrower than
// double) summed in double directly (their squares can neither overflow nor underflow
// there); with kScale true (double values) divided by their largest magnitude first.
// A NaN gives NaN, an infinity +inf, all zeros 0.
template <bool kScale, typename Get>
double safe_norm(int64_t n, Get get) {
  double mx = 1.0;
  if (kScale) {
    mx = 0.0;
    for (int64_t j = 0; j < n; ++j) {
      const double a = std::abs(get(j));
      if (std::isnan(a)) return a;
      if (a > mx) mx = a;
    }
    if (mx == 0.0 || std::isinf(mx)) return mx;
  }
  double s = 0;
  for (int64_t j = 0; j < n; ++j) {
    const double v = get(j) / mx;
    s += v * v;
  }
  return mx * std::sqrt(s);
}

// ||f(z) - z|| and ||f(z)|| of one sample of n elements from its fast sums of squares
// sg, sf; a sum outside the range where the fast accumulation is exact to rounding is
// redone scale-safely from z and fz.
template <typename s_t, typename a_t>
inline void norms_from_sums(a_t sg, a_t sf, const s_t* zb, const s_t* fb, int64_t n, a_t& abs_r, a_t& nf) {
  if (sum_in_range(sg) && sum_in_range(sf)) {
    abs_r = std::sqrt(sg);
    nf = std::sqrt(sf);
    return;
  }
  constexpr bool kScale = std::is_same<s_t, double>::value;
  abs_r = static_cast<a_t>(
      safe_norm<kScale>(n, [&](int64_t j) { return static_cast<double>(fb[j]) - static_cast<double>(zb[j]); }));
  nf = static_cast<a_t>(safe_norm<kScale>(n, [&](int64_t j) { return static_cast<double>(fb[j]); }));
}

}  // namespace imp_fast
