"""The patch registry's machinery: patches declared as data, applied and reverted per process.

A :class:`Patch` names every binding of each object it replaces (the definition and each module
that did ``from X import name``: a :class:`Rebinding`), the engine releases it supports, the
upstream change it mirrors and why it exists. :func:`apply_patches` rebinds all targets or none; a patch that cannot apply
to the installed engine is skipped with one warning line and never raises into the engine.
:func:`revert_patches` puts back the exact original objects.
"""

from __future__ import annotations

import importlib
import inspect
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Iterable

from packaging.specifiers import InvalidSpecifier, SpecifierSet

from attnplug._log import logger
from attnplug.adapters.engines import ENGINES

_PATCH_ID = re.compile(r"^[a-z][a-z0-9_]*\.[a-z][a-z0-9_]*\.[a-z][a-z0-9_]*$")
_MISSING = object()


@dataclass(frozen=True)
class Rebinding:
    """One object of the engine replaced at every place it is bound.

    Attributes
    ----------
    targets: ``"module:qualname"`` bindings to rebind. The first is the definition; the others are
        the modules that copied it with ``from module import name``. All must hold the same object.
    replacement: ``"module:factory"`` inside attnplug; ``factory(original)`` returns the replacement,
        which may call ``original`` for the cases it does not cover.
    signature: parameter names the replacement expects the original to have, in order.
    """

    targets: tuple[str, ...]
    replacement: str
    signature: tuple[str, ...]

    def __post_init__(self):
        if not self.targets or any(target.count(":") != 1 for target in self.targets):
            raise ValueError(f"targets must be 'module:qualname' strings, got {self.targets!r}")
        if self.replacement.count(":") != 1:
            raise ValueError(f"replacement must be 'module:factory', got {self.replacement!r}")


@dataclass(frozen=True)
class Patch:
    """One change to an engine, declared as data: applied whole or not at all, and reversible.

    Attributes
    ----------
    id: ``<engine>.<backend>.<what>``; its last part is the keyword of ``attnplug.apply_to_<engine>``.
    engine: key of :data:`attnplug.adapters.engines.ENGINES`.
    rebinds: the objects replaced (usually one; several when the change spans functions).
    versions: PEP 440 specifier of the engine releases the patch was verified against.
    upstream: the upstream PR or commit this mirrors.
    why: why the patch exists.
    remove_when: when the patch can be deleted.
    upstream_has_it: PEP 440 specifier of the engine releases that already ship the change ("" if none).
    opt_in: why the patch stays out of ``ATTNPLUG_PATCHES=all`` and of the API's defaults, e.g. measured
        slower than the engine's own code ("" if none): it then applies only where named explicitly.
    """

    id: str
    engine: str
    rebinds: tuple[Rebinding, ...]
    versions: str
    upstream: str
    why: str
    remove_when: str = ""
    upstream_has_it: str = ""
    opt_in: str = ""

    def __post_init__(self):
        if not _PATCH_ID.match(self.id) or not self.id.startswith(self.engine + "."):
            raise ValueError(f"Patch id {self.id!r} must look like '{self.engine}.<backend>.<what>'")
        if not self.rebinds:
            raise ValueError(f"Patch {self.id}: rebinds must name at least one Rebinding")
        for name in ("versions", "upstream_has_it"):
            try:
                SpecifierSet(getattr(self, name))
            except InvalidSpecifier as exc:
                raise ValueError(f"Patch {self.id}: {name} {getattr(self, name)!r} is not a version specifier") from exc

    @property
    def keyword(self) -> str:
        """The keyword that turns this patch on or off in ``attnplug.apply_to_<engine>(...)``."""
        return self.id.rsplit(".", 1)[1]

    @property
    def targets(self) -> tuple[str, ...]:
        """Every binding the patch rebinds."""
        return tuple(target for rebind in self.rebinds for target in rebind.targets)


