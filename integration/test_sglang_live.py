"""Live SGLang 0.5.23 CPU servers: the ``attnplug`` attention backend must give the stock backends' greedy tokens.

Each server configuration (:class:`SglangConfig`: attention backend, extra env, extra CLI args) is
started ONCE per module by :class:`harness.LiveServers`, runs the whole workload (a batched
completion request, a chat request and, for configs in ``CONCURRENCY_CONFIGS``, 16 concurrent + 16
sequential requests), is stopped, and its :class:`harness.ServerRun` is cached. Tests take a run through
the indirectly parametrized ``server`` fixture::

    @pytest.mark.parametrize("server", [MY_CONFIG], indirect=True, ids=label)
    def test_something(server, live_servers): ...

The reference is SGLang's Triton backend with attnplug's plugin not loaded (``SGLANG_PLUGINS``
names another plugin); to add a backend to the differential test, append its config to
``SAME_TOKENS_AS_STOCK``.

Speculative decoding (STANDALONE, the tiny model as its own draft, 3 steps, chain drafts) is compared
with torch_native WITHOUT speculative decoding: stock SGLang 0.5.23's own Triton backend gives other
tokens with speculative decoding on CPU (its CPU path builds the small verify-mask layout,
``QLEN_ONLY``, which the Triton backend reads as the full one), while attnplug's chain-draft kernels
read no mask.

FP8 KV cache (``--kv-cache-dtype fp8_e4m3``): SGLang 0.5.23 on CPU refuses it for every backend but
``intel_amx`` ("CPU FP8 KV cache requires Intel AMX support.", then "... requires the intel_amx
attention backend.") and gives the pool its CPU-only ``cpu_fp8_e4m3`` recipe; ``fp8_e5m2`` is refused
outright ("--kv-cache-dtype fp8_e5m2 is not supported on CPU."). The FP8 configs therefore run with the
test-only ``integration/shims/sglang_gpu_fp8_pool``, which makes SGLang build the pool it builds on a
GPU (a plain ``MHATokenToKVPool`` of float8_e4m3fn stored as uint8); attnplug over that pool must give
the tokens of stock torch_native over the same pool.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from integration import harness, sglang_server
from integration.sglang_server import ATTNPLUG_PLUGIN, SglangConfig, serve
from integration.workload import CONCURRENT_PROMPTS, MAX_TOKENS, PROMPTS

pytestmark = pytest.mark.live

RUNNING, LATE = 3, 1  # the long prompt keeps decoding while CONCURRENT_PROMPTS[1] arrives
NUM_LAYERS = 2  # integration/tiny_model.py

NO_ATTNPLUG = {"SGLANG_PLUGINS": "no-such-plugin"}  # loads no plugin at all: stock SGLang
STOCK_TRITON = SglangConfig.make("triton", "triton", env=NO_ATTNPLUG)
TORCH_NATIVE_DISABLED = SglangConfig.make(
    "torch_native-disabled", "torch_native", env={"ATTNPLUG_DISABLE": "1", "ATTNPLUG_PATCHES": "all"}, report=True
)
# Mixed chunks: a request that arrives while others decode is prefilled in one batch with their decodes.
ATTNPLUG = SglangConfig.make("attnplug", "attnplug", env={"SGLANG_PLUGINS": ATTNPLUG_PLUGIN},
                             args=("--enable-mixed-chunk",), report=True)
BOGUS_PATCH = SglangConfig.make("bogus-patch", "attnplug", env={"ATTNPLUG_PATCHES": "bogus"})
# Speculative decoding: the tiny model drafts for itself, 3 steps (4 verify tokens per request with chain drafts)
DRAFT_STEPS, VERIFY_TOKENS = 3, 4


def standalone_args(topk: int) -> tuple[str, ...]:
    return ("--speculative-algorithm", "STANDALONE", "--speculative-draft-model-path", harness.MODEL_DIR_ARG,
            "--speculative-num-steps", str(DRAFT_STEPS), "--speculative-eagle-topk", str(topk),
            "--speculative-num-draft-tokens", str(VERIFY_TOKENS))


ATTNPLUG_STANDALONE = SglangConfig.make("attnplug-standalone", "attnplug", env={"SGLANG_PLUGINS": ATTNPLUG_PLUGIN},
                                        args=standalone_args(topk=1), report=True)
# tree drafts: refused at start-up, naming the flag to change
ATTNPLUG_TREE_DRAFTS = SglangConfig.make("attnplug-standalone-topk2", "attnplug", env={"SGLANG_PLUGINS": ATTNPLUG_PLUGIN},
                                         args=standalone_args(topk=2))

# FP8 KV: SGLang's GPU FP8 pool on CPU (test-only shim, see the module docstring), stock torch_native vs attnplug
GPU_FP8_POOL_ENV = {
    "ATTNPLUG_TEST_SGLANG_GPU_FP8_POOL": "1",
    "PYTHONPATH": os.pathsep.join((str(harness.INTEGRATION_DIR / "shims" / "sglang_gpu_fp8_pool"),
                                   str(sglang_server.SGL_KERNEL_SHIM_DIR))),
}
FP8_KV_ARGS = ("--kv-cache-dtype", "fp8_e4m3")
TORCH_NATIVE_FP8 = SglangConfig.make("torch_native-fp8", "torch_native", env={**NO_ATTNPLUG, **GPU_FP8_POOL_ENV},
                                     args=FP8_KV_ARGS)
ATTNPLUG_FP8 = SglangConfig.make("attnplug-fp8", "attnplug", env={"SGLANG_PLUGINS": ATTNPLUG_PLUGIN, **GPU_FP8_POOL_ENV},
                                 args=(*FP8_KV_ARGS, "--enable-mixed-chunk"), report=True)
ATTNPLUG_FP8_STANDALONE = SglangConfig.make(  # target and draft both over FP8 pools
    "attnplug-fp8-standalone", "attnplug", env={"SGLANG_PLUGINS": ATTNPLUG_PLUGIN, **GPU_FP8_POOL_ENV},
    args=(*FP8_KV_ARGS, *standalone_args(topk=1)), report=True)

SAME_TOKENS_AS_STOCK = [TORCH_NATIVE_DISABLED, ATTNPLUG]
CONCURRENCY_CONFIGS = {ATTNPLUG, ATTNPLUG_STANDALONE}


def label(config: SglangConfig) -> str:
    return config.label


def workload(config: SglangConfig, server: harness.RunningServer) -> harness.ServerRun:
    def while_decoding(server, model):  # PROMPTS[RUNNING] streamed, CONCURRENT_PROMPTS[LATE] joins it: MIXED
        return sglang_server.complete_while_decoding(server, model, PROMPTS[RUNNING], CONCURRENT_PROMPTS[LATE],
                                                     max_tokens=MAX_TOKENS)

    return harness.run_workload("sglang", config, server, chat=sglang_server.chat,
                                with_concurrency=config in CONCURRENCY_CONFIGS, while_decoding=while_decoding)


@pytest.fixture(scope="module")
def live_servers(
    sglang_python: Path, sglang_tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> harness.LiveServers:
    workdir = tmp_path_factory.mktemp("sglang-live")
    return harness.LiveServers("sglang", serve, workload, sglang_python, sglang_tiny_model, workdir)


@pytest.fixture
def server(request: pytest.FixtureRequest, live_servers: harness.LiveServers) -> harness.ServerRun:
    """The cached run of the server configuration given by indirect parametrization."""
    return live_servers.run(request.param)


def _scheduler_reports(run: harness.ServerRun) -> list[dict]:
    return [report for report in run.reports if "sglang::scheduler" in " ".join(report.get("cmdline", []))]


@pytest.mark.parametrize("server", [STOCK_TRITON], indirect=True, ids=label)
def test_stock_server_generates_full_greedy_sequences(server: harness.ServerRun) -> None:
    """The reference is meaningful: token ids come back, 16 per prompt, prompts differ, no attnplug."""
    harness.assert_full_greedy_sequences(server)  # chat ids: via the engine's chat helper
    assert "attnplug INFO [pid" not in server.log, "attnplug's plugin must not load in the stock server"


@pytest.mark.parametrize("server", SAME_TOKENS_AS_STOCK, indirect=True, ids=label)
def test_same_tokens_as_stock(server: harness.ServerRun, live_servers: harness.LiveServers) -> None:
    stock = live_servers.run(STOCK_TRITON)
    assert [g.key for g in server.completions] == [g.key for g in stock.completions], (
        f"{server.config.label}:\n{harness.describe(server.completions, PROMPTS)}\n"
        f"stock triton:\n{harness.describe(stock.completions, PROMPTS)}"
    )
    assert server.chat.key == stock.chat.key, f"{server.config.label}: {server.chat}\nstock triton: {stock.chat}"


@pytest.mark.parametrize("server", [ATTNPLUG], indirect=True, ids=label)
def test_attnplug_kernels_ran_in_scheduler_planning_once_per_batch(server: harness.ServerRun) -> None:
    """attnplug's ops ran in SGLang's scheduler process, and the plan was made once per batch, not per layer."""
    assert "falls back to SGLang's torch_native" not in server.log, "a tiny Llama must need no fallback"
    # (extend batches with prefixes come from the radix cache; SGLang 0.5.23 runs MIXED batches as EXTEND)
    for mode in ("EXTEND", "DECODE"):
        assert f"serves its first {mode} batch" in server.log, f"attnplug served no {mode} batch"
    schedulers = _scheduler_reports(server)
    assert len(schedulers) == 1, f"expected one scheduler report, got: {server.reports}"
    calls = schedulers[0]["op_calls"]
    plans, paged, metadata = calls.get("plan_attention", 0), calls.get("paged_attention", 0), calls.get("fused_decode_metadata", 0)
    # at least one batch per generated token of the sequential requests (each a prefill + 15 decodes)
    assert plans >= len(CONCURRENT_PROMPTS) * MAX_TOKENS, calls
    assert paged == plans * NUM_LAYERS, f"every batch fully served by attnplug: paged == plans x layers, got {calls}"
    assert metadata == plans, f"one fused_decode_metadata launch per batch, got {calls}"
    for report in server.reports:
        if report not in schedulers:
            assert not report.get("op_calls"), f"attnplug ops ran outside the scheduler: {report}"


@pytest.mark.parametrize("server", sorted(CONCURRENCY_CONFIGS, key=label), indirect=True, ids=label)
def test_concurrent_requests_equal_sequential(server: harness.ServerRun) -> None:
    assert server.concurrent is not None and server.sequential is not None
    assert len(server.concurrent) == len(CONCURRENT_PROMPTS)
    assert all(g.token_ids is not None and len(g.token_ids) == MAX_TOKENS for g in server.concurrent)
    assert [g.key for g in server.concurrent] == [g.key for g in server.sequential], (
        f"concurrent:\n{harness.describe(server.concurrent, CONCURRENT_PROMPTS)}\n"
        f"sequential:\n{harness.describe(server.sequential, CONCURRENT_PROMPTS)}"
    )


@pytest.mark.parametrize("server", sorted(CONCURRENCY_CONFIGS, key=label), indirect=True, ids=label)
def test_request_joining_a_decode_equals_alone(server: harness.ServerRun) -> None:
    """A request that arrives while another decodes gets the tokens it gets alone (and so does the other).

    With ``--enable-mixed-chunk`` SGLang mixes the running decode into the late prefill (0.5.23's eager
    runner hands that MIXED batch to the backend as EXTEND, the decode as a one-token extend row).
    """
    assert server.while_decoding is not None
    assert re.search(r"Prefill batch, .*#running-req: [1-9]", server.log), "no prefill ran beside a decode"
    running, late = server.while_decoding
    assert running.key == server.completions[RUNNING].key, (running, server.completions[RUNNING])
    assert late.key == server.sequential[LATE].key, (late, server.sequential[LATE])


@pytest.mark.parametrize("server", [TORCH_NATIVE_DISABLED], indirect=True, ids=label)
def test_disabled_runs_stock(server: harness.ServerRun) -> None:
    """ATTNPLUG_DISABLE=1 (even with ATTNPLUG_PATCHES=all): attnplug registers, patches and counts nothing."""
    assert "ATTNPLUG_DISABLE=1: attnplug is off in this process; sglang runs stock" in server.log
    assert all(not report.get("op_calls") and not report.get("patches") for report in server.reports), server.reports


def test_bogus_patch_id_fails_at_startup(live_servers: harness.LiveServers) -> None:
    """ATTNPLUG_PATCHES=bogus: the server exits at start-up, and its log names the unknown id."""
    error = live_servers.start_error(BOGUS_PATCH)
    assert error.returncode not in (None, 0), f"expected a non-zero exit, got {error.returncode}"
    assert "names unknown patch id(s) 'bogus'" in error.log, error.log[-5000:]


# --------------------------------------------------------------------------------------------------
# Speculative decoding (STANDALONE: the tiny model as its own draft)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("server", [ATTNPLUG_STANDALONE], indirect=True, ids=label)
def test_speculative_decoding_gives_the_tokens_of_plain_decoding(server: harness.ServerRun,
                                                                live_servers: harness.LiveServers) -> None:
    """Greedy tokens with speculative decoding equal torch_native's without it (prompts, chat), and the
    16 concurrent requests equal attnplug's without speculative decoding."""
    plain = live_servers.run(TORCH_NATIVE_DISABLED)
    assert [g.key for g in server.completions] == [g.key for g in plain.completions], (
        f"speculative:\n{harness.describe(server.completions, PROMPTS)}\n"
        f"torch_native:\n{harness.describe(plain.completions, PROMPTS)}"
    )
    assert server.chat.key == plain.chat.key, f"speculative: {server.chat}\ntorch_native: {plain.chat}"
    no_speculation = live_servers.run(ATTNPLUG)
    assert [g.key for g in server.concurrent] == [g.key for g in no_speculation.sequential], (
        f"speculative, concurrent:\n{harness.describe(server.concurrent, CONCURRENT_PROMPTS)}\n"
        f"attnplug without speculation:\n{harness.describe(no_speculation.sequential, CONCURRENT_PROMPTS)}"
    )


