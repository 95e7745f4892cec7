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
// Items run in parallel with at::parallel_for. Vector code is plain loops that gcc vectorizes,
// plus AVX-512 dot products where the compiler targets them.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

namespace {

// ---- rows of the cache dtype -> float32 -------------------------------------------------------

inline void widen(const float* src, float* dst, int64_t n) {
  std::memcpy(dst, src, n * sizeof(float));
}

inline void widen(const c10::BFloat16* src, float* dst, int64_t n) {
  // bfloat16 is the high half of a float32: shift its 16 bits up.
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
  for (int64_t i = 0; i < n; ++i) {
    uint32_t wide = static_cast<uint32_t>(bits[i]) << 16;
    std::memcpy(dst + i, &wide, sizeof(float));
  }
}

inline void widen(const c10::Half* src, float* dst, int64_t n) {
  int64_t i = 0;
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
  }
#endif
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

// ---- float32 vector helpers --------------------------------------------------------------------

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

inline float sum(const float* x, int64_t n) {
  constexpr int kLanes = 16;
  float lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) lanes[l] += x[i + l];
  float total = 0.f;
  for (; i < n; ++i) total += x[i];
  for (int l = 0; l < kLanes; ++l) total += lanes[l];
  return total;
}

// x[i] = exp(x[i] - shift) for x[i] <= shift (the softmax numerators; shift is the row max).
// exp(t) = 2^k * exp(r) with k = round(t / ln2), |r| <= ln2 / 2, exp(r) by its degree-6 Taylor
// polynomial (relative error < 3e-7). t is clamped at -87, so underflow gives ~1e-38, not 0.
inline void exp_shifted(float* x, int64_t n, float shift) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693145751953125f;  // ln 2 split so that k * kLn2Hi is exact
  constexpr float kLn2Lo = 1.42860682030941723212e-6f;
  constexpr float kRound = 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer
  for (int64_t i = 0; i < n; ++i) {
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

// ---- the kernel --------------------------------------------------------------------------------

struct Layout {
  int64_t num_seqs, num_heads, kv_heads, group, head_dim, block_size, num_blocks;
  int64_t q_seq, q_head;                      // query strides
  int64_t o_seq, o_head;                      // out strides
  int64_t c_kv, c_block, c_token, c_head;     // cache strides
  int64_t table_row;                          // block table row stride
  int64_t max_blocks;                         // block table width
};

// Per-thread scratch, sized for the longest context once per parallel chunk.
struct Scratch {
  std::vector<float> q, scores, row, acc, max, inv_sum;
  Scratch(const Layout& l, int64_t max_len)
      : q(l.group * l.head_dim),
        scores(l.group * max_len),
        row(l.head_dim),
        acc(l.group * l.head_dim),
        max(l.group),
        inv_sum(l.group) {}
};

template <typename T, typename Index>
void attend_one(const Layout& l, int64_t s, int64_t kvh, int64_t len, const T* query,
                const T* cache, const Index* table, double scale, T* out, Scratch& w) {
  const int64_t G = l.group, D = l.head_dim;
  T* o = out + s * l.o_seq + kvh * G * l.o_head;
  if (len <= 0) {  // nothing to attend to: zeros rather than NaN
    for (int64_t g = 0; g < G; ++g)
      for (int64_t d = 0; d < D; ++d) o[g * l.o_head + d] = static_cast<T>(0.f);
    return;
  }
  const T* q = query + s * l.q_seq + kvh * G * l.q_head;
  for (int64_t g = 0; g < G; ++g) {
    widen(q + g * l.q_head, w.q.data() + g * D, D);
    for (int64_t d = 0; d < D; ++d) w.q[g * D + d] *= static_cast<float>(scale);
  }
  const Index* blocks = table + s * l.table_row;
  TORCH_CHECK(len <= l.max_blocks * l.block_size, "seq_len ", len, " exceeds the block table");
  const T* k_head = cache + kvh * l.c_head;
  const T* v_head = k_head + l.c_kv;

  // pass 1: scores[g, t] = (scale * q_g) . k_t, and the row maxima
  float* scores = w.scores.data();
  float* row = w.row.data();
  float* max_score = w.max.data();
  std::fill(max_score, max_score + G, -std::numeric_limits<float>::infinity());
  for (int64_t t0 = 0, b = 0; t0 < len; t0 += l.block_size, ++b) {
    const int64_t block = static_cast<int64_t>(blocks[b]);
    TORCH_CHECK(block >= 0 && block < l.num_blocks, "block id ", block, " out of range");
    const T* k_block = k_head + block * l.c_block;
    const int64_t n = std::min(l.block_size, len - t0);
    for (int64_t j = 0; j < n; ++j) {
      widen(k_block + j * l.c_token, row, D);
      for (int64_t g = 0; g < G; ++g) {
        float x = dot(w.q.data() + g * D, row, D);
        scores[g * len + t0 + j] = x;
        max_score[g] = std::max(max_score[g], x);
      }
    }
  }
  // softmax numerators in place; 1 / denominator per query head
  float* inv_sum = w.inv_sum.data();
  for (int64_t g = 0; g < G; ++g) {
    float* p = scores + g * len;
    exp_shifted(p, len, max_score[g]);
    inv_sum[g] = 1.f / sum(p, len);
  }
  // pass 2: acc[g] = sum_t p[g, t] * v_t
  float* acc = w.acc.data();
  std::fill(acc, acc + G * D, 0.f);
  for (int64_t t0 = 0, b = 0; t0 < len; t0 += l.block_size, ++b) {
    const T* v_block = v_head + static_cast<int64_t>(blocks[b]) * l.c_block;
    const int64_t n = std::min(l.block_size, len - t0);
    for (int64_t j = 0; j < n; ++j) {
      widen(v_block + j * l.c_token, row, D);
      for (int64_t g = 0; g < G; ++g) axpy(scores[g * len + t0 + j], row, acc + g * D, D);
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t d = 0; d < D; ++d)
      o[g * l.o_head + d] = static_cast<T>(acc[g * D + d] * inv_sum[g]);
  }
}

template <typename T, typename Index, typename Len>
void attend_all(const Layout& l, const T* query, const T* cache, const Index* table,
                const Len* seq_lens, double scale, T* out) {
  int64_t max_len = 1;
  for (int64_t s = 0; s < l.num_seqs; ++s) max_len = std::max<int64_t>(max_len, seq_lens[s]);
  at::parallel_for(0, l.num_seqs * l.kv_heads, 1, [&](int64_t begin, int64_t end) {
    Scratch w(l, max_len);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t s = item / l.kv_heads, kvh = item % l.kv_heads;
      attend_one<T, Index>(l, s, kvh, seq_lens[s], query, cache, table, scale, out, w);
    }
  });
}

