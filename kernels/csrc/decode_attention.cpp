// Paged decode attention on CPU: each sequence's one new token attends over its whole context,
// reading K and V in place from the paged cache through the block table (no gathered copy).
//
//   out[s, h] = softmax(scale * q[s, h] . K[s, 0:L]) @ V[s, 0:L]      L = seq_lens[s]
//
//   query       [S, H, D]                              cache dtype, last dim contiguous
//   kv_cache    [2, num_blocks, block_size, KVH, D]    index 0 = K, 1 = V, last dim contiguous
//   block_tables[S, max_blocks]  int32 or int64        token t of s is in block table[s, t / bs]
//   seq_lens    [S]              int32 or int64
//   out         [S, H, D]                              written here
//
// One work item is a (sequence, KV head) pair: its G = H / KVH query heads share every K and V
// row, so each row is loaded and widened to float32 once. Two passes over the context: scores
// (float32 scratch, G rows of L), then the softmax and the weighted sum of V rows, all in float32.
// Items run in parallel with at::parallel_for.
//
// Inner loops: with AVX-512 and head_dim 16/32/64/128, intrinsics (scores of 16 tokens summed by
// one shuffle tree, V accumulated in registers for up to 4 heads at a time). bfloat16 caches with
// the AVX512-BF16 instruction (head_dim 32/64/128) dot K rows as loaded and weight V rows by the
// probabilities rounded to bfloat16, as the reference does (`softmax(...).to(dtype)`: equal to
// it, and 1.07-1.23x faster than float32 weights); else with AVX2 + FMA the same design on 8 lanes
// (scores of 8 tokens, V in column windows so that the accumulators fit in 16 registers);
// otherwise plain loops that the compiler vectorizes.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "ops.h"
#include "paging.h"
#include "simd.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

namespace {

// ---- float32 vector helpers --------------------------------------------------------------------

#if defined(__AVX2__)
inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#endif

inline float sum(const float* x, int64_t n) {
  float total = 0.f;
  int64_t i = 0;
#if defined(__AVX2__)
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_add_ps(acc0, _mm256_loadu_ps(x + i));
    acc1 = _mm256_add_ps(acc1, _mm256_loadu_ps(x + i + 8));
  }
  total = hsum8(_mm256_add_ps(acc0, acc1));
#else
  constexpr int kLanes = 16;
  float lanes[kLanes] = {};
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) lanes[l] += x[i + l];
  for (int l = 0; l < kLanes; ++l) total += lanes[l];
#endif
  for (; i < n; ++i) total += x[i];
  return total;
}

inline float max(const float* x, int64_t n) {  // n >= 1
  constexpr int kLanes = 16;
  float lanes[kLanes];
  for (int l = 0; l < kLanes; ++l) lanes[l] = x[0];
  int64_t i = 0;
#if defined(__AVX512F__)
  __m512 m16 = _mm512_set1_ps(x[0]);  // max_ps(x, m) keeps m where x is NaN, as std::max(m, x)
  for (; i + 16 <= n; i += 16) m16 = _mm512_max_ps(_mm512_loadu_ps(x + i), m16);
  _mm512_storeu_ps(lanes, m16);
#elif defined(__AVX2__)
  __m256 m8 = _mm256_set1_ps(x[0]);  // max_ps(x, m) keeps m where x is NaN, as std::max(m, x)
  for (; i + 8 <= n; i += 8) m8 = _mm256_max_ps(_mm256_loadu_ps(x + i), m8);
  _mm256_storeu_ps(lanes, m8);
#else
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) lanes[l] = std::max(lanes[l], x[i + l]);
#endif
  float m = x[0];
  for (; i < n; ++i) m = std::max(m, x[i]);
  for (int l = 0; l < kLanes; ++l) m = std::max(m, lanes[l]);
  return m;
}

// x[i] = exp(x[i] - shift) for x[i] <= shift (the softmax numerators; shift is the row max).
// exp(t) = 2^k * exp(r) with k = round(t / ln2), |r| <= ln2 / 2, exp(r) by its degree-6 Taylor
// polynomial (relative error < 3e-7). t is clamped at -87, so underflow gives ~1e-38, not 0.
inline void exp_shifted(float* x, int64_t n, float shift) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693145751953125f;  // ln 2 split so that k * kLn2Hi is exact
  constexpr float kLn2Lo = 1.42860682030941723212e-6f;
  constexpr float kRound = 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer
  int64_t i = 0;
