"""SGLang-specific part of the live-test harness: the sglang 0.5.23 venv, launch command and environment.

A server is described by a :class:`SglangConfig` (attention backend, extra env, extra CLI args).
What SGLang on CPU needs is documented in ``/work/shared/ENGINES.md``; the CPU-only work-arounds
live here and in ``integration/shims/sgl_kernel_cpu`` (a stand-in for the CPU ``sgl_kernel``
library, first on the server's ``PYTHONPATH``), never in ``attnplug/``.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from integration import harness

SGLANG_VERSION = "0.5.23"
SGL_KERNEL_SHIM_DIR = harness.INTEGRATION_DIR / "shims" / "sgl_kernel_cpu"
ATTNPLUG_PLUGIN = "attnplug"  # attnplug's sglang.srt.plugins entry-point name

SGLANG_VENV = harness.VenvSpec(
    name=f"sglang-{SGLANG_VERSION}",
    # sglang 0.5.23 pins torch==2.14.1 (a CUDA build that imports fine without a GPU). The harness
    # tries its local wheel dir first; pip then takes 2.14.1 from the registry (the local 2.13
    # wheel does not match the pin), so this needs no harness change.
    torch="torch==2.14.1",
    requirements=(f"sglang=={SGLANG_VERSION}", "pluggy"),
    smoke_imports=("transformers.models.llama", "sglang.srt.layers.attention.attention_registry"),
)

# Passed to every server: float32 (bf16 under the Triton interpreter is garbage) and a small KV
# pool (without --max-total-tokens SGLang reserves a ~14 GB KV cache on this machine).
BASE_ARGS = ("--device", "cpu", "--dtype", "float32", "--max-total-tokens", "8192", "--mem-fraction-static", "0.2")


@dataclass(frozen=True)
class SglangConfig:
    """One server configuration; hashable, so it keys cached results and names pytest params.

    label: short name for logs and test ids.
    backend: ``--attention-backend`` value.
    env: extra environment (e.g. ATTNPLUG_PATCHES, ATTNPLUG_DISABLE, SGLANG_PLUGINS); a value of
        None removes the variable.
    args: extra CLI args.
    report: set ``ATTNPLUG_REPORT_DIR`` to a fresh directory (read with ``harness.read_reports``).
    """

    label: str
    backend: str
    env: tuple[tuple[str, str | None], ...] = ()
    args: tuple[str, ...] = ()
    report: bool = False

    @classmethod
    def make(cls, label: str, backend: str, *, env: Mapping[str, str | None] | None = None,
             args: tuple[str, ...] = (), report: bool = False) -> SglangConfig:
        return cls(label, backend, tuple(sorted((env or {}).items())), tuple(args), report)


def server_env(config: SglangConfig, scratch: Path, report_dir: Path | None) -> dict[str, str]:
    """The server's whole environment: ours, with caches and temp files inside ``scratch``."""
    env = dict(os.environ)
    for name in [name for name in env if name.startswith(("ATTNPLUG_", "SGLANG_", "SGL_"))]:
        del env[name]  # nothing leaks in from the shell running the tests
    for name in ("XDG_CACHE_HOME", "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR", "TMPDIR", "FLASHINFER_WORKSPACE_BASE"):
        path = scratch / name.lower()
        path.mkdir(parents=True, exist_ok=True)
        env[name] = str(path)
    env.update(
        SGLANG_USE_CPU_ENGINE="1",  # is_cpu() needs it
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TRITON_INTERPRET="1",  # no GPU: Triton kernels run in the interpreter
        PYTHONPATH=os.pathsep.join(filter(None, (str(SGL_KERNEL_SHIM_DIR), os.environ.get("PYTHONPATH")))),
        PYTHONUNBUFFERED="1",
        DO_NOT_TRACK="1",
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
    )
    return harness.apply_env_overrides(env, config.env, report_dir)


def chat(server: harness.RunningServer, model: str, messages, *, max_tokens: int = 16) -> harness.Generation:
    """One greedy chat completion, with its token ids: SGLang returns them as ``response_token_ids``
    (``harness.chat`` reads the OpenAI-completions field ``token_ids``, which SGLang's chat answer lacks)."""
    payload = {"model": model, "messages": list(messages), "max_tokens": max_tokens, "temperature": 0.0,
               "ignore_eos": True, "return_token_ids": True}
    choice = harness.http_json(f"{server.base_url}/v1/chat/completions", payload)["choices"][0]
    token_ids = choice.get("response_token_ids")
    return harness.Generation(choice["message"]["content"] or "", tuple(token_ids) if token_ids is not None else None)


