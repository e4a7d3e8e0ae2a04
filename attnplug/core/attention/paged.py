"""``paged_attention``: run one planned batch for one layer (validation + launches, no sync)."""

from __future__ import annotations

import os
from typing import Optional

import torch

from .._launch import fast_launcher
from .kernels import _decode_split_kv_kernel, _prefill_kernel, _reduce_segments_kernel
from .plan import AttentionPlan

# cached compiled-kernel launches (the plain ``kernel[grid](...)`` costs ~17 us of host time each)
_launch_decode = fast_launcher(_decode_split_kv_kernel)
_launch_reduce = fast_launcher(_reduce_segments_kernel)
_launch_prefill = fast_launcher(_prefill_kernel)

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FP8_KV_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)  # KV cache dtypes read with per-tensor scales
# CUDA tensors get kernels compiled for NVIDIA, where the kernels may use inline PTX
_NVIDIA_BUILD = torch.version.hip is None and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")


def _check_kv_scales(dtype, kv_dtype, device, q_scale, k_scale, v_scale) -> bool:
    """Whether the caches are FP8 (then the scales, q's for FP8 queries, must be float32 one-element tensors
    on q's device); raises for dtypes the kernels do not read and for scales without an FP8 tensor."""
    if kv_dtype not in FP8_KV_DTYPES:
        if kv_dtype != dtype:
            raise TypeError(f"k_cache dtype {kv_dtype} differs from q dtype {dtype} and is not an FP8 KV dtype "
                            f"({', '.join(map(str, FP8_KV_DTYPES))})")
        if k_scale is not None or v_scale is not None or q_scale is not None:
            raise ValueError(f"q_scale / k_scale / v_scale are for FP8 caches only; the caches are {kv_dtype}")
        return False
    fp8_query = dtype in FP8_KV_DTYPES
    if q_scale is not None and not fp8_query:
        raise ValueError(f"q_scale is for FP8 queries only; q is {dtype}")
    required = [("k_scale", k_scale, f"a {kv_dtype} KV cache"), ("v_scale", v_scale, f"a {kv_dtype} KV cache")]
    if fp8_query:
        required.insert(0, ("q_scale", q_scale, f"{dtype} queries"))
    for name, scale, what in required:
        if scale is None:
            raise ValueError(f"{name} is required for {what} (a float32 tensor with one element)")
        if not isinstance(scale, torch.Tensor) or scale.dtype != torch.float32 or scale.numel() != 1:
            raise ValueError(f"{name} must be a float32 tensor with one element, got "
                             f"{getattr(scale, 'dtype', type(scale).__name__)} {tuple(getattr(scale, 'shape', ()))}")
        if scale.device != device:
            raise ValueError(f"{name} is on {scale.device} but q on {device}")
    return True