#if defined(__AVX512F__)
  // the same steps on 16 lanes (the scalar loop below finishes the row)
  const __m512 zshift = _mm512_set1_ps(shift), zmin = _mm512_set1_ps(-87.f);
  const __m512 zround = _mm512_set1_ps(kRound);
  for (; i + 16 <= n; i += 16) {
    __m512 t = _mm512_max_ps(zmin, _mm512_sub_ps(_mm512_loadu_ps(x + i), zshift));
    __m512 k = _mm512_sub_ps(_mm512_fmadd_ps(t, _mm512_set1_ps(kLog2e), zround), zround);
    __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(kLn2Hi), t);
    r = _mm512_fnmadd_ps(k, _mm512_set1_ps(kLn2Lo), r);
    __m512 p = _mm512_set1_ps(1.f / 720.f);
    for (float c : {1.f / 120.f, 1.f / 24.f, 1.f / 6.f, 0.5f, 1.f, 1.f})
      p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    __m512i e = _mm512_add_epi32(_mm512_cvtps_epi32(k), _mm512_set1_epi32(127));
    _mm512_storeu_ps(x + i, _mm512_mul_ps(p, _mm512_castsi512_ps(_mm512_slli_epi32(e, 23))));
  }
#endif
#if defined(__AVX2__) && defined(__FMA__)
  // the same steps on 8 lanes (the scalar loop below finishes the row)
  const __m256 vshift = _mm256_set1_ps(shift), vmin = _mm256_set1_ps(-87.f);
  const __m256 vround = _mm256_set1_ps(kRound);
  for (; i + 8 <= n; i += 8) {
    __m256 t = _mm256_max_ps(vmin, _mm256_sub_ps(_mm256_loadu_ps(x + i), vshift));
    __m256 k = _mm256_sub_ps(_mm256_fmadd_ps(t, _mm256_set1_ps(kLog2e), vround), vround);
    __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(kLn2Hi), t);
    r = _mm256_fnmadd_ps(k, _mm256_set1_ps(kLn2Lo), r);
    __m256 p = _mm256_set1_ps(1.f / 720.f);
    for (float c : {1.f / 120.f, 1.f / 24.f, 1.f / 6.f, 0.5f, 1.f, 1.f})
      p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    __m256i e = _mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127));
    _mm256_storeu_ps(x + i, _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(e, 23))));
  }
#endif
  for (; i < n; ++i) {
    float t = std::max(x[i] - shift, -87.f);
    float k = (t * kLog2e + kRound) - kRound;
    float r = (t - k * kLn2Hi) - k * kLn2Lo;
    float p = 1.f / 720.f;
    p = p * r + 1.f / 120.f;
    p = p * r + 1.f / 24.f;
    p = p * r + 1.f / 6.f;
    p = p * r + 0.5f;
    p = p * r + 1.f;
    p = p * r + 1.f;
    int32_t bits = (static_cast<int32_t>(k) + 127) << 23;  // 2^k, k in [-126, 0]
    float scale;
    std::memcpy(&scale, &bits, sizeof(float));
    x[i] = p * scale;
  }
}

inline void axpy(float a, const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

// ---- shared by the vector inner loops ----------------------------------------------------------

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
// Rows are scattered over blocks (and strided by KVH * D inside one): fetch a few tokens ahead.
constexpr int64_t kPrefetch = 8;

template <typename T, int N>  // the N elements at row
inline void prefetch_row(const T* row) {
  constexpr int bytes = N * sizeof(T);
  const char* p = reinterpret_cast<const char*>(row);
  for (int off = 0; off < bytes; off += 64) _mm_prefetch(p + off, _MM_HINT_T0);
}
#endif

// ---- AVX-512 inner loops for head_dim = 16 * NC ------------------------------------------------

#if defined(__AVX512F__)
// out[i] = sum of the 16 lanes of v[i], i = 0..15: a shuffle tree instead of 16 separate
// horizontal sums (45 instructions instead of ~130). Each level halves the lanes per vector.
inline __m512 reduce16(const float* parts /* [16, 16], any alignment */) {
  __m512 v[16];
  for (int i = 0; i < 16; ++i) v[i] = _mm512_loadu_ps(parts + 16 * i);
  // levels 1-2 leave r[k] holding, in its 128-bit lane l, four partial sums of v[4l + k]
  __m512 r[4];
  for (int k = 0; k < 4; ++k) {
    __m512 a = v[k], b = v[4 + k], c = v[8 + k], d = v[12 + k];
    __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
    __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x44), _mm512_shuffle_f32x4(c, d, 0xEE));
    r[k] = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xDD));
  }
  // levels 3-4: a 4x4 transpose-and-add inside each 128-bit lane; element k of lane l = v[4l+k]
  __m512 w0 = _mm512_add_ps(_mm512_unpacklo_ps(r[0], r[1]), _mm512_unpackhi_ps(r[0], r[1]));
  __m512 w1 = _mm512_add_ps(_mm512_unpacklo_ps(r[2], r[3]), _mm512_unpackhi_ps(r[2], r[3]));
  __m512d lo = _mm512_unpacklo_pd(_mm512_castps_pd(w0), _mm512_castps_pd(w1));
  __m512d hi = _mm512_unpackhi_pd(_mm512_castps_pd(w0), _mm512_castps_pd(w1));
  return _mm512_add_ps(_mm512_castpd_ps(lo), _mm512_castpd_ps(hi));
}

