"""Replacement for the patch ``sglang.fa.scheduler_metadata`` (SGLang 0.5.10's FlashAttention backend).

FA3 runs a small prepare kernel inside every layer's attention call unless it is handed
``scheduler_metadata``. SGLang 0.5.11 (PR 21104, with the sgl-kernel op of PR 21103) computes that
metadata once per normal-decode batch and passes it to every non-SWA, non-cascade decode call;
0.5.10 (and .post1) never does, although its ``sglang-kernel`` 0.4.1 exposes
``get_scheduler_metadata``. This port does what 0.5.11 does, through ``attnplug.core.fa3``:

- eager normal decode (``init_forward_metadata``): the metadata of the batch, in a fresh tensor;
- CUDA graphs: a persistent buffer (``init_cuda_graph_state``), filled outside the graph at
  capture and refreshed at every replay of a normal-decode graph, tail zeroed;
- the default single-token decode call of ``flash_attn_with_kvcache`` gets it when the call's
  scheduling parameters are the ones it was computed with (FA3 only, no MLA, no SWA layer, no
  cascade, no cross or chunked-local attention, the batch's own page table and lengths).

Only ``FlashAttentionBackend.__init__`` is rebound. It installs these steps on each backend it
builds, as wrappers of that instance's own methods, so a backend keeps refreshing the metadata
its CUDA graphs captured for as long as it lives; ``attnplug.revert()`` makes later backends stock.
Whatever cannot be set up (no FA3 binding, FA4, MLA, a model config without the head counts) leaves
the backend stock with one log line.
"""

from __future__ import annotations

import functools

from attnplug import ops
from attnplug._log import log_once
from attnplug.core.fa3 import FA3Params, allocate_fa3_scheduler_metadata, find_fa3_binding

_HOOKED_METHODS = ("init_forward_metadata", "init_cuda_graph_state", "init_forward_metadata_capture_cuda_graph",
                   "init_forward_metadata_replay_cuda_graph", "flash_attn_with_kvcache")


def _stock(reason: str) -> None:
    """Log once per reason that a backend (or call) stays on SGLang's own code."""
    log_once(f"patched SGLang FlashAttention scheduler metadata: {reason}; SGLang's own code runs")


def precomputed_scheduler_metadata_init(original):
    """``FlashAttentionBackend.__init__`` that sets up the scheduler-metadata precompute after SGLang's."""

    @functools.wraps(original)
    def __init__(self, model_runner, *args, **kwargs):
        original(self, model_runner, *args, **kwargs)
        params, reason = _fa3_params(self, model_runner)
        binding = find_fa3_binding() if reason is None else None
        if reason is None and (binding is None or binding.name != "sgl_kernel"):
            reason = "no get_scheduler_metadata in sgl_kernel.flash_attn"
        if reason is not None:
            _stock(reason)
            return
        _install(self, _SchedulerMetadata(params, binding))

    return __init__


def _fa3_params(backend, model_runner) -> tuple[FA3Params | None, str | None]:
    """What SGLang 0.5.11 computes the metadata with (``_compute_scheduler_metadata``), or why not."""
    if backend.fa_impl_ver != 3:
        return None, f"FlashAttention {backend.fa_impl_ver} (the precompute is FA3's)"
    if backend.use_mla:
        return None, "an MLA model (SGLang precomputes for MHA/GQA only)"
    try:
        config = model_runner.model_config
        softcap = getattr(config.hf_text_config, "attn_logit_softcapping", None) or 0.0
        params = FA3Params(
            num_q_heads=config.hf_text_config.num_attention_heads // model_runner.tp_size,
            num_kv_heads=config.get_num_kv_heads(model_runner.tp_size), head_size=config.head_dim,
            page_size=backend.page_size, dtype=backend.kv_cache_dtype, softcap=float(softcap),
            num_splits=backend.num_splits,
        )
    except (AttributeError, TypeError, ValueError) as error:
        return None, f"a model config the precompute cannot read ({type(error).__name__}: {error})"
    return params, None


