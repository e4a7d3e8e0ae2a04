"""paged_attention over FP8 KV caches (e4m3, e5m2) with per-tensor scales, against the float64 reference
on the dequantized cache (CPU interpreter: fp32 / fp16 queries; GPU: bf16 / fp16)."""

import pytest
import torch

from attnplug.core.attention import FP8_KV_DTYPES, AttentionWorkspace, paged_attention, plan_attention
from tests.core.test_paged_attention import (
    DECODE_LENS,
    PREFILL_LENS,
    TOLERANCE,
    VERIFY_LENS,
    Batch,
    _capture,
    check,
    dequantized,
    reference_attention,
    split,
)
from tests.utils import DEVICE, assert_close_verbose

E4M3, E5M2 = FP8_KV_DTYPES
CPU_DTYPES = [torch.float32, torch.float16]


@pytest.mark.parametrize("kv_dtype", FP8_KV_DTYPES)
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("num_q_heads,num_kv_heads,head_size,page_size,segments", [
    (4, 2, 32, 16, 3),   # GQA 2
    (6, 2, 48, 1, 1),    # GQA 3, head 48, page 1, no split
    (5, 1, 80, 16, 2),   # MQA, head 80
])
def test_decode_verify_and_prefill_rows(kv_dtype, dtype, num_q_heads, num_kv_heads, head_size, page_size, segments):
    lengths = DECODE_LENS[:2] + VERIFY_LENS[:5] + PREFILL_LENS
    batch = Batch(lengths, num_decodes=7, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_size=head_size,
                  page_size=page_size, dtype=dtype, kv_dtype=kv_dtype, seed=head_size + segments)
    assert batch.k_cache.dtype == kv_dtype and batch.k_scale.item() != 1.0 != batch.v_scale.item()
    plan = check(batch, dtype, plan_kwargs=dict(split_kv_policy=split(segments)))
    assert plan.num_segments == segments


@pytest.mark.parametrize("kv_dtype", FP8_KV_DTYPES)
@pytest.mark.parametrize("options", [
    dict(window_size=(9, -1), softcap=3.0, sinks=True),
    dict(window_size=(40, -1)),
])
def test_window_softcap_sinks(kv_dtype, options):
    batch = Batch(DECODE_LENS[:3] + VERIFY_LENS[:3] + PREFILL_LENS[:2], num_decodes=6, num_q_heads=6, num_kv_heads=2,
                  head_size=32, page_size=16, dtype=torch.float16, kv_dtype=kv_dtype, seed=5)
    if options.get("sinks"):
        options = dict(options, sinks=torch.randn(6, generator=batch.generator).mul(2).to(DEVICE))
    for segments in (1, 4):
        check(batch, torch.float16, plan_kwargs=dict(split_kv_policy=split(segments)), **options)


@pytest.mark.parametrize("layout", ["vllm", "sglang", "strided_dim"])
def test_non_contiguous_caches(layout):
    batch = Batch(DECODE_LENS[:3] + VERIFY_LENS[:2] + PREFILL_LENS[:2], num_decodes=5, num_q_heads=4, num_kv_heads=2,
                  head_size=32, page_size=16, dtype=torch.float16, layout=layout, kv_dtype=E4M3, seed=6)
    assert not batch.k_cache.is_contiguous()
    check(batch, torch.float16, plan_kwargs=dict(split_kv_policy=split(2)))


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16] if DEVICE.type == "cuda" else [torch.float16])
def test_fp8_queries_with_their_scale(out_dtype):
    """Queries quantized to FP8 (vLLM's query quantization on CUDA) with q_scale; out in 16 bits."""
    batch = Batch(DECODE_LENS[:2] + VERIFY_LENS[:4] + PREFILL_LENS[:2], num_decodes=6, num_q_heads=6, num_kv_heads=2,
                  head_size=48, page_size=16, dtype=out_dtype, kv_dtype=E4M3, seed=29)
    q_scale = (batch.q.float().abs().amax() / 448).reshape(1)
    q8 = (batch.q.float() / q_scale).to(E4M3)
    expected = batch.reference(q=dequantized(q8, q_scale))
    for segments in (1, 3):
        out = torch.full(batch.q.shape, float("nan"), dtype=out_dtype, device=DEVICE)
        paged_attention(q8, batch.k_cache, batch.v_cache, batch.block_table, batch.plan(split_kv_policy=split(segments)),
                        out, softmax_scale=48 ** -0.5, q_scale=q_scale, k_scale=batch.k_scale, v_scale=batch.v_scale)
        atol, rtol = TOLERANCE[out_dtype]
        assert_close_verbose(out, expected, atol=atol, rtol=rtol, what=f"{segments} segments")


