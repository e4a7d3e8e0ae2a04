"""The ``attnplug`` console script: ``doctor [--json]``, ``bench``, ``docs [--check]``."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
from pathlib import Path

import attnplug
from attnplug.adapters.engines import ENGINES
from attnplug.adapters.patching import check_patch
from attnplug.adapters.registry import all_patches
from attnplug.hooks import plugin_names


def _distribution_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _gpu() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"name": None, "sm_count": None}
    props = torch.cuda.get_device_properties(0)
    return {"name": props.name, "sm_count": props.multi_processor_count}


def diagnose() -> dict:
    """Everything ``attnplug doctor`` reports, as a JSON-ready dict."""
    import torch

    versions = {name: engine.installed_version() for name, engine in ENGINES.items()}
    patches = []
    for patch in all_patches().values():
        problem = check_patch(patch)
        patches.append(
            {
                "id": patch.id,
                "engine": patch.engine,
                "versions": patch.versions,
                "upstream": patch.upstream,
                "status": "applies" if problem is None else "would skip",
                "reason": problem or "",
            }
        )
    return {
        "attnplug": attnplug.__version__,
        "engines": {name: str(version) if version else None for name, version in versions.items()},
        "torch": torch.__version__,
        "triton": _distribution_version("triton"),
        "cuda": torch.version.cuda,
        "gpu": _gpu(),
        "plugins": plugin_names(),
        "patches": patches,
    }


def _print_human(info: dict) -> None:
    print(f"attnplug {info['attnplug']}")
    print("engines:")
    for name, version in info["engines"].items():
        print(f"  {name:<8} {version or 'not installed'}")
    print(f"torch {info['torch']}, triton {info['triton'] or 'not installed'}, CUDA {info['cuda'] or 'none'}")
    gpu = info["gpu"]
    print(f"GPU: {gpu['name']} ({gpu['sm_count']} SMs)" if gpu["name"] else "GPU: no GPU")
    print(f"plugins: {', '.join(info['plugins'])}")
    print("patches:")
    if not info["patches"]:
        print("  (no patches registered)")
    width = max((len(p["id"]) for p in info["patches"]), default=0)
    for p in info["patches"]:
        status = p["status"] + (f": {p['reason']}" if p["reason"] else "")
        print(f"  {p['id']:<{width}}  {p['versions']:<14} {status}")


def _bench(args) -> int:
    from attnplug.bench import BENCHMARKS, BenchError, run, summary

    if args.fetch_stock:
        from attnplug.benchmarks import fetch_stock
        from attnplug.benchmarks.stock import STOCK_DIR_ENV, stock_dir

        fetch_stock.main([])
        print(f"fetched into {stock_dir()}; on a machine without a registry, copy it there and set {STOCK_DIR_ENV}")
        return 0
    names = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown:
        print(f"attnplug bench: unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    try:
        failed = run(args.out, names, quick=args.quick)
    except BenchError as exc:
        print(f"attnplug bench: {exc}", file=sys.stderr)
        return 2
    print(summary(args.out, names))
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    from attnplug.bench import BENCHMARKS, DEFAULT as DEFAULT_BENCHMARKS

    parser = argparse.ArgumentParser(prog="attnplug", description=attnplug.__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    doctor = commands.add_parser("doctor", help="installed engines, torch/Triton/CUDA, GPU, and which patches apply")
    doctor.add_argument("--json", action="store_true", help="print one JSON object")
    docs = commands.add_parser("docs", help="regenerate docs/patches.md and README's support matrix from the registry")
    docs.add_argument("--check", action="store_true", help="only report stale files (exit 1 if any)")
    docs.add_argument("--repo", type=Path, default=Path.cwd(), help="repository root (default: the current folder)")
    bench = commands.add_parser("bench", help="run the GPU benchmarks (eager and CUDA graph, attnplug vs its peers)")
    bench.add_argument("--out", type=Path, default=Path("attnplug-bench-results"), help="where CSVs and plots go")
    bench.add_argument("--only", default=DEFAULT_BENCHMARKS, help="comma list of benchmarks to run "
                       f"(known: {', '.join(BENCHMARKS)})")
    bench.add_argument("--quick", action="store_true", help="a subset of each grid (a few minutes at most)")
    bench.add_argument("--fetch-stock", action="store_true",
                       help="only fetch the stock kernels of the engine releases compared against (needs a registry)")
    args = parser.parse_args(argv)
    if args.command == "bench":
        return _bench(args)
    if args.command == "docs":
        from attnplug.adapters.docs import stale_docs, write_docs

        stale = stale_docs(args.repo) if args.check else write_docs(args.repo)
        for path in stale:
            print(f"{'stale' if args.check else 'rewrote'}: {path}")
        return 1 if args.check and stale else 0
    if args.command == "doctor":
        info = diagnose()
        if args.json:
            json.dump(info, sys.stdout, indent=2)
            print()
        else:
            _print_human(info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
