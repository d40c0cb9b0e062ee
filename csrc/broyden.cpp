// imp_fast::broyden_step: one limited-memory "good" Broyden iteration as one fused op.
//
// The ground truth is imp_fast/backends/broyden.py (the plain-torch step; its module
// docstring states the method). The inverse-Jacobian estimate of g(z) = f(z) - z is
// J^-1 = -I + sum_i U_i V_i^T over the updates in use (csrc/broyden.h: broyden_slots).
// Per sample b, in one task of at::parallel_for over samples (so results do not depend
// on the thread count):
//
//   restart   k > 1 and slot 0: U_b, V_b zeroed (every sample, as the torch step);
//   head      (samples running at entry) one pass over z, fz: residual sums, g = fz - z,
//             and at k > 0 dz = z - z_prev, dg = g - g_prev into per-thread scratch; then
//             the per-sample status head shared with the Picard/Anderson ops
//             (step_common.h: residuals, statuses, n_iter, best iterate; norms recomputed
//             scale-safely in double when the fast sums left their exact range);
//   dots      one pass over the used slots of U and V: a_i = V_i.dg, c_i = V_i.g,
//             d_i = U_i.dz;
//   combine   one more pass over them, in blocks along D: v = J^-T dz = -dz + sum d_i V_i,
//             r = dz - J^-1 dg, p = -J^-1 g; with v.dg, v.g, max |r| and finiteness
//             accumulated on the way. v and r go straight into the new slot of V and U;
//   update    u = r / (v.dg) (u and v zeroed when v.dg is 0 or the update is not finite:
//             decided before any u is formed, from max |r| / |v.dg|, as division is
//             monotonic), step = p - u (v.g), z_new = z + beta step; a non-finite step
//             falls back to the damped Picard step z + beta g; a z_new that overflows the
//             storage dtype flags the sample NONFINITE (it keeps z and n_iter);
//   write     z_prev = z, g_prev = g (samples still running after the head), z = z_new.
//
// Samples not running after the head keep z_prev, g_prev, and zeros in the new slot (it
// is unwritten, so zero already: the torch step's zero update of these rows is a no-op).
// Storage dtypes float64, float32, float16, bfloat16; the history and every small vector
// in the compute dtype (float64 for float64 storage, else float32). Scratch: four
// D-vectors and 3 m coefficients per task (no (B, D) temporaries).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "broyden.h"
#include "checks.h"
#include "cpu_norms.h"
#include "lanes.h"
#include "step_common.h"

