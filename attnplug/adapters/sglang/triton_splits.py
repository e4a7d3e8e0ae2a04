"""Replacement for the patch ``sglang.triton.kv_splits``: SGLang's Triton decode split plan from attnplug's planner.

SGLang's ``TritonAttnBackend.get_num_kv_splits(num_kv_splits, seq_lens, ...)`` fills the per-token
KV split counts that its decode kernel (``decode_attention_fwd``) reads, with a heuristic kernel
launched every decode step. The replacement asks attnplug's split-KV policy (the
``attnplug_split_kv`` hook, else ``default_split_kv_policy``) once per batch size and fills that
count: one ``fill_``, no host sync, capturable.

Why the result stays valid: SGLang's kernel takes any ``num_kv_splits[i]`` in
``[1, max_kv_splits]`` and cuts sequence ``i`` into splits of
``ceil(ceil(len_i / splits) / 32) * 32`` tokens, skipping empty ones (a short sequence uses fewer
splits by itself). The split count only changes how the work is divided, not the result (up to
floating-point summation order). The policy sees host facts only, so it plans for the backend's
context length as the longest sequence (``SplitKVProblem.max_seqlen_k`` may be an upper bound).

Calls the replacement does not cover go to SGLang's original: no GPU (``device_core_count <= 0``:
SGLang then fills ``max_kv_splits`` itself), ``SGLANG_TRITON_DECODE_ATTN_STATIC_KV_SPLITS``,
deterministic inference (fixed split tiles) and ROCm (whose kernels also read the ``uneven_batch``
flag the original writes).
"""

from __future__ import annotations

import functools

import torch

from attnplug import ops, report
from attnplug.core import SplitKVProblem, default_split_kv_policy

PLAN_COUNTER = "split_kv_plan"  # report.op_calls key: decode steps whose splits came from attnplug's plan
MIN_BLOCK_KV = 32  # SGLang's decode kernel never cuts a split shorter than this (``_MIN_BLOCK_KV``)
_PLANS_ATTR = "_attnplug_kv_splits"  # per backend: num_tokens -> splits


def planned_kv_splits(backend, num_tokens: int) -> int:
    """The split count for a decode batch of ``num_tokens`` query tokens, in ``[1, backend.max_kv_splits]``."""
    problem = SplitKVProblem(
        num_decodes=num_tokens,
        max_seqlen_k=max(int(backend.max_context_len), 1),
        num_q_heads=backend.num_head,
        num_kv_heads=backend.num_kv_head,
        head_size=backend.v_head_dim,
        page_size=1,  # SGLang's Triton decode reads token slots
        num_sms=backend.device_core_count,
        min_segment_len=MIN_BLOCK_KV,
        max_segments=backend.max_kv_splits,
    )
    chosen = ops.split_kv_from_plugins(problem)
    if chosen is None:
        chosen = default_split_kv_policy(problem)
    return max(1, min(int(chosen), backend.max_kv_splits))


def _stock_heuristic_only(backend) -> bool:
    return (
        backend.device_core_count <= 0
        or backend.static_kv_splits
        or backend.enable_deterministic
        or torch.version.hip is not None
    )


def planned_get_num_kv_splits(original):
    """``TritonAttnBackend.get_num_kv_splits`` filled from attnplug's split-KV policy (see the module docstring)."""

    counts = report.op_calls

    @functools.wraps(original)
    def get_num_kv_splits(self, num_kv_splits, seq_lens, uneven_batch=None):
        if _stock_heuristic_only(self):
            return original(self, num_kv_splits, seq_lens, *(() if uneven_batch is None else (uneven_batch,)))
        num_tokens = num_kv_splits.shape[0]
        plans = self.__dict__.setdefault(_PLANS_ATTR, {})
        splits = plans.get(num_tokens)
        if splits is None:
            splits = plans[num_tokens] = planned_kv_splits(self, num_tokens)
        num_kv_splits.fill_(splits)
        counts[PLAN_COUNTER] += 1

    return get_num_kv_splits
