// Argument checks of imp_fast::pair_ratios, shared by the CPU (probes.cpp) and CUDA
// (cuda/probes.cu) implementations: every tensor's shape, dtype, device and
// contiguity, so a bad call is a clear error on every device (never a bad read).
#pragma once

#include <ATen/ATen.h>

namespace imp_fast {

// y: contiguous (NB, D), NB = (1 + P) * B, float64/float32/float16/bfloat16;
// dnorm: contiguous (P, B) in the compute dtype (float64 for float64 y, else float32);
// status: contiguous (NB,) int8; out: contiguous (B, P) compute dtype. All on y's device.
inline void check_pair_ratios(const at::Tensor& y, const at::Tensor& dnorm, const at::Tensor& status,
                              const at::Tensor& out) {
  TORCH_CHECK(y.dim() == 2 && y.is_contiguous(),
              "imp_fast.pair_ratios: y must be a contiguous ((1 + P) * B, D) tensor, got shape ", y.sizes(),
              " contiguous=", y.is_contiguous());
  const auto sdt = y.scalar_type();
  TORCH_CHECK(sdt == at::kDouble || sdt == at::kFloat || sdt == at::kHalf || sdt == at::kBFloat16,
              "imp_fast.pair_ratios: y must be float64, float32, float16 or bfloat16, got ", sdt);
  const auto cdt = sdt == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(dnorm.dim() == 2, "imp_fast.pair_ratios: dnorm must be a (P, B) tensor, got shape ", dnorm.sizes());
  const int64_t P = dnorm.size(0), B = dnorm.size(1), NB = y.size(0);
  TORCH_CHECK(NB == (1 + P) * B, "imp_fast.pair_ratios: y has ", NB, " rows but dnorm's shape ", dnorm.sizes(),
              " (P, B) needs (1 + P) * B = ", (1 + P) * B);
  TORCH_CHECK(dnorm.scalar_type() == cdt && dnorm.is_contiguous() && dnorm.device() == y.device(),
              "imp_fast.pair_ratios: dnorm must be a contiguous ", cdt, " tensor on ", y.device(), " (the compute ",
              "dtype of ", sdt, " y), got ", dnorm.scalar_type(), " on ", dnorm.device(),
              " contiguous=", dnorm.is_contiguous());
  TORCH_CHECK(status.dim() == 1 && status.size(0) == NB && status.scalar_type() == at::kChar &&
                  status.is_contiguous() && status.device() == y.device(),
              "imp_fast.pair_ratios: status must be a contiguous (", NB, ",) int8 tensor on ", y.device(), ", got ",
              status.sizes(), " ", status.scalar_type(), " on ", status.device(),
              " contiguous=", status.is_contiguous());
  TORCH_CHECK(out.dim() == 2 && out.size(0) == B && out.size(1) == P && out.scalar_type() == cdt &&
                  out.is_contiguous() && out.device() == y.device(),
              "imp_fast.pair_ratios: out must be a contiguous (", B, ", ", P, ") ", cdt, " tensor on ", y.device(),
              ", got ", out.sizes(), " ", out.scalar_type(), " on ", out.device(),
              " contiguous=", out.is_contiguous());
}

}  // namespace imp_fast
