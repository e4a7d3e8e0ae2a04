"""Checks of attnplug's SGLang patches against the installed SGLang (0.5.8.post1, 0.5.9, 0.5.10.post1 or 0.5.23).

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
import sys
import types
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
from attnplug.core.fa3 import find_fa3_binding

RELEASE = str(ENGINES["sglang"].installed_version())
PATCHES = {patch.id: patch for patch in engine_patches("sglang")}
SENTINEL = -7777
_FA = "sglang.srt.layers.attention.flashattention_backend"
_TRITON = "sglang.srt.layers.attention.triton_backend"

# What each patch does on each tested release (the support-matrix cell), and so whether it applies.
EXPECTED = {
    "0.5.8.post1": {
        "sglang.attnplug.draft_backends": "not applicable",
        "sglang.fa.decode_metadata": "applies",
        "sglang.fa.scheduler_metadata": "not applicable",
        "sglang.spec.metadata_copy": "applies",
        "sglang.triton.kv_splits": "not applicable",
    },
    "0.5.9": {
        "sglang.attnplug.draft_backends": "not applicable",
        "sglang.fa.decode_metadata": "applies",
        "sglang.fa.scheduler_metadata": "not applicable",
        "sglang.spec.metadata_copy": "upstream already has it",
        "sglang.triton.kv_splits": "not applicable",
    },
    "0.5.10.post1": {
        "sglang.attnplug.draft_backends": "not applicable",
        "sglang.fa.decode_metadata": "upstream already has it",
        "sglang.fa.scheduler_metadata": "applies",
        "sglang.spec.metadata_copy": "upstream already has it",
        "sglang.triton.kv_splits": "not applicable",
    },
    "0.5.23": {
        "sglang.attnplug.draft_backends": "applies",
        "sglang.fa.decode_metadata": "upstream already has it",
        "sglang.fa.scheduler_metadata": "upstream already has it",
        "sglang.spec.metadata_copy": "upstream already has it",
        "sglang.triton.kv_splits": "opt-in (applies when named)",
    },
}
APPLYING = [patch_id for patch_id, cell in EXPECTED.get(RELEASE, {}).items() if cell.startswith(("applies", "opt-in"))]
per_tensor_copy_release = pytest.mark.skipif(RELEASE != "0.5.8.post1", reason="SGLang 0.5.8.post1 only")
old_release = pytest.mark.skipif(RELEASE != "0.5.9", reason="SGLang 0.5.9 only")
unfused_decode_metadata = pytest.mark.skipif(RELEASE not in ("0.5.8.post1", "0.5.9"),
                                             reason="SGLang 0.5.8.post1 and 0.5.9 only")
no_precompute_release = pytest.mark.skipif(RELEASE != "0.5.10.post1", reason="SGLang 0.5.10.post1 only")
new_release = pytest.mark.skipif(RELEASE != "0.5.23", reason="SGLang 0.5.23 only")


@pytest.fixture(autouse=True)
def _nothing_stays_applied():
    yield
    attnplug.revert()


def _apply_only(keyword: str):
    """``attnplug.apply_to_sglang`` with only this patch's keyword on (the API turns the others on by default)."""
    return attnplug.apply_to_sglang(**{patch.keyword: patch.keyword == keyword for patch in PATCHES.values()})


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
    outcome = _apply_only(patch.keyword)
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
    assert _apply_only(patch.keyword).applied == [patch_id]
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


_NSA = "sglang.srt.layers.attention.nsa_backend"


def _assert_sgl_kernel_0_3_21_lacks_get_scheduler_metadata():
    """0.5.8-0.5.9's pinned sgl-kernel cannot compute FA3 scheduler metadata (read from the real
    wheel, not the CPU stand-in)."""
    assert importlib.metadata.version("sgl-kernel") == "0.3.21"
    assert "def get_scheduler_metadata" not in _installed_file("sgl-kernel", "sgl_kernel/flash_attn.py")


def _assert_nsa_draft_copies_fused_upstream():
    """0.5.9+: NSA multi-step already copies with SGLang's fused kernel (PR 17554)."""
    assert "fused_metadata_copy_multi_cuda" in _source(_NSA)


def _assert_triton_splits_signature_without_uneven_batch():
    """Before 0.5.23, Triton's get_num_kv_splits has no uneven_batch: the declaration covers 0.5.23's."""
    from sglang.srt.layers.attention import triton_backend

    assert tuple(inspect.signature(triton_backend.TritonAttnBackend.get_num_kv_splits).parameters) == (
        "self", "num_kv_splits", "seq_lens")


@per_tensor_copy_release
def test_0_5_8_facts_behind_the_patches():
    nsa = _source(_NSA)
    assert "fused_metadata_copy" not in nsa  # the draft steps' copies are per tensor (PR 17554 came in 0.5.9) ...
    assert "init_forward_metadata_replay_cuda_graph_from_precomputed" in nsa  # ... from one precomputed batch
    assert "# TODO: fuse these kernels" in _source(_FA)  # the unfused decode metadata, as in 0.5.9
    _assert_sgl_kernel_0_3_21_lacks_get_scheduler_metadata()


@old_release
def test_0_5_9_facts_behind_the_skips():
    fa = _source(_FA)
    assert "# TODO: fuse these kernels" in fa and "scheduler_metadata" not in fa  # no precompute in 0.5.9 ...
    _assert_sgl_kernel_0_3_21_lacks_get_scheduler_metadata()  # ... and nothing to compute one with
    _assert_nsa_draft_copies_fused_upstream()
    _assert_triton_splits_signature_without_uneven_batch()


@no_precompute_release
def test_0_5_10_facts_behind_the_patches():
    fa = _source(_FA)
    assert "scheduler_metadata" not in fa  # no FA3 precompute in the backend ...
    kernel = _installed_file("sglang-kernel", "sgl_kernel/flash_attn.py")  # ... though its kernel can compute one
    assert importlib.metadata.version("sglang-kernel") == "0.4.1"
    assert "def get_scheduler_metadata(" in kernel and "    scheduler_metadata=None," in kernel
    assert "_fused_metadata_kernel_ps1_no_swa" in fa  # the decode metadata is fused upstream (PR 20778)
    _assert_nsa_draft_copies_fused_upstream()
    _assert_triton_splits_signature_without_uneven_batch()


@new_release
def test_0_5_23_facts_behind_the_skips():
    fa = _source(_FA)
    assert "from sglang.kernels.ops.attention.metadata import" in fa and "normal_decode_set_metadata" in fa
    assert "_fused_decode_metadata_kernel" in _source("sglang.kernels.ops.attention.metadata")
    assert "def _compute_scheduler_metadata" in fa and "scheduler_metadata=" in fa
    assert "fused_metadata_copy_multi_cuda" in _source("sglang.srt.layers.attention.dsa_backend")


# --------------------------------------------------------------------------------------------------
# sglang.fa.decode_metadata on 0.5.8.post1 / 0.5.9: same outputs as the original on the same random inputs
# --------------------------------------------------------------------------------------------------


def _swa_pool(num_tokens: int, generator: torch.Generator):
    from sglang.srt.mem_cache.swa_memory_pool import SWAKVPool

    pool = SWAKVPool.__new__(SWAKVPool)  # only its full-to-SWA mapping is used here
    pool.full_to_swa_index_mapping = torch.randint(0, 300, (num_tokens,), generator=generator, dtype=torch.int64)
    return pool


def _poisoned(shape) -> torch.Tensor:
    return torch.full(shape, SENTINEL, dtype=torch.int32)


@unfused_decode_metadata
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
    assert _apply_only("decode_metadata").applied == ["sglang.fa.decode_metadata"]
    assert fa.normal_decode_set_metadata is not original
    calls = report.op_calls["fused_decode_metadata"]
    got = run(fa.normal_decode_set_metadata)
    assert report.op_calls["fused_decode_metadata"] == calls + 1  # the fused kernel ran, no fall-back
    for name, want, have in zip(("cache_seqlens_int32", "cu_seqlens_k", "page_table", "swa_page_table"), expected, got):
        assert torch.equal(want, have), f"{name} differs:\n{want}\n{have}"
    assert (expected[2][:bs, :max_seq_pages] != SENTINEL).all() and (expected[2][bs:] == SENTINEL).all()


@unfused_decode_metadata
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
    _apply_only("decode_metadata")
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


def _assert_same_metadata(want, have, where: str = "metadata") -> None:
    """Two SGLang metadata dataclasses hold equal tensors (and equal everything else), recursively."""
    assert type(want) is type(have), where
    for field in dataclasses.fields(want):
        a, b, name = getattr(want, field.name), getattr(have, field.name), f"{where}.{field.name}"
        if isinstance(a, torch.Tensor):
            assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), name
        elif dataclasses.is_dataclass(a):
            _assert_same_metadata(a, b, name)
        else:
            assert a == b, name


