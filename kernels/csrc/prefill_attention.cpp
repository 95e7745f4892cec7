// Paged prefill attention on CPU: every new token of a prefill (or of a chunk of one, over cached
// context) attends causally over its sequence's keys, read in place from the paged cache through
// the block table. Built into the same library as decode_attention.cpp.
//
//   out[t, h] = softmax(scale * q[t, h] . K[s, 0:p+1]) @ V[s, 0:p+1]
//   for row t = start[s] + i, new token i of sequence s (Q = q_len, L = seq_lens[s]), which sits
//   at position p = L - Q + i
//
//   query           [T, H, D]                             cache dtype, last dim contiguous
//   kv_cache        [2, num_blocks, block_size, KVH, D]   index 0 = K, 1 = V, last dim contiguous
//   block_tables    [S, max_blocks]  int32 or int64       token t of s is in block table[s, t / bs]
//   query_start_loc [S + 1]          int32 or int64       rows of s: start[s] .. start[s + 1]
//   seq_lens        [S]              int32 or int64
//   seq_ids         [P]              int32 or int64       the sequences to attend (the prefills)
//   out             [T, H, D]                             their rows written, the others untouched
//   groups          [S] or none      int32 or int64       decodes sharing leading blocks: each
//   group_keys      [num_groups]     int32 or int64       sequence's group (-1: none) and the keys
//                                                         each group shares ("Grouped items")
//
// Work items. The rows of one (sequence, KV head) are its Q new tokens times the G = H / KVH query
// heads of the group, token-major (row r = token r / G, head r % G), and an item is up to 64
// consecutive rows: they all read the same K and V rows, so each is loaded once per item (not
// once per query head), and the item needs the keys up to its last token's position only. Items
// go to the threads through a shared counter, costliest first, since causal items differ in cost
// by up to the prompt length: two threads stay busy even for one short sequence.
//
// One item, flash-attention style: keys in blocks of 64, an online softmax in float32 per row r
//
//   S[j, r] = scale * q_r . k_j          for the block's keys j; masked where j > position of r
//   m'_r    = max(m_r, max_j S[j, r])     running max; alpha_r = exp(m_r - m'_r)
//   P[j, r] = exp(S[j, r] - m'_r)         (0 where masked)
//   l_r     = l_r * alpha_r + sum_j P[j, r]
//   O[r]    = O[r] * alpha_r + sum_j P[j, r] * v_j
//
// then O[r] / l_r is stored, rounded once to the cache dtype. Scores, softmax and sums are float32,
// so a float32 result is the exact softmax-weighted sum up to float32 rounding (as close to it as
// the float32 reference: both sum in their own orders). A bfloat16 result also rounds P to
// bfloat16 for the P @ V products, as the reference and SDPA do.
//
// AVX-512 (head_dim 16, 32, 64 or 128): scores hold 16 rows per vector. The item's queries are
// packed once, transposed ([D][rows]), and each key row is used element by element as broadcasts
// read straight from the cache, so keys need no packing and the softmax is lane-wise, without
// horizontal sums. P @ V holds 16 columns of O per vector and broadcasts P. Where the compiler
// targets AVX512-BF16, bfloat16 caches use its dot-product instruction for both products (pairs of
// exact products summed into float32: queries and P packed as pairs along the sum, V rows
// interleaved in pairs once per block), so that they run at twice the float32 multiply-add rate;
// without it, K and V rows are widened to float32 once per block.
//
// AVX2 + FMA without AVX-512 (head_dim 16, 32, 64 or 128; AMD Zen 3, Intel Haswell to Comet
// Lake): the float32 steps on 8 lanes ("AVX2 steps"), with the same operations in the same order,
// so that their results are the same bits as the AVX-512 float32 path's and the plain loops'.
// Other head dims and builds without either run the same steps as plain loops (the same bits
// again, but slower than SDPA: the backend asks `prefill_vectorized` first).
//
// A sequence with one new token (a decode) is an item of its G heads alone, too few rows for 16
// lanes: with AVX512-BF16 its keys fill the lanes instead (`attend_token`), in the same arithmetic
// as the rows of a prefill, so that a token's output does not depend on how its step was made up
// (one new token, a whole prompt, a chunk over cached context, other sequences beside it). The
// float32 path does the same (`attend_token_f32`, and `attend_token_avx2` on 8 lanes). The engine
// sends every row here for that reason (`kernels.cpu_attention.one_kernel_for_all_rows`).
//
// Where the build targets AMX, bfloat16 caches with head_dim 32, 64 or 128 run both products on
// tiles instead (see "AMX steps"; the queries and V pairs packed as above): on an Intel Xeon,
// 2.6-3.3x the dot-product path (SmolLM2's 9 query / 3 KV heads of 64: 8 prompts of 256 tokens
// 8.9 -> 3.4 ms per layer, one of 2,048 tokens 62.7 -> 18.9 ms, one of 160 0.47 -> 0.18 ms).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "ops.h"
#include "paging.h"
#include "simd.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <functional>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

// The float32 path on AVX2 + FMA (8 lanes), where the build has no AVX-512: "AVX2 steps"
#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
#define PREFIXGATE_AVX2_F32 1
#else
#define PREFIXGATE_AVX2_F32 0
#endif

#if defined(__AVX512F__) || PREFIXGATE_AVX2_F32
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kRows = 64;  // rows of one item at most (4 vectors of 16); scratch row stride
constexpr int64_t kKeys = 64;  // keys per online-softmax block
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

#if defined(__AVX512F__) || PREFIXGATE_AVX2_F32
constexpr int64_t kPrefetchKeys = 32;  // how far ahead a one-token item's keys are requested

// The K and V rows of keys offs[0 .. count) requested now (rows of row_bytes), so that they arrive
// while the current block runs: the cache's blocks sit anywhere, so no hardware prefetcher
// follows them.
template <typename T>
inline void prefetch_rows(const T* k_head, const T* v_head, const int64_t* offs, int64_t count,
                          int64_t row_bytes) {
  for (int64_t j = 0; j < count; ++j)
    for (int64_t b = 0; b < row_bytes; b += 64) {
      _mm_prefetch(reinterpret_cast<const char*>(k_head + offs[j]) + b, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(v_head + offs[j]) + b, _MM_HINT_T0);
    }
}
#endif

// ---- 2^t, for the softmax ----------------------------------------------------------------------
//
// Scores are kept in base-2 units (the scale is multiplied by log2(e) before the dot products), so
// the softmax's exponentials are 2^t for t <= 0: the approach of exp_shifted in
// decode_attention.cpp without its ln 2 range reduction. 2^t = 2^k * 2^f with k = round(t) and f =
// t - k in [-1/2, 1/2] (exact), 2^f by a degree-5 polynomial with p(0) = 1 fitted to its relative
// error (< 1.6e-7 with float32 multiply-adds, where exp_shifted's degree-6 Taylor polynomial
// reaches 2.2e-7). t is clamped at -126: underflow gives ~1e-38, not 0 (masked scores are zeroed
// separately), and t = -inf (the first block's alpha) gives no NaN. Every build evaluates it with
// the same operations (the multiply-adds fused), so that their results are the same bits.
constexpr double kLog2e = 1.4426950408889634;
constexpr float kExp2Poly[] = {1.321867225e-03f, 9.671698324e-03f, 5.550893024e-02f,
                               2.402223796e-01f, 6.931468844e-01f, 1.f};
constexpr float kRound = 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer

inline float exp2_nonpositive(float t) {
  t = std::max(t, -126.f);
  const float k = (t + kRound) - kRound;
  const float f = t - k;
  float p = kExp2Poly[0];
  for (int i = 1; i < 6; ++i) p = std::fma(p, f, kExp2Poly[i]);
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;  // 2^k, k in [-126, 0]
  float pow2k;
  std::memcpy(&pow2k, &bits, sizeof(float));
  return p * pow2k;
}

// ---- layout, work items and scratch -------------------------------------------------------------

using Layout = PagedLayout;  // paging.h: one query row per new token

// The pointers of one call, typed.
template <typename T>
struct Tensors {
  const T* query;
  const T* cache;
  const void* table;
  T* out;
  float scale;  // the softmax scale times log2(e): scores in base-2 units
};

// A decode (one new token, at position len - 1) of a grouped item.
struct Member {
  int64_t seq, q_start, len;
};

// Rows row0 .. row0 + rows of one (sequence, KV head): row r is new token r / G, head r % G.
// A grouped item (members set, see "Grouped items") holds instead the G heads of `count` decodes
// whose first `shared` keys are the same cache rows: row r is member r / G, head r % G (row0 0;
// seq, q_start, first unused; keys = shared: the keys its rows read together).
struct Item {
  int64_t seq, kvh;
  int64_t q_start;  // the sequence's first query row in the step
  int64_t first;    // position of its first new token (seq_len - q_len)
  int64_t row0, rows;
  int64_t keys;  // keys 0 .. keys - 1 are seen by some row: position of the last row's token + 1
  bool token;    // the sequence has one new token (a decode): all rows are its heads
  const Member* members = nullptr;  // a grouped item's decodes, else nullptr
  int64_t count = 0, shared = 0;    // how many, and their shared keys (a multiple of kKeys)
  int64_t cost = 0;                 // for the schedule: item_cost, group_cost
};

// Item row r's token: its row in the step's query and output, and its position.
struct RowToken {
  int64_t row, pos;
};
inline RowToken row_token(const Layout& lay, const Item& it, int64_t r) {
  const int64_t row = it.row0 + r;
  if (it.members != nullptr) {
    const Member& m = it.members[row / lay.group];
    return {m.q_start, m.len - 1};
  }
  return {it.q_start + row / lay.group, it.first + row / lay.group};
}

// Per-thread scratch for one head dim and contexts of up to max_keys keys (`thread_scratch`).
struct Scratch {
  int64_t head_dim, max_keys;
  std::vector<int64_t> offs;             // [keys] where each key's row starts (K or V, head 0)
  std::vector<int32_t> pos;              // [kRows] position of each row's token
  std::vector<float> q;                  // [D][kRows] scaled queries, transposed (or pairs)
  std::vector<float> s;                  // [kKeys][kRows] a block's scores, then probabilities
  std::vector<float> o;                  // [kRows][D] unnormalized output rows
  std::vector<float> kf, vf;             // [kKeys][D] a block's K / V rows widened to float32
  std::vector<uint32_t> pp, vp;          // [kKeys / 2][kRows], [kKeys / 2][D] bfloat16 pairs
  std::vector<float> m, l, alpha;        // [kRows] running max, running sum, this block's rescale
  std::vector<const void*> krows, vrows;  // [kKeys] the block's K / V rows as the steps read them
  std::vector<uint32_t> pt;               // [kRows][kKeys / 2] bfloat16 pairs of P, row-major (AMX)
  std::vector<c10::BFloat16> kb;          // [16][D] keys copied together (AMX, ragged tiles)
  Scratch(const Layout& lay, int64_t max_keys)
      : head_dim(lay.head_dim),
        max_keys(max_keys),
        offs(max_keys),
        pos(kRows),
        q(lay.head_dim * kRows),
        s(kKeys * kRows),
        o(kRows * lay.head_dim),
        kf(kKeys * lay.head_dim),
        vf(kKeys * lay.head_dim),
        pp(kKeys / 2 * kRows),
        vp(kKeys / 2 * lay.head_dim),
        m(kRows),
        l(kRows),
        alpha(kRows),
        krows(kKeys),
        vrows(kKeys),
        pt(kRows * kKeys / 2),
        kb(16 * lay.head_dim) {}
};

// This thread's scratch number `which` (0, or 1 for a grouped item's members), kept between calls
// (the pool's threads live on): allocating and zeroing ~130 KB per thread and call was a
// measurable part of a decode step's attention. Made again only for another head dim or a longer
// context (then with room to grow). Every step writes what it reads, so nothing depends on what
// an earlier item or call left there.
Scratch& thread_scratch(int which, const Layout& lay, int64_t max_keys) {
  thread_local std::optional<Scratch> kept[2];
  std::optional<Scratch>& w = kept[which];
  if (!w || w->head_dim != lay.head_dim || w->max_keys < max_keys)
    w.emplace(lay, std::max(max_keys, w && w->head_dim == lay.head_dim ? 2 * w->max_keys : 0));
  return *w;
}

// The query row of item row r (r < it.rows).
template <typename T>
const T* query_row(const Layout& lay, const Item& it, const T* query, int64_t r) {
  const int64_t head = (it.row0 + r) % lay.group;
  return query + row_token(lay, it, r).row * lay.q_row + (it.kvh * lay.group + head) * lay.q_head;
}

inline float to_float(float v) { return v; }
inline float to_float(c10::BFloat16 v) { return static_cast<float>(v); }
inline float to_float(c10::Half v) { return static_cast<float>(v); }

// ---- the three steps of a key block as plain loops (any head_dim, any build) --------------------
//
// Rows are the innermost loop where the data allows it, so that the compiler vectorizes them. They
// do the vector paths' arithmetic, operation for operation (fused multiply-adds, the block's sum
// in block_sum_rows's tree), so that every build of the float32 path gives the same bits.