// scores[g * len + t] = q_g . K row t, for rows at head + offs[t]
template <typename T, int NC>
void scores_avx512(const float* q, int64_t G, const T* head, const int64_t* offs, int64_t len,
                   float* scores, float* parts /* [G, 16, 16] */) {
  for (int64_t t0 = 0; t0 < len; t0 += 16) {
    const int64_t n = std::min<int64_t>(16, len - t0);
    for (int64_t j = 0; j < n; ++j) {
      if (t0 + j + kPrefetch < len) prefetch_row<T, 16 * NC>(head + offs[t0 + j + kPrefetch]);
      const T* row = head + offs[t0 + j];
      __m512 k[NC];
      for (int c = 0; c < NC; ++c) k[c] = load16(row + 16 * c);
      for (int64_t g = 0; g < G; ++g) {
        const float* qg = q + g * 16 * NC;
        __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(qg), k[0]);
        for (int c = 1; c < NC; ++c) acc = _mm512_fmadd_ps(_mm512_loadu_ps(qg + 16 * c), k[c], acc);
        _mm512_storeu_ps(parts + (g * 16 + j) * 16, acc);
      }
    }
    const __mmask16 mask = static_cast<__mmask16>((1u << n) - 1);
    for (int64_t g = 0; g < G; ++g)  // lanes past n reduce stale vectors and are not stored
      _mm512_mask_storeu_ps(scores + g * len + t0, mask, reduce16(parts + g * 256));
  }
}

#if defined(__AVX512BF16__)
// bfloat16 scores with the dot-product instruction (pairs of exact bf16 products summed into
// float32): K rows are used as loaded, without widening; the scale is applied to the sums.
template <int NC>
void scores_dpbf16(const c10::BFloat16* q, int64_t q_head, float scale, int64_t G,
                   const c10::BFloat16* head, const int64_t* offs, int64_t len, float* scores,
                   float* parts /* [G, 16, 16] */) {
  static_assert(NC % 2 == 0, "32 bfloat16 per vector");
  constexpr int NV = NC / 2;
  auto load = [](const c10::BFloat16* p) {
    return (__m512bh)_mm512_loadu_si512(reinterpret_cast<const void*>(p));
  };
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int64_t t0 = 0; t0 < len; t0 += 16) {
    const int64_t n = std::min<int64_t>(16, len - t0);
    for (int64_t j = 0; j < n; ++j) {
      if (t0 + j + kPrefetch < len)
        prefetch_row<c10::BFloat16, 16 * NC>(head + offs[t0 + j + kPrefetch]);
      const c10::BFloat16* row = head + offs[t0 + j];
      __m512bh k[NV];
      for (int v = 0; v < NV; ++v) k[v] = load(row + 32 * v);
      for (int64_t g = 0; g < G; ++g) {
        const c10::BFloat16* qg = q + g * q_head;
        __m512 acc = _mm512_dpbf16_ps(_mm512_setzero_ps(), load(qg), k[0]);
        for (int v = 1; v < NV; ++v) acc = _mm512_dpbf16_ps(acc, load(qg + 32 * v), k[v]);
        _mm512_storeu_ps(parts + (g * 16 + j) * 16, acc);
      }
    }
    const __mmask16 mask = static_cast<__mmask16>((1u << n) - 1);
    for (int64_t g = 0; g < G; ++g)
      _mm512_mask_storeu_ps(scores + g * len + t0, mask,
                            _mm512_mul_ps(reduce16(parts + g * 256), vscale));
  }
}
#endif

