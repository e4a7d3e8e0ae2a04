"""Pure ``@triton.jit`` kernels of the paged-attention core (launched from ``paged.py``).

Three kernels share a few helpers:

* ``_decode_split_kv_kernel`` -- grid ``(num_segments, num_kv_heads * QUERY_BLOCKS, num_decodes)``:
  one program reads one KV segment of one decode-like sequence for one kv head and serves
  ``BLOCK_Q`` of its query tokens x all the q heads of that GQA group at once (row ``r`` = query
  ``r // QUERIES_PER_KV``, head ``r % QUERIES_PER_KV``; so every KV page is read once per kv head).
  A decode has one query token; a speculative verify sequence ``qlen`` of them, query ``j`` at
  position ``seq_len - qlen + j``, causal inside the draft block. It writes normalised partial
  outputs and their log2-sum-exp to the workspace, or, when the plan uses a single segment, the
  final output directly.
* ``_reduce_segments_kernel`` -- grid ``(num_decodes, num_q_heads, max_decode_query_len)``: merges
  the partials of one query token and head.
* ``_prefill_kernel`` -- grid ``(num_q_blocks_bound, num_kv_heads)``: a tile of ``BLOCK_Q`` query
  tokens x the GQA group (row ``r`` = token ``r // QUERIES_PER_KV``, head ``r % QUERIES_PER_KV``),
  looping over the KV it may see; the sequence is found by binary search over ``query_start_loc``.

Each sequence's segment layout is derived on the device from its own lengths
(``_decode_segment_layout``) so that the host never reads ``seq_lens``: the host only fixes the
maximum number of segments per sequence. CUDA-graph padding lanes (``seq_len == 0`` or no query
tokens) exit before any load. Logits are kept in log2 units (``exp2``).

FP8 KV caches (``KV_FP8``): tiles are loaded in FP8 (half the bytes) and converted to float16 for
the dots (V tiles in registers: ``_value_dot_operand``); the queries are converted too
(``_dot_operand``), so 16-bit queries must stay below 65504 in magnitude; queries may be FP8 themselves,
as vLLM quantizes them on CUDA, with their own per-tensor scale. The per-tensor K scale joins the logit scale and the V
scale the final normalisation, each read once per program (``_logit_scale``, ``_normalised``).
Accumulation is fp32.
"""

import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _cdiv(a, b):
    return (a + b - 1) // b


@triton.jit
def _scaled_logits(dot, softmax_scale, softcap, USE_SOFTCAP: tl.constexpr):
    """Raw ``q.k`` dot products -> logits in log2 units, with the optional tanh soft cap."""
    if USE_SOFTCAP:
        s = dot * softmax_scale
        # softcap * tanh(s / softcap), with tanh(x) = 2 * sigmoid(2x) - 1
        s = softcap * (2.0 * tl.sigmoid(2.0 * s / softcap) - 1.0)
        return s * 1.4426950408889634
    return dot * (softmax_scale * 1.4426950408889634)


@triton.jit
def _dot_operand(q, KV_FP8: tl.constexpr):
    """The query tile in the dtype of the dots. Over an FP8 cache that is float16 for 16-bit and FP8
    queries: FP8 values are exact in it and one instruction converts two of them (bf16 takes several
    per value); float32 queries stay float32."""
    if KV_FP8:
        if q.dtype != tl.float32:
            q = q.to(tl.float16)
    return q


@triton.jit
def _value_dot_operand(v, dtype, INLINE_PTX: tl.constexpr):
    """A V tile in ``dtype``, the dtype of the dots. An FP8 tile is converted to float16 in registers, as
    loaded: compiled for NVIDIA (``INLINE_PTX``) an opaque move keeps Triton from converting after the
    shared-memory staging of the P @ V operand instead, which stages FP8 bytes and, V being the transposed
    operand, reads them back byte by byte (H200: FP8 decode 1.2x slower than bf16, not 0.8x). K tiles, read
    along the head dim, convert fine out of shared memory (converting them in registers too is slower)."""
    converted = v.to(dtype)
    if v.dtype.is_fp8() and INLINE_PTX and dtype == tl.float16:
        converted = tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [converted], dtype=tl.float16,
                                              is_pure=False, pack=2)
    return converted


