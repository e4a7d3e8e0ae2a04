"""TEST-ONLY: let SGLang 0.5.23 build its GPU FP8 KV pool on a machine without a GPU.

With ``--kv-cache-dtype fp8_e4m3`` on CPU, SGLang 0.5.23's ``KVCacheConfigurator`` takes a CPU-only
path: ``configure`` raises ``CPU FP8 KV cache requires Intel AMX support.`` (and, with AMX, ``CPU FP8
KV cache requires the intel_amx attention backend.`` for every other backend), and
``_build_mha_quant_method`` hands the pool the ``cpu_fp8_e4m3`` recipe. On a GPU the same flag builds
a plain ``MHATokenToKVPool`` of dtype ``float8_e4m3fn`` stored as uint8 (``store_dtype``), written by
``set_kv_buffer`` and read by the attention backends: the pool attnplug's backend reads on GPUs.

With ``ATTNPLUG_TEST_SGLANG_GPU_FP8_POOL=1`` and this directory first on ``PYTHONPATH``, the
configurator module's ``current_platform.is_cpu()`` answers False (everything else is the real
platform), so exactly those two CPU branches are not taken and the GPU pool is built; nothing else
in SGLang changes. Used by ``integration/test_sglang_live.py`` only; never outside the tests.
"""

import importlib.abc
import importlib.machinery
import os
import sys

_TARGET = "sglang.srt.mem_cache.kv_cache_configurator"


class _NotCpuHere:
    """The real platform, except ``is_cpu()`` (read by the configurator only for its CPU FP8 branches)."""

    def __init__(self, platform):
        self._platform = platform

    def is_cpu(self):
        return False

    def __getattr__(self, name):
        return getattr(self._platform, name)


class _GpuFp8PoolAfterImport(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        exec_module = spec.loader.exec_module

        def exec_with_gpu_pool(module):
            exec_module(module)
            module.current_platform = _NotCpuHere(module.current_platform)

        spec.loader.exec_module = exec_with_gpu_pool
        return spec


if os.environ.get("ATTNPLUG_TEST_SGLANG_GPU_FP8_POOL") == "1":
    sys.meta_path.insert(0, _GpuFp8PoolAfterImport())
