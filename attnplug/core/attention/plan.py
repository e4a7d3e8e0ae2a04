"""Once-per-batch planning for ``paged_attention``: split-KV decision, tile rules, workspace.

The plan reads only host integers (never ``seq_lens`` or ``query_start_loc`` on the device), so
planning never synchronises and can run inside CUDA-graph capture. The only split-KV decision on
the host is ``num_segments``: the most KV segments any decode-like sequence is cut into. Each
sequence derives its own segment length on the device from its own length, so short sequences use
fewer segments (see ``kernels._decode_segment_layout``).

"Decode-like" sequences are plain decodes (one query token) and speculative-decoding verify
sequences (``1 + k`` query tokens over the same KV): up to ``max_decode_query_len`` query tokens
each, all of them served by the split-KV kernel, which packs (query token, q head) pairs of one
GQA group into the rows of one tile so that every KV page is still read once per kv head.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import triton

# Decode (3D) kernel tile rule: KV tokens per loop step, the shortest segment in tiles, launch options.
# Chosen on the H100 from a sweep of tile rules x segment counts over the decode grid
# (benchmarks/results/paged_attention.md): with the right segment count, 64-token tiles in 3
# stages came within ~1 % of the best rule on average; 128-token segments help tiny batches.
DECODE_TILE_N = 64
MIN_SEGMENT_TILES = 2  # no segment shorter than 128 tokens
DECODE_NUM_WARPS = 4
DECODE_NUM_STAGES = 3
# FP8 KV tiles hold half the bytes: 5 stages keep about as many bytes in flight as 3 of bf16 (H200 sweep,
# benchmarks/results/h200/fp8/tile_sweep_v_in_registers.csv: 4-8 % faster than 3 stages for decodes).
FP8_DECODE_NUM_STAGES = 5
# Default split-KV heuristic (a wave model fitted to the H100 sweep): this many decode programs
# stream concurrently per SM, and each costs about this many KV tokens' worth of fixed work.
RESIDENT_PROGRAMS_PER_SM = 4
SEGMENT_OVERHEAD_TOKENS = 64
MAX_WAVES = 64
SPLIT_COST_MARGIN = 0.02
MAX_SEGMENTS_PER_SEQ = 128
# Decode-like sequences: the most query tokens each (speculative verify: 1 + draft tokens), and the
# most (query token, q head) rows one decode program serves before the queries are cut into blocks.
MAX_DECODE_QUERY_LEN = 16
DECODE_MAX_ROWS = 64
# Their kernel (causal mask inside the draft block) needs more registers: with 3 stages it fell to
# 3 programs per SM (164 registers) and ran 1.33x slower than a decode; 2 stages (114 registers),
# and for tiles of more than 16 rows a cap of 128 registers, keep 4 programs per SM (measured on
# the H200: benchmarks/results/verify_kernel_options.csv).
VERIFY_NUM_STAGES = 2
VERIFY_MAX_REGISTERS = 128
# Reduction: partial outputs merged per step.
SEGMENT_BLOCK = 16
# Prefill (2D) kernel tile rules.
PREFILL_BLOCK_M = 64
PREFILL_TILE_N = 64
PREFILL_NUM_WARPS = 4
PREFILL_NUM_STAGES = 3
# Default workspace capacity in (sequence, segment) slots, beyond one slot per sequence.
DEFAULT_MAX_TOTAL_SEGMENTS = 2048


@dataclass(frozen=True)
class SplitKVProblem:
    """Host facts a split-KV policy decides from (all plain ints; nothing on the device).

    Attributes
    ----------
    num_decodes : int
        Decode-like sequences in the batch (decodes and verify sequences).
    max_seqlen_k : int
        Longest KV length in the batch (an upper bound is fine).
    num_q_heads, num_kv_heads, head_size, page_size : int
        Head layout and KV page size.
    num_sms : int
        Streaming multiprocessors of the device.
    min_segment_len : int
        KV tokens below which the kernel never cuts a segment (a sequence of length ``n`` gets at
        most ``ceil(n / min_segment_len)`` segments, whatever the policy says).
    max_segments : int
        The most segments per sequence the plan can honour (kernel limit and workspace capacity).
    max_decode_query_len : int
        Most query tokens of a decode-like sequence (1: plain decodes only).
    query_blocks : int
        Programs per (sequence, kv head, segment): the query rows of one GQA group split into this
        many tiles (1 unless ``max_decode_query_len x`` the group exceeds one tile).
    """

    num_decodes: int
    max_seqlen_k: int
    num_q_heads: int
    num_kv_heads: int
    head_size: int
    page_size: int
    num_sms: int
    min_segment_len: int
    max_segments: int
    max_decode_query_len: int = 1
    query_blocks: int = 1


SplitKVPolicy = Callable[[SplitKVProblem], Optional[int]]


def default_split_kv_policy(problem: SplitKVProblem) -> int:
    """The default number of KV segments per decode-like sequence.

    A split-KV policy returns the **maximum number of KV segments each decode-like sequence is cut
    into** (``1`` = no split: one program per (sequence, kv head), no reduction launch). The decode
    grid is ``num_decodes x num_kv_heads x query_blocks x segments``; each sequence then splits its
    own KV into
    ``min(segments, ceil(len / min_segment_len))`` near-equal segments on the device. Values are
    clamped to ``[1, problem.max_segments]``; a policy may return None to defer to this default.

    This default uses a wave model: ``RESIDENT_PROGRAMS_PER_SM * num_sms`` programs stream at a
    time, and a wave costs one segment's length plus ``SEGMENT_OVERHEAD_TOKENS``. It picks the
    segment count ``S`` that minimises ``waves(S) * (ceil(max_seqlen_k / S) + overhead)``, so small
    batches split far (the GPU fills at any batch size, no threshold) and wave quantisation is
    avoided (e.g. 24 x 8 programs on 132 SMs split 11 ways, not 3). Within one wave count, more
    segments only shorten the wave, so only the largest ``S`` of each wave count is a candidate.
    """
    programs = max(problem.num_decodes * problem.num_kv_heads * problem.query_blocks, 1)
    slots = max(problem.num_sms * RESIDENT_PROGRAMS_PER_SM, 1)
    longest = max(problem.max_seqlen_k, 1)
    most = max(1, min(problem.max_segments, -(-longest // problem.min_segment_len)))
    costs = {}  # segments -> modelled time
    for waves in range(1, MAX_WAVES + 1):
        segments = max(1, min(most, waves * slots // programs))
        costs[segments] = -(-programs * segments // slots) * (-(-longest // segments) + SEGMENT_OVERHEAD_TOKENS)
        if segments == most:
            break
    # fewest segments within a small margin of the best (less reduction work for no real gain)
    good_enough = min(costs.values()) * (1 + SPLIT_COST_MARGIN)
    return min(segments for segments, cost in costs.items() if cost <= good_enough)


@functools.lru_cache(maxsize=None)
def _num_sms(device_type: str, device_index: Optional[int]) -> int:
    if device_type == "cuda":
        index = torch.cuda.current_device() if device_index is None else device_index
        return torch.cuda.get_device_properties(index).multi_processor_count
    return 4  # CPU (Triton interpreter): small, so that tests see split and unsplit decode


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (cached per device; 4 stands in for a CPU)."""
    return _num_sms(device.type, device.index)


