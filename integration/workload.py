"""The requests every live-server test sends: same prompts for every engine and configuration."""

MAX_TOKENS = 16
PROMPTS = (
    "The quick brown fox",
    "Attention kernels read the key and value cache",
    "def add(a, b):",
    # ~100 tokens: a long prefill spanning several KV pages (vLLM blocks of 32), then decodes past a
    # 64-token kernel tile
    (
        "One, two, three, four, five, six, seven, eight, nine, ten. The capital of France is Paris; "
        "the capital of Japan is Tokyo. A paged KV cache stores tokens in fixed-size blocks. "
        "Speculative decoding drafts several tokens and verifies them at once. Hello, my name is Ada "
        "and I like numbers, graphs and tea. The quick brown fox jumps over the lazy dog."
    ),
    "Hello, my name is",
)
CHAT_MESSAGES = ({"role": "user", "content": "Speculative decoding drafts several tokens. Explain."},)
# Shared prefixes: later requests extend cached prefixes (SGLang: extend batches with a prefix).
CONCURRENT_PROMPTS = tuple(f"{PROMPTS[i % len(PROMPTS)]} {i}" for i in range(16))
