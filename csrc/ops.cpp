// imp_fast._C: fused per-iteration steps of the batched fixed-point solve.
//
// Ops (schemas below, defined once): one call per solver iteration.
//   imp_fast::picard_step    residuals + statuses + best tracking + damped update
//   imp_fast::anderson_step  same head, ring-buffer write, Gram row/column update,
//                            per-sample (H + lam*H_ss I) a = 1 solve in double,
//                            mixing, per-sample Picard fallback
// They match imp_fast/backends/reference.py (the ground truth) within float tolerance.
// Every step op (broyden_step too) takes a trailing optional per-sample tolerance
// `Tensor? tol_t=None` ((B,) in the compute dtype, checks.h: check_tol): sample b then
// converges when its residual is below tol_t[b] instead of the scalar tol.
//
// CPU kernels: at::parallel_for over (sample, chunk) tasks. Reductions use a fixed
// chunk size and a fixed number of accumulator lanes, and partials are combined in
// order, so results do not depend on the thread count. Storage dtypes: float64,
// float32, float16, bfloat16; accumulation in at::opmath_type (float64 for float64,
// else float32). The numerical rules are the reference backend's (its module
// docstring): norms are scale-safe (a sample whose fast sum of squares left the range
// where it is exact to rounding is recomputed in double / with scaling), an update
// that overflows the storage type flags the sample NONFINITE without writing it, and
// the small Anderson system is solved in double.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/library.h>

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "cpu_norms.h"
#include "lanes.h"
#include "rows.h"
#include "step_common.h"

namespace imp_fast {
namespace {

constexpr int64_t kChunk = 4096;  // elements of one sample per task (fixed: determinism)

// sum (fz - z)^2 and sum fz^2 over n elements (kLanes accumulators, lanes.h)
template <typename s_t, typename a_t>
IMP_FAST_HOT void residual_sums(const s_t* z, const s_t* fz, int64_t n, a_t& sg, a_t& sf) {
  using L = Lanes<a_t>;
  L gl = L::zero(), fl = L::zero();
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    const L fv = L::load(fz + j);
    const L d = fv - L::load(z + j);
    gl += d * d;
    fl += fv * fv;
  }
  a_t g[kLanes], f[kLanes];
  gl.store(g);
  fl.store(f);
  for (int k = 0; j < n; ++j, ++k) {
    const a_t fv = static_cast<a_t>(fz[j]);
    const a_t d = fv - static_cast<a_t>(z[j]);
    g[k] += d * d;
    f[k] += fv * fv;
  }
  sg = lane_sum(g);
  sf = lane_sum(f);
}

// One pass over a chunk of a sample running at entry: residual sums sg = sum (fz - z)^2
// and sf = sum fz^2 (the step's head), F_slot = fz and G_slot = fz - z (Fb/Gb: the
// sample's (m, D) buffers at the chunk offset), then the chunk's partial Gram row
// G_i . g into row[0:m] (rows: scratch for m row pointers). Fusing the head into this
// pass reads z and fz once per step. When the storage type is the accumulation type,
// G_slot . g is sg itself (the same products in the same lane order), so the slot's
// row is not read back.
template <typename s_t, typename a_t>
IMP_FAST_HOT void head_history_gram(const s_t* zb, const s_t* fb, s_t* Fb, s_t* Gb, int64_t slot,
                                    int64_t m, int64_t D, int64_t n, a_t* gbuf, a_t* row, a_t& sg,
                                    a_t& sf, const s_t** rows) {
  s_t* Fs = Fb + slot * D;
  s_t* Gs = Gb + slot * D;
  using L = Lanes<a_t>;
  L g2l = L::zero(), f2l = L::zero();
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    const L fv = L::load(fb + j);
    const L g = fv - L::load(zb + j);
    g2l += g * g;
    f2l += fv * fv;
    g.store(gbuf + j);
    std::memcpy(Fs + j, fb + j, kLanes * sizeof(s_t));
    g.store(Gs + j);
  }
  a_t g2[kLanes], f2[kLanes];
  g2l.store(g2);
  f2l.store(f2);
  for (int k = 0; j < n; ++j, ++k) {
    const s_t fs = fb[j];
    const a_t fv = static_cast<a_t>(fs);
    const a_t g = fv - static_cast<a_t>(zb[j]);
    g2[k] += g * g;
    f2[k] += fv * fv;
    gbuf[j] = g;
    Fs[j] = fs;
    Gs[j] = static_cast<s_t>(g);
  }
  sg = lane_sum(g2);
  sf = lane_sum(f2);
  if constexpr (std::is_same<s_t, a_t>::value) {
    int64_t k = 0;
    for (int64_t i = 0; i < m; ++i)
      if (i != slot) rows[k++] = Gb + i * D;
    dots_rows(static_cast<const s_t* const*>(rows), k, static_cast<const a_t*>(gbuf), n, row);
    for (int64_t i = m - 1; i > slot; --i) row[i] = row[i - 1];  // rows after the slot move up one
    row[slot] = sg;
  } else {
    for (int64_t i = 0; i < m; ++i) rows[i] = Gb + i * D;
    dots_rows(static_cast<const s_t* const*>(rows), m, static_cast<const a_t*>(gbuf), n, row);
  }
}

