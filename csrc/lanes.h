// Fixed-order multi-lane accumulation for the CPU kernels (ops.cpp, broyden.cpp,
// probes.cpp).
//
// Every reduction over a sample's D entries uses kLanes independent accumulators: lane l
// sums the entries j with j % kLanes == l (the tail entries go to lanes 0, 1, ...), and
// the lanes are combined by one fixed pairwise tree (lane_sum). The order is fixed by the
// code, so results do not depend on the thread count or on which clone runs, up to FMA
// contraction in the AVX2 clone.
//
// Lanes<a_t> holds the accumulators as GCC/Clang vector-extension registers (32 bytes:
// one AVX register, two SSE registers in the baseline clone). Written out because GCC
// vectorised the plain lane-array loops across the unrolled j loop with permutes (several
// times slower than the memory traffic of the step: the fused Picard step's residual sums
// ran at a third of the copy's bandwidth) and made an AVX2 clone of them slower still.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace imp_fast {

constexpr int kLanes = 8;

// Hot loops get an AVX2+FMA clone beside the baseline one (GCC picks at load time via
// ifunc, by CPU features: "arch=x86-64-v3" needs GCC >= 12; "arch=haswell" would be
// picked only on CPUs GCC identifies as Haswell-family). A source build is then fast on
// modern x86 without -march=native and still runs everywhere.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && __GNUC__ >= 12
#define IMP_FAST_HOT __attribute__((target_clones("arch=x86-64-v3", "default")))
#elif defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define IMP_FAST_HOT __attribute__((target_clones("avx2", "default")))
#else
#define IMP_FAST_HOT
#endif

// Small helpers of the hot loops: always inlined (GCC does not inline a function of the
// default target into a target clone otherwise).
#if defined(__GNUC__)
#define IMP_FAST_INLINE inline __attribute__((always_inline))
#else
#define IMP_FAST_INLINE inline
#endif

// The fixed pairwise tree over kLanes accumulators.
template <typename a_t>
IMP_FAST_INLINE a_t lane_sum(const a_t* s) {
  a_t t[kLanes];
  for (int l = 0; l < kLanes; ++l) t[l] = s[l];
  for (int w = kLanes / 2; w >= 1; w /= 2)
    for (int l = 0; l < w; ++l) t[l] += t[l + w];
  return t[0];
}

// kLanes values of a_t (float or double): lane l is element l. Arithmetic is lane-wise.
template <typename a_t>
struct Lanes {
#if defined(__GNUC__)
  static constexpr int W = 32 / static_cast<int>(sizeof(a_t));  // lanes per vector
  static constexpr int N = kLanes / W;                          // vectors
  typedef a_t vec __attribute__((vector_size(32)));
  vec v[N];
#else
  a_t v[kLanes];
#endif

#if defined(__GNUC__)
  // unaligned, aliasing view of W consecutive a_t: loads and stores straight to registers
  // (memcpy through the struct went via the stack: store-forwarding stalls)
  typedef a_t uvec __attribute__((vector_size(32), aligned(alignof(a_t)), may_alias));
#endif

  IMP_FAST_INLINE static Lanes zero() { return broadcast(a_t(0)); }
  IMP_FAST_INLINE static Lanes broadcast(a_t x) {
    Lanes r;
#if defined(__GNUC__)
    for (int q = 0; q < N; ++q) r.v[q] = x - vec{};  // scalar - vector: x in every lane
#else
    for (int l = 0; l < kLanes; ++l) r.v[l] = x;
#endif
    return r;
  }
  // kLanes consecutive values of the storage type s_t, converted to a_t
  template <typename s_t>
  IMP_FAST_INLINE static Lanes load(const s_t* p) {
    Lanes r;
#if defined(__GNUC__)
    if constexpr (std::is_same<s_t, a_t>::value) {
      for (int q = 0; q < N; ++q) r.v[q] = *reinterpret_cast<const uvec*>(p + q * W);
      return r;
    }
    for (int q = 0; q < N; ++q)
      for (int w = 0; w < W; ++w) r.v[q][w] = static_cast<a_t>(p[q * W + w]);
#else
    for (int l = 0; l < kLanes; ++l) r.v[l] = static_cast<a_t>(p[l]);
#endif
    return r;
  }
  // the lanes rounded to s_t, into p[0:kLanes]
  template <typename s_t>
  IMP_FAST_INLINE void store(s_t* p) const {
#if defined(__GNUC__)
    if constexpr (std::is_same<s_t, a_t>::value) {
      for (int q = 0; q < N; ++q) *reinterpret_cast<uvec*>(p + q * W) = v[q];
      return;
    }
    for (int q = 0; q < N; ++q)
      for (int w = 0; w < W; ++w) p[q * W + w] = static_cast<s_t>(v[q][w]);
#else
    for (int l = 0; l < kLanes; ++l) p[l] = static_cast<s_t>(v[l]);
#endif
  }
  // lane_sum of the lanes
  IMP_FAST_INLINE a_t sum() const {
    a_t t[kLanes];
    store(t);
    return lane_sum(t);
  }

#if defined(__GNUC__)
#define IMP_FAST_LANES_OP(op)                                     \
  IMP_FAST_INLINE Lanes operator op(const Lanes& o) const {       \
    Lanes r;                                                      \
    for (int q = 0; q < N; ++q) r.v[q] = v[q] op o.v[q];          \
    return r;                                                     \
  }
#else
#define IMP_FAST_LANES_OP(op)                                     \
  IMP_FAST_INLINE Lanes operator op(const Lanes& o) const {       \
    Lanes r;                                                      \
    for (int l = 0; l < kLanes; ++l) r.v[l] = v[l] op o.v[l];     \
    return r;                                                     \
  }
#endif
  IMP_FAST_LANES_OP(+)
  IMP_FAST_LANES_OP(-)
  IMP_FAST_LANES_OP(*)
#undef IMP_FAST_LANES_OP
  IMP_FAST_INLINE Lanes& operator+=(const Lanes& o) {
    *this = *this + o;
    return *this;
  }
};