def stream_completion(server: harness.RunningServer, model: str, prompt: str, *, max_tokens: int,
                      first_token: threading.Event) -> harness.Generation:
    """A greedy completion streamed over loopback; sets ``first_token`` once the first token arrives
    (the request then sits in SGLang's running batch)."""
    payload = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
               "ignore_eos": True, "return_token_ids": True, "stream": True}
    connection = http.client.HTTPConnection("127.0.0.1", int(server.base_url.rsplit(":", 1)[1]), timeout=300)
    try:
        connection.request("POST", "/v1/completions", json.dumps(payload), {"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            raise RuntimeError(f"streamed completion answered HTTP {response.status}: {response.read()[:2000]!r}")
        text, token_ids = [], []
        for raw_line in response:
            line = raw_line.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            choice = json.loads(line[len("data:"):])["choices"][0]
            text.append(choice.get("text") or "")
            token_ids.extend(choice.get("token_ids") or ())
            if token_ids:
                first_token.set()
        return harness.Generation("".join(text), tuple(token_ids))
    finally:
        first_token.set()  # never leave a waiter hanging
        connection.close()


def complete_while_decoding(server: harness.RunningServer, model: str, running_prompt: str, late_prompt: str,
                            *, max_tokens: int = 16) -> tuple[harness.Generation, harness.Generation]:
    """Send ``late_prompt`` once ``running_prompt`` is decoding: with ``--enable-mixed-chunk`` SGLang
    runs the late prefill and the running decode in one MIXED batch. Returns both results."""
    first_token = threading.Event()
    result: dict[str, object] = {}

    def stream() -> None:
        try:
            result["running"] = stream_completion(server, model, running_prompt, max_tokens=max_tokens, first_token=first_token)
        except Exception as error:  # noqa: BLE001 -- re-raised below, in the caller's thread
            result["error"] = error

    thread = threading.Thread(target=stream, name="running-request")
    thread.start()
    first_token.wait(timeout=300)
    late = harness.complete(server, model, [late_prompt], max_tokens=max_tokens)[0]
    thread.join(timeout=300)
    if "error" in result:
        raise result["error"]
    return result["running"], late


def model_name(model_dir: Path) -> str:
    return model_dir.name


def launch(config: SglangConfig, *, python: Path, model_dir: Path, scratch: Path,
           report_dir: Path | None) -> harness.Launch:
    port = harness.free_port()
    argv = (
        str(python), "-m", "sglang.launch_server",
        "--model-path", str(model_dir), "--served-model-name", model_name(model_dir),
        *BASE_ARGS, "--attention-backend", config.backend,
        "--host", "127.0.0.1", "--port", str(port),
        *(arg.replace(harness.MODEL_DIR_ARG, str(model_dir)) for arg in config.args),
    )
    # A start takes 30-60 s on an idle 2-core machine and several minutes beside other servers.
    return harness.Launch(argv=argv, env=server_env(config, scratch, report_dir), port=port,
                          ready_paths=("/health", "/v1/models"), ready_timeout_s=600.0)


@contextlib.contextmanager
def serve(config: SglangConfig, *, python: Path, model_dir: Path, workdir: Path) -> Iterator[harness.RunningServer]:
    """A running SGLang server for ``config``; its log, scratch and report dirs are under ``workdir``.

    ``server.info`` has ``model`` (the served model name), ``report_dir`` (or None) and ``config``.
    Raises ``harness.ServerStartError`` (with the whole log) when the server does not come up.
    """
    report_dir = harness.prepare_workdir(workdir, reports=config.report)
    spec = launch(config, python=python, model_dir=model_dir, scratch=workdir / "scratch", report_dir=report_dir)
    with harness.serve(spec, workdir / "server.log", name=f"sglang[{config.label}]") as server:
        server.info.update(model=model_name(model_dir), report_dir=report_dir, config=config)
        yield server
