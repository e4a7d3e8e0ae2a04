"""fused_decode_metadata against the unfused torch sequence it replaces (SGLang before PR 20778)."""

import itertools

import pytest
import torch

from attnplug.core.decode_metadata import fused_decode_metadata
from tests.utils import DEVICE, SENTINEL, assert_equal_verbose

ON_GPU = DEVICE.type == "cuda"
EXTRA_ROWS, EXTRA_COLS = 3, 5  # outputs are larger than written: the rest must keep SENTINEL


def reference(out, req_to_token, req_pool_indices, seq_lens, max_seq_pages, seq_len_delta, page_size, mapping):
    """The per-step torch code of SGLang's FlashAttention backend, on copies of the outputs."""
    out = {name: t.clone() for name, t in out.items()}
    bs = seq_lens.numel()
    out["cache_seqlens_int32"][:bs] = (seq_lens + seq_len_delta).to(torch.int32)
    out["cu_seqlens_k"][0] = 0
    out["cu_seqlens_k"][1 : bs + 1] = torch.cumsum(out["cache_seqlens_int32"][:bs], dim=0)
    cols = torch.arange(max_seq_pages, device=req_to_token.device)
    tok = req_to_token[req_pool_indices[:, None], cols[None, :] * page_size]
    out["page_table"][:bs, :max_seq_pages] = tok // page_size
    if mapping is not None:
        out["swa_page_table"][:bs, :max_seq_pages] = mapping[tok] // page_size
    return out


def make_case(bs, page_size, *, swa, index_dtype, max_seq_pages=None, seed=0, device=DEVICE):
    """Random inputs plus SENTINEL-filled outputs with spare rows and columns."""
    gen = torch.Generator().manual_seed(seed)
    if max_seq_pages is None:
        max_seq_pages = 300 if ON_GPU else 7 + bs % 5
    max_context = max_seq_pages * page_size + 3  # a few columns the op must not read
    pool = bs + 11
    num_tokens = 5000
    # Token ids; without SWA some are negative to check floor (not truncating) division.
    low = 0 if swa else -num_tokens
    req_to_token = torch.randint(low, num_tokens, (pool, max_context), generator=gen, dtype=torch.int32)
    req_pool_indices = torch.randperm(pool, generator=gen)[:bs].to(index_dtype)
    seq_lens = torch.randint(1, max_context, (bs,), generator=gen).to(index_dtype)
    mapping = torch.randint(0, 3 * num_tokens, (num_tokens,), generator=gen).to(index_dtype) if swa else None
    rows, cols = bs + EXTRA_ROWS, max_seq_pages + EXTRA_COLS
    out = {
        "cache_seqlens_int32": torch.full((bs + EXTRA_ROWS,), SENTINEL, dtype=torch.int32),
        "cu_seqlens_k": torch.full((bs + 1 + EXTRA_ROWS,), SENTINEL, dtype=torch.int32),
        "page_table": torch.full((rows, cols), SENTINEL, dtype=torch.int32),
    }
    if swa:
        out["swa_page_table"] = torch.full((rows, cols), SENTINEL, dtype=torch.int32)
    move = lambda t: None if t is None else t.to(device)
    inputs = {"req_to_token": move(req_to_token), "req_pool_indices": move(req_pool_indices),
                  "seq_lens": move(seq_lens), "max_seq_pages": max_seq_pages, "page_size": page_size}
    return {k: move(v) for k, v in out.items()}, inputs, move(mapping)


def run_fused(out, inputs, mapping, seq_len_delta):
    fused_decode_metadata(
        out["cache_seqlens_int32"], out["cu_seqlens_k"], out["page_table"], inputs["req_to_token"],
        inputs["req_pool_indices"], inputs["seq_lens"], inputs["max_seq_pages"], seq_len_delta=seq_len_delta,
        page_size=inputs["page_size"], swa_page_table=out.get("swa_page_table"), full_to_swa_index_mapping=mapping,
    )


