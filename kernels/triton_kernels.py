"""Triton kernels for paged attention (host side: `kernels.triton_attention`) and the matmul
(`kernels.triton_matmul`).

This module imports Triton unconditionally: import it only through `kernels.triton_attention`
(or the "triton" backend), which turns a missing Triton into a clear error, or
`kernels.triton_matmul` (whose importers catch the ImportError).

Every kernel mirrors a PyTorch function (`kernels.reference` is the attention's oracle):

    _write_kv_kernel        reference.write_kv
    _unified_kernel         reference.paged_attention          (every row: decodes, prefills)
    _shared_prefix_kernel   (the same, for decodes' shared keys: `_unified_kernel` goes on from it)
    _decode_kernel          reference._decode_attention        (+ split-K partials; not
    _merge_kernel           triton_attention.merge_partitions_reference   batch-invariant)
    _linear_kernel          triton_matmul.linear_reference     (batch-invariant matmul)

Shapes (one layer), as in `kernels.reference`:

    T, S        new tokens / sequences in the step
    H, KVH, G   query heads, key-value heads, G = H // KVH query heads per KV head
    D           head_dim (BLOCK_D = D rounded up to a power of two)
    kv_cache    [2, num_blocks, block_size, KVH, D], last dim contiguous

Grouped-query attention: one program handles all G query heads of one KV head, so each K/V tile is
loaded once and multiplied against G query rows (a [G, D] x [D, N] matmul, not G vector products).
Softmax is online (running max `m`, running sum `l`, rescaled accumulator) in float32, base 2:
scores are pre-multiplied by scale * log2(e) and exponentiated with exp2.

Under `TRITON_INTERPRET=1` the same kernels run on CPU tensors through NumPy (slow, but exact).
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634

# Whether the kernels below were built for the interpreter (decided when this module is imported).
INTERPRETED = bool(triton.knobs.runtime.interpret)


@triton.jit
def _dot(a, b, DOT_F32: tl.constexpr):
    """a @ b with float32 accumulation; DOT_F32 multiplies in exact float32 (no TF32)."""
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _load_kv_tile(
    cache_ptr,
    block_table_ptr,  # this sequence's row of block_tables
    kvh,
    tok,  # [BLOCK_N] logical token positions
    valid,  # [BLOCK_N] tok is inside the range being read
    d,  # [BLOCK_D]
    stride_kv,
    stride_block,
    stride_tok,
    stride_head,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """Gather K^T [BLOCK_D, BLOCK_N] and V [BLOCK_N, BLOCK_D] for logical tokens `tok`.

    Token n lives in physical block `block_table[n // BLOCK_SIZE]` at offset `n % BLOCK_SIZE`.
    Invalid tokens and padded head-dim lanes read as 0.
    """
    block = tl.load(block_table_ptr + tok // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    base = block * stride_block + (tok % BLOCK_SIZE) * stride_tok + kvh * stride_head  # [N]
    d_ok = d < HEAD_DIM
    offs = base[:, None] + d[None, :]  # [BLOCK_N, BLOCK_D]
    mask = valid[:, None] & d_ok[None, :]
    k = tl.load(cache_ptr + offs, mask=mask, other=0.0)  # [BLOCK_N, BLOCK_D]
    v = tl.load(cache_ptr + stride_kv + offs, mask=mask, other=0.0)  # [BLOCK_N, BLOCK_D]
    return tl.trans(k), v


@triton.jit
def _online_softmax_step(q, k, v, allowed, m_i, l_i, acc, qk_scale, DOT_F32: tl.constexpr):
    """Fold one K/V tile into the running (m, l, acc) of the query rows `q` [M, BLOCK_D].

    allowed [M, BLOCK_N] marks the (row, key) pairs that may attend. Every row must have seen at
    least one allowed key by the end of its first tile, so `m` is finite afterwards (no NaNs).
    """
    s = _dot(q, k, DOT_F32) * qk_scale  # [M, BLOCK_N] float32, log2 domain
    s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))  # [M]
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    # like the reference, probabilities are rounded to the cache dtype before p @ V
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_F32)
    return m_new, l_i, acc


@triton.jit
def _attend_keys(
    q,
    m_i,
    l_i,
    acc,
    cache_ptr,
    table,  # this sequence's row of block_tables
    kvh,
    start,  # first key, a multiple of BLOCK_N
    end,  # keys start..end-1 are read
    last_key,  # [M] the last key each row may see
    d,
    qk_scale,
    stride_kv,
    stride_block,
    stride_tok,
    stride_head,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    """Fold keys start..end-1, BLOCK_N at a time from `start`, into the rows' (m, l, acc).

    Both attention kernels run a row's keys through this one loop, so a row's state after a
    tile is the same whichever of them folds it in (`_shared_prefix_kernel` the shared keys,
    `_unified_kernel` the rest)."""
    for n0 in range(start, end, BLOCK_N):
        key = n0 + tl.arange(0, BLOCK_N)
        valid = key < end
        k, v = _load_kv_tile(
            cache_ptr,
            table,
            kvh,
            key,
            valid,
            d,
            stride_kv,
            stride_block,
            stride_tok,
            stride_head,
            HEAD_DIM,
            BLOCK_SIZE,
        )
        allowed = key[None, :] <= last_key[:, None]  # [M, BLOCK_N] causal
        m_i, l_i, acc = _online_softmax_step(q, k, v, allowed, m_i, l_i, acc, qk_scale, DOT_F32)
    return m_i, l_i, acc


@triton.jit
def _write_kv_kernel(
    key_ptr,  # [T, KVH, D]
    value_ptr,  # [T, KVH, D]
    cache_ptr,  # [2, num_blocks, block_size, KVH, D]
    slot_ptr,  # [T] int64, block_id * block_size + offset; negative = skip (padding)
    num_tokens,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_kv,
    stride_block,
    stride_tok,
    stride_head,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HD: tl.constexpr,  # KVH * D
    BLOCK_T: tl.constexpr,
    BLOCK_HD: tl.constexpr,
):
    """Grid (cdiv(T, BLOCK_T),): copy BLOCK_T tokens' keys and values, all heads, into their slots.

    A token's [KVH, D] row is flattened to HD columns: column c is head c // D, dim c % D.
    """
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T]
    slot = tl.load(slot_ptr + t, mask=t < num_tokens, other=-1).to(tl.int64)
    c = tl.arange(0, BLOCK_HD)
    h = c // HEAD_DIM
    d = c % HEAD_DIM
    mask = (slot >= 0)[:, None] & (c < HD)[None, :]  # [BLOCK_T, BLOCK_HD]
    t = t.to(tl.int64)[:, None]
    k = tl.load(key_ptr + t * stride_kt + (h * stride_kh + d)[None, :], mask=mask)
    v = tl.load(value_ptr + t * stride_vt + (h * stride_vh + d)[None, :], mask=mask)
    row = (slot // BLOCK_SIZE) * stride_block + (slot % BLOCK_SIZE) * stride_tok  # [BLOCK_T]
    dst = cache_ptr + row[:, None] + (h * stride_head + d)[None, :]
    tl.store(dst, k.to(cache_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + stride_kv, v.to(cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _decode_kernel(
    out_ptr,  # [T, H, D]: written directly when not SPLIT
    part_out_ptr,  # [S, H, num_splits, D] float32: each split's normalized output (SPLIT)
    part_lse_ptr,  # [S, H, num_splits] float32: each split's log2-sum-exp of scores (SPLIT)
    q_ptr,  # [T, H, D]
    cache_ptr,  # [2, num_blocks, block_size, KVH, D]
    block_tables_ptr,  # [S, max_blocks] int32
    seq_lens_ptr,  # [S] int32
    query_start_loc_ptr,  # [S + 1] int32
    qk_scale,  # softmax scale * log2(e)
    num_splits,
    partition,  # context tokens per split, a multiple of BLOCK_N
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_kv,
    stride_block,
    stride_tok,
    stride_head,
    stride_bt,
    NUM_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    """Grid (S, KVH, num_splits): one decode token's G query heads over one context partition.

    Sequences with q_len != 1 exit at once (the prefill kernel owns them), as do splits that start
    past the sequence's end. Without SPLIT the single partition covers the whole context and the
    result goes straight to `out`; with SPLIT (flash-decoding) each partition stores its normalized
    output and log-sum-exp, and `_merge_kernel` combines them.
    """
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    q_row = tl.load(query_start_loc_ptr + seq)
    if tl.load(query_start_loc_ptr + seq + 1) - q_row != 1:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    start = split * partition
    if start >= seq_len:
        return
    end = tl.minimum(start + partition, seq_len)

    g = tl.arange(0, BLOCK_G)  # query head within the group (rows >= GROUP are padding)
    d = tl.arange(0, BLOCK_D)
    heads = kvh * GROUP + g
    row_ok = (g < GROUP)[:, None] & (d < HEAD_DIM)[None, :]
    q = tl.load(
        q_ptr + q_row.to(tl.int64) * stride_qt + heads[:, None] * stride_qh + d[None, :],
        mask=row_ok,
        other=0.0,
    ).to(cache_ptr.dtype.element_ty)  # [BLOCK_G, BLOCK_D]

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for n0 in range(start, end, BLOCK_N):
        tok = n0 + tl.arange(0, BLOCK_N)
        valid = tok < end
        k, v = _load_kv_tile(
            cache_ptr,
            table,
            kvh,
            tok,
            valid,
            d,
            stride_kv,
            stride_block,
            stride_tok,
            stride_head,
            HEAD_DIM,
            BLOCK_SIZE,
        )
        m_i, l_i, acc = _online_softmax_step(
            q, k, v, valid[None, :], m_i, l_i, acc, qk_scale, DOT_F32
        )

    acc = acc / l_i[:, None]
    if SPLIT:
        part = (seq * NUM_HEADS + heads).to(tl.int64) * num_splits + split  # [BLOCK_G]
        tl.store(part_out_ptr + part[:, None] * HEAD_DIM + d[None, :], acc, mask=row_ok)
        tl.store(part_lse_ptr + part, m_i + tl.log2(l_i), mask=g < GROUP)
    else:
        dst = out_ptr + q_row.to(tl.int64) * stride_ot + heads[:, None] * stride_oh + d[None, :]
        tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _merge_kernel(
    out_ptr,  # [T, H, D]
    part_out_ptr,  # [S, H, num_splits, D] float32
    part_lse_ptr,  # [S, H, num_splits] float32
    seq_lens_ptr,  # [S] int32
    query_start_loc_ptr,  # [S + 1] int32
    num_splits,
    partition,
    stride_ot,
    stride_oh,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SPLITS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid (S, H): combine one decode head's split outputs, weighted by 2^(lse - max lse)."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    q_row = tl.load(query_start_loc_ptr + seq)
    if tl.load(query_start_loc_ptr + seq + 1) - q_row != 1:
        return
    used = tl.cdiv(tl.load(seq_lens_ptr + seq), partition)  # splits that held tokens
    sp = tl.arange(0, BLOCK_SPLITS)
    d = tl.arange(0, BLOCK_D)
    sp_ok = sp < used
    part = (seq * NUM_HEADS + head).to(tl.int64) * num_splits + sp  # [BLOCK_SPLITS]
    lse = tl.load(part_lse_ptr + part, mask=sp_ok, other=float("-inf"))
    weight = tl.exp2(lse - tl.max(lse, axis=0))  # [BLOCK_SPLITS], 0 for unused splits
    parts = tl.load(
        part_out_ptr + part[:, None] * HEAD_DIM + d[None, :],
        mask=sp_ok[:, None] & (d < HEAD_DIM)[None, :],
        other=0.0,
    )  # [BLOCK_SPLITS, BLOCK_D]
    out = tl.sum(parts * weight[:, None], axis=0) / tl.sum(weight, axis=0)
    dst = out_ptr + q_row.to(tl.int64) * stride_ot + head * stride_oh + d
    tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


@triton.jit
def _unified_kernel(
    out_ptr,  # [T, H, D]
    q_ptr,  # [T, H, D]
    cache_ptr,  # [2, num_blocks, block_size, KVH, D]
    block_tables_ptr,  # [S, max_blocks] int32
    seq_lens_ptr,  # [S] int32
    query_start_loc_ptr,  # [S + 1] int32
    tiles_ptr,  # [2, num_tiles] int32: each program's sequence, then its first new token
    state_ptr,  # [S, H, HEAD_DIM + 2] float32 (RESUME): `_shared_prefix_kernel`'s rows
    resume_ptr,  # [S] int32 (RESUME): keys a sequence's state already holds, 0 for none
    num_tiles,
    qk_scale,
    state_stride,  # elements per sequence in state (RESUME)
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_kv,
    stride_block,
    stride_tok,
    stride_head,
    stride_bt,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr,  # BLOCK_M // GROUP new tokens per program
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_F32: tl.constexpr,
    RESUME: tl.constexpr,  # some decodes start from a shared prefix's state
):
    """Grid (num_tiles, KVH): causal attention of up to BLOCK_Q new tokens of one sequence, all G
    query heads of one KV head, whatever the sequence is (a decode, a prefill, a chunk).

    Row r of the tile is token `first + r // G`, head `r % G`; rows past BLOCK_Q * G or past the
    sequence's new tokens are padding (they repeat token `first` and are not stored):

        rows  | t0h0 .. t0h(G-1) | t1h0 .. | ... | t(BLOCK_Q-1)h(G-1) | pad |   BLOCK_M rows
        keys  | 0 .. BLOCK_N-1 | BLOCK_N .. | ... |   tiles aligned to position 0, up to the
                                                      tile's last token; new token i of a
                                                      sequence with ctx cached keys sees 0..ctx+i

    Every program has the same shapes (BLOCK_M x BLOCK_D queries, BLOCK_N keys per step), reads
    key tiles in the same order from position 0, and masks the keys past a row's position to
    exact zeros: a tile past a row's position leaves its (m, l, acc) as they were (alpha = 1,
    p = 0). So a token's output rows are the same bits whichever program computes them and
    whatever else the step holds (docs/determinism.md).

    With RESUME, a sequence whose `resume` is k > 0 (a decode of a group, k a multiple of
    BLOCK_N) starts from the (m, l, acc) that `_shared_prefix_kernel` left for its rows after
    keys 0..k-1, read exactly as float32, and runs its key tiles from k: the same tiles in the
    same order as without it.
    """
    tile = tl.program_id(0)
    kvh = tl.program_id(1)
    seq = tl.load(tiles_ptr + tile)
    first = tl.load(tiles_ptr + num_tiles + tile)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    ctx = tl.load(seq_lens_ptr + seq) - q_len

    r = tl.arange(0, BLOCK_M)
    tok = first + r // GROUP  # [BLOCK_M] new token of each row, within the sequence
    row_ok = (r < BLOCK_Q * GROUP) & (tok < q_len)
    tok = tl.where(row_ok, tok, first)
    heads = kvh * GROUP + r % GROUP
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q_off = (q_start + tok).to(tl.int64)[:, None] * stride_qt + heads[:, None] * stride_qh
    q = tl.load(q_ptr + q_off + d[None, :], mask=d_ok[None, :], other=0.0)
    q = q.to(cache_ptr.dtype.element_ty)  # [BLOCK_M, BLOCK_D]
    last_key = ctx + tok  # [BLOCK_M] last key position each row may see

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    end = ctx + tl.minimum(first + BLOCK_Q, q_len)  # keys this tile needs
    start = 0
    if RESUME:
        start = tl.load(resume_ptr + seq)
        rows = state_ptr + seq.to(tl.int64) * state_stride + heads * (HEAD_DIM + 2)  # [BLOCK_M]
        held = (start + tl.zeros([BLOCK_M], tl.int32)) > 0  # [BLOCK_M]
        acc = tl.load(rows[:, None] + d[None, :], mask=held[:, None] & d_ok[None, :], other=0.0)
        m_i = tl.load(rows + HEAD_DIM, mask=held, other=float("-inf"))
        l_i = tl.load(rows + HEAD_DIM + 1, mask=held, other=0.0)
    m_i, l_i, acc = _attend_keys(
        q,
        m_i,
        l_i,
        acc,
        cache_ptr,
        table,
        kvh,
        start,
        end,
        last_key,
        d,
        qk_scale,
        stride_kv,
        stride_block,
        stride_tok,
        stride_head,
        HEAD_DIM,
        BLOCK_SIZE,
        BLOCK_N,
        DOT_F32,
    )
    acc = acc / l_i[:, None]
    o_off = (q_start + tok).to(tl.int64)[:, None] * stride_ot + heads[:, None] * stride_oh
    tl.store(
        out_ptr + o_off + d[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & d_ok[None, :],
    )


@triton.jit
def _shared_prefix_kernel(
    state_ptr,  # [S, H, HEAD_DIM + 2] float32: each row's acc, then m and l
    q_ptr,  # [T, H, D]
    cache_ptr,  # [2, num_blocks, block_size, KVH, D]
    block_tables_ptr,  # [S, max_blocks] int32
    query_start_loc_ptr,  # [S + 1] int32
    groups_ptr,  # [3, num_groups] int32: each program's first member, members, shared keys
    members_ptr,  # [decodes in groups] int32: their sequences, program after program
    num_groups,
    qk_scale,
    state_stride,
    stride_qt,
    stride_qh,
    stride_kv,
    stride_block,
    stride_tok,
    stride_head,
    stride_bt,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    """Grid (num_groups, KVH): the shared keys of up to BLOCK_M // G decodes whose block tables
    start with the same blocks, read once for all their query rows.

    Row r is member r // G, head r % G (rows past the members repeat member 0 and are not
    stored). Keys 0..shared-1 (a multiple of BLOCK_N) come from the first member's table, which
    names the same blocks as the others'; every member's position is past them, so every (row,
    key) pair may attend. The program leaves each row's running (m, l, acc) in `state` for
    `_unified_kernel` (RESUME) to go on from: the tiles, their shapes and order, the masks and
    the online-softmax steps are the ones that kernel would run for the row, and a row of a
    tile's products does not depend on the tile's other rows, so the output is the same bits as
    without grouping.
    """
    program = tl.program_id(0)
    kvh = tl.program_id(1)
    first = tl.load(groups_ptr + program)
    count = tl.load(groups_ptr + num_groups + program)
    shared = tl.load(groups_ptr + 2 * num_groups + program)

    r = tl.arange(0, BLOCK_M)
    member = r // GROUP
    row_ok = member < count
    seq = tl.load(members_ptr + first + tl.where(row_ok, member, 0))  # [BLOCK_M]
    heads = kvh * GROUP + r % GROUP
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q_row = tl.load(query_start_loc_ptr + seq).to(tl.int64)  # a decode's one new token
    q_off = q_row[:, None] * stride_qt + heads[:, None] * stride_qh
    q = tl.load(q_ptr + q_off + d[None, :], mask=d_ok[None, :], other=0.0)
    q = q.to(cache_ptr.dtype.element_ty)  # [BLOCK_M, BLOCK_D]

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    table = block_tables_ptr + tl.load(members_ptr + first).to(tl.int64) * stride_bt
    # every pair may attend (every member is past the shared keys), as a mask from run-time
    # values like `_unified_kernel`'s: a constant one compiled to other code (fp32: 255 registers
    # and spills), which may also fuse the scaling into exp2 and round differently
    last_key = shared - 1 + r * 0
    m_i, l_i, acc = _attend_keys(
        q,
        m_i,
        l_i,
        acc,
        cache_ptr,
        table,
        kvh,
        0,
        shared,
        last_key,
        d,
        qk_scale,
        stride_kv,
        stride_block,
        stride_tok,
        stride_head,
        HEAD_DIM,
        BLOCK_SIZE,
        BLOCK_N,
        DOT_F32,
    )

    rows = state_ptr + seq.to(tl.int64) * state_stride + heads * (HEAD_DIM + 2)  # [BLOCK_M]
    tl.store(rows[:, None] + d[None, :], acc, mask=row_ok[:, None] & d_ok[None, :])
    tl.store(rows + HEAD_DIM, m_i, mask=row_ok)
    tl.store(rows + HEAD_DIM + 1, l_i, mask=row_ok)


@triton.jit
def _linear_kernel(
    x_ptr,  # [M, K]
    w_ptr,  # [N, K]
    b_ptr,  # [N] (HAS_BIAS)
    out_ptr,  # [M, N]
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_om,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    """Grid (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N)): out = x @ w.T (+ b) for one output tile.

    K is reduced in BLOCK_K steps from 0, in order, into one float32 accumulator, then the bias is
    added once: each output's sum has the same order whatever M and whichever tile holds its row
    (rows past M and keys past K read as zeros). Mirrors `triton_matmul.linear_reference`.
    """
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok, n_ok = rm < M, rn < N
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
    w_cols = w_ptr + rn.to(tl.int64)[None, :] * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        k_ok = k < K
        a = tl.load(x_rows + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_cols + k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc += _dot(a, b, DOT_F32)  # [BLOCK_M, BLOCK_K] @ [BLOCK_K, BLOCK_N]
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    dst = out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :]
    tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])
