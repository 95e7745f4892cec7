// AVX-512 loads and stores of the cache / activation dtypes as float32 vectors, shared by the
// kernels of this library (internal linkage: each source file gets its own copy).
//
//   load16(p)       16 elements at p (float32, bfloat16 or float16) -> __m512
//   load8(p)        8 elements at p -> __m256, where the build has AVX2 (float16 with F16C)
//   widen_row(src, dst, n)  n elements of float32, bfloat16 or float16 -> float32 (exact), 16 or
//                   8 lanes at a time where the build has them
//   to_bf16_bits(v) float32 -> bfloat16 bits, round to nearest even, NaN kept quiet (as
//                   c10::BFloat16 does)
//   store16(p, v)   16 float32 lanes -> p as float32, bfloat16 (rounded as above) or float16
//
// And AMX: PREFIXGATE_AMX_BF16 is 1 where the build targets AMX tiles with bf16 products (and
// AVX512-BF16), else 0. amx_permitted() asks Linux once for this process's tile data (false where
// it refuses, and in other builds); amx_configure() sets this thread's 8 tiles to 16 rows of 64
// bytes, before a kernel's first tile instruction on each thread, and amx_release() frees them
// after its last (both no-ops in other builds).
//
//   dot(a, b, n)    float32 dot product (AVX-512: two accumulators; else 8 independent partial
//                   sums, which the compiler vectorizes without -ffast-math)
#pragma once

#include <cstdint>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define PREFIXGATE_AMX_BF16 1
#else
#define PREFIXGATE_AMX_BF16 0
#endif

#if PREFIXGATE_AMX_BF16
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>
#include <immintrin.h>

namespace {

inline bool amx_permitted() {
  static const bool ok = [] {
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtileData = 18;  // asm/prctl.h
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtileData) == 0;
  }();
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

inline void amx_configure() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

inline void amx_release() { _tile_release(); }

}  // namespace
#else
namespace {
inline bool amx_permitted() { return false; }
inline void amx_configure() {}
inline void amx_release() {}
}  // namespace
#endif

#if defined(__AVX512F__)
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

namespace {

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

inline __m256i to_bf16_bits(__m512 v) {
#if defined(__AVX512BF16__)
  return (__m256i)_mm512_cvtneps_pbh(v);
#else
  const __m512i b = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(
      _mm512_add_epi32(_mm512_add_epi32(b, _mm512_set1_epi32(0x7FFF)), lsb), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
#endif
}

inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(c10::BFloat16* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_bf16_bits(v));
}
inline void store16(c10::Half* p, __m512 v) {  // round to nearest even, as c10::Half does
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

}  // namespace
#endif

#if defined(__AVX2__)
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

namespace {

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
#if defined(__F16C__)
inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
#endif

}  // namespace
#endif

#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace {

template <typename T>
inline void widen_row(const T* src, float* dst, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(dst + i, load16(src + i));
#elif defined(__AVX2__) && defined(__F16C__)
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, load8(src + i));
#endif
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

inline float dot(const float* a, const float* b, int64_t n) {
#if defined(__AVX512F__)
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc0);
    acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), acc1);
  }
  for (; i < n; i += 16) {
    __mmask16 m = n - i >= 16 ? static_cast<__mmask16>(0xFFFF)
                              : static_cast<__mmask16>((1u << (n - i)) - 1);
    acc0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), acc0);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
#else
  constexpr int kLanes = 8;  // independent partial sums: vectorizable without -ffast-math
  float lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) lanes[l] += a[i + l] * b[i + l];
  float sum = 0.f;
  for (; i < n; ++i) sum += a[i] * b[i];
  for (int l = 0; l < kLanes; ++l) sum += lanes[l];
  return sum;
#endif
}

}  // namespace
