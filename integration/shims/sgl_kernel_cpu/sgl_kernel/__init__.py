"""TEST-ONLY stand-in for the CPU build of ``sgl_kernel`` (see ../README.md); never for production.

Only ``assign_req_to_token_pool_cpu`` works (plain torch). The names in ``IMPORT_ONLY`` and
``sgl_kernel.flash_attn``'s functions import but raise when called; any other name is missing.
"""

from __future__ import annotations

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


# Imported at module level by SGLang (0.5.9 / 0.5.23) on the CPU engine's import path; none is
# called when serving a plain decoder model, so each one only imports and raises when called.
IMPORT_ONLY = (
    "merge_state_v2",  # srt/layers/attention/flashattention_backend.py (0.5.9, 0.5.23), merge_state.py (0.5.9)
    "copy_all_layer_kv_cache_cpu",  # kernels/ops/kvcache/cache_move.py (0.5.23)
    # kernels/ops/speculative/{spec_tree,eagle,cache_locs,multi_layer_eagle}.py (0.5.23)
    "build_tree_kernel_efficient_cpu",
    "verify_tree_greedy_cpu",
    "fill_accept_out_cache_loc_cpu",
    "fill_bonus_tokens_cpu",
    "assign_draft_cache_locs_contiguous_cpu",
    "assign_extend_cache_locs_cpu",
    "rotate_input_ids_cpu",
)
globals().update({name: _unavailable(name) for name in IMPORT_ONLY})

def __getattr__(name: str):
    raise AttributeError(f"sgl_kernel.{name} is not provided by {STAND_IN}")
