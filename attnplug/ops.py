"""How adapters reach the core ops: plugin overrides, the split-KV hook, and per-op call counters.

Adapters resolve each op once (at backend construction or patch time) and call the returned
function on the hot path; resolution asks the ``attnplug_core_op`` hook, so a plugin can swap in
its own implementation of any op by name. Each call of a resolved op adds one to
``attnplug.report.op_calls[name]``.
"""

from __future__ import annotations

import functools
import importlib
from typing import Callable

from attnplug import report
from attnplug.hooks import get_plugin_manager

CORE_MODULE = "attnplug.core"
CORE_OPS = ("fused_decode_metadata", "fused_metadata_copy", "plan_attention", "paged_attention", "fa3_scheduler_metadata")


def split_kv_from_plugins(problem) -> int | None:
    """The ``attnplug_split_kv`` hook's answer for one ``SplitKVProblem`` (None: use the default)."""
    return get_plugin_manager().hook.attnplug_split_kv(problem=problem)


def _core_default(name: str) -> Callable:
    fn = getattr(importlib.import_module(CORE_MODULE), name)
    if name == "plan_attention":
        return functools.partial(fn, split_kv_policy=split_kv_from_plugins)
    return fn


def resolve(name: str) -> Callable:
    """The implementation of core op ``name`` for this process, counted in the report."""
    if name not in CORE_OPS:
        raise ValueError(f"unknown core op {name!r}; known: {', '.join(CORE_OPS)}")
    impl = get_plugin_manager().hook.attnplug_core_op(name=name) or _core_default(name)
    counts = report.op_calls

    @functools.wraps(impl)
    def counted(*args, **kwargs):
        counts[name] += 1
        return impl(*args, **kwargs)

    return counted
