"""The low-overhead launch path: same results as ``kernel[grid](...)``, correct specialization
keys, plain-launch fallbacks, CUDA-graph capture."""

import types
import warnings

import pytest
import torch
import triton
import triton.language as tl

from attnplug.core import _launch
from attnplug.core._launch import FastLauncher, launch
from tests.utils import DEVICE, assert_close_verbose


@triton.jit
def _axpb_kernel(x_ptr, y_ptr, out_ptr, n, alpha, offset, BLOCK: tl.constexpr, ADD_OFFSET: tl.constexpr):
    """out = alpha * x + y (+ offset)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    value = alpha * tl.load(x_ptr + offs, mask=mask) + tl.load(y_ptr + offs, mask=mask)
    if ADD_OFFSET:
        value += offset
    tl.store(out_ptr + offs, value, mask=mask)


def axpb_reference(x, y, alpha, offset, add_offset):
    out = alpha * x.double() + y.double()
    return out + offset if add_offset else out


def run_axpb(x, y, out, alpha, offset, add_offset, block=64, num_warps=2, fast=True):
    n = x.numel()
    args = ((triton.cdiv(n, block),), x, y, out, n, alpha, offset)
    kwargs = {"BLOCK": block, "ADD_OFFSET": add_offset, "num_warps": num_warps}
    if fast:
        launch(_axpb_kernel, *args, **kwargs)
    else:
        _axpb_kernel[args[0]](*args[1:], **kwargs)


# Calls that differ in exactly what Triton specializes on: alignment (x[1:]), n == 1, n % 16,
# dtypes, constexpr values and options. Each must run its own correctly specialized kernel.
CASES = [
    {"n": 200, "dtype": torch.float32, "shift": 0, "offset": 3, "add_offset": True, "block": 64, "num_warps": 2},
    {"n": 200, "dtype": torch.float32, "shift": 1, "offset": 3, "add_offset": True, "block": 64, "num_warps": 2},
    {"n": 1, "dtype": torch.float32, "shift": 0, "offset": 1, "add_offset": True, "block": 64, "num_warps": 2},
    {"n": 160, "dtype": torch.float32, "shift": 0, "offset": 16, "add_offset": True, "block": 64, "num_warps": 2},
    {"n": 161, "dtype": torch.float16, "shift": 3, "offset": -5, "add_offset": True, "block": 32, "num_warps": 1},
    {"n": 97, "dtype": torch.float32, "shift": 0, "offset": 0, "add_offset": False, "block": 128, "num_warps": 4},
]


def make_inputs(n, dtype, shift, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n + shift, generator=gen).to(dtype).to(DEVICE)[shift:]
    y = torch.randn(n + shift, generator=gen).to(dtype).to(DEVICE)[shift:]
    out = torch.full((n + shift,), float("nan"), dtype=dtype, device=DEVICE)[shift:]
    return x, y, out


@pytest.mark.parametrize("case", range(len(CASES)))
def test_matches_plain_launch_and_reference(case):
    """Twice per case (first call: plain path, second: cached path), interleaved with other cases."""
    for repeat in range(2):
        for i in (case, (case + 1) % len(CASES)):
            c = CASES[i]
            x, y, out = make_inputs(c["n"], c["dtype"], c["shift"], seed=10 * i + repeat)
            run_axpb(x, y, out, 1.5, c["offset"], c["add_offset"], c["block"], c["num_warps"])
            plain = torch.full_like(out, float("nan"))
            run_axpb(x, y, plain, 1.5, c["offset"], c["add_offset"], c["block"], c["num_warps"], fast=False)
            tol = 1e-2 if c["dtype"] == torch.float16 else 1e-6
            want = axpb_reference(x, y, 1.5, c["offset"], c["add_offset"])
            assert_close_verbose(out, want, atol=tol, rtol=tol, what=f"case {i} call {repeat}")
            assert torch.equal(out, plain), f"case {i}: fast and plain launches differ"


@triton.jit(do_not_specialize=["n"])
def _iota_kernel(out_ptr, n: tl.int32, start, BLOCK: tl.constexpr):
    """out[:n] = start + arange(n); n is neither specialized on nor part of the fast key."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, start + offs, mask=offs < n)