def test_scales_are_read_on_the_device_at_every_call():
    """New scale values in the same tensors (what a CUDA-graph replay sees) change the result."""
    batch = Batch(VERIFY_LENS[:4] + PREFILL_LENS[:1], num_decodes=4, num_q_heads=4, num_kv_heads=2, head_size=32,
                  page_size=16, dtype=torch.float32, kv_dtype=E5M2, seed=9)
    plan = batch.plan(split_kv_policy=split(2))
    first = batch.run(plan)
    batch.k_scale.mul_(3.0)
    batch.v_scale.mul_(0.5)
    second = batch.run(plan)
    assert not torch.allclose(first, second)
    assert_close_verbose(second, batch.reference(), atol=2e-4, rtol=2e-4)


def test_padding_lanes_touch_no_real_row():
    real = VERIFY_LENS[:3]
    num_pad = 2
    batch = Batch(real + [(4, 1)] * num_pad, num_decodes=len(real) + num_pad, num_q_heads=4, num_kv_heads=2,
                  head_size=32, page_size=16, dtype=torch.float32, kv_dtype=E4M3, seed=19)
    batch.block_table[len(real):] = 10**6
    batch.seq_lens[len(real):] = 0
    num_real_tokens = sum(ql for ql, _ in real)
    workspace = AttentionWorkspace.allocate(8, 64, 4, 32, device=DEVICE, max_decode_query_len=16)
    expected = reference_attention(batch.q[:num_real_tokens], dequantized(batch.k_cache, batch.k_scale),
                                   dequantized(batch.v_cache, batch.v_scale), batch.block_table[:len(real)],
                                   batch.query_start_loc[:len(real) + 1], batch.seq_lens[:len(real)],
                                   softmax_scale=32 ** -0.5)
    for segments in (1, 3):
        got = batch.run(batch.plan(workspace=workspace, split_kv_policy=split(segments), max_decode_query_len=16))
        assert_close_verbose(got[:num_real_tokens], expected, atol=2e-4, rtol=2e-4, what=f"{segments} segments")
        assert torch.isnan(got[num_real_tokens:]).all(), "a padding lane wrote an output row"


def test_errors_name_the_parameter():
    batch = Batch(DECODE_LENS[:2] + PREFILL_LENS[:1], num_decodes=2, num_q_heads=4, num_kv_heads=2, head_size=32,
                  page_size=16, dtype=torch.float32, kv_dtype=E4M3)
    plan = batch.plan()
    out = torch.empty_like(batch.q)
    run = lambda **kw: paged_attention(**{**dict(q=batch.q, k_cache=batch.k_cache, v_cache=batch.v_cache,
                                                  block_table=batch.block_table, plan=plan, out=out,
                                                  softmax_scale=1.0, k_scale=batch.k_scale, v_scale=batch.v_scale),
                                          **kw})
    with pytest.raises(ValueError, match="k_scale is required"):
        run(k_scale=None)
    with pytest.raises(ValueError, match="v_scale is required"):
        run(v_scale=None)
    with pytest.raises(ValueError, match="v_scale must be a float32 tensor with one element"):
        run(v_scale=torch.ones(2, device=DEVICE))
    with pytest.raises(ValueError, match="k_scale must be a float32 tensor"):
        run(k_scale=torch.ones(1, dtype=torch.float64, device=DEVICE))
    with pytest.raises(ValueError, match="k_scale must be a float32 tensor"):
        run(k_scale=0.5)
    with pytest.raises(TypeError, match="v_cache dtype"):
        run(v_cache=batch.v_cache.view(torch.float8_e5m2))
    with pytest.raises(TypeError, match="k_cache dtype torch.uint8"):
        run(k_cache=batch.k_cache.view(torch.uint8), v_cache=batch.v_cache.view(torch.uint8))
    q8 = batch.q.to(E4M3)
    with pytest.raises(ValueError, match="q_scale is required"):
        run(q=q8, out=out.half())
    with pytest.raises(ValueError, match="out must match q"):
        run(q=q8, q_scale=batch.k_scale)  # float32 out
    with pytest.raises(ValueError, match="q_scale is for FP8 queries only"):
        run(q_scale=batch.k_scale)
    plain = Batch(DECODE_LENS[:2], num_decodes=2, num_q_heads=4, num_kv_heads=2, head_size=32, page_size=16,
                  dtype=torch.float32)
    with pytest.raises(ValueError, match="for FP8 caches only"):
        plain.run(plain.plan(), k_scale=batch.k_scale, v_scale=batch.v_scale)


def test_empty_batch_is_a_no_op():
    batch = Batch([], num_decodes=0, num_q_heads=4, num_kv_heads=2, head_size=32, page_size=16,
                  dtype=torch.float32, kv_dtype=E4M3)
    assert torch.isnan(batch.run(batch.plan(), q=torch.randn(3, 4, 32, device=DEVICE))).all()


