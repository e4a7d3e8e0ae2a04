"""Registering attnplug's SGLang attention backend ``attnplug`` (``--attention-backend attnplug``).

Three registrations, all idempotent, all needed in SGLang's processes (its ``sglang.srt.plugins``
entry point runs in each of them): the factory in ``ATTENTION_BACKENDS`` (read in the scheduler
process, which builds the model runner), the CLI whitelist entry (read by the launch process's
argument parser, which SGLang builds after loading plugins), and the declared patch
``sglang.attnplug.draft_backends`` (speculative decoding's draft backends; skipped with its reason
on releases it does not cover). SGLang is imported here only when
the entry point runs; the backend module itself is imported only when the factory is called.
"""

from __future__ import annotations

BACKEND_NAME = "attnplug"


def create_attnplug_backend(model_runner):
    """SGLang's factory for ``--attention-backend attnplug``: ``fn(ModelRunner) -> AttentionBackend``."""
    from attnplug.adapters.sglang.backend import AttnplugAttnBackend

    return AttnplugAttnBackend(model_runner)


def register_attention_backend() -> None:
    """Make ``--attention-backend attnplug`` available (harmless until the user names it)."""
    from sglang.srt.layers.attention import attention_registry

    try:  # sglang >= 0.5.13
        from sglang.srt.arg_groups.choices import (
            ATTENTION_BACKEND_CHOICES,
            add_attention_backend_choices,
        )
    except ImportError:  # older releases keep the whitelist in server_args
        from sglang.srt.server_args import (
            ATTENTION_BACKEND_CHOICES,
            add_attention_backend_choices,
        )

    if attention_registry.ATTENTION_BACKENDS.get(BACKEND_NAME) is not create_attnplug_backend:
        attention_registry.register_attention_backend(BACKEND_NAME)(create_attnplug_backend)
    if BACKEND_NAME not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([BACKEND_NAME])
    register_draft_backends()


def register_draft_backends() -> None:
    """Apply ``sglang.attnplug.draft_backends`` (attnplug in SGLang's draft-backend tables)."""
    from attnplug import report
    from attnplug._log import logger
    from attnplug.adapters.patching import apply_patches
    from attnplug.adapters.sglang.patches import DRAFT_BACKENDS

    outcome = apply_patches([DRAFT_BACKENDS])
    report.record_patches(outcome)
    for result in outcome.results:
        if not result.active:
            logger.info("%s skipped (speculative decoding with --attention-backend attnplug unavailable): %s",
                        result.patch_id, result.reason)
