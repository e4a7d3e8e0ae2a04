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


def _layer(layer_id: int, sliding_window_size=None):
    from sglang.srt.layers.radix_attention import AttentionType

    return SimpleNamespace(layer_id=layer_id, is_cross_attention=False, attn_type=AttentionType.DECODER,
                           sliding_window_size=sliding_window_size, tp_q_head_num=Q_HEADS, tp_k_head_num=KV_HEADS,
                           tp_v_head_num=KV_HEADS, head_dim=HEAD_DIM, qk_head_dim=HEAD_DIM, v_head_dim=HEAD_DIM,
                           scaling=HEAD_DIM**-0.5, logit_cap=0.0, logit_capping_method="tanh", use_irope=False,
                           xai_temperature_len=-1, k_scale=None, v_scale=None)


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


class _TokenPool:
    """A real MHATokenToKVPool (one layer, float32, page 1) with random K/V, request rows of random slots."""

    def __init__(self, generator: torch.Generator, rows: int = 6, max_context: int = 40):
        from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

        self.pool = MHATokenToKVPool(size=rows * max_context + 8, page_size=1, dtype=torch.float32, head_num=KV_HEADS,
                                     head_dim=HEAD_DIM, layer_num=1, device="cpu", enable_memory_saver=False)
        for buffer in (self.pool.get_key_buffer(0), self.pool.get_value_buffer(0)):
            buffer.copy_(torch.randn(buffer.shape, generator=generator))
        slots = torch.randperm(rows * max_context, generator=generator) + 1  # slot 0: SGLang's padding slot
        self.req_to_token = slots.view(rows, max_context).int()
        self.req_to_token[0] = 0  # row 0: the padding row graph lanes point at

    def model_runner(self):
        from sglang.srt.configs.model_config import AttentionArch
        from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

        return SimpleNamespace(
            device=torch.device("cpu"), req_to_token_pool=SimpleNamespace(req_to_token=self.req_to_token),
            token_to_kv_pool=self.pool, kv_index_translator=None, page_size=1, max_total_num_tokens=self.pool.size,
            model_config=SimpleNamespace(attention_arch=AttentionArch.MHA, get_max_num_attention_heads=lambda: Q_HEADS),
            spec_algorithm=SpeculativeAlgorithm.STANDALONE,
        )

    def reference(self, q, seq_lens, req_pool_indices, queries_per_row: int, kv_extra: int) -> torch.Tensor:
        """float64: row r's query j sits at seq_lens[r] + kv_extra - queries_per_row + j, causal.
        q [bs * queries_per_row, H * D] -> same shape."""
        k, v = self.pool.get_key_buffer(0), self.pool.get_value_buffer(0)
        out = []
        for r, (length, row) in enumerate(zip(seq_lens.tolist(), req_pool_indices.tolist())):
            total = length + kv_extra
            for j in range(queries_per_row):
                visible = total - queries_per_row + j + 1
                slots = [self.req_to_token[row, :visible].long()]
                qj = q[r * queries_per_row + j].view(1, Q_HEADS, HEAD_DIM)
                out.append(_reference_decode(qj, k, v, slots, HEAD_DIM**-0.5).reshape(-1))
        return torch.stack(out)


@pytest.fixture
def speculative_setup(monkeypatch):
    """SGLang's runtime context as a STANDALONE server publishes it (TP 1, topk 1, 4 verify tokens)."""
    from sglang.srt import runtime_context

    monkeypatch.setattr(runtime_context, "get_parallel", lambda: SimpleNamespace(attn_tp_size=1, attn_dcp_size=1))
    monkeypatch.setattr(runtime_context, "get_spec", lambda: SimpleNamespace(
        speculative_num_draft_tokens=VERIFY_TOKENS, speculative_eagle_topk=1, enable_multi_layer_eagle=False,
        speculative_draft_window_size=None))
    return _TokenPool(torch.Generator().manual_seed(23))


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
    eager = backend.forward_extend(q, None, None, _layer(0), SimpleNamespace(forward_mode=ForwardMode.TARGET_VERIFY),
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
    replayed = backend.forward_extend(padded_q, None, None, _layer(0),
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
        out = child.forward_decode(q, None, None, _layer(0), SimpleNamespace(forward_mode=ForwardMode.DECODE),
                                   save_kv_cache=False)
        want = tokens.reference(q[:real], seq_lens[:real], rows[:real], 1, kv_extra=step + 1)
        torch.testing.assert_close(out[:real].double(), want, atol=1e-4, rtol=1e-4)
