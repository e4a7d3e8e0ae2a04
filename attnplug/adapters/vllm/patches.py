"""Patches of vLLM's own attention backends, declared as data (see attnplug.adapters.patching.Patch)."""

from attnplug.adapters.patching import Patch

PATCHES: list[Patch] = []  # filled in by the vLLM adapter work (issue 5)