// Whether every x[0:n] rounds to a finite value of the storage type s_t.
template <typename s_t, typename a_t>
IMP_FAST_HOT bool storable(const a_t* x, int64_t n) {
  const a_t lim = static_cast<a_t>(StorageMax<s_t>::value);
  int bad = 0;
  for (int64_t j = 0; j < n; ++j) bad |= !(std::abs(x[j]) <= lim);
  return bad == 0;
}

// out[0:n] = sum_i al[i] (F_i - (1 - beta) G_i) over one chunk (gacc is scratch, rows
// scratch for m row pointers); returns whether all of out is storable (finite once
// rounded to s_t). F_slot is read from fb (the same values: F_slot is a copy of f(z),
// still in cache).
template <typename s_t, typename a_t>
IMP_FAST_HOT bool mix_into(const s_t* Fb, const s_t* Gb, const s_t* fb, int64_t slot, const a_t* al,
                           a_t one_m_beta, int64_t m, int64_t D, int64_t n, a_t* out, a_t* gacc,
                           const s_t** rows) {
  for (int64_t i = 0; i < m; ++i) rows[i] = i == slot ? fb : Fb + i * D;
  combine_rows(static_cast<const s_t* const*>(rows), m, al, n, out);
  if (one_m_beta != a_t(0)) {
    for (int64_t i = 0; i < m; ++i) rows[i] = Gb + i * D;
    combine_rows(static_cast<const s_t* const*>(rows), m, al, n, gacc);
    for (int64_t j = 0; j < n; ++j) out[j] -= one_m_beta * gacc[j];
  }
  return storable<s_t>(out, n);
}

// z <- z + beta (fz - z) over n elements; exactly fz when beta is 1 (as the reference).
template <typename s_t, typename a_t>
IMP_FAST_HOT void damped_update(s_t* zb, const s_t* fb, a_t beta, int64_t n) {
  if (beta == a_t(1)) {
    std::copy(fb, fb + n, zb);
    return;
  }
  for (int64_t j = 0; j < n; ++j) zb[j] = damped(zb[j], fb[j], beta);
}

// dst[0:n] = src[0:n] converted to the storage type
template <typename s_t, typename a_t>
IMP_FAST_HOT void store(s_t* dst, const a_t* src, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<s_t>(src[j]);
}

struct Shape {
  int64_t B, D, nc, grain;
};

inline Shape shape_of(const at::Tensor& z) {
  Shape s;
  s.B = z.size(0);
  s.D = z.size(1);
  s.nc = s.D == 0 ? 1 : (s.D + kChunk - 1) / kChunk;
  const int64_t per_task = std::max<int64_t>(1, std::min(s.D, kChunk));
  s.grain = std::max<int64_t>(1, 32768 / per_task);  // >= ~32K elements per thread
  return s;
}

// Per-sample heads from the (sample, chunk) partial sums pg, pf of the samples running at
// entry, in chunk order (deterministic); flags[b] as sample_head returns them (0 for
// samples frozen at entry), plus kCheck when the sample moves and its damped update
// could overflow the storage type. A sum outside the range where the fast float
// accumulation is exact to rounding is recomputed scale-safely from z and fz (rare:
// residuals near the dtype's limits, or exactly zero).
template <typename s_t, typename a_t>
void finish_heads(int64_t B, int64_t D, int64_t nc, const std::vector<a_t>& pg, const std::vector<a_t>& pf,
                  const s_t* z, const s_t* fz, const HeadPtrs<a_t>& h, const StepScalars<a_t>& c,
                  std::vector<uint8_t>& flags) {
  flags.assign(B, 0);
  for (int64_t b = 0; b < B; ++b) {
    if (h.status[b] != 0) continue;
    a_t sg = 0, sf = 0;
    for (int64_t ch = 0; ch < nc; ++ch) {
      sg += pg[b * nc + ch];
      sf += pf[b * nc + ch];
    }
    a_t abs_r, nf;
    norms_from_sums(sg, sf, z + b * D, fz + b * D, D, abs_r, nf);
    uint8_t fl = sample_head<a_t>(abs_r, nf, b, h, c);
    if ((fl & kStill) && update_needs_check<s_t, a_t>(abs_r, nf, c.beta)) fl |= kCheck;
    flags[b] = fl;
  }
}

