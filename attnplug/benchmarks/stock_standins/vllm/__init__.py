"""Stand-in package: only what vLLM's triton_unified_attention.py imports (benchmark use only)."""
