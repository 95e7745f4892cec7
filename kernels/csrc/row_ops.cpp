// Fused CPU ops on the rows of a decoder layer's activations, built into the same library as the
// attention kernels.
//
// Eager PyTorch runs a layer's elementwise chains as many small ops (RMSNorm alone is eight:
// convert, square, mean, add, rsqrt, multiply, convert, multiply), each a pass over memory and a
// dispatch. These ops do each chain in one pass, with the same roundings as the eager chain: in
// bfloat16 every intermediate that PyTorch stores as a bfloat16 tensor is rounded here too
// (round to nearest even), so results equal the eager ops' up to float32 summation order.
//
//   rms_norm(out, x, residual?, w, eps)   x += residual (stored, rounded); out = w * rnd(x * r)
//   rope(qk, cos, sin)                    in place: qk = rnd(qk * cos) + rnd(rotate_half(qk) * sin)
//   silu_mul(out, gate_up)                out = rnd(silu(gate)) * up       gate_up = [gate | up]
//   argmax_rows(out, x)                   out[r] = the first index of the largest x[r, :]
//   mask_rows(x, bitmask, rows)           x[r, j] = -inf for r in rows where bit j of bitmask[r] is 0
//
// Rows run in parallel with at::parallel_for once a call holds enough elements; each row's result
// depends on that row alone.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>

#include "ops.h"
#include "simd.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

// Products and sums stay separate roundings, as in the eager ops: no fused multiply-adds.
#pragma GCC optimize("fp-contract=off")

#if defined(__AVX512F__)
// PyTorch's own vectorized exp (SLEEF, linked into libtorch_cpu): silu then rounds like eager
// PyTorch's. Weak, so that a libtorch without it falls back to `exp16` below.
extern "C" __m512 Sleef_expf16_u10(__m512) __attribute__((weak));
#elif defined(__AVX2__)
// Its AVX2 one (SLEEF's dispatcher, which eager silu calls on CPUs without AVX-512); weak too:
// without it every element takes std::exp.
extern "C" __m256 Sleef_expf8_u10(__m256) __attribute__((weak));
#endif

namespace {

constexpr int64_t kParallelElems = 1 << 15;  // below this many elements a call runs inline

int64_t row_grain(int64_t row_elems) {
  return std::max<int64_t>(1, kParallelElems / std::max<int64_t>(row_elems, 1));
}

// ---- float32 <-> storage dtype ----------------------------------------------------------------

inline float to_f(float v) { return v; }
inline float to_f(c10::BFloat16 v) { return static_cast<float>(v); }
template <typename T>
inline T from_f(float v) {
  return static_cast<T>(v);  // c10::BFloat16(float) rounds to nearest even, like PyTorch
}
// the value as stored in T, back in float32 (the rounding PyTorch applies to a T tensor)
template <typename T>
inline float rnd(float v) {
  return to_f(from_f<T>(v));
}

#if defined(__AVX512F__)
template <typename T>
inline __m512 rnd16(__m512 v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(to_bf16_bits(v)), 16));
  }
}
#endif

// exp(t) = 2^k * exp(r), k = round(t / ln2), |r| <= ln2 / 2, exp(r) by a degree-6 polynomial
// (relative error < 3e-7); t clamped to [-87, 88]. Used only when SLEEF is not found.
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693145751953125f;  // ln 2 split so that k * kLn2Hi is exact
constexpr float kLn2Lo = 1.42860682030941723212e-6f;
constexpr float kRound = 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer
constexpr float kExpPoly[] = {1.f / 720.f, 1.f / 120.f, 1.f / 24.f, 1.f / 6.f, 0.5f, 1.f, 1.f};