@dataclass(frozen=True)
class PatchResult:
    """What happened to one patch: ``status`` is "applied", "already applied" or "skipped"."""

    patch_id: str
    status: str
    reason: str = ""

    @property
    def active(self) -> bool:
        return self.status != "skipped"


@dataclass(frozen=True)
class ApplyReport:
    """The outcome of one apply call: which patches applied, and which were skipped and why."""

    results: tuple[PatchResult, ...] = ()

    @property
    def applied(self) -> list[str]:
        """Patch ids active after the call (newly applied or already applied)."""
        return [r.patch_id for r in self.results if r.active]

    @property
    def newly_applied(self) -> list[str]:
        return [r.patch_id for r in self.results if r.status == "applied"]

    @property
    def skipped(self) -> dict[str, str]:
        """Patch id -> why it was skipped."""
        return {r.patch_id: r.reason for r in self.results if not r.active}

    def __str__(self) -> str:
        if not self.results:
            return "no patches selected"
        width = max(len(r.patch_id) for r in self.results)
        return "\n".join(
            f"{r.patch_id:<{width}}  {r.status}" + (f": {r.reason}" if r.reason else "") for r in self.results
        )


@dataclass
class _Binding:
    """One rebound attribute and what it held before (``_MISSING`` when it was inherited)."""

    owner: Any
    name: str
    saved: Any


@dataclass
class _AppliedPatch:
    patch: Patch
    bindings: list[_Binding] = field(default_factory=list)


_applied: dict[str, _AppliedPatch] = {}
_lock = threading.RLock()


def resolve_target(target: str) -> tuple[Any, str]:
    """``"pkg.mod:Class.attr"`` -> (the object holding the attribute, the attribute name); imports pkg.mod."""
    module_name, qualname = target.split(":")
    owner: Any = importlib.import_module(module_name)
    *path, name = qualname.split(".")
    for part in path:
        owner = getattr(owner, part)
    return owner, name


def _load_factory(replacement: str) -> Callable[[Any], Any]:
    module_name, attr = replacement.split(":")
    return getattr(importlib.import_module(module_name), attr)


def _unwrap(raw: Any) -> Any:
    """The function inside a staticmethod/classmethod, else ``raw``."""
    return raw.__func__ if isinstance(raw, (staticmethod, classmethod)) else raw


def _rewrap_like(raw: Any, new: Any) -> Any:
    """Wrap ``new`` the way ``raw`` was wrapped (staticmethod/classmethod), so the binding behaves alike."""
    return type(raw)(new) if isinstance(raw, (staticmethod, classmethod)) else new


def _raw_attribute(owner: Any, name: str) -> Any:
    """The attribute as stored on ``owner`` itself (``_MISSING`` if inherited), or AttributeError."""
    if not hasattr(owner, name):
        raise AttributeError(f"{getattr(owner, '__name__', owner)!s} has no attribute {name!r}")
    return vars(owner).get(name, _MISSING)


def version_problem(patch: Patch) -> str | None:
    """Why the installed engine release rules the patch out, or None. Imports nothing."""
    engine = ENGINES.get(patch.engine)
    if engine is None:
        return f"unknown engine {patch.engine!r}"
    version = engine.installed_version()
    if version is None:
        return f"{patch.engine} is not installed"
    if not SpecifierSet(patch.versions).contains(version, prereleases=True):
        if patch.upstream_has_it and SpecifierSet(patch.upstream_has_it).contains(version, prereleases=True):
            return f"{patch.engine} {version} already has this change upstream ({patch.upstream})"
        return f"{patch.engine} {version} is outside the supported range {patch.versions!r}"
    return None


