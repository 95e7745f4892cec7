// A step's whole stack of Llama decoder layers in one call (bfloat16, panel-packed weights):
// the same ops in the same order as the Python layer (engine/models/llama.py,
// `LlamaDecoderLayer.forward`, and `kernels.cpu_attention.paged_attention` for its attention),
// without ~15 Python-to-torch dispatches per layer. On a 2-core CPU those cost ~2 ms of a ~12 ms
// single-sequence decode step, and in a server every one of them is a point where the engine
// thread drops the GIL and may wait for the event loop to give it back.
//
//   x          [T, hidden]     the residual stream, updated in place (residual adds fused into
//                              the norms as in Python); the previous layer's output `delta` is
//                              added by the first norm
//   weights    6 per layer     input norm, qkv panels, o panels, post-attention norm,
//                              gate_up panels, down panels (`kernels.cpu_ops.pack_panels`)
//   qkv_biases none or one per layer
//   kv_caches  per layer       [2, num_blocks, block_size, KVH, D], written at slot_mapping
//   cos, sin   [T, D]; slot_mapping [T] int64
//   attention, as `kernels.cpu_attention._Plan` lays it out:
//     decode_lens   [S_d] or None   sequences decoding one token (the decode kernel), with
//     decode_tables [S_d, max_blocks] their block tables and
//     decode_rows   [S_d] or None   their query rows (None: every row, in order)
//     prefill_ids   [S_p] or None   sequences with more new tokens (the prefill kernel), over the
//                                   step's block_tables [S, max_blocks], query_start_loc [S + 1]
//                                   and seq_lens [S]
//     groups        [S] or None     the prefill kernel's decodes that share leading key blocks:
//     group_keys    [num_groups]    each sequence's group (-1: none) and the keys each shares
//
// Returns the last layer's MLP output (the `delta` of the final norm).

#include <ATen/ATen.h>

#include <cstdint>
#include <cstring>
#include <optional>

#include "ops.h"

namespace {

// cache[0 / 1][slot / bs, slot % bs] = k / v rows, as `kernels.reference.write_kv`
void write_kv(const at::Tensor& cache, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& slots) {
  TORCH_CHECK(cache.dim() == 5 && cache.stride(4) == 1 && k.stride(2) == 1 && v.stride(2) == 1,
              "write_kv: cache [2, blocks, block_size, KVH, D] and k, v [T, KVH, D], D contiguous");
  TORCH_CHECK(cache.scalar_type() == k.scalar_type() && cache.scalar_type() == v.scalar_type(),
              "write_kv: k, v and the cache must share a dtype");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous() &&
                  slots.numel() == k.size(0),
              "write_kv: slot_mapping must be a contiguous int64 [T]");
  TORCH_CHECK(cache.size(3) == k.size(1) && cache.size(4) == k.size(2), "write_kv: bad shapes");
  const int64_t T = k.size(0), heads = k.size(1), row = k.size(2) * cache.element_size();
  const int64_t bs = cache.size(2), slots_total = cache.size(1) * bs;
  const int64_t elem = cache.element_size();
  char* base = static_cast<char*>(cache.mutable_data_ptr());
  const int64_t* sp = slots.const_data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) {
    const int64_t slot = sp[t];
    TORCH_CHECK(slot >= 0 && slot < slots_total, "write_kv: slot ", slot, " out of range");
    const int64_t block = slot / bs, off = slot % bs;
    for (int which = 0; which < 2; ++which) {
      const at::Tensor& src = which == 0 ? k : v;
      const char* s = static_cast<const char*>(src.const_data_ptr());
      for (int64_t h = 0; h < heads; ++h) {
        char* dst = base + elem * (which * cache.stride(0) + block * cache.stride(1) +
                                   off * cache.stride(2) + h * cache.stride(3));
        std::memcpy(dst, s + elem * (t * src.stride(0) + h * src.stride(1)), row);
      }
    }
  }
}

// attn [T, H, D] = attention of q over the caches, as `kernels.cpu_attention.paged_attention`
struct AttentionPlan {
  std::optional<at::Tensor> decode_rows, decode_tables, decode_lens, prefill_ids;
  std::optional<at::Tensor> block_tables, query_start_loc, seq_lens, groups, group_keys;
};

void attention(const at::Tensor& attn, const at::Tensor& q, const at::Tensor& cache,
               const AttentionPlan& p, double scale) {
  if (p.decode_lens) {
    if (!p.decode_rows) {
      prefixgate::paged_decode_attention(attn, q, cache, *p.decode_tables, *p.decode_lens, scale);
    } else {
      const at::Tensor rows_q = q.index_select(0, *p.decode_rows);
      const at::Tensor rows_out = at::empty_like(rows_q);
      prefixgate::paged_decode_attention(rows_out, rows_q, cache, *p.decode_tables,
                                         *p.decode_lens, scale);
      attn.index_copy_(0, *p.decode_rows, rows_out);
    }
  }
  if (p.prefill_ids)
    prefixgate::paged_prefill_attention(attn, q, cache, *p.block_tables, *p.query_start_loc,
                                        *p.seq_lens, *p.prefill_ids, scale, p.groups,
                                        p.group_keys);
}

}  // namespace