template <typename T, typename Index>
void dispatch_len(const Layout& l, const at::Tensor& query, const at::Tensor& cache,
                  const at::Tensor& tables, const at::Tensor& seq_lens, double scale,
                  const at::Tensor& out) {
  const T* q = static_cast<const T*>(query.const_data_ptr());
  const T* c = static_cast<const T*>(cache.const_data_ptr());
  const Index* t = static_cast<const Index*>(tables.const_data_ptr());
  T* o = static_cast<T*>(out.mutable_data_ptr());
  if (seq_lens.scalar_type() == at::kInt) {
    attend_all<T, Index>(l, q, c, t, static_cast<const int32_t*>(seq_lens.const_data_ptr()),
                         scale, o);
  } else {
    attend_all<T, Index>(l, q, c, t, static_cast<const int64_t*>(seq_lens.const_data_ptr()),
                         scale, o);
  }
}

template <typename T>
void dispatch_index(const Layout& l, const at::Tensor& query, const at::Tensor& cache,
                    const at::Tensor& tables, const at::Tensor& seq_lens, double scale,
                    const at::Tensor& out) {
  if (tables.scalar_type() == at::kInt) {
    dispatch_len<T, int32_t>(l, query, cache, tables, seq_lens, scale, out);
  } else {
    dispatch_len<T, int64_t>(l, query, cache, tables, seq_lens, scale, out);
  }
}