#if defined(__AVX512F__)
inline __m512 exp16(__m512 t) {
  t = _mm512_min_ps(_mm512_max_ps(t, _mm512_set1_ps(-87.f)), _mm512_set1_ps(88.f));
  const __m512 vround = _mm512_set1_ps(kRound);
  __m512 k = _mm512_sub_ps(_mm512_fmadd_ps(t, _mm512_set1_ps(kLog2e), vround), vround);
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(kLn2Hi), t);
  r = _mm512_fnmadd_ps(k, _mm512_set1_ps(kLn2Lo), r);
  __m512 p = _mm512_set1_ps(kExpPoly[0]);
  for (int i = 1; i < 7; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpPoly[i]));
  __m512i e = _mm512_add_epi32(_mm512_cvtps_epi32(k), _mm512_set1_epi32(127));
  return _mm512_mul_ps(p, _mm512_castsi512_ps(_mm512_slli_epi32(e, 23)));
}
#endif

// ---- RMSNorm, optionally after the residual add ------------------------------------------------

template <typename T>
void rms_norm_row(T* out, T* x, const T* res, const T* w, int64_t n, float eps) {
  int64_t i = 0;
  float ss = 0.f;
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    __m512 v = load16(x + i);
    if (res != nullptr) {
      v = rnd16<T>(_mm512_add_ps(v, load16(res + i)));
      store16(x + i, v);
    }
    acc = _mm512_fmadd_ps(v, v, acc);
  }
  ss = _mm512_reduce_add_ps(acc);
#endif
  for (; i < n; ++i) {
    float v = to_f(x[i]);
    if (res != nullptr) {
      x[i] = from_f<T>(v + to_f(res[i]));
      v = to_f(x[i]);
    }
    ss += v * v;
  }
  const float r = 1.f / std::sqrt(ss / static_cast<float>(n) + eps);
  i = 0;
#if defined(__AVX512F__)
  const __m512 vr = _mm512_set1_ps(r);
  for (; i + 16 <= n; i += 16)
    store16(out + i, _mm512_mul_ps(load16(w + i), rnd16<T>(_mm512_mul_ps(load16(x + i), vr))));
#endif
  for (; i < n; ++i) out[i] = from_f<T>(to_f(w[i]) * rnd<T>(to_f(x[i]) * r));
}

template <typename T>
void rms_norm_impl(const at::Tensor& out, const at::Tensor& x,
                   const std::optional<at::Tensor>& residual, const at::Tensor& w, double eps) {
  const int64_t rows = x.size(0), n = x.size(1);
  T* op = out.mutable_data_ptr<T>();
  T* xp = x.mutable_data_ptr<T>();
  const T* rp = residual.has_value() ? residual->const_data_ptr<T>() : nullptr;
  const int64_t lo = out.stride(0), lx = x.stride(0), lr = rp ? residual->stride(0) : 0;
  const T* wp = w.const_data_ptr<T>();
  at::parallel_for(0, rows, row_grain(n), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      rms_norm_row<T>(op + t * lo, xp + t * lx, rp ? rp + t * lr : nullptr, wp, n,
                      static_cast<float>(eps));
  });
}

void check_rows(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == like.size(0) && t.size(1) == like.size(1), name,
              " must have shape ", like.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type() && t.device().is_cpu(), name,
              " must be a CPU tensor of dtype ", like.scalar_type());
  TORCH_CHECK(t.stride(1) == 1, name, " rows must be contiguous");
}

// ---- rotary embedding, in place ---------------------------------------------------------------

template <typename T>
void rope_row(T* q, const T* c, const T* s, int64_t half) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= half; i += 16) {
    __m512 x1 = load16(q + i), x2 = load16(q + half + i);
    __m512 a1 = rnd16<T>(_mm512_mul_ps(x1, load16(c + i)));
    __m512 b1 = rnd16<T>(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), x2), load16(s + i)));
    __m512 a2 = rnd16<T>(_mm512_mul_ps(x2, load16(c + half + i)));
    __m512 b2 = rnd16<T>(_mm512_mul_ps(x1, load16(s + half + i)));
    store16(q + i, _mm512_add_ps(a1, b1));
    store16(q + half + i, _mm512_add_ps(a2, b2));
  }
