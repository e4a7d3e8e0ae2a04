"""attnplug's patches of SGLang's own backends, against the real installed releases 0.5.8.post1, 0.5.9,
0.5.10.post1 and 0.5.23.

- ``test_patch_checks_pass_in_engine``: runs ``integration/in_engine/sglang_checks.py`` inside each
  release's harness venv (built once and cached, ~10 GB each) and requires exactly the expected
  per-test outcomes: every patch applies or skips as declared, round trips restore identity, and
  every patch that applies gives the original's results on the same random inputs.
- ``test_patched_triton_server_gives_stock_tokens``: SGLang 0.5.23's own ``triton`` backend, stock
  and with ``ATTNPLUG_PATCHES=sglang.triton.kv_splits``, serves the same greedy tokens, and the
  scheduler's attnplug report proves the planned splits were used. On CPU SGLang's Triton backend
  has no core count and never plans a split; the test-only ``integration/shims/sglang_triton_cores``
  gives both servers the same count so that the stock heuristic and attnplug's plan really run.

0.5.8.post1, 0.5.9 and 0.5.10.post1 are not served live: they have no plugin loader (attnplug could
only enter through a launcher that patches the spawned scheduler), and their patches are for the
FlashAttention backend and the DeepSeek NSA draft backend, which need a GPU.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from xml.etree import ElementTree

import pytest
from packaging.version import Version

from attnplug.adapters.sglang.triton_splits import PLAN_COUNTER
from integration import harness, sglang_envs, workload
from integration.sglang_server import SglangConfig, serve

pytestmark = pytest.mark.live

CHECKS = harness.INTEGRATION_DIR / "in_engine" / "sglang_checks.py"
SGL_KERNEL_SHIM_DIR = sglang_envs.SGL_KERNEL_STAND_IN_DIRS[sglang_envs.NEW_VERSION]
CORE_COUNT_SHIM_DIR = harness.INTEGRATION_DIR / "shims" / "sglang_triton_cores"
CHECKS_TIMEOUT_S = 900
TEST_CORE_COUNT = "8"  # small, like the core's CPU stand-in: the plans split at this batch size

# Per release: the in-engine tests that must pass (by name prefix); every other one must be skipped
# as belonging to the other release.
MUST_PASS = {
    "0.5.8.post1": (
        "test_release_is_tested_and_every_patch_is_declared",
        "test_each_patch_applies_or_skips_as_declared",
        "test_applying_patch_targets_resolve_and_revert_restores_identity[sglang.fa.decode_metadata]",
        "test_applying_patch_targets_resolve_and_revert_restores_identity[sglang.spec.metadata_copy]",
        "test_0_5_8_facts_behind_the_patches",
        "test_replay_normal_decode_set_metadata_matches_original",
        "test_replay_calls_the_fused_kernel_cannot_take_go_to_the_original",
        "test_eager_normal_decode_metadata_matches_original",
        "test_eager_draft_decode_goes_to_the_original",
        "test_draft_steps_get_the_metadata_sglang_copies",
        "test_without_the_precompute_switch_every_step_recomputes",
    ),
    "0.5.9": (
        "test_release_is_tested_and_every_patch_is_declared",
        "test_each_patch_applies_or_skips_as_declared",
        "test_applying_patch_targets_resolve_and_revert_restores_identity[sglang.fa.decode_metadata]",
        "test_0_5_9_facts_behind_the_skips",
        "test_replay_normal_decode_set_metadata_matches_original",
        "test_replay_calls_the_fused_kernel_cannot_take_go_to_the_original",
        "test_eager_normal_decode_metadata_matches_original",
        "test_eager_draft_decode_goes_to_the_original",
    ),
    "0.5.10.post1": (
        "test_release_is_tested_and_every_patch_is_declared",
        "test_each_patch_applies_or_skips_as_declared",
        "test_applying_patch_targets_resolve_and_revert_restores_identity[sglang.fa.scheduler_metadata]",
        "test_0_5_10_facts_behind_the_patches",
        "test_eager_decode_computes_scheduler_metadata_once_for_every_layer",
        "test_draft_decode_and_swa_layers_get_no_scheduler_metadata",
        "test_graph_scheduler_metadata_is_refreshed_in_place_at_every_replay",
        "test_without_get_scheduler_metadata_the_backend_stays_stock",
        "test_a_model_the_precompute_does_not_serve_leaves_the_backend_stock",
        "test_revert_makes_later_backends_stock",
    ),
    "0.5.23": (
        "test_release_is_tested_and_every_patch_is_declared",
        "test_each_patch_applies_or_skips_as_declared",
        "test_applying_patch_targets_resolve_and_revert_restores_identity[sglang.triton.kv_splits]",
        "test_applying_patch_targets_resolve_and_revert_restores_identity[sglang.attnplug.draft_backends]",
        "test_attnplug_verify_eager_and_graph_replay_match_reference[float32]",
        "test_attnplug_verify_eager_and_graph_replay_match_reference[fp8_e4m3]",
        "test_attnplug_verify_eager_and_graph_replay_match_reference[fp8_e5m2-scaled]",
        "test_attnplug_draft_steps_match_reference[float32-False]",
        "test_attnplug_draft_steps_match_reference[fp8_e4m3-True]",
        "test_attnplug_draft_steps_match_reference[fp8_e5m2-scaled-True]",
        "test_attnplug_fp8_pool_extend_decode_and_prefix_extend_match_reference[e4m3-unscaled-page1]",
        "test_attnplug_fp8_pool_extend_decode_and_prefix_extend_match_reference[e4m3-scaled-page4]",
        "test_attnplug_fp8_pool_extend_decode_and_prefix_extend_match_reference[e5m2-scaled-page1]",
        "test_attnplug_fp8_graph_replay_reads_the_current_scales",
        "test_attnplug_serves_an_unquantized_pool_with_layer_scales_unscaled",
        "test_attnplug_refuses_kv_caches_it_does_not_read_at_startup",
        "test_0_5_23_fp8_kv_facts",
        "test_0_5_23_facts_behind_the_skips",
        "test_kv_splits_stay_in_sglang_contract",
        "test_kv_splits_give_the_same_decode_attention_as_the_stock_plan",
    ),
}


def ensure_pytest(python: Path) -> None:
    """Install pytest into an engine venv whose spec does not pin it (the checks run with it)."""
    if subprocess.run([str(python), "-c", "import pytest"], capture_output=True, check=False).returncode != 0:
        harness.log(f"installing pytest into {python.parent.parent.name}")
        subprocess.run([str(python), "-m", "pip", "--disable-pip-version-check", "install", "-q", "pytest"],
                       check=True, timeout=600)


def in_engine_env(release: str, scratch: Path) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith(("ATTNPLUG_", "SGLANG_"))}
    for name in ("XDG_CACHE_HOME", "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR", "TMPDIR"):
        (scratch / name.lower()).mkdir(parents=True, exist_ok=True)
        env[name] = str(scratch / name.lower())
    env.update(
        TRITON_INTERPRET="1",
        PYTHONPATH=os.pathsep.join((str(sglang_envs.SGL_KERNEL_STAND_IN_DIRS[release]), str(harness.REPO_ROOT))),
        HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )
    return env


def outcomes(junit_xml: Path) -> dict[str, tuple[str, str]]:
    """Test name -> (passed | skipped | failed, message)."""
    results = {}
    for case in ElementTree.parse(junit_xml).getroot().iter("testcase"):
        status, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                status = "skipped" if child.tag == "skipped" else "failed"
                message = (child.get("message") or "") + "\n" + (child.text or "")
        results[case.get("name")] = (status, message)
    return results


@pytest.mark.parametrize("release", sorted(sglang_envs.VENVS, key=Version))
def test_patch_checks_pass_in_engine(release: str, tmp_path: Path) -> None:
    python = sglang_envs.ensure_sglang_venv(release)
    ensure_pytest(python)
    junit_xml = tmp_path / "checks.xml"
    started = time.monotonic()
    done = subprocess.run(
        [str(python), "-m", "pytest", str(CHECKS), "-q", "-p", "no:cacheprovider", "-o", "addopts=",
         "--rootdir", str(harness.INTEGRATION_DIR / "in_engine"), f"--junitxml={junit_xml}"],
        cwd=tmp_path, env=in_engine_env(release, tmp_path), capture_output=True, text=True, timeout=CHECKS_TIMEOUT_S,
        check=False,
    )
    harness.log(f"sglang {release}: in-engine checks took {time.monotonic() - started:.1f} s")
    output = done.stdout[-8000:] + done.stderr[-4000:]
    assert done.returncode == 0, f"in-engine checks failed under sglang {release}:\n{output}"
    results = outcomes(junit_xml)
    passed = {name for name, (status, _) in results.items() if status == "passed"}
    for prefix in MUST_PASS[release]:
        assert any(name.startswith(prefix) for name in passed), f"{prefix} failed under sglang {release}:\n{output}"
    for name, (status, message) in results.items():
        if status == "skipped":
            assert "SGLang 0.5." in message and f"SGLang {release} only" not in message, (name, message)
            assert not any(name.startswith(prefix) for prefix in MUST_PASS[release]), (name, message)


# --------------------------------------------------------------------------------------------------
# Live: SGLang 0.5.23's triton backend, stock vs sglang.triton.kv_splits
# --------------------------------------------------------------------------------------------------

PROMPTS = workload.PROMPTS[:4]  # the long prompt included


def _triton_config(label: str, patches: str | None) -> SglangConfig:
    env = {
        "ATTNPLUG_TEST_TRITON_CORE_COUNT": TEST_CORE_COUNT,
        "PYTHONPATH": os.pathsep.join((str(CORE_COUNT_SHIM_DIR), str(SGL_KERNEL_SHIM_DIR))),
        "ATTNPLUG_PATCHES": patches,
    }
    return SglangConfig.make(label, "triton", env=env, report=patches is not None)


def _serve_and_generate(config: SglangConfig, python: Path, model_dir: Path, workdir: Path):
    with serve(config, python=python, model_dir=model_dir, workdir=workdir / config.label) as server:
        model = server.info["model"]
        completions = harness.complete(server, model, PROMPTS, max_tokens=workload.MAX_TOKENS)
        chat = harness.chat(server, model, workload.CHAT_MESSAGES, max_tokens=workload.MAX_TOKENS)
        report_dir = server.info["report_dir"]
        reports = harness.wait_for_reports(report_dir, since=time.time()) if report_dir is not None else []
    return completions, chat, reports, server.log_text()


def test_patched_triton_server_gives_stock_tokens(sglang_python: Path, sglang_tiny_model: Path,
                                                  tmp_path: Path) -> None:
    python, model_dir = sglang_python, sglang_tiny_model
    stock = _serve_and_generate(_triton_config("triton-stock", None), python, model_dir, tmp_path)
    patched = _serve_and_generate(_triton_config("triton-kv-splits", "sglang.triton.kv_splits"), python, model_dir,
                                  tmp_path)
    (stock_completions, stock_chat, _, _), (completions, chat, reports, log) = stock, patched
    assert all(len(g.token_ids or ()) == workload.MAX_TOKENS for g in stock_completions), stock_completions
    assert [g.key for g in completions] == [g.key for g in stock_completions]
    assert chat.key == stock_chat.key
    schedulers = [r for r in reports if r.get("patches", {}).get("sglang.triton.kv_splits")]
    assert schedulers, f"no attnplug report names the patch; reports: {reports}\n{log[-3000:]}"
    assert all(r["patches"]["sglang.triton.kv_splits"]["status"] == "applied" for r in schedulers), schedulers
    assert sum(r["op_calls"].get(PLAN_COUNTER, 0) for r in schedulers) >= workload.MAX_TOKENS - 1, schedulers
