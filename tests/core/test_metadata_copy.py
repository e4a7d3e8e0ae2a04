"""fused_metadata_copy against per-tensor copy_ loops."""

import pytest
import torch

from attnplug.core import metadata_copy
from attnplug.core.metadata_copy import fused_metadata_copy
from tests.utils import DEVICE, SENTINEL, assert_equal_verbose

ON_GPU = DEVICE.type == "cuda"


def random_like(shape, dtype, gen):
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype) * 1000
    return torch.randint(-(2**30), 2**30, shape, generator=gen).to(dtype) * (2**20 if dtype == torch.int64 else 1)


def decode_fields(bs, pages, gen):
    """Sources shaped like a decode batch's metadata: 1-D and 2-D, int32 / int64 / float32,
    one 2-D source a column slice of a wider buffer (row stride != cols)."""
    wide = random_like((bs + 2, pages + 9), torch.int32, gen)
    return [
        random_like((bs,), torch.int32, gen),  # cache_seqlens
        random_like((bs + 1,), torch.int32, gen),  # cu_seqlens_k
        wide[:bs, 4 : 4 + pages],  # page_table, strided rows
        random_like((bs,), torch.int64, gen),  # positions / out_cache_loc
        random_like((bs, 3), torch.float32, gen),  # e.g. per-sequence scales
        random_like((bs + 5,), torch.float32, gen),
    ]


def target_buffers(srcs, extra, gen_seed):
    """A target's graph buffers: larger than the sources, SENTINEL-filled, their own row strides."""
    out = []
    for i, src in enumerate(srcs):
        if src.dim() == 1:
            out.append(torch.full((src.shape[0] + extra,), SENTINEL, dtype=src.dtype))
        else:
            buf = torch.full((src.shape[0] + extra, src.shape[1] + extra + 2 * i + gen_seed), SENTINEL, dtype=src.dtype)
            out.append(buf[:, : src.shape[1] + extra])
    return out


def reference(srcs, dsts, sizes):
    want = [[d.clone() for d in targets] for targets in dsts]
    for targets in want:
        for k, (src, dst) in enumerate(zip(srcs, targets)):
            size = None if sizes is None else sizes[k]
            if src.dim() == 1:
                n = src.shape[0] if size is None else size
                dst[:n].copy_(src[:n])
            else:
                rows, cols = src.shape if size is None else size
                dst[:rows, :cols].copy_(src[:rows, :cols])
    return want


def check(srcs, dsts, sizes, what):
    want = reference(srcs, dsts, sizes)
    fused_metadata_copy(srcs, dsts, sizes)
    for t, (got_t, want_t) in enumerate(zip(dsts, want)):
        for k, (got, exp) in enumerate(zip(got_t, want_t)):
            assert_equal_verbose(got, exp, f"{what}: target {t} field {k}")


def to_device(tensors):
    return [t.to(DEVICE) if t.dim() == 1 or t.is_contiguous() else _strided_to_device(t) for t in tensors]


def _strided_to_device(t):
    """Move a column slice to DEVICE keeping its row stride (slice of the moved base buffer)."""
    base = torch.empty((t.shape[0], t.stride(0)), dtype=t.dtype)
    base[:, : t.shape[1]] = t
    return base.to(DEVICE)[:, : t.shape[1]]


@pytest.mark.parametrize("num_targets", [1, 3, 6])
@pytest.mark.parametrize("bs,pages", [(1, 5), (7, 33), (3, 2100), (37, 300)] if ON_GPU else [(1, 5), (7, 33), (3, 2100)])
def test_full_copy(num_targets, bs, pages):
    gen = torch.Generator().manual_seed(bs * 10 + num_targets)
    srcs = to_device(decode_fields(bs, pages, gen))
    dsts = [to_device(target_buffers(srcs, extra=3, gen_seed=t)) for t in range(num_targets)]
    assert srcs[2].stride(0) != srcs[2].shape[1] and dsts[0][2].stride(0) != srcs[2].stride(0)
    check(srcs, dsts, None, f"T={num_targets} bs={bs}")


@pytest.mark.parametrize("num_targets", [1, 3, 6])
def test_partial_extents(num_targets):
    """Leading extents smaller than the sources (the graph buffers' live prefix); None = whole source."""
    gen = torch.Generator().manual_seed(100 + num_targets)
    bs, pages = 9, 40
    srcs = to_device(decode_fields(bs, pages, gen))
    dsts = [to_device(target_buffers(srcs, extra=2, gen_seed=t)) for t in range(num_targets)]
    sizes = [5, 6, [5, 17], None, (5, 2), 0]  # a list pair is accepted like a tuple
    check(srcs, dsts, sizes, f"partial T={num_targets}")


def test_warm_call_reuses_table_and_sees_new_data():
    """Same tensors, new contents: the cached table is reused (no new entry) and the copy is right."""
    gen = torch.Generator().manual_seed(7)
    srcs = to_device(decode_fields(4, 11, gen))
    dsts = [to_device(target_buffers(srcs, extra=1, gen_seed=t)) for t in range(3)]
    check(srcs, dsts, None, "first")
    cached = len(metadata_copy._PREPARED)
    for src in srcs:
        src.copy_(random_like(tuple(src.shape), src.dtype, gen).to(DEVICE))
    check(srcs, dsts, None, "warm")
    assert len(metadata_copy._PREPARED) == cached


