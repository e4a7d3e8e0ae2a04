"""One speculative-decoding round on an SGLang-style token pool, the way the ``attnplug`` SGLang backend runs it.

T - 1 draft-decode steps (topk 1): ONE multi-step ``fused_decode_metadata`` launch gives every step
its lengths (``seq_lens + s + 1``) and the page table they share; each step plans once and runs
``paged_attention`` as a plain decode. Then the target verify: ``1 + k`` queries per request over
``seq_lens + 1 + k`` tokens through the split-KV verify path. Checked against the float64
reference on the CPU (interpreter) and the GPU, and on the GPU the whole round captured in one
CUDA graph and replayed on new lengths == eager.
"""

import math

import pytest
import torch

from attnplug.core import AttentionWorkspace, fused_decode_metadata, paged_attention, plan_attention
from tests.core.test_paged_attention import TOLERANCE, reference_attention
from tests.utils import DEVICE, assert_close_verbose

ON_GPU = DEVICE.type == "cuda"


class Round:
    """A token pool, request rows and the persistent buffers of one draft + verify round."""

    def __init__(self, bs, steps, *, page_size, dtype, max_len, num_q_heads=8, num_kv_heads=2, head_size=48, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.bs, self.steps, self.page_size, self.dtype = bs, steps, page_size, dtype
        self.num_q_heads, self.num_kv_heads, self.head_size = num_q_heads, num_kv_heads, head_size
        self.num_draft_tokens = steps + 1  # SGLang's --speculative-num-draft-tokens for a chain
        self.context = max_len + self.num_draft_tokens + page_size
        pool_rows = bs + 2
        num_pages = pool_rows * math.ceil(self.context / page_size) + 3
        # token pool [num_tokens, 2 * kv heads, head] (K then V heads), viewed as pages
        pool = torch.randn(num_pages * page_size, 2 * num_kv_heads, head_size, generator=g).to(dtype).to(DEVICE)
        self.k_pages = pool[:, :num_kv_heads].unflatten(0, (num_pages, page_size))
        self.v_pages = pool[:, num_kv_heads:].unflatten(0, (num_pages, page_size))
        # req_to_token: each request row a random run of whole pages (SGLang's paged allocator)
        pages = torch.randperm(num_pages, generator=g)[: pool_rows * math.ceil(self.context / page_size)]
        tokens = (pages[:, None] * page_size + torch.arange(page_size)).reshape(pool_rows, -1)
        self.req_to_token = tokens[:, : self.context].to(torch.int32).contiguous().to(DEVICE)
        self.req_pool_indices = torch.randperm(pool_rows, generator=g)[:bs].to(DEVICE)
        self.seq_lens = torch.zeros(bs, dtype=torch.int64, device=DEVICE)
        self.max_len = max_len
        index = {"dtype": torch.int32, "device": DEVICE}
        self.lengths = torch.zeros(steps - 1, bs, **index)  # draft step s: seq_lens + s + 1
        self.cu_lengths = torch.zeros(steps - 1, bs + 1, **index)
        self.verify_lengths = torch.zeros(bs, **index)
        self.verify_cu = torch.zeros(bs + 1, **index)
        self.pages = math.ceil((max_len + self.num_draft_tokens) / page_size)
        self.page_table = torch.zeros(bs, self.pages, **index)
        self.verify_page_table = torch.zeros(bs, self.pages, **index)
        self.decode_starts = torch.arange(bs + 1, **index)
        self.verify_starts = torch.arange(0, bs * self.num_draft_tokens + 1, self.num_draft_tokens, **index)
        self.workspace = AttentionWorkspace.allocate(bs, bs * self.num_draft_tokens, num_q_heads, head_size,
                                                     device=DEVICE, max_decode_query_len=self.num_draft_tokens)
        common = dict(num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_size=head_size, page_size=page_size,
                      max_seqlen_k=max_len + self.num_draft_tokens, workspace=self.workspace)
        self.draft_plans = [plan_attention(self.decode_starts, self.lengths[s], num_decodes=bs, max_seqlen_q=1, **common)
                            for s in range(steps - 1)]
        self.verify_plan = plan_attention(self.verify_starts, self.verify_lengths, num_decodes=bs,
                                          max_seqlen_q=self.num_draft_tokens,
                                          max_decode_query_len=self.num_draft_tokens, **common)
        self.draft_q = torch.randn(steps - 1, bs, num_q_heads, head_size, generator=g).to(dtype).to(DEVICE)
        self.verify_q = torch.randn(bs * self.num_draft_tokens, num_q_heads, head_size, generator=g).to(dtype).to(DEVICE)
        self.draft_out = torch.full_like(self.draft_q, float("nan"))
        self.verify_out = torch.full_like(self.verify_q, float("nan"))
        self.generator = g

    def new_lengths(self):
        self.seq_lens.copy_(torch.randint(1, self.max_len + 1, (self.bs,), generator=self.generator))
        self.seq_lens[0] = self.max_len
        self.draft_q.copy_(torch.randn(self.draft_q.shape, generator=self.generator).to(self.dtype))
        self.verify_q.copy_(torch.randn(self.verify_q.shape, generator=self.generator).to(self.dtype))
        self.draft_out.fill_(float("nan"))
        self.verify_out.fill_(float("nan"))

    def run(self):
        """The round: one metadata launch for all draft steps, a decode per step, then the verify."""
        fused_decode_metadata(self.lengths, self.cu_lengths, self.page_table, self.req_to_token,
                              self.req_pool_indices, self.seq_lens, self.pages, seq_len_delta=1,
                              page_size=self.page_size)
        scale = self.head_size ** -0.5
        for s, plan in enumerate(self.draft_plans):
            paged_attention(self.draft_q[s], self.k_pages, self.v_pages, self.page_table, plan, self.draft_out[s],
                            softmax_scale=scale)
        fused_decode_metadata(self.verify_lengths, self.verify_cu, self.verify_page_table, self.req_to_token,
                              self.req_pool_indices, self.seq_lens, self.pages, seq_len_delta=self.num_draft_tokens,
                              page_size=self.page_size)
        paged_attention(self.verify_q, self.k_pages, self.v_pages, self.verify_page_table, self.verify_plan,
                        self.verify_out, softmax_scale=scale)

    def check(self):
        atol, rtol = TOLERANCE[self.dtype]
        scale = self.head_size ** -0.5
        for s in range(self.steps - 1):
            want = reference_attention(self.draft_q[s], self.k_pages, self.v_pages, self.page_table, self.decode_starts,
                                       self.seq_lens + s + 1, softmax_scale=scale)
            assert_close_verbose(self.draft_out[s], want, atol=atol, rtol=rtol, what=f"draft step {s}")
        want = reference_attention(self.verify_q, self.k_pages, self.v_pages, self.verify_page_table,
                                   self.verify_starts, self.seq_lens + self.num_draft_tokens, softmax_scale=scale)
        assert_close_verbose(self.verify_out, want, atol=atol, rtol=rtol, what="target verify")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("steps,page_size", [(3, 1), (5, 16)])
def test_draft_steps_and_verify_match_reference(steps, page_size, dtype):
    rnd = Round(3, steps, page_size=page_size, dtype=dtype, max_len=70, seed=steps)
    rnd.new_lengths()
    rnd.run()
    rnd.check()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("steps", [3, 5])
def test_gpu_round_cuda_graph_replay_equals_eager(steps, dtype):
    """The whole round captured once (Llama-3-8B heads), replayed on new lengths and queries == eager == reference."""
    rnd = Round(24, steps, page_size=16, dtype=dtype, max_len=6000, num_q_heads=32, num_kv_heads=8, head_size=128,
                seed=steps)
    rnd.new_lengths()
    rnd.run()  # compile outside the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        rnd.run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        rnd.run()
    for _ in range(2):
        rnd.new_lengths()
        graph.replay()
        torch.cuda.synchronize()
        replayed = rnd.draft_out.clone(), rnd.verify_out.clone()
        rnd.check()
        rnd.draft_out.fill_(float("nan"))
        rnd.verify_out.fill_(float("nan"))
        rnd.run()
        torch.cuda.synchronize()
        assert torch.equal(replayed[0], rnd.draft_out), "draft steps: graph replay differs from eager"
        assert torch.equal(replayed[1], rnd.verify_out), "verify: graph replay differs from eager"
