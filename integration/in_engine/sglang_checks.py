"""Checks of attnplug's SGLang patches against the installed SGLang (0.5.9 or 0.5.23).

Run inside an SGLang venv by ``integration/test_sglang_adapter.py`` with ``TRITON_INTERPRET=1`` and
the test-only ``sgl_kernel`` CPU stand-in first on ``PYTHONPATH`` (not collected by the top-level
run: the dev venv has no SGLang). Every patch must apply or skip exactly as declared for this
release; every patch that applies must give the original's results on the same random inputs.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import inspect
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import attnplug
from attnplug import report
from attnplug.adapters.docs import matrix_cell
from attnplug.adapters.engines import ENGINES
from attnplug.adapters.patching import check_patch, resolve_target, version_problem
from attnplug.adapters.registry import engine_patches

RELEASE = str(ENGINES["sglang"].installed_version())
PATCHES = {patch.id: patch for patch in engine_patches("sglang")}
SENTINEL = -7777
_FA = "sglang.srt.layers.attention.flashattention_backend"
_TRITON = "sglang.srt.layers.attention.triton_backend"

# What each patch does on each tested release (the support-matrix cell), and so whether it applies.
EXPECTED = {
    "0.5.9": {
        "sglang.fa.decode_metadata": "applies",
        "sglang.fa.scheduler_metadata": "not applicable",
        "sglang.spec.metadata_copy": "upstream already has it",
        "sglang.triton.kv_splits": "not applicable",
    },
    "0.5.23": {
        "sglang.fa.decode_metadata": "upstream already has it",
        "sglang.fa.scheduler_metadata": "upstream already has it",
        "sglang.spec.metadata_copy": "upstream already has it",
        "sglang.triton.kv_splits": "opt-in (applies when named)",
    },
}
APPLYING = [patch_id for patch_id, cell in EXPECTED.get(RELEASE, {}).items() if cell.startswith(("applies", "opt-in"))]
old_release = pytest.mark.skipif(RELEASE != "0.5.9", reason="SGLang 0.5.9 only")
new_release = pytest.mark.skipif(RELEASE != "0.5.23", reason="SGLang 0.5.23 only")


@pytest.fixture(autouse=True)
def _nothing_stays_applied():
    yield
    attnplug.revert()


def _source(module: str) -> str:
    """Text of an installed module, found without importing it."""
    return Path(importlib.util.find_spec(module).origin).read_text()


def test_release_is_tested_and_every_patch_is_declared():
    assert RELEASE in EXPECTED, f"sglang {RELEASE} is not one of the tested releases {sorted(EXPECTED)}"
    assert set(PATCHES) == set(EXPECTED[RELEASE])
    assert RELEASE in ENGINES["sglang"].tested_releases


@pytest.mark.parametrize("patch_id", sorted(PATCHES))
def test_each_patch_applies_or_skips_as_declared(patch_id):
    patch = PATCHES[patch_id]
    cell = EXPECTED[RELEASE][patch_id]
    assert matrix_cell(patch, RELEASE) == cell
    outcome = attnplug.apply_to_sglang(**{keyword: keyword == patch.keyword for keyword in
                                          (p.keyword for p in PATCHES.values())})
    (result,) = outcome.results
    if cell.startswith(("applies", "opt-in")):  # named here, so an opt-in patch applies too
        assert (result.status, result.reason) == ("applied", ""), result
        attnplug.revert()
        by_default = attnplug.apply_to_sglang(**{p.keyword: False for p in PATCHES.values() if p is not patch})
        (default_result,) = by_default.results
        assert default_result.status == ("skipped" if patch.opt_in else "applied"), default_result
    else:
        assert result.status == "skipped"
        assert result.reason == version_problem(patch)
        assert f"sglang {RELEASE}" in result.reason
        assert ("already has this change upstream" in result.reason) == (cell == "upstream already has it")


@pytest.mark.parametrize("patch_id", APPLYING)
def test_applying_patch_targets_resolve_and_revert_restores_identity(patch_id):
    patch = PATCHES[patch_id]
    assert check_patch(patch) is None
    bindings = [resolve_target(target) for target in patch.targets]
    originals = [vars(owner)[name] for owner, name in bindings]
    assert attnplug.apply_to_sglang(**{patch.keyword: True} | {
        p.keyword: False for p in PATCHES.values() if p is not patch}).applied == [patch_id]
    patched = [vars(owner)[name] for owner, name in bindings]
    assert all(new is not old and new.__wrapped__ is old for new, old in zip(patched, originals))
    assert attnplug.revert() == [patch_id]
    assert all(vars(owner)[name] is old for (owner, name), old in zip(bindings, originals))


# --------------------------------------------------------------------------------------------------
# Why the skipped patches skip: the facts behind each "upstream already has it" / "not applicable"
# --------------------------------------------------------------------------------------------------


def _installed_file(distribution: str, path: str) -> str:
    (file,) = [f for f in importlib.metadata.files(distribution) if str(f) == path]
    return Path(file.locate()).read_text()


@old_release
def test_0_5_9_facts_behind_the_skips():
    fa = _source(_FA)
    assert "# TODO: fuse these kernels" in fa and "scheduler_metadata" not in fa  # no precompute in 0.5.9
    # ... and its pinned sgl-kernel cannot compute one (read from the real wheel, not the CPU stand-in)
    assert importlib.metadata.version("sgl-kernel") == "0.3.21"
    assert "def get_scheduler_metadata" not in _installed_file("sgl-kernel", "sgl_kernel/flash_attn.py")
    # NSA multi-step already copies with SGLang's fused kernel (PR 17554)
    assert "fused_metadata_copy_multi_cuda" in _source("sglang.srt.layers.attention.nsa_backend")
    # Triton's get_num_kv_splits has 0.5.9's signature (no uneven_batch): the declaration covers 0.5.23's
    from sglang.srt.layers.attention import triton_backend

    assert tuple(inspect.signature(triton_backend.TritonAttnBackend.get_num_kv_splits).parameters) == (
        "self", "num_kv_splits", "seq_lens")


@new_release
def test_0_5_23_facts_behind_the_skips():
    fa = _source(_FA)
    assert "from sglang.kernels.ops.attention.metadata import" in fa and "normal_decode_set_metadata" in fa
    assert "_fused_decode_metadata_kernel" in _source("sglang.kernels.ops.attention.metadata")
    assert "def _compute_scheduler_metadata" in fa and "scheduler_metadata=" in fa
    assert "fused_metadata_copy_multi_cuda" in _source("sglang.srt.layers.attention.dsa_backend")


# --------------------------------------------------------------------------------------------------
# sglang.fa.decode_metadata on 0.5.9: same outputs as the original on the same random inputs
# --------------------------------------------------------------------------------------------------


def _swa_pool(num_tokens: int, generator: torch.Generator):
    from sglang.srt.mem_cache.swa_memory_pool import SWAKVPool

    pool = SWAKVPool.__new__(SWAKVPool)  # only its full-to-SWA mapping is used here
    pool.full_to_swa_index_mapping = torch.randint(0, 300, (num_tokens,), generator=generator, dtype=torch.int64)
    return pool


def _poisoned(shape) -> torch.Tensor:
    return torch.full(shape, SENTINEL, dtype=torch.int32)


@old_release
@pytest.mark.parametrize("page_size", [1, 4, 16])
@pytest.mark.parametrize("swa", [False, True], ids=["full", "swa"])
@pytest.mark.parametrize("seq_len_delta", [0, 3])
def test_replay_normal_decode_set_metadata_matches_original(page_size, swa, seq_len_delta):
    import importlib

    fa = importlib.import_module(_FA)
    original = fa.normal_decode_set_metadata
    generator = torch.Generator().manual_seed(1000 * page_size + 10 * swa + seq_len_delta)
    bs, max_bs, pool_rows, max_context, num_tokens = 5, 7, 11, 97, 500
    req_to_token = torch.randint(0, num_tokens, (pool_rows, max_context), generator=generator, dtype=torch.int32)
    req_pool_indices = torch.randperm(pool_rows, generator=generator)[:bs]
    seq_lens = torch.randint(1, max_context - seq_len_delta, (bs,), generator=generator)
    strided_indices = torch.arange(0, max_context, page_size)
    columns = -(-max_context // page_size)
    max_seq_pages = -(-(int(seq_lens.max()) + seq_len_delta) // page_size)
    pool = _swa_pool(num_tokens, generator) if swa else None

    def run(fn):
        cache_seqlens = _poisoned((bs,))
        cu_seqlens_k = _poisoned((bs + 1,))
        cu_seqlens_k[0] = 0  # SGLang's capture makes it 0 and neither version relies on anything else
        page_buffer, swa_buffer = _poisoned((max_bs, columns)), _poisoned((max_bs, columns))
        fn(cache_seqlens, cu_seqlens_k, page_buffer[:bs], req_to_token.clone(), req_pool_indices.clone(),
           strided_indices, max_seq_pages, seq_lens.clone(), seq_len_delta, page_size,
           swa_buffer[:bs] if swa else None, pool)
        return cache_seqlens, cu_seqlens_k, page_buffer, swa_buffer

    expected = run(original)
    assert attnplug.apply_to_sglang(decode_metadata=True).applied == ["sglang.fa.decode_metadata"]
    assert fa.normal_decode_set_metadata is not original
    calls = report.op_calls["fused_decode_metadata"]
    got = run(fa.normal_decode_set_metadata)
    assert report.op_calls["fused_decode_metadata"] == calls + 1  # the fused kernel ran, no fall-back
    for name, want, have in zip(("cache_seqlens_int32", "cu_seqlens_k", "page_table", "swa_page_table"), expected, got):
        assert torch.equal(want, have), f"{name} differs:\n{want}\n{have}"
    assert (expected[2][:bs, :max_seq_pages] != SENTINEL).all() and (expected[2][bs:] == SENTINEL).all()


@old_release
def test_replay_calls_the_fused_kernel_cannot_take_go_to_the_original():
    import importlib

    fa = importlib.import_module(_FA)
    original = fa.normal_decode_set_metadata
    bs, page_size = 3, 3  # not a power of two
    req_to_token = torch.arange(4 * 30, dtype=torch.int32).view(4, 30)
    args = (req_to_token, torch.tensor([2, 0, 3]), torch.arange(0, 30, page_size), 4, torch.tensor([7, 12, 5]), 0,
            page_size)

    def run(fn):
        outputs = _poisoned((bs,)), torch.zeros(bs + 1, dtype=torch.int32), _poisoned((bs, 10))
        fn(*outputs, *args)
        return outputs

    expected = run(original)
    attnplug.apply_to_sglang(decode_metadata=True)
    calls = report.op_calls["fused_decode_metadata"]
    got = run(fa.normal_decode_set_metadata)
    assert report.op_calls["fused_decode_metadata"] == calls
    assert all(torch.equal(want, have) for want, have in zip(expected, got))


def _flash_attention_backend(page_size: int, swa_pool):
    import importlib

    fa = importlib.import_module(_FA)
    backend = fa.FlashAttentionBackend.__new__(fa.FlashAttentionBackend)  # what init_forward_metadata reads
    backend.page_size = page_size
    backend.device = torch.device("cpu")
    backend.has_local_attention = False
    backend.use_sliding_window_kv_pool = swa_pool is not None
    if swa_pool is not None:
        backend.token_to_kv_pool = swa_pool
    backend.topk = 0
    backend.speculative_step_id = 0
    backend.speculative_num_steps = 0
    backend.forward_metadata = None
    return backend


def _decode_batch(generator, spec_info=None):
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    bs, pool_rows, max_context = 5, 9, 83
    seq_lens = torch.randint(1, max_context, (bs,), generator=generator)
    req_to_token = torch.randint(0, 400, (pool_rows, max_context), generator=generator, dtype=torch.int32)
    return SimpleNamespace(
        forward_mode=ForwardMode.DECODE, spec_info=spec_info, encoder_lens=None, batch_size=bs, seq_lens=seq_lens,
        seq_lens_cpu=seq_lens.clone(), req_pool_indices=torch.randperm(pool_rows, generator=generator)[:bs],
        req_to_token_pool=SimpleNamespace(req_to_token=req_to_token), out_cache_loc=None,
    )


def _assert_same_metadata(want, have) -> None:
    assert type(want) is type(have)
    for field in dataclasses.fields(want):
        a, b = getattr(want, field.name), getattr(have, field.name)
        if isinstance(a, torch.Tensor):
            assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), field.name
        else:
            assert a == b, field.name


@old_release
@pytest.mark.parametrize("page_size", [1, 8])
@pytest.mark.parametrize("swa", [False, True], ids=["full", "swa"])
def test_eager_normal_decode_metadata_matches_original(page_size, swa):
    import importlib

    fa = importlib.import_module(_FA)
    generator = torch.Generator().manual_seed(7 * page_size + swa)
    pool = _swa_pool(400, generator) if swa else None
    batch = _decode_batch(generator)
    backend = _flash_attention_backend(page_size, pool)
    backend.init_forward_metadata(batch)
    expected = backend.forward_metadata
    attnplug.apply_to_sglang(decode_metadata=True)
    calls = report.op_calls["fused_decode_metadata"]
    backend.forward_metadata = None
    fa.FlashAttentionBackend.init_forward_metadata(backend, batch)
    assert report.op_calls["fused_decode_metadata"] == calls + 1
    _assert_same_metadata(expected, backend.forward_metadata)
    assert expected.page_table.shape == (batch.batch_size, -(-int(batch.seq_lens_cpu.max()) // page_size))
    assert (expected.swa_page_table is not None) == swa


@old_release
def test_eager_draft_decode_goes_to_the_original():
    generator = torch.Generator().manual_seed(3)
    batch = _decode_batch(generator, spec_info=object())
    backend = _flash_attention_backend(1, None)
    backend.init_forward_metadata(batch)
    expected = backend.forward_metadata
    attnplug.apply_to_sglang(decode_metadata=True)
    calls = report.op_calls["fused_decode_metadata"]
    backend.init_forward_metadata(batch)
    assert report.op_calls["fused_decode_metadata"] == calls
    _assert_same_metadata(expected, backend.forward_metadata)


# --------------------------------------------------------------------------------------------------
# sglang.triton.kv_splits on 0.5.23: valid split counts, same attention output as the stock plan
# --------------------------------------------------------------------------------------------------


def _triton_backend(device_core_count: int):
    import importlib

    triton_backend = importlib.import_module(_TRITON)
    backend = triton_backend.TritonAttnBackend.__new__(triton_backend.TritonAttnBackend)
    backend.device_core_count = device_core_count  # 0 on CPU: SGLang would never launch its heuristic
    backend.static_kv_splits = False
    backend.enable_deterministic = False
    backend.split_tile_size = None
    backend.max_kv_splits = 8
    backend.num_head, backend.num_kv_head, backend.v_head_dim = 4, 2, 32
    backend.max_context_len = 4096
    return backend


def _splits(get_num_kv_splits, backend, seq_lens, num_group=1):
    num_kv_splits = torch.full((seq_lens.shape[0] * num_group,), SENTINEL, dtype=torch.int32)
    uneven_batch = torch.zeros(1, dtype=torch.int32)
    get_num_kv_splits(backend, num_kv_splits, seq_lens, uneven_batch)
    return num_kv_splits


@new_release
@pytest.mark.parametrize("device_core_count", [0, 132])
@pytest.mark.parametrize("bs,num_group", [(3, 1), (5, 2), (300, 1)])
def test_kv_splits_stay_in_sglang_contract(device_core_count, bs, num_group):
    import importlib

    from attnplug.adapters.sglang.triton_splits import planned_kv_splits

    cls = importlib.import_module(_TRITON).TritonAttnBackend
    original = cls.get_num_kv_splits
    seq_lens = torch.randint(1, 4000, (bs,), generator=torch.Generator().manual_seed(bs))
    backend = _triton_backend(device_core_count)
    stock = _splits(original, backend, seq_lens, num_group)
    attnplug.apply_to_sglang(kv_splits=True)
    ours = _splits(cls.get_num_kv_splits, backend, seq_lens, num_group)
    assert ((stock >= 1) & (stock <= backend.max_kv_splits)).all()
    assert ((ours >= 1) & (ours <= backend.max_kv_splits)).all()
    if device_core_count == 0:  # no GPU: the original's own fill, untouched
        assert torch.equal(ours, stock)
    else:
        assert (ours == planned_kv_splits(backend, bs * num_group)).all()


def _reference_decode(q, k_buffer, v_buffer, kv_indptr, kv_indices, scale) -> torch.Tensor:
    """float64 decode attention: q [bs, H, D] over each sequence's KV slots -> [bs, H, D]."""
    group = q.shape[1] // k_buffer.shape[1]
    rows = []
    for i in range(q.shape[0]):
        slots = kv_indices[kv_indptr[i]:kv_indptr[i + 1]]
        keys = k_buffer[slots].double().repeat_interleave(group, dim=1)  # [n, H, D]
        values = v_buffer[slots].double().repeat_interleave(group, dim=1)
        weights = torch.softmax(torch.einsum("hd,nhd->hn", q[i].double(), keys) * scale, dim=-1)
        rows.append(torch.einsum("hn,nhd->hd", weights, values))
    return torch.stack(rows)


