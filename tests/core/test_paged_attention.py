"""paged_attention against a float64 per-sequence torch reference (CPU interpreter and GPU)."""

import math

import pytest
import torch

from attnplug.core.attention import (
    AttentionWorkspace,
    SplitKVProblem,
    default_split_kv_policy,
    paged_attention,
    plan_attention,
)
from tests.utils import DEVICE, assert_close_verbose

ON_GPU = DEVICE.type == "cuda"
TOLERANCE = {torch.float32: (2e-4, 2e-4), torch.float16: (4e-3, 4e-3), torch.bfloat16: (2e-2, 2e-2)}


# ----------------------------------------------------------------------------- reference
def reference_attention(q, k_cache, v_cache, block_table, query_start_loc, seq_lens, *, softmax_scale,
                        causal=True, window_size=(-1, -1), softcap=0.0, sinks=None):
    """float64, one sequence at a time, KV gathered page by page through the block table."""
    num_q_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    page_size = k_cache.shape[1]
    qsl, lens = query_start_loc.tolist(), seq_lens.tolist()
    out = torch.zeros(q.shape, dtype=torch.float64)
    q, k_cache, v_cache, block_table = q.cpu(), k_cache.cpu(), v_cache.cpu(), block_table.cpu()
    for i, seq_len in enumerate(lens):
        start, end = qsl[i], qsl[i + 1]
        pages = block_table[i, : math.ceil(seq_len / page_size)].long()
        k = k_cache[pages].reshape(-1, num_kv_heads, k_cache.shape[3])[:seq_len].double()
        v = v_cache[pages].reshape(-1, num_kv_heads, v_cache.shape[3])[:seq_len].double()
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        qi = q[start:end].double()
        logits = torch.einsum("qhd,khd->hqk", qi, k) * softmax_scale
        if softcap > 0:
            logits = softcap * torch.tanh(logits / softcap)
        query_pos = torch.arange(seq_len - (end - start), seq_len)[:, None]
        key_pos = torch.arange(seq_len)[None, :]
        visible = torch.ones(end - start, seq_len, dtype=torch.bool)
        if causal:
            visible &= key_pos <= query_pos
        if window_size[0] >= 0:
            visible &= key_pos >= query_pos - window_size[0]
        if window_size[1] >= 0:
            visible &= key_pos <= query_pos + window_size[1]
        logits = logits.masked_fill(~visible, float("-inf"))
        if sinks is not None:
            sink = sinks.cpu().double()[:, None, None].expand(-1, end - start, 1)
            probs = torch.softmax(torch.cat([logits, sink], dim=-1), dim=-1)[..., :-1]
        else:
            probs = torch.softmax(logits, dim=-1)
        out[start:end] = torch.einsum("hqk,khd->qhd", probs, v)
    return out


# ----------------------------------------------------------------------------- batch builder
def make_caches(layout, num_pages, page_size, num_kv_heads, head_size, dtype, generator):
    """K and V caches [num_pages, page_size, num_kv_heads, head_size] in one of several memory layouts."""
    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float32).to(dtype).to(DEVICE)

    if layout == "contiguous":
        return randn(num_pages, page_size, num_kv_heads, head_size), randn(num_pages, page_size, num_kv_heads, head_size)
    if layout == "vllm":  # one buffer [num_blocks, 2, block_size, num_kv_heads, head_size]
        kv = randn(num_pages, 2, page_size, num_kv_heads, head_size)
        return kv[:, 0], kv[:, 1]
    if layout == "sglang":  # one token pool [num_tokens, 2 * num_kv_heads, head_size], viewed as pages
        pool = randn(num_pages * page_size, 2 * num_kv_heads, head_size)
        k, v = pool[:, :num_kv_heads], pool[:, num_kv_heads:]
        return k.unflatten(0, (num_pages, page_size)), v.unflatten(0, (num_pages, page_size))
    if layout == "strided_dim":  # head_size dimension not contiguous
        kv = randn(num_pages, page_size, num_kv_heads, head_size, 2)
        return kv[..., 0], kv[..., 1]
    raise ValueError(layout)


def dequantized(cache, scale):
    """An FP8 cache as the values it stands for (float64), for the reference."""
    return cache.double() * scale.double().cpu().item() if scale is not None else cache