void paged_decode_attention(const at::Tensor& out, const at::Tensor& query,
                            const at::Tensor& kv_cache, const at::Tensor& block_tables,
                            const at::Tensor& seq_lens, double scale) {
  TORCH_CHECK(query.dim() == 3 && out.dim() == 3 && kv_cache.dim() == 5,
              "expected query/out [S, H, D] and kv_cache [2, num_blocks, block_size, KVH, D]");
  TORCH_CHECK(block_tables.dim() == 2 && seq_lens.dim() == 1, "bad block_tables/seq_lens rank");
  TORCH_CHECK(query.device().is_cpu() && kv_cache.device().is_cpu() && out.device().is_cpu() &&
                  block_tables.device().is_cpu() && seq_lens.device().is_cpu(),
              "paged_decode_attention runs on CPU tensors");
  const auto dtype = kv_cache.scalar_type();
  TORCH_CHECK(query.scalar_type() == dtype && out.scalar_type() == dtype,
              "query, out and kv_cache must share a dtype");
  for (const at::Tensor* idx : {&block_tables, &seq_lens})
    TORCH_CHECK(idx->scalar_type() == at::kInt || idx->scalar_type() == at::kLong,
                "block_tables and seq_lens must be int32 or int64");
  TORCH_CHECK(block_tables.stride(1) == 1 && seq_lens.stride(0) == 1,
              "block_tables rows and seq_lens must be contiguous");
  Layout l{};
  l.num_seqs = query.size(0);
  l.num_heads = query.size(1);
  l.head_dim = query.size(2);
  l.kv_heads = kv_cache.size(3);
  l.block_size = kv_cache.size(2);
  l.num_blocks = kv_cache.size(1);
  TORCH_CHECK(kv_cache.size(0) == 2 && kv_cache.size(4) == l.head_dim, "bad kv_cache shape");
  TORCH_CHECK(l.kv_heads > 0 && l.num_heads % l.kv_heads == 0, "H must be a multiple of KVH");
  l.group = l.num_heads / l.kv_heads;
  TORCH_CHECK(out.sizes() == query.sizes(), "out must have the query's shape");
  TORCH_CHECK(block_tables.size(0) == l.num_seqs && seq_lens.size(0) == l.num_seqs,
              "block_tables and seq_lens need one row per sequence");
  TORCH_CHECK(query.stride(2) == 1 && out.stride(2) == 1 && kv_cache.stride(4) == 1,
              "the head dimension must be contiguous");
  l.q_seq = query.stride(0);
  l.q_head = query.stride(1);
  l.o_seq = out.stride(0);
  l.o_head = out.stride(1);
  l.c_kv = kv_cache.stride(0);
  l.c_block = kv_cache.stride(1);
  l.c_token = kv_cache.stride(2);
  l.c_head = kv_cache.stride(3);
  l.table_row = block_tables.stride(0);
  l.max_blocks = block_tables.size(1);
  if (l.num_seqs == 0) return;
  switch (dtype) {
    case at::kFloat:
      dispatch_index<float>(l, query, kv_cache, block_tables, seq_lens, scale, out);
      break;
    case at::kBFloat16:
      dispatch_index<c10::BFloat16>(l, query, kv_cache, block_tables, seq_lens, scale, out);
      break;
    case at::kHalf:
      dispatch_index<c10::Half>(l, query, kv_cache, block_tables, seq_lens, scale, out);
      break;
    default:
      TORCH_CHECK(false, "paged_decode_attention: unsupported dtype ", dtype);
  }
}

}  // namespace

TORCH_LIBRARY(prefixgate_cpu, m) {
  m.def(
      "paged_decode_attention(Tensor(a!) out, Tensor query, Tensor kv_cache, "
      "Tensor block_tables, Tensor seq_lens, float scale) -> ()");
}

TORCH_LIBRARY_IMPL(prefixgate_cpu, CPU, m) {
  m.impl("paged_decode_attention", &paged_decode_attention);
}
