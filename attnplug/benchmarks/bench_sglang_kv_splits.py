"""SGLang Triton decode: stock per-step split heuristic vs attnplug's plan (patch ``sglang.triton.kv_splits``).

SGLang 0.5.23's Triton backend fills a per-request ``num_kv_splits`` every decode step by launching
``get_num_kv_splits_triton`` (``TritonAttnBackend.get_num_kv_splits``), then every layer runs
``decode_attention_fwd`` (split-KV stage 1 over a fixed ``max_kv_splits`` grid + stage-2 reduction).
attnplug's replacement (``attnplug.adapters.sglang.triton_splits.planned_get_num_kv_splits``, the
real wrapper, is what runs here) fills ``planned_kv_splits(backend, bs)`` with one ``fill_``.

Setup: Llama-3-8B heads (32 q / 8 kv heads, head 128), bf16, SGLang's token-pool KV layout
(``k_buffer``/``v_buffer`` ``[slots, 8, 128]``, int64 ``kv_indices`` = a random permutation of slots,
int32 ``kv_indptr``, int64 ``seq_lens``), ``max_kv_splits`` = 8 (SGLang's default
``--triton-attention-num-kv-splits`` on CUDA), ``max_context_len`` = 32768 (a 32k-context model;
attnplug plans for it as the longest sequence), ``device_core_count`` = the GPU's SM count,
``use_pdl`` as the backend sets it (compute capability >= 9). Points: bs 1..128 x ctx 1k..32k (all
sequences at ctx) plus one mixed point per bs (lengths uniform in [256, --mixed-ctx]).

Per point (both outputs checked equal, and against a torch reference on small points, first):
  stock / attnplug graph  ``triton.testing.do_bench_cudagraph`` median of split fill + one decode call
  stock / attnplug eager  wall time per call of 20-200 back-to-back eager calls, one sync at the end
  *_attn_graph            the decode call alone with each split count (what every layer pays)
Per bs: graph and host time of the split fill alone (heuristic launch vs ``fill_``). In SGLang the fill
runs once per step, outside the decode CUDA graph, and the decode call once per layer: ``speedup_step``
estimates a ``--layers``-layer step as (fill + layers x attn) stock over attnplug (graph times).

SGLang's kernels come from the installed sglang 0.5.23, else from a fetched copy of its wheel's files
(:mod:`attnplug.benchmarks.stock`; ``attnplug bench --fetch-stock``).
  python -m attnplug.benchmarks.bench_sglang_kv_splits [--out DIR] [--quick]   # GPU -> $OUT/sglang_kv_splits.csv
  python -m attnplug.benchmarks.bench_sglang_kv_splits --dry-run              # CPU: inputs + args of one small point
  TRITON_INTERPRET=1 python -m attnplug.benchmarks.bench_sglang_kv_splits --dry-run   # + run it in the interpreter
  TRITON_INTERPRET=1 python -m attnplug.benchmarks.bench_sglang_kv_splits --smoke     # CPU: the GPU run's code path on
      tiny shapes (8 q / 2 kv heads of 32, fp16, a few points), outputs checked, wall time of one call only, CSV
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch
import triton

from attnplug.adapters.sglang.triton_splits import (
    _stock_heuristic_only,
    planned_get_num_kv_splits,
    planned_kv_splits,
)
from attnplug.benchmarks import stock
from attnplug.benchmarks.common import back_to_back_us, cudagraph_us, environment, issue_us, out_dir, wall_us, write_csv

decode_attention_fwd = get_num_kv_splits_triton = None  # SGLang's kernels, set by load_sglang_kernels()


def load_sglang_kernels() -> None:
    """SGLang 0.5.23's decode and split heuristic, installed or fetched (both providers run them)."""
    global decode_attention_fwd, get_num_kv_splits_triton
    kernels = stock.sglang_kernels()
    if kernels is None:
        sys.exit(stock.missing_note(f"SGLang {stock.SGLANG_RELEASE}'s Triton decode"))
    decode_attention_fwd = kernels[stock.SGLANG_DECODE].decode_attention_fwd
    get_num_kv_splits_triton = kernels[stock.SGLANG_METADATA].get_num_kv_splits_triton