class Batch:
    """A random batch: ``lengths`` is a list of (query_len, seq_len); decodes first. With an FP8
    ``kv_dtype`` the caches hold FP8 values and random per-tensor scales (``k_scale`` / ``v_scale``)
    that ``run`` passes and ``reference`` applies."""

    def __init__(self, lengths, *, num_decodes, num_q_heads, num_kv_heads, head_size, page_size, dtype,
                 layout="contiguous", seed=0, extra_pages=3, kv_dtype=None):
        g = torch.Generator().manual_seed(seed)
        self.num_decodes = num_decodes
        self.num_q_heads, self.num_kv_heads, self.head_size, self.page_size = num_q_heads, num_kv_heads, head_size, page_size
        query_lens = [ql for ql, _ in lengths]
        seq_lens = [sl for _, sl in lengths]
        self.max_seqlen_q, self.max_seqlen_k = max(query_lens, default=1), max(seq_lens, default=1)
        self.max_decode_query_len = max(query_lens[:num_decodes], default=1)
        pages_per_seq = [math.ceil(sl / page_size) for sl in seq_lens]
        max_pages = max(pages_per_seq, default=1) + 1
        num_pages = sum(pages_per_seq) + extra_pages
        perm = torch.randperm(num_pages, generator=g).to(torch.int32)
        # unused entries hold garbage page ids that must never be read
        self.block_table = torch.full((len(lengths), max_pages), 10**6, dtype=torch.int32)
        used = 0
        for i, n in enumerate(pages_per_seq):
            self.block_table[i, :n] = perm[used: used + n]
            used += n
        self.block_table = self.block_table.to(DEVICE)
        self.query_start_loc = torch.tensor([0] + torch.tensor(query_lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
        self.seq_lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
        self.num_tokens = sum(query_lens)
        self.k_cache, self.v_cache = make_caches(layout, num_pages, page_size, num_kv_heads, head_size,
                                                 kv_dtype or dtype, g)
        self.k_scale = self.v_scale = None
        if kv_dtype not in (None, dtype):
            self.k_scale, self.v_scale = (torch.rand(2, generator=g) * 1.5 + 0.25).to(DEVICE).unbind()
        self.q = torch.randn(self.num_tokens, num_q_heads, head_size, generator=g).to(dtype).to(DEVICE)
        self.generator = g

    def plan(self, **kwargs):
        return plan_attention(self.query_start_loc, self.seq_lens, num_decodes=self.num_decodes,
                              num_q_heads=self.num_q_heads, num_kv_heads=self.num_kv_heads,
                              head_size=self.head_size, page_size=self.page_size,
                              max_seqlen_q=self.max_seqlen_q, max_seqlen_k=self.max_seqlen_k,
                              **{"max_decode_query_len": self.max_decode_query_len, **kwargs})

    def run(self, plan, q=None, k_cache=None, v_cache=None, **kwargs):
        q = self.q if q is None else q
        out = torch.full_like(q, float("nan"))
        if self.k_scale is not None:
            kwargs = dict(k_scale=self.k_scale, v_scale=self.v_scale, **kwargs)
        return paged_attention(q, self.k_cache if k_cache is None else k_cache,
                               self.v_cache if v_cache is None else v_cache, self.block_table, plan, out,
                               softmax_scale=self.head_size ** -0.5, **kwargs)

    def reference(self, q=None, k_cache=None, v_cache=None, **kwargs):
        k_cache = dequantized(self.k_cache if k_cache is None else k_cache, self.k_scale)
        v_cache = dequantized(self.v_cache if v_cache is None else v_cache, self.v_scale)
        return reference_attention(self.q if q is None else q, k_cache, v_cache, self.block_table,
                                   self.query_start_loc, self.seq_lens, softmax_scale=self.head_size ** -0.5, **kwargs)


def check(batch, dtype, plan_kwargs=None, **attn_kwargs):
    plan = batch.plan(**(plan_kwargs or {}))
    got = batch.run(plan, **attn_kwargs)
    atol, rtol = TOLERANCE[dtype]
    assert_close_verbose(got, batch.reference(**attn_kwargs), atol=atol, rtol=rtol, what=str(attn_kwargs))
    return plan


def split(n):
    """A policy that asks for ``n`` segments per decode sequence."""
    return lambda problem: n


# ----------------------------------------------------------------------------- CPU + GPU tests
DECODE_LENS = [(1, 1), (1, 17), (1, 300), (1, 64), (1, 129)]
PREFILL_LENS = [(7, 7), (33, 50), (1, 21), (20, 97)]  # (query_len, seq_len): prefix + new tokens


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_q_heads,num_kv_heads,head_size,page_size", [
    (4, 2, 32, 16),   # GQA 2
    (6, 2, 48, 1),    # GQA 3, head 48, page 1
    (5, 1, 80, 16),   # GQA 5 (MQA), head 80
    (3, 3, 96, 16),   # MHA, head 96
])
def test_mixed_batch(dtype, num_q_heads, num_kv_heads, head_size, page_size):
    batch = Batch(DECODE_LENS[:3] + PREFILL_LENS, num_decodes=3, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
                  head_size=head_size, page_size=page_size, dtype=dtype, seed=head_size)
    plan = check(batch, dtype, plan_kwargs=dict(split_kv_policy=split(3)))
    assert plan.num_segments == 3