// s[j, r] = sum_d q[d, r] * k_j[d] for the block's n keys and rows 0..R-1 (q holds scaled queries):
// one chain of multiply-adds over d from zero
void scores_portable(const float* q, int64_t D, int64_t R, const void* const* k, int64_t n,
                     float* s) {
  for (int64_t j = 0; j < n; ++j) {
    float* sj = s + j * kRows;
    std::fill(sj, sj + R, 0.f);
    for (int64_t d = 0; d < D; ++d) {
      const float kd = static_cast<const float*>(k[j])[d];
      const float* qd = q + d * kRows;
      for (int64_t r = 0; r < R; ++r) sj[r] = std::fma(qd[r], kd, sj[r]);
    }
  }
}

// The sum of one row's block of probabilities (p[j * kRows]: key j's) in block_sum_rows's order
inline float block_sum_portable(const float* p, int64_t n) {
  float part[16];
  for (int64_t k = 0; k < 16; ++k) {
    part[k] = k < n ? p[k * kRows] : 0.f;
    for (int64_t j = k + 16; j < n; j += 16) part[k] += p[j * kRows];
  }
  for (int half = 8; half >= 1; half /= 2)
    for (int k = 0; k < half; ++k) part[k] += part[k + half];
  return part[0];
}

// scores -> probabilities in place, and the running max / sum and this block's alpha per row
void softmax_portable(float* s, int64_t n, int64_t k0, int64_t R, const int32_t* pos, float* m,
                      float* l, float* alpha) {
  float mx[kRows];
  for (int64_t r = 0; r < R; ++r) mx[r] = m[r];
  for (int64_t j = 0; j < n; ++j)
    for (int64_t r = 0; r < R; ++r)
      if (k0 + j <= pos[r]) mx[r] = std::max(mx[r], s[j * kRows + r]);
  for (int64_t j = 0; j < n; ++j) {
    float* sj = s + j * kRows;
    for (int64_t r = 0; r < R; ++r)
      sj[r] = k0 + j <= pos[r] ? exp2_nonpositive(sj[r] - mx[r]) : 0.f;
  }
  for (int64_t r = 0; r < R; ++r) {
    alpha[r] = exp2_nonpositive(m[r] - mx[r]);
    l[r] = std::fma(l[r], alpha[r], block_sum_portable(s + r, n));
    m[r] = mx[r];
  }
}

// o[r] = o[r] * alpha[r] + sum_j p[j, r] * v_j
void values_portable(const float* p, int64_t n, int64_t R, int64_t D, const void* const* v,
                     const float* alpha, float* o) {
  for (int64_t r = 0; r < R; ++r) {
    float* orow = o + r * D;
    for (int64_t d = 0; d < D; ++d) orow[d] *= alpha[r];
    for (int64_t j = 0; j < n; ++j) {
      const float w = p[j * kRows + r];
      const float* vj = static_cast<const float*>(v[j]);
      for (int64_t d = 0; d < D; ++d) orow[d] = std::fma(w, vj[d], orow[d]);
    }
  }
}

// ---- AVX-512 steps: R = 16 * MV rows, head_dim = 16 * DV ---------------------------------------

#if defined(__AVX512F__)


// exp2_nonpositive on 16 lanes (scalef multiplies by 2^k exactly, as the exponent bits do)
inline __m512 exp2_16(__m512 t) {
  t = _mm512_max_ps(t, _mm512_set1_ps(-126.f));
  const __m512 k = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, k);
  __m512 p = _mm512_set1_ps(kExp2Poly[0]);
  for (int i = 1; i < 6; ++i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2Poly[i]));
  return _mm512_scalef_ps(p, k);
}

// Pins x to a register: GCC would otherwise fold the query loads below into every multiply-add that
// uses them, and a 512-bit load per multiply-add is more than Zen 4's load ports sustain.
inline void in_register(__m512& x) {
#if defined(__GNUC__)
  __asm__("" : "+v"(x));
#else
  (void)x;
#endif
}

// s[j, :] = q^T k_j for KT keys: MV * KT accumulators (at most 24 of the 32 registers), each key
// element broadcast to the 16 rows of a query vector
template <int MV, int KT>
inline void scores_f32(const float* q, int64_t D, const void* const* k, float* s) {
  __m512 acc[KT][MV];
  for (int j = 0; j < KT; ++j)
    for (int v = 0; v < MV; ++v) acc[j][v] = _mm512_setzero_ps();
  int64_t d = 0;
  do {  // D >= 16; a do-while keeps GCC from spilling the accumulators around a zero-trip path
    __m512 qd[MV];
    for (int v = 0; v < MV; ++v) {
      qd[v] = _mm512_loadu_ps(q + d * kRows + 16 * v);
      in_register(qd[v]);
    }
    for (int j = 0; j < KT; ++j) {
      const __m512 kd = _mm512_set1_ps(static_cast<const float*>(k[j])[d]);
      for (int v = 0; v < MV; ++v) acc[j][v] = _mm512_fmadd_ps(qd[v], kd, acc[j][v]);
    }
  } while (++d < D);
  for (int j = 0; j < KT; ++j)
    for (int v = 0; v < MV; ++v) _mm512_storeu_ps(s + j * kRows + 16 * v, acc[j][v]);
}

#if defined(__AVX512BF16__)
// The same for bfloat16 keys and queries: q holds, per row, the pairs (q[2i], q[2i + 1]) as 32
// bits ([D / 2][kRows]); one key pair is broadcast and the instruction adds both exact products
// to float32. The scale is applied to the sums.
template <int MV, int KT>
inline void scores_dpbf16(const float* q, int64_t D, const void* const* k, float scale,
                          float* s) {
  __m512 acc[KT][MV];
  for (int j = 0; j < KT; ++j)
    for (int v = 0; v < MV; ++v) acc[j][v] = _mm512_setzero_ps();
  int64_t i = 0;
  do {  // as in scores_f32
    __m512bh qi[MV];
    for (int v = 0; v < MV; ++v)
      qi[v] = (__m512bh)_mm512_loadu_si512(reinterpret_cast<const void*>(q + i * kRows + 16 * v));
    for (int j = 0; j < KT; ++j) {
      int32_t pair;
      std::memcpy(&pair, static_cast<const c10::BFloat16*>(k[j]) + 2 * i, sizeof(pair));
      const __m512bh ki = (__m512bh)_mm512_set1_epi32(pair);
      for (int v = 0; v < MV; ++v) acc[j][v] = _mm512_dpbf16_ps(acc[j][v], qi[v], ki);
    }
  } while (++i < D / 2);
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int j = 0; j < KT; ++j)
    for (int v = 0; v < MV; ++v)
      _mm512_storeu_ps(s + j * kRows + 16 * v, _mm512_mul_ps(acc[j][v], vscale));
}

// P @ V for bfloat16 caches with the same instruction, which takes pairs along the sum (keys):
// P is rounded to bfloat16 (as the reference and SDPA round their probabilities), the sums stay
// in float32. pp[i, r] = (P[2i, r], P[2i + 1, r]) for the n keys (P[n] = 0 when n is odd).
template <int MV>
inline void pack_probs(const float* s, int64_t n, uint32_t* pp) {
  // cvtne2ps gives [even 0..15 | odd 0..15] as bfloat16: interleave them into 16 pairs
  alignas(64) static constexpr int16_t kInterleave[32] = {
      0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
      8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i idx = _mm512_load_si512(kInterleave);
  for (int64_t i = 0; 2 * i < n; ++i)
    for (int v = 0; v < MV; ++v) {
      const float* even = s + 2 * i * kRows + 16 * v;
      const __m512 odd = 2 * i + 1 < n ? _mm512_loadu_ps(even + kRows) : _mm512_setzero_ps();
      const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(odd, _mm512_loadu_ps(even));
      _mm512_storeu_si512(pp + i * kRows + 16 * v, _mm512_permutexvar_epi16(idx, both));
    }
}

// Columns 16c .. 16c + 15 of two V rows a, b (b null: zeros) as 16 pairs (a[d], b[d])
inline __m512i value_pairs(const c10::BFloat16* a, const c10::BFloat16* b, int c) {
  // element k < 16 of the result pair (a[k / 2], b[k / 2]) for the low 8, likewise for the rest
  alignas(64) static constexpr int16_t kPairs[32] = {
      0, 32, 1, 33, 2,  34, 3,  35, 4,  36, 5,  37, 6,  38, 7,  39,
      8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  const __m256i ac = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + 16 * c));
  const __m256i bc = b != nullptr
                         ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 16 * c))
                         : _mm256_setzero_si256();
  return _mm512_permutex2var_epi16(_mm512_castsi256_si512(ac), _mm512_load_si512(kPairs),
                                   _mm512_castsi256_si512(bc));
}

// vp[i, d] = (V[2i, d], V[2i + 1, d]) for the n keys (V[n] = 0 when n is odd: 0 * NaN would be
// NaN, whatever the unused half of a block holds)
template <int DV>
inline void pack_values(const c10::BFloat16* head, const int64_t* offs, int64_t n, uint32_t* vp) {
  for (int64_t i = 0; 2 * i < n; ++i) {
    const c10::BFloat16* a = head + offs[2 * i];
    const c10::BFloat16* b = 2 * i + 1 < n ? head + offs[2 * i + 1] : nullptr;
    for (int c = 0; c < DV; ++c)
      _mm512_storeu_si512(vp + i * 16 * DV + 16 * c, value_pairs(a, b, c));
  }
}

// values_tile on bfloat16 pairs: o[r] = o[r] * alpha[r] + sum_i pp[i, r] . vp[i], the pairs of P
// at pp[i * pair_stride + r * row_stride]
template <int RT, int DV>
inline void values_tile_dpbf16(const uint32_t* pp, int64_t pair_stride, int64_t row_stride,
                               int64_t pairs, const uint32_t* vp, const float* alpha, float* o) {
  constexpr int D = 16 * DV;
  __m512 acc[RT][DV];
  for (int r = 0; r < RT; ++r) {
    const __m512 a = _mm512_set1_ps(alpha[r]);
    for (int c = 0; c < DV; ++c) acc[r][c] = _mm512_mul_ps(_mm512_loadu_ps(o + r * D + 16 * c), a);
  }
  int64_t i = 0;
  do {  // pairs >= 1; as in scores_f32
    __m512bh x[DV];
    for (int c = 0; c < DV; ++c) x[c] = (__m512bh)_mm512_loadu_si512(vp + i * D + 16 * c);
    for (int r = 0; r < RT; ++r) {
      const __m512bh w =
          (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(pp[i * pair_stride + r * row_stride]));
      for (int c = 0; c < DV; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], x[c], w);
    }
  } while (++i < pairs);
  for (int r = 0; r < RT; ++r)
    for (int c = 0; c < DV; ++c) _mm512_storeu_ps(o + r * D + 16 * c, acc[r][c]);
}
#endif

// The sum of a block's probabilities in the one order that both layouts can follow (rows in the
// lanes here, keys in the lanes in token_block): 16 partial sums part[k] = P[k] + P[16 + k] +
// P[32 + k] + P[48 + k], left to right (keys past n left out: they are 0 in the other layout,
// and adding +0 to a sum of non-negative numbers changes nothing), then the halves added:
// part[k] + part[k + 8], then k + 4, k + 2, k + 1. For 16 rows: p[j * kRows] holds key j's.
inline __m512 block_sum_rows(const float* p, int64_t n) {
  __m512 part[16];
  for (int64_t k = 0; k < 16; ++k) {
    part[k] = k < n ? _mm512_loadu_ps(p + k * kRows) : _mm512_setzero_ps();
    for (int64_t j = k + 16; j < n; j += 16)
      part[k] = _mm512_add_ps(part[k], _mm512_loadu_ps(p + j * kRows));
  }
  for (int half = 8; half >= 1; half /= 2)
    for (int k = 0; k < half; ++k) part[k] = _mm512_add_ps(part[k], part[k + half]);
  return part[0];
}

// The same sum for one row whose 64 keys are in the lanes of p[0..3] (keys past n zero).
inline float block_sum_lanes(const __m512 p[4]) {
  __m512 part = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(p[0], p[1]), p[2]), p[3]);
  part = _mm512_add_ps(part, _mm512_shuffle_f32x4(part, part, 0xEE));  // lane k += lane k + 8
  part = _mm512_add_ps(part, _mm512_shuffle_f32x4(part, part, 0x01));  // k += k + 4
  part = _mm512_add_ps(part, _mm512_permute_ps(part, 0x0E));            // k += k + 2
  part = _mm512_add_ps(part, _mm512_permute_ps(part, 0x01));            // k += k + 1
  return _mm512_cvtss_f32(part);
}

// softmax_portable on 16 rows per vector; masked: some key of the block is after some row's token
template <int MV>
void softmax_avx512(float* s, int64_t n, int64_t k0, bool masked, const int32_t* pos, float* m,
                    float* l, float* alpha) {
  for (int v = 0; v < MV; ++v) {
    const __m512i pv = _mm512_loadu_si512(pos + 16 * v);
    auto visible = [&](int64_t j) -> __mmask16 {
      if (!masked) return 0xFFFF;
      return _mm512_cmple_epi32_mask(_mm512_set1_epi32(static_cast<int32_t>(k0 + j)), pv);
    };
    const __m512 old = _mm512_loadu_ps(m + 16 * v);
    __m512 mx = old;
    for (int64_t j = 0; j < n; ++j)
      mx = _mm512_mask_max_ps(mx, visible(j), mx, _mm512_loadu_ps(s + j * kRows + 16 * v));
    for (int64_t j = 0; j < n; ++j) {
      float* sj = s + j * kRows + 16 * v;
      __m512 p = exp2_16(_mm512_sub_ps(_mm512_loadu_ps(sj), mx));
      p = _mm512_maskz_mov_ps(visible(j), p);
      _mm512_storeu_ps(sj, p);
    }
    const __m512 sum = block_sum_rows(s + 16 * v, n);
    const __m512 a = exp2_16(_mm512_sub_ps(old, mx));
    _mm512_storeu_ps(alpha + 16 * v, a);
    _mm512_storeu_ps(l + 16 * v, _mm512_fmadd_ps(_mm512_loadu_ps(l + 16 * v), a, sum));
    _mm512_storeu_ps(m + 16 * v, mx);
  }
}

