"""Replacements for the patch ``sglang.fa.decode_metadata`` (SGLang's FlashAttention backend, 0.5.8-0.5.9).

SGLang 0.5.9 (and 0.5.8, whose code here is the same) builds a decode step's ``cache_seqlens`` /
``cu_seqlens_k`` / page table(s) with a sequence of small torch ops in two places; both become one
``fused_decode_metadata`` launch:

- ``normal_decode_set_metadata`` (module function, the CUDA-graph replay path of normal decode and
  of draft decode with topk <= 1): same signature, same writes (SGLang PR 20778, released in 0.5.10,
  fused this very function with the same write region).
- ``FlashAttentionBackend.init_forward_metadata`` (the eager path, inline torch in 0.5.9): plain
  normal decode (no speculative input, no encoder, no chunked local attention) builds the same
  ``FlashAttentionMetadata`` with one launch; every other batch goes to SGLang's original.

Any call the core cannot take with the exact original semantics goes to the original function.
"""

from __future__ import annotations

import functools
import importlib

import torch

from attnplug import ops
from attnplug._log import log_once


def _fall_back(reason: str) -> None:
    """Log once per reason that a call went to SGLang's original code."""
    log_once(f"patched SGLang FlashAttention decode metadata: {reason} goes to SGLang's original")


def _is_power_of_two(value) -> bool:
    return value.__class__ is int and value > 0 and not value & (value - 1)


class _StridedIndices:
    """Remembers which ``strided_indices`` tensors were checked to be ``arange(0, n * page, page)``.

    SGLang passes the same persistent buffer on every replay, so the one host check per buffer
    (and page size) is paid once; the fused kernel computes those token columns itself.
    """

    def __init__(self):
        self._checked: dict[tuple, bool] = {}

    def standard(self, strided_indices: torch.Tensor, page_size: int) -> bool:
        key = (strided_indices.data_ptr(), tuple(strided_indices.shape), strided_indices.dtype, page_size)
        verdict = self._checked.get(key)
        if verdict is None:
            expected = torch.arange(0, strided_indices.numel() * page_size, page_size, device=strided_indices.device)
            verdict = strided_indices.dim() == 1 and torch.equal(strided_indices.to(expected.dtype), expected)
            self._checked[key] = verdict
        return verdict


def _swa_mapping(swa_page_table, token_to_kv_pool):
    """The full-to-SWA token mapping when 0.5.9 would write the SWA table (both given), else None."""
    if swa_page_table is None or token_to_kv_pool is None:
        return None
    return getattr(token_to_kv_pool, "full_to_swa_index_mapping", None)


def fused_normal_decode_set_metadata(original):
    """``normal_decode_set_metadata`` of SGLang 0.5.9 as one ``fused_decode_metadata`` launch.

    Writes exactly what the original writes: ``cache_seqlens_int32[:bs]``, ``cu_seqlens_k[1:bs+1]``
    (and ``cu_seqlens_k[0] = 0``, which SGLang's capture already holds), every page-table column
    below ``max_seq_pages`` of the ``bs`` rows, and the SWA table when both SWA arguments are given.
    """
    fused_decode_metadata = ops.resolve("fused_decode_metadata")
    strided = _StridedIndices()

    @functools.wraps(original)
    def normal_decode_set_metadata(
        cache_seqlens_int32, cu_seqlens_k, page_table, req_to_token, req_pool_indices, strided_indices,
        max_seq_pages, seq_lens, seq_len_delta, page_size, swa_page_table=None, token_to_kv_pool=None,
    ):
        args = (cache_seqlens_int32, cu_seqlens_k, page_table, req_to_token, req_pool_indices, strided_indices,
                max_seq_pages, seq_lens, seq_len_delta, page_size, swa_page_table, token_to_kv_pool)
        mapping = _swa_mapping(swa_page_table, token_to_kv_pool)
        reason = _why_not_replay(cache_seqlens_int32, cu_seqlens_k, page_table, strided_indices, max_seq_pages,
                                 seq_lens, page_size, swa_page_table, token_to_kv_pool, mapping, strided)
        if reason is not None:
            _fall_back(reason)
            return original(*args)
        try:
            fused_decode_metadata(
                cache_seqlens_int32, cu_seqlens_k, page_table, req_to_token, req_pool_indices, seq_lens,
                max_seq_pages, seq_len_delta=seq_len_delta, page_size=page_size,
                swa_page_table=swa_page_table if mapping is not None else None, full_to_swa_index_mapping=mapping,
            )
        except (TypeError, ValueError) as error:  # the core validates before it writes anything
            _fall_back(f"inputs the fused kernel refuses ({error})")
            return original(*args)

    return normal_decode_set_metadata


