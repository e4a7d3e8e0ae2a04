"""TEST-ONLY stand-in for the CPU build of ``sgl_kernel`` (see ../README.md); never for production.

Implemented in plain torch (correctness over speed; each matches what SGLang 0.5.23's Triton/CUDA
version computes, with the signature SGLang's CPU branch calls it with):

- ``assign_req_to_token_pool_cpu``: what the CPU engine needs to serve at all;
- ``copy_all_layer_kv_cache_cpu``: KV row moves inside every layer buffer (the KV pool's
  ``move_kv_cache``: once at start-up when speculative decoding is on, then after each verify of
  a tree (topk > 1) or NGRAM draft);
- the speculative-decoding ops ``assign_draft_cache_locs_contiguous_cpu``,
  ``assign_extend_cache_locs_cpu``, ``build_tree_kernel_efficient_cpu``,
  ``verify_tree_greedy_cpu``, ``fill_accept_out_cache_loc_cpu``, ``fill_bonus_tokens_cpu`` and
  ``rotate_input_ids_cpu``;
- ``sgl_kernel.speculative.reconstruct_indices_from_tree_mask`` (NGRAM's verify tree; a submodule
  made here, in ``sys.modules``).

The names in ``IMPORT_ONLY`` and ``sgl_kernel.flash_attn``'s functions import but raise when
called; any other name is missing.
"""

from __future__ import annotations

import ctypes
import sys
import types

import torch

STAND_IN = "the test-only sgl_kernel CPU stand-in (integration/shims/sgl_kernel_cpu)"


def _unavailable(name: str):
    def call(*args, **kwargs):
        raise NotImplementedError(f"sgl_kernel.{name} is not available in {STAND_IN}: it only imports")

    call.__name__ = name
    call.__qualname__ = name
    return call


def assign_req_to_token_pool_cpu(
    req_pool_indices: torch.Tensor,
    req_to_token: torch.Tensor,
    start_offset: torch.Tensor,
    end_offset: torch.Tensor,
    out_cache_loc: torch.Tensor,
    pool_len: int,
) -> None:
    """``req_to_token[req_pool_indices[i], start[i]:end[i]] = `` request ``i``'s run of ``out_cache_loc``.

    The runs of ``out_cache_loc`` are consecutive, in request order (what SGLang's Triton
    ``assign_req_to_token_pool`` kernel and the CPU library compute). ``pool_len`` is
    ``req_to_token.shape[1]``.
    """
    if pool_len != req_to_token.shape[1]:
        raise ValueError(f"pool_len ({pool_len}) must equal req_to_token.shape[1] ({req_to_token.shape[1]})")
    offset = 0
    for row, start, end in zip(req_pool_indices.tolist(), start_offset.tolist(), end_offset.tolist()):
        length = end - start
        req_to_token[row, start:end] = out_cache_loc[offset:offset + length].to(req_to_token.dtype)
        offset += length


def _byte_rows(address: int, row_bytes: int, num_rows: int) -> torch.Tensor:
    """A ``[num_rows, row_bytes]`` uint8 view of the memory at ``address`` (no copy)."""
    storage = (ctypes.c_uint8 * (row_bytes * num_rows)).from_address(address)
    return torch.frombuffer(storage, dtype=torch.uint8).view(num_rows, row_bytes)


def copy_all_layer_kv_cache_cpu(
    data_ptrs: torch.Tensor,
    strides: torch.Tensor,
    tgt_loc: torch.Tensor,
    src_loc: torch.Tensor,
) -> None:
    """For every buffer ``b``: ``buf_b[tgt_loc[i], :] = buf_b[src_loc[i], :]`` (whole slot rows).

    ``data_ptrs[b]`` is buffer ``b``'s base address (uint64) and ``strides[b]`` its bytes per slot
    row (also the number of bytes copied), as in SGLang's Triton ``copy_all_layer_kv_cache_tiled``.
    All source rows are read before any target row is written (safe when the two overlap).
    """
    if tgt_loc.numel() != src_loc.numel():
        raise ValueError(f"tgt_loc ({tgt_loc.numel()}) and src_loc ({src_loc.numel()}) differ in length")
    if tgt_loc.numel() == 0 or data_ptrs.numel() == 0:
        return
    tgt = tgt_loc.reshape(-1).to(torch.int64)
    src = src_loc.reshape(-1).to(torch.int64)
    num_rows = int(torch.maximum(tgt.max(), src.max())) + 1
    for address, row_bytes in zip(data_ptrs.tolist(), strides.tolist()):
        rows = _byte_rows(int(address), int(row_bytes), num_rows)
        rows[tgt] = rows[src]  # advanced indexing gathers (a copy) before the scatter


