"""Fused decode metadata: sequence lengths, their prefix sum and page tables in one launch.

Replaces the per-step torch sequence that SGLang's FlashAttention backend ran before SGLang
PR 20778 fused it (about ten small kernels, ~125-140 us of host time per decode step)::

    cache_seqlens_int32[:bs] = (seq_lens + seq_len_delta).to(int32)
    cu_seqlens_k[0] = 0;  cu_seqlens_k[1:bs+1] = cumsum(cache_seqlens_int32[:bs])
    # with 2-D lengths outputs, row s (s < num_steps) holds the above for seq_len_delta + s
    tok = req_to_token[req_pool_indices[:, None], arange(max_seq_pages)[None, :] * page_size]
    page_table[:bs, :max_seq_pages] = tok // page_size
    if swa_page_table is not None:
        swa_page_table[:bs, :max_seq_pages] = full_to_swa_index_mapping[tok] // page_size

The page table is filled for every column < max_seq_pages whatever each sequence's own length
(the reference behaviour; SGLang's current fused kernel rewrites only each live prefix).

Multi-step form: the T - 1 decode steps of a speculative draft (topk 1) read the same pages with
lengths that grow by one token per step. Given ``[num_steps, >= bs]`` lengths outputs, one launch
writes every step's lengths and prefix sums (row s: ``seq_len_delta + s`` extra tokens) and the one
page table all steps share, instead of one launch per step.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attnplug.core._launch import fast_launcher

_INDEX_DTYPES = (torch.int32, torch.int64)
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1
_BLOCK_BS = 256  # sequences per step of the prefix-sum loop (fixed: no recompiles as bs varies)
_MAX_BLOCK_COLS = 1024
_PLANS: dict = {}  # (max_seq_pages, page_size) -> _plan(...)


_POINTERS = ("seq_lens_ptr", "req_pool_indices_ptr", "req_to_token_ptr", "full_to_swa_ptr", "cache_seqlens_ptr",
             "cu_seqlens_k_ptr", "page_table_ptr", "swa_page_table_ptr")
_INTS = ("stride_r2t_row", "stride_r2t_col", "stride_pt_row", "stride_pt_col", "stride_swa_row", "stride_swa_col",
         "stride_cache_step", "stride_cu_step", "batch_size", "max_seq_pages", "seq_len_delta")


# Nothing but dtypes and constexprs specialized, so the op's own key is complete (launch_by_key).
@triton.jit(do_not_specialize=_INTS, do_not_specialize_on_alignment=_POINTERS)
def _fused_decode_metadata_kernel(
    seq_lens_ptr,  # [bs] int32/int64
    req_pool_indices_ptr,  # [bs] int32/int64
    req_to_token_ptr,  # [pool, max_context] int32
    stride_r2t_row: tl.int64,
    stride_r2t_col: tl.int64,
    full_to_swa_ptr,  # [num_tokens] int32/int64, or None without SWA
    cache_seqlens_ptr,  # [num_steps, >= bs] int32 (rows stride_cache_step apart), output
    cu_seqlens_k_ptr,  # [num_steps, >= bs + 1] int32 (rows stride_cu_step apart), output
    page_table_ptr,  # [>= bs, >= max_seq_pages] int32, output
    stride_pt_row: tl.int64,
    stride_pt_col: tl.int64,
    swa_page_table_ptr,  # [>= bs, >= max_seq_pages] int32, output, or None without SWA
    stride_swa_row: tl.int64,
    stride_swa_col: tl.int64,
    stride_cache_step: tl.int64,
    stride_cu_step: tl.int64,
    batch_size: tl.int32,
    max_seq_pages: tl.int32,
    seq_len_delta: tl.int32,
    PAGE_SHIFT: tl.constexpr,  # log2(page_size)
    NUM_STEPS: tl.constexpr,  # rows of the lengths outputs (1: a plain decode step)
    BLOCK_BS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    """Program (b, c) fills columns [c * BLOCK_COLS, (c + 1) * BLOCK_COLS) of page-table row b;
    the last column of programs is one more: program (0, last) writes cache_seqlens and
    cu_seqlens_k of every step (one block-wide scan per BLOCK_BS; step s adds s to each length)
    while the others gather pages."""
    pid_b = tl.program_id(0)
    pid_c = tl.program_id(1)
    scan_column = tl.num_programs(1) - 1

    if pid_b == 0 and pid_c == scan_column:
        for step in tl.static_range(NUM_STEPS):
            tl.store(cu_seqlens_k_ptr + step * stride_cu_step, 0)
        total = 0
        for start in range(0, batch_size, BLOCK_BS):
            offs = start + tl.arange(0, BLOCK_BS)
            in_batch = offs < batch_size
            seq_lens = tl.load(seq_lens_ptr + offs, mask=in_batch, other=0)
            lens = tl.where(in_batch, (seq_lens + seq_len_delta).to(tl.int32), 0)  # [BLOCK_BS]
            cu_lens = total + tl.cumsum(lens, axis=0)
            for step in tl.static_range(NUM_STEPS):  # step s: s more tokens per sequence, s * (i + 1) more in the sum
                tl.store(cache_seqlens_ptr + step * stride_cache_step + offs, lens + step, mask=in_batch)
                tl.store(cu_seqlens_k_ptr + step * stride_cu_step + 1 + offs, cu_lens + step * (offs + 1),
                         mask=in_batch)
            total += tl.sum(lens, axis=0)

    if pid_b < batch_size and pid_c < scan_column:  # bs == 0 launches only the scan program
        cols = pid_c * BLOCK_COLS + tl.arange(0, BLOCK_COLS)  # [BLOCK_COLS]
        in_table = cols < max_seq_pages
        row = tl.load(req_pool_indices_ptr + pid_b).to(tl.int64)
        token_cols = (cols << PAGE_SHIFT).to(tl.int64)  # first token of each page
        tokens = tl.load(
            req_to_token_ptr + row * stride_r2t_row + token_cols * stride_r2t_col, mask=in_table, other=0
        )  # [BLOCK_COLS] int32 token ids
        # page_size == 1: token ids are page ids. Otherwise an arithmetic shift, i.e. floor division.
        if PAGE_SHIFT == 0:
            pages = tokens
        else:
            pages = tokens >> PAGE_SHIFT
        tl.store(page_table_ptr + pid_b * stride_pt_row + cols * stride_pt_col, pages, mask=in_table)
        if swa_page_table_ptr is not None:
            swa_tokens = tl.load(full_to_swa_ptr + tokens, mask=in_table, other=0)
            if PAGE_SHIFT == 0:
                swa_pages = swa_tokens
            else:
                swa_pages = swa_tokens >> PAGE_SHIFT
            tl.store(
                swa_page_table_ptr + pid_b * stride_swa_row + cols * stride_swa_col,
                swa_pages.to(tl.int32),
                mask=in_table,
            )


def _check_inputs(cache_seqlens_int32, cu_seqlens_k, page_table, req_to_token, req_pool_indices, seq_lens,
                  max_seq_pages, seq_len_delta, page_size, swa_page_table, full_to_swa_index_mapping) -> None:
    """Raise the ValueError / TypeError that names the first invalid argument."""
    for name, tensor in (("cache_seqlens_int32", cache_seqlens_int32), ("cu_seqlens_k", cu_seqlens_k),
                         ("page_table", page_table), ("req_to_token", req_to_token),
                         ("req_pool_indices", req_pool_indices), ("seq_lens", seq_lens),
                         ("swa_page_table", swa_page_table), ("full_to_swa_index_mapping", full_to_swa_index_mapping)):
        optional = name in ("swa_page_table", "full_to_swa_index_mapping")
        if not isinstance(tensor, torch.Tensor) and not (optional and tensor is None):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if page_size.__class__ is not int or page_size < 1 or page_size & (page_size - 1):
        raise ValueError(f"page_size must be a power of two, got {page_size!r}")
    if max_seq_pages.__class__ is not int or max_seq_pages < 0:
        raise ValueError(f"max_seq_pages must be a non-negative int, got {max_seq_pages!r}")
    if seq_len_delta.__class__ is not int:
        raise TypeError(f"seq_len_delta must be an int, got {type(seq_len_delta).__name__}")
    if not _INT32_MIN <= seq_len_delta <= _INT32_MAX:
        raise ValueError(f"seq_len_delta must fit in int32, got {seq_len_delta}")
    if (swa_page_table is None) != (full_to_swa_index_mapping is None):
        raise ValueError("swa_page_table and full_to_swa_index_mapping must be given together")
    if req_to_token.dtype != torch.int32:
        raise TypeError(f"req_to_token must be int32, got {req_to_token.dtype}")
    for name, tensor in (("req_pool_indices", req_pool_indices), ("seq_lens", seq_lens),
                         ("full_to_swa_index_mapping", full_to_swa_index_mapping)):
        if tensor is not None and tensor.dtype not in _INDEX_DTYPES:
            raise TypeError(f"{name} must be int32 or int64, got {tensor.dtype}")
    for name, tensor in (("cache_seqlens_int32", cache_seqlens_int32), ("cu_seqlens_k", cu_seqlens_k),
                         ("page_table", page_table), ("swa_page_table", swa_page_table)):
        if tensor is not None and tensor.dtype != torch.int32:
            raise TypeError(f"{name} must be int32, got {tensor.dtype}")
    device = page_table.get_device()
    for name, tensor in (("cache_seqlens_int32", cache_seqlens_int32), ("cu_seqlens_k", cu_seqlens_k),
                         ("req_to_token", req_to_token), ("req_pool_indices", req_pool_indices),
                         ("seq_lens", seq_lens), ("swa_page_table", swa_page_table),
                         ("full_to_swa_index_mapping", full_to_swa_index_mapping)):
        if tensor is not None and tensor.get_device() != device:
            raise ValueError(f"{name} is on {tensor.device}, page_table on {page_table.device}")

    bs = seq_lens.shape[0] if seq_lens.dim() == 1 else -1
    for name, tensor, min_len in (("seq_lens", seq_lens, bs), ("req_pool_indices", req_pool_indices, bs),
                                  ("full_to_swa_index_mapping", full_to_swa_index_mapping, 0)):
        if tensor is None:
            continue
        if tensor.dim() != 1 or tensor.shape[0] < min_len or not tensor.is_contiguous():
            raise ValueError(f"{name} must be a contiguous 1-D tensor of at least {max(min_len, 0)} elements, "
                             f"got shape {tuple(tensor.shape)} strides {tensor.stride()}")
    for name, tensor, min_len in (("cache_seqlens_int32", cache_seqlens_int32, bs), ("cu_seqlens_k", cu_seqlens_k, bs + 1)):
        if tensor.dim() not in (1, 2) or tensor.shape[-1] < min_len or tensor.stride(-1) != 1 or tensor.shape[0] == 0:
            raise ValueError(f"{name} must be 1-D [>= {max(min_len, 0)}] or 2-D [num_steps >= 1, >= {max(min_len, 0)}] "
                             f"with contiguous rows, got shape {tuple(tensor.shape)} strides {tensor.stride()}")
    if cache_seqlens_int32.dim() != cu_seqlens_k.dim() or (
            cu_seqlens_k.dim() == 2 and cu_seqlens_k.shape[0] != cache_seqlens_int32.shape[0]):
        raise ValueError(f"cu_seqlens_k (shape {tuple(cu_seqlens_k.shape)}) must have the rank and the rows (steps) "
                         f"of cache_seqlens_int32 (shape {tuple(cache_seqlens_int32.shape)})")
    if req_pool_indices.shape[0] != bs:
        raise ValueError(f"req_pool_indices has {req_pool_indices.shape[0]} elements, seq_lens {bs}")
    if req_to_token.dim() != 2:
        raise ValueError(f"req_to_token must be 2-D [pool, max_context], got shape {tuple(req_to_token.shape)}")
    if max_seq_pages * page_size > req_to_token.shape[1]:
        raise ValueError(f"max_seq_pages * page_size = {max_seq_pages} * {page_size} exceeds the "
                         f"{req_to_token.shape[1]} columns of req_to_token")
    for name, table in (("page_table", page_table), ("swa_page_table", swa_page_table)):
        if table is not None and (table.dim() != 2 or table.shape[0] < bs or table.shape[1] < max_seq_pages):
            raise ValueError(f"{name} must be 2-D with at least {bs} rows and {max_seq_pages} columns, "
                             f"got shape {tuple(table.shape)}")


def _inputs_ok(cache_seqlens_int32, cu_seqlens_k, page_table, req_to_token, req_pool_indices, seq_lens,
               max_seq_pages, seq_len_delta, page_size, swa_page_table, full_to_swa_index_mapping) -> bool:
    """The checks of :func:`_check_inputs` as one cheap predicate for the per-step happy path."""
    i32 = torch.int32
    if not (page_size.__class__ is int and page_size > 0 and not page_size & (page_size - 1)
            and max_seq_pages.__class__ is int and max_seq_pages >= 0
            and seq_len_delta.__class__ is int and _INT32_MIN <= seq_len_delta <= _INT32_MAX
            and cache_seqlens_int32.dtype is i32 and cu_seqlens_k.dtype is i32 and page_table.dtype is i32
            and req_to_token.dtype is i32 and seq_lens.dtype in _INDEX_DTYPES
            and req_pool_indices.dtype in _INDEX_DTYPES):
        return False
    try:  # shapes by unpacking: a wrong rank raises ValueError
        (bs,), (num_indices,) = seq_lens.shape, req_pool_indices.shape
        (table_rows, table_cols), (_, max_context) = page_table.shape, req_to_token.shape
    except ValueError:
        return False
    if cache_seqlens_int32.dim() == 1:  # one step
        if cu_seqlens_k.dim() != 1 or not (cache_seqlens_int32.is_contiguous() and cu_seqlens_k.is_contiguous()):
            return False
    elif not (cache_seqlens_int32.dim() == 2 and cu_seqlens_k.dim() == 2
              and 0 < cache_seqlens_int32.shape[0] == cu_seqlens_k.shape[0]
              and cache_seqlens_int32.stride(1) == 1 and cu_seqlens_k.stride(1) == 1):
        return False
    device = page_table.get_device()
    if not (num_indices == bs and cache_seqlens_int32.shape[-1] >= bs and cu_seqlens_k.shape[-1] > bs
            and table_rows >= bs and table_cols >= max_seq_pages and max_seq_pages * page_size <= max_context
            and seq_lens.is_contiguous() and req_pool_indices.is_contiguous()
            and cache_seqlens_int32.get_device() == device and cu_seqlens_k.get_device() == device
            and req_to_token.get_device() == device and req_pool_indices.get_device() == device
            and seq_lens.get_device() == device):
        return False
    if swa_page_table is None:
        return full_to_swa_index_mapping is None
    return (full_to_swa_index_mapping is not None and swa_page_table.dtype is i32
            and full_to_swa_index_mapping.dtype in _INDEX_DTYPES and full_to_swa_index_mapping.dim() == 1
            and full_to_swa_index_mapping.is_contiguous() and swa_page_table.dim() == 2
            and swa_page_table.size(0) >= bs and swa_page_table.size(1) >= max_seq_pages
            and swa_page_table.get_device() == device and full_to_swa_index_mapping.get_device() == device)


def _plan(max_seq_pages: int, page_size: int) -> tuple[int, int, int, int]:
    """(column blocks, log2(page_size), BLOCK_COLS, num_warps) for a page-table width."""
    block_cols = min(max(triton.next_power_of_2(max_seq_pages), 16), _MAX_BLOCK_COLS)
    return triton.cdiv(max_seq_pages, block_cols), page_size.bit_length() - 1, block_cols, 4 if block_cols >= 512 else 2


def fused_decode_metadata(
    cache_seqlens_int32: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    page_table: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    max_seq_pages: int,
    *,
    seq_len_delta: int = 0,
    page_size: int = 1,
    swa_page_table: torch.Tensor | None = None,
    full_to_swa_index_mapping: torch.Tensor | None = None,
) -> None:
    """Write decode metadata for ``bs = seq_lens.numel()`` sequences in one launch, in place.

    Exactly the torch sequence in the module docstring; every other output element is left
    untouched. No allocation and no host synchronization: capturable in a CUDA graph.

    Parameters
    ----------
    cache_seqlens_int32 : torch.Tensor
        int32 [>= bs], contiguous. Output: ``seq_lens + seq_len_delta``. Or int32
        [num_steps, >= bs] with contiguous rows: row s gets ``seq_lens + seq_len_delta + s``.
    cu_seqlens_k : torch.Tensor
        int32 [>= bs + 1], contiguous (or [num_steps, >= bs + 1], rows as above). Output: 0 then
        the running sum of the lengths.
    page_table : torch.Tensor
        int32 [>= bs, >= max_seq_pages], any strides. Output: page ids.
    req_to_token : torch.Tensor
        int32 [pool, max_context], any strides: token ids of each request slot.
    req_pool_indices : torch.Tensor
        int32 or int64 [bs], contiguous: each sequence's row of ``req_to_token``.
    seq_lens : torch.Tensor
        int32 or int64 [bs], contiguous.
    max_seq_pages : int
        Page-table columns to fill; ``max_seq_pages * page_size <= max_context``.
    seq_len_delta : int
        Added to every length (e.g. the draft tokens of speculative decoding).
    page_size : int
        A power of two.
    swa_page_table : torch.Tensor, optional
        int32 [>= bs, >= max_seq_pages], any strides. Output: sliding-window page ids.
    full_to_swa_index_mapping : torch.Tensor, optional
        int32 or int64 [num_tokens], contiguous, indexed by every token id read from the
        ``max_seq_pages`` columns (which must therefore lie in ``[0, num_tokens)``).

    Raises
    ------
    ValueError
        ``page_size`` not a power of two, ``max_seq_pages * page_size`` beyond ``req_to_token``,
        shapes too small, tensors on different devices, SWA arguments given alone.
    TypeError
        A tensor of the wrong dtype.
    """
    try:
        ok = _inputs_ok(cache_seqlens_int32, cu_seqlens_k, page_table, req_to_token, req_pool_indices, seq_lens,
                        max_seq_pages, seq_len_delta, page_size, swa_page_table, full_to_swa_index_mapping)
    except AttributeError:  # not a tensor
        ok = False
    if not ok:
        _check_inputs(cache_seqlens_int32, cu_seqlens_k, page_table, req_to_token, req_pool_indices, seq_lens,
                      max_seq_pages, seq_len_delta, page_size, swa_page_table, full_to_swa_index_mapping)
        raise ValueError("invalid inputs to fused_decode_metadata")  # _check_inputs names the problem first
    batch_size = seq_lens.size(0)
    plan = _PLANS.get((max_seq_pages, page_size))
    if plan is None:
        plan = _PLANS[(max_seq_pages, page_size)] = _plan(max_seq_pages, page_size)
    col_blocks, page_shift, block_cols, num_warps = plan
    r2t_row_stride, r2t_col_stride = req_to_token.stride()
    pt_row_stride, pt_col_stride = page_table.stride()
    if swa_page_table is None:
        swa_row_stride = swa_col_stride = 0
        swa_ptr = mapping_ptr = mapping_dtype = None
    else:
        swa_row_stride, swa_col_stride = swa_page_table.stride()
        swa_ptr, mapping_ptr = swa_page_table.data_ptr(), full_to_swa_index_mapping.data_ptr()
        mapping_dtype = full_to_swa_index_mapping.dtype
    grid = (batch_size, col_blocks + 1) if batch_size and max_seq_pages else (1, 1)
    # the kernel's last arguments, no tensors among them (constexprs positionally: a cheaper launch)
    if cache_seqlens_int32.dim() == 1:
        cache_step_stride = cu_step_stride = 0
        num_steps = 1
    else:
        num_steps, (cache_step_stride, cu_step_stride) = cache_seqlens_int32.size(0), (
            cache_seqlens_int32.stride(0), cu_seqlens_k.stride(0))
    tail = (swa_row_stride, swa_col_stride, cache_step_stride, cu_step_stride, batch_size, max_seq_pages,
            seq_len_delta, page_shift, num_steps, _BLOCK_BS, block_cols)
    _LAUNCH.launch_by_key(
        # everything Triton specializes this kernel on (see the decorator)
        (page_table.is_cuda, seq_lens.dtype, req_pool_indices.dtype, mapping_dtype, page_shift, num_steps, block_cols,
         num_warps),
        grid,
        (seq_lens.data_ptr(), req_pool_indices.data_ptr(), req_to_token.data_ptr(), r2t_row_stride, r2t_col_stride,
         mapping_ptr, cache_seqlens_int32.data_ptr(), cu_seqlens_k.data_ptr(), page_table.data_ptr(),
         pt_row_stride, pt_col_stride, swa_ptr, *tail),
        (seq_lens, req_pool_indices, req_to_token, r2t_row_stride, r2t_col_stride, full_to_swa_index_mapping,
         cache_seqlens_int32, cu_seqlens_k, page_table, pt_row_stride, pt_col_stride, swa_page_table, *tail),
        num_warps=num_warps,
    )


_LAUNCH = fast_launcher(_fused_decode_metadata_kernel)