#if defined(__AVX512BF16__)
// bfloat16 values with the dot-product instruction, as the reference computes them: the softmax
// probabilities, normalized and rounded to bfloat16 (`probs`, [G, ld], zero padded to an even
// count), times V in float32 sums. A step takes two tokens: their V rows interleaved into
// (row t, row t + 1) pairs by unpacklo/hi, which orders the lanes of each 32-column chunk as
// d = 8L + k (lo) and 8L + 4 + k (hi) for lane 4L + k; the sums are put back in order at the end.
template <int NC, int GB>
void values_heads_dpbf16(const c10::BFloat16* probs, int64_t ld, int64_t len,
                         const c10::BFloat16* head, const int64_t* offs, float* acc) {
  static_assert(NC % 2 == 0, "32 bfloat16 per vector");
  constexpr int NV = NC / 2;
  const uint32_t* pp = reinterpret_cast<const uint32_t*>(probs);
  __m512 lo[GB][NV], hi[GB][NV];
  for (int g = 0; g < GB; ++g)
    for (int v = 0; v < NV; ++v) lo[g][v] = hi[g][v] = _mm512_setzero_ps();
  auto load = [](const c10::BFloat16* p) { return _mm512_loadu_si512(reinterpret_cast<const void*>(p)); };
  for (int64_t t = 0; t < len; t += 2) {
    if (t + kPrefetch + 1 < len) {
      prefetch_row<c10::BFloat16, 16 * NC>(head + offs[t + kPrefetch]);
      prefetch_row<c10::BFloat16, 16 * NC>(head + offs[t + kPrefetch + 1]);
    }
    const c10::BFloat16* a = head + offs[t];
    const c10::BFloat16* b = t + 1 < len ? head + offs[t + 1] : nullptr;  // none: zeros (the
    __m512bh xl[NV], xh[NV];  // padded probability is 0, and 0 * NaN garbage would be NaN)
    for (int v = 0; v < NV; ++v) {
      const __m512i ra = load(a + 32 * v);
      const __m512i rb = b != nullptr ? load(b + 32 * v) : _mm512_setzero_si512();
      xl[v] = (__m512bh)_mm512_unpacklo_epi16(ra, rb);
      xh[v] = (__m512bh)_mm512_unpackhi_epi16(ra, rb);
    }
    for (int g = 0; g < GB; ++g) {
      const __m512bh w = (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(pp[(g * ld + t) / 2]));
      for (int v = 0; v < NV; ++v) {
        lo[g][v] = _mm512_dpbf16_ps(lo[g][v], xl[v], w);
        hi[g][v] = _mm512_dpbf16_ps(hi[g][v], xh[v], w);
      }
    }
  }
  const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int g = 0; g < GB; ++g)
    for (int v = 0; v < NV; ++v) {
      float* out = acc + g * 16 * NC + 32 * v;
      _mm512_storeu_ps(out, _mm512_permutex2var_ps(lo[g][v], first, hi[g][v]));
      _mm512_storeu_ps(out + 16, _mm512_permutex2var_ps(lo[g][v], second, hi[g][v]));
    }
}

// probs[g, t] = bfloat16(scores[g, t] * inv_sum[g]) (ld = len rounded up to even, the pad 0);
// then acc[g] = sum_t probs[g, t] * V row t, and inv_sum[g] = 1 (the sums are normalized)
template <int NC>
void values_dpbf16(const float* scores, int64_t G, int64_t len, float* inv_sum,
                   const c10::BFloat16* head, const int64_t* offs, c10::BFloat16* probs,
                   float* acc) {
  const int64_t ld = len + (len & 1);
  for (int64_t g = 0; g < G; ++g) {
    const float* p = scores + g * len;
    c10::BFloat16* out = probs + g * ld;
    const __m512 vinv = _mm512_set1_ps(inv_sum[g]);
    int64_t t = 0;
    for (; t + 16 <= len; t += 16) store16(out + t, _mm512_mul_ps(_mm512_loadu_ps(p + t), vinv));
    for (; t < len; ++t) out[t] = static_cast<c10::BFloat16>(p[t] * inv_sum[g]);
    if (ld != len) out[len] = static_cast<c10::BFloat16>(0.f);
    inv_sum[g] = 1.f;
  }
  constexpr int64_t kMaxHeads = NC >= 8 ? 2 : 4;  // 8 or 16 accumulators, a few vectors more
  for (int64_t g = 0; g < G;) {
    const int64_t n = std::min(kMaxHeads, G - g);
    const c10::BFloat16* pg = probs + g * ld;
    float* ag = acc + g * 16 * NC;
    if constexpr (kMaxHeads == 4) {
      if (n == 4) values_heads_dpbf16<NC, 4>(pg, ld, len, head, offs, ag);
      if (n == 3) values_heads_dpbf16<NC, 3>(pg, ld, len, head, offs, ag);
    }
    if (n == 2) values_heads_dpbf16<NC, 2>(pg, ld, len, head, offs, ag);
    if (n == 1) values_heads_dpbf16<NC, 1>(pg, ld, len, head, offs, ag);
    g += n;
  }
}
#endif

