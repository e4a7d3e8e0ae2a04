"""The built-in SGLang adapter as an ordinary attnplug plugin: it announces SGLang's patches."""

from attnplug.adapters.sglang.patches import PATCHES
from attnplug.hooks import hookimpl


@hookimpl
def attnplug_patches():
    return PATCHES
