"""TEST-ONLY vLLM-CPU shim: run a Triton attention backend inside a vLLM-CPU server.

vLLM-CPU cannot select a Triton backend on its own, so this `vllm.general_plugins` entry point
(``attnplug_cpu_shim``) does, in every vLLM process, when ``ATTNPLUG_TEST_CPU_ATTN_CLASS`` names a
backend class (``module.path.ClassName``):

1. puts the real ``triton`` / ``triton.language`` back into ``vllm.triton_utils`` (vLLM-CPU swaps
   in placeholders because Triton has no CPU driver; kernels then run under ``TRITON_INTERPRET=1``);
2. makes ``torch.cuda.get_device_capability`` answer ``(9, 0)`` (vLLM's KV-cache write launcher asks);
3. ``register_backend(AttentionBackendEnum.CPU_ATTN, <that class>)``: the CPU platform ignores
   ``--attention-backend`` and always returns ``CPU_ATTN.get_path()``, which honours overrides;
4. lets vLLM's Triton KV-cache write store an FP8 cache (``--kv-cache-dtype fp8``): it asserts
   ``current_platform.has_device_capability(89)``, which the CPU platform (no capability) answers
   False, although the Triton interpreter stores and loads ``float8_e4m3fn`` / ``float8_e5m2`` fine.

Steps 1 and 2 run when this module is imported: vLLM imports every plugin's module before it calls
any plugin function, so they precede other plugins' ``register()`` whatever the discovery order;
steps 3 and 4 run in ``register()``. ``ATTNPLUG_TEST_REAL_TRITON=1`` does steps 1-2 without rerouting
(in-process checks call :func:`allow_fp8_kv_cache_writes` themselves). With neither variable set the
shim does nothing and the server runs stock vLLM-CPU.
"""

from __future__ import annotations

import os
import sys

CPU_ATTN_CLASS_ENV = "ATTNPLUG_TEST_CPU_ATTN_CLASS"
REAL_TRITON_ENV = "ATTNPLUG_TEST_REAL_TRITON"
FAKE_DEVICE_CAPABILITY = (9, 0)
# Modules whose @triton.jit kernels would be placeholders if imported before the shim ran.
_TRITON_KERNEL_MODULES = (
    "vllm.v1.attention.ops.triton_unified_attention",
    "vllm.v1.attention.ops.triton_reshape_and_cache_flash",
)


def _cpu_attn_class() -> str | None:
    return os.environ.get(CPU_ATTN_CLASS_ENV) or None


def _active() -> bool:
    return _cpu_attn_class() is not None or os.environ.get(REAL_TRITON_ENV) == "1"


def _restore_real_triton() -> None:
    import triton
    import triton.language as tl
    import triton.language.extra.libdevice as tldevice
    from vllm import triton_utils

    stale = [name for name in _TRITON_KERNEL_MODULES if name in sys.modules]
    if stale:
        raise RuntimeError(
            f"attnplug_cpu_shim: {stale} were imported before the shim restored real Triton, so their "
            "kernels are vLLM-CPU placeholders; do not import them while plugin modules are imported"
        )
    triton_utils.triton = triton
    triton_utils.tl = tl
    triton_utils.tldevice = tldevice


def _fake_device_capability() -> None:
    import torch

    def get_device_capability(device=None) -> tuple[int, int]:
        return FAKE_DEVICE_CAPABILITY

    torch.cuda.get_device_capability = get_device_capability


def allow_fp8_kv_cache_writes() -> None:
    """Step 4: vLLM's Triton reshape-and-cache accepts FP8 ``kv_cache_dtype`` strings on this CPU.

    It still asks ``_is_supported_kv_cache_dtype`` (by its global name) for every other dtype.
    """
    from vllm.v1.attention.ops import triton_reshape_and_cache_flash as writes

    original = writes._is_supported_kv_cache_dtype
    if getattr(original, "attnplug_cpu_shim", False):
        return

    def _is_supported_kv_cache_dtype(kv_cache_dtype: str) -> bool:
        return kv_cache_dtype.startswith("fp8") or original(kv_cache_dtype)

    _is_supported_kv_cache_dtype.attnplug_cpu_shim = True
    writes._is_supported_kv_cache_dtype = _is_supported_kv_cache_dtype


def register() -> None:
    """Entry point of ``vllm.general_plugins``: reroute CPU_ATTN when the env var names a class."""
    class_path = _cpu_attn_class()
    if class_path is None:
        return
    from vllm.logger import init_logger
    from vllm.v1.attention.backends.registry import (
        AttentionBackendEnum,
        register_backend,
    )

    register_backend(AttentionBackendEnum.CPU_ATTN, class_path)
    allow_fp8_kv_cache_writes()
    init_logger("vllm.attnplug_cpu_shim").info(
        "attnplug_cpu_shim (test only): pid %d routes CPU_ATTN to %s", os.getpid(), class_path
    )


if _active():
    _restore_real_triton()
    _fake_device_capability()