@pytest.mark.parametrize("server", [ATTNPLUG_STANDALONE], indirect=True, ids=label)
def test_speculative_rounds_ran_through_attnplug(server: harness.ServerRun) -> None:
    """The scheduler's report: verify batches planned into the split-KV kernel (4 query rows each), every
    draft round's steps prepared by one metadata launch, draft extends served, nothing fell back."""
    assert "falls back to SGLang's torch_native" not in server.log
    assert re.search(r"accept len: [0-9.]+", server.log), "SGLang logged no speculative acceptance"
    schedulers = _scheduler_reports(server)
    assert len(schedulers) == 1, server.reports
    scheduler = schedulers[0]
    assert scheduler["patches"]["sglang.attnplug.draft_backends"]["status"] == "applied", scheduler["patches"]
    spec, split_kv, calls = scheduler["speculative"], scheduler["split_kv"], scheduler["op_calls"]
    assert spec.get("verify_batches", 0) >= MAX_TOKENS // VERIFY_TOKENS, spec
    assert spec.get("draft_extend_batches", 0) >= spec["verify_batches"] - 1, spec
    assert spec.get("draft_rounds", 0) >= spec["verify_batches"] - 1, spec
    assert spec["draft_steps"] == (DRAFT_STEPS - 1) * spec["draft_rounds"], spec
    assert split_kv.get("tokens", 0) >= VERIFY_TOKENS * split_kv.get("sequences", 0) > 0, split_kv
    # one plan per draft step, verify and extend; every layer of each planned batch through paged_attention
    assert calls["paged_attention"] == calls["plan_attention"] * NUM_LAYERS, calls