def test_empty_is_noop():
    fused_metadata_copy([], [])
    src = torch.arange(4, dtype=torch.int32, device=DEVICE)
    fused_metadata_copy([src], [])
    dst = torch.full((4,), SENTINEL, dtype=torch.int32, device=DEVICE)
    fused_metadata_copy([src], [[dst]], [0])
    assert (dst == SENTINEL).all()


def _args():
    src1 = torch.arange(6, dtype=torch.int32, device=DEVICE)
    src2 = torch.arange(12, dtype=torch.int64, device=DEVICE).view(3, 4)
    dst = [[torch.zeros(6, dtype=torch.int32, device=DEVICE), torch.zeros(3, 4, dtype=torch.int64, device=DEVICE)]]
    return [src1, src2], dst


def _with(change):
    srcs, dsts = _args()
    sizes = [None, None]
    change(srcs, dsts, sizes)
    return srcs, dsts, sizes


ERROR_CASES = [
    ("dst dtype", lambda s, d, z: d[0].__setitem__(1, d[0][1].double()), TypeError, r"dsts\[0\]\[1\]"),
    ("2-byte dtype", lambda s, d, z: (s.__setitem__(0, s[0].half()), d[0].__setitem__(0, d[0][0].half())),
     TypeError, "4- and 8-byte"),
    ("extent > src", lambda s, d, z: z.__setitem__(0, 7), ValueError, r"srcs\[0\]"),
    ("extent > dst", lambda s, d, z: d[0].__setitem__(1, d[0][1][:2]), ValueError, r"dsts\[0\]\[1\]"),
    ("2-D extent > dst cols", lambda s, d, z: (z.__setitem__(1, (2, 4)), d[0].__setitem__(1, d[0][1][:, :3])),
     ValueError, r"dsts\[0\]\[1\]"),
    ("negative size", lambda s, d, z: z.__setitem__(0, -1), ValueError, r"sizes\[0\]"),
    ("pair for 1-D", lambda s, d, z: z.__setitem__(0, (1, 2)), ValueError, r"sizes\[0\]"),
    ("int for 2-D", lambda s, d, z: z.__setitem__(1, 3), ValueError, r"sizes\[1\]"),
    ("field count", lambda s, d, z: d[0].pop(), ValueError, r"dsts\[0\]"),
    ("rank mismatch", lambda s, d, z: d[0].__setitem__(1, d[0][1].flatten()), ValueError, r"dsts\[0\]\[1\]"),
    ("3-D source", lambda s, d, z: s.__setitem__(1, s[1][None]), ValueError, r"srcs\[1\]"),
    ("column stride", lambda s, d, z: d[0].__setitem__(1, torch.zeros(4, 3, dtype=torch.int64, device=DEVICE).t()),
     ValueError, "contiguous"),
    ("sizes count", lambda s, d, z: z.append(None), ValueError, "sizes"),
    ("not a tensor", lambda s, d, z: d[0].__setitem__(0, [0] * 6), TypeError, r"dsts\[0\]\[0\]"),
]


@pytest.mark.parametrize("what,change,error,match", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_bad_input(what, change, error, match):
    srcs, dsts, sizes = _with(change)
    before = [d.clone() if isinstance(d, torch.Tensor) else d for d in dsts[0]]
    with pytest.raises(error, match=match):
        fused_metadata_copy(srcs, dsts, sizes)
    for got, old in zip(dsts[0], before):
        assert not isinstance(got, torch.Tensor) or torch.equal(got, old), "a failed call must not write"


@pytest.mark.gpu
def test_device_mismatch():
    srcs, dsts = _args()
    dsts[0][0] = dsts[0][0].cpu()
    with pytest.raises(ValueError, match=r"dsts\[0\]\[0\]"):
        fused_metadata_copy(srcs, dsts)


@pytest.mark.gpu
def test_cuda_graph_replay():
    """Warm up, capture, then write new source contents in place: replay copies them."""
    gen = torch.Generator().manual_seed(3)
    srcs = to_device(decode_fields(32, 8192, gen))
    dsts = [to_device(target_buffers(srcs, extra=3, gen_seed=t)) for t in range(3)]
    sizes = [20, 21, (20, 5000), None, (20, 3), 25]
    fused_metadata_copy(srcs, dsts, sizes)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fused_metadata_copy(srcs, dsts, sizes)
    for _ in range(2):
        for src in srcs:
            src.copy_(random_like(tuple(src.shape), src.dtype, gen).to(DEVICE))
        for targets in dsts:
            for d in targets:
                d.fill_(SENTINEL)
        want = reference(srcs, dsts, sizes)
        graph.replay()
        torch.cuda.synchronize()
        for t, (got_t, want_t) in enumerate(zip(dsts, want)):
            for k, (got, exp) in enumerate(zip(got_t, want_t)):
                assert_equal_verbose(got, exp, f"replay target {t} field {k}")