def _reference_decode(q, k_buffer, v_buffer, slots_per_seq, scale) -> torch.Tensor:
    """float64 decode attention: q [bs, H, D] over each sequence's KV slots (rows of the
    [num_slots, kv_heads, D] buffers; GQA by repetition) -> [bs, H, D]."""
    group = q.shape[1] // k_buffer.shape[1]
    rows = []
    for qi, slots in zip(q, slots_per_seq):
        keys = k_buffer[slots].double().repeat_interleave(group, dim=1)  # [n, H, D]
        values = v_buffer[slots].double().repeat_interleave(group, dim=1)
        weights = torch.softmax(torch.einsum("hd,nhd->hn", qi.double(), keys) * scale, dim=-1)
        rows.append(torch.einsum("hn,nhd->hd", weights, values))
    return torch.stack(rows)


@unfused_decode_metadata
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
    _apply_only("decode_metadata")
    calls = report.op_calls["fused_decode_metadata"]
    backend.forward_metadata = None
    fa.FlashAttentionBackend.init_forward_metadata(backend, batch)
    assert report.op_calls["fused_decode_metadata"] == calls + 1
    _assert_same_metadata(expected, backend.forward_metadata)
    assert expected.page_table.shape == (batch.batch_size, -(-int(batch.seq_lens_cpu.max()) // page_size))
    assert (expected.swa_page_table is not None) == swa


@unfused_decode_metadata
def test_eager_draft_decode_goes_to_the_original():
    generator = torch.Generator().manual_seed(3)
    batch = _decode_batch(generator, spec_info=object())
    backend = _flash_attention_backend(1, None)
    backend.init_forward_metadata(batch)
    expected = backend.forward_metadata
    _apply_only("decode_metadata")
    calls = report.op_calls["fused_decode_metadata"]
    backend.init_forward_metadata(batch)
    assert report.op_calls["fused_decode_metadata"] == calls
    _assert_same_metadata(expected, backend.forward_metadata)


# --------------------------------------------------------------------------------------------------
# sglang.fa.scheduler_metadata on 0.5.10.post1: computed once per batch, passed where 0.5.11 passes it
# --------------------------------------------------------------------------------------------------

Q_HEADS, KV_HEADS, HEAD_DIM, LAYERS = 4, 2, 32, 2


class _StandInFlashAttention:
    """TEST-ONLY stand-in for sglang-kernel 0.4.1's ``sgl_kernel.flash_attn`` (there is no FA3 on CPU).

    ``get_scheduler_metadata`` (the real signature) records its arguments and returns int32
    [1 + 3 * bs] encoding the batch it was computed for (bs, cache_seqlens, cu_seqlens_q[1:],
    max_seqlen_k). ``flash_attn_with_kvcache`` (the real signature) records its arguments, fails on
    scheduler metadata of another batch (stale metadata is what would break FA3) and computes
    paged decode attention in float64.
    """

    def __init__(self, *, with_scheduler: bool = True):
        self.metadata_calls: list[dict] = []
        self.attention_calls: list[dict] = []
        self.module = types.ModuleType("sgl_kernel.flash_attn")
        self.module.flash_attn_with_kvcache = self.flash_attn_with_kvcache
        self.module.flash_attn_varlen_func = self.flash_attn_varlen_func
        if with_scheduler:
            self.module.get_scheduler_metadata = self.get_scheduler_metadata

    @staticmethod
    def encode(cache_seqlens, cu_seqlens_q, max_seqlen_k) -> torch.Tensor:
        bs = cache_seqlens.shape[0]
        return torch.cat([torch.tensor([bs]), cache_seqlens.long(), cu_seqlens_q[1:].long(),
                          torch.full((bs,), max_seqlen_k)]).to(torch.int32)

    def get_scheduler_metadata(self, batch_size, max_seqlen_q, max_seqlen_k, num_heads, num_heads_k, headdim,
                               cache_seqlens, qkv_dtype=torch.bfloat16, headdim_v=None, cu_seqlens_q=None,
                               cu_seqlens_k=None, cu_seqlens_k_new=None, seqused_q=None, leftpad_k=None,
                               page_size=None, max_seqlen_k_new=0, causal=False, window_size=(-1, -1),
                               attention_chunk=0, has_softcap=False, num_splits=0, pack_gqa=None, sm_margin=0):
        self.metadata_calls.append(dict(
            batch_size=batch_size, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, num_heads=num_heads,
            num_heads_k=num_heads_k, headdim=headdim, headdim_v=headdim if headdim_v is None else headdim_v,
            qkv_dtype=qkv_dtype, cache_seqlens=cache_seqlens, cu_seqlens_q=cu_seqlens_q, page_size=page_size,
            causal=causal, window_size=tuple(window_size), has_softcap=has_softcap, num_splits=num_splits,
            pack_gqa=pack_gqa, sm_margin=sm_margin, unused=(cu_seqlens_k, cu_seqlens_k_new, seqused_q, leftpad_k,
                                                            max_seqlen_k_new, attention_chunk)))
        return self.encode(cache_seqlens, cu_seqlens_q, max_seqlen_k)

    def flash_attn_with_kvcache(self, q, k_cache, v_cache, k=None, v=None, qv=None, rotary_cos=None, rotary_sin=None,
                                cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, page_table=None,
                                cu_seqlens_q=None, cu_seqlens_k_new=None, max_seqlen_q=None, rotary_seqlens=None,
                                q_descale=None, k_descale=None, v_descale=None, softmax_scale=None, causal=False,
                                window_size=(-1, -1), attention_chunk=None, softcap=0.0, rotary_interleaved=True,
                                scheduler_metadata=None, num_splits=0, pack_gqa=None, sm_margin=0,
                                return_softmax_lse=False, sinks=None, score_mod=None, aux_tensors=None, ver=3):
        self.attention_calls.append(dict(
            q=q, k_cache=k_cache, v_cache=v_cache, cache_seqlens=cache_seqlens, page_table=page_table,
            cu_seqlens_q=cu_seqlens_q, max_seqlen_q=max_seqlen_q, causal=causal, window_size=tuple(window_size),
            softcap=softcap, scheduler_metadata=scheduler_metadata, num_splits=num_splits, pack_gqa=pack_gqa,
            sm_margin=sm_margin))
        assert k is None and v is None and cu_seqlens_k_new is None and not return_softmax_lse and max_seqlen_q == 1
        if scheduler_metadata is not None:
            bs = cache_seqlens.shape[0]
            this_batch = self.encode(cache_seqlens, cu_seqlens_q, 0)[: 1 + 2 * bs]
            assert torch.equal(scheduler_metadata[: 1 + 2 * bs], this_batch), ("stale", scheduler_metadata, this_batch)
        assert not softcap, "the checks' layers have no soft cap"
        page_size = k_cache.shape[1]
        slots_per_seq = []
        for pages, length in zip(page_table, cache_seqlens.tolist()):
            positions = torch.arange(max(0, length - 1 - window_size[0]) if window_size[0] >= 0 else 0, length)
            slots_per_seq.append(pages[positions // page_size].long() * page_size + positions % page_size)
        return _reference_decode(q, k_cache.flatten(0, 1), v_cache.flatten(0, 1), slots_per_seq,
                                 softmax_scale).to(q.dtype)

    def flash_attn_varlen_func(self, *args, **kwargs):
        raise NotImplementedError("the stand-in serves decode only")


def _use_fa3(monkeypatch, stand_in: _StandInFlashAttention) -> _StandInFlashAttention:
    """Make ``stand_in`` the installed ``sgl_kernel.flash_attn`` for one test (attnplug's lookup included)."""
    monkeypatch.setitem(sys.modules, "sgl_kernel.flash_attn", stand_in.module)
    find_fa3_binding.cache_clear()  # attnplug looks the binding up once per process
    return stand_in


@pytest.fixture(autouse=True)
def _fresh_fa3_lookup():
    yield
    find_fa3_binding.cache_clear()  # no test's stand-in outlives it


class _PagedPool:
    """SGLang's KV pool for the FA backend: page-aligned token slots per request row, two layers of K/V."""

    def __init__(self, generator: torch.Generator, page_size: int, rows: int = 7, max_context: int = 48):
        pages_per_row, num_pages = max_context // page_size, (rows * max_context) // page_size + 3
        pages = torch.randperm(num_pages, generator=generator)[: rows * pages_per_row].view(rows, pages_per_row)
        self.req_to_token = (pages[:, :, None] * page_size + torch.arange(page_size)).reshape(rows, max_context).int()
        shape = (num_pages * page_size, KV_HEADS, HEAD_DIM)
        self.k = [torch.randn(shape, generator=generator) for _ in range(LAYERS)]
        self.v = [torch.randn(shape, generator=generator) for _ in range(LAYERS)]
        self.page_size = page_size

    def model_runner(self):
        from sglang.srt.configs.model_config import AttentionArch

        config = SimpleNamespace(
            is_encoder_decoder=False, context_len=self.req_to_token.shape[1], attention_arch=AttentionArch.MHA,
            is_local_attention_model=False, head_dim=HEAD_DIM, get_num_kv_heads=lambda tp_size: KV_HEADS // tp_size,
            hf_text_config=SimpleNamespace(num_attention_heads=Q_HEADS, attn_logit_softcapping=None),
        )
        server_args = SimpleNamespace(kv_cache_dtype="auto", speculative_eagle_topk=None,
                                      speculative_num_draft_tokens=None, enable_deterministic_inference=False,
                                      disable_cuda_graph=False)
        return SimpleNamespace(
            sliding_window_size=None, model_config=config, device=torch.device("cpu"), kv_cache_dtype=torch.float32,
            req_to_token_pool=SimpleNamespace(req_to_token=self.req_to_token), server_args=server_args,
            page_size=self.page_size, attn_cp_size=1, token_to_kv_pool=SimpleNamespace(), tp_size=1,
        )

    def backend(self):
        """A FlashAttentionBackend built by SGLang's own ``__init__`` (patched or not, as applied now)."""
        import importlib

        return importlib.import_module(_FA).FlashAttentionBackend(self.model_runner())

    def decode_batch(self, seq_lens: torch.Tensor, req_pool_indices: torch.Tensor, spec_info=None):
        from sglang.srt.model_executor.forward_batch_info import ForwardMode

        return SimpleNamespace(
            forward_mode=ForwardMode.DECODE, spec_info=spec_info, encoder_lens=None, batch_size=seq_lens.shape[0],
            seq_lens=seq_lens, seq_lens_cpu=seq_lens.clone(), req_pool_indices=req_pool_indices, out_cache_loc=None,
            req_to_token_pool=SimpleNamespace(req_to_token=self.req_to_token),
            token_to_kv_pool=SimpleNamespace(get_kv_buffer=lambda layer_id: (self.k[layer_id], self.v[layer_id])),
        )

    def reference(self, q, layer_id, seq_lens, req_pool_indices, window_left=-1) -> torch.Tensor:
        """float64 decode attention over the request rows' token slots: q [bs, H * D] -> [bs, H * D]."""
        slots_per_seq = [
            self.req_to_token[row, max(0, length - 1 - window_left) if window_left >= 0 else 0:length].long()
            for length, row in zip(seq_lens.tolist(), req_pool_indices.tolist())
        ]
        out = _reference_decode(q.view(-1, Q_HEADS, HEAD_DIM), self.k[layer_id], self.v[layer_id], slots_per_seq,
                                HEAD_DIM**-0.5)
        return out.reshape(q.shape[0], -1)


def _layer(layer_id: int, sliding_window_size=None, k_scale=None, v_scale=None):
    from sglang.srt.layers.radix_attention import AttentionType

    return SimpleNamespace(layer_id=layer_id, is_cross_attention=False, attn_type=AttentionType.DECODER,
                           sliding_window_size=sliding_window_size, tp_q_head_num=Q_HEADS, tp_k_head_num=KV_HEADS,
                           tp_v_head_num=KV_HEADS, head_dim=HEAD_DIM, qk_head_dim=HEAD_DIM, v_head_dim=HEAD_DIM,
                           scaling=HEAD_DIM**-0.5, logit_cap=0.0, logit_capping_method="tanh", use_irope=False,
                           xai_temperature_len=-1, k_scale=k_scale, v_scale=v_scale)


def _decode_all_layers(backend, batch, queries, layers=None) -> list[torch.Tensor]:
    layers = layers or [_layer(i) for i in range(LAYERS)]
    return [backend.forward_decode(q, None, None, layer, batch) for q, layer in zip(queries, layers)]


def _assert_computed_for(metadata_call: dict, attention_call: dict) -> None:
    """The scheduler metadata was computed with the scheduling parameters of the call it went to."""
    q, k_cache, v_cache = attention_call["q"], attention_call["k_cache"], attention_call["v_cache"]
    want = dict(batch_size=q.shape[0], max_seqlen_q=attention_call["max_seqlen_q"], num_heads=q.shape[1],
                num_heads_k=k_cache.shape[2], headdim=q.shape[2], headdim_v=v_cache.shape[3], qkv_dtype=q.dtype,
                page_size=k_cache.shape[1], causal=attention_call["causal"],
                window_size=attention_call["window_size"], has_softcap=attention_call["softcap"] > 0,
                num_splits=attention_call["num_splits"], pack_gqa=attention_call["pack_gqa"],
                sm_margin=attention_call["sm_margin"])
    assert {key: metadata_call[key] for key in want} == want
    assert metadata_call["cache_seqlens"] is attention_call["cache_seqlens"]
    assert metadata_call["cu_seqlens_q"] is attention_call["cu_seqlens_q"]


def _random_decode(generator, pool: _PagedPool, bs: int):
    max_context = pool.req_to_token.shape[1]
    seq_lens = torch.randint(1, max_context + 1, (bs,), generator=generator)
    seq_lens[0] = max_context
    req_pool_indices = torch.randperm(pool.req_to_token.shape[0], generator=generator)[:bs]
    queries = [torch.randn(bs, Q_HEADS * HEAD_DIM, generator=generator) for _ in range(LAYERS)]
    return seq_lens, req_pool_indices, queries


@no_precompute_release
@pytest.mark.parametrize("page_size", [1, 4])
def test_eager_decode_computes_scheduler_metadata_once_for_every_layer(monkeypatch, page_size):
    fa3 = _use_fa3(monkeypatch, _StandInFlashAttention())
    generator = torch.Generator().manual_seed(50 + page_size)
    pool = _PagedPool(generator, page_size)
    seq_lens, req_pool_indices, queries = _random_decode(generator, pool, bs=5)
    batch = pool.decode_batch(seq_lens, req_pool_indices)
    stock = pool.backend()
    stock.init_forward_metadata(batch)
    expected = _decode_all_layers(stock, batch, queries)
    assert not fa3.metadata_calls and all(call["scheduler_metadata"] is None for call in fa3.attention_calls)

    assert _apply_only("scheduler_metadata").applied == ["sglang.fa.scheduler_metadata"]
    backend, calls = pool.backend(), report.op_calls["fa3_scheduler_metadata"]
    backend.init_forward_metadata(batch)
    fa3.attention_calls.clear()
    got = _decode_all_layers(backend, batch, queries)
    assert report.op_calls["fa3_scheduler_metadata"] == calls + 1  # once per batch, not per layer
    (metadata_call,) = fa3.metadata_calls
    scheduler_metadata = backend.forward_metadata.scheduler_metadata
    assert torch.equal(scheduler_metadata, fa3.encode(backend.forward_metadata.cache_seqlens_int32,
                                                      backend.forward_metadata.cu_seqlens_q, int(seq_lens.max())))
    assert len(fa3.attention_calls) == LAYERS
    for call in fa3.attention_calls:
        assert call["scheduler_metadata"] is scheduler_metadata
        _assert_computed_for(metadata_call, call)
    _assert_same_metadata(stock.forward_metadata, backend.forward_metadata)
    for layer_id, (want, have) in enumerate(zip(expected, got)):
        assert torch.equal(want, have)
        torch.testing.assert_close(have.double(), pool.reference(queries[layer_id], layer_id, seq_lens,
                                                                  req_pool_indices), rtol=1e-5, atol=1e-5)


@no_precompute_release
def test_draft_decode_and_swa_layers_get_no_scheduler_metadata(monkeypatch):
    fa3 = _use_fa3(monkeypatch, _StandInFlashAttention())
    generator = torch.Generator().manual_seed(61)
    pool = _PagedPool(generator, page_size=1)
    seq_lens, req_pool_indices, queries = _random_decode(generator, pool, bs=4)
    _apply_only("scheduler_metadata")
    backend = pool.backend()
    backend.init_forward_metadata(pool.decode_batch(seq_lens, req_pool_indices, spec_info=SimpleNamespace()))
    assert getattr(backend.forward_metadata, "scheduler_metadata", None) is None and not fa3.metadata_calls

    batch = pool.decode_batch(seq_lens, req_pool_indices)
    backend.init_forward_metadata(batch)
    window = 6
    outputs = _decode_all_layers(backend, batch, queries, layers=[_layer(0, sliding_window_size=window), _layer(1)])
    swa_call, full_call = fa3.attention_calls
    assert swa_call["window_size"] == (window, 0) and swa_call["scheduler_metadata"] is None
    assert full_call["scheduler_metadata"] is backend.forward_metadata.scheduler_metadata is not None
    torch.testing.assert_close(outputs[0].double(), pool.reference(queries[0], 0, seq_lens, req_pool_indices, window),
                               rtol=1e-5, atol=1e-5)


@no_precompute_release
@pytest.mark.parametrize("page_size", [1, 4])
def test_graph_scheduler_metadata_is_refreshed_in_place_at_every_replay(monkeypatch, page_size):
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    fa3 = _use_fa3(monkeypatch, _StandInFlashAttention())
    generator = torch.Generator().manual_seed(70 + page_size)
    pool = _PagedPool(generator, page_size)
    max_bs, bs = 6, 4
    stock = pool.backend()
    _apply_only("scheduler_metadata")
    backend = pool.backend()
    for each in (stock, backend):
        each.init_cuda_graph_state(max_bs, max_bs)
    buffer = backend.attnplug_scheduler_metadata.graph_buffer
    assert buffer.dtype == torch.int32 and buffer.shape == (1 + 8 * 4,)
    buffer.fill_(SENTINEL)
    for each in (stock, backend):  # what SGLang's graph runner passes at capture
        each.init_forward_metadata_capture_cuda_graph(bs, bs, torch.zeros(bs, dtype=torch.int64),
                                                      torch.ones(bs, dtype=torch.int32), None, ForwardMode.DECODE,
                                                      None)
    captured = backend.decode_cuda_graph_metadata[bs].scheduler_metadata
    n = captured.numel()
    assert captured.data_ptr() == buffer.data_ptr() and (buffer[n:] == 0).all()
    assert torch.equal(captured, fa3.encode(torch.ones(bs), torch.arange(bs + 1), 1))

    for step in range(2):  # two replays of the same graph with new lengths
        seq_lens, req_pool_indices, queries = _random_decode(generator, pool, bs)
        args = (bs, req_pool_indices, seq_lens, int(seq_lens.sum()), None, ForwardMode.DECODE, None, seq_lens.clone())
        stock.init_forward_metadata_replay_cuda_graph(*args)
        backend.init_forward_metadata_replay_cuda_graph(*args)
        metadata = backend.forward_metadata
        assert metadata is backend.decode_cuda_graph_metadata[bs] and metadata.scheduler_metadata is captured
        assert torch.equal(captured, fa3.encode(seq_lens, torch.arange(bs + 1), int(seq_lens.max()))), step
        assert (buffer[n:] == 0).all()
        _assert_same_metadata(stock.forward_metadata, metadata)
        fa3.attention_calls.clear()
        expected = _decode_all_layers(stock, pool.decode_batch(seq_lens, req_pool_indices), queries)
        got = _decode_all_layers(backend, pool.decode_batch(seq_lens, req_pool_indices), queries)
        assert [call["scheduler_metadata"] for call in fa3.attention_calls] == [None] * LAYERS + [captured] * LAYERS
        for want, have in zip(expected, got):
            assert torch.equal(want, have)


@no_precompute_release
def test_without_get_scheduler_metadata_the_backend_stays_stock(monkeypatch):
    fa3 = _use_fa3(monkeypatch, _StandInFlashAttention(with_scheduler=False))
    generator = torch.Generator().manual_seed(83)
    pool = _PagedPool(generator, page_size=1)
    seq_lens, req_pool_indices, queries = _random_decode(generator, pool, bs=3)
    assert _apply_only("scheduler_metadata").applied == ["sglang.fa.scheduler_metadata"]
    backend = pool.backend()
    assert backend.flash_attn_with_kvcache is fa3.module.flash_attn_with_kvcache
    assert not hasattr(backend, "attnplug_scheduler_metadata") and "init_forward_metadata" not in vars(backend)
    batch = pool.decode_batch(seq_lens, req_pool_indices)
    backend.init_forward_metadata(batch)
    _decode_all_layers(backend, batch, queries)
    assert [call["scheduler_metadata"] for call in fa3.attention_calls] == [None] * LAYERS


@no_precompute_release
@pytest.mark.parametrize("model", ["mla", "no_head_count"])
def test_a_model_the_precompute_does_not_serve_leaves_the_backend_stock(monkeypatch, model):
    from sglang.srt.configs.model_config import AttentionArch

    fa3 = _use_fa3(monkeypatch, _StandInFlashAttention())
    pool = _PagedPool(torch.Generator().manual_seed(97), page_size=1)
    runner = pool.model_runner()
    if model == "mla":
        runner.model_config.attention_arch = AttentionArch.MLA
    else:
        del runner.model_config.hf_text_config.num_attention_heads
    assert _apply_only("scheduler_metadata").applied == ["sglang.fa.scheduler_metadata"]
    import importlib

    backend = importlib.import_module(_FA).FlashAttentionBackend(runner)  # SGLang's own __init__ still runs
    assert not hasattr(backend, "attnplug_scheduler_metadata") and "init_forward_metadata" not in vars(backend)
    assert backend.flash_attn_with_kvcache is fa3.module.flash_attn_with_kvcache


@no_precompute_release
def test_revert_makes_later_backends_stock(monkeypatch):
    fa3 = _use_fa3(monkeypatch, _StandInFlashAttention())
    generator = torch.Generator().manual_seed(89)
    pool = _PagedPool(generator, page_size=1)
    seq_lens, req_pool_indices, _ = _random_decode(generator, pool, bs=3)
    _apply_only("scheduler_metadata")
    built_while_patched = pool.backend()
    attnplug.revert()
    built_after = pool.backend()
    assert not hasattr(built_after, "attnplug_scheduler_metadata") and "init_forward_metadata" not in vars(built_after)
    batch = pool.decode_batch(seq_lens, req_pool_indices)
    built_after.init_forward_metadata(batch)
    assert getattr(built_after.forward_metadata, "scheduler_metadata", None) is None and not fa3.metadata_calls
    built_while_patched.init_forward_metadata(batch)  # its CUDA graphs would depend on the refresh: it keeps it
    assert built_while_patched.forward_metadata.scheduler_metadata is not None and len(fa3.metadata_calls) == 1


# --------------------------------------------------------------------------------------------------
# sglang.spec.metadata_copy on 0.5.8.post1: every draft step's graph metadata as SGLang's copies leave it
# --------------------------------------------------------------------------------------------------

NSA_INDEX_TOPK, DRAFT_STEPS = 24, 3


def _stand_in_flashmla_metadata(backend, cache_seqlens: torch.Tensor, seq_len_q: int):
    """TEST-ONLY stand-in for FlashMLA's ``get_mla_metadata`` (CUDA only): int32 tile metadata [4, 8]
    and num_splits [bs + 1] that depend on the lengths, in SGLang's ``NSAFlashMLAMetadata``."""
    import importlib

    tiles = (cache_seqlens.sum() + torch.arange(32)).view(4, 8).to(torch.int32)
    num_splits = torch.nn.functional.pad(torch.cumsum(cache_seqlens % 5 + seq_len_q, 0), (1, 0)).to(torch.int32)
    return importlib.import_module(_NSA).NSAFlashMLAMetadata(flashmla_metadata=tiles, num_splits=num_splits)


def _nsa_draft_backend(monkeypatch, pool: _PagedPool, decode_backend: str):
    """SGLang's own NativeSparseAttnMultiStepBackend (real ``__init__``) over ``pool`` on CPU."""
    import importlib

    nsa = importlib.import_module(_NSA)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args, **kwargs: (9, 0))  # an H100
    monkeypatch.setattr(nsa, "get_attention_tp_size", lambda: 1)  # no distributed set-up here
    monkeypatch.setattr(nsa.NativeSparseAttnBackend, "_compute_flashmla_metadata", _stand_in_flashmla_metadata)
    rows, max_context = pool.req_to_token.shape
    runner = SimpleNamespace(
        device=torch.device("cpu"), page_size=pool.page_size,
        server_args=SimpleNamespace(enable_deterministic_inference=False, nsa_prefill_backend="flashmla_sparse",
                                    nsa_decode_backend=decode_backend, speculative_eagle_topk=1,
                                    speculative_num_draft_tokens=DRAFT_STEPS + 1),
        model_config=SimpleNamespace(context_len=max_context, num_attention_heads=8, hf_config=SimpleNamespace(
            architectures=["DeepseekV32ForCausalLM"], index_topk=NSA_INDEX_TOPK)),
        token_to_kv_pool=SimpleNamespace(nsa_kv_cache_store_fp8=False, kv_cache_dim=576),
        req_to_token_pool=SimpleNamespace(req_to_token=pool.req_to_token, size=rows),
    )
    return nsa.NativeSparseAttnMultiStepBackend(runner, topk=1, speculative_num_steps=DRAFT_STEPS)


@per_tensor_copy_release
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("decode_backend", ["flashmla_sparse", "flashmla_kv"])
def test_draft_steps_get_the_metadata_sglang_copies(monkeypatch, page_size, decode_backend):
    generator = torch.Generator().manual_seed(100 + page_size + len(decode_backend))
    pool = _PagedPool(generator, page_size, rows=11, max_context=96)
    max_bs, bs = 8, 5
    stock = _nsa_draft_backend(monkeypatch, pool, decode_backend)
    replay_stock = type(stock).init_forward_metadata_replay_cuda_graph
    assert _apply_only("metadata_copy").applied == ["sglang.spec.metadata_copy"]
    patched = _nsa_draft_backend(monkeypatch, pool, decode_backend)
    replay_patched = type(patched).init_forward_metadata_replay_cuda_graph
    assert replay_patched is not replay_stock
    runner_seq_lens = {}
    for backend in (stock, patched):  # what the EAGLE draft runner does: one int32 seq_lens buffer, capture once
        backend.init_cuda_graph_state(max_bs, max_bs)
        runner_seq_lens[id(backend)] = torch.ones(max_bs, dtype=torch.int32)
        backend.init_forward_metadata_capture_cuda_graph(SimpleNamespace(
            batch_size=bs, req_pool_indices=torch.zeros(bs, dtype=torch.int64),
            seq_lens=runner_seq_lens[id(backend)][:bs], spec_info=None))
    for max_len in (37, 96, 5):  # widths below, at and far below the buffers' (pow-2 buckets 64, 96, 8)
        seq_lens = torch.randint(1, max_len + 1, (bs,), generator=generator, dtype=torch.int32)
        seq_lens[bs // 2] = max_len
        req_pool_indices = torch.randperm(pool.req_to_token.shape[0], generator=generator)[:bs]
        calls = report.op_calls["fused_metadata_copy"]
        for backend, replay in ((stock, replay_stock), (patched, replay_patched)):
            runner_seq_lens[id(backend)][:bs] = seq_lens
            batch = SimpleNamespace(req_pool_indices=req_pool_indices, seq_lens=runner_seq_lens[id(backend)][:bs],
                                    seq_lens_cpu=seq_lens.clone(), spec_info=None)
            replay(backend, batch, bs)
        assert report.op_calls["fused_metadata_copy"] == calls + 1  # steps 1..T-1 in one launch
        for step, (want, have) in enumerate(zip(stock.attn_backends, patched.attn_backends)):
            where = f"max_len {max_len}, step {step}"
            assert have.forward_metadata is have.decode_cuda_graph_metadata[bs], where
            _assert_same_metadata(want.decode_cuda_graph_metadata[bs], have.decode_cuda_graph_metadata[bs], where)
            whole_tables = want.decode_cuda_graph_metadata["page_table"], have.decode_cuda_graph_metadata["page_table"]
            assert torch.equal(*whole_tables), where  # past the batch's width too
            page_table = have.decode_cuda_graph_metadata[bs].page_table_1
            assert torch.equal(page_table[:, :max_len], pool.req_to_token[req_pool_indices, :max_len]), where


@per_tensor_copy_release
def test_without_the_precompute_switch_every_step_recomputes(monkeypatch):
    generator = torch.Generator().manual_seed(131)
    pool = _PagedPool(generator, 1, rows=6, max_context=32)
    monkeypatch.setenv("SGLANG_NSA_ENABLE_MTP_PRECOMPUTE_METADATA", "false")
    _apply_only("metadata_copy")
    backend = _nsa_draft_backend(monkeypatch, pool, "flashmla_sparse")
    backend.init_cuda_graph_state(4, 4)
    seq_lens = torch.ones(4, dtype=torch.int32)
    backend.init_forward_metadata_capture_cuda_graph(SimpleNamespace(
        batch_size=4, req_pool_indices=torch.zeros(4, dtype=torch.int64), seq_lens=seq_lens, spec_info=None))
    seq_lens.copy_(torch.tensor([3, 32, 7, 19], dtype=torch.int32))
    calls = report.op_calls["fused_metadata_copy"]
    backend.init_forward_metadata_replay_cuda_graph(SimpleNamespace(
        req_pool_indices=torch.arange(4), seq_lens=seq_lens, seq_lens_cpu=seq_lens.clone(), spec_info=None,
        seq_lens_sum=int(seq_lens.sum())), 4)
    assert report.op_calls["fused_metadata_copy"] == calls  # SGLang's own per-step path ran
    for step in backend.attn_backends:
        assert torch.equal(step.decode_cuda_graph_metadata[4].page_table_1[:, :32], pool.req_to_token[:4, :32])


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
    _apply_only("kv_splits")
    ours = _splits(cls.get_num_kv_splits, backend, seq_lens, num_group)
    assert ((stock >= 1) & (stock <= backend.max_kv_splits)).all()
    assert ((ours >= 1) & (ours <= backend.max_kv_splits)).all()
    if device_core_count == 0:  # no GPU: the original's own fill, untouched
        assert torch.equal(ours, stock)
    else:
        assert (ours == planned_kv_splits(backend, bs * num_group)).all()


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
    _apply_only("kv_splits")
    our_splits = _splits(cls.get_num_kv_splits, backend, seq_lens)
    assert not torch.equal(stock_splits, our_splits)  # a different plan, so the comparison means something
    slots_per_seq = [kv_indices[kv_indptr[i]:kv_indptr[i + 1]] for i in range(bs)]
    reference = _reference_decode(q, k_buffer, v_buffer, slots_per_seq, head_dim**-0.5)
    stock, ours = attend(stock_splits), attend(our_splits)
    torch.testing.assert_close(stock.double(), reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.double(), reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# The attnplug backend's speculative-decoding paths (0.5.23): verify and draft steps, eager and the
# CUDA-graph contract (capture plans with fill-value lengths, replay refills, padding lanes)
# --------------------------------------------------------------------------------------------------

VERIFY_TOKENS = 4  # --speculative-num-draft-tokens (chain drafts: --speculative-num-steps 3)


def _kv_scale(value: float) -> torch.nn.Parameter:
    """A layer's KV scale as SGLang's ``BaseKVCacheMethod`` leaves it: a float32 0-dim parameter."""
    return torch.nn.Parameter(torch.tensor(value, dtype=torch.float32), requires_grad=False)


# KV pools of the speculative checks: (pool dtype, (k_scale, v_scale) of the layer or None)
SPECULATIVE_KV = {
    "float32": (torch.float32, None),
    "fp8_e4m3": (torch.float8_e4m3fn, None),  # no checkpoint scales: read with the backend's 1.0
    "fp8_e5m2-scaled": (torch.float8_e5m2, (0.25, 3.0)),
}


class _TokenPool:
    """A real MHATokenToKVPool (one layer, page 1; float32 or FP8, stored as uint8 as SGLang does) with
    random K/V, request rows of random slots, and the one layer (``self.layer``, with KV scales or not)."""

    def __init__(self, generator: torch.Generator, rows: int = 6, max_context: int = 40,
                 kv_dtype: torch.dtype = torch.float32, scales: tuple | None = None):
        from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

        self.pool = MHATokenToKVPool(size=rows * max_context + 8, page_size=1, dtype=kv_dtype, head_num=KV_HEADS,
                                     head_dim=HEAD_DIM, layer_num=1, device="cpu", enable_memory_saver=False)
        for buffer in (self.pool.get_key_buffer(0), self.pool.get_value_buffer(0)):
            buffer.copy_(torch.randn(buffer.shape, generator=generator).to(kv_dtype))
        slots = torch.randperm(rows * max_context, generator=generator) + 1  # slot 0: SGLang's padding slot
        self.req_to_token = slots.view(rows, max_context).int()
        self.req_to_token[0] = 0  # row 0: the padding row graph lanes point at
        self.layer = _layer(0) if scales is None else _layer(0, k_scale=_kv_scale(scales[0]),
                                                                v_scale=_kv_scale(scales[1]))

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """float64 K and V as the kernels must read them: the stored values times the layer's scales."""
        k, v = self.pool.get_key_buffer(0).double(), self.pool.get_value_buffer(0).double()
        if self.layer.k_scale is not None:
            k, v = k * self.layer.k_scale.double(), v * self.layer.v_scale.double()
        return k, v

    def model_runner(self):
        from sglang.srt.configs.model_config import AttentionArch
        from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

        return SimpleNamespace(
            device=torch.device("cpu"), req_to_token_pool=SimpleNamespace(req_to_token=self.req_to_token),
            token_to_kv_pool=self.pool, kv_index_translator=None, page_size=1, max_total_num_tokens=self.pool.size,
            model_config=SimpleNamespace(attention_arch=AttentionArch.MHA, get_max_num_attention_heads=lambda: Q_HEADS),
            spec_algorithm=SpeculativeAlgorithm.STANDALONE, dtype=torch.float32,
        )

    def reference(self, q, seq_lens, req_pool_indices, queries_per_row: int, kv_extra: int) -> torch.Tensor:
        """float64: row r's query j sits at seq_lens[r] + kv_extra - queries_per_row + j, causal.
        q [bs * queries_per_row, H * D] -> same shape."""
        k, v = self.dequantized()
        out = []
        for r, (length, row) in enumerate(zip(seq_lens.tolist(), req_pool_indices.tolist())):
            total = length + kv_extra
            for j in range(queries_per_row):
                visible = total - queries_per_row + j + 1
                slots = [self.req_to_token[row, :visible].long()]
                qj = q[r * queries_per_row + j].view(1, Q_HEADS, HEAD_DIM)
                out.append(_reference_decode(qj, k, v, slots, HEAD_DIM**-0.5).reshape(-1))
        return torch.stack(out)


@pytest.fixture(params=sorted(SPECULATIVE_KV))
def speculative_setup(request, monkeypatch):
    """SGLang's runtime context as a STANDALONE server publishes it (TP 1, topk 1, 4 verify tokens), over a
    float32 pool or an FP8 one (``--kv-cache-dtype fp8_e4m3`` / ``fp8_e5m2``, with and without scales)."""
    from sglang.srt import runtime_context

    monkeypatch.setattr(runtime_context, "get_parallel", lambda: SimpleNamespace(attn_tp_size=1, attn_dcp_size=1))
    monkeypatch.setattr(runtime_context, "get_spec", lambda: SimpleNamespace(
        speculative_num_draft_tokens=VERIFY_TOKENS, speculative_eagle_topk=1, enable_multi_layer_eagle=False,
        speculative_draft_window_size=None))
    kv_dtype, scales = SPECULATIVE_KV[request.param]
    return _TokenPool(torch.Generator().manual_seed(23), kv_dtype=kv_dtype, scales=scales)


def _batch(mode, seq_lens, req_pool_indices, spec_info):
    return SimpleNamespace(forward_mode=mode, batch_size=seq_lens.shape[0], seq_lens=seq_lens,
                           seq_lens_cpu=seq_lens.clone(), req_pool_indices=req_pool_indices, spec_info=spec_info,
                           encoder_lens=None)


@new_release
def test_attnplug_verify_eager_and_graph_replay_match_reference(speculative_setup):
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    from attnplug.adapters.sglang.backend import AttnplugAttnBackend

    tokens, generator = speculative_setup, torch.Generator().manual_seed(5)
    backend = AttnplugAttnBackend(tokens.model_runner())
    assert backend.workspace.max_decode_query_len == VERIFY_TOKENS
    spec_info = SimpleNamespace(num_tokens_per_req=VERIFY_TOKENS, draft_token_num=VERIFY_TOKENS)
    seq_lens, rows = torch.tensor([30, 3, 17]), torch.tensor([4, 2, 5])  # prefixes (without the verify tokens)
    q = torch.randn(3 * VERIFY_TOKENS, Q_HEADS * HEAD_DIM, generator=generator)
    want = tokens.reference(q, seq_lens, rows, VERIFY_TOKENS, kv_extra=VERIFY_TOKENS)
    before = dict(report.speculative)
    backend.init_forward_metadata(_batch(ForwardMode.TARGET_VERIFY, seq_lens, rows, spec_info))
    eager = backend.forward_extend(q, None, None, tokens.layer, SimpleNamespace(forward_mode=ForwardMode.TARGET_VERIFY),
                                   save_kv_cache=False)
    torch.testing.assert_close(eager.double(), want, atol=1e-4, rtol=1e-4)

    # graphs: capture bs 4 with the fill value, replay the same 3 requests plus one padding lane
    backend.init_cuda_graph_state(max_bs=4, max_num_tokens=4 * VERIFY_TOKENS)
    from sglang.srt.layers.attention.verify_mask import TreeMaskMode

    assert backend.verify_mask.mode == TreeMaskMode.QLEN_ONLY and not backend.verify_mask.is_read
    fill = backend.get_cuda_graph_seq_len_fill_value()
    backend.init_forward_metadata_out_graph(_batch(ForwardMode.TARGET_VERIFY, torch.full((4,), fill),
                                                   torch.zeros(4, dtype=torch.int64), spec_info), in_capture=True)
    padded_lens, padded_rows = torch.cat([seq_lens, torch.tensor([fill])]), torch.cat([rows, torch.tensor([0])])
    backend.init_forward_metadata_out_graph(_batch(ForwardMode.TARGET_VERIFY, padded_lens, padded_rows, spec_info))
    padded_q = torch.cat([q, torch.randn(VERIFY_TOKENS, Q_HEADS * HEAD_DIM, generator=generator)])
    replayed = backend.forward_extend(padded_q, None, None, tokens.layer,
                                      SimpleNamespace(forward_mode=ForwardMode.TARGET_VERIFY), save_kv_cache=False)
    torch.testing.assert_close(replayed[: 3 * VERIFY_TOKENS].double(), want, atol=1e-4, rtol=1e-4)
    assert report.speculative["verify_batches"] == before.get("verify_batches", 0) + 2  # eager + replay
    backend.update_verify_buffers_to_fill_after_draft(spec_info, 4)  # SGLang's base class raises here


@new_release
@pytest.mark.parametrize("graph", [False, True])
def test_attnplug_draft_steps_match_reference(speculative_setup, graph):
    """Draft step s of a round reads seq_lens + s + 1 tokens; one metadata launch prepares every step."""
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    from attnplug.adapters.sglang.backend import AttnplugMultiStepDraftBackend

    tokens, generator = speculative_setup, torch.Generator().manual_seed(6)
    draft = AttnplugMultiStepDraftBackend(tokens.model_runner(), topk=1, speculative_num_steps=3)
    assert len(draft.attn_backends) == 2 and draft.attn_backends[1].workspace is draft.attn_backends[0].workspace
    spec_info = SimpleNamespace(is_draft_input=lambda: True)
    seq_lens, rows = torch.tensor([9, 33, 1]), torch.tensor([3, 1, 5])
    calls = report.op_calls["fused_decode_metadata"]
    if graph:
        draft.init_cuda_graph_state(max_bs=4, max_num_tokens=4)
        fill = draft.attn_backends[0].get_cuda_graph_seq_len_fill_value()
        draft.init_forward_metadata_out_graph(_batch(ForwardMode.DECODE, torch.full((4,), fill),
                                                     torch.zeros(4, dtype=torch.int64), spec_info), in_capture=True)
        seq_lens, rows = torch.cat([seq_lens, torch.tensor([fill])]), torch.cat([rows, torch.tensor([0])])
        calls = report.op_calls["fused_decode_metadata"]
        draft.init_forward_metadata_out_graph(_batch(ForwardMode.DECODE, seq_lens, rows, spec_info))
    else:
        draft.init_forward_metadata(_batch(ForwardMode.DECODE, seq_lens, rows, spec_info))
    assert report.op_calls["fused_decode_metadata"] == calls + 1, "one launch for every step of the round"
    real = 3
    for step, child in enumerate(draft.attn_backends):
        q = torch.randn(seq_lens.shape[0], Q_HEADS * HEAD_DIM, generator=generator)
        out = child.forward_decode(q, None, None, tokens.layer, SimpleNamespace(forward_mode=ForwardMode.DECODE),
                                   save_kv_cache=False)
        want = tokens.reference(q[:real], seq_lens[:real], rows[:real], 1, kv_extra=step + 1)
        torch.testing.assert_close(out[:real].double(), want, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------------------------------
# The attnplug backend over SGLang 0.5.23's FP8 KV pool (--kv-cache-dtype fp8_e4m3 / fp8_e5m2): SGLang's
# own writes (set_kv_buffer divides by the layer's scales), attnplug's reads (cache * scale), refusals
# --------------------------------------------------------------------------------------------------

_NAN_BYTE = 0x7F  # NaN in float8_e4m3fn and in float8_e5m2: what an unwritten slot reads as here


class _Fp8Serving:
    """A real FP8 ``MHATokenToKVPool`` (uint8 storage, every byte NaN until SGLang writes it), real
    ``RadixAttention`` layers whose scales went through SGLang's ``BaseKVCacheMethod``, page-aligned
    request rows, and the float64 truth of every K/V token written (before quantization)."""

    def __init__(self, kv_dtype, scales, page_size: int, rows: int = 4, max_context: int = 32):
        from sglang.srt.layers.quantization.kv_cache import BaseKVCacheMethod
        from sglang.srt.layers.radix_attention import RadixAttention
        from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

        generator = self.generator = torch.Generator().manual_seed(page_size * 100 + (scales is not None))
        num_pages = rows * max_context // page_size + 2
        self.pool = MHATokenToKVPool(size=(num_pages - 1) * page_size, page_size=page_size, dtype=kv_dtype,
                                     head_num=KV_HEADS, head_dim=HEAD_DIM, layer_num=LAYERS, device="cpu",
                                     enable_memory_saver=False)
        for buffers in (self.pool.k_buffer, self.pool.v_buffer):
            for buffer in buffers:
                buffer.fill_(_NAN_BYTE)
        pages = torch.randperm(num_pages - 1, generator=generator)[: rows * max_context // page_size] + 1
        self.req_to_token = (pages.view(rows, -1)[:, :, None] * page_size
                             + torch.arange(page_size)).reshape(rows, max_context).int()
        self.page_size = page_size
        self.layers = [RadixAttention(Q_HEADS, HEAD_DIM, HEAD_DIM**-0.5, KV_HEADS, layer_id=i) for i in range(LAYERS)]
        if scales is not None:  # a checkpoint with per-tensor k_scale / v_scale (layer 1: other values)
            method = BaseKVCacheMethod(None)
            for i, layer in enumerate(self.layers):
                method.create_weights(layer)
                layer.k_scale.data.fill_(scales[0] * (1 + 2 * i))
                layer.v_scale.data.fill_(scales[1] * (1 + i / 2))
                method.process_weights_after_loading(layer)
        self.truth = {}  # (layer id, slot) -> (k, v) float64 [KV_HEADS, HEAD_DIM]

    def model_runner(self):
        from sglang.srt.configs.model_config import AttentionArch
        from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

        return SimpleNamespace(
            device=torch.device("cpu"), req_to_token_pool=SimpleNamespace(req_to_token=self.req_to_token),
            token_to_kv_pool=self.pool, kv_index_translator=None, page_size=self.page_size,
            max_total_num_tokens=self.pool.size, dtype=torch.float32, model=torch.nn.ModuleList(self.layers),
            model_config=SimpleNamespace(attention_arch=AttentionArch.MHA, get_max_num_attention_heads=lambda: Q_HEADS,
                                         is_encoder_decoder=False),
            spec_algorithm=SpeculativeAlgorithm.NONE, server_args=SimpleNamespace(dllm_algorithm=None,
                                                                                   enable_pdmux=False),
        )

    def batch(self, mode, rows, prefix_lens, new_lens):
        """A batch whose request ``rows`` had ``prefix_lens`` tokens and get ``new_lens`` more (their slots:
        the next positions of their req_to_token rows)."""
        from sglang.srt.model_executor.forward_batch_info import ForwardMode

        rows, prefix_lens, new_lens = torch.tensor(rows), torch.tensor(prefix_lens), torch.tensor(new_lens)
        seq_lens = prefix_lens + new_lens
        out_cache_loc = torch.cat([self.req_to_token[r, p:n].long()
                                   for r, p, n in zip(rows.tolist(), prefix_lens.tolist(), seq_lens.tolist())])
        extend = mode != ForwardMode.DECODE
        return SimpleNamespace(
            forward_mode=mode, batch_size=rows.shape[0], req_pool_indices=rows, seq_lens=seq_lens,
            seq_lens_cpu=seq_lens.clone(), seq_lens_sum=int(seq_lens.sum()), out_cache_loc=out_cache_loc,
            out_cache_loc_is_physical=False, spec_info=None, encoder_lens=None,
            extend_seq_lens=new_lens if extend else None, extend_seq_lens_cpu=new_lens.tolist() if extend else None,
            extend_prefix_lens=prefix_lens if extend else None,
        )

    def new_tokens(self, batch):
        """Random q, k, v of the batch's new tokens; k / v recorded as the truth of their slots."""
        n = batch.out_cache_loc.shape[0]
        q = torch.randn(n, Q_HEADS * HEAD_DIM, generator=self.generator)
        kv = [(torch.randn(n, KV_HEADS, HEAD_DIM, generator=self.generator),
               torch.randn(n, KV_HEADS, HEAD_DIM, generator=self.generator) * 2) for _ in self.layers]
        for layer, (k, v) in zip(self.layers, kv):
            for slot, k_row, v_row in zip(batch.out_cache_loc.tolist(), k.double(), v.double()):
                self.truth[layer.layer_id, slot] = (k_row, v_row)
        return q, kv

    def scales(self, layer) -> tuple[float, float]:
        return (1.0, 1.0) if layer.k_scale is None else (layer.k_scale_float, layer.v_scale_float)

    def reference(self, q, layer, batch, *, dequantized: bool) -> torch.Tensor:
        """float64 causal attention of the batch's new tokens: over the pool's bytes times the layer's scales
        (``dequantized``), or over the float64 truth of every token."""
        k_scale, v_scale = self.scales(layer)
        k_cache = self.pool.get_key_buffer(layer.layer_id).double() * k_scale
        v_cache = self.pool.get_value_buffer(layer.layer_id).double() * v_scale
        out, start = [], 0
        news = [1] * batch.batch_size if batch.extend_seq_lens is None else batch.extend_seq_lens.tolist()
        for row, length, new in zip(batch.req_pool_indices.tolist(), batch.seq_lens.tolist(), news):
            slots = self.req_to_token[row, :length].long()
            if dequantized:
                keys, values = k_cache[slots], v_cache[slots]
            else:
                keys = torch.stack([self.truth[layer.layer_id, s][0] for s in slots.tolist()])
                values = torch.stack([self.truth[layer.layer_id, s][1] for s in slots.tolist()])
            for j in range(new):
                visible = length - new + j + 1
                qj = q[start + j].view(1, Q_HEADS, HEAD_DIM)
                fake_slots = [torch.arange(visible)]
                out.append(_reference_decode(qj, keys, values, fake_slots, HEAD_DIM**-0.5).reshape(-1))
            start += new
        return torch.stack(out)

    def assert_stored_scaled(self, batch, kv) -> None:
        """The pool holds exactly ``(k / k_scale).to(fp8)``: SGLang's write, with the layer's scales."""
        for layer, (k, v) in zip(self.layers, kv):
            k_scale, v_scale = self.scales(layer)
            slots = batch.out_cache_loc
            stored_k = self.pool.k_buffer[layer.layer_id][slots]
            stored_v = self.pool.v_buffer[layer.layer_id][slots]
            assert stored_k.dtype == torch.uint8
            assert torch.equal(stored_k, (k / k_scale).to(self.pool.dtype).view(torch.uint8)), layer.layer_id
            assert torch.equal(stored_v, (v / v_scale).to(self.pool.dtype).view(torch.uint8)), layer.layer_id


def _fp8_runtime(monkeypatch):
    from sglang.srt import runtime_context

    monkeypatch.setattr(runtime_context, "get_parallel", lambda: SimpleNamespace(attn_tp_size=1, attn_dcp_size=1))


FP8_SERVING = {  # id -> (pool dtype, (k_scale, v_scale) of layer 0 or None: no checkpoint scales, page size)
    "e4m3-unscaled-page1": (torch.float8_e4m3fn, None, 1),
    "e4m3-scaled-page4": (torch.float8_e4m3fn, (0.5, 2.0), 4),
    "e5m2-scaled-page1": (torch.float8_e5m2, (0.25, 4.0), 1),
}


@new_release
@pytest.mark.parametrize("case", sorted(FP8_SERVING))
def test_attnplug_fp8_pool_extend_decode_and_prefix_extend_match_reference(monkeypatch, case):
    """Prefill two requests, decode one token each, then extend one over its cached prefix: every batch's
    K/V written by SGLang's own set_kv_buffer (scaled), every output equal to float64 attention over the
    dequantized pool, and close to attention over the unquantized K/V; nothing handed to torch_native."""
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    from attnplug.adapters.sglang.backend import AttnplugAttnBackend

    _fp8_runtime(monkeypatch)
    kv_dtype, scales, page_size = FP8_SERVING[case]
    serving = _Fp8Serving(kv_dtype, scales, page_size)
    backend = AttnplugAttnBackend(serving.model_runner())
    assert backend.fp8_kv and backend.kv_dtype == kv_dtype
    for layer in serving.layers:  # the kernels read the layers' own scale tensors (or the one 1.0 made at init)
        k_read, v_read = backend._layer_kv_scales(layer)
        if scales is None:
            assert k_read is backend._unit_scale and v_read is backend._unit_scale and k_read.item() == 1.0
        else:
            assert k_read is layer.k_scale and v_read is layer.v_scale and layer.k_scale_float != 1.0
    unit_scale = backend._unit_scale
    rounds = [
        (ForwardMode.EXTEND, [1, 3], [0, 0], [7, 12]),
        (ForwardMode.DECODE, [1, 3], [7, 12], [1, 1]),
        (ForwardMode.EXTEND, [3], [13], [5]),  # a radix-cache hit: 13 cached tokens, 5 new
    ]
    for mode, rows, prefix_lens, new_lens in rounds:
        batch = serving.batch(mode, rows, prefix_lens, new_lens)
        q, kv = serving.new_tokens(batch)
        paged_calls = report.op_calls["paged_attention"]
        backend.init_forward_metadata(batch)
        assert backend.forward_metadata.fallback is None
        forward = backend.forward_decode if mode == ForwardMode.DECODE else backend.forward_extend
        outs = [forward(q.clone(), k.clone(), v.clone(), layer, batch) for layer, (k, v) in zip(serving.layers, kv)]
        assert report.op_calls["paged_attention"] == paged_calls + LAYERS, "attnplug's kernel served every layer"
        serving.assert_stored_scaled(batch, kv)
        for layer, out in zip(serving.layers, outs):
            where = f"{mode.name} layer {layer.layer_id}"
            assert not out.isnan().any(), f"{where}: a NaN slot (unwritten) was read"
            torch.testing.assert_close(out.double(), serving.reference(q, layer, batch, dequantized=True),
                                       atol=1e-4, rtol=1e-4, msg=where)
            # FP8's rounding only (measured: e4m3 3-5 %, e5m2 6-8 %); V read with a wrong scale is off by >= 50 %
            truth = serving.reference(q, layer, batch, dequantized=False)
            error = float((out.double() - truth).norm() / truth.norm())
            assert error < (0.15 if kv_dtype == torch.float8_e5m2 else 0.08), (where, error)
    assert backend._unit_scale is unit_scale, "the 1.0 scale is made once, at construction"


@new_release
def test_attnplug_fp8_graph_replay_reads_the_current_scales(monkeypatch):
    """CUDA-graph contract over an FP8 pool: capture at bs 4, replay 3 requests + a padding lane; after an
    in-place change of the layers' scale tensors (what a weight reload does) the same captured metadata
    reads the new values: the kernels take the layer's tensors, not copies or floats."""
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    from attnplug.adapters.sglang.backend import AttnplugAttnBackend

    _fp8_runtime(monkeypatch)
    serving = _Fp8Serving(torch.float8_e4m3fn, (0.5, 2.0), page_size=1)
    backend = AttnplugAttnBackend(serving.model_runner())
    prefill = serving.batch(ForwardMode.EXTEND, [0, 1, 2], [0, 0, 0], [9, 4, 17])
    q, kv = serving.new_tokens(prefill)
    backend.init_forward_metadata(prefill)
    for layer, (k, v) in zip(serving.layers, kv):
        backend.forward_extend(q.clone(), k.clone(), v.clone(), layer, prefill)

    backend.init_cuda_graph_state(max_bs=4, max_num_tokens=4)
    fill = backend.get_cuda_graph_seq_len_fill_value()
    capture = SimpleNamespace(forward_mode=ForwardMode.DECODE, batch_size=4, seq_lens=torch.full((4,), fill),
                              seq_lens_cpu=torch.full((4,), fill), req_pool_indices=torch.tensor([3, 3, 3, 3]),
                              spec_info=None, encoder_lens=None)
    backend.init_forward_metadata_out_graph(capture, in_capture=True)
    decode = serving.batch(ForwardMode.DECODE, [0, 1, 2], [9, 4, 17], [1, 1, 1])
    q, kv = serving.new_tokens(decode)
    replay = SimpleNamespace(forward_mode=ForwardMode.DECODE, batch_size=4,
                             seq_lens=torch.cat([decode.seq_lens, torch.tensor([fill])]),
                             seq_lens_cpu=torch.cat([decode.seq_lens, torch.tensor([fill])]),
                             req_pool_indices=torch.cat([decode.req_pool_indices, torch.tensor([3])]),
                             spec_info=None, encoder_lens=None)
    backend.init_forward_metadata_out_graph(replay)
    captured = backend.forward_metadata
    padded_q = torch.cat([q, torch.randn(1, Q_HEADS * HEAD_DIM, generator=serving.generator)])
    padded_loc = torch.cat([decode.out_cache_loc, torch.tensor([0])])  # the padding lane writes slot 0
    written = SimpleNamespace(out_cache_loc=padded_loc, out_cache_loc_is_physical=False)
    for layer, (k, v) in zip(serving.layers, kv):
        pad = torch.zeros(1, KV_HEADS, HEAD_DIM)
        out = backend.forward_decode(padded_q.clone(), torch.cat([k, pad]), torch.cat([v, pad]), layer, written)
        torch.testing.assert_close(out[:3].double(), serving.reference(q, layer, decode, dequantized=True),
                                   atol=1e-4, rtol=1e-4)
    for layer in serving.layers:  # a new checkpoint's scales, copied in place as SGLang's loader does
        layer.k_scale.data.mul_(4.0)
        layer.v_scale.data.mul_(0.5)
        layer.k_scale_float, layer.v_scale_float = float(layer.k_scale), float(layer.v_scale)
    backend.init_forward_metadata_out_graph(replay)
    assert backend.forward_metadata is captured
    for layer in serving.layers:
        out = backend.forward_decode(padded_q.clone(), None, None, layer, written, save_kv_cache=False)
        torch.testing.assert_close(out[:3].double(), serving.reference(q, layer, decode, dequantized=True),
                                   atol=1e-4, rtol=1e-4)


@new_release
def test_attnplug_serves_an_unquantized_pool_with_layer_scales_unscaled(monkeypatch):
    """Scales in the checkpoint but --kv-cache-dtype auto (a float32 pool): SGLang writes K/V unscaled (its
    set_kv_buffer divides only when it casts), so attnplug reads the pool as it is, with no fallback."""
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    from attnplug.adapters.sglang.backend import AttnplugAttnBackend

    _fp8_runtime(monkeypatch)
    serving = _Fp8Serving(torch.float8_e4m3fn, (0.5, 2.0), page_size=1)
    serving.pool = MHATokenToKVPool(size=serving.pool.size, page_size=1, dtype=torch.float32, head_num=KV_HEADS,
                                    head_dim=HEAD_DIM, layer_num=LAYERS, device="cpu", enable_memory_saver=False)
    backend = AttnplugAttnBackend(serving.model_runner())
    assert not backend.fp8_kv
    batch = serving.batch(ForwardMode.EXTEND, [0, 2], [0, 0], [6, 11])
    q, kv = serving.new_tokens(batch)
    backend.init_forward_metadata(batch)
    calls = report.op_calls["paged_attention"]
    for layer, (k, v) in zip(serving.layers, kv):
        out = backend.forward_extend(q.clone(), k.clone(), v.clone(), layer, batch)
        assert torch.equal(serving.pool.get_key_buffer(layer.layer_id)[batch.out_cache_loc], k)  # unscaled
        torch.testing.assert_close(out.double(), serving.reference(q, layer, batch, dequantized=False),
                                   atol=1e-4, rtol=1e-4)
    assert report.op_calls["paged_attention"] == calls + LAYERS


def _refused(runner) -> str:
    from attnplug.adapters.sglang.backend import AttnplugAttnBackend

    with pytest.raises(ValueError) as refusal:
        AttnplugAttnBackend(runner)
    return str(refusal.value)


@new_release
def test_attnplug_refuses_kv_caches_it_does_not_read_at_startup(monkeypatch):
    """Each refusal names the flag to change; FP8 itself, with speculative decoding too, is served."""
    from sglang.srt import runtime_context
    from sglang.srt.layers.quantization.fp4_kv_cache_quant_method import get_kv_cache_quant_method
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    from attnplug.adapters.sglang.backend import unsupported_setup

    _fp8_runtime(monkeypatch)
    monkeypatch.setattr(runtime_context, "get_spec", lambda: SimpleNamespace(
        speculative_num_draft_tokens=VERIFY_TOKENS, speculative_eagle_topk=1, enable_multi_layer_eagle=False,
        speculative_draft_window_size=None))
    serving = _Fp8Serving(torch.float8_e4m3fn, (0.5, 2.0), page_size=1)

    def pool(dtype, **kwargs):
        return MHATokenToKVPool(size=64, page_size=1, dtype=dtype, head_num=KV_HEADS, head_dim=HEAD_DIM,
                                layer_num=LAYERS, device="cpu", enable_memory_saver=False, **kwargs)

    # SGLang-CPU's own fp8_e4m3 recipe (what the CPU engine builds for --kv-cache-dtype fp8_e4m3)
    cpu_recipe = SimpleNamespace(**{**vars(serving.model_runner()), "token_to_kv_pool": pool(
        torch.float8_e4m3fn, quant_method=get_kv_cache_quant_method("cpu_fp8_e4m3"))})
    message = _refused(cpu_recipe)
    assert "quantized KV cache recipe 'cpu_fp8_e4m3'" in message and "--kv-cache-dtype" in message, message
    # a bf16 pool under a float16 model (--kv-cache-dtype bf16): the kernels read the queries' dtype
    mismatched = SimpleNamespace(**{**vars(serving.model_runner()), "token_to_kv_pool": pool(torch.bfloat16),
                                    "dtype": torch.float16})
    assert "--kv-cache-dtype auto" in _refused(mismatched)
    # non-unit scales beside batches that go to torch_native (which ignores the scales): refused; unit: served
    encoder_decoder = serving.model_runner()
    encoder_decoder.model_config.is_encoder_decoder = True
    message = _refused(encoder_decoder)
    assert "checkpoint scales != 1" in message and "--kv-cache-dtype auto" in message, message
    unit = _Fp8Serving(torch.float8_e4m3fn, None, page_size=1).model_runner()
    unit.model_config.is_encoder_decoder = True
    assert unsupported_setup(unit) is None
    # speculative decoding (chain drafts) over an FP8 pool: served (verify and draft run attnplug's FP8 path)
    speculative = serving.model_runner()
    speculative.spec_algorithm = SpeculativeAlgorithm.STANDALONE
    assert unsupported_setup(speculative) is None


@new_release
def test_0_5_23_fp8_kv_facts():
    """What the FP8 path relies on, and why no live CPU server serves an FP8 pool (checked in the source)."""
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    pool = MHATokenToKVPool(size=8, page_size=1, dtype=torch.float8_e5m2, head_num=KV_HEADS, head_dim=HEAD_DIM,
                            layer_num=1, device="cpu", enable_memory_saver=False)
    assert pool.store_dtype == torch.uint8 and pool.k_buffer[0].dtype == torch.uint8
    assert pool.get_key_buffer(0).dtype == torch.float8_e5m2  # handed out as an FP8 view of the uint8 store
    assert pool.get_key_buffer(0).data_ptr() == pool.k_buffer[0].data_ptr()
    memory_pool = _source("sglang.srt.mem_cache.memory_pool")
    assert "cache_k.div_(k_scale)" in memory_pool and "cache_v.div_(v_scale)" in memory_pool  # writes divide
    triton = _source(_TRITON)
    assert "k_descale = layer.k_scale_float" in triton  # SGLang's Triton backend reads cache * scale
    assert "layer.k_scale.expand(descale_shape)" in _source(_FA)  # FA3 too (its k_descale)
    configurator = _source("sglang.srt.mem_cache.kv_cache_configurator")
    assert 'raise ValueError("CPU FP8 KV cache requires Intel AMX support.")' in configurator
    assert '"CPU FP8 KV cache requires the intel_amx attention backend."' in configurator
    assert '"--kv-cache-dtype fp8_e5m2 is not supported on CPU."' in _source("sglang.srt.mem_cache.kv_cache_dtype")