// GB query heads at once, accumulators in registers: acc[i] = sum_t p[i * len + t] * V row t
template <typename T, int NC, int GB>
void values_heads(const float* p, int64_t len, const T* head, const int64_t* offs, float* acc) {
  __m512 a[GB][NC];
  for (int i = 0; i < GB; ++i)
    for (int c = 0; c < NC; ++c) a[i][c] = _mm512_setzero_ps();
  for (int64_t t = 0; t < len; ++t) {
    if (t + kPrefetch < len) prefetch_row<T, 16 * NC>(head + offs[t + kPrefetch]);
    const T* row = head + offs[t];
    __m512 v[NC];
    for (int c = 0; c < NC; ++c) v[c] = load16(row + 16 * c);
    for (int i = 0; i < GB; ++i) {
      const __m512 w = _mm512_set1_ps(p[i * len + t]);
      for (int c = 0; c < NC; ++c) a[i][c] = _mm512_fmadd_ps(w, v[c], a[i][c]);
    }
  }
  for (int i = 0; i < GB; ++i)
    for (int c = 0; c < NC; ++c) _mm512_storeu_ps(acc + (i * NC + c) * 16, a[i][c]);
}

// acc[g] = sum_t p[g * len + t] * V row t (acc is [G, 16 * NC], overwritten), each V row
// widened once per batch of up to 4 heads (2 for head_dim 128, to stay within 32 registers)
template <typename T, int NC>
void values_avx512(const float* p, int64_t G, const T* head, const int64_t* offs, int64_t len,
                   float* acc) {
  constexpr int64_t kMaxHeads = NC >= 8 ? 2 : 4;
  for (int64_t g = 0; g < G;) {
    const int64_t n = std::min(kMaxHeads, G - g);
    const float* pg = p + g * len;
    float* ag = acc + g * 16 * NC;
    if constexpr (kMaxHeads == 4) {
      if (n == 4) values_heads<T, NC, 4>(pg, len, head, offs, ag);
      if (n == 3) values_heads<T, NC, 3>(pg, len, head, offs, ag);
    }
    if (n == 2) values_heads<T, NC, 2>(pg, len, head, offs, ag);
    if (n == 1) values_heads<T, NC, 1>(pg, len, head, offs, ag);
    g += n;
  }
}
#endif

// ---- AVX2 + FMA inner loops for head_dim = 8 * NC (no AVX-512) -------------------------------

#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
// out[i] = sum of the 8 lanes of v[i], i = 0..7: two levels of horizontal adds leave, in each
// 128-bit half, four partial sums of v[0..3] (u0) or v[4..7] (u1); adding the halves ends it.
inline __m256 reduce8(const float* parts /* [8, 8] */) {
  __m256 v[8];
  for (int i = 0; i < 8; ++i) v[i] = _mm256_loadu_ps(parts + 8 * i);
  __m256 t0 = _mm256_hadd_ps(v[0], v[1]), t1 = _mm256_hadd_ps(v[2], v[3]);
  __m256 t2 = _mm256_hadd_ps(v[4], v[5]), t3 = _mm256_hadd_ps(v[6], v[7]);
  __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20),
                       _mm256_permute2f128_ps(u0, u1, 0x31));
}