#endif
  for (; i < half; ++i) {
    const float x1 = to_f(q[i]), x2 = to_f(q[half + i]);
    q[i] = from_f<T>(rnd<T>(x1 * to_f(c[i])) + rnd<T>(-x2 * to_f(s[i])));
    q[half + i] = from_f<T>(rnd<T>(x2 * to_f(c[half + i])) + rnd<T>(x1 * to_f(s[half + i])));
  }
}

template <typename T>
void rope_impl(const at::Tensor& qk, const at::Tensor& cos, const at::Tensor& sin) {
  const int64_t tokens = qk.size(0), heads = qk.size(1), d = qk.size(2);
  T* qp = qk.mutable_data_ptr<T>();
  const T* cp = cos.const_data_ptr<T>();
  const T* sp = sin.const_data_ptr<T>();
  const int64_t lt = qk.stride(0), lh = qk.stride(1);
  at::parallel_for(0, tokens, row_grain(heads * d), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      for (int64_t h = 0; h < heads; ++h)
        rope_row<T>(qp + t * lt + h * lh, cp + t * d, sp + t * d, d / 2);
  });
}

// ---- SwiGLU: silu(gate) * up ------------------------------------------------------------------

#if defined(__AVX512F__)
template <typename T>
inline __m512 silu_mul16(__m512 x, __m512 u) {
  const __m512 neg = _mm512_sub_ps(_mm512_setzero_ps(), x);
  const __m512 e = Sleef_expf16_u10 != nullptr ? Sleef_expf16_u10(neg) : exp16(neg);
  const __m512 silu = _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.f), e));
  return _mm512_mul_ps(rnd16<T>(silu), u);
}
#endif

#if defined(__AVX512F__)
// bfloat16 has 65,536 values: silu of each, rounded to bfloat16 by `silu_mul16` (SLEEF), so a
// bf16 row looks silu up, 16 lanes per gather (dword gathers at 2-byte steps, hence the table's
// one spare entry), instead of computing it: identical output, 1.5-2.2x faster (2,048 x 1,536:
// 1.3-1.8 ms -> 0.76-0.85 ms on an Intel Xeon). 128 KB, built on first use, stays in L2.
const void* silu_bf16_table() {
  static const std::vector<uint16_t> table = [] {
    std::vector<uint16_t> t((1 << 16) + 1, 0);
    alignas(64) uint32_t bits[16];
    for (uint32_t v = 0; v < (1u << 16); v += 16) {
      for (uint32_t j = 0; j < 16; ++j) bits[j] = (v + j) << 16;
      const __m512 x = _mm512_load_ps(reinterpret_cast<const float*>(bits));
      const __m512 silu = silu_mul16<c10::BFloat16>(x, _mm512_set1_ps(1.f));  // rnd(silu) * 1
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(&t[v]), to_bf16_bits(silu));
    }
    return t;
  }();
  return table.data();
}
#endif

// As PyTorch's vectorized loop: pairs of vectors through SLEEF, the rest with std::exp.
template <typename T>
void silu_mul_row(T* out, const T* g, const T* u, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  const int64_t vector_end = n - n % 32;
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const void* table = silu_bf16_table();
    for (; i < vector_end; i += 16) {
      const __m512i idx =
          _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(g + i)));
      const __m512 silu =
          _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_i32gather_epi32(idx, table, 2), 16));
      store16(out + i, _mm512_mul_ps(silu, load16(u + i)));
    }
  } else {
    for (; i < vector_end; i += 32) {
      store16(out + i, silu_mul16<T>(load16(g + i), load16(u + i)));
      store16(out + i + 16, silu_mul16<T>(load16(g + i + 16), load16(u + i + 16)));
    }
  }
