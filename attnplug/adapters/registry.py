"""The patch registry: every patch the registered plugins announce, and selection by ``ATTNPLUG_PATCHES``."""

from __future__ import annotations

from attnplug.adapters.patching import Patch
from attnplug.hooks import get_plugin_manager

PATCHES_ENV = "ATTNPLUG_PATCHES"


class UnknownPatchError(ValueError):
    """``ATTNPLUG_PATCHES`` (or an API call) named a patch id that no plugin declares."""


def all_patches() -> dict[str, Patch]:
    """Patch id -> Patch, from every plugin's ``attnplug_patches`` hook, in registration order."""
    patches: dict[str, Patch] = {}
    for contributed in get_plugin_manager().hook.attnplug_patches():
        for patch in contributed:
            if patch.id in patches:
                raise ValueError(f"two plugins declare patch {patch.id!r}")
            patches[patch.id] = patch
    return patches


def engine_patches(engine: str) -> list[Patch]:
    """The registered patches of one engine."""
    return [patch for patch in all_patches().values() if patch.engine == engine]


def select_patches(engine: str, selection: str) -> list[Patch]:
    """Parse an ``ATTNPLUG_PATCHES`` value ("", "all" or a comma list of ids) into ``engine``'s patches.

    Ids of other engines' patches are accepted and left to those engines; an unknown id raises
    :class:`UnknownPatchError` naming it and the known ids.
    """
    names = _names(selection)
    if names == ["all"]:
        return engine_patches(engine)
    known = all_patches()
    unknown = [name for name in names if name not in known]
    if unknown:
        raise UnknownPatchError(
            f"{PATCHES_ENV} names unknown patch id(s) {', '.join(map(repr, unknown))}; "
            f"use 'all' or a comma list of: {', '.join(known) or '(no patches registered)'}"
        )
    return [known[name] for name in names if known[name].engine == engine]


def named_patch_ids(selection: str) -> frozenset[str]:
    """The ids an ``ATTNPLUG_PATCHES`` value names explicitly ("all" names none: opt-in patches stay off)."""
    names = _names(selection)
    return frozenset() if names == ["all"] else frozenset(names)


def _names(selection: str) -> list[str]:
    """The comma-separated entries of an ``ATTNPLUG_PATCHES`` value, stripped, empty ones dropped."""
    return [name.strip() for name in selection.split(",") if name.strip()]