def _check_inputs(q, k_cache, v_cache, block_table, plan, out, sinks, strides) -> torch.dtype:
    """Cheap host checks (shapes, dtypes, devices); nothing here reads device memory. ``strides``: the
    ``stride()`` tuples of q, out, k_cache, v_cache and block_table (computed once by the caller: on the
    host path of every layer, each tensor attribute read costs). Returns the caches' dtype."""
    if not isinstance(plan, AttentionPlan):
        raise TypeError(f"plan must be an AttentionPlan from plan_attention, got {type(plan).__name__}")
    q_shape, dtype, device = q.shape, q.dtype, q.device
    if len(q_shape) != 3 or q_shape[1] != plan.num_q_heads or q_shape[2] != plan.head_size:
        raise ValueError(f"q must be [num_tokens, {plan.num_q_heads}, {plan.head_size}], got {tuple(q_shape)}")
    if dtype in _SUPPORTED_DTYPES:
        out_dtypes = (dtype,)
    elif dtype in FP8_KV_DTYPES:  # FP8 queries (over an FP8 cache, with q_scale: checked by the caller)
        out_dtypes = (torch.float16, torch.bfloat16)
    else:
        raise TypeError(f"q must be float16, bfloat16, float32 or FP8 (with q_scale), got {dtype}")
    if out.shape != q_shape or out.dtype not in out_dtypes:
        raise ValueError(f"out must match q ({tuple(q_shape)}, {' or '.join(map(str, out_dtypes))}), "
                         f"got {tuple(out.shape)}, {out.dtype}")
    q_strides, out_strides, _, _, block_table_strides = strides
    if q_strides[2] != 1 or out_strides[2] != 1:
        raise ValueError("q and out must be contiguous in their last (head_size) dimension")
    expected_cache = (plan.page_size, plan.num_kv_heads, plan.head_size)
    kv_dtype = k_cache.dtype
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        shape = cache.shape
        if len(shape) != 4 or shape[1:] != expected_cache:
            raise ValueError(f"{name} must be [num_pages, {', '.join(map(str, expected_cache))}], got {tuple(shape)}")
        if cache.dtype != kv_dtype:
            raise TypeError(f"{name} dtype {cache.dtype} differs from k_cache dtype {kv_dtype}")
        if cache.device != device:
            raise ValueError(f"{name} is on {cache.device} but q on {device}")
    table_shape = block_table.shape
    if len(table_shape) != 2 or block_table.dtype != torch.int32 or table_shape[0] < plan.num_seqs:
        raise ValueError(f"block_table must be int32 [>= num_seqs={plan.num_seqs}, max_pages_per_seq], "
                         f"got {block_table.dtype} {tuple(table_shape)}")
    if block_table_strides[1] != 1:
        raise ValueError("block_table must be contiguous in its last dimension")
    if device != plan.seq_lens.device or out.device != device or block_table.device != device:
        raise ValueError(f"q, out, block_table and the plan's tensors must share one device (q is on {device})")
    if plan.max_num_tokens is not None and q_shape[0] > plan.max_num_tokens:
        raise ValueError(f"q has {q_shape[0]} tokens but the workspace was allocated for "
                         f"max_num_tokens={plan.max_num_tokens}")
    if q_shape[0] < plan.num_seqs:
        raise ValueError(f"q has {q_shape[0]} tokens, fewer than the plan's {plan.num_seqs} sequences")
    if sinks is not None and (sinks.shape != (plan.num_q_heads,) or sinks.dtype != torch.float32):
        raise ValueError(f"sinks must be float32 [{plan.num_q_heads}], got {sinks.dtype} {tuple(sinks.shape)}")
    return kv_dtype


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    plan: AttentionPlan,
    out: torch.Tensor,
    *,
    softmax_scale: float,
    causal: bool = True,
    window_size: tuple = (-1, -1),
    softcap: float = 0.0,
    sinks: Optional[torch.Tensor] = None,
    q_scale: Optional[torch.Tensor] = None,
    k_scale: Optional[torch.Tensor] = None,
    v_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Attention of a planned batch over a paged KV cache, written into ``out``.

    Sequence ``i``'s queries ``q[qsl[i]:qsl[i + 1]]`` are the last ``qlen_i`` tokens of its KV
    sequence of length ``seq_lens[i]``; query ``j`` sits at ``p = seq_lens[i] - qlen_i + j`` and
    sees KV positions ``k`` with ``k <= p`` (if causal), ``k >= p - window_size[0]`` (if >= 0) and
    ``k <= p + window_size[1]`` (if >= 0). Decode-like sequences (decodes and speculative verify
    sequences, causal inside the draft block) run through the split-KV kernel and its reduction,
    prefill sequences through the 2D kernel. No host synchronisation; with a workspace in the plan,
    no allocation either (CUDA-graph capturable). CUDA-graph padding lanes (sequences with
    ``seq_len == 0`` past the real batch) read and write nothing.

    Parameters
    ----------
    q : torch.Tensor
        ``[num_tokens, num_q_heads, head_size]`` float16 / bfloat16 / float32 (last dim contiguous), or
        FP8 with ``q_scale`` over an FP8 cache (then ``out`` is float16 / bfloat16).
    k_cache, v_cache : torch.Tensor
        ``[num_pages, page_size, num_kv_heads, head_size]``, any strides (e.g. a view of vLLM's
        ``[num_blocks, 2, page_size, num_kv_heads, head_size]`` or SGLang's token pool); q's dtype, or
        an FP8 dtype (``FP8_KV_DTYPES``: float8_e4m3fn, float8_e5m2; a uint8 engine buffer viewed as
        one) with ``k_scale`` / ``v_scale``; the dots then run in float16 (float32 for float32 queries).
    block_table : torch.Tensor
        int32 ``[>= num_seqs, max_pages_per_seq]``: page ``j`` of sequence ``i``.
    plan : AttentionPlan
        From ``plan_attention`` for this batch.
    out : torch.Tensor
        Like ``q`` (float16 / bfloat16 for FP8 queries); rows of the batch's tokens are overwritten
        (padding rows are left alone).
    softmax_scale : float
        Multiplies ``q . k``.
    causal : bool
        Prefill sequences only: decode-like sequences are always causal (a verify query never sees
        the draft tokens after it).
    window_size : (int, int)
        ``(left, right)`` sliding window; -1 means unbounded.
    softcap : float
        If > 0, logits become ``softcap * tanh(logits / softcap)``.
    sinks : torch.Tensor, optional
        float32 ``[num_q_heads]``: ``exp(sinks[h])`` joins each row's softmax denominator.
    q_scale, k_scale, v_scale : torch.Tensor, optional
        FP8 queries / caches only (then required): float32 one-element tensors on q's device, the per-tensor
        dequantization scales (a cache value ``x`` stands for ``float(x) * scale``). Read on the
        device by every call, so a CUDA graph replays with the engine's current scales.

    Returns
    -------
    torch.Tensor
        ``out``.
    """
    all_strides = (q.stride(), out.stride(), k_cache.stride(), v_cache.stride(), block_table.stride())
    kv_dtype = _check_inputs(q, k_cache, v_cache, block_table, plan, out, sinks, all_strides)
    dtype = q.dtype
    plain_kv = kv_dtype is dtype and out.dtype is dtype and k_scale is None and v_scale is None and q_scale is None
    kv_fp8 = not plain_kv and _check_kv_scales(dtype, kv_dtype, q.device, q_scale, k_scale, v_scale)
    if not causal and plan.num_decodes and plan.max_decode_query_len > 1:
        raise ValueError("causal=False is not supported for decode-like sequences of several query tokens "
                         "(plan them as prefills: num_decodes=0)")
    if plan.num_seqs == 0:
        return out
    window_left, window_right = window_size
    use_softcap = softcap > 0
    use_sinks = sinks is not None
    use_window = window_left >= 0
    dot_precision = "ieee" if dtype == torch.float32 else "tf32"
    inline_ptx = _NVIDIA_BUILD and q.is_cuda
    common = (q, k_cache, v_cache, block_table, plan.seq_lens, plan.query_start_loc, sinks, q_scale, k_scale, v_scale,
              float(softmax_scale), float(softcap) if use_softcap else 0.0, max(window_left, 0))
    q_strides, out_strides, k_strides, v_strides, block_table_strides = all_strides
    k_dim_contiguous, v_dim_contiguous = k_strides[3] == 1, v_strides[3] == 1
    strides = (q_strides[0], q_strides[1], out_strides[0], out_strides[1], block_table_strides[0], *k_strides,
               *v_strides)
    # constexprs go positionally, the plan's first (their dict order is the kernel's): a cheaper launch key

    if plan.num_decodes:
        split = plan.num_segments > 1
        query_slots = plan.segment_lse.shape[1] if split else 1
        _launch_decode(
            plan.decode_grid, out, plan.segment_out, plan.segment_lse, *common, plan.num_segments, query_slots,
            *strides, *plan.decode_constexprs.values(), use_softcap, use_sinks, use_window, k_dim_contiguous,
            v_dim_contiguous, kv_fp8, inline_ptx, dot_precision,
            **(plan.fp8_decode_options if kv_fp8 else plan.decode_options),
        )
        if split:
            _launch_reduce(
                plan.reduce_grid, out, plan.segment_out, plan.segment_lse, plan.seq_lens, plan.query_start_loc, sinks,
                max(window_left, 0), plan.num_segments, query_slots, out_strides[0], out_strides[1],
                *plan.reduce_constexprs.values(), use_sinks, use_window, **plan.reduce_options,
            )

    num_prefills = plan.num_seqs - plan.num_decodes
    if num_prefills:
        block_q = plan.prefill_constexprs["BLOCK_Q"]
        num_prefill_tokens = min(num_prefills * plan.max_seqlen_q, q.shape[0] - plan.num_decodes)
        grid = (num_prefill_tokens // block_q + num_prefills, plan.num_kv_heads)
        _launch_prefill(
            grid, out, *common, max(window_right, 0), plan.num_decodes, plan.num_seqs, *strides,
            *plan.prefill_constexprs.values(), bool(causal), use_softcap, use_sinks, use_window,
            window_right >= 0, k_dim_contiguous, v_dim_contiguous, kv_fp8, inline_ptx, dot_precision, **plan.prefill_options,
        )
    return out
