"""Checks of the vLLM adapter against the installed vLLM; run inside the vLLM venv by test_vllm_adapter.py.

(Not collected by the top-level test run: the dev venv has no vLLM.)
"""

import pickle
import subprocess
import sys

import pytest

import attnplug
from attnplug.adapters.patching import check_patch, resolve_target
from attnplug.adapters.registry import engine_patches

VLLM_PATCHES = engine_patches("vllm")


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
