"""Stand-in package: only what SGLang's decode_attention.py imports (benchmark use only, CUDA, not ROCm)."""