def test_tree_drafts_are_refused_at_startup(live_servers: harness.LiveServers) -> None:
    """topk 2 (tree drafts): the server exits at start-up with a message naming the flag to change."""
    error = live_servers.start_error(ATTNPLUG_TREE_DRAFTS)
    assert error.returncode not in (None, 0), f"expected a non-zero exit, got {error.returncode}"
    assert "set --speculative-eagle-topk 1" in error.log, error.log[-5000:]


# --------------------------------------------------------------------------------------------------
# FP8 KV cache (SGLang's GPU FP8 pool, built on CPU by the test-only shim)
# --------------------------------------------------------------------------------------------------

FP8_POOL_LOG = "KV Cache is allocated. dtype: torch.float8_e4m3fn"  # SGLang's own line: the pool's dtype


@pytest.mark.parametrize("server", [ATTNPLUG_FP8], indirect=True, ids=label)
def test_attnplug_over_an_fp8_pool_gives_torch_native_tokens(server: harness.ServerRun,
                                                           live_servers: harness.LiveServers) -> None:
    """Greedy tokens (prompts, chat) equal stock torch_native's over the same FP8 pool, and attnplug's kernels
    read that pool for every layer of every batch (no fallback)."""
    stock = live_servers.run(TORCH_NATIVE_FP8)
    harness.assert_full_greedy_sequences(stock)
    for run in (stock, server):
        assert FP8_POOL_LOG in run.log, f"{run.config.label}: no FP8 KV pool\n{run.log[-3000:]}"
    assert "attnplug INFO [pid" not in stock.log, "attnplug's plugin must not load in the stock server"
    assert [g.key for g in server.completions] == [g.key for g in stock.completions], (
        f"attnplug, FP8 pool:\n{harness.describe(server.completions, PROMPTS)}\n"
        f"torch_native, FP8 pool:\n{harness.describe(stock.completions, PROMPTS)}"
    )
    assert server.chat.key == stock.chat.key, f"attnplug: {server.chat}\ntorch_native: {stock.chat}"
    assert "reads the torch.float8_e4m3fn KV cache with per-tensor scales" in server.log
    assert "falls back to SGLang's torch_native" not in server.log
    for mode in ("EXTEND", "DECODE"):
        assert f"serves its first {mode} batch" in server.log, f"attnplug served no {mode} batch"
    schedulers = _scheduler_reports(server)
    assert len(schedulers) == 1, server.reports
    calls = schedulers[0]["op_calls"]
    assert calls.get("plan_attention", 0) >= MAX_TOKENS, calls
    assert calls["paged_attention"] == calls["plan_attention"] * NUM_LAYERS, calls