@pytest.mark.parametrize("segments", [1, 2, 128])
def test_decode_only_segment_counts(segments):
    batch = Batch(DECODE_LENS, num_decodes=5, num_q_heads=4, num_kv_heads=2, head_size=64, page_size=16,
                  dtype=torch.float32, seed=segments)
    plan = check(batch, torch.float32, plan_kwargs=dict(split_kv_policy=split(segments)))
    assert plan.num_segments == min(segments, 128)


def test_many_segments_merge_in_several_reduction_steps(monkeypatch):
    from attnplug.core.attention import plan as plan_module

    monkeypatch.setattr(plan_module, "DECODE_TILE_N", 16)
    monkeypatch.setattr(plan_module, "MIN_SEGMENT_TILES", 1)
    monkeypatch.setattr(plan_module, "SEGMENT_BLOCK", 2)
    batch = Batch(DECODE_LENS, num_decodes=5, num_q_heads=4, num_kv_heads=2, head_size=32, page_size=16,
                  dtype=torch.float32, seed=11)
    sinks = torch.randn(4, generator=batch.generator).to(DEVICE)
    plan = check(batch, torch.float32, plan_kwargs=dict(split_kv_policy=split(8)), sinks=sinks, window_size=(150, -1))
    assert plan.num_segments == 8 and plan.reduce_constexprs["SEGMENT_BLOCK"] == 2


def test_plan_constexprs_lead_each_kernels_constexprs_in_order():
    """paged_attention passes the plan's constexprs positionally, then each call's flags: the orders must agree."""
    from triton.runtime.jit import JITFunction

    from attnplug.core.attention import kernels

    batch = Batch(DECODE_LENS + PREFILL_LENS, num_decodes=5, num_q_heads=4, num_kv_heads=2, head_size=32,
                  page_size=16, dtype=torch.float32)
    plan = batch.plan(split_kv_policy=split(4))
    per_call = {"_decode_split_kv_kernel": ["USE_SOFTCAP", "USE_SINKS", "USE_WINDOW", "K_DIM_CONTIGUOUS",
                                            "V_DIM_CONTIGUOUS", "KV_FP8", "INLINE_PTX", "DOT_PRECISION"],
                "_reduce_segments_kernel": ["USE_SINKS", "USE_WINDOW"],
                "_prefill_kernel": ["CAUSAL", "USE_SOFTCAP", "USE_SINKS", "USE_WINDOW_LEFT", "USE_WINDOW_RIGHT",
                                    "K_DIM_CONTIGUOUS", "V_DIM_CONTIGUOUS", "KV_FP8", "INLINE_PTX", "DOT_PRECISION"]}
    for name, from_plan in (("_decode_split_kv_kernel", plan.decode_constexprs),
                            ("_reduce_segments_kernel", plan.reduce_constexprs),
                            ("_prefill_kernel", plan.prefill_constexprs)):
        params = JITFunction(getattr(kernels, name).fn).params
        assert [p.name for p in params if p.is_constexpr] == [*from_plan, *per_call[name]], name


def test_default_policy_decode_only_fp16():
    batch = Batch(DECODE_LENS, num_decodes=5, num_q_heads=8, num_kv_heads=2, head_size=64, page_size=1,
                  dtype=torch.float16, seed=3)
    check(batch, torch.float16)


