// The library's tensor-level entry points, for use across its source files (each is also a
// `torch.ops.prefixgate_cpu` op; see the file that defines it for shapes and semantics).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace prefixgate {

// cpu_attention.cpp
void paged_decode_attention(const at::Tensor& out, const at::Tensor& query,
                            const at::Tensor& kv_cache, const at::Tensor& block_tables,
                            const at::Tensor& seq_lens, double scale);

// cpu_prefill.cpp
void paged_prefill_attention(const at::Tensor& out, const at::Tensor& query,
                             const at::Tensor& kv_cache, const at::Tensor& block_tables,
                             const at::Tensor& query_start_loc, const at::Tensor& seq_lens,
                             const at::Tensor& seq_ids, double scale);

// cpu_ops.cpp
void rms_norm(const at::Tensor& out, const at::Tensor& x, const std::optional<at::Tensor>& residual,
              const at::Tensor& weight, double eps);
void rope(const at::Tensor& qk, const at::Tensor& cos, const at::Tensor& sin);
void silu_mul(const at::Tensor& out, const at::Tensor& gate_up);
void linear_bf16(const at::Tensor& out, const at::Tensor& x, const at::Tensor& packed,
                 const std::optional<at::Tensor>& bias);

}  // namespace prefixgate
