"""Replacements for the patch ``vllm.triton_attn.split_launch`` (vLLM's own TRITON_ATTN backend).

- ``TritonAttentionMetadataBuilder.__init__``: also puts decodes (and, with speculative decoding,
  verify requests: vLLM's spec-as-decode) first in the batch and owns a planner with its workspace.
- ``TritonAttentionMetadataBuilder.build``: also plans the batch once (``AttentionPlan``).
- ``unified_attention`` (both bindings): runs the planned batch through attnplug's split launch
  (decode and verify rows: 3D split-KV kernel + reduction; prefill: 2D kernel) and hands every
  call it does not cover, or that has no plan, to vLLM's original kernel (also a mixed batch
  captured in a FULL CUDA graph, which TRITON_ATTN's ``ALWAYS`` support allows). An FP8 KV cache
  (``kv_quant_mode`` FP8_PER_TENSOR) arrives as FP8 views with ``k_descale`` / ``v_descale`` =
  ``layer._k_scale.expand((num_seqs, num_kv_heads))``: the kernels read the one-element scale behind it.
  On CUDA vLLM's Attention layer has quantized the query to fp8 as well (``q_descale = layer._q_scale``):
  the kernels read that query with its scale, so the patched backend keeps TRITON_ATTN's numerics; a
  decode batch that vLLM splits itself (its FP8 tensor-core kernel is faster there) goes back to vLLM.
"""

from __future__ import annotations

import functools

import torch

from attnplug import ops
from attnplug.adapters.vllm.planning import (
    FP8_KV_DTYPES,
    FP8_QUERY_DECODES_VLLM_SPLITS,
    UNSUPPORTED_SCALES,
    PlanStash,
    init_spec_as_decode,
    log_fallback_once,
    per_tensor_scale,
    planner_of,
    unsupported_batch,
    unsupported_layer,
    vllms_fp8_query_kernel_is_faster,
)

plans = PlanStash()
_WHERE = "patched TRITON_ATTN"


def planning_builder_init(original):
    @functools.wraps(original)
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        original(self, kv_cache_spec, layer_names, vllm_config, device)
        init_spec_as_decode(self)
        planner_of(self)

    return __init__


def planning_builder_build(original):
    @functools.wraps(original)
    def build(self, common_prefix_len, common_attn_metadata, fast_build=False):
        metadata = original(self, common_prefix_len, common_attn_metadata, fast_build)
        metadata.attnplug_plan = planner_of(self).plan(common_attn_metadata)
        plans.put(metadata.seq_lens, metadata.attnplug_plan)
        return metadata

    return build


def capturing(q) -> bool:
    """Whether this call is being captured into a CUDA graph (host check, no sync)."""
    return q.is_cuda and torch.cuda.is_current_stream_capturing()


_NO_SCALES = (None, None, None)


def _why_not(plan, kwargs) -> tuple[str | None, tuple]:
    """Why attnplug does not run this call (None: it does), and the per-tensor (q, k, v) scales for FP8."""
    if plan is None:
        return "a call without an attnplug plan for its batch", _NO_SCALES
    if plan.num_prefills and capturing(kwargs["q"]):
        # TRITON_ATTN declares ALWAYS: under cudagraph_mode=FULL vLLM captures mixed batches too, and a
        # mixed plan's decode/prefill split is fixed at capture; uniform batches replay for any lengths
        return "a mixed prefill/decode batch captured in a FULL CUDA graph", _NO_SCALES
    q, k, q_descale = kwargs["q"], kwargs["k"], kwargs.get("q_descale")
    reason = (
        unsupported_layer(
            alibi_slopes=kwargs.get("alibi_slopes"),
            use_alibi_sqrt=kwargs.get("use_alibi_sqrt", False),
            kv_quant_mode=kwargs.get("kv_quant_mode"),
            chunk_lookback=kwargs.get("chunk_lookback", -1),
        )
        or unsupported_batch(
            causal=kwargs["causal"],
            q_descale=q_descale,
            output_scale=kwargs.get("output_scale"),
            mm_prefix_range=kwargs.get("mm_prefix_range"),
            rswa_prefix_lens=kwargs.get("rswa_prefix_lens"),
            kv_dtype=k.dtype,
            query_dtype=q.dtype,
            out_dtype=kwargs["out"].dtype,
            on_gpu=q.is_cuda,
        )
        or ("qq_bias" if kwargs.get("qq_bias") is not None else None)
    )
    if reason is not None or k.dtype not in FP8_KV_DTYPES:
        return reason, _NO_SCALES
    # FP8 cache: per-tensor scales (``k_descale`` expanded over sequences and heads; ``q_descale`` 0-d)
    scales = (per_tensor_scale(q_descale) if q_descale is not None else None,
              per_tensor_scale(kwargs.get("k_descale")), per_tensor_scale(kwargs.get("v_descale")))
    if (q_descale is not None and scales[0] is None) or scales[1] is None or scales[2] is None:
        return UNSUPPORTED_SCALES, _NO_SCALES
    if q_descale is not None and vllms_fp8_query_kernel_is_faster(kwargs):
        return FP8_QUERY_DECODES_VLLM_SPLITS, _NO_SCALES
    return None, scales


def split_launch_unified_attention(original):
    paged_attention = ops.resolve("paged_attention")

    @functools.wraps(original)
    def unified_attention(*args, **kwargs):
        plan = None if args else plans.get(kwargs["seqused_k"])  # vLLM calls it with keywords only
        reason, (q_scale, k_scale, v_scale) = _why_not(plan, kwargs)
        if reason is not None:
            log_fallback_once(_WHERE, reason)
            return original(*args, **kwargs)
        paged_attention(
            kwargs["q"],
            kwargs["k"],
            kwargs["v"],
            kwargs["block_table"],
            plan,
            kwargs["out"],
            softmax_scale=kwargs["softmax_scale"],
            causal=True,
            window_size=kwargs["window_size"],
            softcap=kwargs["softcap"],
            sinks=kwargs.get("sinks"),
            q_scale=q_scale,
            k_scale=k_scale,
            v_scale=v_scale,
        )

    return unified_attention
