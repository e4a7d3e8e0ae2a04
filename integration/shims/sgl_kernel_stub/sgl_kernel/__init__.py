"""TEST-ONLY import stand-in for sgl_kernel under SGLang 0.5.8-0.5.10 on CPU (see ../README.md)."""

STAND_IN = "the test-only sgl_kernel import stand-in (integration/shims/sgl_kernel_stub)"


def _unavailable(name: str):
    def call(*args, **kwargs):
        raise NotImplementedError(f"sgl_kernel.{name} is not available in {STAND_IN}: it only imports")

    call.__name__ = call.__qualname__ = name
    return call


merge_state_v2 = _unavailable("merge_state_v2")
silu_and_mul = _unavailable("silu_and_mul")  # imported unguarded by 0.5.8 (moe_runner/deep_gemm.py)


def __getattr__(name: str):
    raise AttributeError(f"sgl_kernel.{name} is not provided by {STAND_IN}")