@new_release
def test_kv_splits_give_the_same_decode_attention_as_the_stock_plan():
    import importlib

    from sglang.kernels.ops.attention.decode_attention import decode_attention_fwd

    cls = importlib.import_module(_TRITON).TritonAttnBackend
    generator = torch.Generator().manual_seed(11)
    backend = _triton_backend(132)
    bs, heads, kv_heads, head_dim, num_slots = 3, backend.num_head, backend.num_kv_head, backend.v_head_dim, 700
    seq_lens = torch.tensor([37, 301, 130])
    kv_indptr = torch.zeros(bs + 1, dtype=torch.int32)
    kv_indptr[1:] = torch.cumsum(seq_lens, 0)
    kv_indices = torch.randperm(num_slots, generator=generator)[: int(seq_lens.sum())].to(torch.int64)
    q = torch.randn(bs, heads, head_dim, generator=generator)
    k_buffer = torch.randn(num_slots, kv_heads, head_dim, generator=generator)
    v_buffer = torch.randn(num_slots, kv_heads, head_dim, generator=generator)

    def attend(num_kv_splits):
        out = torch.full((bs, heads, head_dim), float("nan"))
        logits = torch.full((bs, heads, backend.max_kv_splits, head_dim), float("nan"))
        lse = torch.full((bs, heads, backend.max_kv_splits), float("nan"))
        decode_attention_fwd(q, k_buffer, v_buffer, out, kv_indptr, kv_indices, logits, lse, num_kv_splits,
                             backend.max_kv_splits, head_dim**-0.5, 1.0, 1.0)
        return out

    stock_splits = _splits(cls.get_num_kv_splits, backend, seq_lens)
    attnplug.apply_to_sglang(kv_splits=True)
    our_splits = _splits(cls.get_num_kv_splits, backend, seq_lens)
    assert not torch.equal(stock_splits, our_splits)  # a different plan, so the comparison means something
    reference = _reference_decode(q, k_buffer, v_buffer, kv_indptr, kv_indices, head_dim**-0.5)
    stock, ours = attend(stock_splits), attend(our_splits)
    torch.testing.assert_close(stock.double(), reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.double(), reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-5)
