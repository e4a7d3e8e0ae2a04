"""attnplug inside SGLang: the plugin entry point and the patches of SGLang's own backends."""

from attnplug.adapters.enable import load_engine_plugin


def register() -> None:
    """Entry point of the `sglang.srt.plugins` group: runs in every SGLang process."""
    load_engine_plugin("sglang")
