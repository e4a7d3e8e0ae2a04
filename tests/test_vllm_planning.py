"""The vLLM adapter's pure decisions (attnplug/adapters/vllm/planning.py), without vLLM: which layers and calls
attnplug serves, FP8 KV cache included, and how vLLM's per-tensor KV scales reach the kernels."""

import types

import pytest
import torch

from attnplug.adapters.vllm.planning import (
    FP8_QUERY_HAND_BACK_MAX_KV_TOKENS,
    per_tensor_scale,
    unsupported_batch,
    unsupported_fp8_storage,
    unsupported_layer,
    vllms_fp8_query_kernel_is_faster,
)


def mode(name):
    """Stands in for a member of vLLM's ``KVQuantMode`` (only its name is read)."""
    return types.SimpleNamespace(name=name)


def layer_reason(kv_quant_mode):
    return unsupported_layer(alibi_slopes=None, use_alibi_sqrt=False, kv_quant_mode=kv_quant_mode, chunk_lookback=-1)


def batch_reason(kv_dtype, query_dtype, *, q_descale=None, output_scale=None, out_dtype=None, on_gpu=False):
    return unsupported_batch(causal=True, q_descale=q_descale, output_scale=output_scale, mm_prefix_range=None,
                             rswa_prefix_lens=None, kv_dtype=kv_dtype, query_dtype=query_dtype,
                             out_dtype=query_dtype if out_dtype is None else out_dtype, on_gpu=on_gpu)


@pytest.mark.parametrize("name", ["NONE", "FP8_PER_TENSOR"])
def test_unquantized_and_per_tensor_fp8_layers_are_served(name):
    assert layer_reason(None) is None
    assert layer_reason(mode(name)) is None


@pytest.mark.parametrize("name", ["INT8_PER_TOKEN_HEAD", "FP8_PER_TOKEN_HEAD", "INT4_PER_TOKEN_HEAD", "NVFP4",
                                  "TURBOQUANT_K8V4"])
def test_other_kv_quantization_modes_stay_vllms(name):
    assert layer_reason(mode(name)) == f"quantized KV cache ({name})"


def test_other_layer_features_still_decide():
    fp8 = mode("FP8_PER_TENSOR")
    assert unsupported_layer(alibi_slopes=torch.ones(4), use_alibi_sqrt=False, kv_quant_mode=fp8,
                             chunk_lookback=-1) == "ALiBi"
    assert unsupported_layer(alibi_slopes=None, use_alibi_sqrt=False, kv_quant_mode=fp8,
                             chunk_lookback=2) == "chunked (lookback) attention"


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("query_dtype", [torch.float16, torch.bfloat16])
def test_fp8_caches_with_16_bit_queries_are_served_on_any_device(fp8, query_dtype):
    assert batch_reason(fp8, query_dtype) is None
    assert batch_reason(fp8, query_dtype, on_gpu=True) is None
    assert unsupported_fp8_storage(fp8) is None


def test_fp8_caches_with_float32_queries_are_served_off_the_gpu_only():
    assert batch_reason(torch.float8_e4m3fn, torch.float32) is None  # CPU (Triton interpreter) tests
    assert batch_reason(torch.float8_e4m3fn, torch.float32, on_gpu=True) == (
        "an FP8 KV cache with torch.float32 queries on the GPU")


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
def test_fp8_queries_with_their_scale_over_an_fp8_cache_are_served(out_dtype):
    """TRITON_ATTN on CUDA quantizes the query (``q_descale = layer._q_scale``): the kernels read it into a
    16-bit output."""
    one = torch.ones(())
    for kv in (torch.float8_e4m3fn, torch.float8_e5m2):
        assert batch_reason(kv, torch.float8_e4m3fn, q_descale=one, out_dtype=out_dtype, on_gpu=True) is None


def test_fp8_queries_the_kernels_do_not_take_go_to_vllm():
    e4m3, one = torch.float8_e4m3fn, torch.ones(())
    assert batch_reason(e4m3, e4m3, out_dtype=torch.bfloat16) == "a query in torch.float8_e4m3fn without q_descale"
    assert batch_reason(e4m3, e4m3, q_descale=one, out_dtype=torch.float32) == (
        "a query in torch.float8_e4m3fn with output in torch.float32")
    assert batch_reason(torch.bfloat16, e4m3, q_descale=one, out_dtype=torch.bfloat16) == (
        "a query in torch.float8_e4m3fn over a KV cache in torch.bfloat16")
    assert batch_reason(e4m3, torch.float8_e4m3fnuz, q_descale=one, out_dtype=torch.bfloat16) == (
        "a query in torch.float8_e4m3fnuz with q_descale")
    assert batch_reason(e4m3, torch.bfloat16, q_descale=one) == "a query in torch.bfloat16 with q_descale"
    assert batch_reason(e4m3, e4m3, q_descale=one, out_dtype=torch.bfloat16, output_scale=one) == "fp8 output scale"


