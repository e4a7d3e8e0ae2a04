"""attnplug inside vLLM: the plugin entry point and the patches of vLLM's own backends."""

from attnplug.adapters.enable import load_engine_plugin


def register() -> None:
    """Entry point of the `vllm.general_plugins` group: runs in every vLLM process."""
    load_engine_plugin("vllm")
