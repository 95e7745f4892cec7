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

Pins: a registered prefix holds one reference on each of its full blocks (`Pin`), so the blocks
never reach the free queue and no memory pressure evicts them; when the pin ends (unpin, lease
expiry, or a re-pin of the key with other content) the references are released and the blocks
are ordinary cached blocks again, evicted LRU like any other. A block's `ref_cnt` is the number
of sequences plus pins holding it; `pin_cnt` is the pins' part of it.

Per-tenant charge (`tenant_blocks`, what the scheduler's `max_kv_blocks` caps): the distinct
blocks a tenant's sequences hold. A block several of its sequences share counts once; the
leading blocks of a public prefix (`shared_blocks`, hashed in PUBLIC_NAMESPACE) count for no
tenant. Pins are counted apart (`tenant_pinned`).

Pin cap: distinct pinned blocks never exceed `max_pinned_blocks`. The engine sets it to at most
half the pool and at most the pool minus what one request of the longest admissible length needs,
so the scheduler can always run the longest request beside every pin: pins cannot starve traffic.
"""

from __future__ import annotations

import hashlib
import struct
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from engine.errors import PinRefusedError


@dataclass(slots=True, eq=False)
class KVBlock:
    """One block of `block_size` token slots in every layer's KV cache."""

    block_id: int
    ref_cnt: int = 0  # sequences and pins holding it; never negative
    pin_cnt: int = 0  # of ref_cnt, the references held by pins
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


# Salt of the leading blocks of a public prefix, which every tenant shares: a request's first
# `shared_blocks` blocks are hashed in it, the blocks after them in the request's own namespace
# again, so what follows a shared prompt is never shared. No tenant namespace is ever "public".
PUBLIC_NAMESPACE = "public"


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


def chain_hashes(
    token_ids: Sequence[int], block_size: int, namespace: str | None, shared_blocks: int = 0
) -> Iterator[bytes]:
    """Hash chain of the full blocks of `token_ids`, lazily: blocks below `shared_blocks` in
    PUBLIC_NAMESPACE, the others in `namespace` (a router computes it too)."""
    parent: bytes | None = None
    bs = block_size
    for i in range(len(token_ids) // bs):
        ns = PUBLIC_NAMESPACE if i < shared_blocks else namespace
        parent = hash_block(parent, token_ids[i * bs : (i + 1) * bs], ns)
        yield parent


@dataclass(slots=True)
class SeqBlocks:
    """The blocks one sequence holds, in order, plus its hash-chain progress."""

    namespace: str | None
    tenant: str
    shared_blocks: int = 0  # leading blocks hashed in PUBLIC_NAMESPACE instead
    blocks: list[KVBlock] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)  # mirror of blocks, handed to the runner
    hashes: list[bytes] = field(default_factory=list)  # chain hashes of the leading full blocks


@dataclass(frozen=True, slots=True)
class PinSpec:
    """Pin a prefix once its request has computed it: what `Scheduler.finish` hands to `pin`."""

    key: str  # the pin's identity (e.g. owner and prefix name); re-pinning a key replaces it
    num_blocks: int  # leading full blocks of the request's prompt to pin
    expires_at: float | None = None  # lease end, epoch seconds; None: until unpinned


@dataclass(slots=True, eq=False)
class Pin:
    """A prefix's hold on its full blocks: one reference on each while it lives."""

    key: str
    tenant: str  # owner, for per-tenant pinned-block accounting
    blocks: list[KVBlock]  # the prefix's full blocks in chain order
    expires_at: float | None  # lease end, epoch seconds; None: until unpinned

    @property
    def block_ids(self) -> list[int]:
        return [b.block_id for b in self.blocks]


@dataclass(slots=True)
class AllocationPlan:
    """What `allocate` would do for a sequence, computed without changing anything
    (`plan_allocation`), so the caller can check its limits before `commit_allocation`."""

    token_ids: Sequence[int]
    namespace: str | None
    tenant: str
    shared_blocks: int
    hits: list[KVBlock]  # cached leading blocks to reuse
    num_new_tokens: int  # tokens to compute this step after the hits
    num_new_blocks: int  # blocks to take from the free queue for them
    num_revived: int  # hits that sit in the free queue (ref_cnt 0)
    num_charged: int  # blocks the tenant's charge (`tenant_blocks`) grows by

    @property
    def num_free_needed(self) -> int:
        return self.num_new_blocks + self.num_revived


@dataclass(slots=True)
class BlockManagerStats:
    num_blocks: int
    num_free_blocks: int
    prefix_queries_tokens: int  # prompt tokens looked up in the prefix cache
    prefix_hits_tokens: int  # of which served from the cache
    evictions: int  # cached blocks whose content was dropped for reuse
    num_pinned_blocks: int  # distinct blocks held by pins
    max_pinned_blocks: int  # the pin cap
    pinned_blocks_by_tenant: dict[str, int]  # blocks of each tenant's pins (summed over its pins)
    kv_blocks_by_tenant: dict[str, int]  # distinct blocks each tenant's sequences hold (charge)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks


class BlockManager:
    """Allocates KV blocks to sequences, shares identical prefixes, copies on write after fork,
    and pins registered prefixes.

    Args:
        num_blocks: blocks in the pool.
        block_size: token slots per block.
        enable_caching: share full blocks by content hash (pins need it).
        max_pinned_blocks: cap on distinct pinned blocks; None is half the pool.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_caching: bool = True,
        max_pinned_blocks: int | None = None,
    ) -> None:
        assert num_blocks > 0 and block_size > 0
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        if max_pinned_blocks is None:
            max_pinned_blocks = num_blocks // 2
        assert 0 <= max_pinned_blocks <= num_blocks
        self.max_pinned_blocks = max_pinned_blocks if enable_caching else 0
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.free_queue = FreeBlockQueue(self.blocks)
        self.cached: dict[bytes, KVBlock] = {}  # block hash -> block holding that content
        self.seqs: dict[int, SeqBlocks] = {}
        # The per-tenant charge (module docstring): distinct non-public blocks of its sequences,
        # and the references behind it, by (tenant, block id); zero entries are deleted.
        self.tenant_blocks: Counter[str] = Counter()
        self._tenant_refs: Counter[tuple[str, int]] = Counter()
        self.pins: dict[str, Pin] = {}
        self.num_pinned_blocks = 0  # blocks with pin_cnt > 0
        self.tenant_pinned: Counter[str] = Counter()  # blocks of each tenant's pins
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
            self.num_pinned_blocks,
            self.max_pinned_blocks,
            dict(self.tenant_pinned),
            dict(self.tenant_blocks),
        )

    def block_ids(self, seq_id: int) -> list[int]:
        return self.seqs[seq_id].block_ids

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def find_cached_prefix(
        self, token_ids: Sequence[int], namespace: str | None, shared_blocks: int = 0
    ) -> list[KVBlock]:
        """Longest chain of cached full blocks that prefixes `token_ids`.

        At least one token is always left to compute (the model needs a query to produce logits),
        so a fully cached prompt reuses all blocks but the last.
        """
        if not self.enable_caching:
            return []
        hits: list[KVBlock] = []
        prompt = token_ids[: len(token_ids) - 1]
        for h in self.chain_hashes(prompt, namespace, shared_blocks):
            block = self.cached.get(h)
            if block is None:
                break
            hits.append(block)
        return hits

    def chain_hashes(
        self, token_ids: Sequence[int], namespace: str | None, shared_blocks: int = 0
    ) -> Iterator[bytes]:
        """Hash chain of the full blocks of `token_ids`, lazily (callers may stop early): blocks
        below `shared_blocks` in PUBLIC_NAMESPACE, the others in `namespace`."""
        return chain_hashes(token_ids, self.block_size, namespace, shared_blocks)

    # ---- allocation ----------------------------------------------------------------------
    def allocate(
        self,
        seq_id: int,
        token_ids: Sequence[int],
        num_new_tokens: int,
        namespace: str | None = None,
        tenant: str = "default",
        shared_blocks: int = 0,
    ) -> int | None:
        """Start a sequence: reuse its cached prefix, then allocate blocks for the new tokens.

        Args:
            seq_id: id of a sequence that holds no blocks.
            token_ids: all its known tokens (prompt, plus outputs when recomputing).
            num_new_tokens: tokens to compute this step after the cached prefix (capped by the
                caller's budget; also capped here to what is left after the hits).
            namespace: cache namespace; sequences in different namespaces never share blocks.
            tenant: owner, for per-tenant block accounting.
            shared_blocks: leading blocks that are a public prefix's, hashed in
                PUBLIC_NAMESPACE (shared by every tenant); the rest in `namespace`.

        Returns:
            The number of leading tokens served from the cache (the sequence's computed tokens),
            or None when there are not enough free blocks (nothing is changed then).
        """
        assert seq_id not in self.seqs, f"sequence {seq_id} already holds blocks"
        plan = self.plan_allocation(token_ids, num_new_tokens, namespace, tenant, shared_blocks)
        if plan.num_free_needed > self.num_free_blocks:
            return None
        return self.commit_allocation(seq_id, plan)

    def plan_allocation(
        self,
        token_ids: Sequence[int],
        num_new_tokens: int,
        namespace: str | None = None,
        tenant: str = "default",
        shared_blocks: int = 0,
    ) -> AllocationPlan:
        """What `allocate` with these arguments would take; changes nothing."""
        hits = self.find_cached_prefix(token_ids, namespace, shared_blocks)
        num_cached = len(hits) * self.block_size
        num_new_tokens = min(num_new_tokens, len(token_ids) - num_cached)
        needed = self.blocks_needed(num_cached + num_new_tokens) - len(hits)
        revived = sum(1 for b in hits if b.ref_cnt == 0)
        refs = self._tenant_refs
        charged = sum(
            1 for i, b in enumerate(hits) if i >= shared_blocks and (tenant, b.block_id) not in refs
        ) + self._charged_new(len(hits), needed, shared_blocks)
        return AllocationPlan(
            token_ids, namespace, tenant, shared_blocks, hits, num_new_tokens, needed, revived,
            charged,
        )  # fmt: skip

    def commit_allocation(self, seq_id: int, plan: AllocationPlan) -> int:
        """Carry out `plan` for `seq_id` (made just before, with enough free blocks).

        Returns:
            The number of leading tokens served from the cache.
        """
        assert seq_id not in self.seqs and plan.num_free_needed <= self.num_free_blocks
        seq = SeqBlocks(plan.namespace, plan.tenant, plan.shared_blocks)
        self.seqs[seq_id] = seq
        for block in plan.hits:
            self._take(seq, block)
        seq.hashes = [b.block_hash for b in plan.hits if b.block_hash is not None]
        self._grow(seq, plan.num_new_blocks)
        num_cached = len(plan.hits) * self.block_size
        self._cache_full_blocks(seq, plan.token_ids, num_cached + plan.num_new_tokens)
        self.prefix_queries_tokens += len(plan.token_ids)
        self.prefix_hits_tokens += num_cached
        return num_cached

    def append_charge(self, seq_id: int, num_computed: int, num_new_tokens: int) -> int:
        """How much `append_slots` with these arguments would grow the tenant's charge (at most:
        a copy-on-write counts as a new block)."""
        seq = self.seqs[seq_id]
        needed = max(self.blocks_needed(num_computed + num_new_tokens) - len(seq.blocks), 0)
        first = num_computed // self.block_size
        cow = first < len(seq.blocks) and seq.blocks[first].ref_cnt > 1
        return self._charged_new(len(seq.blocks), needed, seq.shared_blocks) + int(
            cow and first >= seq.shared_blocks
        )

    @staticmethod
    def _charged_new(start: int, count: int, shared_blocks: int) -> int:
        """Of `count` new blocks at indices from `start`, those past the public prefix."""
        return max(0, start + count - max(shared_blocks, start))

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
            if first >= seq.shared_blocks:
                self._uncharge(seq.tenant, old)
                self._charge(seq.tenant, new)
            self._release(old)
            copies.append((old.block_id, new.block_id))
        self._grow(seq, needed)
        self._cache_full_blocks(seq, token_ids, total)
        return copies

    def fork(self, parent_id: int, child_id: int) -> None:
        """Give `child_id` the parent's blocks by reference (parallel sampling, n > 1)."""
        parent = self.seqs[parent_id]
        assert child_id not in self.seqs
        child = SeqBlocks(
            parent.namespace, parent.tenant, parent.shared_blocks, hashes=list(parent.hashes)
        )
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
        for i in range(len(seq.blocks) - 1, -1, -1):
            block = seq.blocks[i]
            if i >= seq.shared_blocks:
                self._uncharge(seq.tenant, block)
            self._release(block)

    # ---- pins ----------------------------------------------------------------------------
    def check_pin(self, key: str, token_ids: Sequence[int], namespace: str | None) -> int:
        """Refuse early a pin of the full blocks of `token_ids` that the cap cannot take, counting
        blocks not cached yet as new (they will be by the time `pin` runs).

        Returns:
            The number of blocks the pin would hold.

        Raises:
            PinRefusedError: over the cap, or prefix caching is off.
        """
        blocks = [self.cached.get(h) for h in self.chain_hashes(token_ids, namespace)]
        self._check_cap(key, blocks)
        return len(blocks)

    def pin(self, seq_id: int, spec: PinSpec) -> Pin:
        """Pin the first `spec.num_blocks` full blocks of a sequence's prompt under `spec.key`.

        The sequence must have computed them. Each position pins the block the cache finds for
        its hash (a sequence may hold a private duplicate of a block that another sequence
        registered first); a block nobody registered is registered now. A pin already held under
        the key is replaced (new references are taken before the old ones are released, so
        shared blocks stay put).

        Raises:
            PinRefusedError: the pin would take distinct pinned blocks over the cap (nothing
                changes then).
        """
        seq = self.seqs[seq_id]
        hashes = seq.hashes[: spec.num_blocks]
        found = [self.cached.get(h) for h in hashes]
        self._check_cap(spec.key, found)  # first: refuses when caching is off (no hashes then)
        assert len(hashes) == spec.num_blocks, "pin of blocks the sequence has not computed"
        pin = Pin(spec.key, seq.tenant, [], spec.expires_at)
        for i, block in enumerate(found):
            self._take_pin(pin, block or self._register(seq.blocks[i], hashes[i]))
        self.unpin(spec.key)
        self.pins[spec.key] = pin
        return pin

    def unpin(self, key: str) -> bool:
        """End a pin: its blocks become ordinary cached blocks (revivable until evicted).
        Released tail first, like `free`. False if no pin has this key."""
        pin = self.pins.pop(key, None)
        if pin is None:
            return False
        self.tenant_pinned[pin.tenant] -= len(pin.blocks)
        if self.tenant_pinned[pin.tenant] == 0:
            del self.tenant_pinned[pin.tenant]
        for block in reversed(pin.blocks):
            block.pin_cnt -= 1
            if block.pin_cnt == 0:
                self.num_pinned_blocks -= 1
            self._release(block)
        return True

    def extend_pin(self, key: str, expires_at: float | None) -> bool:
        """Move a pin's lease end (None: until unpinned); False if no pin has this key."""
        pin = self.pins.get(key)
        if pin is None:
            return False
        pin.expires_at = expires_at
        return True

    def expire_pins(self, now: float) -> list[str]:
        """Unpin every pin whose lease ended at or before `now`; returns their keys."""
        due = [k for k, p in self.pins.items() if p.expires_at is not None and p.expires_at <= now]
        for key in due:
            self.unpin(key)
        return due

    def _check_cap(self, key: str, blocks: Sequence[KVBlock | None]) -> None:
        """Raise unless replacing pin `key` by one on `blocks` (None: not cached yet, so not
        pinned) keeps distinct pinned blocks within the cap."""
        if not self.enable_caching:
            raise PinRefusedError("prefix caching is off in this engine: nothing can be pinned")
        new = {id(b) for b in blocks if b is not None}
        old = self.pins.get(key)
        added = sum(1 for b in blocks if b is None or b.pin_cnt == 0)
        dropped = (
            0 if old is None else sum(1 for b in old.blocks if b.pin_cnt == 1 and id(b) not in new)
        )
        after = self.num_pinned_blocks + added - dropped
        if added > 0 and after > self.max_pinned_blocks:
            raise PinRefusedError(
                f"Pinning {len(blocks)} blocks would hold {after} pinned KV blocks, over the "
                f"engine's cap of {self.max_pinned_blocks} (of {self.num_blocks}) by "
                f"{after - self.max_pinned_blocks}; pins never take the blocks running "
                "requests need.",
                cap=self.max_pinned_blocks,
                requested=after,
            )

    def _register(self, block: KVBlock, block_hash: bytes) -> KVBlock:
        """Make a full block nobody registered findable by its hash."""
        assert block.block_hash is None, "a block's hash is set once"
        block.block_hash = block_hash
        self.cached[block_hash] = block
        return block

    def _take_pin(self, pin: Pin, block: KVBlock) -> None:
        if block.ref_cnt == 0:
            self.free_queue.remove(block)
        block.ref_cnt += 1
        if block.pin_cnt == 0:
            self.num_pinned_blocks += 1
        block.pin_cnt += 1
        pin.blocks.append(block)
        self.tenant_pinned[pin.tenant] += 1

    # ---- internals -----------------------------------------------------------------------
    def _take(self, seq: SeqBlocks, block: KVBlock) -> None:
        if block.ref_cnt == 0:
            self.free_queue.remove(block)
        block.ref_cnt += 1
        if len(seq.blocks) >= seq.shared_blocks:
            self._charge(seq.tenant, block)
        seq.blocks.append(block)
        seq.block_ids.append(block.block_id)

    def _charge(self, tenant: str, block: KVBlock) -> None:
        key = (tenant, block.block_id)
        if key not in self._tenant_refs:
            self.tenant_blocks[tenant] += 1
        self._tenant_refs[key] += 1

    def _uncharge(self, tenant: str, block: KVBlock) -> None:
        key = (tenant, block.block_id)
        self._tenant_refs[key] -= 1
        if self._tenant_refs[key] == 0:
            del self._tenant_refs[key]
            self.tenant_blocks[tenant] -= 1
            if self.tenant_blocks[tenant] == 0:
                del self.tenant_blocks[tenant]

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
            if len(seq.blocks) >= seq.shared_blocks:
                self._charge(seq.tenant, block)
            seq.blocks.append(block)
            seq.block_ids.append(block.block_id)

    def _cache_full_blocks(self, seq: SeqBlocks, token_ids: Sequence[int], num_tokens: int) -> None:
        """Hash and register every block that is full once `num_tokens` tokens are computed."""
        if not self.enable_caching:
            return
        bs = self.block_size
        num_full = min(num_tokens // bs, len(seq.blocks))
        parent = seq.hashes[-1] if seq.hashes else None
        for i in range(len(seq.hashes), num_full):
            ns = PUBLIC_NAMESPACE if i < seq.shared_blocks else seq.namespace
            parent = hash_block(parent, token_ids[i * bs : (i + 1) * bs], ns)
            seq.hashes.append(parent)
            block = seq.blocks[i]
            if block.block_hash is None and parent not in self.cached:
                block.block_hash = parent
                self.cached[parent] = block
