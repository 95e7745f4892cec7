// The fixed-order linear: out = x @ w.T (+ bias) with every output summed over K in one order that
// no batch size, tile, thread count or instruction set changes, for float32 and for bfloat16 on CPUs
// without AVX512-BF16 (where `linear_bf16` does not run), and for float16.
//
//   linear_fixed(out, x, panels, bias?)   x [M, K], out [M, N], panels from `pack_fixed`, all of
//                                         one dtype (float32, bfloat16 or float16)
//
//   acc = 0;  for k = 0 .. K-1:  acc = fma(x[m, k], w[n, k], acc)     (one rounding per step)
//   out[m, n] = rnd(acc + bias[n])                                    (rnd: to out's dtype)
//
// bfloat16 and float16 inputs widen to float32 exactly, so such an output is its float32 result
// rounded once. Each output is a single chain of fused multiply-adds in k order: the vector lanes hold
// different outputs (columns), never parts of one sum, so an AVX-512 build, an AVX2 build and the
// plain loops (std::fma) give the same bits, one row or a thousand. That is what makes a token's
// logits independent of the rows beside it in its step (docs/determinism.md); MKL's and oneDNN's
// GEMMs, which this replaces for float32, pick their blockings and K splits by batch size.
//
// Layout (`kernels.cpu_ops.pack_fixed`): [N / 32, K, 32], panel p holding columns 32p..32p+31 (N
// padded with zeros), each k's 32 weights contiguous: a panel step is one 32-float row (two
// AVX-512 vectors, four AVX2 ones), and x[m, k] is broadcast into it: an outer product per k,
// MR rows x 32 columns of accumulators in registers (AVX-512: 12 rows, 24 accumulators; AVX2: 3
// rows, 12 accumulators), the panel's row reused by those rows. Rows go in passes of 192 (their x
// stays in L2 while the panels stream by), panels in parallel within a pass. On an Intel Xeon
// (2 cores, float32, 3,072 x 576): 1 row 0.14 ms (as MKL), 64 rows 321 GFLOP/s (MKL 71, oneDNN's
// packed GEMM 338), 1,024 rows 341 (oneDNN 372); bfloat16 with oneDNN held to AVX-512 without
// BF16: 2.4x oneDNN's bf16 at every batch.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "ops.h"
#include "simd.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

// Products and sums are the explicit fused multiply-adds below and one addition of the bias.
#pragma GCC optimize("fp-contract=off")

