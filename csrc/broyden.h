// Argument checks and iteration bookkeeping of imp_fast::broyden_step, shared by the
// CPU (broyden.cpp) and CUDA (cuda/broyden.cu) implementations. The state checks
// (z, fz, statuses, residuals, best iterate) are checks.h's check_state.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace imp_fast {

// The Broyden history of a (B, D) state z: U, V (B, m, D), z_prev and g_prev (B, D), all
// contiguous, in the compute dtype (float64 for float64 storage, else float32), on z's
// device; m >= 1 and the iteration k >= 0. Call after check_state (z is a (B, D) tensor).
inline void check_broyden(const at::Tensor& z, const at::Tensor& U, const at::Tensor& V,
                          const at::Tensor& z_prev, const at::Tensor& g_prev, int64_t k) {
  const int64_t B = z.size(0), D = z.size(1);
  const auto cdt = z.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(U.dim() == 3 && U.size(0) == B && U.size(2) == D && U.is_contiguous() && U.scalar_type() == cdt &&
                  U.device() == z.device(),
              "imp_fast: U must be a contiguous (B, m, D) = (", B, ", m, ", D, ") ", cdt, " tensor on ", z.device(),
              ", got ", U.sizes(), " ", U.scalar_type(), " on ", U.device(), " contiguous=", U.is_contiguous());
  TORCH_CHECK(U.size(1) >= 1, "imp_fast: Broyden memory m must be >= 1, got U of shape ", U.sizes());
  TORCH_CHECK(V.sizes() == U.sizes() && V.is_contiguous() && V.scalar_type() == cdt && V.device() == z.device(),
              "imp_fast: V must be a contiguous tensor like U (", U.sizes(), " ", cdt, " on ", z.device(), "), got ",
              V.sizes(), " ", V.scalar_type(), " on ", V.device(), " contiguous=", V.is_contiguous());
  auto vec = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.dim() == 2 && t.size(0) == B && t.size(1) == D && t.is_contiguous() && t.scalar_type() == cdt &&
                    t.device() == z.device(),
                "imp_fast: ", name, " must be a contiguous (", B, ", ", D, ") ", cdt, " tensor on ", z.device(),
                ", got ", t.sizes(), " ", t.scalar_type(), " on ", t.device(), " contiguous=", t.is_contiguous());
  };
  vec(z_prev, "z_prev");
  vec(g_prev, "g_prev");
  TORCH_CHECK(k >= 0, "imp_fast: the iteration k must be >= 0, got ", k);
}

// Where iteration k of a Broyden solve with memory m writes its rank-one update, and
// what it reads. As imp_fast/backends/broyden.py: slot (k - 1) mod m; at k > 1 with slot
// 0 the memory is full and restarts (all of U, V zeroed). Unwritten slots are zero (the
// state starts zeroed and restarts zero it), so the updates in use at iteration k are
// exactly the slots [0, used) with used = slot (none at k = 0): the others contribute
// exact zeros and are not read.
struct BroydenSlots {
  int64_t slot;  // slot written at this iteration (meaningful when update)
  int64_t used;  // slots [0, used) hold the updates in use
  bool update;   // k > 0: a new rank-one update is made
  bool restart;  // U and V are zeroed first
};

inline BroydenSlots broyden_slots(int64_t k, int64_t m) {
  BroydenSlots s;
  s.slot = ((k - 1) % m + m) % m;
  s.update = k > 0;
  s.restart = k > 1 && s.slot == 0;
  s.used = s.update ? s.slot : 0;
  return s;
}

}  // namespace imp_fast