NUM_Q_HEADS, NUM_KV_HEADS, HEAD_SIZE = 32, 8, 128
DTYPE = torch.bfloat16
SCALE = HEAD_SIZE**-0.5
MAX_KV_SPLITS = 8  # SGLang 0.5.23 --triton-attention-num-kv-splits default (16 on ROCm)
BATCHES = [1, 4, 8, 16, 32, 64, 128]
CONTEXTS = [1024, 4096, 16384, 32768]
MIN_MIXED_LEN = 256
REFERENCE_MAX_TOKENS = 1 << 17  # torch reference check on points with at most this many KV tokens
BYTES_PER_TOKEN = 2 * NUM_KV_HEADS * HEAD_SIZE * DTYPE.itemsize + 8  # K + V + int64 index
SMOKE = dict(heads=(8, 2, 32), dtype=torch.float16,  # q, kv heads, head size; fp16: no bf16 in the interpreter
             batches=[2], contexts=[40], mixed_ctx=300)  # and one mixed point per bs, lengths in [256, 300]


def log(*args):
    print(*args, flush=True)


def use_smoke_shapes():
    """The CPU smoke run's head layout and dtype (read by Backend, Point and the reference at call time)."""
    global NUM_Q_HEADS, NUM_KV_HEADS, HEAD_SIZE, DTYPE, SCALE
    (NUM_Q_HEADS, NUM_KV_HEADS, HEAD_SIZE), DTYPE = SMOKE["heads"], SMOKE["dtype"]
    SCALE = HEAD_SIZE**-0.5


def us(t):
    """A time for the CSV, rounded; None (not timed: CUDA-graph times in the smoke run) as an empty cell."""
    return "" if t is None else round(t, 2)


def ratio(a, b):
    return "" if a is None else round(a / b, 3)


# ----------------------------------------------------------------------------- the two split fills
class Backend:
    """The attributes of SGLang's ``TritonAttnBackend`` that ``get_num_kv_splits`` and attnplug read."""

    def __init__(self, num_sms: int, max_context_len: int):
        self.num_head, self.num_kv_head, self.v_head_dim = NUM_Q_HEADS, NUM_KV_HEADS, HEAD_SIZE
        self.max_kv_splits = MAX_KV_SPLITS
        self.device_core_count = num_sms
        self.max_context_len = max_context_len
        self.static_kv_splits = False  # SGLANG_TRITON_DECODE_ATTN_STATIC_KV_SPLITS unset
        self.enable_deterministic = False
        self.split_tile_size = None


def stock_get_num_kv_splits(self, num_kv_splits, seq_lens, uneven_batch=None):
    """SGLang 0.5.23 ``TritonAttnBackend.get_num_kv_splits`` on its default path (the launch, its exact args)."""
    num_token, num_seq = num_kv_splits.shape[0], seq_lens.shape[0]
    num_group = num_token // num_seq
    schedule_seq = 256 if num_seq < 256 else triton.next_power_of_2(num_seq)
    get_num_kv_splits_triton[(1,)](
        num_kv_splits, seq_lens, num_seq, num_group, self.num_head, self.num_kv_head, self.max_kv_splits,
        self.device_core_count, MAX_NUM_SEQ=schedule_seq, uneven_batch_ptr=uneven_batch,
    )  # fmt: skip


attnplug_get_num_kv_splits = planned_get_num_kv_splits(stock_get_num_kv_splits)  # the patch's replacement


