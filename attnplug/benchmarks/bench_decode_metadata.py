"""Decode-metadata update: attnplug's fused kernel vs the unfused torch sequence vs SGLang's fused kernel.

Sections:
  launch   host time per call, plain ``kernel[grid](...)`` vs ``attnplug.core._launch.launch``,
           for a tiny kernel and for the decode-metadata kernel (1000 back-to-back calls).
  decode   bs 1, 8, 32, 128, 256 x page size 1, 64 x context 8192: eager (CUDA events), CUDA-graph
           GPU time and host time per call for each provider.

Providers (same inputs, same buffers):
  torch_unfused      SGLang's per-step sequence before PR 20778 (the semantics we implement):
                     precomputed strided column indices, cumsum(dtype=int32), cu_seqlens_k[0] left
                     at its pre-filled 0 (as SGLang did), full page table over max_seq_pages columns.
  sglang_fused       sglang 0.5.23 ``normal_decode_set_metadata`` (default zero_tail=False: it
                     rewrites only each sequence's live pages, less work than our semantics).
  sglang_fused_zero_tail  the same with zero_tail=True: writes all max_seq_pages columns (zeros
                     past the live prefix), the closest to our semantics in store traffic.
  attnplug           ``fused_decode_metadata`` (fast launch path).
  attnplug_plain_launch  the same kernel through the plain ``kernel[grid](...)`` launch.

SGLang 0.5.23's module comes from the installed sglang, else a fetched copy (:mod:`.stock`). ``--smoke``: tiny shapes on the CPU (Triton interpreter), outputs checked, wall
time only, CSVs written. Usage: python -m attnplug.benchmarks.bench_decode_metadata [--out DIR] [--smoke]
"""

from __future__ import annotations

import argparse
import os

import torch
import triton
import triton.language as tl


from attnplug.core import decode_metadata as dm
from attnplug.core._launch import fast_launcher, launch
from attnplug.benchmarks.common import (
    eager_us,
    environment,
    graph_us,
    host_us_per_call,
    load_sglang_normal_decode_set_metadata,
    out_dir,
    wall_us,
    write_csv,
)

MAX_CONTEXT = 8192
BATCHES = [1, 8, 32, 128, 256]
PAGE_SIZES = [1, 64]
SMOKE = dict(batches=[1, 3], page_sizes=[1, 4], max_context=64)


def grid(smoke: bool) -> dict:
    return SMOKE if smoke else dict(batches=BATCHES, page_sizes=PAGE_SIZES, max_context=MAX_CONTEXT)


