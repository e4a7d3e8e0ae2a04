"""Once-per-batch planning inside vLLM, shared by the ATTNPLUG backend and the TRITON_ATTN patch.

vLLM's metadata builders run once per batch (per KV-cache group); the attention layers then run
with the metadata they built. Here the builder also makes attnplug's ``AttentionPlan`` into a
workspace it owns, so the per-layer call does no planning and allocates nothing.

Speculative decoding: the builder opts into vLLM's spec-as-decode (``_init_reorder_batch_threshold(1,
supports_spec_as_decode=True)``), so vLLM puts every request of at most ``1 + num_speculative_tokens``
query tokens (decodes, verify requests, short extends) first in the batch, and the plan runs them all
through the split-KV kernel. CUDA-graph padding lanes (query length 0, ``seq_len`` 0) are decode-like
lanes that the kernels skip.
"""

from __future__ import annotations

import weakref

import torch

from attnplug import ops, report
from attnplug._log import log_once
from attnplug.core.attention import FP8_KV_DTYPES

REORDER_BATCH_THRESHOLD = 1  # without speculative decoding: decode requests (one query token) first


def init_spec_as_decode(builder) -> None:
    """Sets ``builder.reorder_batch_threshold`` through vLLM's own spec-as-decode mechanism.

    ``1 + num_speculative_tokens`` with speculative decoding, else 1; verify requests longer than
    attnplug's split-KV kernel takes stay prefills (threshold 1), with one log line.
    """
    from attnplug.core.attention.plan import MAX_DECODE_QUERY_LEN

    builder._init_reorder_batch_threshold(REORDER_BATCH_THRESHOLD, supports_spec_as_decode=True)
    if builder.reorder_batch_threshold is not None and builder.reorder_batch_threshold > MAX_DECODE_QUERY_LEN:
        log_once(f"speculative verify requests of {builder.reorder_batch_threshold} query tokens exceed attnplug's "
                 f"split-KV limit of {MAX_DECODE_QUERY_LEN}: they run through its prefill kernel")
        builder.reorder_batch_threshold = REORDER_BATCH_THRESHOLD


class VllmPlanner:
    """What one metadata builder needs to plan every batch: head layout, page size, workspace."""

    def __init__(self, vllm_config, num_q_heads: int, num_kv_heads: int, head_size: int, page_size: int, device,
                 decode_threshold: int):
        from attnplug.core import AttentionWorkspace

        scheduler = vllm_config.scheduler_config
        self.num_q_heads, self.num_kv_heads = num_q_heads, num_kv_heads
        self.head_size, self.page_size = head_size, page_size
        self.decode_threshold = decode_threshold
        self.workspace = AttentionWorkspace.allocate(
            scheduler.max_num_seqs,
            scheduler.max_num_batched_tokens,
            num_q_heads,
            head_size,
            device=torch.device(device),
            max_decode_query_len=decode_threshold,
        )
        self._plan_attention = ops.resolve("plan_attention")

    def plan(self, common_attn_metadata):
        """The ``AttentionPlan`` of one batch (decode-like requests first), from host-side facts only."""
        from vllm.v1.attention.backends.utils import split_decodes_and_prefills

        num_decodes, num_prefills, _, _ = split_decodes_and_prefills(
            common_attn_metadata, decode_threshold=self.decode_threshold
        )
        max_query_len = max(common_attn_metadata.max_query_len, 1)
        # real query tokens of the decode-like requests (vLLM's own count includes graph padding rows)
        report.count_split_kv(num_decodes, int(common_attn_metadata.query_start_loc_cpu[num_decodes]))
        return self._plan_attention(
            common_attn_metadata.query_start_loc,
            common_attn_metadata.seq_lens,
            num_decodes=num_decodes,
            num_q_heads=self.num_q_heads,
            num_kv_heads=self.num_kv_heads,
            head_size=self.head_size,
            page_size=self.page_size,
            max_seqlen_q=max_query_len,
            max_seqlen_k=max(common_attn_metadata.max_seq_len, 1),
            max_decode_query_len=min(max_query_len, self.decode_threshold) if num_prefills == 0 else self.decode_threshold,
            workspace=self.workspace,
        )


