// The linear (matmul) kernels: out = x @ w.T (+ bias) for the model's projections and lm_head.
//
//   linear_bf16(out, x, packed, bias?)   bfloat16, weights packed in panels at load
//                                        (`kernels.cpu_ops.pack_panels`): AVX512-BF16 dot products,
//                                        AMX tiles for every batch where the CPU has them
//   has_linear_bf16(), has_linear_amx()  whether this build / process runs those paths
//
// float32 (and bfloat16 where this kernel does not run) goes to linear_fixed.cpp.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>

#include "ops.h"
#include "simd.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

// ---- bfloat16 linear from weights packed in panels (AVX512-BF16) ------------------------------
//
//   out[m, n] = rnd(x[m, :] . w[n, :] + bias[n])     x [M, K], w [N, K], out [M, N], bfloat16
//
// The weight is packed once at load (`kernels.cpu_ops.pack_panels`) as [N / 32, K / 2, 32, 2]:
// panel p holds columns 32p..32p+31 and, for each pair of k, the 32 columns' two weights side by
// side (N padded to 32 and K to 2 with zeros). A panel step is two vectors; each input row's pair
// x[m, 2i:2i+2] is broadcast and dotted into both with the AVX512-BF16 instruction (exact bf16
// products, float32 sums): outer products, no horizontal sums, up to 8 rows x 32 columns of
// accumulators. Panels run in parallel; each is read from memory once (later rows hit the cache)
// while the next one is fetched into L2, so one decode row streams the weights at memory speed and
// 16+ rows run at the machine's bf16 GEMM rate (here 1.3-1.4x oneDNN's packed GEMM at 1-64 rows,
// equal at 1024). Only built where the CPU has AVX512-BF16.

#if defined(__AVX512BF16__)
constexpr bool kHasDpbf16 = true;

inline __m512bh load_bh(const c10::BFloat16* p) {
  return (__m512bh)_mm512_loadu_si512(reinterpret_cast<const void*>(p));
}

// A panel's output row: out[:cols] = rnd(a + bias) for its 32 columns' float32 sums (a0, a1)
class PanelStore {
 public:
  PanelStore(const c10::BFloat16* bias, int64_t cols)
      : lo_(cols >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << cols) - 1)),
        hi_(cols >= 32   ? 0xFFFF
            : cols <= 16 ? 0
                         : static_cast<__mmask16>((1u << (cols - 16)) - 1)) {
    if (bias != nullptr) {
      alignas(64) c10::BFloat16 bb[32] = {};
      std::memcpy(bb, bias, cols * sizeof(c10::BFloat16));
      b0_ = load16(bb);
      b1_ = load16(bb + 16);
    }
  }
  void operator()(c10::BFloat16* out, __m512 a0, __m512 a1) const {
    _mm256_mask_storeu_epi16(out, lo_, to_bf16_bits(_mm512_add_ps(a0, b0_)));
    _mm256_mask_storeu_epi16(out + 16, hi_, to_bf16_bits(_mm512_add_ps(a1, b1_)));
  }

 private:
  __mmask16 lo_, hi_;
  __m512 b0_ = _mm512_setzero_ps(), b1_ = _mm512_setzero_ps();
};

// out[MR rows, 32 cols] = x . panel (+ bias). The next panel is prefetched into L2 alongside:
// its k-pair rows i with i % tiles == tile, so that the `tiles` row tiles of one panel share it.
template <int MR>
inline void panel_tile(const c10::BFloat16* x, int64_t ldx, int64_t K, const c10::BFloat16* panel,
                       const c10::BFloat16* next, const c10::BFloat16* bias, int64_t cols,
                       c10::BFloat16* out, int64_t ldo, int64_t tile, int64_t tiles) {
  __m512 acc[MR][2];
  for (int m = 0; m < MR; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  const int64_t pairs = K / 2;
  for (int64_t i = 0; i < pairs; ++i) {
    const c10::BFloat16* wp = panel + i * 64;
    if (next != nullptr && (tiles == 1 || i % tiles == tile)) {
      _mm_prefetch(reinterpret_cast<const char*>(next + i * 64), _MM_HINT_T1);
      _mm_prefetch(reinterpret_cast<const char*>(next + i * 64 + 32), _MM_HINT_T1);
    }
    const __m512bh w0 = load_bh(wp), w1 = load_bh(wp + 32);
    for (int m = 0; m < MR; ++m) {
      int32_t pair;
      std::memcpy(&pair, x + m * ldx + 2 * i, sizeof(pair));
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(pair);
      acc[m][0] = _mm512_dpbf16_ps(acc[m][0], xb, w0);
      acc[m][1] = _mm512_dpbf16_ps(acc[m][1], xb, w1);
    }
  }
  if (K % 2 != 0) {  // the last k alone, its partner zero
    const c10::BFloat16* wp = panel + pairs * 64;
    const __m512bh w0 = load_bh(wp), w1 = load_bh(wp + 32);
    for (int m = 0; m < MR; ++m) {
      uint16_t last;
      std::memcpy(&last, x + m * ldx + 2 * pairs, sizeof(last));
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(last));
      acc[m][0] = _mm512_dpbf16_ps(acc[m][0], xb, w0);
      acc[m][1] = _mm512_dpbf16_ps(acc[m][1], xb, w1);
    }
  }
  const PanelStore store(bias, cols);
  for (int m = 0; m < MR; ++m) store(out + m * ldo, acc[m][0], acc[m][1]);
}

