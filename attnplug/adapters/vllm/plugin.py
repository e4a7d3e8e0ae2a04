"""The built-in vLLM adapter as an ordinary attnplug plugin: it announces vLLM's patches."""

from attnplug.adapters.vllm.patches import PATCHES
from attnplug.hooks import hookimpl


@hookimpl
def attnplug_patches():
    return PATCHES