# ----------------------------------------------------------------------------- inputs
class Point:
    """One decode batch: the buffers the backend hands ``decode_attention_fwd``, one set per split fill."""

    def __init__(self, k_buffer, v_buffer, slots, seq_lens: list[int], device, use_pdl: bool):
        bs, total = len(seq_lens), sum(seq_lens)
        self.bs, self.use_pdl = bs, use_pdl
        self.k_buffer, self.v_buffer = k_buffer, v_buffer
        self.seq_lens = torch.tensor(seq_lens, dtype=torch.int64, device=device)
        self.kv_indptr = torch.zeros(bs + 1, dtype=torch.int32, device=device)
        self.kv_indptr[1:] = torch.cumsum(self.seq_lens, dim=0)
        self.kv_indices = slots[:total]
        self.q = torch.randn(bs, NUM_Q_HEADS, HEAD_SIZE, dtype=k_buffer.dtype, device=device)
        self.attn_logits = torch.empty(bs, NUM_Q_HEADS, MAX_KV_SPLITS, HEAD_SIZE, dtype=torch.float32, device=device)
        self.attn_lse = torch.empty(bs, NUM_Q_HEADS, MAX_KV_SPLITS, dtype=torch.float32, device=device)
        self.uneven_batch = torch.zeros(1, dtype=torch.int32, device=device)
        self.splits = {impl: torch.empty(bs, dtype=torch.int32, device=device) for impl in ("stock", "attnplug")}
        self.out = {impl: torch.empty_like(self.q) for impl in ("stock", "attnplug")}

    def attn_args(self, impl):
        """``decode_attention_fwd``'s arguments as ``TritonAttnBackend.forward_decode`` passes them (CUDA, bf16 KV)."""
        args = (self.q, self.k_buffer, self.v_buffer, self.out[impl], self.kv_indptr, self.kv_indices,
                self.attn_logits, self.attn_lse, self.splits[impl], MAX_KV_SPLITS, SCALE, 1.0, 1.0)
        kwargs = {"logit_cap": 0.0, "sinks": None, "xai_temperature_len": -1, "has_mla": False, "use_pdl": self.use_pdl,
                  "page_size": 1, "score_mod": None, "aux_tensors": None, "uneven_batch": self.uneven_batch}
        kwargs.update(enable_lean=None, lean_Mp=None, lean_Lp=None, lean_Op=None, lean_locks=None)  # Lean: ROCm only
        return args, kwargs

    def fns(self, backend):
        """impl -> (split fill, decode call, both)."""
        fill = {"stock": stock_get_num_kv_splits, "attnplug": attnplug_get_num_kv_splits}
        result = {}
        for impl, get in fill.items():
            args, kwargs = self.attn_args(impl)
            splits = self.splits[impl]

            def fill_fn(get=get, splits=splits):
                get(backend, splits, self.seq_lens, self.uneven_batch)

            def attn_fn(args=args, kwargs=kwargs):
                decode_attention_fwd(*args, **kwargs)

            def step_fn(fill_fn=fill_fn, attn_fn=attn_fn):
                fill_fn()
                attn_fn()

            result[impl] = (fill_fn, attn_fn, step_fn)
        return result

    def reference(self):
        """float32 torch attention of every sequence (GQA: 4 q heads per kv head)."""
        out = torch.empty(self.bs, NUM_Q_HEADS, HEAD_SIZE, dtype=torch.float32, device=self.q.device)
        group = NUM_Q_HEADS // NUM_KV_HEADS
        for i in range(self.bs):
            idx = self.kv_indices[int(self.kv_indptr[i]) : int(self.kv_indptr[i + 1])]
            k = self.k_buffer[idx].float().repeat_interleave(group, dim=1)  # [n, 32, 128]
            v = self.v_buffer[idx].float().repeat_interleave(group, dim=1)
            p = torch.softmax(torch.einsum("hd,nhd->hn", self.q[i].float(), k) * SCALE, dim=-1)
            out[i] = torch.einsum("hn,nhd->hd", p, v)
        return out


def batch_lengths(bs, ctx, kind, gen):
    if kind == "uniform":
        return [ctx] * bs
    return torch.randint(MIN_MIXED_LEN, ctx + 1, (bs,), generator=gen).tolist()


def describe(splits: torch.Tensor) -> str:
    lo, hi = int(splits.min()), int(splits.max())
    return str(lo) if lo == hi else f"{lo}-{hi}"


# ----------------------------------------------------------------------------- timing
# ----------------------------------------------------------------------------- runs
def check(point, fns, reference: bool) -> float:
    for impl in ("stock", "attnplug"):
        fns[impl][2]()
    out_s, out_p = point.out["stock"].float(), point.out["attnplug"].float()
    torch.testing.assert_close(out_p, out_s, rtol=2e-2, atol=2e-3)
    diff = (out_p - out_s).abs().max().item()
    if reference:
        torch.testing.assert_close(out_s, point.reference(), rtol=2e-2, atol=2e-3)
    return diff


