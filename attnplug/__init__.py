"""attnplug: attention-path speed-ups for vLLM and SGLang from one Triton kernel core.

``import attnplug`` never imports an engine (nor Triton); the kernels live in ``attnplug.core``.
"""

from attnplug.adapters.enable import apply_to_sglang, apply_to_vllm, patched, revert
from attnplug.adapters.patching import ApplyReport, Patch, PatchResult, Rebinding
from attnplug.hooks import hookimpl

__version__ = "0.1.0"

__all__ = [
    "ApplyReport",
    "Patch",
    "PatchResult",
    "Rebinding",
    "apply_to_sglang",
    "apply_to_vllm",
    "hookimpl",
    "patched",
    "revert",
]
