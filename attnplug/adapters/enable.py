"""The three ways in: engine plugin entry points, the monkey-patch API, and (via report) observation."""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator

from attnplug import report
from attnplug._log import logger
from attnplug.adapters.engines import ENGINES
from attnplug.adapters.patching import ApplyReport, apply_patches, revert_patches
from attnplug.adapters.registry import PATCHES_ENV, engine_patches, named_patch_ids, select_patches
from attnplug.hooks import get_plugin_manager

DISABLE_ENV = "ATTNPLUG_DISABLE"

_loaded_engines: set[str] = set()


def disabled() -> bool:
    return os.environ.get(DISABLE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _record_engine(engine: str) -> None:
    version = ENGINES[engine].installed_version()
    report.record_engine(engine, str(version) if version else None)


def _apply_and_announce(engine: str, patches, named_ids) -> ApplyReport:
    outcome = apply_patches(patches, named_ids=named_ids)
    report.record_patches(outcome)
    get_plugin_manager().hook.attnplug_patches_applied(engine=engine, report=outcome)
    return outcome


def load_engine_plugin(engine: str, register_backend: Callable[[], None] | None = None) -> None:
    """What an engine's plugin entry point runs, in every engine process; idempotent per process.

    Registers attnplug's attention backend (used only when the user names it with the engine's
    ``--attention-backend``) and applies the patches ``ATTNPLUG_PATCHES`` selects. An unknown patch
    id raises at start-up; anything else that goes wrong is logged and the engine runs stock.
    """
    if disabled():
        if engine not in _loaded_engines:
            _loaded_engines.add(engine)
            logger.info("%s=1: attnplug is off in this process; %s runs stock", DISABLE_ENV, engine)
        return
    if engine in _loaded_engines:
        return
    selection = os.environ.get(PATCHES_ENV, "")
    selected = select_patches(engine, selection)  # unknown id: a clear error at start-up
    _loaded_engines.add(engine)
    _record_engine(engine)
    report.start()
    if register_backend is not None:
        try:
            register_backend()
        except Exception as exc:
            logger.warning("could not register attnplug's %s attention backend: %s: %s", engine, type(exc).__name__, exc)
    if selected:
        outcome = _apply_and_announce(engine, selected, named_patch_ids(selection))
        logger.info("%s patches: %s", engine, "; ".join(f"{r.patch_id} {r.status}" for r in outcome.results))
    report.flush()


def apply_to(engine: str, **enabled: bool) -> ApplyReport:
    """Apply ``engine``'s patches in this process: every patch unless its keyword is given as False
    (an opt-in patch only when its keyword is given as True).

    Raises TypeError for a keyword that names no patch of ``engine``.
    """
    patches = {patch.keyword: patch for patch in engine_patches(engine)}
    unknown = sorted(set(enabled) - set(patches))
    if unknown:
        raise TypeError(
            f"apply_to_{engine}() got unknown patch keyword(s) {', '.join(unknown)}; "
            f"known: {', '.join(patches) or '(none registered)'}"
        )
    _record_engine(engine)
    selected = [patch for keyword, patch in patches.items() if enabled.get(keyword, True)]
    named = {patch.id for keyword, patch in patches.items() if enabled.get(keyword) is True}
    return _apply_and_announce(engine, selected, named)


def apply_to_vllm(**enabled: bool) -> ApplyReport:
    """Patch vLLM in this process (e.g. before building ``vllm.LLM``): one keyword per patch, default on
    (opt-in patches: off)."""
    return apply_to("vllm", **enabled)


def apply_to_sglang(**enabled: bool) -> ApplyReport:
    """Patch SGLang in this process: one keyword per patch, default on (opt-in patches: off)."""
    return apply_to("sglang", **enabled)


def revert(*patch_ids: str) -> list[str]:
    """Undo the given applied patches (default: all of them); returns the ids reverted."""
    return revert_patches(patch_ids or None)


@contextlib.contextmanager
def patched(engine: str, **enabled: bool) -> Iterator[ApplyReport]:
    """``with attnplug.patched("vllm", split_launch=True) as report:`` applies, then reverts what it applied."""
    outcome = apply_to(engine, **enabled)
    try:
        yield outcome
    finally:
        revert_patches(outcome.newly_applied)