// Partials of phase 1 (per sample and chunk) -> per-sample status head.
// flags[b]: bit0 running at entry, bit1 better (best tracking), bit2 still running,
// bit3 update to check.
template <typename s_t, typename a_t>
void head(const Shape& s, const s_t* z, const s_t* fz, const HeadPtrs<a_t>& h, const StepScalars<a_t>& c,
          std::vector<uint8_t>& flags) {
  const int64_t B = s.B, D = s.D, nc = s.nc;
  std::vector<a_t> pg(B * nc), pf(B * nc);
  at::parallel_for(0, B * nc, s.grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / nc, ch = t % nc;
      if (h.status[b] != 0) continue;
      const int64_t j0 = ch * kChunk, n = std::min(kChunk, D - j0);
      residual_sums(z + b * D + j0, fz + b * D + j0, n, pg[t], pf[t]);
    }
  });
  finish_heads(B, D, nc, pg, pf, z, fz, h, c, flags);
}

// Whether every entry of the damped update z + beta (f - z) of n elements is finite
// once rounded to the storage type (the value damped() would store).
template <typename s_t, typename a_t>
bool damped_finite(const s_t* zb, const s_t* fb, a_t beta, int64_t n) {
  for (int64_t j = 0; j < n; ++j)
    if (!std::isfinite(static_cast<double>(damped(zb[j], fb[j], beta)))) return false;
  return true;
}

// Samples flagged kCheck whose damped update overflows: NONFINITE, z and n_iter kept.
template <typename s_t, typename a_t>
void check_damped_updates(int64_t B, int64_t D, const s_t* z, const s_t* fz, a_t beta, int8_t* status,
                          int32_t* n_iter, std::vector<uint8_t>& flags) {
  bool any = false;
  for (int64_t b = 0; b < B; ++b) any = any || (flags[b] & kCheck);
  if (!any) return;
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      if (!(flags[b] & kCheck)) continue;
      if (!damped_finite(z + b * D, fz + b * D, beta, D)) {
        flag_update_overflow(b, status, n_iter);
        flags[b] &= static_cast<uint8_t>(~(kStill | kCheck));
      }
    }
  });
}