// scores[g * len + t] = q_g . K row t, for rows at head + offs[t]. At most 8 vectors of a row
// stay in registers (16 ymm in all): head_dim 128 goes in two halves, the second adding to parts.
template <typename T, int NC>
void scores_avx2(const float* q, int64_t G, const T* head, const int64_t* offs, int64_t len,
                 float* scores, float* parts /* [G, 8, 8] */) {
  constexpr int KC = NC < 8 ? NC : 8;
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t t0 = 0; t0 < len; t0 += 8) {
    const int64_t n = std::min<int64_t>(8, len - t0);
    for (int64_t j = 0; j < n; ++j) {
      if (t0 + j + kPrefetch < len) prefetch_row<T, 8 * NC>(head + offs[t0 + j + kPrefetch]);
      const T* row = head + offs[t0 + j];
      for (int c0 = 0; c0 < NC; c0 += KC) {
        __m256 k[KC];
        for (int c = 0; c < KC; ++c) k[c] = load8(row + 8 * (c0 + c));
        for (int64_t g = 0; g < G; ++g) {
          const float* qg = q + g * 8 * NC + 8 * c0;
          float* part = parts + (g * 8 + j) * 8;
          __m256 acc = c0 == 0 ? _mm256_setzero_ps() : _mm256_loadu_ps(part);
          for (int c = 0; c < KC; ++c)
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(qg + 8 * c), k[c], acc);
          _mm256_storeu_ps(part, acc);
        }
      }
    }
    // lanes past n reduce stale vectors and are not stored
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), lane);
    for (int64_t g = 0; g < G; ++g)
      _mm256_maskstore_ps(scores + g * len + t0, mask, reduce8(parts + g * 64));
  }
}

// GB query heads and CW vectors of columns from col on, accumulators in registers:
// acc[i, col:col + CW] = sum_t p[i * len + t] * V row t [col:col + CW]   (acc rows of 8 * NC)
template <typename T, int NC, int GB, int CW>
void values_window(const float* p, int64_t len, const T* head, const int64_t* offs, int col,
                   float* acc) {
  __m256 a[GB][CW];
  for (int i = 0; i < GB; ++i)
    for (int c = 0; c < CW; ++c) a[i][c] = _mm256_setzero_ps();
  for (int64_t t = 0; t < len; ++t) {
    if (t + kPrefetch < len) prefetch_row<T, 8 * CW>(head + offs[t + kPrefetch] + 8 * col);
    const T* row = head + offs[t] + 8 * col;
    __m256 w[GB];
    for (int i = 0; i < GB; ++i) w[i] = _mm256_set1_ps(p[i * len + t]);
    for (int c = 0; c < CW; ++c) {
      const __m256 v = load8(row + 8 * c);
      for (int i = 0; i < GB; ++i) a[i][c] = _mm256_fmadd_ps(w[i], v, a[i][c]);
    }
  }
  for (int i = 0; i < GB; ++i)
    for (int c = 0; c < CW; ++c) _mm256_storeu_ps(acc + i * 8 * NC + 8 * (col + c), a[i][c]);
}

// GB heads in column windows of CW vectors: GB * CW accumulators, GB weights and one V vector
// in 16 ymm registers, (GB, CW) = (1, 8), (2, 4), (3, 4) or (4, 2).
template <typename T, int NC, int GB>
void values_heads(const float* p, int64_t len, const T* head, const int64_t* offs, float* acc) {
  constexpr int kCols = GB == 1 ? 8 : GB <= 3 ? 4 : 2;
  constexpr int CW = NC < kCols ? NC : kCols;
  for (int col = 0; col < NC; col += CW)
    values_window<T, NC, GB, CW>(p, len, head, offs, col, acc);
}

// acc[g] = sum_t p[g * len + t] * V row t (acc is [G, 8 * NC], overwritten); the G heads go in
// passes of at most 4, as even as can be (G = 5: 3 + 2), each V vector widened once per pass.
template <typename T, int NC>
void values_avx2(const float* p, int64_t G, const T* head, const int64_t* offs, int64_t len,
                 float* acc) {
  constexpr int64_t kMaxHeads = 4;
  for (int64_t g = 0; g < G;) {
    const int64_t passes = (G - g + kMaxHeads - 1) / kMaxHeads;
    const int64_t n = (G - g + passes - 1) / passes;
    const float* pg = p + g * len;
    float* ag = acc + g * 8 * NC;
    if (n == 4) values_heads<T, NC, 4>(pg, len, head, offs, ag);
    if (n == 3) values_heads<T, NC, 3>(pg, len, head, offs, ag);
    if (n == 2) values_heads<T, NC, 2>(pg, len, head, offs, ag);
    if (n == 1) values_heads<T, NC, 1>(pg, len, head, offs, ag);
    g += n;
  }
}
#endif

