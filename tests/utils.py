"""Shared helpers for the kernel tests: the device to run on and a verbose comparison."""

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SENTINEL = -7777  # pre-filled into integer outputs to show which elements a kernel wrote


def assert_equal_verbose(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """Exact equality that says how many elements differ and where the first ones are."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    diff = actual.cpu() != expected.cpu()
    if diff.any():
        where = diff.nonzero()[:5].tolist()
        raise AssertionError(
            f"{what}: {int(diff.sum())} of {diff.numel()} elements differ; first at {where}: "
            f"got {[actual.cpu()[tuple(i)].item() for i in where]}, "
            f"want {[expected.cpu()[tuple(i)].item() for i in where]}"
        )


def assert_close_verbose(actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float, what: str = "") -> None:
    """allclose that fails on NaN (e.g. an unwritten poisoned element) and reports the worst element."""
    a, e = actual.detach().cpu().double(), expected.detach().cpu().double()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    nan = torch.isnan(a)
    assert not nan.any(), f"{what}: {int(nan.sum())} of {a.numel()} elements are NaN (unwritten?); first at {nan.nonzero()[:5].tolist()}"
    bad = (a - e).abs() > atol + rtol * e.abs()
    if bad.any():
        err = (a - e).abs()
        worst = tuple(int(i) for i in divmod_index(int(err.argmax()), a.shape))
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {a.numel()} elements out of tolerance (atol={atol}, rtol={rtol}); "
            f"max abs err {err.max().item():.3e} at {worst}: got {a[worst].item():.6f}, want {e[worst].item():.6f}"
        )


def divmod_index(flat: int, shape) -> list:
    """Flat index to a multi-index for ``shape``."""
    out = []
    for size in reversed(shape):
        flat, rem = divmod(flat, size)
        out.append(rem)
    return list(reversed(out))
