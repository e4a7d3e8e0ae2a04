"""Framework-neutral kernels: torch + Triton only, never an engine import.

- ``fused_decode_metadata``: a decode step's ``cache_seqlens`` / ``cu_seqlens_k`` / page table in one launch.
- ``fused_metadata_copy``: one batch's metadata into several backends' CUDA-graph buffers in one launch.
- ``plan_attention`` once per batch, then ``paged_attention`` once per layer (split-launch paged attention).
- ``fa3_scheduler_metadata``: FA3's ``scheduler_metadata`` once per batch into a persistent buffer.
"""

from attnplug.core.attention import (
    AttentionPlan,
    AttentionWorkspace,
    FP8_KV_DTYPES,
    SplitKVProblem,
    default_split_kv_policy,
    paged_attention,
    plan_attention,
)
from attnplug.core.decode_metadata import fused_decode_metadata
from attnplug.core.fa3 import FA3Params, allocate_fa3_scheduler_metadata, check_fa3_call, fa3_scheduler_metadata
from attnplug.core.metadata_copy import fused_metadata_copy

__all__ = [
    "AttentionPlan",
    "AttentionWorkspace",
    "FA3Params",
    "FP8_KV_DTYPES",
    "SplitKVProblem",
    "allocate_fa3_scheduler_metadata",
    "check_fa3_call",
    "default_split_kv_policy",
    "fa3_scheduler_metadata",
    "fused_decode_metadata",
    "fused_metadata_copy",
    "paged_attention",
    "plan_attention",
]