void picard_step_cpu(const at::Tensor& z, const at::Tensor& fz_in, const at::Tensor& status,
                     const at::Tensor& n_iter, const at::Tensor& abs_res,
                     const at::Tensor& rel_res, const at::Tensor& abs0,
                     const std::optional<at::Tensor>& best_z,
                     const std::optional<at::Tensor>& best_abs,
                     const std::optional<at::Tensor>& best_rel, double tol, double beta,
                     bool stop_rel, double divergence, double eps,
                     const std::optional<at::Tensor>& tol_t) {
  check_state(z, fz_in, status, n_iter, abs_res, rel_res, abs0, best_z, best_abs, best_rel);
  check_tol(z, tol_t);
  const at::Tensor fz = fz_in.contiguous();
  const Shape s = shape_of(z);
  if (s.B == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "picard_step_cpu", [&] {
    using s_t = scalar_t;
    using a_t = at::opmath_type<s_t>;
    const StepScalars<a_t> c = make_scalars<a_t>(tol, beta, stop_rel, divergence, eps, 0.0);
    const HeadPtrs<a_t> h = head_ptrs<a_t>(status, n_iter, abs_res, rel_res, abs0, best_abs, best_rel, tol_t);
    s_t* zp = z.data_ptr<s_t>();
    const s_t* fp = fz.data_ptr<s_t>();
    s_t* bz = opt_ptr<s_t>(best_z);
    if (s.nc == 1) {
      // A sample fits one task: its head and its update in one visit, so the update
      // reads f(z) back from cache instead of from memory (the step is bandwidth-bound).
      // Same sums in the same order as the two-pass path below: the same results.
      const int64_t D = s.D;
      at::parallel_for(0, s.B, s.grain, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          if (h.status[b] != 0) continue;
          s_t* zb = zp + b * D;
          const s_t* fb = fp + b * D;
          a_t sg = 0, sf = 0;
          residual_sums(zb, fb, D, sg, sf);
          a_t abs_r, nf;
          norms_from_sums(sg, sf, zb, fb, D, abs_r, nf);
          uint8_t fl = sample_head<a_t>(abs_r, nf, b, h, c);
          if ((fl & kStill) && update_needs_check<s_t, a_t>(abs_r, nf, c.beta) &&
              !damped_finite(zb, fb, c.beta, D)) {
            flag_update_overflow(b, h.status, h.n_iter);
            fl &= static_cast<uint8_t>(~(kStill | kCheck));
          }
          if (fl & kBetter) std::copy(zb, zb + D, bz + b * D);
          if (fl & kStill) damped_update(zb, fb, c.beta, D);
        }
      });
      return;
    }
    std::vector<uint8_t> flags;
    head<s_t, a_t>(s, zp, fp, h, c, flags);
    const int64_t D = s.D, nc = s.nc;
    check_damped_updates<s_t, a_t>(s.B, D, zp, fp, c.beta, h.status, h.n_iter, flags);
    at::parallel_for(0, s.B * nc, s.grain, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / nc, ch = t % nc;
        const uint8_t fl = flags[b];
        if (!(fl & (kBetter | kStill))) continue;
        const int64_t j0 = b * D + ch * kChunk, n = std::min(kChunk, D - ch * kChunk);
        s_t* zb = zp + j0;
        const s_t* fb = fp + j0;
        if (fl & kBetter) std::copy(zb, zb + n, bz + j0);
        if (fl & kStill) damped_update(zb, fb, c.beta, n);
      }
    });
  });
}

// Solves (A) x = 1 for an m x m matrix (row-major, overwritten) by Gaussian
// elimination with partial pivoting, in double. Returns false when singular (a zero or
// non-finite pivot) or when the solution is not finite: the cases where LAPACK's
// solution (the reference backend) is not finite.
bool solve_ones(double* A, double* x, int64_t m) {
  for (int64_t i = 0; i < m; ++i) x[i] = 1.0;
  for (int64_t k = 0; k < m; ++k) {
    int64_t p = k;
    double best = std::abs(A[k * m + k]);
    for (int64_t r = k + 1; r < m; ++r) {
      const double v = std::abs(A[r * m + k]);
      if (v > best) {
        best = v;
        p = r;
      }
    }
    if (!(best > 0.0) || !std::isfinite(best)) return false;
    if (p != k) {
      for (int64_t cidx = 0; cidx < m; ++cidx) std::swap(A[k * m + cidx], A[p * m + cidx]);
      std::swap(x[k], x[p]);
    }
    const double piv = A[k * m + k];
    for (int64_t r = k + 1; r < m; ++r) {
      const double f = A[r * m + k] / piv;
      if (f == 0.0) continue;
      for (int64_t cidx = k; cidx < m; ++cidx) A[r * m + cidx] -= f * A[k * m + cidx];
      x[r] -= f * x[k];
    }
  }
  for (int64_t k = m - 1; k >= 0; --k) {
    double v = x[k];
    for (int64_t cidx = k + 1; cidx < m; ++cidx) v -= A[k * m + cidx] * x[cidx];
    x[k] = v / A[k * m + k];
    if (!std::isfinite(x[k])) return false;
  }
  return true;
}

