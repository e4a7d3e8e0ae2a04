"""Tests of attnplug.core.fa3: FA3 scheduler metadata, its buffer and its parameter checks.

No FA3 binding (sgl_kernel, vllm, flash_attn_interface) is installed on the machines here, CPU or
GPU, so nothing below runs FA3 itself: every test feeds a stand-in ``get_scheduler_metadata``,
passed as ``binding=`` or placed in ``sys.modules``. The stand-ins copy the real upstream
signatures (keyword names and defaults), so a wrong keyword mapping fails with TypeError.
CPU tensors only.
"""

import dataclasses
import inspect
import logging
import os
import pathlib
import subprocess
import sys
import types

import pytest
import torch

from attnplug.core import fa3
from attnplug.core.fa3 import (
    FA3Binding,
    FA3Params,
    allocate_fa3_scheduler_metadata,
    check_fa3_call,
    fa3_scheduler_metadata,
    find_fa3_binding,
)
from tests.utils import SENTINEL, assert_equal_verbose

ENGINE_MODULES = ("sgl_kernel", "vllm", "flash_attn_interface")


# Stand-ins with the upstream signatures of get_scheduler_metadata. Each records its arguments and
# returns fresh non-zero int32 "metadata" of FA3's size for the batch: 1 + round_up(b, 4) * 4.
def _fake_metadata(batch_size):
    n = 1 + (batch_size + 3) // 4 * 4 * 4
    return torch.arange(1, n + 1, dtype=torch.int32) * 7 + batch_size


def sgl_kernel_style(batch_size, max_seqlen_q, max_seqlen_k, num_heads, num_heads_k, headdim,
                     cache_seqlens, qkv_dtype=torch.bfloat16, headdim_v=None, cu_seqlens_q=None,
                     cu_seqlens_k_new=None, page_size=None, max_seqlen_k_new=0, causal=False,
                     window_size=(-1, -1), has_softcap=False, num_splits=0, pack_gqa=None, sm_margin=0):
    """sgl-project/sglang sgl-kernel/python/sgl_kernel/flash_attn.py (PR #21103)."""
    sgl_kernel_style.calls.append(dict(inspect.currentframe().f_locals))
    return _fake_metadata(batch_size)


def vllm_style(batch_size, max_seqlen_q, max_seqlen_k, num_heads_q, num_heads_kv, headdim,
               cache_seqlens, qkv_dtype=torch.bfloat16, headdim_v=None, cu_seqlens_q=None,
               cu_seqlens_k_new=None, cache_leftpad=None, page_size=None, max_seqlen_k_new=0,
               causal=False, window_size=(-1, -1), has_softcap=False, num_splits=0, pack_gqa=None,
               sm_margin=0):
    """vllm-project/flash-attention vllm_flash_attn/flash_attn_interface.py."""
    vllm_style.calls.append(dict(inspect.currentframe().f_locals))
    return _fake_metadata(batch_size)


def flash_attn_style(batch_size, max_seqlen_q, max_seqlen_k, num_heads_q, num_heads_kv, headdim,
                     cache_seqlens, qkv_dtype=torch.bfloat16, headdim_v=None, cu_seqlens_q=None,
                     cu_seqlens_k_new=None, cache_leftpad=None, page_size=None, max_seqlen_k_new=0,
                     causal=False, window_size=(-1, -1), attention_chunk=0, has_softcap=False,
                     num_splits=0, pack_gqa=None, sm_margin=0):
    """Dao-AILab/flash-attention hopper/flash_attn_interface.py."""
    flash_attn_style.calls.append(dict(inspect.currentframe().f_locals))
    return _fake_metadata(batch_size)


STAND_INS = {"sgl_kernel": sgl_kernel_style, "vllm": vllm_style, "flash_attn": flash_attn_style}


@pytest.fixture(autouse=True)
def fresh_state():
    """Each test starts with no cached binding and empty stand-in call logs."""
    find_fa3_binding.cache_clear()
    for function in STAND_INS.values():
        function.calls = []
    yield
    find_fa3_binding.cache_clear()


def make_params(**overrides):
    values = dict(num_q_heads=12, num_kv_heads=4, head_size=80, page_size=16, dtype=torch.bfloat16,
                  causal=True, window_size=(-1, -1), softcap=0.0, num_splits=0, pack_gqa=None, sm_margin=0)
    values.update(overrides)
    return FA3Params(**values)