// o[r] = o[r] * alpha[r] + sum_j p[j, r] * v_j for RT rows: RT * DV accumulators, each V row
// loaded once for the RT rows
template <int RT, int DV>
inline void values_tile(const float* p, int64_t n, const void* const* v, const float* alpha,
                        float* o) {
  constexpr int D = 16 * DV;
  __m512 acc[RT][DV];
  for (int r = 0; r < RT; ++r) {
    const __m512 a = _mm512_set1_ps(alpha[r]);
    for (int c = 0; c < DV; ++c) acc[r][c] = _mm512_mul_ps(_mm512_loadu_ps(o + r * D + 16 * c), a);
  }
  int64_t j = 0;
  do {  // n >= 1; as in scores_f32
    const float* vj = static_cast<const float*>(v[j]);
    __m512 x[DV];
    for (int c = 0; c < DV; ++c) x[c] = _mm512_loadu_ps(vj + 16 * c);
    for (int r = 0; r < RT; ++r) {
      const __m512 w = _mm512_set1_ps(p[j * kRows + r]);
      for (int c = 0; c < DV; ++c) acc[r][c] = _mm512_fmadd_ps(w, x[c], acc[r][c]);
    }
  } while (++j < n);
  for (int r = 0; r < RT; ++r)
    for (int c = 0; c < DV; ++c) _mm512_storeu_ps(o + r * D + 16 * c, acc[r][c]);
}

// r[i] = row i of a 16 x 16 matrix -> r[j] = its column j (64 shuffles instead of 256 scalar
// moves: packing an item's queries costs next to nothing even for short prompts)
inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {  // in each 128-bit lane, rows 2i and 2i + 1 interleaved
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // now lane l of r[4i + k] = rows 4i..4i+3 of column 4l + k
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 2]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 1]), d = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
  }
  for (int k = 0; k < 4; ++k) {  // column 4l + k = lanes l of r[k], r[4 + k], r[8 + k], r[12 + k]
    const __m512 a = _mm512_shuffle_f32x4(r[k], r[4 + k], 0x88);  // lanes 0, 2 of each
    const __m512 b = _mm512_shuffle_f32x4(r[k], r[4 + k], 0xDD);  // lanes 1, 3 of each
    const __m512 c = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0x88);
    const __m512 d = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0xDD);
    t[k] = _mm512_shuffle_f32x4(a, c, 0x88);
    t[8 + k] = _mm512_shuffle_f32x4(a, c, 0xDD);
    t[4 + k] = _mm512_shuffle_f32x4(b, d, 0x88);
    t[12 + k] = _mm512_shuffle_f32x4(b, d, 0xDD);
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}

// 16 accumulators whatever the head dim
template <int DV>
constexpr int kValueRows = DV == 1 ? 16 : DV == 2 ? 8 : DV == 4 ? 4 : 2;
// MV * KT = 16 or 24 accumulators, KT dividing kKeys
template <int MV>
constexpr int kScoreKeys = MV == 1 ? 16 : MV == 2 ? 8 : MV == 3 ? 8 : 4;

// The chains of a token's scores (token_scores, token_block_f32) for RH heads and NQ groups of 16
// keys at once, from kt ([len][kKeys]: step i of key j at kt[i * kKeys + j]): RH * NQ independent
// accumulators, each the chain over the steps from zero that the rows' steps run for that head and
// key (one chain at a time would wait on the multiply-add's latency at every step). kBf16: steps
// are dim pairs, q the heads' bfloat16 pairs, scores_dpbf16's dot products, then times the
// scale; else steps are dims, q the heads' scaled float32 queries, scores_f32's multiply-adds.
template <bool kBf16, int NQ, int RH>
inline void token_chains(const void* q, int64_t len, const float* kt, float scale, float* s) {
#if !defined(__AVX512BF16__)
  static_assert(!kBf16, "bfloat16 pairs need the AVX512-BF16 dot product");
#endif
  __m512 acc[RH][NQ];
  for (int r = 0; r < RH; ++r)
    for (int g = 0; g < NQ; ++g) acc[r][g] = _mm512_setzero_ps();
  for (int64_t i = 0; i < len; ++i) {
    __m512 x[NQ];
    for (int g = 0; g < NQ; ++g) x[g] = _mm512_loadu_ps(kt + i * kKeys + 16 * g);
    for (int r = 0; r < RH; ++r) {
#if defined(__AVX512BF16__)
      if constexpr (kBf16) {
        const int32_t pair = static_cast<const int32_t*>(q)[r * len + i];
        const __m512bh w = (__m512bh)_mm512_set1_epi32(pair);
        for (int g = 0; g < NQ; ++g) acc[r][g] = _mm512_dpbf16_ps(acc[r][g], (__m512bh)x[g], w);
        continue;
      }
#endif
      const __m512 w = _mm512_set1_ps(static_cast<const float*>(q)[r * len + i]);
      for (int g = 0; g < NQ; ++g) acc[r][g] = _mm512_fmadd_ps(w, x[g], acc[r][g]);
    }
  }
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int r = 0; r < RH; ++r)
    for (int g = 0; g < NQ; ++g) {
      const __m512 v = kBf16 ? _mm512_mul_ps(acc[r][g], vscale) : acc[r][g];
      _mm512_storeu_ps(s + r * kKeys + 16 * g, v);
    }
}

// token_chains for the rows' heads, four at a time (q: len steps of 4 bytes per head: a pair, or a
// float), over NQ groups of 16 keys
template <bool kBf16, int NQ>
void token_heads(const void* q, int64_t rows, int64_t len, const float* kt, float scale,
                 float* s) {
  for (int64_t g0 = 0; g0 < rows; g0 += 4) {
    const void* qg = static_cast<const float*>(q) + g0 * len;
    float* sg = s + g0 * kKeys;
    switch (std::min<int64_t>(4, rows - g0)) {
      case 1: token_chains<kBf16, NQ, 1>(qg, len, kt, scale, sg); break;
      case 2: token_chains<kBf16, NQ, 2>(qg, len, kt, scale, sg); break;
      case 3: token_chains<kBf16, NQ, 3>(qg, len, kt, scale, sg); break;
      default: token_chains<kBf16, NQ, 4>(qg, len, kt, scale, sg); break;
    }
  }
}

// token_heads over the block's n keys
template <bool kBf16>
void token_heads(const void* q, int64_t rows, int64_t len, int64_t n, const float* kt, float scale,
                 float* s) {
  switch ((n + 15) / 16) {
    case 1: return token_heads<kBf16, 1>(q, rows, len, kt, scale, s);
    case 2: return token_heads<kBf16, 2>(q, rows, len, kt, scale, s);
    case 3: return token_heads<kBf16, 3>(q, rows, len, kt, scale, s);
    default: return token_heads<kBf16, 4>(q, rows, len, kt, scale, s);
  }
}

#if defined(__AVX512BF16__)
// ---- one token's rows with the keys in the lanes (decodes; bfloat16 dot products) ---------------
//
// A token's rows are its G query heads: a decode has too few to fill the 16 lanes of the steps
// above (3 of 16 for SmolLM2). Here the lanes hold 16 keys instead: each 16 keys' rows are
// transposed into vectors of one dim pair, and each head's pair is broadcast. Every score,
// probability and sum is still the same operation in the same order as in the steps above (the
// chain over dim pairs from zero, exp2_16, the block's sum as block_sum_rows adds it, P rounded to
// bfloat16, the chain over key pairs from o * alpha), so a token's output is bit-identical whether
// it is computed here or among the rows of a prefill.

// s[g * kKeys + j] = scale * q_g . k_j for the block's n keys (j < n rounded up to 16; the keys
// past n score 0), q_g = q[g * D / 2 ..] as bfloat16 pairs: each 16 keys' rows transposed into
// kt ([D / 2][kKeys]: dim pair i of key j at kt[i * kKeys + j]), then every head's chains
// (and the K and V rows of the keys kPrefetchKeys on requested, 16 per 16 keys transposed:
// `ahead` keys follow offs[kPrefetchKeys - 1] in the item)
template <int DV>
void token_scores(const uint32_t* q, int64_t rows, const c10::BFloat16* head,
                  const c10::BFloat16* v_head, const int64_t* offs, int64_t n, int64_t ahead,
                  float scale, float* kt, float* s) {
  alignas(64) static constexpr c10::BFloat16 kZeroKey[128] = {};
  constexpr int64_t kPairs = 8 * DV;  // dim pairs
  constexpr int64_t kChunk = kPairs < 16 ? kPairs : 16;
  const __mmask16 mask = static_cast<__mmask16>((1u << kChunk) - 1);
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    if (j0 < ahead)
      prefetch_rows(head, v_head, offs + kPrefetchKeys + j0, std::min<int64_t>(16, ahead - j0),
                    16 * DV * static_cast<int64_t>(sizeof(c10::BFloat16)));
    const c10::BFloat16* keys[16];
    for (int64_t k = 0; k < 16; ++k) keys[k] = j0 + k < n ? head + offs[j0 + k] : kZeroKey;
    for (int64_t c0 = 0; c0 < kPairs; c0 += 16) {
      __m512 x[16];  // x[i] = dim pair c0 + i of the 16 keys
      for (int k = 0; k < 16; ++k)
        x[k] = _mm512_castsi512_ps(_mm512_maskz_loadu_epi32(mask, keys[k] + 2 * c0));
      transpose16(x);
      for (int64_t i = 0; i < kChunk; ++i) _mm512_storeu_ps(kt + (c0 + i) * kKeys + j0, x[i]);
    }
  }
  token_heads<true>(q, rows, kPairs, n, kt, scale, s);
}

// P @ V of a token's R heads (R <= 4) for one key block, as pack_values and values_tile_dpbf16
// compute it (the same pairs, the same chain over key pairs from o * alpha, so the same bits),
// but with each pair of V rows interleaved in registers and used at once by every head: no
// packed copy written and read back, and no padding rows.
template <int R, int DV>
inline void token_values(const c10::BFloat16* v_head, const int64_t* offs, int64_t n, Scratch& w) {
  constexpr int64_t D = 16 * DV, kPairsPerRow = kKeys / 2;
  const uint32_t* pt = w.pt.data();
  float* o = w.o.data();
  __m512 acc[R][DV];
  for (int r = 0; r < R; ++r) {
    const __m512 a = _mm512_set1_ps(w.alpha[r]);
    for (int c = 0; c < DV; ++c) acc[r][c] = _mm512_mul_ps(_mm512_loadu_ps(o + r * D + 16 * c), a);
  }
  for (int64_t i = 0; 2 * i < n; ++i) {
    const c10::BFloat16* a = v_head + offs[2 * i];
    const c10::BFloat16* b = 2 * i + 1 < n ? v_head + offs[2 * i + 1] : nullptr;
    __m512bh x[DV];
    for (int c = 0; c < DV; ++c) x[c] = (__m512bh)value_pairs(a, b, c);
    for (int r = 0; r < R; ++r) {
      const __m512bh p =
          (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(pt[r * kPairsPerRow + i]));
      for (int c = 0; c < DV; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], x[c], p);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < DV; ++c) _mm512_storeu_ps(o + r * D + 16 * c, acc[r][c]);
}

// A key block of one token: the online softmax of key_block per head, then P @ V as the
// dot-product path does it (pack_values, values_tile_dpbf16 on pairs of P laid out per row).
template <int DV>
void token_block(const c10::BFloat16* k_head, const c10::BFloat16* v_head, const int64_t* offs,
                 int64_t n, int64_t ahead, int64_t rows, float scale, Scratch& w) {
  constexpr int64_t D = 16 * DV, kPairsPerRow = kKeys / 2;
  float* s = w.s.data();
  token_scores<DV>(reinterpret_cast<const uint32_t*>(w.q.data()), rows, k_head, v_head, offs, n,
                   ahead, scale, w.kf.data(), s);
  for (int64_t g = 0; g < rows; ++g) {
    __m512 p[4];
    __mmask16 vis[4];
    __m512 mx = _mm512_set1_ps(w.m[g]);
    for (int q = 0; q < 4; ++q) {
      const int64_t left = n - 16 * q;
      vis[q] = left >= 16 ? 0xFFFF : left <= 0 ? 0 : static_cast<__mmask16>((1u << left) - 1);
      p[q] = _mm512_maskz_loadu_ps(vis[q], s + g * kKeys + 16 * q);
      mx = _mm512_mask_max_ps(mx, vis[q], mx, p[q]);
    }
    const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
    for (int q = 0; q < 4; ++q) p[q] = _mm512_maskz_mov_ps(vis[q], exp2_16(_mm512_sub_ps(p[q], m)));
    const float a = _mm512_cvtss_f32(exp2_16(_mm512_sub_ps(_mm512_set1_ps(w.m[g]), m)));
    w.alpha[g] = a;
    w.l[g] = std::fma(w.l[g], a, block_sum_lanes(p));
    w.m[g] = _mm512_cvtss_f32(m);
    uint32_t* pg = w.pt.data() + g * kPairsPerRow;  // (P[2i], P[2i + 1]) as bfloat16
    for (int q = 0; q < 4; ++q)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(pg + 8 * q), (__m256i)_mm512_cvtneps_pbh(p[q]));
  }
  switch (rows) {  // the usual G of 1-4 heads: V pairs made in registers, each row's own tile
    case 1: return token_values<1, DV>(v_head, offs, n, w);
    case 2: return token_values<2, DV>(v_head, offs, n, w);
    case 3: return token_values<3, DV>(v_head, offs, n, w);
    case 4: return token_values<4, DV>(v_head, offs, n, w);
    default: break;
  }
  pack_values<DV>(v_head, offs, n, w.vp.data());
  constexpr int RT = kValueRows<DV>;
  for (int64_t r = 0; r < rows; r += RT)
    values_tile_dpbf16<RT, DV>(w.pt.data() + r * kPairsPerRow, 1, kPairsPerRow, (n + 1) / 2,
                               w.vp.data(), w.alpha.data() + r, w.o.data() + r * D);
}
#endif
#endif

