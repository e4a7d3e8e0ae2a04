"""TEST-ONLY: give SGLang's Triton attention backend a GPU core count on a machine without a GPU.

On CPU ``get_device_core_count`` is 0, so ``TritonAttnBackend.get_num_kv_splits`` never plans a
split (it fills ``max_kv_splits``) and neither SGLang's heuristic nor attnplug's
``sglang.triton.kv_splits`` replacement would run in a live CPU server. With
``ATTNPLUG_TEST_TRITON_CORE_COUNT=N`` set and this directory first on ``PYTHONPATH``, every
``TritonAttnBackend`` gets ``device_core_count = N`` right after its ``__init__`` (nothing else
changes). Used by ``integration/test_sglang_adapter.py`` only; never outside the tests.
"""

import importlib.abc
import importlib.machinery
import os
import sys

_TARGET = "sglang.srt.layers.attention.triton_backend"
_COUNT = os.environ.get("ATTNPLUG_TEST_TRITON_CORE_COUNT")


class _SetCoreCountAfterImport(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        exec_module = spec.loader.exec_module

        def exec_and_set_core_count(module):
            exec_module(module)
            stock_init = module.TritonAttnBackend.__init__

            def __init__(self, *args, **kwargs):
                stock_init(self, *args, **kwargs)
                self.device_core_count = int(_COUNT)

            module.TritonAttnBackend.__init__ = __init__

        spec.loader.exec_module = exec_and_set_core_count
        return spec


if _COUNT:
    sys.meta_path.insert(0, _SetCoreCountAfterImport())