class AttentionWorkspace:
    """Scratch for split-KV decode, allocated once for a maximum batch and reused by every plan.

    Holds ``max_total_segments`` (sequence, segment) slots of partial outputs, each with room for
    ``max_decode_query_len`` query tokens. With a workspace, ``plan_attention`` and
    ``paged_attention`` allocate nothing (CUDA-graph capturable).

    Attributes
    ----------
    segment_out : torch.Tensor
        float32 ``[max_total_segments, max_decode_query_len, num_q_heads, head_size]`` normalised
        partial outputs.
    segment_lse : torch.Tensor
        float32 ``[max_total_segments, max_decode_query_len, num_q_heads]`` their log2-sum-exp.
    max_num_seqs, max_num_tokens : int
        Largest batch (sequences, query tokens) the owner promised to run with it.
    """

    def __init__(self, segment_out: torch.Tensor, segment_lse: torch.Tensor, max_num_seqs: int, max_num_tokens: int):
        self.segment_out = segment_out
        self.segment_lse = segment_lse
        self.max_num_seqs = max_num_seqs
        self.max_num_tokens = max_num_tokens

    @property
    def max_total_segments(self) -> int:
        return self.segment_lse.shape[0]

    @property
    def max_decode_query_len(self) -> int:
        return self.segment_lse.shape[1]

    @classmethod
    def allocate(
        cls,
        max_num_seqs: int,
        max_num_tokens: int,
        num_q_heads: int,
        head_size: int,
        *,
        device,
        max_total_segments: Optional[int] = None,
        max_decode_query_len: int = 1,
    ) -> "AttentionWorkspace":
        """Allocate scratch for batches of up to ``max_num_seqs`` sequences / ``max_num_tokens`` tokens.

        ``max_decode_query_len`` is the most query tokens a decode-like sequence of the plans will
        have (``1 + num_speculative_tokens`` with speculative decoding). ``max_total_segments``
        (default ``max_num_seqs + 2048``) bounds the memory: ``max_total_segments *
        max_decode_query_len * num_q_heads * (head_size + 1) * 4`` bytes. Plans clamp their segments
        per sequence to ``max_total_segments // num_decodes``.
        """
        _check_positive(max_num_seqs=max_num_seqs, max_num_tokens=max_num_tokens, num_q_heads=num_q_heads,
                        head_size=head_size)
        _check_decode_query_len(max_decode_query_len)
        if max_total_segments is None:
            max_total_segments = max_num_seqs + DEFAULT_MAX_TOTAL_SEGMENTS
        if max_total_segments < max_num_seqs:
            raise ValueError(f"max_total_segments ({max_total_segments}) must be >= max_num_seqs ({max_num_seqs})")
        shape = (max_total_segments, max_decode_query_len, num_q_heads)
        segment_out = torch.empty(*shape, head_size, dtype=torch.float32, device=device)
        segment_lse = torch.empty(*shape, dtype=torch.float32, device=device)
        return cls(segment_out, segment_lse, max_num_seqs, max_num_tokens)