def dry_run(args):
    """CPU: inputs and args of one small point; with TRITON_INTERPRET=1 also runs it (fp16: no bf16 there)."""
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    dtype = torch.float16 if interpret else DTYPE
    num_sms = args.num_sms or 132  # H100 SXM
    backend = Backend(num_sms, args.max_context_len)
    assert not _stock_heuristic_only(backend)
    bs, ctx = 4, 512
    gen = torch.Generator().manual_seed(0)
    for kind in ("uniform", "mixed"):
        seq_lens = batch_lengths(bs, ctx, kind, gen)
        total = sum(seq_lens)
        kv = torch.randn(2, total + 1, NUM_KV_HEADS, HEAD_SIZE, dtype=dtype)
        slots = torch.randperm(total, generator=gen) + 1
        point = Point(kv[0], kv[1], slots, seq_lens, torch.device("cpu"), use_pdl=False)
        log(f"--- bs={bs} ctx={ctx} {kind}: seq_lens={seq_lens} planned splits={planned_kv_splits(backend, bs)} "
            f"(num_sms={num_sms}, max_context_len={args.max_context_len}, max_kv_splits={MAX_KV_SPLITS})")
        log(f"heuristic get_num_kv_splits_triton[(1,)](num_kv_splits int32[{bs}], seq_lens int64[{bs}], num_seq={bs}, "
            f"num_group=1, num_head={NUM_Q_HEADS}, num_kv_head={NUM_KV_HEADS}, max_kv_splits={MAX_KV_SPLITS}, "
            f"device_core_count={num_sms}, MAX_NUM_SEQ={256 if bs < 256 else triton.next_power_of_2(bs)}, "
            f"uneven_batch_ptr=int32[1])")
        call_args, kwargs = point.attn_args("attnplug")
        names = ("q", "k_buffer", "v_buffer", "o", "kv_indptr", "kv_indices", "attn_logits", "attn_lse",
                 "num_kv_splits", "max_kv_splits", "sm_scale", "k_scale", "v_scale")
        shown = [f"{n}={tuple(a.shape)} {a.dtype}" if torch.is_tensor(a) else f"{n}={a}"
                 for n, a in zip(names, call_args, strict=True)]
        log("decode_attention_fwd(" + ", ".join(shown) + ", " + ", ".join(
            f"{k}={tuple(v.shape) if torch.is_tensor(v) else v}" for k, v in kwargs.items()) + ")")
        log(f"kv_indptr={point.kv_indptr.tolist()} kv_indices[:8]={point.kv_indices[:8].tolist()}")
        if interpret:
            diff = check(point, point.fns(backend), reference=True)
            log(f"interpreter: stock splits {point.splits['stock'].tolist()} uneven={int(point.uneven_batch)}, "
                f"attnplug splits {point.splits['attnplug'].tolist()}, max|stock - attnplug| {diff:.3g}, "
                "both match the torch reference")
    log("\nsplits per point: planned" + (" / stock heuristic (interpreter, uniform lengths)" if interpret else ""))
    log("   bs " + "".join(f"{c:>9d}" for c in args.contexts))
    for bs in args.batches:
        cells = []
        for ctx in args.contexts:
            cell = str(planned_kv_splits(backend, bs))
            if interpret:
                splits = torch.empty(bs, dtype=torch.int32)
                lens = torch.full((bs,), ctx, dtype=torch.int64)
                stock_get_num_kv_splits(backend, splits, lens, torch.zeros(1, dtype=torch.int32))
                cell += f" / {describe(splits)}"
            cells.append(f"{cell:>9s}")
        log(f"{bs:5d} " + "".join(cells))


