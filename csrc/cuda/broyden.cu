// CUDA twin of csrc/broyden.cpp: imp_fast::broyden_step, one limited-memory "good"
// Broyden iteration (ground truth: imp_fast/backends/broyden.py).
//
// One thread block per sample does the whole step, with the passes of the CPU op:
// restart (k > 1 and slot 0: U_b, V_b zeroed); the residual head (block reductions in a
// fixed order, recomputed scale-safely in double when the fast sum left its exact range;
// the per-sample status logic of step_common.h by thread 0); the dots a_i = V_i.dg,
// c_i = V_i.g, d_i = U_i.dz over the used slots (csrc/broyden.h: broyden_slots); the
// combine pass v = J^-T dz, r = dz - J^-1 dg, p = -J^-1 g with v.dg, v.g, max |r|; the
// update u = r / (v.dg) into the new slot (zeros when not finite: decided from
// max |r| / |v.dg| before any u is formed), the step p - u (v.g), the Picard fallback
// for a non-finite step, the NONFINITE flag for a z_new that overflows the storage type
// (z kept); z_prev = z, g_prev = g, z = z_new. Each thread owns the elements
// j = threadIdx.x + t * blockDim.x of every D-vector, so between reductions no other
// synchronisation is needed. Frozen samples' blocks return at once (after a restart's
// zeroing). Workspace: a (B, D + 3 m) compute-dtype tensor (the step / z_new, the
// coefficients). No host synchronisation. Arguments are checked as on CPU (checks.h, broyden.h).
#ifdef IMP_FAST_WITH_CUDA

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <type_traits>

#include "../broyden.h"
#include "../checks.h"
#include "../step_common.h"
#include "block_reduce.cuh"

