// The library's op registration: every `torch.ops.prefixgate_cpu` schema (what Python calls and
// how torch checks it) and its CPU implementation (ops.h). Loading the built library runs these
// blocks. `Tensor(a!)` marks an argument the op writes in place.

#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(prefixgate_cpu, m) {
  // attention (decode_attention.cpp, prefill_attention.cpp)
  m.def(
      "paged_decode_attention(Tensor(a!) out, Tensor query, Tensor kv_cache, "
      "Tensor block_tables, Tensor seq_lens, float scale) -> ()");
  m.def(
      "paged_prefill_attention(Tensor(a!) out, Tensor query, Tensor kv_cache, "
      "Tensor block_tables, Tensor query_start_loc, Tensor seq_lens, Tensor seq_ids, "
      "float scale, Tensor? groups=None, Tensor? group_keys=None) -> ()");
  m.def("prefill_vectorized(int head_dim) -> bool", &prefixgate::prefill_vectorized);
  // per-row ops (row_ops.cpp)
  m.def("rms_norm(Tensor(a!) out, Tensor(b!) x, Tensor? residual, Tensor weight, float eps) -> ()");
  m.def("rope(Tensor(a!) qk, Tensor cos, Tensor sin) -> ()");
  m.def("silu_mul(Tensor(a!) out, Tensor gate_up) -> ()");
  m.def("argmax_rows(Tensor(a!) out, Tensor x) -> ()");
  m.def("mask_rows(Tensor(a!) x, Tensor bitmask, Tensor rows) -> ()");
  // linear (linear.cpp)
  m.def("has_linear_bf16() -> bool", &prefixgate::has_linear_bf16);
  m.def("has_linear_amx() -> bool", &prefixgate::has_linear_amx);
  m.def("linear_bf16(Tensor(a!) out, Tensor x, Tensor packed, Tensor? bias) -> ()");
  // the fixed-order linear (linear_fixed.cpp)
  m.def("linear_fixed(Tensor(a!) out, Tensor x, Tensor panels, Tensor? bias, bool plain) -> ()");
  // a step's decoder layers (layer_stack.cpp)
  m.def(
      "layer_stack(Tensor(a!) x, Tensor? delta, Tensor[] weights, Tensor[] qkv_biases, "
      "Tensor(b!)[] kv_caches, Tensor cos, Tensor sin, Tensor slot_mapping, Tensor? decode_rows, "
      "Tensor? decode_tables, Tensor? decode_lens, Tensor? prefill_ids, Tensor? block_tables, "
      "Tensor? query_start_loc, Tensor? seq_lens, int num_heads, int kv_heads, int head_dim, "
      "int intermediate, float eps, float scale, Tensor? groups=None, "
      "Tensor? group_keys=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(prefixgate_cpu, CPU, m) {
  m.impl("paged_decode_attention", &prefixgate::paged_decode_attention);
  m.impl("paged_prefill_attention", &prefixgate::paged_prefill_attention);
  m.impl("rms_norm", &prefixgate::rms_norm);
  m.impl("rope", &prefixgate::rope);
  m.impl("silu_mul", &prefixgate::silu_mul);
  m.impl("argmax_rows", &prefixgate::argmax_rows);
  m.impl("mask_rows", &prefixgate::mask_rows);
  m.impl("linear_bf16", &prefixgate::linear_bf16);
  m.impl("linear_fixed", &prefixgate::linear_fixed);
  m.impl("layer_stack", &prefixgate::layer_stack);
}
