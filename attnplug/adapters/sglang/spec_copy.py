"""Replacement for the patch ``sglang.spec.metadata_copy`` (SGLang 0.5.8 / 0.5.8.post1, SGLang PR 17554).

The NSA/DSA multi-step draft backend (``NativeSparseAttnMultiStepBackend``) replays its CUDA graphs
by precomputing one batch's decode metadata and copying it into every draft step's graph buffers:
5 to 8 ``copy_`` launches per step (``init_forward_metadata_replay_cuda_graph_from_precomputed``).
Here step 0 still takes SGLang's own copies; steps 1..T-1 then receive the same fields from step 0's
persistent buffers in one ``fused_metadata_copy`` launch, with the same per-step side effects
(``set_nsa_prefill_impl(None)``, ``forward_metadata``).

Step 0's buffers keep their addresses, so the copy table is built once per batch size and page-table
width. That width is the batch's longest length rounded up to a power of two (at most the buffer's):
the columns past the batch's length that this also copies hold the same values in every step,
because every write into these buffers (zeros at allocation, capture, each replay) is the same for
all steps; and no kernel reads past a sequence's length.

0.5.9 and later fuse the copy themselves (one launch per step, or one for steps 0-2 with more than
3 steps); the FlashAttention / Triton multi-step backends make no such copies.
"""

from __future__ import annotations

import functools
import importlib

from attnplug import ops
from attnplug._log import log_once


def _fall_back(reason: str) -> None:
    """Log once per reason that a replay copied per tensor, as SGLang does."""
    log_once(f"patched SGLang NSA draft-step metadata copy: {reason}; SGLang's per-tensor copies run")


def _copied_fields(metadata, bs: int, page_columns: int, real_page_columns: int | None):
    """The decode-mode fields ``init_forward_metadata_replay_cuda_graph_from_precomputed`` writes.

    ``metadata``: one step's ``NSAMetadata`` for graph batch size ``bs``. Returns (tensors, sizes)
    in ``fused_metadata_copy``'s form; all int32.
    """
    fields = [
        (metadata.cache_seqlens_int32, bs),
        (metadata.cu_seqlens_k[1:], bs),
        (metadata.page_table_1, (bs, page_columns)),
        (metadata.nsa_cache_seqlens_int32, bs),
        (metadata.nsa_cu_seqlens_k[1:], bs),
    ]
    if real_page_columns is not None:  # page size > 1: its own table of real page ids
        fields.append((metadata.real_page_table, (bs, real_page_columns)))
    if metadata.flashmla_metadata is not None:  # nsa_decode_backend == "flashmla_kv"
        tiles = metadata.flashmla_metadata.flashmla_metadata
        fields += [(tiles, tuple(tiles.shape)), (metadata.flashmla_metadata.num_splits, bs + 1)]
    tensors, sizes = zip(*fields)
    return list(tensors), list(sizes)


def _page_columns(max_len: int, capacity: int) -> int:
    """``max_len`` rounded up to a power of two, at most ``capacity`` (so copy tables are reused)."""
    return min(capacity, 1 << max(0, max_len - 1).bit_length())


def fused_draft_metadata_copy(original):
    """``NativeSparseAttnMultiStepBackend.init_forward_metadata_replay_cuda_graph``: steps 1..T-1 in one launch."""
    fused_metadata_copy = ops.resolve("fused_metadata_copy")
    nsa = importlib.import_module(original.__module__)
    decode = nsa.ForwardMode.DECODE

    @functools.wraps(original)
    def init_forward_metadata_replay_cuda_graph(self, forward_batch, bs):
        steps = self.attn_backends[: self.speculative_num_steps]
        if len(steps) < 2 or not nsa.envs.SGLANG_NSA_ENABLE_MTP_PRECOMPUTE_METADATA.get():
            return original(self, forward_batch, bs)  # nothing to fuse / SGLang's per-step recompute
        first = steps[0]
        precomputed = first._precompute_replay_metadata(
            bs=bs, req_pool_indices=forward_batch.req_pool_indices, seq_lens=forward_batch.seq_lens,
            seq_lens_cpu=forward_batch.seq_lens_cpu, forward_mode=decode, spec_info=forward_batch.spec_info,
        )
        first.init_forward_metadata_replay_cuda_graph_from_precomputed(bs=bs, precomputed=precomputed,
                                                                       forward_mode=decode)
        source = first.decode_cuda_graph_metadata[bs]
        page_columns = _page_columns(precomputed.max_len, source.page_table_1.shape[1])
        real_page_columns = None
        if first.real_page_size > 1:
            real_page_columns = min(source.real_page_table.shape[1], -(-page_columns // first.real_page_size))
        try:
            srcs, sizes = _copied_fields(source, bs, page_columns, real_page_columns)
            dsts = [_copied_fields(step.decode_cuda_graph_metadata[bs], bs, page_columns, real_page_columns)[0]
                    for step in steps[1:]]
            fused_metadata_copy(srcs, dsts, sizes)  # validates everything before it copies anything
        except (AttributeError, TypeError, ValueError) as error:
            _fall_back(f"draft-step buffers the fused copy refuses ({type(error).__name__}: {error})")
            for step in steps[1:]:
                step.init_forward_metadata_replay_cuda_graph_from_precomputed(bs=bs, precomputed=precomputed,
                                                                              forward_mode=decode)
            return
        for step in steps[1:]:
            step.set_nsa_prefill_impl(forward_batch=None)
            step.forward_metadata = step.decode_cuda_graph_metadata[bs]

    return init_forward_metadata_replay_cuda_graph