// ---- AVX2 steps: the float32 path on 8 lanes, R = 16 * MV rows, head_dim = 16 * DV -------------
//
// For CPUs without AVX-512 (AMD Zen 3, Intel Haswell to Comet Lake): float32 caches, and
// bfloat16 ones widened to float32 once per key block, as on AVX-512 without BF16. Every step is
// the AVX-512 float32 path's (and the plain loops') arithmetic, operation for operation, on 8
// lanes instead of 16: the chain of multiply-adds over dims from zero with the scaled query,
// exp2_8 (exp2_16's operations), the block's sum in block_sum_rows's tree (its 16 partial sums in
// two vectors where keys fill the lanes), P @ V from o * alpha in key order. So this build's
// outputs are the same bits as the plain loops' and the AVX-512 float32 path's, and a token's
// output is the same whether its heads fill the lanes (a prefill's rows) or its keys do (a
// decode: attend_token_avx2).

#if PREFIXGATE_AVX2_F32

// exp2_nonpositive on 8 lanes. The product p * 2^k is the last operation, rounded once (to a
// denormal for k = -126 and p < 1), as p * pow2k and scalef do; the empty asm keeps GCC from
// fusing it into a multiply-add with a sum of probabilities (an intrinsic's multiply is a plain
// `*` to it).
inline __m256 exp2_8(__m256 t) {
  t = _mm256_max_ps(t, _mm256_set1_ps(-126.f));
  const __m256 k = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(t, k);
  __m256 p = _mm256_set1_ps(kExp2Poly[0]);
  for (int i = 1; i < 6; ++i) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2Poly[i]));
  const __m256i e = _mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127));
  __m256 r = _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(e, 23)));
#if defined(__GNUC__)
  __asm__("" : "+x"(r));
#endif
  return r;
}

// s[j, r0 + i] = q^T k_j for 4 keys and 16 rows (two vectors): 8 accumulators of 16 registers
inline void scores_avx2(const float* q, int64_t D, const void* const* k, float* s) {
  __m256 acc[4][2];
  for (int j = 0; j < 4; ++j) acc[j][0] = acc[j][1] = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; ++d) {
    const __m256 q0 = _mm256_loadu_ps(q + d * kRows), q1 = _mm256_loadu_ps(q + d * kRows + 8);
    for (int j = 0; j < 4; ++j) {
      const __m256 kd = _mm256_broadcast_ss(static_cast<const float*>(k[j]) + d);
      acc[j][0] = _mm256_fmadd_ps(q0, kd, acc[j][0]);
      acc[j][1] = _mm256_fmadd_ps(q1, kd, acc[j][1]);
    }
  }
  for (int j = 0; j < 4; ++j) {
    _mm256_storeu_ps(s + j * kRows, acc[j][0]);
    _mm256_storeu_ps(s + j * kRows + 8, acc[j][1]);
  }
}

// block_sum_rows for 8 rows
inline __m256 block_sum_rows8(const float* p, int64_t n) {
  __m256 part[16];
  for (int64_t k = 0; k < 16; ++k) {
    part[k] = k < n ? _mm256_loadu_ps(p + k * kRows) : _mm256_setzero_ps();
    for (int64_t j = k + 16; j < n; j += 16)
      part[k] = _mm256_add_ps(part[k], _mm256_loadu_ps(p + j * kRows));
  }
  for (int half = 8; half >= 1; half /= 2)
    for (int k = 0; k < half; ++k) part[k] = _mm256_add_ps(part[k], part[k + half]);
  return part[0];
}

// block_sum_lanes for one row whose 64 keys are in the lanes of p[0..7] (keys past n zero): the
// partial sums of keys 0..7 (keys k, 16 + k, 32 + k, 48 + k: p[0], p[2], p[4], p[6]) and of keys
// 8..15 (p[1], p[3], p[5], p[7]) in two vectors, then the halves as block_sum_rows adds them
inline float block_sum_lanes8(const __m256 p[8]) {
  const __m256 lo = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(p[0], p[2]), p[4]), p[6]);
  const __m256 hi = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(p[1], p[3]), p[5]), p[7]);
  __m256 part = _mm256_add_ps(lo, hi);                                  // k += k + 8
  part = _mm256_add_ps(part, _mm256_permute2f128_ps(part, part, 0x01));  // k += k + 4
  part = _mm256_add_ps(part, _mm256_permute_ps(part, 0x0E));            // k += k + 2
  part = _mm256_add_ps(part, _mm256_permute_ps(part, 0x01));            // k += k + 1
  return _mm256_cvtss_f32(part);
}

// softmax_avx512 on 8 rows per vector
template <int MV>
void softmax_avx2(float* s, int64_t n, int64_t k0, bool masked, const int32_t* pos, float* m,
                  float* l, float* alpha) {
  for (int v = 0; v < 2 * MV; ++v) {
    const __m256i pv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pos + 8 * v));
    auto visible = [&](int64_t j) -> __m256 {  // all ones where key k0 + j <= pos
      if (!masked) return _mm256_castsi256_ps(_mm256_set1_epi32(-1));
      const __m256i last = _mm256_set1_epi32(static_cast<int32_t>(k0 + j - 1));
      return _mm256_castsi256_ps(_mm256_cmpgt_epi32(pv, last));
    };
    const __m256 old = _mm256_loadu_ps(m + 8 * v);
    __m256 mx = old;
    for (int64_t j = 0; j < n; ++j) {
      const __m256 sj = _mm256_loadu_ps(s + j * kRows + 8 * v);
      mx = _mm256_blendv_ps(mx, _mm256_max_ps(mx, sj), visible(j));
    }
    for (int64_t j = 0; j < n; ++j) {
      float* sj = s + j * kRows + 8 * v;
      const __m256 p = exp2_8(_mm256_sub_ps(_mm256_loadu_ps(sj), mx));
      _mm256_storeu_ps(sj, _mm256_and_ps(p, visible(j)));
    }
    const __m256 sum = block_sum_rows8(s + 8 * v, n);
    const __m256 a = exp2_8(_mm256_sub_ps(old, mx));
    _mm256_storeu_ps(alpha + 8 * v, a);
    _mm256_storeu_ps(l + 8 * v, _mm256_fmadd_ps(_mm256_loadu_ps(l + 8 * v), a, sum));
    _mm256_storeu_ps(m + 8 * v, mx);
  }
}

// o[r] = o[r] * alpha[r] + sum_j p[j, r] * v_j for RT rows from r0, in tiles of 16 dims (2 * RT
// accumulators), each V row's 16 dims loaded once per tile
template <int RT>
inline void values_tile_avx2(const float* p, int64_t n, int64_t r0, int64_t D,
                             const void* const* v, const float* alpha, float* o) {
  for (int64_t c = 0; c < D; c += 16) {
    __m256 acc[RT][2];
    for (int r = 0; r < RT; ++r) {
      const __m256 a = _mm256_set1_ps(alpha[r0 + r]);
      const float* orow = o + (r0 + r) * D + c;
      acc[r][0] = _mm256_mul_ps(_mm256_loadu_ps(orow), a);
      acc[r][1] = _mm256_mul_ps(_mm256_loadu_ps(orow + 8), a);
    }
    for (int64_t j = 0; j < n; ++j) {
      const float* vj = static_cast<const float*>(v[j]) + c;
      const __m256 x0 = _mm256_loadu_ps(vj), x1 = _mm256_loadu_ps(vj + 8);
      for (int r = 0; r < RT; ++r) {
        const __m256 w = _mm256_broadcast_ss(p + j * kRows + r0 + r);
        acc[r][0] = _mm256_fmadd_ps(w, x0, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(w, x1, acc[r][1]);
      }
    }
    for (int r = 0; r < RT; ++r) {
      float* orow = o + (r0 + r) * D + c;
      _mm256_storeu_ps(orow, acc[r][0]);
      _mm256_storeu_ps(orow + 8, acc[r][1]);
    }
  }
}

// values_tile_avx2 for rows 0 .. R - 1: tiles of 4 rows, then of the 1-3 left
inline void values_avx2(const float* p, int64_t n, int64_t R, int64_t D, const void* const* v,
                        const float* alpha, float* o) {
  int64_t r0 = 0;
  for (; r0 + 4 <= R; r0 += 4) values_tile_avx2<4>(p, n, r0, D, v, alpha, o);
  switch (R - r0) {
    case 3: return values_tile_avx2<3>(p, n, r0, D, v, alpha, o);
    case 2: return values_tile_avx2<2>(p, n, r0, D, v, alpha, o);
    case 1: return values_tile_avx2<1>(p, n, r0, D, v, alpha, o);
    default: return;
  }
}

// r[i] = row i of an 8 x 8 matrix -> r[j] = its column j
inline void transpose8(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 4; ++i) {  // in each 128-bit half, rows 2i and 2i + 1 interleaved
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {  // u[4i + c]: rows 4i..4i+3 of columns c (low half), c + 4 (high)
    u[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int c = 0; c < 4; ++c) {
    r[c] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x20);
    r[c + 4] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x31);
  }
}

#endif

// ---- AMX steps (bfloat16, head_dim = 32, 64 or 128) ---------------------------------------------
//
// Both products of a key block on tiles (tmm0..3: A and B operands, tmm4..7: C), with the
// softmax between them as above:
//   scores  C = K . q^T for 16 keys x 16 rows: A = 16 key rows x 32 dims read in place from the
//           cache when blocks hold a multiple of 16 keys (else, and for a block's last few keys,
//           copied together first),
//           B = the queries' dim pairs as packed for the dot-product path ([D / 2][kRows]), C
//           stored straight into s[key, row];
//   values  C = O rows (16 rows x 16 dims, loaded from o, accumulated, stored back): A = P as
//           bfloat16 pairs row-major (`pack_probs_rows`), B = V pairs as `pack_values` packs them.
// Same roundings as the dot-product path (bfloat16 P, float32 sums), in another summation order;
// tiles flush float32 denormals. The caller configures the thread's tiles (amx_configure).

#if PREFIXGATE_AMX_BF16

template <int MV>
void scores_amx(const uint32_t* q, int64_t D, const c10::BFloat16* head, const int64_t* offs,
                int64_t n, int64_t token_stride, bool whole_tiles, float scale, c10::BFloat16* kb,
                float* s) {
  constexpr int64_t kStride = kRows * 4;  // bytes between rows of q pairs and of s
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    const int64_t m = std::min<int64_t>(16, n - j0);
    const c10::BFloat16* keys = head + offs[j0];
    int64_t stride = token_stride * 2;
    if (m < 16 || !whole_tiles) {
      for (int64_t j = 0; j < 16; ++j) {
        if (j < m)
          std::memcpy(kb + j * D, head + offs[j0 + j], D * sizeof(c10::BFloat16));
        else
          std::memset(static_cast<void*>(kb + j * D), 0, D * sizeof(c10::BFloat16));
      }
      keys = kb;
      stride = D * 2;
    }
    _tile_zero(4);
    if constexpr (MV > 1) _tile_zero(5);
    if constexpr (MV > 2) _tile_zero(6);
    if constexpr (MV > 3) _tile_zero(7);
    for (int64_t c = 0; c < D / 32; ++c) {
      const uint32_t* qc = q + 16 * c * kRows;  // dim pairs 16c .. 16c + 15
      _tile_loadd(0, keys + 32 * c, stride);
      _tile_loadd(1, qc, kStride);
      _tile_dpbf16ps(4, 0, 1);
      if constexpr (MV > 1) {
        _tile_loadd(2, qc + 16, kStride);
        _tile_dpbf16ps(5, 0, 2);
      }
      if constexpr (MV > 2) {
        _tile_loadd(3, qc + 32, kStride);
        _tile_dpbf16ps(6, 0, 3);
      }
      if constexpr (MV > 3) {
        _tile_loadd(1, qc + 48, kStride);
        _tile_dpbf16ps(7, 0, 1);
      }
    }
    float* sj = s + j0 * kRows;
    _tile_stored(4, sj, kStride);
    if constexpr (MV > 1) _tile_stored(5, sj + 16, kStride);
    if constexpr (MV > 2) _tile_stored(6, sj + 32, kStride);
    if constexpr (MV > 3) _tile_stored(7, sj + 48, kStride);
    for (int64_t j = 0; j < m; ++j)
      for (int v = 0; v < MV; ++v) {
        float* p = sj + j * kRows + 16 * v;
        _mm512_storeu_ps(p, _mm512_mul_ps(_mm512_loadu_ps(p), vscale));
      }
  }
}