namespace imp_fast {
namespace {

constexpr int kThreads = 256;

template <typename s_t, typename a_t>
__global__ void broyden_kernel(s_t* __restrict__ z, const s_t* __restrict__ fz, int8_t* status, int32_t* n_iter,
                               a_t* abs_res, a_t* rel_res, const a_t* abs0, s_t* best_z, a_t* best_abs,
                               a_t* best_rel, a_t* U, a_t* V, a_t* z_prev, a_t* g_prev, a_t* ws,
                               const a_t* tol_p, int64_t D, int64_t m, BroydenSlots sl, StepScalars<a_t> c) {
  __shared__ a_t red[3 * 32];
  __shared__ double redd[32];
  __shared__ uint8_t flag_s;
  const int64_t b = blockIdx.x;
  const int64_t tid = threadIdx.x, nt = blockDim.x;
  a_t* Ub = U + b * m * D;
  a_t* Vb = V + b * m * D;
  a_t* Us = Ub + sl.slot * D;
  a_t* Vs = Vb + sl.slot * D;
  if (sl.restart) {  // memory full: back to -I (every sample, as the torch step)
    for (int64_t e = tid; e < m * D; e += nt) {
      Ub[e] = a_t(0);
      Vb[e] = a_t(0);
    }
  }
  // Samples not running keep zeros in their new slot (unwritten, so zero already: the
  // torch step's zero update of these rows is a no-op).
  if (status[b] != 0) return;  // uniform over the block
  s_t* zb = z + b * D;
  const s_t* fb = fz + b * D;
  a_t* zp = z_prev + b * D;
  a_t* gp = g_prev + b * D;
  a_t* wb = ws + b * (D + 3 * m);  // the step, then z_new
  a_t* coef = wb + D;              // a (used), c (used), d (used)

  // head: ||g||, ||fz|| (fast sums; scale-safe recompute when out of range)
  {
    a_t s2[2] = {a_t(0), a_t(0)};
    for (int64_t j = tid; j < D; j += nt) {
      const a_t fv = static_cast<a_t>(fb[j]);
      const a_t d = fv - static_cast<a_t>(zb[j]);
      s2[0] += d * d;
      s2[1] += fv * fv;
    }
    block_sum_n<2>(s2, red);
    const a_t sg = s2[0], sf = s2[1];
    a_t abs_r = ::sqrt(sg), nf = ::sqrt(sf);
    constexpr bool kScale = std::is_same<s_t, double>::value;
    if (!sum_in_range(sg) && !::isnan(sg))  // uniform over the block
      abs_r = static_cast<a_t>(block_safe_norm<kScale>(
          D, [&](int64_t j) { return static_cast<double>(fb[j]) - static_cast<double>(zb[j]); }, redd));
    if (!sum_in_range(sf) && !::isnan(sf))
      nf = static_cast<a_t>(
          block_safe_norm<kScale>(D, [&](int64_t j) { return static_cast<double>(fb[j]); }, redd));
    if (tid == 0)
      flag_s =
          sample_head<a_t>(abs_r, nf, b, status, n_iter, abs_res, rel_res, abs0, best_abs, best_rel, c, tol_p);
    __syncthreads();
  }
  const uint8_t fl = flag_s;
  if (fl & kBetter)
    for (int64_t j = tid; j < D; j += nt) best_z[b * D + j] = zb[j];
  if (!(fl & kStill)) return;
  const int64_t used = sl.used;
  const a_t beta = c.beta;
  const bool one = beta == a_t(1);
  a_t sbad = 0, zbad = 0;
  if (sl.update) {
    // dots over the used slots, three per reduction
    for (int64_t i = 0; i < used; ++i) {
      const a_t* Ui = Ub + i * D;
      const a_t* Vi = Vb + i * D;
      a_t s3[3] = {a_t(0), a_t(0), a_t(0)};
      for (int64_t j = tid; j < D; j += nt) {
        const a_t zv = static_cast<a_t>(zb[j]);
        const a_t gv = static_cast<a_t>(fb[j]) - zv;
        const a_t vi = Vi[j];
        s3[0] += vi * (gv - gp[j]);  // V_i . dg
        s3[1] += vi * gv;            // V_i . g
        s3[2] += Ui[j] * (zv - zp[j]);  // U_i . dz
      }
      block_sum_n<3>(s3, red);
      if (tid == 0) {
        coef[i] = s3[0];
        coef[used + i] = s3[1];
        coef[2 * used + i] = s3[2];
      }
    }
    __syncthreads();  // coef visible to the block
    // combine: v into Vs, r into Us, p into wb; v.dg, v.g, max |r|, finiteness
    a_t s3[3] = {a_t(0), a_t(0), a_t(0)};  // v.dg, v.g, not finite
    a_t rmax = 0;
    for (int64_t j = tid; j < D; j += nt) {
      a_t w = 0, s = 0, vv = 0;
      for (int64_t i = 0; i < used; ++i) {
        const a_t ui = Ub[i * D + j];
        w += coef[i] * ui;
        s += coef[used + i] * ui;
        vv += coef[2 * used + i] * Vb[i * D + j];
      }
      const a_t zv = static_cast<a_t>(zb[j]);
      const a_t gv = static_cast<a_t>(fb[j]) - zv;
      const a_t dz = zv - zp[j];
      const a_t dg = gv - gp[j];
      const a_t v = vv - dz;
      const a_t jdg = w - dg;
      const a_t r = dz - jdg;
      Vs[j] = v;
      Us[j] = r;
      wb[j] = -(s - gv);
      s3[0] += v * dg;
      s3[1] += v * gv;
      if (!::isfinite(v) || !::isfinite(r)) s3[2] = a_t(1);
      rmax = fmax(rmax, static_cast<a_t>(::fabs(r)));
    }
    block_sum_n<3>(s3, red);
    rmax = block_max(rmax, red);
    const a_t vdg = s3[0], vg = s3[1];
    // u = r / (v.dg) finite everywhere iff r is and max |r| / |v.dg| is (uniform)
    const bool ok = s3[2] == a_t(0) && ::isfinite(static_cast<a_t>(rmax / static_cast<a_t>(::fabs(vdg))));
    for (int64_t j = tid; j < D; j += nt) {
      a_t st = wb[j];
      if (ok) {
        const a_t u = Us[j] / vdg;
        Us[j] = u;
        st = st - u * vg;
      } else {
        Us[j] = a_t(0);
        Vs[j] = a_t(0);
      }
      const a_t zv = static_cast<a_t>(zb[j]);
      const a_t zz = one ? zv + st : zv + beta * st;
      wb[j] = zz;
      if (!::isfinite(st)) sbad = a_t(1);
      if (!(::fabs(zz) <= static_cast<a_t>(StorageMax<s_t>::value))) zbad = a_t(1);
    }
  } else {
    // k = 0: J^-1 = -I, the step is g
    for (int64_t j = tid; j < D; j += nt) {
      const a_t zv = static_cast<a_t>(zb[j]);
      const a_t st = static_cast<a_t>(fb[j]) - zv;
      const a_t zz = one ? zv + st : zv + beta * st;
      wb[j] = zz;
      if (!::isfinite(st)) sbad = a_t(1);
      if (!(::fabs(zz) <= static_cast<a_t>(StorageMax<s_t>::value))) zbad = a_t(1);
    }
  }
  {
    a_t s2[2] = {sbad, zbad};
    block_sum_n<2>(s2, red);
    sbad = s2[0];
    zbad = s2[1];
  }
  if (sbad != a_t(0)) {  // a step that is not finite: the damped Picard step z + beta g
    zbad = 0;
    for (int64_t j = tid; j < D; j += nt) {
      const a_t zv = static_cast<a_t>(zb[j]);
      const a_t gv = static_cast<a_t>(fb[j]) - zv;
      const a_t zz = one ? zv + gv : zv + beta * gv;
      wb[j] = zz;
      if (!(::fabs(zz) <= static_cast<a_t>(StorageMax<s_t>::value))) zbad = a_t(1);
    }
    zbad = block_sum(zbad, red);
  }
  const bool move = zbad == a_t(0);
  if (!move && tid == 0) flag_update_overflow(b, status, n_iter);  // keeps z and n_iter
  for (int64_t j = tid; j < D; j += nt) {
    const s_t zs = zb[j];
    const a_t zv = static_cast<a_t>(zs);
    zp[j] = zv;
    gp[j] = static_cast<a_t>(fb[j]) - zv;
    if (move) zb[j] = static_cast<s_t>(wb[j]);
  }
}

void broyden_step_cuda(const at::Tensor& z, const at::Tensor& fz_in, const at::Tensor& status,
                       const at::Tensor& n_iter, const at::Tensor& abs_res, const at::Tensor& rel_res,
                       const at::Tensor& abs0, const std::optional<at::Tensor>& best_z,
                       const std::optional<at::Tensor>& best_abs, const std::optional<at::Tensor>& best_rel,
                       const at::Tensor& U, const at::Tensor& V, const at::Tensor& z_prev, const at::Tensor& g_prev,
                       int64_t k, double tol, double beta, bool stop_rel, double divergence, double eps,
                       const std::optional<at::Tensor>& tol_t) {
  check_state(z, fz_in, status, n_iter, abs_res, rel_res, abs0, best_z, best_abs, best_rel);
  check_broyden(z, U, V, z_prev, g_prev, k);
  check_tol(z, tol_t);
  const c10::cuda::CUDAGuard guard(z.device());
  const at::Tensor fz = fz_in.contiguous();
  const int64_t B = z.size(0), D = z.size(1), m = U.size(1);
  if (B == 0) return;
  const BroydenSlots sl = broyden_slots(k, m);
  auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor ws = at::empty({B, D + 3 * m}, U.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "broyden_step_cuda", [&] {
    using a_t = at::opmath_type<scalar_t>;
    const auto c = make_scalars<a_t>(tol, beta, stop_rel, divergence, eps, 0.0);
    broyden_kernel<scalar_t, a_t><<<B, kThreads, 0, stream>>>(
        z.data_ptr<scalar_t>(), fz.data_ptr<scalar_t>(), status.data_ptr<int8_t>(), n_iter.data_ptr<int32_t>(),
        abs_res.data_ptr<a_t>(), rel_res.data_ptr<a_t>(), abs0.data_ptr<a_t>(), opt_ptr<scalar_t>(best_z),
        opt_ptr<a_t>(best_abs), opt_ptr<a_t>(best_rel), U.data_ptr<a_t>(), V.data_ptr<a_t>(),
        z_prev.data_ptr<a_t>(), g_prev.data_ptr<a_t>(), ws.data_ptr<a_t>(), opt_ptr<a_t>(tol_t), D, m, sl, c);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(imp_fast, CUDA, m) {
  m.impl("broyden_step", &broyden_step_cuda);
}

}  // namespace imp_fast

#endif  // IMP_FAST_WITH_CUDA
