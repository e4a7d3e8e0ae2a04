"""Shared timing helpers for the GPU benchmarks.

Three numbers per op, all in microseconds:

* :func:`eager_us`: median CUDA-event time of one call launched onto an idle GPU. For
  launch-bound ops (several small kernels) it includes the gaps while the host launches, i.e.
  the latency the op adds to an eager step.
* :func:`graph_us`: median GPU time per call when ``calls_per_graph`` calls are captured in one
  CUDA graph and the graph is replayed (host launch cost removed).
* :func:`host_us_per_call`: host wall time per call over many back-to-back calls with one final
  synchronize (the host cost of an eager call when the GPU keeps up).

:func:`wall_us` replaces all three in the ``--smoke`` runs (tiny shapes on the CPU under the Triton
interpreter, run by ``make test``): it checks that a script runs, not how fast.
"""

from __future__ import annotations

import csv
import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable

import torch

from attnplug.benchmarks import stock


def eager_us(fn: Callable[[], object], *, warmup: int = 20, reps: int = 200) -> float:
    """Median time of one eager call, CUDA events around it, GPU idle before each call."""
    for _ in range(warmup):
        fn()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def graph_us(fn: Callable[[], object], *, calls_per_graph: int = 20, warmup: int = 3, reps: int = 50) -> float:
    """Median GPU time per call inside a CUDA graph holding ``calls_per_graph`` calls."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (compile, cache) off the capture
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls_per_graph):
            fn()
    for _ in range(warmup):
        graph.replay()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls_per_graph)
    del graph
    return statistics.median(times)


def host_us_per_call(fn: Callable[[], object], *, calls: int = 1000, warmup: int = 50, rounds: int = 3) -> float:
    """Host time per call: ``calls`` back-to-back calls, one synchronize at the end; best of ``rounds``."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
    return best


def cudagraph_us(fn: Callable[[], object], *, rep: int = 30) -> float:
    """Median GPU time of one call by ``triton.testing.do_bench_cudagraph`` (long calls: kernels of attention)."""
    from triton.testing import do_bench_cudagraph

    fn()
    torch.cuda.synchronize()
    return do_bench_cudagraph(fn, rep=rep, return_mode="median") * 1e3


def back_to_back_us(fn: Callable[[], object], estimate_us: float) -> float:
    """Wall time per call of 20-200 back-to-back eager calls, one sync at the end (median of 3 rounds):
    the larger of host and GPU time, what a layer run eagerly costs."""
    n = int(min(200, max(20, 200_000 / max(estimate_us, 1.0))))
    for _ in range(3):
        fn()
    times = []
    for _ in range(3):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) / n * 1e6)
    return statistics.median(times)


def issue_us(fn: Callable[[], object], *, calls: int = 500) -> float:
    """Host time per call to issue ``calls`` back-to-back calls (no sync inside the timed loop)."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = (time.perf_counter() - start) / calls * 1e6
    torch.cuda.synchronize()
    return elapsed


def wall_us(fn: Callable[[], object], *, calls: int = 1) -> float:
    """Wall time per call of ``calls`` calls after one warm-up call, no CUDA (the CPU smoke runs)."""
    fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def environment() -> dict:
    """Device and versions, for the CSV rows and the results header."""
    import triton

    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
    }


def write_csv(path: str, rows: Iterable[dict], fields: list[str] | None = None) -> None:
    """Rows to ``path`` with the environment columns appended; ``fields``: the columns (rows may lack some),
    default the first row's keys."""
    rows = list(rows)
    if not rows:
        return
    env = environment()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=(fields or list(rows[0])) + list(env))
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, **env})


def out_dir(default: str = "attnplug-bench-results") -> str:
    """Where results go: ``$OUT`` on the GPU machine, else ``default``."""
    return os.environ.get("OUT") or default


def load_sglang_normal_decode_set_metadata():
    """SGLang 0.5.23's fused ``normal_decode_set_metadata`` (installed or fetched, :mod:`.stock`), or None
    with a warning when neither."""
    kernels = stock.sglang_kernels()
    if kernels is None:
        print(stock.missing_note(f"SGLang {stock.SGLANG_RELEASE}'s normal_decode_set_metadata"), flush=True)
        return None
    return kernels[stock.SGLANG_METADATA].normal_decode_set_metadata