void anderson_step_cpu(const at::Tensor& z, const at::Tensor& fz_in, const at::Tensor& status,
                       const at::Tensor& n_iter, const at::Tensor& abs_res,
                       const at::Tensor& rel_res, const at::Tensor& abs0,
                       const std::optional<at::Tensor>& best_z,
                       const std::optional<at::Tensor>& best_abs,
                       const std::optional<at::Tensor>& best_rel, const at::Tensor& F,
                       const at::Tensor& G, const at::Tensor& H, int64_t slot, double tol,
                       double beta, bool stop_rel, double divergence, double eps, double lam,
                       const std::optional<at::Tensor>& tol_t) {
  check_state(z, fz_in, status, n_iter, abs_res, rel_res, abs0, best_z, best_abs, best_rel);
  check_history(z, F, G, H, slot);
  check_tol(z, tol_t);
  const at::Tensor fz = fz_in.contiguous();
  const Shape s = shape_of(z);
  if (s.B == 0) return;
  const int64_t m = F.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "anderson_step_cpu", [&] {
    using s_t = scalar_t;
    using a_t = at::opmath_type<s_t>;
    const StepScalars<a_t> c = make_scalars<a_t>(tol, beta, stop_rel, divergence, eps, lam);
    const a_t one_m_beta = static_cast<a_t>(1.0 - beta);
    s_t* zp = z.data_ptr<s_t>();
    const s_t* fp = fz.data_ptr<s_t>();
    s_t* bz = opt_ptr<s_t>(best_z);
    s_t* Fp = F.data_ptr<s_t>();
    s_t* Gp = G.data_ptr<s_t>();
    a_t* Hp = H.data_ptr<a_t>();
    const int64_t B = s.B, D = s.D, nc = s.nc;
    const HeadPtrs<a_t> h = head_ptrs<a_t>(status, n_iter, abs_res, rel_res, abs0, best_abs, best_rel, tol_t);
    std::vector<a_t> alpha(B * m);
    std::vector<uint8_t> solved(B, 0);

    // Per sample running at entry, from its Gram row (the chunk partials, in chunk
    // order): H's row/column, the regularised small solve in double, the weights.
    auto gram_solve = [&](int64_t b, uint8_t fl, const a_t* prow_b, double* A, double* x) {
      a_t* Hb = Hp + b * m * m;
      for (int64_t i = 0; i < m; ++i) {
        a_t r = 0;
        for (int64_t ch = 0; ch < nc; ++ch) r += prow_b[ch * m + i];
        Hb[slot * m + i] = r;
        Hb[i * m + slot] = r;
      }
      if (!(fl & kStill)) return;
      // float64 system: H widened, ridge lam * H_ss in float64 (as every backend)
      const double ridge = lam * static_cast<double>(Hb[slot * m + slot]);
      for (int64_t i = 0; i < m; ++i)
        for (int64_t k = 0; k < m; ++k)
          A[i * m + k] = static_cast<double>(Hb[i * m + k]) + (i == k ? ridge : 0.0);
      if (!solve_ones(A, x, m)) return;
      double sum = 0;
      for (int64_t i = 0; i < m; ++i) sum += x[i];
      bool ok = std::isfinite(sum) && sum != 0.0;
      for (int64_t i = 0; ok && i < m; ++i) {
        const double a = x[i] / sum;
        ok = std::isfinite(a);
        alpha[b * m + i] = static_cast<a_t>(a);
      }
      solved[b] = ok ? 1 : 0;
    };
    auto mix_chunk = [&](int64_t b, int64_t off, int64_t n, a_t* out, a_t* gacc, const s_t** rows) -> bool {
      return mix_into(Fp + b * m * D + off, Gp + b * m * D + off, fp + b * D + off, slot, alpha.data() + b * m,
                      one_m_beta, m, D, n, out, gacc, rows);
    };
    auto picard_chunk = [&](int64_t b, int64_t off, int64_t n) {
      damped_update(zp + b * D + off, fp + b * D + off, c.beta, n);
    };

    if (nc == 1) {
      // A sample fits one task: head, Gram row, solve and mix in one visit, so the mix
      // reads the sample's history (m rows of F, and of G when beta != 1) back from
      // cache instead of from memory. Same operations in the same order as the phased
      // path below: the same results.
      at::parallel_for(0, B, s.grain, [&](int64_t b0, int64_t b1) {
        std::vector<a_t> gbuf(D), out(D), gacc(D), row(m);
        std::vector<const s_t*> rows(m);
        std::vector<double> A(m * m), x(m);
        for (int64_t b = b0; b < b1; ++b) {
          if (h.status[b] != 0) continue;
          s_t* zb = zp + b * D;
          const s_t* fb = fp + b * D;
          a_t sg, sf;
          head_history_gram(static_cast<const s_t*>(zb), fb, Fp + b * m * D, Gp + b * m * D, slot, m, D, D,
                            gbuf.data(), row.data(), sg, sf, rows.data());
          a_t abs_r, nf;
          norms_from_sums(sg, sf, static_cast<const s_t*>(zb), fb, D, abs_r, nf);
          uint8_t fl = sample_head<a_t>(abs_r, nf, b, h, c);
          if ((fl & kStill) && update_needs_check<s_t, a_t>(abs_r, nf, c.beta)) fl |= kCheck;
          gram_solve(b, fl, row.data(), A.data(), x.data());
          if (fl & kBetter) std::copy(zb, zb + D, bz + b * D);
          if (!(fl & kStill)) continue;
          bool ok = solved[b] != 0;
          if (ok) ok = mix_chunk(b, 0, D, out.data(), gacc.data(), rows.data());
          if (ok) {
            store(zb, out.data(), D);
          } else if ((fl & kCheck) && !damped_finite(zb, fb, c.beta, D)) {
            flag_update_overflow(b, h.status, h.n_iter);  // Picard fallback overflows: frozen
          } else {
            picard_chunk(b, 0, D);
          }
        }
      });
      return;
    }

    // Phase 1 (samples running at entry): residual partials, ring-buffer slot and Gram
    // row partials in one pass over (sample, chunk) tasks; then the per-sample head.
    std::vector<a_t> pg(B * nc), pf(B * nc), prow(B * nc * m);
    at::parallel_for(0, B * nc, s.grain, [&](int64_t t0, int64_t t1) {
      std::vector<a_t> gbuf(std::min(kChunk, D));
      std::vector<const s_t*> rows(m);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / nc, ch = t % nc;
        if (h.status[b] != 0) continue;
        const int64_t off = ch * kChunk, n = std::min(kChunk, D - off);
        head_history_gram(zp + b * D + off, fp + b * D + off, Fp + b * m * D + off, Gp + b * m * D + off,
                          slot, m, D, n, gbuf.data(), prow.data() + t * m, pg[t], pf[t], rows.data());
      }
    });
    std::vector<uint8_t> flags;
    finish_heads(B, D, nc, pg, pf, static_cast<const s_t*>(zp), fp, h, c, flags);

    // Phase 2 (per sample): Gram row/column, small solve, weights.
    at::parallel_for(0, B, std::max<int64_t>(1, 4096 / (m * m * m + 1)), [&](int64_t b0, int64_t b1) {
      std::vector<double> A(m * m), x(m);
      for (int64_t b = b0; b < b1; ++b)
        if (flags[b] & kRunning) gram_solve(b, flags[b], prow.data() + b * nc * m, A.data(), x.data());
    });

    // Phase 3 (still-running samples): mix, finiteness check, z update (Picard fallback).
    {
      // chunks of a sample on several threads: mixes in a workspace, then the write
      at::Tensor ws = at::empty({B, D}, z.options().dtype(c10::CppTypeToScalarType<a_t>::value));
      a_t* wp = ws.data_ptr<a_t>();
      std::vector<uint8_t> pok(B * nc, 0);
      at::parallel_for(0, B * nc, s.grain, [&](int64_t t0, int64_t t1) {
        std::vector<a_t> gacc(kChunk);
        std::vector<const s_t*> rows(m);
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t b = t / nc, ch = t % nc;
          if (!(flags[b] & kStill) || !solved[b]) continue;
          const int64_t off = ch * kChunk, n = std::min(kChunk, D - off);
          pok[t] = mix_chunk(b, off, n, wp + b * D + off, gacc.data(), rows.data()) ? 1 : 0;
        }
      });
      std::vector<uint8_t> ok(B, 0);
      for (int64_t b = 0; b < B; ++b) {
        if (!(flags[b] & kStill)) continue;
        bool all = solved[b] != 0;
        for (int64_t ch = 0; all && ch < nc; ++ch) all = pok[b * nc + ch] != 0;
        ok[b] = all ? 1 : 0;
        if (!all && (flags[b] & kCheck) && !damped_finite(zp + b * D, fp + b * D, c.beta, D)) {
          flag_update_overflow(b, h.status, h.n_iter);  // Picard fallback overflows: frozen
          flags[b] &= static_cast<uint8_t>(~(kStill | kCheck));
        }
      }
      at::parallel_for(0, B * nc, s.grain, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t b = t / nc, ch = t % nc;
          const int64_t off = ch * kChunk, n = std::min(kChunk, D - off);
          if (flags[b] & kBetter) std::copy(zp + b * D + off, zp + b * D + off + n, bz + b * D + off);
          if (!(flags[b] & kStill)) continue;
          if (ok[b]) {
            store(zp + b * D + off, wp + b * D + off, n);
          } else {
            picard_chunk(b, off, n);
          }
        }
      });
    }
  });
}

