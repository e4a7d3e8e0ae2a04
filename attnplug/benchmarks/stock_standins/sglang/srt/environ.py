import os


class _Env:
    def __init__(self, name, default):
        self.name, self.default = name, default

    def get(self):
        value = os.environ.get(self.name)
        if value is None:
            return self.default
        if isinstance(self.default, bool):
            return value.lower() in ("1", "true", "yes")
        return type(self.default)(value)


class envs:  # the variables decode_attention.py reads, with SGLang 0.5.23's defaults
    SGLANG_TRITON_DECODE_ATTN_STATIC_KV_SPLITS = _Env("SGLANG_TRITON_DECODE_ATTN_STATIC_KV_SPLITS", False)
    SGLANG_FORCE_LEAN_GRID_CU_MULT = _Env("SGLANG_FORCE_LEAN_GRID_CU_MULT", 1.0)
    SGLANG_MLA_DECODE_TUNE = _Env("SGLANG_MLA_DECODE_TUNE", False)