@triton.jit
def _logit_scale(softmax_scale, q, q_scale_ptr, k_scale_ptr, KV_FP8: tl.constexpr):
    """The factor of ``q . k`` for raw values: an FP8 K cache's per-tensor scale (and FP8 queries' scale)
    joins the softmax scale once per program (``q . (k * s) = (q . k) * s``), so the KV loop only converts."""
    if KV_FP8:
        softmax_scale = softmax_scale * tl.load(k_scale_ptr)
        if q.dtype.is_fp8():
            softmax_scale = softmax_scale * tl.load(q_scale_ptr)
    return softmax_scale


@triton.jit
def _normalised(acc, l, v_scale_ptr, KV_FP8: tl.constexpr):
    """``acc / l`` per row; an FP8 V cache's per-tensor scale applies here, once per output element."""
    acc = acc / l[:, None]
    if KV_FP8:
        acc = acc * tl.load(v_scale_ptr)
    return acc


@triton.jit
def _load_kv_tile(
    cache_ptr,
    page,  # [TILE_N] int32 physical page of each token
    slot,  # [TILE_N] position of each token inside its page
    kv_head,
    token_valid,  # [TILE_N] bool
    stride_page: tl.int64,
    stride_slot: tl.int64,
    stride_head: tl.int64,
    stride_dim: tl.int64,
    HEAD_SIZE: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    HEAD_DIM_CONTIGUOUS: tl.constexpr,
):
    """One ``[TILE_N, HEAD_PAD]`` tile of a K or V cache gathered token by token through the pages."""
    dims = tl.arange(0, HEAD_PAD)
    if HEAD_DIM_CONTIGUOUS:
        dim_offsets = dims
    else:
        dim_offsets = dims.to(tl.int64) * stride_dim
    offsets = page.to(tl.int64)[:, None] * stride_page + slot[:, None] * stride_slot + kv_head * stride_head
    if HEAD_SIZE == HEAD_PAD:
        mask = token_valid[:, None]
    else:
        mask = token_valid[:, None] & (dims < HEAD_SIZE)[None, :]
    return tl.load(cache_ptr + offsets + dim_offsets[None, :], mask=mask, other=0.0)


@triton.jit
def _decode_segment_layout(
    seq_len,
    query_len,
    num_segments,
    window_left,
    USE_WINDOW: tl.constexpr,
    TILE_N: tl.constexpr,
    MIN_SEGMENT_TILES: tl.constexpr,
):
    """How one decode-like sequence's KV ``[kv_start, seq_len)`` is cut into at most ``num_segments``.

    ``kv_start`` is the first position the sequence's first query may see. Returns ``(kv_start,
    first_tile, tiles_per_segment, num_live_segments)``. Tiles are aligned to absolute multiples of
    ``TILE_N``; a segment has at least ``MIN_SEGMENT_TILES`` tiles, so short sequences use fewer
    segments (the programs of the others exit at once); an empty sequence has none.
    """
    kv_start = 0
    if USE_WINDOW:
        kv_start = tl.maximum(seq_len - query_len - window_left, 0)
    first_tile = kv_start // TILE_N
    num_tiles = _cdiv(seq_len, TILE_N) - first_tile
    tiles_per_segment = tl.maximum(_cdiv(num_tiles, num_segments), MIN_SEGMENT_TILES)
    num_live_segments = _cdiv(num_tiles, tiles_per_segment)
    return kv_start, first_tile, tiles_per_segment, num_live_segments


