"""`attnplug doctor`: engines, versions, GPU, and which patches would apply, for people and machines."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import torch

from attnplug.cli import diagnose
from tests.toy import PatchPlugin, toy_patch

ENGINES_INSTALLED = {name for name in ("vllm", "sglang") if importlib.util.find_spec(name)}


def _doctor(*args: str) -> str:
    script = Path(sys.executable).with_name("attnplug")
    done = subprocess.run([str(script), "doctor", *args], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_doctor_says_what_is_installed():
    text = _doctor()
    for engine in ("vllm", "sglang"):
        if engine not in ENGINES_INSTALLED:
            assert f"{engine:<8} not installed" in text
    assert f"torch {torch.__version__}" in text
    assert ("GPU: no GPU" in text) != torch.cuda.is_available()
    assert "patches:" in text


def test_doctor_json_is_one_object_for_machines():
    info = json.loads(_doctor("--json"))
    assert set(info) >= {"attnplug", "engines", "torch", "triton", "cuda", "gpu", "plugins", "patches"}
    for engine in ("vllm", "sglang"):
        if engine not in ENGINES_INSTALLED:
            assert info["engines"][engine] is None
    assert (info["gpu"]["name"] is None) != torch.cuda.is_available()
    assert info["plugins"][:2] == ["attnplug.adapters.vllm.plugin", "attnplug.adapters.sglang.plugin"]


def test_doctor_table_says_which_patches_apply_and_why_not(toy_engine, register_plugin):
    register_plugin(PatchPlugin(toy_patch(), toy_patch(id="toy.ops.old", versions="<1")))
    rows = {row["id"]: row for row in diagnose()["patches"]}
    assert rows["toy.ops.attend"]["status"] == "applies"
    assert rows["toy.ops.old"]["status"] == "would skip"
    assert "outside the supported range '<1'" in rows["toy.ops.old"]["reason"]