#elif defined(__AVX2__)
  // PyTorch's AVX2 loop takes two vectors at a time: 16 floats, or 32 bfloat16 (a vector holds
  // 16, widened to two of 8 floats); each 8 through SLEEF as x / (1 + exp(-x)), -x by the sign
  // bit. Without this, std::exp differed from eager silu by an ulp on AVX2-only CPUs.
  if (Sleef_expf8_u10 != nullptr) {
    const int64_t pair = std::is_same_v<T, float> ? 16 : 32;
    alignas(32) float x8[8], silu8[8];
    for (; i < n - n % pair; i += 8) {
      for (int j = 0; j < 8; ++j) x8[j] = to_f(g[i + j]);
      const __m256 x = _mm256_load_ps(x8);
      const __m256 e = Sleef_expf8_u10(_mm256_xor_ps(_mm256_set1_ps(-0.f), x));
      _mm256_store_ps(silu8, _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.f), e)));
      for (int j = 0; j < 8; ++j) out[i + j] = from_f<T>(rnd<T>(silu8[j]) * to_f(u[i + j]));
    }
  }
#endif
  for (; i < n; ++i) {
    const float x = to_f(g[i]);
    out[i] = from_f<T>(rnd<T>(x / (1.f + std::exp(-x))) * to_f(u[i]));
  }
}

template <typename T>
void silu_mul_impl(const at::Tensor& out, const at::Tensor& gate_up) {
  const int64_t rows = gate_up.size(0), n = out.size(1);
  T* op = out.mutable_data_ptr<T>();
  const T* gp = gate_up.const_data_ptr<T>();
  const int64_t lo = out.stride(0), lg = gate_up.stride(0);
  at::parallel_for(0, rows, row_grain(n), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) silu_mul_row<T>(op + t * lo, gp + t * lg, gp + t * lg + n, n);
  });
}

// ---- row-wise argmax (greedy sampling) --------------------------------------------------------
//
//   out[r] = the first index of the largest x[r, :]      x [R, V] float32 or bfloat16, out int64
//
// As torch.max(dim=-1).indices: a NaN counts as the largest (the first NaN wins). Two passes over
// a row (its maximum, then where it first occurs) while it sits in L2; rows run in parallel.
// torch's reduction ran [16, 49152] float32 logits at ~1 GB/s (0.6 ms) on the development CPU.

template <typename T>
int64_t argmax_row_scalar(const T* x, int64_t n) {
  int64_t arg = 0;
  float best = to_f(x[0]);
  if (std::isnan(best)) return 0;
  for (int64_t i = 1; i < n; ++i) {
    const float v = to_f(x[i]);
    if (std::isnan(v)) return i;
    if (v > best) {
      best = v;
      arg = i;
    }
  }
  return arg;
}