void linear_panels_rows(int64_t rows, const c10::BFloat16* x, int64_t ldx, int64_t K,
                        const c10::BFloat16* panel, const c10::BFloat16* next,
                        const c10::BFloat16* bias, int64_t cols, c10::BFloat16* out, int64_t ldo,
                        int64_t tile, int64_t tiles) {
  switch (rows) {
    case 1: return panel_tile<1>(x, ldx, K, panel, next, bias, cols, out, ldo, tile, tiles);
    case 2: return panel_tile<2>(x, ldx, K, panel, next, bias, cols, out, ldo, tile, tiles);
    case 3: return panel_tile<3>(x, ldx, K, panel, next, bias, cols, out, ldo, tile, tiles);
    case 4: return panel_tile<4>(x, ldx, K, panel, next, bias, cols, out, ldo, tile, tiles);
    case 5: return panel_tile<5>(x, ldx, K, panel, next, bias, cols, out, ldo, tile, tiles);
    case 6: return panel_tile<6>(x, ldx, K, panel, next, bias, cols, out, ldo, tile, tiles);
    case 7: return panel_tile<7>(x, ldx, K, panel, next, bias, cols, out, ldo, tile, tiles);
    default: return panel_tile<8>(x, ldx, K, panel, next, bias, cols, out, ldo, tile, tiles);
  }
}
// ---- the same linear on AMX tiles (CPUs with AMX-BF16) -----------------------------------------
//
// The panel layout is already what an AMX B tile wants: 16 k-pairs of a panel's first (or last)
// 16 columns are 16 rows of 64 bytes at a 128-byte stride. So batches of every size run on tiles
// with no other packing: for each panel and each 16 input rows, per 32 k, one
// A tile (16 rows x 32 k) is multiplied into two B tiles (the panel's halves) and summed in two C
// tiles of 16 x 16 float32 (bf16 products, float32 sums, as above). In each pass of rows (below)
// the panel is read from memory for the first 16 rows, while the next one is prefetched into L2;
// later rows read it from the cache. (Two A tiles against four C tiles, 32 rows at a time, measured
// slower, and so did K-blocking with C spilled to memory between blocks.) x is copied into a
// zero-padded buffer when M is not a multiple of 16, so a tile never reads past it. Needs K % 32 == 0 and the
// process's permission for tile data (asked once; where Linux refuses, the AVX-512 kernel runs).
// As in oneDNN's AMX kernels, float32 denormals flush to zero.
//
// One row's result never depends on the batch: each output is its row's sum over K in the same
// 32-k steps whatever M is. So a CPU with tiles runs every batch on them, one row included (1-3
// rows were on the AVX-512 kernel, which is as fast there but sums in another order: a token's
// logits then changed with the number of rows in its step).
//
// Batches of more than 256 rows go in passes of 256 (`kAmxRowRange`), each over all the weights:
// the pass's rows stay in L2 while the panels stream by. All of SmolLM2's matmuls on an Intel Xeon
// (AMX), weights cached, ms: 4 rows 7.6 vs 8.5 on AVX-512; 16 rows 8.9 vs 32.7 (oneDNN 14.2); 64
// rows 20 (oneDNN 25.6). With 30 layers of weights streamed from memory, against oneDNN's packed
// AMX GEMM, medians of interleaved runs: 256 rows 39-62 vs 78-80; 512 rows 106 vs 118; 1,024
// rows 220 vs 350 (faster in 10 of 10 pairs); 2,048 rows 432 vs 477 (6 of 10; 507 vs 466 in one
// pass over all rows).

#if PREFIXGATE_AMX_BF16
// rows per pass over the weights: their x (256 x K bf16, 0.3-0.8 MB for SmolLM2) stays in L2
constexpr int64_t kAmxRowRange = 256;

// Tiles (amx_configure, simd.h): tmm0: A, 16 rows of x by 32 k; tmm1, tmm2: B, the panel's two
// halves (16 k-pairs x 16 columns x 2); tmm3, tmm4: C, 16 x 16 float32 each.

// c [16][32] = x[16 rows, :K] . panel (float32); prefetches `next` into L2 when given
void amx_panel_rows(const c10::BFloat16* x, int64_t ldx, int64_t K, const c10::BFloat16* panel,
                    const c10::BFloat16* next, float* c) {
  _tile_zero(3);
  _tile_zero(4);
  for (int64_t k = 0; k < K; k += 32) {
    const int64_t w_off = k * 32;  // 16 pairs of 64 elements from pair k / 2
    if (next != nullptr)
      for (int line = 0; line < 32; ++line)
        _mm_prefetch(reinterpret_cast<const char*>(next + w_off + line * 32), _MM_HINT_T1);
    _tile_loadd(1, panel + w_off, 128);
    _tile_loadd(2, panel + w_off + 32, 128);
    _tile_loadd(0, x + k, ldx * 2);
    _tile_dpbf16ps(3, 0, 1);
    _tile_dpbf16ps(4, 0, 2);
  }
  _tile_stored(3, c, 128);
  _tile_stored(4, c + 16, 128);
}

