"""A throwaway engine for testing the patch machinery: a small module tree written to tmp_path.

``toy_engine.ops`` defines the functions; ``toy_engine.backend`` copies ``attend`` with
``from toy_engine.ops import attend``, like vLLM's triton_attn.py does with unified_attention.
"""

import importlib
import sys

import pytest

from attnplug import Patch, hookimpl
from attnplug.adapters import enable
from attnplug.adapters.engines import ENGINES, Engine
from attnplug.adapters.patching import Rebinding, revert_patches
from attnplug.hooks import get_plugin_manager

TOY_OPS = '''
def attend(q, k, v):
    return ("stock", q)


class Backend:
    def forward(self, x):
        return ("stock forward", x)

    @staticmethod
    def helper(a):
        return ("stock helper", a)


class SubBackend(Backend):
    pass
'''

TOY_BACKEND = '''
from toy_engine.ops import attend


def run(q):
    return attend(q, 1, 2)
'''


def make_attend(original):
    def attend(q, k, v):
        return original(q, k, v) if q == "fallback" else ("attnplug", q)

    return attend


def make_forward(original):
    def forward(self, x):
        return ("attnplug forward", x)

    return forward


def make_helper(original):
    def helper(a):
        return ("attnplug helper", a)

    return helper


def make_broken(original):
    raise RuntimeError("factory exploded")


def toy_patch(
    targets=("toy_engine.ops:attend", "toy_engine.backend:attend"),
    replacement="tests.toy:make_attend",
    signature=("q", "k", "v"),
    **overrides,
) -> Patch:
    """A patch of toy_engine's ``attend`` (both bindings); keyword arguments override fields."""
    fields = dict(
        id="toy.ops.attend",
        engine="toy",
        rebinds=(Rebinding(targets, replacement, signature),),
        versions=">=1",
        upstream="none (test)",
        why="exercise the machinery",
    )
    fields.update(overrides)
    return Patch(**fields)


class PatchPlugin:
    """A plugin that announces the given patches through the ``attnplug_patches`` hook."""

    def __init__(self, *patches):
        self.patches = list(patches)

    @hookimpl
    def attnplug_patches(self):
        return self.patches


@pytest.fixture
def toy_engine(tmp_path, monkeypatch):
    """Import toy_engine from tmp_path as engine "toy" (its version is pluggy's installed one, >= 1)."""
    package = tmp_path / "toy_engine"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "ops.py").write_text(TOY_OPS)
    (package / "backend.py").write_text(TOY_BACKEND)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(ENGINES, "toy", Engine("toy", "toy_engine", ("pluggy",)))
    monkeypatch.setattr(enable, "_loaded_engines", set())
    yield importlib.import_module("toy_engine.ops"), importlib.import_module("toy_engine.backend")
    revert_patches()
    for name in [m for m in sys.modules if m == "toy_engine" or m.startswith("toy_engine.")]:
        del sys.modules[name]


@pytest.fixture
def register_plugin():
    """Register plugins with the process's plugin manager for one test."""
    pm = get_plugin_manager()
    registered = []

    def register(plugin):
        pm.register(plugin)
        registered.append(plugin)
        return plugin

    yield register
    for plugin in registered:
        pm.unregister(plugin)
