"""A SIMULATED engine decode step: metadata update + plan + 32 attention layers, stock vs attnplug.

This is not an engine: it runs, on one GPU, the attention-path work of one decode step of a
32-layer model with Llama-3-8B's head layout (32 q heads, 8 kv heads, head 128), page 16, bf16:

- stock:    the unfused torch decode-metadata sequence (SGLang's FA backend before PR 20778)
            + 32 x the newest vLLM release's ``unified_attention`` found (installed, else fetched:
              :mod:`attnplug.benchmarks.stock`; its own 3D/2D rule, 16 segments);
- attnplug: ``fused_decode_metadata`` + ``plan_attention`` (host only) + 32 x ``paged_attention``.

Both read the same KV pool (one pool shared by the 32 layers: every layer reads its full KV, as
in a model), with the page table the metadata step just built. Reported per step: eager wall time
(steps back to back; what a step costs when attention runs eagerly, e.g. under piecewise CUDA
graphs) and CUDA-graph GPU time of the whole step. No model math (GEMMs, norms) is included.

Without a vLLM kernel (neither installed nor fetched) the stock step is skipped with a warning.
``--smoke``: the same code path on tiny shapes on the CPU (Triton interpreter, fp32, a few layers, wall
time instead of graph / eager times), outputs compared, CSV and plot written.
"""

from __future__ import annotations

import argparse
import os

import torch
import triton


from attnplug.core import AttentionWorkspace, fused_decode_metadata, paged_attention, plan_attention
from attnplug.benchmarks import bench_paged_attention as pa  # pool, shapes
from attnplug.benchmarks import peers
from attnplug.benchmarks.common import back_to_back_us, cudagraph_us, out_dir, wall_us, write_csv

NUM_LAYERS = 32
BATCHES = [1, 4, 16, 64, 128]
CONTEXTS = [1024, 4096, 16384, 32768]
MAX_CONTEXT = max(CONTEXTS)
SMOKE = dict(layers=2, batches=[1, 3], contexts=[40])  # and bench_paged_attention's smoke shapes


