"""The hooks attnplug calls; plugins implement them with ``@attnplug.hookimpl``.

Each hook is documented in docs/hooks.md (tests/test_hooks.py keeps the two in sync).
"""

import pluggy

hookspec = pluggy.HookspecMarker("attnplug")


@hookspec
def attnplug_patches():
    """Return the patches (a list of ``attnplug.Patch``) this plugin contributes to the registry."""


@hookspec(firstresult=True)
def attnplug_split_kv(problem):
    """Return the max KV segments per decode sequence for this ``SplitKVProblem``, or None to keep the default."""


@hookspec(firstresult=True)
def attnplug_core_op(name):
    """Return an implementation to use instead of the core op called ``name``, or None to keep attnplug's."""


@hookspec
def attnplug_patches_applied(engine, report):
    """Called after attnplug applied patches in this process, with the engine name and the ``ApplyReport``."""
