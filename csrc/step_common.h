// Per-sample status logic shared by the CPU (ops.cpp) and CUDA (cuda/ops.cu) kernels.
// Mirrors imp_fast/backends/reference.py::_residuals_and_status exactly, including the
// order of the tests (NaN/Inf -> NONFINITE; res < tol -> CONVERGED; abs > div*abs0 ->
// DIVERGED; else running).
#pragma once

#include <cmath>
#include <cstdint>

#include <c10/macros/Macros.h>

namespace imp_fast {

constexpr int8_t kStatusConverged = 1;
constexpr int8_t kStatusDiverged = 3;
constexpr int8_t kStatusNonfinite = 4;

// flags of a sample for the rest of a step
constexpr uint8_t kRunning = 1;  // status was 0 at entry
constexpr uint8_t kBetter = 2;   // best_z/best_abs/best_rel take this iterate
constexpr uint8_t kStill = 4;    // still running after this step: z moves

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

// sg = sum (f(z) - z)^2, sf = sum f(z)^2 of a sample running at entry. Updates its
// residuals, status, n_iter and best residuals; returns its flags.
template <typename a_t>
C10_HOST_DEVICE inline uint8_t sample_head(a_t sg, a_t sf, int64_t b, int8_t* status,
                                           int32_t* n_iter, a_t* abs_res, a_t* rel_res,
                                           const a_t* abs0, a_t* best_abs, a_t* best_rel,
                                           const StepScalars<a_t>& c) {
  const a_t abs_r = ::sqrt(sg);
  const a_t rel_r = abs_r / (::sqrt(sf) + c.eps);
  const a_t res = c.stop_rel ? rel_r : abs_r;
  int8_t code = res < c.tol ? kStatusConverged
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

// The damped Picard update z + beta (f - z) of one element; exactly f when beta is 1
// (as the reference backend).
template <typename s_t, typename a_t>
C10_HOST_DEVICE inline s_t damped(s_t z, s_t f, a_t beta) {
  if (beta == a_t(1)) return f;
  const a_t zv = static_cast<a_t>(z);
  return static_cast<s_t>(zv + beta * (static_cast<a_t>(f) - zv));
}

}  // namespace imp_fast
