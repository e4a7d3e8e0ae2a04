"""vLLM attention backend ``ATTNPLUG``: vLLM's Triton backend with attnplug's plan and kernels.

Selected with ``--attention-backend ATTNPLUG``. It keeps everything of ``TRITON_ATTN`` that is not
the attention kernel (KV-cache layout and write path, supported dtypes, metadata), plans once per
batch in the metadata builder and runs ``paged_attention`` once per layer. Calls it does not
cover (ALiBi, per-token-head quantized KV caches, fp8 output scale, multimodal prefix ranges, R-SWA,
encoder attention, ...) go to vLLM's Triton kernel, with one log line per reason.

FP8 KV cache (``--kv-cache-dtype fp8`` / ``fp8_e4m3`` / ``fp8_e5m2``: ``KVQuantMode.FP8_PER_TENSOR``):
vLLM writes the cache (its own reshape-and-cache, dividing by the layer's ``_k_scale`` / ``_v_scale``)
as ``current_platform.fp8_dtype()``; attnplug reads the same bytes as that dtype with the same two
device scalars. On CUDA vLLM's Attention layer would also quantize the query to fp8 (the impl's
``supports_quant_query_input``); the impl turns that off for the layers it serves, so attnplug's
kernels take the query in the model's dtype (no quantization kernel, no query rounding). A query that
arrives in fp8 anyway runs with the layer's ``_q_scale`` into a 16-bit output.

This module imports vLLM: it is loaded only by vLLM itself, through the registered class path.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from vllm.v1.attention.backend import AttentionCGSupport, AttentionType
from vllm.v1.attention.backends.triton_attn import (
    TritonAttentionBackend,
    TritonAttentionImpl,
    TritonAttentionMetadataBuilder,
)

from attnplug import ops
from attnplug.adapters.vllm.planning import (
    FP8_PER_TENSOR,
    REORDER_BATCH_THRESHOLD,
    UNSUPPORTED_SCALES,
    init_spec_as_decode,
    log_fallback_once,
    per_tensor_scale,
    planner_of,
    unsupported_batch,
    unsupported_fp8_storage,
    unsupported_layer,
)
from attnplug.adapters.vllm.registration import BACKEND_NAME


class AttnplugMetadataBuilder(TritonAttentionMetadataBuilder):
    """TRITON_ATTN's metadata plus attnplug's per-batch plan (``metadata.attnplug_plan``).

    Speculative decoding: verify requests (``1 + num_speculative_tokens`` query tokens) are decodes
    (vLLM's spec-as-decode), planned into the split-KV kernel with decodes.

    CUDA graphs: plan and kernels are capturable (the plan's workspace is owned here), and the
    decode kernels derive each sequence's split from its device-side lengths, so a graph captured
    for a uniform batch (decodes, or verify requests of ``1 + k`` tokens each) replays correctly for
    any lengths, padding lanes included (``UNIFORM_BATCH``). Mixed batches are left to piecewise
    graphs, where attention runs eagerly.
    """

    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_BATCH
    reorder_batch_threshold: int = REORDER_BATCH_THRESHOLD

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        init_spec_as_decode(self)
        planner_of(self)  # the workspace is allocated here, once

    def build(self, common_prefix_len, common_attn_metadata, fast_build=False):
        metadata = super().build(common_prefix_len, common_attn_metadata, fast_build)
        if not hasattr(metadata, "attnplug_plan"):  # the split_launch patch of TRITON_ATTN may have planned already
            metadata.attnplug_plan = planner_of(self).plan(common_attn_metadata)
        return metadata


class AttnplugImpl(TritonAttentionImpl):
    """Runs ``paged_attention`` with the batch's plan; hands uncovered calls to TRITON_ATTN's forward."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._paged_attention = ops.resolve("paged_attention")
        self._kv_cache_views: tuple = (None, None, None)  # (kv_cache, k view, v view) of this layer
        self._kv_fp8 = self._kv_quant_mode.name == FP8_PER_TENSOR
        self._layer_fallback = (
            (f"attention type {self.attn_type}" if self.attn_type != AttentionType.DECODER else None)
            or unsupported_layer(
                alibi_slopes=self.alibi_slopes,
                use_alibi_sqrt=self.use_alibi_sqrt,
                kv_quant_mode=self._kv_quant_mode,
                chunk_lookback=self.chunk_lookback,
            )
            or (unsupported_fp8_storage(self.fp8_dtype) if self._kv_fp8 else None)
        )
        if self._kv_fp8 and self._layer_fallback is None:
            # vLLM's Attention layer reads this after building the impl (and at every forward): with it
            # off, queries reach forward in the model's dtype instead of quantized to fp8 (CUDA)
            self.supports_quant_query_input = False

    def _kv_views(self, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[num_blocks, num_kv_heads, block_size, 2 * head_size]`` -> k, v
        ``[num_blocks, block_size, num_kv_heads, head_size]`` (an FP8 cache's bytes read as ``self.fp8_dtype``,
        the dtype vLLM's KV write stores)."""
        cached, k_view, v_view = self._kv_cache_views
        if cached is not kv_cache:
            k_view, v_view = kv_cache.transpose(1, 2).split(self.head_size, dim=-1)
            if self._kv_fp8 and k_view.dtype != self.fp8_dtype:
                k_view, v_view = k_view.view(self.fp8_dtype), v_view.view(self.fp8_dtype)
            self._kv_cache_views = (kv_cache, k_view, v_view)
        return k_view, v_view

    def forward(
        self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None, output_block_scale=None
    ):
        if attn_metadata is None:  # profiling run
            return output.fill_(0)
        reason = self._layer_fallback
        q_scale = k_scale = v_scale = None
        if reason is None:
            k_cache, v_cache = self._kv_views(kv_cache)
            query_dtype = query.dtype
            if self._kv_fp8:  # vLLM's per-tensor dequantization scales: 0-d float32 device buffers, updated in place
                k_scale, v_scale = per_tensor_scale(layer._k_scale), per_tensor_scale(layer._v_scale)
                if query_dtype == self.fp8_dtype:  # quantized by vLLM's Attention layer (as TRITON_ATTN's forward)
                    q_scale = per_tensor_scale(layer._q_scale)
                    if q_scale is None:
                        reason = UNSUPPORTED_SCALES
                if k_scale is None or v_scale is None:
                    reason = UNSUPPORTED_SCALES
        if reason is None:
            reason = unsupported_batch(
                causal=attn_metadata.causal,
                q_descale=q_scale,
                output_scale=output_scale if output_block_scale is None else output_block_scale,
                mm_prefix_range=attn_metadata.mm_prefix_range_tensor,
                rswa_prefix_lens=attn_metadata.rswa_prefix_lens,
                kv_dtype=k_cache.dtype,
                query_dtype=query_dtype,
                out_dtype=output.dtype,
                on_gpu=query.is_cuda,
            )
        if reason is not None:
            log_fallback_once("ATTNPLUG backend", reason)
            return super().forward(
                layer, query, key, value, kv_cache, attn_metadata, output, output_scale, output_block_scale
            )
        num_tokens = attn_metadata.num_actual_tokens
        self._paged_attention(
            query[:num_tokens],
            k_cache,
            v_cache,
            attn_metadata.block_table,
            attn_metadata.attnplug_plan,
            output[:num_tokens],
            softmax_scale=self.scale,
            causal=True,
            window_size=self.sliding_window,
            softcap=self.logits_soft_cap,
            sinks=self.sinks,
            q_scale=q_scale,
            k_scale=k_scale,
            v_scale=v_scale,
        )
        return output


class AttnplugBackend(TritonAttentionBackend):
    """``--attention-backend ATTNPLUG``: TRITON_ATTN's layout and KV writes, attnplug's plan and kernels."""

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_impl_cls() -> type[AttnplugImpl]:
        return AttnplugImpl

    @staticmethod
    def get_builder_cls() -> type[AttnplugMetadataBuilder]:
        return AttnplugMetadataBuilder
