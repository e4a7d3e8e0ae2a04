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


def make_builder(builder_cls, vllm_config):
    from vllm.config import set_current_vllm_config
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    spec = FullAttentionSpec(block_size=BLOCK_SIZE, num_kv_heads=NUM_KV_HEADS, head_size=HEAD_SIZE, dtype=torch.float32)
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