void linear_amx(const c10::BFloat16* xp, int64_t ldx, int64_t M, int64_t K,
                const c10::BFloat16* pp, int64_t panels, int64_t N, const c10::BFloat16* b,
                c10::BFloat16* op, int64_t ldo) {
  std::vector<c10::BFloat16> padded;
  const int64_t rows = (M + 15) / 16 * 16;
  if (rows != M) {  // whole tiles of rows, the extra ones zero
    padded.assign(rows * K, c10::BFloat16(0.0f));
    for (int64_t m = 0; m < M; ++m) std::memcpy(&padded[m * K], xp + m * ldx, K * 2);
    xp = padded.data();
    ldx = K;
  }
  const int64_t panel_elems = K * 32;
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    amx_configure();
    alignas(64) float c[16 * 32];
    for (int64_t m0 = 0; m0 < rows; m0 += kAmxRowRange) {
      const int64_t m1 = std::min(rows, m0 + kAmxRowRange);
      for (int64_t p = begin; p < end; ++p) {
        const c10::BFloat16* panel = pp + p * panel_elems;
        const c10::BFloat16* next = p + 1 < end ? panel + panel_elems : nullptr;
        const int64_t n0 = p * 32, cols = std::min<int64_t>(32, N - n0);
        for (int64_t m = m0; m < m1; m += 16) {
          amx_panel_rows(xp + m * ldx, ldx, K, panel, m == m0 ? next : nullptr, c);
          const PanelStore store(b ? b + n0 : nullptr, cols);
          for (int64_t r = 0; r < std::min<int64_t>(16, M - m); ++r)
            store(op + (m + r) * ldo + n0, _mm512_load_ps(c + r * 32),
                  _mm512_load_ps(c + r * 32 + 16));
        }
      }
    }
    amx_release();
  });
}
#endif
#else
constexpr bool kHasDpbf16 = false;
#endif

}  // namespace

// ---- the ops (ops.h) ----------------------------------------------------------------------------

namespace prefixgate {

bool has_linear_bf16() { return kHasDpbf16; }

bool has_linear_amx() { return amx_permitted(); }

void linear_bf16(const at::Tensor& out, const at::Tensor& x, const at::Tensor& packed,
                        const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(kHasDpbf16, "linear_bf16 needs a CPU with AVX512-BF16");
  TORCH_CHECK(x.dim() == 2 && out.dim() == 2 && packed.dim() == 4, "expected x, out [.., ..] and "
              "packed [N / 32, K / 2, 32, 2]");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && packed.scalar_type() == at::kBFloat16 &&
                  out.scalar_type() == at::kBFloat16,
              "linear_bf16 takes bfloat16 tensors");
  const int64_t M = x.size(0), K = x.size(1), N = out.size(1);
  TORCH_CHECK(packed.size(2) == 32 && packed.size(3) == 2 && packed.size(1) == (K + 1) / 2 &&
                  packed.size(0) == (N + 31) / 32 && packed.is_contiguous(),
              "packed does not fit x and out");
  TORCH_CHECK(out.size(0) == M && x.stride(1) == 1 && out.stride(1) == 1, "bad x or out");
  const c10::BFloat16* b = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kBFloat16 && bias->is_contiguous() &&
                    bias->numel() == N,
                "bias must be a contiguous bfloat16 [N]");
    b = bias->const_data_ptr<c10::BFloat16>();
  }
#if defined(__AVX512BF16__)
  const c10::BFloat16* xp = x.const_data_ptr<c10::BFloat16>();
  const c10::BFloat16* pp = packed.const_data_ptr<c10::BFloat16>();
  c10::BFloat16* op = out.mutable_data_ptr<c10::BFloat16>();
  const int64_t ldx = x.stride(0), ldo = out.stride(0), panel_elems = packed.size(1) * 64;
  const int64_t panels = packed.size(0);
#if PREFIXGATE_AMX_BF16
  if (K % 32 == 0 && amx_permitted())
    return linear_amx(xp, ldx, M, K, pp, panels, N, b, op, ldo);
#endif
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const c10::BFloat16* panel = pp + p * panel_elems;
      const c10::BFloat16* next = p + 1 < end ? panel + panel_elems : nullptr;
      const int64_t n0 = p * 32, cols = std::min<int64_t>(32, N - n0);
      // every 8-row tile prefetches its share of the next panel, so the stream from memory
      // runs while all of this panel's tiles compute, not only the first
      const int64_t tiles = (M + 7) / 8;
      for (int64_t m = 0; m < M; m += 8)
        linear_panels_rows(std::min<int64_t>(8, M - m), xp + m * ldx, ldx, K, panel, next,
                           b ? b + n0 : nullptr, cols, op + m * ldo + n0, ldo, m / 8, tiles);
    }
  });
#endif
}

}  // namespace prefixgate
