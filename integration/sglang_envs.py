"""The SGLang venvs the adapter tests run in: 0.5.23 (newest; the live servers' venv, one cached
build); 0.5.8.post1 (the last with per-tensor NSA draft-metadata copies); 0.5.9 (the last release
before the fused decode-metadata kernel of SGLang PR 20778); 0.5.10.post1 (fused metadata, but no FA3
scheduler-metadata precompute, which 0.5.11 added, while its sglang-kernel 0.4.1 can compute one).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from integration import harness, sglang_server

PER_TENSOR_COPY_VERSION = "0.5.8.post1"  # the last release whose NSA draft steps copy metadata per tensor
OLD_VERSION = "0.5.9"  # last release with the unfused decode metadata (0.5.10 has PR 20778)
NO_PRECOMPUTE_VERSION = "0.5.10.post1"  # the 0.5.10 line: get_scheduler_metadata exists, SGLang never calls it
NEW_VERSION = "0.5.23"

# Test-only stand-ins for sgl_kernel's CUDA library on CPU, first on PYTHONPATH inside the checks:
# 0.5.23's (the live-server one) and 0.5.9's / 0.5.10's (which import sgl_kernel.kvcacheio at module level).
SGL_KERNEL_STAND_IN_DIRS = {
    PER_TENSOR_COPY_VERSION: harness.INTEGRATION_DIR / "shims" / "sgl_kernel_stub",
    OLD_VERSION: harness.INTEGRATION_DIR / "shims" / "sgl_kernel_stub",
    NO_PRECOMPUTE_VERSION: harness.INTEGRATION_DIR / "shims" / "sgl_kernel_stub",
    NEW_VERSION: harness.INTEGRATION_DIR / "shims" / "sgl_kernel_cpu",
}

SGLANG_0_5_9_VENV = harness.VenvSpec(
    name=f"sglang-{OLD_VERSION}",
    torch="torch==2.9.1",  # sglang 0.5.9's pin (the CUDA build: it imports fine without a GPU)
    # numpy < 2.4: 0.5.9's triton 3.5.1 interpreter (TRITON_INTERPRET=1) calls int() on 1-element
    # arrays, which numpy 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars").
    requirements=(f"sglang=={OLD_VERSION}", "numpy<2.4", "pluggy>=1.3", "pytest"),
    # Importing the attention backends needs the sgl_kernel stand-in on PYTHONPATH (not so here):
    # the real sgl_kernel 0.3.21 fails without libcuda.so.1.
    smoke_imports=("transformers.models.llama", "sglang.srt.layers.attention.attention_registry"),
)

SGLANG_0_5_8_VENV = dataclasses.replace(
    SGLANG_0_5_9_VENV,  # the same torch / triton pins
    name=f"sglang-{PER_TENSOR_COPY_VERSION}",
    requirements=(f"sglang=={PER_TENSOR_COPY_VERSION}", "numpy<2.4", "pluggy>=1.3", "pytest"),
    # 0.5.8's attention modules import sgl_kernel.silu_and_mul unguarded: only the stand-in imports there
    smoke_imports=("transformers.models.llama", "sglang.srt.model_executor.forward_batch_info"),
)

SGLANG_0_5_10_VENV = dataclasses.replace(
    SGLANG_0_5_9_VENV,  # the same pins that matter here: torch 2.9.1, triton 3.5.1 (so numpy < 2.4 too)
    name=f"sglang-{NO_PRECOMPUTE_VERSION}",
    requirements=(f"sglang=={NO_PRECOMPUTE_VERSION}", "numpy<2.4", "pluggy>=1.3", "pytest"),
)


SGLANG_0_5_23_VENV = sglang_server.SGLANG_VENV

VENVS: dict[str, harness.VenvSpec] = {
    PER_TENSOR_COPY_VERSION: SGLANG_0_5_8_VENV,
    OLD_VERSION: SGLANG_0_5_9_VENV,
    NO_PRECOMPUTE_VERSION: SGLANG_0_5_10_VENV,
    NEW_VERSION: SGLANG_0_5_23_VENV,
}


def ensure_sglang_venv(version: str) -> Path:
    """Python of the cached venv for an SGLang release in :data:`VENVS` (built on first use)."""
    return harness.ensure_venv(VENVS[version])
