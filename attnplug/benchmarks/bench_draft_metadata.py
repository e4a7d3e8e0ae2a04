"""Speculative draft decode, T steps: the metadata update per CUDA-graph replay, attnplug vs SGLang 0.5.23.

Before each replay of the draft-decode graph (EAGLE-style, topk 1, T = ``--speculative-num-steps``),
the T - 1 draft-decode steps' attention metadata is refilled: step s reads the same pages with
``seq_lens + s + 1`` tokens.

Providers (same inputs; every output checked identical before timing):
  sglang_fa_multistep  SGLang 0.5.23 ``FlashAttentionMultiStepBackend.init_forward_metadata_out_graph``
                       (topk 1): each step's backend refills its own buffers with one
                       ``normal_decode_set_metadata`` launch (``_set_decode_page_metadata``,
                       ``seq_len_delta = step + 1``, ``max_num_pages`` = the context): T - 1 launches.
                       SGLang's own Triton module, from the installed sglang 0.5.23, else a
                       fetched copy (:mod:`.stock`).
  attnplug             the ``attnplug`` multi-step draft backend: ONE ``fused_decode_metadata`` launch
                       writes every step's lengths and prefix sums (2-D outputs) and the one page table
                       all steps share (``max_seq_pages`` from the host maximum, as the backend passes).

Timed: eager (CUDA events around one update), CUDA-graph GPU time, host time per eager update.
``--smoke``: tiny shapes on the CPU (Triton interpreter), correctness check only, CSV written.
Usage: python -m attnplug.benchmarks.bench_draft_metadata [--out DIR] [--smoke]
"""

from __future__ import annotations

import argparse
import os

import torch


from attnplug.core.decode_metadata import fused_decode_metadata
from attnplug.benchmarks.common import (eager_us, graph_us, host_us_per_call, load_sglang_normal_decode_set_metadata, out_dir,
                               wall_us, write_csv)

STEPS = [3, 5]  # --speculative-num-steps T: T - 1 draft-decode steps with attention
BATCHES = [1, 4, 16, 64]
PAGE_SIZES = [1, 16]
MAX_LENS = [1000, 8000]  # longest sequence of the batch (lengths random below it)
CONTEXT = 32768  # max_context_len: SGLang's page tables are this wide
SMOKE = dict(steps=[3], batches=[3], page_sizes=[1, 16], max_lens=[40], context=128)


