"""FP8 KV cache: attnplug over an FP8 cache vs attnplug over bf16 vs vLLM 0.33's FP8 path, same batches.

Llama-3-8B head layout, vLLM's KV layout with permuted pages (``bench_paged_attention.KVPool``). The
FP8 cache is the bf16 pool quantized per tensor to e4m3 (scale = amax / 448, as a calibrated
checkpoint would give), so every provider reads the same values. Providers, side by side:

  attnplug        attnplug's kernels over the FP8 cache: bf16 queries, per-tensor k / v scales
  attnplug_bf16   attnplug over the bf16 pool (twice the bytes): what FP8 buys
  attnplug_fp8q   attnplug over the FP8 cache with FP8 queries (``q_scale``), as the vLLM adapters
                  get them when vLLM's query quantization stays on
  vllm_0_33       vLLM 0.33.0's ``unified_attention`` over the FP8 cache with bf16 queries and
                  ``k_descale`` / ``v_descale`` (``kv_quant_mode=FP8_PER_TENSOR``)
  vllm_0_33_fp8q  the same with the queries quantized to FP8 and ``q_descale``: how vLLM 0.33's
                  Attention layer feeds TRITON_ATTN on CUDA (query quantization itself not timed)

Sections (``--sections``): ``read`` (streaming read of each decode point's FP8 bytes, the bandwidth
reference), ``decode`` (bs x ctx), ``verify`` (q_len 4 x bs x ctx) and ``mixed`` (4 x 512 prefills
+ decodes); ``sweep`` (decode tile rules over both caches, not by default). Graph and eager times as in ``bench_paged_attention``; each attnplug row carries
``fp8_vs_bf16`` (its time / attnplug_bf16's), peer rows ``attnplug_x`` (their time / attnplug's).
``--smoke``: tiny shapes on the CPU (Triton interpreter, fp32 queries; the FP8-query peer, which
needs FP8 tensor cores, and attnplug's FP8-query variant left out).
"""

from __future__ import annotations

import argparse
import os

import torch
import triton

from attnplug.benchmarks import bench_paged_attention as pa
from attnplug.benchmarks.common import out_dir, write_csv
from attnplug.benchmarks.peers import vllm_peers
from attnplug.core.attention import AttentionWorkspace, paged_attention, plan_attention

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
BATCHES = [1, 4, 8, 16, 32, 64, 128]
CONTEXTS = [1024, 4096, 16384, 32768]
VERIFY = dict(q_len=4, batches=[1, 4, 16, 64], contexts=[4096, 32768])
MIXED = dict(contexts=(4096,), decodes=(4, 16), prefill_len=512, num_prefills=4)
QUICK = dict(batches=[4, 64], contexts=[4096, 32768], verify=dict(VERIFY, batches=[4, 16], contexts=[4096]))
SMOKE = dict(batches=[1, 3], contexts=[40], verify=dict(q_len=3, batches=[2], contexts=[40]),
             mixed=dict(contexts=(40,), decodes=(2,), prefill_len=20, num_prefills=2))
FIELDS = ["section", "impl", "q_len", "bs", "ctx", "num_prefills", "prefill_len", "segments", "graph_us", "eager_us",
          "tbps", "read_share", "fp8_vs_bf16", "attnplug_x", "max_abs_diff", "case"]
log = pa.log


class Fp8Pool:
    """The bf16 pool and its per-tensor FP8 copy (same page layout), with the scales as device scalars."""

    def __init__(self, pool: pa.KVPool):
        self.bf16 = pool
        self.k_scale, self.v_scale = (x.abs().amax().float().reshape(1) / FP8_MAX for x in (pool.k, pool.v))
        self.k, self.v = ((x / scale).to(FP8) for x, scale in ((pool.k, self.k_scale), (pool.v, self.v_scale)))
        self.q_scale = None  # per batch, from its queries

    def kv_bytes(self, seq_lens) -> int:
        return sum(seq_lens) * pa.NUM_KV_HEADS * pa.HEAD_SIZE * 2 * FP8.itemsize


WORKSPACE = None


