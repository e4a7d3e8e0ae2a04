"""Paged attention: attnplug's planned split launch vs the kernels a user could run instead.

Llama-3-8B head layout (32 q heads, 8 kv heads, head 128, page 16), bf16, vLLM's KV layout
``[num_blocks, 2, block_size, num_kv_heads, head_size]`` with randomly permuted pages (page 0 never
used: vLLM's null block). Peers (:mod:`.peers`), side by side at every point they can run:

  vllm_0_33 / vllm_0_32  vLLM's ``unified_attention`` per release (installed or fetched), its backend's
                         3D rule and scratch
  sglang_0_5             SGLang 0.5.23's Triton decode on its token pool (a flat copy of the same
                         pages): decode points only (its prefill path is another kernel)
  flex_attention         torch FlexAttention over the paged cache, block mask as vLLM 0.33's
                         FLEX_ATTENTION backend builds it (decode and mixed)
  sdpa_dense             torch SDPA on the same KV gathered dense and contiguous: decode points only
                         (uniform lengths), what paging costs

Sections (``--sections``):
  read     the bandwidth reference: a streaming read of exactly the bytes each decode point reads
           (launch options tuned once, at 1 GiB); decode rows report their share of it
  sweep    decode tile rules x segments per sequence over the decode grid (graph time), to fit the
           plan's tile rule and split-KV heuristic
  decode   decode-only grid bs x ctx: CUDA-graph GPU time, eager time, achieved KV bandwidth
  mixed    4 prefills x 512 tokens + {1, 4, 16} decodes at ctx 4k / 16k
  host     host time per eager call (500 back-to-back calls, no sync inside the loop)

Times: "graph" = ``triton.testing.do_bench_cudagraph`` median (GPU time, no launch overhead);
"eager" = wall time per call of 20-200 back-to-back eager calls after a sync (what an eagerly run
layer costs: the larger of host and GPU time). Each peer's row carries ``attnplug_x`` = its graph
time / attnplug's (> 1: attnplug is faster) and ``max_abs_diff`` against attnplug's output.

``--smoke``: the decode, mixed and host sections on tiny shapes on the CPU (Triton interpreter, fp32,
wall time of one call instead of graph / eager / host times; FlexAttention eager), outputs compared,
CSV written.
"""

from __future__ import annotations

import argparse
import itertools
import os

import torch
import triton
import triton.language as tl

from attnplug.benchmarks import peers
from attnplug.benchmarks.common import back_to_back_us, cudagraph_us, issue_us, out_dir, wall_us, write_csv
from attnplug.core.attention import AttentionWorkspace, paged_attention, plan_attention
from attnplug.core.attention import plan as plan_module

NUM_Q_HEADS, NUM_KV_HEADS, HEAD_SIZE, PAGE_SIZE = 32, 8, 128, 16
DTYPE = torch.bfloat16
SCALE = HEAD_SIZE ** -0.5
DECODE_BATCHES = [1, 4, 8, 12, 16, 24, 32, 64, 128]
CONTEXTS = [1024, 4096, 16384, 32768]
QUICK = dict(batches=[1, 4, 32], contexts=[1024, 4096, 32768],
             mixed=dict(contexts=(4096,), decodes=(4, 16), prefill_len=512, num_prefills=4))
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
READ_TUNING_BYTES = 1 << 30


def use_smoke_shapes():
    """Switch this module (and bench_decode_step, which reads its constants) to the CPU smoke run's shapes."""
    global NUM_Q_HEADS, NUM_KV_HEADS, HEAD_SIZE, DTYPE, SCALE, DEVICE
    (NUM_Q_HEADS, NUM_KV_HEADS, HEAD_SIZE), DTYPE = SMOKE["heads"], SMOKE["dtype"]
    SCALE = HEAD_SIZE ** -0.5
    DEVICE = torch.device("cpu")


def heads() -> peers.Heads:
    return peers.Heads(NUM_Q_HEADS, NUM_KV_HEADS, HEAD_SIZE, DEVICE)


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