// pt[r, i] = (P[2i, r], P[2i + 1, r]) as bfloat16 for the rows and the key pairs of the block's
// 16-pair chunks (zero past the n keys): pack_probs's pairs, transposed 16 x 16 at a time
template <int MV>
void pack_probs_rows(const float* s, int64_t n, uint32_t* pt) {
  alignas(64) static constexpr int16_t kInterleave[32] = {
      0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
      8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i idx = _mm512_load_si512(kInterleave);
  constexpr int64_t kPairs = kKeys / 2;
  for (int64_t i0 = 0; 2 * i0 < n; i0 += 16)
    for (int v = 0; v < MV; ++v) {
      __m512 x[16];
      for (int64_t i = 0; i < 16; ++i) {
        const int64_t k = 2 * (i0 + i);
        const float* even = s + k * kRows + 16 * v;
        const __m512 e = k < n ? _mm512_loadu_ps(even) : _mm512_setzero_ps();
        const __m512 o = k + 1 < n ? _mm512_loadu_ps(even + kRows) : _mm512_setzero_ps();
        x[i] = _mm512_castsi512_ps(
            _mm512_permutexvar_epi16(idx, (__m512i)_mm512_cvtne2ps_pbh(o, e)));
      }
      transpose16(x);  // x[r] = row 16v + r's 16 pairs
      for (int r = 0; r < 16; ++r)
        _mm512_storeu_ps(reinterpret_cast<float*>(pt + (16 * v + r) * kPairs + i0), x[r]);
    }
}

// One O tile: C tile C (loaded from o, stored back) += A . B over the block's key pairs, with
// A = tmm0 (pairs 0..15) and tmm1 (16..31, when the block has more than 32 keys) and B = tile B
// from b0 / b1. A macro: GCC's tile intrinsics take literal tile numbers.
#define PREFIXGATE_VALUES_TILE(C, B, out, b0, b1)  \
  do {                                              \
    _tile_loadd(C, out, vstride);                   \
    _tile_loadd(B, b0, vstride);                    \
    _tile_dpbf16ps(C, 0, B);                        \
    if (two) {                                      \
      _tile_loadd(B, b1, vstride);                  \
      _tile_dpbf16ps(C, 1, B);                      \
    }                                               \
    _tile_stored(C, out, vstride);                  \
  } while (0)

// o[r] = o[r] * alpha[r] + sum_i pt[r, i] . vp[i] for R = 16 * MV rows, head_dim 16 * DV
template <int MV, int DV>
void values_amx(const uint32_t* pt, int64_t n, uint32_t* vp, const float* alpha, float* o) {
  constexpr int64_t D = 16 * DV, kPairs = kKeys / 2, kTiles = DV < 4 ? DV : 4;
  for (int64_t r = 0; r < 16 * MV; ++r) {
    const __m512 a = _mm512_set1_ps(alpha[r]);
    for (int64_t d = 0; d < D; d += 16)
      _mm512_storeu_ps(o + r * D + d, _mm512_mul_ps(_mm512_loadu_ps(o + r * D + d), a));
  }
  const bool two = n > 32;
  // pairs past the keys: zero, so that 0 * (a stale pair) cannot be NaN
  for (int64_t i = (n + 1) / 2; i < (two ? 32 : 16); ++i)
    std::memset(static_cast<void*>(vp + i * D), 0, D * sizeof(uint32_t));
  const int64_t vstride = D * 4;
  for (int rt = 0; rt < MV; ++rt) {
    _tile_loadd(0, pt + 16 * rt * kPairs, kPairs * 4);
    if (two) _tile_loadd(1, pt + 16 * rt * kPairs + 16, kPairs * 4);
    for (int64_t d0 = 0; d0 < D; d0 += 64) {
      float* orow = o + 16 * rt * D + d0;
      const uint32_t* v0 = vp + d0;
      const uint32_t* v1 = vp + 16 * D + d0;
      PREFIXGATE_VALUES_TILE(4, 2, orow, v0, v1);
      if constexpr (kTiles > 1) PREFIXGATE_VALUES_TILE(5, 3, orow + 16, v0 + 16, v1 + 16);
      if constexpr (kTiles > 2) {
        PREFIXGATE_VALUES_TILE(6, 2, orow + 32, v0 + 32, v1 + 32);
        PREFIXGATE_VALUES_TILE(7, 3, orow + 48, v0 + 48, v1 + 48);
      }
    }
  }
}
#undef PREFIXGATE_VALUES_TILE
#endif

// ---- one work item ------------------------------------------------------------------------------

// How a build runs the item's steps: plain loops, float32 on AVX-512 or AVX2 (float32 caches, and
// bfloat16 ones widened), AVX-512 with bfloat16 dot products, or those with both products on AMX
// tiles.
enum class Path { kPortable, kF32, kDpbf16, kAmx };

#if defined(__AVX512F__)
// pack_queries (below) for R = 16 * MV rows, 16 rows at a time through transpose16
template <typename T, Path P>
void pack_queries_avx512(const Layout& lay, const Item& it, const Tensors<T>& in, int64_t R,
                         Scratch& w) {
  alignas(64) static constexpr float kZeroRow[128] = {};  // rows past it.rows: zero queries
  const int64_t D = lay.head_dim;
  const __m512 scale = _mm512_set1_ps(in.scale);
  for (int64_t r0 = 0; r0 < R; r0 += 16) {
    const T* rows[16];
    for (int k = 0; k < 16; ++k)
      rows[k] = r0 + k < it.rows ? query_row(lay, it, in.query, r0 + k)
                                 : reinterpret_cast<const T*>(kZeroRow);
    __m512 x[16];
    if constexpr (P == Path::kDpbf16 || P == Path::kAmx) {  // 32-bit pairs, 16 per row and vector
      const int64_t pairs = std::min<int64_t>(16, D / 2);
      const __mmask16 mask = static_cast<__mmask16>((1u << pairs) - 1);
      for (int64_t i0 = 0; i0 < D / 2; i0 += 16) {
        for (int k = 0; k < 16; ++k)
          x[k] = _mm512_castsi512_ps(_mm512_maskz_loadu_epi32(mask, rows[k] + 2 * i0));
        transpose16(x);
        for (int64_t i = 0; i < pairs; ++i) _mm512_storeu_ps(&w.q[(i0 + i) * kRows + r0], x[i]);
      }
    } else {
      for (int64_t d0 = 0; d0 < D; d0 += 16) {
        for (int k = 0; k < 16; ++k) x[k] = _mm512_mul_ps(load16(rows[k] + d0), scale);
        transpose16(x);
        for (int i = 0; i < 16; ++i) _mm512_storeu_ps(&w.q[(d0 + i) * kRows + r0], x[i]);
      }
    }
  }
}
#endif

// pos[r] for the R computed rows (rows past it.rows repeat the last one) and the packed queries:
// q[d, r] = scale * query (float32), or q[i, r] = the pair (query[2i], query[2i + 1]) (kDpbf16);
// R = it.rows on the portable path.
template <typename T, Path P>
void pack_queries(const Layout& lay, const Item& it, const Tensors<T>& in, int64_t R,
                  Scratch& w) {
  for (int64_t r = 0; r < R; ++r)
    w.pos[r] = static_cast<int32_t>(row_token(lay, it, std::min(r, it.rows - 1)).pos);
#if defined(__AVX512F__)
  if constexpr (P != Path::kPortable) return pack_queries_avx512<T, P>(lay, it, in, R, w);
#endif
  for (int64_t r = 0; r < R; ++r) {
    if (r >= it.rows) {  // rows past the item's (AVX2): zero queries
      for (int64_t d = 0; d < lay.head_dim; ++d) w.q[d * kRows + r] = 0.f;
      continue;
    }
    const T* src = query_row(lay, it, in.query, r);
    for (int64_t d = 0; d < lay.head_dim; ++d) w.q[d * kRows + r] = to_float(src[d]) * in.scale;
  }
}

// rows[j] = the block's key/value row j as the steps read it: in the cache (float32, or bfloat16
// pairs), else widened into buf. Rows j in [n, KT-padded n) repeat row 0: they are scored (and
// then masked, being past every row's position) but never summed.
template <typename T, bool kWiden>
void block_rows(const T* head, const int64_t* offs, int64_t n, int64_t padded, int64_t D,
                float* buf, const void** rows) {
  for (int64_t j = 0; j < padded; ++j) {
    const T* src = head + offs[j < n ? j : 0];
    if constexpr (kWiden) {
      float* dst = buf + j * D;
      if (j < n) widen_row(src, dst, D);
      rows[j] = j < n ? dst : buf;
    } else {
      rows[j] = src;
    }
  }
}

template <typename T, Path P, int MV, int DV>
void key_block(const Layout& lay, const Item& it, const Tensors<T>& in, Scratch& w, int64_t k0,
               int64_t n, int64_t R) {
  const int64_t D = lay.head_dim;
  const T* k_head = in.cache + it.kvh * lay.c_head;
  const T* v_head = k_head + lay.c_kv;
  const int64_t* offs = w.offs.data() + k0;
  constexpr bool kWiden = !std::is_same_v<T, float>;
  float* s = w.s.data();
  if constexpr (P == Path::kPortable) {
    block_rows<T, kWiden>(k_head, offs, n, n, D, w.kf.data(), w.krows.data());
    block_rows<T, kWiden>(v_head, offs, n, n, D, w.vf.data(), w.vrows.data());
    scores_portable(w.q.data(), D, R, w.krows.data(), n, s);
    softmax_portable(s, n, k0, R, w.pos.data(), w.m.data(), w.l.data(), w.alpha.data());
    values_portable(s, n, R, D, w.vrows.data(), w.alpha.data(), w.o.data());
  } else {
#if PREFIXGATE_AMX_BF16
    if constexpr (P == Path::kAmx) {
      // the next block's K and V rows, requested now so that they arrive while this one runs
      prefetch_rows(k_head, v_head, offs + n, std::min(kKeys, it.keys - k0 - n),
                    D * static_cast<int64_t>(sizeof(T)));
      const bool masked = k0 + n - 1 > w.pos[0];
      // key blocks start at multiples of 64: with blocks of 16k keys, 16 keys are one block's rows
      scores_amx<MV>(reinterpret_cast<const uint32_t*>(w.q.data()), D, k_head, offs, n,
                     lay.c_token, lay.block_size % 16 == 0, in.scale, w.kb.data(), s);
      softmax_avx512<MV>(s, n, k0, masked, w.pos.data(), w.m.data(), w.l.data(), w.alpha.data());
      pack_probs_rows<MV>(s, n, w.pt.data());
      pack_values<DV>(v_head, offs, n, w.vp.data());
      values_amx<MV, DV>(w.pt.data(), n, w.vp.data(), w.alpha.data(), w.o.data());
      return;
    }
#endif
#if defined(__AVX512F__)
    constexpr int KT = kScoreKeys<MV>;
    const bool masked = k0 + n - 1 > w.pos[0];  // rows are in token order: pos[0] is the least
    const int64_t padded = (n + KT - 1) / KT * KT;
    block_rows<T, kWiden && P == Path::kF32>(k_head, offs, n, padded, D, w.kf.data(),
                                             w.krows.data());
    for (int64_t j = 0; j < padded; j += KT) {
#if defined(__AVX512BF16__)
      if constexpr (P == Path::kDpbf16) {
        scores_dpbf16<MV, KT>(w.q.data(), D, w.krows.data() + j, in.scale, s + j * kRows);
        continue;
      }
#endif
      scores_f32<MV, KT>(w.q.data(), D, w.krows.data() + j, s + j * kRows);
    }
    softmax_avx512<MV>(s, n, k0, masked, w.pos.data(), w.m.data(), w.l.data(), w.alpha.data());
    constexpr int RT = kValueRows<DV>;
#if defined(__AVX512BF16__)
    if constexpr (P == Path::kDpbf16) {
      pack_probs<MV>(s, n, w.pp.data());
      pack_values<DV>(v_head, offs, n, w.vp.data());
      for (int64_t r = 0; r < R; r += RT)
        values_tile_dpbf16<RT, DV>(w.pp.data() + r, kRows, 1, (n + 1) / 2, w.vp.data(),
                                   w.alpha.data() + r, w.o.data() + r * D);
      return;
    }
#endif
    block_rows<T, kWiden>(v_head, offs, n, n, D, w.vf.data(), w.vrows.data());
    for (int64_t r = 0; r < R; r += RT)
      values_tile<RT, DV>(s + r, n, w.vrows.data(), w.alpha.data() + r, w.o.data() + r * D);
#elif PREFIXGATE_AVX2_F32
    const bool masked = k0 + n - 1 > w.pos[0];  // as above
    const int64_t padded = (n + 3) / 4 * 4;
    block_rows<T, kWiden>(k_head, offs, n, padded, D, w.kf.data(), w.krows.data());
    for (int64_t r = 0; r < R; r += 16)
      for (int64_t j = 0; j < padded; j += 4)
        scores_avx2(w.q.data() + r, D, w.krows.data() + j, s + j * kRows + r);
    softmax_avx2<MV>(s, n, k0, masked, w.pos.data(), w.m.data(), w.l.data(), w.alpha.data());
    block_rows<T, kWiden>(v_head, offs, n, n, D, w.vf.data(), w.vrows.data());
    values_avx2(s, n, R, D, w.vrows.data(), w.alpha.data(), w.o.data());
#endif
  }
}

// out[row] = o[row] / l[row] in the cache dtype
template <typename T, Path P>
void store_rows(const Layout& lay, const Item& it, const Tensors<T>& in, const Scratch& w) {
  const int64_t D = lay.head_dim;
  for (int64_t r = 0; r < it.rows; ++r) {
    const int64_t head = (it.row0 + r) % lay.group;
    T* dst = in.out + row_token(lay, it, r).row * lay.o_row + (it.kvh * lay.group + head) * lay.o_head;
    const float inv = 1.f / w.l[r];
    const float* src = w.o.data() + r * D;
#if defined(__AVX512F__)
    if constexpr (P != Path::kPortable) {
      for (int64_t d = 0; d < D; d += 16)
        store16(dst + d, _mm512_mul_ps(_mm512_loadu_ps(src + d), _mm512_set1_ps(inv)));
      continue;
    }
#endif
    for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(src[d] * inv);
  }
}

// The item's packed queries and positions (R rows), and its state before the first key block
template <typename T, Path P>
void begin_item(const Layout& lay, const Item& it, const Tensors<T>& in, int64_t R, Scratch& w) {
  pack_queries<T, P>(lay, it, in, R, w);
  std::fill(w.m.begin(), w.m.begin() + R, kNegInf);
  std::fill(w.l.begin(), w.l.begin() + R, 0.f);
  std::fill(w.o.begin(), w.o.begin() + R * lay.head_dim, 0.f);
}

// The key blocks from .. to - 1 (from a multiple of kKeys; w.offs holds their rows)
template <typename T, Path P, int MV, int DV>
void key_blocks(const Layout& lay, const Item& it, const Tensors<T>& in, Scratch& w, int64_t from,
                int64_t to, int64_t R) {
  for (int64_t k0 = from; k0 < to; k0 += kKeys)
    key_block<T, P, MV, DV>(lay, it, in, w, k0, std::min(kKeys, to - k0), R);
}

// R = the rows computed: it.rows rounded up to whole vectors (16 * MV) on the vector paths
template <typename T, Path P, int MV, int DV>
void attend_item(const Layout& lay, const Item& it, const Tensors<T>& in, Scratch& w) {
  const int64_t R = P == Path::kPortable ? it.rows : 16 * MV;
  begin_item<T, P>(lay, it, in, R, w);
  row_offsets(lay, in.table, it.seq, it.keys, w.offs.data());
  key_blocks<T, P, MV, DV>(lay, it, in, w, 0, it.keys, R);
  store_rows<T, P>(lay, it, in, w);
}

// ---- grouped items ------------------------------------------------------------------------------
//
// Decodes whose block tables start with the same block ids (a shared system prompt, the forks of
// n > 1) read the same K and V rows for those keys. The caller names them (groups, group_keys);
// an item then holds the G heads of up to kRows / G of them (kGroupRows): it runs their shared key
// blocks once for all its rows, in whole vectors or tiles (one load or pack of each K and V row
// per block, not one per decode), then each decode's own key blocks on its rows alone, from the
// running (m, l, O) its rows reached, as that decode's ungrouped item would.
//
// Output is bit-identical to the ungrouped items on every path: a row's scores, probabilities and
// sums never depend on the other rows of its item (on AMX tiles each element of C sums its own
// products; in the vector and portable paths rows are lanes or loop indices), keys are in the
// same 64-key blocks aligned to position 0 in the same order (shared keys are whole blocks, so
// a block a decode could not share is all in its tail), and no shared key is masked for any row
// (each is before every member's token). Decodes that the dot-product path would run with keys in
// the lanes (attend_token) get the rows path here, which gives the same bits by construction.

// begin_item's state for the decode `one` (rows 0 .. G - 1) taken from rows r0 .. r0 + G - 1 of
// the grouped item's scratch g, then its key blocks from `from` on, and its output stored
template <typename T, Path P, int MV, int DV>
void finish_member(const Layout& lay, const Item& one, const Tensors<T>& in, const Scratch& g,
                   int64_t r0, int64_t from, Scratch& w) {
  const int64_t R = P == Path::kPortable ? one.rows : 16 * MV, D = lay.head_dim;
  begin_item<T, P>(lay, one, in, R, w);
  std::copy(g.m.begin() + r0, g.m.begin() + r0 + one.rows, w.m.begin());
  std::copy(g.l.begin() + r0, g.l.begin() + r0 + one.rows, w.l.begin());
  std::copy(g.o.begin() + r0 * D, g.o.begin() + (r0 + one.rows) * D, w.o.begin());
  row_offsets(lay, in.table, one.seq, one.keys, w.offs.data());
  key_blocks<T, P, MV, DV>(lay, one, in, w, from, one.keys, R);
  store_rows<T, P>(lay, one, in, w);
}

// A grouped item: the shared key blocks for all rows (in w), then each member in `tail`.
template <typename T, Path P, int MV, int DV>
void attend_group(const Layout& lay, const Item& it, const Tensors<T>& in, Scratch& w,
                  Scratch& tail) {
  const int64_t R = P == Path::kPortable ? it.rows : 16 * MV, G = lay.group;
  begin_item<T, P>(lay, it, in, R, w);
  row_offsets(lay, in.table, it.members[0].seq, it.shared, w.offs.data());
  key_blocks<T, P, MV, DV>(lay, it, in, w, 0, it.shared, R);
  for (int64_t c = 0; c < it.count; ++c) {
    const Member& m = it.members[c];
    const Item one{m.seq, it.kvh, m.q_start, m.len - 1, 0, G, m.len, true};
    switch ((G + 15) / 16) {  // kGroupRows: G <= kRows / 2
      case 1: finish_member<T, P, 1, DV>(lay, one, in, w, c * G, it.shared, tail); break;
      default: finish_member<T, P, 2, DV>(lay, one, in, w, c * G, it.shared, tail); break;
    }
  }
}

// True when this call's items run on AMX tiles: bfloat16, head_dim 32, 64 or 128, a build for a
// CPU with AMX, and Linux's permission.
template <typename T>
bool uses_amx(int64_t head_dim) {
  return std::is_same_v<T, c10::BFloat16> && head_dim % 32 == 0 && head_dim <= 128 &&
         amx_permitted();
}

// A token item (a decode) with at most this many rows (heads) runs with the keys in the lanes
constexpr int64_t kTokenRows = 16;

// The item's function for this build, head dim and row count.
template <typename T>
using ItemFn = void (*)(const Layout&, const Item&, const Tensors<T>&, Scratch&);

#if defined(__AVX512BF16__)
// attend_item for a token item (bfloat16, the dot-product path): keys in the lanes (token_block)
template <int DV>
void attend_token(const Layout& lay, const Item& it, const Tensors<c10::BFloat16>& in,
                  Scratch& w) {
  constexpr int64_t D = 16 * DV, RT = kValueRows<DV>;
  uint32_t* q = reinterpret_cast<uint32_t*>(w.q.data());  // [rows][D / 2] pairs as they are
  for (int64_t r = 0; r < it.rows; ++r)
    std::memcpy(q + r * D / 2, query_row(lay, it, in.query, r), D * sizeof(c10::BFloat16));
  row_offsets(lay, in.table, it.seq, it.keys, w.offs.data());
  const int64_t R = (it.rows + RT - 1) / RT * RT;
  std::fill(w.m.begin(), w.m.begin() + R, kNegInf);
  std::fill(w.l.begin(), w.l.begin() + R, 0.f);
  std::fill(w.o.begin(), w.o.begin() + R * D, 0.f);
  const c10::BFloat16* k_head = in.cache + it.kvh * lay.c_head;
  const c10::BFloat16* v_head = k_head + lay.c_kv;
  prefetch_rows(k_head, v_head, w.offs.data(), std::min(kPrefetchKeys, it.keys),
                D * static_cast<int64_t>(sizeof(c10::BFloat16)));
  for (int64_t k0 = 0; k0 < it.keys; k0 += kKeys)
    token_block<DV>(k_head, v_head, w.offs.data() + k0, std::min(kKeys, it.keys - k0),
                    std::max<int64_t>(0, it.keys - k0 - kPrefetchKeys), it.rows, in.scale, w);
  store_rows<c10::BFloat16, Path::kDpbf16>(lay, it, in, w);
}
#endif

#if defined(__AVX512F__)
// ---- one token's rows with the keys in the lanes (decodes; float32 products) -------------------
//
// The float32 path's counterpart of token_block (float32 caches, and bfloat16 ones widened where
// the build has no AVX512-BF16): 16 keys' rows transposed into vectors of one dim, each head's
// scaled query element broadcast, the chain over dims from zero (scores_f32's multiply-adds, the
// same products); the same softmax as token_block; P written out as the rows' steps lay it out
// and multiplied by values_tile. So a decode's output is bit-identical to its rows computed among
// a prefill's, at a fraction of their cost (its 3 heads no longer fill 16 lanes).
template <typename T, int DV>
void token_block_f32(const T* k_head, const T* v_head, const int64_t* offs, int64_t n,
                     int64_t ahead, int64_t rows, Scratch& w) {
  constexpr int64_t D = 16 * DV, RT = kValueRows<DV>;
  alignas(64) float ts[kTokenRows * kKeys];  // ts[g * kKeys + j]: head g's score of key j
  const float* q = w.q.data();               // [rows][D], scaled
  float* kt = w.kf.data();                   // kt[d * kKeys + j]: dim d of key j
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    if (j0 < ahead)  // as token_scores requests them
      prefetch_rows(k_head, v_head, offs + kPrefetchKeys + j0, std::min<int64_t>(16, ahead - j0),
                    D * static_cast<int64_t>(sizeof(T)));
    for (int64_t c0 = 0; c0 < D; c0 += 16) {
      __m512 x[16];  // x[i] = dim c0 + i of the 16 keys (keys past n: zeros, masked below)
      for (int k = 0; k < 16; ++k)
        x[k] = j0 + k < n ? load16(k_head + offs[j0 + k] + c0) : _mm512_setzero_ps();
      transpose16(x);
      for (int i = 0; i < 16; ++i) _mm512_storeu_ps(kt + (c0 + i) * kKeys + j0, x[i]);
    }
  }
  token_heads<false>(q, rows, D, n, kt, 1.f, ts);
  float* s = w.s.data();  // P[j * kRows + g], as softmax_avx512 leaves it
  for (int64_t g = 0; g < rows; ++g) {
    __m512 p[4];
    __mmask16 vis[4];
    __m512 mx = _mm512_set1_ps(w.m[g]);
    for (int b = 0; b < 4; ++b) {
      const int64_t left = n - 16 * b;
      vis[b] = left >= 16 ? 0xFFFF : left <= 0 ? 0 : static_cast<__mmask16>((1u << left) - 1);
      p[b] = _mm512_maskz_loadu_ps(vis[b], ts + g * kKeys + 16 * b);
      mx = _mm512_mask_max_ps(mx, vis[b], mx, p[b]);
    }
    const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
    for (int b = 0; b < 4; ++b) p[b] = _mm512_maskz_mov_ps(vis[b], exp2_16(_mm512_sub_ps(p[b], m)));
    const float a = _mm512_cvtss_f32(exp2_16(_mm512_sub_ps(_mm512_set1_ps(w.m[g]), m)));
    w.alpha[g] = a;
    w.l[g] = std::fma(w.l[g], a, block_sum_lanes(p));
    w.m[g] = _mm512_cvtss_f32(m);
    alignas(64) float pg[kKeys];
    for (int b = 0; b < 4; ++b) _mm512_storeu_ps(pg + 16 * b, p[b]);
    for (int64_t j = 0; j < n; ++j) s[j * kRows + g] = pg[j];
  }
  const void** vrows = w.vrows.data();
  for (int64_t j = 0; j < n; ++j) {
    const T* src = v_head + offs[j];
    if constexpr (std::is_same_v<T, float>) {
      vrows[j] = src;
    } else {
      float* dst = w.vf.data() + j * D;
      widen_row(src, dst, D);
      vrows[j] = dst;
    }
  }
  for (int64_t r = 0; r < rows; r += RT)
    values_tile<RT, DV>(s + r, n, vrows, w.alpha.data() + r, w.o.data() + r * D);
}

