"""Every hook in attnplug/hooks/specs.py has a test here (test_hook_<name>) and a section in docs/hooks.md."""

import inspect
import re
import sys
from pathlib import Path

import pytest

import attnplug
from attnplug import hookimpl, ops, report
from attnplug.adapters.registry import all_patches
from attnplug.hooks import specs
from tests.toy import PatchPlugin, toy_patch

HOOK_NAMES = sorted(name for name, _ in inspect.getmembers(specs, inspect.isfunction) if name.startswith("attnplug_"))
DOCS = Path(__file__).resolve().parent.parent / "docs" / "hooks.md"


def test_hook_attnplug_patches(register_plugin):
    register_plugin(PatchPlugin(toy_patch()))
    assert all_patches()["toy.ops.attend"] == toy_patch()
    register_plugin(PatchPlugin(toy_patch()))
    with pytest.raises(ValueError, match="two plugins declare patch 'toy.ops.attend'"):
        all_patches()


def test_hook_attnplug_split_kv(register_plugin):
    class Problem:
        num_decodes = 3

    assert ops.split_kv_from_plugins(Problem()) is None  # no plugin: the core's default decides

    class SplitPlugin:
        @hookimpl
        def attnplug_split_kv(self, problem):
            return 7 if problem.num_decodes < 4 else None

    register_plugin(SplitPlugin())
    assert ops.split_kv_from_plugins(Problem()) == 7


def test_hook_attnplug_core_op(register_plugin, monkeypatch):
    monkeypatch.setattr(report, "op_calls", report.op_calls.__class__())
    default = ops.resolve("fused_metadata_copy")
    assert default.__wrapped__ is sys.modules["attnplug.core"].fused_metadata_copy
    calls = []

    class OpPlugin:
        @hookimpl
        def attnplug_core_op(self, name):
            return (lambda *args, **kwargs: calls.append(args)) if name == "fused_metadata_copy" else None

    register_plugin(OpPlugin())
    overridden = ops.resolve("fused_metadata_copy")
    overridden("srcs", "dsts")
    assert calls == [("srcs", "dsts")]
    assert report.op_calls["fused_metadata_copy"] == 1
    with pytest.raises(ValueError, match="unknown core op 'no_such_op'"):
        ops.resolve("no_such_op")


def test_hook_attnplug_patches_applied(toy_engine, register_plugin):
    seen = []

    class Listener:
        @hookimpl
        def attnplug_patches_applied(self, engine, report):
            seen.append((engine, report.applied, report.skipped))

    register_plugin(PatchPlugin(toy_patch()))
    register_plugin(Listener())
    from attnplug.adapters.enable import apply_to

    apply_to("toy")
    assert seen == [("toy", ["toy.ops.attend"], {})]
    attnplug.revert()


def test_every_hook_has_a_test():
    tests = {name for name in globals() if name.startswith("test_hook_")}
    assert {f"test_hook_{name}" for name in HOOK_NAMES} == tests


def test_every_hook_is_documented_with_its_signature():
    documented = set(re.findall(r"^## (attnplug_\w+)$", DOCS.read_text(), flags=re.M))
    assert documented == set(HOOK_NAMES)
    text = DOCS.read_text()
    for name in HOOK_NAMES:
        signature = f"`{name}({', '.join(inspect.signature(getattr(specs, name)).parameters)})`"
        assert signature in text, f"docs/hooks.md lacks {signature}"


def test_every_hook_has_a_one_line_docstring():
    for name in HOOK_NAMES:
        doc = getattr(specs, name).__doc__
        assert doc and len(doc.strip().splitlines()) == 1, name
