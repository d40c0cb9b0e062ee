// CUDA twins of csrc/ops.cpp: imp_fast::picard_step and imp_fast::anderson_step.
//
// One thread block per sample does the whole step: block reductions of the residual
// norms (fixed order: deterministic; recomputed scale-safely in double when the fast
// sum over/underflowed), the per-sample status head (thread 0, shared logic in
// step_common.h), the best-iterate copy, the ring-buffer write and Gram row/column, the
// small (H + lam*H_ss I) a = 1 solve in double by thread 0 (Gaussian elimination with
// partial pivoting, in shared memory for m <= 64, a global workspace beyond: any m),
// the mix into a workspace, its check (finite once rounded to the storage type), and
// the z update (Picard fallback for singular / non-finite mixes; a Picard update that
// overflows the storage type flags NONFINITE and keeps z). Frozen samples' blocks return
// at once. No host synchronisation. Arguments are checked as the CPU ops check them
// (csrc/checks.h).
#ifdef IMP_FAST_WITH_CUDA

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cfloat>

#include <type_traits>

#include "../checks.h"
#include "../step_common.h"
#include "block_reduce.cuh"

namespace imp_fast {
namespace {

constexpr int kThreads = 256;
// History sizes whose m x m system fits in shared memory; larger m (any m is accepted,
// as on every backend) solve in a global-memory workspace instead.
constexpr int64_t kSmemM = 64;

// Residual head of one sample (every thread of its block): fast sums in a_t; a sum
// outside the range where that is exact to rounding (overflow, underflow, exactly
// zero) is recomputed scale-safely (a NaN sum stays NaN). Thread 0 runs sample_head
// and adds kCheck when the damped update may overflow the storage type.
template <typename s_t, typename a_t>
__device__ uint8_t block_head(const s_t* zb, const s_t* fb, int64_t D, int64_t b, int8_t* status,
                              int32_t* n_iter, a_t* abs_res, a_t* rel_res, const a_t* abs0,
                              a_t* best_abs, a_t* best_rel, const StepScalars<a_t>& c,
                              const a_t* tol_p, a_t* red, double* redd, uint8_t* flag) {
  a_t sg = 0, sf = 0;
  for (int64_t j = threadIdx.x; j < D; j += blockDim.x) {
    const a_t fv = static_cast<a_t>(fb[j]);
    const a_t d = fv - static_cast<a_t>(zb[j]);
    sg += d * d;
    sf += fv * fv;
  }
  sg = block_sum(sg, red);
  sf = block_sum(sf, red);
  a_t abs_r = ::sqrt(sg), nf = ::sqrt(sf);
  constexpr bool kScale = std::is_same<s_t, double>::value;
  if (!sum_in_range(sg) && !::isnan(sg))  // uniform over the block
    abs_r = static_cast<a_t>(block_safe_norm<kScale>(
        D, [&](int64_t j) { return static_cast<double>(fb[j]) - static_cast<double>(zb[j]); }, redd));
  if (!sum_in_range(sf) && !::isnan(sf))
    nf = static_cast<a_t>(block_safe_norm<kScale>(D, [&](int64_t j) { return static_cast<double>(fb[j]); }, redd));
  if (threadIdx.x == 0) {
    uint8_t fl =
        sample_head<a_t>(abs_r, nf, b, status, n_iter, abs_res, rel_res, abs0, best_abs, best_rel, c, tol_p);
    if ((fl & kStill) && update_needs_check<s_t, a_t>(abs_r, nf, c.beta)) fl |= kCheck;
    *flag = fl;
  }
  __syncthreads();
  return *flag;
}

// Whether the damped update of the whole sample is finite once rounded to s_t (every
// thread of the block gets the answer).
template <typename s_t, typename a_t>
__device__ bool block_damped_finite(const s_t* zb, const s_t* fb, int64_t D, a_t beta, a_t* red) {
  a_t bad = 0;
  for (int64_t j = threadIdx.x; j < D; j += blockDim.x)
    if (!::isfinite(static_cast<a_t>(damped(zb[j], fb[j], beta)))) bad = a_t(1);
  return block_sum(bad, red) == a_t(0);
}

template <typename s_t, typename a_t>
__global__ void picard_kernel(s_t* __restrict__ z, const s_t* __restrict__ fz, int8_t* status,
                              int32_t* n_iter, a_t* abs_res, a_t* rel_res, const a_t* abs0,
                              s_t* best_z, a_t* best_abs, a_t* best_rel, const a_t* tol_p,
                              int64_t D, StepScalars<a_t> c) {
  __shared__ a_t red[32];
  __shared__ double redd[32];
  __shared__ uint8_t flag;
  const int64_t b = blockIdx.x;
  if (status[b] != 0) return;  // uniform over the block
  s_t* zb = z + b * D;
  const s_t* fb = fz + b * D;
  uint8_t fl = block_head<s_t, a_t>(zb, fb, D, b, status, n_iter, abs_res, rel_res, abs0, best_abs,
                                    best_rel, c, tol_p, red, redd, &flag);
  if ((fl & kCheck) && !block_damped_finite(zb, fb, D, c.beta, red)) {
    if (threadIdx.x == 0) flag_update_overflow(b, status, n_iter);  // keeps z
    fl &= static_cast<uint8_t>(~kStill);
  }
  for (int64_t j = threadIdx.x; j < D; j += blockDim.x) {
    const s_t zs = zb[j];
    if (fl & kBetter) best_z[b * D + j] = zs;
    if (fl & kStill) zb[j] = damped(zs, fb[j], c.beta);
  }
}

template <typename s_t, typename a_t>
__global__ void anderson_kernel(s_t* __restrict__ z, const s_t* __restrict__ fz, int8_t* status,
                                int32_t* n_iter, a_t* abs_res, a_t* rel_res, const a_t* abs0,
                                s_t* best_z, a_t* best_abs, a_t* best_rel, s_t* F, s_t* G, a_t* H,
                                a_t* ws, double* Aws, const a_t* tol_p, int64_t D, int64_t m,
                                int64_t slot, StepScalars<a_t> c) {
  __shared__ a_t red[32];
  __shared__ double redd[32];
  __shared__ uint8_t flag;
  __shared__ int ok_s;
  extern __shared__ double smem[];  // A (m*m), x (m) when m <= kSmemM
  const int64_t b = blockIdx.x;
  double* A = Aws != nullptr ? Aws + b * (m * m + m) : smem;
  double* x = A + m * m;
  if (status[b] != 0) return;
  s_t* zb = z + b * D;
  const s_t* fb = fz + b * D;
  const uint8_t fl = block_head<s_t, a_t>(zb, fb, D, b, status, n_iter, abs_res, rel_res, abs0,
                                          best_abs, best_rel, c, tol_p, red, redd, &flag);
  s_t* Fs = F + (b * m + slot) * D;
  s_t* Gs = G + (b * m + slot) * D;
  for (int64_t j = threadIdx.x; j < D; j += blockDim.x) {
    const s_t zs = zb[j];
    if (fl & kBetter) best_z[b * D + j] = zs;
    const s_t fs = fb[j];
    Fs[j] = fs;
    Gs[j] = static_cast<s_t>(static_cast<a_t>(fs) - static_cast<a_t>(zs));
  }
  // Gram row/column: g . G_i (each thread re-reads only the elements it wrote itself)
  a_t* Hb = H + b * m * m;
  for (int64_t i = 0; i < m; ++i) {
    const s_t* Gi = G + (b * m + i) * D;
    a_t s = 0;
    for (int64_t j = threadIdx.x; j < D; j += blockDim.x)
      s += static_cast<a_t>(Gi[j]) * (static_cast<a_t>(fb[j]) - static_cast<a_t>(zb[j]));
    s = block_sum(s, red);
    if (threadIdx.x == 0) {
      Hb[slot * m + i] = s;
      Hb[i * m + slot] = s;
    }
  }
  if (!(fl & kStill)) return;
  __syncthreads();
  if (threadIdx.x == 0) {
    // float64 system: H widened, ridge lam * H_ss in float64 (as every backend);
    // singular when a pivot is zero or not finite, or when the weights are not finite
    const double ridge = static_cast<double>(c.lam) * static_cast<double>(Hb[slot * m + slot]);
    for (int64_t i = 0; i < m; ++i)
      for (int64_t k = 0; k < m; ++k)
        A[i * m + k] = static_cast<double>(Hb[i * m + k]) + (i == k ? ridge : 0.0);
    bool ok = true;
    for (int64_t i = 0; i < m; ++i) x[i] = 1.0;
    for (int64_t k = 0; ok && k < m; ++k) {
      int64_t p = k;
      double best = fabs(A[k * m + k]);
      for (int64_t r = k + 1; r < m; ++r) {
        const double v = fabs(A[r * m + k]);
        if (v > best) { best = v; p = r; }
      }
      if (!(best > 0.0) || !isfinite(best)) { ok = false; break; }
      if (p != k) {
        for (int64_t q = 0; q < m; ++q) { const double t = A[k * m + q]; A[k * m + q] = A[p * m + q]; A[p * m + q] = t; }
        const double t = x[k]; x[k] = x[p]; x[p] = t;
      }
      const double piv = A[k * m + k];
      for (int64_t r = k + 1; r < m; ++r) {
        const double f = A[r * m + k] / piv;
        if (f == 0.0) continue;
        for (int64_t q = k; q < m; ++q) A[r * m + q] -= f * A[k * m + q];
        x[r] -= f * x[k];
      }
    }
    for (int64_t k = m - 1; ok && k >= 0; --k) {
      double v = x[k];
      for (int64_t q = k + 1; q < m; ++q) v -= A[k * m + q] * x[q];
      x[k] = v / A[k * m + k];
      ok = isfinite(x[k]);
    }
    double sum = 0;
    for (int64_t i = 0; ok && i < m; ++i) sum += x[i];
    ok = ok && isfinite(sum) && sum != 0.0;
    for (int64_t i = 0; ok && i < m; ++i) {
      x[i] /= sum;
      ok = isfinite(x[i]);
    }
    ok_s = ok ? 1 : 0;
  }
  __syncthreads();
  a_t* wb = ws + b * D;
  const a_t omb = a_t(1) - c.beta;
  const a_t lim = static_cast<a_t>(StorageMax<s_t>::value);
  if (ok_s) {
    // the mix, and whether all of it rounds to a finite storage value
    a_t bad = 0;
    for (int64_t j = threadIdx.x; j < D; j += blockDim.x) {
      a_t sF = 0, sG = 0;
      for (int64_t i = 0; i < m; ++i) {
        const a_t ai = static_cast<a_t>(x[i]);
        sF += ai * static_cast<a_t>(F[(b * m + i) * D + j]);
        sG += ai * static_cast<a_t>(G[(b * m + i) * D + j]);
      }
      const a_t v = sF - omb * sG;
      wb[j] = v;
      if (!(::fabs(v) <= lim)) bad = a_t(1);
    }
    bad = block_sum(bad, red);
    if (threadIdx.x == 0) ok_s = bad == a_t(0) ? 1 : 0;
    __syncthreads();
  }
  const bool ok = ok_s != 0;
  if (!ok && (fl & kCheck) && !block_damped_finite(zb, fb, D, c.beta, red)) {
    if (threadIdx.x == 0) flag_update_overflow(b, status, n_iter);  // Picard fallback overflows: keeps z
    return;
  }
  for (int64_t j = threadIdx.x; j < D; j += blockDim.x) {
    if (ok) {
      zb[j] = static_cast<s_t>(wb[j]);
    } else {
      zb[j] = damped(zb[j], fb[j], c.beta);
    }
  }
}

void picard_step_cuda(const at::Tensor& z, const at::Tensor& fz_in, const at::Tensor& status,
                      const at::Tensor& n_iter, const at::Tensor& abs_res, const at::Tensor& rel_res,
                      const at::Tensor& abs0, const std::optional<at::Tensor>& best_z,
                      const std::optional<at::Tensor>& best_abs,
                      const std::optional<at::Tensor>& best_rel, double tol, double beta,
                      bool stop_rel, double divergence, double eps,
                      const std::optional<at::Tensor>& tol_t) {
  check_state(z, fz_in, status, n_iter, abs_res, rel_res, abs0, best_z, best_abs, best_rel);
  check_tol(z, tol_t);
  const c10::cuda::CUDAGuard guard(z.device());
  const at::Tensor fz = fz_in.contiguous();
  const int64_t B = z.size(0), D = z.size(1);
  if (B == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "picard_step_cuda", [&] {
    using a_t = at::opmath_type<scalar_t>;
    const auto c = make_scalars<a_t>(tol, beta, stop_rel, divergence, eps, 0.0);
    picard_kernel<scalar_t, a_t><<<B, kThreads, 0, stream>>>(
        z.data_ptr<scalar_t>(), fz.data_ptr<scalar_t>(), status.data_ptr<int8_t>(),
        n_iter.data_ptr<int32_t>(), abs_res.data_ptr<a_t>(), rel_res.data_ptr<a_t>(),
        abs0.data_ptr<a_t>(), opt_ptr<scalar_t>(best_z), opt_ptr<a_t>(best_abs),
        opt_ptr<a_t>(best_rel), opt_ptr<a_t>(tol_t), D, c);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void anderson_step_cuda(const at::Tensor& z, const at::Tensor& fz_in, const at::Tensor& status,
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
  const int64_t B = z.size(0), D = z.size(1), m = F.size(1);
  const c10::cuda::CUDAGuard guard(z.device());
  const at::Tensor fz = fz_in.contiguous();
  if (B == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  // the small systems: shared memory up to kSmemM, else a global workspace
  at::Tensor Aws;
  if (m > kSmemM) Aws = at::empty({B, m * m + m}, H.options().dtype(at::kDouble));
  const size_t smem = m > kSmemM ? 0 : static_cast<size_t>(m * m + m) * sizeof(double);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "anderson_step_cuda", [&] {
    using a_t = at::opmath_type<scalar_t>;
    const auto c = make_scalars<a_t>(tol, beta, stop_rel, divergence, eps, lam);
    at::Tensor ws = at::empty({B, D}, H.options());
    anderson_kernel<scalar_t, a_t><<<B, kThreads, smem, stream>>>(
        z.data_ptr<scalar_t>(), fz.data_ptr<scalar_t>(), status.data_ptr<int8_t>(),
        n_iter.data_ptr<int32_t>(), abs_res.data_ptr<a_t>(), rel_res.data_ptr<a_t>(),
        abs0.data_ptr<a_t>(), opt_ptr<scalar_t>(best_z), opt_ptr<a_t>(best_abs),
        opt_ptr<a_t>(best_rel), F.data_ptr<scalar_t>(), G.data_ptr<scalar_t>(), H.data_ptr<a_t>(),
        ws.data_ptr<a_t>(), m > kSmemM ? Aws.data_ptr<double>() : nullptr, opt_ptr<a_t>(tol_t), D, m, slot,
        c);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(imp_fast, CUDA, m) {
  m.impl("picard_step", &picard_step_cuda);
  m.impl("anderson_step", &anderson_step_cuda);
}

}  // namespace imp_fast

#endif  // IMP_FAST_WITH_CUDA
