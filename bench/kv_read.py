"""How fast a decode step's K/V can be read on this CPU, against what the attention kernel reads.

A decode step at 64 streams reads every sequence's K and V rows once per layer (~23 KB per token
of context for SmolLM2 in bfloat16), scattered over the paged cache. This times, over the same
cache (30 layers of `[2, blocks, 16, KV heads, head_dim]`, SmolLM2's shapes by default):

- `attention`: the prefill kernel's one-token items (what decodes run, `kernels.cpu_attention`);
- `rows`: a read-only pass in the kernel's order: per (sequence, KV head), each key's K and V row
  (128 bytes each at head_dim 64, a KV head's slice of every token's row);
- `stripes`: a read-only pass per sequence over whole token rows (every KV head's slice at once);
- `attention hm`, `rows hm`: the same two over the cache stored head-major, as the engine stores
  it (`[2, blocks, KV heads, 16, head_dim]`: a KV head's 16 rows of a block are one 2 KB run);
- `stream`: a plain sum over the same number of contiguous bytes (`torch.sum`, PyTorch's threads).

each with the sequences' blocks in order (a prompt's blocks, allocated together) and shuffled (the
blocks that decodes append one at a time, interleaved with the other sequences'). The read-only
passes are a few lines of C++ built here with `torch.utils.cpp_extension` (not the engine's
kernels), vectorized loads and adds on the OpenMP threads; they bound what any kernel that reads
the rows in that order can reach. Printed as K/V GB/s (bytes of the keys read / time, medians of
calls made round-robin for `--budget-s`, bench/attention.py's `time_interleaved`).

Usage: python bench/kv_read.py [--seqs 64] [--tokens 420] [--kv-heads 3] [--head-dim 64]
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Callable

import _record
import torch
from attention import make_metadata, time_interleaved

from kernels import cpu_attention
from kernels.metadata import AttentionMetadata

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <vector>

// Every K and V row of the keys loaded (256-bit loads, added as integers: the value is
// meaningless, the reads are the point), in `order`: 0 per (sequence, KV head) row by row, as the
// kernel reads them; 1 per sequence, whole token rows (every KV head's slice at once).
int64_t read_kv(const at::Tensor& cache, const at::Tensor& tables, int64_t keys, int64_t order) {
  const int64_t seqs = tables.size(0), width = tables.size(1), block = cache.size(2);
  const int64_t kv_heads = cache.size(3), dim = cache.size(4);
  const int64_t c_kv = cache.stride(0), c_block = cache.stride(1), c_token = cache.stride(2);
  const int64_t c_head = cache.stride(3);
  TORCH_CHECK(order == 0 || c_head == dim, "whole token rows need a token-major cache");
  const auto* base = reinterpret_cast<const c10::BFloat16*>(cache.const_data_ptr());
  const int32_t* table = tables.const_data_ptr<int32_t>();
  const int64_t items = order == 0 ? seqs * kv_heads : seqs;
  const int64_t span = order == 0 ? dim : kv_heads * dim;  // elements read per key, K and V each
  std::vector<int64_t> sums(items);
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    for (int64_t it = begin; it < end; ++it) {
      const int64_t s = order == 0 ? it / kv_heads : it, h = order == 0 ? it % kv_heads : 0;
      __m256i acc = _mm256_setzero_si256();
      for (int64_t j0 = 0; j0 < keys; j0 += block) {
        const c10::BFloat16* first = base + table[s * width + j0 / block] * c_block + h * c_head;
        for (int64_t j = 0; j < block && j0 + j < keys; ++j) {
          const c10::BFloat16* k = first + j * c_token;
          for (int64_t x = 0; x < span; x += 16) {
            const auto* kx = reinterpret_cast<const __m256i*>(k + x);
            const auto* vx = reinterpret_cast<const __m256i*>(k + c_kv + x);
            acc = _mm256_add_epi32(acc, _mm256_loadu_si256(kx));
            acc = _mm256_add_epi32(acc, _mm256_loadu_si256(vx));
          }
        }
      }
      alignas(32) int32_t lanes[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), acc);
      sums[it] = lanes[0];
    }
  });
  int64_t total = 0;
  for (int64_t x : sums) total += x;
  return total;
}
"""


def build() -> Callable[..., int]:
    """`read_kv`, built once into PyTorch's extension cache (again only when SOURCE changes)."""
    from torch.utils.cpp_extension import load_inline

    module = load_inline(
        "prefixgate_kv_read",
        cpp_sources=SOURCE,
        functions=["read_kv"],
        extra_cflags=["-O3", "-mavx2", "-fopenmp"],
    )
    return module.read_kv  # type: ignore[no-any-return]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seqs", type=int, default=64, help="decodes in the step (default 64)")
    p.add_argument("--tokens", type=int, default=420, help="context of each (default 420)")
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--budget-s", type=float, default=3.0, help="timing per layout (medians)")
    p.add_argument("--seed", type=int, default=0)
    _record.add_arguments(p)
    args = p.parse_args()
    if cpu_attention.load_kernel() is None:
        raise SystemExit("the C++ attention kernels could not be built here")
    read_kv = build()
    dtype, bs, d = torch.bfloat16, args.block_size, args.head_dim
    per_seq = -(-args.tokens // bs)
    blocks = per_seq * args.seqs + 1
    caches = [torch.randn(2, blocks, bs, args.kv_heads, d).to(dtype) for _ in range(args.layers)]
    head_major = [c.transpose(2, 3).contiguous().transpose(2, 3) for c in caches]
    kv_bytes = args.seqs * args.tokens * args.layers * args.kv_heads * d * 2 * dtype.itemsize
    flat = torch.ones(kv_bytes // 4, dtype=torch.float32)
    query = torch.randn(args.seqs, args.heads, d).to(dtype)
    out = torch.empty_like(query)
    ids = torch.arange(args.seqs)
    print(
        f"{args.seqs} decodes x {args.tokens} tokens x {args.layers} layers: "
        f"{kv_bytes / 1e6:.0f} MB of K/V per step, {torch.get_num_threads()} threads"
    )
    figures: dict[str, dict[str, float]] = {}
    for layout in ("in order", "shuffled"):
        order = list(range(1, blocks))
        if layout == "shuffled":
            random.Random(args.seed).shuffle(order)
        rows = [order[s * per_seq : (s + 1) * per_seq] for s in range(args.seqs)]
        meta = make_metadata(rows, [(args.tokens, 1)] * args.seqs, bs, query.device)
        tables = meta.block_tables

        def attention(layers: list[torch.Tensor], meta: AttentionMetadata = meta) -> None:
            for cache in layers:
                cpu_attention.paged_prefill(query, cache, meta, d**-0.5, out, ids, None)

        def read(layers: list[torch.Tensor], order: int, tables: torch.Tensor = tables) -> None:
            for cache in layers:
                read_kv(cache, tables, args.tokens, order)

        runs = {
            "attention": lambda: attention(caches),
            "rows": lambda: read(caches, 0),
            "stripes": lambda: read(caches, 1),
            "attention hm": lambda: attention(head_major),
            "rows hm": lambda: read(head_major, 0),
        }
        ms = time_interleaved(runs | {"stream": flat.sum}, args.budget_s)
        figures[layout] = {name: kv_bytes / t / 1e6 for name, t in ms.items()}
        line = "  ".join(
            f"{name} {t:.1f} ms = {kv_bytes / t / 1e6:.1f} GB/s" for name, t in ms.items()
        )
        print(f"blocks {layout:8s}: {line}")
    _record.write(args, __file__, {"kv_bytes": kv_bytes, "gbps": figures})


if __name__ == "__main__":
    main()
