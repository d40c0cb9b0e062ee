// Per-sample status logic shared by the CPU (ops.cpp) and CUDA (cuda/ops.cu) kernels.
// Mirrors imp_fast/backends/reference.py::_residuals_and_status exactly, including the
// order of the tests (NaN/Inf -> NONFINITE; res < tol -> CONVERGED; abs > div*abs0 ->
// DIVERGED; else running), and its numerical rules (module docstring there): scale-safe
// norms, rel = 0 at an exact fixed point, updates that overflow the storage type flag
// NONFINITE, the small Anderson system solved in double.
#pragma once

#include <math.h>  // ::isfinite / ::fabs (host and device)

#include <cmath>
#include <cstdint>

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace imp_fast {

constexpr int8_t kStatusConverged = 1;
constexpr int8_t kStatusDiverged = 3;
constexpr int8_t kStatusNonfinite = 4;

// flags of a sample for the rest of a step
constexpr uint8_t kRunning = 1;  // status was 0 at entry
constexpr uint8_t kBetter = 2;   // best_z/best_abs/best_rel take this iterate
constexpr uint8_t kStill = 4;    // still running after this step: z moves
constexpr uint8_t kCheck = 8;    // its damped update must be checked finite before it is written

template <typename a_t>
struct StepScalars {
  a_t tol, beta, divergence, eps, lam;
  bool stop_rel;
};

template <typename a_t>
inline StepScalars<a_t> make_scalars(double tol, double beta, bool stop_rel, double divergence,
                                     double eps, double lam) {
  StepScalars<a_t> c;
  c.tol = static_cast<a_t>(tol);
  c.beta = static_cast<a_t>(beta);
  c.divergence = static_cast<a_t>(divergence);
  c.eps = static_cast<a_t>(eps);
  c.lam = static_cast<a_t>(lam);
  c.stop_rel = stop_rel;
  return c;
}

// Squared-norm sums outside [kSumLo, max] (or NaN) may have overflowed or lost
// precision to underflow in the fast accumulation: such a sample's norms are recomputed
// scale-safely (cpu_norms.h / the CUDA kernels' block_safe_norm). The lower bound keeps the
// error of squares that underflow (at most D * 2^-126 with flush-to-zero in float, D *
// 2^-1022 in double) far below one rounding of the sum.
template <typename a_t>
struct SumRange;
template <>
struct SumRange<float> {
  static constexpr double lo = 8.271806125530277e-25;  // 2^-80
  static constexpr double hi = 3.4028234663852886e38;  // FLT_MAX
};
template <>
struct SumRange<double> {
  static constexpr double lo = 1.1806906454401013e-271;  // 2^-900
  static constexpr double hi = 1.7976931348623157e308;   // DBL_MAX
};

template <typename a_t>
C10_HOST_DEVICE inline bool sum_in_range(a_t s) {
  return s >= static_cast<a_t>(SumRange<a_t>::lo) && s <= static_cast<a_t>(SumRange<a_t>::hi);
}

// Largest compute-dtype magnitude that rounds to a finite value of the storage type:
// a value v is stored finite iff |v| <= storage_max<s_t>() (False for NaN).
template <typename s_t>
struct StorageMax {
  static constexpr double value = 1.7976931348623157e308;  // double
};
template <>
struct StorageMax<float> {
  static constexpr double value = 3.4028234663852886e38;  // FLT_MAX
};
template <>
struct StorageMax<c10::Half> {
  static constexpr double value = 65519.99609375;  // below 65520, which rounds to inf
};
template <>
struct StorageMax<c10::BFloat16> {
  static constexpr double value = 3.396177326406364e38;  // float 0x7F7F7FFF; 0x7F7F8000 rounds to inf
};

// The per-sample bookkeeping a step's head reads and writes, taken once per step from the
// op's tensors (head_ptrs in checks.h): best_abs / best_rel are nullptr without best
// tracking, tol without per-sample tolerances.
template <typename a_t>
struct HeadPtrs {
  int8_t* status;
  int32_t* n_iter;
  a_t* abs_res;
  a_t* rel_res;
  const a_t* abs0;
  a_t* best_abs;
  a_t* best_rel;
  const a_t* tol;
};

// Per-sample head of a sample running at entry, from its residual norm abs_r =
// ||f(z) - z|| and nf = ||f(z)||: updates its residuals, status, n_iter and best
// residuals; returns its flags. rel = abs / (nf + eps), and 0 when abs is 0 (an exact
// fixed point is converged whatever eps). tol_p: the optional per-sample tolerances
// ((B,) in the compute dtype; the op's tol_t): sample b converges when res < tol_p[b],
// else (nullptr) when res < c.tol.
template <typename a_t>
C10_HOST_DEVICE inline uint8_t sample_head(a_t abs_r, a_t nf, int64_t b, int8_t* status,
                                           int32_t* n_iter, a_t* abs_res, a_t* rel_res,
                                           const a_t* abs0, a_t* best_abs, a_t* best_rel,
                                           const StepScalars<a_t>& c, const a_t* tol_p) {
  const a_t rel_r = abs_r == a_t(0) ? a_t(0) : abs_r / (nf + c.eps);
  const a_t res = c.stop_rel ? rel_r : abs_r;
  const a_t tol = tol_p != nullptr ? tol_p[b] : c.tol;
  int8_t code = res < tol ? kStatusConverged
                            : (abs_r > c.divergence * abs0[b] ? kStatusDiverged : int8_t(0));
  if (!::isfinite(abs_r)) code = kStatusNonfinite;
  uint8_t fl = kRunning;
  if (best_abs != nullptr) {
    if (res < (c.stop_rel ? best_rel[b] : best_abs[b])) {
      best_abs[b] = abs_r;
      best_rel[b] = rel_r;
      fl |= kBetter;
    }
  }
  abs_res[b] = abs_r;
  rel_res[b] = rel_r;
  status[b] = code;
  if (code == 0) {
    n_iter[b] += 1;
    fl |= kStill;
  }
  return fl;
}

template <typename a_t>
C10_HOST_DEVICE inline uint8_t sample_head(a_t abs_r, a_t nf, int64_t b, const HeadPtrs<a_t>& h,
                                           const StepScalars<a_t>& c) {
  return sample_head<a_t>(abs_r, nf, b, h.status, h.n_iter, h.abs_res, h.rel_res, h.abs0, h.best_abs, h.best_rel, c,
                          h.tol);
}

// The damped update z + beta (f - z) can only overflow the storage type when this bound
// on its largest magnitude, ||f|| + |beta - 1| ||f - z||, comes near the storage range;
// below half of it (room for the rounding of the norms and of the update) every entry
// is certainly finite and no check is needed. beta = 1 stores f itself, finite whenever
// the residual is.
template <typename s_t, typename a_t>
C10_HOST_DEVICE inline bool update_needs_check(a_t abs_r, a_t nf, a_t beta) {
  if (beta == a_t(1)) return false;
  const double bound = static_cast<double>(nf) + ::fabs(static_cast<double>(beta) - 1.0) * static_cast<double>(abs_r);
  return !(bound < 0.5 * StorageMax<s_t>::value);
}

// A sample still running whose update overflows the storage type: NONFINITE, keeps its
// z and n_iter (undo the head's count).
C10_HOST_DEVICE inline void flag_update_overflow(int64_t b, int8_t* status, int32_t* n_iter) {
  status[b] = kStatusNonfinite;
  n_iter[b] -= 1;
}

// The damped Picard update z + beta (f - z) of one element; exactly f when beta is 1
// (as the reference backend).
template <typename s_t, typename a_t>
C10_HOST_DEVICE inline s_t damped(s_t z, s_t f, a_t beta) {
  if (beta == a_t(1)) return f;
  const a_t zv = static_cast<a_t>(z);
  return static_cast<s_t>(zv + beta * (static_cast<a_t>(f) - zv));
}

}  // namespace imp_fast