def assign_draft_cache_locs_contiguous_cpu(
    req_pool_indices: torch.Tensor,
    req_to_token: torch.Tensor,
    seq_lens: torch.Tensor,
    out_cache_loc: torch.Tensor,
    pool_len: int,
    topk: int,
    num_steps: int,
) -> None:
    """``out_cache_loc[i*n:(i+1)*n] = req_to_token[req_pool_indices[i], seq_lens[i]:seq_lens[i]+n]``.

    ``n = topk * num_steps``: each request's draft slots, already allocated in its row (SGLang's
    Triton ``assign_draft_cache_locs_contiguous`` without positions). ``pool_len`` is
    ``req_to_token.shape[1]``.
    """
    if pool_len != req_to_token.shape[1]:
        raise ValueError(f"pool_len ({pool_len}) must equal req_to_token.shape[1] ({req_to_token.shape[1]})")
    copy_len = topk * num_steps
    bs = req_pool_indices.numel()
    if out_cache_loc.numel() != bs * copy_len:
        raise ValueError(f"out_cache_loc has {out_cache_loc.numel()} entries, expected {bs} * {copy_len}")
    if bs == 0:
        return
    cols = seq_lens.reshape(-1, 1).to(torch.int64) + torch.arange(copy_len, device=seq_lens.device)
    rows = req_pool_indices.reshape(-1, 1).to(torch.int64)
    out_cache_loc.view(bs, copy_len).copy_(req_to_token[rows, cols].to(out_cache_loc.dtype))


def assign_extend_cache_locs_cpu(
    req_pool_indices: torch.Tensor,
    req_to_token: torch.Tensor,
    start_offset: torch.Tensor,
    end_offset: torch.Tensor,
    out_cache_loc: torch.Tensor,
    pool_len: int,
) -> None:
    """``out_cache_loc`` = the runs ``req_to_token[req_pool_indices[i], start[i]:end[i]]``, concatenated.

    The runs are consecutive in request order, from ``out_cache_loc[0]`` on (SGLang's Triton
    ``assign_extend_cache_locs``); entries after the last run are left as they are.
    ``pool_len`` is ``req_to_token.shape[1]``.
    """
    if pool_len != req_to_token.shape[1]:
        raise ValueError(f"pool_len ({pool_len}) must equal req_to_token.shape[1] ({req_to_token.shape[1]})")
    start = start_offset.reshape(-1).to(torch.int64)
    lengths = end_offset.reshape(-1).to(torch.int64) - start
    total = int(lengths.sum()) if lengths.numel() else 0
    if total == 0:
        return
    request = torch.repeat_interleave(torch.arange(lengths.numel(), device=start.device), lengths)
    run_begin = torch.cumsum(lengths, 0) - lengths
    cols = start[request] + torch.arange(total, device=start.device) - run_begin[request]
    rows = req_pool_indices.reshape(-1).to(torch.int64)[request]
    out_cache_loc.view(-1)[:total] = req_to_token[rows, cols].to(out_cache_loc.dtype)


def fill_bonus_tokens_cpu(
    accept_tokens: torch.Tensor,
    accept_lens: torch.Tensor,
    bonus_tokens: torch.Tensor,
    accept_stride: int,
) -> None:
    """``bonus_tokens[i] = accept_tokens.flatten()[accept_stride * i + accept_lens[i] - 1]``.

    Each request's last accepted token (``accept_lens`` counts the bonus token), as SGLang's Triton
    ``fill_bonus_tokens``.
    """
    bs = accept_lens.numel()
    if bs == 0:
        return
    index = accept_stride * torch.arange(bs, device=accept_lens.device) + accept_lens.reshape(-1).to(torch.int64) - 1
    bonus_tokens.view(-1).copy_(accept_tokens.reshape(-1)[index].to(bonus_tokens.dtype))


def fill_accept_out_cache_loc_cpu(
    accept_index: torch.Tensor,
    out_cache_loc: torch.Tensor,
    accept_out_cache_loc: torch.Tensor,
    size: int | None = None,
) -> None:
    """Pack ``out_cache_loc[j]`` for every ``j`` in (the first ``size`` of) ``accept_index`` that is not -1.

    In order, from ``accept_out_cache_loc[0]`` on; later entries are left as they are (SGLang's
    Triton ``fill_accept_out_cache_loc``, whose grid is ``size``; SGLang's CPU branch passes no
    ``size``, meaning all of ``accept_index``).
    """
    index = accept_index.reshape(-1)
    if size is not None:
        index = index[:size]
    index = index[index != -1].to(torch.int64)
    accept_out_cache_loc.view(-1)[:index.numel()] = out_cache_loc.reshape(-1)[index].to(accept_out_cache_loc.dtype)