def planner_of(builder) -> VllmPlanner:
    """The builder's planner, made on first use (the ATTNPLUG backend's builder shares this)."""
    planner = getattr(builder, "attnplug_planner", None)
    if planner is None:
        planner = builder.attnplug_planner = VllmPlanner(
            builder.vllm_config,
            builder.num_heads_q,
            builder.num_heads_kv,
            builder.headdim,
            builder.block_size,
            builder.device,
            decode_threshold=builder.reorder_batch_threshold or REORDER_BATCH_THRESHOLD,
        )
    return planner


class PlanStash:
    """Finds a batch's plan again from the ``seq_lens`` tensor that ``unified_attention`` receives.

    vLLM passes ``attn_metadata.seq_lens`` (the very tensor object the builder saw) to every layer
    of the batch; the stash holds a weak reference to it, so a plan is never matched to a later
    batch whose tensor happens to reuse the address.
    """

    def __init__(self):
        self._plans: dict[int, tuple[weakref.ref, object]] = {}

    def put(self, seq_lens: torch.Tensor, plan) -> None:
        self._plans = {key: entry for key, entry in self._plans.items() if entry[0]() is not None}
        self._plans[id(seq_lens)] = (weakref.ref(seq_lens), plan)

    def get(self, seq_lens: torch.Tensor):
        entry = self._plans.get(id(seq_lens))
        return entry[1] if entry is not None and entry[0]() is seq_lens else None


FP8_PER_TENSOR = "FP8_PER_TENSOR"  # vLLM's KVQuantMode for --kv-cache-dtype fp8 / fp8_e4m3 / fp8_e5m2
_SIXTEEN_BIT = (torch.float16, torch.bfloat16)
UNSUPPORTED_SCALES = "FP8 scales that are not one float32 value per tensor"


def unsupported_layer(*, alibi_slopes, use_alibi_sqrt, kv_quant_mode, chunk_lookback) -> str | None:
    """Why attnplug's kernels cannot serve a layer configured like this (None: they can).

    Of vLLM's quantized KV caches attnplug reads the per-tensor FP8 one (``KVQuantMode.FP8_PER_TENSOR``);
    the per-token-head int8 / fp8 / int4 modes (scales inside the cache) and the others are vLLM's.
    """
    if alibi_slopes is not None or use_alibi_sqrt:
        return "ALiBi"
    if kv_quant_mode is not None and kv_quant_mode.name not in ("NONE", FP8_PER_TENSOR):
        return f"quantized KV cache ({kv_quant_mode.name})"
    if chunk_lookback != -1:
        return "chunked (lookback) attention"
    return None


def unsupported_fp8_storage(fp8_dtype: torch.dtype) -> str | None:
    """Why attnplug cannot read an FP8 KV cache that vLLM stores as ``fp8_dtype`` (None: it can).

    vLLM stores every ``fp8*`` ``--kv-cache-dtype`` of these backends as ``current_platform.fp8_dtype()``
    (float8_e4m3fn; float8_e4m3fnuz on some ROCm GPUs, which attnplug's kernels do not read).
    """
    return None if fp8_dtype in FP8_KV_DTYPES else f"FP8 KV cache stored as {fp8_dtype}"


