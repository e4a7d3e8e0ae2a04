"""attnplug's pluggy layer: hook specifications and the plugin manager."""

from attnplug.hooks.manager import ENTRY_POINT_GROUP, get_plugin_manager, hookimpl, plugin_names

__all__ = ["ENTRY_POINT_GROUP", "get_plugin_manager", "hookimpl", "plugin_names"]
