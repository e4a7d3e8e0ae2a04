"""Multi-target metadata copy: ``fused_metadata_copy`` vs per-tensor ``copy_`` loops.

The fields of a decode batch (K = 5): cache_seqlens int32 [bs], cu_seqlens_k int32 [bs+1],
page_table int32 [bs, max_seq_pages], positions int64 [bs], out_cache_loc int64 [bs]; copied into
T = 3 and 6 targets (e.g. the graph buffers of T speculative draft steps' backends), whose
buffers are sized for a larger maximum batch (their own row strides).

Providers: ``copy_loop`` (T * K ``dst.copy_(src)`` on precomputed views: the baseline's slicing
cost is not even counted) and ``attnplug`` (one call, full source tensors + per-field extents).
Eager (CUDA events), CUDA-graph GPU time and host time per call. ``--smoke``: tiny shapes on the CPU
(Triton interpreter), copies checked, wall time only, CSV written.
Usage: python -m attnplug.benchmarks.bench_metadata_copy [--out DIR] [--smoke]
"""

from __future__ import annotations

import argparse
import os

import torch


from attnplug.core.metadata_copy import fused_metadata_copy
from attnplug.benchmarks.common import (
    eager_us,
    environment,
    graph_us,
    host_us_per_call,
    out_dir,
    wall_us,
    write_csv,
)

MAX_BS = 256
CONFIGS = [  # (bs, max_seq_pages)
    (8, 512), (32, 512), (128, 512), (32, 8192),
]
TARGETS = [3, 6]
SMOKE = dict(configs=[(3, 8)], targets=[2])


def make_fields(bs, pages, num_targets, device="cuda", seed=0):
    gen = torch.Generator().manual_seed(seed)
    srcs = [
        torch.randint(1, 8192, (bs,), generator=gen, dtype=torch.int32),
        torch.randint(0, 2**20, (bs + 1,), generator=gen, dtype=torch.int32),
        torch.randint(0, 2**20, (bs, pages), generator=gen, dtype=torch.int32),
        torch.randint(0, 2**40, (bs,), generator=gen, dtype=torch.int64),
        torch.randint(0, 2**40, (bs,), generator=gen, dtype=torch.int64),
    ]
    srcs = [s.to(device) for s in srcs]
    dsts = [[torch.zeros((MAX_BS + 1,) + tuple(s.shape[1:]), dtype=s.dtype, device=device) for s in srcs]
            for _ in range(num_targets)]
    return srcs, dsts


def providers(srcs, dsts):
    views = [(d[: s.shape[0]], s) for targets in dsts for s, d in zip(srcs, targets)]

    def copy_loop():
        for dst, src in views:
            dst.copy_(src)

    def attnplug():
        fused_metadata_copy(srcs, dsts)

    return {"copy_loop": copy_loop, "attnplug": attnplug}


def check(srcs, dsts, fns):
    for name, fn in fns.items():
        for targets in dsts:
            for d in targets:
                d.fill_(-1)
        fn()
        for targets in dsts:
            for s, d in zip(srcs, targets):
                assert torch.equal(d[: s.shape[0]], s), f"{name}: copy differs"
                assert (d[s.shape[0]:] == -1).all(), f"{name}: wrote past the extent"


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    labels = sorted({(r["bs"], r["max_seq_pages"], r["targets"]) for r in rows}, key=lambda x: (x[2], x[1], x[0]))
    xs = range(len(labels))
    for ax, metric in zip(axes, ["eager_us", "graph_us", "host_us_per_call"]):
        for i, name in enumerate(["copy_loop", "attnplug"]):
            vals = [next(r[metric] for r in rows if (r["bs"], r["max_seq_pages"], r["targets"]) == lab
                         and r["provider"] == name) for lab in labels]
            ax.bar([x + 0.4 * i for x in xs], vals, width=0.4, label=name)
        ax.set_xticks([x + 0.2 for x in xs])
        ax.set_xticklabels([f"bs{b}\nP{p}\nT{t}" for b, p, t in labels], fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("us per call")
        ax.set_title(metric)
        ax.legend(fontsize=8)
    env = environment()
    fig.suptitle(f"multi-target metadata copy, K=5 fields ({env['device']}, torch {env['torch']}, triton {env['triton']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=out_dir())
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (Triton interpreter)")
    args = parser.parse_args(argv)
    print(environment(), flush=True)
    points = SMOKE if args.smoke else dict(configs=CONFIGS, targets=TARGETS)
    rows = []
    for num_targets in points["targets"]:
        for bs, pages in points["configs"]:
            srcs, dsts = make_fields(bs, pages, num_targets, "cpu" if args.smoke else "cuda", seed=bs + num_targets)
            fns = providers(srcs, dsts)
            check(srcs, dsts, fns)
            for name, fn in fns.items():
                row = {"bs": bs, "max_seq_pages": pages, "targets": num_targets, "fields": len(srcs), "provider": name}
                if args.smoke:
                    row.update(eager_us=round(wall_us(fn), 2), graph_us="", host_us_per_call="")
                else:
                    row.update(eager_us=round(eager_us(fn), 2), graph_us=round(graph_us(fn), 2),
                               host_us_per_call=round(host_us_per_call(fn, calls=500), 2))
                rows.append(row)
                print(f"copy T={num_targets} bs={bs:3d} P={pages:4d} {name:10s} eager {row['eager_us']:8.2f}  "
                      f"graph {row['graph_us']!s:>8}  host {row['host_us_per_call']!s:>8}", flush=True)
    write_csv(os.path.join(args.out, "metadata_copy.csv"), rows)
    if not args.smoke:
        plot(rows, os.path.join(args.out, "metadata_copy.png"))


if __name__ == "__main__":
    main()
