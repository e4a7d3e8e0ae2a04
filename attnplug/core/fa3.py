"""FlashAttention-3 ``scheduler_metadata``: computed once per batch, shared by every layer.

FA3 runs a small "prepare" kernel (``prepare_varlen_num_blocks``) before each attention call
unless the caller passes ``scheduler_metadata``. Engines compute it once per batch with
``get_scheduler_metadata`` and hand the same tensor to every layer (vLLM
``vllm/v1/attention/backends/flash_attn.py``: ``FlashAttentionMetadataBuilder.build`` ->
``schedule()``; SGLang ``flashattention_backend.py``: ``_compute_scheduler_metadata``, PR
#21104 with the sgl-kernel wrapper of PR #21103, which superseded PR #20943). Under CUDA graphs
the tensor lives in a persistent buffer whose tail past this batch's metadata is zeroed
(see :func:`fa3_scheduler_metadata`).

The metadata is only valid for an attention call with the same scheduling parameters
(:class:`FA3Params`); :func:`check_fa3_call` names the first one that differs.

Three bindings expose ``get_scheduler_metadata``, found lazily at the first call (never at
import time) and cached per process:

- ``sgl_kernel``: ``sgl_kernel.flash_attn`` (sgl-project/sglang
  ``sgl-kernel/python/sgl_kernel/flash_attn.py``);
- ``vllm``: ``vllm.vllm_flash_attn.flash_attn_interface`` (vllm-project/flash-attention
  ``vllm_flash_attn/flash_attn_interface.py``, shipped inside vLLM);
- ``flash_attn``: ``flash_attn_interface`` (Dao-AILab/flash-attention
  ``hopper/flash_attn_interface.py``).
"""

import dataclasses
import functools
import importlib
import logging
import math
from typing import Callable, NamedTuple, Optional

import torch

logger = logging.getLogger("attnplug")

# (binding name, module that defines get_scheduler_metadata), in the order they are tried.
_BINDING_MODULES = (
    ("sgl_kernel", "sgl_kernel.flash_attn"),
    ("vllm", "vllm.vllm_flash_attn.flash_attn_interface"),
    ("flash_attn", "flash_attn_interface"),
)
_BINDING_NAMES = tuple(name for name, _ in _BINDING_MODULES)

# Our argument -> keyword of get_scheduler_metadata in (sgl_kernel, vllm, flash_attn).
_KEYWORDS = {
    "batch_size": ("batch_size", "batch_size", "batch_size"),
    "max_seqlen_q": ("max_seqlen_q", "max_seqlen_q", "max_seqlen_q"),
    "max_seqlen_k": ("max_seqlen_k", "max_seqlen_k", "max_seqlen_k"),
    "num_q_heads": ("num_heads", "num_heads_q", "num_heads_q"),
    "num_kv_heads": ("num_heads_k", "num_heads_kv", "num_heads_kv"),
    "head_size": ("headdim", "headdim", "headdim"),
    "head_size_v": ("headdim_v", "headdim_v", "headdim_v"),
    "dtype": ("qkv_dtype", "qkv_dtype", "qkv_dtype"),
    "seq_lens": ("cache_seqlens", "cache_seqlens", "cache_seqlens"),
    "query_start_loc": ("cu_seqlens_q", "cu_seqlens_q", "cu_seqlens_q"),
    "page_size": ("page_size", "page_size", "page_size"),
    "causal": ("causal", "causal", "causal"),
    "window_size": ("window_size", "window_size", "window_size"),
    "has_softcap": ("has_softcap", "has_softcap", "has_softcap"),
    "num_splits": ("num_splits", "num_splits", "num_splits"),
    "pack_gqa": ("pack_gqa", "pack_gqa", "pack_gqa"),
    "sm_margin": ("sm_margin", "sm_margin", "sm_margin"),
}


class FA3Binding(NamedTuple):
    """An installed ``get_scheduler_metadata``; ``name`` is one of sgl_kernel, vllm, flash_attn."""

    name: str
    get_scheduler_metadata: Callable[..., torch.Tensor]


