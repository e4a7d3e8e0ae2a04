"""SGLang attention backend ``attnplug``: attnplug's plan and paged-attention kernels over SGLang's KV pool.

Selected with ``--attention-backend attnplug`` (registered by ``registration.py``). Per batch,
``init_forward_metadata`` fills the lengths and the page table in one launch
(``fused_decode_metadata``) and plans once (``plan_attention`` into a workspace this backend
owns); per layer, ``forward_decode`` / ``forward_extend`` write the new K/V through SGLang's own
``token_to_kv_pool.set_kv_buffer`` and run ``paged_attention`` over the token pool viewed as pages
(``[num_tokens, H, D]`` -> ``[num_tokens / page_size, page_size, H, D]``, no copy).

Extend and mixed batches need nothing special: each sequence's ``extend_seq_len`` new tokens are
the last queries of its ``prefix + extend`` KV tokens, which is ``paged_attention``'s semantics.
Layers and batches the kernels do not cover (cross attention, encoder-only or bidirectional
layers, encoder-decoder batches, ...) run SGLang's ``torch_native`` backend, with one log line per
reason; set-ups with no fallback (MLA, hybrid SWA or unified KV pools, quantized KV recipes such as
FP4 / MXFP8, DCP, speculative set-ups other than chain drafts) are refused at construction.

FP8 KV cache (``--kv-cache-dtype fp8_e4m3`` / ``fp8_e5m2``, SGLang 0.5.23 on a GPU): a plain
``MHATokenToKVPool`` whose buffers are stored as uint8 and handed out by ``get_key_buffer`` viewed as
the FP8 dtype. SGLang's ``set_kv_buffer(layer, loc, k, v, layer.k_scale, layer.v_scale)`` divides by
the layer's per-tensor scales before the cast (as its triton and flashattention backends call it), so
the kernels read ``cache * scale`` with the same tensors (``RadixAttention.k_scale`` / ``v_scale``:
float32 0-dim parameters on the device, read by the kernels at every call, so CUDA graphs replay with
the current values). A layer without scales (a checkpoint without them: ``k_scale is None``) is written
unscaled and read with this backend's persistent 1.0 tensor, made once at construction.

Speculative decoding (EAGLE / EAGLE3 / NEXTN / STANDALONE, ``--speculative-eagle-topk 1``):
- ``TARGET_VERIFY``: ``seq_lens`` is the committed prefix; each request's ``N`` draft tokens (already
  in ``req_to_token``) are its last ``N`` queries over ``seq_lens + N`` KV tokens, causal: the chain
  mask. Planned as decode-like sequences of ``N`` queries, so they run through the split-KV kernel.
- ``DRAFT_EXTEND_V2``: an extend whose rows all have ``N`` queries: decode-like too.
- Draft decode: :class:`AttnplugMultiStepDraftBackend` (one child backend per draft step, created
  through SGLang's ``DraftBackendFactory`` by the registration's patch): one multi-step
  ``fused_decode_metadata`` launch per round writes every step's lengths (``seq_lens + step + 1``)
  and the page table they share; each step has its own plan.
torch_native is no fallback for these modes (it reads ``seq_lens`` as the KV length): a layer the
kernels do not cover raises instead of giving different tokens.

CUDA graphs (0.5.23 contract): decode and target-verify batches, and the draft steps.
``init_forward_metadata_out_graph`` plans once per captured batch size at capture
(``max_seqlen_k`` = the context length, an upper bound: the kernels cut each sequence's KV by its
own device-side length) and, before each replay, refills the persistent lengths / page table that
the captured kernels read. Nothing is recorded by ``init_forward_metadata_in_graph``: the
page-table width is a host int that changes between replays. Other graph modes raise
``NotImplementedError``.

This module imports SGLang: it is loaded only inside SGLang, by the registered factory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from sglang.srt.layers.radix_attention import AttentionType
from sglang.srt.mem_cache.memory_pool import KVWriteLoc, MHATokenToKVPool
from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode

from attnplug import ops, report
from attnplug._log import log_once, logger
from attnplug.core.attention import FP8_KV_DTYPES

GRAPH_SEQ_LEN_FILL_VALUE = 1  # padded graph lanes: one token of the req_to_token padding row
SERVED_MODES = (ForwardMode.DECODE, ForwardMode.EXTEND, ForwardMode.MIXED, ForwardMode.TARGET_VERIFY,
                ForwardMode.DRAFT_EXTEND_V2)
SPECULATIVE_MODES = (ForwardMode.TARGET_VERIFY, ForwardMode.DRAFT_EXTEND_V2)  # no torch_native fallback
UNQUANTIZED_KV_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # read as the queries' dtype
KV_CACHE_DTYPE_FLAG = "--kv-cache-dtype auto, bf16, fp8_e4m3 or fp8_e5m2"


@dataclass
class AttnplugForwardMetadata:
    """One batch's metadata, shared by every layer.

    plan: ``AttentionPlan`` (None for an idle batch or when the batch falls back).
    block_table: int32 ``[>= bs, pages]`` page ids of each sequence (None likewise).
    fallback: why the whole batch runs SGLang's ``torch_native`` backend (None: attnplug serves it).
    """

    plan: object = None
    block_table: torch.Tensor | None = None
    fallback: str | None = None


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def unsupported_setup(model_runner) -> str | None:
    """Why this model / KV pool cannot be served at all (None: it can)."""
    from sglang.srt.configs.model_config import AttentionArch
    from sglang.srt.runtime_context import get_parallel

    pool = model_runner.token_to_kv_pool
    if model_runner.model_config.attention_arch == AttentionArch.MLA:
        return "MLA models"
    if type(pool) is not MHATokenToKVPool:
        return f"KV pool {type(pool).__name__} (only an MHATokenToKVPool, unquantized or FP8)"
    kv_reason = unsupported_kv_cache(model_runner)
    if kv_reason is not None:
        return kv_reason
    translator = getattr(model_runner, "kv_index_translator", None)
    if translator is not None and translator.reads_are_translated:
        return "a unified (virtually addressed) KV pool"
    if get_parallel().attn_dcp_size > 1:
        return "decode context parallelism (DCP)"
    spec_reason = unsupported_speculative_setup(model_runner)
    if spec_reason is not None:
        return spec_reason
    page_size = getattr(model_runner, "page_size", 1) or 1
    if page_size & (page_size - 1):
        return f"page size {page_size} (a power of two is needed)"
    k_buffer = pool.get_key_buffer(pool.start_layer)
    if k_buffer.dim() != 3 or k_buffer.shape[0] % page_size:
        return f"KV buffer of shape {tuple(k_buffer.shape)} (need token-major [num_tokens, heads, head_dim])"
    return None


def unsupported_speculative_setup(model_runner) -> str | None:
    """Why the speculative-decoding set-up cannot be served (None: none, or a chain-draft EAGLE / STANDALONE)."""
    spec = getattr(model_runner, "spec_algorithm", None)
    if spec is None or spec.is_none():
        return None
    from sglang.srt.runtime_context import get_spec

    config = get_spec()
    name = getattr(spec, "name", str(spec))
    if spec.is_ngram():
        return ("--speculative-algorithm NGRAM (its drafts are token trees, the kernels attend causally); "
                "use EAGLE, EAGLE3 or STANDALONE")
    if not (spec.is_eagle() or spec.is_standalone()) or name == "FROZEN_KV_MTP":
        return f"--speculative-algorithm {name} (served: EAGLE, EAGLE3, NEXTN, STANDALONE)"
    if (config.speculative_eagle_topk or 1) > 1:
        return (f"tree drafts (--speculative-eagle-topk {config.speculative_eagle_topk}); "
                "set --speculative-eagle-topk 1")
    if getattr(config, "enable_multi_layer_eagle", False):
        return "--enable-multi-layer-eagle"
    if getattr(config, "speculative_draft_window_size", None):
        return "--speculative-draft-window-size"
    return None


def unsupported_kv_cache(model_runner) -> str | None:
    """Why the KV pool's storage cannot be read (None: an unquantized pool of the model's dtype, or FP8)."""
    pool = model_runner.token_to_kv_pool
    if getattr(pool, "is_quantized_kv_cache", False):  # FP4 recipes; SGLang-CPU's own fp8_e4m3 recipe
        recipe = getattr(getattr(pool, "quant_method", None), "name", type(getattr(pool, "quant_method", None)).__name__)
        return f"the quantized KV cache recipe {recipe!r}; use {KV_CACHE_DTYPE_FLAG}"
    kv_dtype = pool.dtype
    model_dtype = getattr(model_runner, "dtype", None)
    if kv_dtype in FP8_KV_DTYPES:  # read for float16 / bfloat16 / float32 queries
        return fp8_scales_without_fallback(model_runner)
    if kv_dtype not in UNQUANTIZED_KV_DTYPES:
        return f"KV cache dtype {kv_dtype}; use {KV_CACHE_DTYPE_FLAG}"
    if model_dtype is not None and kv_dtype != model_dtype:
        return f"a {kv_dtype} KV cache for a {model_dtype} model; use --kv-cache-dtype auto (or fp8_e4m3)"
    return None


def fp8_scales_without_fallback(model_runner) -> str | None:
    """FP8 with checkpoint scales != 1 in a set-up whose batches go to torch_native: refused (None: fine).

    SGLang's torch_native backend ignores the scales (it writes ``k.to(fp8)`` and reads ``cache.to(q)``),
    so batches handed to it would write unscaled KV next to this backend's scaled KV in the same
    layers. Such batches come from encoder-decoder models (``encoder_lens``), dLLM (``DLLM_EXTEND``) and
    PD multiplexing (``SPLIT_PREFILL``) only; with unit scales both write the same bytes.
    """
    server_args = getattr(model_runner, "server_args", None)
    modes = [name for name, on in (
        ("an encoder-decoder model", getattr(model_runner.model_config, "is_encoder_decoder", False)),
        ("--dllm-algorithm", getattr(server_args, "dllm_algorithm", None)),
        ("--enable-pdmux", getattr(server_args, "enable_pdmux", False)),
    ) if on]
    if not modes:
        return None
    scaled = [layer.layer_id for layer in _radix_layers(model_runner) if not _unit_scales(layer)]
    if not scaled:
        return None
    return (f"an FP8 KV cache with checkpoint scales != 1 (layers {scaled[:4]}...) together with {modes[0]} "
            f"(its batches run torch_native, which ignores KV scales); use --kv-cache-dtype auto")


def _radix_layers(model_runner) -> list:
    """The model's attention layers (``RadixAttention``), [] before the model is loaded."""
    from sglang.srt.layers.radix_attention import RadixAttention

    model = getattr(model_runner, "model", None)
    if not isinstance(model, torch.nn.Module):
        return []
    return [module for module in model.modules() if isinstance(module, RadixAttention)]