def check(bs, page_size, swa, delta, index_dtype, seed=0, **kw):
    out, inputs, mapping = make_case(bs, page_size, swa=swa, index_dtype=index_dtype, seed=seed, **kw)
    want = reference(out, inputs["req_to_token"], inputs["req_pool_indices"], inputs["seq_lens"],
                     inputs["max_seq_pages"], delta, page_size, mapping)
    run_fused(out, inputs, mapping, delta)
    for name in want:
        assert_equal_verbose(out[name], want[name], f"{name} (bs={bs}, page={page_size}, swa={swa}, delta={delta})")


BATCHES = [0, 1, 3, 37, 256]
PAGE_SIZES = [1, 2, 16, 64]
FLAGS = list(itertools.product([False, True], [0, 5], [torch.int32, torch.int64]))  # swa, delta, index dtype


@pytest.mark.parametrize("page_size", PAGE_SIZES)
@pytest.mark.parametrize("bs", BATCHES)
def test_matches_reference(bs, page_size):
    """Every batch size x page size; on the CPU each case takes two of the eight flag combinations
    (one without and one with SWA, delta and index dtype rotating with the batch size and page
    size, so every combination meets every batch size and every page size), on the GPU all eight."""
    if ON_GPU:
        flags = FLAGS
    else:
        i = (PAGE_SIZES.index(page_size) + BATCHES.index(bs)) % 4
        flags = [FLAGS[i], FLAGS[i + 4]]
    for seed, (swa, delta, index_dtype) in enumerate(flags):
        check(bs, page_size, swa, delta, index_dtype, seed=seed)


@pytest.mark.parametrize("delta", [-1, 1, 2])
def test_other_deltas(delta):
    """delta 1 would be a constexpr under Triton's default specialization; negatives shrink lengths."""
    check(5, 16, True, delta, torch.int64, seed=delta + 10)


def test_batch_larger_than_one_scan_block():
    """More sequences than the kernel's prefix-sum block (256): the running total must carry."""
    check(600, 64, False, 2, torch.int32, max_seq_pages=3)


def test_zero_pages_writes_only_lengths():
    check(4, 16, True, 0, torch.int32, max_seq_pages=0)


def test_empty_batch_writes_only_cu_seqlens_k0():
    out, inputs, mapping = make_case(0, 16, swa=True, index_dtype=torch.int32)
    before = {k: v.clone() for k, v in out.items()}
    run_fused(out, inputs, mapping, 3)
    assert out["cu_seqlens_k"][0].item() == 0
    assert_equal_verbose(out["cu_seqlens_k"][1:], before["cu_seqlens_k"][1:], "cu_seqlens_k[1:]")
    for name in ("cache_seqlens_int32", "page_table", "swa_page_table"):
        assert_equal_verbose(out[name], before[name], name)


def test_strided_tables():
    """Page tables that are column slices of wider buffers, req_to_token transposed (column stride != 1)."""
    bs, page_size, max_seq_pages = 6, 2, 9
    out, inputs, mapping = make_case(bs, page_size, swa=True, index_dtype=torch.int64, max_seq_pages=max_seq_pages)
    wide = torch.full((bs + 2, 2 * max_seq_pages + 7), SENTINEL, dtype=torch.int32, device=DEVICE)
    swa_wide = torch.full((2 * max_seq_pages + 7, bs + 2), SENTINEL, dtype=torch.int32, device=DEVICE)
    out["page_table"] = wide[:, 3 : 3 + max_seq_pages + 1]  # row stride 2 * max_seq_pages + 7
    out["swa_page_table"] = swa_wide.t()  # column stride bs + 2
    inputs["req_to_token"] = inputs["req_to_token"].t().contiguous().t()
    want = reference(out, inputs["req_to_token"], inputs["req_pool_indices"], inputs["seq_lens"], max_seq_pages, 0,
                     page_size, mapping)
    run_fused(out, inputs, mapping, 0)
    for name in want:
        assert_equal_verbose(out[name], want[name], name)
    assert (wide[:, :3] == SENTINEL).all() and (wide[:, 4 + max_seq_pages :] == SENTINEL).all()


