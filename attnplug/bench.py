"""``attnplug bench``: run the GPU benchmarks of a checkout, then summarize attnplug vs stock.

Each benchmark is a script in the checkout's ``benchmarks/`` folder that times eager and CUDA-graph
runs side by side with the engine's stock path and writes a CSV (and a PNG plot) into ``--out``.
The stock paths are loaded from ``.vendor/`` (``python benchmarks/fetch_stock.py`` fills it).
"""

from __future__ import annotations

import csv
import statistics
import subprocess
import sys
from pathlib import Path

BENCHMARKS = {  # name -> (script, CSV it writes)
    "metadata": ("bench_decode_metadata.py", "decode_metadata.csv"),
    "copy": ("bench_metadata_copy.py", "metadata_copy.csv"),
    "attention": ("bench_paged_attention.py", "paged_attention.csv"),
    "step": ("bench_decode_step.py", "decode_step.csv"),
}
STOCK_NAMES = ("torch_unfused", "copy_loop", "vllm_stock", "stock")  # the baseline provider of each CSV
TIME_COLUMNS = ("eager_us", "graph_us", "eager_step_us", "graph_step_us")
PROVIDER_COLUMNS = ("provider", "impl")
RESULT_COLUMNS = {"host_us_per_call", "tbps", "speedup_vs_stock", "host_us", "max_abs_diff", "segments", "case",
                  "device", "torch", "triton", "python", "date", *TIME_COLUMNS}


class BenchError(RuntimeError):
    """A precondition of ``attnplug bench`` is not met (no GPU, not a checkout)."""


def check_preconditions(repo: Path) -> None:
    import torch

    if not torch.cuda.is_available():
        raise BenchError("attnplug bench needs a CUDA GPU and found none (torch.cuda.is_available() is False)")
    if not (repo / "benchmarks").is_dir():
        raise BenchError(f"{repo} is not an attnplug checkout (no benchmarks/ folder): pass --repo")


def run(repo: Path, out: Path, names: list[str]) -> list[str]:
    """Run the named benchmarks one after the other, streaming their progress; returns the failed ones."""
    check_preconditions(repo)
    if not (repo / ".vendor").is_dir():
        print("note: .vendor/ is missing, so stock providers are skipped where a script can: "
              "run `python benchmarks/fetch_stock.py` first", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    failed = []
    for index, name in enumerate(names, 1):
        script = repo / "benchmarks" / BENCHMARKS[name][0]
        print(f"[{index}/{len(names)}] {name}: {script.name} -> {out}", flush=True)
        done = subprocess.run([sys.executable, str(script), "--out", str(out)], cwd=repo, check=False)
        if done.returncode != 0:
            print(f"[{index}/{len(names)}] {name} FAILED (exit {done.returncode})", flush=True)
            failed.append(name)
    return failed


def speedups(rows: list[dict]) -> dict[str, list[float]]:
    """Time column -> stock time / attnplug time, over the configurations both providers ran."""
    provider = next((c for c in PROVIDER_COLUMNS if rows and c in rows[0]), None)
    if provider is None:
        return {}
    config_columns = [c for c in rows[0] if c not in RESULT_COLUMNS and c != provider]
    by_config: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        by_config.setdefault(tuple(row[c] for c in config_columns), {})[row[provider]] = row
    ratios: dict[str, list[float]] = {}
    for providers in by_config.values():
        ours = providers.get("attnplug")
        stock = next((providers[name] for name in STOCK_NAMES if name in providers), None)
        if ours is None or stock is None:
            continue
        for column in TIME_COLUMNS:
            if ours.get(column) and stock.get(column):
                ratios.setdefault(column, []).append(float(stock[column]) / float(ours[column]))
    return ratios


def summary(out: Path, names: list[str]) -> str:
    """A table of attnplug's speed-up over stock per benchmark and time column (min / median / max)."""
    lines = [f"{'benchmark':<10} {'time':<14} {'points':>6} {'min':>7} {'median':>7} {'max':>7}"]
    for name in names:
        path = out / BENCHMARKS[name][1]
        if not path.exists():
            lines.append(f"{name:<10} (no {path.name})")
            continue
        with path.open() as f:
            rows = list(csv.DictReader(f))
        for column, values in speedups(rows).items():
            lines.append(f"{name:<10} {column:<14} {len(values):>6} {min(values):>6.2f}x "
                         f"{statistics.median(values):>6.2f}x {max(values):>6.2f}x")
    return "\n".join(lines)