// Row groups of the multi-row loops below: up to this many rows per pass (for double
// in the AVX2 clone: 2 registers per accumulator, 16 registers in all).
constexpr int kRowGroup = 6;

// out[k] = sum_j X[k][j] * y[j] for k < K, j < n: K rows against one vector in ONE pass,
// so K independent accumulator chains and K row streams are in flight at once (one row
// at a time, a dot is bound by the FMA latency of its single chain and by one stream's
// prefetch). Each row's sum has the lane order of a single-row dot.
template <int K, typename s_t, typename a_t>
IMP_FAST_INLINE void dots_k(const s_t* const* X, const a_t* y, int64_t n, a_t* out) {
  using L = Lanes<a_t>;
  const s_t* x[K];  // in registers: stores do not make the compiler reload them
  for (int k = 0; k < K; ++k) x[k] = X[k];
  L acc[K];
  for (int k = 0; k < K; ++k) acc[k] = L::zero();
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    const L yv = L::load(y + j);
    for (int k = 0; k < K; ++k) acc[k] += L::load(x[k] + j) * yv;
  }
  for (int k = 0; k < K; ++k) {
    a_t s[kLanes];
    acc[k].store(s);
    for (int64_t jj = j, l = 0; jj < n; ++jj, ++l) s[l] += static_cast<a_t>(X[k][jj]) * y[jj];
    out[k] = lane_sum(s);
  }
}

// out[i] = sum_j X[i][j] * y[j] for the m rows X[0:m]: up to kRowGroup rows per pass.
template <typename s_t, typename a_t>
IMP_FAST_INLINE void dots_rows(const s_t* const* X, int64_t m, const a_t* y, int64_t n, a_t* out) {
  for (int64_t i = 0; i < m; i += kRowGroup) {
    switch (m - i < kRowGroup ? m - i : kRowGroup) {
      case 6: dots_k<6>(X + i, y, n, out + i); break;
      case 5: dots_k<5>(X + i, y, n, out + i); break;
      case 4: dots_k<4>(X + i, y, n, out + i); break;
      case 3: dots_k<3>(X + i, y, n, out + i); break;
      case 2: dots_k<2>(X + i, y, n, out + i); break;
      default: dots_k<1>(X + i, y, n, out + i); break;
    }
  }
}

// out[j] (+)= sum_{k < K} al[k] X[k][j] for j < n, the terms added in k order after out's
// (kAcc): per element the order of adding row after row, in one pass over out.
template <int K, bool kAcc, typename s_t, typename a_t>
IMP_FAST_INLINE void axpy_k(const s_t* const* X, const a_t* al, int64_t n, a_t* out) {
  using L = Lanes<a_t>;
  const s_t* x[K];  // in registers: the stores to out do not make the compiler reload them
  for (int k = 0; k < K; ++k) x[k] = X[k];
  L a[K];
  for (int k = 0; k < K; ++k) a[k] = L::broadcast(al[k]);
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    L o = kAcc ? L::load(out + j) + a[0] * L::load(x[0] + j) : a[0] * L::load(x[0] + j);
    for (int k = 1; k < K; ++k) o += a[k] * L::load(x[k] + j);
    o.store(out + j);
  }
  for (; j < n; ++j) {
    a_t o = kAcc ? out[j] + al[0] * static_cast<a_t>(X[0][j]) : al[0] * static_cast<a_t>(X[0][j]);
    for (int k = 1; k < K; ++k) o += al[k] * static_cast<a_t>(X[k][j]);
    out[j] = o;
  }
}

template <bool kAcc, typename s_t, typename a_t>
IMP_FAST_INLINE void axpy_group(const s_t* const* X, int64_t k, const a_t* al, int64_t n, a_t* out) {
  switch (k) {
    case 6: axpy_k<6, kAcc>(X, al, n, out); break;
    case 5: axpy_k<5, kAcc>(X, al, n, out); break;
    case 4: axpy_k<4, kAcc>(X, al, n, out); break;
    case 3: axpy_k<3, kAcc>(X, al, n, out); break;
    case 2: axpy_k<2, kAcc>(X, al, n, out); break;
    default: axpy_k<1, kAcc>(X, al, n, out); break;
  }
}

// out[j] = sum_{i < m} al[i] X[i][j] (terms in i order), up to kRowGroup rows per pass
// over out.
template <typename s_t, typename a_t>
IMP_FAST_INLINE void combine_rows(const s_t* const* X, int64_t m, const a_t* al, int64_t n, a_t* out) {
  for (int64_t i = 0; i < m; i += kRowGroup) {
    const int64_t k = m - i < kRowGroup ? m - i : kRowGroup;
    if (i == 0) {
      axpy_group<false>(X, k, al, n, out);
    } else {
      axpy_group<true>(X + i, k, al + i, n, out);
    }
  }
}

}  // namespace imp_fast
