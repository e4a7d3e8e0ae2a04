"""Checks of the vLLM adapter against a real vLLM release; run inside the vLLM venv by test_vllm_adapter.py.

``ATTNPLUG_CHECK_VLLM_RELEASE`` names the release the imported ``vllm`` must be (0.32.0 installed, or
0.33.0's modules first on ``PYTHONPATH``); ``ATTNPLUG_CHECK_MODEL_DIR`` is the tiny model that real
``VllmConfig`` objects are built from. Kernels run under the Triton interpreter (float32).
(Not collected by the top-level test run: the dev venv has no vLLM.)
"""

import os

os.environ.setdefault("ATTNPLUG_TEST_REAL_TRITON", "1")  # real Triton in vllm.triton_utils before any kernel import
import attnplug_cpu_shim  # noqa: E402,F401

import pickle  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import types  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import attnplug  # noqa: E402
from attnplug import report  # noqa: E402
from attnplug.adapters.engines import ENGINES  # noqa: E402
from attnplug.adapters.patching import check_patch, resolve_target  # noqa: E402
from attnplug.adapters.registry import engine_patches  # noqa: E402

VLLM_PATCHES = engine_patches("vllm")
RELEASE = os.environ["ATTNPLUG_CHECK_VLLM_RELEASE"]
MODEL_DIR = os.environ["ATTNPLUG_CHECK_MODEL_DIR"]
NUM_SPECULATIVE_TOKENS = 3
# the tiny model (integration/tiny_model.py): 4 q heads, 2 kv heads, head 32; 32-token KV blocks
NUM_Q_HEADS, NUM_KV_HEADS, HEAD_SIZE, BLOCK_SIZE = 4, 2, 32, 32


def test_the_release_under_test_is_imported():
    import vllm

    assert vllm.__version__ == RELEASE, (vllm.__file__, vllm.__version__)
    assert str(ENGINES["vllm"].installed_version()) == RELEASE


def test_vllm_declares_its_patches():
    assert [patch.id for patch in VLLM_PATCHES] == ["vllm.triton_attn.split_launch"]


@pytest.mark.parametrize("patch", VLLM_PATCHES, ids=lambda patch: patch.id)
def test_every_patch_target_resolves_and_applies(patch):
    assert check_patch(patch) is None
    for target in patch.targets:
        owner, name = resolve_target(target)
        assert hasattr(owner, name), target


@pytest.mark.parametrize("patch", VLLM_PATCHES, ids=lambda patch: patch.id)
def test_apply_and_revert_round_trip(patch):
    bindings = [resolve_target(target) for target in patch.targets]
    originals = [vars(owner)[name] for owner, name in bindings]
    outcome = attnplug.apply_to_vllm(**{patch.keyword: True})
    assert outcome.applied == [patch.id], outcome
    assert all(vars(owner)[name] is not original for (owner, name), original in zip(bindings, originals))
    assert attnplug.revert() == [patch.id]
    assert all(vars(owner)[name] is original for (owner, name), original in zip(bindings, originals))


def test_both_unified_attention_bindings_are_rebound_together():
    import vllm.v1.attention.backends.triton_attn as backend_module
    import vllm.v1.attention.ops.triton_unified_attention as op_module

    with attnplug.patched("vllm", split_launch=True):
        assert backend_module.unified_attention is op_module.unified_attention
        assert backend_module.unified_attention.__wrapped__ is not None
    assert not hasattr(backend_module.unified_attention, "__wrapped__")