@dataclasses.dataclass(frozen=True)
class FA3Params:
    """Parameters shared by ``get_scheduler_metadata`` and the FA3 attention call it serves.

    Build one per attention configuration and pass the same values (``causal``,
    ``window_size``, ``softcap``, ``num_splits``, ``pack_gqa``, ``sm_margin``) to the attention
    call; FA3 fails or misbehaves when they differ. ``dtype`` is the dtype of q / the KV cache
    as FA3 sees them (the fp8 dtype for an fp8 cache). ``head_size_v`` defaults to ``head_size``.
    Only ``softcap > 0`` enters the metadata (``has_softcap``). vLLM's ``flash_attn_varlen_func``
    always runs with ``pack_gqa=None`` and ``sm_margin=0``: keep those with that binding.
    Layers with another configuration (e.g. sliding-window layers) need their own metadata or
    none: SGLang passes none to SWA layers, vLLM stops precomputing when layers' windows differ.
    """

    num_q_heads: int
    num_kv_heads: int
    head_size: int
    page_size: int
    dtype: torch.dtype
    head_size_v: Optional[int] = None
    causal: bool = True
    window_size: tuple = (-1, -1)
    softcap: float = 0.0
    num_splits: int = 0
    pack_gqa: Optional[bool] = None
    sm_margin: int = 0

    def __post_init__(self):
        if self.head_size_v is None:
            object.__setattr__(self, "head_size_v", self.head_size)
        for name in ("num_q_heads", "num_kv_heads", "head_size", "head_size_v", "page_size"):
            _check_int(name, getattr(self, name), minimum=1)
        if self.num_q_heads % self.num_kv_heads:
            raise ValueError(f"num_q_heads ({self.num_q_heads}) must be a multiple of "
                             f"num_kv_heads ({self.num_kv_heads})")
        if not isinstance(self.dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype, got {self.dtype!r}")
        if not isinstance(self.causal, bool):
            raise TypeError(f"causal must be a bool, got {self.causal!r}")
        window = tuple(self.window_size) if isinstance(self.window_size, (tuple, list)) else ()
        if len(window) != 2 or any(isinstance(w, bool) or not isinstance(w, int) or w < -1 for w in window):
            raise ValueError(f"window_size must be two ints >= -1 (left, right), got {self.window_size!r}")
        object.__setattr__(self, "window_size", window)
        softcap_ok = isinstance(self.softcap, (int, float)) and not isinstance(self.softcap, bool)
        if not (softcap_ok and math.isfinite(self.softcap) and self.softcap >= 0):
            raise ValueError(f"softcap must be a finite number >= 0 (0 = off), got {self.softcap!r}")
        _check_int("num_splits", self.num_splits, minimum=0)
        if self.pack_gqa is not None and not isinstance(self.pack_gqa, bool):
            raise TypeError(f"pack_gqa must be None, True or False, got {self.pack_gqa!r}")
        _check_int("sm_margin", self.sm_margin, minimum=0)


def _check_int(name: str, value, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def check_fa3_call(params: FA3Params, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *,
                   causal: bool, window_size, softcap: float, num_splits: int, pack_gqa: Optional[bool],
                   sm_margin: int) -> None:
    """Raise ValueError naming the first parameter of an FA3 attention call that differs from ``params``.

    Host-only shape/attribute checks (no device work); meant for set-up or debug, not per layer.

    Parameters
    ----------
    params : FA3Params
        What the scheduler metadata was computed with.
    q : torch.Tensor
        [num_tokens, num_q_heads, head_size], the dtype FA3 runs in.
    k_cache, v_cache : torch.Tensor
        [num_pages, page_size, num_kv_heads, head_size] / [..., head_size_v] (any strides).
    causal, window_size, softcap, num_splits, pack_gqa, sm_margin
        The values passed to the attention call.
    """
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.dim() != 4:
        raise ValueError(f"q must be 3-D and k_cache / v_cache 4-D (paged), "
                         f"got {q.dim()}, {k_cache.dim()}, {v_cache.dim()}")
    call = FA3Params(num_q_heads=q.shape[1], num_kv_heads=k_cache.shape[2], head_size=q.shape[2],
                     page_size=k_cache.shape[1], dtype=q.dtype, head_size_v=v_cache.shape[3], causal=causal,
                     window_size=window_size, softcap=softcap, num_splits=num_splits, pack_gqa=pack_gqa,
                     sm_margin=sm_margin)
    for field in dataclasses.fields(FA3Params):
        name, want, got = field.name, getattr(params, field.name), getattr(call, field.name)
        if name == "softcap":  # the metadata only knows has_softcap
            name, want, got = "softcap > 0", want > 0, got > 0
        if want != got:
            raise ValueError(f"{name}: the attention call has {got!r} but scheduler_metadata was computed "
                             f"with {want!r}; FA3 needs them equal")


@functools.lru_cache(maxsize=None)
def find_fa3_binding() -> Optional[FA3Binding]:
    """The first installed FA3 binding (see the module docstring), or None; cached per process.

    Any failure to import counts as "not installed" (for example sgl_kernel raises OSError
    when libcuda.so.1 is missing). With none installed, logs one line and returns None.
    """
    reasons = []
    for name, module_name in _BINDING_MODULES:
        try:
            module = importlib.import_module(module_name)
        except Exception as error:  # noqa: BLE001 - any import failure means "not installed"
            first_line = (str(error).splitlines() or [""])[0][:120]
            reasons.append(f"{module_name}: {type(error).__name__}: {first_line}")
            continue
        function = getattr(module, "get_scheduler_metadata", None)
        if function is None or not getattr(module, "FA3_AVAILABLE", True):  # vllm: FA2-only build
            reasons.append(f"{module_name}: no FA3 get_scheduler_metadata")
            continue
        return FA3Binding(name, function)
    logger.info("FA3 scheduler metadata off: no FA3 binding installed (%s)", "; ".join(reasons))
    return None


def allocate_fa3_scheduler_metadata(max_num_seqs: int, device=None) -> torch.Tensor:
    """A zeroed persistent buffer for :func:`fa3_scheduler_metadata` (``out=``) under CUDA graphs.

    int32 [1 + round_up(max_num_seqs, 4) * 4]: FA3's tile-count semaphore plus four
    per-sequence vectors, the size vLLM (``FlashAttentionMetadataBuilder.__init__``, after
    vllm-project/flash-attention ``hopper/flash_api.cpp``) and SGLang
    (``init_cuda_graph_state``: ``_sched_meta_buf``) allocate. Older FA3 builds need less.
    """
    _check_int("max_num_seqs", max_num_seqs, minimum=1)
    return torch.zeros(1 + (max_num_seqs + 3) // 4 * 4 * 4, dtype=torch.int32, device=device)


def fa3_scheduler_metadata(params: FA3Params, query_start_loc: torch.Tensor, seq_lens: torch.Tensor, *,
                           max_seqlen_q: int, max_seqlen_k: int, out: Optional[torch.Tensor] = None,
                           binding: Optional[FA3Binding] = None) -> Optional[torch.Tensor]:
    """FA3 ``scheduler_metadata`` for one batch, to pass to every layer's FA3 varlen/paged call.

    With ``out`` (a persistent buffer, e.g. :func:`allocate_fa3_scheduler_metadata`), the metadata
    is copied into ``out[:n]``, ``out[n:]`` is zeroed and ``out[:n]`` is returned, as vLLM's
    ``build()`` does (``self.scheduler_metadata[:n] = ...; self.scheduler_metadata[n:] = 0``:
    "Otherwise, some thread blocks may use the invalid scheduler metadata and overwrite the output
    buffer") and SGLang's ``_sched_meta_buf`` does. Device work only (no host sync), so it can be
    captured in a CUDA graph. The attention call must pass ``cu_seqlens_q`` (varlen): the
    metadata's size depends on it.

    Parameters
    ----------
    params : FA3Params
        The attention call's scheduling parameters.
    query_start_loc : torch.Tensor
        int32 [num_seqs + 1], cumulative query lengths (FA3 ``cu_seqlens_q``).
    seq_lens : torch.Tensor
        int32 [num_seqs], KV lengths (FA3 ``cache_seqlens`` / ``seqused_k``).
    max_seqlen_q, max_seqlen_k : int
        Host-side maxima of the query and KV lengths.
    out : torch.Tensor, optional
        int32 [>= n] persistent buffer, on the device of ``seq_lens``.
    binding : FA3Binding, optional
        Use this binding instead of the installed one (tests use a stand-in).

    Returns
    -------
    torch.Tensor or None
        int32 [n]; None for an empty batch or when no FA3 binding is installed (then call FA3
        without ``scheduler_metadata``).
    """
    _check_batch(query_start_loc, seq_lens, max_seqlen_q, max_seqlen_k, out)
    batch_size = seq_lens.shape[0]
    if batch_size == 0:
        return None
    binding = binding if binding is not None else find_fa3_binding()
    if binding is None:
        return None
    if binding.name not in _BINDING_NAMES:
        raise ValueError(f"binding.name must be one of {_BINDING_NAMES}, got {binding.name!r}")
    # vLLM's flash_attn_varlen_func passes pack_gqa=None and sm_margin=0 to FA3 whatever we ask.
    if binding.name == "vllm" and params.pack_gqa is not None:
        raise ValueError("pack_gqa must be None with the vllm binding (its attention call fixes pack_gqa=None)")
    if binding.name == "vllm" and params.sm_margin != 0:
        raise ValueError("sm_margin must be 0 with the vllm binding (its attention call fixes sm_margin=0)")

    ours = dict(
        batch_size=batch_size, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
        num_q_heads=params.num_q_heads, num_kv_heads=params.num_kv_heads, head_size=params.head_size,
        head_size_v=params.head_size_v, dtype=params.dtype, seq_lens=seq_lens, query_start_loc=query_start_loc,
        page_size=params.page_size, causal=params.causal, window_size=params.window_size,
        has_softcap=params.softcap > 0, num_splits=params.num_splits, pack_gqa=params.pack_gqa,
        sm_margin=params.sm_margin,
    )
    column = _BINDING_NAMES.index(binding.name)
    metadata = binding.get_scheduler_metadata(**{_KEYWORDS[key][column]: value for key, value in ours.items()})
    if out is None:
        return metadata
    n = metadata.shape[0]
    if n > out.shape[0]:
        raise ValueError(f"out holds {out.shape[0]} int32 but this batch's scheduler metadata needs {n}; "
                         f"allocate it with allocate_fa3_scheduler_metadata(max_num_seqs)")
    out[:n].copy_(metadata)
    out[n:].zero_()
    return out[:n]


def _check_batch(query_start_loc, seq_lens, max_seqlen_q, max_seqlen_k, out) -> None:
    for name, tensor in (("seq_lens", seq_lens), ("query_start_loc", query_start_loc), ("out", out)):
        if tensor is None:
            continue
        if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.int32 or tensor.dim() != 1:
            raise TypeError(f"{name} must be a 1-D int32 tensor, got {getattr(tensor, 'dtype', type(tensor))} "
                            f"with shape {tuple(getattr(tensor, 'shape', ()))}")
        if tensor.device != seq_lens.device:
            raise ValueError(f"{name} is on {tensor.device} but seq_lens is on {seq_lens.device}")
    if query_start_loc.shape[0] != seq_lens.shape[0] + 1:
        raise ValueError(f"query_start_loc must have num_seqs + 1 = {seq_lens.shape[0] + 1} entries, "
                         f"got {query_start_loc.shape[0]}")
    if out is not None and not out.is_contiguous():
        raise ValueError("out must be contiguous")
    _check_int("max_seqlen_q", max_seqlen_q, minimum=1 if seq_lens.shape[0] else 0)
    _check_int("max_seqlen_k", max_seqlen_k, minimum=1 if seq_lens.shape[0] else 0)