@pytest.mark.parametrize("bs,num_steps,page_size", [(1, 2, 1), (7, 4, 16), (300, 3, 2)])
def test_multi_step_lengths(bs, num_steps, page_size):
    """2-D lengths outputs (a speculative draft's steps): row s is the one-step result for delta + s,
    rows strided inside wider buffers; one page table for all steps; nothing else written."""
    delta = 1
    out, inputs, mapping = make_case(bs, page_size, swa=False, index_dtype=torch.int64, max_seq_pages=5, seed=bs)
    lens_buffer = torch.full((num_steps + 1, bs + 9), SENTINEL, dtype=torch.int32, device=DEVICE)
    cu_buffer = torch.full((num_steps + 1, bs + 12), SENTINEL, dtype=torch.int32, device=DEVICE)
    lengths, cu_lengths = lens_buffer[:num_steps, 2:], cu_buffer[:num_steps, 3:]
    fused_decode_metadata(lengths, cu_lengths, out["page_table"], inputs["req_to_token"], inputs["req_pool_indices"],
                          inputs["seq_lens"], inputs["max_seq_pages"], seq_len_delta=delta, page_size=page_size)
    for step in range(num_steps):
        one = {"cache_seqlens_int32": torch.full((bs + 7,), SENTINEL, dtype=torch.int32, device=DEVICE),
               "cu_seqlens_k": torch.full((bs + 9,), SENTINEL, dtype=torch.int32, device=DEVICE),
               "page_table": out["page_table"]}
        want = reference(one, inputs["req_to_token"], inputs["req_pool_indices"], inputs["seq_lens"],
                         inputs["max_seq_pages"], delta + step, page_size, None)
        assert_equal_verbose(lengths[step], want["cache_seqlens_int32"], f"lengths of step {step}")
        assert_equal_verbose(cu_lengths[step], want["cu_seqlens_k"], f"cu lengths of step {step}")
        assert_equal_verbose(out["page_table"], want["page_table"], "shared page table")
    assert (lens_buffer[:, :2] == SENTINEL).all() and (lens_buffer[num_steps:] == SENTINEL).all()
    assert (cu_buffer[:, :3] == SENTINEL).all() and (cu_buffer[num_steps:] == SENTINEL).all()


@pytest.mark.parametrize("cache,cu,match", [
    ((3, 9), (2, 9), "rows"),  # step counts differ
    ((3, 9), (9,), "rank"),
    ((0, 9), (0, 9), "num_steps"),
])
def test_multi_step_bad_shapes(cache, cu, match):
    args = _valid_args(swa=False)
    args["cache_seqlens_int32"] = torch.zeros(cache, dtype=torch.int32, device=DEVICE)
    args["cu_seqlens_k"] = torch.zeros(cu, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match=match):
        fused_decode_metadata(**args)


def _valid_args(swa=True):
    out, inputs, mapping = make_case(3, 4, swa=swa, index_dtype=torch.int32, max_seq_pages=5)
    return {"cache_seqlens_int32": out["cache_seqlens_int32"], "cu_seqlens_k": out["cu_seqlens_k"],
                "page_table": out["page_table"], "req_to_token": inputs["req_to_token"],
                "req_pool_indices": inputs["req_pool_indices"], "seq_lens": inputs["seq_lens"], "max_seq_pages": 5,
                "page_size": 4, "swa_page_table": out.get("swa_page_table"), "full_to_swa_index_mapping": mapping}