def unsupported_batch(
    *, causal, q_descale, output_scale, mm_prefix_range, rswa_prefix_lens, kv_dtype, query_dtype, out_dtype=None,
    on_gpu=False,
) -> str | None:
    """Why attnplug's kernels do not cover this call of a layer they serve (None: they do).

    ``kv_dtype`` is the dtype the caches are read as: the query's, or an FP8 dtype (``FP8_KV_DTYPES``, with
    per-tensor scales, see :func:`per_tensor_scale`) for float16 / bfloat16 queries (float32 too off the GPU)
    or for FP8 queries with their per-tensor ``q_descale`` (vLLM's query quantization on CUDA) and a 16-bit
    output. ``out_dtype`` defaults to the query's.
    """
    if causal is not True:
        return "non-causal or per-sequence causal attention"
    if query_dtype in FP8_KV_DTYPES:
        if kv_dtype not in FP8_KV_DTYPES:
            return f"a query in {query_dtype} over a KV cache in {kv_dtype}"
        if q_descale is None:
            return f"a query in {query_dtype} without q_descale"
        if out_dtype not in _SIXTEEN_BIT:
            return f"a query in {query_dtype} with output in {out_dtype}"
    elif q_descale is not None or query_dtype.itemsize == 1:
        return f"a query in {query_dtype} with q_descale" if q_descale is not None else f"a query in {query_dtype}"
    elif kv_dtype != query_dtype:
        if kv_dtype not in FP8_KV_DTYPES:
            return f"KV cache in {kv_dtype} with queries in {query_dtype}"
        if query_dtype not in _SIXTEEN_BIT and on_gpu:
            return f"an FP8 KV cache with {query_dtype} queries on the GPU"
    if output_scale is not None:
        return "fp8 output scale"
    if mm_prefix_range is not None:
        return "multimodal prefix ranges"
    if rswa_prefix_lens is not None:
        return "R-SWA prefix lengths"
    return None


# The split-K (3D) FP8-query kernel of vLLM 0.32 / 0.33 beat attnplug only on the smallest decode batch
# measured (H200, 2026-12-02: bs 1 ctx 1k, 0.91x of attnplug's time; from bs 4 ctx 1k and bs 1 ctx 4k on,
# attnplug took 0.35-0.91x of its time): such batches, bounded by their KV tokens, stay vLLM's.
FP8_QUERY_HAND_BACK_MAX_KV_TOKENS = 2048
FP8_QUERY_DECODES_VLLM_SPLITS = (f"an FP8-query decode batch of at most {FP8_QUERY_HAND_BACK_MAX_KV_TOKENS} KV "
                                 "tokens that vLLM splits itself (its FP8 tensor-core kernel is faster there)")


def vllms_fp8_query_kernel_is_faster(kwargs: dict) -> bool:
    """Whether this ``unified_attention`` call (its keyword arguments, FP8 queries) goes to vLLM's split-K
    kernel for sure and is small enough that that kernel beats attnplug's: decodes only (one query token
    each), at most ``seq_threshold_3D`` sequences and ``num_seqs * max_seqlen_k`` at most
    ``FP8_QUERY_HAND_BACK_MAX_KV_TOKENS`` (host ints: no sync), in 0.32 and 0.33 alike."""
    threshold = kwargs.get("seq_threshold_3D")
    num_seqs = kwargs["seqused_k"].shape[0]
    return (threshold is not None and kwargs.get("softmax_segm_output") is not None and kwargs["max_seqlen_q"] == 1
            and num_seqs <= threshold and num_seqs * kwargs["max_seqlen_k"] <= FP8_QUERY_HAND_BACK_MAX_KV_TOKENS)


def per_tensor_scale(scale: torch.Tensor | None) -> torch.Tensor | None:
    """The one-element float32 tensor behind a per-tensor KV scale as vLLM hands it over (None: it is not one).

    vLLM passes ``layer._k_scale`` (a 0-d float32 buffer) to ``unified_attention`` as
    ``layer._k_scale.expand((num_seqs, num_kv_heads))``: every element is that one value (all strides 0).
    The result is a view of the same memory (no copy, no host sync), so a CUDA graph replays with the
    scale's current value. Host-side attribute reads only.
    """
    if scale is None or scale.dtype != torch.float32:
        return None
    if scale.dim() == 0 or scale.numel() == 1:
        return scale
    base = scale._base  # the tensor that was expanded (the view's root): usually layer._k_scale itself
    if base is not None and base.numel() == 1 and base.dtype == torch.float32:
        return base
    if any(scale.stride()):
        return None  # several distinct values: per-sequence / per-head scales
    return scale.as_strided((), ())  # a broadcast of one element of a larger tensor


def log_fallback_once(where: str, reason: str) -> None:
    """One log line per (place, reason) per process when attnplug hands a call back to vLLM's kernel."""
    log_once(f"{where} falls back to vLLM's Triton kernel for {reason}")
