"""SGLang 0.5.8's NSA draft-step metadata copy: stock per-tensor copies vs ``sglang.spec.metadata_copy``.

At each CUDA-graph replay of the draft decode, SGLang 0.5.8 / 0.5.8.post1
(``NativeSparseAttnMultiStepBackend.init_forward_metadata_replay_cuda_graph``) precomputes the
batch's metadata once, then each of the T draft steps copies it into its own graph buffers with
``init_forward_metadata_replay_cuda_graph_from_precomputed``: 6 ``copy_`` launches per step with
DSv3.2's 64-token pages, 8 with ``flashmla_kv`` decode. attnplug's patch keeps step 0's copies and
fills steps 1..T-1 from step 0's buffers with one ``fused_metadata_copy`` (the patch's own
``_copied_fields`` / ``_page_columns``). The precompute (the same in both) is not timed.

``stock`` is SGLang 0.5.8.post1's decode-mode copy sequence transcribed (``nsa_backend.py``, lines
1101-1170): SGLang itself cannot be installed on the GPU machine. Buffers have SGLang's shapes: a
[max_bs, context] page table per step, [max_bs + 1] FlashMLA num_splits, [64, 8] tile metadata, and
``cache_seqlens`` shared by every step (the draft runner's int32 seq_lens). This code runs outside
the CUDA graphs, every decode step: eager time (CUDA events) and host time per replay; the GPU
time of the same calls inside a CUDA graph is given too. ``--smoke``: tiny shapes on the CPU (Triton
interpreter), outputs checked equal, wall time only, CSV written.
Usage: python -m attnplug.benchmarks.bench_nsa_draft_copy [--out DIR] [--smoke]
"""

from __future__ import annotations

import argparse
import os
from types import SimpleNamespace

import torch


from attnplug.adapters.sglang.spec_copy import _copied_fields, _page_columns
from attnplug.core.metadata_copy import fused_metadata_copy
from attnplug.benchmarks.common import eager_us, environment, graph_us, host_us_per_call, out_dir, wall_us, write_csv

MAX_BS, CONTEXT, PAGE_SIZE, TILE_ROWS = 64, 32768, 64, 64
CONFIGS = [(bs, max_len) for bs in (1, 8, 32, 64) for max_len in (1000, 8000)]
STEPS = [3, 5]
SMOKE = dict(configs=[(2, 100)], steps=[3], context=256)


class FlashMLAMetadata:
    """SGLang 0.5.8's ``NSAFlashMLAMetadata``: tile metadata plus per-request num_splits."""

    def __init__(self, flashmla_metadata, num_splits):
        self.flashmla_metadata, self.num_splits = flashmla_metadata, num_splits

    def slice(self, sli):
        return FlashMLAMetadata(self.flashmla_metadata, self.num_splits[sli])

    def copy_(self, other):
        self.flashmla_metadata.copy_(other.flashmla_metadata)
        self.num_splits.copy_(other.num_splits)


