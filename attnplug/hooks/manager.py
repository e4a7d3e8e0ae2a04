"""The one plugin manager: built-in adapters as default plugins, third-party ones from entry points."""

from __future__ import annotations

import functools
import importlib
import importlib.metadata

import pluggy

from attnplug._log import logger
from attnplug.hooks import specs

ENTRY_POINT_GROUP = "attnplug"
DEFAULT_PLUGINS = ("attnplug.adapters.vllm.plugin", "attnplug.adapters.sglang.plugin")

hookimpl = pluggy.HookimplMarker("attnplug")


@functools.cache
def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, built on first use."""
    pm = pluggy.PluginManager("attnplug")
    pm.add_hookspecs(specs)
    for name in DEFAULT_PLUGINS:
        pm.register(importlib.import_module(name), name=name)
    _load_entry_point_plugins(pm)
    return pm


def _load_entry_point_plugins(pm: pluggy.PluginManager) -> None:
    """Register plugins from the ``attnplug`` entry-point group; a broken one is logged and left out."""
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if pm.get_plugin(entry_point.name) is not None:
            continue
        try:
            pm.register(entry_point.load(), name=entry_point.name)
        except Exception as exc:
            logger.warning("left out plugin %s (%s): %s: %s", entry_point.name, entry_point.value, type(exc).__name__, exc)


def plugin_names() -> list[str]:
    """Names of the registered plugins, built-in ones first."""
    return [name for name, _ in get_plugin_manager().list_name_plugin()]