def _original_and_bindings(rebind: Rebinding) -> tuple[Any, list[tuple[Any, str, Any]]]:
    """Resolve every target; return the original object and (owner, name, raw) per binding.

    Raises LookupError with the reason when a target is missing, the bindings disagree, or the
    original's signature is not the one the replacement expects.
    """
    bindings = []
    original = _MISSING
    for target in rebind.targets:
        try:
            owner, name = resolve_target(target)
            raw = _raw_attribute(owner, name)
        except (ImportError, AttributeError) as exc:
            raise LookupError(f"target {target} is missing ({type(exc).__name__}: {exc})") from exc
        current = _unwrap(getattr(owner, name) if raw is _MISSING else raw)
        if original is _MISSING:
            original = current
        elif current is not original:
            raise LookupError(f"target {target} holds a different object than {rebind.targets[0]} (patched elsewhere?)")
        bindings.append((owner, name, raw))
    try:
        found = tuple(inspect.signature(original).parameters)
    except (TypeError, ValueError) as exc:
        raise LookupError(f"cannot read the signature of {rebind.targets[0]}: {exc}") from exc
    if found != rebind.signature:
        raise LookupError(f"{rebind.targets[0]} has signature ({', '.join(found)}), expected ({', '.join(rebind.signature)})")
    return original, bindings


def check_patch(patch: Patch) -> str | None:
    """Why ``patch`` would be skipped against the installed engine, or None if it would apply."""
    if patch.id in _applied:
        return None
    problem = version_problem(patch)
    if problem:
        return problem
    try:
        for rebind in patch.rebinds:
            _original_and_bindings(rebind)
            _load_factory(rebind.replacement)
    except LookupError as exc:
        return str(exc)
    except Exception as exc:  # importing an engine module can fail in many ways
        return f"{type(exc).__name__}: {exc}"
    return None


def _apply_one(patch: Patch, named: bool) -> PatchResult:
    if patch.id in _applied:
        return PatchResult(patch.id, "already applied")
    problem = version_problem(patch)
    if problem is None and patch.opt_in and not named:
        problem = f"opt-in, applies only where named explicitly: {patch.opt_in}"
    if problem is None:
        done: list[_Binding] = []
        try:
            resolved = [(rebind, *_original_and_bindings(rebind)) for rebind in patch.rebinds]  # check all first
            for rebind, original, bindings in resolved:
                replacement = _load_factory(rebind.replacement)(original)
                for owner, name, raw in bindings:
                    done.append(_Binding(owner, name, raw))
                    setattr(owner, name, _rewrap_like(raw, replacement))
            _applied[patch.id] = _AppliedPatch(patch, done)
            return PatchResult(patch.id, "applied")
        except LookupError as exc:
            problem = str(exc)
        except Exception as exc:  # a failing patch must never take the engine down
            problem = f"{type(exc).__name__}: {exc}"
        _restore(done)
    logger.warning("skipped patch %s: %s", patch.id, problem)
    return PatchResult(patch.id, "skipped", problem)


def apply_patches(patches: Iterable[Patch], *, named_ids: Collection[str] = ()) -> ApplyReport:
    """Apply each patch (idempotent per process); one failing patch never stops the others.

    ``named_ids``: the patches the user named explicitly (only those apply if they are opt-in).
    """
    with _lock:
        return ApplyReport(tuple(_apply_one(patch, patch.id in named_ids) for patch in patches))


def _restore(bindings: list[_Binding]) -> None:
    for binding in reversed(bindings):
        if binding.saved is _MISSING:
            delattr(binding.owner, binding.name)
        else:
            setattr(binding.owner, binding.name, binding.saved)


def revert_patches(patch_ids: Iterable[str] | None = None) -> list[str]:
    """Restore the original objects of the given applied patches (default: all); returns the ids reverted."""
    with _lock:
        ids = list(_applied) if patch_ids is None else [i for i in patch_ids if i in _applied]
        for patch_id in reversed(ids):
            _restore(_applied.pop(patch_id).bindings)
        return ids


def applied_patch_ids() -> list[str]:
    """Ids of the patches active in this process, in the order they were applied."""
    return list(_applied)
