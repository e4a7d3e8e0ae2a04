"""Registering the ``ATTNPLUG`` member of vLLM's ``AttentionBackendEnum``, pickle-safe across processes.

A backend registered under a new string name is a new enum member that exists only in processes
that ran the registration. vLLM spawns its engine-core process and unpickles the config (which
holds the selected member) before any plugin runs there, so the member must unpickle through
:func:`attnplug_backend_member`, which registers it on the spot.
"""

from __future__ import annotations

BACKEND_NAME = "ATTNPLUG"
BACKEND_CLASS_PATH = "attnplug.adapters.vllm.backend.AttnplugBackend"


def attnplug_backend_member():
    """The ``AttentionBackendEnum.ATTNPLUG`` member, registered first if this process lacks it."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if BACKEND_NAME not in AttentionBackendEnum.__members__:
        register_backend(BACKEND_NAME, BACKEND_CLASS_PATH)
    member = AttentionBackendEnum[BACKEND_NAME]
    member.__reduce_ex__ = _reduce_member
    return member


def _reduce_member(protocol):
    return attnplug_backend_member, ()


def register_attention_backend() -> None:
    """Make ``--attention-backend ATTNPLUG`` available (harmless until the user names it)."""
    attnplug_backend_member()