def test_prefill_only_not_causal_and_right_window():
    batch = Batch(PREFILL_LENS, num_decodes=0, num_q_heads=4, num_kv_heads=2, head_size=32, page_size=16,
                  dtype=torch.float32, seed=4)
    check(batch, torch.float32, causal=False)
    check(batch, torch.float32, window_size=(5, 3), causal=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("options", [
    dict(window_size=(40, -1)),
    dict(softcap=3.0),
    dict(sinks=True),
    dict(window_size=(9, -1), softcap=2.0, sinks=True),
])
def test_window_softcap_sinks(dtype, options):
    batch = Batch(DECODE_LENS[:3] + PREFILL_LENS, num_decodes=3, num_q_heads=6, num_kv_heads=2, head_size=32,
                  page_size=16, dtype=dtype, seed=5)
    if options.get("sinks"):
        options = dict(options, sinks=torch.randn(6, generator=batch.generator).mul(2).to(DEVICE))
    check(batch, dtype, plan_kwargs=dict(split_kv_policy=split(2)), **options)
    check(batch, dtype, plan_kwargs=dict(split_kv_policy=split(1)), **options)


@pytest.mark.parametrize("layout", ["vllm", "sglang", "strided_dim"])
@pytest.mark.parametrize("page_size", [1, 16])
def test_non_contiguous_caches(layout, page_size):
    batch = Batch(DECODE_LENS[:3] + PREFILL_LENS[:2], num_decodes=3, num_q_heads=4, num_kv_heads=2, head_size=32,
                  page_size=page_size, dtype=torch.float16, layout=layout, seed=6)
    assert not batch.k_cache.is_contiguous()
    check(batch, torch.float16, plan_kwargs=dict(split_kv_policy=split(2)))


def test_one_plan_many_layers_with_workspace():
    batch = Batch(DECODE_LENS[:4] + PREFILL_LENS[:2], num_decodes=4, num_q_heads=4, num_kv_heads=2, head_size=32,
                  page_size=16, dtype=torch.float32, seed=7)
    workspace = AttentionWorkspace.allocate(8, 128, 4, 32, device=DEVICE)
    plan = batch.plan(workspace=workspace, split_kv_policy=split(3))
    assert plan.segment_out is workspace.segment_out
    for layer in range(3):
        q = torch.randn(batch.q.shape, generator=batch.generator).to(DEVICE)
        k = torch.randn(batch.k_cache.shape, generator=batch.generator).to(DEVICE)
        v = torch.randn(batch.v_cache.shape, generator=batch.generator).to(DEVICE)
        got = batch.run(plan, q=q, k_cache=k, v_cache=v)
        assert_close_verbose(got, batch.reference(q=q, k_cache=k, v_cache=v), atol=2e-4, rtol=2e-4, what=f"layer {layer}")


def test_padding_rows_of_out_are_left_alone():
    batch = Batch(DECODE_LENS[:2] + PREFILL_LENS[:1], num_decodes=2, num_q_heads=4, num_kv_heads=2, head_size=32,
                  page_size=16, dtype=torch.float32, seed=8)
    q = torch.cat([batch.q, torch.randn(5, 4, 32).to(DEVICE)])  # a CUDA-graph-padded batch
    out = torch.full_like(q, float("nan"))
    paged_attention(q, batch.k_cache, batch.v_cache, batch.block_table, batch.plan(), out, softmax_scale=32 ** -0.5)
    assert_close_verbose(out[: batch.num_tokens], batch.reference(), atol=2e-4, rtol=2e-4)
    assert torch.isnan(out[batch.num_tokens:]).all()


def test_empty_batch_is_a_no_op():
    batch = Batch([], num_decodes=0, num_q_heads=4, num_kv_heads=2, head_size=32, page_size=16,
                  dtype=torch.float32)
    q = torch.randn(3, 4, 32, device=DEVICE)
    out = torch.full_like(q, float("nan"))
    assert paged_attention(q, batch.k_cache, batch.v_cache, batch.block_table, batch.plan(), out,
                           softmax_scale=1.0) is out
    assert torch.isnan(out).all()


# ----------------------------------------------------------------------------- verify (decode-like, several queries)
# (query_len, seq_len) of decode-like sequences: plain decodes and speculative verify blocks of 2-16
# tokens with odd KV lengths, ragged as after rejections
VERIFY_LENS = [(4, 300), (1, 1), (16, 1000), (3, 7), (1, 65), (7, 65), (2, 2), (11, 300)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_q_heads,num_kv_heads,head_size,page_size", [
    (6, 2, 48, 1),    # GQA 3, head 48, page 1
    (4, 2, 80, 16),   # GQA 2, head 80
    (3, 3, 32, 16),   # MHA
])
@pytest.mark.parametrize("segments", [1, 3])
def test_verify_batch_with_prefills(dtype, num_q_heads, num_kv_heads, head_size, page_size, segments):
    batch = Batch(VERIFY_LENS + PREFILL_LENS[:2], num_decodes=len(VERIFY_LENS), num_q_heads=num_q_heads,
                  num_kv_heads=num_kv_heads, head_size=head_size, page_size=page_size, dtype=dtype,
                  seed=head_size + segments)
    plan = check(batch, dtype, plan_kwargs=dict(split_kv_policy=split(segments)))
    assert plan.num_segments == segments and plan.max_decode_query_len == 16


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("options", [
    dict(window_size=(5, -1)),   # shorter than the draft block: later queries drop earlier ones
    dict(window_size=(100, -1), softcap=2.0),
    dict(sinks=True),
    dict(window_size=(9, -1), softcap=3.0, sinks=True),
])
def test_verify_window_softcap_sinks(dtype, options):
    batch = Batch(VERIFY_LENS[:6] + PREFILL_LENS[2:], num_decodes=6, num_q_heads=6, num_kv_heads=2, head_size=32,
                  page_size=16, dtype=dtype, seed=13)
    if options.get("sinks"):
        options = dict(options, sinks=torch.randn(6, generator=batch.generator).mul(2).to(DEVICE))
    for segments in (1, 4):
        check(batch, dtype, plan_kwargs=dict(split_kv_policy=split(segments)), **options)


def test_verify_queries_over_several_programs(monkeypatch):
    """A GQA group x draft block larger than one tile is cut into query blocks (here 4 of 4 tokens)."""
    from attnplug.core.attention import plan as plan_module

    monkeypatch.setattr(plan_module, "DECODE_MAX_ROWS", 16)
    batch = Batch(VERIFY_LENS[:4] + PREFILL_LENS[:1], num_decodes=4, num_q_heads=8, num_kv_heads=2, head_size=32,
                  page_size=16, dtype=torch.float32, seed=17)
    for segments in (1, 2):
        plan = check(batch, torch.float32, plan_kwargs=dict(split_kv_policy=split(segments)), window_size=(30, -1))
        assert plan.decode_constexprs["BLOCK_Q"] == 4 and plan.decode_constexprs["QUERY_BLOCKS"] == 4
        assert plan.decode_grid == (segments, 2 * 4, 4)


