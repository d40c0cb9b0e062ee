// Argument checks of the fused step ops, shared by the CPU (ops.cpp) and CUDA
// (cuda/ops.cu) implementations: every tensor argument's shape, dtype, device and
// contiguity, so a bad call is a clear error on every device (never a bad read).
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "step_common.h"

namespace imp_fast {

// The data pointer of an optional tensor argument, nullptr when it is not given.
template <typename T>
T* opt_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

// The head's per-sample pointers (HeadPtrs) of a step op's (checked) arguments.
template <typename a_t>
HeadPtrs<a_t> head_ptrs(const at::Tensor& status, const at::Tensor& n_iter, const at::Tensor& abs_res,
                        const at::Tensor& rel_res, const at::Tensor& abs0, const std::optional<at::Tensor>& best_abs,
                        const std::optional<at::Tensor>& best_rel, const std::optional<at::Tensor>& tol_t) {
  return HeadPtrs<a_t>{status.data_ptr<int8_t>(), n_iter.data_ptr<int32_t>(), abs_res.data_ptr<a_t>(),
                       rel_res.data_ptr<a_t>(),   abs0.data_ptr<a_t>(),       opt_ptr<a_t>(best_abs),
                       opt_ptr<a_t>(best_rel),    opt_ptr<a_t>(tol_t)};
}

inline void check_state(const at::Tensor& z, const at::Tensor& fz, const at::Tensor& status,
                 const at::Tensor& n_iter, const at::Tensor& abs_res, const at::Tensor& rel_res,
                 const at::Tensor& abs0, const std::optional<at::Tensor>& best_z,
                 const std::optional<at::Tensor>& best_abs,
                 const std::optional<at::Tensor>& best_rel) {
  TORCH_CHECK(z.dim() == 2 && z.is_contiguous(), "imp_fast: z must be a contiguous (B, D) tensor, got ",
              z.sizes(), " contiguous=", z.is_contiguous());
  TORCH_CHECK(z.scalar_type() == at::kDouble || z.scalar_type() == at::kFloat || z.scalar_type() == at::kHalf ||
                  z.scalar_type() == at::kBFloat16,
              "imp_fast: z must be float64, float32, float16 or bfloat16, got ", z.scalar_type());
  TORCH_CHECK(fz.sizes() == z.sizes() && fz.scalar_type() == z.scalar_type() &&
                  fz.device() == z.device(),
              "imp_fast: fz must match z's shape ", z.sizes(), ", dtype ", z.scalar_type(),
              " and device, got ", fz.sizes(), " ", fz.scalar_type(), " ", fz.device());
  const int64_t B = z.size(0);
  const auto cdt = z.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto vec = [&](const at::Tensor& t, at::ScalarType dt, const char* name) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == B && t.scalar_type() == dt && t.is_contiguous() &&
                    t.device() == z.device(),
                "imp_fast: ", name, " must be a contiguous (", B, ",) ", dt, " tensor on ",
                z.device(), ", got ", t.sizes(), " ", t.scalar_type(), " on ", t.device(),
                " contiguous=", t.is_contiguous());
  };
  vec(status, at::kChar, "status");
  vec(n_iter, at::kInt, "n_iter");
  vec(abs_res, cdt, "abs_res");
  vec(rel_res, cdt, "rel_res");
  vec(abs0, cdt, "abs0");
  const bool has_best = best_z.has_value();
  TORCH_CHECK(best_abs.has_value() == has_best && best_rel.has_value() == has_best,
              "imp_fast: best_z, best_abs and best_rel must be given together");
  if (has_best) {
    TORCH_CHECK(best_z->sizes() == z.sizes() && best_z->scalar_type() == z.scalar_type() &&
                    best_z->is_contiguous() && best_z->device() == z.device(),
                "imp_fast: best_z must be a contiguous tensor like z (", z.sizes(), " ", z.scalar_type(), " on ",
                z.device(), "), got ", best_z->sizes(), " ", best_z->scalar_type(), " on ", best_z->device());
    vec(*best_abs, cdt, "best_abs");
    vec(*best_rel, cdt, "best_rel");
  }
}

// The optional per-sample tolerances tol_t of a step op (its trailing `Tensor? tol_t`):
// a contiguous (B,) tensor in the compute dtype (float64 for float64 storage, else
// float32) on z's device. Call after check_state (z is a (B, D) tensor).
inline void check_tol(const at::Tensor& z, const std::optional<at::Tensor>& tol_t) {
  if (!tol_t.has_value()) return;
  const at::Tensor& t = *tol_t;
  const int64_t B = z.size(0);
  const auto cdt = z.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(t.dim() == 1 && t.size(0) == B, "imp_fast: tol_t must be a (", B, ",) tensor (one tolerance per "
              "sample), got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == cdt, "imp_fast: tol_t must be ", cdt, " (the compute dtype of ", z.scalar_type(),
              " storage), got ", t.scalar_type());
  TORCH_CHECK(t.device() == z.device(), "imp_fast: tol_t must be on ", z.device(), " (z's device), got ",
              t.device());
  TORCH_CHECK(t.is_contiguous(), "imp_fast: tol_t must be contiguous, got strides ", t.strides());
}

inline void check_history(const at::Tensor& z, const at::Tensor& F, const at::Tensor& G,
                   const at::Tensor& H, int64_t slot) {
  const int64_t B = z.size(0), D = z.size(1);
  TORCH_CHECK(F.dim() == 3 && F.size(0) == B && F.size(2) == D && F.is_contiguous() &&
                  F.scalar_type() == z.scalar_type() && F.device() == z.device(),
              "imp_fast: F must be a contiguous (B, m, D) tensor like z (", z.scalar_type(), " on ", z.device(),
              "), got ", F.sizes(), " ", F.scalar_type(), " on ", F.device());
  const int64_t m = F.size(1);
  TORCH_CHECK(m >= 1, "imp_fast: history size m must be >= 1");
  TORCH_CHECK(G.sizes() == F.sizes() && G.is_contiguous() && G.scalar_type() == z.scalar_type() &&
                  G.device() == z.device(),
              "imp_fast: G must be a contiguous tensor like F, got ", G.sizes(), " ", G.scalar_type(), " on ",
              G.device());
  const auto cdt = z.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(H.dim() == 3 && H.size(0) == B && H.size(1) == m && H.size(2) == m &&
                  H.is_contiguous() && H.scalar_type() == cdt && H.device() == z.device(),
              "imp_fast: H must be a contiguous (B, m, m) ", cdt, " tensor, got ", H.sizes(), " ",
              H.scalar_type(), " on ", H.device());
  TORCH_CHECK(slot >= 0 && slot < m, "imp_fast: slot must be in [0, ", m, "), got ", slot);
}

}  // namespace imp_fast