class Step:
    """One batch's decode step inputs: requests' token slots laid out on the pool's shuffled pages."""

    def __init__(self, pool: pa.KVPool, bs: int, ctx: int):
        pages = triton.cdiv(ctx, pa.PAGE_SIZE)
        block_table = pool.perm[: bs * pages].view(bs, pages).long()
        slot_in_page = torch.arange(ctx, device=pa.DEVICE) % pa.PAGE_SIZE
        tokens = block_table.repeat_interleave(pa.PAGE_SIZE, dim=1)[:, :ctx] * pa.PAGE_SIZE + slot_in_page
        self.req_to_token = torch.zeros(bs, MAX_CONTEXT, dtype=torch.int32, device=pa.DEVICE)
        self.req_to_token[:, :ctx] = tokens.to(torch.int32)
        self.req_pool_indices = torch.arange(bs, device=pa.DEVICE)
        self.seq_lens = torch.full((bs,), ctx, dtype=torch.int64, device=pa.DEVICE)
        self.max_seq_pages = pages
        self.cache_seqlens = torch.empty(bs, dtype=torch.int32, device=pa.DEVICE)
        self.cu_seqlens_k = torch.zeros(bs + 1, dtype=torch.int32, device=pa.DEVICE)
        self.cu_seqlens_q = torch.arange(bs + 1, dtype=torch.int32, device=pa.DEVICE)
        self.page_table = torch.empty(bs, pages, dtype=torch.int32, device=pa.DEVICE)
        self.strided_indices = torch.arange(0, MAX_CONTEXT, pa.PAGE_SIZE, device=pa.DEVICE)
        self.q = torch.randn(bs, pa.NUM_Q_HEADS, pa.HEAD_SIZE, dtype=pa.DTYPE, device=pa.DEVICE)
        self.out = torch.empty_like(self.q)
        self.bs, self.ctx = bs, ctx

    def unfused_metadata(self):
        """SGLang's per-step torch sequence before PR 20778 (page size 16)."""
        self.cache_seqlens.copy_(self.seq_lens)
        self.cu_seqlens_k[1:].copy_(torch.cumsum(self.cache_seqlens, dim=0, dtype=torch.int32))
        tokens = self.req_to_token[self.req_pool_indices[:, None], self.strided_indices[: self.max_seq_pages][None, :]]
        self.page_table.copy_(tokens // pa.PAGE_SIZE)

    def fused_metadata(self):
        fused_decode_metadata(self.cache_seqlens, self.cu_seqlens_k, self.page_table, self.req_to_token,
                              self.req_pool_indices, self.seq_lens, self.max_seq_pages, page_size=pa.PAGE_SIZE)


def stock_step(pool, stock, step: Step, layers: int):
    def run():
        step.unfused_metadata()
        for _ in range(layers):
            stock.launch(pool.k, pool.v, step.q, step.out, step.cu_seqlens_q, 1, step.cache_seqlens, step.ctx,
                         step.page_table)

    return run


def attnplug_step(pool, workspace, step: Step, layers: int):
    def run():
        step.fused_metadata()
        plan = plan_attention(step.cu_seqlens_q, step.cache_seqlens, num_decodes=step.bs, num_q_heads=pa.NUM_Q_HEADS,
                              num_kv_heads=pa.NUM_KV_HEADS, head_size=pa.HEAD_SIZE, page_size=pa.PAGE_SIZE,
                              max_seqlen_q=1, max_seqlen_k=step.ctx, workspace=workspace)
        for _ in range(layers):
            paged_attention(step.q, pool.k, pool.v, step.page_table, plan, step.out, softmax_scale=pa.SCALE)

    return run


def plot(rows: list[dict], path: str) -> None:
    """Speed-up of a whole step (stock / attnplug) against batch size, one line per context."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for axis, column, title in ((axes[0], "eager_step_us", "eager"), (axes[1], "graph_step_us", "CUDA graph")):
        axis.set_title(f"simulated {rows[0]['layers']}-layer decode step, {title}")
        if any(r[column] in (None, "") for r in rows) or {r["impl"] for r in rows} != {"stock", "attnplug"}:
            continue  # not timed (smoke run) or no stock step
        for ctx in sorted({int(r["ctx"]) for r in rows}):
            times = {(r["impl"], int(r["bs"])): float(r[column]) for r in rows if int(r["ctx"]) == ctx}
            batches = sorted({bs for _, bs in times})
            axis.plot(batches, [times["stock", bs] / times["attnplug", bs] for bs in batches], marker="o", label=f"ctx {ctx}")
        axis.axhline(1.0, color="grey", linewidth=0.8)
        axis.set_xscale("log", base=2)
        axis.set_xlabel("decode batch size")
    axes[0].set_ylabel("speed-up over stock (x)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=out_dir())
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)))
    parser.add_argument("--contexts", default=",".join(map(str, CONTEXTS)))
    parser.add_argument("--quick", action="store_true", help="bs 1 and 32 at ctx 4k only")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (Triton interpreter)")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    contexts = [int(c) for c in args.contexts.split(",")]
    if args.quick:
        batches, contexts = [1, 32], [4096]
    layers = NUM_LAYERS
    if args.smoke:
        pa.use_smoke_shapes()
        layers, batches, contexts = SMOKE["layers"], SMOKE["batches"], SMOKE["contexts"]
    print(f"SIMULATED engine decode step ({layers} layers, {pa.NUM_Q_HEADS} q / {pa.NUM_KV_HEADS} kv heads of "
          f"{pa.HEAD_SIZE}, page {pa.PAGE_SIZE}, {str(pa.DTYPE).removeprefix('torch.')}): not an engine run",
          flush=True)
    pool = pa.KVPool(max(batches) * triton.cdiv(max(contexts), pa.PAGE_SIZE) * pa.PAGE_SIZE)  # whole pages
    stock = next(reversed(peers.vllm_peers(pa.heads()).values()), None)  # the newest vLLM release found
    if stock is not None:
        print(f"stock step: unfused torch metadata + {stock.name}'s unified_attention", flush=True)
    workspace = AttentionWorkspace.allocate(max(batches), max(batches), pa.NUM_Q_HEADS, pa.HEAD_SIZE, device=pa.DEVICE)
    rows = []
    for ctx in contexts:
        for bs in batches:
            step = Step(pool, bs, ctx)
            steps = {"attnplug": attnplug_step(pool, workspace, step, layers)}
            if stock is not None:
                steps = {"stock": stock_step(pool, stock, step, layers), **steps}
            results = {}
            for name, run in steps.items():
                run()
                if not args.smoke:
                    torch.cuda.synchronize()
                reference = step.out.float().clone()
                graph = None if args.smoke else cudagraph_us(run, rep=200)
                eager = wall_us(run) if args.smoke else back_to_back_us(run, graph)
                results[name] = (eager, graph, reference)
            diff = (results["stock"][2] - results["attnplug"][2]).abs().max().item() if stock is not None else None
            for name, (eager, graph, _) in results.items():
                rows.append(dict(bs=bs, ctx=ctx, layers=layers, impl=name, stock=stock.name if stock else "", eager_step_us=round(eager, 1),
                                 graph_step_us=None if graph is None else round(graph, 1),
                                 max_abs_diff=None if diff is None else f"{diff:.1e}"))
            parts = []
            for kind, i in (("eager", 0), ("graph", 1)):
                if results["attnplug"][i] is not None:
                    part = f"{kind} " + " ".join(f"{name} {times[i]:9.1f}" for name, times in results.items()) + " us"
                    if stock is not None:
                        part += f" ({results['stock'][i] / results['attnplug'][i]:4.2f}x)"
                    parts.append(part)
            if diff is not None:
                parts.append(f"max|diff| {diff:.1e}")
            print(f"step bs={bs:3d} ctx={ctx:5d}: " + " | ".join(parts), flush=True)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "decode_step.csv")
    write_csv(path, rows)
    plot(rows, os.path.join(args.out, "decode_step.png"))
    print(f"wrote {path} and decode_step.png", flush=True)


if __name__ == "__main__":
    main()