def test_plain_decodes_keep_the_one_query_kernel():
    batch = Batch(DECODE_LENS, num_decodes=5, num_q_heads=8, num_kv_heads=2, head_size=32, page_size=16,
                  dtype=torch.float32)
    plan = batch.plan(max_decode_query_len=4)  # an upper bound above the batch's max_seqlen_q of 1
    assert plan.max_decode_query_len == 1 and plan.decode_constexprs["BLOCK_Q"] == 1
    assert plan.decode_constexprs["BLOCK_M"] == 16


@pytest.mark.parametrize("qlen_of_padding", [0, 4])
def test_padding_lanes_touch_no_real_row(qlen_of_padding):
    """CUDA-graph padding: lanes with seq_len 0 past the real batch, with token rows past the real
    tokens (or none); their block-table rows hold page ids that must never be read."""
    real = VERIFY_LENS[:4]
    num_pad = 3
    batch = Batch(real + [(qlen_of_padding or 1, 1)] * num_pad, num_decodes=len(real) + num_pad, num_q_heads=4,
                  num_kv_heads=2, head_size=32, page_size=16, dtype=torch.float32, seed=19)
    batch.block_table[len(real):] = 10**6
    lens = [ql for ql, _ in real] + [qlen_of_padding] * num_pad
    batch.query_start_loc.copy_(torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32))
    batch.seq_lens[len(real):] = 0
    num_real_tokens = sum(ql for ql, _ in real)
    q = torch.cat([batch.q[:num_real_tokens], torch.randn(num_pad * 4 + 2, 4, 32).to(DEVICE)])
    workspace = AttentionWorkspace.allocate(8, 64, 4, 32, device=DEVICE, max_decode_query_len=16)
    expected = reference_attention(q[:num_real_tokens], batch.k_cache, batch.v_cache, batch.block_table[:len(real)],
                                   batch.query_start_loc[:len(real) + 1], batch.seq_lens[:len(real)],
                                   softmax_scale=32 ** -0.5)
    for segments in (1, 3):
        plan = plan_attention(batch.query_start_loc, batch.seq_lens, num_decodes=len(real) + num_pad, num_q_heads=4,
                              num_kv_heads=2, head_size=32, page_size=16, max_seqlen_q=16, max_seqlen_k=1000,
                              max_decode_query_len=16, workspace=workspace, split_kv_policy=split(segments))
        out = torch.full_like(q, float("nan"))
        paged_attention(q, batch.k_cache, batch.v_cache, batch.block_table, plan, out, softmax_scale=32 ** -0.5)
        assert_close_verbose(out[:num_real_tokens], expected, atol=2e-4, rtol=2e-4, what=f"{segments} segments")
        assert torch.isnan(out[num_real_tokens:]).all(), "a padding lane wrote an output row"


def test_one_verify_plan_many_layers_with_workspace():
    batch = Batch(VERIFY_LENS[:5] + PREFILL_LENS[:1], num_decodes=5, num_q_heads=4, num_kv_heads=2, head_size=32,
                  page_size=16, dtype=torch.float32, seed=23)
    workspace = AttentionWorkspace.allocate(8, 128, 4, 32, device=DEVICE, max_decode_query_len=16)
    plan = batch.plan(workspace=workspace, split_kv_policy=split(2))
    assert plan.segment_out is workspace.segment_out
    for layer in range(2):
        q = torch.randn(batch.q.shape, generator=batch.generator).to(DEVICE)
        k = torch.randn(batch.k_cache.shape, generator=batch.generator).to(DEVICE)
        v = torch.randn(batch.v_cache.shape, generator=batch.generator).to(DEVICE)
        got = batch.run(plan, q=q, k_cache=k, v_cache=v)
        assert_close_verbose(got, batch.reference(q=q, k_cache=k, v_cache=v), atol=2e-4, rtol=2e-4, what=f"layer {layer}")