// ---- portable inner loops (any head_dim) --------------------------------------------------------

template <typename T>
void scores_portable(const float* q, int64_t G, int64_t D, const T* head, const int64_t* offs,
                     int64_t len, float* scores, float* row) {
  for (int64_t t = 0; t < len; ++t) {
    widen_row(head + offs[t], row, D);
    for (int64_t g = 0; g < G; ++g) scores[g * len + t] = dot(q + g * D, row, D);
  }
}

template <typename T>
void values_portable(const float* p, int64_t G, int64_t D, const T* head, const int64_t* offs,
                     int64_t len, float* acc, float* row) {
  std::fill(acc, acc + G * D, 0.f);
  for (int64_t t = 0; t < len; ++t) {
    widen_row(head + offs[t], row, D);
    for (int64_t g = 0; g < G; ++g) axpy(p[g * len + t], row, acc + g * D, D);
  }
}

// ---- the kernel --------------------------------------------------------------------------------

// The call's layout (paging.h): one query row per sequence.
struct Layout : PagedLayout {
  bool lens64;  // int64 (else int32) seq_lens
};

// Per-thread scratch, sized for the longest context once per parallel chunk.
struct Scratch {
  std::vector<int64_t> offs;
  std::vector<float> q, scores, row, acc, parts;
  std::vector<c10::BFloat16> probs;
  Scratch(const Layout& l, int64_t max_len)
      : offs(max_len),
        q(l.group * l.head_dim),
        scores(l.group * max_len),
        row(l.head_dim),
        acc(l.group * l.head_dim),
        parts(l.group * 16 * 16),
        probs(l.group * (max_len + 1)) {}
};

// scores[g] <- exp(scores[g] - max) in place; returns 1 / sum for each head in inv_sum
void softmax_rows(float* scores, int64_t G, int64_t len, float* inv_sum) {
  for (int64_t g = 0; g < G; ++g) {
    float* p = scores + g * len;
    exp_shifted(p, len, max(p, len));
    inv_sum[g] = 1.f / sum(p, len);
  }
}

// Calls run(std::integral_constant<int, D / W>) for head_dim D = 16, 32, 64 or 128 and
// vectors of W floats; false for other head dims.
template <int W, typename F>
bool with_vectors(int64_t D, F&& run) {
  switch (D) {
    case 16: return run(std::integral_constant<int, 16 / W>{});
    case 32: return run(std::integral_constant<int, 32 / W>{});
    case 64: return run(std::integral_constant<int, 64 / W>{});
    case 128: return run(std::integral_constant<int, 128 / W>{});
    default: return false;
  }
}

// The three steps with vector inner loops (AVX-512, else AVX2 + FMA) for head_dim 16, 32, 64 or
// 128; false otherwise, and without either instruction set.
template <typename T>
bool passes_vector(const T* q_raw, int64_t q_head, float scale, const float* q, int64_t G,
                   int64_t D, const T* k_head, const T* v_head, const int64_t* offs, int64_t len,
                   float* scores, float* parts, float* inv_sum, float* acc,
                   c10::BFloat16* probs /* [G, len + 1] */) {
#if defined(__AVX512F__)
  return with_vectors<16>(D, [&](auto nc) {
    constexpr int NC = decltype(nc)::value;
#if defined(__AVX512BF16__)
    if constexpr (std::is_same_v<T, c10::BFloat16> && NC % 2 == 0) {
      scores_dpbf16<NC>(q_raw, q_head, scale, G, k_head, offs, len, scores, parts);
      softmax_rows(scores, G, len, inv_sum);
      values_dpbf16<NC>(scores, G, len, inv_sum, v_head, offs, probs, acc);
      return true;
    } else {
      scores_avx512<T, NC>(q, G, k_head, offs, len, scores, parts);
    }
#else
    scores_avx512<T, NC>(q, G, k_head, offs, len, scores, parts);
#endif
    softmax_rows(scores, G, len, inv_sum);
    values_avx512<T, NC>(scores, G, v_head, offs, len, acc);
    return true;
  });
#elif defined(__AVX2__) && defined(__FMA__)
  return with_vectors<8>(D, [&](auto nc) {
    constexpr int NC = decltype(nc)::value;
    scores_avx2<T, NC>(q, G, k_head, offs, len, scores, parts);
    softmax_rows(scores, G, len, inv_sum);
    values_avx2<T, NC>(scores, G, v_head, offs, len, acc);
    return true;
  });
#else
  return false;
#endif
}