template <typename T>
int64_t argmax_row(const T* x, int64_t n) {
#if defined(__AVX512F__)
  const int64_t body = n / 16 * 16;
  __m512 vmax = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __mmask16 nan = 0;
  for (int64_t i = 0; i < body; i += 16) {
    const __m512 v = load16(x + i);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    vmax = _mm512_max_ps(vmax, v);
  }
  float best = _mm512_reduce_max_ps(vmax);
  for (int64_t i = body; i < n; ++i) {
    const float v = to_f(x[i]);
    if (std::isnan(v)) nan = 1;
    best = std::max(best, v);
  }
  if (nan) return argmax_row_scalar(x, n);
  const __m512 vbest = _mm512_set1_ps(best);
  for (int64_t i = 0; i < body; i += 16) {
    const __mmask16 hit = _mm512_cmp_ps_mask(load16(x + i), vbest, _CMP_EQ_OQ);
    if (hit) return i + __builtin_ctz(hit);
  }
  for (int64_t i = body; i < n; ++i)
    if (to_f(x[i]) == best) return i;
  return 0;  // not reached
#elif defined(__AVX2__)
  auto load8 = [](const T* p) {
    if constexpr (std::is_same_v<T, float>) {
      return _mm256_loadu_ps(p);
    } else {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
  };
  const int64_t body = n / 8 * 8;
  __m256 vmax = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 nan = _mm256_setzero_ps();
  for (int64_t i = 0; i < body; i += 8) {
    const __m256 v = load8(x + i);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    vmax = _mm256_max_ps(vmax, v);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, vmax);
  float best = lanes[0];
  for (int l = 1; l < 8; ++l) best = std::max(best, lanes[l]);
  bool any_nan = _mm256_movemask_ps(nan) != 0;
  for (int64_t i = body; i < n; ++i) {
    const float v = to_f(x[i]);
    if (std::isnan(v)) any_nan = true;
    best = std::max(best, v);
  }
  if (any_nan) return argmax_row_scalar(x, n);
  const __m256 vbest = _mm256_set1_ps(best);
  for (int64_t i = 0; i < body; i += 8) {
    const int hit = _mm256_movemask_ps(_mm256_cmp_ps(load8(x + i), vbest, _CMP_EQ_OQ));
    if (hit) return i + __builtin_ctz(hit);
  }
  for (int64_t i = body; i < n; ++i)
    if (to_f(x[i]) == best) return i;
  return 0;  // not reached
#else
  return argmax_row_scalar(x, n);
#endif
}

template <typename T>
void argmax_rows_impl(const at::Tensor& out, const at::Tensor& x) {
  const T* xp = static_cast<const T*>(x.const_data_ptr());
  int64_t* op = out.mutable_data_ptr<int64_t>();
  const int64_t rows = x.size(0), n = x.size(1), ld = x.stride(0);
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) op[r] = argmax_row(xp + r * ld, n);
  });
}

// ---- grammar masks (structured outputs) --------------------------------------------------------
// A bitmask row holds one bit per token, 32 to an int32 word (xgrammar's layout: bit b of word w is
// token 32w + b); a 0 bit forbids the token. Whole words of 1s (free text) and of 0s (a position
// the grammar pins) are the common cases, so they skip the per-bit loop.

template <typename T>
void mask_row(T* x, const int32_t* bits, int64_t n) {
  const T neg = static_cast<T>(-std::numeric_limits<float>::infinity());
  for (int64_t w = 0; w * 32 < n; ++w) {
    const uint32_t word = static_cast<uint32_t>(bits[w]);
    if (word == 0xffffffffu) continue;
    T* p = x + w * 32;
    const int64_t m = std::min<int64_t>(32, n - w * 32);
    for (int64_t b = 0; b < m; ++b)
      if (!((word >> b) & 1u)) p[b] = neg;
  }
}

template <typename T>
void mask_rows_impl(const at::Tensor& x, const at::Tensor& bitmask, const at::Tensor& rows) {
  T* xp = static_cast<T*>(x.mutable_data_ptr());
  const int32_t* bp = bitmask.const_data_ptr<int32_t>();
  const int64_t* rp = rows.const_data_ptr<int64_t>();
  const int64_t n = std::min<int64_t>(x.size(1), bitmask.size(1) * 32);
  const int64_t ld = x.stride(0), bld = bitmask.stride(0);
  at::parallel_for(0, rows.size(0), row_grain(n), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) mask_row(xp + rp[i] * ld, bp + rp[i] * bld, n);
  });
}

}  // namespace

// ---- the ops (ops.h): argument checks, then the dtype's rows -------------------------------------

namespace prefixgate {

void rms_norm(const at::Tensor& out, const at::Tensor& x, const std::optional<at::Tensor>& residual,
              const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.device().is_cpu(), "x must be [T, H] on CPU");
  check_rows(out, x, "out");
  if (residual.has_value()) check_rows(*residual, x, "residual");
  TORCH_CHECK(weight.dim() == 1 && weight.numel() == x.size(1) && weight.is_contiguous() &&
                  weight.scalar_type() == x.scalar_type(),
              "weight must be a contiguous [H] of x's dtype");
  switch (x.scalar_type()) {
    case at::kFloat:
      return rms_norm_impl<float>(out, x, residual, weight, eps);
    case at::kBFloat16:
      return rms_norm_impl<c10::BFloat16>(out, x, residual, weight, eps);
    default:
      TORCH_CHECK(false, "rms_norm: unsupported dtype ", x.scalar_type());
  }
}