def _why_not_replay(cache_seqlens_int32, cu_seqlens_k, page_table, strided_indices, max_seq_pages, seq_lens, page_size,
                    swa_page_table, token_to_kv_pool, mapping, strided: _StridedIndices) -> str | None:
    """Why a replay call is not one the fused kernel takes with the original's exact semantics, or None."""
    if max_seq_pages.__class__ is not int:
        return "a max_seq_pages that is not a host int"
    if not _is_power_of_two(page_size):
        return "a page_size that is not a power of two"
    if swa_page_table is not None and token_to_kv_pool is not None and mapping is None:
        return "an SWA pool without full_to_swa_index_mapping"
    bs = seq_lens.shape[0] if seq_lens.dim() == 1 else -1
    tables = (page_table,) if mapping is None else (page_table, swa_page_table)
    if cache_seqlens_int32.shape != (bs,) or cu_seqlens_k.shape != (bs + 1,) or any(
            table.dim() != 2 or table.shape[0] != bs for table in tables):
        return "outputs not sized for the batch (the original broadcasts or raises)"
    if max_seq_pages > strided_indices.numel() or not strided.standard(strided_indices, page_size):
        return "a strided_indices other than arange(0, n * page_size, page_size) with n >= max_seq_pages"
    return None


def _why_not_eager(backend, forward_batch) -> str | None:
    """Why an eager ``init_forward_metadata`` call is not a plain normal decode we build, or None."""
    if not forward_batch.forward_mode.is_decode():  # extend, verify, idle, ...: not ours
        return "not a decode batch"
    if forward_batch.spec_info is not None:
        return "a speculative draft decode"
    if forward_batch.encoder_lens is not None:
        return "an encoder-decoder batch"
    if backend.has_local_attention:
        return "chunked local attention"
    if forward_batch.seq_lens_cpu is None:
        return "a batch without seq_lens_cpu"
    if not _is_power_of_two(backend.page_size):
        return "a page_size that is not a power of two"
    swa_pool = backend.token_to_kv_pool if backend.use_sliding_window_kv_pool else None
    if swa_pool is not None and getattr(swa_pool, "full_to_swa_index_mapping", None) is None:
        return "an SWA pool without full_to_swa_index_mapping"
    return None


def fused_decode_init_forward_metadata(original):
    """``FlashAttentionBackend.init_forward_metadata`` of SGLang 0.5.9 with plain normal decode fused.

    For a normal decode batch it sets ``self.forward_metadata`` to the ``FlashAttentionMetadata``
    the original builds (``cache_seqlens_int32``, ``max_seq_len_k``, ``cu_seqlens_q``,
    ``cu_seqlens_k``, ``page_table`` of ``ceil(max_seq_len_k / page_size)`` page ids, the SWA page
    table, ``local_attn_metadata = None``), in fresh tensors filled by one launch. It does not set
    the scratch attribute ``self.strided_indices`` (read only inside the original method).
    """
    fused_decode_metadata = ops.resolve("fused_decode_metadata")
    metadata_class = importlib.import_module(original.__module__).FlashAttentionMetadata

    @functools.wraps(original)
    def init_forward_metadata(self, forward_batch):
        reason = _why_not_eager(self, forward_batch)
        if reason is not None:
            return original(self, forward_batch)  # the common non-decode modes: not worth a log line
        seq_lens = forward_batch.seq_lens
        device = seq_lens.device
        batch_size = forward_batch.batch_size
        max_seq_len_k = int(forward_batch.seq_lens_cpu.max().item())  # a host tensor: no device sync
        max_seq_pages = -(-max_seq_len_k // self.page_size)
        metadata = metadata_class()
        metadata.cache_seqlens_int32 = torch.empty(batch_size, dtype=torch.int32, device=device)
        metadata.cu_seqlens_k = torch.empty(batch_size + 1, dtype=torch.int32, device=device)
        metadata.page_table = torch.empty(batch_size, max_seq_pages, dtype=torch.int32, device=device)
        mapping = None
        if self.use_sliding_window_kv_pool:
            mapping = self.token_to_kv_pool.full_to_swa_index_mapping
            metadata.swa_page_table = torch.empty(batch_size, max_seq_pages, dtype=torch.int32, device=device)
        try:
            fused_decode_metadata(
                metadata.cache_seqlens_int32, metadata.cu_seqlens_k, metadata.page_table,
                forward_batch.req_to_token_pool.req_to_token, forward_batch.req_pool_indices, seq_lens, max_seq_pages,
                page_size=self.page_size, swa_page_table=metadata.swa_page_table, full_to_swa_index_mapping=mapping,
            )
        except (TypeError, ValueError) as error:
            _fall_back(f"eager decode inputs the fused kernel refuses ({error})")
            return original(self, forward_batch)
        metadata.max_seq_len_k = max_seq_len_k
        metadata.cu_seqlens_q = torch.arange(0, batch_size + 1, dtype=torch.int32, device=device)
        self._maybe_init_local_attn_metadata(forward_batch, metadata, device)  # sets None: no local attention
        self.forward_metadata = metadata

    return init_forward_metadata