template <typename T>
void attend_one(const Layout& l, int64_t s, int64_t kvh, int64_t len, const T* query,
                const T* cache, const void* table, double scale, T* out, Scratch& w) {
  const int64_t G = l.group, D = l.head_dim;
  T* o = out + s * l.o_row + kvh * G * l.o_head;
  if (len <= 0) {  // nothing to attend to: zeros rather than NaN
    for (int64_t g = 0; g < G; ++g)
      for (int64_t d = 0; d < D; ++d) o[g * l.o_head + d] = static_cast<T>(0.f);
    return;
  }
  const T* q = query + s * l.q_row + kvh * G * l.q_head;
  for (int64_t g = 0; g < G; ++g) {
    widen_row(q + g * l.q_head, w.q.data() + g * D, D);
    for (int64_t d = 0; d < D; ++d) w.q[g * D + d] *= static_cast<float>(scale);
  }
  int64_t* offs = w.offs.data();
  check_blocks(l, table, s, len);
  row_offsets(l, table, s, len, offs);
  const T* k_head = cache + kvh * l.c_head;
  const T* v_head = k_head + l.c_kv;
  float* scores = w.scores.data();
  float* acc = w.acc.data();
  float inv_sum[256];
  if (!passes_vector(q, l.q_head, static_cast<float>(scale), w.q.data(), G, D, k_head, v_head,
                     offs, len, scores, w.parts.data(), inv_sum, acc, w.probs.data())) {
    scores_portable(w.q.data(), G, D, k_head, offs, len, scores, w.row.data());
    softmax_rows(scores, G, len, inv_sum);
    values_portable(scores, G, D, v_head, offs, len, acc, w.row.data());
  }
  for (int64_t g = 0; g < G; ++g)
    for (int64_t d = 0; d < D; ++d)
      o[g * l.o_head + d] = static_cast<T>(acc[g * D + d] * inv_sum[g]);
}

template <typename T>
void attend_all(const Layout& l, const at::Tensor& query, const at::Tensor& cache,
                const at::Tensor& tables, const at::Tensor& seq_lens, double scale,
                const at::Tensor& out) {
  const T* q = static_cast<const T*>(query.const_data_ptr());
  const T* c = static_cast<const T*>(cache.const_data_ptr());
  const void* table = tables.const_data_ptr();
  const void* lens = seq_lens.const_data_ptr();
  T* o = static_cast<T*>(out.mutable_data_ptr());
  int64_t max_len = 1;
  for (int64_t s = 0; s < l.num_rows; ++s)
    max_len = std::max(max_len, read_index(lens, l.lens64, s));
  at::parallel_for(0, l.num_rows * l.kv_heads, 1, [&](int64_t begin, int64_t end) {
    Scratch w(l, max_len);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t s = item / l.kv_heads, kvh = item % l.kv_heads;
      attend_one<T>(l, s, kvh, read_index(lens, l.lens64, s), q, c, table, scale, o, w);
    }
  });
}

}  // namespace

namespace prefixgate {  // ops.h

void paged_decode_attention(const at::Tensor& out, const at::Tensor& query,
                            const at::Tensor& kv_cache, const at::Tensor& block_tables,
                            const at::Tensor& seq_lens, double scale) {
  const Layout l{paged_layout("paged_decode_attention", out, query, kv_cache, block_tables,
                              {&seq_lens}),
                 seq_lens.scalar_type() == at::kLong};
  TORCH_CHECK(block_tables.size(0) == l.num_rows && seq_lens.size(0) == l.num_rows,
              "block_tables and seq_lens need one row per sequence");
  TORCH_CHECK(l.group <= 256, "at most 256 query heads per KV head");
  if (l.num_rows == 0) return;
  switch (kv_cache.scalar_type()) {
    case at::kFloat:
      attend_all<float>(l, query, kv_cache, block_tables, seq_lens, scale, out);
      break;
    case at::kBFloat16:
      attend_all<c10::BFloat16>(l, query, kv_cache, block_tables, seq_lens, scale, out);
      break;
    case at::kHalf:
      attend_all<c10::Half>(l, query, kv_cache, block_tables, seq_lens, scale, out);
      break;
    default:
      TORCH_CHECK(false, "paged_decode_attention: unsupported dtype ", kv_cache.scalar_type());
  }
}

}  // namespace prefixgate