namespace imp_fast {
namespace {

constexpr int64_t kBlk = 512;  // elements of a block of the combine pass (stack buffers)

// Head pass of one sample: sg = sum g^2, sf = sum fz^2 with g = fz - z, g into gb; with
// kUpd also dz = z - z_prev and dg = g - g_prev.
template <bool kUpd, typename s_t, typename a_t>
IMP_FAST_HOT void head_pass(const s_t* zb, const s_t* fb, const a_t* zp, const a_t* gp, int64_t D, a_t* gb,
                            a_t* dz, a_t* dg, a_t& sg, a_t& sf) {
  using L = Lanes<a_t>;
  L g2l = L::zero(), f2l = L::zero();
  int64_t j = 0;
  for (; j + kLanes <= D; j += kLanes) {
    const L zv = L::load(zb + j), fv = L::load(fb + j);
    const L gv = fv - zv;
    g2l += gv * gv;
    f2l += fv * fv;
    gv.store(gb + j);
    if (kUpd) {
      (zv - L::load(zp + j)).store(dz + j);
      (gv - L::load(gp + j)).store(dg + j);
    }
  }
  a_t g2[kLanes], f2[kLanes];
  g2l.store(g2);
  f2l.store(f2);
  for (int l = 0; j < D; ++j, ++l) {
    const a_t zv = static_cast<a_t>(zb[j]), fv = static_cast<a_t>(fb[j]);
    const a_t gv = fv - zv;
    g2[l] += gv * gv;
    f2[l] += fv * fv;
    gb[j] = gv;
    if (kUpd) {
      dz[j] = zv - zp[j];
      dg[j] = gv - gp[j];
    }
  }
  sg = lane_sum(g2);
  sf = lane_sum(f2);
}

// (V_i.dg, V_i.g, U_i.dz) of one slot i, with kLanes accumulators each.
template <typename a_t>
IMP_FAST_HOT void slot_dots(const a_t* __restrict__ Ui, const a_t* __restrict__ Vi, const a_t* __restrict__ g,
                            const a_t* __restrict__ dz, const a_t* __restrict__ dg, int64_t D, a_t* out) {
  const int64_t Dv = D - D % kLanes;
  using L = Lanes<a_t>;
  L sa = L::zero(), sc = L::zero(), sd = L::zero();
  for (int64_t j = 0; j < Dv; j += kLanes) {
    const L vv = L::load(Vi + j);
    sa += vv * L::load(dg + j);
    sc += vv * L::load(g + j);
    sd += L::load(Ui + j) * L::load(dz + j);
  }
  a_t la[kLanes], lc[kLanes], ld[kLanes];
  sa.store(la);
  sc.store(lc);
  sd.store(ld);
  for (int64_t j = Dv, l = 0; j < D; ++j, ++l) {
    la[l] += Vi[j] * dg[j];
    lc[l] += Vi[j] * g[j];
    ld[l] += Ui[j] * dz[j];
  }
  out[0] = lane_sum(la);
  out[1] = lane_sum(lc);
  out[2] = lane_sum(ld);
}

// One pass over the used slots: coef = (a, c, d), a_i = V_i.dg, c_i = V_i.g, d_i = U_i.dz.
template <typename a_t>
void history_dots(const a_t* Ub, const a_t* Vb, const a_t* g, const a_t* dz, const a_t* dg, int64_t used,
                  int64_t D, a_t* coef) {
  for (int64_t i = 0; i < used; ++i) {
    a_t out[3];
    slot_dots(Ub + i * D, Vb + i * D, g, dz, dg, D, out);
    coef[i] = out[0];
    coef[used + i] = out[1];
    coef[2 * used + i] = out[2];
  }
}

struct CombineOut {
  double vdg, vg, rmax;
  bool finite;  // every v and r finite
};

// The second pass over the used slots (in blocks of kBlk elements: each U_i, V_i block
// read once): v = -dz + sum_i d_i V_i into Vs, r = dz - J^-1 dg = dz - (sum_i a_i U_i - dg)
// into Us, p = -J^-1 g = -(sum_i c_i U_i - g) into p; v.dg, v.g, max |r| and whether v and
// r are finite.
template <typename a_t>
IMP_FAST_HOT void combine_pass(const a_t* Ub, const a_t* Vb, const a_t* coef, int64_t used, int64_t D,
                               const a_t* g, const a_t* dz, const a_t* dg, a_t* Us, a_t* Vs, a_t* p, a_t& vdg_out,
                               a_t& vg_out, a_t& rmax_out, bool& finite_out) {
  const a_t* ca = coef;
  const a_t* cc = coef + used;
  const a_t* cd = coef + 2 * used;
  const a_t lim = std::numeric_limits<a_t>::max();
  a_t dl[kLanes] = {}, gl[kLanes] = {}, mx[kLanes] = {};
  int bad = 0;
  a_t w[kBlk], s[kBlk], vv[kBlk];
  for (int64_t j0 = 0; j0 < D; j0 += kBlk) {
    const int64_t n = std::min(kBlk, D - j0);
    for (int64_t q = 0; q < n; ++q) {
      w[q] = 0;
      s[q] = 0;
      vv[q] = 0;
    }
    for (int64_t i = 0; i < used; ++i) {
      const a_t ai = ca[i], ci = cc[i], di = cd[i];
      const a_t* Ui = Ub + i * D + j0;
      const a_t* Vi = Vb + i * D + j0;
      for (int64_t q = 0; q < n; ++q) {
        const a_t uq = Ui[q];
        w[q] += ai * uq;
        s[q] += ci * uq;
        vv[q] += di * Vi[q];
      }
    }
    const a_t* gq = g + j0;
    const a_t* dzq = dz + j0;
    const a_t* dgq = dg + j0;
    a_t* Uq = Us + j0;
    a_t* Vq = Vs + j0;
    a_t* pq = p + j0;
    int64_t q = 0;
    auto elem = [&](int64_t e, int l) {
      const a_t v = vv[e] - dzq[e];
      const a_t jdg = w[e] - dgq[e];
      const a_t r = dzq[e] - jdg;
      Vq[e] = v;
      Uq[e] = r;
      pq[e] = -(s[e] - gq[e]);
      dl[l] += v * dgq[e];
      gl[l] += v * gq[e];
      const a_t ar = std::abs(r);
      mx[l] = mx[l] > ar ? mx[l] : ar;
      bad |= !(std::abs(v) <= lim) | !(ar <= lim);
    };
    for (; q + kLanes <= n; q += kLanes)
      for (int l = 0; l < kLanes; ++l) elem(q + l, l);
    for (int l = 0; q < n; ++q, ++l) elem(q, l);
  }
  vdg_out = lane_sum(dl);
  vg_out = lane_sum(gl);
  a_t m = 0;
  for (int l = 0; l < kLanes; ++l) m = m > mx[l] ? m : mx[l];
  rmax_out = m;
  finite_out = bad == 0;
}

// z_new = z + beta step (z + step when beta is 1) into zn, step = p - u (v.g) with
// u = r / (v.dg) written over r in Us when upd, else step = p. Returns (through the
// flags) whether every step entry is finite and every z_new entry storable in s_t.
template <bool kUpd, typename s_t, typename a_t>
IMP_FAST_HOT void step_pass(const s_t* zb, a_t* Us, const a_t* p, a_t vdg, a_t vg, a_t beta, int64_t D, a_t* zn,
                            bool& step_finite, bool& storable) {
  const a_t lim = std::numeric_limits<a_t>::max();
  const a_t slim = static_cast<a_t>(StorageMax<s_t>::value);
  const bool one = beta == a_t(1);
  int sbad = 0, zbad = 0;
  for (int64_t j = 0; j < D; ++j) {
    a_t st = p[j];
    if (kUpd) {
      const a_t u = Us[j] / vdg;
      Us[j] = u;
      st = st - u * vg;
    }
    const a_t zv = static_cast<a_t>(zb[j]);
    const a_t zz = one ? zv + st : zv + beta * st;
    zn[j] = zz;
    sbad |= !(std::abs(st) <= lim);
    zbad |= !(std::abs(zz) <= slim);
  }
  step_finite = sbad == 0;
  storable = zbad == 0;
}

// The Picard fallback z + beta g into zn; whether all of it is storable in s_t.
template <typename s_t, typename a_t>
bool picard_fallback(const s_t* zb, const a_t* g, a_t beta, int64_t D, a_t* zn) {
  const a_t slim = static_cast<a_t>(StorageMax<s_t>::value);
  const bool one = beta == a_t(1);
  int zbad = 0;
  for (int64_t j = 0; j < D; ++j) {
    const a_t zv = static_cast<a_t>(zb[j]);
    const a_t zz = one ? zv + g[j] : zv + beta * g[j];
    zn[j] = zz;
    zbad |= !(std::abs(zz) <= slim);
  }
  return zbad == 0;
}

// z_prev = z, g_prev = g, then (move) z = z_new rounded to the storage type.
template <typename s_t, typename a_t>
IMP_FAST_HOT void write_pass(s_t* zb, const a_t* g, const a_t* zn, a_t* zp, a_t* gp, int64_t D, bool move) {
  for (int64_t j = 0; j < D; ++j) {
    const s_t zs = zb[j];
    zp[j] = static_cast<a_t>(zs);
    gp[j] = g[j];
    if (move) zb[j] = static_cast<s_t>(zn[j]);
  }
}

void broyden_step_cpu(const at::Tensor& z, const at::Tensor& fz_in, const at::Tensor& status,
                      const at::Tensor& n_iter, const at::Tensor& abs_res, const at::Tensor& rel_res,
                      const at::Tensor& abs0, const std::optional<at::Tensor>& best_z,
                      const std::optional<at::Tensor>& best_abs, const std::optional<at::Tensor>& best_rel,
                      const at::Tensor& U, const at::Tensor& V, const at::Tensor& z_prev, const at::Tensor& g_prev,
                      int64_t k, double tol, double beta, bool stop_rel, double divergence, double eps,
                      const std::optional<at::Tensor>& tol_t) {
  check_state(z, fz_in, status, n_iter, abs_res, rel_res, abs0, best_z, best_abs, best_rel);
  check_broyden(z, U, V, z_prev, g_prev, k);
  check_tol(z, tol_t);
  const at::Tensor fz = fz_in.contiguous();
  const int64_t B = z.size(0), D = z.size(1), m = U.size(1);
  if (B == 0) return;
  const BroydenSlots sl = broyden_slots(k, m);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "broyden_step_cpu", [&] {
    using s_t = scalar_t;
    using a_t = at::opmath_type<s_t>;
    const StepScalars<a_t> c = make_scalars<a_t>(tol, beta, stop_rel, divergence, eps, 0.0);
    s_t* zp_all = z.data_ptr<s_t>();
    const s_t* fp_all = fz.data_ptr<s_t>();
    s_t* bz = opt_ptr<s_t>(best_z);
    const HeadPtrs<a_t> h = head_ptrs<a_t>(status, n_iter, abs_res, rel_res, abs0, best_abs, best_rel, tol_t);
    a_t* Up = U.data_ptr<a_t>();
    a_t* Vp = V.data_ptr<a_t>();
    a_t* zprev = z_prev.data_ptr<a_t>();
    a_t* gprev = g_prev.data_ptr<a_t>();
    const int64_t used = sl.used, slot = sl.slot;
    // ~64K multiply-adds per task at least (a sample costs about (4 used + 8) D)
    const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, D * (4 * used + 8)));
    at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
      std::vector<a_t> scratch(4 * static_cast<size_t>(D) + 3 * static_cast<size_t>(used));
      a_t* g = scratch.data();
      a_t* dz = g + D;  // reused for z_new once the combine pass has read it
      a_t* dg = dz + D;
      a_t* p = dg + D;
      a_t* coef = p + D;
      for (int64_t b = b0; b < b1; ++b) {
        a_t* Ub = Up + b * m * D;
        a_t* Vb = Vp + b * m * D;
        a_t* Us = Ub + slot * D;
        a_t* Vs = Vb + slot * D;
        if (sl.restart) {
          std::fill(Ub, Ub + m * D, a_t(0));
          std::fill(Vb, Vb + m * D, a_t(0));
        }
        // Samples not running: the torch step writes a zero update into their new slot,
        // which holds zeros already (slots [used, m) are unwritten): nothing to do.
        if (h.status[b] != 0) continue;
        s_t* zb = zp_all + b * D;
        const s_t* fb = fp_all + b * D;
        a_t* zpb = zprev + b * D;
        a_t* gpb = gprev + b * D;
        a_t sg, sf;
        if (sl.update) {
          head_pass<true>(static_cast<const s_t*>(zb), fb, zpb, gpb, D, g, dz, dg, sg, sf);
        } else {
          head_pass<false>(static_cast<const s_t*>(zb), fb, zpb, gpb, D, g, dz, dg, sg, sf);
        }
        a_t abs_r, nf;
        norms_from_sums(sg, sf, static_cast<const s_t*>(zb), fb, D, abs_r, nf);
        const uint8_t fl = sample_head<a_t>(abs_r, nf, b, h, c);
        if (fl & kBetter) std::copy(zb, zb + D, bz + b * D);
        if (!(fl & kStill)) continue;
        bool step_finite = true, storable = true;
        a_t* zn = dz;
        if (sl.update) {
          history_dots(Ub, Vb, g, dz, dg, used, D, coef);
          a_t vdg, vg, rmax;
          bool finite;
          combine_pass(Ub, Vb, coef, used, D, g, dz, dg, Us, Vs, p, vdg, vg, rmax, finite);
          // u = r / (v.dg) is finite everywhere iff r is and max |r| / |v.dg| is (division
          // is monotonic): else the update is zero (estimate unchanged)
          const bool ok = finite && std::isfinite(rmax / std::abs(vdg));
          if (ok) {
            step_pass<true, s_t>(zb, Us, p, vdg, vg, c.beta, D, zn, step_finite, storable);
          } else {
            std::fill(Us, Us + D, a_t(0));
            std::fill(Vs, Vs + D, a_t(0));
            step_pass<false, s_t>(zb, Us, p, vdg, vg, c.beta, D, zn, step_finite, storable);
          }
        } else {
          // k = 0: no update, J^-1 = -I, the step is g
          step_pass<false, s_t>(zb, Us, g, a_t(0), a_t(0), c.beta, D, zn, step_finite, storable);
        }
        if (!step_finite) storable = picard_fallback(static_cast<const s_t*>(zb), g, c.beta, D, zn);
        if (!storable) flag_update_overflow(b, h.status, h.n_iter);  // keeps z and n_iter
        write_pass(zb, g, zn, zpb, gpb, D, storable);
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(imp_fast, m) {
  m.def(
      "broyden_step(Tensor(a!) z, Tensor fz, Tensor(b!) status, Tensor(c!) n_iter, "
      "Tensor(d!) abs_res, Tensor(e!) rel_res, Tensor abs0, Tensor(f!)? best_z, "
      "Tensor(g!)? best_abs, Tensor(h!)? best_rel, Tensor(i!) U, Tensor(j!) V, "
      "Tensor(k!) z_prev, Tensor(l!) g_prev, int k, float tol, float beta, bool stop_rel, "
      "float divergence, float eps, Tensor? tol_t=None) -> ()");
}

TORCH_LIBRARY_IMPL(imp_fast, CPU, m) {
  m.impl("broyden_step", &broyden_step_cpu);
}

// Not differentiable (as the other steps): skip the autograd layer.
TORCH_LIBRARY_IMPL(imp_fast, Autograd, m) {
  m.impl("broyden_step", torch::CppFunction::makeFallthrough());
}

}  // namespace imp_fast