@dataclass(frozen=True)
class AttentionPlan:
    """Everything ``paged_attention`` needs that does not change from layer to layer.

    Sequences ``[0, num_decodes)`` are decode-like (3D split-KV kernel + reduction), the rest
    prefills (2D kernel). Built by ``plan_attention``; treat it as opaque.
    """

    query_start_loc: torch.Tensor  # int32 [num_seqs + 1], device
    seq_lens: torch.Tensor  # int32 [num_seqs], device
    num_seqs: int
    num_decodes: int
    max_decode_query_len: int  # most query tokens of a decode-like sequence
    num_q_heads: int
    num_kv_heads: int
    head_size: int
    page_size: int
    max_seqlen_q: int
    max_seqlen_k: int
    num_segments: int  # KV segments per decode-like sequence (1: no split, no reduction)
    segment_out: Optional[torch.Tensor]  # float32 [>= num_decodes * num_segments, query slots, num_q_heads, head_size]
    segment_lse: Optional[torch.Tensor]  # float32 [>= num_decodes * num_segments, query slots, num_q_heads]
    max_num_tokens: Optional[int]  # from the workspace, checked against q
    decode_grid: tuple
    reduce_grid: tuple
    # Per kernel: the constexprs the plan fixes, in the kernel's parameter order (they lead its
    # constexprs and are passed positionally: a cheaper launch), and the launch options.
    decode_constexprs: dict
    reduce_constexprs: dict
    prefill_constexprs: dict
    decode_options: dict
    fp8_decode_options: dict  # the decode kernel's over an FP8 cache
    reduce_options: dict
    prefill_options: dict

    @property
    def num_prefills(self) -> int:
        return self.num_seqs - self.num_decodes


def _check_positive(**values) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_decode_query_len(max_decode_query_len) -> None:
    if not isinstance(max_decode_query_len, int) or not 1 <= max_decode_query_len <= MAX_DECODE_QUERY_LEN:
        raise ValueError(f"max_decode_query_len must be an int in [1, {MAX_DECODE_QUERY_LEN}], "
                         f"got {max_decode_query_len!r}")