def test_unspecialized_int_values_share_one_kernel():
    """n == 1, n % 16 == 0 and other values all run the one kernel Triton compiled, correctly."""
    out = torch.empty(300, dtype=torch.int32, device=DEVICE)
    for n in (1, 16, 7, 200, 1, 256):
        out.fill_(-7)
        launch(_iota_kernel, (triton.cdiv(n, 64),), out, n, 5, BLOCK=64)
        want = torch.full_like(out, -7)
        want[:n] = torch.arange(5, 5 + n, dtype=torch.int32, device=DEVICE)
        assert torch.equal(out, want), f"n={n}"


class _Param:
    def __init__(self, is_constexpr=False, do_not_specialize=False, annotation_type=""):
        self.is_constexpr = is_constexpr
        self.do_not_specialize = do_not_specialize
        self.annotation_type = annotation_type


def _key(*args, constexpr_at=()):
    params = [_Param(i in constexpr_at) for i in range(len(args))]
    key, _call_args = _launch._make_arg_packer(params, len(args))(0, (), *args)
    return key


def test_key_separates_what_triton_specializes_on():
    base = torch.zeros(64, dtype=torch.int32)
    assert _key(base) == _key(torch.zeros(64, dtype=torch.int32)), "same dtype and alignment share a key"
    assert _key(base) != _key(base[1:]), "4-byte offset: not 16-byte aligned"
    assert _key(base) == _key(base[4:]), "16-byte offset: still aligned"
    assert _key(base) != _key(base.long())
    ints = {v: _key(v) for v in (1, 2, 3, 16, 32, -16, 2**31, 2**40, 2**40 + 1, 2**63, 2**63 + 1, -(2**31) - 1)}
    assert ints[2] == ints[3] and ints[16] == ints[32] == ints[-16], "i32: only divisibility by 16 matters"
    assert ints[2**31] == ints[2**40] and ints[2**40 + 1] == ints[-(2**31) - 1], "i64: likewise"
    distinct = [1, 2, 16, 2**40, 2**40 + 1, 2**63, 2**63 + 1]  # ==1; i32 x %16; i64 x %16; u64 x %16
    assert len({ints[v] for v in distinct}) == len(distinct)
    assert _key(5, constexpr_at=(0,)) != _key(6, constexpr_at=(0,)), "a constexpr's value is in the key"
    assert _key(1.0) == _key(2.5) and _key(True) == _key(False) and _key(None) != _key(0)


def test_key_ignores_the_value_of_an_unspecialized_int():
    """Annotated + do_not_specialize: Triton keys on the type alone, and so does the packer."""
    params = [_Param(do_not_specialize=True, annotation_type="i32")]
    pack = _launch._make_arg_packer(params, 1)
    keys = {v: pack(0, (), v)[0] for v in (1, 7, 16, 2**40)}
    assert len(set(keys.values())) == 1
    assert pack(0, (), 7)[1] == (7,), "the value is still passed"
    with pytest.raises(_launch._Unsupported):
        pack(0, (), torch.zeros(1))
    unannotated = _launch._make_arg_packer([_Param(do_not_specialize=True)], 1)
    assert unannotated(0, (), 1)[0] != unannotated(0, (), 7)[0], "without a type annotation Triton still keys on it"


def test_real_kernel_params_declare_the_unspecialized_int():
    """Triton's own parameter objects (not the interpreter's) carry what _unspecialized_int reads."""
    from triton.runtime.jit import JITFunction

    params = JITFunction(_iota_kernel.fn, do_not_specialize=["n"]).params
    assert [_launch._unspecialized_int(p) for p in params] == [False, True, False, False]


def test_key_rejects_unsupported_arguments():
    with pytest.raises(_launch._Unsupported):
        _key(object())


def test_packer_passes_pointers_and_values():
    t = torch.zeros(8)
    params = [_Param(), _Param(), _Param(True)]
    _, call_args = _launch._make_arg_packer(params, 3)(0, (), t, 7, 64)
    assert call_args == (t.data_ptr(), 7, 64)


