"""The three ways in: engine plugin entry points, the monkey-patch API, and per-process reports."""

import importlib.metadata
import json
import os
import subprocess
import sys

import pytest

import attnplug
from attnplug import report
from attnplug.adapters.enable import apply_to, load_engine_plugin
from attnplug.adapters.registry import UnknownPatchError, select_patches
from tests.toy import PatchPlugin, toy_patch

HELPER = toy_patch(
    id="toy.backend.helper", targets=("toy_engine.ops:Backend.helper",), replacement="tests.toy:make_helper", signature=("a",)
)


@pytest.fixture
def toy_patches(toy_engine, register_plugin):
    register_plugin(PatchPlugin(toy_patch(), HELPER))
    return toy_engine


def test_engine_plugin_applies_what_the_env_selects_once_per_process(toy_patches, monkeypatch):
    ops, _ = toy_patches
    monkeypatch.setenv("ATTNPLUG_PATCHES", "toy.ops.attend")
    load_engine_plugin("toy")
    patched_attend = ops.attend
    assert ops.attend("q", 1, 2) == ("attnplug", "q")
    assert ops.Backend.helper(1) == ("stock helper", 1)  # not selected
    load_engine_plugin("toy")  # engines load plugins several times per process
    assert ops.attend is patched_attend
    assert attnplug.revert() == ["toy.ops.attend"]


def test_engine_plugin_all_selects_every_patch_of_that_engine(toy_patches, monkeypatch):
    monkeypatch.setenv("ATTNPLUG_PATCHES", "all")
    load_engine_plugin("toy")
    assert sorted(attnplug.revert()) == ["toy.backend.helper", "toy.ops.attend"]


def test_engine_plugin_without_selection_applies_nothing(toy_patches, monkeypatch):
    ops, _ = toy_patches
    monkeypatch.delenv("ATTNPLUG_PATCHES", raising=False)
    load_engine_plugin("toy")
    assert ops.attend("q", 1, 2) == ("stock", "q")


def test_unknown_patch_id_is_a_clear_error_at_startup(toy_patches, monkeypatch):
    monkeypatch.setenv("ATTNPLUG_PATCHES", "toy.ops.attend, bogus")
    with pytest.raises(UnknownPatchError, match=r"ATTNPLUG_PATCHES names unknown patch id\(s\) 'bogus'; .*toy.ops.attend"):
        load_engine_plugin("toy")


def test_other_engines_ids_are_left_to_that_engine(toy_engine, register_plugin):
    other = toy_patch(id="sglang.fa.thing", engine="sglang")
    register_plugin(PatchPlugin(toy_patch(), other))
    assert select_patches("toy", "sglang.fa.thing,toy.ops.attend") == [toy_patch()]
    assert select_patches("sglang", "sglang.fa.thing,toy.ops.attend") == [other]


def test_disable_turns_everything_off(toy_patches, monkeypatch, tmp_path):
    ops, _ = toy_patches
    monkeypatch.setenv("ATTNPLUG_DISABLE", "1")
    monkeypatch.setenv("ATTNPLUG_PATCHES", "bogus")  # not even validated when disabled
    monkeypatch.setenv("ATTNPLUG_REPORT_DIR", str(tmp_path / "reports"))
    load_engine_plugin("toy")
    assert ops.attend("q", 1, 2) == ("stock", "q")
    assert not (tmp_path / "reports").exists()


def test_monkey_patch_api_one_keyword_per_patch(toy_patches):
    ops, _ = toy_patches
    outcome = apply_to("toy", helper=False)
    assert outcome.applied == ["toy.ops.attend"] and outcome.skipped == {}
    assert ops.Backend.helper(1) == ("stock helper", 1)
    with pytest.raises(TypeError, match="apply_to_toy\\(\\) got unknown patch keyword\\(s\\) split_lunch; known: attend, helper"):
        apply_to("toy", split_lunch=True)
    attnplug.revert()


def test_patched_context_manager_reverts_only_what_it_applied(toy_patches):
    ops, _ = toy_patches
    original_attend = ops.attend
    apply_to("toy", helper=False)
    outer_attend = ops.attend
    with attnplug.patched("toy") as outcome:
        assert outcome.newly_applied == ["toy.backend.helper"]
        assert [r.status for r in outcome.results] == ["already applied", "applied"]
        assert ops.Backend.helper(2) == ("attnplug helper", 2)
    assert ops.Backend.helper(2) == ("stock helper", 2)
    assert ops.attend is outer_attend is not original_attend
    attnplug.revert()
    assert ops.attend is original_attend