// attend_item for a token item on the float32 path: keys in the lanes (token_block_f32)
template <typename T, int DV>
void attend_token_f32(const Layout& lay, const Item& it, const Tensors<T>& in, Scratch& w) {
  constexpr int64_t D = 16 * DV, RT = kValueRows<DV>;
  const __m512 scale = _mm512_set1_ps(in.scale);
  for (int64_t r = 0; r < it.rows; ++r) {  // as pack_queries_avx512 scales them
    const T* src = query_row(lay, it, in.query, r);
    for (int64_t d = 0; d < D; d += 16)
      _mm512_storeu_ps(w.q.data() + r * D + d, _mm512_mul_ps(load16(src + d), scale));
  }
  row_offsets(lay, in.table, it.seq, it.keys, w.offs.data());
  const int64_t R = (it.rows + RT - 1) / RT * RT;
  std::fill(w.m.begin(), w.m.begin() + R, kNegInf);
  std::fill(w.l.begin(), w.l.begin() + R, 0.f);
  std::fill(w.alpha.begin(), w.alpha.begin() + R, 1.f);
  std::fill(w.o.begin(), w.o.begin() + R * D, 0.f);
  const T* k_head = in.cache + it.kvh * lay.c_head;
  const T* v_head = k_head + lay.c_kv;
  prefetch_rows(k_head, v_head, w.offs.data(), std::min(kPrefetchKeys, it.keys),
                D * static_cast<int64_t>(sizeof(T)));
  for (int64_t k0 = 0; k0 < it.keys; k0 += kKeys)
    token_block_f32<T, DV>(k_head, v_head, w.offs.data() + k0, std::min(kKeys, it.keys - k0),
                           std::max<int64_t>(0, it.keys - k0 - kPrefetchKeys), it.rows, w);
  store_rows<T, Path::kF32>(lay, it, in, w);
}
#endif