@triton.jit
def _decode_split_kv_kernel(
    out_ptr,  # [num_tokens, NUM_Q_HEADS, HEAD_SIZE], written when SINGLE_SEGMENT
    segment_out_ptr,  # [num_slots, NUM_Q_HEADS, HEAD_SIZE] float32, written when not SINGLE_SEGMENT
    segment_lse_ptr,  # [num_slots, NUM_Q_HEADS] float32 (log2 units)
    q_ptr,  # [num_tokens, NUM_Q_HEADS, HEAD_SIZE]
    k_cache_ptr,  # [num_pages, PAGE_SIZE, num_kv_heads, HEAD_SIZE], any strides
    v_cache_ptr,  # [num_pages, PAGE_SIZE, num_kv_heads, HEAD_SIZE], any strides
    block_table_ptr,  # [num_seqs, max_pages_per_seq] int32
    seq_lens_ptr,  # [num_seqs] int32
    query_start_loc_ptr,  # [num_seqs + 1] int32
    sinks_ptr,  # [NUM_Q_HEADS] float32 (read when USE_SINKS and SINGLE_SEGMENT)
    q_scale_ptr,  # [1] float32 dequantization scale of FP8 queries (read when q is FP8)
    k_scale_ptr,  # [1] float32 dequantization scale of the K cache (read when KV_FP8)
    v_scale_ptr,  # [1] float32 dequantization scale of the V cache (read when KV_FP8)
    softmax_scale,
    softcap,
    window_left,
    num_segments,  # segments per sequence in the workspace layout (slot = seq * num_segments + seg)
    query_slots,  # query rows per workspace slot
    stride_q_token: tl.int64,
    stride_q_head: tl.int64,
    stride_out_token: tl.int64,
    stride_out_head: tl.int64,
    stride_block_table: tl.int64,
    stride_k_page: tl.int64,
    stride_k_slot: tl.int64,
    stride_k_head: tl.int64,
    stride_k_dim: tl.int64,
    stride_v_page: tl.int64,
    stride_v_slot: tl.int64,
    stride_v_head: tl.int64,
    stride_v_dim: tl.int64,
    NUM_Q_HEADS: tl.constexpr,
    QUERIES_PER_KV: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,  # power of two >= max(16, BLOCK_Q * QUERIES_PER_KV)
    BLOCK_Q: tl.constexpr,  # query tokens per program
    QUERY_BLOCKS: tl.constexpr,  # programs per (sequence, kv head, segment)
    PAGE_SIZE: tl.constexpr,
    TILE_N: tl.constexpr,
    MIN_SEGMENT_TILES: tl.constexpr,
    SINGLE_SEGMENT: tl.constexpr,  # the constexprs above come from the plan, those below from each call
    USE_SOFTCAP: tl.constexpr,
    USE_SINKS: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    K_DIM_CONTIGUOUS: tl.constexpr,
    V_DIM_CONTIGUOUS: tl.constexpr,
    KV_FP8: tl.constexpr,  # the caches hold FP8 values x per-tensor scales
    INLINE_PTX: tl.constexpr,  # compiled for an NVIDIA GPU (not interpreted, not ROCm): inline PTX may be used
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32 inputs (no TF32), else "tf32" (unused for 16-bit)
):
    segment = tl.program_id(0)
    kv_head = tl.program_id(1) // QUERY_BLOCKS
    query_block = tl.program_id(1) % QUERY_BLOCKS
    seq = tl.program_id(2)

    first_token = tl.load(query_start_loc_ptr + seq)
    if BLOCK_Q == 1:  # plain decodes: one query token each (a padding lane has seq_len 0: no segment)
        query_len = 1
    else:
        query_len = tl.load(query_start_loc_ptr + seq + 1) - first_token
        if query_block * BLOCK_Q >= query_len:  # also a padding lane without query tokens
            return
    seq_len = tl.load(seq_lens_ptr + seq)
    kv_start, first_tile, tiles_per_segment, num_live_segments = _decode_segment_layout(
        seq_len, query_len, num_segments, window_left, USE_WINDOW, TILE_N, MIN_SEGMENT_TILES
    )
    if segment >= num_live_segments:
        return
    tile_begin = first_tile + segment * tiles_per_segment
    tile_end = tl.minimum(tile_begin + tiles_per_segment, _cdiv(seq_len, TILE_N))

    # Row r serves query r // QUERIES_PER_KV of the block and q head r % QUERIES_PER_KV of the group.
    # The one-query kernel keeps its token a scalar: fewer live registers over the KV loop.
    rows = tl.arange(0, BLOCK_M)
    if BLOCK_Q == 1:
        heads = kv_head * QUERIES_PER_KV + rows
        row_valid = rows < QUERIES_PER_KV
        tokens = first_token.to(tl.int64)
    else:
        query_in_seq = query_block * BLOCK_Q + rows // QUERIES_PER_KV
        heads = kv_head * QUERIES_PER_KV + rows % QUERIES_PER_KV
        row_valid = (rows < BLOCK_Q * QUERIES_PER_KV) & (query_in_seq < query_len)
        query_pos = seq_len - query_len + query_in_seq  # [BLOCK_M] absolute position of each row's query
        tokens = first_token.to(tl.int64) + query_in_seq  # [BLOCK_M]
    dims = tl.arange(0, HEAD_PAD)
    dim_valid = dims < HEAD_SIZE
    q = tl.load(
        q_ptr + (tokens * stride_q_token + heads * stride_q_head)[:, None] + dims[None, :],
        mask=row_valid[:, None] & dim_valid[None, :],
        other=0.0,
    )  # [BLOCK_M, HEAD_PAD]
    softmax_scale = _logit_scale(softmax_scale, q, q_scale_ptr, k_scale_ptr, KV_FP8)
    q = _dot_operand(q, KV_FP8)

    if USE_SINKS and SINGLE_SEGMENT:
        # the sink joins the softmax as one extra logit with no value
        m = tl.load(sinks_ptr + heads, mask=row_valid, other=0.0).to(tl.float32) * 1.4426950408889634
        l = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
    else:
        m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_PAD], dtype=tl.float32)
    block_table_row = block_table_ptr + seq * stride_block_table
    offsets_in_tile = tl.arange(0, TILE_N)

    for tile in range(tile_begin, tile_end):
        positions = tile * TILE_N + offsets_in_tile
        in_seq = positions < seq_len
        token_valid = in_seq & (positions >= kv_start)
        page = tl.load(block_table_row + positions // PAGE_SIZE, mask=in_seq, other=0)
        slot = positions % PAGE_SIZE
        k = _load_kv_tile(k_cache_ptr, page, slot, kv_head, token_valid, stride_k_page, stride_k_slot,
                          stride_k_head, stride_k_dim, HEAD_SIZE, HEAD_PAD, K_DIM_CONTIGUOUS)
        v = _load_kv_tile(v_cache_ptr, page, slot, kv_head, token_valid, stride_v_page, stride_v_slot,
                          stride_v_head, stride_v_dim, HEAD_SIZE, HEAD_PAD, V_DIM_CONTIGUOUS)
        s = _scaled_logits(tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION), softmax_scale, softcap,
                           USE_SOFTCAP)  # [BLOCK_M, TILE_N]
        if BLOCK_Q == 1:  # one query, the sequence's last position: it sees every valid token
            s = tl.where(token_valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))  # finite: every tile holds a valid token
            m_safe = m_new
        else:  # causal inside the draft block (and each query's own window)
            visible = token_valid[None, :] & (positions[None, :] <= query_pos[:, None])
            if USE_WINDOW:
                visible = visible & (positions[None, :] >= query_pos[:, None] - window_left)
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row may see nothing in this tile
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m - m_safe)
        l = l * alpha + tl.sum(p, axis=1)
        v = _value_dot_operand(v, q.dtype, INLINE_PTX)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v, input_precision=DOT_PRECISION)
        m = m_new

    if BLOCK_Q > 1:
        l = tl.where(l == 0.0, 1.0, l)  # a row that saw nothing in this segment: zero weight (lse -inf)
    acc = _normalised(acc, l, v_scale_ptr, KV_FP8)
    store_mask = row_valid[:, None] & dim_valid[None, :]
    if SINGLE_SEGMENT:
        tl.store(out_ptr + (tokens * stride_out_token + heads * stride_out_head)[:, None] + dims[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=store_mask)
    else:
        slot = (seq * num_segments + segment).to(tl.int64) * query_slots
        if BLOCK_Q > 1:
            slot += query_in_seq
        slot_row = slot * NUM_Q_HEADS + heads  # [BLOCK_M]
        tl.store(segment_out_ptr + slot_row[:, None] * HEAD_SIZE + dims[None, :], acc, mask=store_mask)
        tl.store(segment_lse_ptr + slot_row, m + tl.log2(l), mask=row_valid)


@triton.jit
def _reduce_segments_kernel(
    out_ptr,  # [num_tokens, NUM_Q_HEADS, HEAD_SIZE]
    segment_out_ptr,  # [num_slots, NUM_Q_HEADS, HEAD_SIZE] float32
    segment_lse_ptr,  # [num_slots, NUM_Q_HEADS] float32 (log2 units)
    seq_lens_ptr,  # [num_seqs] int32
    query_start_loc_ptr,  # [num_seqs + 1] int32
    sinks_ptr,  # [NUM_Q_HEADS] float32 (read when USE_SINKS)
    window_left,
    num_segments,
    query_slots,  # query rows per workspace slot
    stride_out_token: tl.int64,
    stride_out_head: tl.int64,
    NUM_Q_HEADS: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    SEGMENTS_PAD: tl.constexpr,  # power of two >= num_segments
    SEGMENT_BLOCK: tl.constexpr,  # partial outputs merged per step
    TILE_N: tl.constexpr,
    MIN_SEGMENT_TILES: tl.constexpr,  # the constexprs above come from the plan, those below from each call
    USE_SINKS: tl.constexpr,
    USE_WINDOW: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    query = tl.program_id(2)
    first_token = tl.load(query_start_loc_ptr + seq)
    query_len = tl.load(query_start_loc_ptr + seq + 1) - first_token
    if query >= query_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    _, _, _, num_live_segments = _decode_segment_layout(
        seq_len, query_len, num_segments, window_left, USE_WINDOW, TILE_N, MIN_SEGMENT_TILES
    )
    if num_live_segments == 0:  # a padding lane
        return
    # the slot rows of (seq, segment s, query) are first_row + s * segment_stride
    first_row = ((seq * num_segments).to(tl.int64) * query_slots + query) * NUM_Q_HEADS + head
    segment_stride = query_slots * NUM_Q_HEADS

    segments = tl.arange(0, SEGMENTS_PAD)
    lse = tl.load(segment_lse_ptr + first_row + segments * segment_stride,
                  mask=segments < num_live_segments, other=float("-inf"))
    lse_max = tl.max(lse, axis=0)
    if USE_SINKS:
        sink = tl.load(sinks_ptr + head).to(tl.float32) * 1.4426950408889634
        lse_max = tl.maximum(lse_max, sink)
        denominator = tl.sum(tl.exp2(lse - lse_max), axis=0) + tl.exp2(sink - lse_max)
    else:
        denominator = tl.sum(tl.exp2(lse - lse_max), axis=0)

    dims = tl.arange(0, HEAD_PAD)
    dim_valid = dims < HEAD_SIZE
    acc = tl.zeros([HEAD_PAD], dtype=tl.float32)
    block = tl.arange(0, SEGMENT_BLOCK)
    for block_start in range(0, num_live_segments, SEGMENT_BLOCK):
        segment_valid = block_start + block < num_live_segments
        slot_row = first_row + (block_start + block) * segment_stride  # [SEGMENT_BLOCK]
        weight = tl.exp2(tl.load(segment_lse_ptr + slot_row, mask=segment_valid, other=float("-inf")) - lse_max)
        partial = tl.load(segment_out_ptr + slot_row[:, None] * HEAD_SIZE + dims[None, :],
                          mask=segment_valid[:, None] & dim_valid[None, :], other=0.0)
        acc += tl.sum(partial * weight[:, None], axis=0)

    token = first_token.to(tl.int64) + query
    tl.store(out_ptr + token * stride_out_token + head * stride_out_head + dims,
             (acc / denominator).to(out_ptr.dtype.element_ty), mask=dim_valid)


@triton.jit
def _find_prefill_seq(query_start_loc_ptr, q_block, first_seq, num_seqs, BLOCK_Q: tl.constexpr):
    """Binary search: the sequence whose q blocks contain ``q_block``.

    Sequence ``i >= first_seq`` owns q blocks from
    ``(qsl[i] - qsl[first_seq]) // BLOCK_Q + (i - first_seq)`` on (a bound that needs no host data).
    """
    base = tl.load(query_start_loc_ptr + first_seq)
    lo = first_seq
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        mid_start = (tl.load(query_start_loc_ptr + mid) - base) // BLOCK_Q + (mid - first_seq)
        if mid_start <= q_block:
            lo = mid + 1
        else:
            hi = mid
    seq = lo - 1
    seq_first_block = (tl.load(query_start_loc_ptr + seq) - base) // BLOCK_Q + (seq - first_seq)
    return seq, q_block - seq_first_block


@triton.jit
def _prefill_kernel(
    out_ptr,  # [num_tokens, NUM_Q_HEADS, HEAD_SIZE]
    q_ptr,  # [num_tokens, NUM_Q_HEADS, HEAD_SIZE]
    k_cache_ptr,  # [num_pages, PAGE_SIZE, num_kv_heads, HEAD_SIZE], any strides
    v_cache_ptr,  # [num_pages, PAGE_SIZE, num_kv_heads, HEAD_SIZE], any strides
    block_table_ptr,  # [num_seqs, max_pages_per_seq] int32
    seq_lens_ptr,  # [num_seqs] int32
    query_start_loc_ptr,  # [num_seqs + 1] int32
    sinks_ptr,  # [NUM_Q_HEADS] float32 (read when USE_SINKS)
    q_scale_ptr,  # [1] float32 dequantization scale of FP8 queries (read when q is FP8)
    k_scale_ptr,  # [1] float32 dequantization scale of the K cache (read when KV_FP8)
    v_scale_ptr,  # [1] float32 dequantization scale of the V cache (read when KV_FP8)
    softmax_scale,
    softcap,
    window_left,
    window_right,
    first_seq,  # prefill sequences are [first_seq, num_seqs)
    num_seqs,
    stride_q_token: tl.int64,
    stride_q_head: tl.int64,
    stride_out_token: tl.int64,
    stride_out_head: tl.int64,
    stride_block_table: tl.int64,
    stride_k_page: tl.int64,
    stride_k_slot: tl.int64,
    stride_k_head: tl.int64,
    stride_k_dim: tl.int64,
    stride_v_page: tl.int64,
    stride_v_slot: tl.int64,
    stride_v_head: tl.int64,
    stride_v_dim: tl.int64,
    QUERIES_PER_KV: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,  # rows per program: BLOCK_Q tokens x QUERIES_PER_KV heads, padded
    BLOCK_Q: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    TILE_N: tl.constexpr,  # the constexprs above come from the plan, those below from each call
    CAUSAL: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    USE_SINKS: tl.constexpr,
    USE_WINDOW_LEFT: tl.constexpr,
    USE_WINDOW_RIGHT: tl.constexpr,
    K_DIM_CONTIGUOUS: tl.constexpr,
    V_DIM_CONTIGUOUS: tl.constexpr,
    KV_FP8: tl.constexpr,  # the caches hold FP8 values x per-tensor scales
    INLINE_PTX: tl.constexpr,  # compiled for an NVIDIA GPU (not interpreted, not ROCm): inline PTX may be used
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32 inputs (no TF32), else "tf32" (unused for 16-bit)
):
    kv_head = tl.program_id(1)
    seq, q_block = _find_prefill_seq(query_start_loc_ptr, tl.program_id(0), first_seq, num_seqs, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if q_block * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len

    rows = tl.arange(0, BLOCK_M)
    query_in_seq = q_block * BLOCK_Q + rows // QUERIES_PER_KV  # [BLOCK_M]
    heads = kv_head * QUERIES_PER_KV + rows % QUERIES_PER_KV
    row_valid = (rows < BLOCK_Q * QUERIES_PER_KV) & (query_in_seq < q_len)
    query_pos = context_len + query_in_seq  # absolute position of each row's query token
    dims = tl.arange(0, HEAD_PAD)
    dim_valid = dims < HEAD_SIZE
    tokens = (q_start + query_in_seq).to(tl.int64)
    q = tl.load(q_ptr + tokens[:, None] * stride_q_token + heads[:, None] * stride_q_head + dims[None, :],
                mask=row_valid[:, None] & dim_valid[None, :], other=0.0)  # [BLOCK_M, HEAD_PAD]
    softmax_scale = _logit_scale(softmax_scale, q, q_scale_ptr, k_scale_ptr, KV_FP8)
    q = _dot_operand(q, KV_FP8)

    # KV positions any row of this block may see: [kv_begin, kv_end)
    first_pos = context_len + q_block * BLOCK_Q
    last_pos = context_len + tl.minimum(q_block * BLOCK_Q + BLOCK_Q, q_len) - 1
    kv_end = seq_len
    if CAUSAL:
        kv_end = tl.minimum(kv_end, last_pos + 1)
    if USE_WINDOW_RIGHT:
        kv_end = tl.minimum(kv_end, last_pos + window_right + 1)
    kv_begin = 0
    if USE_WINDOW_LEFT:
        kv_begin = tl.maximum(first_pos - window_left, 0)

    if USE_SINKS:
        m = tl.load(sinks_ptr + heads, mask=row_valid, other=0.0).to(tl.float32) * 1.4426950408889634
        l = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
    else:
        m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_PAD], dtype=tl.float32)
    block_table_row = block_table_ptr + seq * stride_block_table
    offsets_in_tile = tl.arange(0, TILE_N)

    for tile in range(kv_begin // TILE_N, _cdiv(kv_end, TILE_N)):
        positions = tile * TILE_N + offsets_in_tile
        in_range = (positions < kv_end) & (positions >= kv_begin)
        page = tl.load(block_table_row + positions // PAGE_SIZE, mask=in_range, other=0)
        slot = positions % PAGE_SIZE
        k = _load_kv_tile(k_cache_ptr, page, slot, kv_head, in_range, stride_k_page, stride_k_slot,
                          stride_k_head, stride_k_dim, HEAD_SIZE, HEAD_PAD, K_DIM_CONTIGUOUS)
        v = _load_kv_tile(v_cache_ptr, page, slot, kv_head, in_range, stride_v_page, stride_v_slot,
                          stride_v_head, stride_v_dim, HEAD_SIZE, HEAD_PAD, V_DIM_CONTIGUOUS)
        s = _scaled_logits(tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION), softmax_scale, softcap,
                           USE_SOFTCAP)  # [BLOCK_M, TILE_N]
        visible = in_range[None, :] & row_valid[:, None]
        if CAUSAL:
            visible = visible & (positions[None, :] <= query_pos[:, None])
        if USE_WINDOW_LEFT:
            visible = visible & (positions[None, :] >= query_pos[:, None] - window_left)
        if USE_WINDOW_RIGHT:
            visible = visible & (positions[None, :] <= query_pos[:, None] + window_right)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row may see nothing in this tile
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m - m_safe)
        l = l * alpha + tl.sum(p, axis=1)
        v = _value_dot_operand(v, q.dtype, INLINE_PTX)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v, input_precision=DOT_PRECISION)
        m = m_new

    l = tl.where(l == 0.0, 1.0, l)
    tl.store(out_ptr + tokens[:, None] * stride_out_token + heads[:, None] * stride_out_head + dims[None, :],
             _normalised(acc, l, v_scale_ptr, KV_FP8).to(out_ptr.dtype.element_ty),
             mask=row_valid[:, None] & dim_valid[None, :])