def make_batch(bs, page_size, max_context=MAX_CONTEXT, device="cuda", seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    pool = 2 * max(BATCHES)
    num_tokens = pool * max_context
    max_seq_pages = max_context // page_size
    return {
        "req_to_token": torch.randint(0, num_tokens, (pool, max_context), generator=gen, dtype=torch.int32).to(device),
        "req_pool_indices": torch.randperm(pool, generator=gen)[:bs].to(device),  # int64, as SGLang's
        "seq_lens": torch.randint(1, max_context, (bs,), generator=gen).to(device),  # int64, as SGLang's
        "cache_seqlens_int32": torch.zeros(bs, dtype=torch.int32, device=device),
        "cu_seqlens_k": torch.zeros(bs + 1, dtype=torch.int32, device=device),
        "page_table": torch.zeros(bs, max_seq_pages, dtype=torch.int32, device=device),
        "strided_indices": torch.arange(0, max_context, page_size, device=device),
        "max_seq_pages": max_seq_pages,
        "page_size": page_size,
    }


def providers(b, sglang_fn):
    """name -> zero-argument callable updating b's buffers."""

    def torch_unfused():
        b["cache_seqlens_int32"].copy_(b["seq_lens"] + 0)
        b["cu_seqlens_k"][1:].copy_(torch.cumsum(b["cache_seqlens_int32"], dim=0, dtype=torch.int32))
        cols = b["strided_indices"][: b["max_seq_pages"]]
        page_indices = b["req_to_token"][b["req_pool_indices"][:, None], cols[None, :]]
        b["page_table"][:, : b["max_seq_pages"]].copy_(page_indices // b["page_size"])

    def attnplug():
        dm.fused_decode_metadata(b["cache_seqlens_int32"], b["cu_seqlens_k"], b["page_table"], b["req_to_token"],
                                 b["req_pool_indices"], b["seq_lens"], b["max_seq_pages"], page_size=b["page_size"])

    def attnplug_plain_launch():
        launcher = fast_launcher(dm._fused_decode_metadata_kernel)
        enabled, launcher._enabled = launcher._enabled, False
        try:
            attnplug()
        finally:
            launcher._enabled = enabled

    out = {"torch_unfused": torch_unfused, "attnplug": attnplug, "attnplug_plain_launch": attnplug_plain_launch}
    if sglang_fn is not None:
        def sglang(zero_tail):
            return lambda: sglang_fn(b["cache_seqlens_int32"], b["cu_seqlens_k"], b["page_table"], b["req_to_token"],
                                     b["req_pool_indices"], b["max_seq_pages"], b["seq_lens"], 0, b["page_size"],
                                     zero_tail=zero_tail)

        out["sglang_fused"] = sglang(False)
        out["sglang_fused_zero_tail"] = sglang(True)
    return out


def check_agreement(b, fns):
    """attnplug must equal the unfused sequence exactly; SGLang on the live prefix (its semantics)."""
    outs = {}
    for name, fn in fns.items():
        for key in ("cache_seqlens_int32", "cu_seqlens_k", "page_table"):
            b[key].fill_(-1)
        b["cu_seqlens_k"][0] = 0  # the unfused sequence relies on a pre-filled 0
        fn()
        outs[name] = {k: b[k].clone() for k in ("cache_seqlens_int32", "cu_seqlens_k", "page_table")}
    want = outs["torch_unfused"]
    for name, got in outs.items():
        for key in ("cache_seqlens_int32", "cu_seqlens_k"):
            assert torch.equal(got[key], want[key]), f"{name}: {key} differs"
        if name.startswith("attnplug"):
            assert torch.equal(got["page_table"], want["page_table"]), f"{name}: page_table differs"
        else:
            live = (b["seq_lens"] + b["page_size"] - 1) // b["page_size"]
            cols = torch.arange(b["max_seq_pages"], device=live.device)
            mask = cols[None, :] < live[:, None]
            assert torch.equal(got["page_table"][mask], want["page_table"][mask]), f"{name}: live page_table differs"


@triton.jit
def _tiny_kernel(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) + 1, mask=offs < n)


def bench_launch(rows, smoke=False):
    """Host us per call, plain launch vs fast launch, 1000 back-to-back calls."""
    device, max_context = ("cpu", SMOKE["max_context"]) if smoke else ("cuda", MAX_CONTEXT)
    x = torch.zeros(64, device=device)
    b = make_batch(32, 1, max_context, device=device)
    kernel = dm._fused_decode_metadata_kernel
    col_blocks, page_shift, block_cols, num_warps = dm._plan(max_context, 1)  # as fused_decode_metadata launches it
    # the kernel's arguments, page size 1, one step, no SWA, all max_context columns (at 8192: grid (32, 9))
    meta_args = ((32, col_blocks + 1), b["seq_lens"], b["req_pool_indices"], b["req_to_token"], max_context, 1, None,
                 b["cache_seqlens_int32"], b["cu_seqlens_k"], b["page_table"], max_context, 1, None, 0, 0, 0, 0,
                 32, max_context, 0)
    meta_kw = {"PAGE_SHIFT": page_shift, "NUM_STEPS": 1, "BLOCK_BS": dm._BLOCK_BS, "BLOCK_COLS": block_cols,
               "num_warps": num_warps}
    cases = {
        ("tiny_kernel", "plain"): lambda: _tiny_kernel[(1,)](x, 64, BLOCK=64),
        ("tiny_kernel", "fast"): lambda: launch(_tiny_kernel, (1,), x, 64, BLOCK=64),
        ("decode_metadata_kernel", "plain"): lambda: kernel[meta_args[0]](*meta_args[1:], **meta_kw),
        ("decode_metadata_kernel", "fast"): lambda: launch(kernel, *meta_args, **meta_kw),
        ("torch_add_", "torch"): lambda: x.add_(1),
    }
    for (what, path), fn in cases.items():
        us = wall_us(fn) if smoke else host_us_per_call(fn, calls=1000)
        rows.append({"kernel": what, "launch": path, "host_us_per_call": round(us, 2)})
        print(f"launch  {what:24s} {path:6s} {us:7.2f} us/call", flush=True)


def bench_decode(rows, sglang_fn, smoke=False):
    points = grid(smoke)
    for page_size in points["page_sizes"]:
        for bs in points["batches"]:
            b = make_batch(bs, page_size, points["max_context"], device="cpu" if smoke else "cuda", seed=bs)
            fns = providers(b, sglang_fn)
            check_agreement(b, fns)
            for name, fn in fns.items():
                row = {"bs": bs, "page_size": page_size, "max_context": points["max_context"], "provider": name}
                if smoke:
                    row.update(eager_us=round(wall_us(fn), 2), graph_us="", host_us_per_call="")
                else:
                    row.update(eager_us=round(eager_us(fn), 2),
                               graph_us=round(graph_us(fn), 2) if name != "attnplug_plain_launch" else "",
                               host_us_per_call=round(host_us_per_call(fn, calls=500), 2))
                rows.append(row)
                print(f"decode bs={bs:3d} page={page_size:2d} {name:24s} eager {row['eager_us']:8.2f}  "
                      f"graph {row['graph_us']!s:>8}  host {row['host_us_per_call']!s:>8}", flush=True)


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    names = ["torch_unfused", "sglang_fused", "sglang_fused_zero_tail", "attnplug"]
    for col, page_size in enumerate(PAGE_SIZES):
        for r, metric in enumerate(["eager_us", "graph_us"]):
            ax = axes[r][col]
            for name in names:
                pts = [(row["bs"], row[metric]) for row in rows
                       if row["provider"] == name and row["page_size"] == page_size and row[metric] != ""]
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("batch size")
            ax.set_ylabel(f"{metric.replace('_us', '')} time per call (us)")
            ax.set_title(f"page {page_size}, context {MAX_CONTEXT}: {metric.replace('_us', '')}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    env = environment()
    fig.suptitle(f"decode metadata update ({env['device']}, torch {env['torch']}, triton {env['triton']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=out_dir())
    parser.add_argument("--sections", default="launch,decode")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (Triton interpreter)")
    args = parser.parse_args(argv)
    sections = args.sections.split(",")
    print(environment(), flush=True)
    if "launch" in sections:
        rows = []
        bench_launch(rows, args.smoke)
        write_csv(os.path.join(args.out, "launch_overhead.csv"), rows)
    if "decode" in sections:
        rows = []
        bench_decode(rows, load_sglang_normal_decode_set_metadata(), args.smoke)
        write_csv(os.path.join(args.out, "decode_metadata.csv"), rows)
        if not args.smoke:
            plot(rows, os.path.join(args.out, "decode_metadata.png"))


if __name__ == "__main__":
    main()
