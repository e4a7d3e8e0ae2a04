"""The attention kernels a user could run instead of attnplug's, each called the way its engine calls it.

Every peer takes one batch: ``q`` ``[num_tokens, num_q_heads, head]``, the block table
``[num_seqs, max_pages]`` (int32 page ids into the cache), ``query_start_loc`` ``[num_seqs + 1]`` and
``seq_lens`` ``[num_seqs]`` (int32), and writes ``out`` like ``q`` (what ``bench_paged_attention`` and
``bench_verify_attention`` time and compare):

* :class:`VllmUnifiedAttention`: one vLLM release's ``unified_attention`` (installed or fetched,
  :mod:`.stock`) with the scratch and the 3D rule its TRITON_ATTN backend uses;
* :class:`SglangTritonDecode`: SGLang 0.5.23's Triton backend decode (``decode_attention_fwd``, its
  own ``get_num_kv_splits`` heuristic) on SGLang's token pool, decode batches only;
* :class:`FlexPaged`: torch FlexAttention over the paged cache with the block mask vLLM 0.33's
  ``FLEX_ATTENTION`` backend builds (direct build: 16-query groups, one KV block per page);
* :class:`SdpaDense`: torch SDPA on the same KV gathered dense and contiguous (no paging), uniform
  decode batches only: what paging costs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
from packaging.version import Version

from attnplug.benchmarks import stock

STOCK_SEGMENTS = 16  # vLLM's num_par_softmax_segments
MAX_3D_QUERY_LEN_0_33 = 8  # vLLM 0.33: split-K also for verify queries of up to 8 tokens


@dataclass(frozen=True)
class Heads:
    num_q_heads: int
    num_kv_heads: int
    head_size: int
    device: torch.device

    @property
    def scale(self) -> float:
        return self.head_size ** -0.5


class VllmUnifiedAttention:
    """One vLLM release's ``unified_attention`` with the scratch its TRITON_ATTN builder allocates.

    ``seq_threshold_3D = 128 // num_kv_heads`` (no capture-size snapping). The kernel applies its
    release's rule: 0.32 splits KV (16 segments) only for decode-only batches of at most that many
    sequences; 0.33 also for queries of up to 8 tokens (scratch rows per query token)."""

    def __init__(self, kernel: stock.StockKernel, heads: Heads, max_query_len: int):
        module = kernel[stock.VLLM_ATTENTION]
        self.name, self.fn = kernel.name, module.unified_attention
        self.fp8_per_tensor = module.KVQuantMode.FP8_PER_TENSOR  # what its backend passes for an fp8 cache
        self.heads = heads
        self.threshold = 128 // heads.num_kv_heads
        per_query = min(max_query_len, MAX_3D_QUERY_LEN_0_33) if Version(kernel.version) >= Version("0.33") else 1
        rows, head_pad = self.threshold * per_query, triton.next_power_of_2(heads.head_size)
        f32 = dict(dtype=torch.float32, device=heads.device)
        self.segm_out = torch.empty(rows, heads.num_q_heads, STOCK_SEGMENTS, head_pad, **f32)
        self.segm_max = torch.empty(rows, heads.num_q_heads, STOCK_SEGMENTS, **f32)
        self.segm_expsum = torch.empty_like(self.segm_max)
        self.one = torch.ones(1, **f32)

    def launch(self, k, v, q, out, query_start_loc, max_seqlen_q, seq_lens, max_seqlen_k, block_table,
               descales=(None, None, None)):
        """``descales``: (q, k, v) float32 one-element scales for an FP8 cache (q's only for FP8 queries), passed
        with ``kv_quant_mode=FP8_PER_TENSOR`` as vLLM's TRITON_ATTN does."""
        q_descale, k_descale, v_descale = descales
        quantized = k_descale is not None
        extra = dict(kv_quant_mode=self.fp8_per_tensor) if quantized else {}
        self.fn(q=q, k=k, v=v, out=out, cu_seqlens_q=query_start_loc, max_seqlen_q=max_seqlen_q, seqused_k=seq_lens,
                max_seqlen_k=max_seqlen_k, softmax_scale=self.heads.scale, causal=True, window_size=(-1, -1),
                block_table=block_table, softcap=0, q_descale=q_descale,
                k_descale=k_descale if quantized else self.one, v_descale=v_descale if quantized else self.one,
                seq_threshold_3D=self.threshold, num_par_softmax_segments=STOCK_SEGMENTS,
                softmax_segm_output=self.segm_out, softmax_segm_max=self.segm_max,
                softmax_segm_expsum=self.segm_expsum, **extra)

    def call(self, k, v, b: dict, descales=(None, None, None)):
        """A callable running batch ``b`` (keys as ``bench_paged_attention.KVPool.batch``) over cache k / v."""
        return lambda: self.launch(k, v, b["q"], b["out"], b["query_start_loc"], b["max_seqlen_q"], b["seq_lens"],
                                   b["max_seqlen_k"], b["block_table"], descales)


def vllm_peers(heads: Heads, max_query_len: int = 1) -> dict[str, VllmUnifiedAttention]:
    """Every vLLM release found (installed or fetched), by provider name; a warning line per missing one."""
    found = stock.vllm_attention()
    for version in stock.VLLM_RELEASES:
        if stock.provider_name("vllm", version) not in found:
            print(stock.missing_note(f"vLLM {version}'s unified_attention"), flush=True)
    return {name: VllmUnifiedAttention(kernel, heads, max_query_len) for name, kernel in found.items()}


class SglangTritonDecode:
    """SGLang 0.5.23's Triton backend decode on its token pool: per step ``get_num_kv_splits_triton``
    fills the splits (``max_kv_splits`` 8, SGLang's CUDA default), then ``decode_attention_fwd``.

    ``k_tokens`` / ``v_tokens``: ``[num_slots, num_kv_heads, head]``, slot ``page * page_size + i``
    (the paged cache's pages, flat), so one block table serves both layouts."""

    name = "sglang_0_5"
    MAX_KV_SPLITS = 8

    def __init__(self, kernel: stock.StockKernel, heads: Heads, k_tokens, v_tokens, page_size: int):
        self.decode_attention_fwd = kernel[stock.SGLANG_DECODE].decode_attention_fwd
        self.get_num_kv_splits_triton = kernel[stock.SGLANG_METADATA].get_num_kv_splits_triton
        self.heads, self.k, self.v, self.page_size = heads, k_tokens, v_tokens, page_size
        self.num_sms = torch.cuda.get_device_properties(heads.device).multi_processor_count \
            if heads.device.type == "cuda" else 132  # CPU smoke run: the H200's count
        self.use_pdl = heads.device.type == "cuda" and torch.cuda.get_device_capability(heads.device)[0] >= 9

    def call(self, b: dict):
        """Decode-only batch ``b``: the buffers SGLang's backend builds for it, then the step's calls."""
        h, bs = self.heads, b["seq_lens"].numel()
        seq_lens = b["seq_lens"].long()
        slot_in_page = torch.arange(b["max_seqlen_k"], device=h.device) % self.page_size
        slots = b["block_table"].long().repeat_interleave(self.page_size, dim=1)[:, : b["max_seqlen_k"]]
        slots = slots * self.page_size + slot_in_page
        live = torch.arange(b["max_seqlen_k"], device=h.device)[None, :] < seq_lens[:, None]
        kv_indices = slots[live]  # int64, row-major: each sequence's slots in order
        kv_indptr = torch.zeros(bs + 1, dtype=torch.int32, device=h.device)
        kv_indptr[1:] = torch.cumsum(seq_lens, 0)
        num_kv_splits = torch.empty(bs, dtype=torch.int32, device=h.device)
        attn_logits = torch.empty(bs, h.num_q_heads, self.MAX_KV_SPLITS, h.head_size, dtype=torch.float32,
                                  device=h.device)
        attn_lse = torch.empty(bs, h.num_q_heads, self.MAX_KV_SPLITS, dtype=torch.float32, device=h.device)
        uneven_batch = torch.zeros(1, dtype=torch.int32, device=h.device)
        schedule_seq = 256 if bs < 256 else triton.next_power_of_2(bs)
        args = (b["q"], self.k, self.v, b["out"], kv_indptr, kv_indices, attn_logits, attn_lse, num_kv_splits,
                self.MAX_KV_SPLITS, h.scale, 1.0, 1.0)
        kwargs = dict(logit_cap=0.0, sinks=None, xai_temperature_len=-1, has_mla=False, use_pdl=self.use_pdl,
                      page_size=1, score_mod=None, aux_tensors=None, uneven_batch=uneven_batch, enable_lean=None,
                      lean_Mp=None, lean_Lp=None, lean_Op=None, lean_locks=None)  # as TritonAttnBackend.forward_decode

        def fn():
            self.get_num_kv_splits_triton[(1,)](
                num_kv_splits, seq_lens, bs, 1, h.num_q_heads, h.num_kv_heads, self.MAX_KV_SPLITS, self.num_sms,
                MAX_NUM_SEQ=schedule_seq, uneven_batch_ptr=uneven_batch)
            self.decode_attention_fwd(*args, **kwargs)

        return fn


def sglang_peer(heads: Heads, k_tokens, v_tokens, page_size: int) -> SglangTritonDecode | None:
    kernel = stock.sglang_kernels()
    if kernel is None:
        print(stock.missing_note(f"SGLang {stock.SGLANG_RELEASE}'s Triton decode"), flush=True)
        return None
    return SglangTritonDecode(kernel, heads, k_tokens, v_tokens, page_size)


def unique_static_unsorted(x: torch.Tensor, num_values: int) -> torch.Tensor:
    """Per row of ``x`` (int64 ``[rows, n]``, values in ``[0, num_values]``): the first occurrence of each
    non-zero value, left-packed in order, ``-1`` after (vLLM 0.33's ``unique_static_unsorted``)."""
    rows, n = x.shape
    idx = torch.arange(n, device=x.device).expand(rows, n)
    first = torch.full((rows, num_values + 1), n, device=x.device)
    first.scatter_reduce_(1, x, idx, reduce="amin")
    keep = (x != 0) & (idx == first.gather(1, x))
    dest = torch.where(keep, torch.cumsum(keep.long(), dim=1) - 1, n)
    packed = torch.full((rows, n + 1), -1, device=x.device, dtype=x.dtype)
    return packed.scatter_(1, dest, x)[:, :n]


class FlexPaged:
    """torch FlexAttention over a paged cache, as vLLM 0.33's ``FLEX_ATTENTION`` backend runs it.

    The cache is one sequence of slots (``[1, kv_heads, num_pages * page, head]``); the block mask is
    built directly (vLLM's ``_build_block_mask_direct``): queries in groups of 16, each group reading
    the union of its sequences' live pages (so a group of decodes of 16 sequences reads all 16
    sequences' pages), one KV block per page, and a mask_mod mapping physical slots back to logical
    positions (``physical_to_logical``) with the causal rule. Page 0 is never live (vLLM's null
    block). ``flex_attention`` is compiled (``fullgraph``) on the GPU and runs eagerly on the CPU.

    Flex's kernel indexes the cache with 32-bit offsets, so each batch gets a compact cache of the
    pages it reads (same order within each sequence, page ids renumbered); a batch whose own KV
    exceeds 2^31 elements per cache tensor is refused with a ``ValueError``."""

    name = "flex_attention"
    Q_BLOCK = 16

    def __init__(self, heads: Heads, page_size: int):
        from torch.nn.attention.flex_attention import flex_attention

        self.heads, self.page_size = heads, page_size
        if heads.device.type == "cuda":
            torch._dynamo.config.recompile_limit = 64
            torch._dynamo.config.fail_on_recompile_limit_hit = True  # never the eager flex (it materializes scores)
            self.flex = torch.compile(flex_attention, fullgraph=True)
            self.kernel_options = {"FORCE_USE_FLEX_ATTENTION": True, "BLOCK_M": self.Q_BLOCK, "BLOCK_N": page_size}
        else:
            self.flex, self.kernel_options = flex_attention, None

    def compact_cache(self, k_pages, v_pages, block_table):
        """(k, v ``[1, kv_heads, (1 + n) * page, head]``, block table over them): the n pages ``block_table``
        names, renumbered from 1 (page 0: the null block)."""
        pages, renumbered = torch.unique(block_table.long(), return_inverse=True)
        if (1 + pages.numel()) * self.page_size * self.heads.num_kv_heads * self.heads.head_size >= 2 ** 31:
            raise ValueError(f"the batch's KV ({pages.numel()} pages) exceeds the 2^31 elements FlexAttention's "
                             f"32-bit cache offsets address")

        def compact(cache):
            flat = torch.cat([cache[:1] * 0, cache[pages]]).flatten(0, 1)  # [slots, kv_heads, head]
            return flat.permute(1, 0, 2).unsqueeze(0)

        return compact(k_pages), compact(v_pages), (renumbered + 1).to(torch.int32)

    def block_mask(self, b: dict, block_table: torch.Tensor, num_pages: int):
        from torch.nn.attention.flex_attention import BlockMask

        device, page = self.heads.device, self.page_size
        qsl, seq_lens, block_table = b["query_start_loc"].long(), b["seq_lens"].long(), block_table.long()
        bs, max_pages = block_table.shape
        num_tokens = int(qsl[-1])
        doc_ids = torch.repeat_interleave(torch.arange(bs, device=device), qsl[1:] - qsl[:-1])
        logical = torch.arange(max_pages, device=device)
        live = logical[None, :] < ((seq_lens + page - 1) // page)[:, None]
        physical_to_logical = torch.full((bs, num_pages), -1, dtype=torch.long, device=device)
        physical_to_logical.scatter_reduce_(1, torch.where(live, block_table, 0), torch.where(live, logical, 0),
                                            reduce="amax")
        physical_to_logical[:, 0] = -1
        decode_offset = seq_lens - (qsl[1:] - qsl[:-1])
        q_pos = torch.arange(num_tokens, device=device) - qsl[doc_ids] + decode_offset[doc_ids]
        used = block_table[doc_ids].masked_fill(~live[doc_ids] | (logical[None, :] * page > q_pos[:, None]), 0)
        pad = (-num_tokens) % self.Q_BLOCK
        used = torch.cat([used, used.new_zeros(pad, max_pages)]).reshape(-1, self.Q_BLOCK * max_pages)
        kv_indices = unique_static_unsorted(used, num_pages).to(torch.int32)
        kv_num_blocks = (kv_indices >= 0).sum(dim=-1).to(torch.int32)

        def mask_mod(_b, _h, q_idx, kv_idx):
            seq = doc_ids[q_idx]
            logical_page = physical_to_logical[seq, kv_idx // page]
            kv_pos = logical_page * page + kv_idx % page
            q_at = q_idx - qsl[seq] + decode_offset[seq]
            return (logical_page >= 0) & (kv_pos < seq_lens[seq]) & (kv_pos <= q_at)

        return BlockMask.from_kv_blocks(kv_num_blocks[None, None], kv_indices[None, None], None, None,
                                        BLOCK_SIZE=(self.Q_BLOCK, page), mask_mod=mask_mod,
                                        seq_lengths=(num_tokens, num_pages * page), compute_q_blocks=False)

    def call(self, k_pages, v_pages, b: dict):
        """``k_pages`` / ``v_pages``: ``[num_pages, page, kv_heads, head]``. The compact cache and the block mask
        are built here, once per batch (vLLM builds the mask in its metadata builder); the callable is the
        layer's work: the flex call and the copy into ``out``."""
        k, v, block_table = self.compact_cache(k_pages, v_pages, b["block_table"])
        mask = self.block_mask(b, block_table, k.shape[2] // self.page_size)
        q = b["q"].unsqueeze(0).transpose(1, 2)  # [1, q_heads, num_tokens, head]
        gqa = self.heads.num_q_heads != self.heads.num_kv_heads

        def fn():
            out = self.flex(q, k, v, None, mask, self.heads.scale, enable_gqa=gqa, kernel_options=self.kernel_options)
            b["out"].copy_(out[0].transpose(0, 1))

        return fn


class SdpaDense:
    """torch SDPA (its own backend choice) on the batch's KV gathered dense: ``[bs, kv_heads, ctx, head]``,
    contiguous, for uniform decode batches (every sequence ``ctx`` tokens, one query)."""

    name = "sdpa_dense"

    def __init__(self, heads: Heads):
        self.heads = heads

    def call(self, k_pages, v_pages, b: dict):
        """``k_pages`` / ``v_pages``: ``[num_pages, page, kv_heads, head]``; the dense copy is made here."""
        bs, ctx = b["seq_lens"].numel(), b["max_seqlen_k"]

        def dense(pages):
            return pages[b["block_table"].long()].flatten(1, 2)[:, :ctx].transpose(1, 2).contiguous()

        k, v = dense(k_pages), dense(v_pages)
        q = b["q"].view(bs, 1, self.heads.num_q_heads, -1).transpose(1, 2)  # [bs, q_heads, 1, head]
        gqa = self.heads.num_q_heads != self.heads.num_kv_heads

        def fn():
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=self.heads.scale, enable_gqa=gqa)
            b["out"].copy_(out.transpose(1, 2).reshape_as(b["out"]))

        return fn