# ----------------------------------------------------------------------------- plan / errors
def test_default_policy_fills_the_gpu_without_a_cliff():
    def segments(num_decodes, max_seqlen_k=32768):
        return default_split_kv_policy(SplitKVProblem(
            num_decodes=num_decodes, max_decode_query_len=1, query_blocks=1, max_seqlen_k=max_seqlen_k,
            num_q_heads=32, num_kv_heads=8, head_size=128, page_size=16, num_sms=132, min_segment_len=256,
            max_segments=128))
    resident = 132 * 4
    for max_seqlen_k in (1024, 32768):
        for bs in range(1, 257):
            s = segments(bs, max_seqlen_k)
            assert 1 <= s <= max_seqlen_k // 256
            # every batch size keeps the GPU busy: at least ~2/3 of a wave of programs (or all it can use)
            assert bs * 8 * s >= 0.66 * min(resident, bs * 8 * (max_seqlen_k // 256)), (bs, max_seqlen_k, s)
    assert segments(1) == 66  # one full wave of 66 x 8 programs
    assert segments(24) == 11  # 24 x 8 x 11 = 2112 programs = 4 full waves (3 segments: a bad 1.1 waves)
    assert segments(24, 1024) == 2
    assert segments(1, max_seqlen_k=300) == 2, "no segment shorter than min_segment_len"


def test_workspace_bounds_segments_and_batch():
    batch = Batch(DECODE_LENS, num_decodes=5, num_q_heads=4, num_kv_heads=2, head_size=32, page_size=16,
                  dtype=torch.float32)
    workspace = AttentionWorkspace.allocate(5, 64, 4, 32, device=DEVICE, max_total_segments=12)
    assert batch.plan(workspace=workspace, split_kv_policy=split(100)).num_segments == 2  # 12 // 5
    with pytest.raises(ValueError, match="max_num_seqs"):
        batch.plan(workspace=AttentionWorkspace.allocate(4, 64, 4, 32, device=DEVICE))
    with pytest.raises(ValueError, match="num_q_heads, head_size"):
        batch.plan(workspace=AttentionWorkspace.allocate(8, 64, 8, 32, device=DEVICE))
    plan = batch.plan(workspace=AttentionWorkspace.allocate(8, 4, 4, 32, device=DEVICE))
    with pytest.raises(ValueError, match="max_num_tokens"):
        batch.run(plan)


def test_policy_none_means_default_and_bad_values_raise():
    batch = Batch(DECODE_LENS, num_decodes=5, num_q_heads=4, num_kv_heads=2, head_size=32, page_size=16,
                  dtype=torch.float32)
    seen = []
    plan = batch.plan(split_kv_policy=lambda problem: seen.append(problem))
    assert seen[0].num_decodes == 5 and seen[0].max_seqlen_k == 300
    assert plan.num_segments == default_split_kv_policy(seen[0])
    with pytest.raises(TypeError, match="split_kv_policy"):
        batch.plan(split_kv_policy=lambda problem: 2.5)


def test_verify_plan_accounts_for_query_rows_without_a_cliff():
    """Verify batches split like decodes of the same programs: no threshold on batch size or q_len."""
    def problem(bs, qlen, query_blocks=1):
        return SplitKVProblem(num_decodes=bs, max_decode_query_len=qlen, query_blocks=query_blocks,
                              max_seqlen_k=32768, num_q_heads=32, num_kv_heads=8, head_size=128, page_size=16,
                              num_sms=132, min_segment_len=128, max_segments=128)
    for qlen in (2, 4, 8, 16):
        for bs in range(1, 129):
            assert default_split_kv_policy(problem(bs, qlen)) == default_split_kv_policy(problem(bs, 1))
    assert default_split_kv_policy(problem(4, 16, query_blocks=2)) == default_split_kv_policy(problem(8, 1))


def test_verify_errors_name_the_parameter():
    batch = Batch(VERIFY_LENS[:3], num_decodes=3, num_q_heads=4, num_kv_heads=2, head_size=32, page_size=16,
                  dtype=torch.float32)
    for bad in (0, 17, 2.0):
        with pytest.raises(ValueError, match="max_decode_query_len"):
            batch.plan(max_decode_query_len=bad)
    with pytest.raises(ValueError, match="max_decode_query_len"):
        AttentionWorkspace.allocate(4, 64, 4, 32, device=DEVICE, max_decode_query_len=17)
    with pytest.raises(ValueError, match="max_decode_query_len=16 exceeds the workspace"):
        batch.plan(workspace=AttentionWorkspace.allocate(4, 64, 4, 32, device=DEVICE, max_decode_query_len=4))
    with pytest.raises(ValueError, match="causal=False"):
        batch.run(batch.plan(), causal=False)


@pytest.mark.parametrize("change,match", [
    (dict(num_kv_heads=3), "num_q_heads"),
    (dict(num_decodes=9), "num_decodes"),
    (dict(head_size=0), "head_size"),
    (dict(query_start_loc=torch.zeros(3, dtype=torch.int32)), "query_start_loc"),
    (dict(seq_lens=torch.zeros(5, dtype=torch.int64)), "seq_lens"),
])
def test_plan_errors_name_the_parameter(change, match):
    args = dict(query_start_loc=torch.arange(6, dtype=torch.int32), seq_lens=torch.ones(5, dtype=torch.int32),
                num_decodes=5, num_q_heads=4, num_kv_heads=2, head_size=32, page_size=16, max_seqlen_q=1,
                max_seqlen_k=1)
    args.update(change)
    with pytest.raises((ValueError, TypeError), match=match):
        plan_attention(args.pop("query_start_loc"), args.pop("seq_lens"), **args)


def test_run_errors_name_the_parameter():
    batch = Batch(DECODE_LENS[:2], num_decodes=2, num_q_heads=4, num_kv_heads=2, head_size=32, page_size=16,
                  dtype=torch.float32)
    plan = batch.plan()
    out = torch.empty_like(batch.q)
    run = lambda **kw: paged_attention(**{**dict(q=batch.q, k_cache=batch.k_cache, v_cache=batch.v_cache,
                                                  block_table=batch.block_table, plan=plan, out=out,
                                                  softmax_scale=1.0), **kw})
    with pytest.raises(ValueError, match="q must be"):
        run(q=batch.q[:, :3])
    with pytest.raises(ValueError, match="out must"):
        run(out=out.half())
    with pytest.raises(ValueError, match="k_cache"):
        run(k_cache=batch.k_cache[:, :8])
    with pytest.raises(TypeError, match="v_cache"):
        run(v_cache=batch.v_cache.half())
    with pytest.raises(ValueError, match="block_table"):
        run(block_table=batch.block_table.long())
    with pytest.raises(ValueError, match="sinks"):
        run(sinks=torch.zeros(3))
    with pytest.raises(TypeError, match="plan"):
        run(plan=object())


# ----------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_q_heads,num_kv_heads,head_size,page_size,layout", [
    (32, 8, 128, 16, "vllm"),   # Llama-3-8B
    (28, 4, 128, 1, "sglang"),  # Qwen2-7B-like: GQA 7, token pool
    (12, 4, 80, 16, "contiguous"),
])
def test_gpu_realistic_sizes(dtype, num_q_heads, num_kv_heads, head_size, page_size, layout):
    lengths = [(1, 1), (1, 17), (1, 1000), (1, 4097), (1, 8000), (512, 512), (100, 3000), (1, 200), (77, 77)]
    batch = Batch(lengths, num_decodes=5, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_size=head_size,
                  page_size=page_size, dtype=dtype, layout=layout, seed=21)
    check(batch, dtype)  # default split policy
    check(batch, dtype, window_size=(700, -1), softcap=30.0,
          sinks=torch.randn(num_q_heads, generator=batch.generator).to(DEVICE))


