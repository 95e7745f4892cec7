// The paged KV cache as the attention kernels read it (decode_attention.cpp,
// prefill_attention.cpp), and the argument checks they share (internal linkage: each source file
// gets its own copy).
//
//   query        [R, H, D]                             cache dtype, last dim contiguous
//   out          [R, H, D]                             cache dtype, last dim contiguous
//   kv_cache     [2, num_blocks, block_size, KVH, D]   index 0 = K, 1 = V, last dim contiguous,
//                                                      other strides free (the engine stores
//                                                      it head-major: [2, blocks, KVH, bs, D])
//   block_tables [S, max_blocks]  int32 or int64       token t of s is in block table[s, t / bs]
//
// R is the query rows of the call: one per sequence for decodes, one per new token for prefills.
//
//   paged_layout(op, out, query, kv_cache, block_tables, indices)
//                                   checks the above (and the call's other 1-D index tensors:
//                                   int32 or int64, contiguous, on CPU) and returns the sizes and
//                                   strides the kernels read
//   check_blocks(lay, table, s, len)  sequence s's table row covers len tokens with valid blocks
//   row_offsets(lay, table, s, len, offs)
//                                   offs[t] = where token t's row starts, relative to its
//                                   (K or V, head) base, for t < len (the table checked before)
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>

namespace {

struct PagedLayout {
  int64_t num_rows, num_heads, kv_heads, group, head_dim, block_size, num_blocks;
  int64_t q_row, q_head;                   // query strides
  int64_t o_row, o_head;                   // out strides
  int64_t c_kv, c_block, c_token, c_head;  // cache strides
  int64_t table_row, max_blocks;           // block table row stride and width
  bool table64;                            // int64 (else int32) block table
};

inline int64_t read_index(const void* base, bool is64, int64_t i) {
  return is64 ? static_cast<const int64_t*>(base)[i] : static_cast<const int32_t*>(base)[i];
}

inline PagedLayout paged_layout(const char* op, const at::Tensor& out, const at::Tensor& query,
                                const at::Tensor& kv_cache, const at::Tensor& block_tables,
                                std::initializer_list<const at::Tensor*> indices) {
  TORCH_CHECK(query.dim() == 3 && out.dim() == 3 && kv_cache.dim() == 5, op,
              ": expected query/out [R, H, D] and kv_cache [2, num_blocks, block_size, KVH, D]");
  TORCH_CHECK(block_tables.dim() == 2, op, ": block_tables must be [S, max_blocks]");
  for (const at::Tensor* t : indices) TORCH_CHECK(t->dim() == 1, op, ": bad index tensor rank");
  for (const at::Tensor* t : {&out, &query, &kv_cache, &block_tables})
    TORCH_CHECK(t->device().is_cpu(), op, " runs on CPU tensors");
  const auto dtype = kv_cache.scalar_type();
  TORCH_CHECK(query.scalar_type() == dtype && out.scalar_type() == dtype,
              "query, out and kv_cache must share a dtype");
  auto check_index = [op](const at::Tensor& t) {
    TORCH_CHECK(t.device().is_cpu(), op, " runs on CPU tensors");
    TORCH_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, op,
                ": block_tables and the index tensors must be int32 or int64");
    TORCH_CHECK(t.stride(-1) == 1, op, ": index rows must be contiguous");
  };
  check_index(block_tables);
  for (const at::Tensor* t : indices) check_index(*t);
  PagedLayout lay{};
  lay.num_rows = query.size(0);
  lay.num_heads = query.size(1);
  lay.head_dim = query.size(2);
  lay.kv_heads = kv_cache.size(3);
  lay.block_size = kv_cache.size(2);
  lay.num_blocks = kv_cache.size(1);
  TORCH_CHECK(kv_cache.size(0) == 2 && kv_cache.size(4) == lay.head_dim, "bad kv_cache shape");
  TORCH_CHECK(lay.kv_heads > 0 && lay.num_heads % lay.kv_heads == 0,
              "H must be a multiple of KVH");
  lay.group = lay.num_heads / lay.kv_heads;
  TORCH_CHECK(out.sizes() == query.sizes(), "out must have the query's shape");
  TORCH_CHECK(query.stride(2) == 1 && out.stride(2) == 1 && kv_cache.stride(4) == 1,
              "the head dimension must be contiguous");
  lay.q_row = query.stride(0);
  lay.q_head = query.stride(1);
  lay.o_row = out.stride(0);
  lay.o_head = out.stride(1);
  lay.c_kv = kv_cache.stride(0);
  lay.c_block = kv_cache.stride(1);
  lay.c_token = kv_cache.stride(2);
  lay.c_head = kv_cache.stride(3);
  lay.table_row = block_tables.stride(0);
  lay.max_blocks = block_tables.size(1);
  lay.table64 = block_tables.scalar_type() == at::kLong;
  return lay;
}

inline void check_blocks(const PagedLayout& lay, const void* table, int64_t seq, int64_t len) {
  TORCH_CHECK(len <= lay.max_blocks * lay.block_size, "seq_len ", len,
              " exceeds the block table");
  for (int64_t b = 0; b * lay.block_size < len; ++b) {
    const int64_t block = read_index(table, lay.table64, seq * lay.table_row + b);
    TORCH_CHECK(block >= 0 && block < lay.num_blocks, "block id ", block, " out of range");
  }
}

inline void row_offsets(const PagedLayout& lay, const void* table, int64_t seq, int64_t len,
                        int64_t* offs) {
  for (int64_t t0 = 0, b = 0; t0 < len; t0 += lay.block_size, ++b) {
    const int64_t block = read_index(table, lay.table64, seq * lay.table_row + b);
    const int64_t n = std::min(lay.block_size, len - t0);
    for (int64_t j = 0; j < n; ++j) offs[t0 + j] = block * lay.c_block + j * lay.c_token;
  }
}

}  // namespace