def make_batch(num_seqs, seed=0):
    """Odd query/KV lengths: query_start_loc int32 [num_seqs + 1], seq_lens int32 [num_seqs]."""
    gen = torch.Generator().manual_seed(seed)
    q_lens = torch.randint(1, 9, (num_seqs,), generator=gen, dtype=torch.int32)
    seq_lens = q_lens + torch.randint(0, 300, (num_seqs,), generator=gen, dtype=torch.int32)
    query_start_loc = torch.zeros(num_seqs + 1, dtype=torch.int32)
    query_start_loc[1:] = torch.cumsum(q_lens, 0)
    return query_start_loc, seq_lens, int(q_lens.max()), int(seq_lens.max())


def run(params, num_seqs, *, binding_name="sgl_kernel", out=None, seed=0):
    query_start_loc, seq_lens, max_q, max_k = make_batch(num_seqs, seed)
    return fa3_scheduler_metadata(params, query_start_loc, seq_lens, max_seqlen_q=max_q, max_seqlen_k=max_k,
                                  out=out, binding=FA3Binding(binding_name, STAND_INS[binding_name]))


# ---------------------------------------------------------------- the persistent buffer

@pytest.mark.parametrize("max_num_seqs, batches", [(10, [3]), (13, [13, 5, 1]), (7, [2, 7, 4])])
def test_buffer_copy_zeroes_tail(max_num_seqs, batches):
    """Stand-in binding: out[:n] holds the metadata, out[n:] is zero, the return is the out[:n] view.

    The buffer is poisoned first; batches that shrink show that no earlier, larger schedule
    survives in the tail.
    """
    out = allocate_fa3_scheduler_metadata(max_num_seqs)
    assert out.dtype == torch.int32 and out.shape == (1 + -(-max_num_seqs // 4) * 4 * 4,)
    out.fill_(SENTINEL)
    for step, num_seqs in enumerate(batches):
        result = run(make_params(), num_seqs, out=out, seed=step)
        expected = _fake_metadata(num_seqs)
        n = expected.shape[0]
        assert result.shape == (n,)
        assert result.data_ptr() == out.data_ptr(), "must return a view of out, not a copy"
        assert_equal_verbose(result, expected, what=f"out[:n] after batch {num_seqs}")
        assert_equal_verbose(out[n:], torch.zeros(out.shape[0] - n, dtype=torch.int32), what="out[n:]")


def test_without_out_returns_the_binding_tensor():
    """Stand-in binding: with no buffer, the binding's own tensor comes back unchanged."""
    result = run(make_params(), 5)
    assert_equal_verbose(result, _fake_metadata(5), what="metadata")


def test_buffer_too_small_names_out():
    """Stand-in binding: a buffer shorter than the metadata raises ValueError naming out."""
    out = torch.full((9,), SENTINEL, dtype=torch.int32)  # a batch of 3 needs 1 + 4 * 4 = 17
    with pytest.raises(ValueError, match=r"out holds 9 int32 .* needs 17"):
        run(make_params(), 3, out=out)


@pytest.mark.parametrize("bad_out, error", [
    (torch.zeros(64, dtype=torch.int64), TypeError),
    (torch.zeros(8, 8, dtype=torch.int32), TypeError),
    (torch.zeros(128, dtype=torch.int32)[::2], ValueError),
])
def test_bad_out_is_rejected(bad_out, error):
    with pytest.raises(error, match="out"):
        run(make_params(), 3, out=bad_out)


def test_allocate_rejects_bad_size():
    with pytest.raises(ValueError, match="max_num_seqs"):
        allocate_fa3_scheduler_metadata(0)


# ---------------------------------------------------------------- keywords per binding

def expected_keywords(binding_name, params, query_start_loc, seq_lens, max_q, max_k):
    heads_q, heads_kv = {"sgl_kernel": ("num_heads", "num_heads_k")}.get(binding_name, ("num_heads_q", "num_heads_kv"))
    return {
        "batch_size": seq_lens.shape[0], "max_seqlen_q": max_q, "max_seqlen_k": max_k,
        heads_q: params.num_q_heads, heads_kv: params.num_kv_heads, "headdim": params.head_size,
        "headdim_v": params.head_size_v, "qkv_dtype": params.dtype, "cache_seqlens": seq_lens,
        "cu_seqlens_q": query_start_loc, "page_size": params.page_size, "causal": params.causal,
        "window_size": params.window_size, "has_softcap": params.softcap > 0,
        "num_splits": params.num_splits, "pack_gqa": params.pack_gqa, "sm_margin": params.sm_margin,
    }


@pytest.mark.parametrize("binding_name", ["sgl_kernel", "vllm", "flash_attn"])
@pytest.mark.parametrize("params", [
    dict(),
    dict(num_q_heads=7, num_kv_heads=1, head_size=96, head_size_v=64, page_size=1, dtype=torch.float16,
         causal=False, window_size=[127, 0], softcap=30.0, num_splits=16),
    dict(pack_gqa=True, sm_margin=4, dtype=torch.float8_e4m3fn),
])
def test_keywords_reach_each_binding(binding_name, params):
    """Stand-in bindings with the upstream signatures receive our values under their own names."""
    params = make_params(**params)
    if binding_name == "vllm":  # it rejects pack_gqa / sm_margin (tested below)
        params = dataclasses.replace(params, pack_gqa=None, sm_margin=0)
    query_start_loc, seq_lens, max_q, max_k = make_batch(6, seed=3)
    fa3_scheduler_metadata(params, query_start_loc, seq_lens, max_seqlen_q=max_q, max_seqlen_k=max_k,
                           binding=FA3Binding(binding_name, STAND_INS[binding_name]))
    stand_in = STAND_INS[binding_name]
    assert len(stand_in.calls) == 1
    received = stand_in.calls[0]
    for keyword, value in expected_keywords(binding_name, params, query_start_loc, seq_lens, max_q, max_k).items():
        if isinstance(value, torch.Tensor):
            assert received[keyword] is value, keyword  # the caller's tensor itself, no copy
        else:
            assert received[keyword] == value and type(received[keyword]) is type(value), \
                f"{keyword}: got {received[keyword]!r}, want {value!r}"
    # everything else keeps the upstream default (cu_seqlens_k_new, cache_leftpad, attention_chunk, ...)
    signature = inspect.signature(stand_in)
    for keyword in set(signature.parameters) - set(expected_keywords(binding_name, params, *make_batch(1))):
        assert received[keyword] == signature.parameters[keyword].default, keyword


def test_keyword_table_matches_upstream_signatures():
    """Every keyword in the table is a parameter of the corresponding upstream signature."""
    for column, name in enumerate(fa3._BINDING_NAMES):
        parameters = inspect.signature(STAND_INS[name]).parameters
        for ours, keywords in fa3._KEYWORDS.items():
            assert len(keywords) == len(fa3._BINDING_NAMES), ours
            assert keywords[column] in parameters, f"{ours} -> {keywords[column]} not in {name}'s signature"


@pytest.mark.parametrize("field, value", [("pack_gqa", True), ("pack_gqa", False), ("sm_margin", 2)])
def test_vllm_binding_rejects_what_its_attention_call_cannot_pass(field, value):
    """vLLM's flash_attn_varlen_func runs with pack_gqa=None, sm_margin=0; other values would mismatch."""
    with pytest.raises(ValueError, match=field):
        run(make_params(**{field: value}), 4, binding_name="vllm")
    assert vllm_style.calls == []


def test_unknown_binding_name():
    query_start_loc, seq_lens, max_q, max_k = make_batch(2)
    with pytest.raises(ValueError, match="binding.name"):
        fa3_scheduler_metadata(make_params(), query_start_loc, seq_lens, max_seqlen_q=max_q, max_seqlen_k=max_k,
                               binding=FA3Binding("flashinfer", sgl_kernel_style))


# ---------------------------------------------------------------- parameter validation

@pytest.mark.parametrize("overrides, error, name", [
    (dict(num_q_heads=6, num_kv_heads=4), ValueError, "num_q_heads"),
    (dict(num_kv_heads=0), ValueError, "num_kv_heads"),
    (dict(head_size=0), ValueError, "head_size"),
    (dict(head_size_v=-1), ValueError, "head_size_v"),
    (dict(page_size=0), ValueError, "page_size"),
    (dict(page_size=16.0), TypeError, "page_size"),
    (dict(dtype="bfloat16"), TypeError, "dtype"),
    (dict(causal=1), TypeError, "causal"),
    (dict(window_size=(-2, 0)), ValueError, "window_size"),
    (dict(window_size=(128,)), ValueError, "window_size"),
    (dict(window_size=(1.5, 0)), ValueError, "window_size"),
    (dict(softcap=-1.0), ValueError, "softcap"),
    (dict(softcap=float("inf")), ValueError, "softcap"),
    (dict(num_splits=-1), ValueError, "num_splits"),
    (dict(pack_gqa="yes"), TypeError, "pack_gqa"),
    (dict(sm_margin=-1), ValueError, "sm_margin"),
])
def test_params_validation(overrides, error, name):
    with pytest.raises(error, match=name):
        make_params(**overrides)


def test_params_defaults_and_normalisation():
    params = make_params(window_size=[63, 0])
    assert params.head_size_v == params.head_size
    assert params.window_size == (63, 0) and isinstance(params.window_size, tuple)
    assert params == make_params(window_size=(63, 0))  # usable as a dict key / cache key
    assert hash(params) == hash(make_params(window_size=(63, 0)))


def call_tensors(num_q_heads=12, num_kv_heads=4, head_size=80, head_size_v=80, page_size=16, dtype=torch.bfloat16):
    """q [5, Hq, D] and a non-contiguous paged K/V cache [pages, page_size, Hkv, D] (vLLM's [2, ...] layout)."""
    q = torch.empty(5, num_q_heads, head_size, dtype=dtype)
    kv = torch.empty(3, 2, page_size, num_kv_heads, max(head_size, head_size_v), dtype=dtype)
    return q, kv[:, 0, ..., :head_size], kv[:, 1, ..., :head_size_v]


CALL = dict(causal=True, window_size=(-1, -1), softcap=0.0, num_splits=0, pack_gqa=None, sm_margin=0)


def test_check_fa3_call_accepts_a_matching_call():
    check_fa3_call(make_params(), *call_tensors(), **CALL)
    # only softcap > 0 enters the metadata: two different positive caps match
    check_fa3_call(make_params(softcap=30.0), *call_tensors(), **{**CALL, "softcap": 50.0})


@pytest.mark.parametrize("tensors, call, name", [
    (dict(num_q_heads=8), {}, "num_q_heads"),
    (dict(num_kv_heads=2), {}, "num_kv_heads"),
    (dict(head_size=64, head_size_v=64), {}, "head_size"),
    (dict(head_size_v=64), {}, "head_size_v"),
    (dict(page_size=32), {}, "page_size"),
    (dict(dtype=torch.float16), {}, "dtype"),
    ({}, dict(causal=False), "causal"),
    ({}, dict(window_size=(127, 0)), "window_size"),
    ({}, dict(softcap=30.0), "softcap"),
    ({}, dict(num_splits=16), "num_splits"),
    ({}, dict(pack_gqa=True), "pack_gqa"),
    ({}, dict(sm_margin=8), "sm_margin"),
])
def test_check_fa3_call_names_the_mismatch(tensors, call, name):
    with pytest.raises(ValueError, match=rf"^{name}"):
        check_fa3_call(make_params(), *call_tensors(**tensors), **{**CALL, **call})


def test_check_fa3_call_wants_paged_shapes():
    q, k_cache, v_cache = call_tensors()
    with pytest.raises(ValueError, match="k_cache"):
        check_fa3_call(make_params(), q, k_cache.flatten(0, 1), v_cache, **CALL)


# ---------------------------------------------------------------- batch validation, empty batch

def test_batch_validation_names_the_parameter():
    query_start_loc, seq_lens, max_q, max_k = make_batch(4)
    binding = FA3Binding("sgl_kernel", sgl_kernel_style)
    cases = [
        (dict(seq_lens=seq_lens.long()), TypeError, "seq_lens"),
        (dict(query_start_loc=query_start_loc[:-1]), ValueError, "query_start_loc"),
        (dict(query_start_loc=query_start_loc.float()), TypeError, "query_start_loc"),
        (dict(max_seqlen_q=0), ValueError, "max_seqlen_q"),
        (dict(max_seqlen_k=float(max_k)), TypeError, "max_seqlen_k"),
    ]
    for overrides, error, name in cases:
        args = dict(query_start_loc=query_start_loc, seq_lens=seq_lens, max_seqlen_q=max_q, max_seqlen_k=max_k)
        args.update(overrides)
        with pytest.raises(error, match=name):
            fa3_scheduler_metadata(make_params(), args.pop("query_start_loc"), args.pop("seq_lens"), **args,
                                   binding=binding)
    assert sgl_kernel_style.calls == []


def test_empty_batch_is_a_no_op():
    """Stand-in binding: an empty batch calls nothing, touches no buffer and returns None."""
    out = torch.full((17,), SENTINEL, dtype=torch.int32)
    result = fa3_scheduler_metadata(make_params(), torch.zeros(1, dtype=torch.int32), torch.zeros(0, dtype=torch.int32),
                                    max_seqlen_q=0, max_seqlen_k=0, out=out,
                                    binding=FA3Binding("sgl_kernel", sgl_kernel_style))
    assert result is None and sgl_kernel_style.calls == []
    assert_equal_verbose(out, torch.full((17,), SENTINEL, dtype=torch.int32), what="out")


# ---------------------------------------------------------------- discovery

@pytest.fixture
def attnplug_log(caplog, monkeypatch):
    """caplog on the 'attnplug' logger (attnplug's own handler turns propagation off)."""
    monkeypatch.setattr(logging.getLogger("attnplug"), "propagate", True)
    with caplog.at_level(logging.DEBUG, logger="attnplug"):
        yield caplog


def block_all_bindings(monkeypatch):
    """Make every binding module unimportable (sys.modules[name] = None raises ImportError)."""
    for name in ENGINE_MODULES:
        monkeypatch.setitem(sys.modules, name, None)


def install_stand_in(monkeypatch, module_name, function, **attributes):
    """Put a stand-in module (and its parents) into sys.modules."""
    parts = module_name.split(".")
    for i in range(1, len(parts)):
        monkeypatch.setitem(sys.modules, ".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    module = types.ModuleType(module_name)
    module.get_scheduler_metadata = function
    for key, value in attributes.items():
        setattr(module, key, value)
    monkeypatch.setitem(sys.modules, module_name, module)


def test_no_binding_returns_none_with_one_log_line(monkeypatch, attnplug_log):
    """Every binding blocked: None for each call, exactly one log line per process (cached)."""
    block_all_bindings(monkeypatch)
    out = torch.full((17,), SENTINEL, dtype=torch.int32)
    for seed in range(3):
        query_start_loc, seq_lens, max_q, max_k = make_batch(3, seed)
        assert fa3_scheduler_metadata(make_params(), query_start_loc, seq_lens, max_seqlen_q=max_q,
                                      max_seqlen_k=max_k, out=out) is None
    records = [r for r in attnplug_log.records if r.name == "attnplug"]
    assert len(records) == 1, [r.getMessage() for r in records]
    message = records[0].getMessage()
    assert "no FA3 binding" in message and all(name in message for name in ENGINE_MODULES)
    assert_equal_verbose(out, torch.full((17,), SENTINEL, dtype=torch.int32), what="out")


@pytest.mark.parametrize("binding_name, module_name", fa3._BINDING_MODULES)
def test_discovers_each_binding(monkeypatch, attnplug_log, binding_name, module_name):
    """A stand-in module under each binding's real module path is found and used, without a log line."""
    block_all_bindings(monkeypatch)
    install_stand_in(monkeypatch, module_name, STAND_INS[binding_name])
    assert find_fa3_binding() == FA3Binding(binding_name, STAND_INS[binding_name])
    out = allocate_fa3_scheduler_metadata(8)
    result = run_discovered(make_params(), 6, out)
    assert_equal_verbose(result, _fake_metadata(6), what="metadata")
    assert len(STAND_INS[binding_name].calls) == 1
    assert not [r for r in attnplug_log.records if r.name == "attnplug"]


def run_discovered(params, num_seqs, out):
    query_start_loc, seq_lens, max_q, max_k = make_batch(num_seqs)
    return fa3_scheduler_metadata(params, query_start_loc, seq_lens, max_seqlen_q=max_q, max_seqlen_k=max_k, out=out)


def test_discovery_order_and_failures(monkeypatch):
    """sgl_kernel wins over the others; an OSError at import (sgl_kernel without libcuda) means
    'not installed'; a vllm build without FA3 (FA3_AVAILABLE = False) is skipped."""
    block_all_bindings(monkeypatch)
    install_stand_in(monkeypatch, "sgl_kernel.flash_attn", sgl_kernel_style)
    install_stand_in(monkeypatch, "vllm.vllm_flash_attn.flash_attn_interface", vllm_style, FA3_AVAILABLE=False)
    install_stand_in(monkeypatch, "flash_attn_interface", flash_attn_style)
    assert find_fa3_binding().name == "sgl_kernel"

    real_import = fa3.importlib.import_module
    imported = []

    binding_modules = {name for _, name in fa3._BINDING_MODULES}

    def import_module(name, package=None):
        if name in binding_modules:
            imported.append(name)
        if name.startswith("sgl_kernel"):
            raise OSError("libcuda.so.1: cannot open shared object file: No such file or directory")
        return real_import(name, package)

    monkeypatch.setattr(fa3.importlib, "import_module", import_module)
    find_fa3_binding.cache_clear()
    assert find_fa3_binding().name == "flash_attn"  # sgl_kernel fails, vllm has no FA3
    assert find_fa3_binding().name == "flash_attn"
    assert imported == [name for _, name in fa3._BINDING_MODULES], "discovery must run once (cached)"


def test_import_loads_no_engine():
    """Importing attnplug.core.fa3 imports no engine; discovery waits for the first call."""
    code = ("import sys, attnplug.core.fa3; "
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {ENGINE_MODULES!r}))")
    repo_root = pathlib.Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo_root)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=repo_root, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout
