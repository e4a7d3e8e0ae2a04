"""``attnplug bench``: run the GPU benchmarks shipped in the package, then summarize attnplug vs each peer.

Each benchmark is a module of :mod:`attnplug.benchmarks` that times eager and CUDA-graph runs side by
side with the engines' stock paths and writes a CSV (most also a PNG plot) into ``--out``. The stock
kernels come from the installed engine, else from fetched copies (:mod:`attnplug.benchmarks.stock`;
``attnplug bench --fetch-stock`` fetches them where a package registry is reachable).
"""

from __future__ import annotations

import csv
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCHMARKS = {  # name -> (module in attnplug.benchmarks, CSV it writes, takes --quick)
    "metadata": ("bench_decode_metadata", "decode_metadata.csv", False),
    "copy": ("bench_metadata_copy", "metadata_copy.csv", False),
    "attention": ("bench_paged_attention", "paged_attention.csv", True),
    "fp8": ("bench_fp8_attention", "fp8_attention.csv", True),
    "verify": ("bench_verify_attention", "verify_attention.csv", True),
    "step": ("bench_decode_step", "decode_step.csv", True),
    "draft": ("bench_draft_metadata", "draft_metadata.csv", True),
    "kv_splits": ("bench_sglang_kv_splits", "sglang_kv_splits.csv", True),
    "nsa": ("bench_nsa_draft_copy", "nsa_draft_copy.csv", False),
}
DEFAULT = "metadata,copy,attention,verify,step,draft"
TIME_COLUMNS = ("graph_us", "eager_us", "graph_step_us", "eager_step_us")
PROVIDER_COLUMNS = ("provider", "impl")
# columns that are measurements, not part of a point's configuration
RESULT_COLUMNS = {"host_us_per_call", "host_us", "tbps", "read_share", "attnplug_x", "max_abs_diff", "segments",
                  "launches", "x_vs_vllm_0_33", "x_vs_own_decode", "fp8_vs_bf16", "device", "torch", "triton", "python", "date",
                  *TIME_COLUMNS}


class BenchError(RuntimeError):
    """A precondition of ``attnplug bench`` is not met (no GPU)."""


def check_preconditions() -> None:
    import torch

    if not torch.cuda.is_available():
        raise BenchError("attnplug bench needs a CUDA GPU and found none (torch.cuda.is_available() is False); "
                         "`attnplug bench --fetch-stock` runs without one")


def run(out: Path, names: list[str], quick: bool = False) -> list[str]:
    """Run the named benchmarks one after the other, streaming their progress; returns the failed ones."""
    from attnplug.benchmarks import stock

    check_preconditions()
    out.mkdir(parents=True, exist_ok=True)
    sources = stock.describe()
    print("stock kernels compared against:\n  " + "\n  ".join(sources), flush=True)
    (out / "stock.txt").write_text("\n".join(sources) + "\n")
    failed = []
    for index, name in enumerate(names, 1):
        module, _, takes_quick = BENCHMARKS[name]
        command = [sys.executable, "-m", f"attnplug.benchmarks.{module}", "--out", str(out)]
        command += ["--quick"] if quick and takes_quick else []
        print(f"[{index}/{len(names)}] {name}: {' '.join(command[1:])}", flush=True)
        start = time.perf_counter()
        done = subprocess.run(command, check=False)
        took = time.perf_counter() - start
        if done.returncode != 0:
            print(f"[{index}/{len(names)}] {name} FAILED (exit {done.returncode}, {took:.0f} s)", flush=True)
            failed.append(name)
        else:
            print(f"[{index}/{len(names)}] {name} done in {took:.0f} s", flush=True)
    return failed


def speedups(rows: list[dict]) -> dict[tuple[str, str], list[float]]:
    """(peer, time column) -> peer time / attnplug time, over the configurations both ran.

    Long CSVs (a ``provider`` or ``impl`` column) pair each peer's row with attnplug's row of the same
    configuration; attnplug's own variants (``attnplug_*``) are not peers. Wide CSVs (``stock_*`` and
    ``attnplug_*`` columns) report their ``speedup_*`` columns as peer ``stock``."""
    if not rows:
        return {}
    provider = next((c for c in PROVIDER_COLUMNS if c in rows[0]), None)
    if provider is None:
        return {("stock", c): [float(r[c]) for r in rows if r[c]] for c in rows[0] if c.startswith("speedup_")}
    config_columns = [c for c in rows[0] if c not in RESULT_COLUMNS and c != provider]
    by_config: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        by_config.setdefault(tuple(row[c] for c in config_columns), {})[row[provider]] = row
    ratios: dict[tuple[str, str], list[float]] = {}
    for providers in by_config.values():
        ours = providers.get("attnplug")
        if ours is None:
            continue
        for peer, row in providers.items():
            if peer.startswith("attnplug"):
                continue
            for column in TIME_COLUMNS:
                if ours.get(column) and row.get(column):
                    ratios.setdefault((peer, column), []).append(float(row[column]) / float(ours[column]))
    return ratios


def summary(out: Path, names: list[str]) -> str:
    """attnplug's speed-up over each peer per benchmark and time column (min / median / max; > 1: faster)."""
    lines = [f"{'benchmark':<10} {'peer':<24} {'time':<14} {'points':>6} {'min':>7} {'median':>7} {'max':>7}"]
    for name in names:
        path = out / BENCHMARKS[name][1]
        if not path.exists():
            lines.append(f"{name:<10} (no {path.name})")
            continue
        with path.open() as f:
            rows = list(csv.DictReader(f))
        for (peer, column), values in speedups(rows).items():
            lines.append(f"{name:<10} {peer:<24} {column:<14} {len(values):>6} {min(values):>6.2f}x "
                         f"{statistics.median(values):>6.2f}x {max(values):>6.2f}x")
    return "\n".join(lines)