namespace {

constexpr int64_t kCols = 32;      // a panel's columns
constexpr int64_t kRowPass = 192;  // rows per pass over the weights

inline float widen(float v) { return v; }
inline float widen(c10::BFloat16 v) { return static_cast<float>(v); }
inline float widen(c10::Half v) { return static_cast<float>(v); }

template <typename T>
inline void store_row(const float* acc, const T* bias, int64_t cols, T* out) {
  for (int64_t j = 0; j < cols; ++j) {
    const float v = bias != nullptr ? acc[j] + widen(bias[j]) : acc[j];
    out[j] = static_cast<T>(v);
  }
}

// acc[r][0:32] = the chains of rows r < rows of x against one panel: the portable form, and the
// definition the vector forms below reproduce bit for bit.
template <typename X, typename T>
void panel_rows_plain(int64_t rows, const X* x, int64_t ldx, const T* panel, int64_t K,
                      float (*acc)[kCols]) {
  for (int64_t r = 0; r < rows; ++r) {
    float a[kCols] = {};
    for (int64_t k = 0; k < K; ++k) {
      const float xv = widen(x[r * ldx + k]);
      const T* w = panel + k * kCols;
      for (int64_t j = 0; j < kCols; ++j) a[j] = std::fma(xv, widen(w[j]), a[j]);
    }
    std::memcpy(acc[r], a, sizeof(a));
  }
}

#if defined(__AVX512F__)
constexpr int kMR512 = 12;  // rows per tile: 24 accumulators of AVX-512's 32 registers

template <int MR, typename X, typename T>
inline void panel_tile_512(const X* x, int64_t ldx, const T* panel, int64_t K,
                           float (*acc)[kCols]) {
  __m512 a0[MR], a1[MR];
  for (int r = 0; r < MR; ++r) a0[r] = a1[r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m512 w0 = load16(panel + k * kCols), w1 = load16(panel + k * kCols + 16);
    for (int r = 0; r < MR; ++r) {
      const __m512 xv = _mm512_set1_ps(widen(x[r * ldx + k]));
      a0[r] = _mm512_fmadd_ps(xv, w0, a0[r]);
      a1[r] = _mm512_fmadd_ps(xv, w1, a1[r]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    _mm512_storeu_ps(acc[r], a0[r]);
    _mm512_storeu_ps(acc[r] + 16, a1[r]);
  }
}

template <typename X, typename T>
void panel_rows(int64_t rows, const X* x, int64_t ldx, const T* panel, int64_t K,
                float (*acc)[kCols]) {
  int64_t r = 0;
  for (; r + kMR512 <= rows; r += kMR512)
    panel_tile_512<kMR512>(x + r * ldx, ldx, panel, K, acc + r);
  const X* xr = x + r * ldx;
  switch (rows - r) {
#define PREFIXGATE_TAIL(n) \
  case n:                  \
    return panel_tile_512<n>(xr, ldx, panel, K, acc + r);
    PREFIXGATE_TAIL(11) PREFIXGATE_TAIL(10) PREFIXGATE_TAIL(9) PREFIXGATE_TAIL(8)
    PREFIXGATE_TAIL(7) PREFIXGATE_TAIL(6) PREFIXGATE_TAIL(5) PREFIXGATE_TAIL(4)
    PREFIXGATE_TAIL(3) PREFIXGATE_TAIL(2) PREFIXGATE_TAIL(1)
#undef PREFIXGATE_TAIL
    default:
      return;
  }
}
#elif defined(__AVX2__) && defined(__FMA__)
template <int MR, typename X, typename T>
inline void panel_tile_256(const X* x, int64_t ldx, const T* panel, int64_t K,
                           float (*acc)[kCols]) {
  __m256 a[MR][4];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < 4; ++j) a[r][j] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m256 xv[MR];
    for (int r = 0; r < MR; ++r) xv[r] = _mm256_set1_ps(widen(x[r * ldx + k]));
    for (int j = 0; j < 4; ++j) {
      const __m256 w = load8(panel + k * kCols + 8 * j);
      for (int r = 0; r < MR; ++r) a[r][j] = _mm256_fmadd_ps(xv[r], w, a[r][j]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < 4; ++j) _mm256_storeu_ps(acc[r] + 8 * j, a[r][j]);
}

template <typename X, typename T>
void panel_rows(int64_t rows, const X* x, int64_t ldx, const T* panel, int64_t K,
                float (*acc)[kCols]) {
  int64_t r = 0;
  for (; r + 3 <= rows; r += 3) panel_tile_256<3>(x + r * ldx, ldx, panel, K, acc + r);
  if (rows - r == 2) panel_tile_256<2>(x + r * ldx, ldx, panel, K, acc + r);
  if (rows - r == 1) panel_tile_256<1>(x + r * ldx, ldx, panel, K, acc + r);
}
#else
template <typename X, typename T>
void panel_rows(int64_t rows, const X* x, int64_t ldx, const T* panel, int64_t K,
                float (*acc)[kCols]) {
  panel_rows_plain(rows, x, ldx, panel, K, acc);
}
#endif

template <typename T>
void linear_fixed_impl(const at::Tensor& out, const at::Tensor& x, const at::Tensor& panels,
                       const T* bias) {
  const T* xp = static_cast<const T*>(x.const_data_ptr());
  const T* pp = static_cast<const T*>(panels.const_data_ptr());
  T* op = static_cast<T*>(out.mutable_data_ptr());
  const int64_t M = x.size(0), K = x.size(1), N = out.size(1);
  const int64_t ldx = x.stride(0), ldo = out.stride(0), num_panels = panels.size(0);
  // A pass's rows of x widened to float32 once (exact), not once per panel: the tiles then
  // broadcast x[m, k] straight from memory, as for float32, instead of converting it in the
  // loop beside the multiply-adds (Intel Xeon, 64 rows of 1,536 x 576: float16 0.705 -> 0.360
  // ms, bfloat16 0.573 -> 0.346; float32 0.30).
  std::vector<float> wide;
  if constexpr (!std::is_same_v<T, float>) wide.resize(std::min(kRowPass, M) * K);
  for (int64_t m0 = 0; m0 < M; m0 += kRowPass) {
    const int64_t rows = std::min(kRowPass, M - m0);
    const float* xf = nullptr;
    int64_t ldf = ldx;
    if constexpr (std::is_same_v<T, float>) {
      xf = xp + m0 * ldx;
    } else {
      for (int64_t r = 0; r < rows; ++r) widen_row(xp + (m0 + r) * ldx, wide.data() + r * K, K);
      xf = wide.data();
      ldf = K;
    }
    at::parallel_for(0, num_panels, 1, [&](int64_t begin, int64_t end) {
      float acc[kRowPass][kCols];
      for (int64_t p = begin; p < end; ++p) {
        const int64_t n0 = p * kCols, cols = std::min(kCols, N - n0);
        panel_rows(rows, xf, ldf, pp + p * K * kCols, K, acc);
        for (int64_t r = 0; r < rows; ++r)
          store_row(acc[r], bias != nullptr ? bias + n0 : nullptr, cols,
                    op + (m0 + r) * ldo + n0);
      }
    });
  }
}

template <typename T>
void linear_fixed_plain_impl(const at::Tensor& out, const at::Tensor& x,
                             const at::Tensor& panels, const T* bias) {
  const T* xp = static_cast<const T*>(x.const_data_ptr());
  const T* pp = static_cast<const T*>(panels.const_data_ptr());
  T* op = static_cast<T*>(out.mutable_data_ptr());
  const int64_t M = x.size(0), K = x.size(1), N = out.size(1);
  const int64_t ldx = x.stride(0), ldo = out.stride(0);
  at::parallel_for(0, panels.size(0), 1, [&](int64_t begin, int64_t end) {
    float acc[1][kCols];
    for (int64_t p = begin; p < end; ++p) {
      const int64_t n0 = p * kCols, cols = std::min(kCols, N - n0);
      for (int64_t m = 0; m < M; ++m) {
        panel_rows_plain<T>(1, xp + m * ldx, ldx, pp + p * K * kCols, K, acc);
        store_row(acc[0], bias != nullptr ? bias + n0 : nullptr, cols, op + m * ldo + n0);
      }
    }
  });
}

}  // namespace

namespace prefixgate {

void linear_fixed(const at::Tensor& out, const at::Tensor& x, const at::Tensor& panels,
                  const std::optional<at::Tensor>& bias, bool plain) {
  TORCH_CHECK(x.dim() == 2 && out.dim() == 2 && panels.dim() == 3,
              "linear_fixed: expected x [M, K], out [M, N], panels [N / 32, K, 32]");
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "linear_fixed: unsupported dtype ", dtype);
  TORCH_CHECK(panels.scalar_type() == dtype && out.scalar_type() == dtype,
              "linear_fixed: x, panels and out must share a dtype");
  const int64_t M = x.size(0), K = x.size(1), N = out.size(1);
  TORCH_CHECK(panels.size(0) == (N + kCols - 1) / kCols && panels.size(1) == K &&
                  panels.size(2) == kCols && panels.is_contiguous(),
              "linear_fixed: panels do not fit x and out");
  TORCH_CHECK(out.size(0) == M && x.stride(1) == 1 && out.stride(1) == 1,
              "linear_fixed: rows of x and out must be contiguous");
  if (bias.has_value())
    TORCH_CHECK(bias->scalar_type() == dtype && bias->is_contiguous() && bias->numel() == N,
                "linear_fixed: bias must be a contiguous [N] of x's dtype");
  if (M == 0) return;
  if (dtype == at::kFloat) {
    const float* b = bias.has_value() ? bias->const_data_ptr<float>() : nullptr;
    return plain ? linear_fixed_plain_impl<float>(out, x, panels, b)
                 : linear_fixed_impl<float>(out, x, panels, b);
  }
  if (dtype == at::kHalf) {
    const c10::Half* b = bias.has_value() ? bias->const_data_ptr<c10::Half>() : nullptr;
    return plain ? linear_fixed_plain_impl<c10::Half>(out, x, panels, b)
                 : linear_fixed_impl<c10::Half>(out, x, panels, b);
  }
  const c10::BFloat16* b = bias.has_value() ? bias->const_data_ptr<c10::BFloat16>() : nullptr;
  return plain ? linear_fixed_plain_impl<c10::BFloat16>(out, x, panels, b)
               : linear_fixed_impl<c10::BFloat16>(out, x, panels, b);
}

}  // namespace prefixgate