class _SchedulerMetadata:
    """One backend's FA3 parameters, binding and CUDA-graph buffer (int32 [1 + round_up(max_bs, 4) * 4])."""

    def __init__(self, params: FA3Params, binding):
        self.params = params
        self.binding = binding
        self.graph_buffer = None
        self.compute = ops.resolve("fa3_scheduler_metadata")

    def of(self, metadata, max_seq_len_k: int, out=None):
        """int32 [n] for one normal-decode batch (``metadata``: SGLang's FlashAttentionMetadata), or None.

        With ``out`` (the graph buffer) it is ``out[:n]``, the tail zeroed. Raises what the core
        raises for inputs it refuses.
        """
        return self.compute(self.params, metadata.cu_seqlens_q, metadata.cache_seqlens_int32, max_seqlen_q=1,
                            max_seqlen_k=max_seq_len_k, out=out, binding=self.binding)

    def of_or_none(self, metadata, max_seq_len_k: int, out=None):
        """:meth:`of`, or None (the call then runs as SGLang's own) when the core refuses the inputs."""
        try:
            return self.of(metadata, max_seq_len_k, out)
        except (TypeError, ValueError) as error:
            _stock(f"decode metadata the precompute refuses ({error})")
            return None

    def serves(self, kwargs: dict, metadata) -> bool:
        """Whether a ``flash_attn_with_kvcache`` call is the default decode call the metadata was made for.

        These are the conditions under which SGLang 0.5.11 passes it (not SWA, not cascade, the
        batch's own page table and lengths), plus host-only checks that the call's scheduling
        parameters are the ones the metadata was computed with.
        """
        params, q, k_cache = self.params, kwargs.get("q"), kwargs.get("k_cache")
        return (
            "scheduler_metadata" not in kwargs
            and kwargs.get("page_table") is metadata.page_table
            and kwargs.get("cache_seqlens") is metadata.cache_seqlens_int32
            and kwargs.get("cu_seqlens_k_new") is None
            and kwargs.get("max_seqlen_q") == 1
            and kwargs.get("causal") is True
            and tuple(kwargs.get("window_size", (-1, -1))) == (-1, -1)
            and not kwargs.get("return_softmax_lse", False)
            and kwargs.get("num_splits", 0) == params.num_splits
            and ((kwargs.get("softcap") or 0.0) > 0) == (params.softcap > 0)
            and q is not None and k_cache is not None and q.dtype == params.dtype
            and tuple(q.shape[1:]) == (params.num_q_heads, params.head_size)
            and tuple(k_cache.shape[1:3]) == (params.page_size, params.num_kv_heads)
        )


def _is_normal_decode(forward_mode, spec_info) -> bool:
    return forward_mode.is_decode_or_idle() and spec_info is None


def _install(backend, state: _SchedulerMetadata) -> None:
    """Wrap ``backend``'s own metadata methods and FA3 call (instance attributes; see the module docstring)."""
    init_forward_metadata = backend.init_forward_metadata
    init_cuda_graph_state = backend.init_cuda_graph_state
    capture = backend.init_forward_metadata_capture_cuda_graph
    replay = backend.init_forward_metadata_replay_cuda_graph
    flash_attn_with_kvcache = backend.flash_attn_with_kvcache

    @functools.wraps(init_forward_metadata)
    def init_forward_metadata_with_scheduler(forward_batch):
        init_forward_metadata(forward_batch)
        if _is_normal_decode(forward_batch.forward_mode, forward_batch.spec_info):
            metadata = backend.forward_metadata
            metadata.scheduler_metadata = state.of_or_none(metadata, metadata.max_seq_len_k)

    @functools.wraps(init_cuda_graph_state)
    def init_cuda_graph_state_with_scheduler(max_bs, max_num_tokens):
        init_cuda_graph_state(max_bs, max_num_tokens)
        state.graph_buffer = allocate_fa3_scheduler_metadata(max_bs, device=backend.device)

    @functools.wraps(capture)
    def capture_with_scheduler(bs, num_tokens, req_pool_indices, seq_lens, encoder_lens, forward_mode, spec_info):
        capture(bs, num_tokens, req_pool_indices, seq_lens, encoder_lens, forward_mode, spec_info)
        if state.graph_buffer is not None and _is_normal_decode(forward_mode, spec_info):
            metadata = backend.decode_cuda_graph_metadata[bs]
            metadata.scheduler_metadata = state.of_or_none(metadata, max(metadata.max_seq_len_k, 1), state.graph_buffer)

    @functools.wraps(replay)
    def replay_with_scheduler(bs, req_pool_indices, seq_lens, seq_lens_sum, encoder_lens, forward_mode, spec_info,
                              seq_lens_cpu, out_cache_loc=None):
        replay(bs, req_pool_indices, seq_lens, seq_lens_sum, encoder_lens, forward_mode, spec_info, seq_lens_cpu,
               out_cache_loc)
        if _is_normal_decode(forward_mode, spec_info):
            metadata = backend.decode_cuda_graph_metadata[bs]
            if getattr(metadata, "scheduler_metadata", None) is not None:  # the graph captured this view of
                state.of(metadata, metadata.max_seq_len_k, state.graph_buffer)  # the buffer: refresh it in place

    @functools.wraps(flash_attn_with_kvcache)
    def flash_attn_with_kvcache_with_scheduler(*args, **kwargs):
        metadata = backend.forward_metadata
        scheduler_metadata = getattr(metadata, "scheduler_metadata", None)
        if scheduler_metadata is not None and not args and state.serves(kwargs, metadata):
            kwargs["scheduler_metadata"] = scheduler_metadata
        return flash_attn_with_kvcache(*args, **kwargs)

    hooks = (init_forward_metadata_with_scheduler, init_cuda_graph_state_with_scheduler, capture_with_scheduler,
             replay_with_scheduler, flash_attn_with_kvcache_with_scheduler)
    for name, hook in zip(_HOOKED_METHODS, hooks):
        setattr(backend, name, hook)
    backend.attnplug_scheduler_metadata = state
