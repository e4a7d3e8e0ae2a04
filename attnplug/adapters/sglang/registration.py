"""Registering attnplug's SGLang attention backend (filled in by the SGLang backend work)."""


def register_attention_backend() -> None:
    """Make ``--attention-backend attnplug`` available (harmless until the user names it)."""