@pytest.mark.gpu
@pytest.mark.parametrize("num_decodes", [1, 24, 200])
def test_gpu_decode_batch_sizes(num_decodes):
    g = torch.Generator().manual_seed(num_decodes)
    lengths = [(1, int(n)) for n in torch.randint(1, 6000, (num_decodes,), generator=g)]
    batch = Batch(lengths, num_decodes=num_decodes, num_q_heads=32, num_kv_heads=8, head_size=128, page_size=16,
                  dtype=torch.bfloat16, layout="vllm", seed=num_decodes)
    check(batch, torch.bfloat16)


@pytest.mark.gpu
def test_gpu_many_segments_deterministic():
    """Thousands of concurrent segment programs and their reduction: bit-identical outputs over many
    launches (fixed merge order) that equal the reference."""
    g = torch.Generator().manual_seed(41)
    lengths = [(1, int(n)) for n in torch.randint(2000, 9000, (24,), generator=g)]
    batch = Batch(lengths, num_decodes=24, num_q_heads=32, num_kv_heads=8, head_size=128, page_size=16,
                  dtype=torch.bfloat16, layout="vllm", seed=41)
    workspace = AttentionWorkspace.allocate(24, 24, 32, 128, device=DEVICE, max_total_segments=24 * 48)
    plan = batch.plan(workspace=workspace, split_kv_policy=split(48))
    assert plan.num_segments == 48
    first = batch.run(plan)
    for _ in range(50):
        assert torch.equal(batch.run(plan), first), "outputs differ between identical launches"
    atol, rtol = TOLERANCE[torch.bfloat16]
    assert_close_verbose(first, batch.reference(), atol=atol, rtol=rtol)


