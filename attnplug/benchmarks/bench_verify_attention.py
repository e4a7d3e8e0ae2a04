"""Speculative-decoding verify attention: attnplug's split-KV verify path vs vLLM's stock kernels.

A verify step gives each request ``q_len = 1 + k`` query tokens (k draft tokens) over the same KV
a decode reads. Llama-3-8B head layout (32 q heads, 8 kv heads, head 128, page 16), bf16, vLLM's
KV layout with randomly permuted pages (``bench_paged_attention.KVPool``); ``--layout sglang
--page-size 1|16`` runs the same points on SGLang's token pool (separate ``[num_tokens, kv_heads,
head]`` K and V buffers viewed as pages), as the ``attnplug`` SGLang backend reads it.

Providers, side by side at every point:
  attnplug         ``plan_attention(..., max_decode_query_len=q_len)``: verify rows as decodes
  attnplug_decode  attnplug's own q_len-1 decode at the same bs and ctx (same KV bytes)
  before           attnplug before verify support (``--before DIR``: a copy of the old
                   ``attnplug.core.attention``), which ran q_len > 1 as prefills; optional
  vllm_0_33        vLLM 0.33.0's ``unified_attention`` with its backend's rule: split-K (16
                   segments) when ``q_len <= 8`` and ``num_seqs * cdiv(q_len, BLOCK_Q) <=
                   128 // num_kv_heads``, scratch rows per query token
  vllm_0_32        vLLM 0.32.0's: split-K only for ``q_len == 1`` and ``num_seqs <= 16``

Sections: ``grid`` (q_len x bs x ctx), ``ragged`` (verify lengths after rejections), ``mixed``
(verify + 4 x 512 prefills). Times: "graph" = ``do_bench_cudagraph`` median GPU time; "eager" =
wall time per call of back-to-back eager calls. ``--smoke`` runs a few tiny points on the CPU
(Triton interpreter, wall time only) so that the script is exercised by ``make test``.

    python -m attnplug.benchmarks.bench_verify_attention [--quick] [--before DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import importlib
import os
import random
import sys

import torch
import triton


from attnplug.core.attention import AttentionWorkspace, paged_attention, plan_attention
from attnplug.benchmarks.common import back_to_back_us, cudagraph_us, out_dir, wall_us, write_csv
from attnplug.benchmarks.peers import Heads, vllm_peers

QUERY_LENS = [1, 2, 4, 8]
BATCHES = [1, 4, 8, 16, 32, 64]
CONTEXTS = [1024, 4096, 16384, 32768]
FIELDS = ["section", "impl", "q_len", "bs", "ctx", "graph_us", "eager_us", "tbps", "x_vs_vllm_0_33",
          "x_vs_own_decode", "max_abs_diff", "case"]


def log(*args):
    print(*args, flush=True)


class Shape:
    """Head layout, dtype and device of one run (Llama-3-8B on the GPU, tiny for the CPU smoke run)."""

    def __init__(self, smoke: bool, layout: str = "vllm", page_size: int = 16):
        self.smoke, self.layout, self.page_size = smoke, layout, page_size
        self.num_q_heads, self.num_kv_heads, self.head_size = (8, 2, 32) if smoke else (32, 8, 128)
        self.dtype = torch.float32 if smoke else torch.bfloat16
        self.device = torch.device("cpu" if smoke else "cuda")
        self.scale = self.head_size ** -0.5

    def kv_bytes(self, seq_lens) -> int:
        return sum(seq_lens) * self.num_kv_heads * self.head_size * 2 * self.dtype.itemsize


class Pool:
    """One KV cache for the largest point, pages permuted: vLLM's ``[num_blocks, 2, page, kv_heads, head]``
    or SGLang's token pool (K and V ``[num_tokens, kv_heads, head]`` each, viewed as pages)."""

    def __init__(self, shape: Shape, num_tokens: int):
        self.shape = shape
        self.num_pages = triton.cdiv(num_tokens, shape.page_size)
        if shape.layout == "vllm":
            kv = torch.randn(self.num_pages, 2, shape.page_size, shape.num_kv_heads, shape.head_size,
                             device=shape.device).to(shape.dtype)
            self.k, self.v = kv[:, 0], kv[:, 1]
        else:
            k_buffer, v_buffer = (torch.randn(self.num_pages * shape.page_size, shape.num_kv_heads, shape.head_size,
                                              device=shape.device).to(shape.dtype) for _ in range(2))
            self.k, self.v = (buffer.unflatten(0, (self.num_pages, shape.page_size)) for buffer in (k_buffer, v_buffer))
        self.perm = torch.randperm(self.num_pages, device=shape.device).to(torch.int32)

    def batch(self, query_lens, seq_lens):
        s = self.shape
        max_pages = max(triton.cdiv(n, s.page_size) for n in seq_lens)
        assert len(seq_lens) * max_pages <= self.num_pages
        block_table = self.perm[: len(seq_lens) * max_pages].view(len(seq_lens), max_pages).contiguous()
        qsl = [0]
        for n in query_lens:
            qsl.append(qsl[-1] + n)
        q = torch.randn(qsl[-1], s.num_q_heads, s.head_size, device=s.device).to(s.dtype)
        return dict(q=q, out=torch.empty_like(q), block_table=block_table, query_lens=list(query_lens),
                    query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=s.device),
                    seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=s.device),
                    max_seqlen_q=max(query_lens), max_seqlen_k=max(seq_lens))