def _first_match(table: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row ``b``: the first column ``c`` with ``table[b, c] == value[b]``, and whether there is one."""
    hits = table == value.reshape(-1, 1)
    found = hits.any(dim=1)
    return hits.to(torch.int8).argmax(dim=1), found


def build_tree_kernel_efficient_cpu(
    parent_list: torch.Tensor,
    selected_index: torch.Tensor,
    verified_seq_len: torch.Tensor,
    tree_mask: torch.Tensor,
    positions: torch.Tensor,
    retrive_index: torch.Tensor,
    retrive_next_token: torch.Tensor,
    retrive_next_sibling: torch.Tensor,
    topk: int,
    depth: int,
    draft_token_num: int,
    tree_mask_mode: int,
) -> None:
    """Build each request's EAGLE draft tree from the draft's top-k choices (in place).

    As SGLang's CUDA ``build_tree_efficient`` (sglang/kernels/jit/include/sgl_kernel/speculative/
    eagle.cuh): ``retrive_index[b, i] = b*n + i``; ``retrive_next_token`` / ``retrive_next_sibling``
    (first child / next sibling, -1 for none; the caller fills them with -1) link every token to
    its parent, the one whose ``selected_index`` entry is ``parent_list[b, selected_index[b, i-1] //
    topk]`` (index 0, the verified token, when that quotient is 0); ``positions`` = ``seq_len`` +
    depth in the tree; ``tree_mask`` marks each token's ancestors and itself, in the layout of
    ``tree_mask_mode``: 0 FULL_MASK (rows of ``seq_len + n`` columns, only the tree part written),
    1 QLEN_ONLY (``n x n`` per request), 2 QLEN_ONLY_BITPACKING (one bit per column, little-endian,
    ``1``/``2``/``4`` bytes per row).
    """
    n = draft_token_num
    bs = verified_seq_len.numel()
    if bs == 0:
        return
    if tree_mask_mode not in (0, 1, 2):
        raise ValueError(f"tree_mask_mode must be 0, 1 or 2, got {tree_mask_mode}")
    device = verified_seq_len.device
    batch = torch.arange(bs, device=device)
    seq_len = verified_seq_len.reshape(-1).to(torch.int64)
    parents = parent_list.reshape(bs, -1).to(torch.int64)
    selected = selected_index.reshape(bs, -1)[:, : n - 1].to(torch.int64)
    next_token = retrive_next_token.view(bs, n)
    next_sibling = retrive_next_sibling.view(bs, n)

    def parent_of(column: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For tree tokens ``column + 1``: is the parent the root, its column (if not), found."""
        parent_tb = selected[batch, column] // topk
        at_root = parent_tb == 0
        parent_token = parents[batch, parent_tb.clamp(max=max(parents.shape[1] - 1, 0))] if parents.shape[1] else parent_tb
        match, found = _first_match(selected, parent_token)
        return at_root, match, found | at_root

    # Links: children are pushed in decreasing order, so each list ends up in increasing order.
    retrive_index.view(bs, n).copy_(batch.reshape(-1, 1) * n + torch.arange(n, device=device))
    for i in range(n - 1, 0, -1):
        at_root, match, found = parent_of(torch.full((bs,), i - 1, dtype=torch.int64, device=device))
        parent_position = torch.where(at_root, 0, match + 1)
        rows, parent_position = batch[found], parent_position[found]  # an orphan (invalid tree) is skipped
        previous = next_token[rows, parent_position].clone()
        next_token[rows, parent_position] = i
        had_child = previous != -1
        next_sibling[rows[had_child], i] = previous[had_child]

    # Mask rows and positions: walk from each token up to the root.
    if tree_mask_mode == 0:
        request_base = n * n * batch + n * (torch.cumsum(seq_len, 0) - seq_len)
        row_start = lambda tid: request_base + (seq_len + n) * tid + seq_len  # noqa: E731
    else:
        row_start = lambda tid: (batch * n + tid) * n  # noqa: E731
    bytes_per_row = 4 if n > 16 else (2 if n > 8 else 1)
    mask_bytes = tree_mask.view(-1).view(torch.uint8) if tree_mask_mode == 2 else None
    flat_positions = positions.view(bs, n)
    flat_positions[:, 0] = seq_len
    for tid in range(n):
        if tree_mask_mode == 2:
            item = (batch * n + tid) * bytes_per_row
            mask_bytes[item] = 1  # the root bit; the rest of the first byte cleared, as the CUDA kernel
        else:
            start = row_start(tid)
            cols = start.reshape(-1, 1) + torch.arange(n, device=device)
            tree_mask.view(-1)[cols] = False
            tree_mask.view(-1)[start] = True
        if tid == 0:
            continue
        column = torch.full((bs,), tid - 1, dtype=torch.int64, device=device)
        active = torch.ones(bs, dtype=torch.bool, device=device)
        depth_of = torch.zeros(bs, dtype=torch.int64, device=device)
        for _ in range(n):
            if not bool(active.any()):
                break
            depth_of += active.to(torch.int64)
            if tree_mask_mode == 2:
                item = (batch * n + tid) * bytes_per_row + (column + 1) // 8
                bit = torch.bitwise_left_shift(torch.ones_like(column), (column + 1) % 8).to(torch.uint8)
                mask_bytes[item[active]] |= bit[active]
            else:
                tree_mask.view(-1)[(row_start(tid) + column + 1)[active]] = True
            at_root, match, found = parent_of(column)
            active = active & ~at_root & found
            column = torch.where(active, match, column)
        flat_positions[:, tid] = depth_of + seq_len


