"""attnplug inside SGLang: the plugin entry point, the attnplug backend and the patches of SGLang's backends."""

from attnplug.adapters.enable import load_engine_plugin
from attnplug.adapters.registry import UnknownPatchError


def register() -> None:
    """Entry point of the `sglang.srt.plugins` group: runs in every SGLang process.

    SGLang's plugin loader logs and swallows exceptions, so a bad ``ATTNPLUG_PATCHES`` value is
    raised as SystemExit: the server must not start with a selection the user mistyped.
    """
    from attnplug.adapters.sglang.registration import register_attention_backend

    try:
        load_engine_plugin("sglang", register_backend=register_attention_backend)
    except UnknownPatchError as exc:
        raise SystemExit(f"attnplug: {exc}") from exc