#if PREFIXGATE_AVX2_F32
// ---- one token's rows with the keys in the lanes (decodes; AVX2) --------------------------------
//
// token_block_f32 on 8 lanes: each 8 keys' rows transposed into vectors of one dim (the whole
// block first, into kt), then each head's chain over dims from zero with its scaled query element
// broadcast, for all the block's keys at once (NG = up to 8 independent chains, so that their
// multiply-adds overlap); the softmax per head on the block's 64 keys in 8 vectors
// (block_sum_lanes8), P written out as the rows' steps lay it out and multiplied by values_avx2.

// ts[g * kKeys + 8 * c + k] = q_g . key 8c + k for heads g < rows and NG groups of 8 keys, whose
// dims are kt[(c * D + d) * 8 + k]
template <int NG>
void token_scores_avx2(const float* q, int64_t rows, int64_t D, const float* kt, float* ts) {
  for (int64_t g = 0; g < rows; ++g) {
    const float* qg = q + g * D;
    __m256 acc[NG];
    for (int c = 0; c < NG; ++c) acc[c] = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; ++d) {
      const __m256 qd = _mm256_broadcast_ss(qg + d);
      for (int c = 0; c < NG; ++c)
        acc[c] = _mm256_fmadd_ps(qd, _mm256_load_ps(kt + (c * D + d) * 8), acc[c]);
    }
    for (int c = 0; c < NG; ++c) _mm256_store_ps(ts + g * kKeys + 8 * c, acc[c]);
  }
}

// (`ahead` keys follow offs[kPrefetchKeys - 1] in the item: requested 8 per 8 keys read)
template <typename T, int DV>
void token_block_avx2(const T* k_head, const T* v_head, const int64_t* offs, int64_t n,
                      int64_t ahead, int64_t rows, Scratch& w) {
  constexpr int64_t D = 16 * DV;
  alignas(32) float ts[kTokenRows * kKeys];  // ts[g * kKeys + j]: head g's score of key j
  alignas(32) float kt[kKeys * D];           // kt[(j / 8 * D + d) * 8 + j % 8]: dim d of key j
  const float* q = w.q.data();               // [rows][D], scaled
  for (int64_t j0 = 0; j0 < n; j0 += 8) {
    if (j0 < ahead)
      prefetch_rows(k_head, v_head, offs + kPrefetchKeys + j0, std::min<int64_t>(8, ahead - j0),
                    D * static_cast<int64_t>(sizeof(T)));
    for (int64_t c0 = 0; c0 < D; c0 += 8) {
      __m256 x[8];  // x[i] = dim c0 + i of the 8 keys (keys past n: zeros, masked below)
      for (int k = 0; k < 8; ++k)
        x[k] = j0 + k < n ? load8(k_head + offs[j0 + k] + c0) : _mm256_setzero_ps();
      transpose8(x);
      for (int i = 0; i < 8; ++i) _mm256_store_ps(kt + (j0 * D + (c0 + i) * 8), x[i]);
    }
  }
  switch ((n + 7) / 8) {
    case 1: token_scores_avx2<1>(q, rows, D, kt, ts); break;
    case 2: token_scores_avx2<2>(q, rows, D, kt, ts); break;
    case 3: token_scores_avx2<3>(q, rows, D, kt, ts); break;
    case 4: token_scores_avx2<4>(q, rows, D, kt, ts); break;
    case 5: token_scores_avx2<5>(q, rows, D, kt, ts); break;
    case 6: token_scores_avx2<6>(q, rows, D, kt, ts); break;
    case 7: token_scores_avx2<7>(q, rows, D, kt, ts); break;
    default: token_scores_avx2<8>(q, rows, D, kt, ts); break;
  }
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  __m256 vis[8];  // all ones for the keys below n
  for (int b = 0; b < 8; ++b)
    vis[b] = _mm256_castsi256_ps(
        _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(n - 8 * b)), iota));
  float* s = w.s.data();  // P[j * kRows + g], as softmax_avx2 leaves it
  for (int64_t g = 0; g < rows; ++g) {
    __m256 p[8];
    __m256 mx = _mm256_set1_ps(w.m[g]);
    for (int b = 0; b < 8; ++b) {
      p[b] = 8 * b < n ? _mm256_load_ps(ts + g * kKeys + 8 * b) : _mm256_setzero_ps();
      mx = _mm256_blendv_ps(mx, _mm256_max_ps(mx, p[b]), vis[b]);
    }
    mx = _mm256_max_ps(mx, _mm256_permute2f128_ps(mx, mx, 0x01));  // a max is exact in any order
    mx = _mm256_max_ps(mx, _mm256_permute_ps(mx, 0x4E));
    const __m256 m = _mm256_max_ps(mx, _mm256_permute_ps(mx, 0xB1));
    for (int b = 0; b < 8; ++b) p[b] = _mm256_and_ps(exp2_8(_mm256_sub_ps(p[b], m)), vis[b]);
    const float a = _mm256_cvtss_f32(exp2_8(_mm256_sub_ps(_mm256_set1_ps(w.m[g]), m)));
    w.alpha[g] = a;
    w.l[g] = std::fma(w.l[g], a, block_sum_lanes8(p));
    w.m[g] = _mm256_cvtss_f32(m);
    alignas(32) float pg[kKeys];
    for (int b = 0; b < 8; ++b) _mm256_store_ps(pg + 8 * b, p[b]);
    for (int64_t j = 0; j < n; ++j) s[j * kRows + g] = pg[j];
  }
  const void** vrows = w.vrows.data();
  for (int64_t j = 0; j < n; ++j) {
    const T* src = v_head + offs[j];
    if constexpr (std::is_same_v<T, float>) {
      vrows[j] = src;
    } else {
      float* dst = w.vf.data() + j * D;
      widen_row(src, dst, D);
      vrows[j] = dst;
    }
  }
  values_avx2(s, n, rows, D, vrows, w.alpha.data(), w.o.data());
}

// attend_item for a token item on the AVX2 path: keys in the lanes (token_block_avx2)
template <typename T, int DV>
void attend_token_avx2(const Layout& lay, const Item& it, const Tensors<T>& in, Scratch& w) {
  constexpr int64_t D = 16 * DV;
  const __m256 scale = _mm256_set1_ps(in.scale);
  for (int64_t r = 0; r < it.rows; ++r) {  // as pack_queries scales them
    const T* src = query_row(lay, it, in.query, r);
    for (int64_t d = 0; d < D; d += 8)
      _mm256_storeu_ps(w.q.data() + r * D + d, _mm256_mul_ps(load8(src + d), scale));
  }
  row_offsets(lay, in.table, it.seq, it.keys, w.offs.data());
  std::fill(w.m.begin(), w.m.begin() + it.rows, kNegInf);
  std::fill(w.l.begin(), w.l.begin() + it.rows, 0.f);
  std::fill(w.o.begin(), w.o.begin() + it.rows * D, 0.f);
  const T* k_head = in.cache + it.kvh * lay.c_head;
  const T* v_head = k_head + lay.c_kv;
  prefetch_rows(k_head, v_head, w.offs.data(), std::min(kPrefetchKeys, it.keys),
                D * static_cast<int64_t>(sizeof(T)));
  for (int64_t k0 = 0; k0 < it.keys; k0 += kKeys)
    token_block_avx2<T, DV>(k_head, v_head, w.offs.data() + k0, std::min(kKeys, it.keys - k0),
                            std::max<int64_t>(0, it.keys - k0 - kPrefetchKeys), it.rows, w);
  store_rows<T, Path::kF32>(lay, it, in, w);
}
#endif

// attend_token's instance for this head dim where the build runs the dot-product path (not the
// AMX one, whose sums a token's rows would not match); else nullptr
template <typename T>
ItemFn<T> token_fn(int64_t head_dim) {
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (!uses_amx<T>(head_dim)) {
      switch (head_dim) {
        case 16: return &attend_token<1>;
        case 32: return &attend_token<2>;
        case 64: return &attend_token<4>;
        case 128: return &attend_token<8>;
        default: break;
      }
    }
    return nullptr;
  }
#endif
#if defined(__AVX512F__)
  if (!uses_amx<T>(head_dim)) {  // the float32 path: float32, or bfloat16 widened
    switch (head_dim) {
      case 16: return &attend_token_f32<T, 1>;
      case 32: return &attend_token_f32<T, 2>;
      case 64: return &attend_token_f32<T, 4>;
      case 128: return &attend_token_f32<T, 8>;
      default: break;
    }
  }
#elif PREFIXGATE_AVX2_F32
  switch (head_dim) {
    case 16: return &attend_token_avx2<T, 1>;
    case 32: return &attend_token_avx2<T, 2>;
    case 64: return &attend_token_avx2<T, 4>;
    case 128: return &attend_token_avx2<T, 8>;
    default: break;
  }
#endif
  (void)head_dim;
  return nullptr;
}

// A grouped item's function (attend_group), with the scratch for its members' own key blocks
template <typename T>
using GroupFn = void (*)(const Layout&, const Item&, const Tensors<T>&, Scratch&, Scratch&);

// attend_item (kGroup false) or attend_group (true) for R = 16 * MV rows, head_dim 16 * DV
template <typename T, Path P, int MV, int DV, bool kGroup>
constexpr auto fn_of() {
  if constexpr (kGroup)
    return &attend_group<T, P, MV, DV>;
  else
    return &attend_item<T, P, MV, DV>;
}

template <typename T, Path P, int DV, bool kGroup>
auto by_rows(int64_t rows) {
  switch ((rows + 15) / 16) {
    case 1: return fn_of<T, P, 1, DV, kGroup>();
    case 2: return fn_of<T, P, 2, DV, kGroup>();
    case 3: return fn_of<T, P, 3, DV, kGroup>();
    default: return fn_of<T, P, 4, DV, kGroup>();
  }
}

// attend_item (kGroup false) or attend_group (true) for this build, head dim and row count
template <typename T, bool kGroup = false>
auto item_fn(int64_t head_dim, int64_t rows) {
#if PREFIXGATE_AMX_BF16
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (uses_amx<T>(head_dim)) {
      switch (head_dim) {
        case 32: return by_rows<T, Path::kAmx, 2, kGroup>(rows);
        case 64: return by_rows<T, Path::kAmx, 4, kGroup>(rows);
        default: return by_rows<T, Path::kAmx, 8, kGroup>(rows);
      }
    }
  }
#endif
#if defined(__AVX512F__)
#if defined(__AVX512BF16__)
  constexpr Path P = std::is_same_v<T, c10::BFloat16> ? Path::kDpbf16 : Path::kF32;
#else
  constexpr Path P = Path::kF32;
#endif
  switch (head_dim) {
    case 16: return by_rows<T, P, 1, kGroup>(rows);
    case 32: return by_rows<T, P, 2, kGroup>(rows);
    case 64: return by_rows<T, P, 4, kGroup>(rows);
    case 128: return by_rows<T, P, 8, kGroup>(rows);
    default: break;
  }
#elif PREFIXGATE_AVX2_F32
  switch (head_dim) {
    case 16: return by_rows<T, Path::kF32, 1, kGroup>(rows);
    case 32: return by_rows<T, Path::kF32, 2, kGroup>(rows);
    case 64: return by_rows<T, Path::kF32, 4, kGroup>(rows);
    case 128: return by_rows<T, Path::kF32, 8, kGroup>(rows);
    default: break;
  }
#endif
  (void)head_dim, (void)rows;
  return fn_of<T, Path::kPortable, 1, 1, kGroup>();
}

// ---- items and their schedule -------------------------------------------------------------------

struct Indices {
  const void* starts;
  const void* lens;
  const void* ids;
  bool starts64, lens64, ids64;
  int64_t num_seqs, num_ids;
  const void* groups = nullptr;      // [num_seqs] each sequence's group, -1 for none (or none)
  const void* group_keys = nullptr;  // [num_groups] the keys each group's members share
  bool groups64 = false, keys64 = false;
  int64_t num_groups = 0;
};

// The costliest-first schedule of items of these costs on the threads (each takes the next item
// when it finishes one): when the last thread finishes.
int64_t makespan(std::vector<int64_t> costs, int64_t threads) {
  std::sort(costs.begin(), costs.end(), std::greater<int64_t>());
  std::vector<int64_t> busy(threads, 0);
  for (int64_t c : costs) *std::min_element(busy.begin(), busy.end()) += c;
  return *std::max_element(busy.begin(), busy.end());
}

// What an item costs: its rows, in whole vectors of 16, times its keys.
inline int64_t item_cost(int64_t rows, int64_t keys) { return (rows + 15) / 16 * 16 * keys; }

