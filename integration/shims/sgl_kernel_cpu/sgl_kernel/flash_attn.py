"""TEST-ONLY: ``sgl_kernel.flash_attn`` names that SGLang imports at module level; calling them raises."""

from sgl_kernel import STAND_IN, _unavailable

flash_attn_varlen_func = _unavailable("flash_attn.flash_attn_varlen_func")
flash_attn_with_kvcache = _unavailable("flash_attn.flash_attn_with_kvcache")


def __getattr__(name: str):
    raise AttributeError(f"sgl_kernel.flash_attn.{name} is not provided by {STAND_IN}")