def test_interpreter_or_non_jit_falls_back_to_plain():
    """Under TRITON_INTERPRET (the CPU tests) or for non-JITFunction objects, launch is the plain one."""
    calls = []

    class FakeKernel:
        def __getitem__(self, grid):
            return lambda *a, **k: calls.append((grid, a, k))

    launch(FakeKernel(), (3,), 1, 2, BLOCK=4)
    assert calls == [((3,), (1, 2), {"BLOCK": 4})]


@pytest.mark.gpu
def test_cached_path_skips_jit_run():
    launcher = FastLauncher(_axpb_kernel)
    x, y, out = make_inputs(100, torch.float32, 0, seed=1)
    runs = []
    original = _axpb_kernel.run
    _axpb_kernel.run = lambda *a, **k: runs.append(1) or original(*a, **k)
    try:
        for _ in range(5):
            launcher((2,), x, y, out, 100, 2.0, 7, BLOCK=64, ADD_OFFSET=True)
    finally:
        del _axpb_kernel.run
    assert len(runs) == 1 and len(launcher._entries) == 1
    assert_close_verbose(out, axpb_reference(x, y, 2.0, 7, True), atol=1e-6, rtol=1e-6)


@pytest.mark.gpu
def test_fast_path_active_on_this_triton():
    """On a GPU with the Triton this module was written for, the cached path must really be used."""
    x, y, out = make_inputs(100, torch.float32, 0, seed=7)
    for _ in range(3):
        run_axpb(x, y, out, 1.0, 2, True)
    launcher = _launch.fast_launcher(_axpb_kernel)
    assert launcher._enabled and launcher._entries, f"fast path off on triton {triton.__version__}"


@pytest.mark.gpu
def test_launch_hooks_force_plain_path():
    from triton import knobs

    seen = []
    hook = lambda metadata: seen.append(metadata)
    x, y, out = make_inputs(50, torch.float32, 0, seed=2)
    run_axpb(x, y, out, 1.0, 0, False)  # warm: cached
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        run_axpb(x, y, out, 1.0, 0, False)
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    assert len(seen) == 1, "an installed launch hook must see the launch"


@pytest.mark.gpu
def test_broken_direct_launch_falls_back_once():
    """A launcher with an unexpected calling convention: one warning, then plain launches, right results."""
    launcher = FastLauncher(_axpb_kernel)
    x, y, out = make_inputs(100, torch.float32, 0, seed=3)
    launcher((2,), x, y, out, 100, 2.0, 7, BLOCK=64, ADD_OFFSET=True)

    def broken(*args):
        raise TypeError("launch() takes different arguments")

    launcher._entries = {k: (broken, *v[1:]) for k, v in launcher._entries.items()}
    out.fill_(float("nan"))
    with pytest.warns(RuntimeWarning, match="fast Triton launch disabled"):
        launcher((2,), x, y, out, 100, 2.0, 7, BLOCK=64, ADD_OFFSET=True)
    assert_close_verbose(out, axpb_reference(x, y, 2.0, 7, True), atol=1e-6, rtol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        launcher((2,), x, y, out, 100, 2.0, 7, BLOCK=64, ADD_OFFSET=True)


@pytest.mark.gpu
def test_cpu_tensor_on_warm_key_raises_instead_of_faulting():
    x, y, out = make_inputs(64, torch.float32, 0, seed=4)
    run_axpb(x, y, out, 1.0, 0, False)
    with pytest.raises(ValueError):
        run_axpb(x.cpu(), y, out, 1.0, 0, False)


@pytest.mark.gpu
def test_capturable_in_cuda_graph():
    x, y, out = make_inputs(1000, torch.float32, 0, seed=5)
    run_axpb(x, y, out, 0.5, 0, False, block=128)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(3):  # out = 0.5 * x + y, three times: idempotent
            run_axpb(x, y, out, 0.5, 0, False, block=128)
    gen = torch.Generator().manual_seed(6)
    x.copy_(torch.randn(1000, generator=gen).to(DEVICE))
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert_close_verbose(out, axpb_reference(x, y, 0.5, 0, False), atol=1e-6, rtol=1e-6)


def test_module_namespace():
    assert isinstance(_launch, types.ModuleType) and set(_launch.__all__) == {"FastLauncher", "fast_launcher", "launch"}
