"""Test set-up: kernels run on the GPU when there is one, else under the Triton interpreter.

``TRITON_INTERPRET`` must be set before any ``@triton.jit`` function is defined, so it is
set here, before the test modules import ``attnplug.core``.
"""

import os

import pytest
import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run `make test-gpu` on one)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


from tests.toy import register_plugin, toy_engine  # noqa: E402,F401  (fixtures for every test module)