# ----------------------------------------------------------------------------- data
class KVPool:
    """One vLLM-layout KV cache big enough for the largest point, reused by every batch (page 0 unused)."""

    def __init__(self, num_tokens: int):
        self.num_pages = triton.cdiv(num_tokens, PAGE_SIZE) + 1
        kv = torch.empty(self.num_pages, 2, PAGE_SIZE, NUM_KV_HEADS, HEAD_SIZE, dtype=DTYPE, device=DEVICE)
        kv.normal_()
        self.k, self.v = kv[:, 0], kv[:, 1]
        self.perm = (torch.randperm(self.num_pages - 1, device=DEVICE) + 1).to(torch.int32)

    def tokens(self):
        """(k, v) ``[num_pages * page, kv_heads, head]`` each: the same pages flat, as SGLang's token pool
        reads them (slot = page * page_size + i)."""
        return tuple(x.flatten(0, 1).clone() for x in (self.k, self.v))

    def batch(self, query_lens, seq_lens):
        num_seqs = len(seq_lens)
        max_pages = max(triton.cdiv(s, PAGE_SIZE) for s in seq_lens)
        assert num_seqs * max_pages <= self.perm.numel()
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


def hand_split(vllm, pool, b, num_decodes, decode_ctx, prefill_len):
    """Decodes and prefills in two calls of vLLM's kernel (the split vLLM PR 29020 makes)."""
    n = num_decodes
    qsl_prefill = (b["query_start_loc"][n:] - n).contiguous()
    q_d, q_p, o_d, o_p = b["q"][:n], b["q"][n:], b["out"][:n], b["out"][n:]
    qsl_d, lens_d, lens_p = b["query_start_loc"][: n + 1], b["seq_lens"][:n], b["seq_lens"][n:]
    bt_d, bt_p = b["block_table"][:n], b["block_table"][n:]

    def fn():
        vllm.launch(pool.k, pool.v, q_d, o_d, qsl_d, 1, lens_d, decode_ctx, bt_d)
        vllm.launch(pool.k, pool.v, q_p, o_p, qsl_prefill, prefill_len, lens_p, prefill_len, bt_p)

    return fn


class Peers:
    """The peers found on this machine, each asked for a callable per batch; a peer that refuses a batch
    (``ValueError``) is logged and left out of that point."""

    def __init__(self, pool: KVPool, names: list[str]):
        self.pool = pool
        self.vllm = peers.vllm_peers(heads()) if "vllm" in names else {}
        self.sglang = peers.sglang_peer(heads(), *pool.tokens(), PAGE_SIZE) if "sglang" in names else None
        self.flex = peers.FlexPaged(heads(), PAGE_SIZE) if "flex" in names else None
        self.sdpa = peers.SdpaDense(heads()) if "sdpa" in names else None

    @staticmethod
    def _built(makers) -> list:
        out = []
        for name, make in makers:
            try:
                out.append((name, make()))
            except ValueError as exc:
                log(f"[skip] {name}: {exc}")
        return out

    def decode(self, b):
        k, v = self.pool.k, self.pool.v
        makers = [(name, lambda vllm=vllm: vllm.call(k, v, b)) for name, vllm in self.vllm.items()]
        if self.sglang:
            makers.append((self.sglang.name, lambda: self.sglang.call(b)))
        if self.flex:
            makers.append((self.flex.name, lambda: self.flex.call(k, v, b)))
        if self.sdpa:
            makers.append((self.sdpa.name, lambda: self.sdpa.call(k, v, b)))
        return self._built(makers)

    def mixed(self, b, num_decodes, decode_ctx, prefill_len):
        k, v = self.pool.k, self.pool.v
        makers = [(name, lambda vllm=vllm: vllm.call(k, v, b)) for name, vllm in self.vllm.items()]
        if self.vllm:
            name, newest = list(self.vllm.items())[-1]
            makers.append((f"{name}_hand_split",
                           lambda: hand_split(newest, self.pool, b, num_decodes, decode_ctx, prefill_len)))
        if self.flex:
            makers.append((self.flex.name, lambda: self.flex.call(k, v, b)))
        return self._built(makers)


def kv_bytes(seq_lens) -> int:
    return sum(seq_lens) * NUM_KV_HEADS * HEAD_SIZE * 2 * DTYPE.itemsize