def attnplug(k, v, b, num_decodes, q_len, scales, q_scale=None):
    """attnplug's planned call on cache k / v (``scales``: (k_scale, v_scale) for FP8, else (None, None);
    ``q_scale`` for FP8 queries)."""
    plan = plan_attention(b["query_start_loc"], b["seq_lens"], num_decodes=num_decodes, num_q_heads=pa.NUM_Q_HEADS,
                          num_kv_heads=pa.NUM_KV_HEADS, head_size=pa.HEAD_SIZE, page_size=pa.PAGE_SIZE,
                          max_seqlen_q=b["max_seqlen_q"], max_seqlen_k=b["max_seqlen_k"],
                          max_decode_query_len=q_len, workspace=WORKSPACE)

    def fn():
        paged_attention(b["q"], k, v, b["block_table"], plan, b["out"], softmax_scale=pa.SCALE, q_scale=q_scale,
                        k_scale=scales[0], v_scale=scales[1])

    return fn, plan


def providers(pools: Fp8Pool, vllm, b, num_decodes, q_len, fp8_queries: bool):
    ours, plan = attnplug(pools.k, pools.v, b, num_decodes, q_len, (pools.k_scale, pools.v_scale))
    found = [("attnplug", ours), ("attnplug_bf16", attnplug(pools.bf16.k, pools.bf16.v, b, num_decodes, q_len,
                                                              (None, None))[0])]
    q_scale = b["q"].abs().amax().float().reshape(1) / FP8_MAX
    b_fp8 = dict(b, q=(b["q"] / q_scale).to(FP8))
    if fp8_queries:
        found.append(("attnplug_fp8q", attnplug(pools.k, pools.v, b_fp8, num_decodes, q_len,
                                                (pools.k_scale, pools.v_scale), q_scale)[0]))
    for name, peer in vllm.items():
        found.append((name, peer.call(pools.k, pools.v, b, (None, pools.k_scale, pools.v_scale))))
        if fp8_queries:
            found.append((f"{name}_fp8q", peer.call(pools.k, pools.v, b_fp8, (q_scale, pools.k_scale, pools.v_scale))))
    return found, plan


def run_point(pools, vllm, ceiling, rows, query_lens, seq_lens, num_decodes, decode_query_len, fp8_queries, **key):
    b = pools.bf16.batch(query_lens, seq_lens)
    found, plan = providers(pools, vllm, b, num_decodes, decode_query_len, fp8_queries)
    decode_only = num_decodes == len(seq_lens)
    nbytes = pools.kv_bytes(seq_lens)
    reference_tbps = ceiling.tbps(nbytes) if ceiling and decode_only else None
    first = len(rows)
    results = pa.run_providers(b, found, rows, **key)
    mine = rows[first]
    mine["segments"] = plan.num_segments
    if "attnplug_bf16" in results and mine["graph_us"] is not None:
        mine["fp8_vs_bf16"] = round(results["attnplug"] / results["attnplug_bf16"], 3)
    for row in rows[first:]:
        if decode_only and row["graph_us"] is not None:
            row["tbps"] = round(nbytes * (2 if row["impl"] == "attnplug_bf16" else 1) / row["graph_us"] / 1e6, 3)
            if reference_tbps:
                row["read_share"] = round(row["tbps"] / reference_tbps, 3)
    log(f"{key}: attnplug {results['attnplug']:.1f} us"
        + (f" ({mine['tbps']:.2f} TB/s, {mine.get('read_share', 0):.0%} of read)" if mine.get("tbps") else "")
        + (f", x{mine['fp8_vs_bf16']:.2f} of bf16" if mine.get("fp8_vs_bf16") else "")
        + "".join(f" | {r['impl']} {results[r['impl']]:.1f} (x{r['attnplug_x']:.2f}, diff {r.get('max_abs_diff')})"
                  for r in rows[first + 1:]))


SWEEP = dict(rules=["t64m2s3", "t64m2s4", "t64m2s5", "t64m2s6", "t64m2w8", "t128m1s2", "t128m1s3"],
             batches=[4, 32, 128], contexts=[4096, 32768])


