"""Per-process observation: patch outcomes and call counters of attnplug's ops, as a JSON report.

When ``ATTNPLUG_REPORT_DIR`` is set, each process that loads attnplug writes
``attnplug-<pid>.json`` there, every couple of seconds and at exit. Integration tests read these
files to prove that attnplug's kernels ran inside an engine's worker processes.
"""

from __future__ import annotations

import atexit
import json
import multiprocessing
import os
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from attnplug.adapters.patching import ApplyReport

REPORT_DIR_ENV = "ATTNPLUG_REPORT_DIR"
FLUSH_SECONDS = 2.0

op_calls: Counter[str] = Counter()  # op name -> calls in this process
split_kv: Counter[str] = Counter()  # "sequences" / "tokens": decode-like rows planned into the split-KV kernel
# speculative decoding: "verify_batches", "draft_extend_batches", "draft_rounds" (one metadata launch for
# all draft steps of a round) and "draft_steps" (the steps those launches prepared)
speculative: Counter[str] = Counter()
_patches: dict[str, dict[str, str]] = {}  # patch id -> {"status", "reason"}
_engines: dict[str, str | None] = {}  # engine name -> version
_writer: threading.Thread | None = None
_writer_lock = threading.Lock()
_flushes_at_exit = False


def record_engine(engine: str, version: str | None) -> None:
    _engines[engine] = version


def record_patches(report: ApplyReport) -> None:
    for result in report.results:
        _patches[result.patch_id] = {"status": result.status, "reason": result.reason}


def count_split_kv(num_sequences: int, num_tokens: int) -> None:
    """One planned batch's decode-like sequences and their query tokens (more tokens: verify rows)."""
    split_kv["sequences"] += num_sequences
    split_kv["tokens"] += num_tokens


def count_speculative(event: str, n: int = 1) -> None:
    """Speculative-decoding work planned by an attnplug backend (see :data:`speculative`)."""
    speculative[event] += n


def _cmdline() -> list[str]:
    try:
        return [part for part in Path("/proc/self/cmdline").read_bytes().decode(errors="replace").split("\0") if part]
    except OSError:
        return list(sys.argv)


def snapshot() -> dict:
    """This process's report as a JSON-ready dict."""
    return {
        "pid": os.getpid(),
        "process_name": multiprocessing.current_process().name,
        "cmdline": _cmdline(),
        "engines": dict(_engines),
        "patches": dict(_patches),
        "op_calls": dict(op_calls),
        "split_kv": dict(split_kv),
        "speculative": dict(speculative),
        "written_at": time.time(),
    }


def report_path() -> Path | None:
    directory = os.environ.get(REPORT_DIR_ENV)
    return Path(directory) / f"attnplug-{os.getpid()}.json" if directory else None


def flush() -> None:
    """Write the report atomically (a temporary file renamed over the old one); no-op when not enabled."""
    path = report_path()
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(snapshot(), indent=1, sort_keys=True))
    tmp.replace(path)


def _flush_periodically() -> None:
    while True:
        time.sleep(FLUSH_SECONDS)
        try:
            flush()
        except OSError:
            pass


def start() -> None:
    """Start writing reports for this process if ``ATTNPLUG_REPORT_DIR`` is set (idempotent).

    Only a process that started reporting writes one (periodically and at exit): with
    ``ATTNPLUG_DISABLE=1`` or attnplug left out of the engine's plugins, no report appears.
    """
    global _writer, _flushes_at_exit
    if report_path() is None:
        return
    with _writer_lock:
        if _writer is not None and _writer.is_alive():
            return
        if not _flushes_at_exit:
            atexit.register(flush)
            _flushes_at_exit = True  # a forked child inherits both the handler and this flag
        _writer = threading.Thread(target=_flush_periodically, name="attnplug-report", daemon=True)
        _writer.start()
    flush()


def _after_fork_in_child() -> None:
    """A forked child has no writer thread and must not inherit its parent's counters."""
    global _writer
    _writer = None
    op_calls.clear()
    split_kv.clear()
    if report_path() is not None:
        start()


os.register_at_fork(after_in_child=_after_fork_in_child)