@pytest.mark.gpu
def test_gpu_cuda_graph_replay_equals_eager():
    lengths = [(1, 8000), (1, 8000), (1, 8000), (300, 900), (64, 64)]  # pages for the longest lengths used
    batch = Batch(lengths, num_decodes=3, num_q_heads=32, num_kv_heads=8, head_size=128, page_size=16,
                  dtype=torch.bfloat16, layout="vllm", seed=31)
    batch.seq_lens.copy_(torch.tensor([3000, 50, 7000, 900, 64], dtype=torch.int32))
    workspace = AttentionWorkspace.allocate(8, 512, 32, 128, device=DEVICE)
    plan = plan_attention(batch.query_start_loc, batch.seq_lens, num_decodes=3, num_q_heads=32, num_kv_heads=8,
                          head_size=128, page_size=16, max_seqlen_q=300, max_seqlen_k=8000, workspace=workspace)
    assert plan.num_segments > 1
    q = batch.q.clone()
    out = torch.full_like(q, float("nan"))
    sinks = torch.randn(32, device=DEVICE)

    def step():
        paged_attention(q, batch.k_cache, batch.v_cache, batch.block_table, plan, out, softmax_scale=0.088,
                        softcap=20.0, sinks=sinks)

    step()  # compile outside the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    # new lengths and queries in the same buffers: the captured graph must follow them
    for new_lens in ([2999, 8000, 1, 900, 64], [17, 4000, 6000, 600, 64]):
        batch.seq_lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
        q.copy_(torch.randn_like(q))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        replayed = out.clone()
        out.fill_(float("nan"))
        step()
        assert torch.equal(replayed, out), "graph replay differs from eager"
        expected = reference_attention(q, batch.k_cache, batch.v_cache, batch.block_table, batch.query_start_loc,
                                       batch.seq_lens, softmax_scale=0.088, softcap=20.0, sinks=sinks)
        assert_close_verbose(replayed, expected, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_q_heads,num_kv_heads,head_size,page_size,layout", [
    (32, 8, 128, 16, "vllm"),   # Llama-3-8B
    (28, 4, 128, 1, "sglang"),  # GQA 7, token pool
    (64, 4, 128, 16, "vllm"),   # GQA 16: a 16-token draft block spans 4 query blocks
    (12, 4, 80, 16, "contiguous"),
])
def test_gpu_verify_batches(dtype, num_q_heads, num_kv_heads, head_size, page_size, layout):
    lengths = [(4, 4097), (1, 1), (16, 8000), (8, 1000), (2, 17), (5, 300), (1, 6000), (300, 3000), (77, 77)]
    batch = Batch(lengths, num_decodes=7, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_size=head_size,
                  page_size=page_size, dtype=dtype, layout=layout, seed=51)
    check(batch, dtype)  # default split policy
    check(batch, dtype, window_size=(700, -1), softcap=30.0,
          sinks=torch.randn(num_q_heads, generator=batch.generator).to(DEVICE))
    check(batch, dtype, plan_kwargs=dict(split_kv_policy=split(1)), window_size=(3, -1))


def _capture(step):
    step()  # compile outside the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


@pytest.mark.gpu
@pytest.mark.parametrize("padded", [False, True])
def test_gpu_verify_cuda_graph_replay_equals_eager(padded):
    """A uniform verify batch (4 tokens each) captured once, replayed with new lengths; padded: the
    last 3 lanes are CUDA-graph padding (seq_len 0, token rows past the real tokens, garbage pages)."""
    bs, qlen, num_pad = 8, 4, 3 if padded else 0
    lengths = [(qlen, 8000)] * bs
    batch = Batch(lengths, num_decodes=bs, num_q_heads=32, num_kv_heads=8, head_size=128, page_size=16,
                  dtype=torch.bfloat16, layout="vllm", seed=61)
    workspace = AttentionWorkspace.allocate(16, 512, 32, 128, device=DEVICE, max_decode_query_len=qlen)
    plan = plan_attention(batch.query_start_loc, batch.seq_lens, num_decodes=bs, num_q_heads=32, num_kv_heads=8,
                          head_size=128, page_size=16, max_seqlen_q=qlen, max_seqlen_k=8000,
                          max_decode_query_len=qlen, workspace=workspace)
    assert plan.num_segments > 1
    q = batch.q.clone()
    out = torch.full_like(q, float("nan"))
    sinks = torch.randn(32, device=DEVICE)

    def step():
        paged_attention(q, batch.k_cache, batch.v_cache, batch.block_table, plan, out, softmax_scale=0.088,
                        softcap=20.0, sinks=sinks)

    graph = _capture(step)
    real = bs - num_pad
    if padded:
        batch.block_table[real:] = 10**6
    for new_lens in ([4000, 8000, 5, 900, 64, 7000, 4, 3333], [17, 4000, 6000, 600, 64, 8000, 8000, 129]):
        lens = torch.tensor(new_lens, dtype=torch.int32)
        lens[real:] = 0
        batch.seq_lens.copy_(lens)
        q.copy_(torch.randn_like(q))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        replayed = out.clone()
        out.fill_(float("nan"))
        step()
        tokens = real * qlen
        assert torch.equal(replayed[:tokens], out[:tokens]), "graph replay differs from eager"
        expected = reference_attention(q[:tokens], batch.k_cache, batch.v_cache, batch.block_table[:real],
                                       batch.query_start_loc[:real + 1], batch.seq_lens[:real], softmax_scale=0.088,
                                       softcap=20.0, sinks=sinks)
        assert_close_verbose(replayed[:tokens], expected, atol=2e-2, rtol=2e-2)
        assert torch.isnan(replayed[tokens:]).all(), "a padding lane wrote an output row"