def run(args):
    """Every point timed; with ``args.smoke`` on the CPU: wall time of one call for the eager and host times,
    no CUDA-graph times (their columns and the speed-ups from them left empty)."""
    smoke = args.smoke
    device = torch.device("cpu" if smoke else "cuda")
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    if smoke:
        num_sms, use_pdl = 132, False  # H100 SXM, as --dry-run
    else:
        num_sms = torch.cuda.get_device_properties(device).multi_processor_count
        use_pdl = torch.cuda.get_device_capability(device)[0] >= 9  # sgl_kernel's is_arch_support_pdl

    def graph_us(fn, **kwargs):
        return None if smoke else cudagraph_us(fn, **kwargs)

    backend = Backend(args.num_sms or num_sms, args.max_context_len)
    batches, contexts = args.batches, args.contexts
    points = [(bs, ctx, "uniform") for bs in batches for ctx in contexts]
    points += [(bs, args.mixed_ctx, "mixed") for bs in batches]
    lengths = {p: batch_lengths(*p, gen) for p in points}

    need = max(sum(v) for v in lengths.values())
    if smoke:
        pool = need
    else:
        free, _ = torch.cuda.mem_get_info()
        pool = min(need, int(0.75 * free) // BYTES_PER_TOKEN)
    log(f"{'interpreter' if smoke else torch.cuda.get_device_name()} ({num_sms} SMs), use_pdl={use_pdl}, "
        f"max_context_len={args.max_context_len}, max_kv_splits={MAX_KV_SPLITS}; KV pool {pool} token slots "
        f"({pool * BYTES_PER_TOKEN / 2**30:.1f} GiB)")
    kv = torch.empty(2, pool + 1, NUM_KV_HEADS, HEAD_SIZE, dtype=DTYPE, device=device)  # slot 0: SGLang's padding slot
    kv.normal_()
    slots = torch.randperm(pool, device=device) + 1  # int64, like the backend's kv_indices

    rows, fill_times = [], {}
    for bs, ctx, kind in sorted(points, key=lambda p: (p[0], p[2] == "mixed", p[1])):
        seq_lens = lengths[(bs, ctx, kind)]
        if sum(seq_lens) > pool:
            log(f"skip bs={bs} ctx={ctx} {kind}: {sum(seq_lens)} tokens > pool")
            continue
        point = Point(kv[0], kv[1], slots, seq_lens, device, use_pdl)
        fns = point.fns(backend)
        diff = check(point, fns, reference=sum(seq_lens) <= REFERENCE_MAX_TOKENS)
        stock_splits, planned = describe(point.splits["stock"]), planned_kv_splits(backend, bs)
        assert int(point.splits["attnplug"].min()) == int(point.splits["attnplug"].max()) == planned
        if bs not in fill_times:  # the split fill alone: graph time, host time per call
            fill_times[bs] = {impl: (graph_us(fns[impl][0], rep=10), wall_us(fns[impl][0]) if smoke
                                     else issue_us(fns[impl][0])) for impl in fns}
        t = {}
        for impl in ("stock", "attnplug"):
            _, attn_fn, step_fn = fns[impl]
            t[impl, "graph"] = graph_us(step_fn)
            t[impl, "eager"] = wall_us(step_fn) if smoke else back_to_back_us(step_fn, t[impl, "graph"])
            t[impl, "attn"] = graph_us(attn_fn)
        fs, fa = fill_times[bs]["stock"][0], fill_times[bs]["attnplug"][0]
        step = None if smoke else (fs + args.layers * t["stock", "attn"]) / (fa + args.layers * t["attnplug", "attn"])
        row = {
            "bs": bs, "ctx": ctx, "lengths": kind, "mean_len": round(statistics.mean(seq_lens)),
            "stock_splits": stock_splits, "planned_splits": planned,
            "stock_graph_us": us(t["stock", "graph"]), "attnplug_graph_us": us(t["attnplug", "graph"]),
            "stock_eager_us": us(t["stock", "eager"]), "attnplug_eager_us": us(t["attnplug", "eager"]),
            "speedup_graph": ratio(t["stock", "graph"], t["attnplug", "graph"]),
            "speedup_eager": ratio(t["stock", "eager"], t["attnplug", "eager"]),
            "stock_attn_graph_us": us(t["stock", "attn"]),
            "attnplug_attn_graph_us": us(t["attnplug", "attn"]),
            "speedup_attn": ratio(t["stock", "attn"], t["attnplug", "attn"]),
            "stock_fill_graph_us": us(fs), "attnplug_fill_graph_us": us(fa),
            "stock_fill_host_us": us(fill_times[bs]["stock"][1]),
            "attnplug_fill_host_us": us(fill_times[bs]["attnplug"][1]),
            "speedup_step": "" if step is None else round(step, 3), "max_abs_diff": f"{diff:.3g}",
        }  # fmt: skip
        rows.append(row)
        graph_part = "" if smoke else (
            f"graph {row['stock_graph_us']:8.1f} -> {row['attnplug_graph_us']:8.1f} us x{row['speedup_graph']:.3f} | ")
        log(f"bs={bs:4d} ctx={ctx:6d} {kind:7s} splits stock {stock_splits:>4s} planned {planned:2d} | {graph_part}"
            f"eager {row['stock_eager_us']:8.1f} -> {row['attnplug_eager_us']:8.1f} us x{row['speedup_eager']:.3f}"
            + ("" if smoke else f" | attn x{row['speedup_attn']:.3f} | {args.layers}-layer step x{step:.3f}")
            + f" | max|diff| {diff:.3g}")
        del point, fns
    return rows


def summarize(rows, layers):
    if not rows:
        return
    log("\n   bs    ctx lengths  splits(stock/plan)  graph us stock/attnplug   eager us stock/attnplug   "
        "x graph  x eager  x attn  x step")
    for r in rows:
        log(f"{r['bs']:5d} {r['ctx']:6d} {r['lengths']:7s}  {r['stock_splits']:>6s} / {r['planned_splits']:<2d}      "
            f"{r['stock_graph_us']:9.1f} / {r['attnplug_graph_us']:<9.1f}   {r['stock_eager_us']:9.1f} / "
            f"{r['attnplug_eager_us']:<9.1f}  {r['speedup_graph']:6.3f}  {r['speedup_eager']:6.3f}  "
            f"{r['speedup_attn']:6.3f}  {r['speedup_step']:6.3f}")
    summaries = (("speedup_graph", "fill + 1 decode call, graph"), ("speedup_eager", "fill + 1 decode call, eager"),
                 ("speedup_attn", "decode call alone, graph"), ("speedup_step", f"{layers}-layer step estimate"))
    for key, what in summaries:
        values = [r[key] for r in rows]
        geo = math.exp(statistics.mean(math.log(v) for v in values))
        worst, best = min(rows, key=lambda r: r[key]), max(rows, key=lambda r: r[key])
        log(f"{what:30s}: geomean x{geo:.3f}; worst x{worst[key]:.3f} (bs {worst['bs']} ctx {worst['ctx']} "
            f"{worst['lengths']}), best x{best[key]:.3f} (bs {best['bs']} ctx {best['ctx']} {best['lengths']})")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="output dir (default $OUT, else attnplug-bench-results)")
    parser.add_argument("--max-context-len", type=int, default=32768, help="the backend's model context length")
    parser.add_argument("--mixed-ctx", type=int, default=32768, help="mixed points: lengths uniform in [256, this]")
    parser.add_argument("--batches", type=int, nargs="+", default=BATCHES)
    parser.add_argument("--contexts", type=int, nargs="+", default=CONTEXTS)
    parser.add_argument("--layers", type=int, default=32, help="decode calls per step for the step estimate")
    parser.add_argument("--num-sms", type=int, default=0, help="device_core_count override (default: the GPU's)")
    parser.add_argument("--quick", action="store_true", help="bs 1, 16, 128 x ctx 1k, 32k only")
    parser.add_argument("--dry-run", action="store_true", help="CPU: build one small point and print the args")
    parser.add_argument("--smoke", action="store_true", help="CPU: the run on tiny shapes (Triton interpreter)")
    args = parser.parse_args(argv)
    load_sglang_kernels()
    if args.quick:
        args.batches, args.contexts = [1, 16, 128], [1024, 32768]
    if args.smoke:
        use_smoke_shapes()
        args.batches, args.contexts, args.mixed_ctx = SMOKE["batches"], SMOKE["contexts"], SMOKE["mixed_ctx"]
    if args.dry_run:
        dry_run(args)
        return
    log(environment())
    start = time.perf_counter()
    rows = run(args)
    path = os.path.join(args.out or out_dir(), "sglang_kv_splits.csv")
    write_csv(path, rows)
    if not args.smoke:  # its table is of graph times
        summarize(rows, args.layers)
    log(f"\nwrote {path} ({len(rows)} points, {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