bool with_cuda() {
#ifdef IMP_FAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY(imp_fast, m) {
  m.def(
      "picard_step(Tensor(a!) z, Tensor fz, Tensor(b!) status, Tensor(c!) n_iter, "
      "Tensor(d!) abs_res, Tensor(e!) rel_res, Tensor abs0, Tensor(f!)? best_z, "
      "Tensor(g!)? best_abs, Tensor(h!)? best_rel, float tol, float beta, bool stop_rel, "
      "float divergence, float eps, Tensor? tol_t=None) -> ()");
  m.def(
      "anderson_step(Tensor(a!) z, Tensor fz, Tensor(b!) status, Tensor(c!) n_iter, "
      "Tensor(d!) abs_res, Tensor(e!) rel_res, Tensor abs0, Tensor(f!)? best_z, "
      "Tensor(g!)? best_abs, Tensor(h!)? best_rel, Tensor(i!) F, Tensor(j!) G, Tensor(k!) H, "
      "int slot, float tol, float beta, bool stop_rel, float divergence, float eps, "
      "float lam, Tensor? tol_t=None) -> ()");
}

TORCH_LIBRARY_IMPL(imp_fast, CPU, m) {
  m.impl("picard_step", &picard_step_cpu);
  m.impl("anderson_step", &anderson_step_cpu);
}

