"""Replacements for the patch ``vllm.triton_attn.split_launch`` (vLLM's own TRITON_ATTN backend).

- ``TritonAttentionMetadataBuilder.__init__``: also puts decodes (and, with speculative decoding,
  verify requests: vLLM's spec-as-decode) first in the batch and owns a planner with its workspace.
- ``TritonAttentionMetadataBuilder.build``: also plans the batch once (``AttentionPlan``).
- ``unified_attention`` (both bindings): runs the planned batch through attnplug's split launch
  (decode and verify rows: 3D split-KV kernel + reduction; prefill: 2D kernel) and hands every
  call it does not cover, or that has no plan, to vLLM's original kernel (also a mixed batch
  captured in a FULL CUDA graph, which TRITON_ATTN's ``ALWAYS`` support allows).
"""

from __future__ import annotations

import functools

import torch

from attnplug import ops
from attnplug.adapters.vllm.planning import (
    PlanStash,
    init_spec_as_decode,
    log_fallback_once,
    planner_of,
    unsupported_batch,
    unsupported_layer,
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


def _why_not(plan, kwargs) -> str | None:
    if plan is None:
        return "a call without an attnplug plan for its batch"
    if plan.num_prefills and capturing(kwargs["q"]):
        # TRITON_ATTN declares ALWAYS: under cudagraph_mode=FULL vLLM captures mixed batches too, and a
        # mixed plan's decode/prefill split is fixed at capture; uniform batches replay for any lengths
        return "a mixed prefill/decode batch captured in a FULL CUDA graph"
    return (
        unsupported_layer(
            alibi_slopes=kwargs.get("alibi_slopes"),
            use_alibi_sqrt=kwargs.get("use_alibi_sqrt", False),
            kv_quant_mode=kwargs.get("kv_quant_mode"),
            chunk_lookback=kwargs.get("chunk_lookback", -1),
        )
        or unsupported_batch(
            causal=kwargs["causal"],
            q_descale=kwargs.get("q_descale"),
            output_scale=kwargs.get("output_scale"),
            mm_prefix_range=kwargs.get("mm_prefix_range"),
            rswa_prefix_lens=kwargs.get("rswa_prefix_lens"),
            kv_dtype=kwargs["k"].dtype,
            query_dtype=kwargs["q"].dtype,
        )
        or ("qq_bias" if kwargs.get("qq_bias") is not None else None)
    )


def split_launch_unified_attention(original):
    paged_attention = ops.resolve("paged_attention")

    @functools.wraps(original)
    def unified_attention(*args, **kwargs):
        plan = None if args else plans.get(kwargs["seqused_k"])  # vLLM calls it with keywords only
        reason = _why_not(plan, kwargs)
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
        )

    return unified_attention