ERROR_CASES = [
    ("page_size", 3, ValueError, "page_size"),
    ("page_size", 0, ValueError, "page_size"),
    ("max_seq_pages", 100, ValueError, "max_seq_pages"),
    ("max_seq_pages", -1, ValueError, "max_seq_pages"),
    ("seq_len_delta", 1.5, TypeError, "seq_len_delta"),
    ("seq_len_delta", 2**31, ValueError, "seq_len_delta"),
    ("req_to_token", lambda a: a["req_to_token"].long(), TypeError, "req_to_token"),
    ("seq_lens", lambda a: a["seq_lens"].float(), TypeError, "seq_lens"),
    ("req_pool_indices", lambda a: a["req_pool_indices"].to(torch.int16), TypeError, "req_pool_indices"),
    ("full_to_swa_index_mapping", lambda a: a["full_to_swa_index_mapping"].float(), TypeError, "full_to_swa"),
    ("page_table", lambda a: a["page_table"].long(), TypeError, "page_table"),
    ("swa_page_table", lambda a: a["swa_page_table"].long(), TypeError, "swa_page_table"),
    ("cu_seqlens_k", lambda a: a["cu_seqlens_k"].long(), TypeError, "cu_seqlens_k"),
    ("cache_seqlens_int32", lambda a: a["cache_seqlens_int32"].long(), TypeError, "cache_seqlens_int32"),
    ("swa_page_table", None, ValueError, "together"),
    ("req_pool_indices", lambda a: a["req_pool_indices"][:2], ValueError, "req_pool_indices"),
    ("cu_seqlens_k", lambda a: a["cu_seqlens_k"][:3], ValueError, "cu_seqlens_k"),
    ("cache_seqlens_int32", lambda a: a["cache_seqlens_int32"][:2], ValueError, "cache_seqlens_int32"),
    ("cache_seqlens_int32", lambda a: a["cache_seqlens_int32"][::2], ValueError, "contiguous"),
    ("page_table", lambda a: a["page_table"][:2], ValueError, "page_table"),
    ("page_table", lambda a: a["page_table"][:, :4], ValueError, "page_table"),
    ("swa_page_table", lambda a: a["swa_page_table"][0], ValueError, "swa_page_table"),
    ("req_to_token", lambda a: a["req_to_token"][0], ValueError, "req_to_token"),
    ("seq_lens", lambda a: a["seq_lens"][None], ValueError, "seq_lens"),
    ("seq_lens", lambda a: a["seq_lens"].tolist(), TypeError, "seq_lens"),
]


@pytest.mark.parametrize("name,value,error,match", ERROR_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(ERROR_CASES)])
def test_bad_input(name, value, error, match):
    args = _valid_args()
    args[name] = value(args) if callable(value) else value
    before = args["page_table"].clone()
    max_seq_pages = args.pop("max_seq_pages")
    with pytest.raises(error, match=match):
        fused_decode_metadata(*[args.pop(k) for k in ("cache_seqlens_int32", "cu_seqlens_k", "page_table",
                                                      "req_to_token", "req_pool_indices", "seq_lens")],
                              max_seq_pages, **args)
    assert torch.equal(args.get("page_table", before), before)


@pytest.mark.gpu
def test_device_mismatch():
    args = _valid_args()
    args["seq_lens"] = args["seq_lens"].cpu()
    with pytest.raises(ValueError, match="seq_lens"):
        fused_decode_metadata(**args)


@pytest.mark.gpu
@pytest.mark.parametrize("page_size", [1, 64])
def test_cuda_graph_replay(page_size):
    """Captured once, replayed on new lengths / pool rows written in place: equals the reference."""
    bs = 32
    out, inputs, mapping = make_case(bs, page_size, swa=True, index_dtype=torch.int64, max_seq_pages=8192 // page_size)
    fused_decode_metadata(out["cache_seqlens_int32"], out["cu_seqlens_k"], out["page_table"], inputs["req_to_token"],
                          inputs["req_pool_indices"], inputs["seq_lens"], inputs["max_seq_pages"], seq_len_delta=1,
                          page_size=page_size, swa_page_table=out["swa_page_table"], full_to_swa_index_mapping=mapping)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run_fused(out, inputs, mapping, 1)
    for seed in range(3):
        _, fresh, fresh_mapping = make_case(bs, page_size, swa=True, index_dtype=torch.int64,
                                            max_seq_pages=8192 // page_size, seed=100 + seed)
        for name in ("req_to_token", "req_pool_indices", "seq_lens"):
            inputs[name].copy_(fresh[name])
        mapping.copy_(fresh_mapping)
        for t in out.values():
            t.fill_(SENTINEL)
        want = reference(out, inputs["req_to_token"], inputs["req_pool_indices"], inputs["seq_lens"],
                         inputs["max_seq_pages"], 1, page_size, mapping)
        graph.replay()
        torch.cuda.synchronize()
        for name in want:
            assert_equal_verbose(out[name], want[name], f"{name} after replay {seed}")
