"""Patches of vLLM's own attention backends, declared as data (see attnplug.adapters.patching.Patch)."""

from attnplug.adapters.patching import Patch, Rebinding

_TRITON_ATTN = "vllm.v1.attention.backends.triton_attn"
_BUILDER = f"{_TRITON_ATTN}:TritonAttentionMetadataBuilder"
_REPLACEMENTS = "attnplug.adapters.vllm.triton_attn"

UNIFIED_ATTENTION_SIGNATURE = (
    "q", "k", "v", "out", "cu_seqlens_q", "max_seqlen_q", "seqused_k", "max_seqlen_k", "softmax_scale", "causal",
    "window_size", "block_table", "softcap", "q_descale", "k_descale", "v_descale", "seq_threshold_3D",
    "num_par_softmax_segments", "softmax_segm_output", "softmax_segm_max", "softmax_segm_expsum", "alibi_slopes",
    "output_scale", "qq_bias", "sinks", "mm_prefix_range", "rswa_prefix_lens", "rswa_window", "use_alibi_sqrt",
    "kv_quant_mode", "k_scale_cache", "v_scale_cache", "chunk_lookback", "use_td", "mm_prefix_clamp_sliding_window",
)  # fmt: skip

PATCHES: list[Patch] = [
    Patch(
        id="vllm.triton_attn.split_launch",
        engine="vllm",
        rebinds=(
            Rebinding(
                targets=(f"{_BUILDER}.__init__",),
                replacement=f"{_REPLACEMENTS}:planning_builder_init",
                signature=("self", "kv_cache_spec", "layer_names", "vllm_config", "device"),
            ),
            Rebinding(
                targets=(f"{_BUILDER}.build",),
                replacement=f"{_REPLACEMENTS}:planning_builder_build",
                signature=("self", "common_prefix_len", "common_attn_metadata", "fast_build"),
            ),
            Rebinding(
                targets=(
                    "vllm.v1.attention.ops.triton_unified_attention:unified_attention",
                    f"{_TRITON_ATTN}:unified_attention",
                ),
                replacement=f"{_REPLACEMENTS}:split_launch_unified_attention",
                signature=UNIFIED_ATTENTION_SIGNATURE,
            ),
        ),
        versions=">=0.32.0,<0.34",
        upstream="vLLM PR 29020 (split launch, never merged); vLLM issue 48076 (decode falls to the 2D kernel at batch >= ~12)",
        why=(
            "TRITON_ATTN runs a mixed prefill/decode batch as one 2D launch and decode-only batches above "
            "128 // num_kv_heads sequences unsplit; attnplug plans once per batch and launches decode through a "
            "split-KV kernel sized to the GPU and prefill through a 2D kernel."
        ),
        remove_when="vLLM splits mixed batches and sizes the decode split from the batch itself.",
    ),
]