# ----------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
@pytest.mark.parametrize("kv_dtype", FP8_KV_DTYPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_q_heads,num_kv_heads,head_size,page_size,layout", [
    (32, 8, 128, 16, "vllm"),   # Llama-3-8B
    (28, 4, 128, 1, "sglang"),  # GQA 7, token pool
    (12, 4, 80, 16, "contiguous"),
])
def test_gpu_realistic_sizes(kv_dtype, dtype, num_q_heads, num_kv_heads, head_size, page_size, layout):
    lengths = [(1, 1), (1, 4097), (1, 8000), (4, 4097), (16, 8000), (8, 1000), (1, 200), (512, 512), (100, 3000)]
    batch = Batch(lengths, num_decodes=7, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_size=head_size,
                  page_size=page_size, dtype=dtype, layout=layout, kv_dtype=kv_dtype, seed=21)
    check(batch, dtype)  # default split policy
    check(batch, dtype, window_size=(700, -1), softcap=30.0,
          sinks=torch.randn(num_q_heads, generator=batch.generator).to(DEVICE))


@pytest.mark.gpu
def test_gpu_cuda_graph_replay_follows_lengths_and_scales():
    bs, qlen, num_pad = 8, 4, 2
    batch = Batch([(qlen, 8000)] * bs, num_decodes=bs, num_q_heads=32, num_kv_heads=8, head_size=128, page_size=16,
                  dtype=torch.bfloat16, layout="vllm", kv_dtype=E4M3, seed=61)
    workspace = AttentionWorkspace.allocate(16, 512, 32, 128, device=DEVICE, max_decode_query_len=qlen)
    plan = plan_attention(batch.query_start_loc, batch.seq_lens, num_decodes=bs, num_q_heads=32, num_kv_heads=8,
                          head_size=128, page_size=16, max_seqlen_q=qlen, max_seqlen_k=8000,
                          max_decode_query_len=qlen, workspace=workspace)
    q = batch.q.clone()
    out = torch.full_like(q, float("nan"))

    def step():
        paged_attention(q, batch.k_cache, batch.v_cache, batch.block_table, plan, out, softmax_scale=0.088,
                        k_scale=batch.k_scale, v_scale=batch.v_scale)

    graph = _capture(step)
    real = bs - num_pad
    batch.block_table[real:] = 10**6
    tokens = real * qlen
    for new_lens, scales in (([4000, 8000, 5, 900, 64, 7000, 4, 3333], (0.5, 2.0)),
                             ([17, 4000, 6000, 600, 64, 8000, 8000, 129], (1.7, 0.3))):
        lens = torch.tensor(new_lens, dtype=torch.int32)
        lens[real:] = 0
        batch.seq_lens.copy_(lens)
        batch.k_scale.fill_(scales[0])
        batch.v_scale.fill_(scales[1])
        q.copy_(torch.randn_like(q))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        replayed = out.clone()
        out.fill_(float("nan"))
        step()
        assert torch.equal(replayed[:tokens], out[:tokens]), "graph replay differs from eager"
        expected = reference_attention(q[:tokens], dequantized(batch.k_cache, batch.k_scale),
                                       dequantized(batch.v_cache, batch.v_scale), batch.block_table[:real],
                                       batch.query_start_loc[:real + 1], batch.seq_lens[:real], softmax_scale=0.088)
        atol, rtol = TOLERANCE[torch.bfloat16]
        assert_close_verbose(replayed[:tokens], expected, atol=atol, rtol=rtol)
        assert torch.isnan(replayed[tokens:]).all(), "a padding lane wrote an output row"


def test_fp8_launch_options_deepen_the_decode_pipeline_only():
    """FP8 tiles hold half the bytes: decodes over an FP8 cache get more pipeline stages, verify blocks
    keep the verify kernel's options (its register budget)."""
    from attnplug.core.attention import plan as plan_module

    decode = Batch(DECODE_LENS, num_decodes=5, num_q_heads=4, num_kv_heads=2, head_size=32, page_size=16,
                   dtype=torch.float16).plan()
    assert decode.fp8_decode_options == dict(decode.decode_options, num_stages=plan_module.FP8_DECODE_NUM_STAGES)
    assert plan_module.FP8_DECODE_NUM_STAGES > decode.decode_options["num_stages"]
    verify = Batch(VERIFY_LENS, num_decodes=len(VERIFY_LENS), num_q_heads=4, num_kv_heads=2, head_size=32,
                   page_size=16, dtype=torch.float16).plan()
    assert verify.max_decode_query_len > 1 and verify.fp8_decode_options == verify.decode_options