@pytest.mark.parametrize("server", [ATTNPLUG_FP8_STANDALONE], indirect=True, ids=label)
def test_speculative_decoding_over_fp8_pools_gives_torch_native_tokens(server: harness.ServerRun,
                                                                      live_servers: harness.LiveServers) -> None:
    """STANDALONE with FP8 pools (target and draft): the greedy tokens of stock torch_native without speculative
    decoding over an FP8 pool; verify batches, draft rounds and draft extends all ran attnplug's kernels."""
    stock = live_servers.run(TORCH_NATIVE_FP8)
    assert server.log.count(FP8_POOL_LOG) >= 2, "target and draft pools: FP8"
    assert [g.key for g in server.completions] == [g.key for g in stock.completions], (
        f"speculative, FP8 pools:\n{harness.describe(server.completions, PROMPTS)}\n"
        f"torch_native, FP8 pool:\n{harness.describe(stock.completions, PROMPTS)}"
    )
    assert server.chat.key == stock.chat.key, f"speculative: {server.chat}\ntorch_native: {stock.chat}"
    assert "falls back to SGLang's torch_native" not in server.log
    schedulers = _scheduler_reports(server)  # (the basic workload is too short for SGLang's "accept len" line)
    assert len(schedulers) == 1, server.reports
    spec, calls = schedulers[0]["speculative"], schedulers[0]["op_calls"]
    assert spec.get("verify_batches", 0) >= MAX_TOKENS // VERIFY_TOKENS, spec
    assert spec.get("draft_rounds", 0) >= spec["verify_batches"] - 1, spec
    assert spec.get("draft_extend_batches", 0) >= spec["verify_batches"] - 1, spec
    assert calls["paged_attention"] == calls["plan_attention"] * NUM_LAYERS, calls