def verify_tree_greedy_cpu(
    predicts: torch.Tensor,
    accept_index: torch.Tensor,
    accept_token_num: torch.Tensor,
    candidates: torch.Tensor,
    retrive_index: torch.Tensor,
    retrive_next_token: torch.Tensor,
    retrive_next_sibling: torch.Tensor,
    target_predict: torch.Tensor,
) -> None:
    """Greedy tree verification, in place (SGLang's CUDA ``VerifyTreeGreedy``).

    Per request ``b``, from the root: among the children of the last accepted node (first child
    ``retrive_next_token``, then ``retrive_next_sibling``), accept the first whose
    ``candidates`` token equals ``target_predict`` at the last accepted node; stop when none does or
    after ``accept_index.shape[1] - 1`` accepts. Writes ``accept_index[b, 0..k]`` (flat indices of
    the root and the accepted nodes), ``accept_token_num[b] = k``, and ``predicts[node] =
    target_predict[node]`` for every accepted node and the last one's successor token.
    """
    bs, num_draft = candidates.shape
    num_spec = accept_index.shape[1]
    if bs == 0:
        return
    device = candidates.device
    batch = torch.arange(bs, device=device)
    flat_target = target_predict.reshape(-1)
    flat_predicts = predicts.view(-1)
    last = retrive_index[:, 0].to(torch.int64).clone()
    accept_index[:, 0] = last.to(accept_index.dtype)
    accepted = torch.zeros(bs, dtype=torch.int64, device=device)
    cursor = torch.zeros(bs, dtype=torch.int64, device=device)
    active = torch.ones(bs, dtype=torch.bool, device=device)
    for _ in range(1, num_spec):
        cursor = torch.where(active, retrive_next_token[batch, cursor], cursor)
        searching = active & (cursor != -1)
        matched = torch.zeros(bs, dtype=torch.bool, device=device)
        target_token = flat_target[last]
        for _ in range(num_draft):
            if not bool(searching.any()):
                break
            safe = cursor.clamp(min=0)
            hit = searching & (candidates[batch, safe] == target_token)
            matched |= hit
            searching = searching & ~hit
            cursor = torch.where(searching, retrive_next_sibling[batch, safe], cursor)
            searching = searching & (cursor != -1)
        draft_index = retrive_index[batch, cursor.clamp(min=0)].to(torch.int64)
        rows = batch[matched]
        flat_predicts[last[matched]] = target_token[matched].to(predicts.dtype)
        accepted = accepted + matched.to(torch.int64)
        accept_index[rows, accepted[matched]] = draft_index[matched].to(accept_index.dtype)
        last = torch.where(matched, draft_index, last)
        active = matched
        if not bool(active.any()):
            break
    accept_token_num.view(-1).copy_(accepted.to(accept_token_num.dtype))
    flat_predicts[last] = flat_target[last].to(predicts.dtype)


