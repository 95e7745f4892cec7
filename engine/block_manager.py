"""Paged KV-cache bookkeeping: block pool, prefix cache by hash chain, LRU free queue, fork/CoW.

Pure Python on purpose (no torch): the scheduler calls it on every step and its unit tests run in
microseconds. The model runner never calls it; it only sees block ids in the scheduler's output.

A sequence's tokens map onto its block table like this (block_size = 4):

    tokens      | t0 t1 t2 t3 | t4 t5 t6 t7 | t8 t9 .  . |
    block table |   blk 7     |   blk 2     |   blk 9    |
    hash        |   h0        |   h1        |   None     |   h_i = H(h_{i-1}, tokens of i, ns)
                  full, cached  full, cached  partial: never cached, copied on write if shared

Only full blocks get a hash. A block is cached (findable by hash) from the moment its tokens are
scheduled: within one step every layer writes all new K/V before any attention reads, so a second
sequence that hits it in the same step reads correct values.
"""

from __future__ import annotations

import hashlib
import struct
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(slots=True, eq=False)
class KVBlock:
    """One block of `block_size` token slots in every layer's KV cache."""

    block_id: int
    ref_cnt: int = 0  # sequences (and later pins) holding it; never negative
    block_hash: bytes | None = None  # set once when full and cached; None otherwise
    prev_free: KVBlock | None = None  # links of the free queue, None when not in it
    next_free: KVBlock | None = None


class FreeBlockQueue:
    """Doubly linked queue of blocks with ref_cnt == 0, O(1) everywhere.

    Ordering: the front is evicted first. Freed cached blocks go to the back (least recently used
    first out), so a freed block keeps its hash and can be revived by a cache hit until it reaches
    the front and is reused. Freed uncached blocks go to the front: they hold nothing worth keeping.
    """

    def __init__(self, blocks: Sequence[KVBlock]) -> None:
        self._head = KVBlock(-1)  # sentinels
        self._tail = KVBlock(-1)
        self._head.next_free = self._tail
        self._tail.prev_free = self._head
        self.num_free = 0
        for block in blocks:
            self.append(block)

    def popleft(self) -> KVBlock:
        block = self._head.next_free
        if block is None or block is self._tail:
            raise RuntimeError("no free KV blocks")
        self.remove(block)
        return block

    def append(self, block: KVBlock) -> None:
        self._link(block, self._tail.prev_free, self._tail)

    def appendleft(self, block: KVBlock) -> None:
        self._link(block, self._head, self._head.next_free)

    def remove(self, block: KVBlock) -> None:
        prev, nxt = block.prev_free, block.next_free
        assert prev is not None and nxt is not None, f"block {block.block_id} is not free"
        prev.next_free = nxt
        nxt.prev_free = prev
        block.prev_free = block.next_free = None
        self.num_free -= 1

    def _link(self, block: KVBlock, prev: KVBlock | None, nxt: KVBlock | None) -> None:
        assert prev is not None and nxt is not None
        assert block.prev_free is None and block.next_free is None, "block already free"
        block.prev_free, block.next_free = prev, nxt
        prev.next_free = block
        nxt.prev_free = block
        self.num_free += 1

    def __iter__(self):  # front to back; for tests and debugging
        block = self._head.next_free
        while block is not None and block is not self._tail:
            yield block
            block = block.next_free


def hash_block(parent: bytes | None, tokens: Sequence[int], namespace: str | None) -> bytes:
    """Stable content hash of one full block: identical across processes and replicas.

    Args:
        parent: hash of the previous block in the chain (None for the first block).
        tokens: the block's token ids.
        namespace: cache namespace (tenant salt); None is the global namespace.
    """
    h = hashlib.sha256()
    h.update(parent or b"\0" * 32)
    ns = (namespace or "").encode()
    h.update(struct.pack("<I", len(ns)))
    h.update(ns)
    h.update(struct.pack(f"<{len(tokens)}I", *tokens))
    return h.digest()


@dataclass(slots=True)
class SeqBlocks:
    """The blocks one sequence holds, in order, plus its hash-chain progress."""

    namespace: str | None
    tenant: str
    blocks: list[KVBlock] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)  # mirror of blocks, handed to the runner
    hashes: list[bytes] = field(default_factory=list)  # chain hashes of the leading full blocks


