"""Fused multi-target metadata copy: K fields into T targets in one launch.

The engine-neutral form of SGLang PR 17554 (``fused_metadata_copy_multi_cuda``): after the
metadata of a batch has been computed once, copy each field into the CUDA-graph buffers of T
consumers (e.g. the attention backends of T speculative draft steps)::

    for t in range(T):
        for k in range(K):
            dsts[t][k][:rows_k, :cols_k] = srcs[k][:rows_k, :cols_k]      # 1-D: [:n_k]

Each copy is described by one row of a small int64 device table (pointers, extents, row
strides, all in 4-byte words), so one launch serves any number of fields, targets and dtypes.
The table is built (and the arguments validated) on the first call for a given set of tensors
(addresses, dtypes, shapes, strides) and extents, and cached under that fingerprint: warm calls
only fingerprint the tensors, allocate nothing, never synchronize with the host and are
capturable in CUDA graphs (warm up once before capturing). Sources and targets are meant to be
persistent buffers: a call with tensors never seen before builds its table with one small
host-to-device copy (not capturable), and after 1024 distinct fingerprints tables are no
longer cached.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from attnplug.core._launch import fast_launcher

_BLOCK_WORDS = 1024
_MAX_PROGRAMS_PER_COPY = 64
_MAX_CACHED_TABLES = 1024  # beyond this, tables are built per call (never evicted: graphs may hold them)
_PREPARED: dict = {}  # _fingerprint(...) -> (copy table, grid)


@triton.jit
def _fused_metadata_copy_kernel(
    table_ptr,  # [num_copies, 6] int64: src address, dst address, rows, cols, src / dst row strides (words)
    BLOCK_WORDS: tl.constexpr,
):
    """Program (c, g) copies tiles g, g + G, ... of copy c; a tile is BLOCK_WORDS words of one row."""
    entry = table_ptr + tl.program_id(0) * 6
    src_ptr = tl.load(entry).to(tl.pointer_type(tl.int32))
    dst_ptr = tl.load(entry + 1).to(tl.pointer_type(tl.int32))
    rows = tl.load(entry + 2)
    cols = tl.load(entry + 3)
    stride_src_row = tl.load(entry + 4)
    stride_dst_row = tl.load(entry + 5)
    col_tiles = tl.cdiv(cols, BLOCK_WORDS)
    offs = tl.arange(0, BLOCK_WORDS)
    first_tile = tl.program_id(1).to(tl.int64)
    for tile in range(first_tile, rows * col_tiles, tl.num_programs(1).to(tl.int64)):
        row = tile // col_tiles
        cols_in_tile = (tile % col_tiles) * BLOCK_WORDS + offs  # [BLOCK_WORDS]
        in_row = cols_in_tile < cols
        words = tl.load(src_ptr + row * stride_src_row + cols_in_tile, mask=in_row)
        tl.store(dst_ptr + row * stride_dst_row + cols_in_tile, words, mask=in_row)


def _extent(size, src: torch.Tensor, field: int) -> tuple[int, int]:
    """(rows, cols) of field ``field`` from its ``sizes`` entry (None: the source's shape)."""
    if size is None:
        return (1, src.shape[0]) if src.dim() == 1 else (src.shape[0], src.shape[1])
    if src.dim() == 1:
        if size.__class__ is not int or size < 0:
            raise ValueError(f"sizes[{field}] must be a non-negative int for a 1-D field, got {size!r}")
        return 1, size
    if not isinstance(size, (tuple, list)) or len(size) != 2 or any(n.__class__ is not int or n < 0 for n in size):
        raise ValueError(f"sizes[{field}] must be a (rows, cols) pair of non-negative ints for a 2-D field, got {size!r}")
    return size[0], size[1]


def _check_tensor(tensor, src: torch.Tensor, rows: int, cols: int, device: int, what: str) -> None:
    """``tensor`` must match the field's source in dtype and rank, hold the extent, and be row-contiguous."""
    if tensor.dtype != src.dtype:
        raise TypeError(f"{what} is {tensor.dtype}, its source is {src.dtype}")
    if tensor.get_device() != device:
        raise ValueError(f"{what} is on {tensor.device}, srcs[0] on another device")
    if tensor.dim() != src.dim():
        raise ValueError(f"{what} is {tensor.dim()}-D, its source {src.dim()}-D")
    if tensor.dim() == 1:
        if cols > tensor.shape[0]:
            raise ValueError(f"extent {cols} exceeds {what} of shape {tuple(tensor.shape)}")
    elif rows > tensor.shape[0] or cols > tensor.shape[1]:
        raise ValueError(f"extent ({rows}, {cols}) exceeds {what} of shape {tuple(tensor.shape)}")
    if tensor.stride(-1) != 1 and tensor.shape[-1] > 1:
        raise ValueError(f"{what} must be contiguous along its last dimension, got strides {tensor.stride()}")


def _build_table(srcs, dsts, extents, device: torch.device) -> torch.Tensor:
    """The int64 [T * K, 6] copy table, in 4-byte words."""
    rows = []
    for targets in dsts:
        for src, dst, (n_rows, n_cols) in zip(srcs, targets, extents):
            words = src.element_size() // 4
            src_stride = src.stride(0) if src.dim() == 2 else 0
            dst_stride = dst.stride(0) if dst.dim() == 2 else 0
            rows.append([src.data_ptr(), dst.data_ptr(), n_rows, n_cols * words, src_stride * words, dst_stride * words])
    return torch.tensor(rows, dtype=torch.int64, device=device)


def fused_metadata_copy(
    srcs: Sequence[torch.Tensor],
    dsts: Sequence[Sequence[torch.Tensor]],
    sizes: Sequence | None = None,
) -> None:
    """Copy K source fields into each of T targets with one launch, in place.

    For every target t and field k: ``dsts[t][k][:rows, :cols] = srcs[k][:rows, :cols]``
    (1-D: ``[:n]``); all other elements are untouched.

    Parameters
    ----------
    srcs : sequence of torch.Tensor
        K tensors, each 1-D or 2-D, of a 4- or 8-byte dtype (int32, int64, float32, ...),
        contiguous along the last dimension; row strides are free.
    dsts : sequence of sequence of torch.Tensor
        T sequences of K tensors; ``dsts[t][k]`` has the dtype and rank of ``srcs[k]`` and at
        least its extent; row strides may differ from the source's.
    sizes : sequence, optional
        Per field the leading extent to copy: an int for a 1-D field, a (rows, cols) pair for a
        2-D one, None for the source's whole shape. Default: every source's shape.

    Raises
    ------
    TypeError
        A destination's dtype differs from its source's, or a dtype is not 4 or 8 bytes wide.
    ValueError
        Wrong counts, ranks, devices or layouts, or an extent larger than a tensor.
    """
    try:
        key = _fingerprint(srcs, dsts, sizes)
    except (AttributeError, TypeError):  # not tensors / not sequences: _prepare raises the clear error
        key = None
    prepared = _PREPARED.get(key) if key is not None else None
    if prepared is None:
        prepared = _prepare(srcs, dsts, sizes)  # validates; builds the copy table
        if prepared is not None and key is not None and len(_PREPARED) < _MAX_CACHED_TABLES:
            _PREPARED[key] = prepared
    if prepared is not None:
        table, grid = prepared
        _LAUNCH(grid, table, _BLOCK_WORDS, num_warps=4)


def _fingerprint(srcs, dsts, sizes):
    """Everything the validation and the copy table depend on: per tensor its address, dtype,
    shape and strides, plus the extents and the nesting; None if that is not hashable."""
    if sizes is not None:
        sizes = tuple(tuple(size) if size.__class__ is list else size for size in sizes)
    parts = [len(srcs), sizes]
    for tensor in srcs:
        parts += (tensor.data_ptr(), tensor.dtype, tensor.shape, tensor.stride())
    for targets in dsts:
        parts.append(len(targets))
        for tensor in targets:
            parts += (tensor.data_ptr(), tensor.dtype, tensor.shape, tensor.stride())
    key = tuple(parts)
    try:
        hash(key)
    except TypeError:  # e.g. an extent of another type: _prepare says what is wrong
        return None
    return key


def _prepare(srcs, dsts, sizes):
    """Validate; return (copy table, grid), or None when there is nothing to copy."""
    num_fields = len(srcs)
    if sizes is not None and len(sizes) != num_fields:
        raise ValueError(f"sizes has {len(sizes)} entries for {num_fields} fields")
    for t, targets in enumerate(dsts):
        if len(targets) != num_fields:
            raise ValueError(f"dsts[{t}] has {len(targets)} tensors for {num_fields} fields")
    if num_fields == 0 or len(dsts) == 0:
        return None
    for what, tensor in [(f"srcs[{k}]", src) for k, src in enumerate(srcs)] + [
            (f"dsts[{t}][{k}]", dst) for t, targets in enumerate(dsts) for k, dst in enumerate(targets)]:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{what} must be a torch.Tensor, got {type(tensor).__name__}")
    device = srcs[0].get_device()
    extents = []
    for k, src in enumerate(srcs):
        if src.dim() not in (1, 2):
            raise ValueError(f"srcs[{k}] must be 1-D or 2-D, got shape {tuple(src.shape)}")
        if src.element_size() not in (4, 8):
            raise TypeError(f"srcs[{k}] is {src.dtype}; fused_metadata_copy copies 4- and 8-byte dtypes")
        n_rows, n_cols = _extent(None if sizes is None else sizes[k], src, k)
        _check_tensor(src, src, n_rows, n_cols, device, f"srcs[{k}]")
        extents.append((n_rows, n_cols))
    for t, targets in enumerate(dsts):
        for k, (src, dst, (n_rows, n_cols)) in enumerate(zip(srcs, targets, extents)):
            _check_tensor(dst, src, n_rows, n_cols, device, f"dsts[{t}][{k}]")
    table = _build_table(srcs, dsts, extents, srcs[0].device)
    # A tile is one row's BLOCK_WORDS words; each program walks its copy's tiles one after another.
    max_tiles = max(n_rows * triton.cdiv(n_cols * (src.element_size() // 4), _BLOCK_WORDS)
                    for src, (n_rows, n_cols) in zip(srcs, extents))
    programs_per_copy = max(1, min(max_tiles, _MAX_PROGRAMS_PER_COPY))
    return table, (len(dsts) * num_fields, programs_per_copy)


_LAUNCH = fast_launcher(_fused_metadata_copy_kernel)