def test_attnplug_backend_is_registered_and_pickles_into_a_fresh_process():
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from attnplug.adapters.vllm import register
    from attnplug.adapters.vllm.backend import AttnplugBackend

    register()
    register()  # idempotent
    member = AttentionBackendEnum["ATTNPLUG"]
    assert member.get_class() is AttnplugBackend
    assert AttnplugBackend.get_name() == "ATTNPLUG"
    code = "import pickle, sys; m = pickle.loads(sys.stdin.buffer.read()); print(m.name, m.get_path())"
    done = subprocess.run([sys.executable, "-c", code], input=pickle.dumps(member), capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert done.stdout.decode().split() == ["ATTNPLUG", "attnplug.adapters.vllm.backend.AttnplugBackend"]


def test_attnplug_backend_keeps_triton_layout_and_kv_write_path():
    from vllm.v1.attention.backends.triton_attn import TritonAttentionBackend, TritonAttentionImpl

    from attnplug.adapters.vllm.backend import AttnplugBackend, AttnplugImpl, AttnplugMetadataBuilder

    assert issubclass(AttnplugBackend, TritonAttentionBackend)
    assert AttnplugBackend.customize_spec.__func__ is TritonAttentionBackend.customize_spec.__func__
    assert AttnplugImpl.do_kv_cache_update is TritonAttentionImpl.do_kv_cache_update
    assert AttnplugMetadataBuilder.reorder_batch_threshold == 1


# ----------------------------------------------------------------------------- real builders, speculative decoding
@pytest.fixture(scope="module")
def configs():
    """Real VllmConfigs of the tiny model: without and with speculative decoding (draft_model, k = 3)."""
    from vllm.engine.arg_utils import EngineArgs

    def make(**extra):
        return EngineArgs(model=MODEL_DIR, dtype="float32", max_model_len=512, block_size=BLOCK_SIZE,
                          enforce_eager=True, **extra).create_engine_config()

    speculative = {"method": "draft_model", "model": MODEL_DIR, "num_speculative_tokens": NUM_SPECULATIVE_TOKENS}
    return {"plain": make(), "spec": make(speculative_config=speculative)}


def make_builder(builder_cls, vllm_config, cache_dtype="auto"):
    from vllm.config import set_current_vllm_config
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVQuantMode

    cache = ({"dtype": torch.uint8, "kv_quant_mode": KVQuantMode.FP8_PER_TENSOR} if cache_dtype == "fp8"
             else {"dtype": torch.float32})
    spec = FullAttentionSpec(block_size=BLOCK_SIZE, num_kv_heads=NUM_KV_HEADS, head_size=HEAD_SIZE, **cache)
    with set_current_vllm_config(vllm_config):
        return builder_cls(spec, ["model.layers.0.self_attn.attn"], vllm_config, torch.device("cpu"))


@pytest.mark.parametrize("which", ["attnplug_backend", "patched_triton"])
def test_builders_take_verify_requests_as_decodes(configs, which):
    """vLLM's spec-as-decode: the reorder threshold is 1 + k with speculative decoding, 1 without,
    and the workspace has room for 1 + k query tokens per segment slot."""
    from vllm.v1.attention.backends.triton_attn import TritonAttentionMetadataBuilder

    from attnplug.adapters.vllm.backend import AttnplugMetadataBuilder

    for name, expected in (("plain", 1), ("spec", 1 + NUM_SPECULATIVE_TOKENS)):
        if which == "attnplug_backend":
            builder = make_builder(AttnplugMetadataBuilder, configs[name])
        else:
            with attnplug.patched("vllm", split_launch=True):
                builder = make_builder(TritonAttentionMetadataBuilder, configs[name])
        assert builder.reorder_batch_threshold == expected, name
        assert builder.attnplug_planner.decode_threshold == expected
        assert builder.attnplug_planner.workspace.max_decode_query_len == expected


def test_attnplug_backend_declares_uniform_batch_cuda_graphs(configs):
    """FULL CUDA graphs for uniform batches (decodes, or verify requests of 1 + k tokens), not mixed ones."""
    from vllm.v1.attention.backend import AttentionCGSupport
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from attnplug.adapters.vllm.backend import AttnplugMetadataBuilder

    spec = FullAttentionSpec(block_size=BLOCK_SIZE, num_kv_heads=NUM_KV_HEADS, head_size=HEAD_SIZE, dtype=torch.float32)
    support = AttnplugMetadataBuilder.get_cudagraph_support(configs["spec"], spec)
    assert support == AttentionCGSupport.UNIFORM_BATCH


class VerifyBatch:
    """A batch as vLLM's runner hands it to the builder: decode-like requests first (query lengths
    ``query_lens``), then CUDA-graph padding lanes (query length 0, seq_len 0, block-table row 0)."""

    def __init__(self, query_lens, seq_lens, *, num_padding=0, seed=0):
        from vllm.v1.attention.backend import CommonAttentionMetadata

        g = torch.Generator().manual_seed(seed)
        pages = [-(-n // BLOCK_SIZE) for n in seq_lens]
        num_blocks = sum(pages) + 2
        self.kv_cache = torch.randn(num_blocks, 2, BLOCK_SIZE, NUM_KV_HEADS, HEAD_SIZE, generator=g)
        perm = torch.randperm(num_blocks - 1, generator=g).add(1).int()  # block 0 is the null block
        block_table = torch.zeros(len(seq_lens) + num_padding, max(pages), dtype=torch.int32)
        used = 0
        for i, n in enumerate(pages):
            block_table[i, :n] = perm[used:used + n]
            used += n
        qsl = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()] + [sum(query_lens)] * num_padding,
                           dtype=torch.int32)
        self.num_real_tokens = sum(query_lens)
        num_tokens = self.num_real_tokens + num_padding * max(query_lens)  # padded token rows
        self.q = torch.randn(num_tokens, NUM_Q_HEADS, HEAD_SIZE, generator=g)
        self.metadata = CommonAttentionMetadata(
            query_start_loc=qsl, query_start_loc_cpu=qsl.clone(),
            seq_lens=torch.tensor(list(seq_lens) + [0] * num_padding, dtype=torch.int32),
            num_reqs=len(seq_lens) + num_padding, num_actual_tokens=num_tokens, max_query_len=max(query_lens),
            max_seq_len=max(seq_lens), block_table_tensor=block_table,
            slot_mapping=torch.zeros(num_tokens, dtype=torch.int64),
        )

    def unified_attention_kwargs(self, attn_metadata, out):
        """The keyword arguments TRITON_ATTN's forward passes to ``unified_attention`` for this batch."""
        key_cache, value_cache = self.kv_cache.unbind(1)
        one = torch.ones(1)
        return dict(
            q=self.q, k=key_cache, v=value_cache, out=out, cu_seqlens_q=attn_metadata.query_start_loc,
            max_seqlen_q=attn_metadata.max_query_len, seqused_k=attn_metadata.seq_lens,
            max_seqlen_k=attn_metadata.max_seq_len, softmax_scale=HEAD_SIZE ** -0.5, causal=True,
            window_size=(-1, -1), block_table=attn_metadata.block_table, softcap=0, q_descale=None,
            k_descale=one, v_descale=one, seq_threshold_3D=attn_metadata.seq_threshold_3D,
            num_par_softmax_segments=attn_metadata.num_par_softmax_segments,
            softmax_segm_output=attn_metadata.softmax_segm_output, softmax_segm_max=attn_metadata.softmax_segm_max,
            softmax_segm_expsum=attn_metadata.softmax_segm_expsum, sinks=None,
        )


@pytest.mark.parametrize("case", ["ragged_verify_and_prefill", "uniform_verify_padded"])
def test_patched_triton_verify_batch_equals_vllms_own_kernel(configs, case):
    """The patched TRITON_ATTN plans verify requests into the split-KV kernel (counted in the report)
    and gives vLLM's own kernel's output for them; padding lanes write no row."""
    import vllm.v1.attention.backends.triton_attn as triton_attn
    from vllm.v1.attention.backends.triton_attn import TritonAttentionMetadataBuilder

    if case == "ragged_verify_and_prefill":  # after rejections, a short extend, then a prefill of 40
        batch, num_decodes = VerifyBatch([4, 1, 2, 4, 3, 40], [100, 7, 65, 300, 33, 90], seed=1), 5
    else:
        batch, num_decodes = VerifyBatch([4, 4, 4], [130, 64, 257], num_padding=2, seed=2), 5
    with attnplug.patched("vllm", split_launch=True):
        builder = make_builder(TritonAttentionMetadataBuilder, configs["spec"])
        before = dict(report.split_kv)
        attn_metadata = builder.build(0, batch.metadata)
        plan = attn_metadata.attnplug_plan
        assert (plan.num_decodes, plan.max_decode_query_len) == (num_decodes, 4)
        assert report.split_kv["tokens"] - before.get("tokens", 0) == sum(batch.metadata.query_start_loc_cpu.diff()[:num_decodes].tolist())
        ours = torch.full_like(batch.q, float("nan"))
        triton_attn.unified_attention(**batch.unified_attention_kwargs(attn_metadata, ours))
        original = triton_attn.unified_attention.__wrapped__
    stock = torch.full_like(batch.q, float("nan"))
    original(**batch.unified_attention_kwargs(attn_metadata, stock))
    real = batch.num_real_tokens
    torch.testing.assert_close(ours[:real], stock[:real], atol=2e-5, rtol=2e-5)
    assert torch.isnan(ours[real:]).all(), "a padding lane wrote an output row"


def test_a_verify_plan_stays_valid_when_draft_steps_grow_seq_lens_in_place(configs):
    """vLLM 0.33's speculators may reuse draft-decode metadata for later draft steps, updating
    ``seq_lens`` in place (``supports_draft_decode_metadata_update``): a plan built once must follow."""
    import vllm.v1.attention.backends.triton_attn as triton_attn
    from vllm.v1.attention.backends.triton_attn import TritonAttentionMetadataBuilder

    from attnplug.adapters.vllm.backend import AttnplugMetadataBuilder

    assert getattr(AttnplugMetadataBuilder, "supports_draft_decode_metadata_update", False) == getattr(
        TritonAttentionMetadataBuilder, "supports_draft_decode_metadata_update", False)
    batch = VerifyBatch([1, 1, 1], [60, 200, 28], seed=3)
    with attnplug.patched("vllm", split_launch=True):
        builder = make_builder(TritonAttentionMetadataBuilder, configs["spec"])
        attn_metadata = builder.build(0, batch.metadata)
        for _ in range(3):  # three draft steps, each one token longer, same metadata object
            attn_metadata.seq_lens.add_(1)
            ours = torch.full_like(batch.q, float("nan"))
            triton_attn.unified_attention(**batch.unified_attention_kwargs(attn_metadata, ours))
            stock = torch.full_like(batch.q, float("nan"))
            triton_attn.unified_attention.__wrapped__(**batch.unified_attention_kwargs(attn_metadata, stock))
            torch.testing.assert_close(ours, stock, atol=2e-5, rtol=2e-5)


def test_patched_triton_hands_a_mixed_batch_in_a_full_graph_capture_back(configs, monkeypatch):
    """TRITON_ATTN declares ALWAYS, so cudagraph_mode=FULL captures mixed batches: a mixed plan's split
    is fixed at capture, so that call goes to vLLM's kernel; a uniform verify batch stays ours."""
    import vllm.v1.attention.backends.triton_attn as triton_attn
    from vllm.v1.attention.backends.triton_attn import TritonAttentionMetadataBuilder

    from attnplug.adapters.vllm import triton_attn as replacements

    monkeypatch.setattr(replacements, "capturing", lambda q: True)  # as under torch.cuda.graph
    with attnplug.patched("vllm", split_launch=True):
        builder = make_builder(TritonAttentionMetadataBuilder, configs["spec"])
        for query_lens, seq_lens, ours_expected in (([4, 2, 40], [100, 7, 90], False), ([4, 4], [100, 33], True)):
            batch = VerifyBatch(query_lens, seq_lens, seed=4)
            attn_metadata = builder.build(0, batch.metadata)
            calls = report.op_calls["paged_attention"]
            out = torch.full_like(batch.q, float("nan"))
            triton_attn.unified_attention(**batch.unified_attention_kwargs(attn_metadata, out))
            assert (report.op_calls["paged_attention"] > calls) == ours_expected, query_lens
            assert not torch.isnan(out).any()


# ----------------------------------------------------------------------------- FP8 KV cache (--kv-cache-dtype fp8)
# vLLM's per-tensor FP8 KV cache: its own Triton KV write (key / layer._k_scale, stored as
# current_platform.fp8_dtype()) fills a uint8 cache; attnplug must read the same bytes as that dtype with the
# layer's own scale tensors. Scales != 1 so that a dropped or swapped scale shows in the outputs.
K_SCALE, V_SCALE = 0.25, 3.0
_layer_names = iter(range(10**6))


def make_attention_layer(backend_cls, vllm_config, cache_dtype):
    """A real vLLM ``Attention`` layer of the tiny model's shape on ``backend_cls``, with KV cache ``cache_dtype``."""
    from vllm.config import CacheConfig, set_current_vllm_config
    from vllm.model_executor.layers.attention.attention import Attention

    cache_config = CacheConfig(block_size=BLOCK_SIZE, cache_dtype=cache_dtype)
    with set_current_vllm_config(vllm_config):
        return Attention(NUM_Q_HEADS, HEAD_SIZE, HEAD_SIZE ** -0.5, NUM_KV_HEADS, cache_config=cache_config,
                         prefix=f"model.layers.{next(_layer_names)}.self_attn.attn", attn_backend=backend_cls)


@pytest.fixture
def as_if_on_cuda(monkeypatch):
    """vLLM's platform answers like an SM90 GPU while layers are built (TritonAttentionImpl's CUDA branch)."""
    import vllm.model_executor.layers.attention.attention  # noqa: F401 -- imported as on CPU (no flash-attn import)
    from vllm.platforms import current_platform
    from vllm.platforms.interface import DeviceCapability

    monkeypatch.setattr(current_platform, "is_cuda", lambda: True)
    monkeypatch.setattr(type(current_platform), "get_device_capability",
                        classmethod(lambda cls, device_id=0: DeviceCapability(9, 0)))


@pytest.mark.parametrize("cache_dtype", ["fp8", "fp8_e4m3", "fp8_e5m2"])
def test_on_cuda_vllm_quantizes_the_query_and_the_attnplug_backend_keeps_it(configs, as_if_on_cuda, cache_dtype):
    """On CUDA, TritonAttentionImpl sets ``supports_quant_query_input`` and vLLM's Attention layer then quantizes
    the query to fp8 (``layer.query_quant``, scale ``layer._q_scale``) before the impl runs. The ATTNPLUG impl
    turns that off for the FP8 layers it serves (its kernels take the model's dtype); the patched TRITON_ATTN
    keeps vLLM's quantization (its kernels read the fp8 query with ``q_descale``)."""
    from vllm.v1.attention.backends.triton_attn import TritonAttentionBackend

    from attnplug.adapters.vllm.backend import AttnplugBackend

    stock = make_attention_layer(TritonAttentionBackend, configs["plain"], cache_dtype)
    assert stock.impl.supports_quant_query_input is True and stock.query_quant is not None
    ours = make_attention_layer(AttnplugBackend, configs["plain"], cache_dtype)
    assert ours.impl._layer_fallback is None
    assert ours.impl.supports_quant_query_input is False and ours.query_quant is None
    with attnplug.patched("vllm", split_launch=True):
        patched = make_attention_layer(TritonAttentionBackend, configs["plain"], cache_dtype)
    assert patched.impl.supports_quant_query_input is True and patched.query_quant is not None


@pytest.mark.parametrize("cache_dtype", ["int8_per_token_head", "fp8_per_token_head"])
def test_on_cuda_per_token_head_layers_keep_vllms_query_handling(configs, as_if_on_cuda, cache_dtype):
    from attnplug.adapters.vllm.backend import AttnplugBackend

    ours = make_attention_layer(AttnplugBackend, configs["plain"], cache_dtype)
    assert ours.impl.supports_quant_query_input is True  # vLLM's own value, untouched (the layer is vLLM's)


class Fp8Batch:
    """A batch over an FP8 KV cache that vLLM's own KV write filled: decode-like requests first.

    The cache is one uint8 buffer in the physical NHD order, seen as the logical
    ``[num_blocks, num_kv_heads, block_size, 2 * head_size]`` TRITON_ATTN's forward receives."""

    def __init__(self, layer, query_lens, seq_lens, *, seed):
        from attnplug_cpu_shim import allow_fp8_kv_cache_writes
        from vllm.v1.attention.backend import CommonAttentionMetadata

        allow_fp8_kv_cache_writes()  # the CPU platform has no device capability (see the shim)
        g = torch.Generator().manual_seed(seed)
        pages = [-(-n // BLOCK_SIZE) for n in seq_lens]
        num_blocks = sum(pages) + 2
        physical = torch.zeros(num_blocks, BLOCK_SIZE, NUM_KV_HEADS, 2 * HEAD_SIZE, dtype=torch.uint8)
        self.kv_cache = physical.permute(0, 2, 1, 3)
        perm = torch.randperm(num_blocks - 1, generator=g).add(1).int()
        block_table = torch.zeros(len(seq_lens), max(pages), dtype=torch.int32)
        used = 0
        for i, n in enumerate(pages):
            block_table[i, :n] = perm[used:used + n]
            used += n
        # every position of every sequence goes through vLLM's own write path (layer._k_scale / _v_scale)
        slots = torch.cat([block_table[i, torch.arange(n) // BLOCK_SIZE].long() * BLOCK_SIZE
                           + torch.arange(n) % BLOCK_SIZE for i, n in enumerate(seq_lens)])
        self.keys = torch.randn(len(slots), NUM_KV_HEADS, HEAD_SIZE, generator=g)
        values = torch.randn(len(slots), NUM_KV_HEADS, HEAD_SIZE, generator=g)
        layer.impl.do_kv_cache_update(layer, self.keys, values, self.kv_cache, slots)
        assert self.kv_cache.any(), "vLLM's KV write stored nothing"
        qsl = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
        self.q = torch.randn(sum(query_lens), NUM_Q_HEADS, HEAD_SIZE, generator=g)
        self.query_lens, self.seq_lens, self.block_table = list(query_lens), list(seq_lens), block_table
        self.metadata = CommonAttentionMetadata(
            query_start_loc=qsl, query_start_loc_cpu=qsl.clone(), seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            num_reqs=len(seq_lens), num_actual_tokens=len(self.q), max_query_len=max(query_lens),
            max_seq_len=max(seq_lens), block_table_tensor=block_table,
            slot_mapping=torch.zeros(len(self.q), dtype=torch.int64),
        )

    def reference(self, k_scale: float, v_scale: float, q: torch.Tensor | None = None) -> torch.Tensor:
        """float64 causal attention over the dequantized cache (``fp8 value * scale``), GQA; ``q``: the
        queries (default ``self.q``)."""
        k_all, v_all = (half.contiguous().view(torch.float8_e4m3fn).double()
                        for half in self.kv_cache.transpose(1, 2).split(HEAD_SIZE, dim=-1))
        k_all, v_all, q_all = k_all * k_scale, v_all * v_scale, q
        out, start = torch.empty(len(self.q), NUM_Q_HEADS, HEAD_SIZE, dtype=torch.float64), 0
        group = NUM_Q_HEADS // NUM_KV_HEADS
        for i, (qlen, n) in enumerate(zip(self.query_lens, self.seq_lens)):
            blocks = self.block_table[i, torch.arange(n) // BLOCK_SIZE].long()
            k = k_all[blocks, torch.arange(n) % BLOCK_SIZE].repeat_interleave(group, dim=1)  # [n, Hq, D]
            v = v_all[blocks, torch.arange(n) % BLOCK_SIZE].repeat_interleave(group, dim=1)
            q = (self.q if q_all is None else q_all)[start:start + qlen].double()
            logits = torch.einsum("qhd,khd->hqk", q, k) * HEAD_SIZE ** -0.5
            positions = n - qlen + torch.arange(qlen)
            logits = logits.masked_fill(torch.arange(n)[None, None, :] > positions[None, :, None], float("-inf"))
            out[start:start + qlen] = torch.einsum("hqk,khd->qhd", logits.softmax(-1), v)
            start += qlen
        return out


def run_forward(layer, batch, attn_metadata, forward):
    out = torch.full_like(batch.q, float("nan"))
    forward(layer, batch.q, None, None, batch.kv_cache, attn_metadata, out)
    return out


FP8_BATCHES = {  # (query_lens, seq_lens, num_decodes with speculative decoding's threshold 1 + 3)
    "decodes_verify_and_prefill": ([1, 4, 1, 3, 40], [100, 65, 7, 300, 90], 4),
    "decodes_only": ([1, 1, 1], [130, 33, 257], 3),
}


@pytest.mark.parametrize(("case", "cache_dtype"), [(case, "fp8") for case in sorted(FP8_BATCHES)]
                         + [("decodes_verify_and_prefill", "fp8_e5m2")])
def test_attnplug_backend_reads_vllms_fp8_cache_with_the_layers_scales(configs, case, cache_dtype, monkeypatch):
    """The ATTNPLUG impl with ``--kv-cache-dtype fp8``: the cache vLLM's own write filled, read by attnplug's
    paged_attention as float8_e4m3fn views of the same memory with the layer's ``_k_scale`` / ``_v_scale``
    tensors themselves; the output equals vLLM's own TRITON_ATTN forward and a float64 reference. vLLM's
    Triton KV write stores ``fp8_e5m2`` as ``current_platform.fp8_dtype()`` too (e4m3), and so it is read."""
    from vllm.v1.attention.backends.triton_attn import TritonAttentionImpl

    from attnplug.adapters.vllm.backend import AttnplugBackend, AttnplugMetadataBuilder

    layer = make_attention_layer(AttnplugBackend, configs["spec"], cache_dtype)
    layer._k_scale.fill_(K_SCALE)
    layer._v_scale.fill_(V_SCALE)
    query_lens, seq_lens, num_decodes = FP8_BATCHES[case]
    batch = Fp8Batch(layer, query_lens, seq_lens, seed=5)
    attn_metadata = make_builder(AttnplugMetadataBuilder, configs["spec"], "fp8").build(0, batch.metadata)
    assert attn_metadata.attnplug_plan.num_decodes == num_decodes
    calls = []
    real = layer.impl._paged_attention
    monkeypatch.setattr(layer.impl, "_paged_attention", lambda *a, **kw: calls.append((a, kw)) or real(*a, **kw))
    ours = run_forward(layer, batch, attn_metadata, layer.impl.forward)
    (args, kwargs), = calls
    k_cache, v_cache = args[1], args[2]
    assert k_cache.dtype == v_cache.dtype == torch.float8_e4m3fn
    assert k_cache.untyped_storage().data_ptr() == batch.kv_cache.untyped_storage().data_ptr()
    assert kwargs["k_scale"] is layer._k_scale and kwargs["v_scale"] is layer._v_scale
    stock = run_forward(layer, batch, attn_metadata, lambda *a: TritonAttentionImpl.forward(layer.impl, *a))
    torch.testing.assert_close(ours, stock, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(ours.double(), batch.reference(K_SCALE, V_SCALE), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", sorted(FP8_BATCHES))
def test_patched_triton_reads_vllms_fp8_cache_with_the_descale_tensors(configs, case, monkeypatch):
    """The patched TRITON_ATTN with ``--kv-cache-dtype fp8``: vLLM's forward passes FP8 views and
    ``k_descale = layer._k_scale.expand((num_seqs, num_kv_heads))``; attnplug's paged_attention gets one-element
    views of the layer's scale memory (no copy) and gives vLLM's own kernel's output."""
    import vllm.v1.attention.backends.triton_attn as triton_attn
    from vllm.v1.attention.backends.triton_attn import TritonAttentionBackend, TritonAttentionMetadataBuilder

    from attnplug import ops

    calls = []
    real_resolve = ops.resolve

    def recording_resolve(name):
        op = real_resolve(name)
        return (lambda *a, **kw: calls.append((a, kw)) or op(*a, **kw)) if name == "paged_attention" else op

    monkeypatch.setattr(ops, "resolve", recording_resolve)
    query_lens, seq_lens, num_decodes = FP8_BATCHES[case]
    with attnplug.patched("vllm", split_launch=True):
        layer = make_attention_layer(TritonAttentionBackend, configs["spec"], "fp8")
        layer._k_scale.fill_(K_SCALE)
        layer._v_scale.fill_(V_SCALE)
        batch = Fp8Batch(layer, query_lens, seq_lens, seed=6)
        attn_metadata = make_builder(TritonAttentionMetadataBuilder, configs["spec"], "fp8").build(
            0, batch.metadata)
        assert attn_metadata.attnplug_plan.num_decodes == num_decodes
        ours = run_forward(layer, batch, attn_metadata, layer.impl.forward)
        original = triton_attn.unified_attention.__wrapped__
    assert triton_attn.unified_attention is original  # reverted: the same forward now runs vLLM's own kernel
    (args, kwargs), = calls
    assert args[1].dtype == args[2].dtype == torch.float8_e4m3fn
    for scale, source in ((kwargs["k_scale"], layer._k_scale), (kwargs["v_scale"], layer._v_scale)):
        assert scale.numel() == 1 and scale.dtype == torch.float32 and scale.data_ptr() == source.data_ptr()
    stock = run_forward(layer, batch, attn_metadata, layer.impl.forward)
    torch.testing.assert_close(ours, stock, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(ours.double(), batch.reference(K_SCALE, V_SCALE), atol=1e-4, rtol=1e-4)


Q_SCALE = 0.05


def fp8_query_batch(configs, which, seed):
    """A layer of ``which`` (its builder's metadata) over vLLM's FP8 cache, and queries quantized to fp8 the way
    vLLM's Attention layer does on CUDA (``query / layer._q_scale``, then TRITON_ATTN passes ``q_descale``)."""
    from vllm.v1.attention.backends.triton_attn import TritonAttentionBackend, TritonAttentionMetadataBuilder

    from attnplug.adapters.vllm.backend import AttnplugBackend, AttnplugMetadataBuilder

    backend, builder = ((AttnplugBackend, AttnplugMetadataBuilder) if which == "attnplug_backend"
                        else (TritonAttentionBackend, TritonAttentionMetadataBuilder))
    layer = make_attention_layer(backend, configs["spec"], "fp8")
    layer._q_scale.fill_(Q_SCALE)
    layer._k_scale.fill_(K_SCALE)
    layer._v_scale.fill_(V_SCALE)
    batch = Fp8Batch(layer, *FP8_BATCHES["decodes_verify_and_prefill"][:2], seed=seed)
    batch.q = (batch.q * 0.1 / Q_SCALE).to(torch.float8_e4m3fn)  # queries of magnitude ~0.1, stored as fp8 / scale
    attn_metadata = make_builder(builder, configs["spec"], "fp8").build(0, batch.metadata)
    return layer, batch, attn_metadata


@pytest.mark.parametrize("which", ["attnplug_backend", "patched_triton"])
def test_fp8_queries_run_with_the_layers_q_scale(configs, which, monkeypatch):
    """A query vLLM quantized to fp8 (TRITON_ATTN's path on CUDA: ``q_descale = layer._q_scale``) runs through
    attnplug's kernels with that scale into the model's 16-bit output: at least about as close to a float64
    reference on the dequantized query and cache as vLLM's own fp8-query kernel (which also rounds P to fp8)."""
    from vllm.v1.attention.backends.triton_attn import TritonAttentionImpl

    from attnplug import ops

    calls = []
    real_resolve = ops.resolve

    def recording_resolve(name):
        op = real_resolve(name)
        return (lambda *a, **kw: calls.append((a, kw)) or op(*a, **kw)) if name == "paged_attention" else op

    monkeypatch.setattr(ops, "resolve", recording_resolve)  # before the backend / patch resolve their op
    with attnplug.patched("vllm", split_launch=(which == "patched_triton")):
        layer, batch, attn_metadata = fp8_query_batch(configs, which, seed=8)
        ours = torch.full(batch.q.shape, float("nan"), dtype=torch.float16)
        layer.impl.forward(layer, batch.q, None, None, batch.kv_cache, attn_metadata, ours)
    (args, kwargs), = calls
    assert args[0].dtype == torch.float8_e4m3fn and kwargs["q_scale"].data_ptr() == layer._q_scale.data_ptr()
    assert kwargs["k_scale"].data_ptr() == layer._k_scale.data_ptr()
    stock = torch.full(batch.q.shape, float("nan"), dtype=torch.float16)
    TritonAttentionImpl.forward(layer.impl, layer, batch.q, None, None, batch.kv_cache, attn_metadata, stock)
    expected = batch.reference(K_SCALE, V_SCALE, q=batch.q.double() * Q_SCALE)
    ours_error, stock_error = ((out.double() - expected).abs().max().item() for out in (ours, stock))
    assert ours_error <= 1.25 * stock_error + 1e-3, (ours_error, stock_error)
    torch.testing.assert_close(ours.double(), expected, atol=3e-2, rtol=0)  # |expected| <= ~1


def test_fp8_query_decodes_that_vllm_splits_go_to_vllms_kernel(configs, monkeypatch):
    """The patched TRITON_ATTN hands a small FP8-query decode batch that vLLM splits itself (at most
    ``seq_threshold_3D`` sequences and ``FP8_QUERY_HAND_BACK_MAX_KV_TOKENS`` KV tokens: vLLM's split-K FP8
    kernel is faster there) back to vLLM, with one log line, and takes the others."""
    from vllm.v1.attention.backends.triton_attn import (
        TritonAttentionBackend,
        TritonAttentionImpl,
        TritonAttentionMetadataBuilder,
    )

    from attnplug._log import logger
    from attnplug.adapters.vllm.planning import FP8_QUERY_DECODES_VLLM_SPLITS, FP8_QUERY_HAND_BACK_MAX_KV_TOKENS

    messages = []
    monkeypatch.setattr(logger, "info", lambda message, *args: messages.append(message % args if args else message))
    with attnplug.patched("vllm", split_launch=True):
        layer = make_attention_layer(TritonAttentionBackend, configs["spec"], "fp8")
        for scale, value in ((layer._q_scale, Q_SCALE), (layer._k_scale, K_SCALE), (layer._v_scale, V_SCALE)):
            scale.fill_(value)
        for case, taken in (("decodes_only", False), ("decodes_verify_and_prefill", True)):
            batch = Fp8Batch(layer, *FP8_BATCHES[case][:2], seed=10)
            batch.q = (batch.q * 0.1 / Q_SCALE).to(torch.float8_e4m3fn)
            attn_metadata = make_builder(TritonAttentionMetadataBuilder, configs["spec"], "fp8").build(0, batch.metadata)
            seq_lens = batch.metadata.seq_lens
            assert len(seq_lens) <= attn_metadata.seq_threshold_3D
            assert len(seq_lens) * int(seq_lens.max()) <= FP8_QUERY_HAND_BACK_MAX_KV_TOKENS
            calls = report.op_calls["paged_attention"]
            ours = torch.full(batch.q.shape, float("nan"), dtype=torch.float16)
            layer.impl.forward(layer, batch.q, None, None, batch.kv_cache, attn_metadata, ours)
            assert (report.op_calls["paged_attention"] > calls) == taken, case
            assert not torch.isnan(ours).any(), case
    assert sum(FP8_QUERY_DECODES_VLLM_SPLITS in m for m in messages) == 1, messages


@pytest.mark.parametrize("which", ["attnplug_backend", "patched_triton"])
def test_fp8_queries_with_a_float32_output_go_to_vllms_kernel(configs, which):
    """attnplug's kernels write an fp8 query's attention in 16 bits only: with a float32 output (a float32 model
    on a GPU) the call runs vLLM's own kernel (the same output), attnplug's paged_attention is not called."""
    import vllm.v1.attention.backends.triton_attn as triton_attn
    from vllm.v1.attention.backends.triton_attn import TritonAttentionImpl

    with attnplug.patched("vllm", split_launch=(which == "patched_triton")):
        layer, batch, attn_metadata = fp8_query_batch(configs, which, seed=9)
        calls = report.op_calls["paged_attention"]
        ours = torch.full(batch.q.shape, float("nan"))
        layer.impl.forward(layer, batch.q, None, None, batch.kv_cache, attn_metadata, ours)
        assert report.op_calls["paged_attention"] == calls, "attnplug ran an fp8 query into a float32 output"
    assert not hasattr(triton_attn.unified_attention, "__wrapped__")
    stock = torch.full(batch.q.shape, float("nan"))
    TritonAttentionImpl.forward(layer.impl, layer, batch.q, None, None, batch.kv_cache, attn_metadata, stock)
    assert not torch.isnan(stock).any()
    torch.testing.assert_close(ours, stock, atol=0, rtol=0)


@pytest.mark.parametrize("cache_dtype", ["int8_per_token_head", "fp8_per_token_head", "int4_per_token_head"])
def test_per_token_head_modes_go_to_vllms_kernel_with_one_log_line(configs, cache_dtype, monkeypatch):
    """Per-token-head KV quantization (scales inside the cache) is vLLM's: the ATTNPLUG impl hands every call to
    TRITON_ATTN's forward and says so once; the patched TRITON_ATTN hands its unified_attention calls back."""
    from vllm.v1.attention.backends.triton_attn import TritonAttentionImpl

    from attnplug._log import logger
    from attnplug.adapters.vllm import triton_attn as replacements
    from attnplug.adapters.vllm.backend import AttnplugBackend

    said, handed_back = [], []
    monkeypatch.setattr(logger, "info", lambda fmt, message: said.append(message))
    monkeypatch.setattr(TritonAttentionImpl, "forward", lambda self, *a, **kw: handed_back.append(a) or a[-1])
    layer = make_attention_layer(AttnplugBackend, configs["plain"], cache_dtype)
    mode = layer.impl._kv_quant_mode
    assert mode.is_per_token_head
    calls = report.op_calls["paged_attention"]
    batch = VerifyBatch([1, 1], [40, 70], seed=7)
    attn_metadata = SimpleMetadata()
    for _ in range(2):
        layer.impl.forward(layer, batch.q, None, None, torch.empty(0), attn_metadata, torch.empty_like(batch.q))
    assert len(handed_back) == 2 and report.op_calls["paged_attention"] == calls
    assert said == [f"ATTNPLUG backend falls back to vLLM's Triton kernel for quantized KV cache ({mode.name})"]
    plan = types.SimpleNamespace(num_prefills=0)  # any plan: the layer-wide arguments decide
    kwargs = dict(q=batch.q, k=batch.q, causal=True, kv_quant_mode=mode, k_descale=None, v_descale=None)
    monkeypatch.setattr(replacements, "capturing", lambda q: False)
    assert replacements._why_not(plan, kwargs)[0] == f"quantized KV cache ({mode.name})"


class SimpleMetadata:
    """Stands in for TritonAttentionMetadata where only a hand-back is expected (never read by attnplug)."""

    causal = True
    mm_prefix_range_tensor = rswa_prefix_lens = None
    num_actual_tokens = 0
