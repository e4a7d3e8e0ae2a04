"""Paged attention with a per-batch plan: ``plan_attention`` once per batch, ``paged_attention`` per layer."""

from .paged import FP8_KV_DTYPES, paged_attention
from .plan import (
    AttentionPlan,
    AttentionWorkspace,
    SplitKVProblem,
    default_split_kv_policy,
    num_sms,
    plan_attention,
)

__all__ = [
    "AttentionPlan",
    "AttentionWorkspace",
    "FP8_KV_DTYPES",
    "SplitKVProblem",
    "default_split_kv_policy",
    "num_sms",
    "paged_attention",
    "plan_attention",
]