def _per_tensor_scales(layer) -> bool:
    return all(not isinstance(scale, torch.Tensor) or scale.numel() == 1 for scale in (layer.k_scale, layer.v_scale))


def _unit_scales(layer) -> bool:
    """Whether the layer's KV scales are absent or 1.0 (read once, at start-up: a tensor's value syncs)."""
    for scale in (layer.k_scale, layer.v_scale):
        if isinstance(scale, torch.Tensor):
            if scale.numel() != 1 or float(scale.item()) != 1.0:
                return False
        elif scale is not None and float(scale) != 1.0:
            return False
    return True


def speculative_query_len(model_runner) -> int:
    """Query tokens of a verify / draft-extend row (``--speculative-num-draft-tokens``), 1 without speculation."""
    spec = getattr(model_runner, "spec_algorithm", None)
    if spec is None or spec.is_none():
        return 1
    from sglang.srt.runtime_context import get_spec

    return max(1, int(get_spec().speculative_num_draft_tokens or 1))


def log_fallback_once(reason: str) -> None:
    """One log line per reason per process when attnplug hands a call to SGLang's torch_native backend."""
    log_once(f"attnplug SGLang backend falls back to SGLang's torch_native attention for {reason}")


class AttnplugAttnBackend(AttentionBackend):
    """``--attention-backend attnplug``: fused decode metadata, one plan per batch, split-launch paged attention."""

    needs_cpu_seq_lens = True  # host maxima size the page table and the plan

    def __init__(self, model_runner, *, workspace=None):
        """``workspace``: an ``AttentionWorkspace`` to share (the draft steps of one round run one after another)."""
        super().__init__()
        from sglang.srt.runtime_context import get_parallel

        from attnplug.core import AttentionWorkspace
        from attnplug.core.attention.plan import MAX_DECODE_QUERY_LEN

        reason = unsupported_setup(model_runner)
        if reason is not None:
            raise ValueError(f"--attention-backend attnplug does not support {reason}; use another attention backend")
        self.device = model_runner.device
        self.req_to_token_pool = model_runner.req_to_token_pool
        self.token_to_kv_pool = model_runner.token_to_kv_pool
        self.req_to_token = model_runner.req_to_token_pool.req_to_token
        self.kv_index_translator = getattr(model_runner, "kv_index_translator", None)
        self.page_size = getattr(model_runner, "page_size", 1) or 1
        self.max_context_len = self.req_to_token.shape[1]
        self.num_kv_heads = self.token_to_kv_pool.head_num
        self.head_dim = self.token_to_kv_pool.head_dim
        self.num_q_heads = model_runner.model_config.get_max_num_attention_heads() // get_parallel().attn_tp_size
        self.fallback_backend = TorchNativeAttnBackend(model_runner)

        max_seqs = self.req_to_token.shape[0]  # req_to_token rows (padding row included)
        max_tokens = max(getattr(model_runner, "max_total_num_tokens", 0) or 0, self.token_to_kv_pool.size)
        # verify / draft-extend rows of N queries run as decode-like sequences when N fits the split-KV kernel
        self.speculative_query_len = speculative_query_len(model_runner)
        self.max_decode_query_len = self.speculative_query_len if self.speculative_query_len <= MAX_DECODE_QUERY_LEN else 1
        self.workspace = workspace or AttentionWorkspace.allocate(
            max_seqs, max_tokens, self.num_q_heads, self.head_dim, device=self.device,
            max_decode_query_len=self.max_decode_query_len,
        )
        index = {"dtype": torch.int32, "device": self.device}
        self.seq_lens_i32 = torch.zeros(max_seqs, **index)
        self.cu_seqlens_k = torch.zeros(max_seqs + 1, **index)
        self.decode_query_start_loc = torch.arange(max_seqs + 1, **index)
        # verify rows: N queries each (N = the batch's tokens per request; usually speculative_query_len)
        self._verify_query_start_locs: dict[int, torch.Tensor] = {}
        if self.speculative_query_len > 1:  # the usual N, allocated before serving
            self._verify_query_start_loc(self.speculative_query_len)
        self.extend_query_start_loc = torch.zeros(max_seqs + 1, **index)  # [0] stays 0
        self.graph = None  # GraphBuffers after init_cuda_graph_state
        self.is_draft_runner = bool(getattr(model_runner, "is_draft_worker", False))
        self._verify_mask = None  # after init_cuda_graph_state of a target backend with speculative decoding
        self.draft_step = None  # a child of AttnplugMultiStepDraftBackend: its step; metadata comes from it

        self._fused_decode_metadata = ops.resolve("fused_decode_metadata")
        self._plan_attention = ops.resolve("plan_attention")
        self._paged_attention = ops.resolve("paged_attention")
        self._modes_served: set[ForwardMode] = set()  # for one log line per mode
        self._layer_fallback: dict[int, str | None] = {}
        self._paged_views: dict[int, tuple] = {}  # layer_id -> (k buffer address, k pages, v pages)
        self._sinks_f32: dict[int, tuple] = {}  # layer_id -> (sinks, float32 copy)
        # FP8 KV: the kernels' per-tensor scales, one persistent 1.0 for layers without checkpoint scales
        self.kv_dtype = self.token_to_kv_pool.dtype
        self.fp8_kv = self.kv_dtype in FP8_KV_DTYPES
        self._unit_scale = torch.ones(1, dtype=torch.float32, device=self.device) if self.fp8_kv else None
        self._kv_scales: dict[int, tuple] = {}  # layer_id -> (layer.k_scale, layer.v_scale, k read, v read)
        if self.fp8_kv:
            layers = _radix_layers(model_runner)
            for layer in layers:  # resolved now, so no scale tensor is made on the hot path (or in a capture)
                self._layer_kv_scales(layer)
            scaled = sum(not _unit_scales(layer) for layer in layers)
            log_once(f"attnplug SGLang backend reads the {self.kv_dtype} KV cache with per-tensor scales "
                     f"({scaled} of {len(layers)} layers with checkpoint scales != 1, the others 1.0)")
        self.forward_metadata = AttnplugForwardMetadata()

    # ------------------------------------------------------------------ per batch (eager)

    def init_forward_metadata(self, forward_batch: ForwardBatch):
        """Page table, lengths and the plan of one batch: once per batch, never per layer."""
        self.fallback_backend.init_forward_metadata(forward_batch)
        mode = forward_batch.forward_mode
        if mode.is_idle() or forward_batch.batch_size == 0:
            self.forward_metadata = AttnplugForwardMetadata()
            return
        reason = self._batch_fallback(forward_batch)
        if reason is not None:
            log_fallback_once(reason)
            self.forward_metadata = AttnplugForwardMetadata(fallback=reason)
            return
        bs = forward_batch.batch_size
        # TARGET_VERIFY: seq_lens is the prefix, the N draft tokens come on top
        kv_delta = self._verify_len(forward_batch) if mode.is_target_verify() else 0
        max_seqlen_k = self._max_seq_len(forward_batch) + kv_delta
        pages = _cdiv(max_seqlen_k, self.page_size)
        block_table = torch.empty((bs, pages), dtype=torch.int32, device=self.device)
        self._fused_decode_metadata(
            self.seq_lens_i32[:bs], self.cu_seqlens_k[: bs + 1], block_table, self.req_to_token,
            forward_batch.req_pool_indices, forward_batch.seq_lens, pages, seq_len_delta=kv_delta,
            page_size=self.page_size,
        )
        max_decode_query_len = 1
        if mode.is_decode():
            query_start_loc, num_decodes, max_seqlen_q = self.decode_query_start_loc[: bs + 1], bs, 1
        elif mode.is_target_verify():
            query_start_loc, max_seqlen_q = self._verify_query_start_loc(kv_delta)[: bs + 1], kv_delta
            num_decodes, max_decode_query_len = self._decode_like(bs, kv_delta)
            report.count_speculative("verify_batches")
        else:  # EXTEND / MIXED / DRAFT_EXTEND_V2: sequence i's queries are its extend_seq_lens[i] newest tokens
            query_start_loc = self.extend_query_start_loc[: bs + 1]
            torch.cumsum(forward_batch.extend_seq_lens, dim=0, dtype=torch.int32, out=query_start_loc[1:])
            extend_lens = [int(n) for n in forward_batch.extend_seq_lens_cpu]
            max_seqlen_q = max(extend_lens)
            if mode.is_draft_extend_v2():  # N queries per row (fewer never: SGLang pads the window)
                num_decodes, max_decode_query_len = self._decode_like(bs, max_seqlen_q)
                report.count_speculative("draft_extend_batches")
            else:
                num_decodes = next((i for i, n in enumerate(extend_lens) if n != 1), bs)  # leading one-token rows
        plan = self._plan_attention(
            query_start_loc, self.seq_lens_i32[:bs], num_decodes=num_decodes,
            num_q_heads=self.num_q_heads, num_kv_heads=self.num_kv_heads, head_size=self.head_dim,
            page_size=self.page_size, max_seqlen_q=max(max_seqlen_q, 1), max_seqlen_k=max(max_seqlen_k, 1),
            max_decode_query_len=max_decode_query_len, workspace=self.workspace,
        )
        if max_decode_query_len > 1:
            report.count_split_kv(num_decodes, num_decodes * max_seqlen_q)
        self.forward_metadata = AttnplugForwardMetadata(plan=plan, block_table=block_table)
        if mode not in self._modes_served:
            self._modes_served.add(mode)
            logger.info("attnplug SGLang backend serves its first %s batch (%d sequences)", mode.name, bs)

    def _batch_fallback(self, forward_batch: ForwardBatch) -> str | None:
        mode = forward_batch.forward_mode
        if mode not in SERVED_MODES:
            return f"{mode.name} batches"
        if forward_batch.encoder_lens is not None:
            return "encoder-decoder batches"
        if mode.is_decode() and forward_batch.spec_info is not None and forward_batch.spec_info.is_draft_input():
            raise NotImplementedError("a draft-decode batch reached a single attnplug backend; draft steps are "
                                      "planned by AttnplugMultiStepDraftBackend")
        if mode.is_target_verify() and getattr(forward_batch.spec_info, "ragged_verify_layout", None) is not None:
            raise NotImplementedError("--attention-backend attnplug does not serve ragged verify layouts "
                                      "(SGLANG_RAGGED_VERIFY_MODE=compact)")
        return None

    def _verify_len(self, forward_batch) -> int:
        """Tokens per request of a verify batch (the draft window N; 1 for a trivial verify)."""
        spec_info = forward_batch.spec_info
        return int(getattr(spec_info, "num_tokens_per_req", 0) or spec_info.draft_token_num)

    def _verify_query_start_loc(self, num_tokens_per_req: int) -> torch.Tensor:
        """int32 ``arange(0, (max_seqs + 1) * N, N)``, one persistent buffer per N."""
        starts = self._verify_query_start_locs.get(num_tokens_per_req)
        if starts is None:
            rows = self.req_to_token.shape[0] + 1
            starts = torch.arange(0, rows * num_tokens_per_req, num_tokens_per_req, dtype=torch.int32,
                                  device=self.device)
            self._verify_query_start_locs[num_tokens_per_req] = starts
        return starts

    def _decode_like(self, bs: int, queries_per_row: int) -> tuple[int, int]:
        """(num_decodes, max_decode_query_len) for a batch whose rows all have ``queries_per_row`` queries:
        decode-like (split-KV kernel) when the workspace holds that many query rows, else prefill rows."""
        if queries_per_row <= self.workspace.max_decode_query_len:
            return bs, queries_per_row
        return 0, 1

    def _max_seq_len(self, forward_batch: ForwardBatch) -> int:
        """Host upper bound of the batch's KV lengths (the context length when the host copy is missing)."""
        seq_lens_cpu = forward_batch.seq_lens_cpu
        if seq_lens_cpu is None or seq_lens_cpu.numel() == 0:
            return self.max_context_len
        return int(seq_lens_cpu.max())

    # ------------------------------------------------------------------ CUDA graphs (decode)

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int):
        from sglang.srt.environ import envs

        from attnplug.core import AttentionWorkspace

        if envs.SGLANG_ENABLE_METADATA_GLUE_GRAPH.get():
            raise NotImplementedError(
                "--attention-backend attnplug refills its decode page table before each replay with a host-sized "
                "launch, which SGLANG_ENABLE_METADATA_GLUE_GRAPH would freeze; unset it"
            )
        if max_bs > self.workspace.max_num_seqs or max_num_tokens > self.workspace.max_num_tokens:
            self.workspace = AttentionWorkspace.allocate(
                max(max_bs, self.workspace.max_num_seqs), max(max_num_tokens, self.workspace.max_num_tokens),
                self.num_q_heads, self.head_dim, device=self.device, max_decode_query_len=self.max_decode_query_len,
            )
        if self.speculative_query_len > 1:
            from sglang.srt.layers.attention.verify_mask import maybe_create_verify_mask

            # the small per-request mask layout: chain drafts are causal, the kernels never read it (as FA3)
            self._verify_mask = maybe_create_verify_mask(
                is_draft_runner=self.is_draft_runner, skip_prefill=False, max_bs=max_bs,
                max_context_len=self.max_context_len, num_draft_tokens=self.speculative_query_len, device=self.device,
                is_read=False,
            )
        index = {"dtype": torch.int32, "device": self.device}
        self.graph = GraphBuffers(
            seq_lens_i32=torch.full((max_bs,), GRAPH_SEQ_LEN_FILL_VALUE, **index),
            cu_seqlens_k=torch.zeros(max_bs + 1, **index),
            page_table=torch.zeros((max_bs, _cdiv(self.max_context_len, self.page_size)), **index),
            query_start_loc=torch.arange(max_bs + 1, **index),
        )

    def get_cuda_graph_seq_len_fill_value(self):
        return GRAPH_SEQ_LEN_FILL_VALUE

    def init_forward_metadata_out_graph(self, forward_batch: ForwardBatch, in_capture: bool = False):
        """Capture: plan this batch size once into the graph buffers. Replay: refill those buffers.

        Decode batches, and target-verify batches (``seq_lens`` the prefix, N queries per request).
        ``forward_batch`` may be SGLang's replay view (a namespace): only ``forward_mode``,
        ``batch_size``, ``req_pool_indices``, ``seq_lens``, ``seq_lens_cpu``, ``spec_info`` and
        ``encoder_lens`` are read, the tensors sliced to ``batch_size``.
        """
        if self.graph is None:
            raise RuntimeError("init_forward_metadata_out_graph before init_cuda_graph_state")
        mode = forward_batch.forward_mode
        plain_decode = mode.is_decode() and forward_batch.spec_info is None
        if not (plain_decode or mode.is_target_verify()) or forward_batch.encoder_lens is not None:
            raise NotImplementedError(
                f"--attention-backend attnplug captures CUDA graphs of decode and target-verify batches only, not "
                f"{mode.name}; disable the other graph runners (e.g. prefill CUDA graphs) with this backend"
            )
        bs = forward_batch.batch_size
        queries = self._verify_len(forward_batch) if mode.is_target_verify() else 1
        graph = self.graph
        if in_capture:
            num_decodes, max_decode_query_len = self._decode_like(bs, queries)
            starts = graph.query_start_loc if queries == 1 else self._verify_query_start_loc(queries)
            plan = self._plan_attention(
                starts[: bs + 1], graph.seq_lens_i32[:bs], num_decodes=num_decodes,
                num_q_heads=self.num_q_heads, num_kv_heads=self.num_kv_heads, head_size=self.head_dim,
                page_size=self.page_size, max_seqlen_q=queries, max_seqlen_k=self.max_context_len,
                max_decode_query_len=max_decode_query_len, workspace=self.workspace,
            )
            graph.metadata[(bs, queries)] = AttnplugForwardMetadata(plan=plan, block_table=graph.page_table[:bs])
        delta = queries if mode.is_target_verify() else 0
        max_seqlen_k = min(self._max_seq_len(forward_batch) + delta, self.max_context_len)
        self._fused_decode_metadata(
            graph.seq_lens_i32[:bs], graph.cu_seqlens_k[: bs + 1], graph.page_table, self.req_to_token,
            forward_batch.req_pool_indices[:bs], forward_batch.seq_lens[:bs],
            _cdiv(max_seqlen_k, self.page_size), seq_len_delta=delta, page_size=self.page_size,
        )
        if mode.is_target_verify() and not in_capture:
            report.count_speculative("verify_batches")
        self.forward_metadata = graph.metadata[(bs, queries)]

    def init_forward_metadata_in_graph(self, forward_batch: ForwardBatch):
        """Nothing to record: out_graph refills the buffers the captured kernels read."""

    @property
    def verify_mask(self):
        """SGLang's ``VerifyMask`` for the draft stage to fill (``QLEN_ONLY``, unread); None before graphs."""
        return self._verify_mask

    def update_verify_buffers_to_fill_after_draft(self, spec_info, cuda_graph_bs):
        """Nothing to fill: a chain draft needs no tree mask (SGLang's base class raises here)."""

    # ------------------------------------------------------------------ per layer

    def forward_decode(self, q, k, v, layer, forward_batch: ForwardBatch, save_kv_cache=True, sinks=None, **kwargs):
        return self._forward(q, k, v, layer, forward_batch, save_kv_cache, sinks, kwargs,
                             self.fallback_backend.forward_decode)

    def forward_extend(self, q, k, v, layer, forward_batch: ForwardBatch, save_kv_cache=True, sinks=None, **kwargs):
        return self._forward(q, k, v, layer, forward_batch, save_kv_cache, sinks, kwargs,
                             self.fallback_backend.forward_extend)

    def _forward(self, q, k, v, layer, forward_batch, save_kv_cache, sinks, kwargs, fallback):
        extra = sorted(name for name, value in kwargs.items() if value is not None and value is not False)
        if extra:
            raise NotImplementedError(f"--attention-backend attnplug does not support attention arguments {extra}")
        metadata = self.forward_metadata
        reason = metadata.fallback or self._layer_reason(layer)
        if reason is not None:
            if self.draft_step is not None or forward_batch.forward_mode.is_target_verify():
                raise NotImplementedError(  # torch_native reads seq_lens as the KV length: wrong tokens here
                    f"--attention-backend attnplug cannot serve {reason} in speculative decoding (no fallback for "
                    "draft or verify batches); use another attention backend")
            if sinks is not None:
                raise NotImplementedError(f"--attention-backend attnplug: no fallback with attention sinks for {reason}")
            log_fallback_once(reason)
            return fallback(q, k, v, layer, forward_batch, save_kv_cache)

        q = q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim)
        out = torch.empty_like(q)
        k_scale = v_scale = None
        if self.fp8_kv:
            k_scale, v_scale = self._layer_kv_scales(layer)
        if save_kv_cache and k is not None and v is not None:
            if self.fp8_kv and (layer.k_scale is not None or layer.v_scale is not None):
                # SGLang divides k / v by the layer's scales (in place, as its FA3 backend lets it) before the cast
                self.token_to_kv_pool.set_kv_buffer(layer, KVWriteLoc.for_batch(forward_batch), k, v,
                                                    layer.k_scale, layer.v_scale)
            else:
                self.token_to_kv_pool.set_kv_buffer(layer, KVWriteLoc.for_batch(forward_batch), k, v)
        k_pages, v_pages = self._pages(layer.layer_id)
        window = layer.sliding_window_size
        self._paged_attention(
            q, k_pages, v_pages, metadata.block_table, metadata.plan, out,
            softmax_scale=layer.scaling,
            causal=True,
            window_size=(window, -1) if window is not None and window > -1 else (-1, -1),
            softcap=layer.logit_cap if layer.logit_cap and layer.logit_cap > 0 else 0.0,
            sinks=self._sinks(layer.layer_id, sinks),
            k_scale=k_scale,
            v_scale=v_scale,
        )
        return out.view(-1, layer.tp_q_head_num * layer.v_head_dim)

    def _layer_reason(self, layer) -> str | None:
        """Why attnplug's kernels do not serve this layer (None: they do); decided once per layer."""
        layer_id = layer.layer_id
        if layer_id not in self._layer_fallback:
            self._layer_fallback[layer_id] = self._unsupported_layer(layer)
        return self._layer_fallback[layer_id]

    def _unsupported_layer(self, layer) -> str | None:
        if layer.is_cross_attention:
            return "cross-attention layers"
        if layer.attn_type != AttentionType.DECODER:
            return f"{layer.attn_type.value} layers (not causal)"
        if layer.qk_head_dim != layer.v_head_dim:
            return "layers with different K and V head sizes"
        if (layer.tp_q_head_num, layer.tp_k_head_num, layer.qk_head_dim) != (
            self.num_q_heads, self.num_kv_heads, self.head_dim
        ):
            return "layers whose head layout differs from the model's"
        if getattr(layer, "use_irope", False):
            return "chunked local attention (iRoPE) layers"
        if layer.logit_cap and layer.logit_cap > 0 and layer.logit_capping_method != "tanh":
            return f"logit capping method {layer.logit_capping_method!r}"
        if getattr(layer, "xai_temperature_len", -1) > 0:
            return "xAI temperature scaling"
        # (layer.k_scale / v_scale: read with an FP8 pool; with an unquantized pool of the model's dtype
        # SGLang writes K/V unscaled, so they are not read, as in its torch_native backend)
        k_buffer = self.token_to_kv_pool.get_key_buffer(layer.layer_id)
        if k_buffer.dtype != self.token_to_kv_pool.get_value_buffer(layer.layer_id).dtype or (
            k_buffer.dtype not in UNQUANTIZED_KV_DTYPES + FP8_KV_DTYPES
        ):
            return f"KV cache dtype {k_buffer.dtype}"
        if self.fp8_kv and not _per_tensor_scales(layer):
            return "KV scales that are not per-tensor"
        return None

    def _layer_kv_scales(self, layer) -> tuple[torch.Tensor, torch.Tensor]:
        """The FP8 read scales of ``layer``: its ``k_scale`` / ``v_scale`` themselves when they are float32
        one-element tensors on the device (so in-place updates reach the kernels), else float32 copies
        made once (python floats from ``load_kv_cache_scales``, other dtypes); 1.0 where None."""
        k_scale, v_scale = layer.k_scale, layer.v_scale
        cached = self._kv_scales.get(layer.layer_id)
        if cached is None or cached[0] is not k_scale or cached[1] is not v_scale:
            cached = (k_scale, v_scale, self._read_scale(k_scale), self._read_scale(v_scale))
            self._kv_scales[layer.layer_id] = cached
        return cached[2], cached[3]

    def _read_scale(self, scale) -> torch.Tensor:
        if scale is None:
            return self._unit_scale
        if isinstance(scale, torch.Tensor):
            if scale.numel() != 1:
                raise ValueError(f"--attention-backend attnplug reads per-tensor FP8 KV scales only, got one of "
                                 f"shape {tuple(scale.shape)}; use --kv-cache-dtype auto")
            if scale.dtype == torch.float32 and scale.device == self._unit_scale.device:
                return scale
            return scale.detach().reshape(1).to(device=self.device, dtype=torch.float32)
        return torch.full((1,), float(scale), dtype=torch.float32, device=self.device)

    def _pages(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's ``[num_tokens, H, D]`` K and V buffers as ``[num_pages, page_size, H, D]`` views.

        Cached per layer by the buffer's address: an FP8 pool hands out a fresh ``uint8 -> fp8`` view of
        the same memory at every ``get_key_buffer`` (which must still be called: layer-wise loading hooks it).
        """
        k_buffer = self.token_to_kv_pool.get_key_buffer(layer_id)
        cached = self._paged_views.get(layer_id)
        if cached is None or cached[0] != (k_buffer.data_ptr(), k_buffer.dtype):
            v_buffer = self.token_to_kv_pool.get_value_buffer(layer_id)
            cached = ((k_buffer.data_ptr(), k_buffer.dtype), k_buffer.unflatten(0, (-1, self.page_size)),
                      v_buffer.unflatten(0, (-1, self.page_size)))
            self._paged_views[layer_id] = cached
        return cached[1], cached[2]

    def _sinks(self, layer_id: int, sinks: torch.Tensor | None) -> torch.Tensor | None:
        """``sinks`` as the float32 ``[num_q_heads]`` the kernels take (converted once per layer)."""
        if sinks is None or sinks.dtype == torch.float32:
            return sinks
        cached = self._sinks_f32.get(layer_id)
        if cached is None or cached[0] is not sinks:
            cached = self._sinks_f32[layer_id] = (sinks, sinks.to(torch.float32))
        return cached[1]


@dataclass
class GraphBuffers:
    """Persistent tensors the captured decode kernels read (sized for the largest graph batch)."""

    seq_lens_i32: torch.Tensor  # int32 [max_bs]
    cu_seqlens_k: torch.Tensor  # int32 [max_bs + 1]
    page_table: torch.Tensor  # int32 [max_bs, max_context_len / page_size]
    query_start_loc: torch.Tensor  # int32 arange [max_bs + 1]
    metadata: dict = field(default_factory=dict)  # (captured batch size, queries per row) -> AttnplugForwardMetadata


class AttnplugMultiStepDraftBackend:
    """The draft-decode steps of a speculative round (topk 1): one child backend per step, one metadata launch.

    Step ``s`` (``s < speculative_num_steps - 1``; the last step only samples) runs one query per
    request at position ``seq_lens + s`` over ``seq_lens + s + 1`` KV tokens, the draft tokens of
    the earlier steps included (their slots are in ``req_to_token`` before the round). So before
    the round one multi-step ``fused_decode_metadata`` launch writes every step's lengths (a row per
    step) and the page table they all read, and each step gets its own plan over its row. The
    children share one workspace: the steps run one after another on one stream.

    SGLang selects a child per step (``attn_backends[s]``) and calls only the metadata methods
    below on this object: eager ``init_forward_metadata``, or the CUDA-graph ones.
    """

    needs_cpu_seq_lens = True  # host maxima size the page table

    def __init__(self, model_runner, topk: int, speculative_num_steps: int):
        if topk != 1:
            raise ValueError(f"--attention-backend attnplug drafts chains only; set --speculative-eagle-topk 1 "
                             f"(got {topk})")
        self.topk, self.speculative_num_steps = topk, speculative_num_steps
        first = AttnplugAttnBackend(model_runner)
        self.attn_backends = [first] + [AttnplugAttnBackend(model_runner, workspace=first.workspace)
                                        for _ in range(speculative_num_steps - 2)]
        for step, child in enumerate(self.attn_backends):
            child.draft_step = step
        self.device, self.page_size = first.device, first.page_size
        self.req_to_token, self.max_context_len = first.req_to_token, first.max_context_len
        self.token_to_kv_pool, self.req_to_token_pool = first.token_to_kv_pool, first.req_to_token_pool
        self.kv_index_translator = first.kv_index_translator
        self.forward_metadata = None
        self.prefill_attention_backend_str = self.decode_attention_backend_str = None
        index = {"dtype": torch.int32, "device": self.device}
        max_seqs = self.req_to_token.shape[0]
        self.lengths = torch.zeros(len(self.attn_backends), max_seqs, **index)  # row s: step s's KV lengths
        self.cu_lengths = torch.zeros(len(self.attn_backends), max_seqs + 1, **index)
        self.graph = None  # DraftGraphBuffers after init_cuda_graph_state
        self._fused_decode_metadata = first._fused_decode_metadata
        self._plan_attention = first._plan_attention

    def _plan_steps(self, bs: int, lengths: torch.Tensor, block_table: torch.Tensor, max_prefix_len: int) -> list:
        """One decode plan per step over ``lengths[s, :bs]`` (int32 [steps, >= bs]) and the shared table;
        ``max_prefix_len``: host bound of ``seq_lens`` (step s reads at most ``max_prefix_len + s + 1``)."""
        first = self.attn_backends[0]
        return [AttnplugForwardMetadata(plan=self._plan_attention(
            first.decode_query_start_loc[: bs + 1], lengths[step, :bs], num_decodes=bs,
            num_q_heads=first.num_q_heads, num_kv_heads=first.num_kv_heads, head_size=first.head_dim,
            page_size=self.page_size, max_seqlen_q=1,
            max_seqlen_k=min(max_prefix_len + step + 1, self.max_context_len),
            workspace=first.workspace), block_table=block_table) for step in range(len(self.attn_backends))]

    def _round_pages(self, max_prefix_len: int) -> int:
        """Page-table columns of a round: the last step reads ``max_prefix_len + steps`` tokens at most."""
        return _cdiv(min(max_prefix_len + len(self.attn_backends), self.max_context_len), self.page_size)

    def _fill(self, forward_batch, lengths, cu_lengths, block_table, bs: int, pages: int) -> None:
        """The one launch of a round: every step's lengths (``seq_lens + s + 1``) and ``pages`` columns of
        the shared page table."""
        self._fused_decode_metadata(
            lengths[:, :bs], cu_lengths[:, : bs + 1], block_table, self.req_to_token,
            forward_batch.req_pool_indices[:bs], forward_batch.seq_lens[:bs], pages,
            seq_len_delta=1, page_size=self.page_size,
        )

    def _count_round(self) -> None:
        report.count_speculative("draft_rounds")
        report.count_speculative("draft_steps", len(self.attn_backends))

    def _bind(self, metadata: list) -> None:
        for child, step_metadata in zip(self.attn_backends, metadata):
            child.forward_metadata = step_metadata

    def init_forward_metadata(self, forward_batch: ForwardBatch):
        """Eager round: lengths, page table and plans of every step, once."""
        bs = forward_batch.batch_size
        if forward_batch.forward_mode.is_idle() or bs == 0:
            self._bind([AttnplugForwardMetadata()] * len(self.attn_backends))
            return
        max_prefix_len = self.attn_backends[0]._max_seq_len(forward_batch)
        pages = self._round_pages(max_prefix_len)
        block_table = torch.empty((bs, pages), dtype=torch.int32, device=self.device)
        self._fill(forward_batch, self.lengths, self.cu_lengths, block_table, bs, pages)
        self._bind(self._plan_steps(bs, self.lengths, block_table, max_prefix_len))
        self._count_round()

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int):
        for child in self.attn_backends[:1]:  # the shared workspace, grown if the graphs need more
            child.init_cuda_graph_state(max_bs, max_num_tokens)
        for child in self.attn_backends[1:]:
            child.workspace = self.attn_backends[0].workspace
        index = {"dtype": torch.int32, "device": self.device}
        steps = len(self.attn_backends)
        self.graph = DraftGraphBuffers(
            lengths=torch.full((steps, max_bs), GRAPH_SEQ_LEN_FILL_VALUE, **index),
            cu_lengths=torch.zeros(steps, max_bs + 1, **index),
            page_table=torch.zeros((max_bs, _cdiv(self.max_context_len, self.page_size)), **index),
        )

    def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False):
        """Capture: plan every step of this batch size once. Replay: one launch refills every step's buffers."""
        if self.graph is None:
            raise RuntimeError("init_forward_metadata_out_graph before init_cuda_graph_state")
        bs, graph = forward_batch.batch_size, self.graph
        if in_capture:
            graph.metadata[bs] = self._plan_steps(bs, graph.lengths, graph.page_table[:bs], self.max_context_len)
        pages = self._round_pages(self.attn_backends[0]._max_seq_len(forward_batch))
        self._fill(forward_batch, graph.lengths, graph.cu_lengths, graph.page_table, bs, pages)
        self._bind(graph.metadata[bs])
        if not in_capture:
            self._count_round()

    def init_forward_metadata_in_graph(self, forward_batch):
        """Nothing to record: out_graph refills the buffers the captured kernels read."""


@dataclass
class DraftGraphBuffers:
    """Persistent tensors the captured draft steps read (sized for the largest graph batch)."""

    lengths: torch.Tensor  # int32 [steps, max_bs]: row s = step s's KV lengths
    cu_lengths: torch.Tensor  # int32 [steps, max_bs + 1]
    page_table: torch.Tensor  # int32 [max_bs, max_context_len / page_size], shared by every step
    metadata: dict = field(default_factory=dict)  # captured batch size -> [AttnplugForwardMetadata per step]