@dataclass(slots=True)
class BlockManagerStats:
    num_blocks: int
    num_free_blocks: int
    prefix_queries_tokens: int  # prompt tokens looked up in the prefix cache
    prefix_hits_tokens: int  # of which served from the cache
    evictions: int  # cached blocks whose content was dropped for reuse

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks


class BlockManager:
    """Allocates KV blocks to sequences, shares identical prefixes, copies on write after fork."""

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        assert num_blocks > 0 and block_size > 0
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.free_queue = FreeBlockQueue(self.blocks)
        self.cached: dict[bytes, KVBlock] = {}  # block hash -> block holding that content
        self.seqs: dict[int, SeqBlocks] = {}
        self.tenant_blocks: Counter[str] = Counter()  # block references held per tenant
        self.prefix_queries_tokens = 0
        self.prefix_hits_tokens = 0
        self.evictions = 0

    # ---- queries -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return self.free_queue.num_free

    def stats(self) -> BlockManagerStats:
        return BlockManagerStats(
            self.num_blocks,
            self.num_free_blocks,
            self.prefix_queries_tokens,
            self.prefix_hits_tokens,
            self.evictions,
        )

    def block_ids(self, seq_id: int) -> list[int]:
        return self.seqs[seq_id].block_ids

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def find_cached_prefix(self, token_ids: Sequence[int], namespace: str | None) -> list[KVBlock]:
        """Longest chain of cached full blocks that prefixes `token_ids`.

        At least one token is always left to compute (the model needs a query to produce logits),
        so a fully cached prompt reuses all blocks but the last.
        """
        if not self.enable_caching:
            return []
        hits: list[KVBlock] = []
        parent: bytes | None = None
        bs = self.block_size
        max_blocks = (len(token_ids) - 1) // bs
        for i in range(max_blocks):
            parent = hash_block(parent, token_ids[i * bs : (i + 1) * bs], namespace)
            block = self.cached.get(parent)
            if block is None:
                break
            hits.append(block)
        return hits

    # ---- allocation ----------------------------------------------------------------------
    def allocate(
        self,
        seq_id: int,
        token_ids: Sequence[int],
        num_new_tokens: int,
        namespace: str | None = None,
        tenant: str = "default",
    ) -> int | None:
        """Start a sequence: reuse its cached prefix, then allocate blocks for the new tokens.

        Args:
            seq_id: id of a sequence that holds no blocks.
            token_ids: all its known tokens (prompt, plus outputs when recomputing).
            num_new_tokens: tokens to compute this step after the cached prefix (capped by the
                caller's budget; also capped here to what is left after the hits).
            namespace: cache namespace; sequences in different namespaces never share blocks.
            tenant: owner, for per-tenant block accounting.

        Returns:
            The number of leading tokens served from the cache (the sequence's computed tokens),
            or None when there are not enough free blocks (nothing is changed then).
        """
        assert seq_id not in self.seqs, f"sequence {seq_id} already holds blocks"
        hits = self.find_cached_prefix(token_ids, namespace)
        num_cached = len(hits) * self.block_size
        num_new_tokens = min(num_new_tokens, len(token_ids) - num_cached)
        needed = self.blocks_needed(num_cached + num_new_tokens) - len(hits)
        revived = sum(1 for b in hits if b.ref_cnt == 0)
        if needed + revived > self.num_free_blocks:
            return None
        seq = SeqBlocks(namespace, tenant)
        self.seqs[seq_id] = seq
        for block in hits:
            self._take(seq, block)
        seq.hashes = [b.block_hash for b in hits if b.block_hash is not None]
        self._grow(seq, needed)
        self._cache_full_blocks(seq, token_ids, num_cached + num_new_tokens)
        self.prefix_queries_tokens += len(token_ids)
        self.prefix_hits_tokens += num_cached
        return num_cached

    def append_slots(
        self, seq_id: int, token_ids: Sequence[int], num_computed: int, num_new_tokens: int
    ) -> list[tuple[int, int]] | None:
        """Make room for `num_new_tokens` more tokens of a running sequence.

        Copy-on-write: if the block the first new token lands in is shared (after a fork), the
        sequence gets a private copy; the caller must copy the KV of each returned (src, dst) pair
        before the step runs.

        Returns:
            The (src, dst) block copies to perform, or None when blocks ran out (nothing changed).
        """
        seq = self.seqs[seq_id]
        total = num_computed + num_new_tokens
        needed = self.blocks_needed(total) - len(seq.blocks)
        first = num_computed // self.block_size
        cow = first < len(seq.blocks) and seq.blocks[first].ref_cnt > 1
        if max(needed, 0) + int(cow) > self.num_free_blocks:
            return None
        copies: list[tuple[int, int]] = []
        if cow:
            old = seq.blocks[first]
            new = self._pop_free()
            new.ref_cnt = 1
            seq.blocks[first] = new
            seq.block_ids[first] = new.block_id
            self._release(old)
            copies.append((old.block_id, new.block_id))
        self._grow(seq, needed)
        self._cache_full_blocks(seq, token_ids, total)
        return copies

    def fork(self, parent_id: int, child_id: int) -> None:
        """Give `child_id` the parent's blocks by reference (parallel sampling, n > 1)."""
        parent = self.seqs[parent_id]
        assert child_id not in self.seqs
        child = SeqBlocks(parent.namespace, parent.tenant, hashes=list(parent.hashes))
        self.seqs[child_id] = child
        for block in parent.blocks:
            self._take(child, block)

    def free(self, seq_id: int) -> None:
        """Drop a sequence's references (finish, abort, preemption). Cached blocks stay revivable.

        Blocks are released tail first, so when the queue evicts it takes a sequence's last blocks
        before the prefix blocks other requests are most likely to share.
        """
        seq = self.seqs.pop(seq_id, None)
        if seq is None:
            return
        self.tenant_blocks[seq.tenant] -= len(seq.blocks)
        if self.tenant_blocks[seq.tenant] == 0:
            del self.tenant_blocks[seq.tenant]
        for block in reversed(seq.blocks):
            self._release(block)

    # ---- internals -----------------------------------------------------------------------
    def _take(self, seq: SeqBlocks, block: KVBlock) -> None:
        if block.ref_cnt == 0:
            self.free_queue.remove(block)
        block.ref_cnt += 1
        seq.blocks.append(block)
        seq.block_ids.append(block.block_id)
        self.tenant_blocks[seq.tenant] += 1

    def _release(self, block: KVBlock) -> None:
        if block.ref_cnt <= 0:
            raise AssertionError(f"ref_cnt of block {block.block_id} would go negative")
        block.ref_cnt -= 1
        if block.ref_cnt == 0:
            if block.block_hash is None:
                self.free_queue.appendleft(block)
            else:
                self.free_queue.append(block)

    def _pop_free(self) -> KVBlock:
        block = self.free_queue.popleft()
        if block.block_hash is not None:
            if self.cached.get(block.block_hash) is block:
                del self.cached[block.block_hash]
            block.block_hash = None
            self.evictions += 1
        return block

    def _grow(self, seq: SeqBlocks, count: int) -> None:
        for _ in range(count):
            block = self._pop_free()
            block.ref_cnt = 1
            seq.blocks.append(block)
            seq.block_ids.append(block.block_id)
            self.tenant_blocks[seq.tenant] += 1

    def _cache_full_blocks(self, seq: SeqBlocks, token_ids: Sequence[int], num_tokens: int) -> None:
        """Hash and register every block that is full once `num_tokens` tokens are computed."""
        if not self.enable_caching:
            return
        bs = self.block_size
        num_full = min(num_tokens // bs, len(seq.blocks))
        parent = seq.hashes[-1] if seq.hashes else None
        for i in range(len(seq.hashes), num_full):
            parent = hash_block(parent, token_ids[i * bs : (i + 1) * bs], seq.namespace)
            seq.hashes.append(parent)
            block = seq.blocks[i]
            if block.block_hash is None and parent not in self.cached:
                block.block_hash = parent
                self.cached[parent] = block