def attnplug_call(attention, workspace, pool, b, num_decodes, max_decode_query_len):
    """One layer's call of ``attention`` (a module with plan_attention / paged_attention) on batch ``b``."""
    s = pool.shape
    kwargs = dict(max_decode_query_len=max_decode_query_len) if max_decode_query_len else {}
    plan = attention.plan_attention(b["query_start_loc"], b["seq_lens"], num_decodes=num_decodes,
                                    num_q_heads=s.num_q_heads, num_kv_heads=s.num_kv_heads, head_size=s.head_size,
                                    page_size=s.page_size, max_seqlen_q=b["max_seqlen_q"],
                                    max_seqlen_k=b["max_seqlen_k"], workspace=workspace, **kwargs)
    return lambda: attention.paged_attention(b["q"], pool.k, pool.v, b["block_table"], plan, b["out"],
                                             softmax_scale=s.scale)


class Timer:
    """Graph + eager time on the GPU; wall time of one call under the interpreter (smoke run)."""

    def __init__(self, smoke: bool):
        self.smoke = smoke

    def __call__(self, fn):
        if self.smoke:
            return None, wall_us(fn)
        g = cudagraph_us(fn, rep=20)
        return g, back_to_back_us(fn, g)


def measure(timer, pool, b, providers, rows, **key):
    """Times every provider on batch ``b``; appends one row each (speed-ups vs vLLM 0.33 and own decode)."""
    results, reference = {}, None
    for impl, fn in providers:
        b["out"].fill_(float("nan"))  # a provider of another batch (own decode) leaves it so: no diff
        graph, eager = timer(fn)
        if reference is None:
            reference = b["out"].clone()
        writes_b = not torch.isnan(b["out"]).all().item()
        diff = (b["out"].float() - reference.float()).abs().max().item() if writes_b else None
        results[impl] = graph if graph is not None else eager
        rows.append(dict(key, impl=impl, graph_us=None if graph is None else round(graph, 2), eager_us=round(eager, 2),
                         tbps=None if graph is None else round(pool.shape.kv_bytes(b["seq_lens"].tolist()) / graph / 1e6, 3),
                         max_abs_diff=None if diff is None else f"{diff:.3g}"))
    mine = rows[-len(providers)]
    if "vllm_0_33" in results:
        mine["x_vs_vllm_0_33"] = round(results["vllm_0_33"] / results["attnplug"], 3)
    if "attnplug_decode" in results:
        mine["x_vs_own_decode"] = round(results["attnplug"] / results["attnplug_decode"], 3)
    log(f"{key}: " + " | ".join(f"{impl} {t:.1f}" for impl, t in results.items())
        + (f" | x{mine['x_vs_vllm_0_33']:.2f} vs 0.33" if "x_vs_vllm_0_33" in mine else "")
        + (f" | {mine['x_vs_own_decode']:.2f}x own decode" if "x_vs_own_decode" in mine else ""))
    return results


