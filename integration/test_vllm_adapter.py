"""The vLLM adapter against the installed vLLM: runs integration/in_engine/vllm_checks.py inside the vLLM venv."""

import subprocess
from pathlib import Path

import pytest

from integration import harness

pytestmark = pytest.mark.live


def test_vllm_adapter_checks_pass_inside_the_vllm_venv(vllm_python: Path) -> None:
    checks = harness.INTEGRATION_DIR / "in_engine" / "vllm_checks.py"
    done = subprocess.run(
        [str(vllm_python), "-m", "pytest", "-q", "-p", "no:cacheprovider", str(checks)],
        cwd=harness.REPO_ROOT, capture_output=True, text=True, timeout=900, check=False,
    )
    assert done.returncode == 0, f"{done.stdout[-6000:]}\n{done.stderr[-3000:]}"
    assert " passed" in done.stdout.splitlines()[-1], done.stdout[-2000:]