class DraftBatch:
    """One draft batch and both providers' persistent graph buffers (sized like the backends')."""

    def __init__(self, steps, bs, page_size, max_len, context, device, seed=0):
        gen = torch.Generator().manual_seed(seed)
        pool = 2 * bs + 3
        self.page_size, self.num_draft_steps = page_size, steps - 1
        self.max_num_pages = context // page_size
        self.req_to_token = torch.randint(0, pool * context, (pool, context), generator=gen, dtype=torch.int32).to(device)
        self.req_pool_indices = torch.randperm(pool, generator=gen)[:bs].to(device)  # int64, as SGLang's
        seq_lens = torch.randint(1, max_len - steps, (bs,), generator=gen)
        seq_lens[0] = max_len - steps  # the batch's longest: its last step reads max_len - 1 tokens
        self.seq_lens = seq_lens.to(device)
        self.host_max = int(seq_lens.max())  # the host copy SGLang hands to needs_cpu_seq_lens backends
        index = {"dtype": torch.int32, "device": device}
        # SGLang: one FlashAttentionBackend per step, each with decode_cuda_graph_metadata[bs] buffers
        self.sglang = [{"cache_seqlens_int32": torch.zeros(bs, **index), "cu_seqlens_k": torch.zeros(bs + 1, **index),
                        "page_table": torch.zeros(bs, self.max_num_pages, **index)} for _ in range(self.num_draft_steps)]
        # attnplug: [steps, bs] lengths and one page table
        self.lengths = torch.zeros(self.num_draft_steps, bs, **index)
        self.cu_lengths = torch.zeros(self.num_draft_steps, bs + 1, **index)
        self.page_table = torch.zeros(bs, self.max_num_pages, **index)
        self.pages = -(-(self.host_max + self.num_draft_steps) // page_size)

    def sglang_update(self, normal_decode_set_metadata):
        for step, buffers in enumerate(self.sglang):
            normal_decode_set_metadata(buffers["cache_seqlens_int32"], buffers["cu_seqlens_k"], buffers["page_table"],
                                       self.req_to_token, self.req_pool_indices, self.max_num_pages, self.seq_lens,
                                       step + 1, self.page_size, None)

    def attnplug_update(self):
        fused_decode_metadata(self.lengths, self.cu_lengths, self.page_table, self.req_to_token,
                              self.req_pool_indices, self.seq_lens, self.pages, seq_len_delta=1,
                              page_size=self.page_size)

    def expected(self, step):
        """Step ``step``'s lengths, prefix sums and live page ids (plain torch)."""
        lengths = (self.seq_lens + step + 1).to(torch.int32)
        cu = torch.nn.functional.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))
        pages = [self.req_to_token[row, : -(-int(n) // self.page_size) * self.page_size : self.page_size] // self.page_size
                 for row, n in zip(self.req_pool_indices.tolist(), lengths.tolist())]
        return lengths, cu, pages

    def check(self, with_sglang: bool) -> None:
        """Every step's buffers hold the expected values, over each sequence's live pages."""
        for step in range(self.num_draft_steps):
            lengths, cu, pages = self.expected(step)
            views = [("attnplug", self.lengths[step], self.cu_lengths[step], self.page_table)]
            if with_sglang:
                buffers = self.sglang[step]
                views.append(("sglang", buffers["cache_seqlens_int32"], buffers["cu_seqlens_k"], buffers["page_table"]))
            for name, got_lengths, got_cu, table in views:
                if not (torch.equal(got_lengths, lengths) and torch.equal(got_cu, cu)):
                    raise AssertionError(f"{name}: step {step} lengths differ from the reference")
                for row, want in enumerate(pages):
                    if not torch.equal(table[row, : want.numel()], want):
                        raise AssertionError(f"{name}: step {step} page table row {row} differs from the reference")


def run(args) -> list[dict]:
    grid = SMOKE if args.smoke else dict(steps=STEPS, batches=BATCHES, page_sizes=PAGE_SIZES, max_lens=MAX_LENS,
                                         context=CONTEXT)
    if args.quick:
        grid = dict(grid, batches=[1, 64], max_lens=MAX_LENS[-1:])
    device = "cpu" if args.smoke else "cuda"
    stock = load_sglang_normal_decode_set_metadata()
    rows = []
    for steps in grid["steps"]:
        for page_size in grid["page_sizes"]:
            for max_len in grid["max_lens"]:
                for bs in grid["batches"]:
                    batch = DraftBatch(steps, bs, page_size, max_len, grid["context"], device, seed=bs + steps)
                    providers = {"attnplug": batch.attnplug_update}
                    if stock is not None:
                        providers["sglang_fa_multistep"] = lambda: batch.sglang_update(stock)
                    for update in providers.values():
                        update()
                    batch.check(with_sglang=stock is not None)
                    for name, update in providers.items():
                        row = dict(steps=steps, draft_steps=steps - 1, bs=bs, page_size=page_size, max_len=max_len,
                                   provider=name, launches=1 if name == "attnplug" else steps - 1)
                        if args.smoke:
                            row.update(eager_us=wall_us(update), graph_us="", host_us="")
                        else:
                            row.update(eager_us=eager_us(update), graph_us=graph_us(update), host_us=host_us_per_call(update))
                        rows.append(row)
                        print(", ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                              flush=True)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="results dir (default: $OUT or attnplug-bench-results)")
    parser.add_argument("--quick", action="store_true", help="bs 1 and 64 at the longer max_len only")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (Triton interpreter)")
    args = parser.parse_args(argv)
    rows = run(args)
    write_csv(os.path.join(args.out or out_dir(), "draft_metadata.csv"), rows)


if __name__ == "__main__":
    main()