def test_engine_apis_exist_for_both_engines():
    assert attnplug.apply_to_vllm.__doc__ and attnplug.apply_to_sglang.__doc__
    with pytest.raises(TypeError, match="apply_to_vllm\\(\\) got unknown patch keyword"):
        attnplug.apply_to_vllm(no_such_patch=True)


def test_report_written_with_patches_engine_and_op_counters(toy_patches, monkeypatch, tmp_path):
    monkeypatch.setenv("ATTNPLUG_REPORT_DIR", str(tmp_path / "reports"))
    monkeypatch.setenv("ATTNPLUG_PATCHES", "all")
    monkeypatch.setattr(report, "op_calls", report.op_calls.__class__())
    load_engine_plugin("toy")
    report.op_calls["fused_decode_metadata"] += 3
    report.flush()
    data = json.loads((tmp_path / "reports" / f"attnplug-{os.getpid()}.json").read_text())
    assert data["pid"] == os.getpid()
    assert data["engines"]["toy"] == importlib.metadata.version("pluggy")
    assert data["patches"]["toy.ops.attend"] == {"status": "applied", "reason": ""}
    assert data["op_calls"] == {"fused_decode_metadata": 3}
    assert data["process_name"] and data["cmdline"]
    attnplug.revert()


def _run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env={**os.environ, **env}, check=False
    )


def test_each_process_writes_its_own_report_periodically(tmp_path):
    code = (
        "import time, os; from attnplug.adapters import vllm; from attnplug import report\n"
        "vllm.register(); report.op_calls['paged_attention'] += 5\n"
        "time.sleep(report.FLUSH_SECONDS * 2.5); print(os.getpid()); os._exit(0)"  # no atexit: only the writer thread
    )
    done = _run_python(code, ATTNPLUG_REPORT_DIR=str(tmp_path), ATTNPLUG_PATCHES="")
    assert done.returncode == 0, done.stderr
    data = json.loads((tmp_path / f"attnplug-{done.stdout.strip()}.json").read_text())
    assert data["op_calls"] == {"paged_attention": 5}
    assert "vllm" in data["engines"]


def test_import_attnplug_imports_no_engine_and_no_kernels():
    done = _run_python(
        "import sys, attnplug, attnplug.adapters.vllm, attnplug.adapters.sglang, attnplug.hooks\n"
        "attnplug.hooks.get_plugin_manager()\n"
        "print(sorted(m for m in ('vllm', 'sglang', 'triton', 'torch') if m in sys.modules))"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_entry_points_are_declared_for_both_engines():
    for group, target in (("vllm.general_plugins", "attnplug.adapters.vllm:register"), ("sglang.srt.plugins", "attnplug.adapters.sglang:register")):
        (entry,) = [ep for ep in importlib.metadata.entry_points(group=group) if ep.name == "attnplug"]
        assert entry.value == target
        assert callable(entry.load())


def test_a_disabled_process_writes_no_report_even_at_exit(tmp_path):
    code = "from attnplug.adapters import vllm; vllm.register()"
    done = _run_python(code, ATTNPLUG_REPORT_DIR=str(tmp_path / "reports"), ATTNPLUG_DISABLE="1")
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "reports").exists()


def test_opt_in_patch_applies_only_where_named(toy_engine, register_plugin, monkeypatch):
    """An opt-in patch (e.g. measured slower) stays out of "all" and the API defaults, with the reason."""
    ops, _ = toy_engine
    register_plugin(PatchPlugin(toy_patch(opt_in="measured slower here")))
    stock = ops.attend
    skipped = apply_to("toy")
    assert skipped.applied == [] and "measured slower here" in skipped.skipped["toy.ops.attend"]
    assert ops.attend is stock
    assert apply_to("toy", attend=True).applied == ["toy.ops.attend"]
    assert attnplug.revert() == ["toy.ops.attend"]


@pytest.mark.parametrize("selection,applies", [("all", False), ("toy.ops.attend", True)])
def test_opt_in_patch_through_the_engine_plugin(toy_engine, register_plugin, monkeypatch, selection, applies):
    ops, _ = toy_engine
    register_plugin(PatchPlugin(toy_patch(opt_in="measured slower here")))
    stock = ops.attend
    monkeypatch.setenv("ATTNPLUG_PATCHES", selection)
    load_engine_plugin("toy")
    assert (ops.attend is not stock) == applies
    attnplug.revert()
