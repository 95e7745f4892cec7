// The library's ops, `torch.ops.prefixgate_cpu.<name>` (schemas and registration in
// registration.cpp), also called across its source files; see the file that defines each for
// shapes and semantics.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace prefixgate {

// decode_attention.cpp
void paged_decode_attention(const at::Tensor& out, const at::Tensor& query,
                            const at::Tensor& kv_cache, const at::Tensor& block_tables,
                            const at::Tensor& seq_lens, double scale);

// prefill_attention.cpp
void paged_prefill_attention(const at::Tensor& out, const at::Tensor& query,
                             const at::Tensor& kv_cache, const at::Tensor& block_tables,
                             const at::Tensor& query_start_loc, const at::Tensor& seq_lens,
                             const at::Tensor& seq_ids, double scale,
                             const std::optional<at::Tensor>& groups = std::nullopt,
                             const std::optional<at::Tensor>& group_keys = std::nullopt);
bool prefill_vectorized(int64_t head_dim);

// row_ops.cpp
void rms_norm(const at::Tensor& out, const at::Tensor& x, const std::optional<at::Tensor>& residual,
              const at::Tensor& weight, double eps);
void rope(const at::Tensor& qk, const at::Tensor& cos, const at::Tensor& sin);
void silu_mul(const at::Tensor& out, const at::Tensor& gate_up);
void argmax_rows(const at::Tensor& out, const at::Tensor& x);
void mask_rows(const at::Tensor& x, const at::Tensor& bitmask, const at::Tensor& rows);

// linear.cpp
bool has_linear_bf16();
bool has_linear_amx();
void linear_bf16(const at::Tensor& out, const at::Tensor& x, const at::Tensor& packed,
                 const std::optional<at::Tensor>& bias);

// linear_fixed.cpp
void linear_fixed(const at::Tensor& out, const at::Tensor& x, const at::Tensor& panels,
                  const std::optional<at::Tensor>& bias, bool plain);

// layer_stack.cpp
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
                       const std::optional<at::Tensor>& group_keys);

}  // namespace prefixgate