// The steps are not differentiable (solves run under no_grad; gradients come from the
// implicit-function theorem): skip the autograd layer instead of paying its boxed
// not-implemented fallback on every call.
TORCH_LIBRARY_IMPL(imp_fast, Autograd, m) {
  m.impl("picard_step", torch::CppFunction::makeFallthrough());
  m.impl("anderson_step", torch::CppFunction::makeFallthrough());
}

}  // namespace imp_fast

// Eager fast path for CPU tensors: the same kernels, called straight from Python. A
// torch.ops call parses ~20 arguments through the dispatcher (about 3 us, as long as
// the whole (8, 256) Anderson step itself); here the state's tensors and scalars come
// as one tuple built once per solve (imp_fast/backends/cpp.py), so a step costs one
// cheap call. torch.compile, fake tensors and CUDA keep using torch.ops.imp_fast.
namespace {

const at::Tensor* tensor_at(PyObject* tup, Py_ssize_t i) {
  PyObject* o = PyTuple_GET_ITEM(tup, i);
  if (!THPVariable_Check(o)) return nullptr;
  return &THPVariable_Unpack(o);
}

std::optional<at::Tensor> optional_at(PyObject* tup, Py_ssize_t i) {
  PyObject* o = PyTuple_GET_ITEM(tup, i);
  if (o == Py_None) return std::nullopt;
  return THPVariable_Unpack(o);
}

// state = (z, status, n_iter, abs_res, rel_res, abs0, best_z, best_abs, best_rel, F, G, H,
//          tol, beta, stop_rel, divergence, eps, lam, tol_t); F/G/H/best_*/tol_t may be
//          None (tol_t: the per-sample tolerances, replacing tol where given).
PyObject* step_fast(PyObject* /*self*/, PyObject* args) {
  PyObject *state, *fz_obj;
  long long slot = -1;
  if (!PyArg_ParseTuple(args, "O!O|L", &PyTuple_Type, &state, &fz_obj, &slot)) return nullptr;
  if (PyTuple_GET_SIZE(state) != 19 || !THPVariable_Check(fz_obj)) {
    PyErr_SetString(PyExc_TypeError, "imp_fast._C._step_cpu: expected (state tuple of 19, fz tensor[, slot])");
    return nullptr;
  }
  {
    PyObject* t = PyTuple_GET_ITEM(state, 18);
    if (t != Py_None && !THPVariable_Check(t)) {
      PyErr_SetString(PyExc_TypeError, "imp_fast._C._step_cpu: state[18] (tol_t) must be None or a tensor");
      return nullptr;
    }
  }
  for (Py_ssize_t i : {0, 1, 2, 3, 4, 5}) {
    if (tensor_at(state, i) == nullptr) {
      PyErr_Format(PyExc_TypeError, "imp_fast._C._step_cpu: state[%zd] must be a tensor", i);
      return nullptr;
    }
  }
  try {
    const at::Tensor& fz = THPVariable_Unpack(fz_obj);
    const double tol = PyFloat_AsDouble(PyTuple_GET_ITEM(state, 12));
    const double beta = PyFloat_AsDouble(PyTuple_GET_ITEM(state, 13));
    const bool stop_rel = PyObject_IsTrue(PyTuple_GET_ITEM(state, 14)) == 1;
    const double divergence = PyFloat_AsDouble(PyTuple_GET_ITEM(state, 15));
    const double eps = PyFloat_AsDouble(PyTuple_GET_ITEM(state, 16));
    const double lam = PyFloat_AsDouble(PyTuple_GET_ITEM(state, 17));
    if (PyErr_Occurred()) return nullptr;
    const std::optional<at::Tensor> best_z = optional_at(state, 6), best_abs = optional_at(state, 7),
                                    best_rel = optional_at(state, 8), tol_t = optional_at(state, 18);
    const at::Tensor &z = *tensor_at(state, 0), &status = *tensor_at(state, 1),
                     &n_iter = *tensor_at(state, 2), &abs_res = *tensor_at(state, 3),
                     &rel_res = *tensor_at(state, 4), &abs0 = *tensor_at(state, 5);
    TORCH_CHECK(z.device().is_cpu() && fz.device().is_cpu(), "imp_fast._C._step_cpu: CPU tensors only");
    const at::Tensor *F = tensor_at(state, 9), *G = tensor_at(state, 10), *H = tensor_at(state, 11);
    TORCH_CHECK(slot < 0 || (F && G && H), "imp_fast._C._step_cpu: Anderson needs F, G and H");
    // The kernels run without the GIL; their errors are turned into Python exceptions
    // only once it is held again.
    std::string err;
    Py_BEGIN_ALLOW_THREADS
    try {
      if (slot < 0) {
        imp_fast::picard_step_cpu(z, fz, status, n_iter, abs_res, rel_res, abs0, best_z, best_abs, best_rel,
                                  tol, beta, stop_rel, divergence, eps, tol_t);
      } else {
        imp_fast::anderson_step_cpu(z, fz, status, n_iter, abs_res, rel_res, abs0, best_z, best_abs,
                                    best_rel, *F, *G, *H, slot, tol, beta, stop_rel, divergence, eps, lam,
                                    tol_t);
      }
    } catch (const c10::Error& e) {
      err = e.what_without_backtrace();
      if (err.empty()) err = "imp_fast._C._step_cpu failed";
    } catch (const std::exception& e) {
      err = e.what();
      if (err.empty()) err = "imp_fast._C._step_cpu failed";
    }
    Py_END_ALLOW_THREADS
    if (!err.empty()) {
      PyErr_SetString(PyExc_RuntimeError, err.c_str());
      return nullptr;
    }
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
    return nullptr;
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"_step_cpu", step_fast, METH_VARARGS,
     "_step_cpu(state, fz[, slot]): one Picard step (no slot) or Anderson step, CPU, eager."},
    {"_running_rows", imp_fast::running_rows_py, METH_O,
     "_running_rows(status): int64 indices of the rows whose int8 status is 0 (CPU)."},
    {"_gather_rows", imp_fast::gather_rows_py, METH_VARARGS,
     "_gather_rows(groups, idx[, prefix]): rows idx of each group of tensors, one new buffer per group "
     "(CPU); prefix: per group, the number of dim-1 slices copied (the rest zeroed), or None."},
    {"_scatter_rows", imp_fast::scatter_rows_py, METH_VARARGS,
     "_scatter_rows(pairs, idx): dst[idx[i]] = src[i] for each (dst, src) pair (CPU)."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

// A plain Python module so that `import imp_fast._C` loads the library and runs the
// registrations above (no pybind11: the ops are reached through torch.ops.imp_fast).
extern "C" {
static struct PyModuleDef imp_fast_c_module = {PyModuleDef_HEAD_INIT, "_C",
                                               "imp_fast compiled ops (torch.ops.imp_fast)", -1,
                                               methods};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* mod = PyModule_Create(&imp_fast_c_module);
  if (mod == nullptr) return nullptr;
  PyObject* flag = imp_fast::with_cuda() ? Py_True : Py_False;
  Py_INCREF(flag);
  if (PyModule_AddObject(mod, "WITH_CUDA", flag) < 0) {
    Py_DECREF(flag);
    Py_DECREF(mod);
    return nullptr;
  }
  return mod;
}
}
