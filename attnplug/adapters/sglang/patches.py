"""Patches of SGLang's own attention backends, declared as data (see attnplug.adapters.patching.Patch)."""

from attnplug.adapters.patching import Patch

PATCHES: list[Patch] = []  # filled in by the SGLang adapter work (issue 6)