void rope(const at::Tensor& qk, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(qk.dim() == 3 && qk.stride(2) == 1 && qk.device().is_cpu(),
              "qk must be [T, heads, D] on CPU with D contiguous");
  const int64_t d = qk.size(2);
  TORCH_CHECK(d % 2 == 0, "head_dim must be even");
  for (const at::Tensor* t : {&cos, &sin})
    TORCH_CHECK(t->dim() == 2 && t->size(0) == qk.size(0) && t->size(1) == d &&
                    t->is_contiguous() && t->scalar_type() == qk.scalar_type(),
                "cos and sin must be contiguous [T, D] of qk's dtype");
  switch (qk.scalar_type()) {
    case at::kFloat:
      return rope_impl<float>(qk, cos, sin);
    case at::kBFloat16:
      return rope_impl<c10::BFloat16>(qk, cos, sin);
    default:
      TORCH_CHECK(false, "rope: unsupported dtype ", qk.scalar_type());
  }
}

void silu_mul(const at::Tensor& out, const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.stride(1) == 1 && gate_up.size(1) % 2 == 0 &&
                  gate_up.device().is_cpu(),
              "gate_up must be [T, 2 * I] on CPU with contiguous rows");
  TORCH_CHECK(out.dim() == 2 && out.size(0) == gate_up.size(0) &&
                  out.size(1) * 2 == gate_up.size(1) && out.stride(1) == 1 &&
                  out.scalar_type() == gate_up.scalar_type(),
              "out must be [T, I] of gate_up's dtype");
  switch (out.scalar_type()) {
    case at::kFloat:
      return silu_mul_impl<float>(out, gate_up);
    case at::kBFloat16:
      return silu_mul_impl<c10::BFloat16>(out, gate_up);
    default:
      TORCH_CHECK(false, "silu_mul: unsupported dtype ", out.scalar_type());
  }
}

void argmax_rows(const at::Tensor& out, const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) > 0 && x.stride(1) == 1,
              "argmax_rows: x must be [R, V] with V > 0 and rows contiguous");
  TORCH_CHECK(out.dim() == 1 && out.size(0) == x.size(0) && out.scalar_type() == at::kLong &&
                  out.is_contiguous(),
              "argmax_rows: out must be int64 [R]");
  switch (x.scalar_type()) {
    case at::kFloat:
      return argmax_rows_impl<float>(out, x);
    case at::kBFloat16:
      return argmax_rows_impl<c10::BFloat16>(out, x);
    default:
      TORCH_CHECK(false, "argmax_rows: unsupported dtype ", x.scalar_type());
  }
}

void mask_rows(const at::Tensor& x, const at::Tensor& bitmask, const at::Tensor& rows) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "mask_rows: x must be [R, V] with rows contiguous");
  TORCH_CHECK(bitmask.dim() == 2 && bitmask.stride(1) == 1 && bitmask.scalar_type() == at::kInt,
              "mask_rows: bitmask must be int32 [K, W] with rows contiguous");
  TORCH_CHECK(rows.dim() == 1 && rows.is_contiguous() && rows.scalar_type() == at::kLong,
              "mask_rows: rows must be int64 [N]");
  const int64_t* rp = rows.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < rows.size(0); ++i)
    TORCH_CHECK(rp[i] >= 0 && rp[i] < x.size(0) && rp[i] < bitmask.size(0), "mask_rows: row ",
                rp[i], " out of range");
  switch (x.scalar_type()) {
    case at::kFloat:
      return mask_rows_impl<float>(x, bitmask, rows);
    case at::kBFloat16:
      return mask_rows_impl<c10::BFloat16>(x, bitmask, rows);
    default:
      TORCH_CHECK(false, "mask_rows: unsupported dtype ", x.scalar_type());
  }
}

}  // namespace prefixgate