namespace prefixgate {  // ops.h

at::Tensor layer_stack(const at::Tensor& x, const std::optional<at::Tensor>& delta_in,
                       at::TensorList weights, at::TensorList qkv_biases,
                       at::TensorList kv_caches, const at::Tensor& cos, const at::Tensor& sin,
                       const at::Tensor& slot_mapping, const std::optional<at::Tensor>& decode_rows,
                       const std::optional<at::Tensor>& decode_tables,
                       const std::optional<at::Tensor>& decode_lens,
                       const std::optional<at::Tensor>& prefill_ids,
                       const std::optional<at::Tensor>& block_tables,
                       const std::optional<at::Tensor>& query_start_loc,
                       const std::optional<at::Tensor>& seq_lens, int64_t num_heads,
                       int64_t kv_heads, int64_t head_dim, int64_t intermediate, double eps,
                       double scale, const std::optional<at::Tensor>& groups,
                       const std::optional<at::Tensor>& group_keys) {
  const int64_t L = static_cast<int64_t>(kv_caches.size());
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == 6 * L, "layer_stack: 6 weights per layer");
  TORCH_CHECK(qkv_biases.empty() || static_cast<int64_t>(qkv_biases.size()) == L,
              "layer_stack: no qkv bias or one per layer");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kBFloat16,
              "layer_stack: x must be a contiguous bfloat16 [T, hidden]");
  TORCH_CHECK(decode_lens.has_value() == decode_tables.has_value(),
              "layer_stack: decode_tables and decode_lens go together");
  TORCH_CHECK(!decode_rows || decode_lens, "layer_stack: decode_rows without decode_lens");
  TORCH_CHECK(!prefill_ids || (block_tables && query_start_loc && seq_lens),
              "layer_stack: prefill_ids need block_tables, query_start_loc and seq_lens");
  TORCH_CHECK(decode_lens || prefill_ids, "layer_stack: no sequence to attend");
  TORCH_CHECK(!groups || prefill_ids, "layer_stack: groups without prefill_ids");
  const AttentionPlan plan{decode_rows,  decode_tables,   decode_lens, prefill_ids,
                           block_tables, query_start_loc, seq_lens,    groups,
                           group_keys};
  const int64_t T = x.size(0), hidden = x.size(1);
  const int64_t H = num_heads, KVH = kv_heads, D = head_dim;
  const int64_t q_size = H * D, qk_size = (H + KVH) * D, qkv_out = qk_size + KVH * D;
  const auto opts = x.options();
  at::Tensor h = at::empty({T, hidden}, opts);
  at::Tensor qkv = at::empty({T, qkv_out}, opts);
  at::Tensor attn = at::empty({T, H, D}, opts);
  at::Tensor o = at::empty({T, hidden}, opts);
  at::Tensor gate_up = at::empty({T, 2 * intermediate}, opts);
  at::Tensor act = at::empty({T, intermediate}, opts);
  at::Tensor delta = at::empty({T, hidden}, opts);  // read by the next layer's first norm
  // views into qkv, as the Python layer takes them
  const at::Tensor qk = qkv.narrow(1, 0, qk_size).view({T, H + KVH, D});
  const at::Tensor q = qk.narrow(1, 0, H), k = qk.narrow(1, H, KVH);
  const at::Tensor v = qkv.narrow(1, qk_size, KVH * D).view({T, KVH, D});
  const at::Tensor attn_rows = attn.view({T, q_size});
  std::optional<at::Tensor> residual = delta_in;
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor* w = weights.data() + 6 * l;
    std::optional<at::Tensor> bias;
    if (!qkv_biases.empty()) bias = qkv_biases[l];
    prefixgate::rms_norm(h, x, residual, w[0], eps);
    prefixgate::linear_bf16(qkv, h, w[1], bias);
    prefixgate::rope(qk, cos, sin);
    write_kv(kv_caches[l], k, v, slot_mapping);
    attention(attn, q, kv_caches[l], plan, scale);
    prefixgate::linear_bf16(o, attn_rows, w[2], std::nullopt);
    prefixgate::rms_norm(h, x, o, w[3], eps);
    prefixgate::linear_bf16(gate_up, h, w[4], std::nullopt);
    prefixgate::silu_mul(act, gate_up);
    prefixgate::linear_bf16(delta, act, w[5], std::nullopt);
    residual = delta;
  }
  return delta;
}

}  // namespace prefixgate