# ----------------------------------------------------------------------------- bandwidth reference
@triton.jit
def _stream_read_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    """Reads x[pid * BLOCK * ITERS :][: BLOCK * ITERS] and stores its sum: a pure streaming read."""
    base = tl.program_id(0).to(tl.int64) * BLOCK * ITERS
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(ITERS):
        offs = base + i * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(out_ptr + tl.program_id(0), tl.sum(acc, axis=0))


class ReadCeiling:
    """Graph time of a streaming read of ``nbytes`` (bf16, contiguous), best of the launch options that
    were fastest at 1 GiB: what any kernel reading that many bytes could reach (launch, ramp and tail
    included; the decode kernel also gathers pages and does the attention math)."""

    OPTIONS = list(itertools.product((2048, 4096, 8192), (1, 2, 4, 8, 16), (4, 8)))  # BLOCK, ITERS, warps
    QUICK_OPTIONS = list(itertools.product((2048, 8192), (1, 8), (8,)))

    def __init__(self, rows, quick: bool = False):
        self.rows, self.cache = rows, {}
        options = self.QUICK_OPTIONS if quick else self.OPTIONS
        timings = sorted((self._time(READ_TUNING_BYTES, option), option) for option in options)
        self.best = [option for _, option in timings[:4]]
        t, (block, iters, warps) = timings[0]
        log(f"streaming read 1 GiB: {t:.1f} us, {READ_TUNING_BYTES / t / 1e6:.3f} TB/s "
            f"(BLOCK {block}, ITERS {iters}, warps {warps}; kept the 4 best options)")

    @staticmethod
    def _time(nbytes, option):
        block, iters, warps = option
        x = torch.empty(nbytes // DTYPE.itemsize, dtype=DTYPE, device=DEVICE).normal_()
        programs = triton.cdiv(x.numel(), block * iters)
        out = torch.empty(programs, dtype=torch.float32, device=DEVICE)
        return cudagraph_us(lambda: _stream_read_kernel[(programs,)](x, out, x.numel(), BLOCK=block, ITERS=iters,
                                                                 num_warps=warps), rep=10)

    def tbps(self, nbytes: int) -> float:
        if nbytes not in self.cache:
            t = min(self._time(nbytes, option) for option in self.best)
            self.cache[nbytes] = nbytes / t / 1e6
            self.rows.append(dict(section="read", impl="stream_read", graph_us=round(t, 2),
                                  tbps=round(self.cache[nbytes], 3), case=f"{nbytes} bytes"))
        return self.cache[nbytes]


SWEEP_TILES = {  # name -> (DECODE_TILE_N, MIN_SEGMENT_TILES, DECODE_NUM_WARPS, DECODE_NUM_STAGES)
    "t32m8": (32, 8, 4, 3),
    "t64m4": (64, 4, 4, 3),
    "t32m4": (32, 4, 4, 3),
    # only with --sweep-rules (the ctx 4k follow-up): pipeline depth and warps
    "t64m2s2": (64, 2, 4, 2),
    "t64m2s3": (64, 2, 4, 3),
    "t64m2s4": (64, 2, 4, 4),
    "t64m2s5": (64, 2, 4, 5),
    "t64m2s6": (64, 2, 4, 6),
    "t64m2w8": (64, 2, 8, 3),
    "t32m4s4": (32, 4, 4, 4),
    "t128m1s2": (128, 1, 8, 2),
    "t128m1s3": (128, 1, 8, 3),
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


def run_providers(b, providers, rows, **key):
    """Times attnplug (first) and every peer on batch ``b``; one row each, peers compared with attnplug.

    A peer that fails at a point (a compile error, out of memory) is logged and skipped there."""
    results, reference = {}, None
    for impl, fn in providers:
        b["out"].fill_(float("nan"))
        try:
            graph, eager = timed(fn)
        except Exception as exc:  # noqa: BLE001 - a peer's failure is a result, not the end of the run
            log(f"[skip] {impl} at {key}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            continue
        row = dict(key, impl=impl, graph_us=None if graph is None else round(graph, 2), eager_us=round(eager, 2))
        if reference is None:
            reference = b["out"].clone()
        else:
            row["max_abs_diff"] = f"{(b['out'].float() - reference.float()).abs().max().item():.3g}"
        results[impl] = graph if graph is not None else eager
        row["attnplug_x"] = round(results[impl] / results["attnplug"], 3)
        rows.append(row)
    return results


def section_decode(pool, found, ceiling, rows, batches, contexts):
    for ctx in contexts:
        for bs in batches:
            b = pool.batch([1] * bs, [ctx] * bs)
            fn, plan = ours(pool, b, bs)
            nbytes = kv_bytes([ctx] * bs)
            reference_tbps = ceiling.tbps(nbytes) if ceiling else None  # its row first
            first = len(rows)
            results = run_providers(b, [("attnplug", fn)] + found.decode(b), rows, section="decode", bs=bs, ctx=ctx)
            for row in rows[first:]:
                if row["graph_us"] is not None:
                    row["tbps"] = round(nbytes / row["graph_us"] / 1e6, 3)
                    if reference_tbps:
                        row["read_share"] = round(row["tbps"] / reference_tbps, 3)
            rows[first]["segments"] = plan.num_segments
            mine = rows[first]
            log(f"decode bs={bs:4d} ctx={ctx:6d} S={plan.num_segments:3d}: attnplug {results['attnplug']:8.1f} us"
                + (f" ({mine['tbps']:.2f} TB/s, {mine.get('read_share', 0):.0%} of read)" if mine.get("tbps") else "")
                + "".join(f" | {r['impl']} {results[r['impl']]:.1f} (x{r['attnplug_x']:.2f}, diff {r['max_abs_diff']})"
                          for r in rows[first + 1:]))


def section_mixed(pool, found, rows, contexts, decodes, prefill_len, num_prefills):
    for ctx in contexts:
        for nd in decodes:
            query_lens = [1] * nd + [prefill_len] * num_prefills
            seq_lens = [ctx] * nd + [prefill_len] * num_prefills
            b = pool.batch(query_lens, seq_lens)
            fn, plan = ours(pool, b, nd)
            first = len(rows)
            results = run_providers(b, [("attnplug", fn)] + found.mixed(b, nd, ctx, prefill_len), rows,
                                    section="mixed", bs=nd, ctx=ctx, num_prefills=num_prefills, prefill_len=prefill_len)
            rows[first]["segments"] = plan.num_segments
            log(f"mixed {num_prefills}x{prefill_len} + {nd} decodes @ {ctx}: attnplug {results['attnplug']:.1f} us"
                + "".join(f" | {r['impl']} {results[r['impl']]:.1f} (x{r['attnplug_x']:.2f}, diff {r['max_abs_diff']})"
                          for r in rows[first + 1:]))


def section_host(pool, found, rows, cases):
    for name, (query_lens, seq_lens, nd) in cases.items():
        b = pool.batch(query_lens, seq_lens)
        fn, _ = ours(pool, b, nd)
        vllm = [(impl, peer.call(pool.k, pool.v, b)) for impl, peer in found.vllm.items()]
        for impl, f in [("attnplug", fn)] + vllm:
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
        "check_inputs": lambda: paged_module._check_inputs(
            b["q"], k, v, b["block_table"], plan, b["out"], None,
            tuple(x.stride() for x in (b["q"], b["out"], k, v, b["block_table"]))),
        "paged_attention (decode + reduce)": fn,
        "plan_attention": lambda: ours(pool, b, 4),
    }
    for name, f in parts.items():
        log(f"hostprof {name}: {issue_us(f, calls=300):.1f} us")
    for launcher in (paged_module._launch_decode, paged_module._launch_reduce, paged_module._launch_prefill):
        log(f"hostprof fast launcher {launcher.kernel.fn.__name__}: enabled={launcher._enabled} "
            f"cached={len(launcher._entries)}")


CSV_FIELDS = ["section", "impl", "bs", "ctx", "num_prefills", "prefill_len", "segments", "graph_us", "eager_us",
              "tbps", "read_share", "attnplug_x", "host_us", "max_abs_diff", "case"]


def plot(rows, path):
    """Decode: KV bandwidth per provider against batch size (and the read reference), one panel per context."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    decode = [r for r in rows if r["section"] == "decode" and r.get("tbps")]
    if not decode:
        return
    contexts = sorted({r["ctx"] for r in decode})
    fig, axes = plt.subplots(1, len(contexts), figsize=(4.3 * len(contexts), 4), squeeze=False, sharey=True)
    impls = list(dict.fromkeys(r["impl"] for r in decode))
    for ax, ctx in zip(axes[0], contexts):
        for i, impl in enumerate(impls):
            pts = sorted((r["bs"], r["tbps"]) for r in decode if r["ctx"] == ctx and r["impl"] == impl)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o" if impl == "attnplug" else "--x", color=f"C{i}",
                    label=impl, lw=2 if impl == "attnplug" else 1)
        read = sorted((r["bs"], r["tbps"] / r["read_share"]) for r in decode
                      if r["ctx"] == ctx and r["impl"] == "attnplug" and r.get("read_share"))
        if read:
            ax.plot([p[0] for p in read], [p[1] for p in read], ":", color="gray", label="streaming read, same bytes")
        ax.set(xscale="log", xlabel="decode batch size", title=f"ctx {ctx // 1024}k")
    axes[0][0].set_ylabel("KV read bandwidth (TB/s, graph time)")
    axes[0][0].legend(fontsize=7)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    fig.suptitle(f"Paged decode attention, {device}, Llama-3-8B layout, bf16, CUDA graph")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    global WORKSPACE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="read,decode,mixed,host")
    parser.add_argument("--peers", default="vllm,sglang,flex,sdpa", help="peers to compare (comma list)")
    parser.add_argument("--out", default=out_dir())
    parser.add_argument("--quick", action="store_true", help="a subset of the decode grid")
    parser.add_argument("--contexts", default=",".join(map(str, CONTEXTS)), help="decode contexts to run")
    parser.add_argument("--batches", default=",".join(map(str, DECODE_BATCHES)), help="decode batches to run")
    parser.add_argument("--sweep-rules", default="t32m8,t64m4,t32m4", help="tile rules to sweep (SWEEP_TILES)")
    parser.add_argument("--smoke", action="store_true",
                        help="decode, mixed and host on tiny shapes on the CPU (Triton interpreter)")
    args = parser.parse_args(argv)
    sections = args.sections.split(",")
    batches, contexts = [int(b) for b in args.batches.split(",")], [int(c) for c in args.contexts.split(",")]
    mixed, host_cases = MIXED, HOST_CASES
    if args.quick:
        batches, contexts, mixed = QUICK["batches"], QUICK["contexts"], QUICK["mixed"]
    if args.smoke:
        use_smoke_shapes()
        sections = [s for s in sections if s in ("decode", "mixed", "host")]
        batches, contexts, mixed, host_cases = SMOKE["batches"], SMOKE["contexts"], SMOKE["mixed"], SMOKE["host_cases"]
    os.makedirs(args.out, exist_ok=True)
    log(f"device {'interpreter' if args.smoke else torch.cuda.get_device_name()}, torch {torch.__version__}, "
        f"triton {triton.__version__}")
    rows = []
    ceiling = ReadCeiling(rows, args.quick) if "read" in sections else None
    pool = KVPool(max(batches) * max(contexts) + 64 * PAGE_SIZE)
    WORKSPACE = AttentionWorkspace.allocate(256, 8192, NUM_Q_HEADS, HEAD_SIZE, device=DEVICE)
    found = Peers(pool, args.peers.split(","))
    csv_path = os.path.join(args.out, "paged_attention.csv")
    try:
        if "sweep" in sections:
            sweep_rows = []
            try:
                section_sweep(pool, sweep_rows, batches, contexts, args.sweep_rules.split(","))
            finally:
                write_csv(os.path.join(args.out, "paged_attention_sweep.csv"), sweep_rows, CSV_FIELDS)
        if "decode" in sections:
            section_decode(pool, found, ceiling, rows, batches, contexts)
        if "mixed" in sections:
            section_mixed(pool, found, rows, **mixed)
        if "host" in sections:
            section_host(pool, found, rows, host_cases)
        if "hostprof" in sections:
            section_hostprof(pool)
    finally:
        write_csv(csv_path, rows, CSV_FIELDS)
        if not args.smoke:
            plot(rows, os.path.join(args.out, "paged_attention_decode.png"))
    log(f"wrote {csv_path}")


if __name__ == "__main__":
    main()
