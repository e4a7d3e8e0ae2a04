"""attnplug inside vLLM: the plugin entry point, the ATTNPLUG backend and the patches of vLLM's backends."""

from attnplug.adapters.enable import load_engine_plugin


def register() -> None:
    """Entry point of the `vllm.general_plugins` group: runs in every vLLM process."""
    from attnplug.adapters.vllm.registration import register_attention_backend

    load_engine_plugin("vllm", register_backend=register_attention_backend)
