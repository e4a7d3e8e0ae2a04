"""vLLM attention backend ``ATTNPLUG``: vLLM's Triton backend with attnplug's plan and kernels.

Selected with ``--attention-backend ATTNPLUG``. It keeps everything of ``TRITON_ATTN`` that is not
the attention kernel (KV-cache layout and write path, supported dtypes, metadata), plans once per
batch in the metadata builder and runs ``paged_attention`` once per layer. Calls it does not
cover (ALiBi, quantized KV cache, fp8 output scale, multimodal prefix ranges, R-SWA, encoder
attention, ...) go to vLLM's Triton kernel, with one log line per reason.

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
    REORDER_BATCH_THRESHOLD,
    init_spec_as_decode,
    log_fallback_once,
    planner_of,
    unsupported_batch,
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
        self._layer_fallback = (
            f"attention type {self.attn_type}" if self.attn_type != AttentionType.DECODER else None
        ) or unsupported_layer(
            alibi_slopes=self.alibi_slopes,
            use_alibi_sqrt=self.use_alibi_sqrt,
            kv_quant_mode=self._kv_quant_mode,
            chunk_lookback=self.chunk_lookback,
        )

    def _kv_views(self, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[num_blocks, num_kv_heads, block_size, 2 * head_size]`` -> k, v ``[num_blocks, block_size, num_kv_heads, head_size]``."""
        cached, k_view, v_view = self._kv_cache_views
        if cached is not kv_cache:
            k_view, v_view = kv_cache.transpose(1, 2).split(self.head_size, dim=-1)
            self._kv_cache_views = (kv_cache, k_view, v_view)
        return k_view, v_view

    def forward(
        self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None, output_block_scale=None
    ):
        if attn_metadata is None:  # profiling run
            return output.fill_(0)
        reason = self._layer_fallback or unsupported_batch(
            causal=attn_metadata.causal,
            q_descale=None,
            output_scale=output_scale if output_block_scale is None else output_block_scale,
            mm_prefix_range=attn_metadata.mm_prefix_range_tensor,
            rswa_prefix_lens=attn_metadata.rswa_prefix_lens,
            kv_dtype=kv_cache.dtype,
            query_dtype=query.dtype,
        )
        if reason is not None:
            log_fallback_once("ATTNPLUG backend", reason)
            return super().forward(
                layer, query, key, value, kv_cache, attn_metadata, output, output_scale, output_block_scale
            )
        num_tokens = attn_metadata.num_actual_tokens
        k_cache, v_cache = self._kv_views(kv_cache)
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