// What a grouped item costs: all its rows over the shared keys, then each member's over its own.
int64_t group_cost(const Layout& lay, const Member* members, int64_t count, int64_t shared) {
  int64_t cost = item_cost(count * lay.group, shared);
  for (int64_t c = 0; c < count; ++c) cost += item_cost(lay.group, members[c].len - shared);
  return cost;
}

// Rows per item: 64 (the most reuse of each K and V row, the fewest items), unless that keeps the
// threads unevenly busy: a few equal items (a chunk over a long cached context: 9 items on 2
// threads take 5 rounds where 4.5 would do), or too few (short prompts). Then 32 or 16 if their
// costliest-first schedule is at least 5% closer to an even split. (Only the balance counts:
// smaller items also waste fewer masked scores, but run less efficiently.) `fixed`: the costs of
// the grouped items, scheduled beside these.
int64_t rows_per_item(const Layout& lay, const std::vector<int64_t>& q_lens,
                      const std::vector<int64_t>& firsts, const std::vector<int64_t>& fixed) {
  auto imbalance = [&](int64_t rows) {  // makespan / (total work / threads), >= 1
    std::vector<int64_t> costs = fixed;
    int64_t total = 0;
    for (int64_t c : fixed) total += c;
    for (size_t p = 0; p < q_lens.size(); ++p)
      for (int64_t r0 = 0; r0 < q_lens[p] * lay.group; r0 += rows) {
        const int64_t n = std::min(rows, q_lens[p] * lay.group - r0);
        const int64_t keys = firsts[p] + (r0 + n - 1) / lay.group + 1;
        costs.insert(costs.end(), lay.kv_heads, item_cost(n, keys));
        total += lay.kv_heads * item_cost(n, keys);
      }
    const int64_t threads = at::get_num_threads();
    return static_cast<double>(makespan(std::move(costs), threads)) * threads /
           static_cast<double>(std::max<int64_t>(total, 1));
  };
  int64_t best_rows = kRows;
  double best = imbalance(kRows);
  for (int64_t rows = kRows / 2; rows >= 16 && 0.95 * best > 1.0; rows /= 2) {  // ratio >= 1
    const double ratio = imbalance(rows);
    if (ratio < 0.95 * best) best = ratio, best_rows = rows;
  }
  return best_rows;
}

// A call's items, costliest first; grouped items point into `members`.
struct Work {
  std::vector<Item> items;
  std::vector<Member> members;
  int64_t max_keys = 1;  // the most keys any item needs
  bool grouped = false;  // some item is a grouped one
};

// The listed decodes of each group (checked: decodes of one new token, sharing their first
// group_keys[g] keys, a whole number of key blocks, through identical block ids). A group of one,
// or of heads too many for two decodes to fit an item (G > kRows / 2), is left empty and its
// decodes returned to the ungrouped lists.
std::vector<std::vector<Member>> group_members(const Layout& lay, const Indices& ix,
                                               const void* table,
                                               std::vector<std::vector<Member>> by_group,
                                               std::vector<Member>* ungrouped) {
  for (int64_t g = 0; g < ix.num_groups; ++g) {
    std::vector<Member>& ms = by_group[g];
    if (ms.size() < 2 || lay.group > kRows / 2) {
      ungrouped->insert(ungrouped->end(), ms.begin(), ms.end());
      ms.clear();
      continue;
    }
    const int64_t shared = read_index(ix.group_keys, ix.keys64, g);
    TORCH_CHECK(shared > 0 && shared % kKeys == 0, "group ", g, " shares ", shared,
                " keys: not a positive multiple of ", kKeys);
    for (const Member& m : ms) {
      TORCH_CHECK(shared <= m.len, "group ", g, " shares ", shared, " keys, sequence ", m.seq,
                  " has ", m.len);
      for (int64_t b = 0; b * lay.block_size < shared; ++b)
        TORCH_CHECK(read_index(table, lay.table64, m.seq * lay.table_row + b) ==
                        read_index(table, lay.table64, ms[0].seq * lay.table_row + b),
                    "sequences ", ms[0].seq, " and ", m.seq, " of group ", g,
                    " differ in block ", b);
    }
  }
  return by_group;
}

// The grouped items of each group's members: split evenly into items of at most kRows / G
// decodes, one per KV head.
void add_grouped_items(const Layout& lay, const Indices& ix,
                       const std::vector<std::vector<Member>>& by_group, Work* work) {
  size_t total = 0;
  for (const auto& ms : by_group) total += ms.size();
  work->members.reserve(total);  // items point into it: no reallocation below
  const int64_t per_item = kRows / lay.group;
  for (int64_t g = 0; g < ix.num_groups; ++g) {
    const std::vector<Member>& ms = by_group[g];
    if (ms.empty()) continue;
    const int64_t shared = read_index(ix.group_keys, ix.keys64, g);
    const int64_t n = static_cast<int64_t>(ms.size()), parts = (n + per_item - 1) / per_item;
    for (int64_t p = 0, c0 = 0; p < parts; ++p) {
      const int64_t count = n / parts + (p < n % parts ? 1 : 0);
      const Member* first = work->members.data() + work->members.size();
      work->members.insert(work->members.end(), ms.begin() + c0, ms.begin() + c0 + count);
      const int64_t cost = group_cost(lay, first, count, shared);
      for (int64_t kvh = 0; kvh < lay.kv_heads; ++kvh) {
        Item it{ms[c0].seq, kvh, 0, 0, 0, count * lay.group, shared, false};
        it.members = first, it.count = count, it.shared = shared, it.cost = cost;
        work->items.push_back(it);
      }
      c0 += count;
    }
    work->grouped = true;
  }
}

// Checks each listed sequence against the step and its block table; returns the items,
// costliest first, and the most keys any of them needs.
Work make_items(const Layout& lay, const Indices& ix, const void* table) {
  std::vector<int64_t> seqs, q_lens, firsts;
  std::vector<std::vector<Member>> by_group(ix.num_groups);
  std::vector<Member> ungrouped;
  Work work;
  for (int64_t p = 0; p < ix.num_ids; ++p) {
    const int64_t s = read_index(ix.ids, ix.ids64, p);
    TORCH_CHECK(s >= 0 && s < ix.num_seqs, "seq id ", s, " out of range");
    const int64_t start = read_index(ix.starts, ix.starts64, s);
    const int64_t q_len = read_index(ix.starts, ix.starts64, s + 1) - start;
    const int64_t len = read_index(ix.lens, ix.lens64, s);
    TORCH_CHECK(start >= 0 && q_len >= 0 && start + q_len <= lay.num_rows,
                "query rows of sequence ", s, " out of range");
    TORCH_CHECK(q_len <= len, "q_len ", q_len, " exceeds seq_len ", len);
    check_blocks(lay, table, s, len);
    work.max_keys = std::max(work.max_keys, len);
    const int64_t g = ix.groups != nullptr ? read_index(ix.groups, ix.groups64, s) : -1;
    if (g >= 0) {
      TORCH_CHECK(g < ix.num_groups, "group ", g, " of sequence ", s, " out of range");
      TORCH_CHECK(q_len == 1, "grouped sequence ", s, " has ", q_len, " new tokens, not 1");
      by_group[g].push_back({s, start, len});
      continue;
    }
    seqs.push_back(s);
    q_lens.push_back(q_len);
    firsts.push_back(len - q_len);
  }
  by_group = group_members(lay, ix, table, std::move(by_group), &ungrouped);
  for (const Member& m : ungrouped) {
    seqs.push_back(m.seq);
    q_lens.push_back(1);
    firsts.push_back(m.len - 1);
  }
  add_grouped_items(lay, ix, by_group, &work);
  std::vector<int64_t> fixed;
  for (const Item& it : work.items) fixed.push_back(it.cost);
  const int64_t per_item = rows_per_item(lay, q_lens, firsts, fixed);
  for (size_t p = 0; p < seqs.size(); ++p) {
    const int64_t s = seqs[p], rows = q_lens[p] * lay.group;
    const int64_t start = read_index(ix.starts, ix.starts64, s), first = firsts[p];
    for (int64_t kvh = 0; kvh < lay.kv_heads; ++kvh)
      for (int64_t r0 = 0; r0 < rows; r0 += per_item) {
        const int64_t n = std::min(per_item, rows - r0);
        const int64_t keys = first + (r0 + n - 1) / lay.group + 1;
        Item it{s, kvh, start, first, r0, n, keys, q_lens[p] == 1};
        it.cost = item_cost(n, keys);
        work.items.push_back(it);
      }
  }
  std::stable_sort(work.items.begin(), work.items.end(),
                   [](const Item& a, const Item& b) { return a.cost > b.cost; });
  return work;
}

template <typename T>
void attend_all(const Layout& lay, const Tensors<T>& in, const Work& work) {
  const std::vector<Item>& items = work.items;
  const int64_t n = static_cast<int64_t>(items.size());
  std::atomic<int64_t> next{0};
  // one task per thread, each taking the next item from the shared counter until none is left
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), n);
  const bool amx = uses_amx<T>(lay.head_dim);
  const ItemFn<T> token = token_fn<T>(lay.head_dim);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    Scratch& w = thread_scratch(0, lay, work.max_keys);
    Scratch* tail = work.grouped ? &thread_scratch(1, lay, work.max_keys) : nullptr;  // members
    if (amx) amx_configure();
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) {
      const Item& it = items[i];
      if (it.members != nullptr) {
        item_fn<T, true>(lay.head_dim, it.rows)(lay, it, in, w, *tail);
        continue;
      }
      const ItemFn<T> fn = it.token && it.rows <= kTokenRows ? token : nullptr;
      (fn ? fn : item_fn<T>(lay.head_dim, it.rows))(lay, it, in, w);
    }
    if (amx) amx_release();
  });
}

}  // namespace

namespace prefixgate {  // ops.h

// True when this build runs prefills of this head dim with vector instructions (AVX-512, or AVX2
// + FMA). The plain loops are correct but slower than PyTorch's SDPA (3-8x on an AVX2 CPU), so
// the backend keeps SDPA where this is false.
bool prefill_vectorized(int64_t head_dim) {
#if defined(__AVX512F__) || PREFIXGATE_AVX2_F32
  return head_dim == 16 || head_dim == 32 || head_dim == 64 || head_dim == 128;
#else
  (void)head_dim;
  return false;
#endif
}

void paged_prefill_attention(const at::Tensor& out, const at::Tensor& query,
                             const at::Tensor& kv_cache, const at::Tensor& block_tables,
                             const at::Tensor& query_start_loc, const at::Tensor& seq_lens,
                             const at::Tensor& seq_ids, double scale,
                             const std::optional<at::Tensor>& groups,
                             const std::optional<at::Tensor>& group_keys) {
  TORCH_CHECK(groups.has_value() == group_keys.has_value(),
              "paged_prefill_attention: groups and group_keys go together");
  const Layout lay =
      groups ? paged_layout("paged_prefill_attention", out, query, kv_cache, block_tables,
                            {&query_start_loc, &seq_lens, &seq_ids, &*groups, &*group_keys})
             : paged_layout("paged_prefill_attention", out, query, kv_cache, block_tables,
                            {&query_start_loc, &seq_lens, &seq_ids});
  const auto dtype = kv_cache.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "paged_prefill_attention: unsupported dtype ", dtype);
  const int64_t num_seqs = seq_lens.size(0);
  TORCH_CHECK(block_tables.size(0) == num_seqs && query_start_loc.size(0) == num_seqs + 1,
              "block_tables and query_start_loc need one row per sequence (and one more)");
  Indices ix{query_start_loc.const_data_ptr(),
             seq_lens.const_data_ptr(),
             seq_ids.const_data_ptr(),
             query_start_loc.scalar_type() == at::kLong,
             seq_lens.scalar_type() == at::kLong,
             seq_ids.scalar_type() == at::kLong,
             num_seqs,
             seq_ids.size(0)};
  if (groups) {
    TORCH_CHECK(groups->size(0) == num_seqs, "groups needs one entry per sequence");
    ix.groups = groups->const_data_ptr();
    ix.groups64 = groups->scalar_type() == at::kLong;
    ix.group_keys = group_keys->const_data_ptr();
    ix.keys64 = group_keys->scalar_type() == at::kLong;
    ix.num_groups = group_keys->size(0);
  }
  const Work work = make_items(lay, ix, block_tables.const_data_ptr());
  if (work.items.empty()) return;
  const float s = static_cast<float>(scale * kLog2e);  // base-2 scores, see exp2_16
  if (dtype == at::kFloat) {
    const Tensors<float> in{query.const_data_ptr<float>(), kv_cache.const_data_ptr<float>(),
                            block_tables.const_data_ptr(), out.mutable_data_ptr<float>(), s};
    attend_all<float>(lay, in, work);
  } else if (dtype == at::kHalf) {  // the float32 path, widened
    using H = c10::Half;
    const Tensors<H> in{query.const_data_ptr<H>(), kv_cache.const_data_ptr<H>(),
                        block_tables.const_data_ptr(), out.mutable_data_ptr<H>(), s};
    attend_all<H>(lay, in, work);
  } else {
    using BF = c10::BFloat16;
    const Tensors<BF> in{query.const_data_ptr<BF>(), kv_cache.const_data_ptr<BF>(),
                         block_tables.const_data_ptr(), out.mutable_data_ptr<BF>(), s};
    attend_all<BF>(lay, in, work);
  }
}

}  // namespace prefixgate