def section_sweep(pools, rows):
    """Decode tile rules (``bench_paged_attention.SWEEP_TILES``, default split policy) over the FP8 cache
    and the bf16 pool: whether FP8 tiles (half the bytes each) want another rule (graph time). A rule's
    stage count applies to both caches."""
    from attnplug.core.attention import plan as plan_module

    rule_attrs = (*pa.TILE_RULE, "FP8_DECODE_NUM_STAGES")
    saved = [getattr(plan_module, name) for name in rule_attrs]
    try:
        for name in SWEEP["rules"]:
            rule = pa.SWEEP_TILES[name]
            for attr, value in zip(rule_attrs, (*rule, rule[-1])):
                setattr(plan_module, attr, value)
            for ctx in SWEEP["contexts"]:
                for bs in SWEEP["batches"]:
                    b = pools.bf16.batch([1] * bs, [ctx] * bs)
                    for impl, (k, v, scales) in (("attnplug", (pools.k, pools.v, (pools.k_scale, pools.v_scale))),
                                                 ("attnplug_bf16", (pools.bf16.k, pools.bf16.v, (None, None)))):
                        fn, plan = attnplug(k, v, b, bs, 1, scales)
                        t = pa.cudagraph_us(fn, rep=20)
                        rows.append(dict(section="sweep", impl=impl, q_len=1, bs=bs, ctx=ctx, segments=plan.num_segments,
                                         graph_us=round(t, 2), case=name))
                        log(f"sweep {name} {impl} bs={bs} ctx={ctx} S={plan.num_segments}: {t:.1f} us")
    finally:
        for attr, value in zip(rule_attrs, saved):
            setattr(plan_module, attr, value)


def main(argv=None):
    global WORKSPACE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="read,decode,verify,mixed")
    parser.add_argument("--out", default=out_dir())
    parser.add_argument("--quick", action="store_true", help="a few points of each section")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (Triton interpreter)")
    args = parser.parse_args(argv)
    sections = args.sections.split(",")
    batches, contexts, verify, mixed = BATCHES, CONTEXTS, VERIFY, MIXED
    if args.quick:
        batches, contexts, verify = QUICK["batches"], QUICK["contexts"], QUICK["verify"]
    if args.smoke:
        pa.use_smoke_shapes()
        sections = [s for s in sections if s != "read"]
        batches, contexts, verify, mixed = SMOKE["batches"], SMOKE["contexts"], SMOKE["verify"], SMOKE["mixed"]
    os.makedirs(args.out, exist_ok=True)
    log(f"device {'interpreter' if args.smoke else torch.cuda.get_device_name()}, torch {torch.__version__}, "
        f"triton {triton.__version__}")
    rows = []
    ceiling = pa.ReadCeiling(rows, args.quick) if "read" in sections else None
    largest = max(max(batches) * max(contexts), max(verify["batches"]) * max(verify["contexts"]))
    pools = Fp8Pool(pa.KVPool(largest + 64 * pa.PAGE_SIZE))
    WORKSPACE = AttentionWorkspace.allocate(256, 8192, pa.NUM_Q_HEADS, pa.HEAD_SIZE, device=pa.DEVICE,
                                            max_decode_query_len=verify["q_len"])
    vllm = {name: peer for name, peer in vllm_peers(pa.heads(), verify["q_len"]).items() if name == "vllm_0_33"}
    fp8_queries = not args.smoke
    csv_path = os.path.join(args.out, "fp8_attention.csv")
    try:
        if "sweep" in sections:
            section_sweep(pools, rows)
        if "decode" in sections:
            for ctx in contexts:
                for bs in batches:
                    run_point(pools, vllm, ceiling, rows, [1] * bs, [ctx] * bs, bs, 1, fp8_queries,
                              section="decode", q_len=1, bs=bs, ctx=ctx)
        if "verify" in sections:
            q_len = verify["q_len"]
            for ctx in verify["contexts"]:
                for bs in verify["batches"]:
                    run_point(pools, vllm, None, rows, [q_len] * bs, [ctx] * bs, bs, q_len, fp8_queries,
                              section="verify", q_len=q_len, bs=bs, ctx=ctx)
        if "mixed" in sections:
            n, length = mixed["num_prefills"], mixed["prefill_len"]
            for ctx in mixed["contexts"]:
                for nd in mixed["decodes"]:
                    run_point(pools, vllm, None, rows, [1] * nd + [length] * n, [ctx] * nd + [length] * n, nd, 1,
                              fp8_queries, section="mixed", q_len=1, bs=nd, ctx=ctx, num_prefills=n, prefill_len=length)
    finally:
        write_csv(csv_path, rows, FIELDS)
    log(f"wrote {csv_path}")


if __name__ == "__main__":
    main()