def step_metadata(bs, cache_seqlens, flashmla, context=CONTEXT):
    """One draft step's graph metadata for batch size ``bs`` (``decode_cuda_graph_metadata[bs]``)."""
    index = dict(dtype=torch.int32, device=cache_seqlens.device)
    page_table = torch.zeros(MAX_BS, context, **index)
    metadata = SimpleNamespace(
        cache_seqlens_int32=cache_seqlens, cu_seqlens_k=torch.zeros(bs + 1, **index),
        page_table_1=page_table[:bs, :], nsa_cache_seqlens_int32=torch.zeros(bs, **index),
        nsa_cu_seqlens_k=torch.zeros(bs + 1, **index),
        real_page_table=torch.zeros(bs, context // PAGE_SIZE, **index), flashmla_metadata=None,
    )
    if flashmla:
        metadata.flashmla_metadata = FlashMLAMetadata(torch.zeros(TILE_ROWS, 8, **index),
                                                      torch.zeros(MAX_BS + 1, **index)[: bs + 1])
    return metadata


def precomputed(bs, max_len, flashmla, generator, device="cuda"):
    """What ``_precompute_decode_mode`` returns (fresh tensors, contiguous)."""
    def ints(*shape, high=2**20):
        return torch.randint(0, high, shape, generator=generator, dtype=torch.int32).to(device)

    return SimpleNamespace(
        cache_seqlens=ints(bs, high=max_len), cu_seqlens_k=ints(bs + 1), page_indices=ints(bs, max_len),
        nsa_cache_seqlens=ints(bs, high=2048), nsa_cu_seqlens_k=ints(bs + 1), seqlens_expanded_size=bs,
        real_page_table=ints(bs, -(-max_len // PAGE_SIZE)), max_len=max_len,
        flashmla_metadata=FlashMLAMetadata(ints(TILE_ROWS, 8), ints(bs + 1)) if flashmla else None,
    )


def sglang_copy(metadata, p):
    """SGLang 0.5.8.post1's ``init_forward_metadata_replay_cuda_graph_from_precomputed``, decode mode."""
    metadata.cache_seqlens_int32.copy_(p.cache_seqlens)
    metadata.cu_seqlens_k[1:].copy_(p.cu_seqlens_k[1:])
    metadata.page_table_1[:, : p.max_len].copy_(p.page_indices)
    metadata.nsa_cache_seqlens_int32.copy_(p.nsa_cache_seqlens)
    size = p.seqlens_expanded_size
    metadata.nsa_cu_seqlens_k[1 : 1 + size].copy_(p.nsa_cu_seqlens_k[1 : 1 + size])
    if p.real_page_table is not None:
        rows, cols = p.real_page_table.shape
        metadata.real_page_table[:rows, :cols].copy_(p.real_page_table)
    if p.flashmla_metadata is not None:
        metadata.flashmla_metadata.slice(slice(0, size + 1)).copy_(p.flashmla_metadata)


def providers(steps, p, bs):
    def stock():
        for metadata in steps:
            sglang_copy(metadata, p)

    def attnplug():  # the body of spec_copy.fused_draft_metadata_copy after the precompute
        sglang_copy(steps[0], p)
        page_columns = _page_columns(p.max_len, steps[0].page_table_1.shape[1])
        real_columns = min(steps[0].real_page_table.shape[1], -(-page_columns // PAGE_SIZE))
        srcs, sizes = _copied_fields(steps[0], bs, page_columns, real_columns)
        dsts = [_copied_fields(metadata, bs, page_columns, real_columns)[0] for metadata in steps[1:]]
        fused_metadata_copy(srcs, dsts, sizes)

    return {"sglang_0.5.8": stock, "attnplug": attnplug}


def written(metadata):
    parts = [metadata.cache_seqlens_int32, metadata.cu_seqlens_k, metadata.page_table_1,  # past max_len too
             metadata.nsa_cache_seqlens_int32, metadata.nsa_cu_seqlens_k, metadata.real_page_table]
    if metadata.flashmla_metadata is not None:
        parts += [metadata.flashmla_metadata.flashmla_metadata, metadata.flashmla_metadata.num_splits]
    return [part.clone() for part in parts]


def us(t):
    """A time for the CSV; None (not timed: graph and host times in the smoke run) as an empty cell."""
    return "" if t is None else round(t, 2)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=out_dir())
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (Triton interpreter)")
    args = parser.parse_args(argv)
    print(environment(), flush=True)
    points = SMOKE if args.smoke else dict(configs=CONFIGS, steps=STEPS, context=CONTEXT)
    device = "cpu" if args.smoke else "cuda"
    rows = []
    for num_steps in points["steps"]:
        for flashmla in (False, True):
            for bs, max_len in points["configs"]:
                generator = torch.Generator().manual_seed(bs * 7 + max_len + num_steps)
                p = precomputed(bs, max_len, flashmla, generator, device)
                results = {}
                for name in ("sglang_0.5.8", "attnplug"):
                    cache_seqlens = torch.zeros(bs, dtype=torch.int32, device=device)  # shared by the steps
                    steps = [step_metadata(bs, cache_seqlens, flashmla, points["context"]) for _ in range(num_steps)]
                    fn = providers(steps, p, bs)[name]
                    fn()
                    if not args.smoke:
                        torch.cuda.synchronize()
                    state = [written(metadata) for metadata in steps]
                    if args.smoke:
                        results[name] = (wall_us(fn), None, None, state)
                    else:
                        results[name] = (eager_us(fn), graph_us(fn), host_us_per_call(fn), state)
                same = all(torch.equal(a, b) for want, have in zip(results["sglang_0.5.8"][3], results["attnplug"][3])
                           for a, b in zip(want, have))
                assert same, (num_steps, flashmla, bs, max_len)
                stock_eager, stock_graph, stock_host, _ = results["sglang_0.5.8"]
                ours_eager, ours_graph, ours_host, _ = results["attnplug"]
                row = dict(steps=num_steps, flashmla_kv=flashmla, bs=bs, max_len=max_len,
                           stock_eager_us=us(stock_eager), attnplug_eager_us=us(ours_eager),
                           speedup_eager=round(stock_eager / ours_eager, 2), stock_graph_us=us(stock_graph),
                           attnplug_graph_us=us(ours_graph),
                           speedup_graph=us(stock_graph and stock_graph / ours_graph), stock_host_us=us(stock_host),
                           attnplug_host_us=us(ours_host))  # write_csv appends the environment columns
                rows.append(row)
                print(row, flush=True)
    write_csv(os.path.join(args.out, "nsa_draft_copy.csv"), rows)


if __name__ == "__main__":
    main()
