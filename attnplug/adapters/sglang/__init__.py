"""attnplug inside SGLang: the plugin entry point, the attnplug backend and the patches of SGLang's backends."""

from attnplug.adapters.enable import load_engine_plugin


def register() -> None:
    """Entry point of the `sglang.srt.plugins` group: runs in every SGLang process."""
    from attnplug.adapters.sglang.registration import register_attention_backend

    load_engine_plugin("sglang", register_backend=register_attention_backend)