@pytest.mark.parametrize("kv_dtype", [torch.uint8, torch.int8, torch.float8_e4m3fnuz, torch.float16])
def test_caches_the_kernels_do_not_read_go_to_vllm(kv_dtype):
    assert batch_reason(kv_dtype, torch.bfloat16) == f"KV cache in {kv_dtype} with queries in torch.bfloat16"


def test_rocm_fnuz_fp8_storage_goes_to_vllm():
    assert unsupported_fp8_storage(torch.float8_e4m3fnuz) == "FP8 KV cache stored as torch.float8_e4m3fnuz"


# ----------------------------------------------------------------------------- per-tensor scales
@pytest.mark.parametrize("shape", [(5, 2), (0, 2), (1, 1), (3,)])
def test_vllms_expanded_descale_reduces_to_the_layers_scale_tensor(shape):
    """TRITON_ATTN passes ``layer._k_scale.expand((num_seqs, num_kv_heads))``: the kernels get one element of the
    0-d buffer's own memory (later in-place updates and CUDA-graph replays see the current value)."""
    layer_scale = torch.tensor(0.37)
    descale = layer_scale.expand(shape)
    got = per_tensor_scale(descale)
    assert got.numel() == 1 and got.dtype == torch.float32 and got.data_ptr() == layer_scale.data_ptr()
    assert got is layer_scale or got is descale  # no new tensor unless a one-element view must be made
    layer_scale.fill_(2.5)
    assert got.item() == 2.5


def test_a_broadcast_of_one_element_of_a_larger_tensor_is_a_view_of_that_element():
    scales = torch.tensor([1.0, 2.0, 3.0])
    descale = scales[1].expand(4, 2)  # its _base is the 3-element tensor
    got = per_tensor_scale(descale)
    assert got.numel() == 1 and got.data_ptr() == scales[1].data_ptr() and got.item() == 2.0


@pytest.mark.parametrize("scale", [torch.tensor(0.5), torch.tensor([0.5]), torch.tensor([[0.5]])])
def test_one_element_scales_pass_unchanged(scale):
    assert per_tensor_scale(scale) is scale


def test_distinct_per_sequence_or_per_head_values_are_not_a_per_tensor_scale():
    assert per_tensor_scale(torch.rand(4, 2)) is None
    assert per_tensor_scale(torch.rand(2).expand(4, 2)) is None  # per-head values broadcast over sequences


def test_missing_or_non_float32_scales_are_not_per_tensor_scales():
    assert per_tensor_scale(None) is None
    assert per_tensor_scale(torch.tensor(0.5, dtype=torch.float16)) is None
    assert per_tensor_scale(torch.tensor(0.5, dtype=torch.float64).expand(3, 2)) is None


def unified_attention_kwargs(num_seqs, max_seqlen_k, *, max_seqlen_q=1, seq_threshold_3D=16, split_buffers=True):
    """The keyword arguments of vLLM's ``unified_attention`` that decide its split-K kernel."""
    return dict(seqused_k=torch.ones(num_seqs, dtype=torch.int32), max_seqlen_q=max_seqlen_q,
                max_seqlen_k=max_seqlen_k, seq_threshold_3D=seq_threshold_3D,
                softmax_segm_output=torch.empty(1) if split_buffers else None)


@pytest.mark.parametrize("num_seqs,max_seqlen_k", [(1, 1024), (2, 1024), (3, 600)])
def test_small_fp8_query_decodes_vllm_splits_stay_vllms(num_seqs, max_seqlen_k):
    assert num_seqs * max_seqlen_k <= FP8_QUERY_HAND_BACK_MAX_KV_TOKENS
    assert vllms_fp8_query_kernel_is_faster(unified_attention_kwargs(num_seqs, max_seqlen_k))


@pytest.mark.parametrize("case", [
    dict(num_seqs=4, max_seqlen_k=1024),  # more KV than the bound (H200: attnplug 0.91x of vLLM's time)
    dict(num_seqs=1, max_seqlen_k=4096),
    dict(num_seqs=1, max_seqlen_k=1024, max_seqlen_q=4),  # a verify batch: vLLM's 3D kernel is not certain
    dict(num_seqs=17, max_seqlen_k=64),  # above seq_threshold_3D: vLLM's 2D kernel
    dict(num_seqs=1, max_seqlen_k=1024, seq_threshold_3D=None),  # a release without the 3D kernel
    dict(num_seqs=1, max_seqlen_k=1024, split_buffers=False),
])
def test_other_fp8_query_batches_are_attnplugs(case):
    assert not vllms_fp8_query_kernel_is_faster(unified_attention_kwargs(**case))