def decode_query_block(max_decode_query_len: int, queries_per_kv: int) -> int:
    """Query tokens of one decode-like sequence that one program serves (a power of two).

    As many as fit ``DECODE_MAX_ROWS`` rows with the GQA group (at least one), and no more than the
    batch has: 1 for plain decodes, so a decode batch runs exactly the one-token kernel.
    """
    fit = max(1, DECODE_MAX_ROWS // queries_per_kv)
    return min(1 << (fit.bit_length() - 1), triton.next_power_of_2(max_decode_query_len))


def plan_attention(
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    num_decodes: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_size: int,
    page_size: int,
    max_seqlen_q: int,
    max_seqlen_k: int,
    max_decode_query_len: int = 1,
    workspace: Optional[AttentionWorkspace] = None,
    split_kv_policy: Optional[SplitKVPolicy] = None,
) -> AttentionPlan:
    """Plan one batch of paged attention (once per batch; reuse the plan for every layer).

    Parameters
    ----------
    query_start_loc : torch.Tensor
        int32 ``[num_seqs + 1]`` on the device: sequence ``i``'s query tokens are
        ``q[query_start_loc[i]:query_start_loc[i + 1]]``.
    seq_lens : torch.Tensor
        int32 ``[num_seqs]`` on the device: KV length of each sequence (its queries included).
    num_decodes : int
        The first ``num_decodes`` sequences are decode-like: each has between 1 and
        ``max_decode_query_len`` query tokens (a decode, or a speculative-decoding verify sequence;
        lengths may differ, e.g. after rejections). They run through the split-KV kernel; the rest
        are prefills (2D kernel).
    num_q_heads, num_kv_heads, head_size, page_size : int
        Head layout (``num_q_heads`` a multiple of ``num_kv_heads``) and KV page size.
    max_seqlen_q, max_seqlen_k : int
        Host upper bounds of the query and KV lengths (read for sizing only, never for results).
    max_decode_query_len : int
        Host upper bound of the decode-like sequences' query tokens, in ``[1, 16]`` (default 1:
        plain decodes). The kernels trust it: queries of a decode-like sequence past it are not
        computed. Clamped to ``max_seqlen_q``.
    workspace : AttentionWorkspace, optional
        Preallocated scratch; without it the plan allocates its own.
    split_kv_policy : callable, optional
        ``policy(SplitKVProblem) -> int | None``: segments per decode sequence (see
        ``default_split_kv_policy``); None from it means the default.

    Returns
    -------
    AttentionPlan
    """
    if not isinstance(query_start_loc, torch.Tensor) or query_start_loc.dim() != 1 or query_start_loc.dtype != torch.int32:
        raise TypeError("query_start_loc must be an int32 tensor [num_seqs + 1]")
    if not isinstance(seq_lens, torch.Tensor) or seq_lens.dim() != 1 or seq_lens.dtype != torch.int32:
        raise TypeError("seq_lens must be an int32 tensor [num_seqs]")
    num_seqs = seq_lens.shape[0]
    if query_start_loc.shape[0] != num_seqs + 1:
        raise ValueError(f"query_start_loc has {query_start_loc.shape[0]} entries, expected num_seqs + 1 = {num_seqs + 1}")
    if query_start_loc.device != seq_lens.device:
        raise ValueError(f"query_start_loc is on {query_start_loc.device} but seq_lens on {seq_lens.device}")
    _check_positive(num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_size=head_size, page_size=page_size,
                    max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k)
    if not isinstance(num_decodes, int) or not 0 <= num_decodes <= num_seqs:
        raise ValueError(f"num_decodes must be an int in [0, num_seqs={num_seqs}], got {num_decodes!r}")
    _check_decode_query_len(max_decode_query_len)
    decode_query_len = min(max_decode_query_len, max_seqlen_q)
    if num_q_heads % num_kv_heads:
        raise ValueError(f"num_q_heads ({num_q_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if workspace is not None:
        if num_seqs > workspace.max_num_seqs:
            raise ValueError(f"batch has {num_seqs} sequences but the workspace was allocated for "
                             f"max_num_seqs={workspace.max_num_seqs}")
        if workspace.segment_out.shape[2:] != (num_q_heads, head_size):
            raise ValueError(f"workspace was allocated for (num_q_heads, head_size)="
                             f"{tuple(workspace.segment_out.shape[2:])}, got ({num_q_heads}, {head_size})")
        if workspace.segment_out.device != seq_lens.device:
            raise ValueError(f"workspace is on {workspace.segment_out.device} but seq_lens on {seq_lens.device}")
        if num_decodes and decode_query_len > workspace.max_decode_query_len:
            raise ValueError(f"max_decode_query_len={decode_query_len} exceeds the workspace's "
                             f"max_decode_query_len={workspace.max_decode_query_len}")

    max_num_tokens = workspace.max_num_tokens if workspace is not None else None
    queries_per_kv = num_q_heads // num_kv_heads
    head_pad = max(16, triton.next_power_of_2(head_size))
    block_q = decode_query_block(decode_query_len, queries_per_kv)
    query_blocks = -(-decode_query_len // block_q)
    num_segments = 1
    if num_decodes:
        capacity = workspace.max_total_segments if workspace is not None else num_decodes * MAX_SEGMENTS_PER_SEQ
        problem = SplitKVProblem(
            num_decodes=num_decodes, max_decode_query_len=decode_query_len, query_blocks=query_blocks,
            max_seqlen_k=max_seqlen_k, num_q_heads=num_q_heads,
            num_kv_heads=num_kv_heads, head_size=head_size, page_size=page_size,
            num_sms=num_sms(seq_lens.device), min_segment_len=DECODE_TILE_N * MIN_SEGMENT_TILES,
            max_segments=max(1, min(MAX_SEGMENTS_PER_SEQ, capacity // num_decodes)),
        )
        chosen = split_kv_policy(problem) if split_kv_policy is not None else None
        if chosen is None:
            chosen = default_split_kv_policy(problem)
        if not isinstance(chosen, int) or isinstance(chosen, bool):
            raise TypeError(f"split_kv_policy must return an int or None, got {chosen!r}")
        num_segments = max(1, min(chosen, problem.max_segments))

    segment_out = segment_lse = None
    if num_segments > 1:
        if workspace is None:
            workspace = AttentionWorkspace.allocate(num_decodes, num_decodes, num_q_heads, head_size,
                                                    device=seq_lens.device,
                                                    max_total_segments=num_decodes * num_segments,
                                                    max_decode_query_len=decode_query_len)
        segment_out, segment_lse = workspace.segment_out, workspace.segment_lse

    single_segment = num_segments == 1
    decode_constexprs = dict(
        NUM_Q_HEADS=num_q_heads, QUERIES_PER_KV=queries_per_kv, HEAD_SIZE=head_size, HEAD_PAD=head_pad,
        BLOCK_M=max(16, triton.next_power_of_2(block_q * queries_per_kv)), BLOCK_Q=block_q,
        QUERY_BLOCKS=query_blocks, PAGE_SIZE=page_size, TILE_N=DECODE_TILE_N,
        MIN_SEGMENT_TILES=MIN_SEGMENT_TILES, SINGLE_SEGMENT=single_segment,
    )
    segments_pad = triton.next_power_of_2(num_segments)
    reduce_constexprs = dict(
        NUM_Q_HEADS=num_q_heads, HEAD_SIZE=head_size, HEAD_PAD=head_pad, SEGMENTS_PAD=segments_pad,
        SEGMENT_BLOCK=min(SEGMENT_BLOCK, segments_pad), TILE_N=DECODE_TILE_N, MIN_SEGMENT_TILES=MIN_SEGMENT_TILES,
    )
    decode_options = dict(num_warps=DECODE_NUM_WARPS, num_stages=DECODE_NUM_STAGES)
    fp8_decode_options = dict(decode_options, num_stages=FP8_DECODE_NUM_STAGES)
    if block_q > 1:
        decode_options["num_stages"] = VERIFY_NUM_STAGES
        if decode_constexprs["BLOCK_M"] > 16 and seq_lens.device.type == "cuda" and torch.version.hip is None:
            decode_options["maxnreg"] = VERIFY_MAX_REGISTERS
        fp8_decode_options = decode_options
    prefill_block_m = max(PREFILL_BLOCK_M, triton.next_power_of_2(queries_per_kv))
    prefill_constexprs = dict(
        QUERIES_PER_KV=queries_per_kv, HEAD_SIZE=head_size, HEAD_PAD=head_pad, BLOCK_M=prefill_block_m,
        BLOCK_Q=prefill_block_m // queries_per_kv, PAGE_SIZE=page_size, TILE_N=PREFILL_TILE_N,
    )
    return AttentionPlan(
        query_start_loc=query_start_loc, seq_lens=seq_lens, num_seqs=num_seqs, num_decodes=num_decodes,
        max_decode_query_len=decode_query_len, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_size=head_size, page_size=page_size,
        max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, num_segments=num_segments,
        segment_out=segment_out, segment_lse=segment_lse,
        max_num_tokens=max_num_tokens,
        decode_grid=(num_segments, num_kv_heads * query_blocks, num_decodes),
        reduce_grid=(num_decodes, num_q_heads, decode_query_len),
        decode_constexprs=decode_constexprs, reduce_constexprs=reduce_constexprs,
        prefill_constexprs=prefill_constexprs,
        decode_options=decode_options,
        fp8_decode_options=fp8_decode_options,
        reduce_options=dict(num_warps=4),
        prefill_options=dict(num_warps=PREFILL_NUM_WARPS, num_stages=PREFILL_NUM_STAGES),
    )