class Bench:
    def __init__(self, shape, pool, stock, before, max_query_len):
        self.shape, self.pool, self.stock, self.before = shape, pool, stock, before
        self.timer = Timer(shape.smoke)
        self.workspace = AttentionWorkspace.allocate(256, 8192, shape.num_q_heads, shape.head_size,
                                                     device=shape.device, max_decode_query_len=max_query_len)
        self.attnplug = sys.modules["attnplug.core.attention"]

    def providers(self, b, num_decodes, decode_batch=None):
        q_len = b["max_seqlen_q"] if num_decodes == len(b["query_lens"]) else max(b["query_lens"][:num_decodes])
        out = [("attnplug", attnplug_call(self.attnplug, self.workspace, self.pool, b, num_decodes, q_len))]
        if decode_batch is not None:
            out.append(("attnplug_decode", attnplug_call(self.attnplug, self.workspace, self.pool, decode_batch,
                                                         len(decode_batch["query_lens"]), 1)))
        if self.before is not None:  # before: only one-token sequences were decodes
            before_decodes = num_decodes if q_len == 1 else 0
            out.append(("before", attnplug_call(self.before, None, self.pool, b, before_decodes, None)))
        out += [(name, peer.call(self.pool.k, self.pool.v, b)) for name, peer in self.stock.items()]
        return out

    def grid(self, rows, query_lens, batches, contexts):
        for ctx in contexts:
            for bs in batches:
                decode = self.pool.batch([1] * bs, [ctx] * bs)
                for q_len in query_lens:
                    b = self.pool.batch([q_len] * bs, [ctx] * bs)
                    measure(self.timer, self.pool, b, self.providers(b, bs, decode if q_len > 1 else None), rows,
                            section="grid", q_len=q_len, bs=bs, ctx=ctx)

    def ragged(self, rows, cases):
        rng = random.Random(0)
        for bs, ctx, max_q in cases:
            query_lens = [rng.randint(1, max_q) for _ in range(bs)]
            seq_lens = [rng.randint(ctx // 2, ctx) for _ in range(bs)]
            b = self.pool.batch(query_lens, seq_lens)
            measure(self.timer, self.pool, b, self.providers(b, bs, self.pool.batch([1] * bs, seq_lens)), rows,
                    section="ragged", q_len=max_q, bs=bs, ctx=ctx, case="q_len 1..%d, ctx %d..%d" % (max_q, ctx // 2, ctx))

    def mixed(self, rows, cases, prefill_len, num_prefills=4):
        for bs, ctx, q_len in cases:
            b = self.pool.batch([q_len] * bs + [prefill_len] * num_prefills, [ctx] * bs + [prefill_len] * num_prefills)
            measure(self.timer, self.pool, b, self.providers(b, bs), rows, section="mixed", q_len=q_len, bs=bs, ctx=ctx,
                    case=f"{bs} verify x {q_len} + {num_prefills} x {prefill_len} prefill")


def load_before(path):
    """The old ``attnplug.core.attention`` copied to ``path/attnplug_before_attention`` (a package)."""
    sys.path.insert(0, path)
    return importlib.import_module("attnplug_before_attention")


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = [r for r in rows if r["section"] == "grid" and r["graph_us"] is not None]
    contexts = sorted({r["ctx"] for r in grid})
    if not grid:
        return
    fig, axes = plt.subplots(1, len(contexts), figsize=(4.2 * len(contexts), 4), squeeze=False)
    for ax, ctx in zip(axes[0], contexts):
        for i, q_len in enumerate(sorted({r["q_len"] for r in grid})):
            for impl, style in (("attnplug", "-o"), ("vllm_0_33", "--x")):
                pts = sorted((r["bs"], r["graph_us"]) for r in grid
                             if r["ctx"] == ctx and r["q_len"] == q_len and r["impl"] == impl)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=f"C{i}", label=f"{impl} q_len {q_len}")
        ax.set(xscale="log", yscale="log", xlabel="batch size (sequences)", ylabel="graph time (us)",
               title=f"verify, ctx {ctx // 1024}k")
        ax.legend(fontsize=6)
    fig.suptitle(f"Speculative verify attention, {rows[0].get('device', '')} Llama-3-8B layout, bf16, CUDA graph")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=out_dir())
    parser.add_argument("--sections", default="grid,ragged,mixed")
    parser.add_argument("--quick", action="store_true", help="a subset of the grid")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (Triton interpreter)")
    parser.add_argument("--before", help="directory holding attnplug_before_attention (the old kernels)")
    parser.add_argument("--layout", choices=("vllm", "sglang"), default="vllm", help="KV cache layout")
    parser.add_argument("--page-size", type=int, default=16)
    args = parser.parse_args(argv)
    shape = Shape(args.smoke, args.layout, args.page_size)
    if args.smoke:
        query_lens, batches, contexts = [1, 3], [2], [80]
        ragged, mixed, prefill_len = [(3, 80, 4)], [(2, 80, 3)], 24
    else:
        query_lens = QUERY_LENS
        batches, contexts = (BATCHES, CONTEXTS)
        ragged = [(4, 16384, 4), (16, 16384, 4), (32, 4096, 8), (64, 32768, 4)]
        mixed, prefill_len = [(4, 4096, 4), (16, 16384, 4), (8, 16384, 8)], 512
        if args.quick:
            query_lens, batches, contexts, ragged, mixed = [1, 4, 8], [1, 32], [4096, 32768], ragged[1:2], mixed[:1]
    max_query_len = max(query_lens + [q for *_, q in ragged + mixed])
    os.makedirs(args.out, exist_ok=True)
    if args.layout == "vllm":
        heads = Heads(shape.num_q_heads, shape.num_kv_heads, shape.head_size, shape.device)
        stock = vllm_peers(heads, max_query_len)
    else:
        stock = {}
        log(f"vLLM: not compared on the {args.layout} layout (vLLM's kernels serve vLLM's cache)")
    before = load_before(args.before) if args.before else None
    tokens = max(max(batches) * max(contexts), max(b for b, *_ in ragged + mixed) * max(c for _, c, _ in ragged + mixed))
    pool = Pool(shape, tokens + 4 * prefill_len + 64 * shape.page_size)
    bench = Bench(shape, pool, stock, before, max_query_len)
    log(f"device {shape.device} ({torch.cuda.get_device_name() if not args.smoke else 'interpreter'}), "
        f"torch {torch.__version__}, triton {triton.__version__}; stock: {', '.join(stock) or 'none'}")
    rows = []
    name = "verify_attention" if args.layout == "vllm" else f"verify_attention_{args.layout}_page{args.page_size}"
    csv_path = os.path.join(args.out, f"{name}.csv")
    try:
        sections = args.sections.split(",")
        if "grid" in sections:
            bench.grid(rows, query_lens, batches, contexts)
        if "ragged" in sections:
            bench.ragged(rows, ragged)
        if "mixed" in sections:
            bench.mixed(rows, mixed, prefill_len)
    finally:
        write_csv(csv_path, rows, FIELDS)
        if not args.smoke:
            plot(rows, os.path.join(args.out, f"{name}.png"))
    log(f"wrote {csv_path}")
    return rows


if __name__ == "__main__":
    main()