def rotate_input_ids_cpu(
    input_ids: torch.Tensor,
    extend_start_loc: torch.Tensor,
    extend_seq_lens: torch.Tensor,
    topk_index: torch.Tensor,
    select_index: torch.Tensor | None = None,
) -> None:
    """Per request ``i``: shift its run ``input_ids[start:start+len]`` left by one, then write ``topk_index[i]``.

    The new token goes to ``input_ids[select_index[i]]`` when given, else to the run's last slot
    (SGLang's Triton ``rotate_input_ids_kernel``); requests with ``len == 0`` are left alone.
    """
    start = extend_start_loc.reshape(-1).to(torch.int64)
    lengths = extend_seq_lens.reshape(-1).to(torch.int64)
    bs = lengths.numel()
    if bs == 0:
        return
    shift = (lengths - 1).clamp(min=0)
    total = int(shift.sum())
    if total:
        request = torch.repeat_interleave(torch.arange(bs, device=start.device), shift)
        run_begin = torch.cumsum(shift, 0) - shift
        dst = start[request] + torch.arange(total, device=start.device) - run_begin[request]
        input_ids[dst] = input_ids[dst + 1]  # gathers before it scatters
    live = lengths > 0
    last = select_index.reshape(-1).to(torch.int64) if select_index is not None else start + lengths - 1
    input_ids[last[live]] = topk_index.reshape(-1)[live].to(input_ids.dtype)


def reconstruct_indices_from_tree_mask(
    tree_mask: torch.Tensor,
    verified_seq_len: torch.Tensor,
    positions: torch.Tensor,
    retrive_index: torch.Tensor,
    retrive_next_token: torch.Tensor,
    retrive_next_sibling: torch.Tensor,
    batch_size: int,
    draft_token_num: int,
) -> None:
    """NGRAM: a draft tree's links and positions from its ``n x n`` ancestor mask (in place).

    As SGLang's ``reconstruct_indices_from_tree_mask`` (its Triton twin in
    sglang/kernels/ops/speculative/reconstruct_tree.py): with ``anc[i, j] = mask[b, i, j] & (j < i)``,
    ``positions = #anc[i, :] + verified_seq_len[b]``, ``retrive_index = b*n + i``, first child
    ``= min{k > i : anc[k, i]}``, next sibling ``= min{k > i : parent[k] == parent[i]}`` where
    ``parent[i] = max{j : anc[i, j]}`` (-1 for none, and no sibling when ``parent[i] == -1``).
    """
    n, bs = draft_token_num, batch_size
    if bs == 0:
        return
    device = verified_seq_len.device
    idx = torch.arange(n, device=device)
    mask = tree_mask.reshape(-1)[: bs * n * n].view(bs, n, n).to(torch.bool)
    anc = mask & (idx.view(1, 1, n) < idx.view(1, n, 1))  # [b, i (row), j (col)]
    positions.view(bs, n).copy_(anc.sum(-1) + verified_seq_len.reshape(-1, 1).to(torch.int64))
    retrive_index.view(bs, n).copy_(torch.arange(bs, device=device).view(-1, 1) * n + idx)
    parent = torch.where(anc, idx.view(1, 1, n), -1).amax(-1)  # [b, i]
    rows = idx.view(1, n, 1).expand(bs, n, n)
    first_child = torch.where(anc, rows, n).amin(1)  # over rows k, per column i
    retrive_next_token.view(bs, n).copy_(torch.where(first_child < n, first_child, -1))
    same_parent = (parent.unsqueeze(2) == parent.unsqueeze(1)) & (idx.view(1, n, 1) > idx.view(1, 1, n))
    first_sibling = torch.where(same_parent, rows, n).amin(1)
    retrive_next_sibling.view(bs, n).copy_(torch.where((parent >= 0) & (first_sibling < n), first_sibling, -1))


# ``from sgl_kernel.speculative import reconstruct_indices_from_tree_mask`` (reconstruct_tree.py, 0.5.23)
speculative = types.ModuleType(f"{__name__}.speculative", "NGRAM ops of " + STAND_IN)
speculative.reconstruct_indices_from_tree_mask = reconstruct_indices_from_tree_mask
sys.modules[speculative.__name__] = speculative


# Imported at module level by SGLang (0.5.9 / 0.5.23) on the CPU engine's import path but never
# called when serving a decoder model here (with or without speculative decoding), so each one
# only imports and raises when called.
IMPORT_ONLY = (
    "merge_state_v2",  # srt/layers/attention/flashattention_backend.py (0.5.9, 0.5.23), merge_state.py (0.5.9)
)
globals().update({name: _unavailable(name) for name in IMPORT_ONLY})


def __getattr__(name: str):
    raise AttributeError(f"sgl_kernel.{name} is not provided by {STAND_IN}")
